//! Admin commands.

use core::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::device::{AER_LIMIT, Device, ERROR_LOG_ENTRIES, Outcome, generic, specific};
use super::faults::Release;
use super::prp::{self, Cursor, PrpError, Seg};
use super::queue::{Cq, Sq, lock};
use crate::bus::interrupt::EventFd;
use crate::spec::identify::{
    ERROR_LOG_ENTRY_LEN, FirmwareSlotLog, IDENTIFY_LEN, IdentifyController, IdentifyNamespace,
    LbaFormat, build_ns_list,
};
use crate::spec::sqe::{NVM_ID_WZSL, admin, cns, fid, lid};
use crate::spec::status::{command_specific as cs, generic as g};
use crate::spec::{Oacs, SmartLog, Sqe, Status, Vs};
use crate::types::Iova;

const fn ok(dw0: u32) -> Outcome {
    Outcome::Done(Status::SUCCESS, dw0)
}
const fn fail(s: Status) -> Outcome {
    Outcome::Done(s, 0)
}

/// PCI vendor and subsystem vendor reported in Identify Controller.
pub(crate) const VENDOR: u16 = 0x1b36;
pub(crate) const SUBSYSTEM_VENDOR: u16 = 0x1af4;

impl Device {
    pub(crate) fn admin(&self, sqe: &Sqe, segs: &mut Vec<Seg>) -> Outcome {
        if sqe.psdt() != 0 || sqe.fuse() != 0 {
            return fail(generic(g::INVALID_FIELD));
        }
        match sqe.opcode() {
            admin::IDENTIFY => self.identify(sqe, segs),
            admin::CREATE_IO_CQ => self.create_cq(sqe),
            admin::CREATE_IO_SQ => self.create_sq(sqe),
            admin::DELETE_IO_SQ => self.delete_sq(sqe),
            admin::DELETE_IO_CQ => self.delete_cq(sqe),
            admin::SET_FEATURES => self.set_features(sqe),
            admin::GET_FEATURES => self.get_features(sqe),
            admin::GET_LOG_PAGE => self.get_log_page(sqe, segs),
            admin::ABORT => self.abort(sqe),
            admin::ASYNC_EVENT_REQUEST => self.async_event_request(sqe),
            admin::KEEP_ALIVE => ok(0),
            _ => fail(generic(g::INVALID_OPCODE)),
        }
    }

    /// Maps the command's PRPs for `len` bytes, with the status a failure gets.
    pub(crate) fn map_data(
        &self,
        sqe: &Sqe,
        len: usize,
        segs: &mut Vec<Seg>,
    ) -> Result<(), Status> {
        prp::map(&self.dma, sqe.prp1, sqe.prp2, len, self.page_size(), segs).map_err(|e| match e {
            PrpError::Prp1Alignment => generic(g::INVALID_FIELD),
            PrpError::Offset => generic(g::PRP_OFFSET_INVALID),
            PrpError::Fault => self.dma_fault(),
        })
    }

    /// Transfers `data` to the host, followed by zeroes up to `len` bytes.
    fn to_host(&self, sqe: &Sqe, data: &[u8], len: usize, segs: &mut Vec<Seg>) -> Outcome {
        if let Some(max) = self.max_transfer() {
            if len as u64 > max {
                return fail(generic(g::INVALID_FIELD));
            }
        }
        if let Err(s) = self.map_data(sqe, len, segs) {
            return fail(s);
        }
        let mut c = Cursor::new(segs);
        let n = data.len().min(len);
        c.write_out(&data[..n]);
        c.zero_out(len - n);
        ok(0)
    }

    fn nsid_valid(&self, nsid: u32) -> bool {
        nsid >= 1 && nsid as usize <= self.namespaces.len()
    }

