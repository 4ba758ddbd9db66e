//! When things go wrong: timeouts (epochs, the CID quarantine, Abort on the admin queue),
//! late completions of quarantined commands, health checks (CSTS, controller reset), a dead
//! queue failing every request exactly once, and teardown, which makes sure the device no
//! longer uses the queue's memory before it is reused (or leaks it).

use std::mem::ManuallyDrop;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{
    COUNTDOWN, F_CTX, F_DEFERRED, F_HOLDS, F_LEAK, F_SYNC, HEALTH_INTERVAL, IN_FLIGHT, IoResult,
    LEAKED, NIL, PARENT, QUARANTINED, QueueOptions, QueuePair, Resubmit, TIMEOUT_EPOCHS, WAITING,
    lba_of,
};
use crate::nvme::admin::{AbortOutcome, abort_with};
use crate::nvme::controller::StopState;
use crate::nvme::error::{DeadReason, Error, IoError, ProtocolError};
use crate::nvme::qpair::DoorbellMode;
use crate::spec::Sqe;
use crate::types::{Cid, Lba, Nsid};

/// What [`QueuePair::send_abort`] did.
enum AbortSent {
    /// Sent, and the controller answered.
    Sent,
    /// Not sent: another thread holds the admin queue.
    Busy,
    /// Sent and failed in a way later Aborts would repeat (timeout, queue full, device gone).
    Stop,
}

impl<T> QueuePair<T> {
    /// True when a newer generation of the controller started after this queue pair was
    /// created: a reset ([`Controller::reset`](crate::Controller::reset)), a shutdown
    /// ([`Controller::shutdown`](crate::Controller::shutdown)) or a disable (after a fatal
    /// status, or a command that could not be reclaimed). Its queues no longer exist on the
    /// device, or soon will not: it is stale as soon as that reset, shutdown or disable
    /// starts, before the device has stopped. One atomic load.
    #[inline]
    pub fn is_stale(&self) -> bool {
        self.shared.generation.load(Ordering::Acquire) != self.generation
    }

    /// Why a stale queue pair is dead: the controller's reason ([`DeadReason::ShutDown`] after
    /// a shutdown, [`DeadReason::DeviceGone`] after a removal), else a reset or disable.
    pub(super) fn stale_reason(&self) -> DeadReason {
        self.shared
            .dead_reason(self.generation)
            .unwrap_or(DeadReason::ControllerReset)
    }

    /// Once stale (see [`is_stale`](Self::is_stale)), replaces this queue pair by a new one
    /// with the same options on the re-initialised controller (new queues, a new queue id),
    /// keeping its counters.
    ///
    /// Nothing is lost or delivered twice: the replacement happens only once every request of
    /// the old queue pair has been handed back (each failed once by a poll, with the reason
    /// the controller gives: [`DeadReason::ControllerReset`] after a reset or disable,
    /// [`DeadReason::ShutDown`] after a shutdown; only once the device has been seen to stop:
    /// until then polls hand back only what the device completes). After a shutdown the
    /// creation fails (the controller is not ready). `Ok(false)`: nothing to do
    /// (not stale), or not yet (requests still to deliver: the queue is marked dead so that
    /// the next [`poll`](Self::poll) fails them; renew after it). An error is the creation's (the
    /// controller not ready again yet, or failed): the old queue pair stays, dead.
    pub fn renew(&mut self) -> Result<bool, Error> {
        if !self.is_stale() {
            return Ok(false);
        }
        if !self.died && self.outstanding() > 0 {
            self.dead.get_or_insert(self.stale_reason());
            self.countdown = 0;
            return Ok(false);
        }
        let opts = QueueOptions {
            entries: self.ring.entries(),
            requests: self.slots.len() as u16,
            doorbell: if self.per_command {
                DoorbellMode::PerCommand
            } else {
                DoorbellMode::PerBatch
            },
            timeout: (self.tick != Duration::MAX).then(|| self.tick * 4),
            interrupts: self.interrupts(),
            cq_head_batch: (self.max_inflight as i32 - self.cq_ring_at) as u16,
        };
        // Nothing is outstanding: this pair no longer touches its doorbells, and the reset
        // deleted its queues. Hand its queue id back first so that the new pair can take the
        // same id (and vector) when every granted id is in use.
        if !self.qid_freed {
            self.shared.free_qid(self.qid);
            self.qid_freed = true;
        }
        let fresh = QueuePair::create(self.shared.clone(), opts)?;
        let stats = self.stats;
        log::info!(
            "{}: queue pair {} renewed after a controller reset (now queue {})",
            self.location,
            self.qid.0,
            fresh.qid.0
        );
        // The old one is dropped here: the reset deleted its queues, so its memory is freed.
        *self = fresh;
        self.stats = stats;
        Ok(true)
    }

