//! The device model: registers, doorbells, queue processing and the device thread.
//!
//! Lock order (never taken the other way round): the register lock; then submission queue
//! states (the admin SQ before any I/O SQ); then the held-command list; then completion queue
//! states, the async event state and the error log. Command processing never takes the register
//! lock: it reads readiness from atomics, so a reset (which holds the register lock while it
//! deletes queues) waits for a batch in progress to end.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::faults::{Action, FaultTable, Held, Pending, Release};
use super::irq::Vectors;
use super::namespace::Namespace;
use super::queue::{Completion, Cq, CqSlot, Sq, SqSlot, lock};
use crate::bus::DoorbellSink;
use crate::bus::dma::DmaMemory;
use crate::spec::PAGE_SIZE;
use crate::spec::identify::ErrorLogEntry;
use crate::spec::regs::{offset, shn, shst};
use crate::spec::sqe::{io, lid};
use crate::spec::{Cap, Cc, Csts, Sct, Sqe, Status, Vs};
use crate::types::Iova;

/// Error log entries kept (Identify Controller ELPE + 1).
pub(crate) const ERROR_LOG_ENTRIES: usize = 64;
/// Outstanding Asynchronous Event Requests allowed (AERL + 1).
pub(crate) const AER_LIMIT: usize = 4;
/// Async event information: Write to Invalid Doorbell Register.
const AEI_INVALID_DOORBELL_REGISTER: u8 = 0x00;
/// Async event information: Invalid Doorbell Write Value.
const AEI_INVALID_DOORBELL_VALUE: u8 = 0x01;

/// Result of executing a command.
pub(crate) enum Outcome {
    /// Complete with this status and DW0.
    Done(Status, u32),
    /// Held by the command itself (an Asynchronous Event Request).
    Held,
}

/// A generic status with DNR set (for malformed commands, which a retry cannot fix).
pub(crate) const fn generic(sc: u8) -> Status {
    Status::new(Sct::Generic, sc).with_dnr(true)
}
/// A command specific status with DNR set.
pub(crate) const fn specific(sc: u8) -> Status {
    Status::new(Sct::CommandSpecific, sc).with_dnr(true)
}

/// Current values of the features the controller keeps.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Features {
    pub arbitration: u32,
    pub power_management: u32,
    pub temperature_threshold: u32,
    pub error_recovery: u32,
    pub volatile_write_cache: u32,
    pub nsq: u16,
    pub ncq: u16,
    pub interrupt_coalescing: u32,
    pub async_event_config: u32,
    pub keep_alive: u32,
}

impl Features {
    pub(crate) fn defaults(max_io_queues: u16) -> Features {
        Features {
            arbitration: 0,
            power_management: 0,
            temperature_threshold: 343,
            error_recovery: 0,
            volatile_write_cache: 1,
            nsq: max_io_queues,
            ncq: max_io_queues,
            interrupt_coalescing: 0,
            async_event_config: 0,
            keep_alive: 0,
        }
    }
}

/// Outstanding Asynchronous Event Requests and events not yet reported.
#[derive(Default)]
pub(crate) struct AsyncEvents {
    pub cids: Vec<u16>,
    pub events: VecDeque<u32>,
}

struct Regs {
    cc: Cc,
    aqa: u32,
    asq: u64,
    acq: u64,
    shst: u32,
    rdy_prev: bool,
    rdy_target: bool,
    rdy_at: Instant,
    fatal_reason: Option<String>,
}

/// Fixed properties of the device, from the configuration.
pub(crate) struct Props {
    pub threaded: bool,
    pub cap: Cap,
    pub dstrd: u8,
    pub mqes: u16,
    pub mdts: u8,
    pub max_io_queues: u16,
    pub ready_delay: Duration,
    pub serial: String,
    pub model: String,
    pub firmware: String,
    pub oncs: crate::spec::Oncs,
    pub vwc: bool,
    pub wzsl: u8,
    /// Doorbell Buffer Config offered (OACS bit 8).
    pub dbbuf: bool,
}

