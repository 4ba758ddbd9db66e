//! Errors: [`Error`] for everything a call returns, [`IoError`] for how one I/O request ended.
//!
//! Every variant names the controller (PCI location) or queue, and the command, namespace and
//! LBA where they are known; messages say what went wrong and what to do about it.

use std::sync::Arc;
use std::time::Duration;

use crate::bus::dma::DmaError;
use crate::nvme::controller::InitState;
use crate::spec::Status;
use crate::types::{Cid, Iova, Lba, Nsid, QueueId};

/// The fix named by [`Error::NamespaceHasMetadata`].
fn metadata_fix(without: Option<usize>) -> String {
    match without {
        Some(n) => format!(
            "`nvme format /dev/nvmeXnY --lbaf={n}` (LBA format {n} has none; this erases the \
             namespace)"
        ),
        None => "the namespace lists no LBA format without metadata; recreate it with one \
                 (nvme create-ns --flbas)"
            .to_string(),
    }
}

/// Result of a driver call.
pub type Result<T, E = Error> = core::result::Result<T, E>;

/// Errors returned by the controller, admin commands and I/O submission.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The device was removed: its registers read all ones (surprise removal, link down) or
    /// the kernel asked for it back (hot-unplug, unbind).
    #[error(
        "controller {location}: device removed (registers read all ones, or the kernel asked \
         for the device back: hot-unplug or unbind); check the device is present (lspci), bind \
         it to vfio-pci again (hugepage-setup.sh) and open a new controller"
    )]
    DeviceGone {
        /// PCI location.
        location: String,
    },
    /// CSTS.CFS is set.
    #[error(
        "controller {location}: controller fatal status (CSTS.CFS) is set; call \
         Controller::reset to re-initialise it and create new queue pairs"
    )]
    ControllerFatal {
        /// PCI location.
        location: String,
    },
    /// A bring-up state did not finish within its time limit.
    #[error(
        "controller {location}: bring-up timed out in state {state:?} after {waited:?} (limit \
         from CAP.TO); the controller did not answer, check it is not bound to another driver"
    )]
    InitTimeout {
        /// PCI location.
        location: String,
        /// The state that did not finish.
        state: InitState,
        /// Time waited.
        waited: Duration,
    },
    /// CSTS.SHST did not reach "shutdown complete" in time.
    #[error(
        "controller {location}: shutdown (CC.SHN normal) did not complete within {waited:?}; \
         data in a volatile write cache may not be persistent"
    )]
    ShutdownTimeout {
        /// PCI location.
        location: String,
        /// Time waited.
        waited: Duration,
    },
    /// The controller lacks something the driver needs.
    #[error("controller {location}: unsupported: {what}")]
    Unsupported {
        /// PCI location.
        location: String,
        /// What is missing.
        what: String,
    },
    /// An admin command completed with an error status.
    #[error("controller {location}: admin command {name} (cid {cid}) failed: {status}")]
    AdminStatus {
        /// PCI location.
        location: String,
        /// Name of the command.
        name: &'static str,
        /// Command id.
        cid: Cid,
        /// Completion status, with its NVMe name.
        status: Status,
    },
    /// An admin command did not complete in time.
    #[error(
        "controller {location}: admin command {name} (cid {cid}) did not complete within \
         {timeout:?}; raise ControllerOptions::admin_timeout or reset the controller"
    )]
    AdminTimeout {
        /// PCI location.
        location: String,
        /// Name of the command.
        name: &'static str,
        /// Command id.
        cid: Cid,
        /// Time waited.
        timeout: Duration,
    },
    /// The admin submission queue is full of commands the device never completed.
    #[error(
        "controller {location}: the admin queue is full of commands that never completed; \
         reset the controller"
    )]
    AdminQueueFull {
        /// PCI location.
        location: String,
    },
    /// DMA memory could not be allocated.
    #[error("failed to allocate DMA memory for {what}: {source}")]
    Dma {
        /// What the memory was for.
        what: &'static str,
        /// The allocator's error.
        #[source]
        source: DmaError,
    },
    /// No active namespace has this id.
    #[error("controller {location}: namespace {nsid} does not exist (active: {active:?})")]
    NoSuchNamespace {
        /// PCI location.
        location: String,
        /// The id asked for.
        nsid: Nsid,
        /// The active namespace ids.
        active: Vec<u32>,
    },
    /// Every granted I/O queue id is in use.
    #[error(
        "controller {location}: all {granted} I/O queues granted by the controller are in use; \
         drop a queue pair or ask for more with ControllerOptions::io_queues"
    )]
    NoQueueIds {
        /// PCI location.
        location: String,
        /// Queues granted by Set Features / Number of Queues.
        granted: u16,
    },
    /// The doorbells of a queue id lie beyond the 32-bit register space for the controller's
    /// doorbell stride (CAP.DSTRD), so the queue cannot be created.
    #[error(
        "controller {location}: the doorbells of I/O queue {qid} do not fit in 32-bit register \
         offsets with CAP.DSTRD = {dstrd}; ask for fewer queues with ControllerOptions::io_queues"
    )]
    DoorbellOutOfRange {
        /// PCI location.
        location: String,
        /// The queue id.
        qid: QueueId,
        /// CAP.DSTRD (doorbell stride exponent).
        dstrd: u8,
    },
    /// An option is out of range.
    #[error("invalid option {name}: {reason}")]
    InvalidOption {
        /// The option.
        name: &'static str,
        /// Why it is invalid and what is allowed.
        reason: String,
    },
    /// The controller is shut down or failed and takes no more commands.
    #[error("controller {location} is {state}; {hint}")]
    NotReady {
        /// PCI location.
        location: String,
        /// Its state.
        state: &'static str,
        /// What to do.
        hint: &'static str,
    },
    /// The queue pair cannot take requests any more.
    #[error("queue {qid} on controller {location} is dead: {reason}")]
    QueueDead {
        /// PCI location (shared: a dead queue pair returns this error for every request).
        location: Arc<str>,
        /// Queue id.
        qid: QueueId,
        /// Why.
        reason: DeadReason,
    },
    /// The LBA range runs past the end of the namespace.
    #[error(
        "namespace {nsid}: LBA {lba} + {blocks} blocks is past the end of the namespace \
         ({ns_blocks} blocks)"
    )]
    LbaOutOfRange {
        /// Namespace.
        nsid: Nsid,
        /// First LBA.
        lba: Lba,
        /// Blocks asked for.
        blocks: u64,
        /// Size of the namespace in blocks.
        ns_blocks: u64,
    },
    /// A buffer given to a zero-copy call is not in the controller's DMA memory.
    #[error(
        "buffer at {ptr:#x} ({len} bytes) is not in this controller's DMA memory; zero-copy I/O \
         needs a buffer from DmaMemory::alloc (Controller::alloc), not heap or stack memory"
    )]
    NotDmaMemory {
        /// Address of the buffer.
        ptr: usize,
        /// Its length.
        len: usize,
    },
    /// The length is not a multiple of the block size.
    #[error(
        "namespace {nsid}: length {len} is not a multiple of the block size {block_size}; \
         round the I/O to whole blocks"
    )]
    NotBlockMultiple {
        /// Namespace.
        nsid: Nsid,
        /// Length given.
        len: usize,
        /// Block size.
        block_size: u32,
    },
    /// The namespace's LBA format in use carries metadata, which Dioxide does not transfer: a
    /// read would make the device write `blocks * (block_size + metadata)` bytes into a buffer
    /// of `blocks * block_size` (extended LBA), or metadata to a pointer the driver never set
    /// (separate buffer). The namespace is listed by [`Controller::namespaces`] (with its
    /// format) but refused for I/O.
    ///
    /// [`Controller::namespaces`]: crate::Controller::namespaces
    #[error(
        "namespace {nsid} is formatted with metadata (LBA format {lbaf}: {block_size}+{metadata} \
         bytes, {}); Dioxide transfers no metadata, so I/O on it is refused; reformat it \
         without metadata: {}",
        if *extended { "extended LBA" } else { "separate metadata buffer" },
        metadata_fix(*without)
    )]
    NamespaceHasMetadata {
        /// Namespace.
        nsid: Nsid,
        /// Index of the LBA format in use (FLBAS).
        lbaf: usize,
        /// Logical block (data) size in bytes.
        block_size: u32,
        /// Metadata bytes per block (LBAF.MS).
        metadata: u16,
        /// Metadata at the end of each block (FLBAS bit 4) rather than in a separate buffer.
        extended: bool,
        /// A format of the namespace without metadata (same block size first), if any.
        without: Option<usize>,
    },
    /// A zero-length I/O.
    #[error("namespace {nsid}: zero-length I/O; give at least one block")]
    ZeroLength {
        /// Namespace.
        nsid: Nsid,
    },
    /// The buffer is not dword aligned (PRP entry 1 must be a multiple of 4).
    #[error("buffer at IOVA {iova} is not 4-byte aligned; NVMe PRP entries must be dword aligned")]
    Unaligned {
        /// IOVA of the buffer.
        iova: Iova,
    },
    /// A request needs more pool slots than the pool has.
    #[error(
        "queue {qid}: a request of {bytes} bytes is split into {children} commands (MDTS \
         {max_transfer} bytes) and needs {needed} requests, but the pool only has {pool}; raise \
         QueueOptions::requests or issue smaller I/O"
    )]
    RequestTooLarge {
        /// Queue id.
        qid: QueueId,
        /// Bytes asked for.
        bytes: usize,
        /// Child commands needed.
        children: usize,
        /// Largest transfer of one command.
        max_transfer: usize,
        /// Pool slots needed (children plus the parent).
        needed: usize,
        /// Pool size.
        pool: usize,
    },
    /// No free request in the pool right now.
    #[error(
        "queue {qid}: request pool exhausted ({in_use} of {pool} requests in use, {needed} \
         needed); poll for completions first, or raise QueueOptions::requests"
    )]
    PoolExhausted {
        /// Queue id.
        qid: QueueId,
        /// Requests needed.
        needed: usize,
        /// Requests in use.
        in_use: usize,
        /// Pool size.
        pool: usize,
    },
    /// Dataset Management takes 1 to 256 ranges.
    #[error("{0} Dataset Management ranges given; give 1 to 256")]
    BadRangeCount(usize),
    /// The device posted a completion the driver cannot accept.
    #[error("queue {qid}: the device posted a bad completion: {error}")]
    Protocol {
        /// Queue id.
        qid: QueueId,
        /// What was wrong.
        error: ProtocolError,
    },
    /// A blocking I/O completed with an error.
    #[error(transparent)]
    Io(#[from] IoError),
    /// An interrupt-mode queue pair could not get its interrupt vector.
    #[error(transparent)]
    Interrupt(#[from] crate::bus::interrupt::InterruptError),
}

/// Why a queue pair stopped.
#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
pub enum DeadReason {
    /// Registers read all ones.
    #[error(
        "device removed (hot-unplugged or unbound: its registers read all ones, or the kernel \
         asked for it back)"
    )]
    DeviceGone,
    /// CSTS.CFS is set.
    #[error("controller fatal status (CSTS.CFS); reset the controller and create a new queue pair")]
    ControllerFatal,
    /// The controller was reset: its queues no longer exist.
    #[error("the controller was reset; create a new queue pair")]
    ControllerReset,
    /// The controller was shut down.
    #[error("the controller was shut down")]
    ShutDown,
    /// A command timed out, the abort did not release it and the queue was deleted.
    #[error(
        "a command timed out and could not be aborted, so the queue was deleted; create a new \
         queue pair"
    )]
    Unrecoverable,
}

