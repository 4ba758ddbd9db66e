//! One I/O queue pair: the per-I/O path.
//!
//! A [`QueuePair<T>`] is owned by one thread (`Send`, not `Sync`): no lock, no allocation and no
//! system call per I/O. Everything per request lives in a fixed pool of slots allocated at
//! creation; a slot's index is the command id (CID) of its command and it owns one 4 KiB page
//! of DMA memory for a PRP list (or Dataset Management ranges).
//!
//! **Submit.** Validate (range, block multiple, alignment), pop a free slot, build PRP1/PRP2
//! (see [`crate::nvme::prp`]), and if fewer than `entries - 1` commands are on the device and nobody
//! is waiting, copy the 64-byte entry into the submission queue with eight volatile 64-bit
//! stores. Otherwise the slot joins the *waiting queue* (intrusive FIFO through the slots) and is
//! issued, in order, as completions make room. The CQ has as many entries as the SQ, so capping
//! commands on the device at `entries - 1` guarantees neither queue overflows; the SQ head the
//! device reports in each completion is validated and recorded. The SQ tail doorbell is rung
//! once per batch ([`DoorbellMode::PerBatch`]: by [`QueuePair::ring`] or the next
//! [`QueuePair::poll`]) or after every command ([`DoorbellMode::PerCommand`]).
//!
//! **Split.** A request larger than the controller's maximum transfer (`min(MDTS, 2 MiB)`) takes
//! one *parent* slot (which holds the context) and one slot per child command; children
//! complete into the parent, which completes exactly once when the last child does. The first
//! error wins and says which child and LBA failed. All slots are taken at submission or none
//! ([`Error::PoolExhausted`]; [`Error::RequestTooLarge`] when the pool could never hold it).
//!
//! **Complete.** [`QueuePair::poll`] reads completion entries while their phase tag matches (an
//! acquire load of the last dword, then the rest), checks the CID names a command in flight and
//! the SQ id and head are sane, frees the slot and hands the context back with the result.
//!
//! **The CQ head doorbell is lazy.** Writing the CQ head only hands consumed entries back to
//! the device, which needs them only to post completions. So a poll that consumed entries
//! writes it only once [`QueueOptions::cq_head_batch`] entries (half the queue by default) were
//! consumed since the last write, and earlier only when the device could otherwise run out of
//! room: the device counts as taken every entry between the head it was last told and its
//! tail, so the entries consumed but not handed back plus the commands it may still complete
//! must never exceed `entries - 1`. Commands reach the device only with the SQ tail doorbell,
//! so that is where it is checked: when commands were added and the sum would exceed the
//! limit, the CQ head doorbell is written first. The head is also written before an interrupt
//! arm, by the housekeeping of a queue with nothing left on the device, and before the queues
//! of a queue pair whose device stopped answering are deleted. At queue depth 32 on a
//! 256-entry queue that is one CQ head doorbell per 128 completions instead of one per poll;
//! `cq_head_batch = 1` writes it after every poll that consumed entries (the default of
//! [`DoorbellMode::PerCommand`] queues).
//!
//! **Shadow doorbells.** When the controller took Doorbell Buffer Config at bring-up, each SQ
//! tail and CQ head update is stored in the shadow doorbell page and written to the register
//! only when the controller's event index asks for it ([`crate::nvme::shadow`]); the counters
//! say how many updates went where ([`QueueStats::sq_mmio_writes`]).
//!
//! **Time.** Every 4096 polls, or every 256 polls that found nothing, the queue reads the
//! clock. Time advances in *epochs* of a quarter of the timeout; a command stamped with the epoch
//! of its issue has timed out when the epoch is five ahead (between 1 and 1.25 timeouts). A
//! timed-out command's CID is quarantined until the device completes it (that late completion is
//! dropped and counted), an Abort is sent on the admin queue, and the request completes with
//! [`IoError::Timeout`]. Requests whose memory the queue guards for the caller (the owned-buffer
//! and blocking APIs) are reported only when the device lets go of the memory: when the late or
//! aborted completion arrives, or, one more timeout later, after the queue was deleted on the
//! device. When requests have been outstanding for 10 ms without a completion the queue also
//! checks CSTS (and again every 10 ms while that lasts): a removed controller (all ones), fatal
//! status or a reset fail every request with [`IoError::Aborted`]. Nothing else reads a device
//! register: a device that keeps completing commands costs no MMIO read, however long it runs.
//!
//! **Buffers.** Three ways to give memory to a command: the *blocking* calls borrow a slice of
//! DMA memory for the duration of the call; the *owned* calls take a context that owns its
//! buffer ([`DmaOwner`], e.g. a [`DmaBuffer`] or `(DmaBuffer, C)`) and give it back on
//! completion; the *raw* calls take a [`DmaSlice`] under an `unsafe` contract (perf). The owned
//! calls check that the buffer lies in this controller's DMA memory; the queue pair remembers
//! the DMA chunk of the last buffer, so that check reads no table while buffers come from one
//! chunk.
//!
//! **Files.** This module holds the queue pair's state, its options and counters and the
//! public API; `submit` the submission path (checks, splitting, the waiting queue, the SQ
//! entry), `complete` the completion path (the poll loop, completion checks, delivery),
//! `interrupt` interrupt mode (sleeping on the CQ's MSI-X eventfd without losing a wake-up), and
//! `recovery` what happens when things go wrong (timeouts and Abort, the CID quarantine, a dead
//! queue and the controller reset, teardown). The SQ/CQ bookkeeping itself (tail, head, phase
//! tag, doorbells) is the [`Ring`] the admin queue uses too.

mod complete;
mod interrupt;
mod recovery;
mod resubmit;
mod submit;

use submit::SimpleData;
#[cfg(all(test, feature = "emulated"))]
mod reset_tests;
#[cfg(all(test, feature = "emulated"))]
mod tests;