/// The emulated NVMe controller's state, shared by the bus front end, the doorbells and the
/// device thread.
pub(crate) struct Device {
    pub dma: DmaMemory,
    pub props: Props,
    pub namespaces: Vec<Namespace>,
    regs: Mutex<Regs>,
    started: Instant,
    /// Enabled with a valid configuration.
    enabled: AtomicBool,
    /// Nanoseconds after `started` at which RDY becomes 1.
    ready_at_ns: AtomicU64,
    /// Cached: enabled and RDY reached.
    ready: AtomicBool,
    pub fatal: AtomicBool,
    /// CSTS.CFS was set by an [`Action::Fatal`] fault (kept outside `regs`: the fault fires
    /// under an SQ's lock, and a reset takes `regs` before the SQ locks).
    fatal_by_fault: AtomicBool,
    pub removed: AtomicBool,
    /// log2 of the memory page size selected by CC.MPS.
    pub page_shift: AtomicU32,
    pub sqs: Box<[SqSlot]>,
    pub cqs: Box<[CqSlot]>,
    pub faults: FaultTable,
    pub pending: Pending,
    pub aer: Mutex<AsyncEvents>,
    pub features: Mutex<Features>,
    pub errors: Mutex<VecDeque<ErrorLogEntry>>,
    pub error_count: AtomicU64,
    pub dma_faults: AtomicU64,
    pub invalid_doorbells: AtomicU64,
    pub stray_doorbells: AtomicU64,
    pub media_errors: AtomicU64,
    pub idle_sleeps: AtomicU64,
    /// CC.EN 1 to 0 transitions processed.
    pub controller_resets: AtomicU64,
    /// Shutdown notifications (CC.SHN set while clear) processed.
    pub shutdowns: AtomicU64,
    pub stop: AtomicBool,
    /// MSI-X vectors (eventfds) of completion queues created with IEN set.
    pub vectors: Vectors,
}

impl Device {
    pub(crate) fn new(dma: DmaMemory, props: Props, namespaces: Vec<Namespace>) -> Device {
        let n = props.max_io_queues as usize + 1;
        let now = Instant::now();
        Device {
            dma,
            namespaces,
            regs: Mutex::new(Regs {
                cc: Cc(0),
                aqa: 0,
                asq: 0,
                acq: 0,
                shst: shst::NORMAL,
                rdy_prev: false,
                rdy_target: false,
                rdy_at: now,
                fatal_reason: None,
            }),
            started: now,
            enabled: AtomicBool::new(false),
            ready_at_ns: AtomicU64::new(0),
            ready: AtomicBool::new(false),
            fatal: AtomicBool::new(false),
            fatal_by_fault: AtomicBool::new(false),
            removed: AtomicBool::new(false),
            page_shift: AtomicU32::new(12),
            sqs: (0..n).map(|_| SqSlot::new()).collect(),
            cqs: (0..n).map(|_| CqSlot::new()).collect(),
            faults: FaultTable::new(),
            pending: Pending::new(),
            aer: Mutex::new(AsyncEvents::default()),
            features: Mutex::new(Features::defaults(props.max_io_queues)),
            errors: Mutex::new(VecDeque::with_capacity(ERROR_LOG_ENTRIES)),
            error_count: AtomicU64::new(0),
            dma_faults: AtomicU64::new(0),
            invalid_doorbells: AtomicU64::new(0),
            stray_doorbells: AtomicU64::new(0),
            media_errors: AtomicU64::new(0),
            idle_sleeps: AtomicU64::new(0),
            controller_resets: AtomicU64::new(0),
            shutdowns: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            vectors: Vectors::new(n),
            props,
        }
    }

    fn now_ns(&self) -> u64 {
        self.started.elapsed().as_nanos() as u64
    }

    /// Memory page size selected at enable.
    #[inline]
    pub(crate) fn page_size(&self) -> usize {
        1 << self.page_shift.load(Ordering::Relaxed)
    }

