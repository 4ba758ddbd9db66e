//! A file on a namespace: a logical size (`len`) and a capacity on an LBA range, with
//! synchronous ([`BlockFile::read_at`], [`BlockFile::write_at`], [`BlockFile::read`],
//! [`BlockFile::write`]) and asynchronous ([`BlockFile::submit`]) I/O through dio-core.
//!
//! # How a request runs
//! 1. **Range lock** on the 4 KiB pages it touches (writes exclusive, reads shared); a write at
//!    or past `len` locks from `len` on, since it also zeroes the gap. See
//!    [`rangelock`](crate::embed::rangelock).
//! 2. **Split**: a heap buffer (or a DMA address that is not dword aligned) goes wholly through
//!    the page cache. Otherwise an unaligned head goes through the cache, the block-aligned
//!    middle directly to the device through dio-core, and the unaligned tail through the cache
//!    (a read) or dio-core's `Fallback` (a write: only the remainder is written buffered). A
//!    read whose buffer covers the whole block where the file ends reads that block directly
//!    too: dio-core clamps the count at `len` and the bytes past it are zeroed.
//! 3. **Coherency**: a direct write first invalidates the cached pages it overlaps (the cache is
//!    write-through, so there is nothing to write back); buffered writes reach the device before
//!    they return. Whatever path each request takes, the device holds the latest data.
//! 4. **Size**: reads stop at `len`; a write past `len` zeroes `[len, offset)` if there is a
//!    gap, is forced synchronous by dio-core, and raises `len` (calling the
//!    [`FileOptions::on_extend`] hook, where the appliance persists it) before anyone is told
//!    it finished.
//! 5. **Completion**: [`BlockFile::submit`] returns `Ok` and the callback runs exactly once, or
//!    returns the error and the callback never runs (DIO-CORE.md 3.7). The range lock is
//!    released just before the callback.
//!
//! # "Latest data"
//! Requests that touch a common 4 KiB page are serialised by the range lock in the order they
//! acquire it; each such request sees the effects of every request that released the lock
//! before it acquired it, and none of those that acquire it after it released it. So a read
//! returns, for every byte, the value of the last write to that byte that completed before the
//! read started, or of a write concurrent with the read, and a write is never seen half done by
//! an overlapping request. Bytes written by a write that failed are unspecified until they are
//! written again. Bytes at or past `len` are never returned.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use dio_core::{
    Completion, DioCore, DioError, DioRequest, DioResult, Dir, Extent, IoCtx, Mapper, Mode, Outcome,
};

use crate::bus::dma::DmaBuffer;
use crate::embed::cache::{PAGE, PageCache, PageIo};
use crate::embed::error::{EmbedError, EmbedResult, Op};
use crate::embed::iobuf::{IoBuffer, Window};
use crate::embed::poller::{Local, Pollers};
use crate::embed::rangelock::{LockWait, RangeGuard, RangeLock};
use crate::nvme::controller::Controller;
use crate::nvme::namespace::Namespace;

/// Called with the new length after a write raised it (before the write is reported done).
pub type ExtendHook = Arc<dyn Fn(u64) + Send + Sync>;

/// Where a file lives and how it starts.
#[derive(Clone)]
pub struct FileOptions {
    /// First LBA of the file's extent.
    pub first_lba: u64,
    /// Blocks in the extent; capacity = `blocks × block size`, a multiple of 4 KiB.
    pub blocks: u64,
    /// Initial logical size in bytes (persisted by the appliance), at most the capacity.
    pub len: u64,
    /// Whether writes are allowed.
    pub writable: bool,
    /// Called when a write raised `len`.
    pub on_extend: Option<ExtendHook>,
}

impl std::fmt::Debug for FileOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileOptions")
            .field("first_lba", &self.first_lba)
            .field("blocks", &self.blocks)
            .field("len", &self.len)
            .field("writable", &self.writable)
            .finish_non_exhaustive()
    }
}