use core::marker::PhantomData;
use core::mem::{ManuallyDrop, MaybeUninit};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::bus::dma::{ChunkCache, DmaBuffer, DmaMemory, DmaSlice};
use crate::bus::interrupt::EventFd;
use crate::nvme::controller::Shared;
use crate::nvme::error::{DeadReason, Error, IoError, ProtocolError, Result};
use crate::nvme::namespace::Namespace;
use crate::nvme::prp;
use crate::nvme::ring::Ring;
use crate::nvme::shadow::{ShadowPages, ShadowSlots};
use crate::spec::Sqe;
use crate::spec::regs::{checked_cq_head_doorbell, checked_sq_tail_doorbell};
use crate::spec::sqe::{RW_FUA, io};
use crate::types::{Lba, QueueId};

pub use resubmit::Resubmit;

/// When the SQ tail doorbell is written.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub enum DoorbellMode {
    /// After every command (lowest latency at queue depth 1, one MMIO write per I/O).
    PerCommand,
    /// Once per batch: by [`QueuePair::ring`] or at the start of the next [`QueuePair::poll`].
    #[default]
    PerBatch,
}

/// Options of a queue pair. Zero means "default" for the sizes.
#[derive(Clone, Debug)]
pub struct QueueOptions {
    /// Entries of the SQ and of the CQ (2..=MQES+1). Default `min(256, MQES + 1)`.
    pub entries: u16,
    /// Requests in the pool (1..=65534); a request split at MDTS uses one per child plus one.
    /// Default `2 × entries`.
    pub requests: u16,
    /// Doorbell batching.
    pub doorbell: DoorbellMode,
    /// Per-command timeout (`None`: never time out). Default 30 s.
    pub timeout: Option<Duration>,
    /// Interrupt mode: the CQ is created with interrupts enabled (IEN = 1) on an MSI-X vector
    /// of its own, so the owner can sleep until the device posts to it
    /// ([`QueuePair::completion_fd`], [`QueuePair::arm_interrupt`]). Off (polled) by default;
    /// polling costs the same either way.
    pub interrupts: bool,
    /// Completion entries consumed before a poll writes the CQ head doorbell (1..=entries - 1;
    /// 1: after every poll that consumed entries). The doorbell is also written earlier
    /// whenever the device could otherwise find the CQ full (see the module documentation).
    /// Default (0): half the queue, or 1 with [`DoorbellMode::PerCommand`], whose submissions
    /// from inside [`QueuePair::poll_resubmit`] reach the device before the poll has counted
    /// the entries it consumed (the device may then wait for room until the poll ends, as it
    /// could before the CQ head doorbell was lazy).
    pub cq_head_batch: u16,
}

impl Default for QueueOptions {
    fn default() -> Self {
        QueueOptions {
            entries: 0,
            requests: 0,
            doorbell: DoorbellMode::PerBatch,
            timeout: Some(Duration::from_secs(30)),
            interrupts: false,
            cq_head_batch: 0,
        }
    }
}

impl QueueOptions {
    /// With `entries` queue entries.
    pub fn with_entries(mut self, entries: u16) -> Self {
        self.entries = entries;
        self
    }
    /// With a pool of `requests` requests.
    pub fn with_requests(mut self, requests: u16) -> Self {
        self.requests = requests;
        self
    }
    /// With a doorbell mode.
    pub fn with_doorbell(mut self, mode: DoorbellMode) -> Self {
        self.doorbell = mode;
        self
    }
    /// With a per-command timeout.
    pub fn with_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.timeout = timeout;
        self
    }
    /// In interrupt mode (see [`QueueOptions::interrupts`]) or polled mode.
    pub fn with_interrupts(mut self, on: bool) -> Self {
        self.interrupts = on;
        self
    }
    /// With the CQ head doorbell written after `n` consumed entries (see
    /// [`QueueOptions::cq_head_batch`]).
    pub fn with_cq_head_batch(mut self, n: u16) -> Self {
        self.cq_head_batch = n;
        self
    }
}

/// A successful completion.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct IoDone {
    /// Completion dword 0 (command specific; 0 for reads and writes).
    pub dw0: u32,
}

/// The result a completion carries.
pub type IoResult = core::result::Result<IoDone, IoError>;

/// Read or write.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum IoOp {
    /// Read from the device into memory.
    Read,
    /// Write memory to the device.
    Write,
}

impl IoOp {
    #[inline]
    fn opcode(self) -> u8 {
        match self {
            IoOp::Read => io::READ,
            IoOp::Write => io::WRITE,
        }
    }
}

/// Per-command flags.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct IoFlags {
    /// Force Unit Access: the data is on non-volatile media when the command completes.
    pub fua: bool,
}

impl IoFlags {
    /// No flags.
    pub const NONE: IoFlags = IoFlags { fua: false };
    /// Force Unit Access.
    pub const FUA: IoFlags = IoFlags { fua: true };

    /// The bits these flags set in CDW12 of a Read, Write or Write Zeroes.
    #[inline]
    pub const fn cdw12(self) -> u32 {
        if self.fua { RW_FUA } else { 0 }
    }
}

/// A submission that was refused: the error, and the context handed back.
pub struct Rejected<T> {
    /// Why.
    pub error: Error,
    /// The context given to the call.
    pub ctx: T,
}

impl<T> core::fmt::Debug for Rejected<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Rejected({:?})", self.error)
    }
}
impl<T> core::fmt::Display for Rejected<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        core::fmt::Display::fmt(&self.error, f)
    }
}
impl<T> std::error::Error for Rejected<T> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}
impl<T> From<Rejected<T>> for Error {
    fn from(r: Rejected<T>) -> Error {
        r.error
    }
}

/// A request context that owns the DMA memory of its I/O, for the safe owned-buffer API
/// ([`QueuePair::read`], [`QueuePair::write`]).
///
/// # Safety
/// `dma_slice` must describe memory that the value owns exclusively (nothing else reads or writes
/// it while the value is held by the queue pair), that stays allocated at the same address for
/// as long as the value exists, even when the value is moved, and whose `iova` is the IOVA of
/// `ptr`. It must return the same slice every time.
pub unsafe trait DmaOwner {
    /// The memory to transfer.
    fn dma_slice(&self) -> DmaSlice;
}

