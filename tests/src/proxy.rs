//! A TCP proxy for fault tests of NVMe/TCP hosts ([`Proxy`]): it forwards between the host and
//! a target, counts what it forwards, and on demand resets every connection (RST) or inserts
//! garbage into the stream toward the host.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What a [`Proxy`] does to the stream at the fault.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ProxyFault {
    /// Reset both connections of every pair (RST).
    Reset,
    /// Insert garbage into the target-to-host stream, then forward on.
    Garbage,
}

/// A TCP proxy between the host and `nvmf_tgt` that counts what it forwards, and on demand
/// resets the connections or corrupts the stream toward the host.
pub struct Proxy {
    /// Where the host connects.
    pub addr: SocketAddr,
    forwarded: Arc<AtomicU64>,
    garbage: Arc<AtomicBool>,
    reset: Arc<AtomicBool>,
    socks: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    /// Listen on `127.0.0.1:<free port>`; each connection is forwarded to `to`.
    pub fn start(to: SocketAddr) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let forwarded = Arc::new(AtomicU64::new(0));
        let garbage = Arc::new(AtomicBool::new(false));
        let reset = Arc::new(AtomicBool::new(false));
        let socks = Arc::new(Mutex::new(Vec::new()));
        let (fw, gb, rs, ss) = (
            forwarded.clone(),
            garbage.clone(),
            reset.clone(),
            socks.clone(),
        );
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(host) = c else { return };
                let Ok(tgt) = TcpStream::connect(to) else {
                    return;
                };
                ss.lock()
                    .unwrap()
                    .extend([host.try_clone().unwrap(), tgt.try_clone().unwrap()]);
                for (a, b, to_host) in [
                    (host.try_clone().unwrap(), tgt.try_clone().unwrap(), false),
                    (tgt, host, true),
                ] {
                    let (fw, gb, rs) = (fw.clone(), gb.clone(), rs.clone());
                    std::thread::spawn(move || pump(a, b, to_host, &fw, &gb, &rs));
                }
            }
        });
        Proxy {
            addr,
            forwarded,
            garbage,
            reset,
            socks,
        }
    }

    /// Waits until at least `bytes` went through (I/O is flowing); panics, naming what went
    /// through, if that takes over a minute (a stuck workload fails rather than hangs).
    pub fn wait_for(&self, bytes: u64) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let n = self.forwarded.load(Ordering::Relaxed);
            if n >= bytes {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "proxy: only {n} of {bytes} bytes went through in 60 s: is I/O flowing?"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Do `f` to every connection (see [`ProxyFault`]).
    pub fn fault(&self, f: ProxyFault) {
        match f {
            ProxyFault::Garbage => self.garbage.store(true, Ordering::Relaxed),
            ProxyFault::Reset => {
                self.reset.store(true, Ordering::Relaxed);
                for s in self.socks.lock().unwrap().drain(..) {
                    let lin = libc::linger {
                        l_onoff: 1,
                        l_linger: 0,
                    };
                    // SAFETY: setsockopt on a socket this test owns, with a valid linger struct
                    // of the size given.
                    unsafe {
                        libc::setsockopt(
                            s.as_raw_fd(),
                            libc::SOL_SOCKET,
                            libc::SO_LINGER,
                            (&lin as *const libc::linger).cast(),
                            std::mem::size_of::<libc::linger>() as libc::socklen_t,
                        )
                    };
                    // The pumps see the end and drop their handles; the last close sends RST.
                    let _ = s.shutdown(Shutdown::Read);
                }
            }
        }
    }
}

fn pump(
    mut a: TcpStream,
    mut b: TcpStream,
    to_host: bool,
    fw: &AtomicU64,
    gb: &AtomicBool,
    reset: &AtomicBool,
) {
    let mut buf = [0u8; 65536];
    loop {
        let n = match a.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to_host && gb.swap(false, Ordering::Relaxed) && b.write_all(&[0xee; 37]).is_err() {
            break;
        }
        if b.write_all(&buf[..n]).is_err() {
            break;
        }
        fw.fetch_add(n as u64, Ordering::Relaxed);
    }
    // Pass the end of the stream on (not when resetting: the last close sends an RST).
    if !reset.load(Ordering::Relaxed) {
        let _ = b.shutdown(Shutdown::Write);
    }
}
