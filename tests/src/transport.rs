//! One test body over both transports of the seam ([`dioxide::TransportController`]): the
//! emulated controller on PCIe, or the same emulated controller served by the driver's NVMe/TCP
//! target in this process ([`TcpTarget`]) and reached over loopback ([`Transport::Tcp`]).
//!
//! [`each_transport`] builds a [`TransportUnderTest`] of the given emulator configuration on
//! each transport in turn and runs the body on it; the helpers below ([`io`], [`drain`]) wait
//! with a time limit, so a lost completion fails the test instead of hanging it. The geometry
//! (namespaces, block sizes, MDTS) is the emulated controller's on both, so one body checks
//! both transports with the same numbers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dioxide::emulated::{Action, EmulatedConfig, EmulatedController, Fault, Mode, Trigger};
use dioxide::{
    IoOp, Lba, Namespace, NvmfHostOptions, TcpController, TcpOptions, TransportBuf,
    TransportController, TransportError, TransportIoError, TransportQueue,
};

use crate::{TCP_SUBNQN, TcpTarget, emulated, fill};

/// How long a helper waits for completions before it fails the test.
pub const IO_LIMIT: Duration = Duration::from_secs(30);

/// The transports a test body runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// The emulated controller on the (emulated) PCIe bus.
    Pcie,
    /// The emulated controller behind the NVMe/TCP target, over loopback.
    Tcp,
}

/// Both, PCIe first.
pub const TRANSPORTS: [Transport; 2] = [Transport::Pcie, Transport::Tcp];

/// A controller on one transport, with the emulated controller behind it.
pub struct TransportUnderTest {
    /// The controller (declared first: dropped before the target that serves it).
    pub ctrl: TransportController,
    /// The emulated controller behind it (statistics, fault injection).
    pub emu: Arc<EmulatedController>,
    /// Which transport.
    pub transport: Transport,
    /// The target serving `emu` (TCP only).
    pub target: Option<TcpTarget>,
}

impl TransportUnderTest {
    /// `cfg` on `transport` (on the emulated controller even when `NVME_PCI_ADDR` names a real
    /// one: `tests/io.rs` runs there).
    pub fn open(transport: Transport, cfg: EmulatedConfig) -> TransportUnderTest {
        crate::emulator_only(
            "io_transport",
            "both transports serve the emulated controller; tests/io.rs runs on the device",
        );
        match transport {
            Transport::Pcie => {
                let (ctrl, emu) = emulated(cfg);
                TransportUnderTest {
                    ctrl: ctrl.into(),
                    emu,
                    transport,
                    target: None,
                }
            }
            Transport::Tcp => {
                let target = TcpTarget::start(cfg, 1);
                let mut host = NvmfHostOptions::new(TCP_SUBNQN);
                host.timeout = Duration::from_secs(5);
                let ctrl = TcpController::connect(TcpOptions {
                    addr: target.addr,
                    host,
                })
                .unwrap_or_else(|e| panic!("connect to the test target at {}: {e}", target.addr));
                TransportUnderTest {
                    ctrl: ctrl.into(),
                    emu: target.emu.clone(),
                    transport,
                    target: Some(target),
                }
            }
        }
    }

    /// What the test output calls it.
    pub fn name(&self) -> String {
        match &self.target {
            None => "PCIe (emulated)".into(),
            Some(t) => format!("TCP ({})", t.addr),
        }
    }

    /// The first active namespace.
    pub fn first_namespace(&self) -> Namespace {
        self.ctrl
            .namespaces()
            .into_iter()
            .next()
            .unwrap_or_else(|| panic!("{}: no active namespace", self.name()))
    }

    /// A buffer of `len` bytes holding the pattern of `seed`.
    pub fn pattern_buf(&self, len: usize, seed: u64) -> TransportBuf {
        let mut b = self.alloc(len);
        fill(b.as_mut_slice(), seed);
        b
    }

