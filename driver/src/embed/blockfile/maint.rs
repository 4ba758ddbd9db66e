//! The maintenance operations of a [`BlockFile`]: [`flush`](BlockFile::flush),
//! [`write_zeroes`](BlockFile::write_zeroes) and [`deallocate`](BlockFile::deallocate), each
//! synchronous or asynchronous (`submit_*`, a callback run exactly once when it returns `Ok`).
//!
//! Each is one dio-core request ([`DioCore::submit_commands`](dio_core::DioCore)): a request
//! state with its reference count (one per device command plus the submitter's), completed
//! exactly once, its errors by dio-core's precedence as for a write. The commands are mapped
//! here, on the file's extent, rather than by dio-core's walk:
//!
//! * **Flush**: one NVMe Flush of the namespace when the controller has a volatile write cache
//!   (Identify Controller VWC bit 0); without one, every completed write is already durable
//!   and the flush completes at once.
//! * **Write Zeroes** of `[offset, offset + len)`: an unaligned head or tail block is zeroed
//!   through the page cache (write-through, as a write of zeroes would be); the block-aligned
//!   middle goes to the device as NVMe Write Zeroes commands when ONCS says the controller has
//!   them, each of at most 65536 blocks (the 16-bit NLB) and at most WZSL when the controller
//!   reports it; otherwise as writes of one zeroed DMA buffer (the same buffer for every
//!   command, each at most the controller's maximum transfer).
//! * **Deallocate** of block-aligned ranges: Dataset Management commands with the Deallocate
//!   attribute, up to 256 ranges each, whose range lists the device reads from one DMA buffer
//!   that the request owns until its last command completed. Refused with
//!   [`EmbedError::Unsupported`] when ONCS lacks Dataset Management. What a deallocated block
//!   reads back is the device's choice (zeroes when the namespace's DLFEAT says so, as on the
//!   emulated controller).
//!
//! # Coherency
//! Write Zeroes and Deallocate take the file's range lock exclusively on the pages they touch
//! (the hull of the ranges for a deallocate), like a write, then drop the cached pages they
//! cover before the device commands are issued: a read that starts after they completed gets
//! the device's data, and none overlaps them while they run (the "latest data" rule of the
//! [`blockfile`](super) module holds, a write zeroes counting as a write of zeroes). Neither
//! changes the file's length, and neither reaches past its capacity (so never outside the
//! namespace). A flush takes no lock: it covers the writes that completed before it started.
//!
//! # On a poller thread
//! As for reads and writes, nothing may wait there: synchronous calls are refused, a write
//! zeroes must be block aligned (the page cache would wait), and an overlapping request in
//! flight refuses the range lock ([`EmbedError::WouldBlockOnPoller`], naming the operation as
//! a write). The asynchronous forms box their callback (one allocation per request; these are
//! not the per-I/O path).

use std::ops::Range;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use dio_core::{BioOp, Command, Completion, DioError, DioResult, Mode, Outcome};

use super::path::Shared;
use super::{BlockFile, EngineRef};
use crate::embed::cache::PAGE;
use crate::embed::error::{EmbedError, EmbedResult, MaintOp, Op};
use crate::embed::iobuf::{IoBuffer, Window};
use crate::embed::poller::Pollers;
use crate::embed::rangelock::{Held, LockWait, RangeGuard};
use crate::spec::sqe::DSM_RANGE_LEN;
use crate::spec::{IdentifyController, Oncs};

/// Blocks of one Write Zeroes command at most (NLB is a 16-bit 0's based count).
const WZ_NLB_MAX: u64 = 1 << 16;
/// Ranges of one Dataset Management command at most.
const DSM_RANGES: usize = 256;
/// Largest zeroed buffer of the Write Zeroes fallback.
const ZERO_CHUNK: u64 = 128 * 1024;