impl FileOptions {
    /// A writable, empty file on `blocks` blocks from `first_lba`.
    pub fn new(first_lba: u64, blocks: u64) -> Self {
        FileOptions {
            first_lba,
            blocks,
            len: 0,
            writable: true,
            on_extend: None,
        }
    }
    /// With an initial length.
    pub fn with_len(mut self, len: u64) -> Self {
        self.len = len;
        self
    }
    /// Writable or read-only.
    pub fn writable(mut self, writable: bool) -> Self {
        self.writable = writable;
        self
    }
    /// With a hook called when `len` grows.
    pub fn on_extend(mut self, hook: impl Fn(u64) + Send + Sync + 'static) -> Self {
        self.on_extend = Some(Arc::new(hook));
        self
    }
}

/// An asynchronous request.
#[derive(Debug)]
pub struct Request {
    /// Read or write.
    pub op: Op,
    /// File offset (any byte).
    pub offset: u64,
    /// Bytes (at most `buf.len()`).
    pub len: usize,
    /// The buffer, handed back in [`Completed`] (or [`Refused`]).
    pub buf: IoBuffer,
}

impl Request {
    /// Read `buf.len()` bytes at `offset`.
    pub fn read(offset: u64, buf: impl Into<IoBuffer>) -> Self {
        let buf = buf.into();
        Request {
            op: Op::Read,
            offset,
            len: buf.len(),
            buf,
        }
    }
    /// Write `buf` at `offset`.
    pub fn write(offset: u64, buf: impl Into<IoBuffer>) -> Self {
        let buf = buf.into();
        Request {
            op: Op::Write,
            offset,
            len: buf.len(),
            buf,
        }
    }
    /// Only the first `len` bytes of the buffer.
    pub fn with_len(mut self, len: usize) -> Self {
        self.len = len;
        self
    }
}

/// How an asynchronous request ended: bytes transferred (a read stops at `len`) or the error,
/// and the buffer.
#[derive(Debug)]
pub struct Completed {
    /// Bytes transferred.
    pub result: EmbedResult<usize>,
    /// The request's buffer.
    pub buf: IoBuffer,
}

/// A request refused at submission: its callback will never run.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct Refused {
    /// Why.
    #[source]
    pub error: EmbedError,
    /// The buffer, handed back.
    pub buf: IoBuffer,
}

/// File offset to LBA on the file's extent (the `get_block` of this "file system": one
/// contiguous preallocated extent, never a hole). Past the capacity is an error.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ExtentMapper {
    pub first_lba: u64,
    pub shift: u32,
    pub capacity: u64,
    /// Largest bio: the controller's maximum transfer, so the queue pair never splits.
    pub max_bio: u64,
}

impl Mapper for ExtentMapper {
    fn map(&self, off: u64, len: u64, _dir: Dir, _may_alloc: bool) -> Result<Extent, DioError> {
        if off >= self.capacity || len == 0 {
            return Err(DioError::Invalid);
        }
        Ok(Extent::Mapped {
            lba: self.first_lba + (off >> self.shift),
            len: len.min(self.capacity - off).min(self.max_bio),
            fresh: false,
        })
    }
}

/// Which engine runs the file's bios.
#[derive(Clone)]
pub(crate) enum EngineRef {
    Pooled(Arc<Pollers>),
    Local(Arc<Local>),
}

/// Registry of open extents, to refuse overlapping files.
pub(crate) type ExtentList = Mutex<Vec<(u64, usize, u32, Range<u64>)>>;
/// Shared handle of the registry.
pub(crate) type Extents = Arc<ExtentList>;

/// Device access of the page cache: a dio-core used synchronously, with the EOF at the capacity
/// (a cache page is read whole, whatever `len` is).
pub(crate) struct Store {
    core: DioCore<Window>,
    capacity: u64,
    block: u64,
}