    /// A completion for a quarantined command (late), or for no command at all.
    #[cold]
    #[inline(never)]
    pub(super) fn complete_unusual<F: FnMut(&mut Resubmit<'_, T>, T, IoResult)>(
        &mut self,
        cid: u16,
        f: &mut F,
    ) -> usize {
        if self.slot(cid).state != QUARANTINED {
            self.bad(ProtocolError::UnknownCid(Cid(cid)));
            return 0;
        }
        self.inflight -= 1;
        self.quarantined -= 1;
        self.stats.late_completions += 1;
        if self.slot(cid).flags & F_DEFERRED != 0 {
            // The memory was kept from the caller until now: report the timeout.
            return self.report_timeout(cid, true, f);
        }
        self.push_free(cid);
        0
    }

    fn timeout_error(&mut self, idx: u16) -> IoError {
        let qid = self.qid;
        let s = self.slot(idx);
        IoError::Timeout {
            qid,
            cid: Cid(idx),
            opcode: s.opcode,
            nsid: Nsid(s.nsid),
            lba: Lba(lba_of(s)),
            child: (s.parent != NIL).then_some(s.count),
        }
    }

    /// Reports the timeout of quarantined command `idx` to its request. With `free`, the slot
    /// is released too (the device has let go of it).
    fn report_timeout<F: FnMut(&mut Resubmit<'_, T>, T, IoResult)>(
        &mut self,
        idx: u16,
        free: bool,
        f: &mut F,
    ) -> usize {
        let e = self.timeout_error(idx);
        let s = self.slot(idx);
        s.flags &= !F_DEFERRED;
        let parent = s.parent;
        if parent != NIL {
            self.slot(parent).err.get_or_insert(e);
            if free {
                self.push_free(idx);
            }
            return self.child_done(parent, f);
        }
        if free {
            return self.deliver_and_free(idx, Err(e), f);
        }
        // Keep the slot (quarantined); hand back the context now.
        if s.flags & F_SYNC != 0 {
            self.sync = Some(Err(e));
            return 0;
        }
        if s.flags & F_CTX == 0 {
            return 0;
        }
        s.flags &= !F_CTX;
        // SAFETY: F_CTX says the context is initialised; cleared so it is read once.
        let ctx = unsafe { s.ctx.assume_init_read() };
        self.stats.completed += 1;
        f(&mut Resubmit { qp: self }, ctx, Err(e));
        1
    }

    // ---------------------------------------------------------------------------------------
    // Time, health and failure.

    /// Every few thousand polls, or every 256 empty ones: reads the clock, advances the epoch
    /// (scanning for timeouts), and checks the controller's health if the queue pair has had
    /// requests outstanding and seen no completion for [`HEALTH_INTERVAL`]. A queue pair whose
    /// device keeps completing commands reads no register at all.
    #[cold]
    #[inline(never)]
    pub(super) fn housekeeping<F: FnMut(&mut Resubmit<'_, T>, T, IoResult)>(
        &mut self,
        f: &mut F,
    ) -> usize {
        self.countdown = COUNTDOWN;
        self.stats.housekeeping += 1;
        // A queue with nothing left on the device hands back the entries it consumed since the
        // CQ head doorbell was last written (a busy one does so every half queue: writing it
        // here too would cost a doorbell every 256 empty polls, most of them in a slow guest).
        if self.inflight == 0 && self.cq_unrung() != 0 && !self.died {
            self.ring_cq();
        }
        if let Some(reason) = self.dead {
            return if self.died { 0 } else { self.die(reason, f) };
        }
        if self.outstanding() == 0 {
            return 0;
        }
        let now = Instant::now();
        if self.shared.poll_removal(now) {
            return self.die(DeadReason::DeviceGone, f);
        }
        // A poll that consumed completion entries since the last look (`busy_polls`)
        // is a sign of life: the health check moves a whole interval away.
        if self.stats.busy_polls != self.health_mark {
            self.health_mark = self.stats.busy_polls;
            self.next_health = now + HEALTH_INTERVAL;
        }
        let check_health = now >= self.next_health;
        let mut delivered = 0;
        if now.duration_since(self.tick_start) >= self.tick {
            self.epoch = self.epoch.wrapping_add(1);
            self.tick_start = now;
            delivered += self.scan_timeouts(f);
        }
        if check_health && self.dead.is_none() {
            self.next_health = now + HEALTH_INTERVAL;
            self.stats.register_reads += 1;
            // A stale queue pair reads no register: a newer generation's reset or disable
            // covers its queues, and it must never disable the controller itself (that would
            // start yet another generation in the middle of that reset).
            let reason = if self.is_stale() {
                self.shared.dead_reason(self.generation)
            } else {
                match self.shared.check_csts() {
                    Err(Error::DeviceGone { .. }) => Some(DeadReason::DeviceGone),
                    Err(_) => Some(DeadReason::ControllerFatal),
                    Ok(_) => self.shared.dead_reason(self.generation),
                }
            };
            if let Some(r) = reason {
                delivered += self.die(r, f);
            }
        }
        delivered
    }