/// What the controller offers for the maintenance operations, and the file's place on the
/// namespace.
#[derive(Clone, Copy, Debug)]
pub(super) struct Maint {
    first_lba: u64,
    shift: u32,
    /// A volatile write cache (VWC bit 0): Flush goes to the device.
    vwc: bool,
    /// ONCS Write Zeroes.
    write_zeroes: bool,
    /// ONCS Dataset Management.
    deallocate: bool,
    /// Blocks of one Write Zeroes command at most.
    wz_blocks: u64,
    /// Bytes of one write of the Write Zeroes fallback at most.
    zero_chunk: u64,
}

impl Maint {
    /// From the controller's Identify data, its Write Zeroes size limit (`wzsl`, a power of
    /// two in units of the minimum memory page size: `Some(0)` or `None` for no limit; the
    /// value of Identify Controller for the NVM command set, CNS 06h), its maximum transfer,
    /// and the file's extent.
    pub(super) fn new(
        id: &IdentifyController,
        wzsl: Option<u8>,
        mpsmin: u64,
        max_transfer: u64,
        first_lba: u64,
        shift: u32,
    ) -> Maint {
        let bs = 1u64 << shift;
        let mut wz_blocks = WZ_NLB_MAX;
        if let Some(l) = wzsl.filter(|&l| l != 0 && l < 48) {
            wz_blocks = wz_blocks.min(((mpsmin << l) >> shift).max(1));
        }
        Maint {
            first_lba,
            shift,
            vwc: id.vwc & 1 != 0,
            write_zeroes: id.oncs.contains(Oncs::WRITE_ZEROES),
            deallocate: id.oncs.contains(Oncs::DSM),
            wz_blocks,
            zero_chunk: (ZERO_CHUNK.min(max_transfer) & !(bs - 1)).max(bs),
        }
    }
}

/// The user's callback of an asynchronous maintenance operation.
type MaintCb = Box<dyn FnOnce(EmbedResult<()>) + Send>;

/// How a maintenance operation is answered.
enum Reply {
    Sync,
    Async(MaintCb),
}

/// What to do.
#[derive(Clone, Copy)]
enum Job<'a> {
    Flush,
    WriteZeroes { offset: u64, len: u64 },
    Deallocate(&'a [Range<u64>]),
}

impl Job<'_> {
    fn op(&self) -> MaintOp {
        match self {
            Job::Flush => MaintOp::Flush,
            Job::WriteZeroes { .. } => MaintOp::WriteZeroes,
            Job::Deallocate(_) => MaintOp::Deallocate,
        }
    }

    /// The offset and length an error names: the first range's start and the bytes of every
    /// range for a deallocate.
    fn span(&self) -> (u64, u64) {
        match *self {
            Job::Flush => (0, 0),
            Job::WriteZeroes { offset, len } => (offset, len),
            Job::Deallocate(r) => (
                r.first().map_or(0, |r| r.start),
                r.iter()
                    .map(|r| r.end.saturating_sub(r.start))
                    .fold(0u64, u64::saturating_add),
            ),
        }
    }
}

impl BlockFile {
    /// Make the writes that completed before this call durable: an NVMe Flush when the
    /// controller has a volatile write cache, nothing otherwise (returns at once).
    pub fn flush(&self) -> EmbedResult<()> {
        sync_answer(self.maint(Job::Flush, Reply::Sync))
    }

