//! Shared helpers for the integration and hardware-in-loop suites.
//!
//! Tests get their controller from [`controller_under_test`]:
//! * without `NVME_PCI_ADDR`, the built-in emulated controller configured by the test;
//! * with `NVME_PCI_ADDR=0000:01:00.0`, that real controller through VFIO ([`VfioBus::open`]),
//!   whatever the test asked the emulator for; tests may write to it only when
//!   `NVME_HIL_ALLOW_WRITE=1` ([`Device::writable`], [`Device::skip_writes`]).
//!
//! Tests of I/O semantics on both transports (`tests/io_transport.rs`) take a controller
//! from [`each_transport`]: the emulated controller on PCIe, then the same behind the
//! NVMe/TCP target over loopback.
//!
//! Device-independent tests (`tests/io.rs`) use only the public driver API through a
//! [`Device`] and adapt to its shape (namespaces, block sizes, MDTS); emulator-only tests (fault
//! injection, `tests/faults.rs`) use [`emulated`] and say so with [`emulator_only`].
//!
//! # One owner of the VFIO device at a time
//! Only one open of a VFIO device can exist. Every [`Device`] on hardware holds the process-wide
//! [`DeviceLock`] (re-entrant on the thread that holds it) until it is dropped, after its
//! controller: the controller is shut down (CC.SHN) and the device closed before the next test
//! opens it, even when `cargo test` runs tests on several threads. Each test opens the
//! controller itself (about 0.15 s in the QEMU guest): tests of reset, shutdown and re-open need
//! their own, and no test can leave state behind for the next. A test that keeps a
//! [`dioxide::QueuePair`] or a clone of the controller past its `Device` keeps the device open;
//! none does.
//!
//! # Never writing without permission
//! Without `NVME_HIL_ALLOW_WRITE=1` tests skip their writes (saying so); on top of that, every
//! [`Device`] on such a controller reads the SMART log's Host Write Commands when it opens and
//! again when it is dropped, and fails the test if the count moved.
//!
//! # Output that is always shown
//! libtest captures what a passing test prints with `println!`; [`note`] writes straight to the
//! process's stderr, so skipped parts and emulator-only tests are visible in every run.

pub mod matrix;
mod proxy;
mod tcp;
mod transport;
pub use proxy::{Proxy, ProxyFault};
pub use tcp::{TCP_SUBNQN, TcpTarget};
pub use transport::{
    IO_LIMIT, TRANSPORTS, Transport, TransportUnderTest, drain, drain_with, each_transport,
    hold_completions, io, io_ok,
};

use std::io::Write as _;
use std::sync::{Arc, Condvar, Mutex, Once};
use std::thread::ThreadId;
use std::time::Duration;

use dioxide::emulated::{EmulatedConfig, EmulatedController, Mode, NamespaceConfig};
use dioxide::vfio::{VfioBus, VfioOptions};
use dioxide::{Controller, ControllerOptions, DmaBuffer, Namespace};

/// The environment variable naming the controller under test.
pub const PCI_ADDR_VAR: &str = "NVME_PCI_ADDR";
/// The environment variable that must be `1` before a test writes to a real controller.
pub const ALLOW_WRITE_VAR: &str = "NVME_HIL_ALLOW_WRITE";

