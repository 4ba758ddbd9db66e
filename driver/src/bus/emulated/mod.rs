//! The built-in emulated NVMe controller: an in-process NVMe 1.4 controller model behind the
//! [`Bus`] seam.
//!
//! The driver sees exactly what it would see over VFIO: BAR0 registers (CAP, VS, CC, CSTS, AQA,
//! ASQ, ACQ, doorbells with the configured stride), submission queues it fills and completion
//! queues whose phase tags it polls, and DMA memory reached by IOVA. The model reads SQEs, walks
//! PRPs and writes CQEs only through raw pointers into that DMA memory, translating every IOVA
//! through [`DmaMemory::ptr_of`] like an IOMMU: an address outside DMA memory is a DMA fault,
//! completed with Data Transfer Error and counted in [`Stats::dma_faults`] (where QEMU would
//! silently succeed).
//!
//! # Modes
//! * [`Mode::Inline`]: a command is processed synchronously inside the SQ tail doorbell write,
//!   on the ringing thread. Deterministic, and the way to measure the driver's own cost: with the
//!   memory or null backing a command costs one uncontended lock of its SQ and one of its CQ, no
//!   allocation and no system call.
//! * [`Mode::Threaded`]: a device thread polls the doorbell values (atomics, read with acquire)
//!   beside the driver, so the driver's ordering and barriers are exercised. After a while idle
//!   it backs off (spin, yield, then short sleeps); it stops when the controller is dropped.
//!
//! # Behaviour a driver can observe
//! * Enable (CC.EN 0 to 1) validates CC (IOSQES = 6, IOCQES = 4, MPS within CAP, CSS = NVM,
//!   AMS = round robin) and AQA/ASQ/ACQ (sizes of at least 2, page aligned, in DMA memory); a bad
//!   configuration sets CSTS.CFS, as a real controller does ([`EmulatedController::fatal_reason`]
//!   says why). CSTS.RDY follows CC.EN after [`EmulatedConfig::ready_delay`] (both ways).
//!   CC.EN 1 to 0 resets: all queues deleted, held commands dropped, features back to defaults,
//!   CFS cleared. CC.SHN sets CSTS.SHST to complete at once.
//! * Invalid doorbell writes (a value not below the queue size, a doorbell of a queue that does
//!   not exist, or an offset that is not a doorbell of the stride) are ignored, counted in
//!   [`Stats::invalid_doorbell_writes`], recorded in the Error Information log, and reported by
//!   an Asynchronous Event (type Error, information 00h Write to Invalid Doorbell Register or
//!   01h Invalid Doorbell Write Value, log page 01h) as NVMe 1.4 section 5.2 describes; they do
//!   not set CFS. Overflow/underflow checks (a tail overtaking the head) are not made.
//! * A CQ that is full holds further completions inside the controller and posts them as the
//!   host frees entries (the SQ keeps being fetched).
//! * Abort completes; DW0 bit 0 is 1 ("not aborted") unless the target is a held command
//!   (never-completing or delayed by a fault), which then completes with Command Abort Requested.
//! * Asynchronous Event Requests (up to 4) are held until an event occurs.
//! * Doorbell Buffer Config (shadow doorbells, offered unless
//!   [`EmulatedConfig::doorbell_buffer_config`] is off) works as in QEMU: the I/O queues' SQ
//!   tails and CQ heads are read from the host's shadow page, and the positions seen are
//!   published in its event index page; a register write still makes the controller look.
//!   [`Stats::io_doorbell_writes`] counts the register writes of the I/O queues.
//! * Null namespaces move no data but still check the NSID, LBA range, MDTS and the PRPs
//!   (walked and translated), so PRP bugs are caught while measuring.
//!
//! See [`faults`](Fault) for fault injection and how delays work in inline mode.

