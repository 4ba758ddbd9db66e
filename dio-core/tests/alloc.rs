//! Zero heap allocations per request in the steady state: after a warm-up, one-bio
//! requests through an [`IoCtx`] (sync, and async with SPDK's callback shape
//! [`IoCtx::submit_async_fn`]) allocate nothing, whether the bios are completed on another
//! thread (the submitter parks) or on the submitter's stack (polling in place), and with either
//! reference counting.
//!
//! A counting global allocator counts every allocation of the process while a request runs;
//! this binary has a single test so that nothing else allocates meanwhile. The test doubles
//! use only fixed-capacity queues, std mutexes and condition variables (none of which
//! allocate), and the test thread waits until the completer has *returned* from
//! [`Bio::complete`] before the next request, so that no request overlaps another.
#![cfg(not(loom))]

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use dio_core::{
    Bio, BioSink, Config, DeviceStatus, DioCore, DioError, DioRequest, DioResult, Dir, DmaSegment,
    Extent, File, IoBuf, IoCtx, Mapper, Mode, Poller, RefCounting, Rejected, Submitted, Wait,
};

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; the counter has no
// effect on the memory handed out.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: forwarded with the caller's layout, which satisfies `alloc`'s contract.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: `ptr` and `layout` come from this allocator, which forwards to `System`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const BLOCK: u64 = 512;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The buffer carries the request's context (here: nothing but its length), as SPDK's
/// `cb_arg` would.
struct Buf(u64);
struct Seg;
impl DmaSegment for Seg {
    fn unmap(self) {}
}
impl IoBuf for Buf {
    type Seg = Seg;
    fn len(&self) -> u64 {
        self.0
    }
    fn dma_map(&self, _: u64, _: u64, _: Dir) -> Result<Seg, DioError> {
        Ok(Seg)
    }
    fn zero_fill(&mut self, _: u64, _: u64) {}
}

struct Identity;
impl Mapper for Identity {
    fn map(&self, off: u64, len: u64, _: Dir, _: bool) -> Result<Extent, DioError> {
        Ok(Extent::Mapped {
            lba: off / BLOCK,
            len,
            fresh: false,
        })
    }
}

struct Fixed(u64);
impl File<Buf> for Fixed {
    fn size(&self) -> u64 {
        self.0
    }
    fn extend_to(&self, _: u64) {
        panic!("no request extends the file");
    }
    fn write_buffered(&self, _: u64, _: &Buf, _: std::ops::Range<u64>) -> DioResult {
        panic!("no request falls back to buffered I/O");
    }
}

/// A fixed-capacity queue of bios (never reallocates) with a condition variable, and a count
/// of the bios whose `complete` has returned.
struct Device {
    queue: Mutex<VecDeque<Bio<Buf>>>,
    ready: Condvar,
    ended: Mutex<u64>,
    ended_cv: Condvar,
    stop: AtomicBool,
}

impl Device {
    fn new() -> Arc<Self> {
        Arc::new(Device {
            queue: Mutex::new(VecDeque::with_capacity(16)),
            ready: Condvar::new(),
            ended: Mutex::new(0),
            ended_cv: Condvar::new(),
            stop: AtomicBool::new(false),
        })
    }
    fn end(&self, bio: Bio<Buf>) {
        bio.complete(Ok::<(), DeviceStatus>(()));
        *lock(&self.ended) += 1;
        self.ended_cv.notify_all();
    }
    /// The completer thread.
    fn run(&self) {
        loop {
            let mut q = lock(&self.queue);
            while q.is_empty() && !self.stop.load(Ordering::Acquire) {
                q = self.ready.wait(q).unwrap_or_else(|p| p.into_inner());
            }
            let Some(bio) = q.pop_front() else { return };
            drop(q);
            self.end(bio);
        }
    }
    /// Wait until `n` bios have ended (their `complete` returned).
    fn wait_ended(&self, n: u64) {
        let mut e = lock(&self.ended);
        while *e < n {
            e = self.ended_cv.wait(e).unwrap_or_else(|p| p.into_inner());
        }
    }
}

