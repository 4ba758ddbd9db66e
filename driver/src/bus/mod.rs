//! The bus seam: register access to BAR0 and DMA memory.
//!
//! Everything above this module (controller bring-up, queue pairs, the tools) talks to a device
//! only through [`Bus`]. Two implementations exist: the VFIO backend ([`crate::bus::vfio`]) which owns a
//! real PCI function, and the built-in emulated controller ([`crate::bus::emulated`]) which models an
//! NVMe controller in the process. Both give out DMA memory through [`DmaMemory`]
//! ([`crate::bus::dma`]), whose chunks they supply through [`crate::bus::dma::ChunkSource`].
//!
//! Registers are read and written by offset with 32-bit accesses (64-bit registers as two 32-bit
//! halves, low first, which every controller accepts). The hot path does not go through a trait
//! call per register: a queue pair asks once for a [`Doorbell`] and rings it directly.
//!
//! # Ordering DMA memory against the device
//! * **Submission**: the stores that fill a submission entry and its PRP list (ordinary
//!   cacheable memory) must reach the device before the doorbell store (uncached MMIO) that
//!   tells it to fetch them. [`Doorbell::ring`] and the VFIO backend's register writes issue
//!   [`dma_wmb`] first: Linux's `wmb()`, `dsb st` on aarch64 (`dmb ish`, what
//!   `fence(Release)` compiles to, orders the stores only among the CPUs of the inner
//!   shareable domain, not towards the device); on x86-64 the CPU keeps stores in program order
//!   and a store to uncached memory is not reordered with earlier ones, so a compiler fence is
//!   enough. Other architectures do not build (a `compile_error!` says so) until their barrier
//!   is added here.
//! * **Completion**: the driver reads completion dword 3 (the phase tag) with an acquire load
//!   before it reads the entry's other dwords. That is Linux's `dma_rmb()` after the phase
//!   check: on x86-64 loads are not reordered with older loads; on aarch64 the load-acquire
//!   (`ldar`) orders every later load after it, for all observers, the device included.

pub(crate) mod dma;
#[cfg(feature = "emulated")]
pub mod emulated;
pub mod interrupt;
#[cfg(feature = "vfio")]
pub mod vfio;

use core::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{Ordering, compiler_fence, fence};

use crate::bus::dma::DmaMemory;
use crate::bus::interrupt::{EventFd, InterruptError};

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
compile_error!(
    "Dioxide orders DMA memory before doorbell writes only on x86_64 and aarch64: add this \
     architecture's store barrier (Linux wmb()) to dioxide's bus::dma_wmb before using it"
);

/// Makes every store to DMA memory issued before it visible to the device before any MMIO store
/// issued after it (Linux `wmb()`); see the module documentation.
#[inline(always)]
pub(crate) fn dma_wmb() {
    #[cfg(target_arch = "x86_64")]
    {
        // x86-64 (Intel SDM vol. 3, 9.2.2): stores are not reordered with other stores, and a
        // store to uncached memory (BAR0 is mapped UC by VFIO) is not reordered with earlier
        // write-back stores; only non-temporal stores could pass it, and Dioxide issues none.
        // What remains is the compiler, which this fence stops from moving stores across.
        compiler_fence(Ordering::SeqCst);
    }
    #[cfg(target_arch = "aarch64")]
    // SAFETY: `dsb st` only waits for earlier stores to complete; it reads and writes no memory
    // or register the program sees. Without `nomem` the asm block is also a compiler barrier.
    unsafe {
        core::arch::asm!("dsb st", options(nostack, preserves_flags));
    }
}

/// Makes every store issued before it visible to the device before any load issued after it
/// (Linux `mb()`): the store-load order shadow doorbells need between the shadow doorbell store
/// and the event index load (see `crate::nvme::shadow`).
#[inline(always)]
pub(crate) fn dma_mb() {
    #[cfg(target_arch = "x86_64")]
    {
        // x86-64 lets a load pass an earlier store (the store buffer): `mfence`, which a
        // sequentially consistent fence compiles to, drains it first.
        fence(Ordering::SeqCst);
    }
    #[cfg(target_arch = "aarch64")]
    // SAFETY: `dsb sy` only waits for earlier memory accesses to complete; it reads and writes
    // no memory or register the program sees. Without `nomem` it is also a compiler barrier.
    unsafe {
        core::arch::asm!("dsb sy", options(nostack, preserves_flags));
    }
}

/// PCI identity of the function behind a bus.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct PciId {
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Subsystem vendor ID.
    pub subsystem_vendor: u16,
    /// Subsystem ID.
    pub subsystem_device: u16,
}

