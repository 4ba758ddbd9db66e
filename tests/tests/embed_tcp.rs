//! The embedding API on remote namespaces: `Dioxide::builder().transport_id("trtype:TCP ...")`
//! against the driver's NVMe/TCP target on loopback serving the emulated controller
//! ([`TcpTarget`]), on any machine.
//!
//! * the I/O paths of `tests/io.rs` that the file layer has (random offsets and lengths, heap
//!   and DMA buffers, synchronous and asynchronous, larger than one command's transfer, two
//!   namespaces of 512 B and 4 KiB blocks with the emulated controller's geometry), with
//!   pooled pollers and run to completion, the data checked against a model and read back
//!   by a second host;
//! * flush, write zeroes and deallocate carried to the target;
//! * a local (emulated PCIe) and a remote controller served by the same pollers;
//! * faults, with requests in flight: the target killed (connections closed), a target that
//!   hangs (connections open, nothing answered, caught by the Keep Alive that poller 0
//!   sends), and through a proxy a connection reset (RST) and a stream turned to garbage:
//!   every request ends exactly once with `EmbedError::ControllerLost`, later ones
//!   fail at once, and shutdown does not hang. Every wait is bounded by a watchdog.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dioxide::emulated::{Action, Fault, Mode, Trigger};
use dioxide::{BlockFile, Completed, Dioxide, EmbedError, FileOptions, IoBuffer, Request};
use dioxide_tests::*;

/// A request that does not complete within this fails the test rather than hanging it.
const LIMIT: Duration = Duration::from_secs(30);

/// Two namespaces (512 B × 16 Ki blocks, 4 KiB × 2 Ki blocks), 128 KiB MDTS.
fn target() -> TcpTarget {
    TcpTarget::start(config(Mode::Threaded, &[(512, 16384), (4096, 2048)]), 1)
}

fn remote(t: &TcpTarget, local: bool) -> Dioxide {
    let b = Dioxide::builder()
        .transport_id(&t.trid())
        .expect("transport ID");
    let b = if local {
        b.run_to_completion()
    } else {
        b.pollers([None, None])
    };
    b.cache_pages(64)
        .build()
        .expect("Dioxide on the remote controller")
}

/// One instance over a local emulated controller (index 0) and the remote one of `t` (index 1),
/// sharing two pollers.
fn local_and_remote(t: &TcpTarget) -> Dioxide {
    // The controller holds the emulated device.
    let (local, _) = emulated(config(Mode::Threaded, &[(512, 8192)]));
    Dioxide::builder()
        .controller(local)
        .transport_id(&t.trid())
        .expect("transport ID")
        .pollers([None, None])
        .build()
        .expect("Dioxide")
}

/// A 1 MiB file on namespace 1 of each controller of [`local_and_remote`]: (local, remote).
fn files_on_both(dx: &Dioxide) -> (BlockFile, BlockFile) {
    let opts = || FileOptions::new(0, 2048).with_len(1 << 20);
    let a = dx
        .open_file(0, dioxide::Nsid(1), opts())
        .expect("local file");
    let b = dx
        .open_file(1, dioxide::Nsid(1), opts())
        .expect("remote file");
    (a, b)
}