    /// Zero `[offset, offset + len)` (any bytes inside the capacity) without transferring
    /// zeroes when the controller has Write Zeroes; the file's length is unchanged.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> EmbedResult<()> {
        sync_answer(self.maint(Job::WriteZeroes { offset, len }, Reply::Sync))
    }

    /// Deallocate (trim) the byte ranges, each on block boundaries inside the capacity (empty
    /// ones are skipped). [`EmbedError::Unsupported`] when the controller has no Dataset
    /// Management. What the blocks read afterwards is up to the device (zeroes when its DLFEAT
    /// says so).
    pub fn deallocate(&self, ranges: &[Range<u64>]) -> EmbedResult<()> {
        sync_answer(self.maint(Job::Deallocate(ranges), Reply::Sync))
    }

    /// [`flush`](Self::flush), asynchronously: `Ok(())` and `cb` runs exactly once (on a
    /// poller, the deferral thread, or before this returns when there is nothing to send), or
    /// the error and `cb` never runs.
    pub fn submit_flush(
        &self,
        cb: impl FnOnce(EmbedResult<()>) + Send + 'static,
    ) -> EmbedResult<()> {
        async_answer(self.maint(Job::Flush, Reply::Async(Box::new(cb))))
    }

    /// [`write_zeroes`](Self::write_zeroes), asynchronously (see [`submit_flush`](Self::submit_flush)).
    ///
    /// A write zeroes or deallocate that fails (synchronously, or refused here with an error)
    /// may have partly taken effect: it is several device commands, and those issued before
    /// the failure ran. Its range then holds zeroes, deallocated blocks or the old data,
    /// block by block; repeat the operation to know what it holds.
    pub fn submit_write_zeroes(
        &self,
        offset: u64,
        len: u64,
        cb: impl FnOnce(EmbedResult<()>) + Send + 'static,
    ) -> EmbedResult<()> {
        let job = Job::WriteZeroes { offset, len };
        async_answer(self.maint(job, Reply::Async(Box::new(cb))))
    }

    /// [`deallocate`](Self::deallocate), asynchronously (see [`submit_flush`](Self::submit_flush)).
    pub fn submit_deallocate(
        &self,
        ranges: &[Range<u64>],
        cb: impl FnOnce(EmbedResult<()>) + Send + 'static,
    ) -> EmbedResult<()> {
        async_answer(self.maint(Job::Deallocate(ranges), Reply::Async(Box::new(cb))))
    }

    /// The controller has a volatile write cache (a flush goes to the device).
    pub fn has_volatile_write_cache(&self) -> bool {
        self.inner.maint.vwc
    }

    /// The controller has Write Zeroes (else [`write_zeroes`](Self::write_zeroes) writes a
    /// zeroed buffer).
    pub fn supports_write_zeroes(&self) -> bool {
        self.inner.maint.write_zeroes
    }

    /// The controller has Dataset Management (else [`deallocate`](Self::deallocate) is
    /// refused).
    pub fn supports_deallocate(&self) -> bool {
        self.inner.maint.deallocate
    }
}

/// The answer of a synchronous operation (always `Some`).
fn sync_answer(a: Option<EmbedResult<()>>) -> EmbedResult<()> {
    a.unwrap_or_else(|| {
        log::error!("a synchronous maintenance operation was not answered on the caller's stack");
        Err(EmbedError::Config(
            "internal: synchronous request not answered",
        ))
    })
}

/// The answer of an asynchronous operation: `None` (accepted) or its refusal.
fn async_answer(a: Option<EmbedResult<()>>) -> EmbedResult<()> {
    match a {
        None => Ok(()),
        Some(Err(e)) => Err(e),
        Some(Ok(())) => {
            log::error!("an asynchronous maintenance operation was answered inline");
            Err(EmbedError::Config(
                "internal: asynchronous request answered inline",
            ))
        }
    }
}

/// Leaves the pooled engine when the submission phase ends.
struct Entered<'a>(Option<&'a Pollers>);

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        if let Some(p) = self.0 {
            p.leave();
        }
    }
}

/// The range an asynchronous operation holds: given back when dropped (after the request
/// completed, or with a refused request's completion).
struct Unlock {
    shared: Arc<Shared>,
    held: Option<Held>,
}

impl Drop for Unlock {
    fn drop(&mut self) {
        if let Some(h) = self.held.take() {
            self.shared.locks.unlock(h);
        }
    }
}

fn round_down(x: u64, a: u64) -> u64 {
    x / a * a
}

fn round_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

/// Run the user's callback, a panic caught and logged (it may run on a poller).
fn run_cb(cb: MaintCb, r: EmbedResult<()>, op: MaintOp) {
    if catch_unwind(AssertUnwindSafe(move || cb(r))).is_err() {
        log::error!("the completion callback of a {op} panicked; the panic was caught");
    }
}

