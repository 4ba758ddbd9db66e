//! Fault injection and commands whose completion is held back.
//!
//! A [`Fault`] pairs a [`Trigger`] (which commands) with an [`Action`] (what happens to them).
//! Faults are checked when a command is fetched, before it is executed, and may be added or
//! cleared from any thread while I/O runs. When no fault is installed the check is one relaxed
//! atomic load.
//!
//! Counting: each fault counts the commands that match its trigger from the moment it is
//! injected. `NthCommand { n, .. }` fires on the n-th matching command and, while `times` allows
//! (`None` = forever), on every matching command after it. `LbaRange` fires on every matching
//! command (`n` = 1). A fault that has fired `times` times is removed. When several faults match,
//! the first injected wins (all of them count the command).
//!
//! Held commands: `NeverComplete` commands are not executed and stay held until they are aborted
//! (Abort completes them with Command Abort Requested), their SQ is deleted (completed with
//! Command Aborted due to SQ Deletion) or the controller is reset (dropped, as the queues are
//! gone). Delayed commands are executed at once and only their completion waits: for a wall-time
//! `Delay` until the deadline has passed (checked by the device thread in threaded mode, and at
//! each doorbell write in inline mode, where nothing runs between doorbells), for `DelayCommands`
//! until that many further commands have been fetched; `EmulatedController::release_delayed`
//! releases every delayed completion at once.
//!
//! Failures of the whole controller at a chosen command: [`Action::Fatal`] (CSTS.CFS) and
//! [`Action::SurpriseRemove`]; invalid completion entries: [`Action::Garbage`].

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::queue::{Completion, lock};
use crate::spec::sqe::io;
use crate::spec::{Sqe, Status};

/// Which commands a fault applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// The `n`-th (1-based) command counted from injection that is on queue `qid` (`None`: any
    /// I/O queue; `Some(0)`: the admin queue) and has opcode `opcode` (`None`: any).
    NthCommand {
        /// Queue filter.
        qid: Option<u16>,
        /// Opcode filter.
        opcode: Option<u8>,
        /// Which matching command fires first (1-based).
        n: u64,
    },
    /// I/O commands on namespace `nsid` whose blocks overlap `[start, end)` (Read, Write, Write
    /// Zeroes, Compare, Write Uncorrectable), optionally only with opcode `opcode`.
    LbaRange {
        /// Namespace.
        nsid: u32,
        /// First LBA.
        start: u64,
        /// LBA after the last.
        end: u64,
        /// Opcode filter.
        opcode: Option<u8>,
    },
}

/// What happens to a command a fault fires on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Complete with this status without executing the command.
    Status(Status),
    /// Execute, then hold the completion for this wall time.
    Delay(Duration),
    /// Execute, then hold the completion until this many further commands have been fetched
    /// (the way to delay in inline mode).
    DelayCommands(u64),
    /// Do not execute and never complete (until aborted, SQ deletion or reset).
    NeverComplete,
    /// Controller fatal status: CSTS.CFS is set when the command is fetched, which is neither
    /// executed nor completed; nothing more is processed until a controller reset (as
    /// `EmulatedController::set_fatal`, at a chosen point of a run).
    Fatal,
    /// Surprise removal when the command is fetched: it is neither executed nor completed,
    /// registers read all ones from then on and nothing more is posted (as
    /// `EmulatedController::surprise_remove`, at a chosen point of a run). Permanent.
    SurpriseRemove,
    /// Execute the command and complete it normally, but post an invalid completion entry
    /// just before its real one (see [`Garbage`]). The driver must reject the invalid entry
    /// without completing any request with it.
    Garbage(Garbage),
}

/// Completion dword 0 of every invalid entry an [`Action::Garbage`] fault posts (reads and
/// writes complete with 0): a request that completes with it was completed by the invalid entry.
pub const GARBAGE_DW0: u32 = 0x6761_7262;

/// The invalid completion entry an [`Action::Garbage`] fault posts (with the current phase, so
/// the host sees it as a new entry, and [`GARBAGE_DW0`] as dword 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Garbage {
    /// An entry for command id 0xFFFF (which no host uses: the specification reserves it) on
    /// the command's own SQ.
    UnknownCid,
    /// An entry carrying the command's own command id, but another SQ's id (the command's SQ id
    /// with bit 15 flipped): a host that matched on the command id alone would complete the
    /// command with it, before the command's real completion.
    WrongSqId,
}

impl Garbage {
    /// The entry posted for a command `cid` fetched from SQ `sqid`: (SQ id, command id).
    pub(crate) fn entry(self, sqid: u16, cid: u16) -> (u16, u16) {
        match self {
            Garbage::UnknownCid => (sqid, 0xffff),
            Garbage::WrongSqId => (sqid ^ 0x8000, cid),
        }
    }
}

/// A fault to inject.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// Which commands.
    pub trigger: Trigger,
    /// What happens to them.
    pub action: Action,
    /// How many times it fires; `None` = always.
    pub times: Option<u64>,
}

impl Fault {
    /// A fault that fires once.
    pub fn once(trigger: Trigger, action: Action) -> Fault {
        Fault {
            trigger,
            action,
            times: Some(1),
        }
    }
    /// A fault that fires on every matching command.
    pub fn always(trigger: Trigger, action: Action) -> Fault {
        Fault {
            trigger,
            action,
            times: None,
        }
    }
}

