//! Tests of the engine side: the wake-up and shutdown protocols of the pooled pollers under
//! stress, poller tasks end to end, the run-to-completion table. Every test that waits for
//! completions arms the test watchdog, which turns a hang (a lost wake-up, a lost completion)
//! into a failure that names the test.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::*;
use crate::bus::emulated::{EmulatedConfig, EmulatedController, Mode, NamespaceConfig};
use crate::{BlockFile, Dioxide, EmbedError, FileOptions, IoBuffer, Nsid, Request};

fn ctrl(mode: Mode) -> crate::Controller {
    let emu = EmulatedController::new(EmulatedConfig {
        mode,
        namespaces: vec![NamespaceConfig::memory(512, 1 << 14)],
        ..EmulatedConfig::default()
    })
    .unwrap();
    crate::Controller::new(emu).unwrap()
}

/// An instance whose pollers park as soon as they are idle and whose clients park at once
/// while they wait: every request goes through both wake-up handshakes.
fn eager_parking(mode: Mode, pollers: usize) -> Dioxide {
    let mut b = Dioxide::builder()
        .controller(ctrl(mode))
        .pollers(vec![None; pollers])
        .poller_idle(Duration::ZERO)
        .wait_spin(Duration::ZERO);
    b.spin = 0;
    b.build().unwrap()
}

fn file(dx: &Dioxide) -> BlockFile {
    dx.open_file(0, Nsid(1), FileOptions::new(0, 1 << 13).with_len(1 << 22))
        .unwrap()
}

fn thread_name() -> String {
    std::thread::current().name().unwrap_or("").to_string()
}

#[test]
fn pinning_to_a_core_that_does_not_exist_is_an_error() {
    let e = std::thread::spawn(|| pin_current_thread(100_000))
        .join()
        .unwrap()
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
    let e = std::thread::spawn(|| pin_current_thread(1000))
        .join()
        .unwrap()
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
    std::thread::spawn(|| pin_current_thread(0))
        .join()
        .unwrap()
        .unwrap();
}

#[test]
fn no_wake_up_is_lost() {
    let _w = test_watchdog::arm(test_watchdog::STRESS);
    for mode in [Mode::Inline, Mode::Threaded] {
        let dx = eager_parking(mode, 2);
        let f = file(&dx);
        let clients: Vec<_> = (0..4u64)
            .map(|k| {
                let f = f.clone();
                std::thread::spawn(move || {
                    let mut buf = IoBuffer::Dma(f.alloc(4096).unwrap());
                    for i in 0..400u64 {
                        // Each client on its own 256 pages: a read sees its own write.
                        let off = (k * 256 + i % 256) * 4096;
                        buf.as_mut_slice()[..8].copy_from_slice(&(k * 1_000_000 + i).to_le_bytes());
                        let (r, b) = f.write(buf, off, 4096);
                        assert_eq!(r.unwrap(), 4096);
                        let (r, b) = f.read(b, off, 4096);
                        assert_eq!(r.unwrap(), 4096);
                        let got = u64::from_le_bytes(b.as_slice()[..8].try_into().unwrap());
                        assert_eq!(got, k * 1_000_000 + i, "client {k} request {i}");
                        buf = b;
                    }
                })
            })
            .collect();
        for c in clients {
            c.join().unwrap();
        }
        // One bio per request (aligned, direct); the counters are bumped after the round.
        let total = |f: fn(&PollerStats) -> u64| dx.poller_stats().iter().map(f).sum::<u64>();
        wait_until(|| total(|s| s.completed) == 3200);
        assert_eq!(total(|s| s.submitted), 3200);
        // The pollers parked as soon as idle, so the clients' pushes had to wake them.
        let stats = dx.poller_stats();
        assert!(stats.iter().all(|s| s.parks > 0), "{stats:?}");
    }
}

