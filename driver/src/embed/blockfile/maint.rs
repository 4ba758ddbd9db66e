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
//!   command, each at most the controller's maximum transfer), a spare of the file.
//! * **Deallocate** of block-aligned ranges: Dataset Management commands with the Deallocate
//!   attribute, up to 256 ranges each, whose range lists the device reads from one DMA buffer
//!   that the request owns until its last command completed (one page, a spare of the file,
//!   for up to 256 device ranges). Refused with
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
//! a write). No operation allocates DMA memory on its calling thread in the steady state: the
//! buffers the device reads (the zeroed buffer, a page of ranges) are the file's spares
//! ([`Spares`]), allocated when it was opened, and the commands are produced one by one
//! ([`Cmds`]), never listed. The buffer goes to dio-core in a request context of the file's
//! pool (a one-word `Window`, as for a read or a write), back in the pool when the operation is
//! over. The synchronous forms allocate nothing in the steady state (the first operation on a
//! file whose context pool is empty allocates one context, kept in the pool afterwards); the
//! asynchronous ones box their callback (these are not the per-I/O path).

use std::ops::Range;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crossbeam_queue::ArrayQueue;
use dio_core::{BioOp, Command, Completion, DioError, DioResult, Mode, Outcome};

use super::path::Shared;
use super::{BlockFile, EngineRef};
use crate::bus::dma::DmaBuffer;
use crate::embed::cache::PAGE;
use crate::embed::ctrl::EmbedCtrl;
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

/// Spare buffers of each kind a file keeps at most (more in flight at once: the extra ones are
/// freed when they come back).
const SPARES: usize = 8;

/// Which spare buffer an operation reads from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Spare {
    /// The zeroed buffer of the Write Zeroes fallback (the device only reads it).
    Zeroes,
    /// One page of Dataset Management ranges.
    Ranges,
}

/// The DMA buffers a file's maintenance operations give the device, allocated when the file
/// is opened so that an operation allocates no DMA memory on its calling thread (which may be
/// a poller, e.g. the NVMe/TCP target's): the zeroed buffer of the Write Zeroes fallback (only
/// when the controller lacks ONCS Write Zeroes) and one page of Dataset Management ranges
/// (only when it has ONCS Dataset Management). Each kind is a small lock-free pool: an
/// operation takes a buffer and gives it back once its last command completed. Only when more
/// operations of one kind are in flight at once than the pool holds does one allocate
/// (counted: [`Spares::misses`]), and a deallocate of more than one page of ranges
/// (256 device ranges) allocates its own list.
pub(crate) struct Spares {
    zeroes: ArrayQueue<DmaBuffer>,
    zeroes_len: usize,
    ranges: ArrayQueue<DmaBuffer>,
    /// Buffers allocated because a pool was empty.
    fresh: AtomicUsize,
}

impl Spares {
    /// One buffer of each kind the controller needs, for a file with `m`.
    pub(super) fn new(ctrl: &EmbedCtrl, m: &Maint) -> EmbedResult<Spares> {
        let s = Spares {
            zeroes_len: m.zero_chunk as usize,
            ..Spares::empty()
        };
        if !m.write_zeroes {
            let _ = s.zeroes.push(ctrl.alloc(s.zeroes_len)?);
        }
        if m.deallocate {
            let _ = s.ranges.push(ctrl.alloc(PAGE as usize)?);
        }
        Ok(s)
    }

    /// No spare (each buffer is allocated when an operation needs it).
    pub(super) fn empty() -> Spares {
        Spares {
            zeroes: ArrayQueue::new(SPARES),
            zeroes_len: 0,
            ranges: ArrayQueue::new(SPARES),
            fresh: AtomicUsize::new(0),
        }
    }

    /// A buffer of `kind` from the pool, or a new one when the pool is empty.
    fn take(&self, ctrl: &EmbedCtrl, kind: Spare) -> Result<DmaBuffer, DioError> {
        let (pool, len) = match kind {
            Spare::Zeroes => (&self.zeroes, self.zeroes_len),
            Spare::Ranges => (&self.ranges, PAGE as usize),
        };
        if let Some(b) = pool.pop() {
            return Ok(b);
        }
        self.fresh.fetch_add(1, Ordering::Relaxed);
        log::debug!("maintenance: every spare {kind:?} buffer is in use: allocating one");
        ctrl.alloc(len).map_err(|e| {
            log::warn!("maintenance: no DMA memory for a {kind:?} buffer: {e}");
            DioError::Fault
        })
    }