impl BioSink<Buf> for Device {
    fn submit(&self, bio: Bio<Buf>) -> Result<(), Rejected<Buf>> {
        let mut q = lock(&self.queue);
        assert!(q.len() < q.capacity(), "the test queue would grow");
        q.push_back(bio);
        drop(q);
        self.ready.notify_one();
        Ok(())
    }
}

impl Poller for Device {
    fn poll_once(&self) {
        let bio = lock(&self.queue).pop_front();
        if let Some(bio) = bio {
            self.end(bio);
        }
    }
}

static CALLBACKS: AtomicU64 = AtomicU64::new(0);

fn on_done(res: DioResult, buf: Buf) {
    assert_eq!(res, Ok(buf.0));
    CALLBACKS.fetch_add(1, Ordering::Release);
}

/// Run `n` sync and `n` async one-bio requests (alternating reads and writes) and return the
/// allocations made by the process meanwhile.
fn requests(ctx: &IoCtx<Buf, Fixed>, dev: &Device, poll_in_place: bool, n: u64) -> usize {
    let before = ALLOCS.load(Ordering::Relaxed);
    COUNTING.store(true, Ordering::SeqCst);
    for i in 0..2 * n {
        let dir = if i % 4 < 2 { Dir::Read } else { Dir::Write };
        let offset = (i % 64) * 4096;
        let ended = *lock(&dev.ended);
        if i % 2 == 0 {
            let req = DioRequest::new(dir, offset, 4096, Buf(4096), Mode::Sync);
            let (res, buf) = ctx.submit_sync(req);
            assert_eq!(res, Ok(4096));
            assert_eq!(buf.0, 4096);
        } else {
            let called = CALLBACKS.load(Ordering::Acquire);
            let req = DioRequest::new(dir, offset, 4096, Buf(4096), Mode::Async);
            let how = ctx.submit_async_fn(req, on_done);
            let how = match how {
                Ok(how) => how,
                Err((e, _)) => panic!("refused: {e}"),
            };
            if how == Submitted::Queued && poll_in_place {
                dev.poll_once();
            }
            while CALLBACKS.load(Ordering::Acquire) == called {
                std::hint::spin_loop();
            }
        }
        dev.wait_ended(ended + 1);
    }
    COUNTING.store(false, Ordering::SeqCst);
    ALLOCS.load(Ordering::Relaxed) - before
}

fn scenario(counting: RefCounting, poll_in_place: bool) -> usize {
    let dev = Device::new();
    let completer = (!poll_in_place).then(|| {
        let d = dev.clone();
        std::thread::spawn(move || d.run())
    });
    let cfg = Config {
        align: BLOCK,
        wait: if poll_in_place {
            Wait::PollInPlace(dev.clone())
        } else {
            Wait::Park
        },
        refcount: counting,
        ..Config::default()
    };
    // The trait-object mapper (the default); the unit tests use a concrete one.
    let mapper: Arc<dyn Mapper> = Arc::new(Identity);
    let core = DioCore::new(dev.clone(), mapper, cfg);
    let ctx = IoCtx::new(core, Fixed(1 << 30));
    // Warm-up: fills the request-state pool and every lazily allocated thread-local.
    requests(&ctx, &dev, poll_in_place, 64);
    let allocs = requests(&ctx, &dev, poll_in_place, 1000);
    dev.stop.store(true, Ordering::Release);
    dev.ready.notify_all();
    if let Some(t) = completer {
        t.join().unwrap();
    }
    allocs
}

#[test]
fn steady_state_requests_allocate_nothing() {
    let mut report = vec![];
    for counting in [RefCounting::Locked, RefCounting::Atomic] {
        for poll_in_place in [false, true] {
            let allocs = scenario(counting, poll_in_place);
            report.push((counting, poll_in_place, allocs));
        }
    }
    assert!(
        report.iter().all(|r| r.2 == 0),
        "allocations in 2000 steady-state requests (counting, poll in place, allocations): \
         {report:?}"
    );
}
