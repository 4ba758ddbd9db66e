//! The NVMe/TCP target: subsystems, controllers (one per association), connections (one per
//! queue) and the poll groups that drive them.
//!
//! * [`Target`]: the subsystems it serves (each an NQN, the hosts allowed in, and a
//!   [`Backend`]), the discovery subsystem, the controllers of the live associations, and the
//!   limits every connection gets ([`TargetOptions`]).
//! * [`ctrl`]: a controller: properties (CC.EN / CC.SHN to CSTS.RDY / CSTS.SHST), features,
//!   Keep Alive Timeout, asynchronous events, and the admin commands (Identify, Get Log Page,
//!   ...). Shared by the admin queue and the I/O queues of one association.
//! * [`conn`]: one TCP connection = one NVMe queue: ICReq/ICResp, capsules, R2T/H2CData,
//!   C2HData, TermReqs, digests, the command slots, and the I/O it submits to the backend.
//! * [`group`]: a [`PollGroup`] owns connections (and optionally a listener) and polls them;
//!   it never blocks, so a pinned poller can call it in its loop.
//! * [`serve`]: [`Serving`] runs one poll group per pinned poller of a
//!   [`Dioxide`](crate::Dioxide), as a poller task.

pub mod conn;
pub mod ctrl;
pub mod group;
pub mod serve;
pub mod wait;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

pub use conn::ConnStats;
pub use ctrl::Ctrl;
pub use group::PollGroup;
pub use serve::{GroupReport, Serving};

use super::backend::Backend;
use super::fabrics::{CNTLID_MAX, DISCOVERY_NQN};
use crate::spec::SmartLog;

/// Limits and sizes every connection of a target gets.
#[derive(Clone, Debug)]
pub struct TargetOptions {
    /// Largest queue depth a host may ask for in Connect (SQSIZE + 1); also CAP.MQES + 1 and
    /// MAXCMD. An admin queue may have 32 entries even when this is lower (the Linux host's).
    pub max_queue_depth: u16,
    /// Largest number of I/O queues per controller (Set Features Number of Queues).
    pub max_io_queues: u16,
    /// In-capsule data of an I/O queue command capsule (IOCCSZ × 16 − 64), a multiple of 16.
    pub in_capsule: u32,
    /// MAXH2CDATA: the largest H2CData PDU the target accepts (a multiple of 4, ≥ 4096).
    pub max_h2c_data: u32,
    /// Largest C2HData PDU the target sends (reads larger than this are split).
    pub max_c2h_data: u32,
    /// Largest data transfer of one command (MDTS), a power of two ≥ 4096.
    pub max_transfer: u32,
    /// Outstanding R2Ts per connection (the rest of the writes wait their turn).
    pub max_r2t_per_conn: u16,
    /// Keep Alive Support granularity reported in Identify (KAS, 100 ms units).
    pub kas: u16,
    /// Staging buffer per connection for headers and small data.
    pub rx_staging: usize,
    /// How long an idle poll group with connections sleeps at most before it looks at the
    /// keep-alive clocks and events raised by other threads (default 100 ms, the KAS unit).
    pub housekeeping: Duration,
    /// Connections the target holds at most (open, or closed and draining their commands);
    /// one more is closed as soon as it is accepted. Default 2048.
    pub max_connections: usize,
    /// Connections one host address holds at most. Default 512 (a Linux host opens one per
    /// queue: up to `max_io_queues` + 1 = 65 per controller by default, so about seven
    /// controllers; several hosts behind one NAT address share it).
    pub max_connections_per_host: usize,
    /// How long a connection may take from its accept to a successful Connect (ICReq/ICResp
    /// included) before it is closed. Default 10 s (the Linux host's own ICResp wait).
    pub connect_timeout: Duration,
    /// How long a write's data may take after its R2T (from the R2T, or from the last H2CData
    /// PDU of it that arrived) before the connection is ended with a C2HTermReq: a host that
    /// takes R2Ts and never sends the data must not hold the target's data buffers (DMA
    /// memory for a device backend) forever. Default 30 s (the Linux host's own I/O timeout:
    /// a host still waiting has given the command up by then).
    pub h2c_data_timeout: Duration,
    /// Rounds a connection leaves its socket unread after finding it empty, unless it sent
    /// something since or its group's sleep found the socket readable (see
    /// [`Connection::poll`](conn::Connection::poll)); 0 reads every round. Default 0: where
    /// the hosts share the target's CPU an empty `recv` also runs the kernel's pending network
    /// work, and skipping measured slower.
    pub recv_skip_rounds: u32,
}

