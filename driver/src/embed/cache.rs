//! The page cache of the buffered path: 4 KiB pages in DMA memory, bounded, write-through,
//! CLOCK eviction.
//!
//! It serves what direct I/O cannot: a heap buffer, an unaligned head or tail, the remainder
//! of a partial direct write, and the zeroes a file extension writes over a gap. *Write-through*:
//! a write copies into the page and writes the blocks it touched to the device before it
//! returns, so no page is ever dirty and the device always holds the latest data; a direct write
//! only has to *invalidate* the pages it overlaps (nothing to write back). A device error on a
//! write drops the page, so the next read goes to the device.
//!
//! Concurrency: the directory (page key to frame, reference bits, pins) is one mutex taken for
//! a few instructions per page; each frame's data has its own mutex. The cache does not order
//! overlapping requests: the file's range lock does (a page is touched only by requests holding
//! a lock on it, writers exclusively), so a frame is never filled while a direct write to its
//! page is in flight. A frame in use is pinned and never evicted.
//!
//! A direct write must not pay for the directory when there is nothing to invalidate: each file
//! ([`CacheFile`]) counts its cached pages, updated under the directory lock whenever one of
//! its pages enters or leaves the map, and [`PageCache::invalidate`] reads that count (Acquire)
//! before taking the lock: zero means no page of the file is cached, so nothing to drop. Why
//! this is race-free is explained at [`PageCache::invalidate`]. [`CacheStats::dir_locks`]
//! counts the directory's acquisitions, so tests can check that the fast path does not take it.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use dio_core::DioError;

use crate::bus::dma::{DmaBuffer, DmaMemory};

/// Size of a cache page.
pub const PAGE: u64 = crate::spec::PAGE_SIZE as u64;

/// Device access the cache needs, implemented by the file over its dio-core.
pub(crate) trait PageIo {
    /// Read the whole page at file offset `off` into `buf` (4 KiB).
    fn read_page(&self, off: u64, buf: DmaBuffer) -> (Result<(), DioError>, DmaBuffer);
    /// Write `buf[range]` (block aligned) at file offset `off + range.start`.
    fn write_blocks(
        &self,
        off: u64,
        buf: DmaBuffer,
        range: Range<usize>,
    ) -> (Result<(), DioError>, DmaBuffer);
    /// Logical block size.
    fn block(&self) -> u64;
}

type Key = (u64, u64);

/// A file as the cache knows it: its id (the first half of its pages' keys) and how many of its
/// pages are in the directory's map.
#[derive(Debug)]
pub(crate) struct CacheFile {
    id: u64,
    /// Pages of this file in the map; changed only under the directory lock.
    cached: AtomicU64,
}

impl CacheFile {
    /// File `id` (unique among the files of a cache), with nothing cached.
    pub(crate) fn new(id: u64) -> Arc<CacheFile> {
        Arc::new(CacheFile {
            id,
            cached: AtomicU64::new(0),
        })
    }
}

#[derive(Clone, Default)]
struct Meta {
    key: Option<Key>,
    /// The file of `key`, whose count the map entry is part of.
    owner: Option<Arc<CacheFile>>,
    referenced: bool,
    pins: u32,
}

impl Directory {
    /// Remove the page of frame `f` from the map (if it holds one), keeping its file's count.
    fn unmap(&mut self, f: usize) -> bool {
        let m = &mut self.meta[f];
        m.referenced = false;
        let Some(k) = m.key.take() else {
            return false;
        };
        if let Some(o) = m.owner.take() {
            o.cached.fetch_sub(1, Ordering::Release);
        }
        self.map.remove(&k);
        true
    }
}

struct Directory {
    map: HashMap<Key, usize>,
    meta: Vec<Meta>,
    hand: usize,
    stats: CacheStats,
}

