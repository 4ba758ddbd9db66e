//! The per-request path of a [`BlockFile`], top to bottom: entry points, argument checks,
//! range lock, split, dio-core, completion, user callback.
//!
//! 1. **Entry** ([`BlockFile::read_at`], [`write_at`](BlockFile::write_at),
//!    [`read`](BlockFile::read), [`write`](BlockFile::write), [`submit`](BlockFile::submit)):
//!    each states how it is answered ([`Reply`]: returned, or a [`Callback`]).
//! 2. **Checks** ([`BlockFile::run`]): the engine accepts requests (shutdown, owner thread),
//!    buffer length, capacity, read-only; on a poller thread, whatever would wait is refused.
//! 3. **Range lock** on the request's pages (see [`rangelock`](crate::embed::rangelock)):
//!    tried on a poller, polled for in run-to-completion mode, parked for otherwise. Polled
//!    for, it is refused ([`EmbedError::WouldDeadlock`]) when nothing is in flight any more
//!    and the range is still held: a request lower on this thread's stack holds it (its poll
//!    ran the callback that issued this request), and it returns only after this one.
//! 4. **Split** ([`BlockFile::read_locked`], [`BlockFile::write_locked`]): what goes through
//!    the page cache (heap buffers, unaligned head and tail, the zeroes of a gap) and what goes
//!    directly to the device (the block-aligned middle of a DMA buffer). A direct write first
//!    invalidates the cached pages it overlaps, without the cache's directory lock when the
//!    file has no page cached.
//! 5. **dio-core** ([`BlockFile::direct`]): a synchronous request waits in
//!    `IoCtx::submit_sync_mut`, its range guard and its buffer's [`Frame`] on the stack (the
//!    [`Window`] dio-core borrows points at that frame: [`Frame::lend`]); an asynchronous one
//!    goes through
//!    `IoCtx::submit_async_reserved` with a plain function (SPDK's `cb_fn`/`cb_arg` shape,
//!    `dio-core/DESIGN.md §3.7`) on the dio-core request state it reserved when it entered.
//!    Its context ([`Context`]: the buffer, the held range, the byte accounting, what the
//!    error names, the user's callback stored inline) is a box kept in that state's user slot
//!    between requests (dio-core's `Slot`), whose pointer is the request's [`Window`]. The
//!    file's dio-cores are typed with its concrete block map (`DioCore<Window, ExtentMapper>`),
//!    so that the map of each bio is inlined into dio-core's walk rather than a virtual call.
//! 6. **Completion** ([`direct_done`], where the request finished: the poller, or the
//!    submitter's stack): unlock the range (it covers the I/O, not the callback); with
//!    deferred completions, hand the rest to the deferral thread. Then ([`deliver_with`]) zero
//!    what a read clamped at the end of file left, compute the result, and run the callback:
//!    with a state's slot lent, in place in the context, which then goes back into the slot
//!    (the state stays out of dio-core's pool until then); without one (a request finished on
//!    its submitter's stack, or deferred), taken out, the context going back to the file's
//!    pool first.
//! 7. **User callback** ([`run_callback`], [`run_guarded`]): run once, a panic caught and
//!    logged.
//!
//! # Costs
//! In the steady state no step allocates on the direct path (a synchronous or asynchronous
//! request with a DMA buffer, block aligned): the callback is stored inline unless it is large
//! (see [`callback`](super::callback)), the context box is reused (allocated only while
//! dio-core's state pool and the file's context pool warm up). Why a box rather than the
//! context inline in the `Window`: dio-core moves the `Window` by value a dozen times per
//! request, and the context (about 150 bytes) made each move a call to `memcpy`: measured, +470
//! instructions per synchronous read, more than the allocations it saved. For the same reason
//! the window is one word (see [`Window`]): an asynchronous request's buffer (seven words)
//! moves into its context once when it reaches dio-core and out once at its completion, and
//! a synchronous request's stays in a frame on its submitter's stack, which the window points
//! at; measured (count profile, per 4 KiB read), the window of the buffer and one word before:
//! QD32 2158 -> 2077, QD1 synchronous 2101 -> 2080. Why in dio-core's state rather than in a
//! pool of the file: an asynchronous request at QD32 passed two lock-free pools (dio-core's
//! states and the file's contexts), each a compare-and-swap to take and one to give back; with
//! the context kept in the state's slot it passes one. The fields of a context that are empty
//! between requests (the callback, the reservation, the state's slot it goes back to) are
//! written without dropping the `None` they replace (measured, QD32: 1829.8 -> 1818.8).
//!
//! No step takes a lock shared by client threads when the request overlaps no other request
//! and no cached page: the range lock is per-stripe atomics, the page cache is skipped
//! when the file has nothing cached, and dio-core's state pool is lock free. An asynchronous
//! request's context holds an `Arc` of [`Shared`] (the file may be dropped while the request
//! is in flight), and keeps it in its dio-core state's slot between requests: in the steady
//! state no request touches that count (measured, QD32: 2279 -> 2268 instructions per read).

use std::mem::ManuallyDrop;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crossbeam_queue::ArrayQueue;

use dio_core::{
    Completion, DioCore, DioError, DioRequest, DioResult, Dir, Mode, Reserved, Slot, Submitted,
};

use super::callback::Callback;
use super::maint::Spares;
use super::{BlockFile, Completed, EngineRef, ExtentMapper, Inner, Refused, Request};
use crate::embed::cache::PAGE;
use crate::embed::error::{EmbedError, EmbedResult, Op};
use crate::embed::iobuf::{Frame, IoBuffer, Window};
use crate::embed::poller::{Local, Pollers};
use crate::embed::rangelock::{Held, LockWait, RangeGuard, RangeLock};

// ---------------------------------------------------------------------------------------------
// 1. Entry.

/// How a request is answered.
pub(super) enum Reply {
    /// Returned to the caller.
    Sync,
    /// Through the user's callback, written into the request's context when the request
    /// entered: neither the callback nor the context is moved again (a callback is up to 56
    /// bytes; this variant is one pointer). The context comes from the user slot of the
    /// dio-core request state reserved for the request (from the file's own pool only when
    /// that slot is empty), holds that reservation until dio-core takes it, and goes back into
    /// the state's slot when dio-core completes the request.
    Async(Box<Context>),
}

/// A borrowed buffer of a synchronous call (copied through the cache).
pub(super) enum Slice<'a> {
    Read(&'a mut [u8]),
    Write(&'a [u8]),
}

impl Slice<'_> {
    fn len(&self) -> usize {
        match self {
            Slice::Read(b) => b.len(),
            Slice::Write(b) => b.len(),
        }
    }
}

/// What a request returns on its caller's stack: `Some((result, buf))` for a synchronous
/// request or a refused asynchronous one, `None` when the callback owns the outcome.
type Answer = Option<(EmbedResult<usize>, IoBuffer)>;

