//! An association with an NVMe/TCP controller: the admin queue, bring-up, Keep Alive, I/O
//! queues, discovery, shutdown.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::HostOptions;
use super::error::HostError;
use super::queue::{HostData, HostQueue};
use crate::nvmf::fabrics::{self, CNTLID_DYNAMIC, FabricsIdentify, prop};
use crate::spec::identify::IDENTIFY_LEN;
use crate::spec::regs::{shn, shst};
use crate::spec::sqe::{admin, cns};
use crate::spec::{Cap, Cc, Csts, IdentifyController, IdentifyNamespace, Sqe, Vs};

/// The tag of the Keep Alive command on the admin queue.
const KEEP_ALIVE_TAG: u64 = u64::MAX - 2;

/// CNTRLTYPE of a discovery controller.
const CNTRLTYPE_DISCOVERY: u8 = 2;

/// An association with a controller: its admin queue and what Identify said.
#[derive(Debug)]
pub struct HostController {
    addr: SocketAddr,
    opts: HostOptions,
    admin: HostQueue,
    cntlid: u16,
    cap: Cap,
    vs: Vs,
    identify: IdentifyController,
    fabrics: FabricsIdentify,
    io_queues: u16,
    next_qid: u16,
    /// When the last Keep Alive was sent, and whether it is still outstanding.
    keep_alive: (Instant, bool),
    shut_down: bool,
}

/// CAP.TO as a duration (500 ms units), at least `floor`.
fn cap_timeout(cap: Cap, floor: Duration) -> Duration {
    Duration::from_millis(500 * cap.to() as u64).max(floor)
}