    fn identify(&self, sqe: &Sqe, segs: &mut Vec<Seg>) -> Outcome {
        let data = match sqe.cdw10 & 0xff {
            cns::CONTROLLER => self.identify_controller().to_bytes(),
            cns::NAMESPACE => {
                if !self.nsid_valid(sqe.nsid) {
                    return fail(generic(g::INVALID_NAMESPACE));
                }
                self.identify_namespace(sqe.nsid).to_bytes()
            }
            cns::ACTIVE_NAMESPACES => {
                if sqe.nsid >= 0xffff_fffe {
                    return fail(generic(g::INVALID_NAMESPACE));
                }
                let ids: Vec<u32> = (1..=self.namespaces.len() as u32).collect();
                build_ns_list(&ids, sqe.nsid)
            }
            // The NVM command set's (CSI 0): only WZSL is not zero.
            cns::CONTROLLER_CSI if sqe.cdw11 >> 24 == 0 => {
                let mut page = Box::new([0u8; IDENTIFY_LEN]);
                page[NVM_ID_WZSL] = self.props.wzsl;
                page
            }
            _ => return fail(generic(g::INVALID_FIELD)),
        };
        self.to_host(sqe, &data[..], IDENTIFY_LEN, segs)
    }

    pub(crate) fn identify_controller(&self) -> IdentifyController {
        let p = &self.props;
        IdentifyController {
            vid: VENDOR,
            ssvid: SUBSYSTEM_VENDOR,
            sn: p.serial.clone(),
            mn: p.model.clone(),
            fr: p.firmware.clone(),
            rab: 6,
            ieee: [0x00, 0x54, 0x52],
            cmic: 0,
            mdts: p.mdts,
            cntlid: 0,
            ver: Vs::V1_4.0,
            oaes: 0,
            ctratt: 0,
            oacs: Oacs::empty(),
            acl: 3,
            aerl: (AER_LIMIT - 1) as u8,
            frmw: 0x03, // one slot, slot 1 read-only
            lpa: 0,
            elpe: (ERROR_LOG_ENTRIES - 1) as u8,
            npss: 0,
            wctemp: 343,
            cctemp: 373,
            tnvmcap: self
                .namespaces
                .iter()
                .map(|n| (n.blocks as u128) << n.shift)
                .sum(),
            unvmcap: 0,
            sqes: 0x66,
            cqes: 0x44,
            maxcmd: 0,
            nn: self.namespaces.len() as u32,
            oncs: p.oncs,
            fuses: 0,
            fna: 0,
            vwc: u8::from(p.vwc),
            awun: 0,
            awupf: 0,
            sgls: 0,
            subnqn: format!("nqn.2024-01.dev.dioxide:emulated:{}", p.serial),
        }
    }

    pub(crate) fn identify_namespace(&self, nsid: u32) -> IdentifyNamespace {
        let ns = &self.namespaces[nsid as usize - 1];
        let mut nguid = [0u8; 16];
        nguid[..4].copy_from_slice(&nsid.to_be_bytes());
        for (i, b) in self.props.serial.bytes().take(12).enumerate() {
            nguid[4 + i] = b;
        }
        let mut eui64 = [0x52, 0x54, 0x00, 0, 0, 0, 0, 0];
        eui64[4..].copy_from_slice(&nsid.to_be_bytes());
        IdentifyNamespace {
            nsze: ns.blocks,
            ncap: ns.blocks,
            nuse: ns.blocks,
            nsfeat: 0,
            nlbaf: if ns.metadata != 0 { 2 } else { 1 },
            flbas: match (ns.metadata, ns.shift) {
                (0, 12) => 1,
                (0, _) => 0,
                _ => 2 | if ns.metadata_extended { 0x10 } else { 0 },
            },
            // Metadata as part of an extended LBA (bit 0) or in a separate buffer (bit 1).
            mc: match (ns.metadata, ns.metadata_extended) {
                (0, _) => 0,
                (_, true) => 1,
                (_, false) => 2,
            },
            dpc: 0,
            dps: 0,
            nmic: 0,
            // Deallocated blocks read as zeroes; Write Zeroes may deallocate.
            dlfeat: 0x09,
            nvmcap: (ns.blocks as u128) << ns.shift,
            nguid,
            eui64,
            lbaf: vec![
                LbaFormat {
                    ms: 0,
                    lbads: 9,
                    rp: 0,
                },
                LbaFormat {
                    ms: 0,
                    lbads: 12,
                    rp: 0,
                },
            ]
            .into_iter()
            .chain((ns.metadata != 0).then_some(LbaFormat {
                ms: ns.metadata,
                lbads: ns.shift as u8,
                rp: 0,
            }))
            .collect(),
        }
    }

