//! The transport seam's NVMe/TCP arm against the target over loopback: data through the
//! caller's buffers (in-capsule and R2T writes, C2HData reads), and the failures of a running
//! association (target gone, connection reset, a silent target: command timeout and Keep
//! Alive timeout): every request ends exactly once, nothing hangs.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::*;
use crate::nvme::qpair::{IoOp, QueueOptions};
use crate::nvmf::host::HostError;
use crate::transport::{
    TcpController, TcpOptions, TransportBuf, TransportController, TransportError, TransportIoError,
    TransportQueue,
};
use crate::types::{Lba, Nsid};

fn tcp(addr: SocketAddr, d: Digests, tweak: impl FnOnce(&mut HostOptions)) -> TransportController {
    let mut host = host_opts(d);
    tweak(&mut host);
    TcpController::connect(TcpOptions { addr, host })
        .expect("connect over the seam")
        .into()
}

/// Each request's result, or why the queue failed and each request's error.
type Outcome = Result<Vec<Result<(), TransportIoError>>, (TransportError, Vec<Option<String>>)>;

/// Submits every (op, lba, buffer index) and polls until all complete; returns each tag's
/// result, checking that every tag completes exactly once.
fn run_all(
    q: &mut TransportQueue<u64>,
    ns: &crate::Namespace,
    bufs: &[TransportBuf],
    ios: &[(IoOp, u64, usize)],
) -> Outcome {
    let mut refused = None;
    let mut left = 0;
    for (tag, &(op, lba, b)) in ios.iter().enumerate() {
        // SAFETY: the buffers live in the caller's vector, untouched until every completion
        // has been returned below.
        match unsafe { q.submit_raw(op, ns, Lba(lba), &bufs[b], tag as u64) } {
            Ok(()) => left += 1,
            Err(r) => {
                refused = Some(r.error);
                break;
            }
        }
    }
    q.ring();
    let mut got: Vec<Option<Result<(), TransportIoError>>> = ios.iter().map(|_| None).collect();
    let mut failed = None;
    while left > 0 {
        let r = q.poll(0, |tag, res| {
            let slot = &mut got[tag as usize];
            assert!(slot.is_none(), "tag {tag} completed twice");
            *slot = Some(res);
            left -= 1;
        });
        if let Err(e) = r {
            assert_eq!(left, 0, "every request ended before the error was returned");
            failed = Some(e);
        }
    }
    if let Some(e) = failed.or(refused) {
        let why = got
            .into_iter()
            .map(|g| g.and_then(|r| r.err()).map(|e| e.to_string()))
            .collect();
        return Err((e, why));
    }
    Ok(got.into_iter().map(|g| g.expect("completed")).collect())
}

#[test]
fn the_seam_moves_data_over_tcp_into_the_callers_buffers() {
    watchdog(
        "the_seam_moves_data_over_tcp_into_the_callers_buffers",
        test_watchdog::INTEGRATION,
        || {
            let t = TestTarget::with_backend(mem_backend(), TargetOptions::default(), 2);
            for d in ALL_DIGESTS {
                let c = tcp(t.addr, d, |_| {});
                let nss = c.namespaces();
                assert_eq!(
                    nss.iter()
                        .map(|n| (n.nsid().0, n.block_size()))
                        .collect::<Vec<_>>(),
                    vec![(1, 512), (2, 4096)]
                );
                let ns = c.namespace(Nsid(1)).expect("namespace 1");
                assert!(c.namespace(Nsid(9)).is_err());
                // Two command slots, four requests: two wait their turn in software.
                let mut q = c
                    .create_qpair::<u64>(QueueOptions::default().with_entries(2).with_requests(4))
                    .expect("I/O queue");
                // 4 KiB writes go in-capsule; 64 KiB ones (over IOCCSZ) after an R2T.
                let sizes = [4096usize, 65536, 512, 131072];
                let mut bufs: Vec<TransportBuf> = Vec::new();
                let mut lba = 0u64;
                let mut ios = Vec::new();
                for (i, &len) in sizes.iter().enumerate() {
                    let mut b = c.alloc(len).expect("alloc");
                    b.as_mut_slice()
                        .copy_from_slice(&pattern(i as u64 + 1, len));
                    bufs.push(b);
                    ios.push((IoOp::Write, lba, i));
                    lba += (len / 512) as u64;
                }
                for r in run_all(&mut q, &ns, &bufs, &ios).expect("writes") {
                    r.expect("write");
                }
                for b in &mut bufs {
                    b.as_mut_slice().fill(0xee);
                }
                let reads: Vec<_> = ios.iter().map(|&(_, l, i)| (IoOp::Read, l, i)).collect();
                for r in run_all(&mut q, &ns, &bufs, &reads).expect("reads") {
                    r.expect("read");
                }
                for (i, b) in bufs.iter().enumerate() {
                    assert!(
                        b.as_slice() == pattern(i as u64 + 1, sizes[i]).as_slice(),
                        "buffer {i} ({d:?}) read back different data"
                    );
                }
                // Out of the namespace: refused at submission, the tag handed back.
                let end = ns.blocks() - 1;
                // SAFETY: refused, so the buffer is never used by the queue.
                let r = unsafe { q.submit_raw(IoOp::Read, &ns, Lba(end), &bufs[0], 77) };
                let r = r.expect_err("beyond the namespace");
                assert_eq!(r.tag, 77);
                assert!(
                    r.error.to_string().contains("beyond namespace 1"),
                    "{}",
                    r.error
                );
                c.process_admin().expect("admin housekeeping");
            }
        },
    )
}