impl Store {
    fn io(
        &self,
        dir: Dir,
        off: u64,
        buf: DmaBuffer,
        range: Range<usize>,
    ) -> (Result<(), DioError>, DmaBuffer) {
        let len = range.len() as u64;
        let req = DioRequest::new(
            dir,
            off + range.start as u64,
            len,
            Window::new(IoBuffer::Dma(buf), range.start),
            Mode::Sync,
        );
        let (r, w) = match self.core.submit(req, self.capacity, Completion::noop()) {
            Outcome::Done {
                result,
                buf,
                completion,
            } => {
                completion.discard();
                (result, buf)
            }
            Outcome::Fallback {
                buf, completion, ..
            } => {
                completion.discard();
                (Err(DioError::Invalid), buf)
            }
            Outcome::Queued => unreachable!("a synchronous request was queued"),
        };
        let buf = w.buf.into_dma().expect("a cache page is DMA memory");
        match r {
            Ok(n) if n == len => (Ok(()), buf),
            Ok(_) => (Err(DioError::Invalid), buf),
            Err(e) => (Err(e), buf),
        }
    }
}

impl PageIo for Store {
    fn read_page(&self, off: u64, buf: DmaBuffer) -> (Result<(), DioError>, DmaBuffer) {
        self.io(Dir::Read, off, buf, 0..PAGE as usize)
    }
    fn write_blocks(
        &self,
        off: u64,
        buf: DmaBuffer,
        range: Range<usize>,
    ) -> (Result<(), DioError>, DmaBuffer) {
        self.io(Dir::Write, off, buf, range)
    }
    fn block(&self) -> u64 {
        self.block
    }
}

/// The file as dio-core's upper layer sees it.
pub(crate) struct FileState {
    id: u64,
    len: AtomicU64,
    on_extend: Option<ExtendHook>,
    cache: Arc<PageCache>,
    store: Store,
}

impl FileState {
    fn extend(&self, new_len: u64) {
        if self.len.fetch_max(new_len, Ordering::AcqRel) < new_len {
            if let Some(h) = &self.on_extend {
                h(new_len);
            }
        }
    }
}

impl dio_core::File<Window> for FileState {
    fn size(&self) -> u64 {
        self.len.load(Ordering::Acquire)
    }
    fn extend_to(&self, new_size: u64) {
        self.extend(new_size);
    }
    fn write_buffered(&self, file_offset: u64, buf: &Window, buf_range: Range<u64>) -> DioResult {
        let data = &buf.bytes()[buf_range.start as usize..buf_range.end as usize];
        self.cache.write(self.id, &self.store, file_offset, data)?;
        Ok(data.len() as u64)
    }
}

type Callback = Box<dyn FnOnce(Completed) + Send>;

struct Inner {
    io: IoCtx<Window, FileState>,
    locks: Arc<RangeLock>,
    engine: EngineRef,
    deferral: Option<Arc<dyn dio_core::Deferral>>,
    ctrl: Controller,
    block: u64,
    capacity: u64,
    writable: bool,
    extents: Weak<ExtentList>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(e) = self.extents.upgrade() {
            let id = self.state().id;
            e.lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|x| x.0 != id);
        }
    }
}

/// A file on a namespace. Cheap to clone (shared); usable from any thread (pooled pollers) or
/// from the thread that built the instance (run to completion).
#[derive(Clone)]
pub struct BlockFile {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for BlockFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockFile")
            .field("len", &self.len())
            .field("capacity", &self.inner.capacity)
            .finish_non_exhaustive()
    }
}

/// Leaves the engine when a request's submission phase ends.
struct Entered<'a>(Option<&'a Pollers>);
impl Drop for Entered<'_> {
    fn drop(&mut self) {
        if let Some(p) = self.0 {
            p.leave();
        }
    }
}

static NEXT_FILE: AtomicU64 = AtomicU64::new(1);

fn round_down(x: u64, a: u64) -> u64 {
    x / a * a
}
fn round_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

/// The pieces of a request after the range lock: what goes where.
enum Reply {
    Sync,
    Async(Callback),
}

