//! One I/O queue pair: the per-I/O path, top to bottom.
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
//! the SQ id and head are sane, frees the slot and hands the context back with the result. One
//! CQ head doorbell write per poll that consumed entries.
//!
//! **Time.** Every few thousand polls, or every 64 polls that found nothing, the queue reads the
//! clock. Time advances in *epochs* of a quarter of the timeout; a command stamped with the epoch
//! of its issue has timed out when the epoch is five ahead (between 1 and 1.25 timeouts). A
//! timed-out command's CID is quarantined until the device completes it (that late completion is
//! dropped and counted), an Abort is sent on the admin queue, and the request completes with
//! [`IoError::Timeout`]. Requests whose memory the queue guards for the caller (the owned-buffer
//! and blocking APIs) are reported only when the device lets go of the memory: when the late or
//! aborted completion arrives, or, one more timeout later, after the queue was deleted on the
//! device. While idle with requests outstanding the queue also checks CSTS every 10 ms: a removed
//! controller (all ones), fatal status or a reset fail every request with [`IoError::Aborted`].
//!
//! **Buffers.** Three ways to give memory to a command: the *blocking* calls borrow a slice of
//! DMA memory for the duration of the call; the *owned* calls take a context that owns its
//! buffer ([`DmaOwner`], e.g. a [`DmaBuffer`] or `(DmaBuffer, C)`) and give it back on
//! completion; the *raw* calls take a [`DmaSlice`] under an `unsafe` contract (perf).

use core::marker::PhantomData;
use core::mem::{ManuallyDrop, MaybeUninit};
use core::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::bus::Doorbell;
use crate::bus::dma::{DmaBuffer, DmaMemory, DmaSlice};
use crate::nvme::controller::Shared;
use crate::nvme::error::{DeadReason, Error, IoError, ProtocolError, Result};
use crate::nvme::namespace::Namespace;
use crate::nvme::prp;
use crate::spec::regs::{checked_cq_head_doorbell, checked_sq_tail_doorbell};
use crate::spec::sqe::DsmRange;
use crate::spec::sqe::{DSM_AD, RW_FUA, io};
use crate::spec::{Sqe, Status};
use crate::types::{Cid, Iova, Lba, Nsid, QueueId};

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
}

impl Default for QueueOptions {
    fn default() -> Self {
        QueueOptions {
            entries: 0,
            requests: 0,
            doorbell: DoorbellMode::PerBatch,
            timeout: Some(Duration::from_secs(30)),
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

/// Counters of one queue pair.
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
    /// SQ tail doorbell writes.
    pub sq_doorbells: u64,
    /// CQ head doorbell writes.
    pub cq_doorbells: u64,
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
}

/// What [`QueuePair::send_abort`] did.
enum AbortSent {
    /// Sent, and the controller answered.
    Sent,
    /// Not sent: another thread holds the admin queue.
    Busy,
    /// Sent and failed in a way later Aborts would repeat (timeout, queue full, device gone).
    Stop,
}

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
/// The phase tag in completion dword 3.
const PHASE_BIT: u32 = 1 << 16;

/// Polls between clock reads while completions keep arriving; an empty poll counts 64.
const COUNTDOWN: i32 = 4096;
const IDLE_WEIGHT: i32 = 64;
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
    sq: *mut u64,
    cq: *const u32,
    slots: Box<[Slot<T>]>,
    prp_ptr: *mut u8,
    prp_iova: u64,
    sq_tail: u16,
    cq_head: u16,
    entries: u16,
    /// `qid << 16`: completion dword 2 of this queue, less the SQ head.
    cqe_sq_base: u32,
    phase: bool,
    per_command: bool,
    inflight: u16,
    max_inflight: u16,
    unrung: u16,
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
    sq_db: Doorbell,
    cq_db: Doorbell,
    stats: QueueStats,
    dead: Option<DeadReason>,
    // Cold state.
    died: bool,
    stopped: bool,
    quarantined: u16,
    protocol: Option<ProtocolError>,
    sync: Option<IoResult>,
    qid: QueueId,
    generation: u64,
    /// An epoch: a quarter of the timeout, or `Duration::MAX` without a timeout (never ends).
    tick: Duration,
    tick_start: Instant,
    next_health: Instant,
    dma: DmaMemory,
    shared: Arc<Shared>,
    sq_mem: ManuallyDrop<DmaBuffer>,
    cq_mem: ManuallyDrop<DmaBuffer>,
    prp_mem: ManuallyDrop<DmaBuffer>,
    _not_sync: PhantomData<core::cell::Cell<()>>,
}

// SAFETY: the raw pointers point into DMA buffers the queue pair owns (kept alive by the
// `ManuallyDrop<DmaBuffer>` fields); moving the whole queue pair to another thread moves that
// ownership, and the contexts move with it (`T: Send`). It is not `Sync`.
unsafe impl<T: Send> Send for QueuePair<T> {}

impl<T> core::fmt::Debug for QueuePair<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("QueuePair")
            .field("qid", &self.qid)
            .field("entries", &self.entries)
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
        if opts.timeout == Some(Duration::ZERO) {
            return Err(Error::InvalidOption {
                name: "QueueOptions::timeout",
                reason: "a zero timeout; use None to disable timeouts".into(),
            });
        }
        let generation = shared.generation.load(Ordering::Acquire);
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
        let made = Self::create_queues(&shared, qid, entries, requests);
        let (sq_mem, cq_mem, prp_mem) = match made {
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
        Ok(QueuePair {
            sq: sq_mem.as_ptr().cast(),
            cq: cq_mem.as_ptr().cast(),
            slots,
            prp_ptr: prp_mem.as_ptr(),
            prp_iova: prp_mem.iova().0,
            sq_tail: 0,
            cq_head: 0,
            entries,
            cqe_sq_base: (qid.0 as u32) << 16,
            phase: true,
            per_command: opts.doorbell == DoorbellMode::PerCommand,
            inflight: 0,
            max_inflight: entries - 1,
            unrung: 0,
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
            sq_db: shared.bus.doorbell(sq_db),
            cq_db: shared.bus.doorbell(cq_db),
            stats: QueueStats::default(),
            dead: None,
            died: false,
            stopped: false,
            quarantined: 0,
            protocol: None,
            sync: None,
            qid,
            generation,
            tick: timeout.map_or(Duration::MAX, |t| t / 4),
            tick_start: now,
            next_health: now,
            dma: shared.bus.dma().clone(),
            shared,
            sq_mem: ManuallyDrop::new(sq_mem),
            cq_mem: ManuallyDrop::new(cq_mem),
            prp_mem: ManuallyDrop::new(prp_mem),
            _not_sync: PhantomData,
        })
    }

