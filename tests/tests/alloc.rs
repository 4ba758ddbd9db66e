//! Zero heap allocations per request on the direct path, in the steady state, proven with a
//! counting global allocator (its own test binary: the allocator is process-wide).
//!
//! After a warm-up (first-use allocations: thread-locals, pools, the waiter of a thread), N
//! synchronous reads, N synchronous writes and N asynchronous submits (reads and writes, the
//! callback capturing an `Arc` and an index) of 4 KiB block-aligned DMA buffers must allocate
//! nothing (and N refused submits nothing but the `Box<Refused>` each hands back: the
//! refused request's context is recycled), on the inline emulated controller, run to completion, through one pooled poller
//! thread, and through one pooled poller with the callbacks deferred to a `CompletionThread`. Every allocation of every thread is counted while a phase runs; a failure
//! prints how many there were and their sizes.
//!
//! The emulated controller is in inline mode with a null namespace, so the device model itself
//! moves no data and allocates nothing per command.
//!
//! The synchronous maintenance operations (write zeroes without ONCS Write Zeroes, which writes
//! a zeroed buffer; deallocate; flush) allocate nothing either: their DMA buffers are the
//! file's spares, allocated when it was opened, and their commands are never listed.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use dioxide::emulated::{EmulatedConfig, EmulatedController, Mode, NamespaceConfig};
use dioxide::spec::Oncs;
use dioxide::{
    BlockFile, CompletionThread, Controller, Dioxide, FileOptions, IoBuffer, Nsid, Request,
};

/// Counts allocations while `ON`; keeps the sizes of the first few (without allocating).
struct Counting;

static ON: AtomicBool = AtomicBool::new(false);
static COUNT: AtomicUsize = AtomicUsize::new(0);
static BYTES: AtomicUsize = AtomicUsize::new(0);
const KEPT: usize = 32;
static SIZES: [AtomicUsize; KEPT] = [const { AtomicUsize::new(0) }; KEPT];

impl Counting {
    fn note(size: usize) {
        if ON.load(Ordering::Relaxed) {
            let i = COUNT.fetch_add(1, Ordering::Relaxed);
            BYTES.fetch_add(size, Ordering::Relaxed);
            if i < KEPT {
                SIZES[i].store(size, Ordering::Relaxed);
            }
        }
    }
}

// SAFETY: every call is forwarded unchanged to the system allocator; the bookkeeping only
// touches atomics (it never allocates, so it cannot recurse).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        Counting::note(layout.size());
        // SAFETY: forwarded with the caller's layout, under the caller's contract.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        Counting::note(layout.size());
        // SAFETY: as `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        Counting::note(new_size);
        // SAFETY: forwarded unchanged; `ptr` and `layout` come from this allocator, i.e. from
        // `System`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` with `layout` (every allocation is forwarded).
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// The allocations of `f` (all threads): `(count, bytes, first sizes)`.
fn count(f: impl FnOnce()) -> (usize, usize, Vec<usize>) {
    COUNT.store(0, Ordering::SeqCst);
    BYTES.store(0, Ordering::SeqCst);
    ON.store(true, Ordering::SeqCst);
    f();
    ON.store(false, Ordering::SeqCst);
    let n = COUNT.load(Ordering::SeqCst);
    let sizes = SIZES[..n.min(KEPT)]
        .iter()
        .map(|s| s.load(Ordering::SeqCst))
        .collect();
    (n, BYTES.load(Ordering::SeqCst), sizes)
}

const N: usize = 512;
const QD: usize = 8;
const BS: usize = 4096;

fn ctrl() -> Controller {
    let emu = EmulatedController::new(EmulatedConfig {
        mode: Mode::Inline,
        namespaces: vec![NamespaceConfig::null(512, 1 << 21)],
        ..EmulatedConfig::default()
    })
    .expect("emulated controller");
    Controller::new(emu).expect("bring-up")
}