    /// The memory and size of a queue being created: the size (CDW10 31:16, 0's based) within
    /// CAP.MQES, physically contiguous (CDW11 bit 0; CAP.CQR), page aligned, and mapped for
    /// `size` entries of `entry_bytes`. Otherwise the failure to post.
    fn queue_memory(&self, sqe: &Sqe, entry_bytes: usize) -> Result<(NonNull<u8>, u32), Outcome> {
        let size = (sqe.cdw10 >> 16) + 1;
        if size < 2 || size > self.props.mqes as u32 + 1 {
            return Err(fail(specific(cs::INVALID_QUEUE_SIZE)));
        }
        if sqe.cdw11 & 1 == 0 {
            return Err(fail(generic(g::INVALID_FIELD)));
        }
        if sqe.prp1 & (self.page_size() as u64 - 1) != 0 {
            return Err(fail(generic(g::PRP_OFFSET_INVALID)));
        }
        match self.dma.ptr_of(Iova(sqe.prp1), size as usize * entry_bytes) {
            Some(base) => Ok((base, size)),
            None => Err(fail(self.dma_fault())),
        }
    }

    fn create_cq(&self, sqe: &Sqe) -> Outcome {
        let qid = sqe.cdw10 as u16;
        let ncq = lock(&self.features).ncq;
        if qid == 0 || qid > ncq || self.cqs[qid as usize].size.load(Ordering::Acquire) != 0 {
            return fail(specific(cs::INVALID_QUEUE_ID));
        }
        let (base, size) = match self.queue_memory(sqe, 16) {
            Ok(m) => m,
            Err(e) => return e,
        };
        let irq = match self.cq_interrupt(sqe) {
            Ok(irq) => irq,
            Err(e) => return e,
        };
        let slot = &self.cqs[qid as usize];
        *lock(&slot.state) = Some(Cq::new(base, size).with_irq(irq));
        slot.doorbell.store(0, Ordering::Relaxed);
        slot.backlog.store(false, Ordering::Relaxed);
        slot.size.store(size, Ordering::Release);
        ok(0)
    }

    /// The interrupt of a CQ being created: `None` without IEN (CDW11 bit 1), else the eventfd
    /// of vector IV (CDW11 bits 31:16).
    fn cq_interrupt(&self, sqe: &Sqe) -> Result<Option<Arc<EventFd>>, Outcome> {
        if sqe.cdw11 & 2 == 0 {
            return Ok(None);
        }
        let vector = (sqe.cdw11 >> 16) as u16;
        if vector as usize >= self.vectors.count() {
            return Err(fail(specific(cs::INVALID_INTERRUPT_VECTOR)));
        }
        match self.vectors.target(vector) {
            Ok(fd) => Ok(Some(fd)),
            Err(e) => {
                log::error!("emulated: {e}");
                Err(fail(generic(g::INTERNAL_ERROR)))
            }
        }
    }

    fn create_sq(&self, sqe: &Sqe) -> Outcome {
        let qid = sqe.cdw10 as u16;
        let cqid = (sqe.cdw11 >> 16) as u16;
        let nsq = lock(&self.features).nsq;
        if qid == 0 || qid > nsq || self.sqs[qid as usize].size.load(Ordering::Acquire) != 0 {
            return fail(specific(cs::INVALID_QUEUE_ID));
        }
        if cqid == 0
            || cqid > self.props.max_io_queues
            || self.cqs[cqid as usize].size.load(Ordering::Acquire) == 0
        {
            return fail(specific(cs::CQ_INVALID));
        }
        let (base, size) = match self.queue_memory(sqe, 64) {
            Ok(m) => m,
            Err(e) => return e,
        };
        let max_segs = match self.max_transfer() {
            Some(m) => (m as usize / self.page_size()) + 1,
            None => 64,
        };
        let slot = &self.sqs[qid as usize];
        *lock(&slot.state) = Some(Sq::new(base, size, cqid, max_segs));
        slot.doorbell.store(0, Ordering::Relaxed);
        slot.head.store(0, Ordering::Relaxed);
        slot.size.store(size, Ordering::Release);
        ok(0)
    }

