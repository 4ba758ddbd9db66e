//! End-to-end paths of the embedding API that the stress test does not pin down:
//!
//! * deferred completions: every callback runs on the appliance's [`CompletionThread`], never on
//!   a poller and never inside `submit`, whatever path the request took (queued on the device,
//!   finished synchronously through the page cache, an extending write);
//! * a callback on the poller that resubmits (chains of requests issued from the poller
//!   thread): no deadlock, every request gets its own completion exactly once, and what would
//!   block on the poller is refused with `WouldBlockOnPoller`;
//! * two controllers served by the same pollers: files on each, clients issuing to both, the
//!   data landing on the right controller;
//! * a block-aligned read past an odd `len` issued on the poller, and a panicking callback on
//!   the poller: neither stops the poller;
//! * the `on_extend` hook: every new length, growing, each before its write completes;
//! * a direct write to a file with nothing cached skips the page cache's directory lock, and
//!   stays coherent with the cache once a page is cached;
//! * more asynchronous requests in flight on one file than its pool of request contexts keeps.
//!
//! Emulated controllers only (they build their own), so they also run in the hardware suite.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dioxide::emulated::Mode;
use dioxide::{
    BlockFile, Completed, CompletionThread, Dioxide, EmbedError, FileOptions, IoBuffer, Nsid,
    Request,
};
use dioxide_tests::*;

const PAGE: usize = 4096;
/// Generous: a lost completion or a deadlock fails the test instead of hanging it.
const LIMIT: Duration = Duration::from_secs(20);

fn thread_name() -> String {
    std::thread::current().name().unwrap_or("").to_string()
}

#[test]
fn deferred_callbacks_run_on_the_completion_thread_only() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    for mode in MODES {
        let (ctrl, _emu) = emulated(config(mode, &[(512, 1 << 14)]));
        let ct = CompletionThread::spawn("dx-completions").unwrap();
        let dx = Dioxide::builder()
            .controller(ctrl)
            .pollers([None, None])
            .deferred_completions(ct.clone())
            .build()
            .unwrap();
        let file = dx.open_file(0, Nsid(1), FileOptions::new(0, 2048)).unwrap();
        // Prefill 256 KiB so that most writes below are queued (not extending).
        let prefill = pattern(64 * PAGE, 1);
        assert_eq!(file.write_at(&prefill, 0).unwrap(), prefill.len());
        let in_submit = Arc::new(AtomicBool::new(false));
        let runs = Arc::new(Mutex::new(Vec::<(usize, String)>::new()));
        let (tx, rx) = channel::<(usize, Completed)>();
        let mut expect = Vec::new();
        let mut rng = Rng(7);
        for i in 0..200usize {
            let off = rng.range(0, 64) * PAGE as u64;
            let kind = i % 5;
            let req = match kind {
                // Queued on the device: aligned DMA read.
                0 | 1 => Request::read(off, IoBuffer::Dma(file.alloc(PAGE).unwrap())),
                // Queued on the device: aligned DMA write inside the file.
                2 => {
                    let mut b = file.alloc(PAGE).unwrap();
                    fill(b.as_mut_slice(), 1000 + i as u64);
                    Request::write(off, IoBuffer::Dma(b))
                }
                // Finished synchronously through the page cache: unaligned heap read.
                3 => Request::read(off + 100, IoBuffer::Heap(vec![0; 1000])),
                // Finished synchronously: an extending write (forced synchronous).
                _ => {
                    let at = file.len() + 512;
                    let mut b = file.alloc(PAGE).unwrap();
                    fill(b.as_mut_slice(), 5000 + i as u64);
                    Request::write(at, IoBuffer::Dma(b))
                }
            };
            expect.push(kind);
            let (tx, runs, flag) = (tx.clone(), runs.clone(), in_submit.clone());
            in_submit.store(true, Ordering::SeqCst);
            let submitter = std::thread::current().id();
            file.submit(req, move |done| {
                assert!(
                    !flag.load(Ordering::SeqCst) || std::thread::current().id() != submitter,
                    "a callback ran inside submit"
                );
                runs.lock().unwrap().push((i, thread_name()));
                tx.send((i, done)).unwrap();
            })
            .unwrap_or_else(|r| panic!("request {i} refused: {}", r.error));
            in_submit.store(false, Ordering::SeqCst);
            // Keep the queue shallow now and then, so both queued and drained paths occur.
            if i % 16 == 15 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        drop(tx);
        let mut seen = HashSet::new();
        for _ in 0..expect.len() {
            let (i, done) = rx.recv_timeout(LIMIT).expect("a completion is missing");
            assert!(seen.insert(i), "request {i} completed twice");
            let n = done
                .result
                .unwrap_or_else(|e| panic!("request {i} failed: {e}"));
            match expect[i] {
                3 => assert_eq!(n, 1000),
                _ => assert_eq!(n, PAGE),
            }
        }
        assert!(rx.recv_timeout(Duration::from_millis(50)).is_err());
        for (i, name) in runs.lock().unwrap().iter() {
            assert_eq!(
                name, "dx-completions",
                "callback of request {i} ran on {name:?} ({mode:?})"
            );
        }
        drop(file);
        dx.shutdown();
        ct.stop();
    }
}