/// Random I/O on one file of `dx`'s controller 0, namespace `nsid`, checked against a model.
/// `model`: what the file holds now (all zeroes on a fresh namespace).
fn round_trip(dx: &Dioxide, nsid: u32, seed: u64, mut model: Vec<u8>) -> Vec<u8> {
    let (_, ns) = dx
        .namespaces()
        .into_iter()
        .find(|(_, n)| n.nsid().0 == nsid)
        .expect("namespace");
    let bs = ns.block_size() as u64;
    let cap: u64 = 1 << 20;
    let file = dx
        .open_file(0, ns.nsid(), FileOptions::new(0, cap / bs).with_len(cap))
        .expect("file");
    assert_eq!(model.len() as u64, cap);
    let mut rng = Rng(seed);
    for i in 0..120u64 {
        let aligned = i % 2 == 0;
        let (off, len) = if aligned {
            let len = bs * rng.range(1, 320 * 1024 / bs); // up to 2.5 × the 128 KiB MDTS
            (bs * rng.range(0, (cap - len) / bs + 1), len)
        } else {
            let len = rng.range(1, 20_000);
            (rng.range(0, cap - len + 1), len)
        };
        let (o, n) = (off as usize, len as usize);
        match i % 6 {
            0 | 3 => {
                let data = pattern(n, seed ^ i);
                assert_eq!(file.write_at(&data, off).expect("write_at"), n);
                model[o..o + n].copy_from_slice(&data);
            }
            1 => {
                let mut b = file.alloc(n).expect("alloc");
                b.as_mut_slice()[..n].copy_from_slice(&pattern(n, seed ^ i));
                model[o..o + n].copy_from_slice(&b.as_slice()[..n]);
                let (r, _) = file.write(IoBuffer::Dma(b), off, n);
                assert_eq!(r.expect("zero-copy write"), n);
            }
            2 => {
                let mut got = vec![0u8; n];
                assert_eq!(file.read_at(&mut got, off).expect("read_at"), n);
                assert!(got == model[o..o + n], "read_at [{off}, +{len}) differs");
            }
            4 => {
                let b = file.alloc(n).expect("alloc");
                let (r, b) = file.read(IoBuffer::Dma(b), off, n);
                assert_eq!(r.expect("zero-copy read"), n);
                let IoBuffer::Dma(b) = b else {
                    panic!("the buffer came back as another kind")
                };
                assert!(
                    b.as_slice()[..n] == model[o..o + n],
                    "read [{off}, +{len}) differs"
                );
            }
            _ => {
                // Asynchronous: a write then a read of the same range, both in flight.
                let data = pattern(n, seed ^ i ^ 0xa5);
                let (tx, rx) = channel();
                let tx2 = tx.clone();
                file.submit(Request::write(off, data.clone()), move |c| {
                    tx.send((0, c)).expect("send")
                })
                .map_err(|r| r.error)
                .expect("submit write");
                model[o..o + n].copy_from_slice(&data);
                let w = wait(&rx, dx);
                assert_eq!(w.0, 0);
                assert_eq!(w.1.result.expect("async write"), n);
                file.submit(Request::read(off, vec![0u8; n]), move |c| {
                    tx2.send((1, c)).expect("send")
                })
                .map_err(|r| r.error)
                .expect("submit read");
                let r = wait(&rx, dx);
                assert_eq!(r.1.result.expect("async read"), n);
                let IoBuffer::Heap(v) = r.1.buf else {
                    panic!("the buffer came back as another kind")
                };
                assert!(
                    v[..n] == model[o..o + n],
                    "async read [{off}, +{len}) differs"
                );
            }
        }
    }
    model
}

/// The next completion; polls a run-to-completion instance while it waits.
fn wait<T>(rx: &std::sync::mpsc::Receiver<T>, dx: &Dioxide) -> T {
    let end = Instant::now() + LIMIT;
    loop {
        dx.poll();
        if let Ok(v) = rx.recv_timeout(Duration::from_millis(1)) {
            return v;
        }
        assert!(Instant::now() < end, "a request did not complete");
    }
}

#[test]
fn remote_namespaces_round_trip_with_pollers_and_run_to_completion() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    let t = target();
    let mut models = Vec::new();
    for (local, nsid, seed) in [(false, 1, 11), (false, 2, 12), (true, 1, 13)] {
        let dx = remote(&t, local);
        // The geometry is the emulated controller's, as the target serves it.
        let shape: Vec<_> = dx
            .namespaces()
            .iter()
            .map(|(c, n)| (*c, n.nsid().0, n.block_size(), n.blocks()))
            .collect();
        assert_eq!(shape, [(0, 1, 512, 16384), (0, 2, 4096, 2048)]);
        assert!(dx.tcp_controller(0).is_some_and(|c| c.lost().is_none()));
        let before = match models.iter().position(|(n, _)| *n == nsid) {
            Some(i) => models.remove(i).1,
            None => vec![0u8; 1 << 20],
        };
        let m = round_trip(&dx, nsid, seed, before);
        models.push((nsid, m));
        dx.shutdown();
    }
    // A second host sees what the first wrote: the data is on the target's controller.
    let dx = remote(&t, false);
    for (nsid, m) in &models {
        let (_, ns) = dx
            .namespaces()
            .into_iter()
            .find(|(_, n)| n.nsid().0 == *nsid)
            .expect("namespace");
        let bs = ns.block_size() as u64;
        let f = dx
            .open_file(
                0,
                ns.nsid(),
                FileOptions::new(0, (1 << 20) / bs).with_len(1 << 20),
            )
            .expect("file");
        let mut got = vec![0u8; m.len()];
        assert_eq!(f.read_at(&mut got, 0).expect("read back"), m.len());
        assert!(
            got == *m,
            "namespace {nsid}: a new connection reads other data"
        );
    }
}

