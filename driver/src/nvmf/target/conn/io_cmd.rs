//! I/O commands of a connection: checked against the namespace, submitted to the backend,
//! completed from the connection's completion queue.

use super::{Connection, Phase, dnr, st};
use crate::nvmf::backend::{BackendIo, BackendOp, IoCompletion, NsInfo};
use crate::nvmf::fabrics::{Sgl, sc as fsc};
use crate::spec::sqe::{DSM_AD, RW_FUA, io as opc};
use crate::spec::status::generic;
use crate::spec::{Sqe, Status};

/// Most data a Dataset Management command may carry: one page (256 ranges of 16 bytes).
const DSM_MAX_DATA: u32 = 4096;

impl Connection {
    pub(super) fn ns(&self, nsid: u32) -> Option<&NsInfo> {
        self.nss.iter().find(|n| n.nsid.0 == nsid)
    }

    /// Checks an I/O command against the namespace: `(blocks, bytes)`.
    pub(super) fn check_io(&self, sqe: &Sqe) -> Result<(u32, u32), Status> {
        let Some(b) = &self.queue else {
            return Err(dnr(generic::COMMAND_SEQUENCE_ERROR));
        };
        if !b.ctrl.ready() {
            return Err(dnr(generic::COMMAND_SEQUENCE_ERROR));
        }
        let Some(ns) = self.ns(sqe.nsid) else {
            return Err(dnr(generic::INVALID_NAMESPACE));
        };
        match sqe.opcode() {
            opc::READ | opc::WRITE | opc::WRITE_ZEROES => {
                let blocks = sqe.nlb() as u32 + 1;
                if sqe
                    .slba()
                    .checked_add(blocks as u64)
                    .is_none_or(|e| e > ns.blocks)
                {
                    return Err(dnr(generic::LBA_OUT_OF_RANGE));
                }
                if sqe.opcode() == opc::WRITE_ZEROES {
                    if !ns.write_zeroes {
                        return Err(dnr(generic::INVALID_OPCODE));
                    }
                    return Ok((blocks, 0));
                }
                let bytes = blocks as u64 * ns.block_size as u64;
                if bytes > self.target.options().max_transfer as u64 {
                    return Err(dnr(generic::INVALID_FIELD));
                }
                if Sgl::of(sqe).len as u64 != bytes {
                    return Err(dnr(fsc::DATA_SGL_LENGTH_INVALID));
                }
                Ok((blocks, bytes as u32))
            }
            opc::FLUSH => Ok((0, 0)),
            opc::DATASET_MANAGEMENT => {
                if !ns.deallocate {
                    return Err(dnr(generic::INVALID_OPCODE));
                }
                // NR ranges of 16 bytes (at most 256: 4 KiB). The data may be longer (Linux
                // sends its whole discard page when it uses it; nvmet checks only that the
                // ranges fit), but never more than one page, so no host makes the target buffer
                // more than 4 KiB per command.
                let nr = (sqe.cdw10 & 0xff) + 1;
                let len = Sgl::of(sqe).len;
                if len < nr * 16 || len > DSM_MAX_DATA {
                    return Err(dnr(fsc::DATA_SGL_LENGTH_INVALID));
                }
                Ok((0, len))
            }
            _ => Err(dnr(generic::INVALID_OPCODE)),
        }
    }