impl HostController {
    /// Connects the admin queue and brings the controller up the way the Linux host does:
    /// ICReq, Fabrics Connect, Property Get CAP, Property Set CC.EN, wait for CSTS.RDY (at most
    /// CAP.TO), Identify Controller, Set Features Number of Queues.
    pub fn connect(addr: SocketAddr, opts: HostOptions) -> Result<HostController, HostError> {
        let mut admin = HostQueue::open(addr, &opts, opts.admin_queue_size)?;
        let cntlid = admin.connect(&opts, 0, opts.admin_queue_size, CNTLID_DYNAMIC)?;
        let (c, _) = admin.run(
            "Property Get CAP",
            fabrics::property_get(prop::CAP, true),
            HostData::None,
        )?;
        let cap = Cap(c.dw0 as u64 | (c.dw1 as u64) << 32);
        let (c, _) = admin.run(
            "Property Get VS",
            fabrics::property_get(prop::VS, false),
            HostData::None,
        )?;
        let vs = Vs(c.dw0);
        let cc = Cc(0).with_en(true).with_iosqes(6).with_iocqes(4);
        admin.run(
            "Property Set CC",
            fabrics::property_set(prop::CC, false, cc.0 as u64),
            HostData::None,
        )?;
        let ready_within = cap_timeout(cap, Duration::from_millis(500));
        let deadline = Instant::now() + ready_within;
        loop {
            let (c, _) = admin.run(
                "Property Get CSTS",
                fabrics::property_get(prop::CSTS, false),
                HostData::None,
            )?;
            let csts = Csts(c.dw0);
            if csts.cfs() {
                return Err(HostError::Controller(
                    "CSTS.CFS set (the controller failed); restart the target".into(),
                ));
            }
            if csts.rdy() {
                break;
            }
            if Instant::now() > deadline {
                return Err(HostError::Timeout {
                    what: "CSTS.RDY after CC.EN (CAP.TO)",
                    after: ready_within,
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let (_, id) = admin.run(
            "Identify Controller",
            Sqe::identify(cns::CONTROLLER, 0, 0),
            HostData::In(vec![0u8; IDENTIFY_LEN]),
        )?;
        let page: &[u8; IDENTIFY_LEN] = id[..]
            .try_into()
            .map_err(|_| HostError::Controller("short Identify Controller".into()))?;
        let identify = IdentifyController::from_bytes(page);
        let fab = FabricsIdentify::read(page);
        let disc = fab.cntrltype == CNTRLTYPE_DISCOVERY;
        if identify.cntlid != cntlid {
            return Err(HostError::Controller(format!(
                "Identify CNTLID {} differs from Connect's {cntlid}",
                identify.cntlid
            )));
        }
        if !disc && (fab.ioccsz < 4 || fab.iorcsz < 1 || identify.maxcmd == 0 || fab.kas == 0) {
            return Err(HostError::Controller(
                "IOCCSZ, IORCSZ, MAXCMD or KAS missing in Identify".into(),
            ));
        }
        if fab.icdoff != 0 || identify.sgls & 3 == 0 {
            return Err(HostError::Controller(
                "ICDOFF != 0 or no SGL support".into(),
            ));
        }
        let mut io_queues = 0;
        if !disc {
            let want = 16u16;
            let (c, _) = admin.run(
                "Set Features Number of Queues",
                Sqe::set_number_of_queues(want, want),
                HostData::None,
            )?;
            io_queues = ((c.dw0 & 0xffff) as u16).min((c.dw0 >> 16) as u16) + 1;
        }
        Ok(HostController {
            addr,
            opts,
            admin,
            cntlid,
            cap,
            vs,
            identify,
            fabrics: fab,
            io_queues,
            next_qid: 1,
            keep_alive: (Instant::now(), false),
            shut_down: false,
        })
    }

    /// The target's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    /// The options it was connected with.
    pub fn options(&self) -> &HostOptions {
        &self.opts
    }
    /// The CNTLID.
    pub fn cntlid(&self) -> u16 {
        self.cntlid
    }
    /// CAP.
    pub fn cap(&self) -> Cap {
        self.cap
    }
    /// VS.
    pub fn version(&self) -> Vs {
        self.vs
    }
    /// Identify Controller.
    pub fn identify(&self) -> &IdentifyController {
        &self.identify
    }
    /// The fabrics fields of Identify Controller.
    pub fn fabrics_identify(&self) -> FabricsIdentify {
        self.fabrics
    }
    /// Whether this is a discovery controller.
    pub fn is_discovery(&self) -> bool {
        self.fabrics.cntrltype == CNTRLTYPE_DISCOVERY
    }
    /// I/O queues granted.
    pub fn io_queue_count(&self) -> u16 {
        self.io_queues
    }
    /// The admin queue (for commands this type does not wrap).
    pub fn admin(&mut self) -> &mut HostQueue {
        &mut self.admin
    }
    /// In-capsule data bytes of an I/O command (IOCCSZ less the 64-byte command).
    pub fn io_in_capsule(&self) -> u32 {
        (self.fabrics.ioccsz * 16).saturating_sub(64)
    }
    /// Largest transfer in bytes (MDTS; 0 means no limit, reported as 1 MiB).
    pub fn max_transfer(&self) -> usize {
        let mps_min = 4096usize << self.cap.mpsmin();
        match self.identify.mdts {
            0 => 1 << 20,
            m => mps_min << m.min(20),
        }
    }

    /// Connects the next I/O queue with `entries` entries.
    pub fn io_queue(&mut self, entries: u16) -> Result<HostQueue, HostError> {
        if !self.is_discovery() && self.next_qid > self.io_queues {
            return Err(HostError::Controller(format!(
                "all {} I/O queues the controller granted are connected; use fewer queues",
                self.io_queues
            )));
        }
        let q = self.io_queue_at(self.next_qid, entries)?;
        self.next_qid += 1;
        Ok(q)
    }

    /// Connects I/O queue `qid` (one [`io_queue`](Self::io_queue) handed out before, whose
    /// connection has ended) with `entries` entries.
    pub fn io_queue_at(&mut self, qid: u16, entries: u16) -> Result<HostQueue, HostError> {
        if qid == 0 || (!self.is_discovery() && qid > self.io_queues) {
            return Err(HostError::Controller(format!(
                "I/O queue ID {qid} is not one of the {} the controller granted",
                self.io_queues
            )));
        }
        let mut q = HostQueue::open(self.addr, &self.opts, entries)?;
        q.connect(&self.opts, qid, entries, self.cntlid)?;
        q.set_in_capsule(self.io_in_capsule());
        Ok(q)
    }

    /// Keep Alive, waited for.
    pub fn keep_alive(&mut self) -> Result<(), HostError> {
        self.admin
            .run("Keep Alive", Sqe::new(admin::KEEP_ALIVE), HostData::None)
            .map(|_| ())
    }

    /// The Keep Alive timer, to be called from the thread owning the controller every so often
    /// (at least a few times per KATO): polls the admin queue, sends a Keep Alive every KATO/2
    /// (as Linux does), and fails with [`HostError::KeepAliveTimeout`] when one is not answered
    /// within KATO (the admin queue is then dead: every later call says "controller lost").
    /// Does nothing without a KATO.
    pub fn process_admin(&mut self) -> Result<(), HostError> {
        if self.opts.kato_ms == 0 {
            return Ok(());
        }
        if let Some(why) = self.admin.lost() {
            return Err(HostError::Lost(why.to_owned()));
        }
        let kato = Duration::from_millis(self.opts.kato_ms as u64);
        self.admin.poll()?;
        let (sent, outstanding) = self.keep_alive;
        if outstanding {
            // Other finished commands stay queued for their `run`.
            let mut held = Vec::new();
            let mut answer = None;
            while let Some(c) = self.admin.pop() {
                if c.tag == KEEP_ALIVE_TAG {
                    answer = Some(c);
                } else {
                    held.push(c);
                }
            }
            for c in held {
                self.admin_requeue(c);
            }
            match answer {
                Some(c) => {
                    self.keep_alive.1 = false;
                    let cqe = c.result?;
                    if !cqe.status().is_success() {
                        return Err(HostError::Status {
                            what: "Keep Alive",
                            status: cqe.status(),
                            dw0: cqe.dw0,
                        });
                    }
                }
                None if sent.elapsed() > kato => {
                    let e = HostError::KeepAliveTimeout { kato };
                    self.admin.kill(&e);
                    return Err(e);
                }
                None => {}
            }
        } else if sent.elapsed() >= kato / 2 {
            self.admin
                .submit(Sqe::new(admin::KEEP_ALIVE), HostData::None, KEEP_ALIVE_TAG)?;
            self.keep_alive = (Instant::now(), true);
            self.admin.poll()?;
        }
        Ok(())
    }

    fn admin_requeue(&mut self, c: super::queue::HostCompletion) {
        self.admin.push_done(c);
    }

    /// Identify Namespace of `nsid`.
    pub fn identify_namespace(&mut self, nsid: u32) -> Result<IdentifyNamespace, HostError> {
        let (_, b) = self.admin.run(
            "Identify Namespace",
            Sqe::identify(cns::NAMESPACE, nsid, 0),
            HostData::In(vec![0u8; IDENTIFY_LEN]),
        )?;
        let page: &[u8; IDENTIFY_LEN] = b[..]
            .try_into()
            .map_err(|_| HostError::Controller("short Identify Namespace".into()))?;
        Ok(IdentifyNamespace::from_bytes(page))
    }

    /// Identify Namespace: (blocks, block size).
    pub fn namespace(&mut self, nsid: u32) -> Result<(u64, u32), HostError> {
        let id = self.identify_namespace(nsid)?;
        Ok((id.nsze, id.block_size()))
    }

    /// The active namespace IDs (Identify CNS 02h), in order.
    pub fn active_namespaces(&mut self) -> Result<Vec<u32>, HostError> {
        let mut all = Vec::new();
        let mut from = 0u32;
        loop {
            let (_, b) = self.admin.run(
                "Identify Active Namespace List",
                Sqe::identify(cns::ACTIVE_NAMESPACES, from, 0),
                HostData::In(vec![0u8; IDENTIFY_LEN]),
            )?;
            let ids: Vec<u32> = b
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .take_while(|&n| n != 0)
                .collect();
            let full = ids.len() == IDENTIFY_LEN / 4;
            if ids.iter().any(|&n| n <= from || n == u32::MAX) {
                return Err(HostError::Controller(
                    "the active namespace list is not ascending".into(),
                ));
            }
            from = ids.last().copied().unwrap_or(from);
            all.extend(ids);
            if !full {
                return Ok(all);
            }
        }
    }

    /// Get Log Page of `len` bytes at `offset`.
    pub fn log_page(
        &mut self,
        lid: u8,
        nsid: u32,
        len: u32,
        offset: u64,
    ) -> Result<Vec<u8>, HostError> {
        let (_, b) = self.admin.run(
            "Get Log Page",
            fabrics::get_log_page(lid, nsid, len, offset),
            HostData::In(vec![0u8; len as usize]),
        )?;
        Ok(b)
    }

    /// The discovery log page records, read as `nvme discover` does: the header, then the
    /// whole page, then the header again; read again if the generation counter moved.
    pub fn discover(&mut self) -> Result<Vec<fabrics::DiscoveryEntry>, HostError> {
        let genctr = |b: &[u8]| u64::from_le_bytes(b[0..8].try_into().unwrap_or([0; 8]));
        for _ in 0..3 {
            let head = self.log_page(fabrics::lid::DISCOVERY, 0, 1024, 0)?;
            let n = u64::from_le_bytes(head[8..16].try_into().unwrap_or([0; 8])).min(1024);
            let all = self.log_page(fabrics::lid::DISCOVERY, 0, (1024 * (n + 1)) as u32, 0)?;
            let again = self.log_page(fabrics::lid::DISCOVERY, 0, 1024, 0)?;
            if genctr(&again) != genctr(&all) {
                continue;
            }
            let (_, _, recs) = fabrics::parse_discovery_log(&all)
                .ok_or_else(|| HostError::Controller("short discovery log page".into()))?;
            return Ok(recs);
        }
        Err(HostError::Controller(
            "the discovery log page kept changing while it was read".into(),
        ))
    }

    /// Shuts the controller down (CC.SHN, wait for CSTS.SHST complete) and closes the admin
    /// connection (which ends the association).
    pub fn shutdown(mut self) -> Result<(), HostError> {
        self.shut_down = true;
        self.shutdown_inner()
    }

    fn shutdown_inner(&mut self) -> Result<(), HostError> {
        let (c, _) = self.admin.run(
            "Property Get CC",
            fabrics::property_get(prop::CC, false),
            HostData::None,
        )?;
        let cc = Cc(c.dw0).with_shn(shn::NORMAL);
        self.admin.run(
            "Property Set CC",
            fabrics::property_set(prop::CC, false, cc.0 as u64),
            HostData::None,
        )?;
        let within = self.opts.timeout;
        let deadline = Instant::now() + within;
        loop {
            let (c, _) = self.admin.run(
                "Property Get CSTS",
                fabrics::property_get(prop::CSTS, false),
                HostData::None,
            )?;
            if Csts(c.dw0).shst() == shst::COMPLETE {
                break;
            }
            if Instant::now() > deadline {
                return Err(HostError::Timeout {
                    what: "CSTS.SHST complete after CC.SHN",
                    after: within,
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        // The association ends with the admin connection; a Disconnect goes first, not waited
        // for (the target may close at once).
        if self
            .admin
            .submit(fabrics::disconnect(), HostData::None, u64::MAX - 3)
            .is_ok()
        {
            let _ = self.admin.send_now();
        }
        self.admin.close();
        Ok(())
    }
}

impl Drop for HostController {
    /// A controller not shut down yet is shut down now (CC.SHN), unless its admin queue is
    /// already lost; errors are logged.
    fn drop(&mut self) {
        if self.shut_down || self.admin.lost().is_some() {
            return;
        }
        self.shut_down = true;
        if let Err(e) = self.shutdown_inner() {
            log::warn!(
                "nvmf host: shutdown of controller {} failed: {e}",
                self.cntlid
            );
        }
    }
}