#[test]
fn shutdown_during_submissions_loses_and_refuses_nothing_accepted() {
    let _w = test_watchdog::arm(test_watchdog::UNIT);
    // Awake pollers (they see `stop` at once, while clients are mid-submission) and eagerly
    // parking ones.
    let awake = |mode| {
        Dioxide::builder()
            .controller(ctrl(mode))
            .pollers([None, None])
            .build()
            .unwrap()
    };
    for round in 0..40 {
        let mode = [Mode::Inline, Mode::Threaded][round % 2];
        let dx = if round < 36 {
            awake(mode)
        } else {
            eager_parking(mode, 2)
        };
        let f = file(&dx);
        let accepted = Arc::new(AtomicU64::new(0));
        let called = Arc::new(AtomicU64::new(0));
        let started = Arc::new(AtomicU64::new(0));
        let clients: Vec<_> = (0..3u64)
            .map(|k| {
                let (f, accepted, called, started) =
                    (f.clone(), accepted.clone(), called.clone(), started.clone());
                std::thread::spawn(move || {
                    let mut i = 0u64;
                    loop {
                        i += 1;
                        let off = (k * 97 + i) % 1024 * 4096;
                        let buf = IoBuffer::Dma(f.alloc(4096).unwrap());
                        let r = if i % 4 == 0 {
                            f.read(buf, off, 4096).0.map(|_| ())
                        } else {
                            let c = called.clone();
                            let r = f.submit(Request::read(off, buf), move |d| {
                                assert_eq!(d.result.unwrap(), 4096);
                                c.fetch_add(1, Ordering::SeqCst);
                            });
                            if r.is_ok() {
                                accepted.fetch_add(1, Ordering::SeqCst);
                            }
                            r.map_err(|e| e.error)
                        };
                        started.fetch_add(1, Ordering::SeqCst);
                        match r {
                            Ok(()) => {}
                            Err(EmbedError::ShutDown) => return,
                            Err(e) => panic!("client {k}: {e}"),
                        }
                    }
                })
            })
            .collect();
        while started.load(Ordering::SeqCst) < 300 {
            std::thread::yield_now();
        }
        dx.shutdown();
        for c in clients {
            c.join().unwrap();
        }
        // Every accepted request was completed before the pollers exited, exactly once.
        assert!(accepted.load(Ordering::SeqCst) > 0);
        assert_eq!(
            called.load(Ordering::SeqCst),
            accepted.load(Ordering::SeqCst)
        );
    }
}

/// A task that keeps `depth` asynchronous reads in flight from its poller until `total`
/// completed, checking where it runs and where its completions run.
struct Reader {
    file: BlockFile,
    bufs: Arc<Mutex<Vec<IoBuffer>>>,
    issued: u64,
    total: u64,
    done: Arc<AtomicU64>,
    wrong_thread: Arc<AtomicU64>,
    home: String,
    dropped_on: Arc<Mutex<Option<String>>>,
}

impl PollerTask for Reader {
    fn poll(&mut self) -> usize {
        if thread_name() != self.home {
            self.wrong_thread.fetch_add(1, Ordering::SeqCst);
        }
        let mut n = 0;
        while self.issued < self.total {
            let Some(buf) = self.bufs.lock().unwrap().pop() else {
                break;
            };
            let (bufs, done, wrong, home) = (
                self.bufs.clone(),
                self.done.clone(),
                self.wrong_thread.clone(),
                self.home.clone(),
            );
            let off = self.issued % 512 * 4096;
            self.file
                .submit(Request::read(off, buf), move |d| {
                    assert_eq!(d.result.unwrap(), 4096);
                    if thread_name() != home {
                        wrong.fetch_add(1, Ordering::SeqCst);
                    }
                    bufs.lock().unwrap().push(d.buf);
                    done.fetch_add(1, Ordering::SeqCst);
                })
                .unwrap();
            self.issued += 1;
            n += 1;
        }
        n
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        *self.dropped_on.lock().unwrap() = Some(thread_name());
    }
}

fn wait_until(what: impl Fn() -> bool) {
    while !what() {
        std::thread::yield_now();
    }
}