    /// Quarantines and reports the commands that timed out, sending an Abort for each while
    /// the budget lasts: at most ACL + 1 Aborts per scan, none once one of them timed out or
    /// found the admin queue full or the controller unusable, and none while another thread
    /// holds the admin queue. Each Abort waits for its completion (up to the admin timeout)
    /// from inside `poll`, so the budget bounds how long a hung device can stall the poll.
    fn scan_timeouts<F: FnMut(&mut Resubmit<'_, T>, T, IoResult)>(&mut self, f: &mut F) -> usize {
        let mut delivered = 0;
        let mut aborts_left = self.abort_limit;
        let mut unrecoverable = false;
        for idx in 0..self.slots.len() as u16 {
            let epoch = self.epoch;
            let defer = self.defer;
            let s = self.slot(idx);
            let age = epoch.wrapping_sub(s.epoch);
            if age < TIMEOUT_EPOCHS {
                continue;
            }
            if s.state == QUARANTINED && s.flags & F_DEFERRED != 0 {
                // Abort did not make the device give the command back within another timeout.
                unrecoverable = true;
                continue;
            }
            if s.state != IN_FLIGHT {
                continue;
            }
            if defer && s.flags & F_SYNC == 0 {
                // A blocking call is polling and cannot hand contexts out: the next ordinary
                // poll reports these.
                continue;
            }
            s.state = QUARANTINED;
            s.epoch = epoch;
            let holds = s.flags & F_HOLDS != 0;
            if holds {
                s.flags |= F_DEFERRED;
            }
            self.quarantined += 1;
            self.stats.timeouts += 1;
            if aborts_left == 0 {
                self.stats.aborts_skipped += 1;
            } else {
                match self.send_abort(idx) {
                    AbortSent::Sent => aborts_left -= 1,
                    AbortSent::Busy => self.stats.aborts_skipped += 1,
                    AbortSent::Stop => aborts_left = 0,
                }
            }
            if !holds {
                delivered += self.report_timeout(idx, false, f);
            }
        }
        if unrecoverable {
            delivered += self.die(DeadReason::Unrecoverable, f);
        }
        delivered
    }

