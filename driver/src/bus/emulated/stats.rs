//! Counters for tests and tools.

use std::collections::BTreeMap;

/// A snapshot of the emulated controller's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Commands fetched, by (queue id, opcode). Queue 0 is the admin queue.
    pub commands: BTreeMap<(u16, u8), u64>,
    /// Device accesses to IOVAs outside DMA memory (a correct driver causes none).
    pub dma_faults: u64,
    /// Doorbell writes, valid or not.
    pub doorbell_writes: u64,
    /// Doorbell register writes of the I/O queues (queue ids 1 and up), valid or not.
    pub io_doorbell_writes: u64,
    /// Doorbell writes to a nonexistent queue or with a value beyond the queue.
    pub invalid_doorbell_writes: u64,
    /// Times an injected fault fired.
    pub faults_fired: u64,
    /// Commands whose completion is currently held (delayed or never-completing).
    pub held: usize,
    /// Times the threaded-mode device thread slept because it had been idle.
    pub idle_sleeps: u64,
    /// Completions of the I/O queues that found their completion queue full and waited for
    /// the host's head doorbell (a CQ overflow avoided by stalling the device). A host that
    /// keeps room for every command it submitted causes none.
    pub io_cq_full: u64,
    /// Controller resets (CC.EN 1 to 0) the device processed: each deleted every queue and
    /// dropped every command it held.
    pub controller_resets: u64,
    /// Shutdown notifications (CC.SHN set while clear) the device processed.
    pub shutdowns: u64,
}

impl Stats {
    /// Commands fetched on queue `qid`.
    pub fn queue_commands(&self, qid: u16) -> u64 {
        self.commands
            .range((qid, 0)..=(qid, u8::MAX))
            .map(|(_, n)| n)
            .sum()
    }
    /// Commands with `opcode` fetched on queue `qid`.
    pub fn commands_with(&self, qid: u16, opcode: u8) -> u64 {
        self.commands.get(&(qid, opcode)).copied().unwrap_or(0)
    }
    /// Commands with `opcode` fetched on the I/O queues (every queue but 0).
    pub fn io_commands_with(&self, opcode: u8) -> u64 {
        self.commands
            .iter()
            .filter(|((q, op), _)| *q != 0 && *op == opcode)
            .map(|(_, n)| n)
            .sum()
    }
    /// Commands fetched on the I/O queues (every queue but 0).
    pub fn io_commands(&self) -> u64 {
        self.commands
            .iter()
            .filter(|((q, _), _)| *q != 0)
            .map(|(_, n)| n)
            .sum()
    }
}