// SAFETY: a DmaBuffer exclusively owns its pages, which do not move with the struct; the slice
// covers exactly its length.
unsafe impl DmaOwner for DmaBuffer {
    fn dma_slice(&self) -> DmaSlice {
        self.as_dma_slice()
    }
}

// SAFETY: the tuple owns the buffer; see the impl for `DmaBuffer`.
unsafe impl<C> DmaOwner for (DmaBuffer, C) {
    fn dma_slice(&self) -> DmaSlice {
        self.0.as_dma_slice()
    }
}

/// Counters of one queue pair: plain integers the owning thread bumps, no atomics.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct QueueStats {
    /// Requests accepted (a split request counts once).
    pub submitted: u64,
    /// Completions handed back (including timeouts and aborts).
    pub completed: u64,
    /// Child commands created by splitting at the maximum transfer size.
    pub split_children: u64,
    /// Commands that had to wait for room on the device.
    pub waited: u64,
    /// SQ tail doorbell updates: to the register, or with shadow doorbells to the shadow page
    /// (and to the register when the event index asks: [`sq_mmio_writes`](Self::sq_mmio_writes)).
    pub sq_doorbells: u64,
    /// CQ head doorbell updates (at most one per poll that consumed completion entries: one
    /// per [`QueueOptions::cq_head_batch`] entries, or earlier when the device needs the room),
    /// to the register or the shadow page as for `sq_doorbells`.
    pub cq_doorbells: u64,
    /// SQ tail doorbell register (MMIO) writes: `sq_doorbells` without shadow doorbells, those
    /// the event index asked for with them.
    pub sq_mmio_writes: u64,
    /// CQ head doorbell register (MMIO) writes.
    pub cq_mmio_writes: u64,
    /// SQ tail updates stored in the shadow doorbell page (0 without shadow doorbells).
    pub sq_shadow_updates: u64,
    /// CQ head updates stored in the shadow doorbell page.
    pub cq_shadow_updates: u64,
    /// Polls that found no completion entry.
    pub empty_polls: u64,
    /// Polls that consumed completion entries.
    pub busy_polls: u64,
    /// Housekeeping runs (a clock read each, for timeouts and health checks): every 4096
    /// polls with completions, or every 256 empty polls.
    pub housekeeping: u64,
    /// Device register reads (MMIO reads of the BAR: CSTS for health checks) this queue pair
    /// made. Nothing on the I/O path reads a register: only a queue pair with requests
    /// outstanding and no completion for 10 ms reads CSTS.
    pub register_reads: u64,
    /// Commands that timed out.
    pub timeouts: u64,
    /// Completions of timed-out commands that arrived later (dropped).
    pub late_completions: u64,
    /// Abort commands the controller accepted (CDW0 bit 0 clear).
    pub aborts: u64,
    /// Abort commands that failed or were refused.
    pub aborts_failed: u64,
    /// Timed-out commands no Abort was sent for: the admin queue was busy (another thread held
    /// it), this scan's budget of ACL + 1 Aborts was used up, or an earlier Abort of the scan
    /// timed out or found the admin queue full or the controller unusable.
    pub aborts_skipped: u64,
    /// Completions rejected as invalid (unknown CID, bad SQ id or head).
    pub protocol_errors: u64,
    /// Contexts never handed back because the device could not be stopped.
    pub leaked: u64,
    /// Looks at a queue pair made dead by a controller reset (or disable) whose disable had not
    /// yet seen the device stop (CC.EN cleared, CSTS.RDY = 0): its requests stay outstanding
    /// until it has (or are leaked if it never does).
    pub reset_waits: u64,
    /// Interrupt mode: [`QueuePair::arm_interrupt`] calls that found nothing to do and allowed
    /// the owner to sleep (each is at most one wake-up).
    pub interrupt_arms: u64,
}

impl QueueStats {
    /// Polls that reached the CQ: those that consumed entries and those that found none.
    pub fn polls(&self) -> u64 {
        self.busy_polls + self.empty_polls
    }
}

/// A queue pair's shadow doorbell pages and its slots in them.
type ShadowQueue = (Arc<ShadowPages>, ShadowSlots);

const NIL: u16 = u16::MAX;
/// Largest pool: CIDs are slot indices and `NIL` is reserved.
pub const MAX_REQUESTS: u16 = u16::MAX - 1;

// Slot states.
const FREE: u8 = 0;
const WAITING: u8 = 1;
const IN_FLIGHT: u8 = 2;
const PARENT: u8 = 3;
const QUARANTINED: u8 = 4;
const DONE: u8 = 5;
const LEAKED: u8 = 6;

// Slot flags.
/// The result goes to the blocking call in progress; no context.
const F_SYNC: u8 = 1;
/// The request's memory is guarded by the queue: it is not reported before the device lets go.
const F_HOLDS: u8 = 2;
/// Timed out and not yet reported (quarantined with `F_HOLDS`).
const F_DEFERRED: u8 = 4;
/// `ctx` is initialised.
const F_CTX: u8 = 8;
/// A parent one of whose children was leaked: leak the parent too.
const F_LEAK: u8 = 16;

/// Status code and status code type in completion dword 3 (zero: success).
const STATUS_MASK: u32 = 0x7ff << 17;

/// Polls between clock reads while completions keep arriving; an empty poll counts 16, so an
/// idle queue pair reads the clock every 256 polls.
const COUNTDOWN: i32 = 4096;
const IDLE_WEIGHT: i32 = 16;
/// How long a queue pair with requests outstanding may go without a completion before it reads
/// CSTS (a device that completes commands needs no other sign of life).
const HEALTH_INTERVAL: Duration = Duration::from_millis(10);
/// Epochs (quarter timeouts) after which a command has timed out.
const TIMEOUT_EPOCHS: u32 = 5;

/// One request: the command's fields for error reports (opcode, nsid, LBA; `cdw12` and the PRPs
/// only while it waits to be issued), its links, and the user's context. Hot fields first.
#[repr(C)]
struct Slot<T> {
    state: u8,
    flags: u8,
    /// The parent of a child, else `NIL` (always `NIL` while the slot is free).
    parent: u16,
    next: u16,
    opcode: u8,
    nsid: u32,
    epoch: u32,
    cdw12: u32,
    /// Parent: children not yet completed. Child: its index in the parent.
    count: u16,
    cdw10_11: u64,
    prp1: u64,
    prp2: u64,
    dw0: u32,
    ctx: MaybeUninit<T>,
    /// Parent: first error. Done: the result's error.
    err: Option<IoError>,
}