    /// Largest data transfer in bytes (MDTS, in units of CAP.MPSMIN = 4 KiB), if limited.
    pub(crate) fn max_transfer(&self) -> Option<u64> {
        (self.props.mdts != 0).then(|| (PAGE_SIZE as u64) << self.props.mdts)
    }

    /// True while commands may be processed: enabled, RDY reached, not fatal, not removed.
    #[inline]
    pub(crate) fn running(&self) -> bool {
        if self.ready.load(Ordering::Acquire) {
            return !self.fatal.load(Ordering::Relaxed) && !self.removed.load(Ordering::Relaxed);
        }
        if self.enabled.load(Ordering::Acquire)
            && self.now_ns() >= self.ready_at_ns.load(Ordering::Acquire)
            && !self.fatal.load(Ordering::Relaxed)
            && !self.removed.load(Ordering::Relaxed)
        {
            self.ready.store(true, Ordering::Release);
            return true;
        }
        false
    }

    // ---------------------------------------------------------------- registers

    pub(crate) fn read32(&self, off: u32) -> u32 {
        if self.removed.load(Ordering::Acquire) {
            return u32::MAX;
        }
        let r = lock(&self.regs);
        match off {
            offset::CAP => self.props.cap.0 as u32,
            0x04 => (self.props.cap.0 >> 32) as u32,
            offset::VS => Vs::V1_4.0,
            offset::CC => r.cc.0,
            offset::CSTS => {
                let rdy = if Instant::now() >= r.rdy_at {
                    r.rdy_target
                } else {
                    r.rdy_prev
                };
                Csts::build(rdy, self.fatal.load(Ordering::Acquire), r.shst).0
            }
            offset::AQA => r.aqa,
            offset::ASQ => r.asq as u32,
            0x2c => (r.asq >> 32) as u32,
            offset::ACQ => r.acq as u32,
            0x34 => (r.acq >> 32) as u32,
            _ => 0,
        }
    }

    pub(crate) fn write32(&self, off: u32, v: u32) {
        if self.removed.load(Ordering::Acquire) {
            return;
        }
        if off >= offset::DOORBELLS {
            self.ring_doorbell(off, v);
            return;
        }
        let mut r = lock(&self.regs);
        let en = r.cc.en();
        match off {
            offset::CC => self.write_cc(&mut r, Cc(v)),
            // The admin queue registers are read-only while the controller is enabled.
            offset::AQA if !en => r.aqa = v & 0x0fff_0fff,
            offset::ASQ if !en => r.asq = (r.asq & !0xffff_ffff) | v as u64,
            0x2c if !en => r.asq = (r.asq & 0xffff_ffff) | (v as u64) << 32,
            offset::ACQ if !en => r.acq = (r.acq & !0xffff_ffff) | v as u64,
            0x34 if !en => r.acq = (r.acq & 0xffff_ffff) | (v as u64) << 32,
            _ => {}
        }
    }

    fn set_rdy(&self, r: &mut Regs, target: bool) {
        let now = Instant::now();
        r.rdy_prev = if now >= r.rdy_at {
            r.rdy_target
        } else {
            r.rdy_prev
        };
        r.rdy_target = target;
        r.rdy_at = now + self.props.ready_delay;
    }

    fn write_cc(&self, r: &mut Regs, new: Cc) {
        let old = r.cc;
        r.cc = new;
        if new.shn() != shn::NONE && old.shn() == shn::NONE {
            self.shutdowns.fetch_add(1, Ordering::Release);
        }
        r.shst = if new.shn() != shn::NONE {
            shst::COMPLETE
        } else {
            shst::NORMAL
        };
        match (old.en(), new.en()) {
            (false, true) => self.enable(r, new),
            (true, false) => self.reset(r),
            _ => {}
        }
    }