#[test]
fn maintenance_reaches_the_remote_controller() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    let t = target();
    let dx = remote(&t, false);
    let f = dx
        .open_file(
            0,
            dioxide::Nsid(1),
            FileOptions::new(0, 2048).with_len(1 << 20),
        )
        .expect("file");
    assert!(f.supports_write_zeroes());
    f.write_at(&pattern(1 << 20, 5), 0).expect("write");
    f.flush().expect("flush");
    f.write_zeroes(8192, 300 * 1024).expect("write zeroes");
    let mut got = vec![1u8; 1 << 20];
    f.read_at(&mut got, 0).expect("read");
    let want = pattern(1 << 20, 5);
    assert!(got[..8192] == want[..8192]);
    assert!(got[8192..8192 + 300 * 1024].iter().all(|&b| b == 0));
    assert!(got[8192 + 300 * 1024..] == want[8192 + 300 * 1024..]);
    // The target's namespaces have Dataset Management, and deallocated blocks read zeroes.
    assert!(f.supports_deallocate());
    f.deallocate(&[0..4096, 65536..131072]).expect("deallocate");
    f.read_at(&mut got, 0).expect("read after deallocate");
    assert!(got[..4096].iter().all(|&b| b == 0), "deallocated head");
    assert!(got[4096..8192] == want[4096..8192]);
    assert!(
        got[65536..131072].iter().all(|&b| b == 0),
        "deallocated middle"
    );
    assert!(got[8192 + 300 * 1024..] == want[8192 + 300 * 1024..]);
    // The asynchronous forms over TCP.
    let (tx, rx) = channel();
    let tx2 = tx.clone();
    f.submit_write_zeroes(512 * 1024, 64 * 1024, move |r| {
        tx2.send(("write zeroes", r)).expect("send")
    })
    .expect("submit write zeroes");
    let tx2 = tx.clone();
    f.submit_deallocate(
        &[768 * 1024..800 * 1024, 800 * 1024..832 * 1024],
        move |r| tx2.send(("deallocate", r)).expect("send"),
    )
    .expect("submit deallocate");
    for _ in 0..2 {
        let (what, r) = rx.recv_timeout(LIMIT).expect("callback");
        r.unwrap_or_else(|e| panic!("{what}: {e}"));
    }
    f.read_at(&mut got, 0)
        .expect("read after the asynchronous ones");
    for (a, b) in [(512 * 1024, 576 * 1024), (768 * 1024, 832 * 1024)] {
        assert!(got[a..b].iter().all(|&x| x == 0), "{a}..{b} not zeroed");
    }
    assert!(got[576 * 1024..768 * 1024] == want[576 * 1024..768 * 1024]);
    assert!(got[832 * 1024..] == want[832 * 1024..]);
    f.submit_flush(move |r| tx.send(("flush", r)).expect("send"))
        .expect("submit flush");
    rx.recv_timeout(LIMIT)
        .expect("flush callback")
        .1
        .expect("flush");
}