/// The fields of a command's submission entry that vary, on their way to the SQ.
#[derive(Clone, Copy)]
struct Cmd {
    opcode: u8,
    nsid: u32,
    prp1: u64,
    prp2: u64,
    cdw10_11: u64,
    cdw12: u32,
}

/// One NVMe I/O queue pair (SQ + CQ) with its request pool, owned by one thread.
///
/// `T` is the per-request context handed back by [`poll`](QueuePair::poll) with the result:
/// a `u64` tag, an owned buffer with a callback, anything.
pub struct QueuePair<T> {
    // Hot state, in the order the per-I/O path touches it.
    ring: Ring,
    slots: Box<[Slot<T>]>,
    prp_ptr: *mut u8,
    prp_iova: u64,
    /// `qid << 16`: completion dword 2 of this queue, less the SQ head.
    cqe_sq_base: u32,
    per_command: bool,
    inflight: u16,
    max_inflight: u16,
    unrung: u16,
    /// Commands the device may have on it (issued and rung) before the CQ head doorbell must
    /// be written: `entries - 1` less the CQ entries consumed since it was last written, which
    /// the device still counts as taken. Below 0 only after the device posted more than it
    /// had room for.
    cq_room: i32,
    /// `cq_room` at or below which a poll writes the CQ head doorbell (`entries - 1` less the
    /// batch of [`QueueOptions::cq_head_batch`]).
    cq_ring_at: i32,
    /// Something the poll must look at besides the CQ: results in the done list, a dead queue
    /// (`died`), a protocol error to report. Set with each; cleared by the poll that finds none
    /// left.
    attention: bool,
    free_head: u16,
    free_count: u16,
    wait_head: u16,
    wait_tail: u16,
    done_head: u16,
    done_tail: u16,
    defer: bool,
    countdown: i32,
    epoch: u32,
    max_transfer: usize,
    /// Aborts one timeout scan may send: ACL + 1.
    abort_limit: u16,
    /// The DMA chunk of the last owned buffer submitted.
    chunk_cache: ChunkCache,
    stats: QueueStats,
    dead: Option<DeadReason>,
    // Cold state.
    died: bool,
    stopped: bool,
    quarantined: u16,
    protocol: Option<ProtocolError>,
    sync: Option<IoResult>,
    /// Interrupt mode: the eventfd of this queue's MSI-X vector.
    irq: Option<Arc<EventFd>>,
    /// The queue id was handed back early (by [`renew`](Self::renew)): `Drop` must not free it.
    qid_freed: bool,
    qid: QueueId,
    /// The controller's location, for [`Error::QueueDead`] without a copy per error.
    location: Arc<str>,
    generation: u64,
    /// An epoch: a quarter of the timeout, or `Duration::MAX` without a timeout (never ends).
    tick: Duration,
    tick_start: Instant,
    next_health: Instant,
    /// `stats.busy_polls` when the health check was last put off: polls that consumed
    /// completions since then show the device alive.
    health_mark: u64,
    dma: DmaMemory,
    shared: Arc<Shared>,
    sq_mem: ManuallyDrop<DmaBuffer>,
    cq_mem: ManuallyDrop<DmaBuffer>,
    prp_mem: ManuallyDrop<DmaBuffer>,
    /// The shadow doorbell pages the ring stores into, if it does.
    _shadow_pages: Option<Arc<ShadowPages>>,
    _not_sync: PhantomData<core::cell::Cell<()>>,
}

// SAFETY: the raw pointers (here and in the ring) point into DMA buffers the queue pair owns
// (kept alive by the `ManuallyDrop<DmaBuffer>` fields); moving the whole queue pair to another thread moves that
// ownership, and the contexts move with it (`T: Send`). It is not `Sync`.
unsafe impl<T: Send> Send for QueuePair<T> {}

impl<T> core::fmt::Debug for QueuePair<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("QueuePair")
            .field("qid", &self.qid)
            .field("entries", &self.ring.entries())
            .field("requests", &self.slots.len())
            .field("in_flight", &self.inflight)
            .field("dead", &self.dead)
            .finish()
    }
}

