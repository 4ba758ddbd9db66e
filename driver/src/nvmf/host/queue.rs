//! One NVMe/TCP connection of a host: one NVMe queue over a non-blocking socket.
//!
//! Commands take a slot of a fixed table (the slot index is the CID). Submission encodes the
//! command capsule into the send buffer (write data in-capsule when it fits the queue's
//! in-capsule size); [`HostQueue::poll`] sends what the socket takes, and handles what arrived:
//! C2HData is read straight into the command's buffer (the caller's memory for
//! [`HostQueue::submit_raw`]), an R2T queues H2CData PDUs of at most MAXH2CDATA from the
//! command's buffer, a response capsule finishes the command. Finished commands are taken with
//! [`HostQueue::pop`] (or handed to a callback by [`HostQueue::poll_with`]).
//!
//! The host announces MAXR2T 1 (one R2T outstanding per command) and holds the target to it: an
//! R2T must ask for the bytes that follow the ones asked for before, for a write whose data did
//! not go in-capsule, and only once the previous R2T's data has gone out; anything else is a
//! protocol error that ends the connection. So the send buffer never holds more than each
//! outstanding command's data once, whatever a target sends.
//!
//! Time is read only every [`CLOCK_EVERY`] polls that made progress, or every
//! [`IDLE_CLOCK_EVERY`] that found nothing to do; each command carries the coarse time it was
//! queued at, and the queue keeps the earliest coarse time at which one of them can be late, so
//! the command table is scanned only once that time has come (not on every empty poll: a
//! polled host makes many of them per command). A command older than the queue's
//! command timeout kills the connection (NVMe/TCP has no way to take a command back from a
//! target short of ending the association): the command ends with [`HostError::Timeout`],
//! every other outstanding one with [`HostError::Lost`]. Every fatal error does the same, so a
//! command ends exactly once whatever happens to the connection.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::net::{SocketAddr, TcpStream};
use std::ptr::NonNull;
use std::time::{Duration, Instant};

use super::HostOptions;
use super::error::{HostError, connect_err, recv_err};
use crate::nvmf::fabrics::{Connect, ConnectData, Sgl};
use crate::nvmf::pdu::{
    self, DataHdr, Digests, FatalError, Fes, IcReq, Pdu, PduReader, RecvConfig, Role, RxBuf,
    TermReq, field,
};
use crate::spec::sqe::{admin, io as opc};
use crate::spec::{Cqe, Sqe};

/// The clock is read once per this many calls of [`HostQueue::poll`] that made progress.
const CLOCK_EVERY: u32 = 256;

/// The clock is read once per this many calls of [`HostQueue::poll`] that found nothing to do.
const IDLE_CLOCK_EVERY: u32 = 8;

/// MAXH2CDATA must be at least this (TP 8000: 4 KiB).
const MIN_MAXH2CDATA: u32 = 4096;

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
    /// The command's buffer (read data for a read; empty for a raw command).
    pub buf: Vec<u8>,
}

/// Where a command's data lives.
#[derive(Debug)]
enum Buf {
    /// Owned by the queue until the command ends.
    Owned(Vec<u8>),
    /// The caller's memory (see [`HostQueue::submit_raw`]).
    Raw(NonNull<u8>, usize),
}

impl Buf {
    fn len(&self) -> usize {
        match self {
            Buf::Owned(v) => v.len(),
            Buf::Raw(_, n) => *n,
        }
    }
    fn slice(&self, off: usize, len: usize) -> &[u8] {
        match self {
            Buf::Owned(v) => &v[off..off + len],
            // SAFETY: `off + len` is within the buffer (checked by the callers against the
            // command's length), and submit_raw's contract keeps the memory alive and untouched
            // by anyone else while the command is outstanding.
            Buf::Raw(p, _) => unsafe { std::slice::from_raw_parts(p.as_ptr().add(off), len) },
        }
    }
    fn slice_mut(&mut self, off: usize, len: usize) -> &mut [u8] {
        match self {
            Buf::Owned(v) => &mut v[off..off + len],
            // SAFETY: as in `slice`; the caller gave the memory to the queue for writing.
            Buf::Raw(p, _) => unsafe { std::slice::from_raw_parts_mut(p.as_ptr().add(off), len) },
        }
    }
    fn into_vec(self) -> Vec<u8> {
        match self {
            Buf::Owned(v) => v,
            Buf::Raw(..) => Vec::new(),
        }
    }
}