impl BlockFile {
    /// Read into `buf` at `offset`, synchronously; returns the bytes read (short at `len`).
    /// Any memory: copied through the page cache. For zero copy, use [`read`](Self::read) with
    /// a DMA buffer.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> EmbedResult<usize> {
        let n = buf.len();
        let slice = Some(Slice::Read(buf));
        let heap = IoBuffer::Heap(Vec::new());
        sync_answer(self.run(Op::Read, offset, n, heap, Reply::Sync, slice)).0
    }

    /// Write `buf` at `offset`, synchronously; returns the bytes written. Any memory: copied
    /// through the page cache (write-through). For zero copy, use [`write`](Self::write).
    pub fn write_at(&self, buf: &[u8], offset: u64) -> EmbedResult<usize> {
        let n = buf.len();
        let slice = Some(Slice::Write(buf));
        let heap = IoBuffer::Heap(Vec::new());
        sync_answer(self.run(Op::Write, offset, n, heap, Reply::Sync, slice)).0
    }

    /// Read `len` bytes at `offset` into an owned buffer, synchronously (zero copy for the
    /// block-aligned part of a DMA buffer).
    pub fn read(
        &self,
        buf: impl Into<IoBuffer>,
        offset: u64,
        len: usize,
    ) -> (EmbedResult<usize>, IoBuffer) {
        sync_answer(self.run(Op::Read, offset, len, buf.into(), Reply::Sync, None))
    }

    /// Write the first `len` bytes of an owned buffer at `offset`, synchronously (zero copy for
    /// the block-aligned part of a DMA buffer).
    pub fn write(
        &self,
        buf: impl Into<IoBuffer>,
        offset: u64,
        len: usize,
    ) -> (EmbedResult<usize>, IoBuffer) {
        sync_answer(self.run(Op::Write, offset, len, buf.into(), Reply::Sync, None))
    }

    /// Submit asynchronously. `Ok(())`: `cb` runs exactly once (on a poller thread, or on the
    /// deferral thread, or before `submit` returns when the request finished synchronously:
    /// a write past `len`, an unaligned or heap-buffer request). `Err`: `cb` never runs.
    ///
    /// A panic of `cb` is caught and logged (it must not kill the poller it runs on); the
    /// request still counts as completed. A small closure (up to six pointers of captures,
    /// e.g. an `Arc` and an index, or a channel sender and a tag) costs no allocation.
    pub fn submit(
        &self,
        req: Request,
        cb: impl FnOnce(Completed) + Send + 'static,
    ) -> Result<(), Box<Refused>> {
        let ctx = Context::with_callback(&self.inner, cb);
        let reply = Reply::Async(ctx);
        match self.run(req.op, req.offset, req.len, req.buf, reply, None) {
            None => Ok(()),
            Some((Err(error), buf)) => Err(Box::new(Refused { error, buf })),
            Some((Ok(_), buf)) => {
                // Not reachable (an accepted asynchronous request answers through its
                // callback); should it happen, refuse rather than panic or lose the buffer.
                log::error!("an asynchronous request was answered on the caller's stack");
                let error = EmbedError::Config("internal: asynchronous request answered inline");
                Err(Box::new(Refused { error, buf }))
            }
        }
    }
}

/// The answer of a synchronous request (always `Some`: a synchronous request has no callback).
fn sync_answer(a: Answer) -> (EmbedResult<usize>, IoBuffer) {
    a.unwrap_or_else(|| {
        log::error!("a synchronous request was not answered on the caller's stack");
        let e = EmbedError::Config("internal: synchronous request not answered");
        (Err(e), IoBuffer::Heap(Vec::new()))
    })
}

// ---------------------------------------------------------------------------------------------
// 2. Checks.

/// Leaves the engine when a request's submission phase ends.
struct Entered<'a>(Option<&'a Pollers>);

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        if let Some(p) = self.0 {
            p.leave();
        }
    }
}

// The block size (`2^LBADS`) and the page size are powers of two: masks, not divisions (a
// 64-bit division costs tens of cycles, several per request).

/// `x % a`, for a power of two `a`.
#[inline(always)]
fn rem(x: u64, a: u64) -> u64 {
    debug_assert!(a.is_power_of_two());
    x & (a - 1)
}

#[inline(always)]
fn round_down(x: u64, a: u64) -> u64 {
    x - rem(x, a)
}

/// Only for `x` at most the capacity (no overflow).
#[inline(always)]
fn round_up(x: u64, a: u64) -> u64 {
    match rem(x, a) {
        0 => x,
        r => x + (a - r),
    }
}

impl BlockFile {
    /// The whole request, from the checks to the answer. Inlined into each entry point (and
    /// [`direct`](Self::direct) into its two callers): the reply, the slice and often the
    /// operation are then constants there, and the request's arguments are not moved through
    /// two more calls; measured (count profile), 2166 -> 2085 instructions per synchronous
    /// read and 2425 -> 2346 per asynchronous one at QD32.
    #[inline(always)]
    fn run(
        &self,
        op: Op,
        offset: u64,
        len: usize,
        buf: IoBuffer,
        reply: Reply,
        slice: Option<Slice<'_>>,
    ) -> Answer {
        // A refused asynchronous request's context goes back to the pool (its callback, never
        // to run, is dropped): a refusal costs no allocation.
        let refuse = |e: EmbedError, buf: IoBuffer, reply: Reply| {
            if let Reply::Async(ctx) = reply {
                drop(ctx.recycle());
            }
            Some((Err(e), buf))
        };
        let _entered = match &self.inner.engine {
            EngineRef::Pooled(p) => {
                if !p.enter() {
                    return refuse(EmbedError::ShutDown, buf, reply);
                }
                Entered(Some(p))
            }
            EngineRef::Local(l) => {
                if !l.on_owner() {
                    return refuse(EmbedError::WrongThread, buf, reply);
                }
                Entered(None)
            }
        };
        let inner = &*self.inner;
        let len64 = len as u64;
        let buf_len = slice.as_ref().map_or(buf.len(), Slice::len);
        if len > buf_len {
            let e = EmbedError::ShortBuffer {
                op,
                offset,
                len: len64,
                buf_len,
            };
            return refuse(e, buf, reply);
        }
        // Built only when refused (an error built and dropped costs every request).
        let beyond = || EmbedError::BeyondCapacity {
            op,
            offset,
            len: len64,
            capacity: inner.capacity,
        };
        let Some(end) = offset.checked_add(len64) else {
            return refuse(beyond(), buf, reply);
        };
        if op == Op::Write {
            if !inner.writable {
                return refuse(EmbedError::ReadOnly { offset }, buf, reply);
            }
            if end > inner.capacity {
                return refuse(beyond(), buf, reply);
            }
        }
        // A read stops at `len`, which never exceeds the capacity: nothing past it is read,
        // locked or rounded (an offset near `u64::MAX` must not overflow the page rounding).
        if op == Op::Read && offset >= inner.capacity {
            return self.finish(reply, None, Ok(0), buf, (op, offset, len64));
        }
        let end = end.min(inner.capacity);
        let bs = inner.block;
        let size = inner.state().size_now();
        // On a poller thread nothing may wait: only what dio-core can queue at once.
        let on_poller = inner.engine.on_poller();
        if on_poller {
            let why = if matches!(reply, Reply::Sync) {
                Some("a synchronous call")
            } else if !buf.is_dma() {
                Some("a heap buffer goes through the page cache")
            } else if !buf.is_dma_of(&inner.dma) {
                Some("a buffer of another controller's memory goes through the page cache")
            } else if rem(offset, bs) != 0 || rem(len64, bs) != 0 || len == 0 {
                Some("an unaligned request goes through the page cache")
            } else if op == Op::Write && end > size {
                Some("a write past the end of the file is synchronous")
            } else if buf.as_slice().as_ptr() as usize % 4 != 0 {
                Some("the buffer address is not dword aligned")
            } else {
                None
            };
            if let Some(why) = why {
                return refuse(
                    EmbedError::WouldBlockOnPoller { op, offset, why },
                    buf,
                    reply,
                );
            }
        }
        if len == 0 {
            return self.finish(reply, None, Ok(0), buf, (op, offset, 0));
        }

        // 3. The range lock, on whole pages; a write also covers the gap it may zero.
        let lo = if op == Op::Write {
            offset.min(size)
        } else {
            offset
        };
        let range = round_down(lo, PAGE)..round_up(end, PAGE);
        let exclusive = op == Op::Write;
        let guard = if on_poller {
            match inner.shared.locks.try_lock(range, exclusive) {
                Some(g) => g,
                None => {
                    let why = "it overlaps a request in flight";
                    return refuse(
                        EmbedError::WouldBlockOnPoller { op, offset, why },
                        buf,
                        reply,
                    );
                }
            }
        } else {
            let locked = match &inner.engine {
                // Polling for the holder's completion; when nothing is in flight any more, the
                // holder is a request below us on this thread's stack: refuse, never hang.
                EngineRef::Local(l) => {
                    let poll = || l.poll_once() > 0 || l.in_flight();
                    inner
                        .shared
                        .locks
                        .lock(range, exclusive, LockWait::Poll(&poll))
                }
                EngineRef::Pooled(_) => inner.shared.locks.lock(range, exclusive, LockWait::Park),
            };
            match locked {
                Some(g) => g,
                None => {
                    let e = EmbedError::WouldDeadlock {
                        op,
                        offset,
                        len: len64,
                    };
                    return refuse(e, buf, reply);
                }
            }
        };
        match op {
            Op::Read => self.read_locked(offset, len64, buf, reply, slice, guard),
            Op::Write => self.write_locked(offset, len64, buf, reply, slice, guard),
        }
    }