    /// Sends an Abort for slot `idx` unless another thread holds the admin queue.
    fn send_abort(&mut self, idx: u16) -> AbortSent {
        let sh = &*self.shared;
        let mut guard = match sh.admin.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return AbortSent::Busy,
        };
        let res = match guard.as_mut() {
            Some(q) if sh.not_ready().is_none() => abort_with(q, sh, self.qid, Cid(idx)),
            _ => Err(sh.gone()),
        };
        drop(guard);
        match res {
            Ok(AbortOutcome::Aborted) => self.stats.aborts += 1,
            _ => self.stats.aborts_failed += 1,
        }
        match res {
            // The controller answered: further Aborts may work too.
            Ok(_) | Err(Error::AdminStatus { .. }) => AbortSent::Sent,
            // Admin timeout, admin queue full, device gone or not ready: do not wait again.
            Err(_) => AbortSent::Stop,
        }
    }

    /// Deletes the SQ then the CQ on the device. True if both were deleted.
    fn delete_queues(&self) -> bool {
        let sh = &*self.shared;
        let mut guard = sh.lock_admin();
        let Some(q) = guard.as_mut() else {
            return false;
        };
        if sh.not_ready().is_some() {
            return false;
        }
        q.execute_checked(
            sh,
            "Delete I/O Submission Queue",
            Sqe::delete_io_sq(self.qid.0),
        )
        .is_ok()
            && q.execute_checked(
                sh,
                "Delete I/O Completion Queue",
                Sqe::delete_io_cq(self.qid.0),
            )
            .is_ok()
    }

    /// Stops the queue: makes sure the device no longer uses its memory (or leaks what it may
    /// still use), and completes every request exactly once.
    ///
    /// After a controller reset or shutdown, not before its disable (or shutdown) has settled:
    /// until then the queue is dead (it refuses new requests and rings no doorbell) but its requests stay
    /// outstanding (the device may still complete them, and they are delivered as usual), and
    /// every poll looks again.
    #[cold]
    fn die<F: FnMut(&mut Resubmit<'_, T>, T, IoResult)>(
        &mut self,
        reason: DeadReason,
        f: &mut F,
    ) -> usize {
        self.dead = Some(reason);
        self.attention = true;
        if reason == DeadReason::Unrecoverable && self.cq_unrung() != 0 {
            // The queues are deleted next: hand the consumed entries back first, so that the
            // device has room for whatever it still posts before it takes the deletion.
            self.ring_cq();
        }
        let Some(stopped) = self.stop_device(reason) else {
            self.stats.reset_waits += 1;
            self.countdown = 0;
            return 0;
        };
        let reason = self.dead.unwrap_or(reason);
        self.died = true;
        self.stopped = stopped;
        let mut delivered = 0;
        let aborted = IoError::Aborted {
            qid: self.qid,
            reason,
        };
        // Children first, so parents see every child resolved.
        for pass in 0..2 {
            for idx in 0..self.slots.len() as u16 {
                let s = self.slot(idx);
                let is_child = s.parent != NIL;
                if (pass == 0) != is_child {
                    continue;
                }
                let state = s.state;
                let deferred = s.flags & F_DEFERRED != 0;
                match state {
                    WAITING => {
                        if is_child {
                            let p = s.parent;
                            self.slot(p).err.get_or_insert(aborted);
                            self.push_free(idx);
                            delivered += self.child_done(p, f);
                        } else {
                            delivered += self.deliver_and_free(idx, Err(aborted), f);
                        }
                    }
                    IN_FLIGHT | QUARANTINED => {
                        self.inflight -= 1;
                        if state == QUARANTINED {
                            self.quarantined -= 1;
                        }
                        if !stopped {
                            if state == IN_FLIGHT || deferred {
                                if is_child {
                                    let p = self.slot(idx).parent;
                                    self.slot(p).flags |= F_LEAK;
                                    self.slot(idx).state = LEAKED;
                                    delivered += self.child_done(p, f);
                                } else {
                                    self.leak(idx);
                                }
                            } else {
                                self.slot(idx).state = LEAKED;
                            }
                            continue;
                        }
                        if deferred {
                            delivered += self.report_timeout(idx, true, f);
                        } else if state == QUARANTINED {
                            self.push_free(idx);
                        } else if is_child {
                            let p = self.slot(idx).parent;
                            self.slot(p).err.get_or_insert(aborted);
                            self.push_free(idx);
                            delivered += self.child_done(p, f);
                        } else {
                            delivered += self.deliver_and_free(idx, Err(aborted), f);
                        }
                    }
                    _ => {}
                }
            }
        }
        self.wait_head = NIL;
        self.wait_tail = NIL;
        delivered
    }

    /// Makes sure the device no longer touches this queue's memory. `Some(true)` if it is
    /// known to, `Some(false)` if it may still (the memory is leaked), `None` while a reset,
    /// disable or shutdown of the controller is under way and has not yet seen the device stop
    /// (CC.EN cleared and CSTS.RDY = 0, or CSTS.SHST complete): ask again later. One that ended
    /// without seeing the device stop leaves it possibly working: `Some(false)`, unless a
    /// removal stopped it (`None` until the device is released, then `Some(true)` with the
    /// reason [`DeadReason::DeviceGone`]).
    ///
    /// A stale queue pair (see [`is_stale`](Self::is_stale)) never disables the controller or
    /// deletes its queues, whatever the reason: the disable (or shutdown) of the newer
    /// generation stops the device for its queues too, and it waits for that one.
    fn stop_device(&mut self, reason: DeadReason) -> Option<bool> {
        let stale = self.is_stale();
        match reason {
            DeadReason::DeviceGone => Some(true),
            DeadReason::ControllerFatal if !stale => Some(self.shared.disable().is_ok()),
            DeadReason::Unrecoverable if !stale => {
                Some(self.delete_queues() || self.shared.disable().is_ok())
            }
            DeadReason::ControllerReset
            | DeadReason::ShutDown
            | DeadReason::ControllerFatal
            | DeadReason::Unrecoverable => {
                match self.shared.stop_state(self.generation) {
                    StopState::Stopped => return Some(true),
                    StopState::Pending => return None,
                    StopState::NotStopped => {}
                }
                // A reset stopped by a removal: GONE is published once the bus has let the
                // device go (or failed to, see `mark_gone`); wait for it.
                if self.shared.dead_reason(self.generation) == Some(DeadReason::DeviceGone) {
                    self.dead = Some(DeadReason::DeviceGone);
                    return Some(true);
                }
                if self.shared.removal_started() {
                    return None;
                }
                Some(false)
            }
        }
    }

    /// [`stop_device`](Self::stop_device) for a queue pair being dropped, which cannot look
    /// again later: waits (bounded by [`Shared::settle_limit`]) for a disable under way to
    /// settle; if it does not, the memory is leaked.
    fn stop_device_now(&mut self, reason: DeadReason) -> bool {
        let deadline = Instant::now() + self.shared.settle_limit();
        let mut counted = false;
        loop {
            if let Some(stopped) = self.stop_device(reason) {
                return stopped;
            }
            if !counted {
                counted = true;
                self.shared.drop_waits.fetch_add(1, Ordering::AcqRel);
            }
            if Instant::now() >= deadline {
                log::warn!(
                    "{}: queue pair {} dropped during a controller reset that has not stopped \
                     the device: its memory is leaked",
                    self.location,
                    self.qid.0
                );
                return false;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Gives up on a request the device may still use: its context is never dropped or handed
    /// back, so memory it owns is never reused.
    pub(super) fn leak(&mut self, idx: u16) {
        let s = self.slot(idx);
        s.state = LEAKED;
        s.flags &= !F_CTX;
        self.stats.leaked += 1;
    }
}

impl<T> Drop for QueuePair<T> {
    fn drop(&mut self) {
        let issued = self.inflight != 0 || self.quarantined != 0;
        // Can the memory the device was given be reused? Only once the device no longer
        // touches it: the queue deleted, the controller disabled, reset or gone.
        let stopped = if self.died {
            self.stopped
        } else {
            match self.shared.dead_reason(self.generation).or(self.dead) {
                // Nothing was given to the device: nothing to wait for.
                Some(r) if issued => self.stop_device_now(r),
                Some(_) => false,
                None => self.delete_queues() || (issued && self.shared.disable().is_ok()),
            }
        };
        let safe = stopped || (!self.died && !issued);
        for i in 0..self.slots.len() {
            let s = &mut self.slots[i];
            if s.flags & F_CTX != 0 {
                let on_device = s.state == IN_FLIGHT || s.state == QUARANTINED || s.state == PARENT;
                if safe || !on_device {
                    s.flags &= !F_CTX;
                    // SAFETY: F_CTX says the context is initialised; dropped once.
                    unsafe { s.ctx.assume_init_drop() };
                } else {
                    self.stats.leaked += 1;
                }
            }
        }
        if safe {
            // SAFETY: dropped once, here; the device no longer uses the queues.
            unsafe {
                ManuallyDrop::drop(&mut self.sq_mem);
                ManuallyDrop::drop(&mut self.cq_mem);
                ManuallyDrop::drop(&mut self.prp_mem);
            }
        }
        // Otherwise the queue memory is leaked: the device may still write it.
        if !self.qid_freed {
            self.shared.free_qid(self.qid);
        }
    }
}