#[derive(Debug)]
struct Cmd {
    tag: u64,
    buf: Buf,
    out: bool,
    len: u32,
    c2h_got: u32,
    digest_bad: bool,
    /// The write's data went in the command capsule (no R2T may ask for it).
    incapsule: bool,
    /// Bytes of the write the target asked for so far (the next R2T's offset).
    r2t_next: u32,
    /// Where in the send stream ([`HostQueue::sent_total`]) the data of the last R2T ends: a
    /// further R2T before it has all gone out exceeds the MAXR2T of 1 the host announced.
    r2t_done_at: u64,
    /// Coarse time (ms since the queue opened) it was queued at; `u64::MAX`: no time limit
    /// (an Asynchronous Event Request waits for an event as long as it takes).
    queued_ms: u64,
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
    /// Bytes ever written to the socket (a position in the send stream).
    sent_total: u64,
    /// Where in `out` the first whole PDU starts (the bytes before it end a PDU whose start
    /// went out and was dropped from `out`).
    out_head: usize,
    done: VecDeque<HostCompletion>,
    dead: Option<String>,
    timeout: Duration,
    cmd_timeout_ms: u64,
    epoch: Instant,
    now_ms: u64,
    /// Polls that made progress since the clock was read.
    polls: u32,
    /// Polls that found nothing to do since the clock was read.
    idle_polls: u32,
    /// Coarse time from which an outstanding command may be late (`u64::MAX`: none can be):
    /// the earliest deadline seen by the last scan, lowered by every later submission.
    check_at_ms: u64,
}

// SAFETY: the raw buffers a queue holds were given to it under submit_raw's contract (valid and
// unaliased until the command ends); the queue is used by one thread at a time (`&mut self`),
// and moving it to another thread moves that use with it.
unsafe impl Send for HostQueue {}