    fn enable(&self, r: &mut Regs, cc: Cc) {
        match self.check_enable(r, cc) {
            Ok((sq, cq)) => {
                self.page_shift.store(12 + cc.mps(), Ordering::Relaxed);
                let asqs = r.aqa & 0xfff;
                let acqs = (r.aqa >> 16) & 0xfff;
                {
                    let slot = &self.cqs[0];
                    *lock(&slot.state) = Some(Cq::new(cq, acqs + 1));
                    slot.doorbell.store(0, Ordering::Relaxed);
                    slot.size.store(acqs + 1, Ordering::Release);
                }
                {
                    let slot = &self.sqs[0];
                    *lock(&slot.state) = Some(Sq::new(sq, asqs + 1, 0, 2));
                    slot.doorbell.store(0, Ordering::Relaxed);
                    slot.head.store(0, Ordering::Relaxed);
                    slot.size.store(asqs + 1, Ordering::Release);
                }
                self.set_rdy(r, true);
                let delay = self.props.ready_delay.as_nanos() as u64;
                self.ready_at_ns
                    .store(self.now_ns() + delay, Ordering::Release);
                self.enabled.store(true, Ordering::Release);
            }
            Err(reason) => {
                // A real controller reports an unusable configuration with CSTS.CFS.
                self.fatal.store(true, Ordering::Release);
                r.fatal_reason = Some(reason);
                self.set_rdy(r, false);
            }
        }
    }

    fn check_enable(
        &self,
        r: &Regs,
        cc: Cc,
    ) -> Result<(core::ptr::NonNull<u8>, core::ptr::NonNull<u8>), String> {
        let cap = self.props.cap;
        if cc.iosqes() != crate::spec::SQES {
            return Err(format!("CC.IOSQES is {}, not 6", cc.iosqes()));
        }
        if cc.iocqes() != crate::spec::CQES {
            return Err(format!("CC.IOCQES is {}, not 4", cc.iocqes()));
        }
        if cc.mps() < cap.mpsmin() as u32 || cc.mps() > cap.mpsmax() as u32 {
            return Err(format!(
                "CC.MPS {} is outside CAP.MPSMIN..=MPSMAX",
                cc.mps()
            ));
        }
        if cc.css() != 0 {
            return Err(format!("CC.CSS {} is not the NVM command set", cc.css()));
        }
        if cc.ams() != 0 {
            return Err(format!("CC.AMS {} is not round robin", cc.ams()));
        }
        let asqs = r.aqa & 0xfff;
        let acqs = (r.aqa >> 16) & 0xfff;
        if asqs == 0 || acqs == 0 {
            return Err(format!("AQA {:#x} has an admin queue of one entry", r.aqa));
        }
        let mask = ((PAGE_SIZE as u64) << cc.mps()) - 1;
        if r.asq & mask != 0 || r.acq & mask != 0 {
            return Err(format!(
                "ASQ {:#x} or ACQ {:#x} is not page aligned",
                r.asq, r.acq
            ));
        }
        let sq = self.dma.ptr_of(Iova(r.asq), (asqs as usize + 1) * 64);
        let cq = self.dma.ptr_of(Iova(r.acq), (acqs as usize + 1) * 16);
        match (sq, cq) {
            (Some(sq), Some(cq)) => Ok((sq, cq)),
            _ => {
                self.dma_faults.fetch_add(1, Ordering::Relaxed);
                Err(format!(
                    "ASQ {:#x} or ACQ {:#x} is outside DMA memory",
                    r.asq, r.acq
                ))
            }
        }
    }

    /// Controller reset (CC.EN 1 to 0): every queue deleted, held commands dropped, features
    /// back to their defaults, CSTS.CFS cleared, RDY to 0.
    fn reset(&self, r: &mut Regs) {
        self.enabled.store(false, Ordering::Release);
        self.ready.store(false, Ordering::Release);
        for slot in self.sqs.iter() {
            let mut g = lock(&slot.state);
            *g = None;
            slot.size.store(0, Ordering::Release);
            slot.doorbell.store(0, Ordering::Relaxed);
            slot.head.store(0, Ordering::Relaxed);
            slot.shadow.clear();
        }
        self.pending.take_where(|_| true, |_| {});
        for slot in self.cqs.iter() {
            let mut g = lock(&slot.state);
            *g = None;
            slot.size.store(0, Ordering::Release);
            slot.doorbell.store(0, Ordering::Relaxed);
            slot.backlog.store(false, Ordering::Relaxed);
            slot.shadow.clear();
        }
        *lock(&self.aer) = AsyncEvents::default();
        *lock(&self.features) = Features::defaults(self.props.max_io_queues);
        self.fatal.store(false, Ordering::Release);
        self.fatal_by_fault.store(false, Ordering::Release);
        r.fatal_reason = None;
        self.set_rdy(r, false);
        self.controller_resets.fetch_add(1, Ordering::Release);
    }

