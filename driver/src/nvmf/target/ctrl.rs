//! A controller: the state of one association (admin queue plus I/O queues), its properties,
//! features, keep-alive and asynchronous events, and the admin commands.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::{Subsystem, Target, TargetOptions, fold64};
use crate::nvmf::backend::NsInfo;
use crate::nvmf::fabrics::{
    self, ADRFAM_IPV4, ADRFAM_IPV6, DiscoveryEntry, FabricsIdentify, SUBTYPE_NVME,
    TREQ_NOT_REQUIRED, TRTYPE_TCP, cns as fcns, fid as ffid, lid as flid, nidt, prop,
};
use crate::spec::identify::{IDENTIFY_LEN, SMART_LOG_LEN, build_ns_list};
use crate::spec::regs::shst;
use crate::spec::sqe::{admin, cns, fid, lid};
use crate::spec::status::{command_specific as cs, generic};
use crate::spec::{
    Cap, Cc, Csts, IdentifyController, IdentifyNamespace, LbaFormat, Oncs, Sct, Sqe, Status, Vs,
};

/// Asynchronous Event Request Limit (0's based): four AERs may be outstanding.
pub const AERL: u8 = 3;
/// AEC bit 8: Namespace Attribute Notices.
const AEC_NS_ATTR: u32 = 1 << 8;
/// Async event: type Notice (2), info Namespace Attribute Changed (00h in bits 15:8), log
/// page 04h.
const AEN_NS_CHANGED: u32 = 2 | (flid::CHANGED_NS_LIST as u32) << 16;
/// CTRATT bit 6: Traffic Based Keep Alive Support.
const CTRATT_TBKAS: u32 = 1 << 6;
/// Status: Asynchronous Event Request Limit Exceeded (command specific).
const AER_LIMIT_EXCEEDED: u8 = 0x05;
/// Status: Keep Alive Timeout Invalid (generic, 1Ah): a Keep Alive while the Keep Alive Timer
/// is disabled (KATO 0), as Linux's `nvmet_execute_keep_alive` answers.
const KEEP_ALIVE_TIMEOUT_INVALID: u8 = 0x1a;
/// Set Features CDW10 bit 31: Save (SV).
const SET_FEATURES_SAVE: u32 = 1 << 31;

/// Get Features Select (CDW10 bits 10:8).
mod sel {
    /// The value in use.
    pub const CURRENT: u32 = 0b000;
    /// The value a new association starts with.
    pub const DEFAULT: u32 = 0b001;
    /// The value saved across power cycles (none is saveable here: the default).
    pub const SAVED: u32 = 0b010;
    /// Supported Capabilities: bit 0 saveable, bit 1 namespace specific, bit 2 changeable.
    pub const SUPPORTED_CAPABILITIES: u32 = 0b011;
}
/// Supported Capabilities bit 2: the feature is changeable (none is saveable or namespace
/// specific here).
const CAP_CHANGEABLE: u32 = 1 << 2;

struct State {
    cc: Cc,
    csts: Csts,
    aec: u32,
    vwc: bool,
    io_queues: u16,
    events: VecDeque<u32>,
    changed: Vec<u32>,
    io_qids: Vec<u16>,
    /// CC.EN went 1 → 0: CSTS.RDY clears once the association's commands drained.
    reset_pending: bool,
    /// CC.EN went 0 → 1 (with a supported configuration): CSTS.RDY sets once the commands of
    /// the previous enable drained.
    enable_pending: bool,
}

/// A controller of one association.
pub struct Ctrl {
    /// Controller ID.
    pub cntlid: u16,
    /// The subsystem.
    pub subsys: Arc<Subsystem>,
    /// NQN of the host.
    pub hostnqn: String,
    /// Host identifier.
    pub hostid: [u8; 16],
    kato_ms: AtomicU32,
    /// KATO of the Connect command: the Keep Alive Timer's default value.
    kato_default: u32,
    last_seen: AtomicU64,
    dead: AtomicBool,
    reset_gen: AtomicU32,
    /// Commands of this association at the backend (every queue), counted by the
    /// [`IoCompletion`](crate::nvmf::backend::IoCompletion)s: the controller ID stays taken,
    /// a reset or shutdown stays in progress, until this is zero.
    inflight: Arc<AtomicU32>,
    max_qd: u16,
    max_io_queues: u16,
    st: Mutex<State>,
}