/// One chain: a read whose callback, on the poller, submits the next read of the chain.
struct Chain {
    file: BlockFile,
    id: usize,
    left: AtomicU32,
    counts: Vec<AtomicU32>,
    done: std::sync::mpsc::Sender<usize>,
    refused_sync: AtomicU32,
    /// Synchronous calls made by callbacks that ran on a client thread (allowed there).
    sync_on_client: AtomicU32,
}

fn on_poller() -> bool {
    thread_name().starts_with("dioxide-poller-")
}

fn issue(chain: Arc<Chain>, step: u32, buf: IoBuffer) -> Result<(), Box<dioxide::Refused>> {
    let off = (step as u64 % 32) * PAGE as u64;
    let c = chain.clone();
    // Step 0 is submitted by a client thread: if the poller completes it before `submit`
    // drops its own reference, the request finishes synchronously and its callback runs on
    // that thread (documented), which then submits the next step itself. A step submitted on
    // a poller always completes on a poller.
    let from_poller = on_poller();
    chain.file.submit(Request::read(off, buf), move |done| {
        assert!(
            !from_poller || on_poller(),
            "the callback of a request submitted on a poller ran on {:?}",
            thread_name()
        );
        let n = done.result.expect("read");
        assert_eq!(n, PAGE);
        // The data is the prefill pattern of that page.
        let want = pattern(PAGE, 100 + step as u64 % 32);
        assert!(
            done.buf.as_slice() == &want[..],
            "chain {} step {step}",
            c.id
        );
        assert_eq!(
            c.counts[step as usize].fetch_add(1, Ordering::SeqCst),
            0,
            "chain {} step {step} completed twice",
            c.id
        );
        // Anything that would block is refused on the poller, not deadlocked.
        if step % 10 == 0 && step > 0 {
            let mut b = [0u8; 10];
            match c.file.read_at(&mut b, 3) {
                Err(EmbedError::WouldBlockOnPoller { .. }) if on_poller() => {
                    c.refused_sync.fetch_add(1, Ordering::SeqCst);
                }
                // A callback run on its client thread may block.
                Ok(10) if !on_poller() => {
                    c.sync_on_client.fetch_add(1, Ordering::SeqCst);
                }
                other => panic!(
                    "a synchronous call in a callback on {:?} returned {other:?}",
                    thread_name()
                ),
            }
        }
        if c.left.fetch_sub(1, Ordering::SeqCst) > 1 {
            issue(c.clone(), step + 1, done.buf).expect("resubmission from the poller");
        } else {
            c.done.send(c.id).unwrap();
        }
    })
}

