//! One NVMe/TCP connection of the target: one NVMe queue.
//!
//! The connection is a state machine driven by [`Connection::poll`], which never blocks: it
//! drains the backend's completions, sends what the socket takes, reads and handles what the
//! socket has (a bounded number of PDUs per call), issues R2Ts, and sends again.
//!
//! **Command slots.** A fixed table of `max_queue_depth` slots (at least 32, an admin queue's), allocated when the connection
//! is accepted; a command holds one from its capsule to the moment its response capsule left
//! the socket. A slot owns the command's data buffer (from [`Backend::alloc`]: DMA memory for a
//! device backend): in-capsule data and H2CData are read from the socket straight into it,
//! C2HData is written from it. A host with more commands outstanding than its SQSIZE gets a
//! C2HTermReq; a write larger than the in-capsule size waits for one of `max_r2t_per_conn`
//! R2Ts; the send queue is bounded (reading stops while it is full), so one client can make the
//! target hold at most `max_queue_depth × max_transfer` bytes of data.
//!
//! **Errors.** A malformed PDU (see [`crate::nvmf::pdu`]) gets a C2HTermReq carrying its header
//! and the connection closes; a bad command gets the status the specification names, and the
//! connection goes on. A data digest error fails the command with Transient Transport Error.
//! Nothing is submitted to the backend before all of a write's data arrived, so a host that
//! vanishes mid-transfer leaves nothing half written.

use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;

mod fabrics_cmd;
mod io_cmd;
mod send;

use super::Target;
use super::ctrl::{AERL, AdminOut, Ctrl};
use super::wait::{Interest, Notifier};
use crate::IoBuffer;
use crate::nvmf::backend::{CompletionQueue, NsInfo};
use crate::nvmf::fabrics::{self, SGL_INCAPSULE, SGL_TRANSPORT, Sgl, sc as fsc};
use crate::nvmf::pdu::{
    self, DataHdr, Digests, EncodedHdr, FatalError, Fes, IcResp, Pdu, PduReader, R2t, RecvConfig,
    RecvError, Role, RxBuf, TermReq, field,
};
use crate::spec::sqe::io as opc;
use crate::spec::status::generic;
use crate::spec::{Sct, Sqe, Status};

/// Depth an admin queue may have (SQSIZE + 1) even when `max_queue_depth` is lower: the Linux
/// host always connects its admin queue with 32 entries.
pub(crate) const ADMIN_QUEUE_DEPTH: u16 = 32;

/// In-capsule data limit of an admin queue (and of a queue before Connect): 8 KiB, as the
/// Linux host assumes.
pub const ADMIN_IN_CAPSULE: u32 = 8192;
/// How long a closing connection may take to send its last PDUs.
const LINGER: Duration = Duration::from_secs(2);
/// The socket as one [`Connection::recv`] reads it: once a read returned less than it asked
/// for, the socket is empty, and a further read in this call would only cost a system call
/// to learn it, so it is `WouldBlock` without asking (the next poll reads again).
struct UntilShort<'a> {
    sock: &'a mut TcpStream,
    drained: &'a mut bool,
}

impl io::Read for UntilShort<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if *self.drained {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = self.sock.read(buf)?;
        *self.drained = n < buf.len();
        Ok(n)
    }
}

/// Counters of one connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnStats {
    /// PDUs received.
    pub pdus_in: u64,
    /// PDUs sent.
    pub pdus_out: u64,
    /// Commands completed.
    pub commands: u64,
    /// Commands that ended with an error status.
    pub errors: u64,
    /// C2HTermReqs sent.
    pub term_sent: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Free,
    /// Receiving in-capsule data or waiting for / receiving H2CData.
    DataIn,
    /// Waiting for an R2T slot.
    WaitR2t,
    /// R2T sent, H2CData expected.
    R2tSent,
    /// At the backend.
    Executing,
    /// An Asynchronous Event Request, held.
    Aer,
    /// Response queued.
    Responding,
}