impl<T> QueuePair<T> {
    pub(crate) fn create(shared: Arc<Shared>, opts: QueueOptions) -> Result<QueuePair<T>> {
        if let Some(e) = shared.not_ready() {
            return Err(e);
        }
        let max_entries = shared.cap.max_queue_entries().min(u16::MAX as u32) as u16;
        let entries = if opts.entries == 0 {
            max_entries.min(256)
        } else {
            opts.entries
        };
        if entries < 2 || entries > max_entries {
            return Err(Error::InvalidOption {
                name: "QueueOptions::entries",
                reason: format!("{entries} is not in 2..={max_entries} (CAP.MQES + 1)"),
            });
        }
        let requests = if opts.requests == 0 {
            entries.saturating_mul(2).min(MAX_REQUESTS)
        } else {
            opts.requests
        };
        if requests == 0 || requests > MAX_REQUESTS {
            return Err(Error::InvalidOption {
                name: "QueueOptions::requests",
                reason: format!("{requests} is not in 1..={MAX_REQUESTS}"),
            });
        }
        if opts.cq_head_batch >= entries {
            return Err(Error::InvalidOption {
                name: "QueueOptions::cq_head_batch",
                reason: format!(
                    "{} is not in 1..={} (entries - 1; 0 for the default)",
                    opts.cq_head_batch,
                    entries - 1
                ),
            });
        }
        let cq_batch = match opts.cq_head_batch {
            0 if opts.doorbell == DoorbellMode::PerCommand => 1,
            0 => (entries / 2).max(1),
            n => n,
        };
        if opts.timeout == Some(Duration::ZERO) {
            return Err(Error::InvalidOption {
                name: "QueueOptions::timeout",
                reason: "a zero timeout; use None to disable timeouts".into(),
            });
        }
        let (max_transfer, abort_limit) = {
            let d = shared.data.read().unwrap_or_else(|e| e.into_inner());
            // ACL is 0's based: the controller takes ACL + 1 concurrent Aborts.
            (d.max_transfer, d.identify.acl as u16 + 1)
        };
        let qid = shared.alloc_qid()?;
        let dstrd = shared.cap.dstrd();
        let (Some(sq_db), Some(cq_db)) = (
            checked_sq_tail_doorbell(qid.0, dstrd),
            checked_cq_head_doorbell(qid.0, dstrd),
        ) else {
            shared.free_qid(qid);
            return Err(Error::DoorbellOutOfRange {
                location: shared.location.clone(),
                qid,
                dstrd,
            });
        };
        let irq = match opts.interrupts {
            false => None,
            true => match shared.bus.interrupt(qid.0) {
                Ok(fd) => Some(fd),
                Err(e) => {
                    shared.free_qid(qid);
                    return Err(e.into());
                }
            },
        };
        let vector = irq.as_ref().map(|_| qid.0);
        let made = Self::create_queues(&shared, qid, entries, requests, vector);
        let (sq_mem, cq_mem, prp_mem, shadow, generation) = match made {
            Ok(m) => m,
            Err(e) => {
                shared.free_qid(qid);
                return Err(e);
            }
        };
        let slots: Box<[Slot<T>]> = (0..requests)
            .map(|i| Slot {
                state: FREE,
                flags: 0,
                opcode: 0,
                next: if i + 1 == requests { NIL } else { i + 1 },
                parent: NIL,
                nsid: 0,
                epoch: 0,
                cdw12: 0,
                count: 0,
                cdw10_11: 0,
                prp1: 0,
                prp2: 0,
                dw0: 0,
                ctx: MaybeUninit::uninit(),
                err: None,
            })
            .collect();
        let now = Instant::now();
        let timeout = opts.timeout;
        // SAFETY: the SQ and CQ buffers hold `entries` entries each, are page aligned, were just
        // created on the device as queue `qid` (empty), and live as long as the queue pair; only
        // the ring writes the SQ and moves the CQ head.
        let mut ring = unsafe {
            Ring::new(
                sq_mem.as_ptr(),
                cq_mem.as_ptr(),
                entries,
                shared.bus.doorbell(sq_db),
                shared.bus.doorbell(cq_db),
            )
        };
        let shadow_pages = shadow.map(|(pages, slots)| {
            // SAFETY: the slots of queue `qid` in the pages the controller took at its last
            // bring-up, zeroed before the queues were created on it; the queue pair keeps the
            // pages alive (`shadow_pages`) and only its ring stores into its slots.
            unsafe { ring.set_shadow(slots) };
            pages
        });
        Ok(QueuePair {
            ring,
            slots,
            prp_ptr: prp_mem.as_ptr(),
            prp_iova: prp_mem.iova().0,
            cqe_sq_base: (qid.0 as u32) << 16,
            per_command: opts.doorbell == DoorbellMode::PerCommand,
            inflight: 0,
            max_inflight: entries - 1,
            unrung: 0,
            cq_room: entries as i32 - 1,
            cq_ring_at: entries as i32 - 1 - cq_batch as i32,
            attention: false,
            free_head: 0,
            free_count: requests,
            wait_head: NIL,
            wait_tail: NIL,
            done_head: NIL,
            done_tail: NIL,
            defer: false,
            countdown: COUNTDOWN,
            epoch: 0,
            max_transfer,
            abort_limit,
            chunk_cache: ChunkCache::default(),
            stats: QueueStats::default(),
            dead: None,
            died: false,
            stopped: false,
            quarantined: 0,
            protocol: None,
            sync: None,
            irq,
            qid_freed: false,
            qid,
            location: shared.location.as_str().into(),
            generation,
            tick: timeout.map_or(Duration::MAX, |t| t / 4),
            tick_start: now,
            next_health: now,
            health_mark: 0,
            dma: shared.bus.dma().clone(),
            shared,
            sq_mem: ManuallyDrop::new(sq_mem),
            cq_mem: ManuallyDrop::new(cq_mem),
            prp_mem: ManuallyDrop::new(prp_mem),
            _shadow_pages: shadow_pages,
            _not_sync: PhantomData,
        })
    }

    fn create_queues(
        shared: &Shared,
        qid: QueueId,
        entries: u16,
        requests: u16,
        vector: Option<u16>,
    ) -> Result<(DmaBuffer, DmaBuffer, DmaBuffer, Option<ShadowQueue>, u64)> {
        let sq = shared.alloc(entries as usize * 64, "an I/O submission queue")?;
        let cq = shared.alloc(entries as usize * 16, "an I/O completion queue")?;
        let prps = shared.alloc(requests as usize * prp::PAGE as usize, "PRP list pages")?;
        let mut guard = shared.lock_admin();
        // The generation the queues belong to, read under the admin lock with the health: a
        // reset that started a newer one (and is waiting for this lock to delete every queue)
        // has made the controller not ready (see `Shared::live_generation`); one that starts
        // later makes these queues stale.
        let generation = shared.live_generation()?;
        let q = guard.as_mut().ok_or_else(|| shared.gone())?;
        // The shadow doorbell pages of this bring-up (read under the admin lock, which a reset
        // holds while it replaces them) and the queue's slots in them, set to 0 before the
        // device knows the queue.
        let shadow = {
            let d = shared.data.read().unwrap_or_else(|e| e.into_inner());
            d.shadow.clone()
        }
        .and_then(|p| p.slots(qid.0).map(|s| (p, s)));
        q.execute_checked(
            shared,
            "Create I/O Completion Queue",
            match vector {
                None => Sqe::create_io_cq(qid.0, entries, cq.iova().0),
                Some(v) => Sqe::create_io_cq_irq(qid.0, entries, cq.iova().0, v),
            },
        )?;
        if let Err(e) = q.execute_checked(
            shared,
            "Create I/O Submission Queue",
            Sqe::create_io_sq(qid.0, entries, sq.iova().0, qid.0),
        ) {
            let _ = q.execute_checked(
                shared,
                "Delete I/O Completion Queue",
                Sqe::delete_io_cq(qid.0),
            );
            return Err(e);
        }
        Ok((sq, cq, prps, shadow, generation))
    }