    // -----------------------------------------------------------------------------------------
    // 4. Split.

    /// Inlined into [`run`](Self::run), its one caller: the request's arguments are not
    /// moved once more (about 20 instructions per read).
    #[inline(always)]
    fn read_locked(
        &self,
        offset: u64,
        len: u64,
        mut buf: IoBuffer,
        reply: Reply,
        slice: Option<Slice<'_>>,
        guard: RangeGuard<'_>,
    ) -> Answer {
        let inner = &*self.inner;
        let state = inner.state();
        let (file, cache, store) = (&state.cfile, &state.cache, &state.store);
        let what = (Op::Read, offset, len);
        let err = |e| EmbedError::from_dio(e, Op::Read, offset, len);
        let size = state.size_now();
        if offset >= size {
            return self.finish(reply, Some(guard), Ok(0), buf, what);
        }
        let end = (offset + len).min(size);
        let n = end - offset;
        let bs = inner.block;
        let h = if rem(offset, bs) != 0 {
            (round_up(offset, bs) - offset).min(n)
        } else {
            0
        };
        // An unaligned tail that the request's block-aligned span still covers (the file ends
        // inside its last block) is read directly too: dio-core clamps the count at EOF, and no
        // cache read runs (a cache miss would wait for the device, which on a poller thread is
        // its own queue: a hang). Only if that block starts inside the request: when the file
        // ends in the request's first block, that block is the head (read from the cache), and
        // there is no direct part (its start, `offset + h` = `end`, would not be aligned).
        let tail_end = round_up(end, bs);
        let b = if rem(end, bs) != 0
            && round_down(end, bs) >= offset
            && tail_end <= offset + len
            && tail_end as usize - offset as usize <= buf.len()
        {
            tail_end
        } else {
            round_down(end, bs)
        };
        let (a, b) = (offset + h, b.max(offset + h));
        let direct = slice.is_none()
            && b > a
            && buf.is_dma_of(&inner.dma)
            && (buf.as_slice().as_ptr() as usize + h as usize) % 4 == 0;
        debug_assert!(
            !direct || (rem(a, bs) == 0 && rem(b, bs) == 0),
            "direct span {a}..{b}"
        );
        if !direct {
            let out: &mut [u8] = match slice {
                Some(Slice::Read(s)) => &mut s[..n as usize],
                _ => &mut buf.as_mut_slice()[..n as usize],
            };
            let r = cache
                .read(file, store, offset, out)
                .map(|_| n as usize)
                .map_err(err);
            return self.finish(reply, Some(guard), r, buf, what);
        }
        // Head and tail through the cache first, then the middle directly.
        let out = buf.as_mut_slice();
        let mut r = Ok(());
        if h > 0 {
            r = cache.read(file, store, offset, &mut out[..h as usize]);
        }
        if r.is_ok() && end > b {
            let at = (b - offset) as usize;
            r = cache.read(file, store, b, &mut out[at..n as usize]);
        }
        if let Err(e) = r {
            return self.finish(reply, Some(guard), Err(err(e)), buf, what);
        }
        let acct = Accounting {
            op: Op::Read,
            offset,
            len,
            pre: h,
            want: b - a,
            total: n,
        };
        self.direct(acct, a, buf, reply, guard)
    }

    fn write_locked(
        &self,
        offset: u64,
        len: u64,
        buf: IoBuffer,
        reply: Reply,
        slice: Option<Slice<'_>>,
        guard: RangeGuard<'_>,
    ) -> Answer {
        let inner = &*self.inner;
        let state = inner.state();
        let (file, cache, store) = (&state.cfile, &state.cache, &state.store);
        let what = (Op::Write, offset, len);
        let err = |e| EmbedError::from_dio(e, Op::Write, offset, len);
        let end = offset + len;
        // Zero the gap between the old end of file and this write (locked: see `run`).
        let size = state.size_now();
        if offset > size {
            static ZEROES: [u8; 65536] = [0; 65536];
            let mut pos = size;
            while pos < offset {
                let n = (offset - pos).min(ZEROES.len() as u64);
                if let Err(e) = cache.write(file, store, pos, &ZEROES[..n as usize]) {
                    return self.finish(reply, Some(guard), Err(err(e)), buf, what);
                }
                pos += n;
            }
        }
        let bs = inner.block;
        let h = if rem(offset, bs) != 0 {
            (round_up(offset, bs) - offset).min(len)
        } else {
            0
        };
        let direct = slice.is_none()
            && h < len
            && buf.is_dma_of(&inner.dma)
            && (buf.as_slice().as_ptr() as usize + h as usize) % 4 == 0;
        if !direct {
            let data: &[u8] = match &slice {
                Some(Slice::Write(s)) => &s[..len as usize],
                _ => &buf.as_slice()[..len as usize],
            };
            let r = cache.write(file, store, offset, data).map_err(err);
            if r.is_ok() {
                state.extend(end);
            }
            return self.finish(reply, Some(guard), r.map(|_| len as usize), buf, what);
        }
        if h > 0 {
            if let Err(e) = cache.write(file, store, offset, &buf.as_slice()[..h as usize]) {
                return self.finish(reply, Some(guard), Err(err(e)), buf, what);
            }
        }
        // Direct I/O: drop the cached pages it overlaps (write-through: nothing to write back).
        // Without the directory lock when the file has no page cached (`PageCache::invalidate`
        // says why that is race-free under our exclusive range lock).
        cache.invalidate(file, offset + h..end);
        let acct = Accounting {
            op: Op::Write,
            offset,
            len,
            pre: h,
            want: len - h,
            total: len,
        };
        self.direct(acct, offset + h, buf, reply, guard)
    }
}

