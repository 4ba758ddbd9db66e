//! The cost dio-core and the embedding layer add per request: the dio path (`BlockFile`)
//! against the raw queue-pair path, on the inline emulated controller with a null namespace
//! (no data moved), 4 KiB reads. Both sides of every pair pay the same harness costs: buffers
//! are preallocated, an asynchronous completion puts its buffer back into a preallocated slot
//! and bumps an atomic count ([`Slots`]), no allocation, lock or `Arc` clone per request.
//!
//! * `qd1_sync`: `BlockFile::read` (DMA buffer, zero copy, run to completion) vs
//!   `QueuePair::read_blocking`.
//! * `qd32_async`: 32 × `BlockFile::submit` then `Dioxide::poll` until all complete (run to
//!   completion), vs 32 × `QueuePair::read` then `poll`.
//! * `qd1_sync_pollers`: `BlockFile::read` through one pinned poller thread, vs a minimal
//!   hand-off: a thread pinned the same way owns a raw queue pair and serves a lock-free ring;
//!   the client spins on the completion count. The difference is the embedding layer's cost
//!   over the bare cross-thread hand-off.
//! * `qd32_pollers_2clients`: two client threads, each keeping 32 asynchronous reads in flight
//!   (submit 32, wait for the 32 completions, repeat), through one pinned poller, vs the same
//!   against the raw hand-off thread. Throughput counts the reads of both clients.

use std::cell::UnsafeCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use crossbeam_queue::ArrayQueue;
use dioxide::emulated::{EmulatedConfig, EmulatedController, Mode, NamespaceConfig};
use dioxide::{
    BlockFile, Controller, Dioxide, DmaBuffer, DmaOwner, DmaSlice, FileOptions, IoBuffer, Lba,
    Nsid, QueueOptions, Request,
};

const QD: usize = 32;

fn ctrl() -> Controller {
    let emu = EmulatedController::new(EmulatedConfig {
        mode: Mode::Inline,
        namespaces: vec![NamespaceConfig::null(512, 1 << 21)],
        ..EmulatedConfig::default()
    })
    .expect("emulated controller");
    Controller::new(emu).expect("bring-up")
}

/// The core a poller (or the raw hand-off thread) is pinned to: the last one.
fn poller_core() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()) - 1
}

/// Where completions land: one slot per request in flight and a count of completions.
struct Slots<T> {
    cells: Box<[UnsafeCell<Option<T>>]>,
    done: AtomicUsize,
    failed: AtomicUsize,
}

// SAFETY: slot `i` is used by one party at a time: the client takes its value out before it
// issues request `i`, the completion of request `i` (one, on whatever thread) puts a value back
// and then bumps `done` (Release); the client touches the slot again only after it has seen
// `done` count that completion (Acquire). `T: Send` moves between those threads.
unsafe impl<T: Send> Sync for Slots<T> {}

impl<T> Slots<T> {
    fn new(items: impl IntoIterator<Item = T>) -> &'static Slots<T> {
        let cells: Box<[_]> = items
            .into_iter()
            .map(|t| UnsafeCell::new(Some(t)))
            .collect();
        Box::leak(Box::new(Slots {
            cells,
            done: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
        }))
    }

    /// Take the value of slot `i` (the client, before issuing request `i`).
    fn take(&self, i: usize) -> T {
        // SAFETY: see the `Sync` impl: request `i` is not in flight, nobody else touches slot i.
        unsafe { (*self.cells[i].get()).take() }.expect("slot filled")
    }

    /// Request `i` completed (on any thread): put its value back, count it.
    fn put(&self, i: usize, v: T, ok: bool) {
        // SAFETY: see the `Sync` impl: the client does not touch slot `i` until `done` counts
        // this completion, which happens below, after the write.
        unsafe { *self.cells[i].get() = Some(v) };
        if !ok {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
        self.done.fetch_add(1, Ordering::Release);
    }

    /// Wait (spinning, with `poll` between checks) until `n` completions were counted; reset.
    fn wait(&self, n: usize, mut poll: impl FnMut()) {
        while self.done.load(Ordering::Acquire) < n {
            poll();
        }
        self.done.store(0, Ordering::Relaxed);
        assert_eq!(self.failed.load(Ordering::Relaxed), 0, "a read failed");
    }
}

/// A read on the raw hand-off thread: its buffer, and where to report it.
struct Tagged {
    buf: DmaBuffer,
    slots: &'static Slots<DmaBuffer>,
    slot: usize,
}