#[test]
fn a_local_and_a_remote_controller_share_the_pollers() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    let t = target();
    let dx = local_and_remote(&t);
    assert!(dx.tcp_controller(0).is_none() && dx.tcp_controller(1).is_some());
    let (a, b) = files_on_both(&dx);
    let data = pattern(1 << 20, 77);
    a.write_at(&data, 0).expect("local write");
    // Copy local → remote in 64 KiB zero-copy pieces from four threads.
    std::thread::scope(|s| {
        for k in 0..4u64 {
            let (a, b) = (&a, &b);
            s.spawn(move || {
                for i in (k..16).step_by(4) {
                    let off = i * 65536;
                    let (r, buf) = a.read(a.alloc(65536).expect("alloc"), off, 65536);
                    assert_eq!(r.expect("local read"), 65536);
                    let IoBuffer::Dma(src) = buf else {
                        panic!("the buffer came back as another kind")
                    };
                    let mut dst = b.alloc(65536).expect("alloc");
                    dst.as_mut_slice().copy_from_slice(src.as_slice());
                    let (r, _) = b.write(IoBuffer::Dma(dst), off, 65536);
                    assert_eq!(r.expect("remote write"), 65536);
                }
            });
        }
    });
    let mut got = vec![0u8; 1 << 20];
    b.read_at(&mut got, 0).expect("remote read");
    assert!(got == data, "the remote copy differs");
}

/// A DMA buffer of one controller handed to a file of another (a TCP buffer, whose "IOVA" is
/// its address, to a PCIe file, and a PCIe buffer to a TCP file) takes the buffered path: the
/// data arrive intact, nothing is transferred from or to a foreign address.
#[test]
fn a_buffer_of_another_controller_takes_the_buffered_path() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    let t = target();
    let dx = local_and_remote(&t);
    let (a, b) = files_on_both(&dx);
    for (k, (to, other)) in [(&a, &b), (&b, &a)].into_iter().enumerate() {
        let data = pattern(65536, 90 + k as u64);
        let mut src = other.alloc(65536).expect("alloc");
        src.as_mut_slice().copy_from_slice(&data);
        let (r, _) = to.write(IoBuffer::Dma(src), 0, 65536);
        assert_eq!(r.expect("write from a foreign buffer"), 65536);
        to.flush().expect("flush");
        let (r, buf) = to.read(other.alloc(65536).expect("alloc"), 0, 65536);
        assert_eq!(r.expect("read into a foreign buffer"), 65536);
        assert!(
            buf.as_slice() == &data[..],
            "foreign buffer read back differs ({k})"
        );
        let mut got = vec![0u8; 65536];
        to.read_at(&mut got, 0).expect("read back");
        assert!(
            got == data,
            "the data written from a foreign buffer differ ({k})"
        );
    }
}

/// Async reads and writes kept in flight from two threads on a file of the target's, until
/// `stop`; returns (submitted, completed Ok, completed with ControllerLost) and checks each
/// callback runs exactly once and every error is ControllerLost.
fn load(file: &BlockFile, stop: &std::sync::atomic::AtomicBool) -> (u32, u32, u32) {
    let calls: Arc<Vec<AtomicU32>> = Arc::new((0..100_000).map(|_| AtomicU32::new(0)).collect());
    let tally = Arc::new(Mutex::new((0u32, 0u32)));
    let submitted = AtomicU32::new(0);
    std::thread::scope(|s| {
        for k in 0..2u64 {
            let (calls, tally, submitted) = (calls.clone(), tally.clone(), &submitted);
            s.spawn(move || {
                let (tx, rx) = channel::<()>();
                let mut in_flight = 0;
                let mut i = 0u64;
                while !stop.load(Ordering::SeqCst) || in_flight > 0 {
                    let more = !stop.load(Ordering::SeqCst)
                        && submitted.load(Ordering::SeqCst) < calls.len() as u32 - 64;
                    if more && in_flight < 16 {
                        let id = submitted.fetch_add(1, Ordering::SeqCst) as usize;
                        let off = ((k * 128 + i % 128) * 4096) % (1 << 20);
                        i += 1;
                        let buf = file.alloc(4096).expect("alloc");
                        let req = if i % 2 == 0 {
                            Request::write(off, IoBuffer::Dma(buf))
                        } else {
                            Request::read(off, IoBuffer::Dma(buf))
                        };
                        let (cb_calls, cb_tally, tx) = (calls.clone(), tally.clone(), tx.clone());
                        let r = file.submit(req, move |c: Completed| {
                            cb_calls[id].fetch_add(1, Ordering::SeqCst);
                            let mut t = cb_tally.lock().expect("tally");
                            match c.result {
                                Ok(_) => t.0 += 1,
                                Err(EmbedError::ControllerLost { .. }) => t.1 += 1,
                                Err(e) => panic!("request {id}: unexpected error: {e}"),
                            }
                            let _ = tx.send(());
                        });
                        match r {
                            Ok(()) => in_flight += 1,
                            Err(r) => {
                                assert!(
                                    matches!(r.error, EmbedError::ControllerLost { .. }),
                                    "refused: {}",
                                    r.error
                                );
                                // Counted like a completion: it ended once, with the error.
                                calls[id].fetch_add(1, Ordering::SeqCst);
                                tally.lock().expect("tally").1 += 1;
                            }
                        }
                        continue;
                    }
                    if in_flight == 0 {
                        // Out of request ids: wait for the stop.
                        std::thread::sleep(Duration::from_millis(1));
                        continue;
                    }
                    rx.recv_timeout(LIMIT)
                        .expect("a request in flight never completed");
                    in_flight -= 1;
                }
            });
        }
    });
    let n = submitted.load(Ordering::SeqCst);
    for (id, c) in calls.iter().take(n as usize).enumerate() {
        assert_eq!(
            c.load(Ordering::SeqCst),
            1,
            "request {id} ended {c:?} times"
        );
    }
    let (ok, lost) = *tally.lock().expect("tally");
    assert_eq!(ok + lost, n);
    (n, ok, lost)
}

