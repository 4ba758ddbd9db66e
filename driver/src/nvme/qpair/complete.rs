//! The completion path: the poll loop over the CQ, the checks of each completion entry (SQ id
//! and head, a CID naming a command in flight), children completing into their parent, and the
//! delivery of results (to the caller's closure, a blocking call, or the done list while a
//! blocking call polls).

use super::{
    DONE, F_CTX, F_LEAK, F_SYNC, IDLE_WEIGHT, IN_FLIGHT, IoDone, IoResult, NIL, QueuePair,
    Resubmit, STATUS_MASK, lba_of,
};
use core::sync::atomic::Ordering;

use crate::nvme::error::{IoError, ProtocolError, Result};
use crate::spec::Status;
use crate::types::{Cid, Lba, Nsid};

impl<T> QueuePair<T> {
    #[inline]
    pub(super) fn poll_inner<F: FnMut(&mut Resubmit<'_, T>, T, IoResult)>(
        &mut self,
        max: usize,
        f: &mut F,
    ) -> Result<usize> {
        let mut delivered = 0;
        // One test for the unusual cases: results waiting in the done list, a dead queue, a
        // protocol error to report.
        if self.attention {
            if self.done_head != NIL && !self.defer {
                delivered += self.deliver_done(f);
            }
            if self.died {
                // The queue is gone on the device (or the device is): nothing it posts is
                // trusted.
                return match (delivered, self.dead) {
                    (0, Some(reason)) => Err(self.dead_error(reason)),
                    _ => Ok(delivered),
                };
            }
        }
        if self.unrung != 0 {
            self.ring_sq();
        }
        // The CQ position lives in registers while entries are consumed: `cq_room` and the
        // ring's head catch up after the loop. (A CQ head doorbell written inside it, by a
        // per-command submission of `poll_resubmit`, writes the head of the poll's start: the
        // entries consumed in this poll all stay counted below.)
        let mut at = self.ring.cq_cursor();
        let mut consumed = 0usize;
        while consumed < max {
            let Some(e) = at.peek() else {
                break;
            };
            let (dw0, dw2, dw3) = (e.dw0(), e.dw2(), e.dw3);
            at.advance();
            consumed += 1;
            delivered += self.complete(dw0, dw2, dw3, f);
        }
        if consumed != 0 {
            self.ring.advance_cq(at);
            self.stats.busy_polls += 1;
            // Wrapping: only a device that posts more than it has room for takes `cq_room`
            // below `-entries`, and then any value this low rings the CQ head below.
            self.cq_room = self.cq_room.wrapping_sub(consumed as i32);
            if self.cq_room <= self.cq_ring_at {
                self.ring_cq();
            }
            if self.wait_head != NIL {
                self.issue_waiting();
            }
            if self.unrung != 0 {
                self.ring_sq();
            }
            self.countdown -= 1;
        } else {
            self.countdown -= IDLE_WEIGHT;
            self.stats.empty_polls += 1;
        }
        if self.countdown <= 0 {
            delivered += self.housekeeping(f);
            // Commands a closure of `poll_resubmit` submitted while timeouts were reported.
            if self.unrung != 0 && self.dead.is_none() {
                self.ring_sq();
            }
        }
        if self.attention {
            return self.poll_end_unusual(delivered);
        }
        Ok(delivered)
    }

    /// The end of a poll that found (or made) something unusual: a protocol error to report,
    /// a queue that died with nothing delivered. Clears `attention` when nothing is left.
    #[cold]
    #[inline(never)]
    fn poll_end_unusual(&mut self, delivered: usize) -> Result<usize> {
        let out = if self.protocol.is_some() {
            Err(self.protocol_error())
        } else {
            match (delivered, self.died, self.dead) {
                (0, true, Some(reason)) => Err(self.dead_error(reason)),
                _ => Ok(delivered),
            }
        };
        self.attention = self.done_head != NIL || self.died || self.protocol.is_some();
        out
    }

    /// Writes the CQ head doorbell: the entries consumed since the last write go back to the
    /// device. Not on a queue the device no longer has (a controller reset since it was made).
    #[inline]
    pub(super) fn ring_cq(&mut self) {
        if self.shared.generation.load(Ordering::Relaxed) == self.generation {
            self.ring.ring_cq();
            self.stats.cq_doorbells += 1;
        }
        self.cq_room = self.max_inflight as i32;
    }

    /// CQ entries consumed since the CQ head doorbell was last written.
    #[inline]
    pub(super) fn cq_unrung(&self) -> u32 {
        (self.max_inflight as i32).wrapping_sub(self.cq_room) as u32
    }

    // ---------------------------------------------------------------------------------------
    // Completion internals.

    /// One completion entry. The common case (our SQ id, an SQ head in range, a known CID whose
    /// command is in flight and owns a context, success, no blocking call deferring delivery)
    /// is handled here; everything else, valid or not, by
    /// [`complete_general`](Self::complete_general).
    #[inline(always)]
    fn complete<F: FnMut(&mut Resubmit<'_, T>, T, IoResult)>(
        &mut self,
        dw0: u32,
        dw2: u32,
        dw3: u32,
        f: &mut F,
    ) -> usize {
        let cid = dw3 as u16;
        // DW2 is `sq_head | sq_id << 16`: it is ours with a head in range exactly when
        // `dw2 - (qid << 16) < entries`.
        if dw2.wrapping_sub(self.cqe_sq_base) < self.ring.entries() as u32
            && (cid as usize) < self.slots.len()
        {
            let defer = self.defer;
            let s = self.slot(cid);
            // A slot with a context is never a child (children carry none), so it needs no
            // parent bookkeeping.
            if s.state == IN_FLIGHT && s.flags & F_CTX != 0 && dw3 & STATUS_MASK == 0 && !defer {
                debug_assert!(s.parent == NIL && s.flags & F_SYNC == 0);
                // SAFETY: F_CTX says the context is initialised; the slot is freed (F_CTX
                // cleared with the other flags) so it is read once.
                let ctx = unsafe { s.ctx.assume_init_read() };
                self.push_free(cid);
                self.inflight -= 1;
                self.stats.completed += 1;
                f(&mut Resubmit { qp: self }, ctx, Ok(IoDone { dw0 }));
                return 1;
            }
        }
        self.complete_general(dw0, dw2, dw3, f)
    }