    fn delete_sq(&self, sqe: &Sqe) -> Outcome {
        let qid = sqe.cdw10 as u16;
        if qid == 0
            || qid > self.props.max_io_queues
            || self.sqs[qid as usize].size.load(Ordering::Acquire) == 0
        {
            return fail(specific(cs::INVALID_QUEUE_ID));
        }
        let slot = &self.sqs[qid as usize];
        let mut g = lock(&slot.state);
        // Held commands of the queue complete with Command Aborted due to SQ Deletion.
        self.pending.take_where(
            |h| h.completion.sqid == qid,
            |mut h| {
                h.completion.status =
                    Status::new(crate::spec::Sct::Generic, g::ABORTED_SQ_DELETION);
                self.post_held(h);
            },
        );
        *g = None;
        slot.size.store(0, Ordering::Release);
        slot.doorbell.store(0, Ordering::Relaxed);
        slot.head.store(0, Ordering::Relaxed);
        ok(0)
    }

    fn delete_cq(&self, sqe: &Sqe) -> Outcome {
        let qid = sqe.cdw10 as u16;
        if qid == 0
            || qid > self.props.max_io_queues
            || self.cqs[qid as usize].size.load(Ordering::Acquire) == 0
        {
            return fail(specific(cs::INVALID_QUEUE_ID));
        }
        let in_use = self.sqs.iter().skip(1).any(|s| {
            s.size.load(Ordering::Acquire) != 0
                && lock(&s.state).as_ref().is_some_and(|sq| sq.cqid == qid)
        });
        if in_use {
            return fail(specific(cs::INVALID_QUEUE_DELETION));
        }
        let slot = &self.cqs[qid as usize];
        *lock(&slot.state) = None;
        slot.size.store(0, Ordering::Release);
        slot.doorbell.store(0, Ordering::Relaxed);
        slot.backlog.store(false, Ordering::Relaxed);
        ok(0)
    }

    fn io_queues_exist(&self) -> bool {
        self.sqs
            .iter()
            .skip(1)
            .any(|s| s.size.load(Ordering::Acquire) != 0)
            || self
                .cqs
                .iter()
                .skip(1)
                .any(|s| s.size.load(Ordering::Acquire) != 0)
    }

    fn set_features(&self, sqe: &Sqe) -> Outcome {
        if sqe.cdw10 & (1 << 31) != 0 {
            return fail(specific(cs::FEATURE_NOT_SAVEABLE));
        }
        let v = sqe.cdw11;
        let mut f = lock(&self.features);
        match (sqe.cdw10 & 0xff) as u8 {
            fid::ARBITRATION => f.arbitration = v,
            fid::POWER_MANAGEMENT => {
                if v & 0x1f != 0 {
                    // Only power state 0 exists (NPSS = 0).
                    return fail(generic(g::INVALID_FIELD));
                }
                f.power_management = v;
            }
            fid::TEMPERATURE_THRESHOLD => f.temperature_threshold = v,
            0x05 => f.error_recovery = v,
            fid::VOLATILE_WRITE_CACHE => f.volatile_write_cache = v & 1,
            fid::NUMBER_OF_QUEUES => {
                let (nsqr, ncqr) = (v & 0xffff, v >> 16);
                if nsqr == 0xffff || ncqr == 0xffff {
                    return fail(generic(g::INVALID_FIELD));
                }
                drop(f);
                if self.io_queues_exist() {
                    return fail(generic(g::COMMAND_SEQUENCE_ERROR));
                }
                let mut f = lock(&self.features);
                let max = self.props.max_io_queues as u32;
                f.nsq = (nsqr + 1).min(max) as u16;
                f.ncq = (ncqr + 1).min(max) as u16;
                return ok((f.nsq as u32 - 1) | (f.ncq as u32 - 1) << 16);
            }
            0x08 => f.interrupt_coalescing = v & 0xffff,
            0x0b => f.async_event_config = v,
            0x0f => f.keep_alive = v,
            _ => return fail(generic(g::INVALID_FIELD)),
        }
        ok(0)
    }

    fn get_features(&self, sqe: &Sqe) -> Outcome {
        let f = *lock(&self.features);
        let v = match (sqe.cdw10 & 0xff) as u8 {
            fid::ARBITRATION => f.arbitration,
            fid::POWER_MANAGEMENT => f.power_management,
            fid::TEMPERATURE_THRESHOLD => f.temperature_threshold,
            0x05 => f.error_recovery,
            fid::VOLATILE_WRITE_CACHE => f.volatile_write_cache,
            fid::NUMBER_OF_QUEUES => (f.nsq as u32 - 1) | (f.ncq as u32 - 1) << 16,
            0x08 => f.interrupt_coalescing,
            0x0b => f.async_event_config,
            0x0f => f.keep_alive,
            _ => return fail(generic(g::INVALID_FIELD)),
        };
        ok(v)
    }

