//! Submission and completion queues as the device sees them.
//!
//! Each queue id has a slot that lives as long as the controller: the doorbell value (an atomic
//! the driver's doorbell writes store into), the queue size (0 while the queue does not exist),
//! per-queue counters, and the queue state behind one mutex, taken by whoever processes the
//! queue (the ringing thread in inline mode, the device thread in threaded mode) and, rarely, by
//! admin commands that create or delete it. The queue rings are reached only through raw
//! pointers: SQ entries are read with a volatile read, CQ entries written with volatile writes
//! of DW0..DW2 and a release store of DW3 (command id, status, phase tag).

use core::ptr::NonNull;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::dbbuf::Shadow;
use super::prp::Seg;
use crate::bus::interrupt::EventFd;
use crate::spec::{Cqe, Sqe, Status};

/// Locks a mutex, ignoring poisoning (a panicking test thread must not wedge the device).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A completion waiting to be posted.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Completion {
    pub dw0: u32,
    pub sq_head: u16,
    pub sqid: u16,
    pub cid: u16,
    pub status: Status,
}

/// A submission queue.
pub(crate) struct Sq {
    base: NonNull<u8>,
    size: u32,
    pub head: u32,
    pub cqid: u16,
    /// Scratch list of data segments, reused by every command (grows to the largest transfer
    /// once, then never allocates).
    pub segs: Vec<Seg>,
}

// SAFETY: `base` points into DMA memory kept mapped by the device's `DmaMemory` for the life of
// the device; the queue is only used under its slot's mutex.
unsafe impl Send for Sq {}

impl Sq {
    /// A queue of `size` entries at `base`, which must be 64-byte aligned with `size * 64`
    /// bytes of DMA memory (checked by the caller through `DmaMemory::ptr_of`).
    pub(crate) fn new(base: NonNull<u8>, size: u32, cqid: u16, max_segs: usize) -> Sq {
        Sq {
            base,
            size,
            head: 0,
            cqid,
            segs: Vec::with_capacity(max_segs),
        }
    }

    /// Reads the entry at the head and advances the head.
    pub(crate) fn fetch(&mut self) -> Sqe {
        // SAFETY: `head < size` and the queue memory holds `size` 64-byte aligned entries (`new`);
        // the host wrote this entry before publishing the tail with a release store that the
        // caller observed with an acquire load. A volatile read makes no reference.
        let sqe = unsafe {
            self.base
                .as_ptr()
                .add(self.head as usize * size_of::<Sqe>())
                .cast::<Sqe>()
                .read_volatile()
        };
        self.head += 1;
        if self.head == self.size {
            self.head = 0;
        }
        sqe
    }
}

/// A completion queue.
pub(crate) struct Cq {
    base: NonNull<u8>,
    size: u32,
    tail: u32,
    phase: bool,
    /// Completions that found the queue full, posted in order as the host frees entries.
    backlog: VecDeque<Completion>,
    /// Created with IEN set: the vector's eventfd, signalled after each posted completion.
    irq: Option<Arc<EventFd>>,
}

// SAFETY: as for `Sq`: `base` points into DMA memory that outlives the queue, used under a mutex.
unsafe impl Send for Cq {}

impl Cq {
    /// A queue of `size` 16-byte entries at `base` (page aligned, `size * 16` bytes of DMA
    /// memory, checked by the caller).
    pub(crate) fn new(base: NonNull<u8>, size: u32) -> Cq {
        Cq {
            base,
            size,
            tail: 0,
            phase: true,
            backlog: VecDeque::with_capacity(size as usize),
            irq: None,
        }
    }

    /// Signals `irq` after each completion posted (a queue created with IEN set).
    pub(crate) fn with_irq(mut self, irq: Option<Arc<EventFd>>) -> Cq {
        self.irq = irq;
        self
    }

    fn try_post(&mut self, head: u32, c: &Completion) -> bool {
        let next = if self.tail + 1 == self.size {
            0
        } else {
            self.tail + 1
        };
        if next == head {
            return false;
        }
        // SAFETY: `tail < size`, so the 16-byte entry lies in the queue memory (`new`); the host
        // does not write a completion queue. DW0..DW2 are written first with volatile stores;
        // DW3, which carries the phase tag the host polls, is published with a release store so
        // a host that sees the new phase with an acquire load sees the whole entry.
        unsafe {
            let e = self
                .base
                .as_ptr()
                .add(self.tail as usize * size_of::<Cqe>());
            e.cast::<u32>().write_volatile(c.dw0);
            e.add(4).cast::<u32>().write_volatile(0);
            e.add(8)
                .cast::<u32>()
                .write_volatile(c.sq_head as u32 | (c.sqid as u32) << 16);
            AtomicU32::from_ptr(e.add(12).cast::<u32>())
                .store(Cqe::dw3(c.cid, c.status, self.phase), Ordering::Release);
        }
        self.tail = next;
        if next == 0 {
            self.phase = !self.phase;
        }
        if let Some(irq) = &self.irq {
            // After the release store of DW3: a host woken by the eventfd sees the entry.
            irq.signal();
        }
        true
    }