impl BlockFile {
    /// The whole operation, from the checks to the answer: `Some` on the caller's stack (a
    /// synchronous result, or a refusal), `None` when the callback owns the outcome.
    fn maint(&self, job: Job<'_>, reply: Reply) -> Option<EmbedResult<()>> {
        let op = job.op();
        let (offset, len) = job.span();
        let _entered = match &self.inner.engine {
            EngineRef::Pooled(p) => {
                if !p.enter() {
                    return Some(Err(EmbedError::ShutDown));
                }
                Entered(Some(p))
            }
            EngineRef::Local(l) => {
                if !l.on_owner() {
                    return Some(Err(EmbedError::WrongThread));
                }
                Entered(None)
            }
        };
        let inner = &*self.inner;
        let (bs, cap, m) = (inner.block, inner.capacity, inner.maint);
        let bad = |why| {
            Some(Err(EmbedError::MaintRange {
                op,
                offset,
                len,
                capacity: cap,
                block_size: bs,
                why,
            }))
        };
        if op != MaintOp::Flush && !inner.writable {
            return Some(Err(EmbedError::ReadOnly { offset }));
        }
        // The pages to lock, or `None` for nothing to do.
        let span = match job {
            Job::Flush => None,
            Job::WriteZeroes { offset, len } => {
                match offset.checked_add(len) {
                    Some(end) if end <= cap => {}
                    _ => return bad("the range runs past the file's capacity"),
                }
                (len > 0).then(|| offset..offset + len)
            }
            Job::Deallocate(ranges) => {
                if !m.deallocate {
                    let why = "the controller has no Dataset Management (ONCS bit 2)";
                    return Some(Err(EmbedError::Unsupported { op, why }));
                }
                let mut hull: Option<Range<u64>> = None;
                for r in ranges {
                    if r.start > r.end {
                        return bad("a range ends before it starts");
                    }
                    if r.is_empty() {
                        continue;
                    }
                    if r.end > cap {
                        return bad("a range runs past the file's capacity");
                    }
                    if r.start % bs != 0 || r.end % bs != 0 {
                        return bad("a range does not start and end on block boundaries");
                    }
                    hull = Some(match hull {
                        None => r.clone(),
                        Some(h) => h.start.min(r.start)..h.end.max(r.end),
                    });
                }
                hull
            }
        };
        let on_poller = inner.engine.on_poller();
        if on_poller {
            let why = if matches!(reply, Reply::Sync) {
                Some("a synchronous call")
            } else if matches!(job, Job::WriteZeroes { .. }) && (offset % bs != 0 || len % bs != 0)
            {
                Some("an unaligned write zeroes goes through the page cache")
            } else {
                None
            };
            if let Some(why) = why {
                let e = EmbedError::WouldBlockOnPoller {
                    op: Op::Write,
                    offset,
                    why,
                };
                return Some(Err(e));
            }
        }
        let guard = match (&job, span) {
            (Job::Flush, _) if m.vwc => None,
            (_, None) => return self.maint_done(reply, Ok(()), op),
            (_, Some(s)) => {
                let range = round_down(s.start, PAGE)..round_up(s.end, PAGE);
                let locks = &inner.shared.locks;
                Some(if on_poller {
                    match locks.try_lock(range, true) {
                        Some(g) => g,
                        None => {
                            let why = "it overlaps a request in flight";
                            let e = EmbedError::WouldBlockOnPoller {
                                op: Op::Write,
                                offset,
                                why,
                            };
                            return Some(Err(e));
                        }
                    }
                } else {
                    let locked = match &inner.engine {
                        // Polling for the holder's completion; when nothing is in flight any
                        // more, the holder is a request below us on this thread's stack:
                        // refuse, never hang (see `RangeLock::lock`).
                        EngineRef::Local(l) => {
                            let poll = || l.poll_once() > 0 || l.in_flight();
                            locks.lock(range, true, LockWait::Poll(&poll))
                        }
                        EngineRef::Pooled(_) => locks.lock(range, true, LockWait::Park),
                    };
                    match locked {
                        Some(g) => g,
                        None => {
                            let e = EmbedError::WouldDeadlock {
                                op: Op::Write,
                                offset,
                                len,
                            };
                            return Some(Err(e));
                        }
                    }
                })
            }
        };
        let err = move |e: DioError| EmbedError::Maint {
            op,
            offset,
            len,
            source: e,
        };
        let (cmds, buf) = match self.commands(job, m) {
            Ok(c) => c,
            Err(e) => {
                drop(guard);
                return self.maint_done(reply, Err(err(e)), op);
            }
        };
        if cmds.is_empty() {
            drop(guard);
            return self.maint_done(reply, Ok(()), op);
        }
        self.submit_maint(cmds, buf, reply, guard, op, err)
    }