/// The PCI address of the real controller under test (`NVME_PCI_ADDR`), if any.
pub fn hardware_addr() -> Option<String> {
    std::env::var(PCI_ADDR_VAR)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// True if tests run against a real controller (`NVME_PCI_ADDR` is set).
pub fn on_hardware() -> bool {
    hardware_addr().is_some()
}

/// True if `NVME_HIL_ALLOW_WRITE=1`.
pub fn hardware_writes_allowed() -> bool {
    std::env::var(ALLOW_WRITE_VAR).as_deref() == Ok("1")
}

/// Prints `note: <msg>` on the process's stderr, bypassing libtest's output capture.
pub fn note(msg: impl AsRef<str>) {
    let mut e = std::io::stderr().lock();
    let _ = writeln!(e, "note: {}", msg.as_ref());
    let _ = e.flush();
}

/// For an emulator-only test: when `NVME_PCI_ADDR` is set, says (once per test) that this test
/// runs on the emulator and why. Returns true on hardware.
pub fn emulator_only(test: &str, why: &str) -> bool {
    match hardware_addr() {
        Some(addr) => {
            note(format!(
                "{test}: runs on the emulated controller only ({why}); {PCI_ADDR_VAR}={addr} is \
                 not used by this test"
            ));
            true
        }
        None => false,
    }
}

// ---------------------------------------------------------------- the device lock

struct LockState {
    owner: Option<ThreadId>,
    depth: usize,
}

static LOCK: Mutex<LockState> = Mutex::new(LockState {
    owner: None,
    depth: 0,
});
static LOCK_FREE: Condvar = Condvar::new();

/// Exclusive use of the controller under test by this thread (re-entrant). Every [`Device`] on
/// hardware holds one; a test that closes and re-opens the controller takes one first so that
/// no other test thread opens the device in between.
#[must_use = "the lock is released when dropped"]
pub struct DeviceLock(());

/// Takes the [`DeviceLock`] (waits while another thread holds it).
pub fn device_lock() -> DeviceLock {
    let me = std::thread::current().id();
    let mut s = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    while s.owner.is_some_and(|o| o != me) {
        s = LOCK_FREE.wait(s).unwrap_or_else(|e| e.into_inner());
    }
    s.owner = Some(me);
    s.depth += 1;
    DeviceLock(())
}

impl Drop for DeviceLock {
    fn drop(&mut self) {
        let mut s = LOCK.lock().unwrap_or_else(|e| e.into_inner());
        s.depth -= 1;
        if s.depth == 0 {
            s.owner = None;
            LOCK_FREE.notify_all();
        }
    }
}

// ---------------------------------------------------------------- the device

/// The controller a test runs against, and what it may do with it.
pub struct Device {
    /// The controller.
    pub ctrl: Controller,
    /// The emulated controller behind it, when it is one.
    pub emu: Option<Arc<EmulatedController>>,
    /// Whether tests may write (always for the emulator; `NVME_HIL_ALLOW_WRITE=1` on hardware).
    pub writable: bool,
    /// The PCI address when this is a real controller opened through VFIO.
    pub pci_addr: Option<String>,
    // Read-only hardware: checks on drop that the test wrote nothing.
    _no_writes: Option<NoWritesCheck>,
    // Declared last, so dropped last: the controller is shut down and the device closed first.
    _lock: Option<DeviceLock>,
}

/// On a real controller opened without `NVME_HIL_ALLOW_WRITE=1`: the SMART log's Host Write
/// Commands when the test opened it, compared when the test's [`Device`] is dropped, so a test
/// (or a driver bug) that writes anyway fails instead of passing quietly.
struct NoWritesCheck {
    ctrl: Controller,
    host_writes: u128,
}

impl Drop for NoWritesCheck {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        let now = match self.ctrl.smart_log() {
            Ok(s) => s.host_write_commands,
            Err(e) => panic!(
                "{}: SMART log at the end of the test: {e}",
                self.ctrl.location()
            ),
        };
        assert_eq!(
            now,
            self.host_writes,
            "{}: Host Write Commands changed during a test without {ALLOW_WRITE_VAR}=1: the \
             test wrote to the device",
            self.ctrl.location()
        );
    }
}

impl Device {
    /// True if this is a real controller (VFIO).
    pub fn is_hardware(&self) -> bool {
        self.pci_addr.is_some()
    }

    /// What the tests call this controller: its PCI address, or `emulated`.
    pub fn name(&self) -> &str {
        self.pci_addr
            .as_deref()
            .unwrap_or("the emulated controller")
    }

    /// True (and prints why, naming `what`) if the test must not write to this device.
    pub fn skip_writes(&self, what: &str) -> bool {
        if self.writable {
            return false;
        }
        note(format!(
            "{ALLOW_WRITE_VAR} is not 1: write tests skipped on {} ({what})",
            self.name()
        ));
        true
    }

    /// `emulator` on the emulated controller, `hardware` on a real one: loop counts sized so a
    /// test stays quick on a slow device (the QEMU guest runs under TCG at ~100-170 µs per I/O).
    pub fn scale(&self, emulator: u64, hardware: u64) -> u64 {
        if self.is_hardware() {
            hardware
        } else {
            emulator
        }
    }

    /// Checks what can be checked at the end of a test: no DMA fault on the emulator; on
    /// hardware, a controller without fatal status (IOMMU faults are the harness's to check:
    /// it reads the kernel log after every test program).
    pub fn finish(self) {
        if let Some(emu) = &self.emu {
            assert_eq!(emu.stats().dma_faults, 0, "the device saw DMA faults");
        }
        if self.is_hardware() {
            if let Err(e) = self.ctrl.csts() {
                panic!("{} at the end of the test: {e}", self.name());
            }
        }
    }
}

impl core::fmt::Debug for Device {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Device")
            .field("ctrl", &self.ctrl)
            .field("writable", &self.writable)
            .field("pci_addr", &self.pci_addr)
            .finish_non_exhaustive()
    }
}

static ANNOUNCE: Once = Once::new();

/// The controller under test: the real controller named by `NVME_PCI_ADDR` (through VFIO; `cfg`
/// is then ignored, and tests adapt to the device's namespaces and MDTS), else the emulated one
/// configured by `cfg`.
pub fn controller_under_test(cfg: EmulatedConfig) -> Device {
    match hardware_addr() {
        Some(addr) => open_hardware(&addr),
        None => {
            let (ctrl, emu) = emulated(cfg);
            Device {
                ctrl,
                emu: Some(emu),
                writable: true,
                pci_addr: None,
                _no_writes: None,
                _lock: None,
            }
        }
    }
}