#[test]
fn callbacks_on_the_poller_resubmit_without_deadlock() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    const STEPS: u32 = 300;
    const CHAINS: usize = 6;
    for mode in MODES {
        let (ctrl, _emu) = emulated(config(mode, &[(512, 1 << 14)]));
        let dx = Dioxide::builder()
            .controller(ctrl)
            .pollers([None, None])
            .build()
            .unwrap();
        let file = dx.open_file(0, Nsid(1), FileOptions::new(0, 2048)).unwrap();
        for p in 0..32u64 {
            let b = pattern(PAGE, 100 + p);
            assert_eq!(file.write_at(&b, p * PAGE as u64).unwrap(), PAGE);
        }
        let (tx, rx) = channel();
        let chains: Vec<Arc<Chain>> = (0..CHAINS)
            .map(|id| {
                Arc::new(Chain {
                    file: file.clone(),
                    id,
                    left: AtomicU32::new(STEPS),
                    counts: (0..STEPS).map(|_| AtomicU32::new(0)).collect(),
                    done: tx.clone(),
                    refused_sync: AtomicU32::new(0),
                    sync_on_client: AtomicU32::new(0),
                })
            })
            .collect();
        drop(tx);
        // Start the chains from several client threads (so both pollers get some).
        let starters: Vec<_> = chains
            .iter()
            .map(|c| {
                let c = c.clone();
                std::thread::spawn(move || {
                    let buf = IoBuffer::Dma(c.file.alloc(PAGE).unwrap());
                    issue(c, 0, buf).expect("first submission");
                })
            })
            .collect();
        for s in starters {
            s.join().unwrap();
        }
        let mut finished = HashSet::new();
        for _ in 0..CHAINS {
            let id = rx.recv_timeout(LIMIT).unwrap_or_else(|_| {
                panic!("a chain stalled ({mode:?}): deadlock or lost completion")
            });
            assert!(finished.insert(id));
        }
        for c in &chains {
            for (s, n) in c.counts.iter().enumerate() {
                assert_eq!(n.load(Ordering::SeqCst), 1, "chain {} step {s}", c.id);
            }
            let refused = c.refused_sync.load(Ordering::SeqCst);
            let on_client = c.sync_on_client.load(Ordering::SeqCst);
            assert_eq!(refused + on_client, (STEPS - 1) / 10, "chain {}", c.id);
            // A chain leaves its client thread at the first step a poller completes.
            assert!(refused > 0, "chain {} never ran on a poller", c.id);
        }
        let stats = dx.poller_stats();
        let completed: u64 = stats.iter().map(|s| s.completed).sum();
        assert!(completed >= (CHAINS as u64) * STEPS as u64, "{stats:?}");
        drop(chains);
        drop(file);
        dx.shutdown();
    }
}

