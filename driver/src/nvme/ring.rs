//! The bookkeeping of one submission/completion queue pair in DMA memory, shared by the admin
//! queue and the I/O queue pairs: SQ tail, CQ head and phase tag, the two doorbells, the volatile
//! stores of a 64-byte submission entry and the acquire load of a completion entry.
//!
//! A [`Ring`] knows nothing of command ids, timeouts or room on the device: its users decide
//! when an entry may be written (the admin queue from the SQ head the device reports, an I/O
//! queue pair from the commands it has in flight) and what a completion means. The completion
//! side is a [`CqCursor`], a copy of the CQ position kept in registers while a poll consumes
//! entries and handed back once with [`Ring::consumed`], which writes the CQ head doorbell (the
//! admin queue), or with [`Ring::advance_cq`], which does not, and [`Ring::ring_cq`] when the
//! owner decides the device needs the entries back (an I/O queue pair: see
//! [`crate::nvme::qpair`]).
//!
//! With shadow doorbells (I/O queues of a controller that took Doorbell Buffer Config, see
//! [`crate::nvme::shadow`]) both doorbells are stored in the shadow page and written to the
//! register only when the event index asks for it. Without them the only cost is one test of a
//! null pointer per doorbell.
//!
//! Everything here is `#[inline(always)]`: it is the per-I/O path of every queue pair.

use core::marker::PhantomData;
use core::sync::atomic::{AtomicU32, Ordering};

use crate::bus::Doorbell;
use crate::nvme::shadow::{self, ShadowSlots};
use crate::spec::Sqe;

/// The phase tag in completion dword 3.
pub(crate) const PHASE_BIT: u32 = 1 << 16;

/// One SQ and its CQ, with their doorbells.
pub(crate) struct Ring {
    sq: *mut u64,
    cq: *const u32,
    entries: u16,
    sq_tail: u16,
    cq_head: u16,
    /// The phase tag of new entries at the CQ head, in place in dword 3 (`PHASE_BIT` or 0).
    phase: u32,
    sq_db: Doorbell,
    cq_db: Doorbell,
    /// The shadow doorbell of the SQ tail: null without shadow doorbells.
    sq_shadow: *mut u32,
    sq_ei: *const u32,
    cq_shadow: *mut u32,
    cq_ei: *const u32,
    /// MMIO doorbell writes made with shadow doorbells (SQ, CQ): the event index asked for them.
    shadow_mmio: [u64; 2],
}

// SAFETY: the pointers name queue memory and shadow doorbell slots that outlive the ring
// (contracts of `Ring::new` and `set_shadow`) and that only the ring's holder writes (through
// `&mut Ring` for every write; the event indexes are only read, atomically); moving the ring to
// another thread moves that access with it. The doorbells are `Send`.
unsafe impl Send for Ring {}

impl Ring {
    /// A ring over `entries` submission entries at `sq` and as many completion entries at `cq`,
    /// both empty (tail and head 0, phase tag 1, as after the queues were created).
    ///
    /// # Safety
    /// `sq` must be valid for volatile writes of `entries` 64-byte entries and `cq` for reads of
    /// `entries` 16-byte entries, both 8-byte aligned, for as long as the ring is used, and no
    /// other code may write the SQ or move the CQ head while it is.
    pub(crate) unsafe fn new(
        sq: *mut u8,
        cq: *const u8,
        entries: u16,
        sq_db: Doorbell,
        cq_db: Doorbell,
    ) -> Ring {
        debug_assert!(entries >= 2);
        Ring {
            sq: sq.cast(),
            cq: cq.cast(),
            entries,
            sq_tail: 0,
            cq_head: 0,
            phase: PHASE_BIT,
            sq_db,
            cq_db,
            sq_shadow: core::ptr::null_mut(),
            sq_ei: core::ptr::null(),
            cq_shadow: core::ptr::null_mut(),
            cq_ei: core::ptr::null(),
            shadow_mmio: [0; 2],
        }
    }