/// Drive `fault` on the target while requests are in flight; then check that everything
/// ended once, that the controller is lost, and that new requests fail at once.
fn through_a_fault(fault: impl FnOnce(&mut TcpTarget, &Proxy) + Send, kato_ms: u32) {
    let mut t = target();
    let proxy = Proxy::start(t.addr);
    // Hold every completion a little, so that requests are in flight when the fault hits.
    hold_completions(&t.emu, Duration::from_millis(2));
    let dx = Dioxide::builder()
        .transport_id(&t.trid_at(proxy.addr))
        .expect("transport ID")
        .tcp_keep_alive(kato_ms)
        // A stream that turned to garbage may announce a long PDU and then stall: the
        // command timeout ends it.
        .tcp_command_timeout(Duration::from_secs(5))
        .pollers([None, None])
        .build()
        .expect("Dioxide");
    let file = dx
        .open_file(
            0,
            dioxide::Nsid(1),
            FileOptions::new(0, 2048).with_len(1 << 20),
        )
        .expect("file");
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (n, ok, lost) = std::thread::scope(|s| {
        let h = s.spawn(|| load(&file, &stop));
        // I/O is flowing (1 MiB through the proxy).
        proxy.wait_for(1 << 20);
        fault(&mut t, &proxy);
        // Wait until the controller is seen lost (a later request fails), then stop.
        let end = Instant::now() + LIMIT;
        while dx.tcp_controller(0).is_some_and(|c| c.lost().is_none()) {
            // A zero-copy read goes to the target whatever the page cache holds.
            if let (Err(e), _) = file.read(file.alloc(4096).expect("alloc"), 0, 4096) {
                assert!(matches!(e, EmbedError::ControllerLost { .. }), "{e}");
                break;
            }
            assert!(Instant::now() < end, "the controller was never seen lost");
        }
        stop.store(true, Ordering::SeqCst);
        h.join().expect("load threads")
    });
    note(format!(
        "{n} requests: {ok} completed, {lost} failed with ControllerLost"
    ));
    assert!(ok > 0, "nothing completed before the fault");
    assert!(lost > 0, "no request saw the lost controller");
    // Every later request fails at once, with the same error.
    let (r, _) = file.read(file.alloc(4096).expect("alloc"), 0, 4096);
    let e = r.expect_err("read on a lost controller");
    assert!(matches!(e, EmbedError::ControllerLost { .. }), "{e}");
    assert!(e.to_string().contains("controller lost"), "{e}");
    let (r, _) = file.write(file.alloc(4096).expect("alloc"), 0, 4096);
    assert!(matches!(r, Err(EmbedError::ControllerLost { .. })), "{r:?}");
    drop(file);
    dx.shutdown();
}

#[test]
fn killing_the_target_fails_every_request_once() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    through_a_fault(|t, _| t.kill(), 5_000);
}