/// A completion the device should not have posted. Counted and reported; never trusted.
#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The command id is outside the pool or names a request that is not in flight.
    #[error("completion for command id {0}, which is not in flight")]
    UnknownCid(Cid),
    /// The SQ head pointer is not an entry of the queue.
    #[error("SQ head {sq_head} out of range (queue of {entries} entries)")]
    SqHeadOutOfRange {
        /// The value posted.
        sq_head: u16,
        /// Queue size.
        entries: u16,
    },
    /// The SQ identifier does not match the queue.
    #[error("completion names SQ {0}")]
    WrongSqId(u16),
}

/// How a failed I/O request ended (the error half of a completion).
#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IoError {
    /// The device completed the command with an error status.
    #[error(
        "queue {qid} cid {cid}: {} on namespace {nsid} at LBA {lba} failed: {status}{}",
        opcode_name(*opcode),
        child_note(*child)
    )]
    Status {
        /// Queue id.
        qid: QueueId,
        /// Command id of the failing command.
        cid: Cid,
        /// Opcode.
        opcode: u8,
        /// Namespace.
        nsid: Nsid,
        /// First LBA of the failing command.
        lba: Lba,
        /// Status, with its NVMe name.
        status: Status,
        /// For a request split at MDTS, which child command failed (0-based).
        child: Option<u16>,
    },
    /// The command did not complete within the queue's timeout. An Abort was sent.
    #[error(
        "queue {qid} cid {cid}: {} on namespace {nsid} at LBA {lba} timed out{}; an Abort was \
         sent and the command id is quarantined until the device completes it",
        opcode_name(*opcode),
        child_note(*child)
    )]
    Timeout {
        /// Queue id.
        qid: QueueId,
        /// Command id.
        cid: Cid,
        /// Opcode.
        opcode: u8,
        /// Namespace.
        nsid: Nsid,
        /// First LBA of the command that timed out.
        lba: Lba,
        /// For a split request, which child command timed out.
        child: Option<u16>,
    },
    /// The request was not completed by the device because the queue stopped.
    #[error("queue {qid}: request aborted: {reason}")]
    Aborted {
        /// Queue id.
        qid: QueueId,
        /// Why the queue stopped.
        reason: DeadReason,
    },
}