    /// Stores every later doorbell update in these shadow doorbell slots, and writes the
    /// registers only when their event indexes ask for it.
    ///
    /// # Safety
    /// The slots must be this queue pair's in shadow pages the controller was given (Doorbell
    /// Buffer Config) before the queues were created, must hold 0 (the queues are empty), and
    /// must outlive the ring; nothing else may store into the two shadow doorbells.
    pub(crate) unsafe fn set_shadow(&mut self, s: ShadowSlots) {
        debug_assert!(self.sq_tail == 0 && self.cq_head == 0);
        self.sq_shadow = s.sq_db;
        self.sq_ei = s.sq_ei;
        self.cq_shadow = s.cq_db;
        self.cq_ei = s.cq_ei;
    }

    /// True if doorbell updates go to shadow doorbells.
    #[inline(always)]
    pub(crate) fn shadowed(&self) -> bool {
        !self.sq_shadow.is_null()
    }

    /// MMIO doorbell writes (SQ, CQ) made since shadow doorbells were set: those the event
    /// indexes asked for.
    pub(crate) fn shadow_mmio_writes(&self) -> [u64; 2] {
        self.shadow_mmio
    }

    /// Entries of the SQ (and of the CQ).
    #[inline(always)]
    pub(crate) fn entries(&self) -> u16 {
        self.entries
    }

    /// The SQ tail once one more entry is written.
    #[inline(always)]
    pub(crate) fn next_tail(&self) -> u16 {
        if self.sq_tail + 1 == self.entries {
            0
        } else {
            self.sq_tail + 1
        }
    }

    /// Copies a submission entry, given as its eight 64-bit words, into the SQ at the tail with
    /// eight volatile stores, and advances the tail. The device sees it after
    /// [`ring_sq`](Self::ring_sq).
    ///
    /// # Safety
    /// The device must not be reading the entry at the tail: the caller keeps fewer than
    /// `entries` commands between the SQ head the device last consumed and the tail.
    #[inline(always)]
    pub(crate) unsafe fn push(&mut self, words: [u64; 8]) {
        let tail = self.sq_tail as usize;
        // SAFETY: `tail < entries`, so the 64-byte entry lies in the SQ (contract of `new`).
        let dst = unsafe { self.sq.add(tail * 8) };
        for (i, w) in words.into_iter().enumerate() {
            // SAFETY: `i < 8`, within the entry; volatile because the device reads it, and by
            // the caller's contract it is not reading it now.
            unsafe { dst.add(i).write_volatile(w) };
        }
        self.sq_tail = if tail + 1 == self.entries as usize {
            0
        } else {
            tail as u16 + 1
        };
    }

    /// [`push`](Self::push) for a command built as an [`Sqe`].
    ///
    /// # Safety
    /// As for [`push`](Self::push).
    #[inline(always)]
    pub(crate) unsafe fn push_sqe(&mut self, sqe: Sqe) {
        // SAFETY: `Sqe` is `repr(C)`, 64 bytes without padding, and every bit pattern is a
        // valid `[u64; 8]`.
        let words = unsafe { core::mem::transmute::<Sqe, [u64; 8]>(sqe) };
        // SAFETY: the caller's contract.
        unsafe { self.push(words) };
    }

    /// Writes the SQ tail doorbell with the current tail (or its shadow, and the register if the
    /// event index asks for it).
    #[inline(always)]
    pub(crate) fn ring_sq(&mut self) {
        if self.sq_shadow.is_null() {
            self.sq_db.ring(self.sq_tail as u32);
        } else {
            self.ring_sq_shadowed();
        }
    }

    #[inline]
    fn ring_sq_shadowed(&mut self) {
        // SAFETY: the SQ's slots of live shadow pages, stored only by this ring (contract of
        // `set_shadow`).
        if unsafe { shadow::update(self.sq_shadow, self.sq_ei, self.sq_tail) } {
            self.sq_db.ring(self.sq_tail as u32);
            self.shadow_mmio[0] += 1;
        }
    }

    /// The CQ position, to consume entries from.
    #[inline(always)]
    pub(crate) fn cq_cursor(&self) -> CqCursor {
        CqCursor {
            cq: self.cq,
            entries: self.entries,
            head: self.cq_head,
            phase: self.phase,
        }
    }

    /// Records that the entries before `at` were consumed and writes the CQ head doorbell.
    #[inline(always)]
    pub(crate) fn consumed(&mut self, at: CqCursor) {
        self.advance_cq(at);
        self.ring_cq();
    }

    /// Records that the entries before `at` were consumed, without telling the device: their
    /// slots stay taken for the device until [`ring_cq`](Self::ring_cq).
    #[inline(always)]
    pub(crate) fn advance_cq(&mut self, at: CqCursor) {
        self.cq_head = at.head;
        self.phase = at.phase;
    }