    /// Zero the unaligned ends of a write zeroes through the cache, drop the cached pages the
    /// device commands cover, and list those commands with the buffer they read from.
    fn commands(&self, job: Job<'_>, m: Maint) -> Result<(Vec<Command>, Window), DioError> {
        let inner = &*self.inner;
        let state = inner.state();
        let (file, cache, store) = (&state.cfile, &state.cache, &state.store);
        let empty = || Window::new(IoBuffer::Heap(Vec::new()), 0);
        let lba = |pos: u64| m.first_lba + (pos >> m.shift);
        match job {
            Job::Flush => {
                let c = Command {
                    op: BioOp::Flush,
                    lba: 0,
                    file_offset: 0,
                    len: 0,
                    data: None,
                };
                Ok((vec![c], empty()))
            }
            Job::WriteZeroes { offset, len } => {
                let bs = inner.block;
                let end = offset + len;
                let a = round_up(offset, bs).min(end);
                let b = round_down(end, bs).max(a);
                static ZEROES: [u8; 4096] = [0; 4096];
                for r in [offset..a, b..end] {
                    let mut pos = r.start;
                    while pos < r.end {
                        let n = (r.end - pos).min(ZEROES.len() as u64);
                        cache.write(file, store, pos, &ZEROES[..n as usize])?;
                        pos += n;
                    }
                }
                cache.invalidate(file, a..b);
                let (chunk, op, buf) = if m.write_zeroes {
                    (m.wz_blocks << m.shift, BioOp::WriteZeroes, empty())
                } else if a < b {
                    let n = m.zero_chunk.min(b - a);
                    let z = inner.ctrl.alloc(n as usize).map_err(|e| {
                        log::warn!("write zeroes: no DMA memory for the zeroed buffer: {e}");
                        DioError::Fault
                    })?;
                    (m.zero_chunk, BioOp::Write, Window::new(IoBuffer::Dma(z), 0))
                } else {
                    (m.zero_chunk, BioOp::Write, empty())
                };
                let mut cmds = Vec::with_capacity((b - a).div_ceil(chunk) as usize);
                let mut pos = a;
                while pos < b {
                    let n = (b - pos).min(chunk);
                    cmds.push(Command {
                        op,
                        lba: lba(pos),
                        file_offset: pos,
                        len: n,
                        data: (op == BioOp::Write).then_some((0, n)),
                    });
                    pos += n;
                }
                Ok((cmds, buf))
            }
            Job::Deallocate(ranges) => {
                // Device ranges: at most u32::MAX blocks each.
                let most = (u32::MAX as u64) << m.shift;
                let mut list: Vec<(u64, u64)> = Vec::new();
                for r in ranges.iter().filter(|r| !r.is_empty()) {
                    cache.invalidate(file, r.clone());
                    let mut pos = r.start;
                    while pos < r.end {
                        let n = (r.end - pos).min(most);
                        list.push((pos, n));
                        pos += n;
                    }
                }
                if list.is_empty() {
                    return Ok((Vec::new(), empty()));
                }
                let groups = list.len().div_ceil(DSM_RANGES);
                let mut dma = inner.ctrl.alloc(groups * PAGE as usize).map_err(|e| {
                    log::warn!("deallocate: no DMA memory for the range list: {e}");
                    DioError::Fault
                })?;
                let bytes = dma.as_mut_slice();
                let mut cmds = Vec::with_capacity(groups);
                for (g, chunk) in list.chunks(DSM_RANGES).enumerate() {
                    let base = g * PAGE as usize;
                    for (i, &(pos, n)) in chunk.iter().enumerate() {
                        // NVMe range: context attributes (0), NLB, SLBA, little endian.
                        let e = &mut bytes[base + i * DSM_RANGE_LEN..][..DSM_RANGE_LEN];
                        e[0..4].copy_from_slice(&0u32.to_le_bytes());
                        e[4..8].copy_from_slice(&((n >> m.shift) as u32).to_le_bytes());
                        e[8..16].copy_from_slice(&lba(pos).to_le_bytes());
                    }
                    cmds.push(Command {
                        op: BioOp::Deallocate,
                        lba: lba(chunk[0].0),
                        file_offset: chunk[0].0,
                        len: chunk.iter().map(|r| r.1).sum(),
                        data: Some((base as u64, (chunk.len() * DSM_RANGE_LEN) as u64)),
                    });
                }
                Ok((cmds, Window::new(IoBuffer::Dma(dma), 0)))
            }
        }
    }

