//! A file on a namespace: a logical size (`len`) and a capacity on an LBA range, with
//! synchronous ([`BlockFile::read_at`], [`BlockFile::write_at`], [`BlockFile::read`],
//! [`BlockFile::write`]) and asynchronous ([`BlockFile::submit`]) I/O through dio-core.
//!
//! This module holds the file's public types and its opening; the per-request path, from the
//! entry points to the user's callback, reads top to bottom in [`path`].
//!
//! # How a request runs
//! 1. **Range lock** on the 4 KiB pages it touches (writes exclusive, reads shared); a write at
//!    or past `len` locks from `len` on, since it also zeroes the gap. The lock is a table of
//!    atomic reader/writer words striped over the pages, taken in ascending order: requests
//!    that do not overlap share no lock. See [`rangelock`](crate::embed::rangelock).
//! 2. **Split**: a heap buffer (or a DMA address that is not dword aligned) goes wholly through
//!    the page cache. Otherwise an unaligned head goes through the cache, the block-aligned
//!    middle directly to the device through dio-core, and the unaligned tail through the cache
//!    (a read) or dio-core's `Fallback` (a write: only the remainder is written buffered). A
//!    read whose buffer covers the whole block where the file ends, a block that starts inside
//!    the request, reads that block directly too: dio-core clamps the count at `len` and the
//!    bytes past it are zeroed. (When the file ends in the request's unaligned first block,
//!    that block is the head: the whole read goes through the cache.)
//! 3. **Coherency**: a direct write first invalidates the cached pages it overlaps (the cache is
//!    write-through, so there is nothing to write back), skipping the cache's directory lock when
//!    the file has no page cached; buffered writes reach the device before they return.
//!    Whatever path each request takes, the device holds the latest data.
//! 4. **Size**: reads stop at `len`; a write past `len` zeroes `[len, offset)` if there is a
//!    gap, is forced synchronous by dio-core, and raises `len` (calling the
//!    [`FileOptions::on_extend`] hook, where the appliance persists it) before anyone is told
//!    it finished.
//! 5. **Completion**: [`BlockFile::submit`] returns `Ok` and the callback runs exactly once, or
//!    returns the error and the callback never runs (`dio-core/DESIGN.md §3.7`). The range lock
//!    is released just before the callback. An asynchronous direct request allocates nothing:
//!    its context (its buffer, held range, byte accounting, the user's callback stored inline)
//!    is a pooled box whose pointer, one word, is its [`Window`] through dio-core's pooled
//!    request state to a plain completion function.
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

use dio_core::{DioCore, DioError, DioResult, Dir, Extent, IoCtx, Mapper, Outcome, SyncOutcome};

use crate::bus::dma::{DmaBuffer, DmaMemory};
use crate::embed::cache::{CacheFile, PAGE, PageCache, PageIo};
use crate::embed::error::{EmbedError, EmbedResult, Op};
use crate::embed::iobuf::{Frame, IoBuffer, Window};
use crate::embed::poller::{Local, Pollers};

mod callback;
mod maint;
mod path;

use crate::embed::ctrl::EmbedCtrl;
use crate::nvme::namespace::Namespace;
pub(crate) use path::Context;

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

impl EngineRef {
    /// True on a thread of the pooled pollers (where nothing may wait).
    pub(crate) fn on_poller(&self) -> bool {
        match self {
            EngineRef::Pooled(p) => p.on_poller(),
            EngineRef::Local(_) => false,
        }
    }
}

/// Registry of open extents, to refuse overlapping files.
pub(crate) type ExtentList = Mutex<Vec<(u64, usize, u32, Range<u64>)>>;
/// Shared handle of the registry.
pub(crate) type Extents = Arc<ExtentList>;

/// The result and the buffer of a synchronous request's outcome, its completion discarded
/// (never `Queued`). A `Fallback`, a direct write that stopped short, is `Invalid` here: the
/// callers ask for whole blocks of a mapped extent, which never stop short.
pub(crate) fn sync_outcome(o: Outcome<Window>) -> (DioResult, Window) {
    match o {
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
    }
}