impl BlockFile {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn open(
        ctrl: Controller,
        ns: &Namespace,
        ctrl_index: usize,
        target: u32,
        engine: EngineRef,
        cache: Arc<PageCache>,
        deferral: Option<Arc<dyn dio_core::Deferral>>,
        extents: &Extents,
        opts: FileOptions,
    ) -> EmbedResult<BlockFile> {
        let bs = ns.block_size() as u64;
        let bad = |why| EmbedError::BadExtent {
            nsid: ns.nsid(),
            first_lba: opts.first_lba,
            blocks: opts.blocks,
            ns_blocks: ns.blocks(),
            block_size: ns.block_size(),
            why,
        };
        let end = opts.first_lba.checked_add(opts.blocks);
        if opts.blocks == 0 || end.is_none_or(|e| e > ns.blocks()) {
            return Err(bad(
                "the extent must be non-empty and lie inside the namespace",
            ));
        }
        let capacity = opts.blocks * bs;
        if capacity % PAGE != 0 {
            return Err(bad(
                "the capacity must be a multiple of 4 KiB; round the block count",
            ));
        }
        if opts.len > capacity {
            return Err(bad("the initial length is larger than the capacity"));
        }
        let id = NEXT_FILE.fetch_add(1, Ordering::Relaxed);
        {
            let mut ex = extents.lock().unwrap_or_else(|p| p.into_inner());
            let r = opts.first_lba..opts.first_lba + opts.blocks;
            let nsid = ns.nsid().0;
            if ex.iter().any(|(_, c, n, x)| {
                *c == ctrl_index && *n == nsid && x.start < r.end && r.start < x.end
            }) {
                return Err(EmbedError::ExtentInUse {
                    nsid: ns.nsid(),
                    first_lba: opts.first_lba,
                    blocks: opts.blocks,
                });
            }
            ex.push((id, ctrl_index, nsid, r));
        }
        let mapper = Arc::new(ExtentMapper {
            first_lba: opts.first_lba,
            shift: ns.block_shift(),
            capacity,
            max_bio: (ctrl.max_transfer() as u64).max(bs),
        });
        let (sink, wait): (Arc<dyn dio_core::BioSink<Window>>, dio_core::Wait) = match &engine {
            EngineRef::Pooled(p) => (
                Arc::new(crate::embed::poller::PollerSink {
                    pollers: p.clone(),
                    target,
                }),
                p.wait(),
            ),
            EngineRef::Local(l) => (
                Arc::new(crate::embed::poller::LocalSink {
                    local: l.clone(),
                    target,
                }),
                dio_core::Wait::PollInPlace(Arc::new(crate::embed::poller::LocalPoller(l.clone()))),
            ),
        };
        let cfg = dio_core::Config {
            align: bs,
            wait,
            ..dio_core::Config::default()
        };
        let store = Store {
            core: DioCore::new(sink.clone(), mapper.clone(), cfg.clone()),
            capacity,
            block: bs,
        };
        let mut core = DioCore::new(sink, mapper, cfg);
        if let Some(d) = &deferral {
            core = core.with_deferral(d.clone());
        }
        let state = FileState {
            id,
            len: AtomicU64::new(opts.len),
            on_extend: opts.on_extend,
            cache,
            store,
        };
        Ok(BlockFile {
            inner: Arc::new(Inner {
                io: IoCtx::new(core, state),
                locks: Arc::new(RangeLock::default()),
                engine,
                deferral,
                ctrl,
                block: bs,
                capacity,
                writable: opts.writable,
                extents: Arc::downgrade(extents),
            }),
        })
    }