impl TargetOptions {
    /// The options brought into what the protocol allows: queue depth 2..=1024, I/O queues
    /// 1..=1024, in-capsule size a multiple of 16 up to 1 MiB, MAXH2CDATA and the C2HData size
    /// multiples of 4 of at least 4096, the transfer size a power of two of 4 KiB..=16 MiB, at
    /// least one R2T, KAS at least 1, a staging buffer of at least 4 KiB, a housekeeping
    /// period of 1 ms..=1 h, at least one connection (per host too), a Connect timeout and an
    /// H2CData timeout of 1 ms..=1 h each, at most 2^20 rounds of unread sockets.
    pub fn normalized(mut self) -> TargetOptions {
        self.max_queue_depth = self.max_queue_depth.clamp(2, 1024);
        self.max_io_queues = self.max_io_queues.clamp(1, 1024);
        self.in_capsule = (self.in_capsule & !15).min(1 << 20);
        self.max_h2c_data = (self.max_h2c_data & !3).max(4096);
        self.max_c2h_data = (self.max_c2h_data & !3).max(4096);
        self.max_transfer = self
            .max_transfer
            .clamp(4096, 16 << 20)
            .checked_next_power_of_two()
            .unwrap_or(16 << 20)
            .min(16 << 20);
        self.max_r2t_per_conn = self.max_r2t_per_conn.max(1);
        self.kas = self.kas.max(1);
        self.rx_staging = self.rx_staging.max(4096);
        self.housekeeping = self
            .housekeeping
            .clamp(Duration::from_millis(1), Duration::from_secs(3600));
        self.max_connections = self.max_connections.max(1);
        self.max_connections_per_host = self.max_connections_per_host.max(1);
        self.connect_timeout = self
            .connect_timeout
            .clamp(Duration::from_millis(1), Duration::from_secs(3600));
        self.h2c_data_timeout = self
            .h2c_data_timeout
            .clamp(Duration::from_millis(1), Duration::from_secs(3600));
        self.recv_skip_rounds = self.recv_skip_rounds.min(1 << 20);
        self
    }
}

impl Default for TargetOptions {
    fn default() -> Self {
        TargetOptions {
            max_queue_depth: 128,
            max_io_queues: 64,
            in_capsule: 8192,
            max_h2c_data: 128 * 1024,
            max_c2h_data: 128 * 1024,
            max_transfer: 128 * 1024,
            max_r2t_per_conn: 16,
            kas: 1,
            rx_staging: 16 * 1024,
            housekeeping: Duration::from_millis(100),
            max_connections: 2048,
            max_connections_per_host: 512,
            connect_timeout: Duration::from_secs(10),
            h2c_data_timeout: Duration::from_secs(30),
            recv_skip_rounds: 0,
        }
    }
}

/// What kind of subsystem.
#[derive(Clone)]
pub(crate) enum Kind {
    /// An NVM subsystem and its storage.
    Nvm(Arc<dyn Backend>),
    /// The discovery subsystem.
    Discovery,
}

/// A subsystem: an NQN, the hosts allowed to connect, and (for an NVM subsystem) the backend.
pub struct Subsystem {
    nqn: String,
    kind: Kind,
    hosts: Vec<String>,
    any_host: bool,
    serial: String,
    io: IoCounts,
}

/// What the hosts did to a subsystem (its SMART page when the backend has no controller).
#[derive(Debug)]
struct IoCounts {
    since: Instant,
    reads: AtomicU64,
    writes: AtomicU64,
    read_bytes: AtomicU64,
    written_bytes: AtomicU64,
}

impl IoCounts {
    fn new() -> IoCounts {
        IoCounts {
            since: Instant::now(),
            reads: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            read_bytes: AtomicU64::new(0),
            written_bytes: AtomicU64::new(0),
        }
    }
}

impl core::fmt::Debug for Subsystem {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Subsystem")
            .field("nqn", &self.nqn)
            .field("hosts", &self.hosts)
            .field("any_host", &self.any_host)
            .finish()
    }
}