    /// Why CSTS.CFS was set by an enable, if it was.
    pub(crate) fn fatal_reason(&self) -> Option<String> {
        let reason = lock(&self.regs).fatal_reason.clone();
        reason.or_else(|| {
            self.fatal_by_fault
                .load(Ordering::Acquire)
                .then(|| "an injected Fatal fault fired".to_string())
        })
    }

    pub(crate) fn set_fatal(&self, reason: &str) {
        let mut r = lock(&self.regs);
        self.fatal.store(true, Ordering::Release);
        r.fatal_reason = Some(reason.to_string());
    }

    // ---------------------------------------------------------------- doorbells

    fn ring_doorbell(&self, off: u32, v: u32) {
        if self.removed.load(Ordering::Relaxed) {
            return;
        }
        let rel = off - offset::DOORBELLS;
        let stride = 4u32 << self.props.dstrd;
        let idx = rel / stride;
        let qid = idx / 2;
        if rel % stride != 0 || qid > self.props.max_io_queues as u32 {
            self.stray_doorbells.fetch_add(1, Ordering::Relaxed);
            self.bad_doorbell(AEI_INVALID_DOORBELL_REGISTER);
            return;
        }
        let qid = qid as u16;
        if idx % 2 == 0 {
            let slot = &self.sqs[qid as usize];
            slot.doorbells.fetch_add(1, Ordering::Relaxed);
            if !self.doorbell_fits(slot.size.load(Ordering::Acquire), v) {
                return;
            }
            slot.doorbell.store(v, Ordering::Release);
            if !self.props.threaded {
                if !self.pending.is_empty() {
                    self.tick_pending(false);
                }
                self.process_sq(qid);
            }
        } else {
            let slot = &self.cqs[qid as usize];
            slot.doorbells.fetch_add(1, Ordering::Relaxed);
            if !self.doorbell_fits(slot.size.load(Ordering::Acquire), v) {
                return;
            }
            slot.doorbell.store(v, Ordering::Release);
            if !self.props.threaded {
                if slot.backlog.load(Ordering::Acquire) {
                    slot.flush();
                }
                if !self.pending.is_empty() {
                    self.tick_pending(false);
                }
            }
        }
    }

    /// True if `v` is a valid doorbell value for a queue of `size` entries (0: no such queue);
    /// otherwise the write is reported as invalid ([`bad_doorbell`](Self::bad_doorbell)).
    fn doorbell_fits(&self, size: u32, v: u32) -> bool {
        if size == 0 {
            self.bad_doorbell(AEI_INVALID_DOORBELL_REGISTER);
            false
        } else if v >= size {
            self.bad_doorbell(AEI_INVALID_DOORBELL_VALUE);
            false
        } else {
            true
        }
    }

    /// An invalid doorbell write: ignored, counted, logged in the error log, and reported with
    /// an asynchronous event (Error status, log page Error Information) as NVMe 1.4 section 5.2
    /// describes.
    fn bad_doorbell(&self, info: u8) {
        self.invalid_doorbells.fetch_add(1, Ordering::Relaxed);
        self.log_error(ErrorLogEntry {
            sqid: 0xffff,
            cid: 0xffff,
            ..Default::default()
        });
        self.async_event((info as u32) << 8 | (lid::ERROR as u32) << 16);
    }