#[test]
fn a_task_submits_io_on_its_poller_and_is_dropped_there() {
    let _w = test_watchdog::arm(test_watchdog::UNIT);
    for mode in [Mode::Inline, Mode::Threaded] {
        let dx = eager_parking(mode, 2);
        let f = file(&dx);
        let done = Arc::new(AtomicU64::new(0));
        let wrong = Arc::new(AtomicU64::new(0));
        let dropped = [(); 2].map(|_| Arc::new(Mutex::new(None::<String>)));
        let reader = |total, dropped_on: &Arc<Mutex<Option<String>>>| Reader {
            file: f.clone(),
            bufs: Arc::new(Mutex::new(
                (0..8)
                    .map(|_| IoBuffer::Dma(f.alloc(4096).unwrap()))
                    .collect(),
            )),
            issued: 0,
            total,
            done: done.clone(),
            wrong_thread: wrong.clone(),
            home: "dioxide-poller-1".into(),
            dropped_on: dropped_on.clone(),
        };
        // One task removed after its work, one left for the shutdown.
        let t1 = dx.add_poller_task(1, reader(1000, &dropped[0])).unwrap();
        assert_eq!(t1.poller(), 1);
        dx.add_poller_task(1, reader(500, &dropped[1])).unwrap();
        wait_until(|| done.load(Ordering::SeqCst) == 1500);
        dx.remove_poller_task(t1);
        wait_until(|| dropped[0].lock().unwrap().is_some());
        assert_eq!(
            dropped[0].lock().unwrap().as_deref(),
            Some("dioxide-poller-1")
        );
        assert!(dropped[1].lock().unwrap().is_none());
        let stats = dx.poller_stats();
        // The tasks' I/O went to their poller's own queue, none through poller 0.
        assert_eq!(stats[0].submitted, 0, "{stats:?}");
        assert_eq!(stats[1].submitted, 1500, "{stats:?}");
        assert_eq!(wrong.load(Ordering::SeqCst), 0);
        drop(f);
        dx.shutdown();
        assert_eq!(
            dropped[1].lock().unwrap().as_deref(),
            Some("dioxide-poller-1")
        );
        assert_eq!(done.load(Ordering::SeqCst), 1500);
    }
}

/// A task that does no work and is busy while `busy` says so.
struct Idle {
    busy: Arc<AtomicBool>,
    polls: Arc<AtomicUsize>,
}

impl PollerTask for Idle {
    fn poll(&mut self) -> usize {
        self.polls.fetch_add(1, Ordering::SeqCst);
        0
    }
    fn is_busy(&self) -> bool {
        self.busy.load(Ordering::SeqCst)
    }
}

#[test]
fn a_busy_task_keeps_its_poller_awake() {
    let _w = test_watchdog::arm(test_watchdog::UNIT);
    let dx = eager_parking(Mode::Inline, 1);
    let busy = Arc::new(AtomicBool::new(true));
    let polls = Arc::new(AtomicUsize::new(0));
    dx.add_poller_task(
        0,
        Idle {
            busy: busy.clone(),
            polls: polls.clone(),
        },
    )
    .unwrap();
    // Added to a parked poller: the inbox woke it.
    wait_until(|| polls.load(Ordering::SeqCst) > 0);
    let parks = dx.poller_stats()[0].parks;
    // A poller parks after one idle round here; busy, it keeps polling the task.
    wait_until(|| polls.load(Ordering::SeqCst) > 20_000);
    assert_eq!(dx.poller_stats()[0].parks, parks);
    busy.store(false, Ordering::SeqCst);
    wait_until(|| dx.poller_stats()[0].parks > parks);
}

struct Panicky(Arc<AtomicBool>);

impl PollerTask for Panicky {
    fn poll(&mut self) -> usize {
        panic!("a task panicked on purpose");
    }
}

