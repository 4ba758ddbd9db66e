//! Opening controllers for the tools: the built-in emulated controller, a PCIe controller
//! through VFIO, or an NVMe/TCP controller; and the adapter that runs [`crate::engine`] on the
//! transport seam's queues ([`dioxide::TransportQueue`]: a PCIe queue pair or a TCP queue).

use crate::cli::{Backing, EmuMode, EmulatedFault, EmulatedShape, FaultKind};
use crate::engine::{IoBuf, IoQueue};
use crate::report;
use crate::trid::{Target, TransportId};
use dioxide::emulated::{
    Action, EmulatedConfig, EmulatedController, Fault, Garbage, Mode, NamespaceConfig, Trigger,
};
use dioxide::spec::{Sct, Status, status::media};
use dioxide::vfio::{VfioBus, VfioOptions};
use dioxide::{
    Bus, Controller, ControllerOptions, IoOp, Lba, Namespace, NvmfDigests, NvmfHostOptions, PciId,
    TcpController, TcpOptions, TransportBuf, TransportController, TransportIoError, TransportQueue,
};
use std::sync::Arc;
use std::time::Duration;

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

/// Arms `--emulated-fault`: it fires on I/O command `after + 1` (counted over every I/O queue).
fn inject_fault(emu: &EmulatedController, f: EmulatedFault) {
    let at = |n: u64| Trigger::NthCommand {
        qid: None,
        opcode: None,
        n,
    };
    let first = f.after.saturating_add(1);
    match f.kind {
        FaultKind::Cfs => {
            emu.inject(Fault::once(at(first), Action::Fatal));
        }
        FaultKind::Remove => {
            emu.inject(Fault::once(at(first), Action::SurpriseRemove));
        }
        FaultKind::Garbage => {
            emu.inject(Fault::once(at(first), Action::Garbage(Garbage::UnknownCid)));
            emu.inject(Fault::once(
                at(first.saturating_add(1)),
                Action::Garbage(Garbage::WrongSqId),
            ));
        }
    }
}

/// Brings up the built-in emulated controller of `shape`.
pub fn open_emulated(shape: &EmulatedShape) -> Result<Opened, String> {
    open_emulated_with(shape, &ControllerOptions::default())
}

/// [`open_emulated`] with controller options (shadow doorbells on or off).
pub fn open_emulated_with(
    shape: &EmulatedShape,
    opts: &ControllerOptions,
) -> Result<Opened, String> {
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
    if let Some(f) = shape.fault {
        inject_fault(&emu, f);
    }
    let bus: Arc<dyn Bus> = emu.clone();
    let pci = bus.pci_id();
    let ctrl = Controller::with_options(bus, opts.clone())
        .map_err(|e| format!("emulated controller: {e}"))?;
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
    open_pcie_with(addr, dma_bytes, &ControllerOptions::default())
}

/// [`open_pcie`] with controller options (shadow doorbells on or off).
pub fn open_pcie_with(
    addr: &str,
    dma_bytes: u64,
    copts: &ControllerOptions,
) -> Result<Opened, String> {
    let opts = VfioOptions {
        dma_bytes: dma_bytes.max(4 << 20),
        ..VfioOptions::default()
    };
    let bus = VfioBus::open(addr, opts).map_err(|e| e.to_string())?;
    let bus: Arc<dyn Bus> = bus;
    let pci = bus.pci_id();
    let location = bus.location().to_string();
    let ctrl = Controller::with_options(bus, copts.clone()).map_err(|e| e.to_string())?;
    Ok(Opened {
        ctrl,
        label: format!("PCIE ({location})"),
        addr: location,
        pci,
        emulated: None,
    })
}

/// A controller on any transport, opened for perf or identify.
pub struct Device {
    /// The controller.
    pub ctrl: TransportController,
    /// The name prefix of its namespaces in reports: `PCIE (0000:01:00.0)`, `EMULATED
    /// (inline)`, `TCP (addr:127.0.0.1 subnqn:nqn...)`.
    pub label: String,
    /// Its address: a PCI address, `emulated (inline)`, or `127.0.0.1:4420`.
    pub addr: String,
    /// SPDK's `Attached to ...` line.
    pub attached: String,
    /// Vendor and device ID (for TCP: Identify VID and SSVID, there is no PCI function).
    pub ids: (u16, u16),
    /// The emulated controller, when it is one (kept alive with the controller).
    pub emulated: Option<Arc<EmulatedController>>,
}