/// Identifies an injected fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FaultId(pub u64);

struct Entry {
    id: FaultId,
    fault: Fault,
    seen: u64,
    fired: u64,
}

const RANGE_OPCODES: [u8; 5] = [
    io::READ,
    io::WRITE,
    io::WRITE_ZEROES,
    io::COMPARE,
    io::WRITE_UNCORRECTABLE,
];

impl Entry {
    fn matches(&self, qid: u16, sqe: &Sqe) -> bool {
        let op = sqe.opcode();
        match self.fault.trigger {
            Trigger::NthCommand { qid: q, opcode, .. } => {
                let q_ok = match q {
                    None => qid != 0,
                    Some(q) => q == qid,
                };
                q_ok && opcode.is_none_or(|o| o == op)
            }
            Trigger::LbaRange {
                nsid,
                start,
                end,
                opcode,
            } => {
                if qid == 0 || sqe.nsid != nsid || opcode.is_some_and(|o| o != op) {
                    return false;
                }
                if !RANGE_OPCODES.contains(&op) {
                    return false;
                }
                let s = sqe.slba();
                let e = s.saturating_add(sqe.nlb() as u64 + 1);
                s < end && start < e
            }
        }
    }
    fn first(&self) -> u64 {
        match self.fault.trigger {
            Trigger::NthCommand { n, .. } => n.max(1),
            Trigger::LbaRange { .. } => 1,
        }
    }
}

/// The installed faults.
pub(crate) struct FaultTable {
    active: AtomicBool,
    next: AtomicU64,
    pub fired: AtomicU64,
    list: Mutex<Vec<Entry>>,
}

impl FaultTable {
    pub(crate) fn new() -> FaultTable {
        FaultTable {
            active: AtomicBool::new(false),
            next: AtomicU64::new(1),
            fired: AtomicU64::new(0),
            list: Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn add(&self, fault: Fault) -> FaultId {
        let id = FaultId(self.next.fetch_add(1, Ordering::Relaxed));
        let mut l = lock(&self.list);
        l.push(Entry {
            id,
            fault,
            seen: 0,
            fired: 0,
        });
        self.active.store(true, Ordering::Release);
        id
    }

    pub(crate) fn remove(&self, id: FaultId) -> bool {
        let mut l = lock(&self.list);
        let before = l.len();
        l.retain(|e| e.id != id);
        self.active.store(!l.is_empty(), Ordering::Release);
        l.len() != before
    }

    pub(crate) fn clear(&self) {
        let mut l = lock(&self.list);
        l.clear();
        self.active.store(false, Ordering::Release);
    }

    /// The action for a fetched command, if a fault fires on it.
    #[inline]
    pub(crate) fn check(&self, qid: u16, sqe: &Sqe) -> Option<Action> {
        if !self.active.load(Ordering::Relaxed) {
            return None;
        }
        self.check_slow(qid, sqe)
    }

    fn check_slow(&self, qid: u16, sqe: &Sqe) -> Option<Action> {
        let mut l = lock(&self.list);
        let mut action = None;
        for e in l.iter_mut() {
            if !e.matches(qid, sqe) {
                continue;
            }
            e.seen += 1;
            if action.is_none() && e.seen >= e.first() && e.fault.times.is_none_or(|t| e.fired < t)
            {
                e.fired += 1;
                action = Some(e.fault.action);
            }
        }
        l.retain(|e| e.fault.times.is_none_or(|t| e.fired < t));
        self.active.store(!l.is_empty(), Ordering::Release);
        if action.is_some() {
            self.fired.fetch_add(1, Ordering::Relaxed);
        }
        action
    }
}

/// When a held completion is released.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Release {
    Never,
    At(Instant),
    After(u64),
}

/// A command whose completion is held.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Held {
    pub cqid: u16,
    pub completion: Completion,
    pub release: Release,
}

/// Held completions (delayed and never-completing commands).
pub(crate) struct Pending {
    count: AtomicUsize,
    pub list: Mutex<Vec<Held>>,
}

impl Pending {
    pub(crate) fn new() -> Pending {
        Pending {
            count: AtomicUsize::new(0),
            list: Mutex::new(Vec::new()),
        }
    }

    #[inline]
    pub(crate) fn is_empty(&self) -> bool {
        self.count.load(Ordering::Acquire) == 0
    }

    pub(crate) fn len(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    pub(crate) fn add(&self, h: Held) {
        let mut l = lock(&self.list);
        l.push(h);
        self.count.store(l.len(), Ordering::Release);
    }

    /// Removes the held commands selected by `take` (in order) and hands each to `post`.
    /// `post` runs under the pending lock (lock order: pending, then a CQ).
    pub(crate) fn take_where(
        &self,
        mut take: impl FnMut(&mut Held) -> bool,
        mut post: impl FnMut(Held),
    ) {
        let mut l = lock(&self.list);
        l.retain_mut(|h| {
            if take(h) {
                post(*h);
                false
            } else {
                true
            }
        });
        self.count.store(l.len(), Ordering::Release);
    }
}