/// Counters of the page cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Page lookups that found the page.
    pub hits: u64,
    /// Page lookups that did not.
    pub misses: u64,
    /// Pages read from the device.
    pub fills: u64,
    /// Valid pages evicted to make room.
    pub evictions: u64,
    /// Pages dropped by a direct write (or a failed write).
    pub invalidations: u64,
    /// Write-through device writes.
    pub writes: u64,
    /// Acquisitions of the directory lock (a direct write with nothing cached takes none).
    pub dir_locks: u64,
}

/// A pinned frame's buffer: in its mutex, or out for device I/O (`None`). The mutex is held only
/// to copy or to move the buffer, never across I/O.
struct Frame<'a>(&'a Mutex<Option<DmaBuffer>>);

impl Frame<'_> {
    /// Take the buffer out for I/O. Out already: a request in progress on this page below us
    /// on this thread's stack (a callback run by its I/O's poll): refused, as waiting would
    /// never end.
    fn take(&self) -> Result<DmaBuffer, DioError> {
        lock(self.0).take().ok_or_else(busy)
    }

    /// Put the buffer back after I/O.
    fn put(&self, buf: DmaBuffer) {
        *lock(self.0) = Some(buf);
    }

    /// Copy `out.len()` bytes from `at` (refused like [`take`](Self::take) if the buffer is out).
    fn read(&self, at: usize, out: &mut [u8]) -> Result<(), DioError> {
        let d = lock(self.0);
        let b = d.as_ref().ok_or_else(busy)?;
        out.copy_from_slice(&b.as_slice()[at..at + out.len()]);
        Ok(())
    }
}

#[cold]
fn busy() -> DioError {
    log::error!(
        "page cache: a page is used by a request that runs inside the I/O of another request on \
         the same page (a callback run by a poll of this thread); refused instead of waiting \
         for it forever"
    );
    DioError::Invalid
}

/// A bounded page cache shared by the files of one controller.
pub struct PageCache {
    dir: Mutex<Directory>,
    frames: Vec<Mutex<Option<DmaBuffer>>>,
}

impl std::fmt::Debug for PageCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PageCache({} pages)", self.frames.len())
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The directory, locked and counted.
fn lock_dir(m: &Mutex<Directory>) -> MutexGuard<'_, Directory> {
    let mut d = lock(m);
    d.stats.dir_locks += 1;
    d
}

impl PageCache {
    /// A cache of `pages` pages (at least 2) allocated from `mem`.
    pub(crate) fn new(
        mem: &DmaMemory,
        pages: usize,
    ) -> Result<PageCache, crate::bus::dma::DmaError> {
        let pages = pages.max(2);
        let frames = (0..pages)
            .map(|_| mem.alloc(PAGE as usize).map(|b| Mutex::new(Some(b))))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(PageCache {
            dir: Mutex::new(Directory {
                map: HashMap::new(),
                meta: vec![Meta::default(); pages],
                hand: 0,
                stats: CacheStats::default(),
            }),
            frames,
        })
    }

    /// Counters.
    pub fn stats(&self) -> CacheStats {
        lock_dir(&self.dir).stats
    }

    /// Pages of `file` currently cached (checked against its count).
    #[cfg(test)]
    pub(crate) fn cached(&self, file: &CacheFile) -> usize {
        let d = lock_dir(&self.dir);
        let n = d.map.keys().filter(|k| k.0 == file.id).count();
        assert_eq!(
            n as u64,
            file.cached.load(Ordering::Relaxed),
            "count out of step"
        );
        n
    }

    /// Pin the frame of `key`, or a victim frame for it (`false`: not valid yet).
    fn pin(&self, key: Key) -> (usize, bool) {
        loop {
            let mut d = lock_dir(&self.dir);
            if let Some(&f) = d.map.get(&key) {
                d.meta[f].pins += 1;
                d.meta[f].referenced = true;
                d.stats.hits += 1;
                return (f, true);
            }
            // CLOCK: two sweeps at most; pinned frames are skipped.
            let n = d.meta.len();
            for _ in 0..2 * n {
                let h = d.hand;
                d.hand = (h + 1) % n;
                let m = &d.meta[h];
                if m.pins > 0 {
                    continue;
                }
                if m.referenced {
                    d.meta[h].referenced = false;
                    continue;
                }
                if d.unmap(h) {
                    d.stats.evictions += 1;
                }
                d.stats.misses += 1;
                d.meta[h].pins = 1;
                return (h, false);
            }
            // Every frame is pinned by a request in progress: wait for one.
            drop(d);
            std::thread::yield_now();
        }
    }