    // ---------------------------------------------------------------------------------------
    // Accessors.

    /// The queue id.
    pub fn qid(&self) -> QueueId {
        self.qid
    }
    /// Entries of the SQ (and of the CQ).
    pub fn entries(&self) -> u16 {
        self.ring.entries()
    }
    /// Requests in the pool.
    pub fn requests(&self) -> usize {
        self.slots.len()
    }
    /// Requests taken from the pool (submitted and not yet handed back, quarantined included).
    pub fn outstanding(&self) -> usize {
        self.slots.len() - self.free_count as usize
    }
    /// Commands on the device.
    pub fn in_flight(&self) -> usize {
        self.inflight as usize
    }
    /// Command ids quarantined after a timeout, waiting for the device's late completion.
    pub fn quarantined(&self) -> usize {
        self.quarantined as usize
    }
    /// Largest transfer of one command (larger requests are split).
    pub fn max_transfer(&self) -> usize {
        self.max_transfer
    }
    /// Counters.
    pub fn stats(&self) -> QueueStats {
        let mut s = self.stats;
        if self.ring.shadowed() {
            [s.sq_mmio_writes, s.cq_mmio_writes] = self.ring.shadow_mmio_writes();
            (s.sq_shadow_updates, s.cq_shadow_updates) = (s.sq_doorbells, s.cq_doorbells);
        } else {
            (s.sq_mmio_writes, s.cq_mmio_writes) = (s.sq_doorbells, s.cq_doorbells);
        }
        s
    }
    /// True if this queue pair's doorbells go to shadow doorbells (see
    /// [`Controller::shadow_doorbells`](crate::Controller::shadow_doorbells)).
    pub fn shadow_doorbells(&self) -> bool {
        self.ring.shadowed()
    }
    /// Why the queue pair stopped, if it did.
    pub fn dead_reason(&self) -> Option<DeadReason> {
        self.dead
    }

    // ---------------------------------------------------------------------------------------
    // Raw (unsafe) submission: perf's path.

    /// Submits a read of `buf.len` bytes at `lba` into `buf`; `ctx` comes back from
    /// [`poll`](Self::poll). The command is on the device after [`ring`](Self::ring) or the next
    /// `poll` (or at once with [`DoorbellMode::PerCommand`]).
    ///
    /// # Safety
    /// * `buf` describes memory in this controller's DMA memory (`buf.iova` is the IOVA of
    ///   `buf.ptr`), as given by [`DmaBuffer::as_dma_slice`] or [`DmaBuffer::slice`].
    /// * From this call until `poll` hands `ctx` back, the memory stays allocated and nothing
    ///   else reads or writes it (the device writes it).
    /// * If `ctx` comes back with [`IoError::Timeout`], the device may still write the memory:
    ///   it must stay allocated and unused until [`quarantined`](Self::quarantined) returns 0 or
    ///   the queue pair is dropped (dropping deletes the queue on the device, or disables the
    ///   controller if that fails, before returning).
    #[inline]
    pub unsafe fn read_raw(
        &mut self,
        ns: &Namespace,
        lba: Lba,
        buf: DmaSlice,
        ctx: T,
    ) -> core::result::Result<(), Rejected<T>> {
        self.submit_data(io::READ, ns, lba, buf.iova, buf.len, 0, 0, Some(ctx))
            .map_err(rejected)
    }

    /// Submits a write of `buf` at `lba`. See [`read_raw`](Self::read_raw).
    ///
    /// # Safety
    /// As for [`read_raw`](Self::read_raw), except that the device reads the memory: it must
    /// not be written (reading it is fine) until `ctx` comes back (and, after a timeout, until
    /// the quarantine ends).
    #[inline]
    pub unsafe fn write_raw(
        &mut self,
        ns: &Namespace,
        lba: Lba,
        buf: DmaSlice,
        ctx: T,
    ) -> core::result::Result<(), Rejected<T>> {
        self.submit_data(io::WRITE, ns, lba, buf.iova, buf.len, 0, 0, Some(ctx))
            .map_err(rejected)
    }

    /// Submits a read or write with flags (FUA). See [`read_raw`](Self::read_raw).
    ///
    /// # Safety
    /// As for [`read_raw`](Self::read_raw) for a read and [`write_raw`](Self::write_raw) for a
    /// write.
    #[inline]
    pub unsafe fn submit_raw(
        &mut self,
        op: IoOp,
        ns: &Namespace,
        lba: Lba,
        buf: DmaSlice,
        flags: IoFlags,
        ctx: T,
    ) -> core::result::Result<(), Rejected<T>> {
        let cdw12 = flags.cdw12();
        self.submit_data(op.opcode(), ns, lba, buf.iova, buf.len, cdw12, 0, Some(ctx))
            .map_err(rejected)
    }

    // ---------------------------------------------------------------------------------------
    // Commands without data (safe).

    /// Submits a Flush of namespace `ns`.
    pub fn flush(&mut self, ns: &Namespace, ctx: T) -> core::result::Result<(), Rejected<T>> {
        self.submit_simple(io::FLUSH, ns.nsid(), 0, 0, SimpleData::None, Some(ctx), 0)
            .map_err(rejected)
    }

    /// Submits a Write Zeroes of `blocks` blocks (1..=65536) at `lba`.
    pub fn write_zeroes(
        &mut self,
        ns: &Namespace,
        lba: Lba,
        blocks: u32,
        flags: IoFlags,
        ctx: T,
    ) -> core::result::Result<(), Rejected<T>> {
        self.submit_write_zeroes(ns, lba, blocks, flags, Some(ctx), 0)
            .map_err(rejected)
    }

    /// Submits a Dataset Management / Deallocate of up to 256 `(first LBA, blocks)` ranges.
    pub fn deallocate(
        &mut self,
        ns: &Namespace,
        ranges: &[(Lba, u32)],
        ctx: T,
    ) -> core::result::Result<(), Rejected<T>> {
        self.submit_deallocate(ns, ranges, Some(ctx), 0)
            .map_err(rejected)
    }