impl core::fmt::Debug for HostQueue {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("HostQueue").field("qid", &self.qid).finish()
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
            .map_err(|source| connect_err(addr, source))?;
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
            maxh2cdata: MIN_MAXH2CDATA,
            in_capsule: fabrics_admin_in_capsule(),
            qid: 0,
            // CID = slot index.
            cmds: (0..n).map(|_| None).collect(),
            free: (0..n).rev().collect(),
            out: Vec::with_capacity(64 * 1024),
            sent: 0,
            sent_total: 0,
            out_head: 0,
            done: VecDeque::new(),
            dead: None,
            timeout: opts.timeout,
            cmd_timeout_ms: opts.command_timeout.as_millis().max(1) as u64,
            epoch: Instant::now(),
            now_ms: 0,
            polls: 0,
            idle_polls: 0,
            check_at_ms: u64::MAX,
        };
        let req = Pdu::IcReq(IcReq {
            pfv: 0,
            // HPDA 0: C2HData may start right after the header (we read it into place).
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
                    if r.pfv != 0 {
                        return Err(HostError::IcResp(
                            "PFV is not 0 (unknown PDU format version)",
                        ));
                    }
                    if r.digests != opts.digests {
                        return Err(HostError::IcResp(
                            "the digests do not echo the ICReq's (ask for the digests the target supports)",
                        ));
                    }
                    if r.cpda > pdu::MAX_PDA {
                        return Err(HostError::IcResp("CPDA is above 31"));
                    }
                    if r.maxh2cdata < MIN_MAXH2CDATA || r.maxh2cdata % 4 != 0 {
                        return Err(HostError::IcResp(
                            "MAXH2CDATA is below 4096 or not a multiple of 4",
                        ));
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
                Err(e) => return Err(recv_err(e)),
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
    /// Command slots (the most commands outstanding at once).
    pub fn slots(&self) -> usize {
        self.cmds.len()
    }
    /// Commands outstanding.
    pub fn outstanding(&self) -> usize {
        self.cmds.len() - self.free.len()
    }
    /// Sets the in-capsule data limit (from IOCCSZ, for an I/O queue).
    pub fn set_in_capsule(&mut self, bytes: u32) {
        self.in_capsule = bytes;
    }
    /// Why the connection died, if it did.
    pub fn lost(&self) -> Option<&str> {
        self.dead.as_deref()
    }

    /// Queues a command; its completion comes out of [`pop`](Self::pop).
    pub fn submit(&mut self, sqe: Sqe, data: HostData, tag: u64) -> Result<u16, HostError> {
        let (buf, out) = match data {
            HostData::None => (Vec::new(), false),
            HostData::Out(v) => (v, true),
            HostData::In(v) => (v, false),
        };
        self.submit_buf(sqe, Buf::Owned(buf), out, tag)
    }

    /// Queues a command whose data (`len` bytes at `ptr`; written to the controller if `out`,
    /// else read into it) stays in the caller's memory; read data lands there directly.
    ///
    /// # Safety
    /// The `len` bytes at `ptr` must stay valid, and must be neither read nor written by anyone
    /// else (for a write: not written), until the completion carrying `tag` has been taken from
    /// this queue ([`pop`](Self::pop) / [`poll_with`](Self::poll_with)), or the queue dropped.
    pub unsafe fn submit_raw(
        &mut self,
        sqe: Sqe,
        ptr: NonNull<u8>,
        len: usize,
        out: bool,
        tag: u64,
    ) -> Result<u16, HostError> {
        self.submit_buf(sqe, Buf::Raw(ptr, len), out, tag)
    }

    fn submit_buf(
        &mut self,
        mut sqe: Sqe,
        buf: Buf,
        out: bool,
        tag: u64,
    ) -> Result<u16, HostError> {
        if let Some(why) = &self.dead {
            return Err(HostError::Lost(why.clone()));
        }
        let Ok(len) = u32::try_from(buf.len()) else {
            return Err(HostError::Controller(
                "a transfer of 4 GiB or more; split it".into(),
            ));
        };
        if self.free.len() == self.cmds.len() {
            // Idle until now: the coarse clock may be stale.
            self.now_ms = self.epoch.elapsed().as_millis() as u64;
        }
        let Some(cid) = self.free.pop() else {
            return Err(HostError::QueueFull(self.cmds.len()));
        };
        sqe.set_cid(cid);
        let opcode = sqe.opcode();
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
            let data = buf.slice(0, len as usize);
            self.out.extend_from_slice(data);
            if self.digests.data {
                self.out.extend_from_slice(&pdu::crc32c(data).to_le_bytes());
            }
        }
        let queued_ms = if self.qid == 0 && opcode == admin::ASYNC_EVENT_REQUEST {
            u64::MAX
        } else {
            self.check_at_ms = self.check_at_ms.min(
                self.now_ms
                    .saturating_add(self.cmd_timeout_ms)
                    .saturating_add(1),
            );
            self.now_ms
        };
        self.cmds[cid as usize] = Some(Cmd {
            tag,
            buf,
            out,
            len,
            c2h_got: 0,
            digest_bad: false,
            incapsule,
            r2t_next: 0,
            r2t_done_at: 0,
            queued_ms,
        });
        Ok(cid)
    }

    /// Puts a finished command back (at the end) for a later [`pop`](Self::pop).
    pub(crate) fn push_done(&mut self, c: HostCompletion) {
        self.done.push_back(c);
    }

    /// The next finished command.
    pub fn pop(&mut self) -> Option<HostCompletion> {
        self.done.pop_front()
    }

    /// Polls ([`poll`](Self::poll)), then hands every finished command to `f`; returns how
    /// many. After a fatal error the outstanding commands are handed over (failed) before the
    /// error is returned.
    pub fn poll_with(&mut self, mut f: impl FnMut(HostCompletion)) -> Result<usize, HostError> {
        let r = self.poll();
        let mut n = 0;
        while let Some(c) = self.done.pop_front() {
            f(c);
            n += 1;
        }
        r.map(|_| n)
    }

    /// Sends what the socket takes of the queued commands now (a failure ends the
    /// connection, as in [`poll`](Self::poll)).
    pub fn send_now(&mut self) -> Result<(), HostError> {
        if let Some(why) = &self.dead {
            return Err(HostError::Lost(why.clone()));
        }
        match self.send() {
            Ok(_) => Ok(()),
            Err(e) => {
                self.kill(&e);
                Err(e)
            }
        }
    }

    fn send(&mut self) -> Result<usize, HostError> {
        let mut n = 0;
        while self.sent < self.out.len() {
            match self.sock.write(&self.out[self.sent..]) {
                Ok(0) => return Err(HostError::Closed),
                Ok(k) => {
                    self.sent += k;
                    self.sent_total += k as u64;
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
            self.out_head = 0;
        } else if self.sent > 1 << 20 {
            self.out_head = self.pdu_end_from(self.sent) - self.sent;
            self.out.drain(..self.sent);
            self.sent = 0;
        }
        Ok(n)
    }

    /// The first PDU boundary in `out` at or after `at` (every PDU in `out` is whole, its PLEN
    /// written by this queue).
    fn pdu_end_from(&self, at: usize) -> usize {
        let mut b = self.out_head;
        while b < at && b + pdu::CH_LEN <= self.out.len() {
            let plen = u32::from_le_bytes([
                self.out[b + 4],
                self.out[b + 5],
                self.out[b + 6],
                self.out[b + 7],
            ]);
            b += (plen as usize).max(pdu::CH_LEN);
        }
        b.min(self.out.len())
    }

    /// Sends and receives what can be without blocking; returns the progress made. A fatal
    /// error fails every outstanding command (with [`HostError::Lost`]) and is returned; so
    /// does every later call.
    pub fn poll(&mut self) -> Result<usize, HostError> {
        if let Some(why) = &self.dead {
            return Err(HostError::Lost(why.clone()));
        }
        let r = self.poll_inner().and_then(|n| {
            let due = if n == 0 {
                self.idle_polls += 1;
                self.idle_polls >= IDLE_CLOCK_EVERY
            } else {
                self.polls += 1;
                self.polls >= CLOCK_EVERY
            };
            if due && self.outstanding() > 0 {
                self.polls = 0;
                self.idle_polls = 0;
                self.now_ms = self.epoch.elapsed().as_millis() as u64;
                if self.now_ms >= self.check_at_ms {
                    self.check_timeouts()?;
                }
            }
            Ok(n)
        });
        match r {
            Ok(n) => Ok(n),
            Err(e) => {
                self.kill(&e);
                Err(e)
            }
        }
    }

    /// Closes the connection (the host's decision, nothing failed): outstanding commands end
    /// with [`HostError::Lost`], later calls say so.
    pub fn close(&mut self) {
        if self.dead.is_some() {
            return;
        }
        let why = "the host closed the connection".to_string();
        self.fail_all(&why);
        self.dead = Some(why);
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }

    /// Ends the connection after `e`: an H2CTermReq for a protocol error, every outstanding
    /// command failed once, the socket shut down.
    pub(crate) fn kill(&mut self, e: &HostError) {
        match e {
            HostError::Protocol(f) => self.send_term(*f),
            HostError::HeaderDigest => {
                self.send_term(FatalError::new(Fes::HeaderDigest, "header digest mismatch"))
            }
            _ => {}
        }
        let why = e.to_string();
        log::warn!("nvmf host: queue {} lost: {why}", self.qid);
        self.fail_all(&why);
        self.dead = Some(why);
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }

    /// Scans the commands (at coarse time `now_ms`): fails the connection on a late one, else
    /// notes the earliest time one can be late.
    fn check_timeouts(&mut self) -> Result<(), HostError> {
        let limit = self.cmd_timeout_ms;
        let now = self.now_ms;
        let mut next = u64::MAX;
        let mut late = None;
        for (cid, c) in self.cmds.iter().enumerate() {
            let Some(c) = c else { continue };
            if c.queued_ms == u64::MAX {
                continue;
            }
            // Late when more than `limit` ms old.
            let due = c.queued_ms.saturating_add(limit).saturating_add(1);
            if now >= due {
                late = Some(cid);
                break;
            }
            next = next.min(due);
        }
        self.check_at_ms = next;
        let Some(cid) = late else {
            return Ok(());
        };
        let c = self.cmds[cid].take().expect("found above");
        self.free.push(cid as u16);
        let err = HostError::Timeout {
            what: "a command",
            after: Duration::from_millis(limit),
        };
        self.done.push_back(HostCompletion {
            tag: c.tag,
            result: Err(HostError::Timeout {
                what: "the command",
                after: Duration::from_millis(limit),
            }),
            buf: c.buf.into_vec(),
        });
        Err(err)
    }

    /// Queues an H2CTermReq behind the PDU being sent (the rest of a partly sent PDU goes
    /// first, so the target can frame the TermReq; PDUs not yet started are dropped) and sends
    /// what the socket takes now, without blocking: best effort, the connection ends anyway.
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
        let end = self.pdu_end_from(self.sent);
        self.out.truncate(end);
        self.out.extend_from_slice(h.as_bytes());
        self.out.extend_from_slice(&data);
        if let Err(e) = self.send() {
            log::debug!("nvmf host: queue {}: H2CTermReq not sent: {e}", self.qid);
        }
        self.out.clear();
        self.sent = 0;
        self.out_head = 0;
    }

    fn fail_all(&mut self, why: &str) {
        for (cid, c) in self.cmds.iter_mut().enumerate() {
            if let Some(c) = c.take() {
                self.free.push(cid as u16);
                self.done.push_back(HostCompletion {
                    tag: c.tag,
                    result: Err(HostError::Lost(why.to_owned())),
                    buf: c.buf.into_vec(),
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
                    Err(e) => return Err(recv_err(e)),
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
                    // In range: on_c2h checked off + len against the command's length.
                    let dst = c.buf.slice_mut(off as usize, len as usize);
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
                        Err(e) => return Err(recv_err(e)),
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
            buf: c.buf.into_vec(),
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
                    .get_mut(r.cccid as usize)
                    .and_then(|c| c.as_mut())
                    .filter(|c| c.out)
                else {
                    return Err(HostError::Protocol(FatalError::field(
                        field::CCCID,
                        "R2T for no outstanding write",
                    )));
                };
                if c.incapsule {
                    return Err(HostError::Protocol(FatalError::new(
                        Fes::SequenceError,
                        "R2T for a write whose data went in the command capsule",
                    )));
                }
                if r.len == 0 || r.offset as u64 + r.len as u64 > c.len as u64 {
                    return Err(HostError::Protocol(FatalError::new(
                        Fes::DataOutOfRange,
                        "R2T empty or beyond the command's data",
                    )));
                }
                if r.offset != c.r2t_next {
                    return Err(HostError::Protocol(FatalError::field(
                        field::DATAO,
                        "R2T offset is not where the data asked for so far ends (overlap or gap)",
                    )));
                }
                if self.sent_total < c.r2t_done_at {
                    return Err(HostError::Protocol(FatalError::new(
                        Fes::DataLimitExceeded,
                        "R2T before the previous one's data went out (the host's MAXR2T is 1)",
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
                    let data = c.buf.slice(off as usize, len as usize);
                    self.out.extend_from_slice(data);
                    if self.digests.data {
                        self.out.extend_from_slice(&pdu::crc32c(data).to_le_bytes());
                    }
                    off += len;
                }
                c.r2t_next = end;
                c.r2t_done_at = self.sent_total + (self.out.len() - self.sent) as u64;
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
        self.wait_tag(what, tag)
    }

    /// Polls until the command tagged `tag` finishes (or the queue's timeout, which kills the
    /// connection: a command given up on cannot be taken back from the target).
    pub(crate) fn wait_tag(
        &mut self,
        what: &'static str,
        tag: u64,
    ) -> Result<(Cqe, Vec<u8>), HostError> {
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
            if let Err(e) = self.poll() {
                // The command was failed with the rest; take it out so it does not linger.
                if let Some(pos) = self.done.iter().position(|c| c.tag == tag) {
                    self.done.remove(pos);
                }
                return Err(e);
            }
            if self.done.iter().all(|c| c.tag != tag) {
                if Instant::now() > deadline {
                    let e = HostError::Timeout {
                        what,
                        after: self.timeout,
                    };
                    self.kill(&e);
                    if let Some(pos) = self.done.iter().position(|c| c.tag == tag) {
                        self.done.remove(pos);
                    }
                    return Err(e);
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
pub(crate) const fn fabrics_admin_in_capsule() -> u32 {
    8192
}
