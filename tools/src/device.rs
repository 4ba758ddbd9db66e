//! Opening controllers for the tools: the built-in emulated controller, or a PCIe controller
//! through VFIO; and the adapter that runs [`crate::engine`] on the driver's queue pairs.

use crate::cli::{Backing, EmuMode, EmulatedShape};
use crate::engine::{IoBuf, IoQueue};
use dioxide::emulated::{
    Action, EmulatedConfig, EmulatedController, Fault, Mode, NamespaceConfig, Trigger,
};
use dioxide::spec::{Sct, Status, status::media};
use dioxide::vfio::{VfioBus, VfioOptions};
use dioxide::{
    Bus, Controller, DmaBuffer, IoError, IoFlags, IoOp, Lba, Namespace, PciId, QueuePair,
};
use std::sync::Arc;

/// An open controller and how to name it.
pub struct Opened {
    /// The controller.
    pub ctrl: Controller,
    /// The name prefix of its namespaces in reports: `PCIE (0000:01:00.0)`, `EMULATED (inline)`.
    pub label: String,
    /// Its address for SPDK's `Attached to NVMe Controller at ...` line.
    pub addr: String,
    /// The PCI identity.
    pub pci: PciId,
    /// The emulated controller, when it is one (kept alive with the controller).
    pub emulated: Option<Arc<EmulatedController>>,
}

/// The emulated controller configuration of `shape`.
pub fn emulated_config(shape: &EmulatedShape) -> EmulatedConfig {
    let ns = |i: u32| {
        let ns = match shape.backing {
            Backing::Null => NamespaceConfig::null(shape.block_size, shape.blocks()),
            Backing::Memory => NamespaceConfig::memory(shape.block_size, shape.blocks()),
        };
        if shape.metadata_ns == Some(i + 1) {
            ns.with_metadata(8, true)
        } else {
            ns
        }
    };
    EmulatedConfig {
        mode: match shape.mode {
            EmuMode::Inline => Mode::Inline,
            EmuMode::Threaded => Mode::Threaded,
        },
        namespaces: (0..shape.namespaces).map(ns).collect(),
        max_io_queues: shape
            .io_queues
            .unwrap_or(EmulatedConfig::default().max_io_queues),
        ..EmulatedConfig::default()
    }
}

/// Brings up the built-in emulated controller of `shape`.
pub fn open_emulated(shape: &EmulatedShape) -> Result<Opened, String> {
    let emu = EmulatedController::new(emulated_config(shape)).map_err(|e| e.to_string())?;
    if let Some((start, count)) = shape.fail_lba {
        for nsid in 1..=shape.namespaces {
            emu.inject(Fault::always(
                Trigger::LbaRange {
                    nsid,
                    start,
                    end: start.saturating_add(count),
                    opcode: None,
                },
                Action::Status(Status::new(Sct::Media, media::UNRECOVERED_READ_ERROR)),
            ));
        }
    }
    let bus: Arc<dyn Bus> = emu.clone();
    let pci = bus.pci_id();
    let ctrl = Controller::new(bus).map_err(|e| format!("emulated controller: {e}"))?;
    let mode = match shape.mode {
        EmuMode::Inline => "inline",
        EmuMode::Threaded => "threaded",
    };
    Ok(Opened {
        ctrl,
        label: format!("EMULATED ({mode})"),
        addr: format!("emulated ({mode})"),
        pci,
        emulated: Some(emu),
    })
}

/// Opens the PCIe controller at `addr` through VFIO, expecting to pin about `dma_bytes`.
pub fn open_pcie(addr: &str, dma_bytes: u64) -> Result<Opened, String> {
    let opts = VfioOptions {
        dma_bytes: dma_bytes.max(4 << 20),
        ..VfioOptions::default()
    };
    let bus = VfioBus::open(addr, opts).map_err(|e| e.to_string())?;
    let bus: Arc<dyn Bus> = bus;
    let pci = bus.pci_id();
    let location = bus.location().to_string();
    let ctrl = Controller::new(bus).map_err(|e| e.to_string())?;
    Ok(Opened {
        ctrl,
        label: format!("PCIE ({location})"),
        addr: location,
        pci,
        emulated: None,
    })
}

/// A data buffer in the controller's DMA memory.
pub struct DriverBuf(pub DmaBuffer);

impl IoBuf for DriverBuf {
    fn bytes(&mut self) -> &mut [u8] {
        self.0.as_mut_slice()
    }
}

/// A driver queue pair, as the engine sees it: it serves every namespace of its controller
/// (an NVMe I/O queue is not tied to a namespace; each command names its own).
pub struct DriverQueue {
    /// The queue pair (tags are `u64`).
    pub qp: QueuePair<u64>,
    /// The namespaces its commands may go to.
    pub nss: Vec<Namespace>,
    /// The controller's location, for errors.
    pub location: String,
}

/// A completion error of the driver.
pub fn io_status(e: &IoError) -> Option<Status> {
    match e {
        IoError::Status { status, .. } => Some(*status),
        _ => None,
    }
}

impl IoQueue for DriverQueue {
    type Buf = DriverBuf;
    type Error = dioxide::Error;
    type IoErr = IoError;

    #[inline]
    unsafe fn submit(
        &mut self,
        read: bool,
        nsid: u32,
        lba: u64,
        _blocks: u32,
        buf: &DriverBuf,
        tag: u64,
    ) -> Result<(), dioxide::Error> {
        let op = if read { IoOp::Read } else { IoOp::Write };
        let Some(ns) = self.nss.iter().find(|n| n.nsid().0 == nsid) else {
            return Err(dioxide::Error::NoSuchNamespace {
                location: self.location.clone(),
                nsid: dioxide::Nsid(nsid),
                active: self.nss.iter().map(|n| n.nsid().0).collect(),
            });
        };
        // SAFETY: the buffer comes from this controller's DMA memory (allocated by
        // `Controller::alloc`), and the engine's contract (IoQueue::submit) keeps it alive and
        // untouched until the tag is polled back; a buffer whose command timed out is never
        // reused (see `retire`), and buffers are dropped after the queue pairs.
        unsafe {
            self.qp
                .submit_raw(op, ns, Lba(lba), buf.0.as_dma_slice(), IoFlags::NONE, tag)
        }
        .map_err(|r| r.error)
    }

    #[inline]
    fn ring(&mut self) {
        self.qp.ring();
    }

    #[inline]
    fn poll<F: FnMut(u64, Result<(), IoError>)>(
        &mut self,
        max: u32,
        mut done: F,
    ) -> Result<u32, dioxide::Error> {
        let max = if max == 0 { usize::MAX } else { max as usize };
        self.qp
            .poll(max, |tag, r| done(tag, r.map(|_| ())))
            .map(|n| n as u32)
    }

    fn status(e: &IoError) -> Option<Status> {
        io_status(e)
    }

    fn retire(e: &IoError) -> bool {
        // After a timeout the device may still write the buffer.
        matches!(e, IoError::Timeout { .. })
    }
}