    /// Reports an asynchronous event through an outstanding request, or keeps it until one
    /// arrives.
    pub(crate) fn async_event(&self, dw0: u32) {
        let cid = {
            let mut a = lock(&self.aer);
            if a.cids.is_empty() {
                if a.events.len() < 16 {
                    a.events.push_back(dw0);
                }
                return;
            }
            a.cids.remove(0)
        };
        self.cqs[0].post(Completion {
            dw0,
            sq_head: self.sqs[0].head.load(Ordering::Relaxed) as u16,
            sqid: 0,
            cid,
            status: Status::SUCCESS,
        });
    }

    // ---------------------------------------------------------------- processing

    /// Fetches and executes the commands submitted on `qid`. Returns true if any was fetched.
    pub(crate) fn process_sq(&self, qid: u16) -> bool {
        let slot = &self.sqs[qid as usize];
        let mut guard = lock(&slot.state);
        let Some(sq) = guard.as_mut() else {
            return false;
        };
        let mut did = false;
        while self.running() {
            let tail = slot.tail(sq.head);
            if sq.head == tail {
                break;
            }
            let sqe = sq.fetch();
            slot.head.store(sq.head, Ordering::Relaxed);
            did = true;
            self.execute(qid, sq, sqe);
        }
        did
    }

    fn execute(&self, qid: u16, sq: &mut Sq, sqe: Sqe) {
        let slot = &self.sqs[qid as usize];
        slot.commands[sqe.opcode() as usize].fetch_add(1, Ordering::Relaxed);
        if !self.pending.is_empty() {
            self.tick_pending(true);
        }
        let mut delay = None;
        let mut garbage = None;
        if let Some(action) = self.faults.check(qid, &sqe) {
            match action {
                Action::Status(s) => {
                    self.finish(qid, sq.cqid, sq.head, &sqe, s, 0);
                    return;
                }
                Action::NeverComplete => {
                    self.pending.add(Held {
                        cqid: sq.cqid,
                        completion: Completion {
                            dw0: 0,
                            sq_head: 0,
                            sqid: qid,
                            cid: sqe.cid(),
                            status: Status::SUCCESS,
                        },
                        release: Release::Never,
                    });
                    return;
                }
                Action::Fatal => {
                    // Not `set_fatal`: that takes `regs`, which a reset holds while it takes
                    // the SQ lock held here.
                    self.fatal_by_fault.store(true, Ordering::Release);
                    self.fatal.store(true, Ordering::Release);
                    return;
                }
                Action::SurpriseRemove => {
                    self.removed.store(true, Ordering::Release);
                    return;
                }
                Action::Garbage(g) => garbage = Some(g),
                Action::Delay(d) => delay = Some(Release::At(Instant::now() + d)),
                Action::DelayCommands(k) => delay = Some(Release::After(k)),
            }
        }
        let outcome = if qid == 0 {
            self.admin(&sqe, &mut sq.segs)
        } else {
            self.io(qid, &sqe, &mut sq.segs)
        };
        let Outcome::Done(status, dw0) = outcome else {
            return;
        };
        if let Some(g) = garbage {
            let (sqid, cid) = g.entry(qid, sqe.cid());
            if !self.removed.load(Ordering::Acquire) {
                self.cqs[sq.cqid as usize].post(Completion {
                    dw0: super::faults::GARBAGE_DW0,
                    sq_head: sq.head as u16,
                    sqid,
                    cid,
                    status: Status::SUCCESS,
                });
            }
        }
        match delay {
            None => self.finish(qid, sq.cqid, sq.head, &sqe, status, dw0),
            Some(release) => {
                if !status.is_success() {
                    self.record_error(qid, &sqe, status);
                }
                self.pending.add(Held {
                    cqid: sq.cqid,
                    completion: Completion {
                        dw0,
                        sq_head: 0,
                        sqid: qid,
                        cid: sqe.cid(),
                        status,
                    },
                    release,
                });
            }
        }
    }