    fn create_queues(
        shared: &Shared,
        qid: QueueId,
        entries: u16,
        requests: u16,
    ) -> Result<(DmaBuffer, DmaBuffer, DmaBuffer)> {
        let sq = shared.alloc(entries as usize * 64, "an I/O submission queue")?;
        let cq = shared.alloc(entries as usize * 16, "an I/O completion queue")?;
        let prps = shared.alloc(requests as usize * prp::PAGE as usize, "PRP list pages")?;
        let mut guard = shared.lock_admin();
        if let Some(e) = shared.not_ready() {
            return Err(e);
        }
        let q = guard.as_mut().ok_or_else(|| shared.gone())?;
        q.execute_checked(
            shared,
            "Create I/O Completion Queue",
            Sqe::create_io_cq(qid.0, entries, cq.iova().0),
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
        Ok((sq, cq, prps))
    }

    // ---------------------------------------------------------------------------------------
    // Accessors.

    /// The queue id.
    pub fn qid(&self) -> QueueId {
        self.qid
    }
    /// Entries of the SQ (and of the CQ).
    pub fn entries(&self) -> u16 {
        self.entries
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
        self.stats
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
        self.submit_simple(io::FLUSH, ns.nsid(), 0, 0, None, Some(ctx), 0)
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
        self.run_blocking(|q| q.submit_simple(io::FLUSH, ns.nsid(), 0, 0, None, None, F_SYNC))
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

    fn dma_slice_of(&self, ptr: *mut u8, len: usize) -> Result<DmaSlice> {
        if len == 0 {
            // Reported with the namespace by the range check; any address will do here.
            return Ok(DmaSlice {
                ptr: core::ptr::NonNull::dangling(),
                iova: crate::types::Iova(0),
                len: 0,
            });
        }
        self.dma.slice_of(ptr, len).ok_or(Error::NotDmaMemory {
            ptr: ptr as usize,
            len,
        })
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
            match self.poll_inner(usize::MAX, &mut |_, _| {}) {
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

    #[inline]
    fn ring_sq(&mut self) {
        // A reset deletes the queue on the device. Its id stays reserved until this pair is
        // dropped (so no new queue pair shares the doorbell), but a stale pair fails early
        // rather than ring a doorbell of a queue the device no longer has.
        if self.shared.generation.load(Ordering::Relaxed) != self.generation {
            self.dead.get_or_insert(DeadReason::ControllerReset);
            self.countdown = 0; // fail the requests at the end of this poll
            return;
        }
        self.sq_db.ring(self.sq_tail as u32);
        self.unrung = 0;
        self.stats.sq_doorbells += 1;
    }

    /// Rings the doorbell if needed, then consumes up to `max` completion entries, calling
    /// `f(ctx, result)` once for each request that finished. Returns the number of calls.
    ///
    /// An invalid completion from the device is counted and reported as [`Error::Protocol`]
    /// after the valid ones were delivered. A dead queue pair with nothing left to deliver
    /// returns [`Error::QueueDead`].
    #[inline]
    pub fn poll<F: FnMut(T, IoResult)>(&mut self, max: usize, mut f: F) -> Result<usize> {
        self.poll_inner(max, &mut f)
    }

    #[inline]
    fn poll_inner<F: FnMut(T, IoResult)>(&mut self, max: usize, f: &mut F) -> Result<usize> {
        let mut delivered = 0;
        if self.done_head != NIL && !self.defer {
            delivered += self.deliver_done(f);
        }
        if self.died {
            // The queue is gone on the device (or the device is): nothing it posts is trusted.
            return match (delivered, self.dead) {
                (0, Some(reason)) => Err(self.dead_error(reason)),
                _ => Ok(delivered),
            };
        }
        if self.unrung != 0 {
            self.ring_sq();
        }
        let cq = self.cq;
        let entries = self.entries;
        let mut head = self.cq_head;
        // The phase tag expected, in place in dword 3.
        let mut phase = if self.phase { PHASE_BIT } else { 0 };
        let mut consumed = 0usize;
        while consumed < max {
            // SAFETY: `head < entries`: the 16-byte entry lies in the CQ buffer we own.
            let e = unsafe { cq.add(head as usize * 4) };
            // SAFETY: dword 3 of the entry, 4-byte aligned; the device writes it concurrently, so
            // it is read atomically, with acquire so the other dwords are read after it.
            let dw3 = unsafe { AtomicU32::from_ptr(e.add(3) as *mut u32) }.load(Ordering::Acquire);
            if dw3 & PHASE_BIT != phase {
                break;
            }
            // SAFETY: dwords 0 and 2 of the same entry, complete once the phase matched.
            let (dw0, dw2) = unsafe { (e.read_volatile(), e.add(2).read_volatile()) };
            head += 1;
            if head == entries {
                head = 0;
                phase ^= PHASE_BIT;
            }
            consumed += 1;
            delivered += self.complete(dw0, dw2, dw3, f);
        }
        if consumed != 0 {
            self.cq_head = head;
            self.phase = phase != 0;
            self.cq_db.ring(head as u32);
            self.stats.cq_doorbells += 1;
            if self.wait_head != NIL {
                self.issue_waiting();
            }
            if self.unrung != 0 {
                self.ring_sq();
            }
            self.countdown -= 1;
        } else {
            self.countdown -= IDLE_WEIGHT;
        }
        if self.countdown <= 0 {
            delivered += self.housekeeping(consumed == 0, f);
        }
        if self.protocol.is_some() {
            return Err(self.protocol_error());
        }
        if delivered == 0 && self.died {
            if let Some(reason) = self.dead {
                return Err(self.dead_error(reason));
            }
        }
        Ok(delivered)
    }

    // ---------------------------------------------------------------------------------------
    // Submission internals.

    /// The per-I/O submission. The common case (a live queue, `1..=max_transfer` bytes in whole
    /// blocks inside the namespace, a dword-aligned buffer, a free slot) is checked and issued
    /// inline, without a call; anything else, including every error, takes
    /// [`submit_data_general`](Self::submit_data_general), which checks again in the documented
    /// order and reports the first error or splits the request.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn submit_data(
        &mut self,
        opcode: u8,
        ns: &Namespace,
        lba: Lba,
        iova: Iova,
        len: usize,
        cdw12: u32,
        flags: u8,
        ctx: Option<T>,
    ) -> core::result::Result<(), (Error, Option<T>)> {
        let shift = ns.block_shift();
        let blocks = (len >> shift) as u64;
        let ns_blocks = ns.io_blocks();
        // `len - 1 < max_transfer` is `1 <= len <= max_transfer`; `blocks << shift == len`
        // is "a whole number of blocks"; `lba < ns_blocks && blocks <= ns_blocks - lba` is
        // `lba + blocks <= ns_blocks` without overflow.
        if self.dead.is_some()
            || len.wrapping_sub(1) >= self.max_transfer
            || (blocks << shift) as usize != len
            || lba.0 >= ns_blocks
            || blocks > ns_blocks - lba.0
            || iova.0 & 3 != 0
            || self.free_head == NIL
        {
            return self.submit_data_general(opcode, ns, lba, iova, len, cdw12, flags, ctx);
        }
        self.start_data(opcode, ns.nsid(), lba, iova, len, blocks, cdw12, flags, ctx);
        Ok(())
    }

    /// [`submit_data`](Self::submit_data) off the fast path: errors, splits.
    #[cold]
    #[inline(never)]
    #[allow(clippy::too_many_arguments)]
    fn submit_data_general(
        &mut self,
        opcode: u8,
        ns: &Namespace,
        lba: Lba,
        iova: Iova,
        len: usize,
        cdw12: u32,
        flags: u8,
        ctx: Option<T>,
    ) -> core::result::Result<(), (Error, Option<T>)> {
        if let Some(reason) = self.dead {
            return Err((self.dead_error(reason), ctx));
        }
        let shift = ns.block_shift();
        if len & ((1usize << shift) - 1) != 0 || len == 0 {
            return Err((bad_length(ns, len), ctx));
        }
        let blocks = (len >> shift) as u64;
        match lba.0.checked_add(blocks) {
            Some(end) if end <= ns.io_blocks() => {}
            _ => return Err((out_of_range(ns, lba, blocks), ctx)),
        }
        if iova.0 & 3 != 0 {
            return Err((Error::Unaligned { iova }, ctx));
        }
        if len > self.max_transfer {
            return self.submit_split(opcode, ns, lba, iova, len, cdw12, flags, ctx);
        }
        // Every other reason the fast path declined was checked above: the pool is empty.
        debug_assert_eq!(self.free_head, NIL);
        Err((self.exhausted(1), ctx))
    }

    /// Takes a free slot for a checked data command of `blocks` blocks (`1 <= len <=
    /// max_transfer`, dword-aligned IOVA; a free slot exists) and issues or queues it.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn start_data(
        &mut self,
        opcode: u8,
        nsid: Nsid,
        lba: Lba,
        iova: Iova,
        len: usize,
        blocks: u64,
        cdw12: u32,
        flags: u8,
        ctx: Option<T>,
    ) {
        debug_assert!(len >= 1 && len <= self.max_transfer && iova.0 & 3 == 0);
        let Some(idx) = self.pop_free() else {
            unreachable!("the caller checked for a free slot")
        };
        // SAFETY: the slot was free, so no command uses its PRP page; `len <= max_transfer <=
        // MAX_TRANSFER` and the IOVA is dword aligned (checked by the caller).
        let (prp1, prp2) =
            unsafe { prp::build(iova.0, len, self.prp_list(idx), self.prp_list_iova(idx)) };
        let s = self.slot(idx);
        s.opcode = opcode;
        s.flags = flags;
        s.nsid = nsid.0;
        s.cdw10_11 = lba.0;
        if let Some(c) = ctx {
            s.ctx.write(c);
            s.flags |= F_CTX;
        }
        self.stats.submitted += 1;
        self.enqueue(
            idx,
            Cmd {
                opcode,
                nsid: nsid.0,
                prp1,
                prp2,
                cdw10_11: lba.0,
                cdw12: (blocks - 1) as u32 | cdw12,
            },
        );
    }

    #[inline(never)]
    #[allow(clippy::too_many_arguments)]
    fn submit_split(
        &mut self,
        opcode: u8,
        ns: &Namespace,
        lba: Lba,
        iova: Iova,
        total: usize,
        cdw12: u32,
        flags: u8,
        ctx: Option<T>,
    ) -> core::result::Result<(), (Error, Option<T>)> {
        let bs = ns.block_size() as usize;
        let per_child = self.max_transfer & !(bs - 1);
        if per_child == 0 {
            return Err((
                Error::Unsupported {
                    location: self.shared.location.clone(),
                    what: format!(
                        "block size {bs} larger than the maximum transfer {}",
                        self.max_transfer
                    ),
                },
                ctx,
            ));
        }
        let children = total.div_ceil(per_child);
        let needed = children + 1;
        if needed > self.slots.len() || children > u16::MAX as usize {
            return Err((
                Error::RequestTooLarge {
                    qid: self.qid,
                    bytes: total,
                    children,
                    max_transfer: per_child,
                    needed,
                    pool: self.slots.len(),
                },
                ctx,
            ));
        }
        if needed > self.free_count as usize {
            return Err((self.exhausted(needed), ctx));
        }
        let parent = self.pop_free().expect("counted");
        {
            let p = self.slot(parent);
            p.state = PARENT;
            p.opcode = opcode;
            p.flags = flags;
            p.nsid = ns.nsid().0;
            p.cdw10_11 = lba.0;
            p.count = children as u16;
            p.err = None;
            if let Some(c) = ctx {
                p.ctx.write(c);
                p.flags |= F_CTX;
            }
        }
        let child_flags = flags & (F_HOLDS | F_SYNC);
        let shift = ns.block_shift();
        for i in 0..children {
            let off = i * per_child;
            let len = per_child.min(total - off);
            let iova = iova.0 + off as u64;
            let idx = self.pop_free().expect("counted");
            // SAFETY: the slot was free; `len <= per_child <= MAX_TRANSFER`.
            let (prp1, prp2) =
                unsafe { prp::build(iova, len, self.prp_list(idx), self.prp_list_iova(idx)) };
            let s = self.slot(idx);
            s.opcode = opcode;
            s.flags = child_flags;
            s.parent = parent;
            s.count = i as u16;
            s.nsid = ns.nsid().0;
            s.cdw10_11 = lba.0 + (off >> shift) as u64;
            let cmd = Cmd {
                opcode,
                nsid: s.nsid,
                prp1,
                prp2,
                cdw10_11: s.cdw10_11,
                cdw12: ((len >> shift) - 1) as u32 | cdw12,
            };
            self.enqueue(idx, cmd);
        }
        self.stats.submitted += 1;
        self.stats.split_children += children as u64;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn submit_simple(
        &mut self,
        opcode: u8,
        nsid: Nsid,
        cdw10_11: u64,
        cdw12: u32,
        ranges: Option<&[(Lba, u32)]>,
        ctx: Option<T>,
        flags: u8,
    ) -> core::result::Result<(), (Error, Option<T>)> {
        if let Some(reason) = self.dead {
            return Err((self.dead_error(reason), ctx));
        }
        let Some(idx) = self.pop_free() else {
            return Err((self.exhausted(1), ctx));
        };
        let mut prp1 = 0;
        if let Some(ranges) = ranges {
            let list = self.prp_list(idx).cast::<DsmRange>();
            for (i, &(lba, nlb)) in ranges.iter().enumerate() {
                let r = DsmRange {
                    cattr: 0,
                    nlb,
                    slba: lba.0,
                };
                // SAFETY: at most 256 ranges of 16 bytes fill the slot's 4 KiB page, which no
                // command uses (the slot was free).
                unsafe { list.add(i).write_volatile(r) };
            }
            prp1 = self.prp_list_iova(idx);
        }
        let s = self.slot(idx);
        s.opcode = opcode;
        s.flags = flags;
        s.nsid = nsid.0;
        s.cdw10_11 = cdw10_11;
        if let Some(c) = ctx {
            s.ctx.write(c);
            s.flags |= F_CTX;
        }
        self.stats.submitted += 1;
        let cmd = Cmd {
            opcode,
            nsid: nsid.0,
            prp1,
            prp2: 0,
            cdw10_11,
            cdw12,
        };
        self.enqueue(idx, cmd);
        Ok(())
    }

    fn submit_write_zeroes(
        &mut self,
        ns: &Namespace,
        lba: Lba,
        blocks: u32,
        flags: IoFlags,
        ctx: Option<T>,
        sflags: u8,
    ) -> core::result::Result<(), (Error, Option<T>)> {
        if blocks == 0 {
            return Err((Error::ZeroLength { nsid: ns.nsid() }, ctx));
        }
        if blocks > 65536 {
            return Err((
                Error::InvalidOption {
                    name: "write_zeroes blocks",
                    reason: format!("{blocks} is more than one command's 65536 blocks"),
                },
                ctx,
            ));
        }
        match lba.0.checked_add(blocks as u64) {
            Some(end) if end <= ns.io_blocks() => {}
            _ => return Err((out_of_range(ns, lba, blocks as u64), ctx)),
        }
        let cdw12 = (blocks - 1) | flags.cdw12();
        self.submit_simple(io::WRITE_ZEROES, ns.nsid(), lba.0, cdw12, None, ctx, sflags)
    }

    fn submit_deallocate(
        &mut self,
        ns: &Namespace,
        ranges: &[(Lba, u32)],
        ctx: Option<T>,
        sflags: u8,
    ) -> core::result::Result<(), (Error, Option<T>)> {
        if ranges.is_empty() || ranges.len() > 256 {
            return Err((Error::BadRangeCount(ranges.len()), ctx));
        }
        for &(lba, n) in ranges {
            match lba.0.checked_add(n as u64) {
                Some(end) if end <= ns.io_blocks() => {}
                _ => return Err((out_of_range(ns, lba, n as u64), ctx)),
            }
        }
        let cdw10_11 = (ranges.len() as u64 - 1) | (DSM_AD as u64) << 32;
        self.submit_simple(
            io::DATASET_MANAGEMENT,
            ns.nsid(),
            cdw10_11,
            0,
            Some(ranges),
            ctx,
            sflags,
        )
    }

    /// Puts a filled slot on the device, or at the back of the waiting queue (which keeps the
    /// command's remaining fields in the slot until it is issued).
    #[inline(always)]
    fn enqueue(&mut self, idx: u16, cmd: Cmd) {
        if self.wait_head == NIL && self.inflight < self.max_inflight {
            self.issue(idx, cmd);
            if self.per_command {
                self.ring_sq();
            }
        } else {
            let s = self.slot(idx);
            s.cdw12 = cmd.cdw12;
            s.prp1 = cmd.prp1;
            s.prp2 = cmd.prp2;
            self.wait(idx);
        }
    }

    /// Appends slot `idx` to the waiting queue.
    #[inline(never)]
    fn wait(&mut self, idx: u16) {
        self.stats.waited += 1;
        let s = self.slot(idx);
        s.state = WAITING;
        s.next = NIL;
        if self.wait_tail == NIL {
            self.wait_head = idx;
        } else {
            let t = self.wait_tail;
            self.slot(t).next = idx;
        }
        self.wait_tail = idx;
    }

    /// Copies the command of slot `idx` into the SQ at the tail: eight volatile 64-bit stores of
    /// words built in registers.
    #[inline(always)]
    fn issue(&mut self, idx: u16, cmd: Cmd) {
        let epoch = self.epoch;
        let tail = self.sq_tail as usize;
        let sq = self.sq;
        let s = self.slot(idx);
        s.state = IN_FLIGHT;
        s.epoch = epoch;
        let words = [
            cmd.opcode as u64 | (idx as u64) << 16 | (cmd.nsid as u64) << 32,
            0,
            0,
            cmd.prp1,
            cmd.prp2,
            cmd.cdw10_11,
            cmd.cdw12 as u64,
            0,
        ];
        // SAFETY: `tail < entries`, so the 64-byte entry lies in the SQ buffer we own; fewer than
        // `entries` commands are outstanding, so the device is not reading this entry.
        let dst = unsafe { sq.add(tail * 8) };
        for (i, w) in words.into_iter().enumerate() {
            // SAFETY: `i < 8`, within the entry; volatile because the device reads it.
            unsafe { dst.add(i).write_volatile(w) };
        }
        self.sq_tail = if tail + 1 == self.entries as usize {
            0
        } else {
            tail as u16 + 1
        };
        self.inflight += 1;
        self.unrung += 1;
    }

    fn issue_waiting(&mut self) {
        while self.wait_head != NIL && self.inflight < self.max_inflight {
            let idx = self.wait_head;
            self.wait_head = self.slot(idx).next;
            if self.wait_head == NIL {
                self.wait_tail = NIL;
            }
            let s = self.slot(idx);
            let cmd = Cmd {
                opcode: s.opcode,
                nsid: s.nsid,
                prp1: s.prp1,
                prp2: s.prp2,
                cdw10_11: s.cdw10_11,
                cdw12: s.cdw12,
            };
            self.issue(idx, cmd);
            if self.per_command {
                self.ring_sq();
            }
        }
    }

    // ---------------------------------------------------------------------------------------
    // Completion internals.

    /// One completion entry. The common case (our SQ id, an SQ head in range, a known CID whose
    /// command is in flight and owns a context, success, no blocking call deferring delivery)
    /// is handled here; everything else, valid or not, by
    /// [`complete_general`](Self::complete_general).
    #[inline(always)]
    fn complete<F: FnMut(T, IoResult)>(
        &mut self,
        dw0: u32,
        dw2: u32,
        dw3: u32,
        f: &mut F,
    ) -> usize {
        let cid = dw3 as u16;
        // DW2 is `sq_head | sq_id << 16`: it is ours with a head in range exactly when
        // `dw2 - (qid << 16) < entries`.
        if dw2.wrapping_sub(self.cqe_sq_base) < self.entries as u32
            && (cid as usize) < self.slots.len()
        {
            let defer = self.defer;
            let s = self.slot(cid);
            // A slot with a context is never a child (children carry none), so it needs no
            // parent bookkeeping.
            if s.state == IN_FLIGHT && s.flags & F_CTX != 0 && dw3 & STATUS_MASK == 0 && !defer {
                debug_assert!(s.parent == NIL && s.flags & F_SYNC == 0);
                // SAFETY: F_CTX says the context is initialised; the slot is freed (F_CTX
                // cleared with the other flags) so it is read once.
                let ctx = unsafe { s.ctx.assume_init_read() };
                self.push_free(cid);
                self.inflight -= 1;
                self.stats.completed += 1;
                f(ctx, Ok(IoDone { dw0 }));
                return 1;
            }
        }
        self.complete_general(dw0, dw2, dw3, f)
    }

    /// [`complete`](Self::complete) for everything but the common case: children, blocking
    /// calls, errors, late and invalid completions.
    #[inline(never)]
    fn complete_general<F: FnMut(T, IoResult)>(
        &mut self,
        dw0: u32,
        dw2: u32,
        dw3: u32,
        f: &mut F,
    ) -> usize {
        let cid = dw3 as u16;
        let sq_head = dw2 as u16;
        if (dw2 >> 16) as u16 != self.qid.0 {
            self.bad(ProtocolError::WrongSqId((dw2 >> 16) as u16));
            return 0;
        }
        // The SQ head itself is not needed (room on the SQ is counted by `inflight`), but a
        // head out of range is a device bug worth reporting.
        if sq_head >= self.entries {
            self.bad(ProtocolError::SqHeadOutOfRange {
                sq_head,
                entries: self.entries,
            });
        }
        if cid as usize >= self.slots.len() {
            self.bad(ProtocolError::UnknownCid(Cid(cid)));
            return 0;
        }
        if self.slot(cid).state != IN_FLIGHT {
            return self.complete_unusual(cid, f);
        }
        self.inflight -= 1;
        let ok = dw3 & STATUS_MASK == 0;
        let parent = self.slot(cid).parent;
        if parent == NIL {
            let res = if ok {
                Ok(IoDone { dw0 })
            } else {
                Err(self.status_error(cid, dw3))
            };
            self.deliver_and_free(cid, res, f)
        } else {
            if !ok {
                let e = self.status_error(cid, dw3);
                self.slot(parent).err.get_or_insert(e);
            }
            self.push_free(cid);
            self.child_done(parent, f)
        }
    }

    /// A completion for a quarantined command (late), or for no command at all.
    #[cold]
    #[inline(never)]
    fn complete_unusual<F: FnMut(T, IoResult)>(&mut self, cid: u16, f: &mut F) -> usize {
        if self.slot(cid).state != QUARANTINED {
            self.bad(ProtocolError::UnknownCid(Cid(cid)));
            return 0;
        }
        self.inflight -= 1;
        self.quarantined -= 1;
        self.stats.late_completions += 1;
        if self.slot(cid).flags & F_DEFERRED != 0 {
            // The memory was kept from the caller until now: report the timeout.
            return self.report_timeout(cid, true, f);
        }
        self.push_free(cid);
        0
    }

    /// One child of `parent` finished; completes the parent after the last one.
    #[inline]
    fn child_done<F: FnMut(T, IoResult)>(&mut self, parent: u16, f: &mut F) -> usize {
        let p = self.slot(parent);
        p.count -= 1;
        if p.count != 0 {
            return 0;
        }
        if p.flags & F_LEAK != 0 {
            self.leak(parent);
            return 0;
        }
        let res = match p.err.take() {
            Some(e) => Err(e),
            None => Ok(IoDone { dw0: 0 }),
        };
        self.deliver_and_free(parent, res, f)
    }

    /// Hands a finished request to the caller (or the blocking call, or the done list while a
    /// blocking call is polling) and frees its slot.
    #[inline]
    fn deliver_and_free<F: FnMut(T, IoResult)>(
        &mut self,
        idx: u16,
        res: IoResult,
        f: &mut F,
    ) -> usize {
        let defer = self.defer;
        let s = self.slot(idx);
        if s.flags & F_CTX == 0 {
            if s.flags & F_SYNC != 0 {
                self.sync = Some(res);
            }
            self.push_free(idx);
            return 0;
        }
        if defer {
            s.state = DONE;
            s.next = NIL;
            match res {
                Ok(d) => {
                    s.dw0 = d.dw0;
                    s.err = None;
                }
                Err(e) => s.err = Some(e),
            }
            if self.done_tail == NIL {
                self.done_head = idx;
            } else {
                let t = self.done_tail;
                self.slot(t).next = idx;
            }
            self.done_tail = idx;
            return 0;
        }
        s.flags &= !F_CTX;
        // SAFETY: F_CTX says the context is initialised; it is cleared so it is read once.
        let ctx = unsafe { s.ctx.assume_init_read() };
        self.push_free(idx);
        self.stats.completed += 1;
        f(ctx, res);
        1
    }

    #[cold]
    fn deliver_done<F: FnMut(T, IoResult)>(&mut self, f: &mut F) -> usize {
        let mut n = 0;
        while self.done_head != NIL {
            let idx = self.done_head;
            let s = self.slot(idx);
            let next = s.next;
            let res = match s.err.take() {
                Some(e) => Err(e),
                None => Ok(IoDone { dw0: s.dw0 }),
            };
            s.flags &= !F_CTX;
            // SAFETY: a done slot holds an initialised context (F_CTX), read once here.
            let ctx = unsafe { s.ctx.assume_init_read() };
            self.done_head = next;
            if next == NIL {
                self.done_tail = NIL;
            }
            self.push_free(idx);
            self.stats.completed += 1;
            f(ctx, res);
            n += 1;
        }
        n
    }

    #[cold]
    fn status_error(&mut self, idx: u16, dw3: u32) -> IoError {
        let qid = self.qid;
        let s = self.slot(idx);
        IoError::Status {
            qid,
            cid: Cid(idx),
            opcode: s.opcode,
            nsid: Nsid(s.nsid),
            lba: Lba(lba_of(s)),
            status: Status::from_field(((dw3 >> 17) & 0x7fff) as u16),
            child: (s.parent != NIL).then_some(s.count),
        }
    }

    fn timeout_error(&mut self, idx: u16) -> IoError {
        let qid = self.qid;
        let s = self.slot(idx);
        IoError::Timeout {
            qid,
            cid: Cid(idx),
            opcode: s.opcode,
            nsid: Nsid(s.nsid),
            lba: Lba(lba_of(s)),
            child: (s.parent != NIL).then_some(s.count),
        }
    }

    /// Reports the timeout of quarantined command `idx` to its request. With `free`, the slot
    /// is released too (the device has let go of it).
    fn report_timeout<F: FnMut(T, IoResult)>(&mut self, idx: u16, free: bool, f: &mut F) -> usize {
        let e = self.timeout_error(idx);
        let s = self.slot(idx);
        s.flags &= !F_DEFERRED;
        let parent = s.parent;
        if parent != NIL {
            self.slot(parent).err.get_or_insert(e);
            if free {
                self.push_free(idx);
            }
            return self.child_done(parent, f);
        }
        if free {
            return self.deliver_and_free(idx, Err(e), f);
        }
        // Keep the slot (quarantined); hand back the context now.
        if s.flags & F_SYNC != 0 {
            self.sync = Some(Err(e));
            return 0;
        }
        if s.flags & F_CTX == 0 {
            return 0;
        }
        s.flags &= !F_CTX;
        // SAFETY: F_CTX says the context is initialised; cleared so it is read once.
        let ctx = unsafe { s.ctx.assume_init_read() };
        self.stats.completed += 1;
        f(ctx, Err(e));
        1
    }

    // ---------------------------------------------------------------------------------------
    // Time, health and failure.

    #[cold]
    #[inline(never)]
    fn housekeeping<F: FnMut(T, IoResult)>(&mut self, idle: bool, f: &mut F) -> usize {
        self.countdown = COUNTDOWN;
        if let Some(reason) = self.dead {
            return if self.died { 0 } else { self.die(reason, f) };
        }
        if self.outstanding() == 0 {
            return 0;
        }
        let now = Instant::now();
        let mut delivered = 0;
        let mut check_health = idle && now >= self.next_health;
        if now.duration_since(self.tick_start) >= self.tick {
            self.epoch = self.epoch.wrapping_add(1);
            self.tick_start = now;
            check_health = true;
            delivered += self.scan_timeouts(f);
        }
        if check_health && self.dead.is_none() {
            self.next_health = now + HEALTH_INTERVAL;
            let reason = match self.shared.check_csts() {
                Err(Error::DeviceGone { .. }) => Some(DeadReason::DeviceGone),
                Err(_) => Some(DeadReason::ControllerFatal),
                Ok(_) => self.shared.dead_reason(self.generation),
            };
            if let Some(r) = reason {
                delivered += self.die(r, f);
            }
        }
        delivered
    }

    /// Quarantines and reports the commands that timed out, sending an Abort for each while
    /// the budget lasts: at most ACL + 1 Aborts per scan, none once one of them timed out or
    /// found the admin queue full or the controller unusable, and none while another thread
    /// holds the admin queue. Each Abort waits for its completion (up to the admin timeout)
    /// from inside `poll`, so the budget bounds how long a hung device can stall the poll.
    fn scan_timeouts<F: FnMut(T, IoResult)>(&mut self, f: &mut F) -> usize {
        let mut delivered = 0;
        let mut aborts_left = self.abort_limit;
        let mut unrecoverable = false;
        for idx in 0..self.slots.len() as u16 {
            let epoch = self.epoch;
            let defer = self.defer;
            let s = self.slot(idx);
            let age = epoch.wrapping_sub(s.epoch);
            if age < TIMEOUT_EPOCHS {
                continue;
            }
            if s.state == QUARANTINED && s.flags & F_DEFERRED != 0 {
                // Abort did not make the device give the command back within another timeout.
                unrecoverable = true;
                continue;
            }
            if s.state != IN_FLIGHT {
                continue;
            }
            if defer && s.flags & F_SYNC == 0 {
                // A blocking call is polling and cannot hand contexts out: the next ordinary
                // poll reports these.
                continue;
            }
            s.state = QUARANTINED;
            s.epoch = epoch;
            let holds = s.flags & F_HOLDS != 0;
            if holds {
                s.flags |= F_DEFERRED;
            }
            self.quarantined += 1;
            self.stats.timeouts += 1;
            if aborts_left == 0 {
                self.stats.aborts_skipped += 1;
            } else {
                match self.send_abort(idx) {
                    AbortSent::Sent => aborts_left -= 1,
                    AbortSent::Busy => self.stats.aborts_skipped += 1,
                    AbortSent::Stop => aborts_left = 0,
                }
            }
            if !holds {
                delivered += self.report_timeout(idx, false, f);
            }
        }
        if unrecoverable {
            delivered += self.die(DeadReason::Unrecoverable, f);
        }
        delivered
    }

    /// Sends an Abort for slot `idx` unless another thread holds the admin queue.
    fn send_abort(&mut self, idx: u16) -> AbortSent {
        let sh = &*self.shared;
        let mut guard = match sh.admin.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return AbortSent::Busy,
        };
        let res = match guard.as_mut() {
            Some(q) if sh.not_ready().is_none() => {
                crate::nvme::admin::abort_with(q, sh, self.qid, Cid(idx))
            }
            _ => Err(sh.gone()),
        };
        drop(guard);
        match res {
            Ok(crate::nvme::admin::AbortOutcome::Aborted) => self.stats.aborts += 1,
            _ => self.stats.aborts_failed += 1,
        }
        match res {
            // The controller answered: further Aborts may work too.
            Ok(_) | Err(Error::AdminStatus { .. }) => AbortSent::Sent,
            // Admin timeout, admin queue full, device gone or not ready: do not wait again.
            Err(_) => AbortSent::Stop,
        }
    }

    /// Deletes the SQ then the CQ on the device. True if both were deleted.
    fn delete_queues(&self) -> bool {
        let sh = &*self.shared;
        let mut guard = sh.lock_admin();
        let Some(q) = guard.as_mut() else {
            return false;
        };
        if sh.not_ready().is_some() {
            return false;
        }
        q.execute_checked(
            sh,
            "Delete I/O Submission Queue",
            Sqe::delete_io_sq(self.qid.0),
        )
        .is_ok()
            && q.execute_checked(
                sh,
                "Delete I/O Completion Queue",
                Sqe::delete_io_cq(self.qid.0),
            )
            .is_ok()
    }

    /// Stops the queue: makes sure the device no longer uses its memory (or leaks what it may
    /// still use), and completes every request exactly once.
    #[cold]
    fn die<F: FnMut(T, IoResult)>(&mut self, reason: DeadReason, f: &mut F) -> usize {
        self.dead = Some(reason);
        self.died = true;
        let stopped = self.stop_device(reason);
        self.stopped = stopped;
        let mut delivered = 0;
        let aborted = IoError::Aborted {
            qid: self.qid,
            reason,
        };
        // Children first, so parents see every child resolved.
        for pass in 0..2 {
            for idx in 0..self.slots.len() as u16 {
                let s = self.slot(idx);
                let is_child = s.parent != NIL;
                if (pass == 0) != is_child {
                    continue;
                }
                let state = s.state;
                let deferred = s.flags & F_DEFERRED != 0;
                match state {
                    WAITING => {
                        if is_child {
                            let p = s.parent;
                            self.slot(p).err.get_or_insert(aborted);
                            self.push_free(idx);
                            delivered += self.child_done(p, f);
                        } else {
                            delivered += self.deliver_and_free(idx, Err(aborted), f);
                        }
                    }
                    IN_FLIGHT | QUARANTINED => {
                        self.inflight -= 1;
                        if state == QUARANTINED {
                            self.quarantined -= 1;
                        }
                        if !stopped {
                            if state == IN_FLIGHT || deferred {
                                if is_child {
                                    let p = self.slot(idx).parent;
                                    self.slot(p).flags |= F_LEAK;
                                    self.slot(idx).state = LEAKED;
                                    delivered += self.child_done(p, f);
                                } else {
                                    self.leak(idx);
                                }
                            } else {
                                self.slot(idx).state = LEAKED;
                            }
                            continue;
                        }
                        if deferred {
                            delivered += self.report_timeout(idx, true, f);
                        } else if state == QUARANTINED {
                            self.push_free(idx);
                        } else if is_child {
                            let p = self.slot(idx).parent;
                            self.slot(p).err.get_or_insert(aborted);
                            self.push_free(idx);
                            delivered += self.child_done(p, f);
                        } else {
                            delivered += self.deliver_and_free(idx, Err(aborted), f);
                        }
                    }
                    _ => {}
                }
            }
        }
        self.wait_head = NIL;
        self.wait_tail = NIL;
        delivered
    }

    /// Makes sure the device no longer touches this queue's memory. True if it is known to.
    fn stop_device(&self, reason: DeadReason) -> bool {
        match reason {
            DeadReason::DeviceGone | DeadReason::ControllerReset | DeadReason::ShutDown => true,
            DeadReason::ControllerFatal => self.shared.disable().is_ok(),
            DeadReason::Unrecoverable => self.delete_queues() || self.shared.disable().is_ok(),
        }
    }

    /// Gives up on a request the device may still use: its context is never dropped or handed
    /// back, so memory it owns is never reused.
    fn leak(&mut self, idx: u16) {
        let s = self.slot(idx);
        s.state = LEAKED;
        s.flags &= !F_CTX;
        self.stats.leaked += 1;
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
            location: self.shared.location.clone(),
            qid: self.qid,
            reason,
        }
    }

    #[cold]
    fn bad(&mut self, e: ProtocolError) {
        self.stats.protocol_errors += 1;
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
        match self.dma.translate(buf.ptr.as_ptr(), buf.len) {
            Some(iova) if iova == buf.iova => {}
            _ => {
                return Err(Rejected {
                    error: Error::NotDmaMemory {
                        ptr: buf.ptr.as_ptr() as usize,
                        len: buf.len,
                    },
                    ctx,
                });
            }
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

impl<T> Drop for QueuePair<T> {
    fn drop(&mut self) {
        let issued = self.inflight != 0 || self.quarantined != 0;
        // Can the memory the device was given be reused? Only once the device no longer
        // touches it: the queue deleted, the controller disabled, reset or gone.
        let stopped = if self.died {
            self.stopped
        } else {
            match self.shared.dead_reason(self.generation).or(self.dead) {
                Some(r) => self.stop_device(r),
                None => self.delete_queues() || (issued && self.shared.disable().is_ok()),
            }
        };
        let safe = stopped || (!self.died && !issued);
        for i in 0..self.slots.len() {
            let s = &mut self.slots[i];
            if s.flags & F_CTX != 0 {
                let on_device = s.state == IN_FLIGHT || s.state == QUARANTINED || s.state == PARENT;
                if safe || !on_device {
                    s.flags &= !F_CTX;
                    // SAFETY: F_CTX says the context is initialised; dropped once.
                    unsafe { s.ctx.assume_init_drop() };
                } else {
                    self.stats.leaked += 1;
                }
            }
        }
        if safe {
            // SAFETY: dropped once, here; the device no longer uses the queues.
            unsafe {
                ManuallyDrop::drop(&mut self.sq_mem);
                ManuallyDrop::drop(&mut self.cq_mem);
                ManuallyDrop::drop(&mut self.prp_mem);
            }
        }
        // Otherwise the queue memory is leaked: the device may still write it.
        self.shared.free_qid(self.qid);
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

#[cold]
fn bad_length(ns: &Namespace, len: usize) -> Error {
    if len == 0 {
        Error::ZeroLength { nsid: ns.nsid() }
    } else {
        Error::NotBlockMultiple {
            nsid: ns.nsid(),
            len,
            block_size: ns.block_size(),
        }
    }
}

#[cold]
fn out_of_range(ns: &Namespace, lba: Lba, blocks: u64) -> Error {
    // A namespace refused for I/O has no addressable blocks (`io_blocks` 0): say why.
    if let Err(refused) = ns.check_io() {
        return refused;
    }
    Error::LbaOutOfRange {
        nsid: ns.nsid(),
        lba,
        blocks,
        ns_blocks: ns.blocks(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::emulated::{EmulatedConfig, EmulatedController, NamespaceConfig};
    use crate::nvme::controller::Controller;

    fn setup(entries: u16, requests: u16) -> (Controller, Arc<EmulatedController>, QueuePair<u64>) {
        let emu = EmulatedController::new(EmulatedConfig {
            namespaces: vec![NamespaceConfig::memory(512, 1 << 16)],
            ..EmulatedConfig::default()
        })
        .unwrap();
        let c = Controller::new(emu.clone()).unwrap();
        let opts = QueueOptions::default()
            .with_entries(entries)
            .with_requests(requests);
        let q = c.create_qpair::<u64>(opts).unwrap();
        (c, emu, q)
    }

    fn list(q: &QueuePair<u64>, mut at: u16) -> Vec<u16> {
        let mut v = Vec::new();
        while at != NIL {
            v.push(at);
            at = q.slots[at as usize].next;
        }
        v
    }

    /// Writes a completion entry into the CQ at the driver's head, as a device would.
    fn post(q: &mut QueuePair<u64>, cid: u16, sq_head: u16, sqid: u16) {
        let e = q.cq.cast_mut();
        let phase = q.phase as u32;
        // SAFETY: the entry at the head is inside our CQ; the device posts nothing meanwhile
        // (inline mode, no command outstanding).
        unsafe {
            let e = e.add(q.cq_head as usize * 4);
            e.write_volatile(0);
            e.add(1).write_volatile(0);
            e.add(2)
                .write_volatile(sq_head as u32 | (sqid as u32) << 16);
            AtomicU32::from_ptr(e.add(3)).store(cid as u32 | phase << 16, Ordering::Release);
        }
    }

    #[test]
    fn pool_cids_and_waiting_fifo() {
        let (c, _emu, mut q) = setup(2, 6);
        let ns = c.namespaces().remove(0);
        let buf = c.alloc(6 * 512).unwrap();
        assert_eq!(list(&q, q.free_head), vec![0, 1, 2, 3, 4, 5]);
        for t in 0..5u64 {
            let s = buf.slice(t as usize * 512, 512).unwrap();
            // SAFETY: `buf` outlives the requests, one slice each.
            unsafe { q.read_raw(&ns, Lba(t), s, t) }.unwrap();
        }
        // One command fits on a 2-entry queue; the rest wait, in submission order.
        assert_eq!(q.in_flight(), 1);
        assert_eq!(q.slot(0).state, IN_FLIGHT);
        assert_eq!(list(&q, q.wait_head), vec![1, 2, 3, 4]);
        assert_eq!(list(&q, q.free_head), vec![5]);
        // The CID in the SQ entry is the slot index.
        // SAFETY: entry 0 of our SQ, written by `issue`.
        let sqe0 = unsafe { q.sq.read_volatile() };
        assert_eq!((sqe0 >> 16) as u16, 0);
        let mut order = Vec::new();
        while order.len() < 5 {
            q.poll(8, |t, r| {
                r.unwrap();
                order.push(t)
            })
            .unwrap();
        }
        assert_eq!(order, vec![0, 1, 2, 3, 4]);
        assert_eq!(q.outstanding(), 0);
        assert_eq!(q.wait_head, NIL);
        assert_eq!(list(&q, q.free_head).len(), 6);
        assert_eq!(q.stats().waited, 4);
    }

    #[test]
    fn bogus_completions_are_counted_not_trusted() {
        let (c, emu, mut q) = setup(8, 8);
        let ns = c.namespaces().remove(0);
        let mut buf = c.alloc(512).unwrap();
        q.read_blocking(&ns, Lba(0), buf.as_mut_slice()).unwrap();
        let qid = q.qid().0;
        // A CID outside the pool.
        post(&mut q, 999, 0, qid);
        let e = q.poll(8, |_, _| panic!("delivered")).unwrap_err();
        assert!(matches!(
            e,
            Error::Protocol {
                error: ProtocolError::UnknownCid(Cid(999)),
                ..
            }
        ));
        // A CID already completed (slot 0 was the blocking read).
        post(&mut q, 0, 1, qid);
        let e = q.poll(8, |_, _| panic!("delivered")).unwrap_err();
        assert!(matches!(
            e,
            Error::Protocol {
                error: ProtocolError::UnknownCid(Cid(0)),
                ..
            }
        ));
        // An SQ head out of range, and a wrong SQ id.
        post(&mut q, 3, 200, qid);
        let e = q.poll(8, |_, _| panic!("delivered")).unwrap_err();
        assert!(matches!(
            e,
            Error::Protocol {
                error: ProtocolError::SqHeadOutOfRange { sq_head: 200, .. },
                ..
            }
        ));
        post(&mut q, 1, 0, qid + 5);
        let e = q.poll(8, |_, _| panic!("delivered")).unwrap_err();
        assert!(matches!(
            e,
            Error::Protocol {
                error: ProtocolError::WrongSqId(_),
                ..
            }
        ));
        assert_eq!(
            q.stats().protocol_errors,
            5,
            "the bad head and the free CID"
        );
        assert_eq!(q.outstanding(), 0, "nothing was freed twice or lost");
        assert_eq!(list(&q, q.free_head).len(), 8);
        drop(q);
        assert_eq!(emu.stats().dma_faults, 0);
    }

    #[test]
    fn split_uses_one_slot_per_child_plus_parent() {
        let (c, _emu, mut q) = setup(4, 16);
        let ns = c.namespaces().remove(0);
        let mt = q.max_transfer();
        let buf = c.alloc(3 * mt + 512).unwrap();
        // SAFETY: `buf` outlives the request.
        unsafe { q.write_raw(&ns, Lba(0), buf.as_dma_slice(), 7) }.unwrap();
        // Parent + 4 children taken; 3 children on the device, 1 waiting.
        assert_eq!(q.outstanding(), 5);
        assert_eq!(q.slot(0).state, PARENT);
        assert_eq!(q.slot(0).count, 4);
        assert_eq!(list(&q, q.wait_head), vec![4]);
        assert_eq!(q.slot(4).cdw10_11, 3 * mt as u64 / 512);
        assert_eq!(q.slot(4).cdw12 & 0xffff, 0, "the last child is one block");
        let mut calls = 0;
        while calls == 0 {
            calls += q
                .poll(8, |t, r| assert_eq!((t, r), (7, Ok(IoDone { dw0: 0 }))))
                .unwrap();
        }
        assert_eq!(q.outstanding(), 0);
    }
}