#[derive(Debug)]
struct Slot {
    phase: Phase,
    generation: u32,
    sqe: Sqe,
    buf: Option<IoBuffer>,
    /// Data length of the command.
    len: u32,
    /// H2C bytes received so far.
    got: u32,
    /// An error to report once the data phase is over.
    bad: Option<Status>,
}

#[derive(Debug)]
enum TxData {
    None,
    Slot { slot: u16, off: u32, len: u32 },
    Owned(Vec<u8>),
}

#[derive(Debug)]
struct TxItem {
    hdr: EncodedHdr,
    data: TxData,
    ddgst: Option<[u8; 4]>,
    sent: usize,
    release: Option<u16>,
    close_after: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rx {
    /// Between PDUs.
    Header,
    /// Receiving data into a slot's buffer.
    Data {
        slot: u16,
        off: u32,
        len: u32,
        h2c: bool,
    },
    /// Throwing PDU data away (a TermReq's, or a refused command's).
    Discard { slot: Option<u16> },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    AwaitIcReq,
    Ready,
    Closing(Instant),
    Closed,
}

struct Binding {
    ctrl: Arc<Ctrl>,
    qid: u16,
    sqsize: u16,
    generation: u32,
}

/// One connection (one NVMe queue) of the target.
pub struct Connection {
    target: Arc<Target>,
    sock: TcpStream,
    local: SocketAddr,
    peer: SocketAddr,
    reader: PduReader,
    rx_buf: RxBuf,
    rx: Rx,
    state: State,
    digests: Digests,
    hpda: u8,
    queue: Option<Binding>,
    slots: Vec<Slot>,
    free: Vec<u16>,
    outstanding: u16,
    cq: CompletionQueue,
    tx: VecDeque<TxItem>,
    r2t_wait: VecDeque<u16>,
    r2t_out: u16,
    sq_head: u16,
    nss: Vec<NsInfo>,
    stats: ConnStats,
    why: Option<String>,
    notifier: Option<Arc<Notifier>>,
}

impl core::fmt::Debug for Connection {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Connection")
            .field("peer", &self.peer)
            .field("state", &self.state)
            .field("qid", &self.queue.as_ref().map(|b| b.qid))
            .finish()
    }
}

fn st(sc: u8) -> Status {
    Status::new(Sct::Generic, sc)
}
fn dnr(sc: u8) -> Status {
    st(sc).with_dnr(true)
}
fn cs_dnr(sc: u8) -> Status {
    Status::new(Sct::CommandSpecific, sc).with_dnr(true)
}

/// Direction of a command's data from its opcode (or FCTYPE): bits 1:0 = 01b host to
/// controller, 10b controller to host.
fn data_in(sqe: &Sqe) -> bool {
    let code = if sqe.opcode() == fabrics::OPCODE {
        fabrics::fctype_of(sqe)
    } else {
        sqe.opcode()
    };
    code & 3 == 1
}

impl Connection {
    /// Takes an accepted socket (made non-blocking here, Nagle off); backend completions ring
    /// `notifier` (the poll group's, to wake it from [`wait`](super::PollGroup::wait)).
    pub fn new(
        target: Arc<Target>,
        sock: TcpStream,
        notifier: Option<Arc<Notifier>>,
    ) -> io::Result<Connection> {
        sock.set_nonblocking(true)?;
        sock.set_nodelay(true)?;
        let local = sock.local_addr()?;
        let peer = sock.peer_addr()?;
        let opts = target.options().clone();
        // An admin queue may be `ADMIN_QUEUE_DEPTH` deep whatever the I/O queue limit.
        let depth = opts.max_queue_depth.max(ADMIN_QUEUE_DEPTH);
        let slots = (0..depth)
            .map(|_| Slot {
                phase: Phase::Free,
                generation: 0,
                sqe: Sqe::default(),
                buf: None,
                len: 0,
                got: 0,
                bad: None,
            })
            .collect();
        let mut cfg = RecvConfig::new(Role::Controller);
        cfg.max_incapsule = ADMIN_IN_CAPSULE;
        cfg.max_data = opts.max_h2c_data;
        Ok(Connection {
            target,
            sock,
            local,
            peer,
            reader: PduReader::new(cfg),
            rx_buf: RxBuf::new(opts.rx_staging),
            rx: Rx::Header,
            state: State::AwaitIcReq,
            digests: Digests::default(),
            hpda: 0,
            queue: None,
            slots,
            free: (0..depth).rev().collect(),
            outstanding: 0,
            cq: Arc::new(ArrayQueue::new(depth as usize)),
            tx: VecDeque::with_capacity(depth as usize * 2),
            r2t_wait: VecDeque::with_capacity(depth as usize),
            r2t_out: 0,
            sq_head: 0,
            nss: Vec::new(),
            stats: ConnStats::default(),
            why: None,
            notifier,
        })
    }

