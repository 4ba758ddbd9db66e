//! Shadow doorbells (NVMe 1.3 Doorbell Buffer Config, admin opcode 7Ch): the doorbell values of
//! the I/O queues written to a page of host memory the controller reads, and an MMIO doorbell
//! write only when the controller asks for one through a second page, the event indexes.
//!
//! A controller that offers them (Identify Controller OACS bit 8: QEMU's NVMe by default, the
//! NVMe devices of many cloud virtual machines) is given both pages once after the admin queue
//! is up ([`ShadowPages`], a bring-up step of the controller). Each queue id has one slot in each
//! page at the offset of its doorbell register (`(2 × qid + 0/1) × (4 << CAP.DSTRD)`, SQ tail
//! then CQ head), so the pages hold every queue the controller granted. The admin queue keeps its
//! MMIO doorbells (Linux does the same; the controller ignores or mirrors its slots).
//!
//! Every SQ tail and CQ head update of an I/O queue is stored in the shadow page; the MMIO
//! doorbell is written only when the event index the controller last published lies in the
//! range of entries this update moves past ([`need_event`], Linux's `nvme_dbbuf_need_event`,
//! virtio's `vring_need_event`). A device that polls the shadow page (a hypervisor's backend)
//! moves its event index out of the way and is never notified; QEMU publishes the position it
//! has processed, so it asks for almost every write (it still reads the shadow page first).
//!
//! # Ordering
//! The host stores the new doorbell value and then loads the event index; the device stores
//! its event index and then loads the doorbell value. Each side needs its store visible before
//! its load ([`update`] issues a full barrier, Linux `mb()`, between them), or both could read
//! the other's old value: the host would skip the MMIO write because the event index is behind,
//! and the device would go to sleep on a doorbell value that misses the new entries, with a
//! command stuck in the SQ. With the barriers, at least one side sees the other's store: either
//! the host sees the new event index and rings, or the device sees the new doorbell value.
//! Before the shadow store, the entries themselves must be visible: a device polling the
//! shadow page may fetch an entry as soon as it sees the tail, so the store is preceded by the
//! same store barrier as an MMIO doorbell write ([`crate::bus::dma_wmb`]).

use core::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use crate::bus::dma::DmaBuffer;
use crate::bus::{dma_mb, dma_wmb};

/// True if the device, whose event index is `event_idx`, must be notified of a doorbell that
/// moves from `old` to `new`: the event index lies in `[old, new)` modulo 2^16 (NVMe 1.3
/// section 7.13; Linux `nvme_dbbuf_need_event`).
///
/// Queue positions wrap at the queue size, not at 2^16, and the rule is still exact: when the
/// update wraps (`new < old`), `new - old` modulo 2^16 is `2^16 - (old - new)`, and
/// `new - event_idx - 1` is below it exactly for `event_idx >= old` or `event_idx < new`.
#[inline(always)]
pub(crate) fn need_event(event_idx: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event_idx).wrapping_sub(1) < new.wrapping_sub(old)
}

/// Stores `new` into a shadow doorbell `db` and tells whether the device must also see an MMIO
/// write, by the event index at `ei`. See the module documentation for the barriers.
///
/// # Safety
/// `db` and `ei` must be 4-byte aligned slots of live [`ShadowPages`], `db` written by no one
/// else.
#[inline(always)]
pub(crate) unsafe fn update(db: *mut u32, ei: *const u32, new: u16) -> bool {
    // SAFETY: an aligned slot of the shadow page (caller's contract); atomic because the
    // device reads it concurrently.
    let db = unsafe { AtomicU32::from_ptr(db) };
    // Only this queue's owner stores the slot: the value read back is the last one stored.
    let old = db.load(Ordering::Relaxed) as u16;
    // The queue entries (SQ entries, PRP lists), or the consumption of CQ entries, before the
    // new value: a device polling the shadow page acts on it at once. `dma_wmb` orders them for
    // a device; the release store for a device model on another thread (the emulated
    // controller), and costs nothing more on x86-64.
    dma_wmb();
    db.store(new as u32, Ordering::Release);
    // The shadow store before the event index load (store-load: a full barrier).
    dma_mb();
    // SAFETY: an aligned slot of the event index page (caller's contract); the device writes
    // it concurrently.
    let event_idx = unsafe { AtomicU32::from_ptr(ei.cast_mut()) }.load(Ordering::Relaxed) as u16;
    need_event(event_idx, new, old)
}

