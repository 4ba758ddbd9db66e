//! What the `tools` end-to-end suites share: [`Tgt`], a running `nvmf_tgt` child on an
//! ephemeral loopback port.
//!
//! Each suite includes this module (`mod common;`) and uses what it needs of it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

/// How long a child may take to get ready or to exit.
pub fn deadline() -> Instant {
    Instant::now() + test_watchdog::scaled(Duration::from_secs(60))
}

/// A running `nvmf_tgt` on `127.0.0.1:<free port>`: its stdout lines arrive on a channel (those
/// up to "ready" are kept in `out`); dropping it kills it.
pub struct Tgt {
    /// The child.
    pub child: Child,
    /// Its stdout lines after "ready".
    pub lines: Receiver<String>,
    /// Its stdout lines up to and with "ready".
    pub out: Vec<String>,
    /// Where it listens.
    pub addr: SocketAddr,
    /// The NQN of its subsystem.
    pub nqn: String,
}

impl Tgt {
    /// Starts `nvmf_tgt --listen 127.0.0.1:0` with `args` and waits until it is ready.
    pub fn start(args: &[&str]) -> Tgt {
        let mut child = Command::new(env!("CARGO_BIN_EXE_nvmf_tgt"))
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start nvmf_tgt");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for l in BufReader::new(stdout).lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let mut t = Tgt {
            child,
            lines,
            out: Vec::new(),
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            nqn: String::new(),
        };
        let until = deadline();
        loop {
            let left = until.saturating_duration_since(Instant::now());
            let l = t
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("nvmf_tgt did not get ready; it printed: {:#?}", t.out));
            if let Some(rest) = l.strip_prefix("nvmf_tgt: listening on ") {
                if let Some(a) = rest.split_whitespace().next().and_then(|a| a.parse().ok()) {
                    t.addr = a;
                }
            }
            if let Some(rest) = l.strip_prefix("nvmf_tgt: subsystem ") {
                t.nqn = rest.split(':').take(2).collect::<Vec<_>>().join(":");
            }
            let ready = l.starts_with("nvmf_tgt: ready");
            t.out.push(l);
            if ready {
                assert_ne!(t.addr.port(), 0, "nvmf_tgt did not say where it listens");
                return t;
            }
        }
    }

    /// The SPDK transport ID of its subsystem at `addr` (its own, or a proxy's).
    pub fn trid(&self, addr: SocketAddr) -> String {
        format!(
            "trtype:TCP adrfam:IPv4 traddr:{} trsvcid:{} subnqn:{}",
            addr.ip(),
            addr.port(),
            self.nqn
        )
    }
}

impl Drop for Tgt {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