impl Subsystem {
    /// An NVM subsystem serving `backend`, open to any host until
    /// [`allow_host`](Self::allow_host) restricts it.
    pub fn new(nqn: impl Into<String>, backend: Arc<dyn Backend>) -> Subsystem {
        let nqn = nqn.into();
        let serial = format!("{:016x}", fold64(nqn.as_bytes()));
        Subsystem {
            nqn,
            kind: Kind::Nvm(backend),
            hosts: Vec::new(),
            any_host: true,
            serial,
            io: IoCounts::new(),
        }
    }
    fn discovery() -> Subsystem {
        Subsystem {
            nqn: DISCOVERY_NQN.into(),
            kind: Kind::Discovery,
            hosts: Vec::new(),
            any_host: true,
            serial: "discovery".into(),
            io: IoCounts::new(),
        }
    }
    /// Lets host `nqn` connect (and no host not listed).
    pub fn allow_host(mut self, nqn: impl Into<String>) -> Subsystem {
        self.hosts.push(nqn.into());
        self.any_host = false;
        self
    }
    /// The NQN.
    pub fn nqn(&self) -> &str {
        &self.nqn
    }
    /// True if `hostnqn` may connect.
    pub fn allows(&self, hostnqn: &str) -> bool {
        self.any_host || self.hosts.iter().any(|h| h == hostnqn)
    }
    /// The backend of an NVM subsystem.
    pub fn backend(&self) -> Option<&Arc<dyn Backend>> {
        match &self.kind {
            Kind::Nvm(b) => Some(b),
            Kind::Discovery => None,
        }
    }
    /// True for the discovery subsystem.
    pub fn is_discovery(&self) -> bool {
        matches!(self.kind, Kind::Discovery)
    }
    pub(crate) fn serial(&self) -> &str {
        &self.serial
    }
    /// Counts a Read or Write that completed successfully.
    pub(crate) fn count_io(&self, write: bool, bytes: u64) {
        let (n, b) = if write {
            (&self.io.writes, &self.io.written_bytes)
        } else {
            (&self.io.reads, &self.io.read_bytes)
        };
        n.fetch_add(1, Ordering::Relaxed);
        b.fetch_add(bytes, Ordering::Relaxed);
    }
    /// The SMART / Health Information the target knows without a controller: host Read and
    /// Write commands and data units (thousands of 512-byte units, rounded up) since the
    /// subsystem was added, power-on hours since then, one power cycle, nothing used of a
    /// full spare, no warning; the temperature is not known (0).
    pub fn smart_log(&self) -> SmartLog {
        let units = |b: &AtomicU64| (b.load(Ordering::Relaxed) as u128 / 512).div_ceil(1000);
        SmartLog {
            available_spare: 100,
            available_spare_threshold: 10,
            data_units_read: units(&self.io.read_bytes),
            data_units_written: units(&self.io.written_bytes),
            host_read_commands: self.io.reads.load(Ordering::Relaxed) as u128,
            host_write_commands: self.io.writes.load(Ordering::Relaxed) as u128,
            power_cycles: 1,
            power_on_hours: (self.io.since.elapsed().as_secs() / 3600) as u128,
            ..SmartLog::default()
        }
    }
}

/// A 64-bit fold of bytes (two CRC-32Cs): stable across runs and builds, for serial numbers
/// and namespace identifiers.
pub(crate) fn fold64(b: &[u8]) -> u64 {
    let lo = super::pdu::crc32c(b);
    let hi = super::pdu::crc32c_append(lo ^ 0x5bd1_e995, b);
    (hi as u64) << 32 | lo as u64
}

/// The controllers by CNTLID: live ones, and ended ones whose commands are still at the
/// backend (their CNTLID is not given out again before they drained).
#[derive(Default)]
struct CtrlTable {
    ctrls: HashMap<u16, Arc<Ctrl>>,
    next: u16,
}

/// Connections held, in total and per host address.
#[derive(Default)]
struct ConnTable {
    total: usize,
    per_host: HashMap<std::net::IpAddr, usize>,
}

/// A connection's place under the target's connection limits, given back when dropped.
pub(crate) struct ConnTicket {
    target: Arc<Target>,
    host: std::net::IpAddr,
}

impl Drop for ConnTicket {
    fn drop(&mut self) {
        let mut t = self.target.conns.lock().unwrap_or_else(|e| e.into_inner());
        t.total = t.total.saturating_sub(1);
        if let Some(n) = t.per_host.get_mut(&self.host) {
            *n -= 1;
            if *n == 0 {
                t.per_host.remove(&self.host);
            }
        }
    }
}

/// An NVMe/TCP target: subsystems, live controllers and the connection limits.
pub struct Target {
    opts: TargetOptions,
    subsystems: RwLock<Vec<Arc<Subsystem>>>,
    discovery: Arc<Subsystem>,
    ctrls: Mutex<CtrlTable>,
    conns: Mutex<ConnTable>,
    epoch: Instant,
    genctr: AtomicU64,
    portal: Mutex<Option<std::net::SocketAddr>>,
}