// ---------------------------------------------------------------------------------------------
// 5. dio-core.

/// The bytes of a request and how its direct part's count becomes its result.
#[derive(Clone, Copy, Debug)]
struct Accounting {
    /// What the error names: the request as the user gave it.
    op: Op,
    offset: u64,
    len: u64,
    /// Bytes done through the cache before the direct part (head).
    pre: u64,
    /// Bytes of the direct part.
    want: u64,
    /// Bytes reported when the direct part is done whole.
    total: u64,
}

impl Accounting {
    /// The accounting of a context not yet at dio-core (or back in the pool).
    const NONE: Accounting = Accounting {
        op: Op::Read,
        offset: 0,
        len: 0,
        pre: 0,
        want: 0,
        total: 0,
    };

    #[inline(always)]
    fn result(&self, r: DioResult) -> EmbedResult<usize> {
        match r {
            Ok(m) if m == self.want => Ok(self.total as usize),
            Ok(m) => Ok((self.pre + m) as usize),
            Err(e) => Err(self.error(e)),
        }
    }

    fn error(&self, e: DioError) -> EmbedError {
        EmbedError::from_dio(e, self.op, self.offset, self.len)
    }

    /// A direct read clamped at EOF leaves device bytes past `len` in its last block: zero them
    /// (bytes at or past `len` are never returned).
    fn zero_short_read(&self, r: &DioResult, buf: &mut IoBuffer) {
        if let (Op::Read, Ok(m)) = (self.op, r) {
            if *m < self.want {
                let (from, to) = ((self.pre + m) as usize, (self.pre + self.want) as usize);
                let s = buf.as_mut_slice();
                let to = to.min(s.len());
                if from < to {
                    s[from..to].fill(0);
                }
            }
        }
    }
}

/// What a file shares with its requests in flight: the range lock, the pool of request
/// contexts, and the deferral of callbacks. An asynchronous request's context holds an `Arc`
/// of it (the file may be dropped while the request is in flight), also while it waits in a
/// dio-core state's slot for the state's next request, not while it is in the pool here.
pub(crate) struct Shared {
    pub(super) locks: RangeLock,
    /// Request contexts to reuse when the dio-core state a request reserved has none in its
    /// user slot (a new state), and that went back elsewhere than to a state's slot (a
    /// request that finished on its submitter's stack, or whose callback was deferred): a
    /// lock-free bounded queue. Empty: a new one is allocated (the warm-up); full: one is
    /// freed. In the steady state an asynchronous request touches no queue here: its context
    /// stays in the user slot of its dio-core state.
    contexts: ArrayQueue<Box<Context>>,
    /// With deferred completions: a dio-core (with the user's deferral hook) used only to
    /// carry a finished request's callback to the deferral thread in a pooled state, without
    /// allocating ([`DioCore::defer_completion`]). The file's own dio-core has no deferral:
    /// [`direct_done`] runs where the request finished, gives the range back there, and only
    /// then defers the callback (see [`direct_done`]).
    defer: Option<DioCore<Window, ExtentMapper>>,
    /// The DMA buffers of the maintenance operations (module `maint`).
    pub(super) spares: Spares,
    /// Contexts allocated because the pool was empty, and freed because it was full (cold
    /// paths only; what the tests check).
    fresh: AtomicUsize,
    freed: AtomicUsize,
}

/// Contexts kept per file: as many asynchronous direct requests in flight at once as this
/// allocate nothing.
const CONTEXTS: usize = 256;

impl Shared {
    /// `defer`: see [`Shared::defer`]; `spares`: see [`Shared::spares`].
    pub(super) fn new(
        capacity: u64,
        defer: Option<DioCore<Window, ExtentMapper>>,
        spares: Spares,
    ) -> Shared {
        Shared {
            locks: RangeLock::new(capacity),
            contexts: ArrayQueue::new(CONTEXTS),
            defer,
            spares,
            fresh: AtomicUsize::new(0),
            freed: AtomicUsize::new(0),
        }
    }

    /// A window owning a context from the pool (a new one when it is empty) that carries
    /// `buf`: how a maintenance operation hands dio-core its buffer (asynchronous or not) in
    /// one word. [`unload`](Self::unload) gives the buffer back, and the context to the pool.
    pub(super) fn carry(&self, buf: IoBuffer) -> Window {
        let mut ctx = self.contexts.pop().unwrap_or_else(|| Context::fresh(self));
        ctx.frame = Frame { buf, start: 0 };
        Window::owning(ctx)
    }

    /// The buffer a window of [`carry`](Self::carry) carried, its context back to the pool
    /// (dropped if the pool is full).
    pub(super) fn unload(&self, w: Window) -> IoBuffer {
        let Some(mut ctx) = w.into_context() else {
            // Not reached: `carry` made an owning window (a lent window's buffer stays in its
            // frame).
            debug_assert!(false, "a carried window owns no context");
            log::error!("a maintenance operation's window lost its buffer");
            return IoBuffer::Heap(Vec::new());
        };
        let buf = ctx.frame.take_buf();
        if let Err(extra) = self.contexts.push(ctx) {
            self.freed.fetch_add(1, Ordering::Relaxed);
            drop(extra);
        }
        buf
    }

    /// Contexts allocated (pool empty) and freed (pool full) so far.
    #[cfg(test)]
    fn pool_misses(&self) -> (usize, usize) {
        (
            self.fresh.load(Ordering::Relaxed),
            self.freed.load(Ordering::Relaxed),
        )
    }
}

/// The context of an asynchronous direct request, from its submission to its completion:
/// the request's buffer, the held range, the byte accounting, the user's callback (inline),
/// and the file's shared part (to unlock, and to give the context back). It lives in a pooled
/// box whose pointer is all the request's [`Window`] carries through dio-core (the buffer and
/// the context in the window itself would be copied at every move of the window, a dozen per
/// request). Also the carrier of a maintenance operation's buffer ([`Shared::carry`]).
#[repr(C)]
pub(crate) struct Context {
    /// The request's buffer while the request runs (an empty one otherwise): the first field,
    /// so that the window's pointer to the context is one to its frame (see [`Window`]).
    pub(crate) frame: Frame,
    /// The file's shared part: kept while the context waits in a dio-core state's user slot
    /// (no `Arc` count changes per request), `None` in the file's pool (which `Shared` owns:
    /// a context there holding it would be a cycle). No cycle through the slots: `Shared` does
    /// not own the file's dio-core, whose states hold those slots.
    shared: Option<Arc<Shared>>,
    /// Held by a request (between [`with_callback`](Self::with_callback) and its recycling).
    busy: bool,
    /// `None` once given back.
    held: Option<Held>,
    acct: Accounting,
    /// `None` once taken to run.
    cb: Option<Callback>,
    /// The dio-core request state reserved for the request (whose user slot the context came
    /// from and goes back to), until the request is submitted to dio-core.
    reserved: Option<Reserved<Window>>,
}