    /// Writes the CQ head doorbell with the current head (or its shadow, and the register if
    /// the event index asks for it), handing the consumed entries back to the device.
    #[inline(always)]
    pub(crate) fn ring_cq(&mut self) {
        if self.cq_shadow.is_null() {
            self.cq_db.ring(self.cq_head as u32);
        } else {
            self.consumed_shadowed();
        }
    }

    #[inline]
    fn consumed_shadowed(&mut self) {
        // SAFETY: the CQ's slots of live shadow pages, stored only by this ring (contract of
        // `set_shadow`).
        if unsafe { shadow::update(self.cq_shadow, self.cq_ei, self.cq_head) } {
            self.cq_db.ring(self.cq_head as u32);
            self.shadow_mmio[1] += 1;
        }
    }

    /// The SQ, for tests that read what was submitted (the queue pair tests, on the emulator).
    #[cfg(all(test, feature = "emulated"))]
    pub(crate) fn sq_ptr(&self) -> *mut u64 {
        self.sq
    }
}

/// A position in a CQ: head and expected phase tag, copied out of the [`Ring`] for a poll.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CqCursor {
    cq: *const u32,
    entries: u16,
    head: u16,
    phase: u32,
}

impl CqCursor {
    /// The entry at the cursor if the device has posted it (its phase tag is the expected one).
    /// Dword 3 is loaded atomically with acquire, so the other dwords, read through the view,
    /// are read after it.
    #[inline(always)]
    pub(crate) fn peek(&self) -> Option<CqeView<'_>> {
        // SAFETY: `head < entries`: the 16-byte entry lies in the CQ (contract of `Ring::new`).
        let e = unsafe { self.cq.add(self.head as usize * 4) };
        // SAFETY: dword 3 of the entry, 4-byte aligned; the device writes it concurrently, so it
        // is read atomically.
        let dw3 = unsafe { AtomicU32::from_ptr(e.add(3).cast_mut()) }.load(Ordering::Acquire);
        (dw3 & PHASE_BIT == self.phase).then_some(CqeView {
            e,
            dw3,
            _cursor: PhantomData,
        })
    }

    /// Moves past the entry at the cursor, flipping the expected phase tag at the end of the CQ.
    #[inline(always)]
    pub(crate) fn advance(&mut self) {
        self.head += 1;
        if self.head == self.entries {
            self.head = 0;
            self.phase ^= PHASE_BIT;
        }
    }

    /// The CQ head at the cursor.
    #[cfg(test)]
    pub(crate) fn head(&self) -> u16 {
        self.head
    }

    /// The expected phase tag at the cursor, as a bit.
    #[cfg(test)]
    pub(crate) fn phase(&self) -> bool {
        self.phase != 0
    }

    /// The entry at the cursor, whatever its phase tag (for tests that post completions).
    #[cfg(all(test, feature = "emulated"))]
    pub(crate) fn entry_ptr(&self) -> *mut u32 {
        // SAFETY: `head < entries`, inside the CQ.
        unsafe { self.cq.add(self.head as usize * 4).cast_mut() }
    }
}

/// A posted completion entry: dword 3 as loaded, the others read on demand. It borrows the
/// cursor, so it cannot be read after the cursor moved past it.
pub(crate) struct CqeView<'a> {
    e: *const u32,
    /// Dword 3: CID (15:0), phase tag (16), status (31:17).
    pub(crate) dw3: u32,
    _cursor: PhantomData<&'a CqCursor>,
}