#[test]
fn a_connection_reset_fails_every_request_once() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    through_a_fault(|_, p| p.fault(ProxyFault::Reset), 5_000);
}

#[test]
fn a_target_answering_garbage_fails_every_request_once() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    through_a_fault(|_, p| p.fault(ProxyFault::Garbage), 5_000);
}

#[test]
fn a_hung_target_is_lost_through_the_keep_alive() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    // KATO 1 s: a Keep Alive every 0.5 s from poller 0; the unanswered one ends the
    // association after 1 s, long before the 30 s command timeout.
    through_a_fault(|t, _| t.freeze(), 1_000);
}

#[test]
fn bad_transport_ids_are_typed_errors() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    for (trid, needle) in [
        ("trtype:PCIe traddr:0000:01:00.0", "Builder::controller"),
        ("trtype:TCP traddr:localhost subnqn:x", "not an IP address"),
        (
            "trtype:TCP traddr:127.0.0.1 ns:1 subnqn:x",
            "key ns is not taken",
        ),
        ("trtype:TCP traddr:127.0.0.1 subnqn:x hdgst:1", "unknown"),
    ] {
        let e = Dioxide::builder()
            .transport_id(trid)
            .expect_err(trid)
            .to_string();
        assert!(e.contains(needle), "{trid}: {e}");
    }
    // A port nobody listens on: refused at build, with the address in the message.
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    drop(l);
    let e = Dioxide::builder()
        .transport_id(&format!(
            "trtype:TCP traddr:127.0.0.1 trsvcid:{port} subnqn:nqn.x"
        ))
        .expect("parses")
        .build()
        .expect_err("nobody listens");
    assert!(matches!(e, EmbedError::Remote(_)), "{e}");
    // A subsystem the target does not serve.
    let t = target();
    let trid = t.trid().replace(TCP_SUBNQN, "nqn.2026-01.io.dioxide:none");
    let e = Dioxide::builder()
        .transport_id(&trid)
        .expect("parses")
        .build()
        .expect_err("no such subsystem");
    assert!(matches!(e, EmbedError::Remote(_)), "{e}");
}

/// Run to completion: the thread that built the instance owns the connection; a killed target
/// fails its next request with ControllerLost, an asynchronous one in flight completes once
/// with it, and dropping the instance returns.
#[test]
fn run_to_completion_sees_the_controller_lost() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    let mut t = target();
    // Hold completions so that the asynchronous read is still in flight at the kill.
    hold_completions(&t.emu, Duration::from_millis(200));
    let dx = remote(&t, true);
    let f = dx
        .open_file(
            0,
            dioxide::Nsid(1),
            FileOptions::new(0, 2048).with_len(1 << 20),
        )
        .expect("file");
    f.write_at(&pattern(8192, 3), 0)
        .expect("write before the kill");
    let (tx, rx) = channel();
    f.submit(
        Request::read(0, IoBuffer::Dma(f.alloc(4096).expect("alloc"))),
        move |c: Completed| tx.send(c.result).expect("send"),
    )
    .map_err(|r| r.error)
    .expect("submit");
    t.kill();
    let r = wait(&rx, &dx);
    assert!(matches!(r, Err(EmbedError::ControllerLost { .. })), "{r:?}");
    assert!(rx.try_recv().is_err(), "a second completion");
    // Not cached (the write above left its pages in the page cache): it goes to the target.
    let mut b = [0u8; 512];
    let e = f
        .read_at(&mut b, 512 * 1024)
        .expect_err("read on a lost controller");
    assert!(matches!(e, EmbedError::ControllerLost { .. }), "{e}");
    drop(f);
    drop(dx);
}