    /// Posts `c`, or queues it behind earlier completions if the queue is full. Returns
    /// whether `c` found the queue full (or behind completions that did), and whether
    /// completions remain queued.
    pub(crate) fn post(&mut self, head: u32, c: Completion) -> (bool, bool) {
        if self.backlog.is_empty() && self.try_post(head, &c) {
            return (false, false);
        }
        self.backlog.push_back(c);
        (true, self.flush(head))
    }

    /// Posts queued completions while there is room. Returns true if some remain.
    pub(crate) fn flush(&mut self, head: u32) -> bool {
        while let Some(c) = self.backlog.front() {
            let c = *c;
            if !self.try_post(head, &c) {
                return true;
            }
            self.backlog.pop_front();
        }
        false
    }
}

/// Per-queue-id state of submission queue `qid`.
pub(crate) struct SqSlot {
    /// Last tail doorbell value.
    pub doorbell: AtomicU32,
    /// Entries, or 0 while the queue does not exist.
    pub size: AtomicU32,
    /// Head as last advanced by the processor (reported in completions released later).
    pub head: AtomicU32,
    pub state: Mutex<Option<Sq>>,
    /// Commands fetched, by opcode.
    pub commands: Box<[AtomicU64]>,
    pub doorbells: AtomicU64,
    /// The shadow doorbell of the SQ tail (Doorbell Buffer Config).
    pub shadow: Shadow,
    pub read_cmds: AtomicU64,
    pub write_cmds: AtomicU64,
    pub read_bytes: AtomicU64,
    pub write_bytes: AtomicU64,
}

impl SqSlot {
    pub(crate) fn new() -> SqSlot {
        SqSlot {
            doorbell: AtomicU32::new(0),
            size: AtomicU32::new(0),
            head: AtomicU32::new(0),
            state: Mutex::new(None),
            commands: (0..256).map(|_| AtomicU64::new(0)).collect(),
            doorbells: AtomicU64::new(0),
            shadow: Shadow::new(),
            read_cmds: AtomicU64::new(0),
            write_cmds: AtomicU64::new(0),
            read_bytes: AtomicU64::new(0),
            write_bytes: AtomicU64::new(0),
        }
    }

    /// True if the host has submitted entries the device has not fetched yet.
    pub(crate) fn has_work(&self) -> bool {
        if self.size.load(Ordering::Acquire) == 0 {
            return false;
        }
        let tail = match self.shadow.peek() {
            Some(t) => t,
            None => self.doorbell.load(Ordering::Acquire),
        };
        tail != self.head.load(Ordering::Relaxed)
    }

    /// The SQ tail, for a queue whose head is `head`: the tail doorbell's value, or with shadow
    /// doorbells the shadow's, after publishing `head` as the event index. A shadow value beyond
    /// the queue is ignored (no new entries).
    #[inline]
    pub(crate) fn tail(&self, head: u32) -> u32 {
        match self.shadow.read(head) {
            None => self.doorbell.load(Ordering::Acquire),
            Some(t) if t < self.size.load(Ordering::Relaxed) => t,
            Some(_) => head,
        }
    }
}

/// Per-queue-id state of completion queue `qid`.
pub(crate) struct CqSlot {
    /// Last head doorbell value.
    pub doorbell: AtomicU32,
    /// Entries, or 0 while the queue does not exist.
    pub size: AtomicU32,
    pub state: Mutex<Option<Cq>>,
    /// Completions are waiting for room.
    pub backlog: AtomicBool,
    /// Completions that found the queue full (or behind ones that did) and had to wait for
    /// the host to hand entries back with the head doorbell. A host that keeps room for every
    /// command it lets the device see causes none.
    pub full: AtomicU64,
    pub doorbells: AtomicU64,
    /// The shadow doorbell of the CQ head (Doorbell Buffer Config).
    pub shadow: Shadow,
}

impl CqSlot {
    pub(crate) fn new() -> CqSlot {
        CqSlot {
            doorbell: AtomicU32::new(0),
            size: AtomicU32::new(0),
            state: Mutex::new(None),
            backlog: AtomicBool::new(false),
            full: AtomicU64::new(0),
            doorbells: AtomicU64::new(0),
            shadow: Shadow::new(),
        }
    }

    /// The CQ head: the head doorbell's value, or with shadow doorbells the shadow's, after
    /// publishing the head known so far as the event index (kept as the doorbell's value). A
    /// shadow value beyond the queue is ignored.
    #[inline]
    fn head(&self) -> u32 {
        let known = self.doorbell.load(Ordering::Acquire);
        match self.shadow.read(known) {
            Some(h) if h < self.size.load(Ordering::Relaxed) => {
                self.doorbell.store(h, Ordering::Release);
                h
            }
            _ => known,
        }
    }

    /// Posts a completion (dropped if the queue no longer exists).
    pub(crate) fn post(&self, c: Completion) {
        let mut g = lock(&self.state);
        if let Some(cq) = g.as_mut() {
            let head = self.head();
            let (waited, left) = cq.post(head, c);
            if waited {
                self.full.fetch_add(1, Ordering::Relaxed);
            }
            if left {
                self.backlog.store(true, Ordering::Release);
            }
        }
    }

    /// Posts backlogged completions that now fit.
    pub(crate) fn flush(&self) {
        let mut g = lock(&self.state);
        if let Some(cq) = g.as_mut() {
            let head = self.head();
            let left = cq.flush(head);
            self.backlog.store(left, Ordering::Release);
        }
    }
}