/// A TCP proxy in front of the target that can stop forwarding (a silent target) or cut the
/// connections (a reset).
struct Proxy {
    addr: SocketAddr,
    paused: Arc<AtomicBool>,
    resetting: Arc<AtomicBool>,
    conns: Arc<std::sync::Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    fn start(to: SocketAddr) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let paused = Arc::new(AtomicBool::new(false));
        let resetting = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (p, cs, rs) = (paused.clone(), conns.clone(), resetting.clone());
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(host) = c else { return };
                let Ok(tgt) = TcpStream::connect(to) else {
                    return;
                };
                let _ = host.set_nodelay(true);
                let _ = tgt.set_nodelay(true);
                {
                    let mut v = cs.lock().unwrap();
                    v.push(host.try_clone().expect("clone"));
                    v.push(tgt.try_clone().expect("clone"));
                }
                for (mut a, mut b) in [
                    (
                        host.try_clone().expect("clone"),
                        tgt.try_clone().expect("clone"),
                    ),
                    (tgt, host),
                ] {
                    let (p, rs) = (p.clone(), rs.clone());
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 65536];
                        loop {
                            let n = match a.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            // Paused: what arrives is swallowed, as by a target that hangs.
                            if !p.load(Ordering::Relaxed) && b.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        // Pass an end of stream on, unless resetting (then the last close of
                        // each socket sends an RST) or paused (a hung target says nothing).
                        if !rs.load(Ordering::Relaxed) && !p.load(Ordering::Relaxed) {
                            let _ = b.shutdown(Shutdown::Write);
                        }
                    });
                }
            }
        });
        Proxy {
            addr,
            paused,
            resetting,
            conns,
        }
    }

    /// Resets every connection (RST, not FIN): SO_LINGER 0 on each socket, then a read
    /// shutdown ends the forwarding threads, whose closes are the last.
    fn reset(&self) {
        self.resetting.store(true, Ordering::Relaxed);
        for s in self.conns.lock().unwrap().drain(..) {
            let lin = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            use std::os::fd::AsRawFd;
            // SAFETY: setsockopt on a socket this test owns, with a valid linger struct.
            unsafe {
                libc::setsockopt(
                    s.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    (&lin as *const libc::linger).cast(),
                    std::mem::size_of::<libc::linger>() as libc::socklen_t,
                )
            };
            let _ = s.shutdown(Shutdown::Read);
        }
    }
}

/// Starts `n` reads, then `fault`; every read ends exactly once with an error, the poll
/// reports the dead connection, and later submissions say "controller lost".
fn fault_ends_everything_once(
    c: &TransportController,
    fault: impl FnOnce(),
    expect: impl Fn(&TransportError) -> bool,
) -> Vec<Option<String>> {
    let ns = c.namespace(Nsid(1)).expect("namespace");
    // 8 commands on the connection, 8 more waiting for a slot.
    let mut q = c
        .create_qpair::<u64>(QueueOptions::default().with_entries(8).with_requests(16))
        .expect("queue");
    let bufs: Vec<_> = (0..16).map(|_| c.alloc(4096).expect("alloc")).collect();
    // A first round completes normally.
    let ios: Vec<_> = (0..16).map(|i| (IoOp::Read, i as u64 * 8, i)).collect();
    run_all(&mut q, &ns, &bufs, &ios).expect("a healthy round");
    fault();
    let mut rounds = 0;
    loop {
        rounds += 1;
        assert!(rounds < 100_000, "the fault was never noticed");
        match run_all(&mut q, &ns, &bufs, &ios) {
            Ok(_) => continue,
            Err((e, why)) => {
                assert!(expect(&e), "unexpected error: {e}");
                // SAFETY: refused, the buffer is never used.
                let r = unsafe { q.submit_raw(IoOp::Read, &ns, Lba(0), &bufs[0], 1) };
                let r = r.expect_err("a dead queue refuses");
                assert!(
                    r.error.to_string().contains("controller lost"),
                    "{}",
                    r.error
                );
                return why;
            }
        }
    }
}