/// Run to completion over NVMe/TCP: the Keep Alive goes out from the owner's polls only. An
/// owner idle for longer than the target's 2 × KATO who calls `Dioxide::poll` every so often
/// keeps the controller; one who stops polling loses it.
#[test]
fn an_idle_run_to_completion_owner_who_polls_keeps_the_controller() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    let t = target();
    let dx = Dioxide::builder()
        .transport_id(&t.trid())
        .expect("transport ID")
        .tcp_keep_alive(1000)
        .run_to_completion()
        .build()
        .expect("Dioxide");
    let f = dx
        .open_file(
            0,
            dioxide::Nsid(1),
            FileOptions::new(0, 2048).with_len(1 << 20),
        )
        .expect("file");
    f.write_at(&pattern(4096, 5), 0).expect("write");
    f.flush().expect("flush");
    // Idle for 2.5 × KATO, polling every 100 ms.
    for _ in 0..25 {
        dx.poll();
        std::thread::sleep(Duration::from_millis(100));
    }
    let tcp = dx.tcp_controller(0).expect("remote controller");
    assert_eq!(tcp.lost(), None);
    let mut got = vec![0u8; 4096];
    f.read_at(&mut got, 64 * 1024)
        .expect("read after an idle time with polls");
    f.write_at(&pattern(4096, 6), 128 * 1024)
        .expect("write after an idle time");
    f.flush().expect("flush after an idle time");
    // Not polling for 2.5 × KATO: the target ends the association (after 2 × KATO).
    std::thread::sleep(Duration::from_millis(2500));
    let e = f
        .read_at(&mut got, 256 * 1024)
        .expect_err("a read after an idle time without polls");
    assert!(matches!(e, EmbedError::ControllerLost { .. }), "{e}");
    assert!(tcp.lost().is_some());
}

/// Shutdown while a request waits on the target from poller 1 only: poller 0 (the one that
/// drives the Keep Alive while the instance runs) leaves at once, and poller 1 keeps the Keep
/// Alive going until its request completed. Without that, the target (KATO 1 s, an
/// association ends after 2 × KATO without a command) drops the controller during the 3 s the
/// request is held, and the request fails with ControllerLost.
#[test]
fn shutdown_keeps_the_keep_alive_while_a_poller_waits_for_the_target() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    let t = target();
    let dx = Dioxide::builder()
        .transport_id(&t.trid())
        .expect("transport ID")
        .tcp_keep_alive(1000)
        .pollers([None, None])
        .build()
        .expect("Dioxide");
    let f = dx
        .open_file(
            0,
            dioxide::Nsid(1),
            FileOptions::new(0, 2048).with_len(1 << 20),
        )
        .expect("file");
    let data = pattern(1 << 20, 9);
    f.write_at(&data, 0).expect("write");
    f.flush().expect("flush");
    // A client thread whose requests go to poller 1 (a thread's home poller is fixed: probe
    // it with one direct read and the pollers' counters).
    let (done_tx, done) = channel();
    let mut worker = None;
    for _ in 0..8 {
        let before = dx.poller_stats()[1].submitted;
        let (probed_tx, probed) = channel::<()>();
        let (go_tx, go) = channel::<bool>();
        let (f, done_tx) = (f.clone(), done_tx.clone());
        let h = std::thread::spawn(move || {
            let (r, _) = f.read(f.alloc(4096).expect("alloc"), 0, 4096);
            assert_eq!(r.expect("probe read"), 4096);
            probed_tx.send(()).expect("send");
            if go.recv().expect("go") {
                f.submit(
                    Request::read(512 * 1024, IoBuffer::Dma(f.alloc(4096).expect("alloc"))),
                    move |c: Completed| done_tx.send(c).expect("send"),
                )
                .map_err(|r| r.error)
                .expect("submit");
            }
        });
        probed.recv_timeout(LIMIT).expect("probe");
        let on_1 = dx.poller_stats()[1].submitted > before;
        if on_1 {
            worker = Some((h, go_tx));
            break;
        }
        go_tx.send(false).expect("send");
        h.join().expect("probe thread");
    }
    let (h, go) = worker.expect("no client thread had poller 1 as its home");
    t.emu.inject(Fault {
        trigger: Trigger::LbaRange {
            nsid: 1,
            start: 1024,
            end: 1032,
            opcode: None,
        },
        action: Action::Delay(Duration::from_secs(3)),
        times: None,
    });
    go.send(true).expect("send");
    h.join().expect("client thread");
    drop(f);
    dx.shutdown();
    let c = done
        .recv_timeout(LIMIT)
        .expect("the held request's callback");
    assert_eq!(c.result.expect("the held request"), 4096);
    assert!(c.buf.as_slice() == &data[512 * 1024..516 * 1024]);
}