impl core::fmt::Debug for Target {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Target").field("opts", &self.opts).finish()
    }
}

impl Target {
    /// A target with no subsystem but the discovery subsystem. Options out of range are
    /// brought into it (see [`TargetOptions::normalized`]).
    pub fn new(opts: TargetOptions) -> Arc<Target> {
        Arc::new(Target {
            opts: opts.normalized(),
            subsystems: RwLock::new(Vec::new()),
            discovery: Arc::new(Subsystem::discovery()),
            ctrls: Mutex::new(CtrlTable {
                ctrls: HashMap::new(),
                next: 1,
            }),
            conns: Mutex::new(ConnTable::default()),
            epoch: Instant::now(),
            genctr: AtomicU64::new(1),
            portal: Mutex::new(None),
        })
    }

    /// The address the discovery log page gives for the NVM subsystems (by default the local
    /// address of the connection that asks, right unless discovery has a listener of its own).
    pub fn advertise(&self, addr: std::net::SocketAddr) {
        *self.portal.lock().unwrap_or_else(|e| e.into_inner()) = Some(addr);
        self.genctr.fetch_add(1, Ordering::Relaxed);
    }

    /// What [`advertise`](Self::advertise) set.
    pub(crate) fn portal(&self) -> Option<std::net::SocketAddr> {
        *self.portal.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The options.
    pub fn options(&self) -> &TargetOptions {
        &self.opts
    }

    /// Serves a subsystem (replacing one of the same NQN).
    pub fn add_subsystem(&self, s: Subsystem) -> Arc<Subsystem> {
        let s = Arc::new(s);
        let mut v = self.subsystems.write().unwrap_or_else(|e| e.into_inner());
        v.retain(|o| o.nqn != s.nqn);
        v.push(s.clone());
        self.genctr.fetch_add(1, Ordering::Relaxed);
        s
    }

    /// The subsystem of an NQN (the discovery subsystem included).
    pub fn subsystem(&self, nqn: &str) -> Option<Arc<Subsystem>> {
        if nqn == DISCOVERY_NQN {
            return Some(self.discovery.clone());
        }
        self.subsystems
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|s| s.nqn == nqn)
            .cloned()
    }