    fn get_log_page(&self, sqe: &Sqe, segs: &mut Vec<Seg>) -> Outcome {
        let lid_ = (sqe.cdw10 & 0xff) as u8;
        let numd = ((sqe.cdw10 >> 16) as u64 | ((sqe.cdw11 & 0xffff) as u64) << 16) + 1;
        let len = numd * 4;
        let off = sqe.cdw12 as u64 | (sqe.cdw13 as u64) << 32;
        let page: Vec<u8> = match lid_ {
            lid::ERROR => {
                let log = lock(&self.errors);
                let mut b = vec![0u8; ERROR_LOG_ENTRIES * ERROR_LOG_ENTRY_LEN];
                for (i, e) in log.iter().enumerate() {
                    b[i * ERROR_LOG_ENTRY_LEN..(i + 1) * ERROR_LOG_ENTRY_LEN]
                        .copy_from_slice(&e.to_bytes());
                }
                b
            }
            lid::SMART => self.smart_log().to_bytes().to_vec(),
            lid::FIRMWARE_SLOT => {
                let mut f = FirmwareSlotLog {
                    afi: 1,
                    ..Default::default()
                };
                f.frs[0] = self.props.firmware.clone();
                f.to_bytes().to_vec()
            }
            _ => return fail(specific(cs::INVALID_LOG_PAGE)),
        };
        if off % 4 != 0 || off >= page.len() as u64 {
            return fail(generic(g::INVALID_FIELD));
        }
        if let Some(max) = self.max_transfer() {
            if len > max {
                return fail(generic(g::INVALID_FIELD));
            }
        }
        self.to_host(sqe, &page[off as usize..], len as usize, segs)
    }

    pub(crate) fn smart_log(&self) -> SmartLog {
        let (mut rc, mut wc, mut rb, mut wb) = (0u128, 0u128, 0u128, 0u128);
        for s in self.sqs.iter() {
            rc += s.read_cmds.load(Ordering::Relaxed) as u128;
            wc += s.write_cmds.load(Ordering::Relaxed) as u128;
            rb += s.read_bytes.load(Ordering::Relaxed) as u128;
            wb += s.write_bytes.load(Ordering::Relaxed) as u128;
        }
        // Data units are thousands of 512-byte units, rounded up.
        let units = |bytes: u128| (bytes / 512).div_ceil(1000);
        SmartLog {
            critical_warning: 0,
            temperature: 313,
            available_spare: 100,
            available_spare_threshold: 10,
            percentage_used: 0,
            data_units_read: units(rb),
            data_units_written: units(wb),
            host_read_commands: rc,
            host_write_commands: wc,
            controller_busy_time: 0,
            power_cycles: 1,
            power_on_hours: 0,
            unsafe_shutdowns: 0,
            media_errors: self.media_errors.load(Ordering::Relaxed) as u128,
            num_err_log_entries: self.error_count.load(Ordering::Relaxed) as u128,
        }
    }

    /// Abort: a held command (never-completing or delayed) completes with Command Abort
    /// Requested and the Abort returns DW0 bit 0 = 0; any other command is reported as not
    /// aborted (DW0 bit 0 = 1), since the emulator has already completed it.
    fn abort(&self, sqe: &Sqe) -> Outcome {
        let sqid = sqe.cdw10 as u16;
        let cid = (sqe.cdw10 >> 16) as u16;
        let mut found = false;
        self.pending.take_where(
            |h| {
                let hit = !found && h.completion.sqid == sqid && h.completion.cid == cid;
                found |= hit;
                hit
            },
            |mut h| {
                h.completion.status = Status::new(crate::spec::Sct::Generic, g::ABORT_REQUESTED);
                h.completion.dw0 = 0;
                h.release = Release::Never;
                self.post_held(h);
            },
        );
        ok(if found { 0 } else { 1 })
    }

    fn async_event_request(&self, sqe: &Sqe) -> Outcome {
        let mut a = lock(&self.aer);
        if let Some(ev) = a.events.pop_front() {
            return ok(ev);
        }
        if a.cids.len() >= AER_LIMIT {
            return fail(specific(0x05));
        }
        a.cids.push(sqe.cid());
        Outcome::Held
    }
}