    /// A zeroed buffer of `len` bytes.
    pub fn alloc(&self, len: usize) -> TransportBuf {
        self.ctrl
            .alloc(len)
            .unwrap_or_else(|e| panic!("{}: a {len}-byte buffer: {e}", self.name()))
    }

    /// Checks what can be checked at the end of a test: the emulated controller saw no DMA
    /// fault (a stray transfer of the PCIe path or of the target's).
    pub fn finish(self) {
        assert_eq!(
            self.emu.stats().dma_faults,
            0,
            "{}: DMA faults",
            self.name()
        );
    }
}

/// Runs `f` on each transport, on an emulated controller in `mode` with memory namespaces of
/// these block sizes and block counts ([`config`](crate::config)).
pub fn each_transport(
    mode: Mode,
    namespaces: &[(u32, u64)],
    mut f: impl FnMut(TransportUnderTest),
) {
    for t in TRANSPORTS {
        f(TransportUnderTest::open(t, crate::config(mode, namespaces)));
    }
}

/// Makes the emulated controller hold every completion for `d` from now on (until its faults
/// are cleared), so that requests are still in flight when a fault hits.
pub fn hold_completions(emu: &EmulatedController, d: Duration) {
    emu.inject(Fault {
        trigger: Trigger::NthCommand {
            qid: None,
            opcode: None,
            n: 1,
        },
        action: Action::Delay(d),
        times: None,
    });
}

/// Polls `q` until `n` completions arrived ([`IO_LIMIT`]), handing each to `f`; the queue must
/// not fail.
pub fn drain_with<T>(
    q: &mut TransportQueue<T>,
    n: usize,
    mut f: impl FnMut(T, Result<(), TransportIoError>),
) {
    let mut got = 0;
    let deadline = Instant::now() + IO_LIMIT;
    while got < n {
        assert!(
            Instant::now() < deadline,
            "queue {}: only {got} of {n} completions",
            q.qid()
        );
        got += q
            .poll(usize::MAX, &mut f)
            .unwrap_or_else(|e| panic!("queue {}: poll failed: {e}", q.qid()));
    }
}

/// Polls `q` until `n` completions arrived, all successful; returns their tags in completion
/// order.
pub fn drain<T>(q: &mut TransportQueue<T>, n: usize) -> Vec<T> {
    let mut tags = Vec::with_capacity(n);
    drain_with(q, n, |t, r| {
        r.unwrap_or_else(|e| panic!("a request failed: {e}"));
        tags.push(t);
    });
    tags
}

/// One read or write of `buf` at `lba`, waited for: `Err(Ok(e))` if the queue refused it,
/// `Err(Err(e))` if it failed.
pub fn io(
    q: &mut TransportQueue<u64>,
    op: IoOp,
    ns: &Namespace,
    lba: Lba,
    buf: &TransportBuf,
) -> Result<(), Result<TransportError, TransportIoError>> {
    // SAFETY: `buf` is borrowed for the whole call and its completion is waited for below
    // (or the request was refused); the CPU does not touch it meanwhile.
    unsafe { q.submit_raw(op, ns, lba, buf, u64::MAX) }.map_err(|r| {
        assert_eq!(r.tag, u64::MAX, "the tag comes back");
        Ok(r.error)
    })?;
    q.ring();
    let mut result = None;
    drain_with(q, 1, |t, r| {
        assert_eq!(t, u64::MAX);
        result = Some(r);
    });
    result.expect("one completion").map_err(Err)
}

/// [`io`] that must succeed.
pub fn io_ok(q: &mut TransportQueue<u64>, op: IoOp, ns: &Namespace, lba: Lba, buf: &TransportBuf) {
    if let Err(e) = io(q, op, ns, lba, buf) {
        panic!(
            "{op:?} of {} bytes at {lba} of namespace {}: {e:?}",
            buf.len(),
            ns.nsid()
        );
    }
}
