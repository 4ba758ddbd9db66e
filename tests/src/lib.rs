//! Shared helpers for the integration and hardware-in-loop suites.
//!
//! Tests get their controller from [`controller_under_test`]: today the built-in emulated
//! controller; a VFIO backend will return a real controller when `NVME_PCI_ADDR` is set (and
//! allow writes only with `NVME_HIL_ALLOW_WRITE=1`). Device-independent tests (`tests/io.rs`)
//! use only the public driver API through a [`Device`]; emulator-only tests (fault injection,
//! `tests/faults.rs`) use [`emulated`].

use std::sync::Arc;
use std::time::Duration;

use dioxide::emulated::{EmulatedConfig, EmulatedController, Mode, NamespaceConfig};
use dioxide::{Controller, ControllerOptions, DmaBuffer, Namespace};

/// The controller a test runs against, and what it may do with it.
pub struct Device {
    /// The controller.
    pub ctrl: Controller,
    /// The emulated controller behind it, when it is one.
    pub emu: Option<Arc<EmulatedController>>,
    /// Whether tests may write (always for the emulator; `NVME_HIL_ALLOW_WRITE=1` on hardware).
    pub writable: bool,
}

impl Device {
    /// Checks what can be checked at the end of a test: no DMA fault on the emulator.
    pub fn finish(self) {
        if let Some(emu) = &self.emu {
            assert_eq!(emu.stats().dma_faults, 0, "the device saw DMA faults");
        }
    }
}

/// The controller under test: the emulated one configured by `cfg` (a VFIO controller when
/// `NVME_PCI_ADDR` is set, once that backend exists; `cfg` then only sets the mode of nothing).
pub fn controller_under_test(cfg: EmulatedConfig) -> Device {
    let (ctrl, emu) = emulated(cfg);
    Device {
        ctrl,
        emu: Some(emu),
        writable: true,
    }
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

/// A DMA buffer of `len` bytes filled with the pattern of `seed`.
pub fn pattern_buffer(ctrl: &Controller, len: usize, seed: u64) -> DmaBuffer {
    let mut b = ctrl.alloc(len).expect("DMA buffer");
    fill(b.as_mut_slice(), seed);
    b
}

/// The first namespace with this block size.
pub fn namespace_with_block(ctrl: &Controller, block_size: u32) -> Namespace {
    ctrl.namespaces()
        .into_iter()
        .find(|n| n.block_size() == block_size)
        .expect("a namespace with that block size")
}