    /// Give a buffer of `kind` back (freed if the pool is full, or if it is not a DMA buffer).
    fn give(&self, kind: Spare, buf: IoBuffer) {
        if let Some(b) = buf.into_dma() {
            let pool = match kind {
                Spare::Zeroes => &self.zeroes,
                Spare::Ranges => &self.ranges,
            };
            drop(pool.push(b));
        }
    }

    /// Buffers allocated so far because a pool was empty (none in the steady state with at
    /// most [`SPARES`] operations of a kind in flight, and the first one preallocated).
    #[cfg(test)]
    fn misses(&self) -> usize {
        self.fresh.load(Ordering::Relaxed)
    }
}

/// The device commands of one operation, produced as dio-core takes them (no list is built;
/// cloned to retry).
#[derive(Clone, Debug)]
enum Cmds {
    /// A Flush, or a Deallocate whose ranges fit one page.
    One(Option<Command>),
    /// `[pos, end)` in commands of at most `chunk` bytes: Write Zeroes, or writes of the
    /// zeroed buffer (each from its start).
    Steps {
        op: BioOp,
        pos: u64,
        end: u64,
        chunk: u64,
        m: Maint,
    },
    /// A Deallocate of more than one page of ranges.
    Many(std::vec::IntoIter<Command>),
}

impl Iterator for Cmds {
    type Item = Command;

    fn next(&mut self) -> Option<Command> {
        match self {
            Cmds::One(c) => c.take(),
            Cmds::Steps {
                op,
                pos,
                end,
                chunk,
                m,
            } => {
                if *pos >= *end {
                    return None;
                }
                let n = (*end - *pos).min(*chunk);
                let c = Command {
                    op: *op,
                    lba: m.lba(*pos),
                    file_offset: *pos,
                    len: n,
                    data: (*op == BioOp::Write).then_some((0, n)),
                };
                *pos += n;
                Some(c)
            }
            Cmds::Many(it) => it.next(),
        }
    }
}

impl Maint {
    /// The namespace block of file offset `pos`.
    fn lba(&self, pos: u64) -> u64 {
        self.first_lba + (pos >> self.shift)
    }

    /// Write the NVMe range `(pos, n)` (file offset and bytes) as entry `i` of a Dataset
    /// Management range list: context attributes (0), NLB, SLBA, little endian.
    fn put_range(&self, list: &mut [u8], i: usize, (pos, n): (u64, u64)) {
        let e = &mut list[i * DSM_RANGE_LEN..][..DSM_RANGE_LEN];
        e[0..4].copy_from_slice(&0u32.to_le_bytes());
        e[4..8].copy_from_slice(&((n >> self.shift) as u32).to_le_bytes());
        e[8..16].copy_from_slice(&self.lba(pos).to_le_bytes());
    }
}

/// One operation's device commands, ready for dio-core: the file offset it is known by, the
/// commands, the buffer they read from, and the kind of spare that buffer is, if it is one.
struct Maintenance {
    at: u64,
    cmds: Cmds,
    buf: IoBuffer,
    spare: Option<Spare>,
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

/// The device ranges of `r`: at most `most` bytes each, as `(file offset, bytes)`.
fn pieces(r: &Range<u64>, most: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
    let mut pos = r.start;
    std::iter::from_fn(move || {
        (pos < r.end).then(|| {
            let n = (r.end - pos).min(most);
            pos += n;
            (pos - n, n)
        })
    })
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
        let (cmds, buf, spare) = match self.commands(job, m) {
            Ok(c) => c,
            Err(e) => {
                drop(guard);
                return self.maint_done(reply, Err(err(e)), op);
            }
        };
        let Some(at) = cmds.clone().next().map(|c| c.file_offset) else {
            if let Some(k) = spare {
                inner.shared.spares.give(k, buf);
            }
            drop(guard);
            return self.maint_done(reply, Ok(()), op);
        };
        let req = Maintenance {
            at,
            cmds,
            buf,
            spare,
        };
        self.submit_maint(req, reply, guard, op, err)
    }