/// Access to one NVMe controller's registers and to DMA memory the controller can reach.
pub trait Bus: Send + Sync {
    /// Where the controller is: a PCI address such as `0000:01:00.0`, or `emulated`.
    fn location(&self) -> &str;
    /// The function's PCI identity.
    fn pci_id(&self) -> PciId;
    /// Reads the 32-bit register at `offset` in BAR0. A removed device reads all ones.
    fn read32(&self, offset: u32) -> u32;
    /// Writes the 32-bit register at `offset` in BAR0.
    fn write32(&self, offset: u32, value: u32);
    /// Reads a 64-bit register as two 32-bit reads, low half first.
    fn read64(&self, offset: u32) -> u64 {
        let lo = self.read32(offset) as u64;
        let hi = self.read32(offset + 4) as u64;
        lo | hi << 32
    }
    /// Writes a 64-bit register as two 32-bit writes, low half first.
    fn write64(&self, offset: u32, value: u64) {
        self.write32(offset, value as u32);
        self.write32(offset + 4, (value >> 32) as u32);
    }
    /// A handle that writes the doorbell register at `offset` without a trait call per write.
    fn doorbell(&self, offset: u32) -> Doorbell;
    /// The DMA memory of this bus.
    fn dma(&self) -> &DmaMemory;
    /// The eventfd that interrupt vector `vector` (1 or more; 0 is the admin queue's) signals,
    /// set up on the first call (VFIO: MSI-X enabled through the kernel); every call for the
    /// same vector returns the same eventfd. A completion queue created with IEN set and this
    /// vector makes it readable when the device posts to it (see [`EventFd`]). The default:
    /// no interrupts.
    fn interrupt(&self, vector: u16) -> Result<Arc<EventFd>, InterruptError> {
        let _ = vector;
        Err(InterruptError::Unsupported {
            location: self.location().to_string(),
        })
    }
    /// True once the platform told us the device is going away (VFIO: vfio-pci's device
    /// request notification, for a hot-unplug or an unbind). Checked by the controller's health
    /// checks; cheap (one non-blocking read at most). The default: never.
    fn removal_requested(&self) -> bool {
        false
    }
    /// The device was removed (all ones, or [`removal_requested`](Self::removal_requested)):
    /// lets the device go so the platform can complete the removal, while the bus stays usable
    /// as a sink (registers read all ones, writes are dropped; DMA memory stays valid until
    /// freed). Idempotent. The default: nothing to release.
    fn release_removed(&self) {}
    /// A descriptor that becomes readable (`poll(2)`) when the platform announces the device's
    /// removal (VFIO: a duplicate of the device request eventfd), so that a removal is noticed
    /// while no I/O is running: the controller keeps one thread asleep on it (see
    /// `Controller`'s removal watch). Readability only wakes the watcher, which then asks
    /// [`removal_requested`](Self::removal_requested). The default: none (removal is noticed
    /// by I/O only).
    fn removal_notifier(&self) -> Option<std::os::fd::OwnedFd> {
        None
    }
}

/// Something that takes doorbell writes in software (the emulated controller).
pub trait DoorbellSink: Send + Sync {
    /// The doorbell at `offset` was written with `value`.
    fn ring(&self, offset: u32, value: u32);
}

enum DoorbellKind {
    /// A register in a mapped BAR; `_keep` keeps the mapping alive.
    Mmio {
        reg: NonNull<u32>,
        _keep: Arc<dyn Send + Sync>,
    },
    /// A software doorbell.
    Sink {
        sink: Arc<dyn DoorbellSink>,
        offset: u32,
    },
}

/// One doorbell register, rung from the owner of a queue.
///
/// Ringing publishes every earlier write to DMA memory (submission entries, PRP lists) before the
/// device can see the new value: [`dma_wmb`] (a register) or a release fence (a software sink,
/// whose device thread reads the queue memory after an acquire) precedes the write.
pub struct Doorbell(DoorbellKind);

// SAFETY: the register pointer refers to a BAR mapping kept alive by `_keep`; a doorbell write is
// a single volatile 32-bit store that any thread may perform (the device serialises them).
unsafe impl Send for Doorbell {}

impl Doorbell {
    /// A doorbell backed by a memory-mapped register.
    ///
    /// # Safety
    /// `reg` must point to a 4-byte aligned doorbell register inside a device mapping that stays
    /// mapped as long as `keep` is alive.
    pub unsafe fn mmio(reg: NonNull<u32>, keep: Arc<dyn Send + Sync>) -> Doorbell {
        Doorbell(DoorbellKind::Mmio { reg, _keep: keep })
    }
    /// A doorbell delivered to a software sink.
    pub fn sink(sink: Arc<dyn DoorbellSink>, offset: u32) -> Doorbell {
        Doorbell(DoorbellKind::Sink { sink, offset })
    }
    /// Writes `value` to the doorbell.
    #[inline]
    pub fn ring(&self, value: u32) {
        match &self.0 {
            DoorbellKind::Mmio { reg, .. } => {
                dma_wmb();
                // SAFETY: `reg` is a valid, aligned register in a live mapping (contract of
                // `mmio`).
                unsafe { reg.as_ptr().write_volatile(value) }
            }
            DoorbellKind::Sink { sink, offset } => {
                fence(Ordering::Release);
                sink.ring(*offset, value)
            }
        }
    }
}

impl core::fmt::Debug for Doorbell {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match &self.0 {
            DoorbellKind::Mmio { reg, .. } => write!(f, "Doorbell(mmio {:p})", reg.as_ptr()),
            DoorbellKind::Sink { offset, .. } => write!(f, "Doorbell(sink {offset:#x})"),
        }
    }
}