// SAFETY: delegates to the `DmaBuffer` it owns, which the queue pair holds until completion.
unsafe impl DmaOwner for Tagged {
    fn dma_slice(&self) -> DmaSlice {
        self.buf.dma_slice()
    }
}

/// The raw baseline of the poller benches: a thread (pinned like the poller) that owns a raw
/// queue pair, takes reads from a lock-free ring, submits them, polls, and reports each
/// completion into its client's [`Slots`]. It never parks (it yields when idle).
struct RawHandoff {
    ring: Arc<ArrayQueue<Tagged>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl RawHandoff {
    fn start() -> RawHandoff {
        let ring = Arc::new(ArrayQueue::<Tagged>::new(1024));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, s) = (ring.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let _ = dioxide_pin(poller_core());
            let c = ctrl();
            let ns = c.namespaces().remove(0);
            let mut q = c.create_qpair::<Tagged>(QueueOptions::default()).unwrap();
            let mut idle = 0u32;
            while !s.load(Ordering::Relaxed) || q.outstanding() > 0 {
                let mut work = 0;
                while let Some(t) = r.pop() {
                    q.read(&ns, Lba(8 * t.slot as u64), t).unwrap();
                    work += 1;
                }
                work += q
                    .poll(usize::MAX, |t, res| t.slots.put(t.slot, t.buf, res.is_ok()))
                    .unwrap();
                if work > 0 {
                    idle = 0;
                } else {
                    idle += 1;
                    if idle % 64 == 0 {
                        std::thread::yield_now();
                    } else {
                        std::hint::spin_loop();
                    }
                }
            }
        });
        RawHandoff {
            ring,
            stop,
            thread: Some(thread),
        }
    }

    fn push(&self, t: Tagged) {
        let mut t = t;
        while let Err(back) = self.ring.push(t) {
            t = back;
            std::hint::spin_loop();
        }
    }
}

