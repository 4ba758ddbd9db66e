//! An NVMe/TCP host: queues over non-blocking sockets, polled by the thread that owns them.
//!
//! * [`HostQueue`]: one TCP connection = one NVMe queue. [`HostQueue::submit`] queues a
//!   command (write data in-capsule when it fits the queue's in-capsule size, otherwise sent in
//!   H2CData PDUs of at most MAXH2CDATA when the target's R2T asks for it);
//!   [`HostQueue::poll`] sends what the socket takes and handles what arrived (C2HData
//!   reassembled into the command's buffer, R2Ts, response capsules); finished commands are
//!   taken with [`HostQueue::pop`]. [`HostQueue::run`] is the blocking form with a timeout.
//! * [`HostController`]: an association: the admin queue brought up the way the Linux host
//!   does it (ICReq, Fabrics Connect, Property Get CAP, Property Set CC.EN, wait for
//!   CSTS.RDY, Identify, Number of Queues), I/O queues connected with its CNTLID, Keep Alive,
//!   discovery, and a clean shutdown (CC.SHN) on [`HostController::shutdown`].
//!
//! Every transport failure is a [`HostError`] naming it: refused connection, a C2HTermReq and
//! its reason, a malformed PDU from the target (answered with an H2CTermReq), a data digest
//! mismatch (the command fails), a timeout. After a fatal error every command still
//! outstanding completes exactly once with [`HostError::Lost`].