impl CqeView<'_> {
    /// Dword 0: command specific result.
    #[inline(always)]
    pub(crate) fn dw0(&self) -> u32 {
        // SAFETY: dword 0 of a posted entry (its phase tag was seen with acquire).
        unsafe { self.e.read_volatile() }
    }
    /// Dword 1: command specific.
    #[inline(always)]
    pub(crate) fn dw1(&self) -> u32 {
        // SAFETY: as for `dw0`.
        unsafe { self.e.add(1).read_volatile() }
    }
    /// Dword 2: SQ head (15:0) and SQ id (31:16).
    #[inline(always)]
    pub(crate) fn dw2(&self) -> u32 {
        // SAFETY: as for `dw0`.
        unsafe { self.e.add(2).read_volatile() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::DoorbellSink;
    use std::sync::{Arc, Mutex};

    /// Records doorbell writes as `(offset, value)`.
    #[derive(Default)]
    struct Rec(Mutex<Vec<(u32, u32)>>);
    impl DoorbellSink for Rec {
        fn ring(&self, offset: u32, value: u32) {
            self.0.lock().unwrap().push((offset, value));
        }
    }

    const SQ_DB: u32 = 0x1008;
    const CQ_DB: u32 = 0x100c;

    /// A ring over `sq` and `cq`, which the test then touches only through these pointers (and
    /// after the ring is dropped).
    fn ring(sq: *mut u64, cq: *mut u32, entries: u16) -> (Ring, Arc<Rec>) {
        let rec = Arc::new(Rec::default());
        let sink: Arc<dyn DoorbellSink> = rec.clone();
        // SAFETY: both buffers outlive the ring in each test and hold `entries` entries.
        let r = unsafe {
            Ring::new(
                sq.cast(),
                cq.cast_const().cast(),
                entries,
                Doorbell::sink(sink.clone(), SQ_DB),
                Doorbell::sink(sink, CQ_DB),
            )
        };
        (r, rec)
    }

    /// Posts a completion at `slot` as a device would: dwords 0..3, dword 3 last.
    fn post(cq: *mut u32, slot: usize, dw0: u32, dw2: u32, cid: u16, phase: bool) {
        let dw = [dw0, !dw0, dw2, cid as u32 | (phase as u32) << 16];
        for (i, d) in dw.into_iter().enumerate() {
            // SAFETY: the test's CQ holds `slot`; volatile as the ring reads it so.
            unsafe { cq.add(slot * 4 + i).write_volatile(d) };
        }
    }

    #[test]
    fn submissions_wrap_and_ring_the_tail() {
        let mut sq = vec![0u64; 3 * 8];
        let mut cq = vec![0u32; 3 * 4];
        let (mut r, rec) = ring(sq.as_mut_ptr(), cq.as_mut_ptr(), 3);
        for n in 0..4u64 {
            assert_eq!(r.next_tail(), ((n + 1) % 3) as u16);
            // SAFETY: the test has no device: nothing reads the entries.
            unsafe { r.push([n, 1, 2, 3, 4, 5, 6, 7 + n]) };
            r.ring_sq();
        }
        let mut sqe = Sqe::flush(9);
        sqe.set_cid(0x77);
        // SAFETY: as above.
        unsafe { r.push_sqe(sqe) };
        r.ring_sq();
        drop(r);
        // Entry 0 was overwritten by the fourth command, entry 1 by the Sqe.
        assert_eq!(&sq[0..8], &[3, 1, 2, 3, 4, 5, 6, 10]);
        // SAFETY: `Sqe` is 64 bytes of plain integers; entry 1 holds one.
        let back: Sqe = unsafe { sq.as_ptr().add(8).cast::<Sqe>().read() };
        assert_eq!(back, sqe);
        assert_eq!(&sq[16..24], &[2, 1, 2, 3, 4, 5, 6, 9]);
        let writes = rec.0.lock().unwrap().clone();
        assert_eq!(
            writes,
            [(SQ_DB, 1), (SQ_DB, 2), (SQ_DB, 0), (SQ_DB, 1), (SQ_DB, 2)]
        );
    }

    #[test]
    fn completions_are_taken_by_phase_and_wrap() {
        let mut sq = vec![0u64; 2 * 8];
        let mut cq = vec![0u32; 2 * 4];
        let cqp = cq.as_mut_ptr();
        let (mut r, rec) = ring(sq.as_mut_ptr(), cqp, 2);
        // Nothing posted: zeroed memory has phase tag 0, the first pass expects 1.
        assert!(r.cq_cursor().peek().is_none());
        post(cqp, 0, 10, 0x0003_0001, 5, true);
        post(cqp, 1, 11, 0x0003_0000, 6, true);
        let mut c = r.cq_cursor();
        let mut seen = Vec::new();
        while let Some(e) = c.peek() {
            seen.push((e.dw0(), e.dw1(), e.dw2(), e.dw3 as u16));
            c.advance();
        }
        assert_eq!(seen, [(10, !10, 0x0003_0001, 5), (11, !11, 0x0003_0000, 6)]);
        // Wrapped: head 0, and the stale entries (phase 1) are not taken again.
        assert_eq!((c.head(), c.phase()), (0, false));
        r.consumed(c);
        assert!(r.cq_cursor().peek().is_none());
        // The second pass carries phase tag 0.
        post(cqp, 0, 12, 0, 7, false);
        let mut c = r.cq_cursor();
        assert_eq!(c.peek().map(|e| e.dw3 as u16), Some(7));
        c.advance();
        assert!(c.peek().is_none());
        r.consumed(c);
        assert_eq!(*rec.0.lock().unwrap(), [(CQ_DB, 0), (CQ_DB, 1)]);
    }

    /// With shadow doorbells every update lands in the shadow slot, and the register is written
    /// exactly when the event index lies in the entries the update moves past, across the wrap.
    #[test]
    fn shadow_doorbells_follow_the_event_index() {
        const N: u16 = 4;
        let mut sq = vec![0u64; N as usize * 8];
        let mut cq = vec![0u32; N as usize * 4];
        let cqp = cq.as_mut_ptr();
        // Slots: SQ doorbell, SQ event index, CQ doorbell, CQ event index.
        let mut slots = vec![0u32; 4];
        let p = slots.as_mut_ptr();
        let (mut r, rec) = ring(sq.as_mut_ptr(), cqp, N);
        // SAFETY: the slots outlive the ring, hold 0, and only the ring stores the doorbells.
        unsafe {
            r.set_shadow(ShadowSlots {
                sq_db: p,
                sq_ei: p.add(1),
                cq_db: p.add(2),
                cq_ei: p.add(3),
            })
        };
        assert!(r.shadowed());
        let set_ei = |i: usize, v: u32| {
            // SAFETY: one of the four slots; the ring reads it atomically.
            unsafe { AtomicU32::from_ptr(p.add(i)) }.store(v, Ordering::Relaxed)
        };
        let slot = |i: usize| {
            // SAFETY: as above.
            unsafe { AtomicU32::from_ptr(p.add(i)) }.load(Ordering::Relaxed)
        };
        // (event index before the ring, commands pushed, register written?)
        let steps = [
            (0, 1, true),  // 0 -> 1 passes 0: the device waits at 0
            (0, 2, false), // 1 -> 3 passes 1, 2: the device is behind, at 0
            (3, 2, true),  // 3 -> 1 passes 3, 0 (wraps): the device waits at 3
            (3, 1, false), // 1 -> 2 passes 1: the device is behind, at 3
            (0, 3, true),  // 2 -> 1 passes 2, 3, 0 (wraps): the device waits at 0
        ];
        let mut tail = 0u16;
        let mut expect = Vec::new();
        for (ei, n, rings) in steps {
            set_ei(1, ei);
            let old = tail;
            for _ in 0..n {
                // SAFETY: no device reads the SQ.
                unsafe { r.push([0; 8]) };
                tail = (tail + 1) % N;
            }
            r.ring_sq();
            assert_eq!(slot(0), tail as u32);
            let passed = (0..n).any(|k| (old + k) % N == ei as u16);
            assert_eq!(passed, rings);
            if rings {
                expect.push((SQ_DB, tail as u32));
            }
        }
        assert_eq!(*rec.0.lock().unwrap(), expect);
        assert_eq!(r.shadow_mmio_writes(), [expect.len() as u64, 0]);
        assert_eq!(expect.len(), 3, "{expect:?}");

        // The CQ head: consumed 0 -> 2 with the device's event index at 0 (rings), then 2 -> 3
        // with the index at 0 (does not).
        rec.0.lock().unwrap().clear();
        post(cqp, 0, 0, 0, 1, true);
        post(cqp, 1, 0, 0, 2, true);
        let mut c = r.cq_cursor();
        c.advance();
        c.advance();
        r.consumed(c);
        assert_eq!(slot(2), 2);
        post(cqp, 2, 0, 0, 3, true);
        let mut c = r.cq_cursor();
        c.advance();
        r.consumed(c);
        assert_eq!(slot(2), 3);
        assert_eq!(*rec.0.lock().unwrap(), [(CQ_DB, 2)]);
        assert_eq!(r.shadow_mmio_writes(), [3, 1]);
        drop(r);
    }
}