    /// The commands through dio-core, synchronously or asynchronously.
    fn submit_maint(
        &self,
        cmds: Vec<Command>,
        mut w: Window,
        reply: Reply,
        guard: Option<RangeGuard<'_>>,
        op: MaintOp,
        err: impl Fn(DioError) -> EmbedError + Copy + Send + 'static,
    ) -> Option<EmbedResult<()>> {
        let inner = &*self.inner;
        let core = inner.io.core();
        let at = cmds[0].file_offset;
        match reply {
            Reply::Sync => loop {
                let o = core.submit_commands(
                    at,
                    cmds.iter().copied(),
                    w,
                    Mode::Sync,
                    Completion::noop(),
                );
                let (r, back) = super::sync_outcome(o);
                // Run to completion: the queue pair's pool was exhausted before any command
                // of ours was in flight: poll and try again while that frees something (a
                // request in flight will complete); with nothing in flight, retrying would
                // spin for ever: the error is the answer.
                if let (EngineRef::Local(l), Err(DioError::QueueFull)) = (&inner.engine, &r) {
                    if l.poll_once() > 0 || l.in_flight() {
                        w = back;
                        continue;
                    }
                }
                drop(guard);
                return Some(r.map(|_| ()).map_err(err));
            },
            Reply::Async(cb) => {
                let unlock = Unlock {
                    shared: Arc::clone(&inner.shared),
                    held: guard.and_then(RangeGuard::into_held),
                };
                // The file's dio-core defers nothing (path.rs): the range is given back where
                // the operation finished, then the callback goes to the deferral thread, if any.
                let deferral = inner.deferral.clone();
                let completion = Completion::new(move |r: DioResult, w: Window| {
                    drop(w);
                    drop(unlock);
                    let r = r.map(|_| ()).map_err(err);
                    match deferral {
                        Some(d) => d.defer(Box::new(move || run_cb(cb, r, op))),
                        None => run_cb(cb, r, op),
                    }
                });
                match core.submit_commands(at, cmds, w, Mode::Async, completion) {
                    Outcome::Queued => None,
                    Outcome::Done {
                        result: Err(e),
                        completion,
                        ..
                    } if e.is_submission_class() => {
                        // Refused: the range is given back, the callback dropped unrun. A
                        // request of several commands may have been refused after its first
                        // ones went out: those ran, so part of the range may be zeroed or
                        // deallocated (see `submit_write_zeroes`).
                        completion.discard();
                        Some(Err(err(e)))
                    }
                    Outcome::Done {
                        result,
                        buf,
                        completion,
                    } => {
                        core.defer_completion(completion, result, buf);
                        None
                    }
                    Outcome::Fallback {
                        buf, completion, ..
                    } => {
                        core.defer_completion(completion, Err(DioError::Invalid), buf);
                        None
                    }
                }
            }
        }
    }

    /// Answer an operation that needs no device command (or failed before dio-core).
    fn maint_done(&self, reply: Reply, r: EmbedResult<()>, op: MaintOp) -> Option<EmbedResult<()>> {
        match reply {
            Reply::Sync => Some(r),
            Reply::Async(cb) => {
                match &self.inner.deferral {
                    Some(d) => d.defer(Box::new(move || run_cb(cb, r, op))),
                    None => run_cb(cb, r, op),
                }
                None
            }
        }
    }
}