impl Drop for Context {
    /// A request refused by dio-core (or a context lost by mistake) still gives its range back;
    /// its callback, if still here, is dropped unrun.
    fn drop(&mut self) {
        if let (Some(s), Some(h)) = (&self.shared, self.held.take()) {
            s.locks.unlock(h);
        }
    }
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.busy {
            true => f
                .debug_struct("Context")
                .field("held", &self.held)
                .field("acct", &self.acct)
                .finish_non_exhaustive(),
            false => f.write_str("Context(free)"),
        }
    }
}

/// What a finished request's context held: its byte accounting and the user's callback.
type Taken = (Accounting, Option<Callback>);

impl Context {
    /// A context for a request with the user's callback, from the file's pool (allocated only
    /// when the pool is empty). Filled field by field in place: the context is larger than a
    /// few words, and every move of it by value is a call to `memcpy`. The range and the
    /// accounting are set when the request reaches dio-core ([`BlockFile::direct`]).
    #[inline(always)]
    fn with_callback<F: FnOnce(Completed) + Send + 'static>(inner: &Inner, cb: F) -> Box<Context> {
        // The file's own dio-core, whose states' slots hold only this file's contexts (the
        // cast below relies on it: hence no core as an argument).
        let (shared, core) = (&inner.shared, inner.io.core());
        let (reserved, slot) = core.reserve();
        let kept = match slot {
            Some(b) => {
                debug_assert!(b.is::<Context>(), "a state's slot holds a request context");
                // Not `downcast`, a call through the `Any` vtable per request (measured, QD32:
                // 2030 -> 2016 instructions per read).
                // SAFETY: `core` is the file's own dio-core (`Inner::io`, taken above from the
                // file, not given by the caller), and only this module
                // fills the user slots of its request states, each time with a `Box<Context>`
                // (`direct_done`, `Context::recycle`; dio-core never looks inside a slot, and
                // the other users of that core, the maintenance operations, lend no slot): this
                // box is a `Box<Context>` coerced to `dyn Any`, and casting its pointer back
                // (dropping the vtable) gives the same allocation with its own type and layout.
                Some(unsafe { Box::from_raw(Box::into_raw(b).cast::<Context>()) })
            }
            None => shared.contexts.pop(),
        };
        let mut b = match kept {
            Some(b) => b,
            None => Self::fresh(shared),
        };
        // Written without dropping what they replace: a context given back holds neither a
        // callback nor a reservation (`recycle_into` takes the callback, `direct` the
        // reservation), and an assignment would test the old `Option` for drop glue per
        // request. Forgetting a `None` is nothing; a `Some` (not reached) leaks, never frees
        // twice.
        debug_assert!(b.cb.is_none() && b.reserved.is_none());
        std::mem::forget(b.cb.replace(Callback::new(cb)));
        if b.shared.is_none() {
            // Only a context from the file's pool or a new one: one kept in a state's slot
            // still has it (the same file's: the state is of the file's own dio-core).
            b.shared = Some(Arc::clone(shared));
        }
        debug_assert!(b.shared.as_ref().is_some_and(|s| Arc::ptr_eq(s, shared)));
        b.busy = true;
        std::mem::forget(b.reserved.replace(reserved));
        b
    }

    /// A new context (the warm-up).
    #[cold]
    #[inline(never)]
    fn fresh(shared: &Shared) -> Box<Context> {
        shared.fresh.fetch_add(1, Ordering::Relaxed);
        Box::new(Context {
            frame: Frame::empty(),
            shared: None,
            busy: false,
            held: None,
            acct: Accounting::NONE,
            cb: None,
            reserved: None,
        })
    }

    /// Give the range back now (the range lock covers the I/O, not the callback).
    #[inline(always)]
    fn unlock(&mut self) {
        if let (Some(s), Some(h)) = (&self.shared, self.held.take()) {
            s.locks.unlock(h);
        }
    }

    /// The file's shared part if its callbacks are deferred (an `Arc` clone: deferred mode).
    #[inline(always)]
    fn deferred(&self) -> Option<Arc<Shared>> {
        self.shared.as_ref().filter(|s| s.defer.is_some()).cloned()
    }

    /// Give the range back, empty the context, and return the accounting and the callback
    /// (`None` if the context was not held by a request). The context goes back into the slot
    /// of the dio-core state it still holds (a request that did not reach dio-core), which
    /// goes back to dio-core's pool; else to the pool of its file.
    fn recycle(mut self: Box<Self>) -> Option<Taken> {
        match self.reserved.take() {
            Some(reserved) => {
                let mut slot = None;
                let taken = self.recycle_into(Some(&mut slot));
                reserved.release(slot);
                taken
            }
            None => self.recycle_into(None),
        }
    }

    /// [`recycle`](Self::recycle), keeping the context in `slot` (a dio-core request state's
    /// user slot, with its `Arc` of the file's shared part) if given, else in the file's pool
    /// (without it).
    #[inline(always)]
    fn recycle_into(mut self: Box<Self>, slot: Option<&mut Slot>) -> Option<Taken> {
        if !std::mem::replace(&mut self.busy, false) {
            return None;
        }
        self.unlock();
        let taken = (self.acct, self.cb.take());
        match slot {
            Some(s) => *s = Some(self),
            None => self.to_pool(),
        }
        Some(taken)
    }

    /// Into the file's pool, without the file's shared part (the pool is in it); full: dropped
    /// (more requests were in flight than the pool keeps).
    fn to_pool(mut self: Box<Self>) {
        let Some(shared) = self.shared.take() else {
            return;
        };
        if let Err(extra) = shared.contexts.push(self) {
            shared.freed.fetch_add(1, Ordering::Relaxed);
            drop(extra);
        }
    }
}

