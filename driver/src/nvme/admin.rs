//! The admin queue and the admin command API.
//!
//! The admin queue pair lives in DMA memory and is used by one command at a time under the
//! controller's admin `Mutex` (admin commands are not on the I/O path). A command is written,
//! the doorbell rung, and the completion queue polled until the command's completion arrives
//! or [`ControllerOptions::admin_timeout`](crate::ControllerOptions::admin_timeout) passes;
//! CSTS is checked while waiting so a removed or failed controller is reported at once.
//! Completions for other command ids (a command that timed out earlier) are dropped and counted,
//! except those of the Asynchronous Event Requests kept outstanding (command ids from
//! [`AER_CID_BASE`] up, never used by other commands), which become events (module `aer`).
//!
//! Data-in commands (identify, log pages) get a fresh DMA page per command; when a command times
//! out its page is leaked rather than freed, because the device may still write it.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::bus::dma::DmaBuffer;
use crate::nvme::aer::{self, AsyncEvent};
use crate::nvme::controller::{Controller, Shared};
use crate::nvme::error::{Error, Result};
use crate::nvme::ring::Ring;
use crate::spec::identify::{
    ERROR_LOG_ENTRY_LEN, ErrorLogEntry, FIRMWARE_SLOT_LOG_LEN, FirmwareSlotLog, IDENTIFY_LEN,
    SMART_LOG_LEN, parse_ns_list,
};
use crate::spec::regs::{cq_head_doorbell, sq_tail_doorbell};
use crate::spec::sqe::{admin, cns, lid};
use crate::spec::{Aqa, Cqe, IdentifyController, IdentifyNamespace, SmartLog, Sqe};
use crate::types::{Cid, Iova, Nsid, QueueId};

/// The admin submission and completion queues.
pub(crate) struct AdminQueue {
    /// Tail, head, phase and doorbells over `sq` and `cq`.
    ring: Ring,
    sq: DmaBuffer,
    cq: DmaBuffer,
    /// The SQ head the device last reported: the SQ is full when the tail would reach it.
    sq_head: u16,
    next_cid: u16,
    /// Completions dropped because their command id was not the one waited for.
    pub(crate) stale: u64,
    /// Command ids of the Asynchronous Event Requests outstanding.
    aers: Vec<u16>,
    /// Events reported and not yet taken by the application.
    events: VecDeque<AsyncEvent>,
    /// Log pages to read to re-arm the event types reported (Retain Asynchronous Event clear).
    unmask: Vec<u8>,
}

/// Command ids from here up are the Asynchronous Event Requests'; other commands take theirs
/// below, so an outstanding AER's id is never reused.
pub(crate) const AER_CID_BASE: u16 = 0xff00;

/// Feature identifier of the Asynchronous Event Configuration.
const FID_ASYNC_EVENT_CONFIG: u8 = 0x0b;

/// Outcome of an Abort command (CDW0 bit 0).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum AbortOutcome {
    /// The command was aborted (it completes with "Command Abort Requested").
    Aborted,
    /// The controller did not abort the command (it may already have completed).
    NotAborted,
}

fn name_of(opcode: u8) -> &'static str {
    match opcode {
        admin::DELETE_IO_SQ => "Delete I/O Submission Queue",
        admin::CREATE_IO_SQ => "Create I/O Submission Queue",
        admin::GET_LOG_PAGE => "Get Log Page",
        admin::DELETE_IO_CQ => "Delete I/O Completion Queue",
        admin::CREATE_IO_CQ => "Create I/O Completion Queue",
        admin::IDENTIFY => "Identify",
        admin::ABORT => "Abort",
        admin::SET_FEATURES => "Set Features",
        admin::GET_FEATURES => "Get Features",
        admin::ASYNC_EVENT_REQUEST => "Asynchronous Event Request",
        _ => "admin command",
    }
}

impl AdminQueue {
    pub(crate) fn new(sh: &Shared, entries: u16, dstrd: u8) -> Result<AdminQueue> {
        let bus = &*sh.bus;
        let sq = sh.alloc(entries as usize * 64, "the admin submission queue")?;
        let cq = sh.alloc(entries as usize * 16, "the admin completion queue")?;
        // SAFETY: the buffers hold `entries` entries each, are page aligned, move with the
        // queue (a `DmaBuffer` does not move its memory) and live as long as the ring; the
        // controller is given them empty (ASQ/ACQ at bring-up), and only the ring writes the SQ
        // and moves the CQ head.
        let ring = unsafe {
            Ring::new(
                sq.as_ptr(),
                cq.as_ptr(),
                entries,
                bus.doorbell(sq_tail_doorbell(0, dstrd)),
                bus.doorbell(cq_head_doorbell(0, dstrd)),
            )
        };
        Ok(AdminQueue {
            ring,
            sq,
            cq,
            sq_head: 0,
            next_cid: 0,
            stale: 0,
            aers: Vec::new(),
            events: VecDeque::new(),
            unmask: Vec::new(),
        })
    }