impl core::fmt::Debug for Ctrl {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Ctrl")
            .field("cntlid", &self.cntlid)
            .field("subnqn", &self.subsys.nqn())
            .field("hostnqn", &self.hostnqn)
            .finish()
    }
}

/// What an admin command produced.
#[derive(Debug)]
pub enum AdminOut {
    /// Completed: status, DW0, data for the host.
    Done(Status, u32, Option<Vec<u8>>),
    /// An Asynchronous Event Request: held until an event.
    Aer,
    /// Get Log Page SMART / Health: the backend reads it
    /// ([`Backend::smart_log`](crate::nvmf::backend::Backend::smart_log)), the response
    /// follows from [`Ctrl::smart_page`].
    Smart,
}

fn st(sc: u8) -> Status {
    Status::new(Sct::Generic, sc)
}
fn invalid_field() -> Status {
    st(generic::INVALID_FIELD).with_dnr(true)
}

/// Why [`Ctrl::attach_io_queue`] refused a queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AttachRefused {
    /// CSTS.RDY is clear (not enabled yet, or reset).
    NotReady,
    /// The queue ID is taken or beyond the granted count.
    QueueId,
}

impl Ctrl {
    pub(crate) fn new(
        cntlid: u16,
        subsys: Arc<Subsystem>,
        hostnqn: String,
        hostid: [u8; 16],
        kato_ms: u32,
        now_ms: u64,
        opts: &TargetOptions,
    ) -> Ctrl {
        Ctrl {
            cntlid,
            subsys,
            hostnqn,
            hostid,
            kato_ms: AtomicU32::new(kato_ms),
            kato_default: kato_ms,
            last_seen: AtomicU64::new(now_ms),
            dead: AtomicBool::new(false),
            reset_gen: AtomicU32::new(0),
            inflight: Arc::new(AtomicU32::new(0)),
            max_qd: opts.max_queue_depth,
            max_io_queues: opts.max_io_queues,
            st: Mutex::new(State {
                cc: Cc(0),
                csts: Csts(0),
                aec: 0,
                vwc: true,
                io_queues: opts.max_io_queues,
                events: VecDeque::new(),
                changed: Vec::new(),
                io_qids: Vec::new(),
                reset_pending: false,
                enable_pending: false,
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The association was torn down (keep-alive expiry, admin queue gone, controller reset
    /// for the I/O queues of an older generation).
    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::SeqCst)
    }
    pub(crate) fn kill(&self) {
        self.dead.store(true, Ordering::SeqCst);
    }
    /// Generation of CC.EN: an I/O queue connected under another generation is gone.
    pub fn reset_generation(&self) -> u32 {
        self.reset_gen.load(Ordering::SeqCst)
    }
    /// CSTS.RDY, and no reset in progress: I/O may be executed.
    pub fn ready(&self) -> bool {
        let mut s = self.state();
        self.settle(&mut s);
        s.csts.rdy() && !s.reset_pending && !s.enable_pending
    }
    /// Commands of the association at the backend now.
    pub fn in_flight(&self) -> u32 {
        self.inflight.load(Ordering::SeqCst)
    }
    /// The counter the association's [`IoCompletion`](crate::nvmf::backend::IoCompletion)s
    /// keep.
    pub(crate) fn inflight_counter(&self) -> &Arc<AtomicU32> {
        &self.inflight
    }
    /// True once the association ended and nothing it started is still at the backend: its
    /// controller ID may be given to a new association.
    pub fn is_drained(&self) -> bool {
        self.is_dead() && self.in_flight() == 0
    }
    /// Finishes a reset, an enable or a shutdown whose commands drained (Linux's
    /// `nvmet_sq_destroy` waits the same way before the queue's state goes).
    fn settle(&self, s: &mut State) {
        if self.in_flight() != 0 {
            return;
        }
        if s.reset_pending {
            s.reset_pending = false;
            s.csts = Csts::build(false, false, s.csts.shst());
            log::debug!(
                "nvmf: controller {}: reset complete, its commands drained",
                self.cntlid
            );
        }
        if s.enable_pending {
            s.enable_pending = false;
            s.csts = Csts::build(true, false, shst::NORMAL);
        }
        if s.csts.shst() == shst::OCCURRING {
            s.csts = Csts::build(s.csts.rdy(), false, shst::COMPLETE);
        }
    }
    /// Records host traffic (resets the keep-alive timer): any command counts, as in Linux's
    /// traffic-based keep alive.
    pub fn seen(&self, now_ms: u64) {
        self.last_seen.store(now_ms, Ordering::Relaxed);
    }
    /// The Keep Alive Timeout in milliseconds (0: none).
    pub fn kato_ms(&self) -> u32 {
        self.kato_ms.load(Ordering::Relaxed)
    }
    /// True when the host was silent for longer than KATO plus the grace: another KATO.
    /// Linux's target checks every KATO whether a command arrived since the last check, so a
    /// silent host is torn down between one and two KATO after its last command; the grace
    /// gives every host the later bound (a Keep Alive the host sends at KATO, late by its
    /// own timer's slack or the network's, still counts).
    pub fn keep_alive_expired(&self, now_ms: u64) -> bool {
        let kato = self.kato_ms() as u64;
        kato != 0 && now_ms.saturating_sub(self.last_seen.load(Ordering::Relaxed)) > 2 * kato
    }

    /// Registers an I/O queue of a ready controller; returns the reset generation it belongs
    /// to, read under the lock a reset takes (a reset between the two cannot go unseen).
    pub(crate) fn attach_io_queue(&self, qid: u16) -> Result<u32, AttachRefused> {
        let mut s = self.state();
        self.settle(&mut s);
        if !s.csts.rdy() || s.reset_pending || s.enable_pending {
            return Err(AttachRefused::NotReady);
        }
        if qid == 0 || qid > s.io_queues || s.io_qids.contains(&qid) {
            return Err(AttachRefused::QueueId);
        }
        s.io_qids.push(qid);
        Ok(self.reset_generation())
    }
    pub(crate) fn detach_io_queue(&self, qid: u16) {
        self.state().io_qids.retain(|&q| q != qid);
    }

    pub(crate) fn namespaces_changed(&self, nsids: &[u32]) {
        let mut s = self.state();
        for &n in nsids {
            if !s.changed.contains(&n) {
                s.changed.push(n);
            }
        }
        if s.aec & AEC_NS_ATTR != 0 && !s.events.contains(&AEN_NS_CHANGED) {
            s.events.push_back(AEN_NS_CHANGED);
        }
    }

    /// The next asynchronous event to report (DW0 of the AER completion).
    pub fn take_event(&self) -> Option<u32> {
        self.state().events.pop_front()
    }

    fn cap(&self) -> Cap {
        Cap::build(self.max_qd - 1, true, 15, 0, 0, 0)
    }

    /// Property Get.
    pub fn property_get(&self, offset: u32, eight: bool) -> Result<u64, Status> {
        let mut s = self.state();
        self.settle(&mut s);
        Ok(match (offset, eight) {
            (prop::CAP, true) => self.cap().0,
            (prop::CAP, false) => self.cap().0 & 0xffff_ffff,
            (prop::VS, false) => Vs(0x0001_0300).0 as u64,
            (prop::CC, false) => s.cc.0 as u64,
            (prop::CSTS, false) => s.csts.0 as u64,
            _ => return Err(invalid_field()),
        })
    }

    /// Property Set (CC only): CC.EN 0→1 makes the controller ready (if CC asks for what it
    /// supports: NVM command set, 4 KiB pages, 64/16-byte queue entries), 1→0 resets it (its
    /// I/O queues go), CC.SHN starts a shutdown. A reset or shutdown completes (CSTS.RDY
    /// clears, CSTS.SHST says complete) only once every command the association has at the
    /// backend completed, so a write of before the reset cannot land after the host saw it
    /// done; an enable waits for the same.
    pub fn property_set(&self, offset: u32, eight: bool, value: u64) -> Result<(), Status> {
        if offset != prop::CC || eight {
            return Err(invalid_field());
        }
        let new = Cc(value as u32);
        let mut s = self.state();
        let old = s.cc;
        if new.en() && !old.en() {
            let io = !self.subsys.is_discovery();
            if io && (new.iosqes() != 6 || new.iocqes() != 4) || new.mps() != 0 || new.css() != 0 {
                // Leave the controller not ready: the host sees CSTS.RDY stay 0.
                s.cc = new;
                return Ok(());
            }
            s.csts = Csts::build(false, false, shst::NORMAL);
            s.enable_pending = true;
        } else if !new.en() && old.en() {
            // CSTS.RDY stays set until the commands drained (`settle`).
            s.enable_pending = false;
            s.reset_pending = true;
            s.io_qids.clear();
            self.reset_gen.fetch_add(1, Ordering::SeqCst);
        }
        if new.shn() != 0 && old.shn() == 0 {
            // Nothing is cached: shutdown completes once the commands drained. The host
            // disconnects the queues itself (the Linux host quiesces and closes them after
            // CSTS.SHST says complete).
            s.csts = Csts::build(s.csts.rdy(), false, shst::OCCURRING);
        } else if new.shn() == 0 && s.csts.shst() != shst::NORMAL && new.en() && !old.en() {
            s.csts = Csts::build(s.csts.rdy(), false, shst::NORMAL);
        }
        s.cc = new;
        self.settle(&mut s);
        Ok(())
    }

    /// Stable NGUID of a namespace (from the subsystem NQN and NSID).
    pub fn nguid(&self, nsid: u32) -> [u8; 16] {
        let mut key = self.subsys.nqn().as_bytes().to_vec();
        key.extend_from_slice(&nsid.to_le_bytes());
        let a = fold64(&key);
        key.push(0x5a);
        let b = fold64(&key);
        let mut g = [0u8; 16];
        g[..8].copy_from_slice(&a.to_be_bytes());
        g[8..].copy_from_slice(&b.to_be_bytes());
        g
    }

    /// Stable UUID of a namespace (RFC 9562 version 8, from the NGUID).
    pub fn uuid(&self, nsid: u32) -> [u8; 16] {
        let mut u = self.nguid(nsid);
        u.reverse();
        u[6] = (u[6] & 0x0f) | 0x80;
        u[8] = (u[8] & 0x3f) | 0x80;
        u
    }

    fn namespaces(&self) -> Vec<NsInfo> {
        self.subsys
            .backend()
            .map(|b| b.namespaces())
            .unwrap_or_default()
    }

    fn identify_ctrl(&self, opts: &TargetOptions) -> Vec<u8> {
        let disc = self.subsys.is_discovery();
        let nss = self.namespaces();
        let vwc = !disc
            && self
                .subsys
                .backend()
                .is_some_and(|b| b.volatile_write_cache());
        // Save and Select: Get Features honours SEL; Set Features with SV says which feature
        // is not saveable (none is).
        let mut oncs = Oncs::SAVE_SELECT;
        if nss.iter().any(|n| n.write_zeroes) {
            oncs |= Oncs::WRITE_ZEROES;
        }
        if nss.iter().any(|n| n.deallocate) {
            oncs |= Oncs::DSM;
        }
        let id = IdentifyController {
            vid: 0,
            ssvid: 0,
            sn: self.subsys.serial().into(),
            mn: "Dioxide NVMe/TCP target".into(),
            fr: env!("CARGO_PKG_VERSION").into(),
            cmic: 0,
            mdts: (opts.max_transfer / 4096).max(1).trailing_zeros() as u8,
            cntlid: self.cntlid,
            ver: 0x0001_0300,
            oaes: if disc { 0 } else { AEC_NS_ATTR },
            // Traffic Based Keep Alive: any command resets the timer (`seen`), so a host with
            // I/O flowing need not send Keep Alive (the Linux host then skips it).
            ctratt: if disc { 0 } else { CTRATT_TBKAS },
            aerl: AERL,
            lpa: 0,
            elpe: 0,
            sqes: if disc { 0 } else { 0x66 },
            cqes: if disc { 0 } else { 0x44 },
            maxcmd: self.max_qd,
            nn: nss.iter().map(|n| n.nsid.0).max().unwrap_or(0),
            oncs,
            // Bit 0: present; bits 2:1 = 10b: Flush with NSID FFFFFFFFh not supported.
            vwc: if vwc { 0b101 } else { 0 },
            // Bit 0: SGLs supported (no alignment requirement); bit 20: the address of a Data
            // Block descriptor may be an offset (in-capsule data).
            sgls: 1 | 1 << 20,
            subnqn: self.subsys.nqn().into(),
            ..IdentifyController::default()
        };
        let mut b = id.to_bytes().to_vec();
        FabricsIdentify {
            cntrltype: if disc { 2 } else { 1 },
            kas: if disc { 0 } else { opts.kas },
            ioccsz: (opts.in_capsule + 64) / 16,
            iorcsz: 1,
            icdoff: 0,
            fcatt: 0,
            msdbd: 1,
        }
        .write(&mut b);
        b
    }

    fn identify_ns(&self, nsid: u32) -> Result<Vec<u8>, Status> {
        let nss = self.namespaces();
        let max = nss.iter().map(|n| n.nsid.0).max().unwrap_or(0);
        let Some(ns) = nss.iter().find(|n| n.nsid.0 == nsid) else {
            if nsid == 0 || nsid > max {
                return Err(st(generic::INVALID_NAMESPACE).with_dnr(true));
            }
            return Ok(vec![0u8; IDENTIFY_LEN]);
        };
        let id = IdentifyNamespace {
            nsze: ns.blocks,
            ncap: ns.blocks,
            nuse: ns.blocks,
            nlbaf: 0,
            flbas: 0,
            dlfeat: if ns.deallocate { 1 << 3 | 1 } else { 0 },
            nguid: self.nguid(nsid),
            lbaf: vec![LbaFormat {
                ms: 0,
                lbads: ns.block_size.trailing_zeros() as u8,
                rp: 0,
            }],
            ..IdentifyNamespace::default()
        };
        Ok(id.to_bytes().to_vec())
    }

    fn ns_descriptors(&self, nsid: u32) -> Result<Vec<u8>, Status> {
        if !self.namespaces().iter().any(|n| n.nsid.0 == nsid) {
            return Err(st(generic::INVALID_NAMESPACE).with_dnr(true));
        }
        let mut b = vec![0u8; IDENTIFY_LEN];
        b[0] = nidt::NGUID;
        b[1] = 16;
        b[4..20].copy_from_slice(&self.nguid(nsid));
        b[20] = nidt::UUID;
        b[21] = 16;
        b[24..40].copy_from_slice(&self.uuid(nsid));
        Ok(b)
    }

    fn discovery_page(&self, target: &Target, local: SocketAddr) -> Vec<u8> {
        let local = target.portal().unwrap_or(local);
        let entries: Vec<_> = target
            .subsystems()
            .into_iter()
            .filter(|s| s.allows(&self.hostnqn))
            .map(|s| DiscoveryEntry {
                trtype: TRTYPE_TCP,
                adrfam: if local.is_ipv4() {
                    ADRFAM_IPV4
                } else {
                    ADRFAM_IPV6
                },
                subtype: SUBTYPE_NVME,
                treq: TREQ_NOT_REQUIRED,
                portid: 1,
                cntlid: fabrics::CNTLID_DYNAMIC,
                asqsz: 32,
                trsvcid: local.port().to_string(),
                subnqn: s.nqn().into(),
                traddr: local.ip().to_string(),
            })
            .collect();
        fabrics::discovery_log(target.genctr(), &entries)
    }

    /// Checks a Get Log Page's length against the transfer limit and its SGL.
    fn check_log_len(target: &Target, sqe: &Sqe) -> Result<(), Status> {
        let (_, len, _) = fabrics::log_page_args(sqe);
        if len > u64::from(target.options().max_transfer) {
            return Err(invalid_field());
        }
        if u64::from(fabrics::Sgl::of(sqe).len) != len {
            return Err(st(fabrics::sc::DATA_SGL_LENGTH_INVALID).with_dnr(true));
        }
        Ok(())
    }

    /// The part of `page` a Get Log Page asks for (offset and length), zero-filled past it.
    fn log_slice(sqe: &Sqe, page: &[u8]) -> Result<Vec<u8>, Status> {
        let (_, len, offset) = fabrics::log_page_args(sqe);
        if offset % 4 != 0 || offset > page.len() as u64 {
            return Err(invalid_field());
        }
        let from = offset as usize;
        let to = (from as u64 + len).min(page.len() as u64) as usize;
        let mut out = page[from..to].to_vec();
        out.resize(len as usize, 0);
        Ok(out)
    }

    /// The SMART / Health Information page of a Get Log Page: the backing controller's page
    /// `device` if the backend read one; else what the target counted for this subsystem
    /// itself (host commands and data units since it was added, power-on hours since then;
    /// no warning, full spare, temperature not known: 0).
    pub(crate) fn smart_page(&self, sqe: &Sqe, device: Option<&[u8]>) -> Result<Vec<u8>, Status> {
        let page = match device {
            Some(d) if d.len() >= SMART_LOG_LEN => d[..SMART_LOG_LEN].to_vec(),
            _ => self.subsys.smart_log().to_bytes().to_vec(),
        };
        Self::log_slice(sqe, &page)
    }

    fn log_page(&self, target: &Target, sqe: &Sqe, local: SocketAddr) -> Result<Vec<u8>, Status> {
        let (lid, _, _) = fabrics::log_page_args(sqe);
        // Checked before the page is built: reading some logs clears them.
        Self::check_log_len(target, sqe)?;
        let disc = self.subsys.is_discovery();
        let page = match lid {
            flid::DISCOVERY if disc => self.discovery_page(target, local),
            lid::ERROR if !disc => vec![0u8; 64],
            lid::SMART if !disc => self.subsys.smart_log().to_bytes().to_vec(),
            flid::CHANGED_NS_LIST if !disc => {
                let mut s = self.state();
                let mut b = vec![0u8; 4096];
                if s.changed.len() > 1024 {
                    b[..4].copy_from_slice(&u32::MAX.to_le_bytes());
                } else {
                    for (i, n) in s.changed.iter().enumerate() {
                        b[4 * i..4 * i + 4].copy_from_slice(&n.to_le_bytes());
                    }
                }
                // RAE (CDW10 bit 15) clear: reading the log clears it.
                if sqe.cdw10 & (1 << 15) == 0 {
                    s.changed.clear();
                }
                b
            }
            _ => return Err(invalid_field()),
        };
        Self::log_slice(sqe, &page)
    }

    /// Executes an admin command (not Fabrics).
    pub fn admin(&self, target: &Target, sqe: &Sqe, local: SocketAddr, now_ms: u64) -> AdminOut {
        let disc = self.subsys.is_discovery();
        let done = |r: Result<Vec<u8>, Status>| match r {
            Ok(d) => AdminOut::Done(Status::SUCCESS, 0, Some(d)),
            Err(s) => AdminOut::Done(s, 0, None),
        };
        let ok = |dw0: u32| AdminOut::Done(Status::SUCCESS, dw0, None);
        let err = |s: Status| AdminOut::Done(s, 0, None);
        match sqe.opcode() {
            admin::IDENTIFY => match sqe.cdw10 & 0xff {
                cns::CONTROLLER => done(Ok(self.identify_ctrl(target.options()))),
                cns::NAMESPACE if !disc => done(self.identify_ns(sqe.nsid)),
                cns::ACTIVE_NAMESPACES if !disc => {
                    if sqe.nsid >= 0xffff_fffe {
                        return err(invalid_field());
                    }
                    let ids: Vec<u32> = self.namespaces().iter().map(|n| n.nsid.0).collect();
                    done(Ok(build_ns_list(&ids, sqe.nsid).to_vec()))
                }
                fcns::NS_DESCRIPTORS if !disc => done(self.ns_descriptors(sqe.nsid)),
                _ => err(invalid_field()),
            },
            admin::GET_LOG_PAGE => {
                let (lid, _, _) = fabrics::log_page_args(sqe);
                if lid == lid::SMART && !disc && self.subsys.backend().is_some() {
                    // Read from the backing controller, asynchronously.
                    return match Self::check_log_len(target, sqe) {
                        Ok(()) => AdminOut::Smart,
                        Err(s) => err(s),
                    };
                }
                done(self.log_page(target, sqe, local))
            }
            admin::KEEP_ALIVE => {
                self.seen(now_ms);
                if self.kato_ms() == 0 {
                    // No Keep Alive Timer to restart (KATO 0 at Connect or Set Features).
                    return err(st(KEEP_ALIVE_TIMEOUT_INVALID).with_dnr(true));
                }
                ok(0)
            }
            admin::ASYNC_EVENT_REQUEST => AdminOut::Aer,
            admin::ABORT if !disc => ok(1), // bit 0 set: the command was not aborted
            admin::SET_FEATURES => self.set_features(sqe),
            admin::GET_FEATURES => self.get_features(sqe),
            _ => err(st(generic::INVALID_OPCODE).with_dnr(true)),
        }
    }

    /// The status of an AER beyond the limit.
    pub fn aer_limit_status() -> Status {
        Status::new(Sct::CommandSpecific, AER_LIMIT_EXCEEDED).with_dnr(true)
    }

    fn set_features(&self, sqe: &Sqe) -> AdminOut {
        let disc = self.subsys.is_discovery();
        let mut s = self.state();
        let v = sqe.cdw11;
        if sqe.cdw10 & SET_FEATURES_SAVE != 0 {
            // No feature is saveable (Get Features Supported Capabilities says so).
            return AdminOut::Done(
                Status::new(Sct::CommandSpecific, cs::FEATURE_NOT_SAVEABLE).with_dnr(true),
                0,
                None,
            );
        }
        match sqe.cdw10 as u8 {
            fid::NUMBER_OF_QUEUES if !disc => {
                let (nsq, ncq) = ((v & 0xffff) as u16, (v >> 16) as u16);
                if nsq == 0xffff || ncq == 0xffff {
                    return AdminOut::Done(invalid_field(), 0, None);
                }
                let n = (nsq.max(ncq) + 1).min(self.max_io_queues);
                s.io_queues = n;
                let dw0 = (n - 1) as u32 | ((n - 1) as u32) << 16;
                AdminOut::Done(Status::SUCCESS, dw0, None)
            }
            ffid::ASYNC_EVENT_CONFIG => {
                s.aec = v & AEC_NS_ATTR;
                AdminOut::Done(Status::SUCCESS, 0, None)
            }
            ffid::KEEP_ALIVE_TIMER => {
                self.kato_ms.store(v, Ordering::Relaxed);
                AdminOut::Done(Status::SUCCESS, 0, None)
            }
            fid::VOLATILE_WRITE_CACHE if !disc => {
                let has = self
                    .subsys
                    .backend()
                    .is_some_and(|b| b.volatile_write_cache());
                if !has {
                    return AdminOut::Done(invalid_field(), 0, None);
                }
                s.vwc = v & 1 != 0;
                AdminOut::Done(Status::SUCCESS, 0, None)
            }
            _ => AdminOut::Done(
                Status::new(Sct::CommandSpecific, cs::FEATURE_NOT_CHANGEABLE).with_dnr(true),
                0,
                None,
            ),
        }
    }

    /// Get Features with its Select field: the current value, the default one (what a new
    /// association starts with), the saved one (none is saveable: the default), or the
    /// Supported Capabilities (changeable; not saveable, not namespace specific).
    fn get_features(&self, sqe: &Sqe) -> AdminOut {
        let disc = self.subsys.is_discovery();
        let select = (sqe.cdw10 >> 8) & 0b111;
        let fid = sqe.cdw10 as u8;
        let vwc_present = self
            .subsys
            .backend()
            .is_some_and(|b| b.volatile_write_cache());
        let known = match fid {
            fid::NUMBER_OF_QUEUES | fid::VOLATILE_WRITE_CACHE => !disc,
            ffid::ASYNC_EVENT_CONFIG | ffid::KEEP_ALIVE_TIMER => true,
            _ => false,
        };
        if !known {
            return AdminOut::Done(invalid_field(), 0, None);
        }
        let queues = |n: u16| (n - 1) as u32 | ((n - 1) as u32) << 16;
        let dw0 = match select {
            sel::CURRENT => {
                let s = self.state();
                match fid {
                    fid::NUMBER_OF_QUEUES => queues(s.io_queues),
                    ffid::ASYNC_EVENT_CONFIG => s.aec,
                    ffid::KEEP_ALIVE_TIMER => self.kato_ms.load(Ordering::Relaxed),
                    _ => (vwc_present && s.vwc) as u32,
                }
            }
            sel::DEFAULT | sel::SAVED => match fid {
                fid::NUMBER_OF_QUEUES => queues(self.max_io_queues),
                ffid::ASYNC_EVENT_CONFIG => 0,
                ffid::KEEP_ALIVE_TIMER => self.kato_default,
                _ => vwc_present as u32,
            },
            sel::SUPPORTED_CAPABILITIES => match fid {
                fid::VOLATILE_WRITE_CACHE if !vwc_present => 0,
                _ => CAP_CHANGEABLE,
            },
            _ => return AdminOut::Done(invalid_field(), 0, None),
        };
        AdminOut::Done(Status::SUCCESS, dw0, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nvmf::backend::MemBackend;

    const CC_ENABLE: u64 = 1 | 6 << 16 | 4 << 20;

    #[test]
    fn an_io_queue_attaches_to_a_ready_controller_in_its_current_generation() {
        let opts = TargetOptions::default();
        let subsys = Arc::new(Subsystem::new(
            "nqn.2026-12.io.dioxide:ctrl",
            Arc::new(MemBackend::new(&[(512, 8)])),
        ));
        let c = Ctrl::new(
            1,
            subsys,
            "nqn.2026-12.io.dioxide:h".into(),
            [1; 16],
            0,
            0,
            &opts,
        );
        assert_eq!(c.attach_io_queue(1), Err(AttachRefused::NotReady));
        c.property_set(prop::CC, false, CC_ENABLE).expect("enable");
        let g = c.attach_io_queue(1).expect("attach queue 1");
        assert_eq!(g, c.reset_generation());
        assert_eq!(c.attach_io_queue(1), Err(AttachRefused::QueueId));
        // A reset: the queue is forgotten, a new one belongs to the next generation only once
        // the controller is ready again.
        c.property_set(prop::CC, false, 0).expect("reset");
        assert_eq!(c.attach_io_queue(1), Err(AttachRefused::NotReady));
        c.property_set(prop::CC, false, CC_ENABLE)
            .expect("enable again");
        let g2 = c.attach_io_queue(1).expect("attach queue 1 again");
        assert_ne!(g2, g);
        assert_eq!(g2, c.reset_generation());
    }
}
