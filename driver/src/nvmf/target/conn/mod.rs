//! One NVMe/TCP connection of the target: one NVMe queue.
//!
//! The connection is a state machine driven by [`Connection::poll`], which never blocks: it
//! drains the backend's completions, sends what the socket takes, reads and handles what the
//! socket has (a bounded number of PDUs per call), issues R2Ts, and sends again.
//!
//! **Command slots.** A fixed table of `max_queue_depth` slots (at least 32, an admin queue's), allocated when the connection
//! is accepted; a command holds one from its capsule to the moment its response capsule left
//! the socket. A slot owns the command's data buffer (from `Backend::alloc`: DMA memory for a
//! device backend): in-capsule data and H2CData are read from the socket straight into it,
//! C2HData is written from it. A host with more commands outstanding than its SQSIZE gets a
//! C2HTermReq; a write larger than the in-capsule size waits for one of `max_r2t_per_conn`
//! R2Ts; the send queue is bounded (reading stops while it is full), so one client can make the
//! target hold at most `max_queue_depth × max_transfer` bytes of data.
//!
//! **Memory.** A write's buffer is taken from the backend when its R2T goes out (at most
//! `max_r2t_per_conn` at a time), a Read's when it is submitted, in-capsule data's when its
//! capsule arrives. When the backend has none (DMA memory held by other connections), the
//! command waits its turn and is retried at every poll (in-capsule data waits in the
//! socket): nothing fails for want of memory and nothing is allocated beyond those bounds.
//!
//! **Lifecycle.** A connection that closes (host gone, C2HTermReq, controller reset, Keep
//! Alive expiry, Disconnect) stops taking commands at once but keeps its queue, and the group
//! keeps polling it (`Draining`), until every command it has at the backend completed, as
//! Linux's `nvmet_sq_destroy` does; only then its queue ID is free and, for an admin queue,
//! its controller and CNTLID (once the whole association, every I/O queue included, is quiet:
//! the [`Ctrl`]'s in-flight count). A Disconnect is answered at that point, and a reset or
//! shutdown is reported complete in CSTS only then: a write of an ended association never
//! lands after a new one read the block. Keep Alive is checked after receiving, so a command
//! that waited in the socket counts; a host is torn down after twice its KATO of silence.
//! A socket that has not completed ICReq and Connect within `connect_timeout` is closed.
//!
//! **Errors.** A malformed PDU (see [`crate::nvmf::pdu`]) gets a C2HTermReq carrying its header
//! and the connection closes; a bad command gets the status the specification names, and the
//! connection goes on. A data digest error fails the command with Transient Transport Error.
//! Nothing is submitted to the backend before all of a write's data arrived, so a host that
//! vanishes mid-transfer leaves nothing half written. A host that takes an R2T and then sends
//! no data for `h2c_data_timeout` (counted from the R2T or its last H2CData PDU) gets a
//! C2HTermReq (PDU Sequence Error: the H2CData the R2T asked for never came) and the
//! connection ends; every data buffer it held goes back to the backend when it closes.

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

use super::ctrl::{AERL, AdminOut, Ctrl};
use super::wait::{Interest, Notifier};
use super::{ConnTicket, Target};
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
    stats: &'a mut ConnStats,
}

impl io::Read for UntilShort<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if *self.drained {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        self.stats.socket_reads += 1;
        match self.sock.read(buf) {
            Ok(n) => {
                *self.drained = n < buf.len();
                Ok(n)
            }
            Err(e) => {
                if e.kind() == io::ErrorKind::WouldBlock {
                    self.stats.empty_reads += 1;
                    *self.drained = true;
                }
                Err(e)
            }
        }
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
    /// Socket reads (`recv` system calls).
    pub socket_reads: u64,
    /// Socket reads that found nothing (`EAGAIN`): the cost of looking while idle.
    pub empty_reads: u64,
    /// Socket writes (`writev` system calls).
    pub socket_writes: u64,
}

