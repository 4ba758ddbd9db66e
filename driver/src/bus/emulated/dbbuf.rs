//! Doorbell Buffer Config (admin opcode 7Ch): shadow doorbells as QEMU's NVMe implements them.
//!
//! The command gives the controller two host pages, the Shadow Doorbell buffer (PRP1) and the
//! EventIdx buffer (PRP2), laid out like the doorbell registers (`(2 × qid + 0/1) × stride`).
//! From then on, for the I/O queues, the controller takes the SQ tail and the CQ head from the
//! shadow page, and publishes in the event index page the position it has seen: before reading
//! an SQ tail it stores its SQ head there, before reading a CQ head the head it knew. A driver
//! writes a doorbell register only when its update moves past that event index; the register
//! write still makes the controller look (in inline mode it processes the SQ there). The admin
//! queue keeps its registers. A controller reset forgets the pages.
//!
//! The store of the event index and the load of the shadow value are ordered by a full fence
//! (QEMU relies on the same order): with the driver's own fence between its shadow store and
//! its event index load, one of the two sides sees the other's update, so no doorbell is lost.

use core::ptr::null_mut;
use std::sync::atomic::{AtomicPtr, AtomicU32, Ordering, fence};

use super::device::{Device, Outcome, generic};
use crate::spec::Sqe;
use crate::spec::status::generic as g;
use crate::types::Iova;

/// One queue's shadow doorbell and event index slots, null until Doorbell Buffer Config (and
/// after a reset).
pub(crate) struct Shadow {
    db: AtomicPtr<u32>,
    ei: AtomicPtr<u32>,
}

impl Shadow {
    pub(crate) const fn new() -> Shadow {
        Shadow {
            db: AtomicPtr::new(null_mut()),
            ei: AtomicPtr::new(null_mut()),
        }
    }

    fn set(&self, db: *mut u32, ei: *mut u32) {
        self.ei.store(ei, Ordering::Relaxed);
        self.db.store(db, Ordering::Release);
    }

    pub(crate) fn clear(&self) {
        self.db.store(null_mut(), Ordering::Release);
        self.ei.store(null_mut(), Ordering::Relaxed);
    }

    /// The shadow doorbell value, without publishing an event index (the threaded device
    /// thread's check for work), or `None` without shadow doorbells.
    #[inline]
    pub(crate) fn peek(&self) -> Option<u32> {
        let db = self.db.load(Ordering::Acquire);
        // SAFETY: a slot in DMA memory, which stays mapped as long as the device's `DmaMemory`
        // (`doorbell_buffer_config` checked it lies there), 4-byte aligned; the host stores it
        // concurrently, so it is read atomically; acquire pairs with the host's barrier before
        // its store, so the SQ entries it published are visible.
        (!db.is_null()).then(|| unsafe { AtomicU32::from_ptr(db) }.load(Ordering::Acquire))
    }

    /// Publishes `seen` as the event index, then reads the shadow doorbell value; `None`
    /// without shadow doorbells.
    #[inline]
    pub(crate) fn read(&self, seen: u32) -> Option<u32> {
        let db = self.db.load(Ordering::Acquire);
        if db.is_null() {
            return None;
        }
        let ei = self.ei.load(Ordering::Relaxed);
        // SAFETY: as for `peek`: a 4-byte aligned slot of the event index page in DMA memory.
        unsafe { AtomicU32::from_ptr(ei) }.store(seen, Ordering::SeqCst);
        // The event index store before the doorbell load (see the module documentation).
        fence(Ordering::SeqCst);
        // SAFETY: as for `peek`.
        Some(unsafe { AtomicU32::from_ptr(db) }.load(Ordering::Acquire))
    }
}

impl Device {
    /// Doorbell Buffer Config: PRP1 the shadow doorbells, PRP2 the event indexes, both memory
    /// page aligned, each holding the doorbells of every queue id. Like QEMU, the current
    /// values of queues that already exist are copied into the shadow page.
    pub(crate) fn doorbell_buffer_config(&self, sqe: &Sqe) -> Outcome {
        if !self.props.dbbuf {
            return Outcome::Done(generic(g::INVALID_OPCODE), 0);
        }
        let mask = self.page_size() as u64 - 1;
        let (dbs, eis) = (sqe.prp1, sqe.prp2);
        if dbs & mask != 0 || eis & mask != 0 {
            return Outcome::Done(generic(g::INVALID_FIELD), 0);
        }
        let stride = 4usize << self.props.dstrd;
        let len = (self.props.max_io_queues as usize + 1) * 2 * stride;
        let (Some(db), Some(ei)) = (
            self.dma.ptr_of(Iova(dbs), len),
            self.dma.ptr_of(Iova(eis), len),
        ) else {
            return Outcome::Done(self.dma_fault(), 0);
        };
        let (db, ei) = (db.as_ptr(), ei.as_ptr());
        for qid in 1..=self.props.max_io_queues as usize {
            for (i, (value, size, shadow)) in [
                (
                    &self.sqs[qid].doorbell,
                    &self.sqs[qid].size,
                    &self.sqs[qid].shadow,
                ),
                (
                    &self.cqs[qid].doorbell,
                    &self.cqs[qid].size,
                    &self.cqs[qid].shadow,
                ),
            ]
            .into_iter()
            .enumerate()
            {
                let off = (2 * qid + i) * stride;
                // SAFETY: `off + 4 <= len`: inside both mapped buffers, 4-byte aligned.
                let (d, e) = unsafe { (db.add(off).cast::<u32>(), ei.add(off).cast::<u32>()) };
                // Like QEMU, only queues that exist are written: the host's pages may be sized
                // for the queues it was granted, fewer than `max_io_queues`.
                if size.load(Ordering::Acquire) != 0 {
                    let v = value.load(Ordering::Acquire);
                    // SAFETY: aligned slots of the pages in DMA memory; atomic, as the host
                    // may touch them concurrently.
                    unsafe {
                        AtomicU32::from_ptr(d).store(v, Ordering::Relaxed);
                        AtomicU32::from_ptr(e).store(v, Ordering::Relaxed);
                    }
                }
                shadow.set(d, e);
            }
        }
        Outcome::Done(crate::spec::Status::SUCCESS, 0)
    }
}
