//! Per-request cost of the lock-protected refcount against the atomic variant (§3.13), with
//! completions arriving on another thread (a poller fed through a channel).
//!
//! Each measured request is an async read of `n` bios that is queued; the poller thread
//! completes the bios; the time is taken over a pipeline of requests, until the last
//! completion has run. The callback is a plain function (`Completion::from_fn`), so a request
//! allocates nothing of its own: what is measured is dio-core's per-request cost.
//!
//! A second group, `inline`, completes the bios on the submitter's thread (polling in place),
//! sync and async: dio-core's own per-request work without any thread hand-off.
//!
//! `cargo bench -p dio-core`

#[cfg(not(loom))]
mod bench {
    use std::collections::VecDeque;
    use std::hint::black_box;
    use std::sync::Arc;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    use criterion::{BenchmarkId, Criterion, Throughput};
    use dio_core::{
        Bio, BioSink, Completion, Config, DioCore, DioError, DioRequest, DioResult, Dir,
        DmaSegment, Extent, IoBuf, Mapper, Mode, Outcome, Poller, RefCounting, Rejected, Wait,
    };

    const BIO: u64 = 4096;

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
                lba: off / 512,
                len: len.min(BIO),
                fresh: false,
            })
        }
    }

    /// Hands bios to the poller thread.
    struct ToPoller(mpsc::Sender<Bio<Buf>>);
    impl BioSink<Buf> for ToPoller {
        fn submit(&self, bio: Bio<Buf>) -> Result<(), Rejected<Buf>> {
            self.0.send(bio).map_err(|e| Rejected {
                bio: e.0,
                why: DioError::QueueFull,
            })
        }
    }

    /// Completed requests. SPDK's callback shape: a plain function, no allocation.
    static DONE: AtomicU64 = AtomicU64::new(0);

    fn on_done(r: DioResult, buf: Buf) {
        black_box((r.ok(), buf.0));
        DONE.fetch_add(1, Ordering::Release);
    }

    fn run(c: &mut Criterion) {
        let mut g = c.benchmark_group("per_request");
        g.measurement_time(Duration::from_secs(3))
            .warm_up_time(Duration::from_secs(1));
        g.throughput(Throughput::Elements(1));
        for bios in [1u64, 4, 16] {
            for (name, counting) in [
                ("lock", RefCounting::Locked),
                ("atomic", RefCounting::Atomic),
            ] {
                let (tx, rx) = mpsc::channel::<Bio<Buf>>();
                let poller = std::thread::spawn(move || {
                    for bio in rx {
                        bio.complete(Ok(()));
                    }
                });
                let cfg = Config {
                    refcount: counting,
                    ..Config::default()
                };
                let core = DioCore::new(Arc::new(ToPoller(tx)), Arc::new(Identity), cfg);
                g.bench_with_input(BenchmarkId::new(name, bios), &bios, |b, &bios| {
                    b.iter_custom(|iters| {
                        let base = DONE.load(Ordering::Acquire);
                        let start = Instant::now();
                        for i in 0..iters {
                            let req = DioRequest::new(
                                Dir::Read,
                                i * 65536,
                                bios * BIO,
                                Buf(bios * BIO),
                                Mode::Async,
                            );
                            let cb = Completion::from_fn(on_done);
                            match core.submit(req, u64::MAX, cb) {
                                Outcome::Queued => {}
                                // Every bio completed before the submitter's final drop.
                                Outcome::Done {
                                    result,
                                    buf,
                                    completion,
                                } => completion.complete(result, buf),
                                Outcome::Fallback { .. } => unreachable!("reads never fall back"),
                            }
                        }
                        while DONE.load(Ordering::Acquire) - base < iters {
                            std::hint::spin_loop();
                        }
                        start.elapsed()
                    })
                });
                drop(core);
                poller.join().unwrap();
            }
        }
        g.finish();
    }

    /// The device completed on the submitter's own thread: bios queue up locally and are
    /// completed by polling in place (the run-to-completion model). No thread hand-off, so
    /// this measures dio-core's own work per request (and, under an instruction counter, is
    /// deterministic).
    #[derive(Default)]
    struct Inline(Mutex<VecDeque<Bio<Buf>>>);
    impl BioSink<Buf> for Inline {
        fn submit(&self, bio: Bio<Buf>) -> Result<(), Rejected<Buf>> {
            self.0.lock().unwrap().push_back(bio);
            Ok(())
        }
    }
    impl Poller for Inline {
        fn poll_once(&self) {
            let bio = self.0.lock().unwrap().pop_front();
            if let Some(bio) = bio {
                bio.complete(Ok(()));
            }
        }
    }

    fn inline_core(counting: RefCounting) -> (Arc<Inline>, DioCore<Buf>) {
        let dev = Arc::new(Inline::default());
        let cfg = Config {
            refcount: counting,
            wait: Wait::PollInPlace(dev.clone()),
            ..Config::default()
        };
        (dev.clone(), DioCore::new(dev, Arc::new(Identity), cfg))
    }

    /// `n` requests of `bios` bios each, one after another.
    fn inline_requests(core: &DioCore<Buf>, dev: &Inline, n: u64, mode: Mode, bios: u64) {
        for i in 0..n {
            let len = bios * BIO;
            let req = DioRequest::new(Dir::Read, (i % 1024) * 65536, len, Buf(len), mode);
            match core.submit(req, u64::MAX, Completion::from_fn(on_done)) {
                Outcome::Queued => {
                    while !dev.0.lock().unwrap().is_empty() {
                        dev.poll_once();
                    }
                }
                Outcome::Done {
                    result,
                    buf,
                    completion,
                } => completion.complete(result, buf),
                Outcome::Fallback { .. } => unreachable!("reads never fall back"),
            }
        }
    }

    /// The test double alone, without dio-core, for the counting mode (`harness`): per request
    /// what the double does around dio-core's work: build the request, one mapper call and one
    /// bio-sized push into the inline queue (both through trait objects, as dio-core makes
    /// them), one poll that pops it, for an async request the caller's two emptiness checks,
    /// and one call of the completion function. dio-core's own cost is the inline count minus
    /// this one (the double's queue is a std mutex around a deque, about half of the total).
    fn harness_requests(n: u64, mode: Mode, bios: u64) {
        struct FakeBio([u64; 5]);
        trait Sink: Send + Sync {
            fn submit(&self, bio: FakeBio) -> Result<(), FakeBio>;
        }
        #[derive(Default)]
        struct Queue(Mutex<VecDeque<FakeBio>>);
        impl Sink for Queue {
            fn submit(&self, bio: FakeBio) -> Result<(), FakeBio> {
                self.0.lock().unwrap().push_back(bio);
                Ok(())
            }
        }
        impl Poller for Queue {
            fn poll_once(&self) {
                let bio = self.0.lock().unwrap().pop_front();
                if let Some(bio) = bio {
                    black_box(bio.0);
                }
            }
        }
        let q = Arc::new(Queue::default());
        let sink: Arc<dyn Sink> = q.clone();
        let poller: Arc<dyn Poller> = q.clone();
        let mapper: Arc<dyn Mapper> = Arc::new(Identity);
        for i in 0..n {
            let len = bios * BIO;
            let req = black_box(DioRequest::new(
                Dir::Read,
                (i % 1024) * 65536,
                len,
                Buf(len),
                mode,
            ));
            let mut pos = req.offset;
            for _ in 0..bios {
                let Ok(Extent::Mapped { lba, len, .. }) = mapper.map(pos, BIO, Dir::Read, false)
                else {
                    unreachable!("the identity mapper maps everything");
                };
                let _ = sink.submit(FakeBio([lba, pos, len, 0, 0]));
                pos += len;
            }
            if mode == Mode::Async {
                while !q.0.lock().unwrap().is_empty() {
                    poller.poll_once();
                }
            } else {
                for _ in 0..bios {
                    poller.poll_once();
                }
            }
            let cb: fn(DioResult, Buf) = black_box(on_done);
            cb(Ok(len), req.buf);
        }
    }

    const INLINE: [(&str, RefCounting, Mode); 4] = [
        ("lock_sync", RefCounting::Locked, Mode::Sync),
        ("lock_async", RefCounting::Locked, Mode::Async),
        ("atomic_sync", RefCounting::Atomic, Mode::Sync),
        ("atomic_async", RefCounting::Atomic, Mode::Async),
    ];

    fn inline(c: &mut Criterion) {
        let mut g = c.benchmark_group("inline");
        g.measurement_time(Duration::from_secs(2))
            .warm_up_time(Duration::from_secs(1));
        g.throughput(Throughput::Elements(1));
        for bios in [1u64, 4] {
            for (name, counting, mode) in INLINE {
                let (dev, core) = inline_core(counting);
                g.bench_with_input(BenchmarkId::new(name, bios), &bios, |b, &bios| {
                    b.iter_custom(|iters| {
                        let start = Instant::now();
                        inline_requests(&core, &dev, iters, mode, bios);
                        start.elapsed()
                    })
                });
            }
        }
        g.finish();
    }

    criterion::criterion_group!(benches, run, inline);
    pub fn main() {
        // `DIO_BENCH_COUNT=<requests>:<inline name>:<bios>`: run exactly that many inline
        // requests (after 1000 of warm-up) and exit, for an instruction counter (e.g.
        // `valgrind --tool=callgrind`; the difference between two counts, divided by the
        // difference in requests, is the instructions per request). The names
        // `harness_sync` and `harness_async` run the test double alone (`harness_requests`).
        if let Ok(spec) = std::env::var("DIO_BENCH_COUNT") {
            let mut it = spec.split(':');
            let n: u64 = it.next().and_then(|v| v.parse().ok()).expect("requests");
            let name = it.next().expect("inline name");
            let bios: u64 = it.next().and_then(|v| v.parse().ok()).expect("bios");
            if let Some(mode) = name.strip_prefix("harness_") {
                let mode = if mode == "sync" {
                    Mode::Sync
                } else {
                    Mode::Async
                };
                harness_requests(1000, mode, bios);
                harness_requests(n, mode, bios);
                return;
            }
            let (_, counting, mode) = *INLINE.iter().find(|c| c.0 == name).expect("known name");
            let (dev, core) = inline_core(counting);
            inline_requests(&core, &dev, 1000, mode, bios);
            inline_requests(&core, &dev, n, mode, bios);
            return;
        }
        benches();
        Criterion::default().configure_from_args().final_summary();
    }
}

#[cfg(not(loom))]
fn main() {
    bench::main();
}

#[cfg(loom)]
fn main() {}