/// The same controller again, after the previous [`Device`] on it was dropped: a new
/// [`Controller`] on `emu` (so its data is still there), or the real controller opened again.
pub fn reopen(emu: Option<Arc<EmulatedController>>) -> Device {
    match (emu, hardware_addr()) {
        (Some(emu), _) => {
            let ctrl = Controller::with_options(emu.clone(), test_options()).expect("bring-up");
            Device {
                ctrl,
                emu: Some(emu),
                writable: true,
                pci_addr: None,
                _no_writes: None,
                _lock: None,
            }
        }
        (None, Some(addr)) => open_hardware(&addr),
        (None, None) => panic!("reopen: neither an emulated controller nor {PCI_ADDR_VAR}"),
    }
}

fn open_hardware(addr: &str) -> Device {
    let lock = device_lock();
    let writable = hardware_writes_allowed();
    ANNOUNCE.call_once(|| {
        note(format!(
            "tests run on the real controller {addr} through VFIO ({PCI_ADDR_VAR}); the \
             emulator shapes the tests ask for are ignored; writes {}",
            if writable {
                format!("allowed ({ALLOW_WRITE_VAR}=1)")
            } else {
                format!("NOT allowed ({ALLOW_WRITE_VAR} is not 1): write tests are skipped")
            }
        ))
    });
    let bus = match VfioBus::open(addr, VfioOptions::default()) {
        Ok(b) => b,
        Err(e) => panic!("cannot open {addr} through VFIO ({PCI_ADDR_VAR}): {e}"),
    };
    let ctrl = match Controller::with_options(bus, test_options()) {
        Ok(c) => c,
        Err(e) => panic!("bring-up of {addr} failed: {e}"),
    };
    let no_writes = (!writable).then(|| NoWritesCheck {
        ctrl: ctrl.clone(),
        host_writes: ctrl
            .smart_log()
            .unwrap_or_else(|e| panic!("{addr}: SMART log: {e}"))
            .host_write_commands,
    });
    Device {
        ctrl,
        emu: None,
        writable,
        pci_addr: Some(addr.to_string()),
        _no_writes: no_writes,
        _lock: Some(lock),
    }
}

/// Emulator modes a device-independent test runs in: both on the emulator, one on hardware
/// (the mode means nothing there).
pub fn device_modes() -> &'static [Mode] {
    if on_hardware() { &MODES[..1] } else { &MODES }
}

/// Options used by the tests: short admin timeout so failures are quick.
pub fn test_options() -> ControllerOptions {
    ControllerOptions {
        admin_timeout: Duration::from_secs(5),
        ..ControllerOptions::default()
    }
}

/// An emulated controller and the driver's controller on it.
pub fn emulated(cfg: EmulatedConfig) -> (Controller, Arc<EmulatedController>) {
    let emu = EmulatedController::new(cfg).expect("emulated controller");
    let ctrl = Controller::with_options(emu.clone(), test_options()).expect("bring-up");
    (ctrl, emu)
}

/// An emulated configuration: `mode`, memory namespaces of these block sizes and block counts,
/// 128 KiB MDTS.
pub fn config(mode: Mode, namespaces: &[(u32, u64)]) -> EmulatedConfig {
    EmulatedConfig {
        mode,
        namespaces: namespaces
            .iter()
            .map(|&(bs, n)| NamespaceConfig::memory(bs, n))
            .collect(),
        ..EmulatedConfig::default()
    }
}

/// Both emulator modes, for tests that run in each.
pub const MODES: [Mode; 2] = [Mode::Inline, Mode::Threaded];

/// A small, fast pseudo-random generator (xorshift64*).
pub struct Rng(pub u64);

impl Rng {
    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// A value in `lo..hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo)
    }
}

/// Fills `buf` with a pattern derived from `seed` (different for every seed and offset).
pub fn fill(buf: &mut [u8], seed: u64) {
    let mut r = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    for c in buf.chunks_mut(8) {
        let v = r.next_u64().to_le_bytes();
        c.copy_from_slice(&v[..c.len()]);
    }
}

/// The pattern of `seed`, `len` bytes long.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    fill(&mut v, seed);
    v
}

/// A DMA buffer of `len` bytes filled with the pattern of `seed`.
pub fn pattern_buffer(ctrl: &Controller, len: usize, seed: u64) -> DmaBuffer {
    let mut b = ctrl.alloc(len).expect("DMA buffer");
    fill(b.as_mut_slice(), seed);
    b
}

/// `want` queue entries, or fewer when the controller allows fewer (CAP.MQES + 1): tests take
/// queue limits from the controller they run on.
pub fn queue_entries(ctrl: &Controller, want: u16) -> u16 {
    want.min(ctrl.cap().max_queue_entries().min(u16::MAX as u32) as u16)
}

/// The first namespace with this block size.
pub fn namespace_with_block(ctrl: &Controller, block_size: u32) -> Namespace {
    ctrl.namespaces()
        .into_iter()
        .find(|n| n.block_size() == block_size)
        .expect("a namespace with that block size")
}

/// The first active namespace (every test device has one).
pub fn first_namespace(ctrl: &Controller) -> Namespace {
    ctrl.namespaces()
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("{} has no active namespace", ctrl.location()))
}
