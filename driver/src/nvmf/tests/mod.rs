//! Loopback tests: the target on 127.0.0.1 (ephemeral port, poll groups on threads) and the
//! host of this module, over real TCP sockets. Every test runs under the project's test
//! watchdog: a hang fails the test binary, naming the test, instead of stalling the suite.

mod bad_input;
#[cfg(feature = "emulated")]
mod dioxide;
mod fuzz;
mod health;
mod host;
mod io;
mod lifecycle;
mod transport;

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use super::backend::{Backend, MemBackend};
use super::host::{HostController, HostOptions};
use super::pdu::Digests;
use super::target::group::Inbox;
use super::target::{PollGroup, Subsystem, Target, TargetOptions};

pub(super) const SUBNQN: &str = "nqn.2026-12.io.dioxide:test";
pub(super) const HOSTNQN: &str = "nqn.2026-12.io.dioxide:host-a";

/// Runs `f` under the project's test watchdog: a hang ends the test binary naming the test.
pub(super) fn watchdog<T>(name: &str, bound: Duration, f: impl FnOnce() -> T) -> T {
    let _w = test_watchdog::arm_named(name, bound);
    f()
}

/// A target serving on 127.0.0.1 with `groups` poll groups on their own threads.
pub(super) struct TestTarget {
    pub addr: SocketAddr,
    pub target: Arc<Target>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<PollGroup>>,
    wakers: Vec<Inbox>,
}

impl TestTarget {
    pub fn start(target: Arc<Target>, groups: usize) -> TestTarget {
        TestTarget::start_waiting(target, groups, Duration::from_millis(20))
    }

    /// Like [`start`](Self::start), the groups waiting up to `idle_wait` when idle.
    pub fn start_waiting(target: Arc<Target>, groups: usize, idle_wait: Duration) -> TestTarget {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local address");
        let stop = Arc::new(AtomicBool::new(false));
        let mut all: Vec<PollGroup> = (0..groups.max(1))
            .map(|_| PollGroup::new(target.clone()))
            .collect();
        let peers = all[1..].iter().map(|g| g.inbox()).collect();
        let wakers = all.iter().map(|g| g.inbox()).collect();
        all[0].listen(listener, peers).expect("listen");
        let threads = all
            .into_iter()
            .enumerate()
            .map(|(i, g)| {
                let stop = stop.clone();
                std::thread::Builder::new()
                    .name(format!("nvmf-group-{i}"))
                    .spawn(move || {
                        let mut g = g;
                        g.run_until(&stop, idle_wait);
                        g
                    })
                    .expect("spawn a poll group")
            })
            .collect();
        TestTarget {
            addr,
            target,
            stop,
            threads,
            wakers,
        }
    }

    /// A target with one subsystem over `backend`.
    pub fn with_backend(
        backend: Arc<dyn Backend>,
        opts: TargetOptions,
        groups: usize,
    ) -> TestTarget {
        let t = Target::new(opts);
        t.add_subsystem(Subsystem::new(SUBNQN, backend));
        TestTarget::start(t, groups)
    }

    /// Stops the groups; returns why their connections closed.
    pub fn stop(mut self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        self.wakers.iter().for_each(Inbox::wake);
        let mut reasons = Vec::new();
        for t in self.threads.drain(..) {
            if let Ok(g) = t.join() {
                reasons.extend(g.closed().reasons.iter().cloned());
            }
        }
        reasons
    }
}

impl Drop for TestTarget {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.wakers.iter().for_each(Inbox::wake);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A memory backend: namespace 1 of 512-byte blocks (4 MiB), namespace 2 of 4 KiB blocks.
pub(super) fn mem_backend() -> Arc<MemBackend> {
    MemBackend::new(&[(512, 8192), (4096, 256)]).deferred()
}

pub(super) fn host_opts(d: Digests) -> HostOptions {
    let mut o = HostOptions::new(SUBNQN);
    o.hostnqn = HOSTNQN.into();
    o.digests = d;
    o.timeout = Duration::from_secs(10);
    // A Keep Alive Timer, as a Linux host has (Keep Alive without one is refused), long enough
    // that no test's host is torn down for silence (the tests send no timed Keep Alives).
    o.kato_ms = 120_000;
    o
}

pub(super) fn connect(t: &TestTarget, d: Digests) -> HostController {
    HostController::connect(t.addr, host_opts(d)).expect("connect the admin queue")
}

/// True if `e` is a command status of this type and code.
pub(super) fn is_status(e: &super::host::HostError, sct: crate::spec::Sct, sc: u8) -> bool {
    matches!(e, super::host::HostError::Status { status, .. } if status.sct == sct && status.sc == sc)
}

/// A deterministic pattern for (seed, length).
pub(super) fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub(super) const ALL_DIGESTS: [Digests; 4] = [
    Digests {
        header: false,
        data: false,
    },
    Digests {
        header: true,
        data: false,
    },
    Digests {
        header: false,
        data: true,
    },
    Digests {
        header: true,
        data: true,
    },
];