    /// ASQ, ACQ and AQA values for this queue.
    pub(crate) fn registers(&self) -> (Iova, Iova, Aqa) {
        (
            self.sq.iova(),
            self.cq.iova(),
            Aqa::new(self.ring.entries(), self.ring.entries()),
        )
    }

    /// Submits `sqe` and waits for its completion. Returns the CQE whatever its status.
    pub(crate) fn execute(&mut self, sh: &Shared, mut sqe: Sqe, timeout: Duration) -> Result<Cqe> {
        let name = name_of(sqe.opcode());
        if self.ring.next_tail() == self.sq_head {
            return Err(Error::AdminQueueFull {
                location: sh.location.clone(),
            });
        }
        let cid = self.next_cid;
        self.next_cid = (self.next_cid + 1) % AER_CID_BASE;
        sqe.set_cid(cid);
        // SAFETY: the SQ is not full (the tail does not reach the SQ head the device reported),
        // so the device is not reading the entry at the tail.
        unsafe { self.ring.push_sqe(sqe) };
        self.ring.ring_sq();
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            if let Some(cqe) = self.next_cqe() {
                if cqe.cid == cid {
                    return Ok(cqe);
                }
                self.other_completion(sh, &cqe);
                continue;
            }
            spins += 1;
            if spins % 256 == 0 {
                sh.check_csts()?;
                if start.elapsed() > timeout {
                    return Err(Error::AdminTimeout {
                        location: sh.location.clone(),
                        name,
                        cid: Cid(cid),
                        timeout,
                    });
                }
            }
            if spins > 4096 {
                std::thread::sleep(Duration::from_micros(50));
            } else {
                std::thread::yield_now();
            }
        }
    }

    /// Takes the next completion entry, if the device posted one (and records the SQ head).
    fn next_cqe(&mut self) -> Option<Cqe> {
        let mut at = self.ring.cq_cursor();
        let e = at.peek()?;
        let (dw0, dw1, dw2, dw3) = (e.dw0(), e.dw1(), e.dw2(), e.dw3);
        at.advance();
        self.ring.consumed(at);
        let cqe = Cqe {
            dw0,
            dw1,
            sq_head: dw2 as u16,
            sq_id: (dw2 >> 16) as u16,
            cid: dw3 as u16,
            status: (dw3 >> 16) as u16,
        };
        if cqe.sq_head < self.ring.entries() {
            self.sq_head = cqe.sq_head;
        }
        Some(cqe)
    }

    /// A completion nobody waits for: an asynchronous event (queued, and its request submitted
    /// again), or a command that timed out earlier (dropped, counted).
    fn other_completion(&mut self, sh: &Shared, cqe: &Cqe) {
        let Some(i) = self.aers.iter().position(|&c| c == cqe.cid) else {
            self.stale += 1;
            return;
        };
        self.aers.swap_remove(i);
        let status = cqe.status();
        if !status.is_success() {
            // Aborted by a reset, or the controller's limit: not submitted again.
            log::warn!(
                "{}: Asynchronous Event Request {} completed with {status}; not resubmitted",
                sh.location,
                cqe.cid
            );
            return;
        }
        let ev = AsyncEvent::from_dw0(cqe.dw0);
        if ev.is_warning() {
            log::warn!("{}: asynchronous event: {ev}", sh.location);
        } else {
            log::info!("{}: asynchronous event: {ev}", sh.location);
        }
        if self.events.len() >= aer::QUEUE_LIMIT {
            if let Some(old) = self.events.pop_front() {
                log::warn!(
                    "{}: asynchronous event dropped (nobody took the last {}): {old}",
                    sh.location,
                    aer::QUEUE_LIMIT
                );
            }
        }
        self.events.push_back(ev);
        if !self.unmask.contains(&ev.log_page) {
            self.unmask.push(ev.log_page);
        }
        if let Err(e) = self.submit_aer(sh, cqe.cid) {
            log::warn!(
                "{}: Asynchronous Event Request not resubmitted: {e}",
                sh.location
            );
        }
    }

    /// Submits an Asynchronous Event Request with command id `cid` without waiting for it.
    fn submit_aer(&mut self, sh: &Shared, cid: u16) -> Result<()> {
        if self.ring.next_tail() == self.sq_head {
            return Err(Error::AdminQueueFull {
                location: sh.location.clone(),
            });
        }
        let mut sqe = Sqe::new(admin::ASYNC_EVENT_REQUEST);
        sqe.set_cid(cid);
        // SAFETY: the SQ is not full (the tail does not reach the SQ head the device reported),
        // so the device is not reading the entry at the tail.
        unsafe { self.ring.push_sqe(sqe) };
        self.ring.ring_sq();
        self.aers.push(cid);
        Ok(())
    }

    /// Bring-up's last step: enables the SMART / health warnings (Set Features / Asynchronous
    /// Event Configuration) and submits `aerl + 1` (at most [`aer::MAX_OUTSTANDING`], and at
    /// most half the admin queue less one) Asynchronous Event Requests. A controller that
    /// refuses either still works: logged only.
    pub(crate) fn start_async_events(&mut self, sh: &Shared, aerl: u8) {
        if let Err(e) = self.execute_checked(
            sh,
            "Set Features (Asynchronous Event Configuration)",
            Sqe::set_features(FID_ASYNC_EVENT_CONFIG, aer::CONFIG_SMART_WARNINGS),
        ) {
            log::warn!("{}: SMART / health events not enabled: {e}", sh.location);
        }
        // A small admin queue keeps room for the commands: the SQ head the device reports in
        // each completion is all the driver knows of it, and AERs complete rarely.
        let room = self.ring.entries().saturating_sub(2) / 2;
        let n = (aerl as u16 + 1).min(aer::MAX_OUTSTANDING).min(room);
        for i in 0..n {
            if let Err(e) = self.submit_aer(sh, AER_CID_BASE + i) {
                log::warn!(
                    "{}: Asynchronous Event Request {i} not submitted: {e}",
                    sh.location
                );
                break;
            }
        }
    }

    /// Takes the completions the device posted (asynchronous events among them), reads the
    /// log pages of the events reported (which re-arms their types), and hands the events
    /// over, oldest first.
    pub(crate) fn take_async_events(&mut self, sh: &Shared) -> Vec<AsyncEvent> {
        while let Some(cqe) = self.next_cqe() {
            self.other_completion(sh, &cqe);
        }
        for lid in std::mem::take(&mut self.unmask) {
            // The page's first bytes are enough: reading any of it with RAE clear re-arms.
            let sqe = Sqe::get_log_page(lid, 0xffff_ffff, 64, 0, 0);
            if let Err(e) = self.read_data(sh, "Get Log Page", sqe, 64) {
                log::warn!(
                    "{}: log page {lid:#04x} of an asynchronous event not read (its events stay masked): {e}",
                    sh.location
                );
            }
        }
        self.events.drain(..).collect()
    }

    /// Asynchronous Event Requests outstanding.
    pub(crate) fn aers_outstanding(&self) -> usize {
        self.aers.len()
    }

    /// `execute` with the controller's timeout; an error status becomes [`Error::AdminStatus`].
    /// Returns CDW0.
    pub(crate) fn execute_checked(
        &mut self,
        sh: &Shared,
        name: &'static str,
        sqe: Sqe,
    ) -> Result<u32> {
        let cqe = self.execute(sh, sqe, sh.opts.admin_timeout)?;
        let status = cqe.status();
        if !status.is_success() {
            return Err(Error::AdminStatus {
                location: sh.location.clone(),
                name,
                cid: Cid(cqe.cid),
                status,
            });
        }
        Ok(cqe.dw0)
    }

    /// A data-in command into a fresh DMA buffer of `len` bytes (at most two pages).
    pub(crate) fn read_data(
        &mut self,
        sh: &Shared,
        name: &'static str,
        mut sqe: Sqe,
        len: usize,
    ) -> Result<DmaBuffer> {
        let buf = sh.alloc(len, "an admin data page")?;
        sqe.prp1 = buf.iova().0;
        if len > crate::nvme::prp::PAGE as usize {
            sqe.prp2 = buf.iova().0 + crate::nvme::prp::PAGE;
        }
        match self.execute_checked(sh, name, sqe) {
            Ok(_) => Ok(buf),
            Err(e) => {
                if matches!(e, Error::AdminTimeout { .. } | Error::DeviceGone { .. }) {
                    // The device may still write the page: never give it back to the allocator.
                    core::mem::forget(buf);
                }
                Err(e)
            }
        }
    }

    pub(crate) fn identify_controller(&mut self, sh: &Shared) -> Result<IdentifyController> {
        let buf = self.read_data(
            sh,
            "Identify Controller",
            Sqe::identify(cns::CONTROLLER, 0, 0),
            IDENTIFY_LEN,
        )?;
        Ok(IdentifyController::from_bytes(page(&buf)))
    }

    pub(crate) fn identify_namespace(
        &mut self,
        sh: &Shared,
        nsid: Nsid,
    ) -> Result<IdentifyNamespace> {
        let buf = self.read_data(
            sh,
            "Identify Namespace",
            Sqe::identify(cns::NAMESPACE, nsid.0, 0),
            IDENTIFY_LEN,
        )?;
        Ok(IdentifyNamespace::from_bytes(page(&buf)))
    }

    /// The active namespace list, following it past 1024 entries.
    pub(crate) fn active_namespaces(&mut self, sh: &Shared) -> Result<Vec<u32>> {
        let mut all = Vec::new();
        let mut after = 0u32;
        loop {
            let buf = self.read_data(
                sh,
                "Identify Active Namespace ID List",
                Sqe::identify(cns::ACTIVE_NAMESPACES, after, 0),
                IDENTIFY_LEN,
            )?;
            let list = parse_ns_list(page(&buf));
            let full = list.len() == IDENTIFY_LEN / 4;
            // Only ids greater than `after`, increasing: a device that repeats itself cannot
            // make this loop forever.
            let mut last = after;
            for n in list {
                if n > last && n < 0xffff_fffe {
                    all.push(n);
                    last = n;
                }
            }
            if !full || last == after {
                return Ok(all);
            }
            after = last;
        }
    }
}