#[test]
fn two_controllers_share_the_pollers() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    let (c0, emu0) = emulated(config(Mode::Threaded, &[(512, 1 << 13)]));
    let (c1, emu1) = emulated(config(Mode::Inline, &[(4096, 1 << 10)]));
    let dx = Dioxide::builder()
        .controller(c0)
        .controller(c1)
        .pollers([None, None])
        .build()
        .unwrap();
    assert_eq!(dx.namespaces().len(), 2);
    // Per-controller counters: a controller index that does not exist is `None`, not a panic.
    assert!(dx.cache_stats(0).is_some() && dx.cache_stats(1).is_some());
    assert_eq!(dx.cache_stats(2), None);
    // The same byte range on both controllers, different data.
    let f0 = dx.open_file(0, Nsid(1), FileOptions::new(0, 1024)).unwrap();
    let f1 = dx.open_file(1, Nsid(1), FileOptions::new(0, 128)).unwrap();
    assert_eq!(f0.capacity(), f1.capacity());
    let cap = f0.capacity();
    let clients: Vec<_> = (0..4u64)
        .map(|t| {
            let (f0, f1) = (f0.clone(), f1.clone());
            std::thread::spawn(move || {
                // Each client owns pages t, t + 4, ... of both files.
                let mut rng = Rng(t + 11);
                for round in 0..60u64 {
                    let page = t + 4 * rng.range(0, cap / PAGE as u64 / 4);
                    let off = page * PAGE as u64;
                    let seed = |ctrl: u64| ctrl << 40 | page << 20 | round;
                    for (ci, f) in [(0u64, &f0), (1, &f1)] {
                        if round % 2 == 0 {
                            // Zero copy, asynchronous.
                            let mut b = f.alloc(PAGE).unwrap();
                            fill(b.as_mut_slice(), seed(ci));
                            let (tx, rx) = channel();
                            f.submit(Request::write(off, b), move |d| tx.send(d).unwrap())
                                .map_err(|r| r.error)
                                .unwrap();
                            let d = rx.recv_timeout(LIMIT).expect("completion");
                            assert_eq!(d.result.unwrap(), PAGE);
                        } else {
                            // Synchronous, through the cache, unaligned.
                            let data = pattern(PAGE - 7, seed(ci));
                            assert_eq!(f.write_at(&data, off + 7).unwrap(), PAGE - 7);
                            let mut back = vec![0; PAGE - 7];
                            assert_eq!(f.read_at(&mut back, off + 7).unwrap(), PAGE - 7);
                            assert!(back == data, "ctrl {ci} page {page}");
                        }
                    }
                    // Read both back (zero copy) and check each has its own data.
                    for (ci, f) in [(0u64, &f0), (1, &f1)] {
                        let (r, b) = f.read(f.alloc(PAGE).unwrap(), off, PAGE);
                        assert_eq!(r.unwrap(), PAGE);
                        let want = if round % 2 == 0 {
                            pattern(PAGE, seed(ci))
                        } else {
                            pattern(PAGE - 7, seed(ci))
                        };
                        let at = if round % 2 == 0 { 0 } else { 7 };
                        assert!(
                            b.as_slice()[at..] == want[..],
                            "ctrl {ci} page {page} round {round}: data of the wrong controller"
                        );
                    }
                }
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    // Every client thread issued to both controllers through its one home poller, so a
    // poller served queue pairs of both; every poller owns one I/O queue pair on each.
    let stats = dx.poller_stats();
    assert_eq!(stats.len(), 2);
    let submitted: u64 = stats.iter().map(|s| s.submitted).sum();
    assert!(submitted >= 4 * 60 * 4, "{stats:?}");
    for (i, emu) in [&emu0, &emu1].into_iter().enumerate() {
        let st = emu.stats();
        const CREATE_IO_SQ: u8 = 0x01;
        assert_eq!(
            st.commands_with(0, CREATE_IO_SQ),
            2,
            "controller {i}: {st:?}"
        );
        assert!(st.io_commands() >= 4 * 60 * 2, "controller {i}: {st:?}");
    }
    drop((f0, f1));
    dx.shutdown();
}

/// A block-aligned DMA read issued from a poller callback that runs past an odd `len`: the
/// tail block is read directly and clamped at EOF (never a page-cache miss on the poller, which
/// would park the poller on its own bio forever).
#[test]
fn an_aligned_read_past_an_odd_len_on_the_poller_completes() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    const ODD: u64 = PAGE as u64 + 100;
    for mode in MODES {
        for bs in [512u32, 4096] {
            let (ctrl, _emu) = emulated(config(mode, &[(bs, 1 << 14)]));
            let dx = Dioxide::builder()
                .controller(ctrl)
                .pollers([None])
                .build()
                .unwrap();
            let blocks = 4 * PAGE as u64 / bs as u64;
            // Known data on the device, then a fresh file (nothing cached) with an odd length.
            let data = pattern(2 * PAGE, 77);
            {
                let f = dx
                    .open_file(0, Nsid(1), FileOptions::new(0, blocks))
                    .unwrap();
                let mut b = f.alloc(2 * PAGE).unwrap();
                b.as_mut_slice().copy_from_slice(&data);
                let (r, _) = f.write(b, 0, 2 * PAGE);
                assert_eq!(r.unwrap(), 2 * PAGE);
            }
            let file = dx
                .open_file(0, Nsid(1), FileOptions::new(0, blocks).with_len(ODD))
                .unwrap();
            let (tx, rx) = channel::<Completed>();
            fn from_poller(file: BlockFile, tx: std::sync::mpsc::Sender<Completed>, tries: u32) {
                let f = file.clone();
                let first = IoBuffer::Dma(file.alloc(PAGE).unwrap());
                file.submit(Request::read(0, first), move |d| {
                    d.result.expect("first read");
                    if !thread_name().starts_with("dioxide-poller-") && tries > 0 {
                        // Finished inside submit: try again until a callback runs on the poller.
                        return from_poller(f, tx, tries - 1);
                    }
                    let buf = IoBuffer::Dma(f.alloc(2 * PAGE).unwrap());
                    let tx2 = tx.clone();
                    if let Err(r) = f.submit(Request::read(0, buf), move |d| tx2.send(d).unwrap()) {
                        panic!("refused on the poller: {}", r.error);
                    }
                })
                .unwrap_or_else(|r| panic!("refused: {}", r.error));
            }
            from_poller(file.clone(), tx, 100);
            let Ok(d) = rx.recv_timeout(Duration::from_secs(5)) else {
                // The poller is stuck: leak the instance rather than hang in shutdown.
                std::mem::forget(file);
                std::mem::forget(dx);
                panic!("the read past an odd len hung the poller ({mode:?}, block {bs})");
            };
            assert_eq!(d.result.unwrap(), ODD as usize);
            let got = d.buf.as_slice();
            assert!(
                got[..ODD as usize] == data[..ODD as usize],
                "{mode:?} block {bs}"
            );
            assert!(
                got[ODD as usize..].iter().all(|&x| x == 0),
                "bytes past len were returned ({mode:?}, block {bs})"
            );
            drop(file);
            dx.shutdown();
        }
    }
}

/// A callback that panics on the poller: the panic is caught and reported, the poller lives on,
/// later requests on it complete and shutdown is clean.
#[test]
fn a_panicking_callback_does_not_kill_the_poller() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    for mode in MODES {
        let (ctrl, _emu) = emulated(config(mode, &[(512, 1 << 14)]));
        let dx = Dioxide::builder()
            .controller(ctrl)
            .pollers([None])
            .build()
            .unwrap();
        let file = dx.open_file(0, Nsid(1), FileOptions::new(0, 256)).unwrap();
        assert_eq!(file.write_at(&pattern(8 * PAGE, 3), 0).unwrap(), 8 * PAGE);
        let (tx, rx) = channel::<String>();
        fn panic_on_poller(file: BlockFile, tx: std::sync::mpsc::Sender<String>, tries: u32) {
            let f = file.clone();
            let buf = IoBuffer::Dma(file.alloc(PAGE).unwrap());
            file.submit(Request::read(0, buf), move |d| {
                d.result.expect("read");
                let name = thread_name();
                tx.send(name.clone()).unwrap();
                if name.starts_with("dioxide-poller-") || tries == 0 {
                    panic!("planted panic in a completion callback");
                }
                panic_on_poller(f, tx, tries - 1);
            })
            .unwrap_or_else(|r| panic!("refused: {}", r.error));
        }
        panic_on_poller(file.clone(), tx, 100);
        let mut on_poller = false;
        while let Ok(name) = rx.recv_timeout(LIMIT) {
            if name.starts_with("dioxide-poller-") {
                on_poller = true;
                break;
            }
        }
        assert!(on_poller, "no callback ran on the poller ({mode:?})");
        // The same (only) poller still serves requests, synchronous and asynchronous.
        for i in 0..50u64 {
            let off = (i % 8) * PAGE as u64;
            let (tx, rx) = channel();
            let b = IoBuffer::Dma(file.alloc(PAGE).unwrap());
            file.submit(Request::read(off, b), move |d| tx.send(d).unwrap())
                .unwrap_or_else(|r| panic!("refused: {}", r.error));
            let Ok(d) = rx.recv_timeout(LIMIT) else {
                std::mem::forget(file);
                std::mem::forget(dx);
                panic!("request {i} after the panic never completed ({mode:?})");
            };
            assert_eq!(d.result.unwrap(), PAGE);
            assert!(d.buf.as_slice() == &pattern(8 * PAGE, 3)[off as usize..][..PAGE]);
        }
        let mut back = vec![0; 100];
        assert_eq!(file.read_at(&mut back, 7).unwrap(), 100);
        drop(file);
        dx.shutdown();
    }
}

/// `FileOptions::on_extend`: called with the new length whenever a write raises `len` (and only
/// then), lengths only grow, the last one is `file.len()`, and each arrives before the
/// completion of the write that caused it (sync return or async callback).
#[test]
fn the_extend_hook_sees_each_new_length_before_its_write_completes() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    #[derive(Debug, PartialEq)]
    enum Ev {
        Extend(u64),
        Done(usize),
    }
    for mode in MODES {
        let (ctrl, _emu) = emulated(config(mode, &[(512, 1 << 14)]));
        let dx = Dioxide::builder()
            .controller(ctrl)
            .pollers([None, None])
            .build()
            .unwrap();
        let log = Arc::new(Mutex::new(Vec::<Ev>::new()));
        let l = log.clone();
        let opts =
            FileOptions::new(0, 512).on_extend(move |n| l.lock().unwrap().push(Ev::Extend(n)));
        let file = dx.open_file(0, Nsid(1), opts).unwrap();
        // (offset, len, dma, sync): extending, with gaps, unaligned, and some inside the file.
        let writes: [(u64, usize, bool, bool); 10] = [
            (0, 1000, false, false),
            (1000, 24, false, true),
            (4096, 4096, true, false),
            (100, 50, false, false),
            (9000, 333, false, false),
            (12288, 8192, true, true),
            (4096, 512, true, false),
            (20480, 4096, true, false),
            (30000, 7, false, true),
            (0, 4096, true, false),
        ];
        let mut ends = Vec::new();
        let mut len = 0u64;
        for (i, &(off, n, dma, sync)) in writes.iter().enumerate() {
            let data = pattern(n, i as u64);
            let end = off + n as u64;
            if end > len {
                ends.push(end);
                len = end;
            }
            if sync {
                assert_eq!(file.write_at(&data, off).unwrap(), n);
                log.lock().unwrap().push(Ev::Done(i));
                continue;
            }
            let buf = if dma {
                let mut b = file.alloc(n).unwrap();
                b.as_mut_slice().copy_from_slice(&data);
                IoBuffer::Dma(b)
            } else {
                IoBuffer::Heap(data)
            };
            let (tx, rx) = channel();
            let l = log.clone();
            file.submit(Request::write(off, buf), move |d| {
                l.lock().unwrap().push(Ev::Done(i));
                tx.send(d).unwrap();
            })
            .unwrap_or_else(|r| panic!("write {i} refused: {}", r.error));
            let d = rx.recv_timeout(LIMIT).expect("completion");
            assert_eq!(d.result.unwrap(), n, "write {i}");
        }
        assert_eq!(file.len(), len);
        let log = log.lock().unwrap();
        let hooks: Vec<u64> = log
            .iter()
            .filter_map(|e| match e {
                Ev::Extend(n) => Some(*n),
                Ev::Done(_) => None,
            })
            .collect();
        assert_eq!(hooks, ends, "{mode:?}: {log:?}");
        assert!(hooks.windows(2).all(|w| w[0] < w[1]), "{log:?}");
        assert_eq!(hooks.last().copied(), Some(file.len()));
        // Each extension is logged right before the completion of the write that caused it.
        let mut expect = Vec::new();
        let mut len = 0u64;
        for (i, &(off, n, _, _)) in writes.iter().enumerate() {
            let end = off + n as u64;
            if end > len {
                expect.push(Ev::Extend(end));
                len = end;
            }
            expect.push(Ev::Done(i));
        }
        assert_eq!(*log, expect, "{mode:?}");
        drop(file);
        dx.shutdown();
    }
}