    /// Publish a freshly filled frame (unless another request published the page first).
    fn publish(&self, file: &Arc<CacheFile>, key: Key, f: usize) {
        let mut d = lock_dir(&self.dir);
        if let std::collections::hash_map::Entry::Vacant(e) = d.map.entry(key) {
            e.insert(f);
            file.cached.fetch_add(1, Ordering::Release);
            let m = &mut d.meta[f];
            m.key = Some(key);
            m.owner = Some(Arc::clone(file));
            m.referenced = true;
        }
    }

    fn unpin(&self, f: usize, drop_page: bool) {
        let mut d = lock_dir(&self.dir);
        d.meta[f].pins -= 1;
        if drop_page && d.unmap(f) {
            d.stats.invalidations += 1;
        }
    }

    /// Run `f` on frame `fi` of page `page` of `file`, filling it from the device first when
    /// it is not cached and `fill` is true. `f` returns whether the page must be dropped.
    ///
    /// No frame mutex is held across device I/O (which may poll, and so run callbacks that
    /// use the cache on this very thread): the frame is pinned, its buffer taken out for the
    /// I/O and put back after. Whoever finds a frame's buffer out meets a request in progress on
    /// that page below it on its own stack (the file's range lock keeps other threads out):
    /// [`Frame::take`] refuses rather than wait for it forever.
    fn with_page<R>(
        &self,
        file: &Arc<CacheFile>,
        page: u64,
        fill: bool,
        io: &dyn PageIo,
        f: impl FnOnce(&Frame<'_>) -> Result<(R, bool), DioError>,
    ) -> Result<R, DioError> {
        let key = (file.id, page);
        let (fi, valid) = self.pin(key);
        let frame = Frame(&self.frames[fi]);
        if !valid {
            if fill {
                // Not published yet: nobody else can reach this frame.
                let r = match frame.take() {
                    Ok(buf) => {
                        let (r, buf) = io.read_page(page * PAGE, buf);
                        frame.put(buf);
                        lock_dir(&self.dir).stats.fills += 1;
                        r
                    }
                    Err(e) => Err(e),
                };
                if let Err(e) = r {
                    self.unpin(fi, false);
                    return Err(e);
                }
            }
            self.publish(file, key, fi);
        }
        match f(&frame) {
            Ok((r, drop_page)) => {
                self.unpin(fi, drop_page);
                Ok(r)
            }
            Err(e) => {
                self.unpin(fi, false);
                Err(e)
            }
        }
    }

    /// Copy `[off, off + out.len())` of `file` into `out`.
    pub(crate) fn read(
        &self,
        file: &Arc<CacheFile>,
        io: &dyn PageIo,
        off: u64,
        out: &mut [u8],
    ) -> Result<(), DioError> {
        let mut done = 0usize;
        while done < out.len() {
            let pos = off + done as u64;
            let page = pos / PAGE;
            let in_page = (pos % PAGE) as usize;
            let n = (PAGE as usize - in_page).min(out.len() - done);
            self.with_page(file, page, true, io, |frame| {
                frame.read(in_page, &mut out[done..done + n])?;
                Ok(((), false))
            })?;
            done += n;
        }
        Ok(())
    }

    /// Write `data` at `off` of `file`: into the cached pages, and through to the device (the
    /// whole blocks it touches) before returning.
    pub(crate) fn write(
        &self,
        file: &Arc<CacheFile>,
        io: &dyn PageIo,
        off: u64,
        data: &[u8],
    ) -> Result<(), DioError> {
        let bs = io.block() as usize;
        let mut done = 0usize;
        while done < data.len() {
            let pos = off + done as u64;
            let page = pos / PAGE;
            let in_page = (pos % PAGE) as usize;
            let n = (PAGE as usize - in_page).min(data.len() - done);
            let whole = n == PAGE as usize;
            let wr = self.with_page(file, page, !whole, io, |frame| {
                let mut b = frame.take()?;
                b.as_mut_slice()[in_page..in_page + n].copy_from_slice(&data[done..done + n]);
                let blocks = (in_page / bs * bs)..(in_page + n).div_ceil(bs) * bs;
                let (r, b) = io.write_blocks(page * PAGE, b, blocks);
                frame.put(b);
                let failed = r.is_err();
                Ok((r, failed))
            })?;
            lock_dir(&self.dir).stats.writes += 1;
            wr?;
            done += n;
        }
        Ok(())
    }

    /// Drop every cached page of `file` overlapping `range` (before a direct write to it).
    ///
    /// The caller holds the file's range lock exclusively on the pages of `range`. When the
    /// file's count reads zero, no page of `range` is cached and none can become cached before
    /// the caller releases the lock, so the directory is not touched:
    /// * A page enters the map only through a cache request holding a range lock on it, which
    ///   ours excludes: none during the direct write. One cached before was published (count
    ///   incremented, under the directory lock) by a request that released its range lock
    ///   before we acquired ours: the increment happens before our Acquire load of the count.
    /// * Every change of the count is made under the directory lock, in step with the map, so
    ///   in the count's modification order each value is the file's number of pages in the map
    ///   at that point. Our load returns a value at or after that increment; zero there means
    ///   that page was removed in between (evicted or invalidated), and it cannot come back
    ///   while we hold the lock.
    ///
    /// A count above zero may be for pages outside `range`: then the directory is searched as
    /// before, and finds nothing to drop.
    pub(crate) fn invalidate(&self, file: &CacheFile, range: Range<u64>) {
        if range.is_empty() || file.cached.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut d = lock_dir(&self.dir);
        let (first, last) = (range.start / PAGE, (range.end - 1) / PAGE);
        let mut dropped = 0;
        if last - first < d.map.len() as u64 {
            for p in first..=last {
                if let Some(&f) = d.map.get(&(file.id, p)) {
                    dropped += u64::from(d.unmap(f));
                }
            }
        } else {
            let frames: Vec<usize> = d
                .map
                .iter()
                .filter(|(k, _)| k.0 == file.id && k.1 >= first && k.1 <= last)
                .map(|(_, &f)| f)
                .collect();
            for f in frames {
                dropped += u64::from(d.unmap(f));
            }
        }
        d.stats.invalidations += dropped;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// A device of 64 pages in a Vec, counting its reads and writes.
    struct FakeIo {
        disk: RefCell<Vec<u8>>,
        reads: RefCell<u64>,
        writes: RefCell<Vec<(u64, usize)>>,
        fail_write: RefCell<bool>,
    }

    impl FakeIo {
        fn new() -> Self {
            FakeIo {
                disk: RefCell::new(vec![0; 64 * PAGE as usize]),
                reads: RefCell::new(0),
                writes: RefCell::new(Vec::new()),
                fail_write: RefCell::new(false),
            }
        }
    }

    impl PageIo for FakeIo {
        fn read_page(&self, off: u64, mut buf: DmaBuffer) -> (Result<(), DioError>, DmaBuffer) {
            *self.reads.borrow_mut() += 1;
            let o = off as usize;
            buf.as_mut_slice()
                .copy_from_slice(&self.disk.borrow()[o..o + PAGE as usize]);
            (Ok(()), buf)
        }
        fn write_blocks(
            &self,
            off: u64,
            buf: DmaBuffer,
            range: Range<usize>,
        ) -> (Result<(), DioError>, DmaBuffer) {
            if *self.fail_write.borrow() {
                return (Err(DioError::Io(dio_core::DeviceStatus::new(2, 0x80))), buf);
            }
            let o = off as usize + range.start;
            self.disk.borrow_mut()[o..o + range.len()]
                .copy_from_slice(&buf.as_slice()[range.clone()]);
            self.writes
                .borrow_mut()
                .push((off + range.start as u64, range.len()));
            (Ok(()), buf)
        }
        fn block(&self) -> u64 {
            512
        }
    }

    fn cache(pages: usize) -> PageCache {
        let mem = crate::bus::dma::test_memory();
        PageCache::new(&mem, pages).unwrap()
    }

    #[test]
    fn write_through_writes_only_the_touched_blocks() {
        let (c, io) = (cache(4), FakeIo::new());
        let f1 = CacheFile::new(1);
        c.write(&f1, &io, 1000, &[7; 100]).unwrap();
        assert_eq!(*io.writes.borrow(), vec![(512, 1024)]);
        assert_eq!(&io.disk.borrow()[1000..1100], &[7; 100]);
        // The page was filled first (a partial write), and is now cached: reads hit.
        assert_eq!(*io.reads.borrow(), 1);
        let mut out = [0u8; 100];
        c.read(&f1, &io, 1000, &mut out).unwrap();
        assert_eq!(out, [7; 100]);
        assert_eq!(*io.reads.borrow(), 1);
        // A whole-page write needs no fill.
        c.write(&f1, &io, PAGE, &[9; PAGE as usize]).unwrap();
        assert_eq!(*io.reads.borrow(), 1);
    }

    #[test]
    fn clock_evicts_unreferenced_pages_and_keeps_the_bound() {
        let (c, io) = (cache(2), FakeIo::new());
        let f1 = CacheFile::new(1);
        let mut b = [0u8; 1];
        for p in 0..5 {
            c.read(&f1, &io, p * PAGE, &mut b).unwrap();
        }
        assert_eq!(c.cached(&f1), 2);
        let s = c.stats();
        assert_eq!((s.misses, s.fills, s.evictions), (5, 5, 3));
        // Page 4 was just used: reading it again hits.
        c.read(&f1, &io, 4 * PAGE, &mut b).unwrap();
        assert_eq!(c.stats().hits, 1);
    }

    #[test]
    fn invalidation_drops_overlapping_pages_only() {
        let (c, io) = (cache(8), FakeIo::new());
        let f1 = CacheFile::new(1);
        let mut b = [0u8; 1];
        for p in 0..4 {
            c.read(&f1, &io, p * PAGE, &mut b).unwrap();
        }
        let f2 = CacheFile::new(2);
        c.read(&f2, &io, PAGE, &mut b).unwrap();
        c.invalidate(&f1, PAGE + 10..2 * PAGE + 1);
        assert_eq!(c.cached(&f1), 2);
        assert_eq!(c.cached(&f2), 1);
        // The device changed behind the cache (a direct write): the next read sees it.
        io.disk.borrow_mut()[PAGE as usize] = 42;
        c.read(&f1, &io, PAGE, &mut b).unwrap();
        assert_eq!(b[0], 42);
    }

    #[test]
    fn invalidating_a_file_with_nothing_cached_skips_the_directory() {
        let (c, io) = (cache(4), FakeIo::new());
        let (f1, f2) = (CacheFile::new(1), CacheFile::new(2));
        let mut b = [0u8; 1];
        // Another file's pages do not count against this one.
        c.read(&f2, &io, 0, &mut b).unwrap();
        let before = c.stats().dir_locks;
        c.invalidate(&f1, 0..64 * PAGE);
        // `stats` itself takes the lock once.
        assert_eq!(c.stats().dir_locks, before + 1, "the directory was locked");
        // With a page cached, the directory is searched and the page dropped; the count
        // follows the map through fills, evictions and invalidations.
        c.read(&f1, &io, PAGE, &mut b).unwrap();
        assert_eq!(c.cached(&f1), 1);
        let before = c.stats().dir_locks;
        c.invalidate(&f1, PAGE..PAGE + 1);
        assert!(c.stats().dir_locks > before + 1);
        assert_eq!(c.cached(&f1), 0);
        for p in 0..6 {
            c.read(&f1, &io, p * PAGE, &mut b).unwrap();
        }
        assert_eq!(c.cached(&f1) + c.cached(&f2), 4);
        c.invalidate(&f1, 0..64 * PAGE);
        assert_eq!(c.cached(&f1), 0);
        let before = c.stats().dir_locks;
        c.invalidate(&f1, 0..PAGE);
        assert_eq!(c.stats().dir_locks, before + 1);
    }

    #[test]
    fn a_failed_write_drops_the_page() {
        let (c, io) = (cache(4), FakeIo::new());
        let f1 = CacheFile::new(1);
        let mut b = [0u8; 1];
        c.read(&f1, &io, 0, &mut b).unwrap();
        *io.fail_write.borrow_mut() = true;
        assert!(c.write(&f1, &io, 0, &[5; 10]).is_err());
        assert_eq!(c.cached(&f1), 0);
        *io.fail_write.borrow_mut() = false;
        c.read(&f1, &io, 0, &mut b).unwrap();
        assert_eq!(
            b[0], 0,
            "the failed write's bytes must not be served from the cache"
        );
    }

    /// A device whose writes first run a "callback" (as a run-to-completion poll does) that
    /// reads the same page of the same file through the cache, on the same thread.
    struct PollingIo<'a> {
        dev: FakeIo,
        cache: &'a PageCache,
        file: Arc<CacheFile>,
        /// What the nested reads got.
        nested: RefCell<Vec<Result<(), DioError>>>,
    }

    impl PageIo for PollingIo<'_> {
        fn read_page(&self, off: u64, buf: DmaBuffer) -> (Result<(), DioError>, DmaBuffer) {
            self.dev.read_page(off, buf)
        }
        fn write_blocks(
            &self,
            off: u64,
            buf: DmaBuffer,
            range: Range<usize>,
        ) -> (Result<(), DioError>, DmaBuffer) {
            let r = self
                .cache
                .read(&self.file, &self.dev, off + 8, &mut [0u8; 16]);
            self.nested.borrow_mut().push(r);
            self.dev.write_blocks(off, buf, range)
        }
        fn block(&self) -> u64 {
            self.dev.block()
        }
    }

