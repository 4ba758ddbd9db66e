//! A device that keeps only the small completion handle of each bio ([`Bio::split`]): the
//! command half tells it what to do, the handle completes the bio, and a command it refuses is
//! rejoined with its handle and handed back whole. The requests must end exactly as with whole
//! bios: every reference given back once, the refused bio retried unchanged, a device error
//! reported, an async completion run once.
#![cfg(not(loom))]

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use dio_core::{
    Bio, BioHandle, BioOp, BioSink, Config, DeviceStatus, DioCore, DioError, DioRequest, DioResult,
    Dir, DmaSegment, Extent, File, IoBuf, IoCtx, Mapper, Mode, Poller, RefCounting, Rejected,
    Submitted, Wait,
};

const BLOCK: u64 = 512;
/// Every extent of the mapper covers this many bytes, so a request of `n * EXTENT` bytes is
/// `n` bios.
const EXTENT: u64 = 2 * BLOCK;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct Buf(u64);
/// A segment that only names the buffer offset it starts at; its unmap does nothing.
struct Seg(u64);
impl DmaSegment for Seg {
    const NOOP_UNMAP: bool = true;
    fn unmap(self) {}
}
impl IoBuf for Buf {
    type Seg = Seg;
    fn len(&self) -> u64 {
        self.0
    }
    fn dma_map(&self, off: u64, _: u64, _: Dir) -> Result<Seg, DioError> {
        Ok(Seg(off))
    }
    fn zero_fill(&mut self, _: u64, _: u64) {}
}

/// File offset `off` lives at block `1000 + off / BLOCK`, in extents of [`EXTENT`] bytes.
struct Extents;
impl Mapper for Extents {
    fn map(&self, off: u64, len: u64, _: Dir, _: bool) -> Result<Extent, DioError> {
        Ok(Extent::Mapped {
            lba: 1000 + off / BLOCK,
            len: len.min(EXTENT - off % EXTENT),
            fresh: false,
        })
    }
}

struct Fixed;
impl File<Buf> for Fixed {
    fn size(&self) -> u64 {
        1 << 30
    }
    fn extend_to(&self, _: u64) {
        panic!("no request extends the file");
    }
    fn write_buffered(&self, _: u64, _: &Buf, _: std::ops::Range<u64>) -> DioResult {
        panic!("no request falls back to buffered I/O");
    }
}

/// What the device saw of one command: `(op, lba, file offset, len, segment offset)`.
type Seen = (BioOp, u64, u64, u64, Option<u64>);

/// Holds at most `depth` handles; a command beyond that is refused (`QueueFull`) after it was
/// split, so it goes back through [`BioHandle::rejoin`]. Polling completes the oldest handle,
/// with `error` if set.
struct SplitDev {
    depth: usize,
    held: Mutex<VecDeque<BioHandle<Buf>>>,
    accepted: Mutex<Vec<Seen>>,
    refused: Mutex<Vec<Seen>>,
    error: Option<DeviceStatus>,
}

impl SplitDev {
    fn new(depth: usize, error: Option<DeviceStatus>) -> Arc<Self> {
        Arc::new(SplitDev {
            depth,
            held: Mutex::new(VecDeque::new()),
            accepted: Mutex::new(Vec::new()),
            refused: Mutex::new(Vec::new()),
            error,
        })
    }
}

impl BioSink<Buf> for SplitDev {
    fn submit(&self, bio: Bio<Buf>) -> Result<(), Rejected<Buf>> {
        let (cmd, handle) = bio.split();
        let seen = (
            cmd.op(),
            cmd.lba(),
            cmd.file_offset(),
            cmd.len(),
            cmd.segment().map(|s| s.0),
        );
        let mut held = lock(&self.held);
        if held.len() == self.depth {
            lock(&self.refused).push(seen);
            let bio = handle.rejoin(cmd);
            return Err(Rejected {
                bio,
                why: DioError::QueueFull,
            });
        }
        lock(&self.accepted).push(seen);
        held.push_back(handle);
        Ok(())
    }
}

impl Poller for SplitDev {
    fn poll_once(&self) {
        let h = lock(&self.held).pop_front();
        if let Some(h) = h {
            h.complete(self.error.map_or(Ok(()), Err));
        }
    }
}