/// A direct write to a file with no cached page does not take the page cache's
/// controller-wide directory lock; once a page is cached, a direct write over it drops it
/// (coherency: a later buffered read sees the direct write's data), and then the fast path
/// applies again.
#[test]
fn a_direct_write_with_nothing_cached_skips_the_cache_directory() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    let (ctrl, _emu) = emulated(config(Mode::Inline, &[(512, 1 << 14)]));
    let dx = Dioxide::builder()
        .controller(ctrl)
        .run_to_completion()
        .build()
        .unwrap();
    let len = 64 * PAGE as u64;
    let file = dx
        .open_file(0, Nsid(1), FileOptions::new(0, 2048).with_len(len))
        .unwrap();
    let dir_locks = || dx.cache_stats(0).unwrap().dir_locks;
    let mut buf = Some(IoBuffer::Dma(file.alloc(PAGE).unwrap()));
    let mut direct_write = |off: usize, seed: u64| {
        let mut b = buf.take().unwrap();
        fill(b.as_mut_slice(), seed);
        let (r, b) = file.write(b, off as u64, PAGE);
        assert_eq!(r.unwrap(), PAGE);
        buf = Some(b);
    };
    let before = dir_locks();
    for i in 0..16 {
        direct_write(i * PAGE, i as u64);
    }
    // One acquisition: the `cache_stats` call itself.
    assert_eq!(
        dir_locks(),
        before + 1,
        "a direct write took the directory lock"
    );
    // Cache page 5 (a buffered read), then overwrite it directly.
    let mut small = [0u8; 100];
    file.read_at(&mut small, 5 * PAGE as u64 + 7).unwrap();
    assert_eq!(small[..], pattern(PAGE, 5)[7..107]);
    let inval = dx.cache_stats(0).unwrap().invalidations;
    direct_write(5 * PAGE, 99);
    assert_eq!(dx.cache_stats(0).unwrap().invalidations, inval + 1);
    file.read_at(&mut small, 5 * PAGE as u64 + 7).unwrap();
    assert_eq!(
        small[..],
        pattern(PAGE, 99)[7..107],
        "a buffered read after a direct write saw stale data"
    );
    // Page 5 is cached again (that read filled it): a direct write elsewhere still has to look.
    let before = dir_locks();
    direct_write(9 * PAGE, 9);
    assert!(dir_locks() > before + 1);
    // Drop it with a direct write over it: nothing cached again, no directory.
    direct_write(5 * PAGE, 5);
    let before = dir_locks();
    direct_write(6 * PAGE, 6);
    assert_eq!(dir_locks(), before + 1);
}