/// The requests of one phase, over a file with nothing cached.
struct Load<'a> {
    file: &'a BlockFile,
    /// Reaps completions (run to completion: `Dioxide::poll`; pollers: nothing to do).
    reap: &'a dyn Fn(),
    bufs: Vec<Option<IoBuffer>>,
    /// Buffers handed back by callbacks (capacity reserved: pushing never allocates).
    back: Arc<Mutex<Vec<(usize, IoBuffer)>>>,
}

impl Load<'_> {
    fn sync_reads(&mut self) {
        for i in 0..N {
            let b = self.bufs[0].take().unwrap();
            let (r, b) = self.file.read(b, (i % 64 * BS) as u64, BS);
            assert_eq!(r.unwrap(), BS);
            self.bufs[0] = Some(b);
        }
    }

    fn sync_writes(&mut self) {
        for i in 0..N {
            let b = self.bufs[0].take().unwrap();
            let (r, b) = self.file.write(b, (i % 64 * BS) as u64, BS);
            assert_eq!(r.unwrap(), BS);
            self.bufs[0] = Some(b);
        }
    }

    /// N submits, QD at a time; the callback captures an `Arc` and an index.
    fn async_submits(&mut self) {
        let mut done = 0;
        while done < N {
            for (i, slot) in self.bufs.iter_mut().enumerate() {
                let buf = slot.take().unwrap();
                let off = ((done + i) % 64 * BS) as u64;
                let req = if (done + i) % 2 == 0 {
                    Request::read(off, buf)
                } else {
                    Request::write(off, buf)
                };
                let back = Arc::clone(&self.back);
                self.file
                    .submit(req, move |c| {
                        assert_eq!(c.result.unwrap(), BS);
                        back.lock().unwrap().push((i, c.buf));
                    })
                    .unwrap();
            }
            loop {
                (self.reap)();
                let mut back = self.back.lock().unwrap();
                if back.len() == QD {
                    for (i, b) in back.drain(..) {
                        self.bufs[i] = Some(b);
                    }
                    break;
                }
                drop(back);
                std::thread::yield_now();
            }
            done += QD;
        }
    }

    /// N submits refused at once (a write beyond the file's capacity): the buffer comes back
    /// in the `Box<Refused>` (its one allocation); the request's context goes back to the pool.
    fn refused_submits(&mut self) {
        for _ in 0..N {
            let buf = self.bufs[0].take().unwrap();
            let r = self
                .file
                .submit(Request::write(u64::MAX - 1, buf), |_| {
                    panic!("a refused request's callback ran")
                })
                .expect_err("beyond the capacity");
            assert!(matches!(
                r.error,
                dioxide::EmbedError::BeyondCapacity { .. }
            ));
            self.bufs[0] = Some(r.buf);
        }
    }
}

/// Measured rounds of each kind (see `check`).
const ROUNDS: usize = 4;

/// Warm up, then count each kind of request; what allocated, as messages.
fn check(engine: &str, dx: &Dioxide, reap: &dyn Fn()) -> Vec<String> {
    // 256 KiB file, all of it written once so reads are not clamped.
    let file = dx
        .open_file(
            0,
            Nsid(1),
            FileOptions::new(0, 1 << 12).with_len(64 * BS as u64),
        )
        .unwrap();
    let mut load = Load {
        file: &file,
        reap,
        bufs: (0..QD)
            .map(|_| Some(IoBuffer::Dma(file.alloc(BS).unwrap())))
            .collect(),
        back: Arc::new(Mutex::new(Vec::with_capacity(QD))),
    };
    for _ in 0..2 {
        load.sync_reads();
        load.sync_writes();
        load.async_submits();
        load.refused_submits();
    }
    let mut failures = Vec::new();
    for (k, name) in [
        "synchronous reads",
        "synchronous writes",
        "asynchronous submits",
        "refused asynchronous submits",
    ]
    .into_iter()
    .enumerate()
    {
        // A pool may still grow once in a measured round: a request's callback hands its
        // buffer back before the poller has dropped the request's pooled state, so the next
        // round can find the pool one state short. That growth is bounded; an allocation per
        // request is not: it shows in every round. So a kind passes when one of a few rounds
        // allocates nothing.
        // A refusal allocates its `Box<Refused>`, nothing more.
        let allowed = if k == 3 { N } else { 0 };
        let mut rounds = Vec::new();
        for _ in 0..ROUNDS {
            let (n, bytes, sizes) = count(|| match k {
                0 => load.sync_reads(),
                1 => load.sync_writes(),
                2 => load.async_submits(),
                _ => load.refused_submits(),
            });
            println!("{engine}: {N} {name}: {n} allocations, {bytes} bytes");
            if n <= allowed {
                break;
            }
            rounds.push(format!("{n} times ({bytes} bytes; first sizes {sizes:?})"));
        }
        if rounds.len() == ROUNDS {
            failures.push(format!(
                "{engine}: {N} {name} allocated more than {allowed} times in each of {ROUNDS} \
                 rounds: {}; the direct path must not allocate per request (dio-core's request \
                 states, the request contexts of the file, also of a refused request, and small \
                 callbacks are all reused or inline)",
                rounds.join(", ")
            ));
        }
    }
    failures
}