    /// Logical size in bytes.
    pub fn len(&self) -> u64 {
        self.inner.state().size_now()
    }
    /// True when `len` is 0.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.inner.capacity
    }
    /// Logical block size of the namespace (the alignment of zero-copy I/O).
    pub fn block_size(&self) -> u64 {
        self.inner.block
    }
    /// Allocate a zero-copy buffer in the DMA memory of this file's controller.
    pub fn alloc(&self, len: usize) -> EmbedResult<DmaBuffer> {
        Ok(self.inner.ctrl.alloc(len)?)
    }

    /// Read into `buf` at `offset`, synchronously; returns the bytes read (short at `len`).
    /// Any memory: copied through the page cache. For zero copy, use [`read`](Self::read) with
    /// a DMA buffer.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> EmbedResult<usize> {
        let n = buf.len();
        let (r, b) = self
            .run(
                Op::Read,
                offset,
                n,
                IoBuffer::Heap(Vec::new()),
                Reply::Sync,
                Some(Slice::Read(buf)),
            )
            .expect("synchronous");
        drop(b);
        r
    }

    /// Write `buf` at `offset`, synchronously; returns the bytes written. Any memory: copied
    /// through the page cache (write-through). For zero copy, use [`write`](Self::write).
    pub fn write_at(&self, buf: &[u8], offset: u64) -> EmbedResult<usize> {
        let n = buf.len();
        let (r, _) = self
            .run(
                Op::Write,
                offset,
                n,
                IoBuffer::Heap(Vec::new()),
                Reply::Sync,
                Some(Slice::Write(buf)),
            )
            .expect("synchronous");
        r
    }

    /// Read `len` bytes at `offset` into an owned buffer, synchronously (zero copy for the
    /// block-aligned part of a DMA buffer).
    pub fn read(
        &self,
        buf: impl Into<IoBuffer>,
        offset: u64,
        len: usize,
    ) -> (EmbedResult<usize>, IoBuffer) {
        self.run(Op::Read, offset, len, buf.into(), Reply::Sync, None)
            .expect("synchronous")
    }

    /// Write the first `len` bytes of an owned buffer at `offset`, synchronously (zero copy for
    /// the block-aligned part of a DMA buffer).
    pub fn write(
        &self,
        buf: impl Into<IoBuffer>,
        offset: u64,
        len: usize,
    ) -> (EmbedResult<usize>, IoBuffer) {
        self.run(Op::Write, offset, len, buf.into(), Reply::Sync, None)
            .expect("synchronous")
    }

    /// Submit asynchronously. `Ok(())`: `cb` runs exactly once (on a poller thread, or on the
    /// deferral thread, or before `submit` returns when the request finished synchronously:
    /// a write past `len`, an unaligned or heap-buffer request). `Err`: `cb` never runs.
    pub fn submit(
        &self,
        req: Request,
        cb: impl FnOnce(Completed) + Send + 'static,
    ) -> Result<(), Box<Refused>> {
        let (op, offset, len) = (req.op, req.offset, req.len);
        // A panicking callback must not kill the poller it runs on (its bios in flight would
        // never complete): caught here, reported, and the request counts as completed.
        let cb = move |c: Completed| {
            let run = std::panic::AssertUnwindSafe(move || cb(c));
            if let Err(p) = std::panic::catch_unwind(run) {
                let msg = p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "(not a string)".into());
                eprintln!(
                    "dioxide: the completion callback of the {op} of {len} bytes at offset \
                     {offset} panicked ({msg}); the panic was caught, the poller goes on"
                );
            }
        };
        match self.run(op, offset, len, req.buf, Reply::Async(Box::new(cb)), None) {
            None => Ok(()),
            Some((Err(error), buf)) => Err(Box::new(Refused { error, buf })),
            Some((Ok(_), _)) => {
                unreachable!("an asynchronous request reports through its callback")
            }
        }
    }

    fn deliver(&self, cb: Callback, result: EmbedResult<usize>, buf: IoBuffer) {
        let c = Completed { result, buf };
        match &self.inner.deferral {
            Some(d) => d.defer(Box::new(move || cb(c))),
            None => cb(c),
        }
    }

    fn on_poller(&self) -> bool {
        match &self.inner.engine {
            EngineRef::Pooled(p) => p.on_poller(),
            EngineRef::Local(_) => false,
        }
    }

    /// The whole request. Sync: `Some((result, buf))`. Async: `None` when the callback owns the
    /// outcome, `Some((Err, buf))` when refused (the callback is dropped unrun).
    fn run(
        &self,
        op: Op,
        offset: u64,
        len: usize,
        buf: IoBuffer,
        reply: Reply,
        slice: Option<Slice<'_>>,
    ) -> Option<(EmbedResult<usize>, IoBuffer)> {
        let refuse = |e: EmbedError, buf: IoBuffer| Some((Err(e), buf));
        let _entered = match &self.inner.engine {
            EngineRef::Pooled(p) => {
                if !p.enter() {
                    return refuse(EmbedError::ShutDown, buf);
                }
                Entered(Some(p))
            }
            EngineRef::Local(l) => {
                if !l.on_owner() {
                    return refuse(EmbedError::WrongThread, buf);
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
            return refuse(e, buf);
        }
        let beyond = EmbedError::BeyondCapacity {
            op,
            offset,
            len: len64,
            capacity: inner.capacity,
        };
        let Some(end) = offset.checked_add(len64) else {
            return refuse(beyond, buf);
        };
        if op == Op::Write {
            if !inner.writable {
                return refuse(EmbedError::ReadOnly { offset }, buf);
            }
            if end > inner.capacity {
                return refuse(beyond, buf);
            }
        }
        let bs = inner.block;
        let state = inner.state();
        // On a poller thread nothing may wait: only what dio-core can queue at once.
        let on_poller = self.on_poller();
        if on_poller {
            let why = if matches!(reply, Reply::Sync) {
                Some("a synchronous call")
            } else if !buf.is_dma() {
                Some("a heap buffer goes through the page cache")
            } else if offset % bs != 0 || len64 % bs != 0 || len == 0 {
                Some("an unaligned request goes through the page cache")
            } else if op == Op::Write && end > state.size_now() {
                Some("a write past the end of the file is synchronous")
            } else if buf.as_slice().as_ptr() as usize % 4 != 0 {
                Some("the buffer address is not dword aligned")
            } else {
                None
            };
            if let Some(why) = why {
                return refuse(EmbedError::WouldBlockOnPoller { op, offset, why }, buf);
            }
        }
        if len == 0 {
            return self.finish(reply, None, Ok(0), buf);
        }
        // 1. The range lock, on whole pages; a write also covers the gap it may zero.
        let lo = if op == Op::Write {
            offset.min(state.size_now())
        } else {
            offset
        };
        let range = round_down(lo, PAGE)..round_up(end, PAGE);
        let exclusive = op == Op::Write;
        let guard = if on_poller {
            match inner.locks.try_lock(range, exclusive) {
                Some(g) => g,
                None => {
                    let why = "it overlaps a request in flight";
                    return refuse(EmbedError::WouldBlockOnPoller { op, offset, why }, buf);
                }
            }
        } else {
            match &inner.engine {
                EngineRef::Local(l) => {
                    let poll = || {
                        l.poll_once();
                    };
                    inner.locks.lock(range, exclusive, LockWait::Poll(&poll))
                }
                EngineRef::Pooled(_) => inner.locks.lock(range, exclusive, LockWait::Park),
            }
        };
        match op {
            Op::Read => self.read_locked(offset, len64, buf, reply, slice, guard),
            Op::Write => self.write_locked(offset, len64, buf, reply, slice, guard),
        }
    }

    /// Report a request that did not go through dio-core's completion path.
    fn finish(
        &self,
        reply: Reply,
        guard: Option<RangeGuard>,
        result: EmbedResult<usize>,
        buf: IoBuffer,
    ) -> Option<(EmbedResult<usize>, IoBuffer)> {
        drop(guard);
        match reply {
            Reply::Sync => Some((result, buf)),
            Reply::Async(cb) => {
                self.deliver(cb, result, buf);
                None
            }
        }
    }

    /// dio-core, synchronously; in run-to-completion mode an exhausted pool is waited out by
    /// polling and retrying.
    fn dio_sync(&self, mut req: DioRequest<Window>) -> (DioResult, Window) {
        loop {
            let (dir, offset, len, mode, fw) =
                (req.dir, req.offset, req.len, req.mode, req.force_wait);
            let (r, w) = self.inner.io.submit_sync(req);
            match (&self.inner.engine, r) {
                (EngineRef::Local(l), Err(DioError::QueueFull)) => {
                    l.poll_once();
                    req = DioRequest {
                        dir,
                        offset,
                        len,
                        buf: w,
                        mode,
                        force_wait: fw,
                    };
                }
                (_, r) => return (r, w),
            }
        }
    }

    /// The direct part, sync or async; `pre` bytes were done before it (through the cache),
    /// `post` after (read tail); `total` is reported when the direct part is complete.
    #[allow(clippy::too_many_arguments)]
    fn direct(
        &self,
        op: Op,
        req: DioRequest<Window>,
        pre: u64,
        total: u64,
        ctx: (u64, u64),
        reply: Reply,
        guard: RangeGuard,
    ) -> Option<(EmbedResult<usize>, IoBuffer)> {
        let want = req.len;
        let (offset, len) = ctx;
        let result = move |r: DioResult| -> EmbedResult<usize> {
            match r {
                Ok(m) if m == want => Ok(total as usize),
                Ok(m) => Ok((pre + m) as usize),
                Err(e) => Err(EmbedError::from_dio(e, op, offset, len)),
            }
        };
        match reply {
            Reply::Sync => {
                let (r, mut w) = self.dio_sync(req);
                drop(guard);
                zero_short_read(op, &r, pre, want, &mut w.buf);
                Some((result(r), w.buf))
            }
            Reply::Async(cb) => {
                let r = self.inner.io.submit_async(req, move |r, mut w: Window| {
                    drop(guard);
                    zero_short_read(op, &r, pre, want, &mut w.buf);
                    cb(Completed {
                        result: result(r),
                        buf: w.buf,
                    });
                });
                match r {
                    Ok(()) => None,
                    Err((e, w)) => Some((Err(EmbedError::from_dio(e, op, offset, len)), w.buf)),
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn read_locked(
        &self,
        offset: u64,
        len: u64,
        mut buf: IoBuffer,
        reply: Reply,
        slice: Option<Slice<'_>>,
        guard: RangeGuard,
    ) -> Option<(EmbedResult<usize>, IoBuffer)> {
        let inner = &*self.inner;
        let state = inner.state();
        let (id, cache, store) = (state.id, &state.cache, &state.store);
        let err = |e| EmbedError::from_dio(e, Op::Read, offset, len);
        let size = state.size_now();
        if offset >= size {
            return self.finish(reply, Some(guard), Ok(0), buf);
        }
        let end = (offset + len).min(size);
        let n = end - offset;
        let bs = inner.block;
        let h = if offset % bs != 0 {
            (round_up(offset, bs) - offset).min(n)
        } else {
            0
        };
        // An unaligned tail that the request's block-aligned span still covers (the file ends
        // inside its last block) is read directly too: dio-core clamps the count at EOF, and no
        // cache read runs (a cache miss would wait for the device, which on a poller thread is
        // its own queue: a hang).
        let tail_end = round_up(end, bs);
        let b = if end % bs != 0
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
            && buf.is_dma()
            && (buf.as_slice().as_ptr() as usize + h as usize) % 4 == 0;
        if !direct {
            let out: &mut [u8] = match slice {
                Some(Slice::Read(s)) => &mut s[..n as usize],
                _ => &mut buf.as_mut_slice()[..n as usize],
            };
            let r = cache
                .read(id, store, offset, out)
                .map(|_| n as usize)
                .map_err(err);
            return self.finish(reply, Some(guard), r, buf);
        }
        // Head and tail through the cache first, then the middle directly.
        let out = buf.as_mut_slice();
        let mut r = Ok(());
        if h > 0 {
            r = cache.read(id, store, offset, &mut out[..h as usize]);
        }
        if r.is_ok() && end > b {
            let at = (b - offset) as usize;
            r = cache.read(id, store, b, &mut out[at..n as usize]);
        }
        if let Err(e) = r {
            return self.finish(reply, Some(guard), Err(err(e)), buf);
        }
        let mode = match reply {
            Reply::Sync => Mode::Sync,
            Reply::Async(_) => Mode::Async,
        };
        let req = DioRequest::new(Dir::Read, a, b - a, Window::new(buf, h as usize), mode);
        self.direct(Op::Read, req, h, n, (offset, len), reply, guard)
    }

    #[allow(clippy::too_many_arguments)]
    fn write_locked(
        &self,
        offset: u64,
        len: u64,
        buf: IoBuffer,
        reply: Reply,
        slice: Option<Slice<'_>>,
        guard: RangeGuard,
    ) -> Option<(EmbedResult<usize>, IoBuffer)> {
        let inner = &*self.inner;
        let state = inner.state();
        let (id, cache, store) = (state.id, &state.cache, &state.store);
        let err = |e| EmbedError::from_dio(e, Op::Write, offset, len);
        let end = offset + len;
        // Zero the gap between the old end of file and this write (locked: see `run`).
        let size = state.size_now();
        if offset > size {
            static ZEROES: [u8; 65536] = [0; 65536];
            let mut pos = size;
            while pos < offset {
                let n = (offset - pos).min(ZEROES.len() as u64);
                if let Err(e) = cache.write(id, store, pos, &ZEROES[..n as usize]) {
                    return self.finish(reply, Some(guard), Err(err(e)), buf);
                }
                pos += n;
            }
        }
        let bs = inner.block;
        let h = if offset % bs != 0 {
            (round_up(offset, bs) - offset).min(len)
        } else {
            0
        };
        let direct = slice.is_none()
            && h < len
            && buf.is_dma()
            && (buf.as_slice().as_ptr() as usize + h as usize) % 4 == 0;
        if !direct {
            let data: &[u8] = match &slice {
                Some(Slice::Write(s)) => &s[..len as usize],
                _ => &buf.as_slice()[..len as usize],
            };
            let r = cache.write(id, store, offset, data).map_err(err);
            if r.is_ok() {
                state.extend(end);
            }
            return self.finish(reply, Some(guard), r.map(|_| len as usize), buf);
        }
        if h > 0 {
            if let Err(e) = cache.write(id, store, offset, &buf.as_slice()[..h as usize]) {
                return self.finish(reply, Some(guard), Err(err(e)), buf);
            }
        }
        // Direct I/O: drop the cached pages it overlaps (write-through: nothing to write back).
        cache.invalidate(id, offset + h..end);
        let mode = match reply {
            Reply::Sync => Mode::Sync,
            Reply::Async(_) => Mode::Async,
        };
        let req = DioRequest::new(
            Dir::Write,
            offset + h,
            len - h,
            Window::new(buf, h as usize),
            mode,
        );
        self.direct(Op::Write, req, h, len, (offset, len), reply, guard)
    }
}

/// A direct read clamped at EOF leaves device bytes past `len` in its last block: zero them
/// (bytes at or past `len` are never returned).
fn zero_short_read(op: Op, r: &DioResult, pre: u64, want: u64, buf: &mut IoBuffer) {
    if let (Op::Read, Ok(m)) = (op, r) {
        if *m < want {
            let (from, to) = ((pre + m) as usize, (pre + want) as usize);
            let s = buf.as_mut_slice();
            let to = to.min(s.len());
            if from < to {
                s[from..to].fill(0);
            }
        }
    }
}

/// A borrowed buffer of a synchronous call (copied through the cache).
enum Slice<'a> {
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

impl Inner {
    fn state(&self) -> &FileState {
        self.io.file()
    }
}

impl FileState {
    fn size_now(&self) -> u64 {
        self.len.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mapper_stays_inside_the_extent() {
        let m = ExtentMapper {
            first_lba: 100,
            shift: 9,
            capacity: 8192,
            max_bio: 4096,
        };
        assert_eq!(
            m.map(512, 100_000, Dir::Read, false),
            Ok(Extent::Mapped {
                lba: 101,
                len: 4096,
                fresh: false
            })
        );
        assert_eq!(
            m.map(6144, 100_000, Dir::Write, true),
            Ok(Extent::Mapped {
                lba: 112,
                len: 2048,
                fresh: false
            })
        );
        assert_eq!(m.map(8192, 512, Dir::Write, true), Err(DioError::Invalid));
        assert_eq!(m.map(u64::MAX, 1, Dir::Read, false), Err(DioError::Invalid));
    }
}