    /// The I/O of a write-through polls, and a callback it runs reads the very page being
    /// written: refused at once (the frame's buffer is out for the I/O) instead of waiting
    /// forever for the frame's mutex, which the request below it on this stack held.
    #[test]
    fn a_callback_run_by_a_pages_io_is_refused_not_deadlocked() {
        let _w = test_watchdog::arm(test_watchdog::UNIT);
        let c = cache(4);
        let io = PollingIo {
            dev: FakeIo::new(),
            cache: &c,
            file: CacheFile::new(1),
            nested: RefCell::new(Vec::new()),
        };
        io.dev.disk.borrow_mut().fill(3);
        let file = io.file.clone();
        // A partial write (filled first), then a whole-page one.
        c.write(&file, &io, PAGE + 100, &[9; 50]).unwrap();
        c.write(&file, &io, 2 * PAGE, &[5; PAGE as usize]).unwrap();
        let nested = io.nested.borrow().clone();
        assert_eq!(nested, [Err(DioError::Invalid), Err(DioError::Invalid)]);
        // Nothing was left pinned or out: the pages read back, and the cache is whole.
        let mut back = [0u8; 200];
        c.read(&file, &io, PAGE, &mut back).unwrap();
        assert_eq!(&back[..100], &[3; 100]);
        assert_eq!(&back[100..150], &[9; 50]);
        c.read(&file, &io, 2 * PAGE, &mut back).unwrap();
        assert_eq!(back, [5; 200]);
        assert_eq!(c.cached(&file), 2);
        let d = lock_dir(&c.dir);
        assert!(d.meta.iter().all(|m| m.pins == 0), "a frame stayed pinned");
        drop(d);
        assert!(c.frames.iter().all(|f| lock(f).is_some()));
    }
}