/// Warm up, then count synchronous write zeroes (a zeroed buffer written: the controller
/// lacks ONCS Write Zeroes), deallocates and flushes (a volatile write cache: sent); what
/// allocated, as messages.
fn check_maintenance() -> Vec<String> {
    let emu = EmulatedController::new(EmulatedConfig {
        mode: Mode::Inline,
        namespaces: vec![NamespaceConfig::null(512, 1 << 21)],
        oncs: Oncs::DSM,
        vwc: true,
        ..EmulatedConfig::default()
    })
    .expect("emulated controller");
    let dx = Dioxide::builder()
        .controller(Controller::new(emu).expect("bring-up"))
        .run_to_completion()
        .build()
        .unwrap();
    let file = dx
        .open_file(0, Nsid(1), FileOptions::new(0, 1 << 12).with_len(1 << 20))
        .unwrap();
    assert!(!file.supports_write_zeroes() && file.supports_deallocate());
    let ops = |k: usize| {
        for i in 0..N as u64 {
            let at = i % 64 * BS as u64;
            match k {
                0 => file.write_zeroes(at, 2 * BS as u64).unwrap(),
                1 => file
                    .deallocate(&[at..at + BS as u64, at + 2 * BS as u64..at + 3 * BS as u64])
                    .unwrap(),
                _ => file.flush().unwrap(),
            }
        }
    };
    for k in 0..3 {
        ops(k);
    }
    let mut failures = Vec::new();
    for (k, name) in ["write zeroes", "deallocates", "flushes"]
        .into_iter()
        .enumerate()
    {
        let (n, bytes, sizes) = count(|| ops(k));
        println!("maintenance: {N} synchronous {name}: {n} allocations, {bytes} bytes");
        if n != 0 {
            failures.push(format!(
                "maintenance: {N} synchronous {name} allocated {n} times ({bytes} bytes; first \
                 sizes {sizes:?}); they must use the file's spare DMA buffers and list no commands"
            ));
        }
    }
    drop(file);
    dx.shutdown();
    failures
}

/// One test (the counter is process-wide: a second test running in parallel would pollute it).
#[test]
fn the_direct_path_allocates_nothing() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    let dx = Dioxide::builder()
        .controller(ctrl())
        .run_to_completion()
        .build()
        .unwrap();
    let mut failures = check("run to completion", &dx, &|| {
        dx.poll();
    });
    dx.shutdown();
    let dx = Dioxide::builder()
        .controller(ctrl())
        .pollers([None])
        .build()
        .unwrap();
    failures.extend(check("one pooled poller", &dx, &|| {}));
    dx.shutdown();
    // Deferred completions: the callbacks run on a CompletionThread, each handed over as
    // dio-core's pooled `Deferred` (no box, no channel node).
    let ct = CompletionThread::spawn("alloc-completions").unwrap();
    let dx = Dioxide::builder()
        .controller(ctrl())
        .pollers([None])
        .deferred_completions(ct.clone())
        .build()
        .unwrap();
    failures.extend(check(
        "one pooled poller, deferred completions",
        &dx,
        &|| {},
    ));
    dx.shutdown();
    ct.stop();
    failures.extend(check_maintenance());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