impl Drop for Panicky {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[test]
fn a_panicking_task_is_dropped_and_the_poller_goes_on() {
    let _w = test_watchdog::arm(test_watchdog::UNIT);
    let dx = eager_parking(Mode::Inline, 1);
    let dropped = Arc::new(AtomicBool::new(false));
    dx.add_poller_task(0, Panicky(dropped.clone())).unwrap();
    // Counted and dropped (no order between the two for another thread).
    wait_until(|| dx.poller_stats()[0].task_panics == 1 && dropped.load(Ordering::SeqCst));
    let f = file(&dx);
    let (r, _) = f.read(IoBuffer::Dma(f.alloc(4096).unwrap()), 0, 4096);
    assert_eq!(r.unwrap(), 4096);
}

#[test]
fn tasks_are_refused_where_there_is_no_such_poller() {
    let dx = eager_parking(Mode::Inline, 1);
    let idle = || Idle {
        busy: Arc::new(AtomicBool::new(false)),
        polls: Arc::new(AtomicUsize::new(0)),
    };
    assert!(matches!(
        dx.add_poller_task(1, idle()),
        Err(EmbedError::Config(_))
    ));
    let rtc = Dioxide::builder()
        .controller(ctrl(Mode::Inline))
        .run_to_completion()
        .build()
        .unwrap();
    assert!(matches!(
        rtc.add_poller_task(0, idle()),
        Err(EmbedError::Config(_))
    ));
}

#[test]
fn a_closed_local_engine_never_reaches_the_one_that_reuses_its_slot() {
    let build = || {
        Dioxide::builder()
            .controller(ctrl(Mode::Inline))
            .run_to_completion()
            .build()
            .unwrap()
    };
    let (a, b) = (build(), build());
    let fa = file(&a);
    drop(a);
    // `c` takes the slot `a` left.
    let c = build();
    let fc = file(&c);
    let fb = file(&b);
    let mut data = IoBuffer::Dma(fc.alloc(4096).unwrap());
    data.as_mut_slice().fill(0xc3);
    assert_eq!(fc.write(data, 0, 4096).0.unwrap(), 4096);
    // The file of the closed engine fails; it does not reach `c`'s queue pairs.
    let (r, _) = fa.write(IoBuffer::Dma(fa.alloc(4096).unwrap()), 0, 4096);
    assert!(r.is_err());
    let (r, back) = fc.read(IoBuffer::Dma(fc.alloc(4096).unwrap()), 0, 4096);
    assert_eq!(r.unwrap(), 4096);
    assert!(back.as_slice().iter().all(|&x| x == 0xc3));
    let (r, _) = fb.read(IoBuffer::Dma(fb.alloc(4096).unwrap()), 0, 4096);
    assert_eq!(r.unwrap(), 4096);
    // Another thread is not the owner.
    let fc2 = fc.clone();
    let e = std::thread::spawn(move || fc2.read(IoBuffer::Heap(vec![0; 512]), 0, 512).0)
        .join()
        .unwrap()
        .unwrap_err();
    assert!(matches!(e, EmbedError::WrongThread), "{e}");
}

#[test]
fn shutdown_waits_for_a_request_in_its_submission_phase() {
    let _w = test_watchdog::arm(test_watchdog::UNIT);
    let dx = Dioxide::builder()
        .controller(ctrl(Mode::Inline))
        .pollers([None])
        .build()
        .unwrap();
    let polls = Arc::new(AtomicUsize::new(0));
    let idle = Idle {
        busy: Arc::new(AtomicBool::new(false)),
        polls: polls.clone(),
    };
    dx.add_poller_task(0, idle).unwrap();
    let crate::embed::blockfile::EngineRef::Pooled(p) = &dx.engine else {
        unreachable!("pooled")
    };
    let p = p.clone();
    // A request accepted before the shutdown, still submitting.
    assert!(p.enter());
    let shutdown = std::thread::spawn(move || dx.shutdown());
    wait_until(|| p.stop.load(Ordering::SeqCst));
    // The poller keeps running its rounds (a poller that left would hang this wait)...
    let n = polls.load(Ordering::SeqCst);
    wait_until(|| polls.load(Ordering::SeqCst) > n + 20);
    // ...while a request that starts now is refused.
    assert!(!p.enter());
    p.leave();
    shutdown.join().unwrap();
}

#[test]
fn interrupt_mode_pollers_sleep_with_io_on_the_device_and_lose_nothing() {
    let _w = test_watchdog::arm(test_watchdog::STRESS);
    for mode in [
        InterruptMode::Interrupt,
        InterruptMode::Adaptive(Duration::ZERO),
    ] {
        let mut b = Dioxide::builder()
            .controller(ctrl(Mode::Threaded))
            .pollers([None])
            .poller_idle(Duration::ZERO)
            .interrupt_mode(mode);
        b.spin = 0;
        let dx = b.build().unwrap();
        let f = file(&dx);
        let clients: Vec<_> = (0..2u64)
            .map(|k| {
                let f = f.clone();
                std::thread::spawn(move || {
                    let mut buf = IoBuffer::Dma(f.alloc(4096).unwrap());
                    for i in 0..300u64 {
                        let off = (k * 256 + i % 256) * 4096;
                        buf.as_mut_slice()[..8].copy_from_slice(&(k << 32 | i).to_le_bytes());
                        let (r, b) = f.write(buf, off, 4096);
                        assert_eq!(r.unwrap(), 4096);
                        let (r, b) = f.read(b, off, 4096);
                        assert_eq!(r.unwrap(), 4096);
                        let got = u64::from_le_bytes(b.as_slice()[..8].try_into().unwrap());
                        assert_eq!(got, k << 32 | i, "{mode:?} client {k} request {i}");
                        buf = b;
                    }
                })
            })
            .collect();
        for c in clients {
            c.join().unwrap();
        }
        let stats = || dx.poller_stats()[0];
        wait_until(|| stats().completed == 1200);
        assert_eq!(stats().submitted, 1200);
        // The device thread takes a while per command: the poller slept with I/O on the device.
        assert!(stats().io_sleeps > 0, "{mode:?}: {:?}", stats());
    }
}

/// A queue pair with room for two commands and many requests: the bios the queue pair refuses
/// (request pool exhausted) come back rejoined from their completion handle and command
/// (`Bio::split`), are retried, and land where they belong with their own data, on both
/// engines (run to completion: the sink refuses and dio-core retries after a poll; pooled: the
/// poller keeps the refused bio and retries after its next poll).
#[test]
fn refused_bios_are_rejoined_and_retried_unchanged() {
    let _w = test_watchdog::arm(test_watchdog::UNIT);
    const N: usize = 24;
    const PAGE: usize = 4096;
    for pooled in [false, true] {
        // Pooled: the device holds the first two writes (the queue pair's two requests) for a
        // while, so that the bios handed over meanwhile find no free request on the poller.
        let emu = EmulatedController::new(EmulatedConfig {
            mode: if pooled { Mode::Threaded } else { Mode::Inline },
            namespaces: vec![NamespaceConfig::memory(512, 1 << 14)],
            ..EmulatedConfig::default()
        })
        .unwrap();
        if pooled {
            use crate::bus::emulated::{Action, Fault, Trigger};
            let first_two_pages = Trigger::LbaRange {
                nsid: 1,
                start: 0,
                end: (2 * PAGE / 512) as u64,
                opcode: None,
            };
            let hold = Action::Delay(Duration::from_millis(250));
            emu.inject(Fault::always(first_two_pages, hold));
        }
        let b = Dioxide::builder()
            .controller(crate::Controller::new(emu).unwrap())
            .queue(QueueOptions::default().with_requests(2));
        let dx = if pooled {
            b.pollers([None]).build().unwrap()
        } else {
            b.run_to_completion().build().unwrap()
        };
        let f = file(&dx);
        let (tx, rx) = std::sync::mpsc::channel::<(usize, crate::Completed)>();
        // Submitted without polling in between: more than the queue pair takes at once. Run
        // to completion refuses a request whose only bio the queue pair refused (`QueueFull`,
        // its buffer handed back): poll, then submit it again.
        let mut refused = 0;
        for i in 0..N {
            let mut buf = IoBuffer::Dma(f.alloc(PAGE).unwrap());
            buf.as_mut_slice().fill(i as u8 + 1);
            loop {
                let tx = tx.clone();
                let req = Request {
                    op: crate::Op::Write,
                    offset: (i * PAGE) as u64,
                    len: PAGE,
                    buf,
                };
                match f.submit(req, move |c| tx.send((i, c)).unwrap()) {
                    Ok(()) => break,
                    Err(r) => {
                        assert!(!pooled, "pooled engines keep refused bios: {}", r.error);
                        assert!(
                            matches!(
                                r.error,
                                EmbedError::Dio {
                                    source: DioError::QueueFull,
                                    ..
                                }
                            ),
                            "not a full queue: {}",
                            r.error
                        );
                        assert!(
                            r.buf.as_slice().iter().all(|&x| x == i as u8 + 1),
                            "a refused request's buffer came back changed"
                        );
                        refused += 1;
                        buf = r.buf;
                        dx.poll();
                    }
                }
            }
        }
        let mut seen = [false; N];
        for _ in 0..N {
            let (i, c) = loop {
                if let Ok(x) = rx.try_recv() {
                    break x;
                }
                if pooled {
                    std::thread::yield_now();
                } else {
                    dx.poll();
                }
            };
            assert_eq!(c.result.unwrap(), PAGE, "write {i} (pooled: {pooled})");
            assert!(
                !std::mem::replace(&mut seen[i], true),
                "{i} completed twice"
            );
        }
        // Run to completion: refusals came back to the caller. Pooled: the poller kept the
        // refused bios and submitted them again (counted as stalls; read once every request
        // completed: the poller meets the full queue pair after the hand-over).
        let stalls = if pooled {
            dx.poller_stats()[0].stalls
        } else {
            0
        };
        assert!(
            refused > 0 || stalls > 0,
            "the queue pair never ran out of requests (pooled: {pooled})"
        );
        for i in 0..N {
            let (r, back) = f.read(
                IoBuffer::Dma(f.alloc(PAGE).unwrap()),
                (i * PAGE) as u64,
                PAGE,
            );
            assert_eq!(r.unwrap(), PAGE);
            assert!(
                back.as_slice().iter().all(|&x| x == i as u8 + 1),
                "page {i} holds another write's data (pooled: {pooled})"
            );
        }
    }
}
