//! Per-request cost of the lock-protected refcount against the atomic variant (§3.13), with
//! completions arriving on another thread (a poller fed through a channel).
//!
//! Each measured request is an async read of `n` bios that is queued; the poller thread
//! completes the bios; the time is taken over a pipeline of requests, until the last
//! completion has run.
//!
//! `cargo bench -p dio-core`

#[cfg(not(loom))]
mod bench {
    use std::hint::black_box;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    use criterion::{BenchmarkId, Criterion, Throughput};
    use dio_core::{
        Bio, BioSink, Completion, Config, DioCore, DioError, DioRequest, Dir, DmaSegment, Extent,
        IoBuf, Mapper, Mode, Outcome, RefCounting, Rejected,
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
                let done = Arc::new(AtomicU64::new(0));
                g.bench_with_input(BenchmarkId::new(name, bios), &bios, |b, &bios| {
                    b.iter_custom(|iters| {
                        let base = done.load(Ordering::Acquire);
                        let start = Instant::now();
                        for i in 0..iters {
                            let d = done.clone();
                            let req = DioRequest::new(
                                Dir::Read,
                                i * 65536,
                                bios * BIO,
                                Buf(bios * BIO),
                                Mode::Async,
                            );
                            let cb = Completion::new(move |r, _| {
                                black_box(r.ok());
                                d.fetch_add(1, Ordering::Release);
                            });
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
                        while done.load(Ordering::Acquire) - base < iters {
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

    criterion::criterion_group!(benches, run);
    pub fn main() {
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