    // ---------------------------------------------------------------------------------------
    // Blocking calls (safe: the borrow lasts until the device is done with the memory).

    /// Reads `buf.len()` bytes at `lba` into `buf`, which must lie in this controller's DMA
    /// memory (a [`DmaBuffer`] or part of one), and waits for the completion. Completions of
    /// other requests that arrive meanwhile are handed out by the next [`poll`](Self::poll).
    pub fn read_blocking(&mut self, ns: &Namespace, lba: Lba, buf: &mut [u8]) -> Result<IoDone> {
        let slice = self.dma_slice_of(buf.as_mut_ptr(), buf.len())?;
        self.run_blocking(|q| {
            q.submit_data(
                io::READ,
                ns,
                lba,
                slice.iova,
                slice.len,
                0,
                F_SYNC | F_HOLDS,
                None,
            )
        })
    }

    /// Writes `buf` at `lba` and waits for the completion. See
    /// [`read_blocking`](Self::read_blocking).
    pub fn write_blocking(&mut self, ns: &Namespace, lba: Lba, buf: &[u8]) -> Result<IoDone> {
        self.write_blocking_with(ns, lba, buf, IoFlags::NONE)
    }

    /// Writes `buf` at `lba` with flags (FUA) and waits for the completion.
    pub fn write_blocking_with(
        &mut self,
        ns: &Namespace,
        lba: Lba,
        buf: &[u8],
        flags: IoFlags,
    ) -> Result<IoDone> {
        let slice = self.dma_slice_of(buf.as_ptr() as *mut u8, buf.len())?;
        let cdw12 = flags.cdw12();
        self.run_blocking(|q| {
            q.submit_data(
                io::WRITE,
                ns,
                lba,
                slice.iova,
                slice.len,
                cdw12,
                F_SYNC | F_HOLDS,
                None,
            )
        })
    }

    /// Flushes namespace `ns` and waits.
    pub fn flush_blocking(&mut self, ns: &Namespace) -> Result<IoDone> {
        let none = SimpleData::None;
        self.run_blocking(|q| q.submit_simple(io::FLUSH, ns.nsid(), 0, 0, none, None, F_SYNC))
    }

    /// Write Zeroes and wait.
    pub fn write_zeroes_blocking(
        &mut self,
        ns: &Namespace,
        lba: Lba,
        blocks: u32,
        flags: IoFlags,
    ) -> Result<IoDone> {
        self.run_blocking(|q| q.submit_write_zeroes(ns, lba, blocks, flags, None, F_SYNC))
    }

    /// Deallocate and wait.
    pub fn deallocate_blocking(&mut self, ns: &Namespace, ranges: &[(Lba, u32)]) -> Result<IoDone> {
        self.run_blocking(|q| q.submit_deallocate(ns, ranges, None, F_SYNC))
    }

    fn dma_slice_of(&mut self, ptr: *mut u8, len: usize) -> Result<DmaSlice> {
        if len == 0 {
            // Reported with the namespace by the range check; any address will do here.
            return Ok(DmaSlice {
                ptr: core::ptr::NonNull::dangling(),
                iova: crate::types::Iova(0),
                len: 0,
            });
        }
        // `ok_or_else`: an error built eagerly is dropped on every call (drop glue of `Error`).
        // Through the queue's chunk cache, like a held context's memory (`check_owned`).
        let not_dma = || Error::NotDmaMemory {
            ptr: ptr as usize,
            len,
        };
        let nn = core::ptr::NonNull::new(ptr).ok_or_else(not_dma)?;
        let iova = self
            .dma
            .translate_cached(&mut self.chunk_cache, ptr, len)
            .ok_or_else(not_dma)?;
        Ok(DmaSlice { ptr: nn, iova, len })
    }

    fn run_blocking(
        &mut self,
        submit: impl FnOnce(&mut Self) -> core::result::Result<(), (Error, Option<T>)>,
    ) -> Result<IoDone> {
        self.sync = None;
        submit(self).map_err(|(e, _)| e)?;
        self.defer = true;
        let mut idle = 0u32;
        let out = loop {
            if let Some(r) = self.sync.take() {
                break r.map_err(Error::Io);
            }
            match self.poll_inner(usize::MAX, &mut |_: &mut Resubmit<'_, T>, _, _| {}) {
                Ok(0) => {
                    idle += 1;
                    if idle > 16 {
                        std::thread::yield_now();
                    }
                }
                Ok(_) => idle = 0,
                Err(e @ Error::QueueDead { .. }) if self.sync.is_none() => break Err(e),
                Err(_) => {} // counted in the stats; the request is still pending
            }
        };
        self.defer = false;
        out
    }

    // ---------------------------------------------------------------------------------------
    // Doorbell and polling.

    /// Rings the SQ tail doorbell if commands were added since the last ring.
    #[inline]
    pub fn ring(&mut self) {
        if self.unrung != 0 {
            self.ring_sq();
        }
    }