/// The Shadow Doorbell and EventIdx buffers given to the controller by Doorbell Buffer Config.
/// Queue pairs keep them alive with an `Arc`: after a reset the controller forgets them, and
/// the next bring-up gives it new ones, while queue pairs of the old generation may still store
/// into the old ones.
pub(crate) struct ShadowPages {
    shadow: DmaBuffer,
    event_idx: DmaBuffer,
    /// Doorbell stride in bytes (`4 << CAP.DSTRD`).
    stride: usize,
    /// Queue ids the pages hold: `0..queues`.
    queues: u32,
}

/// The four slots of one queue pair.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ShadowSlots {
    pub(crate) sq_db: *mut u32,
    pub(crate) sq_ei: *const u32,
    pub(crate) cq_db: *mut u32,
    pub(crate) cq_ei: *const u32,
}

impl ShadowPages {
    /// Bytes the pages need for queue ids `0..=max_qid` with doorbell stride `4 << dstrd`.
    pub(crate) fn len_for(max_qid: u16, dstrd: u8) -> usize {
        (max_qid as usize + 1) * (8usize << dstrd)
    }

    /// Pages for queue ids `0..=max_qid` (zeroed buffers of at least
    /// [`len_for`](Self::len_for) bytes, page aligned and contiguous in IOVA space).
    pub(crate) fn new(
        shadow: DmaBuffer,
        event_idx: DmaBuffer,
        max_qid: u16,
        dstrd: u8,
    ) -> ShadowPages {
        let len = Self::len_for(max_qid, dstrd);
        assert!(shadow.len() >= len && event_idx.len() >= len);
        ShadowPages {
            shadow,
            event_idx,
            stride: 4 << dstrd,
            queues: max_qid as u32 + 1,
        }
    }

    /// PRP1 and PRP2 of Doorbell Buffer Config.
    pub(crate) fn iovas(&self) -> (u64, u64) {
        (self.shadow.iova().0, self.event_idx.iova().0)
    }

    /// The slots of queue pair `qid`, set to 0 (an empty queue: tail 0, head 0), or `None` if
    /// the pages do not hold it. Call before the queues are created on the device.
    pub(crate) fn slots(self: &Arc<Self>, qid: u16) -> Option<ShadowSlots> {
        if qid == 0 || qid as u32 >= self.queues {
            return None;
        }
        let sq = 2 * qid as usize * self.stride;
        let cq = sq + self.stride;
        // SAFETY: `qid < queues`, so both offsets (and their 4 bytes) lie within the buffers
        // (`new` checked their length); the offsets are multiples of 4.
        let s = unsafe {
            ShadowSlots {
                sq_db: self.shadow.as_ptr().add(sq).cast(),
                sq_ei: self.event_idx.as_ptr().add(sq).cast(),
                cq_db: self.shadow.as_ptr().add(cq).cast(),
                cq_ei: self.event_idx.as_ptr().add(cq).cast(),
            }
        };
        for p in [s.sq_db, s.sq_ei.cast_mut(), s.cq_db, s.cq_ei.cast_mut()] {
            // SAFETY: an aligned slot inside the pages (above); the queue does not exist on the
            // device yet, so the device does not use these slots now.
            unsafe { AtomicU32::from_ptr(p) }.store(0, Ordering::Relaxed);
        }
        Some(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rule by enumeration: notify exactly when the event index is one of the positions the
    /// update moves past, `old, old + 1, ..., new - 1`, with positions wrapping at `size`.
    #[test]
    fn need_event_is_exact_for_queues_wrapping_at_their_size() {
        for size in [2u32, 3, 7, 32, 129] {
            for old in 0..size {
                for step in 0..size {
                    let new = (old + step) % size;
                    for ei in 0..size {
                        // `ei` is `old + k` for some `k < step`.
                        let passed = (ei + size - old) % size < step;
                        assert_eq!(
                            need_event(ei as u16, new as u16, old as u16),
                            passed,
                            "size {size} old {old} new {new} event index {ei}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn need_event_wraps_at_two_to_the_sixteen() {
        // A 65536-entry queue wraps where u16 does.
        assert!(need_event(0xffff, 1, 0xfffe));
        assert!(need_event(0, 1, 0xfffe));
        assert!(!need_event(1, 1, 0xfffe));
        assert!(!need_event(0xfffd, 1, 0xfffe));
        // No movement: never notify.
        assert!(!need_event(5, 5, 5));
        // The device lags behind the previous value: it will read the shadow anyway.
        assert!(!need_event(3, 9, 5));
        // The device caught up with the previous value: notify.
        assert!(need_event(5, 9, 5));
    }
}