impl BlockFile {
    /// The direct part at file offset `at` (`buf[acct.pre..]`), sync or async.
    #[inline(always)]
    fn direct(
        &self,
        acct: Accounting,
        at: u64,
        buf: IoBuffer,
        reply: Reply,
        guard: RangeGuard<'_>,
    ) -> Answer {
        let dir = match acct.op {
            Op::Read => Dir::Read,
            Op::Write => Dir::Write,
        };
        let start = acct.pre as usize;
        match reply {
            Reply::Sync => {
                // On this stack, lent to dio-core for the call.
                let mut frame = Frame { buf, start };
                // SAFETY: the window is only lent by `&mut` to `submit_sync_mut` (through
                // `dio_sync`), which does not move it out and returns normally only after every
                // bio of the request completed (see `Frame::lend`); it is given back right
                // after; the guard is declared after the frame.
                let (mut w, lent) = unsafe { frame.lend() };
                let r = self.dio_sync(dir, at, acct.want, &mut w);
                frame.end_lend(w, lent);
                drop(guard);
                acct.zero_short_read(&r, &mut frame.buf);
                Some((acct.result(r), frame.buf))
            }
            Reply::Async(mut ctx) => {
                ctx.held = guard.into_held();
                ctx.acct = acct;
                // The context's frame holds an empty buffer between requests (its buffer is taken
                // out at completion): forgotten rather than dropped, which was an out-of-line
                // call of `Frame`'s drop glue (measured, QD32: 2077 -> 2054 instructions per
                // read); an empty heap vector owns nothing, so nothing leaks.
                debug_assert!(matches!(&ctx.frame.buf, IoBuffer::Heap(v) if v.capacity() == 0));
                std::mem::forget(std::mem::replace(&mut ctx.frame, Frame { buf, start }));
                let reserved = ctx.reserved.take();
                let w = Window::owning(ctx);
                let req = DioRequest::new(dir, at, acct.want, w, Mode::Async);
                let io = &self.inner.io;
                let submitted = match reserved {
                    Some(r) => io.submit_async_reserved(r, req, direct_done),
                    // Not reached: every asynchronous context reserves a state.
                    None => io.submit_async_fn(req, |r, w| direct_done(r, w, None)),
                };
                match submitted {
                    Ok(Submitted::Queued | Submitted::Completed) => None,
                    Err((e, w)) => {
                        // Refused: the range is given back and the callback dropped unrun.
                        let Some(mut ctx) = w.into_context() else {
                            // Not reached: the window owns the context it was made with. Should
                            // it happen, the request is still answered (refused) here: `None`
                            // would promise a callback that never runs.
                            debug_assert!(false, "a refused window owns no context");
                            log::error!("a refused request lost its context and its buffer");
                            return Some((Err(acct.error(e)), IoBuffer::Heap(Vec::new())));
                        };
                        let buf = ctx.frame.take_buf();
                        drop(ctx.recycle());
                        Some((Err(acct.error(e)), buf))
                    }
                }
            }
        }
    }

    /// dio-core, synchronously, on the window in place (never moved: dio-core borrows it); in
    /// run-to-completion mode an exhausted pool is waited out by polling and retrying
    /// ([`dio_sync_retry`](Self::dio_sync_retry)).
    #[inline(always)]
    fn dio_sync(&self, dir: Dir, at: u64, len: u64, w: &mut Window) -> DioResult {
        match (
            &self.inner.engine,
            self.inner.io.submit_sync_mut(dir, at, len, w),
        ) {
            (EngineRef::Local(l), Err(DioError::QueueFull)) => {
                self.dio_sync_retry(l, dir, at, len, w)
            }
            (_, r) => r,
        }
    }