    /// The NVM subsystems.
    pub fn subsystems(&self) -> Vec<Arc<Subsystem>> {
        self.subsystems
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Discovery log generation counter.
    pub(crate) fn genctr(&self) -> u64 {
        self.genctr.load(Ordering::Relaxed)
    }

    /// Milliseconds since the target started (the keep-alive clock).
    pub(crate) fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Live controllers (associations not ended).
    pub fn controller_count(&self) -> usize {
        self.ctrls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .ctrls
            .values()
            .filter(|c| !c.is_dead())
            .count()
    }

    /// Ended associations whose commands are still at the backend (their CNTLIDs stay taken).
    pub fn draining_controller_count(&self) -> usize {
        self.ctrls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .ctrls
            .values()
            .filter(|c| c.is_dead() && !c.is_drained())
            .count()
    }

    /// A live controller by CNTLID.
    pub fn controller(&self, cntlid: u16) -> Option<Arc<Ctrl>> {
        self.ctrls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .ctrls
            .get(&cntlid)
            .filter(|c| !c.is_dead())
            .cloned()
    }

    /// Creates a controller for a new association; `None` when every CNTLID is taken. The
    /// CNTLID of an ended association is free again only once its commands drained.
    pub(crate) fn new_ctrl(
        &self,
        subsys: Arc<Subsystem>,
        hostnqn: String,
        hostid: [u8; 16],
        kato_ms: u32,
    ) -> Option<Arc<Ctrl>> {
        let mut t = self.ctrls.lock().unwrap_or_else(|e| e.into_inner());
        t.ctrls.retain(|_, c| !c.is_drained());
        for _ in 0..CNTLID_MAX {
            let id = t.next;
            t.next = if t.next >= CNTLID_MAX { 1 } else { t.next + 1 };
            if let std::collections::hash_map::Entry::Vacant(v) = t.ctrls.entry(id) {
                let c = Arc::new(Ctrl::new(
                    id,
                    subsys,
                    hostnqn,
                    hostid,
                    kato_ms,
                    self.now_ms(),
                    &self.opts,
                ));
                v.insert(c.clone());
                return Some(c);
            }
        }
        None
    }

    /// The CNTLID the next association gets if it is free (tests reuse one on purpose).
    #[cfg(test)]
    pub(crate) fn set_next_cntlid(&self, id: u16) {
        self.ctrls.lock().unwrap_or_else(|e| e.into_inner()).next = id;
    }

    /// Ends an association: its controller is gone for the host (its queues close, a new
    /// Connect cannot name it); its CNTLID stays taken until [`release_ctrl`](Self::release_ctrl)
    /// after its commands drained.
    pub(crate) fn end_ctrl(&self, c: &Ctrl) {
        c.kill();
    }

    /// Forgets an ended association whose commands drained (its CNTLID is free again);
    /// false while commands are still at the backend (then the next [`new_ctrl`] forgets it
    /// once they are done).
    ///
    /// [`new_ctrl`]: Self::new_ctrl
    pub(crate) fn release_ctrl(&self, c: &Ctrl) -> bool {
        c.kill();
        if !c.is_drained() {
            return false;
        }
        let mut t = self.ctrls.lock().unwrap_or_else(|e| e.into_inner());
        if t.ctrls
            .get(&c.cntlid)
            .is_some_and(|o| std::ptr::eq(&**o, c))
        {
            t.ctrls.remove(&c.cntlid);
        }
        true
    }

    /// Takes a place for a connection from `host` under the connection limits; `Err` names
    /// the limit reached.
    pub(crate) fn admit(self: &Arc<Self>, host: std::net::IpAddr) -> Result<ConnTicket, String> {
        let mut t = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        if t.total >= self.opts.max_connections {
            return Err(format!(
                "the target holds {} connections, its limit (max_connections)",
                t.total
            ));
        }
        let n = t.per_host.get(&host).copied().unwrap_or(0);
        if n >= self.opts.max_connections_per_host {
            return Err(format!(
                "host {host} holds {n} connections, the per-host limit (max_connections_per_host)"
            ));
        }
        t.total += 1;
        *t.per_host.entry(host).or_insert(0) += 1;
        Ok(ConnTicket {
            target: self.clone(),
            host,
        })
    }

    /// Connections held now (open, or closed and draining).
    pub fn connection_count(&self) -> usize {
        self.conns.lock().unwrap_or_else(|e| e.into_inner()).total
    }

    /// Tells the controllers of subsystem `nqn` that these namespaces changed (attributes,
    /// size, added or removed): Changed Namespace List and a Namespace Attribute Changed
    /// event for the hosts that enabled it.
    pub fn namespaces_changed(&self, nqn: &str, nsids: &[u32]) {
        let ctrls: Vec<_> = self
            .ctrls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .ctrls
            .values()
            .filter(|c| c.subsys.nqn == nqn)
            .cloned()
            .collect();
        for c in ctrls {
            c.namespaces_changed(nsids);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::TargetOptions;

    #[test]
    fn options_are_brought_into_range() {
        let o = TargetOptions {
            max_queue_depth: 0,
            max_io_queues: 0,
            in_capsule: 8199,
            max_h2c_data: 4098,
            max_c2h_data: 10,
            max_transfer: 100_000,
            max_r2t_per_conn: 0,
            kas: 0,
            rx_staging: 0,
            housekeeping: std::time::Duration::ZERO,
            max_connections: 0,
            max_connections_per_host: 0,
            connect_timeout: std::time::Duration::ZERO,
            h2c_data_timeout: std::time::Duration::ZERO,
            recv_skip_rounds: u32::MAX,
        }
        .normalized();
        assert_eq!((o.max_queue_depth, o.max_io_queues), (2, 1));
        assert_eq!(o.in_capsule, 8192);
        assert_eq!((o.max_h2c_data, o.max_c2h_data), (4096, 4096));
        assert_eq!(o.max_transfer, 128 * 1024);
        assert_eq!((o.max_r2t_per_conn, o.kas, o.rx_staging), (1, 1, 4096));
        assert_eq!(o.housekeeping, std::time::Duration::from_millis(1));
        assert_eq!((o.max_connections, o.max_connections_per_host), (1, 1));
        assert_eq!(o.connect_timeout, std::time::Duration::from_millis(1));
        assert_eq!(o.h2c_data_timeout, std::time::Duration::from_millis(1));
        assert_eq!(o.recv_skip_rounds, 1 << 20);
        let d = TargetOptions::default();
        assert_eq!(d.clone().normalized().max_transfer, d.max_transfer);
        assert_eq!(d.clone().normalized().max_h2c_data, d.max_h2c_data);
    }
}