mod admin;
mod chunks;
mod dbbuf;
mod device;
mod faults;
mod hold;
mod io;
mod irq;
mod namespace;
mod prp;
mod queue;
mod stats;
#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub use chunks::{EmulatedChunkSource, GRANULE, GUARD, IOVA_BASE};
pub use faults::{Action, Fault, FaultId, GARBAGE_DW0, Garbage, Trigger};
pub use hold::CcWriteHold;
pub use stats::Stats;

use crate::bus::dma::DmaMemory;
use crate::bus::{Bus, Doorbell, PciId};
use crate::spec::{Cap, Oncs};
use device::{Device, Props};
use namespace::Namespace;

/// How the emulated controller runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Mode {
    /// Commands are processed inside the SQ tail doorbell write, on the ringing thread.
    #[default]
    Inline,
    /// A device thread polls the doorbells and processes commands.
    Threaded,
}

/// What a namespace stores its blocks in.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum Backing {
    /// Sparse memory: 64 KiB pieces allocated on first write; unwritten blocks read as zeroes.
    #[default]
    Memory,
    /// A file, created if needed and extended to the namespace size.
    File(PathBuf),
    /// No storage: reads leave the buffer untouched, writes are discarded.
    Null,
}

/// One namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamespaceConfig {
    /// Logical block size: 512 or 4096.
    pub block_size: u32,
    /// Size in logical blocks.
    pub blocks: u64,
    /// Storage.
    pub backing: Backing,
    /// Metadata bytes per block of the LBA format in use (0: none). A namespace with metadata
    /// reports the format (`block_size`+`metadata`, as an extra LBA format 2) but moves no
    /// metadata: reads and writes there fail with Invalid Field in Command. It exists to check
    /// that a driver refuses such a namespace before sending it I/O.
    pub metadata: u16,
    /// With `metadata`: at the end of each block (extended LBA, FLBAS bit 4) rather than in a
    /// separate buffer.
    pub metadata_extended: bool,
}

impl NamespaceConfig {
    /// A (sparse) memory namespace.
    pub fn memory(block_size: u32, blocks: u64) -> Self {
        NamespaceConfig {
            block_size,
            blocks,
            backing: Backing::Memory,
            metadata: 0,
            metadata_extended: false,
        }
    }
    /// A null namespace.
    pub fn null(block_size: u32, blocks: u64) -> Self {
        NamespaceConfig {
            block_size,
            blocks,
            backing: Backing::Null,
            metadata: 0,
            metadata_extended: false,
        }
    }
    /// The same namespace formatted with `bytes` of metadata per block, at the end of each
    /// block (`extended`) or in a separate buffer: e.g. `memory(512, n).with_metadata(8, true)`
    /// is a 512+8 extended-LBA namespace.
    pub fn with_metadata(self, bytes: u16, extended: bool) -> Self {
        NamespaceConfig {
            metadata: bytes,
            metadata_extended: extended,
            ..self
        }
    }
    /// A namespace backed by the file at `path`.
    pub fn file(path: impl Into<PathBuf>, block_size: u32, blocks: u64) -> Self {
        NamespaceConfig {
            block_size,
            blocks,
            backing: Backing::File(path.into()),
            metadata: 0,
            metadata_extended: false,
        }
    }
}

/// Configuration of an emulated controller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EmulatedConfig {
    /// Inline or threaded.
    pub mode: Mode,
    /// Namespaces, NSID 1 first.
    pub namespaces: Vec<NamespaceConfig>,
    /// CAP.MQES: largest I/O queue, 0's based (at least 1).
    pub mqes: u16,
    /// MDTS: largest transfer is 4 KiB << mdts; 0 = no limit.
    pub mdts: u8,
    /// Most I/O queue pairs (Number of Queues allocates at most this many).
    pub max_io_queues: u16,
    /// CAP.DSTRD: doorbell stride is 4 << dstrd bytes.
    pub dstrd: u8,
    /// CAP.TO in 500 ms units.
    pub cap_to: u8,
    /// Time CSTS.RDY takes to follow CC.EN.
    pub ready_delay: Duration,
    /// Serial number (Identify Controller).
    pub serial: String,
    /// Model number.
    pub model: String,
    /// Firmware revision.
    pub firmware: String,
    /// ONCS: the optional NVM commands offered (Write Zeroes and Dataset Management are
    /// implemented; one left out is refused with Invalid Command Opcode).
    pub oncs: Oncs,
    /// VWC bit 0: a volatile write cache (Flush is accepted either way).
    pub vwc: bool,
    /// WZSL of the NVM command set's Identify Controller (CNS 06h): Write Zeroes of more than
    /// `4 KiB << wzsl` are refused with Invalid Field; 0 = no limit.
    pub wzsl: u8,
    /// Doorbell Buffer Config (shadow doorbells, OACS bit 8) offered, as QEMU's NVMe does by
    /// default (`dbcs=off` removes it there).
    pub doorbell_buffer_config: bool,
}