    /// The rare rest of [`dio_sync`](Self::dio_sync): poll, then submit again, until the pool
    /// has room.
    #[cold]
    #[inline(never)]
    fn dio_sync_retry(&self, l: &Local, dir: Dir, at: u64, len: u64, w: &mut Window) -> DioResult {
        loop {
            l.poll_once();
            match self.inner.io.submit_sync_mut(dir, at, len, w) {
                Err(DioError::QueueFull) => {}
                r => return r,
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 6. Completion.

/// dio-core's completion of an asynchronous direct request (`cb_fn`; its `cb_arg` is the
/// window's context): on the poller, or on the submitter's stack (a request dio-core finished
/// at once).
///
/// The range is given back here, before the user's callback runs or is deferred: it covers the
/// I/O, not the callback. A deferred callback that issues a request overlapping another one
/// whose completion is queued behind it on the deferral thread would otherwise wait for a job
/// that can only run after it returns (a deadlock of the deferral thread). Then, with deferred
/// completions, the callback goes to the deferral thread in a pooled dio-core state
/// ([`deliver`] runs there); otherwise it runs here.
///
/// `slot`: the user slot of the request's dio-core state, where the context stays for the
/// state's next request (`None` when the request finished on the submitter's stack: the
/// context goes back to the file's pool).
fn direct_done(r: DioResult, w: Window, slot: Option<&mut Slot>) {
    let Some(mut ctx) = w.into_context() else {
        log::error!("a direct request completed without its context; its callback is lost");
        return;
    };
    ctx.unlock();
    if let Some(shared) = ctx.deferred() {
        defer(shared, ctx, r);
        return;
    }
    deliver_with(ctx, r, slot);
}

/// Hand a finished request (its range given back) to the deferral thread, where [`deliver`]
/// runs.
#[cold]
#[inline(never)]
fn defer(shared: Arc<Shared>, ctx: Box<Context>, r: DioResult) {
    let w = Window::owning(ctx);
    match &shared.defer {
        Some(d) => d.defer_completion(Completion::from_fn(deliver), r, w),
        None => deliver(r, w),
    }
}

/// Give the context back to the pool, compute the result, run the user's callback (on the
/// deferral thread).
fn deliver(r: DioResult, w: Window) {
    let Some(ctx) = w.into_context() else {
        log::error!("a direct request completed without its context; its callback is lost");
        return;
    };
    deliver_with(ctx, r, None);
}

#[inline(always)]
fn deliver_with(mut ctx: Box<Context>, r: DioResult, slot: Option<&mut Slot>) {
    if !std::mem::replace(&mut ctx.busy, false) {
        log::error!("a direct request completed with a free context; its callback is lost");
        return;
    }
    // The range was given back (by `direct_done`, before any deferral).
    debug_assert!(ctx.held.is_none());
    let acct = ctx.acct;
    acct.zero_short_read(&r, &mut ctx.frame.buf);
    let c = Completed {
        result: acct.result(r),
        buf: ctx.frame.take_buf(),
    };
    let (op, offset, len) = (acct.op, acct.offset, acct.len);
    // Wrapped where it is built: wrapping it later was a copy of it (measured, QD32: 2054 ->
    // 2030 instructions per read).
    let mut c = ManuallyDrop::new(c);
    match slot {
        // The state whose slot this is stays out of dio-core's pool until this returns (a
        // request the callback submits takes another one): the callback runs in place, in the
        // context, which then goes into the slot.
        Some(s) => {
            // SAFETY: `c` was just wrapped and is valid; `call_in` consumes it, and it is never
            // used again (nor dropped: `ManuallyDrop`), whether the callback returns or panics.
            let run = || unsafe { Callback::call_in(&mut ctx.cb, &mut c) };
            run_guarded(run, op, offset, len);
            // The slot is empty while its state runs a request (`with_callback` took the
            // context out): written without testing it for drop glue, as there.
            debug_assert!(s.is_none());
            std::mem::forget(s.replace(ctx));
        }
        // Into the file's pool first: the callback may submit again.
        None => {
            let c = ManuallyDrop::into_inner(c);
            let cb = ctx.cb.take();
            ctx.to_pool();
            if let Some(cb) = cb {
                run_callback(cb, c, op, offset, len);
            }
        }
    }
}

impl BlockFile {
    /// Answer a request that did not go through dio-core's completion path (a cache request,
    /// an empty one, an error found before dio-core).
    fn finish(
        &self,
        reply: Reply,
        guard: Option<RangeGuard<'_>>,
        result: EmbedResult<usize>,
        buf: IoBuffer,
        (op, offset, len): (Op, u64, u64),
    ) -> Answer {
        drop(guard);
        match reply {
            Reply::Sync => Some((result, buf)),
            Reply::Async(ctx) => {
                // The context goes back to its state's slot; its callback runs here (or is
                // deferred).
                let Some((_, Some(cb))) = ctx.recycle() else {
                    log::error!("a request's context lost its callback; the callback is lost");
                    return None;
                };
                let c = Completed { result, buf };
                match &self.inner.deferral {
                    Some(d) => d.defer(Box::new(move || run_callback(cb, c, op, offset, len))),
                    None => run_callback(cb, c, op, offset, len),
                }
                None
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 7. User callback.

/// Run the user's callback. A panic must not kill the poller it runs on (its bios in flight
/// would never complete): it is caught and logged, and the request counts as completed.
#[inline(always)]
fn run_callback(cb: Callback, c: Completed, op: Op, offset: u64, len: u64) {
    run_guarded(move || cb.call(c), op, offset, len);
}

/// [`run_callback`]'s guard around `run` (which runs the user's callback).
#[inline(always)]
fn run_guarded(run: impl FnOnce(), op: Op, offset: u64, len: u64) {
    if let Err(p) = catch_unwind(AssertUnwindSafe(run)) {
        let msg = p
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| p.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(not a string)");
        log::error!(
            "the completion callback of the {op} of {len} bytes at offset {offset} panicked \
             ({msg}); the panic was caught, the poller goes on"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A window owning a context: it reaches the buffer and start in the context's frame,
    /// `into_context` gives the context back with its buffer, and a window dropped owning its
    /// context gives the range back and drops the callback unrun.
    #[test]
    fn a_window_owns_its_context() {
        let shared = Arc::new(Shared::new(64 * PAGE, None, Spares::empty()));
        let runs = Arc::new(AtomicUsize::new(0));
        let pending = |shared: &Arc<Shared>, runs: &Arc<AtomicUsize>| {
            let held = shared.locks.try_lock(0..PAGE, true).unwrap().into_held();
            let runs = Arc::clone(runs);
            let acct = Accounting {
                op: Op::Read,
                offset: 0,
                len: 10,
                pre: 0,
                want: 10,
                total: 10,
            };
            let cb = Callback::new(move |_c: Completed| {
                runs.fetch_add(1, Ordering::SeqCst);
            });
            let mut ctx = Context::fresh(shared);
            ctx.cb = Some(cb);
            ctx.shared = Some(Arc::clone(shared));
            ctx.busy = true;
            ctx.held = held;
            ctx.acct = acct;
            ctx
        };
        let mut ctx = pending(&shared, &runs);
        ctx.frame = Frame {
            buf: IoBuffer::Heap((0..=255).chain(0..44).collect()),
            start: 100,
        };
        let w = Window::owning(ctx);
        assert_eq!(std::mem::size_of_val(&w), std::mem::size_of::<usize>());
        assert_eq!(w.frame().start, 100);
        assert_eq!(w.bytes().len(), 200);
        assert_eq!(w.bytes()[0], 100);
        assert!(
            shared.locks.try_lock(0..1, false).is_none(),
            "the range is held"
        );
        let mut ctx = w.into_context().expect("owned");
        assert_eq!(ctx.frame.start, 100);
        let buf = ctx.frame.take_buf();
        assert_eq!((buf.len(), buf.as_slice()[100]), (300, 100));
        assert_eq!(ctx.frame.buf.len(), 0, "an empty buffer left in its place");
        drop(ctx.recycle());
        assert!(shared.locks.try_lock(0..1, false).is_some(), "given back");
        // Dropped while owned.
        let mut ctx = pending(&shared, &runs);
        ctx.frame.buf = IoBuffer::Heap(vec![7; 300]);
        ctx.frame.start = 3;
        drop(Window::owning(ctx));
        assert!(
            shared.locks.try_lock(0..1, true).is_some(),
            "given back on drop"
        );
        assert_eq!(runs.load(Ordering::SeqCst), 0, "no callback ran");
        assert_eq!(Arc::strong_count(&runs), 1, "both callbacks were dropped");
        assert_eq!(Arc::strong_count(&shared), 1, "no context holds the file");
    }

    use crate::bus::emulated::{EmulatedConfig, EmulatedController, Mode as Emu, NamespaceConfig};
    use crate::nvme::qpair::QueueOptions;
    use crate::{CompletionThread, Dioxide, FileOptions, Nsid, Request};
    use std::sync::Mutex;
    use std::sync::atomic::AtomicBool;
    use std::sync::mpsc::channel;

    fn ctrl() -> crate::Controller {
        let emu = EmulatedController::new(EmulatedConfig {
            mode: Emu::Inline,
            namespaces: vec![NamespaceConfig::memory(512, 1 << 14)],
            ..EmulatedConfig::default()
        })
        .unwrap();
        crate::Controller::new(emu).unwrap()
    }

    /// A run-to-completion instance on [`ctrl`].
    fn rtc() -> Dioxide {
        Dioxide::builder()
            .controller(ctrl())
            .run_to_completion()
            .build()
            .unwrap()
    }

    fn open(dx: &Dioxide) -> BlockFile {
        dx.open_file(0, Nsid(1), FileOptions::new(0, 1 << 13).with_len(1 << 22))
            .unwrap()
    }

    /// Run to completion: a synchronous read polls for its bio; that poll runs the callback of
    /// another request, which writes into the page the read holds. The read can only return
    /// after the callback, so the write would wait forever: it is refused, and nothing hangs
    /// or stays locked.
    #[test]
    fn a_callback_overlapping_the_request_polling_below_it_is_refused_not_hung() {
        let _w = test_watchdog::arm(test_watchdog::UNIT);
        let dx = rtc();
        let file = open(&dx);
        let nested: Arc<Mutex<Option<EmbedResult<usize>>>> = Arc::default();
        let (f, n) = (file.clone(), nested.clone());
        let buf = file.alloc(PAGE as usize).unwrap();
        file.submit(Request::read(5 * PAGE, buf), move |c| {
            assert_eq!(c.result.unwrap(), PAGE as usize);
            *n.lock().unwrap() = Some(f.write_at(&[7; 100], 10));
        })
        .unwrap();
        let (r, _) = file.read(file.alloc(PAGE as usize).unwrap(), 0, PAGE as usize);
        assert_eq!(r.unwrap(), PAGE as usize);
        let got = nested.lock().unwrap().take().expect("the callback ran");
        assert!(
            matches!(
                got,
                Err(EmbedError::WouldDeadlock {
                    op: Op::Write,
                    offset: 10,
                    len: 100
                })
            ),
            "{got:?}"
        );
        assert_eq!(file.write_at(&[7; 100], 10).unwrap(), 100);
        let mut back = [0; 100];
        assert_eq!(file.read_at(&mut back, 10).unwrap(), 100);
        assert_eq!(back, [7; 100]);
    }

    /// Deferred completions: two reads finish; the callback of each (on the completion
    /// thread, one after the other) writes the other's page synchronously. Whichever runs
    /// first needs the other's range, which must be free already: its completion is queued
    /// behind the running callback on the same thread.
    #[test]
    fn a_deferred_callback_may_overlap_a_request_whose_callback_is_queued_behind_it() {
        let _w = test_watchdog::arm(test_watchdog::UNIT);
        let thread = CompletionThread::spawn("deferred-test").unwrap();
        let dx = Dioxide::builder()
            .controller(ctrl())
            .pollers([None])
            .deferred_completions(thread.clone())
            .build()
            .unwrap();
        let file = open(&dx);
        let go = Arc::new(AtomicBool::new(false));
        let (tx, rx) = channel();
        for (mine, other) in [(0, 1), (1, 0)] {
            let (f, go, tx) = (file.clone(), go.clone(), tx.clone());
            let buf = file.alloc(PAGE as usize).unwrap();
            file.submit(Request::read(mine * PAGE, buf), move |c| {
                assert_eq!(c.result.unwrap(), PAGE as usize);
                // Both requests are submitted before either callback goes on.
                while !go.load(Ordering::SeqCst) {
                    std::thread::yield_now();
                }
                tx.send(f.write_at(&[1; 10], other * PAGE)).unwrap();
            })
            .unwrap();
        }
        go.store(true, Ordering::SeqCst);
        for _ in 0..2 {
            assert_eq!(rx.recv().unwrap().unwrap(), 10);
        }
        drop(file);
        drop(dx);
        thread.stop();
    }

    /// Deferred completions: a callback that panics on the completion thread is caught there
    /// (the thread survives: the next callback runs on it, not inline on the poller), and the
    /// range of its request was given back all the same.
    #[test]
    fn a_panicking_deferred_callback_is_caught_on_the_completion_thread() {
        let _w = test_watchdog::arm(test_watchdog::UNIT);
        let thread = CompletionThread::spawn("deferred-panic").unwrap();
        let dx = Dioxide::builder()
            .controller(ctrl())
            .pollers([None])
            .deferred_completions(thread.clone())
            .build()
            .unwrap();
        let file = open(&dx);
        let (tx, rx) = channel();
        let buf = file.alloc(PAGE as usize).unwrap();
        file.submit(Request::write(0, buf), |_c| panic!("boom"))
            .unwrap();
        let buf = file.alloc(PAGE as usize).unwrap();
        file.submit(Request::read(0, buf), move |c| {
            let name = std::thread::current().name().map(str::to_string);
            tx.send((c.result.map_err(|e| e.to_string()), name))
                .unwrap();
        })
        .unwrap();
        let (r, name) = rx.recv().unwrap();
        assert_eq!(r.unwrap(), PAGE as usize);
        assert_eq!(name.as_deref(), Some("deferred-panic"));
        assert_eq!(
            file.write_at(&[3; 8], 0).unwrap(),
            8,
            "the range was given back"
        );
        drop(file);
        drop(dx);
        thread.stop();
    }

    /// A context kept in its dio-core state's slot between requests keeps its `Arc` of the
    /// file's shared part (no count change per request), and nothing there makes a cycle:
    /// once the file and the engine are dropped, the shared part is freed.
    #[test]
    fn contexts_kept_in_the_states_hold_the_file_without_a_cycle() {
        let _w = test_watchdog::arm(test_watchdog::UNIT);
        let dx = rtc();
        let file = open(&dx);
        let shared = Arc::downgrade(&file.inner.shared);
        let (tx, rx) = channel();
        for i in 0..4 {
            let tx = tx.clone();
            let buf = file.alloc(PAGE as usize).unwrap();
            file.submit(Request::read(i * PAGE, buf), move |c| {
                tx.send(c.result.unwrap()).unwrap()
            })
            .unwrap();
        }
        let mut done = 0;
        while done < 4 {
            dx.poll();
            while let Ok(n) = rx.try_recv() {
                assert_eq!(n, PAGE as usize);
                done += 1;
            }
        }
        // The file's own `Arc`, this upgrade, and at least one context in a state's slot.
        let held = Arc::strong_count(&shared.upgrade().unwrap());
        assert!(held > 2, "no context kept the shared part ({held})");
        drop(file);
        drop(dx);
        assert!(
            shared.upgrade().is_none(),
            "the file's shared part was not freed"
        );
    }

    /// More asynchronous direct requests in flight on one file than its own pool of request
    /// contexts keeps: the first round allocates a context per request (new dio-core states,
    /// empty slots), and each context stays in its dio-core state's user slot when its
    /// request completes (none goes to the file's pool, none is freed); every request
    /// completes exactly once with its own data, and the second round finds every context in
    /// the slots of the states it reserves (nothing allocated, nothing freed).
    #[test]
    fn more_requests_in_flight_than_the_context_pool_keeps() {
        let _w = test_watchdog::arm(test_watchdog::UNIT);
        const N: usize = CONTEXTS + 100;
        let dx = Dioxide::builder()
            .controller(ctrl())
            .run_to_completion()
            .queue(QueueOptions::default().with_entries(1024))
            .build()
            .unwrap();
        let file = open(&dx);
        let shared = Arc::clone(&file.inner.shared);
        let (tx, rx) = channel::<(usize, Completed)>();
        let round = |op: Op, bufs: Vec<(usize, IoBuffer)>| -> Vec<(usize, IoBuffer)> {
            // Submitted without polling: all N are in flight at once.
            for (i, b) in bufs {
                let tx = tx.clone();
                let req = Request {
                    op,
                    offset: i as u64 * PAGE,
                    len: PAGE as usize,
                    buf: b,
                };
                file.submit(req, move |c| tx.send((i, c)).unwrap()).unwrap();
            }
            let mut seen = vec![false; N];
            let mut back = Vec::new();
            while back.len() < N {
                dx.poll();
                while let Ok((i, c)) = rx.try_recv() {
                    assert_eq!(c.result.unwrap(), PAGE as usize);
                    assert!(
                        !std::mem::replace(&mut seen[i], true),
                        "{i} completed twice"
                    );
                    back.push((i, c.buf));
                }
            }
            back
        };
        let bufs = (0..N)
            .map(|i| {
                let mut b = file.alloc(PAGE as usize).unwrap();
                b.as_mut_slice().fill(i as u8);
                (i, IoBuffer::Dma(b))
            })
            .collect();
        let back = round(Op::Write, bufs);
        assert_eq!(
            shared.pool_misses(),
            (N, 0),
            "one per request, kept in the states"
        );
        let back = back
            .into_iter()
            .map(|(i, mut b)| {
                b.as_mut_slice().fill(0xee);
                (i, b)
            })
            .collect();
        for (i, b) in round(Op::Read, back) {
            assert!(b.as_slice().iter().all(|&x| x == i as u8), "page {i}");
        }
        assert_eq!(
            shared.pool_misses(),
            (N, 0),
            "the second round reused the contexts kept in the states"
        );
        assert!(rx.try_recv().is_err(), "a callback ran twice");
    }
}