fn page(buf: &DmaBuffer) -> &[u8; IDENTIFY_LEN] {
    buf.as_slice()[..IDENTIFY_LEN]
        .try_into()
        .expect("admin data page is 4 KiB")
}

/// The admin command API.
impl Controller {
    fn with_admin<R>(&self, f: impl FnOnce(&mut AdminQueue, &Shared) -> Result<R>) -> Result<R> {
        let sh = &*self.shared;
        let mut guard = sh.lock_admin();
        if let Some(e) = sh.not_ready() {
            return Err(e);
        }
        match guard.as_mut() {
            Some(q) => f(q, sh),
            None => Err(Error::NotReady {
                location: sh.location.clone(),
                state: "not initialised",
                hint: "call Controller::reset",
            }),
        }
    }

    /// Identify Controller, read now.
    pub fn identify_controller(&self) -> Result<IdentifyController> {
        self.with_admin(|q, sh| q.identify_controller(sh))
    }
    /// WZSL (Write Zeroes Size Limit, a power of two in units of the minimum memory page
    /// size; 0 = no limit) from the NVM command set's Identify Controller (CNS 06h), read now.
    /// `None` when the controller does not offer that structure (before NVMe 1.4, or it
    /// refused the command): then no limit is known beyond Write Zeroes' own 65536 blocks.
    pub fn wzsl(&self) -> Option<u8> {
        if self.version().0 < crate::spec::Vs::V1_4.0 {
            return None;
        }
        let mut sqe = Sqe::identify(cns::CONTROLLER_CSI, 0, 0);
        sqe.cdw11 = 0; // CSI 0: the NVM command set
        let r = self.with_admin(|q, sh| {
            q.read_data(
                sh,
                "Identify Controller (NVM command set)",
                sqe,
                IDENTIFY_LEN,
            )
            .map(|buf| page(&buf)[crate::spec::sqe::NVM_ID_WZSL])
        });
        match r {
            Ok(l) => Some(l),
            Err(e) => {
                log::debug!(
                    "{}: no NVM Identify Controller (CNS 06h): {e}",
                    self.location()
                );
                None
            }
        }
    }
    /// Identify Namespace for `nsid`, read now.
    pub fn identify_namespace(&self, nsid: Nsid) -> Result<IdentifyNamespace> {
        self.with_admin(|q, sh| q.identify_namespace(sh, nsid))
    }
    /// The active namespace ids, read now.
    pub fn active_namespace_ids(&self) -> Result<Vec<Nsid>> {
        self.with_admin(|q, sh| Ok(q.active_namespaces(sh)?.into_iter().map(Nsid).collect()))
    }
    /// Get Features (current value) of feature `fid` with CDW11 `cdw11`; returns CDW0.
    pub fn get_features(&self, fid: u8, cdw11: u32) -> Result<u32> {
        let mut sqe = Sqe::get_features(fid);
        sqe.cdw11 = cdw11;
        self.with_admin(|q, sh| q.execute_checked(sh, "Get Features", sqe))
    }
    /// Set Features of feature `fid` with CDW11 `cdw11`; returns CDW0.
    pub fn set_features(&self, fid: u8, cdw11: u32) -> Result<u32> {
        self.with_admin(|q, sh| {
            q.execute_checked(sh, "Set Features", Sqe::set_features(fid, cdw11))
        })
    }
    /// Get Log Page `lid` for `nsid` (`0xffff_ffff` for the controller), `len` bytes (a multiple
    /// of 4, at most 8 KiB).
    pub fn get_log_page(&self, lid: u8, nsid: u32, len: usize) -> Result<Vec<u8>> {
        if len == 0 || len % 4 != 0 || len > 2 * crate::nvme::prp::PAGE as usize {
            return Err(Error::InvalidOption {
                name: "log page length",
                reason: format!("{len} is not a multiple of 4 in 4..=8192"),
            });
        }
        self.with_admin(|q, sh| {
            let sqe = Sqe::get_log_page(lid, nsid, len as u32, 0, 0);
            let buf = q.read_data(sh, "Get Log Page", sqe, len)?;
            Ok(buf.as_slice()[..len].to_vec())
        })
    }
    /// The Error Information log: the `entries` most recent entries (at most 128).
    pub fn error_log(&self, entries: usize) -> Result<Vec<ErrorLogEntry>> {
        let n = entries.clamp(1, 128);
        let b = self.get_log_page(lid::ERROR, 0xffff_ffff, n * ERROR_LOG_ENTRY_LEN)?;
        Ok(b.chunks_exact(ERROR_LOG_ENTRY_LEN)
            .map(ErrorLogEntry::from_bytes)
            .collect())
    }
    /// The asynchronous events the controller reported since the last call (errors, SMART /
    /// health warnings, notices), oldest first; each is also logged when it arrives. Reading
    /// them reads the log pages they name, which re-arms their types (module `aer`). The admin
    /// queue is polled by admin commands and by this call only: call it from time to time.
    pub fn async_events(&self) -> Result<Vec<AsyncEvent>> {
        self.with_admin(|q, sh| Ok(q.take_async_events(sh)))
    }
    /// Asynchronous Event Requests outstanding on the controller (re-armed after each event).
    pub fn async_event_requests(&self) -> usize {
        self.shared
            .lock_admin()
            .as_ref()
            .map_or(0, AdminQueue::aers_outstanding)
    }
    /// The SMART / Health Information log of the controller.
    pub fn smart_log(&self) -> Result<SmartLog> {
        let b = self.get_log_page(lid::SMART, 0xffff_ffff, SMART_LOG_LEN)?;
        Ok(SmartLog::from_bytes(b[..].try_into().expect("512 bytes")))
    }
    /// The Firmware Slot Information log.
    pub fn firmware_slot_log(&self) -> Result<FirmwareSlotLog> {
        let b = self.get_log_page(lid::FIRMWARE_SLOT, 0xffff_ffff, FIRMWARE_SLOT_LOG_LEN)?;
        Ok(FirmwareSlotLog::from_bytes(
            b[..].try_into().expect("512 bytes"),
        ))
    }
    /// Abort command `cid` on submission queue `qid`.
    pub fn abort(&self, qid: QueueId, cid: Cid) -> Result<AbortOutcome> {
        self.with_admin(|q, sh| abort_with(q, sh, qid, cid))
    }
}

pub(crate) fn abort_with(
    q: &mut AdminQueue,
    sh: &Shared,
    qid: QueueId,
    cid: Cid,
) -> Result<AbortOutcome> {
    sh.aborts_sent.fetch_add(1, Ordering::AcqRel);
    let dw0 = q.execute_checked(sh, "Abort", Sqe::abort(qid.0, cid.0))?;
    Ok(if dw0 & 1 == 0 {
        AbortOutcome::Aborted
    } else {
        AbortOutcome::NotAborted
    })
}