/// Device access of the page cache: a dio-core used synchronously, with the EOF at the capacity
/// (a cache page is read whole, whatever `len` is).
pub(crate) struct Store {
    core: DioCore<Window, ExtentMapper>,
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
        let at = off + range.start as u64;
        // On this stack, lent to dio-core for the call. A `Fallback`, a direct write that
        // stopped short, is `Invalid` here (see `sync_outcome`).
        let mut frame = Frame {
            buf: IoBuffer::Dma(buf),
            start: range.start,
        };
        // SAFETY: the window is only lent by `&mut` to `submit_sync_mut`, which does not move
        // it out and returns normally only after every bio of the request completed (see
        // `Frame::lend`); it is given back right after; the guard is declared after the frame.
        let (mut w, lent) = unsafe { frame.lend() };
        let r = match self
            .core
            .submit_sync_mut(dir, at, len, &mut w, self.capacity)
        {
            SyncOutcome::Done(r) => r,
            SyncOutcome::Fallback { .. } => Err(DioError::Invalid),
        };
        frame.end_lend(w, lent);
        let buf = frame.buf.into_dma().expect("a cache page is DMA memory");
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
    /// The file in the page cache (its id and count of cached pages).
    cfile: Arc<CacheFile>,
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
        self.cache
            .write(&self.cfile, &self.store, file_offset, data)?;
        Ok(data.len() as u64)
    }
}

struct Inner {
    io: IoCtx<Window, FileState, ExtentMapper>,
    shared: Arc<path::Shared>,
    engine: EngineRef,
    deferral: Option<Arc<dyn dio_core::Deferral>>,
    ctrl: EmbedCtrl,
    /// The controller's DMA memory (`ctrl.dma()`, kept here: each request checks its buffer
    /// against it, and `ctrl.dma()` is a call through the bus's trait object; measured, QD32
    /// read: 2200 -> 2171 instructions).
    dma: DmaMemory,
    block: u64,
    capacity: u64,
    writable: bool,
    extents: Weak<ExtentList>,
    /// What the controller offers for flush, write zeroes and deallocate.
    maint: maint::Maint,
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

static NEXT_FILE: AtomicU64 = AtomicU64::new(1);

impl BlockFile {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn open(
        ctrl: EmbedCtrl,
        ns: &Namespace,
        ctrl_index: usize,
        target: u32,
        engine: EngineRef,
        cache: Arc<PageCache>,
        deferral: Option<Arc<dyn dio_core::Deferral>>,
        extents: &Extents,
        opts: FileOptions,
    ) -> EmbedResult<BlockFile> {
        // A namespace formatted with metadata is refused here, with the fix in the message.
        ns.check_io()?;
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
        let maint = maint::Maint::new(
            &ctrl.identify(),
            ctrl.wzsl(),
            ctrl.cap().min_page_size() as u64,
            ctrl.max_transfer() as u64,
            opts.first_lba,
            ns.block_shift(),
        );
        // A read-only file runs no maintenance that needs a buffer (only flush): no spares.
        let spares = if opts.writable {
            maint::Spares::new(&ctrl, &maint)?
        } else {
            maint::Spares::empty()
        };
        // The file's dio-core defers nothing: the path gives a request's range back where the
        // request finished, then defers the callback through this second one (path.rs).
        let defer = deferral.as_ref().map(|d| {
            DioCore::new(sink.clone(), mapper.clone(), cfg.clone()).with_deferral(d.clone())
        });
        let core = DioCore::new(sink, mapper, cfg);
        let state = FileState {
            id,
            cfile: CacheFile::new(id),
            len: AtomicU64::new(opts.len),
            on_extend: opts.on_extend,
            cache,
            store,
        };
        Ok(BlockFile {
            inner: Arc::new(Inner {
                io: IoCtx::new(core, state),
                shared: Arc::new(path::Shared::new(capacity, defer, spares)),
                engine,
                deferral,
                dma: ctrl.dma().clone(),
                ctrl,
                block: bs,
                capacity,
                writable: opts.writable,
                extents: Arc::downgrade(extents),
                maint,
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