impl From<Opened> for Device {
    fn from(o: Opened) -> Device {
        Device {
            attached: report::attached(&o.addr, o.pci.vendor, o.pci.device),
            ids: (o.pci.vendor, o.pci.device),
            ctrl: TransportController::Pcie(o.ctrl),
            label: o.label,
            addr: o.addr,
            emulated: o.emulated,
        }
    }
}

/// Keep Alive Timeout the tools ask for (ms), as the Linux host does by default (its
/// NVME_DEFAULT_KATO); a Keep Alive goes out every half of it.
pub const TOOLS_KATO_MS: u32 = 5_000;

/// Connects to the NVMe/TCP controller of `trid` (a `trtype:TCP` transport ID), asking for
/// the header and data digests `digests`.
pub fn open_tcp(trid: &TransportId, digests: (bool, bool)) -> Result<Device, String> {
    let Target::Tcp(addr) = trid.target else {
        return Err("not a TCP transport ID".into());
    };
    let mut host = NvmfHostOptions::new(trid.subnqn());
    if let Some(h) = &trid.hostnqn {
        host.hostnqn = h.clone();
    }
    host.kato_ms = TOOLS_KATO_MS;
    host.digests = NvmfDigests {
        header: digests.0,
        data: digests.1,
    };
    host.timeout = Duration::from_secs(10);
    let label = trid.tcp_label().unwrap_or_default();
    let c =
        TcpController::connect(TcpOptions { addr, host }).map_err(|e| format!("{label}: {e}"))?;
    let id = c.identify().clone();
    Ok(Device {
        attached: format!(
            "Attached to NVMe over Fabrics controller at {}:{}: {}\n",
            addr.ip(),
            addr.port(),
            trid.subnqn()
        ),
        ids: (id.vid, id.ssvid),
        ctrl: c.into(),
        label,
        addr: addr.to_string(),
        emulated: None,
    })
}

/// Opens the controller `trid` names (`dma_bytes`: what a VFIO controller should map;
/// `digests`: header and data digests for a TCP one).
pub fn open(
    trid: &TransportId,
    emulated: &EmulatedShape,
    dma_bytes: u64,
    digests: (bool, bool),
) -> Result<Device, String> {
    open_with(
        trid,
        emulated,
        dma_bytes,
        digests,
        &ControllerOptions::default(),
    )
}

/// [`open`] with the options of a PCIe or emulated controller (shadow doorbells on or off).
pub fn open_with(
    trid: &TransportId,
    emulated: &EmulatedShape,
    dma_bytes: u64,
    digests: (bool, bool),
    copts: &ControllerOptions,
) -> Result<Device, String> {
    Ok(match trid.target {
        Target::Emulated => open_emulated_with(emulated, copts)?.into(),
        Target::Pcie(a) => open_pcie_with(&a.to_string(), dma_bytes, copts)?.into(),
        Target::Tcp(_) => open_tcp(trid, digests)?,
    })
}

/// A data buffer of a controller (DMA memory for PCIe, plain memory for TCP).
pub struct DriverBuf(pub TransportBuf);

impl IoBuf for DriverBuf {
    fn bytes(&mut self) -> &mut [u8] {
        self.0.as_mut_slice()
    }
}

/// A queue of the transport seam, as the engine sees it: it serves every namespace of its
/// controller (an NVMe I/O queue is not tied to a namespace; each command names its own).
pub struct DriverQueue {
    /// The queue (tags are `u64`).
    pub qp: TransportQueue<u64>,
    /// The namespaces its commands may go to.
    pub nss: Vec<Namespace>,
    /// The controller's location, for errors.
    pub location: String,
    /// `perf --reset-after-ios`: the reset this queue's completions count towards.
    pub reset: Option<Arc<ResetPlan>>,
}

/// `perf --reset-after-ios N`: once the queues of a controller have completed N I/Os between
/// them, the worker whose poll crosses N resets the controller (`Controller::reset`, once), as
/// SPDK's `examples/nvme/reset` does under I/O. The requests the reset fails end with
/// `ControllerReset` (I/O errors: `-Q` lets the run go on); every queue pair renews itself on
/// the re-initialised controller in its next poll.
pub struct ResetPlan {
    ctrl: dioxide::Controller,
    after: u64,
    completed: std::sync::atomic::AtomicU64,
    fired: std::sync::atomic::AtomicBool,
    /// The reset's error, if it failed.
    pub error: std::sync::Mutex<Option<String>>,
}

impl ResetPlan {
    /// A plan for `ctrl` (PCIe or emulated), firing after `after` completions.
    pub fn new(ctrl: dioxide::Controller, after: u64) -> ResetPlan {
        ResetPlan {
            ctrl,
            after,
            completed: Default::default(),
            fired: Default::default(),
            error: Default::default(),
        }
    }