fn child_note(child: Option<u16>) -> String {
    match child {
        Some(c) => format!(" (child command {c} of a split request)"),
        None => String::new(),
    }
}

/// A readable name of an I/O opcode.
pub fn opcode_name(opcode: u8) -> &'static str {
    use crate::spec::sqe::io;
    match opcode {
        io::READ => "Read",
        io::WRITE => "Write",
        io::FLUSH => "Flush",
        io::WRITE_ZEROES => "Write Zeroes",
        io::DATASET_MANAGEMENT => "Dataset Management",
        io::COMPARE => "Compare",
        _ => "I/O command",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{Sct, status::media};

    #[test]
    fn messages_carry_context() {
        let e = IoError::Status {
            qid: QueueId(1),
            cid: Cid(7),
            opcode: crate::spec::sqe::io::READ,
            nsid: Nsid(2),
            lba: Lba(4096),
            status: Status::new(Sct::Media, media::UNRECOVERED_READ_ERROR),
            child: Some(3),
        };
        let s = e.to_string();
        assert!(s.contains("Unrecovered Read Error"), "{s}");
        assert!(
            s.contains("LBA 4096") && s.contains("child command 3"),
            "{s}"
        );
        let e = Error::PoolExhausted {
            qid: QueueId(1),
            needed: 3,
            in_use: 512,
            pool: 512,
        };
        assert!(e.to_string().contains("QueueOptions::requests"));
    }
}