impl Drop for RawHandoff {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

/// Pin the calling thread (best effort: the bench runs unpinned where pinning fails).
fn dioxide_pin(core: usize) -> std::io::Result<()> {
    // SAFETY: `cpu_set_t` is plain data; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `core` is below the number of CPUs, far below CPU_SETSIZE.
    unsafe { libc::CPU_SET(core, &mut set) };
    // SAFETY: pid 0 is the calling thread; `set` is a valid set of the size passed.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A client thread of the two-client benches: runs `rounds` rounds of QD32 when told.
struct Client {
    go: Sender<u64>,
    done: Receiver<()>,
    thread: Option<JoinHandle<()>>,
}

impl Client {
    fn spawn(round: impl FnMut() + Send + 'static) -> Client {
        let (go, go_rx) = channel::<u64>();
        let (done_tx, done) = channel();
        let mut round = round;
        let thread = std::thread::spawn(move || {
            for rounds in go_rx {
                for _ in 0..rounds {
                    round();
                }
                done_tx.send(()).unwrap();
            }
        });
        Client {
            go,
            done,
            thread: Some(thread),
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let (tx, _) = channel();
        self.go = tx;
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

/// Run `iters` rounds on every client at once; the wall time of the slowest.
fn run_clients(clients: &[Client], iters: u64) -> Duration {
    let t = Instant::now();
    for c in clients {
        c.go.send(iters).unwrap();
    }
    for c in clients {
        c.done.recv().unwrap();
    }
    t.elapsed()
}

/// One QD32 round of a dio client: 32 asynchronous reads, then wait for their completions.
fn dio_round(file: &BlockFile, slots: &'static Slots<IoBuffer>, poll: impl Fn()) {
    for i in 0..QD {
        let buf = slots.take(i);
        file.submit(Request::read(4096 * i as u64, buf), move |d| {
            let ok = d.result.is_ok_and(|n| n == 4096);
            slots.put(i, d.buf, ok);
        })
        .unwrap();
    }
    slots.wait(QD, poll);
}

/// One QD32 round of a raw client through the hand-off thread.
fn raw_round(h: &RawHandoff, slots: &'static Slots<DmaBuffer>) {
    for i in 0..QD {
        let buf = slots.take(i);
        h.push(Tagged {
            buf,
            slots,
            slot: i,
        });
    }
    slots.wait(QD, std::hint::spin_loop);
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("dio_path");
    g.throughput(Throughput::Elements(1));

    // Raw queue pair.
    let raw = ctrl();
    let ns = raw.namespaces().remove(0);
    let mut q = raw
        .create_qpair::<DmaBuffer>(QueueOptions::default())
        .unwrap();
    let mut one = raw.alloc(4096).unwrap();
    g.bench_function("qd1_sync/raw_qpair", |b| {
        b.iter(|| q.read_blocking(&ns, Lba(8), one.as_mut_slice()).unwrap())
    });

    // dio path, run to completion.
    let dx = Dioxide::builder()
        .controller(ctrl())
        .run_to_completion()
        .build()
        .unwrap();
    let file = dx
        .open_file(0, Nsid(1), FileOptions::new(0, 1 << 20).with_len(1 << 29))
        .unwrap();
    let mut buf = Some(IoBuffer::Dma(file.alloc(4096).unwrap()));
    g.bench_function("qd1_sync/dio_file", |b| {
        b.iter(|| {
            let (r, back) = file.read(buf.take().unwrap(), 4096, 4096);
            assert_eq!(r.unwrap(), 4096);
            buf = Some(back);
        })
    });

    g.throughput(Throughput::Elements(QD as u64));
    let mut q32 = raw.create_qpair::<Tagged>(QueueOptions::default()).unwrap();
    let raw_slots = Slots::new((0..QD).map(|_| raw.alloc(4096).unwrap()));
    g.bench_function("qd32_async/raw_qpair", |b| {
        b.iter(|| {
            for i in 0..QD {
                let t = Tagged {
                    buf: raw_slots.take(i),
                    slots: raw_slots,
                    slot: i,
                };
                q32.read(&ns, Lba(8 * i as u64), t).unwrap();
            }
            raw_slots.wait(QD, || {
                q32.poll(usize::MAX, |t, r| t.slots.put(t.slot, t.buf, r.is_ok()))
                    .unwrap();
            });
        })
    });
    let dio_slots = Slots::new((0..QD).map(|_| IoBuffer::Dma(file.alloc(4096).unwrap())));
    g.bench_function("qd32_async/dio_file", |b| {
        b.iter(|| {
            dio_round(&file, dio_slots, || {
                dx.poll();
            })
        })
    });
    drop(file);
    drop(dx);

    // Through a pinned poller thread, and the raw hand-off baseline.
    g.throughput(Throughput::Elements(1));
    let handoff = RawHandoff::start();
    let one_slot = Slots::new([raw.alloc(4096).unwrap()]);
    g.bench_function("qd1_sync_pollers/raw_handoff", |b| {
        b.iter(|| {
            handoff.push(Tagged {
                buf: one_slot.take(0),
                slots: one_slot,
                slot: 0,
            });
            one_slot.wait(1, std::hint::spin_loop);
        })
    });
    let dxp = Dioxide::builder()
        .controller(ctrl())
        .pollers([Some(poller_core())])
        .build()
        .unwrap();
    let filep = dxp
        .open_file(0, Nsid(1), FileOptions::new(0, 1 << 20).with_len(1 << 29))
        .unwrap();
    let mut bufp = Some(IoBuffer::Dma(filep.alloc(4096).unwrap()));
    g.bench_function("qd1_sync_pollers/dio_file", |b| {
        b.iter(|| {
            let (r, back) = filep.read(bufp.take().unwrap(), 4096, 4096);
            assert_eq!(r.unwrap(), 4096);
            bufp = Some(back);
        })
    });

    g.throughput(Throughput::Elements(2 * QD as u64));
    let handoff = Arc::new(handoff);
    let raw_clients: Vec<Client> = (0..2)
        .map(|_| {
            let h = handoff.clone();
            let slots = Slots::new((0..QD).map(|_| raw.alloc(4096).unwrap()));
            Client::spawn(move || raw_round(&h, slots))
        })
        .collect();
    g.bench_function("qd32_pollers_2clients/raw_handoff", |b| {
        b.iter_custom(|iters| run_clients(&raw_clients, iters))
    });
    drop(raw_clients);
    drop(handoff);
    let dio_clients: Vec<Client> = (0..2)
        .map(|_| {
            let f = filep.clone();
            let slots = Slots::new((0..QD).map(|_| IoBuffer::Dma(f.alloc(4096).unwrap())));
            Client::spawn(move || dio_round(&f, slots, std::hint::spin_loop))
        })
        .collect();
    g.bench_function("qd32_pollers_2clients/dio_file", |b| {
        b.iter_custom(|iters| run_clients(&dio_clients, iters))
    });
    drop(dio_clients);
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).warm_up_time(std::time::Duration::from_millis(500)).measurement_time(std::time::Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