    /// Whether the reset has run (or is running).
    pub fn fired(&self) -> bool {
        self.fired.load(std::sync::atomic::Ordering::Acquire)
    }

    fn count(&self, n: u64) {
        use std::sync::atomic::Ordering;
        if n == 0 || self.fired.load(Ordering::Relaxed) {
            return;
        }
        let before = self.completed.fetch_add(n, Ordering::AcqRel);
        if before + n >= self.after && !self.fired.swap(true, Ordering::AcqRel) {
            if let Err(e) = self.ctrl.reset() {
                *self.error.lock().unwrap() = Some(format!("controller reset failed: {e}"));
            }
        }
    }
}

impl IoQueue for DriverQueue {
    type Buf = DriverBuf;
    type Error = dioxide::TransportError;
    type IoErr = TransportIoError;

    #[inline]
    unsafe fn submit(
        &mut self,
        read: bool,
        nsid: u32,
        lba: u64,
        _blocks: u32,
        buf: &DriverBuf,
        tag: u64,
    ) -> Result<(), dioxide::TransportError> {
        let op = if read { IoOp::Read } else { IoOp::Write };
        let Some(ns) = self.nss.iter().find(|n| n.nsid().0 == nsid) else {
            return Err(dioxide::Error::NoSuchNamespace {
                location: self.location.clone(),
                nsid: dioxide::Nsid(nsid),
                active: self.nss.iter().map(|n| n.nsid().0).collect(),
            }
            .into());
        };
        // SAFETY: the buffer comes from this controller (`TransportController::alloc`), and
        // the engine's contract (IoQueue::submit) keeps it alive and untouched until the tag
        // is polled back; a buffer whose command may still be in the device is never reused
        // (see `retire`), and buffers are dropped after the queues.
        unsafe { self.qp.submit_raw(op, ns, Lba(lba), &buf.0, tag) }.map_err(|r| r.error)
    }

    #[inline]
    fn ring(&mut self) {
        self.qp.ring();
    }

    #[inline]
    fn poll<F: FnMut(u64, Result<(), TransportIoError>)>(
        &mut self,
        max: u32,
        done: F,
    ) -> Result<u32, dioxide::TransportError> {
        let max = if max == 0 { usize::MAX } else { max as usize };
        // After a reset: the old queue pair hands back what it held (failed by the reset, once
        // the device has stopped), then is replaced by a new one on the re-initialised
        // controller. With several worker cores the reset runs in another core's poll: until
        // it has brought the controller up again, a queue pair with nothing left to hand back
        // waits for it (polled again) rather than report itself dead.
        if let TransportQueue::Pcie(q) = &mut self.qp {
            if q.is_stale() {
                match q.renew() {
                    Ok(_) => {}
                    Err(dioxide::Error::NotReady { .. }) if q.outstanding() == 0 => return Ok(0),
                    Err(dioxide::Error::NotReady { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        if self.reset.is_none() {
            return self.qp.poll(max, done).map(|n| n as u32);
        }
        let mut done = done;
        let mut n = 0u64;
        let r = self
            .qp
            .poll(max, |t, res| {
                n += 1;
                done(t, res)
            })
            .map(|n| n as u32);
        if let Some(p) = &self.reset {
            p.count(n);
        }
        r
    }

    fn status(e: &TransportIoError) -> Option<Status> {
        e.status()
    }

    fn retire(e: &TransportIoError) -> bool {
        // After a PCIe timeout the device may still write the buffer.
        e.buffer_still_in_use()
    }

    fn survives(e: &dioxide::TransportError) -> bool {
        // An invalid completion entry, rejected; the queue pair goes on.
        // A queue pair the controller's reset killed: renewed by the next poll.
        matches!(
            e,
            dioxide::TransportError::Pcie(dioxide::Error::Protocol { .. })
                | dioxide::TransportError::Pcie(dioxide::Error::QueueDead {
                    reason: dioxide::DeadReason::ControllerReset,
                    ..
                })
        )
    }

    fn rejected_entries(&self) -> Option<u64> {
        self.qp.stats().map(|s| s.protocol_errors)
    }

    fn arm(&mut self) -> Option<std::os::fd::RawFd> {
        match &mut self.qp {
            TransportQueue::Pcie(q) => q.arm_interrupt_edge().then(|| q.completion_fd()).flatten(),
            TransportQueue::Tcp(_) => None,
        }
    }
}