    /// Records an error (if any) and posts the completion of `sqe`.
    fn finish(&self, qid: u16, cqid: u16, head: u32, sqe: &Sqe, status: Status, dw0: u32) {
        if !status.is_success() {
            self.record_error(qid, sqe, status);
        }
        if self.removed.load(Ordering::Acquire) {
            return;
        }
        self.cqs[cqid as usize].post(Completion {
            dw0,
            sq_head: head as u16,
            sqid: qid,
            cid: sqe.cid(),
            status,
        });
    }

    /// Posts a held completion now, with the current SQ head.
    pub(crate) fn post_held(&self, h: Held) {
        if self.removed.load(Ordering::Acquire) {
            return;
        }
        let mut c = h.completion;
        c.sq_head = self.sqs[c.sqid as usize].head.load(Ordering::Relaxed) as u16;
        self.cqs[h.cqid as usize].post(c);
    }

    /// Releases held completions that are due; `command` counts one fetched command.
    pub(crate) fn tick_pending(&self, command: bool) {
        let mut now = None;
        self.pending.take_where(
            |h| match &mut h.release {
                Release::Never => false,
                Release::After(k) => {
                    if command {
                        *k = k.saturating_sub(1);
                    }
                    *k == 0
                }
                Release::At(t) => *now.get_or_insert_with(Instant::now) >= *t,
            },
            |h| self.post_held(h),
        );
    }

    /// Releases every delayed (not never-completing) completion.
    pub(crate) fn release_delayed(&self) {
        self.pending.take_where(
            |h| !matches!(h.release, Release::Never),
            |h| self.post_held(h),
        );
    }

    fn record_error(&self, qid: u16, sqe: &Sqe, status: Status) {
        if status.sct == Sct::Media {
            self.media_errors.fetch_add(1, Ordering::Relaxed);
        }
        let op = sqe.opcode();
        let lba = if qid != 0 && matches!(op, io::READ | io::WRITE | io::WRITE_ZEROES) {
            sqe.slba()
        } else {
            0
        };
        self.log_error(ErrorLogEntry {
            sqid: qid,
            cid: sqe.cid(),
            status: status.to_field(),
            lba,
            nsid: sqe.nsid,
            ..Default::default()
        });
    }

    fn log_error(&self, mut e: ErrorLogEntry) {
        let mut log = lock(&self.errors);
        e.error_count = self.error_count.fetch_add(1, Ordering::Relaxed) + 1;
        if log.len() == ERROR_LOG_ENTRIES {
            log.pop_back();
        }
        log.push_front(e);
    }

    /// Counts a DMA fault and returns Data Transfer Error.
    pub(crate) fn dma_fault(&self) -> Status {
        self.dma_faults.fetch_add(1, Ordering::Relaxed);
        Status::new(
            Sct::Generic,
            crate::spec::status::generic::DATA_TRANSFER_ERROR,
        )
    }

    // ---------------------------------------------------------------- device thread

    /// The device thread of threaded mode: polls the doorbells until `stop` is set.
    pub(crate) fn run(&self) {
        let mut idle = 0u32;
        while !self.stop.load(Ordering::Acquire) {
            let mut did = false;
            if !self.removed.load(Ordering::Acquire) {
                if self.running() {
                    for (q, slot) in self.sqs.iter().enumerate() {
                        if slot.has_work() {
                            did |= self.process_sq(q as u16);
                        }
                    }
                }
                for slot in self.cqs.iter() {
                    if slot.backlog.load(Ordering::Acquire) {
                        slot.flush();
                    }
                }
                if !self.pending.is_empty() {
                    self.tick_pending(false);
                }
            }
            if did {
                idle = 0;
                continue;
            }
            idle = idle.saturating_add(1);
            if idle < 64 {
                core::hint::spin_loop();
            } else if idle < 256 {
                std::thread::yield_now();
            } else {
                self.idle_sleeps.fetch_add(1, Ordering::Relaxed);
                let nap = if idle < 4096 { 20 } else { 500 };
                std::thread::sleep(Duration::from_micros(nap));
            }
        }
    }
}

impl DoorbellSink for Device {
    fn ring(&self, offset: u32, value: u32) {
        self.ring_doorbell(offset, value);
    }
}