    pub(super) fn io(&mut self, slot: u16, sqe: &Sqe) {
        let (blocks, bytes) = match self.check_io(sqe) {
            Ok(v) => v,
            Err(e) => return self.respond(slot, e, 0),
        };
        let Some(backend) = self
            .queue
            .as_ref()
            .and_then(|b| b.ctrl.subsys.backend().cloned())
        else {
            return self.respond(slot, dnr(generic::INVALID_OPCODE), 0);
        };
        let nsb = self.ns(sqe.nsid).map_or(0, |n| n.blocks);
        let s = &mut self.slots[slot as usize];
        let op = match sqe.opcode() {
            opc::READ => {
                if s.buf.is_none() {
                    match backend.alloc(bytes as usize) {
                        Some(b) => s.buf = Some(b),
                        None => {
                            // DMA memory is short: the Read waits its turn (`retry_mem`).
                            s.phase = Phase::WaitMem;
                            self.mem_wait.push_back(slot);
                            return;
                        }
                    }
                }
                s.len = bytes;
                BackendOp::Read
            }
            opc::WRITE => BackendOp::Write,
            opc::FLUSH => BackendOp::Flush,
            opc::WRITE_ZEROES => BackendOp::WriteZeroes,
            opc::DATASET_MANAGEMENT => {
                if sqe.cdw11 & DSM_AD == 0 {
                    // Only hints: nothing to do.
                    return self.respond(slot, Status::SUCCESS, 0);
                }
                let Some(b) = s.buf.as_ref() else {
                    return self.respond(slot, dnr(fsc::DATA_SGL_LENGTH_INVALID), 0);
                };
                let d = b.as_slice();
                let nr = ((sqe.cdw10 & 0xff) + 1) as usize;
                let mut ranges = Vec::with_capacity(nr);
                for i in 0..nr {
                    let r = &d[16 * i..16 * i + 16];
                    let nlb = u32::from_le_bytes([r[4], r[5], r[6], r[7]]);
                    let slba = u64::from_le_bytes(r[8..16].try_into().unwrap_or([0xff; 8]));
                    if slba.checked_add(nlb as u64).is_none_or(|e| e > nsb) {
                        return self.respond(slot, dnr(generic::LBA_OUT_OF_RANGE), 0);
                    }
                    if nlb > 0 {
                        ranges.push((slba, nlb));
                    }
                }
                BackendOp::Deallocate(ranges)
            }
            _ => return self.respond(slot, dnr(generic::INVALID_OPCODE), 0),
        };
        let s = &mut self.slots[slot as usize];
        let buf = if matches!(op, BackendOp::Read | BackendOp::Write) {
            s.buf.take()
        } else {
            None
        };
        s.phase = Phase::Executing;
        let io = BackendIo {
            op,
            nsid: crate::Nsid(sqe.nsid),
            slba: sqe.slba(),
            blocks,
            fua: sqe.cdw12 & RW_FUA != 0,
            buf,
        };
        let done = IoCompletion::new(self.cq.clone(), slot, s.generation, self.notifier.clone());
        let Some(q) = &self.queue else {
            return done.complete(dnr(generic::COMMAND_SEQUENCE_ERROR), io.buf);
        };
        let done = done.counted(q.ctrl.inflight_counter());
        // Counted first, then checked: a teardown that saw the count at zero has marked the
        // association dead (or reset it) before, so this command is not started behind its
        // back.
        if q.ctrl.is_dead() || q.ctrl.reset_generation() != q.generation {
            return done.complete(
                Status::new(crate::spec::Sct::Generic, generic::ABORTED_SQ_DELETION),
                io.buf,
            );
        }
        backend.submit(io, done);
    }

    pub(super) fn drain_completions(&mut self) -> usize {
        let mut n = 0;
        while let Some(d) = self.cq.pop() {
            n += 1;
            // A command processed is traffic for the keep-alive timer (TBKAS), like one
            // received: the host, which counts completions, sent none while this one ran long.
            if n == 1
                && let Some(b) = &self.queue
            {
                b.ctrl.seen(self.target.now_ms());
            }
            let Some(s) = self.slots.get_mut(d.slot as usize) else {
                continue;
            };
            if s.phase != Phase::Executing || s.generation != d.generation {
                continue;
            }
            let admin = self
                .queue
                .as_ref()
                .filter(|b| b.qid == 0)
                .map(|b| b.ctrl.clone());
            if let Some(ctrl) = admin {
                // The only admin command a backend completes: Get Log Page SMART / Health.
                let sqe = s.sqe;
                if !d.status.is_success() {
                    self.respond(d.slot, d.status, 0);
                    continue;
                }
                let device = d.buf.as_ref().map(|b| b.as_slice());
                match ctrl.smart_page(&sqe, device) {
                    Ok(page) => {
                        let s = &mut self.slots[d.slot as usize];
                        s.len = page.len() as u32;
                        s.buf = Some(crate::IoBuffer::Heap(page));
                        self.respond_with_data(d.slot, 0);
                    }
                    Err(e) => self.respond(d.slot, e, 0),
                }
                continue;
            }
            s.buf = d.buf;
            let read = s.sqe.opcode() == opc::READ;
            if d.status.is_success()
                && let Some(b) = &self.queue
                && matches!(s.sqe.opcode(), opc::READ | opc::WRITE)
            {
                b.ctrl.subsys.count_io(!read, s.len as u64);
            }
            if !(d.status.is_success() && read) {
                self.respond(d.slot, d.status, 0);
            } else if s.buf.as_ref().is_some_and(|b| b.len() >= s.len as usize) {
                self.respond_with_data(d.slot, 0);
            } else {
                // A backend bug: a Read reported done without its data.
                log::error!(
                    "nvmf: {}: the backend completed Read cid {} ({} bytes) with a buffer of {} bytes",
                    self.peer,
                    s.sqe.cid(),
                    s.len,
                    s.buf.as_ref().map_or(0, |b| b.len())
                );
                self.respond(d.slot, st(generic::DATA_TRANSFER_ERROR), 0);
            }
        }
        n
    }
}