impl Default for EmulatedConfig {
    /// Inline, one 1 GiB memory namespace of 512-byte blocks, 1024-entry queues, 128 KiB MDTS,
    /// 64 I/O queues, stride 0, CAP.TO 10 s, no ready delay.
    fn default() -> Self {
        EmulatedConfig {
            mode: Mode::Inline,
            namespaces: vec![NamespaceConfig::memory(512, (1 << 30) / 512)],
            mqes: 1023,
            mdts: 5,
            max_io_queues: 64,
            dstrd: 0,
            cap_to: 20,
            ready_delay: Duration::ZERO,
            serial: "DIOXIDE-EMU-0001".into(),
            model: "Dioxide Emulated NVMe Controller".into(),
            firmware: "1.0".into(),
            oncs: Oncs::DSM | Oncs::WRITE_ZEROES,
            vwc: true,
            wzsl: 0,
            doorbell_buffer_config: true,
        }
    }
}

/// Errors creating an emulated controller.
#[derive(Debug, thiserror::Error)]
pub enum EmulatedError {
    /// The configuration is not usable.
    #[error("invalid emulated controller configuration: {0}")]
    InvalidConfig(String),
    /// A namespace backing file could not be opened or sized.
    #[error("failed to open namespace backing file {path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The device thread could not be started.
    #[error("failed to start the emulated device thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// The emulated NVMe controller. Use it through [`Bus`]; the inherent methods are for tests.
pub struct EmulatedController {
    dev: Arc<Device>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The removal request and its eventfd, under one lock (see [`RemovalRequest`]).
    removal: std::sync::Mutex<RemovalRequest>,
    /// Calls of [`Bus::release_removed`].
    releases: AtomicU64,
    /// Run by [`Bus::release_removed`] before the device is let go
    /// ([`EmulatedController::on_release`]).
    release_hook: std::sync::Mutex<Option<ReleaseHook>>,
    /// The next disable to hold back ([`EmulatedController::hold_next_disable`]).
    disable_gate: std::sync::Mutex<Option<Arc<hold::Gate>>>,
    /// The next shutdown notification to hold back
    /// ([`EmulatedController::hold_next_shutdown`]).
    shutdown_gate: std::sync::Mutex<Option<Arc<hold::Gate>>>,
}

type ReleaseHook = Box<dyn FnOnce() + Send>;

/// An orderly removal request and the eventfd that announces it. One lock around both: a
/// request made while the first [`Bus::removal_notifier`] call creates the eventfd is either
/// seen by that call (which signals the new eventfd) or finds the eventfd and signals it, never
/// neither.
#[derive(Default)]
struct RemovalRequest {
    /// [`EmulatedController::request_removal`] was called.
    requested: bool,
    /// Signalled by [`EmulatedController::request_removal`], as vfio-pci signals the device
    /// request eventfd; made on the first [`Bus::removal_notifier`] call (`Some(None)`: making
    /// it failed).
    event: Option<Option<crate::bus::interrupt::EventFd>>,
}

impl core::fmt::Debug for EmulatedController {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("EmulatedController")
            .field("threaded", &self.dev.props.threaded)
            .field("namespaces", &self.dev.namespaces.len())
            .finish()
    }
}