/// Run to completion: dropping the instance with an asynchronous request still on the device
/// (its completion held back by the emulated controller) waits for it: the callback runs
/// exactly once, with the data, before the drop returns.
#[test]
fn run_to_completion_shutdown_completes_requests_in_flight() {
    use dioxide::emulated::{Action, Fault, Trigger};
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    let (ctrl, emu) = emulated(config(Mode::Threaded, &[(512, 1 << 12)]));
    let dx = Dioxide::builder()
        .controller(ctrl)
        .run_to_completion()
        .build()
        .unwrap();
    let file = dx
        .open_file(0, Nsid(1), FileOptions::new(0, 64).with_len(8192))
        .unwrap();
    emu.inject(Fault::once(
        Trigger::LbaRange {
            nsid: 1,
            start: 0,
            end: 8,
            opcode: None,
        },
        Action::Delay(Duration::from_millis(200)),
    ));
    let done = Arc::new(AtomicU32::new(0));
    let d = done.clone();
    let buf = file.alloc(PAGE).unwrap();
    file.submit(Request::read(0, buf), move |c| {
        assert_eq!(c.result.unwrap(), PAGE);
        d.fetch_add(1, Ordering::SeqCst);
    })
    .map_err(|r| r.error)
    .unwrap();
    // The device holds the completion: nothing has run yet.
    assert_eq!(done.load(Ordering::SeqCst), 0);
    drop(file);
    drop(dx);
    assert_eq!(done.load(Ordering::SeqCst), 1);
}