    /// Zero the unaligned ends of a write zeroes through the cache, drop the cached pages the
    /// device commands cover, and give those commands with the buffer they read from (and,
    /// if that buffer is one of the file's spares, its kind, to give it back).
    fn commands(
        &self,
        job: Job<'_>,
        m: Maint,
    ) -> Result<(Cmds, IoBuffer, Option<Spare>), DioError> {
        let inner = &*self.inner;
        let state = inner.state();
        let (file, cache, store) = (&state.cfile, &state.cache, &state.store);
        let spares = &inner.shared.spares;
        let empty = || IoBuffer::Heap(Vec::new());
        match job {
            Job::Flush => {
                let c = Command {
                    op: BioOp::Flush,
                    lba: 0,
                    file_offset: 0,
                    len: 0,
                    data: None,
                };
                Ok((Cmds::One(Some(c)), empty(), None))
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
                let steps = |op, chunk| Cmds::Steps {
                    op,
                    pos: a,
                    end: b,
                    chunk,
                    m,
                };
                if m.write_zeroes {
                    let cmds = steps(BioOp::WriteZeroes, m.wz_blocks << m.shift);
                    Ok((cmds, empty(), None))
                } else if a < b {
                    let z = spares.take(&inner.ctrl, Spare::Zeroes)?;
                    let w = IoBuffer::Dma(z);
                    Ok((steps(BioOp::Write, m.zero_chunk), w, Some(Spare::Zeroes)))
                } else {
                    Ok((Cmds::One(None), empty(), None))
                }
            }
            Job::Deallocate(ranges) => {
                // Device ranges: at most u32::MAX blocks each.
                let most = (u32::MAX as u64) << m.shift;
                let mut count = 0usize;
                let mut first = None;
                for r in ranges.iter().filter(|r| !r.is_empty()) {
                    cache.invalidate(file, r.clone());
                    count += (r.end - r.start).div_ceil(most) as usize;
                    first.get_or_insert(r.start);
                }
                let Some(first) = first else {
                    return Ok((Cmds::One(None), empty(), None));
                };
                let all = || {
                    ranges
                        .iter()
                        .filter(|r| !r.is_empty())
                        .flat_map(move |r| pieces(r, most))
                };
                if count <= DSM_RANGES {
                    // One command, its list in the file's spare page.
                    let mut page = spares.take(&inner.ctrl, Spare::Ranges)?;
                    let list = page.as_mut_slice();
                    let mut len = 0;
                    for (i, p) in all().enumerate() {
                        m.put_range(list, i, p);
                        len += p.1;
                    }
                    let c = Command {
                        op: BioOp::Deallocate,
                        lba: m.lba(first),
                        file_offset: first,
                        len,
                        data: Some((0, (count * DSM_RANGE_LEN) as u64)),
                    };
                    let w = IoBuffer::Dma(page);
                    return Ok((Cmds::One(Some(c)), w, Some(Spare::Ranges)));
                }
                // More than one page of ranges (never from one NVMe/TCP command): its own list.
                let list: Vec<(u64, u64)> = all().collect();
                let groups = list.len().div_ceil(DSM_RANGES);
                let mut dma = inner.ctrl.alloc(groups * PAGE as usize).map_err(|e| {
                    log::warn!("deallocate: no DMA memory for the range list: {e}");
                    DioError::Fault
                })?;
                let bytes = dma.as_mut_slice();
                let mut cmds = Vec::with_capacity(groups);
                for (g, chunk) in list.chunks(DSM_RANGES).enumerate() {
                    let base = g * PAGE as usize;
                    for (i, &p) in chunk.iter().enumerate() {
                        m.put_range(&mut bytes[base..], i, p);
                    }
                    cmds.push(Command {
                        op: BioOp::Deallocate,
                        lba: m.lba(chunk[0].0),
                        file_offset: chunk[0].0,
                        len: chunk.iter().map(|r| r.1).sum(),
                        data: Some((base as u64, (chunk.len() * DSM_RANGE_LEN) as u64)),
                    });
                }
                let w = IoBuffer::Dma(dma);
                Ok((Cmds::Many(cmds.into_iter()), w, None))
            }
        }
    }