    /// [`complete`](Self::complete) for everything but the common case: children, blocking
    /// calls, errors, late and invalid completions.
    #[inline(never)]
    fn complete_general<F: FnMut(&mut Resubmit<'_, T>, T, IoResult)>(
        &mut self,
        dw0: u32,
        dw2: u32,
        dw3: u32,
        f: &mut F,
    ) -> usize {
        let cid = dw3 as u16;
        let sq_head = dw2 as u16;
        if (dw2 >> 16) as u16 != self.qid.0 {
            self.bad(ProtocolError::WrongSqId((dw2 >> 16) as u16));
            return 0;
        }
        // The SQ head itself is not needed (room on the SQ is counted by `inflight`), but a
        // head out of range is a device bug worth reporting.
        let entries = self.ring.entries();
        if sq_head >= entries {
            self.bad(ProtocolError::SqHeadOutOfRange { sq_head, entries });
        }
        if cid as usize >= self.slots.len() {
            self.bad(ProtocolError::UnknownCid(Cid(cid)));
            return 0;
        }
        if self.slot(cid).state != IN_FLIGHT {
            return self.complete_unusual(cid, f);
        }
        self.inflight -= 1;
        let ok = dw3 & STATUS_MASK == 0;
        let parent = self.slot(cid).parent;
        if parent == NIL {
            let res = if ok {
                Ok(IoDone { dw0 })
            } else {
                Err(self.status_error(cid, dw3))
            };
            self.deliver_and_free(cid, res, f)
        } else {
            if !ok {
                let e = self.status_error(cid, dw3);
                self.slot(parent).err.get_or_insert(e);
            }
            self.push_free(cid);
            self.child_done(parent, f)
        }
    }

    /// One child of `parent` finished; completes the parent after the last one.
    #[inline]
    pub(super) fn child_done<F: FnMut(&mut Resubmit<'_, T>, T, IoResult)>(
        &mut self,
        parent: u16,
        f: &mut F,
    ) -> usize {
        let p = self.slot(parent);
        p.count -= 1;
        if p.count != 0 {
            return 0;
        }
        if p.flags & F_LEAK != 0 {
            self.leak(parent);
            return 0;
        }
        let res = match p.err.take() {
            Some(e) => Err(e),
            None => Ok(IoDone { dw0: 0 }),
        };
        self.deliver_and_free(parent, res, f)
    }

    /// Hands a finished request to the caller (or the blocking call, or the done list while a
    /// blocking call is polling) and frees its slot.
    #[inline]
    pub(super) fn deliver_and_free<F: FnMut(&mut Resubmit<'_, T>, T, IoResult)>(
        &mut self,
        idx: u16,
        res: IoResult,
        f: &mut F,
    ) -> usize {
        let defer = self.defer;
        let s = self.slot(idx);
        if s.flags & F_CTX == 0 {
            if s.flags & F_SYNC != 0 {
                self.sync = Some(res);
            }
            self.push_free(idx);
            return 0;
        }
        if defer {
            s.state = DONE;
            s.next = NIL;
            match res {
                Ok(d) => {
                    s.dw0 = d.dw0;
                    s.err = None;
                }
                Err(e) => s.err = Some(e),
            }
            self.attention = true;
            if self.done_tail == NIL {
                self.done_head = idx;
            } else {
                let t = self.done_tail;
                self.slot(t).next = idx;
            }
            self.done_tail = idx;
            return 0;
        }
        s.flags &= !F_CTX;
        // SAFETY: F_CTX says the context is initialised; it is cleared so it is read once.
        let ctx = unsafe { s.ctx.assume_init_read() };
        self.push_free(idx);
        self.stats.completed += 1;
        f(&mut Resubmit { qp: self }, ctx, res);
        1
    }

    #[cold]
    fn deliver_done<F: FnMut(&mut Resubmit<'_, T>, T, IoResult)>(&mut self, f: &mut F) -> usize {
        let mut n = 0;
        while self.done_head != NIL {
            let idx = self.done_head;
            let s = self.slot(idx);
            let next = s.next;
            let res = match s.err.take() {
                Some(e) => Err(e),
                None => Ok(IoDone { dw0: s.dw0 }),
            };
            s.flags &= !F_CTX;
            // SAFETY: a done slot holds an initialised context (F_CTX), read once here.
            let ctx = unsafe { s.ctx.assume_init_read() };
            self.done_head = next;
            if next == NIL {
                self.done_tail = NIL;
            }
            self.push_free(idx);
            self.stats.completed += 1;
            f(&mut Resubmit { qp: self }, ctx, res);
            n += 1;
        }
        n
    }

    #[cold]
    fn status_error(&mut self, idx: u16, dw3: u32) -> IoError {
        let qid = self.qid;
        let s = self.slot(idx);
        IoError::Status {
            qid,
            cid: Cid(idx),
            opcode: s.opcode,
            nsid: Nsid(s.nsid),
            lba: Lba(lba_of(s)),
            status: Status::from_field(((dw3 >> 17) & 0x7fff) as u16),
            child: (s.parent != NIL).then_some(s.count),
        }
    }
}
