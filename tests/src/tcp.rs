//! An NVMe/TCP target on loopback that serves the emulated controller, for the suites that run
//! the embedding API on a remote namespace ([`TcpTarget`]).
//!
//! The target is the driver's own (`dioxide::NvmfTarget`), in this process: an emulated
//! controller behind a [`Dioxide`] of its own, its namespaces served as `NvmfFileBackend`
//! files, poll groups on threads listening on `127.0.0.1:<free port>`. The geometry the host
//! sees is the emulated controller's. Faults injected into the emulator
//! ([`TcpTarget::emu`]) reach the host as NVMe statuses; [`TcpTarget::kill`] stops the poll
//! groups and closes every connection at once (what the host sees when the target process
//! dies), and [`TcpTarget::freeze`] stops answering without closing (a hung target).

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use dioxide::emulated::{EmulatedConfig, EmulatedController};
use dioxide::{
    Controller, Dioxide, NvmfFileBackend, NvmfInbox, NvmfPollGroup, NvmfSubsystem, NvmfTarget,
    NvmfTargetOptions,
};

/// The subsystem NQN the test target serves.
pub const TCP_SUBNQN: &str = "nqn.2026-01.io.dioxide:tests";

/// A running target (see the module docs). Dropping it stops it.
pub struct TcpTarget {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The emulated controller behind it (fault injection, statistics).
    pub emu: Arc<EmulatedController>,
    stop: Arc<AtomicBool>,
    /// Set: the groups stop polling but keep their connections open.
    frozen: Arc<AtomicBool>,
    threads: Vec<JoinHandle<NvmfPollGroup>>,
    wakers: Vec<NvmfInbox>,
    dx: Option<Dioxide>,
}

impl TcpTarget {
    /// Serve an emulated controller of configuration `cfg` with `groups` poll groups.
    pub fn start(cfg: EmulatedConfig, groups: usize) -> TcpTarget {
        let emu = EmulatedController::new(cfg).expect("emulated controller");
        let ctrl = Controller::with_options(emu.clone(), crate::test_options()).expect("bring-up");
        // The target's pollers leave the CPU at once when idle: the host, its pollers and
        // the clients share a small machine with them.
        let dx = Dioxide::builder()
            .controller(ctrl)
            .pollers([None])
            .poller_idle(Duration::ZERO)
            .poller_spin(64)
            .build()
            .expect("the target's Dioxide");
        let backend = Arc::new(NvmfFileBackend::new(&dx, 0).expect("file backend"));
        let target = NvmfTarget::new(NvmfTargetOptions::default());
        target.add_subsystem(NvmfSubsystem::new(TCP_SUBNQN, backend));
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local address");
        let stop = Arc::new(AtomicBool::new(false));
        let frozen = Arc::new(AtomicBool::new(false));
        let mut all: Vec<NvmfPollGroup> = (0..groups.max(1))
            .map(|_| NvmfPollGroup::new(target.clone()))
            .collect();
        let peers = all[1..].iter().map(|g| g.inbox()).collect();
        let wakers = all.iter().map(|g| g.inbox()).collect();
        all[0].listen(listener, peers).expect("listen");
        let threads = all
            .into_iter()
            .enumerate()
            .map(|(i, mut g)| {
                let (stop, frozen) = (stop.clone(), frozen.clone());
                std::thread::Builder::new()
                    .name(format!("test-tgt-{i}"))
                    .spawn(move || {
                        g.run_until(&stop, Duration::from_millis(5));
                        // A frozen target holds its connections open, unanswered.
                        while frozen.load(Ordering::SeqCst) {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        g
                    })
                    .expect("spawn a poll group")
            })
            .collect();
        TcpTarget {
            addr,
            emu,
            stop,
            frozen,
            threads,
            wakers,
            dx: Some(dx),
        }
    }

    /// The SPDK transport ID of the served subsystem.
    pub fn trid(&self) -> String {
        self.trid_at(self.addr)
    }

    /// The same at `addr` (a [`Proxy`](crate::Proxy) in front of the target).
    pub fn trid_at(&self, addr: SocketAddr) -> String {
        format!(
            "trtype:TCP adrfam:IPv4 traddr:{} trsvcid:{} subnqn:{TCP_SUBNQN}",
            addr.ip(),
            addr.port()
        )
    }

    /// Kill the target: stop its poll groups and close every connection at once.
    pub fn kill(&mut self) {
        self.frozen.store(false, Ordering::SeqCst);
        self.stop.store(true, Ordering::SeqCst);
        self.wakers.iter().for_each(NvmfInbox::wake);
        for t in self.threads.drain(..) {
            // Dropping the group closes its sockets.
            drop(t.join());
        }
    }

    /// Hang the target: its poll groups stop, its connections stay open and unanswered (until
    /// [`kill`](Self::kill) or the drop).
    pub fn freeze(&mut self) {
        self.frozen.store(true, Ordering::SeqCst);
        self.stop.store(true, Ordering::SeqCst);
        self.wakers.iter().for_each(NvmfInbox::wake);
    }
}

impl Drop for TcpTarget {
    fn drop(&mut self) {
        self.kill();
        drop(self.dx.take());
    }
}