    /// Rings the doorbell if needed, then consumes up to `max` completion entries, calling
    /// `f(ctx, result)` once for each request that finished. Returns the number of calls.
    ///
    /// An invalid completion from the device is counted and reported as [`Error::Protocol`]
    /// after the valid ones were delivered. A dead queue pair with nothing left to deliver
    /// returns [`Error::QueueDead`].
    #[inline]
    pub fn poll<F: FnMut(T, IoResult)>(&mut self, max: usize, mut f: F) -> Result<usize> {
        self.poll_inner(max, &mut |_: &mut Resubmit<'_, T>, ctx: T, r: IoResult| {
            f(ctx, r)
        })
    }

    /// [`poll`](Self::poll) whose closure may submit new commands through the [`Resubmit`]
    /// handle it is given, as it handles each completion: the commands submitted during the
    /// poll go to the device with one SQ tail doorbell write after the completion queue was
    /// consumed (and its head doorbell written once), so a loop that resubmits what completes
    /// writes one SQ and one CQ doorbell per poll whatever the queue depth.
    #[inline]
    pub fn poll_resubmit<F: FnMut(&mut Resubmit<'_, T>, T, IoResult)>(
        &mut self,
        max: usize,
        mut f: F,
    ) -> Result<usize> {
        self.poll_inner(max, &mut f)
    }

    // ---------------------------------------------------------------------------------------
    // Pool.

    #[inline(always)]
    fn slot(&mut self, idx: u16) -> &mut Slot<T> {
        debug_assert!((idx as usize) < self.slots.len());
        // SAFETY: every index passed here is a slot index: from the free list, the waiting or
        // done lists, a parent link, or a CID checked against the pool size.
        unsafe { self.slots.get_unchecked_mut(idx as usize) }
    }

    #[inline(always)]
    fn pop_free(&mut self) -> Option<u16> {
        let idx = self.free_head;
        if idx == NIL {
            return None;
        }
        let s = self.slot(idx);
        debug_assert!(s.state == FREE && s.parent == NIL);
        self.free_head = s.next;
        self.free_count -= 1;
        Some(idx)
    }

    #[inline(always)]
    fn push_free(&mut self, idx: u16) {
        let head = self.free_head;
        let s = self.slot(idx);
        s.state = FREE;
        s.flags = 0;
        s.parent = NIL;
        s.next = head;
        self.free_head = idx;
        self.free_count += 1;
    }

    #[inline(always)]
    fn prp_list(&self, idx: u16) -> *mut u64 {
        // SAFETY: `idx < requests`; the PRP buffer holds one page per slot.
        unsafe { self.prp_ptr.add(idx as usize * prp::PAGE as usize).cast() }
    }

    #[inline(always)]
    fn prp_list_iova(&self, idx: u16) -> u64 {
        self.prp_iova + idx as u64 * prp::PAGE
    }

    #[cold]
    fn exhausted(&self, needed: usize) -> Error {
        Error::PoolExhausted {
            qid: self.qid,
            needed,
            in_use: self.outstanding(),
            pool: self.slots.len(),
        }
    }

    #[cold]
    fn dead_error(&self, reason: DeadReason) -> Error {
        Error::QueueDead {
            location: self.location.clone(),
            qid: self.qid,
            reason,
        }
    }

    #[cold]
    fn bad(&mut self, e: ProtocolError) {
        self.stats.protocol_errors += 1;
        self.attention = true;
        self.protocol.get_or_insert(e);
    }

    #[cold]
    fn protocol_error(&mut self) -> Error {
        Error::Protocol {
            qid: self.qid,
            error: self.protocol.take().expect("set"),
        }
    }
}

/// The safe owned-buffer API: the context owns the buffer until the completion hands it back.
impl<T: DmaOwner> QueuePair<T> {
    /// Submits a read filling the context's buffer from `lba`.
    pub fn read(
        &mut self,
        ns: &Namespace,
        lba: Lba,
        ctx: T,
    ) -> core::result::Result<(), Rejected<T>> {
        self.submit(IoOp::Read, ns, lba, IoFlags::NONE, ctx)
    }
    /// Submits a write of the context's buffer at `lba`.
    pub fn write(
        &mut self,
        ns: &Namespace,
        lba: Lba,
        ctx: T,
    ) -> core::result::Result<(), Rejected<T>> {
        self.submit(IoOp::Write, ns, lba, IoFlags::NONE, ctx)
    }
    /// Submits a read or write of the context's buffer with flags.
    ///
    /// If the command times out, the context is handed back (with [`IoError::Timeout`]) only
    /// once the device has let go of the buffer.
    pub fn submit(
        &mut self,
        op: IoOp,
        ns: &Namespace,
        lba: Lba,
        flags: IoFlags,
        ctx: T,
    ) -> core::result::Result<(), Rejected<T>> {
        let buf = ctx.dma_slice();
        if let Err(error) = self.check_owned(&buf) {
            return Err(Rejected { error, ctx });
        }
        let cdw12 = flags.cdw12();
        self.submit_data(
            op.opcode(),
            ns,
            lba,
            buf.iova,
            buf.len,
            cdw12,
            F_HOLDS,
            Some(ctx),
        )
        .map_err(rejected)
    }
}

/// The owned-buffer API for a context that does not name its memory itself (a small handle):
/// the memory is passed at submission, checked as the owned calls check it, and the context is
/// handed back, as by them, only once the device has let go of the memory.
impl<T> QueuePair<T> {
    /// Submits a read or write of `buf` with flags, as [`submit`](QueuePair::submit) does for
    /// a [`DmaOwner`]: `buf` must lie in this controller's DMA memory at the IOVA it claims
    /// (checked), and after a timeout `ctx` comes back only once the device has let go of it.
    ///
    /// # Safety
    /// `buf` must describe memory that nobody else reads or writes (a write's source may be
    /// read) and that stays allocated at the same address until the queue pair hands `ctx`
    /// back (or, if it never does, for ever). `ctx` need not own the memory: the embedding
    /// layer's context is a reference on the request that does.
    #[inline]
    pub unsafe fn submit_held(
        &mut self,
        op: IoOp,
        ns: &Namespace,
        lba: Lba,
        buf: DmaSlice,
        flags: IoFlags,
        ctx: T,
    ) -> core::result::Result<(), Rejected<T>> {
        if let Err(error) = self.check_owned(&buf) {
            return Err(Rejected { error, ctx });
        }
        let cdw12 = flags.cdw12();
        self.submit_data(
            op.opcode(),
            ns,
            lba,
            buf.iova,
            buf.len,
            cdw12,
            F_HOLDS,
            Some(ctx),
        )
        .map_err(rejected)
    }
}

#[inline]
fn rejected<T>((error, ctx): (Error, Option<T>)) -> Rejected<T> {
    Rejected {
        error,
        ctx: ctx.expect("public submissions always carry a context"),
    }
}

#[inline]
fn lba_of<T>(s: &Slot<T>) -> u64 {
    match s.opcode {
        io::READ | io::WRITE | io::WRITE_ZEROES | io::COMPARE => s.cdw10_11,
        _ => 0,
    }
}