impl EmulatedController {
    /// Builds the controller (disabled, as after power-on) and, in threaded mode, starts its
    /// device thread.
    pub fn new(config: EmulatedConfig) -> Result<Arc<EmulatedController>, EmulatedError> {
        let bad = |m: String| Err(EmulatedError::InvalidConfig(m));
        if config.mqes == 0 {
            return bad("mqes must be at least 1 (queues of 2 entries)".into());
        }
        if config.max_io_queues == 0 || config.max_io_queues > 4096 {
            return bad(format!(
                "max_io_queues {} is not within 1..=4096",
                config.max_io_queues
            ));
        }
        if config.dstrd > 15 {
            return bad(format!("dstrd {} does not fit CAP.DSTRD", config.dstrd));
        }
        if config.mdts > 16 {
            return bad(format!("mdts {} is larger than 16", config.mdts));
        }
        let mut namespaces = Vec::with_capacity(config.namespaces.len());
        for (i, n) in config.namespaces.iter().enumerate() {
            if n.block_size != 512 && n.block_size != 4096 {
                return bad(format!(
                    "namespace {} has block size {}; only 512 and 4096 are supported",
                    i + 1,
                    n.block_size
                ));
            }
            if n.blocks == 0 || n.blocks.checked_mul(n.block_size as u64).is_none() {
                return bad(format!("namespace {} has {} blocks", i + 1, n.blocks));
            }
            let mut ns = match &n.backing {
                Backing::Memory => Namespace::sparse(n.block_size, n.blocks),
                Backing::Null => Namespace::null(n.block_size, n.blocks),
                Backing::File(p) => {
                    Namespace::file(p, n.block_size, n.blocks).map_err(|source| {
                        EmulatedError::File {
                            path: p.clone(),
                            source,
                        }
                    })?
                }
            };
            ns.metadata = n.metadata;
            ns.metadata_extended = n.metadata_extended;
            namespaces.push(ns);
        }
        let threaded = config.mode == Mode::Threaded;
        let props = Props {
            threaded,
            cap: Cap::build(config.mqes, true, config.cap_to, config.dstrd, 0, 4),
            dstrd: config.dstrd,
            mqes: config.mqes,
            mdts: config.mdts,
            max_io_queues: config.max_io_queues,
            ready_delay: config.ready_delay,
            serial: config.serial,
            model: config.model,
            firmware: config.firmware,
            oncs: config.oncs,
            vwc: config.vwc,
            wzsl: config.wzsl,
            dbbuf: config.doorbell_buffer_config,
        };
        let dma = DmaMemory::new(Box::new(EmulatedChunkSource::new()));
        let dev = Arc::new(Device::new(dma, props, namespaces));
        let thread = if threaded {
            let d = dev.clone();
            Some(
                std::thread::Builder::new()
                    .name("nvme-emu".into())
                    .spawn(move || d.run())
                    .map_err(EmulatedError::Thread)?,
            )
        } else {
            None
        };
        Ok(Arc::new(EmulatedController {
            dev,
            thread,
            removal: std::sync::Mutex::new(RemovalRequest::default()),
            releases: AtomicU64::new(0),
            release_hook: std::sync::Mutex::new(None),
            disable_gate: std::sync::Mutex::new(None),
            shutdown_gate: std::sync::Mutex::new(None),
        }))
    }

    /// Installs a fault; it applies to commands fetched from now on.
    pub fn inject(&self, fault: Fault) -> FaultId {
        self.dev.faults.add(fault)
    }

    /// Removes one fault. Returns false if it had already fired its last time.
    pub fn remove_fault(&self, id: FaultId) -> bool {
        self.dev.faults.remove(id)
    }

    /// Removes every fault (held commands stay held).
    pub fn clear_faults(&self) {
        self.dev.faults.clear();
    }