#[test]
fn target_killed_or_connection_reset_ends_every_request_once() {
    watchdog(
        "target_killed_or_connection_reset_ends_every_request_once",
        test_watchdog::INTEGRATION,
        || {
            // The target goes away.
            let t = TestTarget::with_backend(mem_backend(), TargetOptions::default(), 1);
            let c = tcp(t.addr, Digests::default(), |_| {});
            let why = fault_ends_everything_once(
                &c,
                || drop(t),
                |e| {
                    matches!(
                        e,
                        TransportError::Tcp(
                            HostError::Closed | HostError::Io(_) | HostError::Lost(_)
                        )
                    )
                },
            );
            assert!(
                why.iter().flatten().all(|w| w.contains("controller lost")),
                "{why:?}"
            );
            drop(c);

            // The connection is reset under the host.
            let t = TestTarget::with_backend(mem_backend(), TargetOptions::default(), 1);
            let p = Proxy::start(t.addr);
            let c = tcp(p.addr, Digests::default(), |_| {});
            let why = fault_ends_everything_once(
                &c,
                || p.reset(),
                |e| {
                    matches!(
                        e,
                        TransportError::Tcp(
                            HostError::Closed | HostError::Io(_) | HostError::Lost(_)
                        )
                    )
                },
            );
            assert!(
                why.iter().flatten().all(|w| w.contains("controller lost")),
                "{why:?}"
            );
        },
    )
}

#[test]
fn a_silent_target_times_out_commands_and_keep_alive() {
    watchdog(
        "a_silent_target_times_out_commands_and_keep_alive",
        test_watchdog::INTEGRATION,
        || {
            let t = TestTarget::with_backend(mem_backend(), TargetOptions::default(), 1);
            // Command timeout: the target stops answering; the late command ends with
            // Timeout, the others with "controller lost".
            let p = Proxy::start(t.addr);
            let c = tcp(p.addr, Digests::default(), |o| {
                o.command_timeout = Duration::from_millis(300);
                o.timeout = Duration::from_secs(2);
            });
            let why = fault_ends_everything_once(
                &c,
                || p.paused.store(true, Ordering::Relaxed),
                |e| matches!(e, TransportError::Tcp(HostError::Timeout { .. })),
            );
            let timed_out = why
                .iter()
                .flatten()
                .filter(|w| w.starts_with("the command timed out"))
                .count();
            let lost = why
                .iter()
                .flatten()
                .filter(|w| w.contains("controller lost"))
                .count();
            assert_eq!((timed_out, lost), (1, 15), "{why:?}");
            drop(c);

            // Keep Alive: KATO 400 ms, sent every 200 ms; the target goes silent, the Keep
            // Alive times out, the controller is lost, and its I/O queue ends its requests.
            let p = Proxy::start(t.addr);
            let c = tcp(p.addr, Digests::default(), |o| {
                o.kato_ms = 400;
                o.timeout = Duration::from_secs(2);
            });
            let ns = c.namespace(Nsid(1)).expect("namespace");
            let mut q = c
                .create_qpair::<u64>(QueueOptions::default().with_entries(8))
                .expect("queue");
            // Alive for a while: Keep Alives get answered.
            let t0 = std::time::Instant::now();
            while t0.elapsed() < Duration::from_millis(900) {
                c.process_admin().expect("keep alive answered");
                std::thread::sleep(Duration::from_millis(20));
            }
            let buf = c.alloc(512).expect("alloc");
            p.paused.store(true, Ordering::Relaxed);
            // SAFETY: `buf` outlives the queue's use of it (checked by the poll below).
            unsafe { q.submit_raw(IoOp::Read, &ns, Lba(0), &buf, 5) }
                .map_err(|r| r.error)
                .expect("submit");
            q.ring();
            let e = loop {
                match c.process_admin() {
                    Ok(()) => std::thread::sleep(Duration::from_millis(20)),
                    Err(e) => break e,
                }
            };
            assert!(
                matches!(e, TransportError::Tcp(HostError::KeepAliveTimeout { .. })),
                "{e}"
            );
            assert!(
                e.to_string()
                    .contains("Keep Alive not answered within KATO")
            );
            let mut ended = Vec::new();
            let r = q.poll(0, |tag, r| ended.push((tag, r.map_err(|e| e.to_string()))));
            assert!(r.is_err());
            assert_eq!(ended.len(), 1);
            assert_eq!(ended[0].0, 5);
            let msg = ended[0].1.as_ref().expect_err("lost");
            assert!(
                msg.contains("controller lost") && msg.contains("Keep Alive"),
                "{msg}"
            );
            assert!(c.process_admin().is_err());
            assert!(c.create_qpair::<u64>(QueueOptions::default()).is_err());
        },
    )
}

#[test]
fn the_pollers_keep_alive_skips_a_tick_while_an_admin_command_runs() {
    watchdog(
        "the_pollers_keep_alive_skips_a_tick_while_an_admin_command_runs",
        test_watchdog::INTEGRATION,
        || {
            let t = TestTarget::with_backend(mem_backend(), TargetOptions::default(), 1);
            let c = TcpController::connect(TcpOptions {
                addr: t.addr,
                host: host_opts(Digests::default()),
            })
            .expect("connect");
            assert!(c.try_process_admin().expect("keep alive"));
            {
                let _busy = c.hold_admin();
                // Would block (a deadlock here, on this thread) without the skip.
                assert!(!c.try_process_admin().expect("skipped"));
            }
            assert!(c.try_process_admin().expect("keep alive"));
            c.smart_log().expect("an admin command afterwards");
        },
    )
}
