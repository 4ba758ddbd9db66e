//! The send side of a connection: response capsules, C2HData, the send queue and
//! vectored writes of what the socket takes.

use std::io::{self, IoSlice, Write};

use super::{Connection, Phase, State, TxData, TxItem};
use crate::nvmf::pdu::{self, DataHdr, EncodedHdr, Pdu};
use crate::spec::{Cqe, Status};

impl Connection {
    /// Queues a PDU; nothing once the connection is no longer Ready (after a C2HTermReq or
    /// the Disconnect response nothing else may go out), the slot released at once.
    pub(super) fn push(&mut self, hdr: EncodedHdr, data: TxData, release: Option<u16>) {
        if self.state != State::Ready {
            if let Some(s) = release {
                self.release(s);
            }
            return;
        }
        let ddgst = match &data {
            TxData::Slot { slot, off, len } if self.digests.data && *len > 0 => {
                let b = self.slots[*slot as usize].buf.as_ref();
                let d = b.map_or(&[][..], |b| {
                    &b.as_slice()[*off as usize..(*off + *len) as usize]
                });
                Some(pdu::crc32c(d).to_le_bytes())
            }
            _ => None,
        };
        self.stats.pdus_out += 1;
        self.tx.push_back(TxItem {
            hdr,
            data,
            ddgst,
            sent: 0,
            release,
            close_after: false,
        });
    }

    pub(super) fn respond(&mut self, slot: u16, status: Status, dw0: u32) {
        self.respond2(slot, status, dw0, 0);
    }

    pub(super) fn respond2(&mut self, slot: u16, status: Status, dw0: u32, dw1: u32) {
        let s = &mut self.slots[slot as usize];
        if s.phase == Phase::WaitR2t {
            self.r2t_wait.retain(|&x| x != slot);
        }
        s.phase = Phase::Responding;
        self.stats.commands += 1;
        if !status.is_success() {
            self.stats.errors += 1;
            log::debug!(
                "nvmf: {} qid {}: opcode {:#04x} (cdw10 {:#x}) completed with {status:?}",
                self.peer,
                self.queue.as_ref().map_or(0, |b| b.qid),
                s.sqe.opcode(),
                s.sqe.cdw10
            );
        }
        let cqe = Cqe {
            dw0,
            dw1,
            sq_head: self.sq_head,
            sq_id: self.queue.as_ref().map_or(0, |b| b.qid),
            cid: s.sqe.cid(),
            status: status.to_field() << 1,
        };
        let hdr = pdu::encode(&Pdu::CapsuleResp(cqe), 0, self.digests, self.hpda);
        self.push(hdr, TxData::None, Some(slot));
    }

    /// C2HData PDUs of at most `max_c2h_data` bytes from the slot's buffer, then the response.
    pub(super) fn respond_with_data(&mut self, slot: u16, dw0: u32) {
        let s = &self.slots[slot as usize];
        let cid = s.sqe.cid();
        let total = s.buf.as_ref().map_or(0, |b| (s.len as usize).min(b.len())) as u32;
        let chunk = self.target.options().max_c2h_data.max(4096);
        let mut off = 0;
        while off < total {
            let len = chunk.min(total - off);
            let last = off + len == total;
            let hdr = pdu::encode(
                &Pdu::C2hData(DataHdr {
                    cccid: cid,
                    ttag: 0,
                    offset: off,
                    len,
                    last,
                    success: false,
                }),
                len,
                self.digests,
                self.hpda,
            );
            self.push(hdr, TxData::Slot { slot, off, len }, None);
            off += len;
        }
        self.respond(slot, Status::SUCCESS, dw0);
    }

    pub(super) fn release(&mut self, slot: u16) {
        let s = &mut self.slots[slot as usize];
        if s.phase == Phase::Free {
            return;
        }
        s.phase = Phase::Free;
        s.buf = None;
        self.free.push(slot);
        self.outstanding -= 1;
    }

    /// Writes what the socket takes; returns the PDUs completed.
    pub(super) fn flush(&mut self) -> usize {
        let mut done = 0;
        if matches!(self.state, State::Closed) {
            return 0;
        }
        while !self.tx.is_empty() {
            let mut iov = [IoSlice::new(&[]); 48];
            let mut n = 0;
            for t in self.tx.iter().take(16) {
                let data: &[u8] = match &t.data {
                    TxData::None => &[],
                    TxData::Owned(v) => v,
                    TxData::Slot { slot, off, len } => self.slots[*slot as usize]
                        .buf
                        .as_ref()
                        .map_or(&[][..], |b| {
                            &b.as_slice()[*off as usize..(*off + *len) as usize]
                        }),
                };
                let dg: &[u8] = t.ddgst.as_ref().map_or(&[], |d| &d[..]);
                let mut skip = t.sent;
                for seg in [t.hdr.as_bytes(), data, dg] {
                    if skip >= seg.len() {
                        skip -= seg.len();
                        continue;
                    }
                    iov[n] = IoSlice::new(&seg[skip..]);
                    skip = 0;
                    n += 1;
                }
                // Nothing after a C2HTermReq or the Disconnect response in this write.
                if t.close_after {
                    break;
                }
            }
            self.stats.socket_writes += 1;
            let wrote = match self.sock.write_vectored(&iov[..n]) {
                Ok(0) => {
                    self.close_now();
                    return done;
                }
                Ok(w) => {
                    // The host answers what it receives: read again next round.
                    self.recv_skip = 0;
                    w
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return done,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.why = Some(format!("socket error: {e}"));
                    self.close_now();
                    return done;
                }
            };
            let mut left = wrote;
            while left > 0 {
                let Some(t) = self.tx.front_mut() else { break };
                let total = t.hdr.as_bytes().len()
                    + match &t.data {
                        TxData::None => 0,
                        TxData::Owned(v) => v.len(),
                        TxData::Slot { len, .. } => *len as usize,
                    }
                    + t.ddgst.map_or(0, |d| d.len());
                let take = left.min(total - t.sent);
                t.sent += take;
                left -= take;
                if t.sent == total {
                    let t = self.tx.pop_front().expect("front exists");
                    done += 1;
                    if let Some(s) = t.release {
                        self.release(s);
                    }
                    if t.close_after {
                        self.closing();
                        self.tx.clear();
                        let _ = self.sock.shutdown(std::net::Shutdown::Write);
                        return done;
                    }
                }
            }
        }
        done
    }
}