    /// Controller fatal status: CSTS.CFS = 1 and nothing more is processed until a reset.
    pub fn set_fatal(&self) {
        self.dev.set_fatal("set_fatal() called");
    }

    /// Surprise removal: every register reads all ones, writes and doorbells are ignored and
    /// nothing more is processed or posted. Permanent.
    pub fn surprise_remove(&self) {
        self.dev.removed.store(true, Ordering::Release);
    }

    /// Orderly removal, as vfio-pci's device request notification announces it (`device_del`,
    /// unbind): [`Bus::removal_requested`] answers true from now on; once the driver lets the
    /// device go ([`Bus::release_removed`]) the device is removed as by
    /// [`surprise_remove`](Self::surprise_remove). Until then it keeps working.
    pub fn request_removal(&self) {
        let mut r = self.lock_removal();
        r.requested = true;
        if let Some(Some(ev)) = &r.event {
            ev.signal();
        }
    }

    fn lock_removal(&self) -> std::sync::MutexGuard<'_, RemovalRequest> {
        self.removal.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` in the next [`Bus::release_removed`] call, on the driver's thread, before the
    /// device is let go and before [`releases`](Self::releases) counts it: a test looks at
    /// what the driver does while a release is under way (the device still works then, as a
    /// VFIO device does until its file is closed).
    pub fn on_release(&self, f: impl FnOnce() + Send + 'static) {
        *self.release_hook.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(f));
    }

    /// Holds back the next disable: the next CC write that clears EN while it is set waits in
    /// the writing thread, before the device sees it, until the returned hold says what becomes
    /// of it (see [`CcWriteHold`]). A test looks at what the driver does while it has decided
    /// to reset the controller but the device has not stopped yet.
    pub fn hold_next_disable(&self) -> CcWriteHold {
        let gate = Arc::new(hold::Gate::default());
        *self.disable_gate.lock().unwrap_or_else(|e| e.into_inner()) = Some(gate.clone());
        CcWriteHold { gate }
    }

    /// Holds back the next shutdown notification: the next CC write that sets SHN while it is
    /// clear waits in the writing thread, before the device sees it, until the returned hold
    /// says what becomes of it: released, the device shuts down (CSTS.SHST complete);
    /// discarded, CC.SHN stays clear and CSTS.SHST never reports the shutdown complete. A test
    /// looks at what the driver does between deciding to shut down and the device stopping.
    pub fn hold_next_shutdown(&self) -> CcWriteHold {
        let gate = Arc::new(hold::Gate::default());
        *self.shutdown_gate.lock().unwrap_or_else(|e| e.into_inner()) = Some(gate.clone());
        CcWriteHold { gate }
    }

    /// How many times the driver called [`Bus::release_removed`] (counted when the call has
    /// let the device go).
    pub fn releases(&self) -> u64 {
        self.releases.load(Ordering::Acquire)
    }

    /// Posts every delayed completion now (never-completing commands stay held).
    pub fn release_delayed(&self) {
        self.dev.release_delayed();
    }

    /// Why CSTS.CFS is set, if it is.
    pub fn fatal_reason(&self) -> Option<String> {
        if self.dev.fatal.load(Ordering::Acquire) {
            self.dev.fatal_reason()
        } else {
            None
        }
    }

    /// Memory held by namespace `nsid`'s storage (sparse memory; 0 for other backings), or
    /// `None` if there is no such namespace.
    pub fn resident_bytes(&self, nsid: u32) -> Option<u64> {
        let i = (nsid as usize).checked_sub(1)?;
        self.dev.namespaces.get(i).map(|n| n.resident_bytes())
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        let d = &self.dev;
        let mut s = Stats {
            dma_faults: d.dma_faults.load(Ordering::Relaxed),
            invalid_doorbell_writes: d.invalid_doorbells.load(Ordering::Relaxed),
            faults_fired: d.faults.fired.load(Ordering::Relaxed),
            held: d.pending.len(),
            idle_sleeps: d.idle_sleeps.load(Ordering::Relaxed),
            controller_resets: d.controller_resets.load(Ordering::Relaxed),
            shutdowns: d.shutdowns.load(Ordering::Relaxed),
            doorbell_writes: d.stray_doorbells.load(Ordering::Relaxed),
            ..Stats::default()
        };
        for (q, slot) in d.sqs.iter().enumerate() {
            let n = slot.doorbells.load(Ordering::Relaxed);
            s.doorbell_writes += n;
            if q != 0 {
                s.io_doorbell_writes += n;
            }
            for (op, n) in slot.commands.iter().enumerate() {
                let n = n.load(Ordering::Relaxed);
                if n != 0 {
                    s.commands.insert((q as u16, op as u8), n);
                }
            }
        }
        for (q, slot) in d.cqs.iter().enumerate() {
            let n = slot.doorbells.load(Ordering::Relaxed);
            s.doorbell_writes += n;
            if q != 0 {
                s.io_doorbell_writes += n;
                s.io_cq_full += slot.full.load(Ordering::Relaxed);
            }
        }
        s
    }
}

impl Drop for EmulatedController {
    fn drop(&mut self) {
        self.dev.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::error!("the emulated controller's device thread panicked");
            }
        }
    }
}

impl Bus for EmulatedController {
    fn location(&self) -> &str {
        "emulated"
    }
    fn pci_id(&self) -> PciId {
        PciId {
            vendor: admin::VENDOR,
            device: 0x0010,
            subsystem_vendor: admin::SUBSYSTEM_VENDOR,
            subsystem_device: 0x1100,
        }
    }
    fn read32(&self, offset: u32) -> u32 {
        self.dev.read32(offset)
    }
    fn write32(&self, offset: u32, value: u32) {
        use crate::spec::Cc;
        use crate::spec::regs::offset::CC;
        use crate::spec::regs::shn;
        if offset == CC {
            let old = Cc(self.dev.read32(CC));
            let new = Cc(value);
            let gate = if !new.en() && old.en() {
                &self.disable_gate
            } else if new.shn() != shn::NONE && old.shn() == shn::NONE {
                &self.shutdown_gate
            } else {
                return self.dev.write32(offset, value);
            };
            let gate = gate.lock().unwrap_or_else(|e| e.into_inner()).take();
            if gate.is_some_and(|g| !g.pass()) {
                return;
            }
        }
        self.dev.write32(offset, value);
    }
    fn doorbell(&self, offset: u32) -> Doorbell {
        Doorbell::sink(self.dev.clone(), offset)
    }
    fn dma(&self) -> &DmaMemory {
        &self.dev.dma
    }
    fn interrupt(
        &self,
        vector: u16,
    ) -> Result<Arc<crate::bus::interrupt::EventFd>, crate::bus::interrupt::InterruptError> {
        self.dev.vectors.get(vector)
    }
    fn removal_requested(&self) -> bool {
        self.lock_removal().requested
    }
    fn removal_notifier(&self) -> Option<std::os::fd::OwnedFd> {
        let mut r = self.lock_removal();
        let requested = r.requested;
        let ev = r.event.get_or_insert_with(|| {
            crate::bus::interrupt::EventFd::new()
                .inspect_err(|e| log::warn!("emulated: no eventfd for removal requests: {e}"))
                .ok()
        });
        let ev = ev.as_ref()?;
        if requested {
            ev.signal();
        }
        // SAFETY: the eventfd is owned by `self.removal`, whose lock `r` holds it open for this
        // call.
        unsafe { std::os::fd::BorrowedFd::borrow_raw(ev.raw_fd()) }
            .try_clone_to_owned()
            .inspect_err(|e| log::warn!("emulated: could not duplicate the removal eventfd: {e}"))
            .ok()
    }
    fn release_removed(&self) {
        let hook = self
            .release_hook
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(f) = hook {
            f();
        }
        self.surprise_remove();
        self.releases.fetch_add(1, Ordering::AcqRel);
    }
}