    /// The commands through dio-core, synchronously or asynchronously; a spare buffer goes
    /// back to the file once the last command completed.
    fn submit_maint(
        &self,
        req: Maintenance,
        reply: Reply,
        guard: Option<RangeGuard<'_>>,
        op: MaintOp,
        err: impl Fn(DioError) -> EmbedError + Copy + Send + 'static,
    ) -> Option<EmbedResult<()>> {
        let inner = &*self.inner;
        let core = inner.io.core();
        let Maintenance {
            at,
            cmds,
            buf,
            spare,
        } = req;
        // The buffer goes to dio-core in a context of the file's pool (a one-word window),
        // which goes back there when the operation is over.
        let mut buf = inner.shared.carry(buf);
        let give = move |shared: &Shared, w: Window| {
            let buf = shared.unload(w);
            match spare {
                Some(k) => shared.spares.give(k, buf),
                None => drop(buf),
            }
        };
        match reply {
            Reply::Sync => loop {
                let o = core.submit_commands(at, cmds.clone(), buf, Mode::Sync, Completion::noop());
                let (r, back) = super::sync_outcome(o);
                // Run to completion: the queue pair's pool was exhausted before any command
                // of ours was in flight: poll and try again while that frees something (a
                // request in flight will complete); with nothing in flight, retrying would
                // spin for ever: the error is the answer.
                if let (EngineRef::Local(l), Err(DioError::QueueFull)) = (&inner.engine, &r) {
                    if l.poll_once() > 0 || l.in_flight() {
                        buf = back;
                        continue;
                    }
                }
                give(&inner.shared, back);
                drop(guard);
                return Some(r.map(|_| ()).map_err(err));
            },
            Reply::Async(cb) => {
                let unlock = Unlock {
                    shared: Arc::clone(&inner.shared),
                    held: guard.and_then(RangeGuard::into_held),
                };
                // The file's dio-core defers nothing (path.rs): the range and the spare are
                // given back where the operation finished, then the callback goes to the
                // deferral thread, if any.
                let deferral = inner.deferral.clone();
                let completion = Completion::new(move |r: DioResult, w: Window| {
                    give(&unlock.shared, w);
                    drop(unlock);
                    let r = r.map(|_| ()).map_err(err);
                    match deferral {
                        Some(d) => d.defer(Box::new(move || run_cb(cb, r, op))),
                        None => run_cb(cb, r, op),
                    }
                });
                match core.submit_commands(at, cmds, buf, Mode::Async, completion) {
                    Outcome::Queued => None,
                    Outcome::Done {
                        result: Err(e),
                        buf,
                        completion,
                    } if e.is_submission_class() => {
                        // Refused: the range and the spare are given back, the callback
                        // dropped unrun. A request of several commands may have been refused
                        // after its first ones went out: those ran, so part of the range may
                        // be zeroed or deallocated (see `submit_write_zeroes`).
                        give(&inner.shared, buf);
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

#[cfg(test)]
mod tests {
    use std::sync::mpsc::channel;

    use super::*;
    use crate::bus::emulated::{EmulatedConfig, EmulatedController, Mode as Emu, NamespaceConfig};
    use crate::{Dioxide, FileOptions, Nsid};

    /// A controller with Dataset Management but without Write Zeroes: a write zeroes writes
    /// the zeroed spare, a deallocate sends its ranges from the spare page.
    fn ctrl() -> crate::Controller {
        let emu = EmulatedController::new(EmulatedConfig {
            mode: Emu::Inline,
            namespaces: vec![NamespaceConfig::memory(512, 1 << 14)],
            oncs: Oncs::DSM,
            ..EmulatedConfig::default()
        })
        .unwrap();
        crate::Controller::new(emu).unwrap()
    }

    /// An instance on [`ctrl`] that runs to completion on the calling thread.
    fn rtc() -> Dioxide {
        Dioxide::builder()
            .controller(ctrl())
            .run_to_completion()
            .build()
            .unwrap()
    }

    /// A read-only file holds no spare DMA buffers (its maintenance is refused, but flush).
    #[test]
    fn a_read_only_file_holds_no_spares() {
        let _w = test_watchdog::arm(test_watchdog::UNIT);
        let dx = rtc();
        let opts = |first| FileOptions::new(first, 1 << 12).with_len(1 << 21);
        let ro = dx.open_file(0, Nsid(1), opts(0).writable(false)).unwrap();
        let rw = dx.open_file(0, Nsid(1), opts(1 << 12)).unwrap();
        let held = |f: &BlockFile| {
            let s = &f.inner.shared.spares;
            (s.zeroes.len(), s.ranges.len())
        };
        assert_eq!(held(&ro), (0, 0));
        assert_eq!(held(&rw), (1, 1));
        assert!(matches!(
            ro.write_zeroes(0, 4096),
            Err(EmbedError::ReadOnly { .. })
        ));
        ro.flush().unwrap();
        assert_eq!(held(&ro), (0, 0));
    }

    /// Synchronous and asynchronous write zeroes (through the zeroed spare) and deallocates
    /// (their ranges in the spare page), up to 4 in flight at once: each zeroes what it
    /// covers, and none allocates a DMA buffer: the file's preallocated spares are taken and
    /// given back (afterwards both pools hold them again, and no pool ran dry). Beyond the
    /// pool (more than `SPARES` in flight), a spare is allocated and counted.
    #[test]
    fn maintenance_reads_the_device_data_from_the_files_spares() {
        let _w = test_watchdog::arm(test_watchdog::UNIT);
        let dx = rtc();
        let file = dx
            .open_file(0, Nsid(1), FileOptions::new(0, 1 << 13).with_len(1 << 22))
            .unwrap();
        assert!(!file.supports_write_zeroes() && file.supports_deallocate());
        let spares = &file.inner.shared.spares;
        let held = |s: &Spares| (s.zeroes.len(), s.ranges.len());
        assert_eq!(held(spares), (1, 1), "one of each, preallocated");
        let page = PAGE as usize;
        let fill = |at: usize, n: usize| {
            assert_eq!(file.write_at(&vec![0xa5; n], at as u64).unwrap(), n);
        };
        let zeroed = |at: usize, n: usize| {
            let mut b = vec![1; n];
            assert_eq!(file.read_at(&mut b, at as u64).unwrap(), n);
            b.iter().all(|&x| x == 0)
        };
        for round in 0..3 {
            // Synchronous.
            fill(0, 8 * page);
            file.write_zeroes(0, 3 * page as u64).unwrap();
            file.deallocate(&[
                (4 * page as u64)..(5 * page as u64),
                (6 * page as u64)..(8 * page as u64),
            ])
            .unwrap();
            assert!(zeroed(0, 3 * page) && zeroed(4 * page, page) && zeroed(6 * page, 2 * page));
            let mut b = vec![0; page];
            file.read_at(&mut b, 3 * page as u64).unwrap();
            assert!(b.iter().all(|&x| x == 0xa5), "round {round}: page 3 kept");
            // Asynchronous, four in flight at once (two of each kind).
            fill(0, 16 * page);
            let (tx, rx) = channel();
            for i in 0..4u64 {
                let tx = tx.clone();
                let at = i * 4 * PAGE;
                let cb = move |r: EmbedResult<()>| tx.send((i, r)).unwrap();
                if i % 2 == 0 {
                    file.submit_write_zeroes(at, 2 * PAGE, cb).unwrap();
                } else {
                    let ranges = [at..at + PAGE, at + PAGE..at + 2 * PAGE];
                    file.submit_deallocate(&ranges, cb).unwrap();
                }
            }
            let mut done = 0;
            while done < 4 {
                dx.poll();
                while let Ok((i, r)) = rx.try_recv() {
                    r.unwrap_or_else(|e| panic!("operation {i}: {e}"));
                    done += 1;
                }
            }
            for i in 0..4 {
                assert!(
                    zeroed(i * 4 * page, 2 * page),
                    "round {round}: operation {i}"
                );
            }
            assert_eq!(
                spares.misses(),
                2,
                "the second of each kind in flight allocated"
            );
        }
        // The two allocated in the first round were kept; nothing ran dry again.
        assert_eq!(held(spares), (2, 2));
        assert_eq!(spares.misses(), 2);
        drop(file);
        dx.shutdown();
    }
}