impl ConnStats {
    /// Adds another connection's counters.
    pub fn add(&mut self, o: &ConnStats) {
        self.pdus_in += o.pdus_in;
        self.pdus_out += o.pdus_out;
        self.commands += o.commands;
        self.errors += o.errors;
        self.term_sent += o.term_sent;
        self.socket_reads += o.socket_reads;
        self.empty_reads += o.empty_reads;
        self.socket_writes += o.socket_writes;
    }
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
    /// Waiting for a data buffer (the backend's DMA memory is short): retried every poll.
    WaitMem,
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
    /// When the R2T went out or the last H2CData PDU for it arrived (the H2CData deadline
    /// counts from here).
    h2c_at: Instant,
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
    /// In-capsule data waits in the socket for a buffer (memory is short): retried every
    /// poll, the socket unread meanwhile.
    NeedBuf { slot: u16, len: u32 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    AwaitIcReq,
    Ready,
    Closing(Instant),
    /// The socket is closed; commands still at the backend are waited for (their
    /// completions are dropped) before the queue's state goes.
    Draining,
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
    /// Reads waiting for a data buffer, oldest first.
    mem_wait: VecDeque<u16>,
    /// A Disconnect held until the queue's commands drained.
    disconnect: Option<u16>,
    /// When the socket was accepted (the Connect timeout counts from here).
    opened: Instant,
    /// Rounds left without reading the socket (it was found empty; see [`Connection::poll`]).
    recv_skip: u32,
    /// Its place under the target's connection limits.
    _ticket: ConnTicket,
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
    /// Errors: the socket cannot be configured, or the target's connection limits
    /// ([`TargetOptions::max_connections`](super::TargetOptions::max_connections), per host
    /// too) are reached (logged; the caller drops the socket, which closes it).
    pub fn new(
        target: Arc<Target>,
        sock: TcpStream,
        notifier: Option<Arc<Notifier>>,
    ) -> io::Result<Connection> {
        let peer = sock.peer_addr()?;
        let ticket = target.admit(peer.ip()).map_err(|why| {
            log::warn!("nvmf: {peer}: connection refused: {why}");
            io::Error::other(format!("connection from {peer} refused: {why}"))
        })?;
        sock.set_nonblocking(true)?;
        sock.set_nodelay(true)?;
        let local = sock.local_addr()?;
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
                h2c_at: Instant::now(),
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
            mem_wait: VecDeque::with_capacity(depth as usize),
            disconnect: None,
            opened: Instant::now(),
            recv_skip: 0,
            _ticket: ticket,
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
        // A draining connection's socket is shut down (it would always poll as ready); its
        // completions ring the group's eventfd.
        (!matches!(self.state, State::Closed | State::Draining)).then(|| Interest {
            fd: self.sock.as_raw_fd(),
            read: self.reads(),
            write: !self.tx.is_empty(),
        })
    }

    /// True if [`recv`](Self::recv) reads now.
    fn reads(&self) -> bool {
        !self.tx_full()
            && matches!(self.state, State::AwaitIcReq | State::Ready)
            && self.disconnect.is_none()
            && !matches!(self.rx, Rx::NeedBuf { .. })
    }
    /// After the group's sleep: `readable` is what `poll(2)` said of the socket. A readable
    /// socket is read in the next round; one it watched for input and found empty is not
    /// (data that arrives meanwhile is read later, or wakes the next sleep at once).
    pub(crate) fn woke(&mut self, readable: bool) {
        if readable {
            self.recv_skip = 0;
        } else if self.reads() {
            self.recv_skip = self.recv_skip.max(1);
        }
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
        match self.state {
            State::Closed => return 0,
            State::Draining => {
                let n = self.drain_completions();
                return n + self.try_finish() as usize;
            }
            _ => {}
        }
        let mut work = 0;
        if let Some(b) = &self.queue
            && self.disconnect.is_none()
            && !matches!(self.state, State::Closing(_))
            && (b.ctrl.is_dead() || (b.qid != 0 && b.ctrl.reset_generation() != b.generation))
        {
            self.why = Some("the controller was reset or its association ended".into());
            self.close_now();
            return 1;
        }
        let limit = self.target.options().connect_timeout;
        if self.queue.is_none()
            && matches!(self.state, State::AwaitIcReq | State::Ready)
            && self.opened.elapsed() > limit
        {
            log::warn!(
                "nvmf: {}: no Connect within {limit:?} of the accept (connect_timeout): closing",
                self.peer
            );
            self.why = Some(format!("no Connect within {limit:?} (connect_timeout)"));
            self.close_now();
            return 1;
        }
        work += self.drain_completions();
        if self.state == State::Ready {
            // Nothing new starts once the connection is closing (after a C2HTermReq).
            work += self.retry_mem();
            work += self.retry_rx_buf();
        }
        work += self.deliver_events();
        work += self.flush();
        // After finding the socket empty, a connection may skip it for `recv_skip_rounds`
        // rounds (default 0: it reads every round), unless it sent something since (a host's
        // next commands follow the responses it receives) or the group's sleep found it
        // readable; data that arrives otherwise waits at most those rounds, or wakes the
        // group's next sleep at once (`poll(2)` still watches the socket). An empty `recv` is
        // not wasted where hosts share the target's CPU: the socket call also runs the
        // kernel's pending network softirqs (the loopback delivery of responses and
        // commands). Skipping 16 rounds measured 3x slower at QD1 in the one-vCPU TCG guest
        // (0.21x the kernel target against 0.69x reading every round, same boot).
        if matches!(self.state, State::AwaitIcReq | State::Ready) {
            if self.recv_skip > 0 {
                self.recv_skip -= 1;
            } else {
                work += self.recv();
            }
        }
        // Keep Alive is checked after receiving: a Keep Alive (or any command) that waited in
        // the socket while the group was busy or asleep counts.
        if let Some(b) = &self.queue
            && b.qid == 0
            && self.disconnect.is_none()
            && self.state == State::Ready
            && b.ctrl.keep_alive_expired(self.target.now_ms())
        {
            log::warn!(
                "nvmf: controller {} of {} ({}): no command for more than twice its keep alive \
                 timeout of {} ms: association torn down ({} commands at the backend drain first)",
                b.ctrl.cntlid,
                b.ctrl.hostnqn,
                self.peer,
                b.ctrl.kato_ms(),
                b.ctrl.in_flight()
            );
            self.why = Some("keep alive timeout expired".into());
            self.target.end_ctrl(&b.ctrl);
            self.close_now();
            return work + 1;
        }
        if self.r2t_out > 0 && self.state == State::Ready {
            work += self.check_h2c_deadline();
        }
        work += self.finish_disconnect();
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

    /// Commands of this queue at the backend now.
    pub(crate) fn at_backend(&self) -> usize {
        self.executing()
    }

    /// Ends the connection as the target stops (see [`close_now`](Self::close_now)): the
    /// socket closes at once, commands at the backend drain before the queue's state goes.
    pub(crate) fn end(&mut self, why: &str) {
        if matches!(self.state, State::Closed | State::Draining) {
            return;
        }
        self.why.get_or_insert_with(|| why.to_owned());
        self.close_now();
    }

    /// Commands of this queue at the backend.
    fn executing(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| s.phase == Phase::Executing)
            .count()
    }

    /// True when nothing this queue (an admin queue: its whole association) started is at
    /// the backend.
    fn quiet(&self) -> bool {
        self.executing() == 0
            && self
                .queue
                .as_ref()
                .is_none_or(|b| b.qid != 0 || b.ctrl.in_flight() == 0)
    }

    /// Closes the socket; the queue's state (its I/O queue ID, an admin queue's controller
    /// and CNTLID) goes once every command it has at the backend completed (Linux's
    /// `nvmet_sq_destroy`): until then the group keeps polling it, draining completions.
    /// An admin queue ends its association at once (the I/O queues close and drain too).
    fn close_now(&mut self) {
        if matches!(self.state, State::Closed | State::Draining) {
            return;
        }
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
        self.tx.clear();
        self.r2t_wait.clear();
        self.mem_wait.clear();
        self.rx = Rx::Header;
        self.disconnect = None;
        self.state = State::Draining;
        // Data buffers go back now, not when the queue drained: only the commands at the
        // backend (which hold theirs) are waited for.
        for s in self
            .slots
            .iter_mut()
            .filter(|s| s.phase != Phase::Executing)
        {
            s.buf = None;
        }
        if let Some(b) = &self.queue {
            if b.qid == 0 {
                self.target.end_ctrl(&b.ctrl);
            }
            let n = self.executing();
            if n > 0 {
                log::debug!(
                    "nvmf: {} qid {}: closed with {n} commands at the backend: draining them",
                    self.peer,
                    b.qid
                );
            }
        }
        self.try_finish();
    }

    /// Finishes a draining connection once it is [`quiet`](Self::quiet); true once closed.
    fn try_finish(&mut self) -> bool {
        if self.state != State::Draining {
            return self.state == State::Closed;
        }
        if !self.quiet() {
            return false;
        }
        self.state = State::Closed;
        if let Some(b) = self.queue.take() {
            if b.qid == 0 {
                self.target.release_ctrl(&b.ctrl);
                log::info!(
                    "nvmf: controller {} of {}: association ended, its commands drained, \
                     controller ID free",
                    b.ctrl.cntlid,
                    b.ctrl.hostnqn
                );
            } else if b.ctrl.reset_generation() == b.generation {
                b.ctrl.detach_io_queue(b.qid);
            }
        }
        true
    }

    /// Answers a held Disconnect once the queue (an admin queue: its association) is quiet:
    /// after its response nothing the queue started is still at the backend.
    fn finish_disconnect(&mut self) -> usize {
        let Some(slot) = self.disconnect else {
            return 0;
        };
        if !self.quiet() {
            return 0;
        }
        self.disconnect = None;
        self.respond(slot, Status::SUCCESS, 0);
        if let Some(t) = self.tx.back_mut() {
            t.close_after = true;
        }
        // Nothing more is read or queued: the response is the last PDU.
        self.closing();
        1
    }

    fn closing(&mut self) {
        if matches!(self.state, State::AwaitIcReq | State::Ready) {
            self.state = State::Closing(Instant::now() + LINGER);
        }
    }

    /// Gives waiting in-capsule data its buffer once memory is there.
    fn retry_rx_buf(&mut self) -> usize {
        let Rx::NeedBuf { slot, len } = self.rx else {
            return 0;
        };
        let sqe = self.slots[slot as usize].sqe;
        let Some(b) = self.alloc(&sqe, len as usize) else {
            return 0;
        };
        self.slots[slot as usize].buf = Some(b);
        self.rx = Rx::Data {
            slot,
            off: 0,
            len,
            h2c: false,
        };
        // The data waited in the socket: read it now.
        self.recv_skip = 0;
        1
    }

    /// Starts the Reads that waited for a buffer, oldest first, while memory lasts.
    fn retry_mem(&mut self) -> usize {
        let mut n = 0;
        while let Some(slot) = self.mem_wait.pop_front() {
            let sqe = self.slots[slot as usize].sqe;
            self.io(slot, &sqe);
            if self.slots[slot as usize].phase == Phase::WaitMem {
                // Still short: `io` queued it again at the back; it keeps its turn.
                self.mem_wait.pop_back();
                self.mem_wait.push_front(slot);
                break;
            }
            n += 1;
        }
        n
    }

    /// Ends the connection when an R2T's data is overdue (see the module docs); returns 1 if
    /// it did.
    fn check_h2c_deadline(&mut self) -> usize {
        let limit = self.target.options().h2c_data_timeout;
        let now = Instant::now();
        let Some(slot) = self
            .slots
            .iter()
            .position(|s| s.phase == Phase::R2tSent && now.duration_since(s.h2c_at) > limit)
        else {
            return 0;
        };
        let s = &mut self.slots[slot];
        log::warn!(
            "nvmf: {}: no H2CData for the R2T of command {} (transfer tag {slot}, {} of {} \
             bytes received) within {limit:?} (h2c_data_timeout): its buffer is released",
            self.peer,
            s.sqe.cid(),
            s.got,
            s.len
        );
        s.buf = None;
        self.terminate(
            FatalError::new(
                Fes::SequenceError,
                "the H2CData an R2T asked for did not arrive within h2c_data_timeout",
            ),
            false,
        );
        1
    }

    /// Sends a C2HTermReq for `e` (with the offending header) and closes.
    fn fatal(&mut self, e: FatalError) {
        self.terminate(e, true);
    }

    /// Sends a C2HTermReq for `e` (with the header of the PDU being read if `with_header`)
    /// and closes.
    fn terminate(&mut self, e: FatalError, with_header: bool) {
        log::warn!("nvmf: {}: sending C2HTermReq and closing: {e}", self.peer);
        self.why = Some(e.to_string());
        let mut data = if with_header {
            self.reader.raw_header().to_vec()
        } else {
            Vec::new()
        };
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
                        stats: &mut self.stats,
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
                        stats: &mut self.stats,
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
                Rx::NeedBuf { .. } => break,
                Rx::Discard { slot } => {
                    let mut src = UntilShort {
                        sock: &mut self.sock,
                        drained,
                        stats: &mut self.stats,
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
        if *drained {
            // The socket is empty now (a short read or EAGAIN).
            self.recv_skip = self.target.options().recv_skip_rounds;
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
        let s = &mut self.slots[slot as usize];
        s.len = data_len;
        if let Some(bad) = bad {
            s.bad = Some(bad);
            self.rx = Rx::Discard { slot: Some(slot) };
            return Ok(());
        }
        // The data waits in the socket until there is a buffer for it (DMA memory may be
        // short while other connections' commands hold it).
        self.rx = Rx::NeedBuf {
            slot,
            len: data_len,
        };
        self.retry_rx_buf();
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
        self.slots[d.ttag as usize].h2c_at = Instant::now();
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
        // The buffer is taken when the R2T goes out (`issue_r2ts`), not now: a host's queued
        // writes hold no memory until their turn.
        let s = &mut self.slots[slot as usize];
        s.len = sgl.len;
        s.phase = Phase::WaitR2t;
        self.r2t_wait.push_back(slot);
    }

    fn issue_r2ts(&mut self) -> usize {
        let mut n = 0;
        while self.r2t_out < self.target.options().max_r2t_per_conn
            && self.state == State::Ready
            && self.disconnect.is_none()
        {
            let Some(&slot) = self.r2t_wait.front() else {
                break;
            };
            let (sqe, len) = {
                let s = &self.slots[slot as usize];
                (s.sqe, s.len)
            };
            // Memory short: the write keeps its turn and is retried at the next poll.
            let Some(buf) = self.alloc(&sqe, len as usize) else {
                break;
            };
            self.r2t_wait.pop_front();
            let s = &mut self.slots[slot as usize];
            s.buf = Some(buf);
            s.phase = Phase::R2tSent;
            s.h2c_at = Instant::now();
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
                AdminOut::Smart => {
                    let Some(backend) = ctrl.subsys.backend().cloned() else {
                        return self.respond(slot, dnr(generic::INVALID_FIELD), 0);
                    };
                    let s = &mut self.slots[slot as usize];
                    s.phase = Phase::Executing;
                    let done = crate::nvmf::backend::IoCompletion::new(
                        self.cq.clone(),
                        slot,
                        s.generation,
                        self.notifier.clone(),
                    )
                    // At the backend like I/O: the controller ID stays taken until it is done.
                    .counted(ctrl.inflight_counter());
                    backend.smart_log(done);
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
        pair_with(TargetOptions::default())
    }

    /// [`pair`] with these target options.
    fn pair_with(opts: TargetOptions) -> (Connection, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let host = TcpStream::connect(l.local_addr().expect("address")).expect("connect");
        let (sock, _) = l.accept().expect("accept");
        let mut c = Connection::new(Target::new(opts), sock, None).expect("a connection");
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

    /// The admin queue of a new association with a Keep Alive Timeout of `kato_ms`.
    fn admin_queue(c: &mut Connection, kato_ms: u32) -> Arc<Ctrl> {
        let subsys = Arc::new(crate::nvmf::target::Subsystem::new(
            "nqn.2026-12.io.dioxide:ka",
            Arc::new(crate::nvmf::backend::MemBackend::new(&[(512, 8)])),
        ));
        let ctrl = c
            .target
            .new_ctrl(subsys, "nqn.2026-12.io.dioxide:h".into(), [0; 16], kato_ms)
            .expect("a controller");
        c.reader.cfg.ic_done = true;
        c.queue = Some(Binding {
            ctrl: ctrl.clone(),
            qid: 0,
            sqsize: 31,
            generation: 0,
        });
        ctrl
    }

    /// A Keep Alive that waited in the socket while the group did not poll (busy or asleep
    /// past the timeout) keeps the association; silence past the timeout and its grace ends
    /// it.
    #[test]
    fn a_keep_alive_waiting_in_the_socket_counts() {
        use std::io::Write;
        let (mut c, mut host) = pair();
        let ctrl = admin_queue(&mut c, 40);
        std::thread::sleep(Duration::from_millis(150));
        let mut sqe = Sqe::new(crate::spec::sqe::admin::KEEP_ALIVE);
        sqe.set_cid(1);
        let ka = pdu::encode(&Pdu::CapsuleCmd(sqe, 0), 0, Digests::default(), 0);
        host.write_all(ka.as_bytes()).expect("send Keep Alive");
        c.poll();
        assert!(!ctrl.is_dead() && !c.is_closed(), "{:?}", c.close_reason());
        std::thread::sleep(Duration::from_millis(150));
        c.poll();
        assert!(ctrl.is_dead());
        assert_eq!(c.close_reason(), Some("keep alive timeout expired"));
        assert!(
            c.is_closed(),
            "nothing was in flight: the association is gone at once"
        );
        assert!(c.target.controller(ctrl.cntlid).is_none());
        assert_eq!(c.target.draining_controller_count(), 0);
    }

    /// A socket found empty is not read again for `recv_skip_rounds` rounds, unless the
    /// group's sleep found it readable or the connection sent something since; the counters
    /// see every read and every empty one.
    #[test]
    fn a_socket_found_empty_is_skipped_until_it_may_have_data() {
        use std::io::Write;
        let (mut c, mut host) = pair_with(TargetOptions {
            recv_skip_rounds: 16,
            ..TargetOptions::default()
        });
        let _ctrl = admin_queue(&mut c, 60_000);
        let reads = |c: &Connection| c.stats().socket_reads;
        c.poll();
        assert_eq!((reads(&c), c.stats().empty_reads), (1, 1));
        for _ in 0..c.target.options().recv_skip_rounds {
            c.poll();
        }
        assert_eq!(reads(&c), 1, "skipped while nothing can have come");
        c.poll();
        assert_eq!(reads(&c), 2, "read again after the skipped rounds");
        // The sleep found it empty: not read; found it readable: read at once.
        c.woke(false);
        c.poll();
        assert_eq!(reads(&c), 2);
        let mut sqe = Sqe::new(crate::spec::sqe::admin::KEEP_ALIVE);
        sqe.set_cid(1);
        let ka = pdu::encode(&Pdu::CapsuleCmd(sqe, 0), 0, Digests::default(), 0);
        host.write_all(ka.as_bytes()).expect("send Keep Alive");
        c.woke(true);
        c.poll();
        assert_eq!((reads(&c), c.stats().pdus_in), (3, 1));
        assert_eq!(c.stats().socket_writes, 1, "the response went out");
        // It sent something: the host may answer, so the next round reads.
        c.poll();
        assert_eq!(reads(&c), 4);
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