    /// The peer's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }
    /// Counters.
    pub fn stats(&self) -> ConnStats {
        self.stats
    }
    /// True once the connection is closed (the poll group drops it).
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }
    /// Why the connection closed, if it did for a reason other than the host leaving.
    pub fn close_reason(&self) -> Option<&str> {
        self.why.as_deref()
    }
    /// What to wait for while idle: the socket, readable while [`recv`](Self::recv) would
    /// read (not while the send queue is full or the connection closes: a host that stops
    /// reading its responses must not wake the group at once forever), writable while PDUs
    /// wait to be sent; `None` once closed.
    pub(crate) fn interest(&self) -> Option<Interest> {
        (self.state != State::Closed).then(|| Interest {
            fd: self.sock.as_raw_fd(),
            read: self.reads(),
            write: !self.tx.is_empty(),
        })
    }

    /// True if [`recv`](Self::recv) reads now.
    fn reads(&self) -> bool {
        !self.tx_full() && matches!(self.state, State::AwaitIcReq | State::Ready)
    }
    /// True if backend completions wait to be handled.
    pub(crate) fn has_completions(&self) -> bool {
        !self.cq.is_empty()
    }
    /// Queue ID after Connect.
    pub fn qid(&self) -> Option<u16> {
        self.queue.as_ref().map(|b| b.qid)
    }

    /// Does what can be done without blocking; returns the amount of work done (0: idle).
    pub fn poll(&mut self) -> usize {
        if self.state == State::Closed {
            return 0;
        }
        let mut work = 0;
        if let Some(b) = &self.queue {
            let now = self.target.now_ms();
            if b.qid == 0 && b.ctrl.keep_alive_expired(now) {
                log::warn!(
                    "nvmf: controller {} of {}: keep alive timeout expired, association torn down",
                    b.ctrl.cntlid,
                    b.ctrl.hostnqn
                );
                self.why = Some("keep alive timeout expired".into());
                self.target.remove_ctrl(&b.ctrl);
                self.close_now();
                return 1;
            }
            if b.ctrl.is_dead() || (b.qid != 0 && b.ctrl.reset_generation() != b.generation) {
                self.why = Some("the controller was reset or its association ended".into());
                self.close_now();
                return 1;
            }
        }
        work += self.drain_completions();
        work += self.deliver_events();
        work += self.flush();
        if matches!(self.state, State::AwaitIcReq | State::Ready) {
            work += self.recv();
        }
        work += self.issue_r2ts();
        work += self.flush();
        if let State::Closing(deadline) = self.state
            && (self.tx.is_empty() || Instant::now() > deadline)
        {
            let _ = self.sock.shutdown(std::net::Shutdown::Both);
            self.close_now();
            work += 1;
        }
        work
    }

    fn close_now(&mut self) {
        if self.state == State::Closed {
            return;
        }
        self.state = State::Closed;
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
        if let Some(b) = self.queue.take() {
            if b.qid == 0 {
                self.target.remove_ctrl(&b.ctrl);
            } else if b.ctrl.reset_generation() == b.generation {
                b.ctrl.detach_io_queue(b.qid);
            }
        }
        self.tx.clear();
    }

    fn closing(&mut self) {
        if matches!(self.state, State::AwaitIcReq | State::Ready) {
            self.state = State::Closing(Instant::now() + LINGER);
        }
    }

    /// Sends a C2HTermReq for `e` (with the offending header) and closes.
    fn fatal(&mut self, e: FatalError) {
        log::warn!("nvmf: {}: sending C2HTermReq and closing: {e}", self.peer);
        self.why = Some(e.to_string());
        let mut data = self.reader.raw_header().to_vec();
        data.truncate(pdu::MAX_TERM_DATA);
        let hdr = pdu::encode(
            &Pdu::C2hTermReq(TermReq {
                fes: e.fes,
                fei: e.fei,
            }),
            data.len() as u32,
            self.digests,
            self.hpda,
        );
        // Nothing after the TermReq: drop what was not started.
        self.tx.retain(|t| t.sent > 0);
        self.tx.push_back(TxItem {
            hdr,
            data: TxData::Owned(data),
            ddgst: None,
            sent: 0,
            release: None,
            close_after: true,
        });
        self.stats.term_sent += 1;
        self.closing();
    }

    // -----------------------------------------------------------------------------------------
    // Receive.

    fn tx_full(&self) -> bool {
        self.tx.len() >= self.slots.len() * 2 + 8
    }

    /// Reads and handles up to 64 PDUs (or data parts) from the socket; stops at the first
    /// short read (see [`UntilShort`]).
    fn recv(&mut self) -> usize {
        let drained = &mut false;
        let mut work = 0;
        for _ in 0..64 {
            if !self.reads() {
                break;
            }
            let r = match self.rx {
                Rx::Header => match self.reader.poll_header(
                    &mut self.rx_buf,
                    &mut UntilShort {
                        sock: &mut self.sock,
                        drained,
                    },
                ) {
                    Ok(Some(p)) => {
                        self.stats.pdus_in += 1;
                        work += 1;
                        match self.on_pdu(p) {
                            Ok(()) => continue,
                            Err(e) => Err(RecvError::Fatal(e)),
                        }
                    }
                    Ok(None) => break,
                    Err(e) => Err(e),
                },
                Rx::Data {
                    slot,
                    off,
                    len,
                    h2c,
                } => {
                    let s = &mut self.slots[slot as usize];
                    let Some(buf) = s.buf.as_mut() else {
                        self.fatal(FatalError::new(Fes::SequenceError, "no data buffer"));
                        break;
                    };
                    let dst = &mut buf.as_mut_slice()[off as usize..(off + len) as usize];
                    let mut src = UntilShort {
                        sock: &mut self.sock,
                        drained,
                    };
                    match self.reader.poll_data(&mut self.rx_buf, &mut src, dst) {
                        Ok(Some(ok)) => {
                            work += 1;
                            self.rx = Rx::Header;
                            self.data_done(slot, len, ok, h2c);
                            continue;
                        }
                        Ok(None) => break,
                        Err(e) => Err(e),
                    }
                }
                Rx::Discard { slot } => {
                    let mut src = UntilShort {
                        sock: &mut self.sock,
                        drained,
                    };
                    match self.reader.poll_discard(&mut self.rx_buf, &mut src) {
                        Ok(Some(_)) => {
                            work += 1;
                            self.rx = Rx::Header;
                            if let Some(s) = slot {
                                self.execute(s);
                            }
                            continue;
                        }
                        Ok(None) => break,
                        Err(e) => Err(e),
                    }
                }
            };
            match r {
                Err(RecvError::Fatal(e)) => self.fatal(e),
                Err(RecvError::Closed) => self.close_now(),
                Err(RecvError::Io(e)) => {
                    self.why = Some(format!("socket error: {e}"));
                    self.close_now();
                }
                Ok(()) => {}
            }
            break;
        }
        work
    }

    fn on_pdu(&mut self, p: Pdu) -> Result<(), FatalError> {
        match p {
            Pdu::IcReq(r) => {
                let opts = self.target.options();
                self.digests = r.digests;
                self.hpda = r.hpda;
                let resp = Pdu::IcResp(IcResp {
                    pfv: 0,
                    cpda: 0,
                    digests: r.digests,
                    maxh2cdata: opts.max_h2c_data,
                });
                self.reader.cfg.ic_done = true;
                self.reader.cfg.digests = r.digests;
                self.reader.cfg.pda = 0;
                self.state = State::Ready;
                self.push(
                    pdu::encode(&resp, 0, Digests::default(), 0),
                    TxData::None,
                    None,
                );
                Ok(())
            }
            Pdu::H2cTermReq(t) => {
                self.why = Some(format!(
                    "the host terminated the connection: {:?} (FEI {:#x})",
                    t.fes, t.fei
                ));
                self.close_now();
                Ok(())
            }
            Pdu::CapsuleCmd(sqe, data_len) => self.on_capsule(sqe, data_len),
            Pdu::H2cData(d) => self.on_h2c(d),
            _ => Err(FatalError::field(field::TYPE, "unexpected PDU type")),
        }
    }

    fn on_capsule(&mut self, sqe: Sqe, data_len: u32) -> Result<(), FatalError> {
        let limit = self
            .queue
            .as_ref()
            .map_or(self.slots.len() as u16, |b| b.sqsize + 1);
        if self.outstanding >= limit {
            return Err(FatalError::new(
                Fes::SequenceError,
                "more commands outstanding than the queue holds (SQSIZE)",
            ));
        }
        let Some(slot) = self.free.pop() else {
            return Err(FatalError::new(
                Fes::SequenceError,
                "more commands outstanding than the queue holds",
            ));
        };
        self.outstanding += 1;
        if let Some(b) = &mut self.queue {
            b.ctrl.seen(self.target.now_ms());
            self.sq_head = (self.sq_head + 1) % (b.sqsize + 1);
        }
        {
            let s = &mut self.slots[slot as usize];
            s.phase = Phase::DataIn;
            s.generation = s.generation.wrapping_add(1);
            s.sqe = sqe;
            s.buf = None;
            s.len = 0;
            s.got = 0;
            s.bad = None;
        }
        if data_len == 0 {
            self.start(slot);
            return Ok(());
        }
        // In-capsule data: check the descriptor, find a buffer, receive straight into it.
        let sgl = Sgl::of(&sqe);
        let bad = if sgl.kind != SGL_INCAPSULE {
            Some(dnr(fsc::SGL_DESCRIPTOR_TYPE_INVALID))
        } else if sgl.addr != 0 {
            Some(dnr(fsc::SGL_OFFSET_INVALID))
        } else if sgl.len != data_len {
            Some(dnr(fsc::DATA_SGL_LENGTH_INVALID))
        } else if !data_in(&sqe) {
            Some(dnr(generic::INVALID_FIELD))
        } else {
            None
        };
        let buf = if bad.is_none() {
            self.alloc(&sqe, data_len as usize)
        } else {
            None
        };
        let s = &mut self.slots[slot as usize];
        s.len = data_len;
        match buf {
            Some(b) => {
                s.buf = Some(b);
                self.rx = Rx::Data {
                    slot,
                    off: 0,
                    len: data_len,
                    h2c: false,
                };
            }
            None => {
                s.bad = Some(bad.unwrap_or(st(generic::INTERNAL_ERROR)));
                self.rx = Rx::Discard { slot: Some(slot) };
            }
        }
        Ok(())
    }

    /// A data buffer for a command: the backend's (DMA memory) for I/O, the heap otherwise.
    fn alloc(&self, sqe: &Sqe, len: usize) -> Option<IoBuffer> {
        let io = self.queue.as_ref().is_some_and(|b| b.qid != 0)
            && matches!(sqe.opcode(), opc::READ | opc::WRITE);
        if io
            && let Some(b) = self
                .queue
                .as_ref()
                .and_then(|b| b.ctrl.subsys.backend().cloned())
        {
            return b.alloc(len);
        }
        Some(IoBuffer::Heap(vec![0u8; len]))
    }

    fn on_h2c(&mut self, d: DataHdr) -> Result<(), FatalError> {
        let Some(s) = self.slots.get(d.ttag as usize) else {
            return Err(FatalError::field(
                field::TTAG,
                "H2CData for an unknown transfer tag",
            ));
        };
        if s.phase != Phase::R2tSent {
            return Err(FatalError::field(
                field::TTAG,
                "H2CData for a transfer tag not in use",
            ));
        }
        if s.sqe.cid() != d.cccid {
            return Err(FatalError::field(
                field::CCCID,
                "H2CData CCCID does not match the R2T",
            ));
        }
        let end = d.offset as u64 + d.len as u64;
        if d.offset >= s.len || end > s.len as u64 {
            return Err(FatalError::new(
                Fes::DataOutOfRange,
                "H2CData beyond the command's data length",
            ));
        }
        if d.offset != s.got {
            return Err(FatalError::field(field::DATAO, "H2CData out of order"));
        }
        self.rx = Rx::Data {
            slot: d.ttag,
            off: d.offset,
            len: d.len,
            h2c: true,
        };
        Ok(())
    }

    fn data_done(&mut self, slot: u16, len: u32, digest_ok: bool, h2c: bool) {
        let s = &mut self.slots[slot as usize];
        if !digest_ok && s.bad.is_none() {
            s.bad = Some(st(fsc::TRANSIENT_TRANSPORT_ERROR));
        }
        s.got += len;
        if !h2c {
            self.start(slot);
            return;
        }
        if s.got == s.len {
            self.r2t_out -= 1;
            self.execute(slot);
        }
    }

    // -----------------------------------------------------------------------------------------
    // Commands.

    /// A command whose capsule (and in-capsule data) arrived: fetch its data with an R2T if
    /// it needs some, else execute it.
    fn start(&mut self, slot: u16) {
        let s = &self.slots[slot as usize];
        if s.bad.is_some() || s.buf.is_some() || !data_in(&s.sqe) {
            self.execute(slot);
            return;
        }
        let sqe = s.sqe;
        let sgl = Sgl::of(&sqe);
        if sgl.len == 0 {
            self.execute(slot);
            return;
        }
        if sgl.kind != SGL_TRANSPORT {
            return self.respond(slot, dnr(fsc::SGL_DESCRIPTOR_TYPE_INVALID), 0);
        }
        // Check an I/O command before asking for its data.
        let is_io = self.queue.as_ref().is_some_and(|b| b.qid != 0);
        let max = if is_io {
            if let Err(e) = self.check_io(&sqe) {
                return self.respond(slot, e, 0);
            }
            self.target.options().max_transfer
        } else {
            ADMIN_IN_CAPSULE
        };
        if sgl.len > max {
            return self.respond(slot, dnr(fsc::DATA_SGL_LENGTH_INVALID), 0);
        }
        let Some(buf) = self.alloc(&sqe, sgl.len as usize) else {
            return self.respond(slot, st(generic::INTERNAL_ERROR), 0);
        };
        let s = &mut self.slots[slot as usize];
        s.buf = Some(buf);
        s.len = sgl.len;
        s.phase = Phase::WaitR2t;
        self.r2t_wait.push_back(slot);
    }

    fn issue_r2ts(&mut self) -> usize {
        let mut n = 0;
        while self.r2t_out < self.target.options().max_r2t_per_conn && self.state == State::Ready {
            let Some(slot) = self.r2t_wait.pop_front() else {
                break;
            };
            let s = &mut self.slots[slot as usize];
            s.phase = Phase::R2tSent;
            let r = Pdu::R2t(R2t {
                cccid: s.sqe.cid(),
                ttag: slot,
                offset: 0,
                len: s.len,
            });
            self.r2t_out += 1;
            let hdr = pdu::encode(&r, 0, self.digests, self.hpda);
            self.push(hdr, TxData::None, None);
            n += 1;
        }
        n
    }

    fn execute(&mut self, slot: u16) {
        let s = &self.slots[slot as usize];
        if let Some(bad) = s.bad {
            return self.respond(slot, bad, 0);
        }
        let sqe = s.sqe;
        if sqe.opcode() == fabrics::OPCODE {
            return self.fabrics(slot, &sqe);
        }
        let Some(b) = &self.queue else {
            return self.respond(slot, dnr(generic::COMMAND_SEQUENCE_ERROR), 0);
        };
        if b.qid == 0 {
            let ctrl = b.ctrl.clone();
            match ctrl.admin(&self.target, &sqe, self.local, self.target.now_ms()) {
                AdminOut::Done(status, dw0, data) => {
                    let want = Sgl::of(&sqe).len as usize;
                    match data {
                        Some(mut d) if status.is_success() && want > 0 => {
                            d.truncate(want);
                            let s = &mut self.slots[slot as usize];
                            s.len = d.len() as u32;
                            s.buf = Some(IoBuffer::Heap(d));
                            self.respond_with_data(slot, dw0);
                        }
                        _ => self.respond(slot, status, dw0),
                    }
                }
                AdminOut::Aer => {
                    let held = self.slots.iter().filter(|s| s.phase == Phase::Aer).count();
                    if held > AERL as usize {
                        self.respond(slot, Ctrl::aer_limit_status(), 0);
                    } else {
                        self.slots[slot as usize].phase = Phase::Aer;
                    }
                }
            }
            return;
        }
        self.io(slot, &sqe);
    }

    fn deliver_events(&mut self) -> usize {
        let Some(b) = &self.queue else { return 0 };
        if b.qid != 0 {
            return 0;
        }
        let Some(slot) = self.slots.iter().position(|s| s.phase == Phase::Aer) else {
            return 0;
        };
        let Some(ev) = b.ctrl.take_event() else {
            return 0;
        };
        self.respond(slot as u16, Status::SUCCESS, ev);
        1
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.close_now();
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::net::{TcpListener, TcpStream};

    use super::*;
    use crate::nvmf::pdu::pdu_type;
    use crate::nvmf::target::TargetOptions;
    use crate::spec::Cqe;

    /// A connection in state Ready and the host's end of its socket.
    fn pair() -> (Connection, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let host = TcpStream::connect(l.local_addr().expect("address")).expect("connect");
        let (sock, _) = l.accept().expect("accept");
        let mut c = Connection::new(Target::new(TargetOptions::default()), sock, None)
            .expect("a connection");
        c.state = State::Ready;
        host.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("read timeout");
        (c, host)
    }

    fn resp() -> EncodedHdr {
        pdu::encode(&Pdu::CapsuleResp(Cqe::default()), 0, Digests::default(), 0)
    }

    /// The PDU types the host receives up to the end of the stream.
    fn received(mut host: TcpStream) -> Vec<u8> {
        let mut all = Vec::new();
        host.read_to_end(&mut all)
            .expect("read to the end of the stream");
        let mut types = Vec::new();
        let mut at = 0;
        while at + 8 <= all.len() {
            types.push(all[at]);
            let plen = u32::from_le_bytes([all[at + 4], all[at + 5], all[at + 6], all[at + 7]]);
            at += (plen as usize).max(8);
        }
        types
    }

    #[test]
    fn the_completion_queue_holds_a_completion_per_slot() {
        let (c, _host) = pair();
        assert!(c.cq.capacity() >= c.slots.len());
    }

    #[test]
    fn the_socket_is_not_watched_for_input_the_connection_will_not_read() {
        let (mut c, _host) = pair();
        let i = c.interest().expect("open");
        assert!(i.read && !i.write);
        // A host that does not read its responses: the send queue fills up.
        while !c.tx_full() {
            c.push(resp(), TxData::None, None);
        }
        let i = c.interest().expect("open");
        assert!(!i.read && i.write);
        c.tx.clear();
        assert!(c.interest().expect("open").read);
        c.closing();
        assert!(!c.interest().expect("closing").read);
    }

    #[test]
    fn nothing_is_queued_after_a_term_req() {
        let (mut c, host) = pair();
        c.fatal(FatalError::new(Fes::SequenceError, "test"));
        c.push(resp(), TxData::None, None);
        c.flush();
        assert_eq!(received(host), vec![pdu_type::C2H_TERM_REQ]);
    }

    #[test]
    fn a_write_stops_after_the_last_pdu() {
        let (mut c, host) = pair();
        c.push(resp(), TxData::None, None);
        c.tx.back_mut().expect("queued").close_after = true;
        c.push(resp(), TxData::None, None);
        c.flush();
        assert_eq!(received(host), vec![pdu_type::CAPSULE_RESP]);
    }
}