use std::collections::VecDeque;
use std::io::{self, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use super::fabrics::{self, CNTLID_DYNAMIC, Connect, ConnectData, FabricsIdentify, Sgl, prop};
use super::pdu::{
    self, DataHdr, Digests, FatalError, Fes, IcReq, Pdu, PduReader, RecvConfig, RecvError, Role,
    RxBuf, TermReq, field,
};
use crate::spec::identify::IDENTIFY_LEN;
use crate::spec::sqe::{cns, io as opc};
use crate::spec::{Cap, Cc, Cqe, Csts, IdentifyController, Sqe, Status};

/// How a host connects.
#[derive(Clone, Debug)]
pub struct HostOptions {
    /// NQN of the subsystem.
    pub subnqn: String,
    /// NQN of this host.
    pub hostnqn: String,
    /// Host identifier.
    pub hostid: [u8; 16],
    /// Digests to ask for.
    pub digests: Digests,
    /// Keep Alive Timeout asked for in Connect (ms; 0: none).
    pub kato_ms: u32,
    /// Entries of the admin queue.
    pub admin_queue_size: u16,
    /// Time limit of connection set-up and of each blocking call.
    pub timeout: Duration,
}

impl HostOptions {
    /// Options for subsystem `subnqn` with a host NQN and ID of this process.
    pub fn new(subnqn: impl Into<String>) -> HostOptions {
        HostOptions {
            subnqn: subnqn.into(),
            hostnqn: "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-000000000000".into(),
            hostid: [0x11; 16],
            digests: Digests::default(),
            kato_ms: 0,
            admin_queue_size: 32,
            timeout: Duration::from_secs(10),
        }
    }
}

/// Why a host operation failed.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The TCP connection could not be made.
    #[error("failed to connect to {addr}: {source}; is the target listening there?")]
    Connect {
        /// Target address.
        addr: SocketAddr,
        /// The system error.
        #[source]
        source: io::Error,
    },
    /// The socket failed.
    #[error("NVMe/TCP socket error: {0}")]
    Io(#[source] io::Error),
    /// The target closed the connection.
    #[error("the target closed the connection")]
    Closed,
    /// The target terminated the connection with a C2HTermReq.
    #[error("the target terminated the connection: {fes:?} (FEI {fei:#x})")]
    Terminated {
        /// Fatal Error Status.
        fes: Fes,
        /// Fatal Error Information.
        fei: u32,
    },
    /// The target sent a malformed PDU (an H2CTermReq was sent back).
    #[error("the target broke the protocol: {0}")]
    Protocol(#[source] FatalError),
    /// ICResp refused.
    #[error("ICResp refused: {0}")]
    IcResp(&'static str),
    /// A command completed with an error status.
    #[error("{what} failed: {status:?} (DW0 {dw0:#x})")]
    Status {
        /// The command.
        what: &'static str,
        /// Its status.
        status: Status,
        /// DW0 of the completion.
        dw0: u32,
    },
    /// The data of a command arrived with a bad data digest.
    #[error("data digest mismatch on the data of command {cid}")]
    DataDigest {
        /// Command ID.
        cid: u16,
    },
    /// No answer in time.
    #[error("{what} timed out after {after:?}")]
    Timeout {
        /// What was waited for.
        what: &'static str,
        /// How long.
        after: Duration,
    },
    /// The queue has no free command slot.
    #[error("the queue is full ({0} commands outstanding)")]
    QueueFull(usize),
    /// The controller is not usable (Identify fields the host needs are wrong).
    #[error("controller not usable: {0}")]
    Controller(String),
    /// The connection failed earlier; the command was lost with it.
    #[error("controller lost: {0}; reconnect to go on")]
    Lost(String),
}

/// Data of a host command.
#[derive(Debug)]
pub enum HostData {
    /// No data.
    None,
    /// Data to the controller (a write).
    Out(Vec<u8>),
    /// A buffer for data from the controller (a read), its length the transfer length.
    In(Vec<u8>),
}

/// A finished command.
#[derive(Debug)]
pub struct HostCompletion {
    /// The caller's tag.
    pub tag: u64,
    /// The completion, or why the command failed at the transport.
    pub result: Result<Cqe, HostError>,
    /// The command's buffer (read data for a read).
    pub buf: Vec<u8>,
}

#[derive(Debug)]
struct Cmd {
    tag: u64,
    buf: Vec<u8>,
    out: bool,
    len: u32,
    c2h_got: u32,
    digest_bad: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rx {
    Header,
    Data {
        cid: u16,
        off: u32,
        len: u32,
        last_success: bool,
    },
}

/// One NVMe/TCP connection of a host: one queue.
pub struct HostQueue {
    sock: TcpStream,
    reader: PduReader,
    rx_buf: RxBuf,
    rx: Rx,
    digests: Digests,
    cpda: u8,
    maxh2cdata: u32,
    in_capsule: u32,
    qid: u16,
    cmds: Vec<Option<Cmd>>,
    free: Vec<u16>,
    out: Vec<u8>,
    sent: usize,
    done: VecDeque<HostCompletion>,
    dead: Option<String>,
    timeout: Duration,
}

impl core::fmt::Debug for HostQueue {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("HostQueue").field("qid", &self.qid).finish()
    }
}

fn io_err(e: RecvError) -> HostError {
    match e {
        RecvError::Closed => HostError::Closed,
        RecvError::Io(e) => HostError::Io(e),
        RecvError::Fatal(f) => HostError::Protocol(f),
    }
}

impl HostQueue {
    /// Opens a connection and exchanges ICReq/ICResp (not yet Connect).
    pub fn open(
        addr: SocketAddr,
        opts: &HostOptions,
        entries: u16,
    ) -> Result<HostQueue, HostError> {
        let sock = TcpStream::connect_timeout(&addr, opts.timeout)
            .map_err(|source| HostError::Connect { addr, source })?;
        sock.set_nodelay(true).map_err(HostError::Io)?;
        sock.set_nonblocking(true).map_err(HostError::Io)?;
        let n = entries.max(2);
        let mut q = HostQueue {
            sock,
            reader: PduReader::new(RecvConfig::new(Role::Host)),
            rx_buf: RxBuf::new(64 * 1024),
            rx: Rx::Header,
            digests: Digests::default(),
            cpda: 0,
            maxh2cdata: 4096,
            in_capsule: fabrics_admin_in_capsule(),
            qid: 0,
            // CID = slot index; one slot more than the queue so a Connect fits.
            cmds: (0..n).map(|_| None).collect(),
            free: (0..n).rev().collect(),
            out: Vec::with_capacity(64 * 1024),
            sent: 0,
            done: VecDeque::new(),
            dead: None,
            timeout: opts.timeout,
        };
        let req = Pdu::IcReq(IcReq {
            pfv: 0,
            hpda: 0,
            digests: opts.digests,
            maxr2t: 0,
        });
        q.out
            .extend_from_slice(pdu::encode(&req, 0, Digests::default(), 0).as_bytes());
        let deadline = Instant::now() + opts.timeout;
        loop {
            q.send()?;
            match q.reader.poll_header(&mut q.rx_buf, &mut q.sock) {
                Ok(Some(Pdu::IcResp(r))) => {
                    if r.digests != opts.digests {
                        return Err(HostError::IcResp("digests do not echo the ICReq"));
                    }
                    if r.cpda != 0 {
                        return Err(HostError::IcResp("CPDA is not 0"));
                    }
                    q.digests = r.digests;
                    q.cpda = r.cpda;
                    q.maxh2cdata = r.maxh2cdata;
                    q.reader.cfg.ic_done = true;
                    q.reader.cfg.digests = r.digests;
                    q.reader.cfg.pda = 0;
                    return Ok(q);
                }
                Ok(Some(Pdu::C2hTermReq(t))) => {
                    return Err(HostError::Terminated {
                        fes: t.fes,
                        fei: t.fei,
                    });
                }
                Ok(Some(_)) => {
                    return Err(HostError::IcResp("the first PDU is not an ICResp"));
                }
                Ok(None) => {}
                Err(e) => return Err(io_err(e)),
            }
            if Instant::now() > deadline {
                return Err(HostError::Timeout {
                    what: "ICResp",
                    after: opts.timeout,
                });
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    /// The raw socket (tests write malformed PDUs through it).
    pub fn socket(&self) -> &TcpStream {
        &self.sock
    }
    /// The negotiated digests.
    pub fn digests(&self) -> Digests {
        self.digests
    }
    /// The target's MAXH2CDATA.
    pub fn max_h2c_data(&self) -> u32 {
        self.maxh2cdata
    }
    /// The queue ID (after Connect).
    pub fn qid(&self) -> u16 {
        self.qid
    }
    /// Commands outstanding.
    pub fn outstanding(&self) -> usize {
        self.cmds.len() - self.free.len()
    }
    /// Sets the in-capsule data limit (from IOCCSZ, for an I/O queue).
    pub fn set_in_capsule(&mut self, bytes: u32) {
        self.in_capsule = bytes;
    }

    /// Queues a command; its completion comes out of [`pop`](Self::pop).
    pub fn submit(&mut self, mut sqe: Sqe, data: HostData, tag: u64) -> Result<u16, HostError> {
        if let Some(why) = &self.dead {
            return Err(HostError::Lost(why.clone()));
        }
        let Some(cid) = self.free.pop() else {
            return Err(HostError::QueueFull(self.cmds.len()));
        };
        sqe.set_cid(cid);
        let (buf, out) = match data {
            HostData::None => (Vec::new(), false),
            HostData::Out(v) => (v, true),
            HostData::In(v) => (v, false),
        };
        let len = buf.len() as u32;
        let incapsule = out && len > 0 && len <= self.in_capsule;
        if incapsule {
            Sgl::incapsule(len).set(&mut sqe);
        } else {
            Sgl::transport(len).set(&mut sqe);
        }
        let dlen = if incapsule { len } else { 0 };
        let hdr = pdu::encode(&Pdu::CapsuleCmd(sqe, dlen), dlen, self.digests, self.cpda);
        self.out.extend_from_slice(hdr.as_bytes());
        if incapsule {
            self.out.extend_from_slice(&buf);
            if self.digests.data {
                self.out.extend_from_slice(&pdu::crc32c(&buf).to_le_bytes());
            }
        }
        self.cmds[cid as usize] = Some(Cmd {
            tag,
            buf,
            out,
            len,
            c2h_got: 0,
            digest_bad: false,
        });
        Ok(cid)
    }

    /// The next finished command.
    pub fn pop(&mut self) -> Option<HostCompletion> {
        self.done.pop_front()
    }

    fn send(&mut self) -> Result<usize, HostError> {
        let mut n = 0;
        while self.sent < self.out.len() {
            match self.sock.write(&self.out[self.sent..]) {
                Ok(0) => return Err(HostError::Closed),
                Ok(k) => {
                    self.sent += k;
                    n += k;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(HostError::Io(e)),
            }
        }
        if self.sent == self.out.len() {
            self.out.clear();
            self.sent = 0;
        } else if self.sent > 1 << 20 {
            self.out.drain(..self.sent);
            self.sent = 0;
        }
        Ok(n)
    }

    /// Sends and receives what can be without blocking; returns the progress made. A fatal
    /// error fails every outstanding command (with [`HostError::Lost`]) and is returned.
    pub fn poll(&mut self) -> Result<usize, HostError> {
        if let Some(why) = &self.dead {
            return Err(HostError::Lost(why.clone()));
        }
        match self.poll_inner() {
            Ok(n) => Ok(n),
            Err(e) => {
                if let HostError::Protocol(f) = &e {
                    self.send_term(*f);
                }
                let why = e.to_string();
                log::warn!("nvmf host: queue {} lost: {why}", self.qid);
                self.fail_all(&why);
                self.dead = Some(why);
                let _ = self.sock.shutdown(std::net::Shutdown::Both);
                Err(e)
            }
        }
    }

    fn send_term(&mut self, f: FatalError) {
        let mut data = self.reader.raw_header().to_vec();
        data.truncate(pdu::MAX_TERM_DATA);
        let h = pdu::encode(
            &Pdu::H2cTermReq(TermReq {
                fes: f.fes,
                fei: f.fei,
            }),
            data.len() as u32,
            self.digests,
            self.cpda,
        );
        self.out.clear();
        self.sent = 0;
        self.out.extend_from_slice(h.as_bytes());
        self.out.extend_from_slice(&data);
        let _ = self.sock.set_nonblocking(false);
        let _ = self.sock.set_write_timeout(Some(Duration::from_secs(1)));
        let _ = self.sock.write_all(&self.out);
    }

    fn fail_all(&mut self, why: &str) {
        for (cid, c) in self.cmds.iter_mut().enumerate() {
            if let Some(c) = c.take() {
                self.free.push(cid as u16);
                self.done.push_back(HostCompletion {
                    tag: c.tag,
                    result: Err(HostError::Lost(why.to_owned())),
                    buf: c.buf,
                });
            }
        }
    }

    fn poll_inner(&mut self) -> Result<usize, HostError> {
        let mut work = self.send()?;
        for _ in 0..64 {
            match self.rx {
                Rx::Header => match self.reader.poll_header(&mut self.rx_buf, &mut self.sock) {
                    Ok(Some(p)) => {
                        work += 1;
                        self.on_pdu(p)?;
                    }
                    Ok(None) => break,
                    Err(e) => return Err(io_err(e)),
                },
                Rx::Data {
                    cid,
                    off,
                    len,
                    last_success,
                } => {
                    let Some(c) = self.cmds[cid as usize].as_mut() else {
                        return Err(HostError::Protocol(FatalError::field(
                            field::CCCID,
                            "C2HData for a command that is gone",
                        )));
                    };
                    let dst = &mut c.buf[off as usize..(off + len) as usize];
                    match self.reader.poll_data(&mut self.rx_buf, &mut self.sock, dst) {
                        Ok(Some(ok)) => {
                            work += 1;
                            self.rx = Rx::Header;
                            c.c2h_got += len;
                            if !ok {
                                c.digest_bad = true;
                            }
                            if last_success {
                                let cqe = Cqe {
                                    cid,
                                    sq_id: self.qid,
                                    ..Cqe::default()
                                };
                                self.finish(cid, cqe);
                            }
                        }
                        Ok(None) => break,
                        Err(e) => return Err(io_err(e)),
                    }
                }
            }
        }
        work += self.send()?;
        Ok(work)
    }

    fn finish(&mut self, cid: u16, cqe: Cqe) {
        let Some(c) = self.cmds[cid as usize].take() else {
            return;
        };
        self.free.push(cid);
        let result = if c.digest_bad {
            Err(HostError::DataDigest { cid })
        } else if !c.out && c.len > 0 && c.c2h_got != c.len && cqe.status().is_success() {
            Err(HostError::Protocol(FatalError::new(
                Fes::SequenceError,
                "response before all of the read data",
            )))
        } else {
            Ok(cqe)
        };
        self.done.push_back(HostCompletion {
            tag: c.tag,
            result,
            buf: c.buf,
        });
    }

    fn on_pdu(&mut self, p: Pdu) -> Result<(), HostError> {
        match p {
            Pdu::CapsuleResp(cqe) => {
                if self.cmds.get(cqe.cid as usize).is_none_or(|c| c.is_none()) {
                    return Err(HostError::Protocol(FatalError::field(
                        8 + 12,
                        "response for a command not outstanding",
                    )));
                }
                self.finish(cqe.cid, cqe);
                Ok(())
            }
            Pdu::C2hData(d) => self.on_c2h(d),
            Pdu::R2t(r) => {
                let Some(c) = self
                    .cmds
                    .get(r.cccid as usize)
                    .and_then(|c| c.as_ref())
                    .filter(|c| c.out)
                else {
                    return Err(HostError::Protocol(FatalError::field(
                        field::CCCID,
                        "R2T for no outstanding write",
                    )));
                };
                if r.offset as u64 + r.len as u64 > c.len as u64 {
                    return Err(HostError::Protocol(FatalError::new(
                        Fes::DataOutOfRange,
                        "R2T beyond the command's data",
                    )));
                }
                let mut off = r.offset;
                let end = r.offset + r.len;
                while off < end {
                    let len = self.maxh2cdata.min(end - off);
                    let d = DataHdr {
                        cccid: r.cccid,
                        ttag: r.ttag,
                        offset: off,
                        len,
                        last: off + len == end,
                        success: false,
                    };
                    let h = pdu::encode(&Pdu::H2cData(d), len, self.digests, self.cpda);
                    self.out.extend_from_slice(h.as_bytes());
                    let data = &c.buf[off as usize..(off + len) as usize];
                    self.out.extend_from_slice(data);
                    if self.digests.data {
                        self.out.extend_from_slice(&pdu::crc32c(data).to_le_bytes());
                    }
                    off += len;
                }
                Ok(())
            }
            Pdu::C2hTermReq(t) => Err(HostError::Terminated {
                fes: t.fes,
                fei: t.fei,
            }),
            _ => Err(HostError::Protocol(FatalError::new(
                Fes::SequenceError,
                "unexpected PDU",
            ))),
        }
    }

    fn on_c2h(&mut self, d: DataHdr) -> Result<(), HostError> {
        let Some(c) = self
            .cmds
            .get(d.cccid as usize)
            .and_then(|c| c.as_ref())
            .filter(|c| !c.out)
        else {
            return Err(HostError::Protocol(FatalError::field(
                field::CCCID,
                "C2HData for no outstanding read",
            )));
        };
        if d.offset as u64 + d.len as u64 > c.len as u64 {
            return Err(HostError::Protocol(FatalError::new(
                Fes::DataOutOfRange,
                "C2HData beyond the command's buffer",
            )));
        }
        if d.offset != c.c2h_got {
            return Err(HostError::Protocol(FatalError::field(
                field::DATAO,
                "C2HData out of order",
            )));
        }
        self.rx = Rx::Data {
            cid: d.cccid,
            off: d.offset,
            len: d.len,
            last_success: d.success,
        };
        Ok(())
    }

    /// Submits and polls until the command finishes (or the queue's timeout): the completion
    /// (an error status is an error) and the buffer.
    pub fn run(
        &mut self,
        what: &'static str,
        sqe: Sqe,
        data: HostData,
    ) -> Result<(Cqe, Vec<u8>), HostError> {
        let tag = u64::MAX - 1;
        self.submit(sqe, data, tag)?;
        let deadline = Instant::now() + self.timeout;
        loop {
            if let Some(pos) = self.done.iter().position(|c| c.tag == tag) {
                let c = self.done.remove(pos).expect("found");
                let cqe = c.result?;
                let status = cqe.status();
                if !status.is_success() {
                    return Err(HostError::Status {
                        what,
                        status,
                        dw0: cqe.dw0,
                    });
                }
                return Ok((cqe, c.buf));
            }
            if self.poll()? == 0 {
                if Instant::now() > deadline {
                    return Err(HostError::Timeout {
                        what,
                        after: self.timeout,
                    });
                }
                std::thread::sleep(Duration::from_micros(20));
            }
        }
    }

    /// Fabrics Connect of this queue; returns the CNTLID.
    pub fn connect(
        &mut self,
        opts: &HostOptions,
        qid: u16,
        entries: u16,
        cntlid: u16,
    ) -> Result<u16, HostError> {
        let sqe = Connect {
            recfmt: 0,
            qid,
            sqsize: entries.saturating_sub(1),
            cattr: 0,
            kato: if qid == 0 { opts.kato_ms } else { 0 },
        }
        .to_sqe();
        let data = ConnectData {
            hostid: opts.hostid,
            cntlid,
            subnqn: opts.subnqn.clone(),
            hostnqn: opts.hostnqn.clone(),
        }
        .to_bytes()
        .to_vec();
        let in_capsule = self.in_capsule;
        self.in_capsule = in_capsule.max(data.len() as u32);
        let r = self.run("Connect", sqe, HostData::Out(data));
        self.in_capsule = in_capsule;
        let (cqe, _) = r?;
        self.qid = qid;
        Ok(cqe.dw0 as u16)
    }

    /// Read `blocks` blocks of `block_size` bytes at `slba` of `nsid`.
    pub fn read(
        &mut self,
        nsid: u32,
        slba: u64,
        blocks: u32,
        block_size: u32,
    ) -> Result<Vec<u8>, HostError> {
        let sqe = Sqe::rw(opc::READ, nsid, slba, blocks, false);
        let buf = vec![0u8; (blocks * block_size) as usize];
        Ok(self.run("Read", sqe, HostData::In(buf))?.1)
    }

    /// Write `data` (whole blocks) at `slba` of `nsid`.
    pub fn write(
        &mut self,
        nsid: u32,
        slba: u64,
        data: Vec<u8>,
        block_size: u32,
    ) -> Result<(), HostError> {
        let blocks = (data.len() / block_size as usize) as u32;
        let sqe = Sqe::rw(opc::WRITE, nsid, slba, blocks, false);
        self.run("Write", sqe, HostData::Out(data)).map(|_| ())
    }

    /// Flush `nsid`.
    pub fn flush(&mut self, nsid: u32) -> Result<(), HostError> {
        self.run("Flush", Sqe::flush(nsid), HostData::None)
            .map(|_| ())
    }
}

/// In-capsule data of an admin queue, as the Linux host assumes (8 KiB).
const fn fabrics_admin_in_capsule() -> u32 {
    8192
}

/// An association with a controller: its admin queue and what Identify said.
#[derive(Debug)]
pub struct HostController {
    addr: SocketAddr,
    opts: HostOptions,
    admin: HostQueue,
    cntlid: u16,
    cap: Cap,
    identify: IdentifyController,
    fabrics: FabricsIdentify,
    io_queues: u16,
    next_qid: u16,
}

impl HostController {
    /// Connects the admin queue and brings the controller up.
    pub fn connect(addr: SocketAddr, opts: HostOptions) -> Result<HostController, HostError> {
        let mut admin = HostQueue::open(addr, &opts, opts.admin_queue_size)?;
        let cntlid = admin.connect(&opts, 0, opts.admin_queue_size, CNTLID_DYNAMIC)?;
        let (c, _) = admin.run(
            "Property Get CAP",
            fabrics::property_get(prop::CAP, true),
            HostData::None,
        )?;
        let cap = Cap(c.dw0 as u64 | (c.dw1 as u64) << 32);
        let cc = Cc(0).with_en(true).with_iosqes(6).with_iocqes(4);
        admin.run(
            "Property Set CC",
            fabrics::property_set(prop::CC, false, cc.0 as u64),
            HostData::None,
        )?;
        let deadline = Instant::now() + opts.timeout;
        loop {
            let (c, _) = admin.run(
                "Property Get CSTS",
                fabrics::property_get(prop::CSTS, false),
                HostData::None,
            )?;
            let csts = Csts(c.dw0);
            if csts.cfs() {
                return Err(HostError::Controller("CSTS.CFS set".into()));
            }
            if csts.rdy() {
                break;
            }
            if Instant::now() > deadline {
                return Err(HostError::Timeout {
                    what: "CSTS.RDY",
                    after: opts.timeout,
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
        let disc = fab.cntrltype == 2;
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
            identify,
            fabrics: fab,
            io_queues,
            next_qid: 1,
        })
    }

    /// The CNTLID.
    pub fn cntlid(&self) -> u16 {
        self.cntlid
    }
    /// CAP.
    pub fn cap(&self) -> Cap {
        self.cap
    }
    /// Identify Controller.
    pub fn identify(&self) -> &IdentifyController {
        &self.identify
    }
    /// The fabrics fields of Identify Controller.
    pub fn fabrics_identify(&self) -> FabricsIdentify {
        self.fabrics
    }
    /// I/O queues granted.
    pub fn io_queue_count(&self) -> u16 {
        self.io_queues
    }
    /// The admin queue (for commands this type does not wrap).
    pub fn admin(&mut self) -> &mut HostQueue {
        &mut self.admin
    }

    /// Connects the next I/O queue with `entries` entries.
    pub fn io_queue(&mut self, entries: u16) -> Result<HostQueue, HostError> {
        let qid = self.next_qid;
        let mut q = HostQueue::open(self.addr, &self.opts, entries)?;
        q.connect(&self.opts, qid, entries, self.cntlid)?;
        q.set_in_capsule((self.fabrics.ioccsz * 16).saturating_sub(64));
        self.next_qid += 1;
        Ok(q)
    }

    /// Keep Alive.
    pub fn keep_alive(&mut self) -> Result<(), HostError> {
        self.admin
            .run(
                "Keep Alive",
                Sqe::new(crate::spec::sqe::admin::KEEP_ALIVE),
                HostData::None,
            )
            .map(|_| ())
    }

    /// Identify Namespace: (blocks, block size).
    pub fn namespace(&mut self, nsid: u32) -> Result<(u64, u32), HostError> {
        let (_, b) = self.admin.run(
            "Identify Namespace",
            Sqe::identify(cns::NAMESPACE, nsid, 0),
            HostData::In(vec![0u8; IDENTIFY_LEN]),
        )?;
        let page: &[u8; IDENTIFY_LEN] = b[..]
            .try_into()
            .map_err(|_| HostError::Controller("short Identify Namespace".into()))?;
        let id = crate::spec::IdentifyNamespace::from_bytes(page);
        Ok((id.nsze, id.block_size()))
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

    /// The discovery log page records (as `nvme discover` reads it: header first, then all).
    pub fn discover(&mut self) -> Result<Vec<fabrics::DiscoveryEntry>, HostError> {
        let head = self.log_page(fabrics::lid::DISCOVERY, 0, 1024, 0)?;
        let n = u64::from_le_bytes(head[8..16].try_into().unwrap_or([0; 8])).min(64);
        let all = self.log_page(fabrics::lid::DISCOVERY, 0, (1024 * (n + 1)) as u32, 0)?;
        let (_, _, recs) = fabrics::parse_discovery_log(&all)
            .ok_or_else(|| HostError::Controller("short discovery log".into()))?;
        Ok(recs)
    }

    /// Shuts the controller down (CC.SHN, wait for CSTS.SHST complete) and disconnects.
    pub fn shutdown(mut self) -> Result<(), HostError> {
        let (c, _) = self.admin.run(
            "Property Get CC",
            fabrics::property_get(prop::CC, false),
            HostData::None,
        )?;
        let cc = Cc(c.dw0).with_shn(crate::spec::regs::shn::NORMAL);
        self.admin.run(
            "Property Set CC",
            fabrics::property_set(prop::CC, false, cc.0 as u64),
            HostData::None,
        )?;
        let (c, _) = self.admin.run(
            "Property Get CSTS",
            fabrics::property_get(prop::CSTS, false),
            HostData::None,
        )?;
        if Csts(c.dw0).shst() != crate::spec::regs::shst::COMPLETE {
            return Err(HostError::Controller("shutdown did not complete".into()));
        }
        let _ = self
            .admin
            .run("Disconnect", fabrics::disconnect(), HostData::None);
        Ok(())
    }
}