fn ctx(dev: &Arc<SplitDev>, counting: RefCounting) -> IoCtx<Buf, Fixed> {
    let cfg = Config {
        align: BLOCK,
        wait: Wait::PollInPlace(dev.clone()),
        refcount: counting,
        ..Config::default()
    };
    IoCtx::new(DioCore::new(dev.clone(), Arc::new(Extents), cfg), Fixed)
}

/// The command of the bio at byte `at` of a request at `offset`.
fn expected(op: BioOp, offset: u64, at: u64) -> Seen {
    (
        op,
        1000 + (offset + at) / BLOCK,
        offset + at,
        EXTENT,
        Some(at),
    )
}

#[test]
fn split_bios_complete_each_reference_once_and_rejoin_unchanged() {
    let _w = test_watchdog::arm(test_watchdog::UNIT);
    for counting in [RefCounting::Locked, RefCounting::Atomic] {
        for (dir, op) in [(Dir::Read, BioOp::Read), (Dir::Write, BioOp::Write)] {
            // Four bios on a device that holds two: the third is refused, rejoined, and
            // resubmitted (throttle) once the submitter's poll completed the first.
            let dev = SplitDev::new(2, None);
            let c = ctx(&dev, counting);
            let offset = 8 * EXTENT;
            let req = DioRequest::new(dir, offset, 4 * EXTENT, Buf(4 * EXTENT), Mode::Sync);
            let (res, buf) = c.submit_sync(req);
            assert_eq!(res, Ok(4 * EXTENT), "{counting:?} {dir:?}");
            assert_eq!(buf.0, 4 * EXTENT);
            let want: Vec<Seen> = (0..4).map(|i| expected(op, offset, i * EXTENT)).collect();
            assert_eq!(*lock(&dev.accepted), want, "{counting:?} {dir:?}");
            let refused = lock(&dev.refused).clone();
            assert!(!refused.is_empty(), "the device never refused a command");
            // Every refused command came back whole: it is one of the request's commands, and
            // it was accepted later exactly as it was refused.
            for r in &refused {
                assert!(want.contains(r), "a rejoined bio changed: {r:?}");
            }
            assert!(lock(&dev.held).is_empty(), "a handle was not completed");
        }
    }
}

#[test]
fn split_handle_reports_the_device_error() {
    let _w = test_watchdog::arm(test_watchdog::UNIT);
    let st = DeviceStatus::new(0, 0x81);
    for counting in [RefCounting::Locked, RefCounting::Atomic] {
        let dev = SplitDev::new(8, Some(st));
        let c = ctx(&dev, counting);
        let (res, _) = c.submit_sync(DioRequest::new(
            Dir::Read,
            0,
            2 * EXTENT,
            Buf(2 * EXTENT),
            Mode::Sync,
        ));
        assert_eq!(res, Err(DioError::Io(st)), "{counting:?}");
        assert!(lock(&dev.held).is_empty());
    }
}

static CALLED: AtomicU64 = AtomicU64::new(0);

fn on_done(res: DioResult, buf: Buf) {
    assert_eq!(res, Ok(buf.0));
    CALLED.fetch_add(1, Ordering::SeqCst);
}

#[test]
fn split_handle_runs_an_async_completion_once() {
    let _w = test_watchdog::arm(test_watchdog::UNIT);
    for counting in [RefCounting::Locked, RefCounting::Atomic] {
        let dev = SplitDev::new(8, None);
        let c = ctx(&dev, counting);
        let before = CALLED.load(Ordering::SeqCst);
        let how = c
            .submit_async_fn(
                DioRequest::new(Dir::Read, 0, 3 * EXTENT, Buf(3 * EXTENT), Mode::Async),
                on_done,
            )
            .unwrap_or_else(|(e, _)| panic!("refused: {e}"));
        assert_eq!(how, Submitted::Queued);
        assert_eq!(lock(&dev.held).len(), 3);
        for left in (0..3).rev() {
            assert_eq!(CALLED.load(Ordering::SeqCst), before, "completed early");
            dev.poll_once();
            assert_eq!(lock(&dev.held).len(), left);
        }
        assert_eq!(CALLED.load(Ordering::SeqCst), before + 1, "{counting:?}");
    }
}
