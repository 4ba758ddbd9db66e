//! A byte-range reader/writer lock per file: what makes overlapping requests on different
//! threads see each other's data whole.
//!
//! Every request locks the 4 KiB pages it touches (writes exclusive, reads shared) before it
//! looks at the file size, the page cache or the device, and unlocks when its result is known:
//! on return for a synchronous call, just before the callback for an asynchronous one. Two
//! requests touching a common page therefore run one after the other, in the order they got
//! the lock; requests on disjoint pages run in parallel. The lock is taken once per request, not
//! per bio.
//!
//! # Design: striped reader/writer words
//! The file's pages are striped over a table of atomic words: page `p` is guarded by stripe
//! `p % stripes` (`stripes` is a power of two, at most [`MAX_STRIPES`], and at least the file's
//! page count when that is smaller, so a small file has one stripe per page). A request takes
//! the stripes of its pages, each shared (a read) or exclusive (a write), in ascending stripe
//! order, **all or none**, and releases them all when it is done. A request never waits while
//! holding a stripe (see below), so no cycle of waiters can form: no deadlock, even when the
//! waiter's own poll runs a callback that issues an overlapping request (run to completion). A
//! stripe word is
//! `WRITER | WAITERS | readers`; taking and releasing it is one compare-and-swap (or one
//! `fetch_sub`), with no mutex: two requests on disjoint pages touch different words (unless
//! their pages alias the same stripe, which only serialises them, never breaks exclusion).
//! Overlapping requests are serialised because they share at least one stripe (any common
//! page's), which the writer holds exclusively.
//!
//! # Fairness
//! A writer that parks behind readers sets the stripe's `WRITER_WAITING` bit (with its
//! registration); from then on no new reader takes that stripe, so the readers in it drain and
//! the writer gets it (taking a stripe exclusively clears the bit). A stream of overlapping
//! readers therefore cannot hold a writer off forever: once the writer waits, only the readers
//! already inside, plus those woken with it by the same release, go before it. Readers that
//! find the bit set wait like for a writer. Only a parked writer sets the bit: a polling one
//! (run to completion, one thread) would otherwise block the readers that the callbacks of its
//! own poll issue, and a [`try_lock`](RangeLock::try_lock) never waits.
//!
//! # Waiting
//! A request that finds a stripe taken gives back the stripes it got, waits as told by
//! [`LockWait`] for that stripe, and tries its whole span again:
//! * [`LockWait::Poll`]: call the poll function (a run-to-completion caller polls its own queue
//!   pair, which is what completes the conflicting request). When the poll says nothing is in
//!   flight any more and the stripe is still taken, no completion can free it: it is held by a
//!   request lower on the same thread's stack (a callback run by that request's poll issued
//!   this one), which returns only after this one. [`lock`](RangeLock::lock) then fails
//!   instead of hanging.
//! * [`LockWait::Park`]: register in the file's waiter list, set the stripe's `WAITERS` bit,
//!   re-check the stripe, and park. The list is a mutex, but it is only touched on contention:
//!   by a waiter, and by the release that frees a stripe whose `WAITERS` bit is set, which wakes
//!   every waiter of that stripe and clears the bit (under the list's mutex, so a waiter that
//!   registers concurrently either sees the freed word in its re-check or is woken). Woken
//!   waiters retry; one that loses the race re-registers.
//!
//! # Guards
//! A synchronous request holds a [`RangeGuard`] borrowing the lock (no reference count): it
//! unlocks on drop. An asynchronous request detaches the range ([`RangeGuard::into_held`]: a
//! [`Held`], which stripes and how, no reference) into its context, and its completion gives it
//! back with [`RangeLock::unlock`]. A poller thread never waits: it unlocks the range of an
//! asynchronous request when the request completes (a few atomic operations, plus the waiter
//! list when someone waits), and a request a callback issues on the poller only *tries* the
//! lock ([`RangeLock::try_lock`], which gives back what it got and fails rather than wait;
//! refused with `WouldBlockOnPoller`).

use std::ops::Range;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};

use crossbeam_utils::sync::{Parker, Unparker};

/// Granule of the lock: one stripe per 4 KiB page.
const PAGE: u64 = crate::spec::PAGE_SIZE as u64;
/// Most stripes of one file (16 KiB of words): a file of at most 16 MiB has one per page.
pub(crate) const MAX_STRIPES: usize = 4096;

/// A writer holds the stripe.
const WRITER: u32 = 1 << 31;
/// Someone parked waiting for the stripe (see the module docs).
const WAITERS: u32 = 1 << 30;
/// A writer parked waiting for the stripe: no new reader gets in (see "Fairness").
const WRITER_WAITING: u32 = 1 << 29;
/// The reader count.
const READERS: u32 = WRITER_WAITING - 1;

/// How a blocked locker waits.
pub(crate) enum LockWait<'a> {
    /// Park until the stripe it waits for is released.
    Park,
    /// Call this between attempts (run-to-completion: it polls the caller's queue pair). It
    /// returns whether anything is still in flight that could free the range: `false` with
    /// the range still taken makes [`RangeLock::lock`] fail.
    Poll(&'a dyn Fn() -> bool),
}

/// The range lock of one file.
pub(crate) struct RangeLock {
    stripes: Box<[AtomicU32]>,
    /// `stripes.len() - 1`.
    mask: u64,
    /// Parked waiters: `(stripe, unparker)`. Touched only on contention.
    waiters: Mutex<Vec<(usize, Unparker)>>,
}

/// A held range, detached from its lock (an asynchronous request carries it to its
/// completion, which gives it back with [`RangeLock::unlock`]). Small and free of references:
/// which stripes, and how.
#[must_use = "a held range must be given back with RangeLock::unlock"]
pub(crate) struct Held {
    span: Span,
    exclusive: bool,
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (l, h) = (self.span.low, self.span.high);
        let mode = if self.exclusive {
            "exclusive"
        } else {
            "shared"
        };
        write!(f, "Held(stripes {}..{} {}..{}, {mode})", l.0, l.1, h.0, h.1)
    }
}

/// A held range borrowing its lock; unlocks on drop (or is detached with
/// [`into_held`](RangeGuard::into_held)).
pub(crate) struct RangeGuard<'a> {
    lock: &'a RangeLock,
    /// `None` only once detached.
    held: Option<Held>,
}

impl RangeGuard<'_> {
    /// Detach the range from the guard: the caller gives it back with [`RangeLock::unlock`].
    pub(crate) fn into_held(self) -> Option<Held> {
        // Not dropped: the emptied guard has nothing to give back, and its drop glue would be
        // an out-of-line call per asynchronous request.
        std::mem::ManuallyDrop::new(self).held.take()
    }
}

impl Drop for RangeGuard<'_> {
    #[inline(always)]
    fn drop(&mut self) {
        if let Some(h) = self.held.take() {
            self.lock.unlock(h);
        }
    }
}

/// The stripes of a range of pages, in ascending order: `low`, then `high` (empty unless the
/// pages wrap around the end of the table; `low` then starts at 0). Small: it travels in the
/// request's context.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Span {
    low: (u32, u32),
    high: (u32, u32),
}

impl Span {
    fn one(r: Range<usize>) -> Span {
        Span {
            low: (r.start as u32, r.end as u32),
            high: (0, 0),
        }
    }
}

fn lock_list<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl RangeLock {
    /// The lock of a file of `capacity` bytes.
    pub(crate) fn new(capacity: u64) -> Self {
        let pages = capacity.div_ceil(PAGE).max(1);
        let n = (pages.min(MAX_STRIPES as u64) as usize).next_power_of_two();
        RangeLock {
            stripes: (0..n).map(|_| AtomicU32::new(0)).collect(),
            mask: n as u64 - 1,
            waiters: Mutex::new(Vec::new()),
        }
    }

    /// The stripes covering the pages of `range` (byte offsets, rounded out to pages).
    #[inline(always)]
    fn span(&self, range: &Range<u64>) -> Span {
        let first = range.start / PAGE;
        let end = range.end.div_ceil(PAGE).max(first + 1);
        let n = self.stripes.len();
        if end - first >= n as u64 {
            return Span::one(0..n);
        }
        let (a, b) = ((first & self.mask) as u32, ((end - 1) & self.mask) as u32);
        if a <= b {
            Span::one(a as usize..b as usize + 1)
        } else {
            Span {
                low: (0, b + 1),
                high: (a, n as u32),
            }
        }
    }

    /// One attempt at stripe `i`: true when we got it.
    #[inline(always)]
    fn attempt(&self, i: usize, exclusive: bool) -> bool {
        let s = &self.stripes[i];
        let mut w = s.load(Ordering::Relaxed);
        loop {
            let free = if exclusive {
                w & (WRITER | READERS) == 0
            } else {
                w & (WRITER | WRITER_WAITING) == 0 && w & READERS != READERS
            };
            if !free {
                return false;
            }
            // A writer that gets the stripe clears `WRITER_WAITING`: its own, or that of a
            // writer still parked, which sets it again when it registers anew.
            let new = if exclusive {
                (w | WRITER) & !WRITER_WAITING
            } else {
                w + 1
            };
            // Acquire: what the previous holder wrote before its Release is visible to us.
            match s.compare_exchange_weak(w, new, Ordering::Acquire, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(now) => w = now,
            }
        }
    }

    /// Release stripe `i`; wake its waiters when it became free and someone waits.
    #[inline(always)]
    fn release(&self, i: usize, exclusive: bool) {
        let s = &self.stripes[i];
        // Release: our writes are visible to the next holder (its Acquire above).
        let old = if exclusive {
            s.fetch_and(!WRITER, Ordering::Release)
        } else {
            s.fetch_sub(1, Ordering::Release)
        };
        let now = if exclusive { old & !WRITER } else { old - 1 };
        if now & WAITERS != 0 && now & (WRITER | READERS) == 0 {
            self.wake(i);
        }
    }

    /// Wake every parked waiter of stripe `i` and clear its `WAITERS` bit (under the list's
    /// mutex, so no registration is lost: see the module docs).
    #[cold]
    fn wake(&self, i: usize) {
        let mut list = lock_list(&self.waiters);
        self.stripes[i].fetch_and(!WAITERS, Ordering::Relaxed);
        list.retain(|(s, u)| {
            if *s == i {
                u.unpark();
                false
            } else {
                true
            }
        });
    }

    /// Register as a waiter of stripe `i` if it is still busy; false if it is free now. A
    /// writer also sets `WRITER_WAITING`, which keeps new readers out (see "Fairness").
    fn register(&self, i: usize, exclusive: bool, parker: &Parker) -> bool {
        let mut list = lock_list(&self.waiters);
        let bits = if exclusive {
            WAITERS | WRITER_WAITING
        } else {
            WAITERS
        };
        let w = self.stripes[i].fetch_or(bits, Ordering::Relaxed);
        let busy = if exclusive {
            w & (WRITER | READERS) != 0
        } else {
            w & (WRITER | WRITER_WAITING) != 0
        };
        if busy {
            list.push((i, parker.unparker().clone()));
        } else if !list.iter().any(|(s, _)| *s == i) {
            // Free after all and nobody else waits: leave no stale bit (it would only cost the
            // next release a visit to the list).
            self.stripes[i].fetch_and(!WAITERS, Ordering::Relaxed);
        }
        busy
    }

    /// Lock `range` if nothing conflicting is held (never waits).
    #[inline(always)]
    pub(crate) fn try_lock(&self, range: Range<u64>, exclusive: bool) -> Option<RangeGuard<'_>> {
        let span = self.span(&range);
        self.try_span(span, exclusive)
            .ok()
            .map(|()| self.guard(span, exclusive))
    }

    /// Lock `range`, waiting as told while a conflicting range is held. `None` only with
    /// [`LockWait::Poll`]: the range is held and nothing in flight can free it (see
    /// "Waiting").
    #[inline(always)]
    pub(crate) fn lock(
        &self,
        range: Range<u64>,
        exclusive: bool,
        wait: LockWait<'_>,
    ) -> Option<RangeGuard<'_>> {
        let span = self.span(&range);
        if let Err(busy) = self.try_span(span, exclusive) {
            self.wait_span(span, exclusive, wait, busy)?;
        }
        Some(self.guard(span, exclusive))
    }

    /// Take every stripe of `span` without waiting, or none (`Err`: the first busy stripe).
    #[inline(always)]
    fn try_span(&self, span: Span, exclusive: bool) -> Result<(), usize> {
        let (low, high) = (
            span.low.0 as usize..span.low.1 as usize,
            span.high.0 as usize..span.high.1 as usize,
        );
        for i in low.clone() {
            if !self.attempt(i, exclusive) {
                // Give back what we got on the way (a release wakes whoever parked meanwhile).
                for j in low.start..i {
                    self.release(j, exclusive);
                }
                return Err(i);
            }
        }
        for i in high.clone() {
            if !self.attempt(i, exclusive) {
                for j in low.chain(high.start..i) {
                    self.release(j, exclusive);
                }
                return Err(i);
            }
        }
        Ok(())
    }

    /// The slow path of [`lock`](Self::lock): wait as told for the stripe that was busy,
    /// holding nothing, then try the whole span again.
    /// `None`: a polling waiter found the span still taken with nothing left in flight.
    #[cold]
    #[inline(never)]
    fn wait_span(
        &self,
        span: Span,
        exclusive: bool,
        wait: LockWait<'_>,
        mut busy: usize,
    ) -> Option<()> {
        let mut parker: Option<Parker> = None;
        loop {
            let pending = match &wait {
                LockWait::Poll(poll) => poll(),
                LockWait::Park => {
                    let p = parker.get_or_insert_with(Parker::new);
                    if self.register(busy, exclusive, p) {
                        p.park();
                    }
                    true
                }
            };
            match self.try_span(span, exclusive) {
                Ok(()) => return Some(()),
                Err(_) if !pending => return None,
                Err(i) => busy = i,
            }
        }
    }

    #[inline(always)]
    fn guard(&self, span: Span, exclusive: bool) -> RangeGuard<'_> {
        RangeGuard {
            lock: self,
            held: Some(Held { span, exclusive }),
        }
    }

    /// Give back a range held on this lock (in descending stripe order).
    #[inline(always)]
    pub(crate) fn unlock(&self, held: Held) {
        // In descending order: `high`, then `low`, each backwards. Two plain loops, not a
        // chained iterator and its state (about 10 instructions less per request).
        let Span { low, high } = held.span;
        for i in (high.0..high.1).rev() {
            self.release(i as usize, held.exclusive);
        }
        for i in (low.0..low.1).rev() {
            self.release(i as usize, held.exclusive);
        }
    }

    #[cfg(test)]
    fn held(&self) -> usize {
        self.stripes
            .iter()
            .filter(|s| s.load(Ordering::Relaxed) & (WRITER | READERS) != 0)
            .count()
    }

    #[cfg(test)]
    fn waiting(&self) -> usize {
        lock_list(&self.waiters).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize};

    const P: u64 = PAGE;

    #[test]
    fn readers_share_writers_exclude() {
        let l = Arc::new(RangeLock::new(64 * P));
        let r1 = l.try_lock(0..P, false).unwrap();
        let r2 = l.try_lock(0..2 * P, false).unwrap();
        assert!(l.try_lock(P..2 * P, true).is_none());
        let w = l.try_lock(2 * P..3 * P, true).unwrap();
        assert!(l.try_lock(2 * P..2 * P + 1, false).is_none());
        assert!(l.try_lock(2 * P + 100..2 * P + 200, true).is_none());
        // A failed try_lock gave back the stripes it got on the way.
        assert_eq!(l.held(), 3);
        drop((r1, r2, w));
        assert_eq!(l.held(), 0);
        assert!(l.try_lock(0..3 * P, true).is_some());
        assert_eq!(l.held(), 0);
    }

    #[test]
    fn stripes_wrap_around_in_ascending_order() {
        let l = RangeLock::new(16 * P);
        assert_eq!(l.stripes.len(), 16);
        assert_eq!(
            l.span(&(14 * P..18 * P)),
            Span {
                low: (0, 2),
                high: (14, 16)
            }
        );
        assert_eq!(l.span(&(3 * P + 1..3 * P + 2)), Span::one(3..4));
        assert_eq!(l.span(&(0..100 * P)), Span::one(0..16));
        // A huge file aliases pages onto the table.
        let big = RangeLock::new(1 << 40);
        assert_eq!(big.stripes.len(), MAX_STRIPES);
        let far = MAX_STRIPES as u64 * P;
        assert_eq!(big.span(&(far..far + P)), Span::one(0..1));
    }

    #[test]
    fn a_write_past_the_table_aliases_but_still_excludes() {
        let l = Arc::new(RangeLock::new(1 << 40));
        let far = MAX_STRIPES as u64 * P;
        let g = l.try_lock(0..P, true).unwrap();
        // Page `MAX_STRIPES` shares stripe 0 with page 0: serialised, never both held.
        assert!(l.try_lock(far..far + P, false).is_none());
        drop(g);
        assert!(l.try_lock(far..far + P, false).is_some());
    }

    #[test]
    fn a_parked_waiter_is_woken_by_the_overlapping_unlock() {
        let _w = test_watchdog::arm(test_watchdog::UNIT);
        let l = Arc::new(RangeLock::new(64 * P));
        let g = l.try_lock(0..P, true).unwrap();
        let got = Arc::new(AtomicBool::new(false));
        let t = {
            let (l, got) = (l.clone(), got.clone());
            std::thread::spawn(move || {
                let _g = l.lock(0..100, false, LockWait::Park).unwrap();
                got.store(true, Ordering::SeqCst);
            })
        };
        // Wait (without a timed assertion) until the reader has parked behind the writer.
        while l.waiting() == 0 {
            std::thread::yield_now();
        }
        assert!(
            !got.load(Ordering::SeqCst),
            "the reader got in under a writer"
        );
        drop(g);
        t.join().unwrap();
        assert!(got.load(Ordering::SeqCst));
        assert_eq!((l.held(), l.waiting()), (0, 0));
        assert_eq!(l.stripes[0].load(Ordering::Relaxed), 0, "WAITERS cleared");
    }

    #[test]
    fn a_writer_parked_behind_two_readers_waits_for_the_last() {
        let _w = test_watchdog::arm(test_watchdog::UNIT);
        let l = Arc::new(RangeLock::new(64 * P));
        let r1 = l.try_lock(0..P, false).unwrap();
        let r2 = l.try_lock(0..P, false).unwrap();
        let got = Arc::new(AtomicBool::new(false));
        let t = {
            let (l, got) = (l.clone(), got.clone());
            std::thread::spawn(move || {
                let _g = l.lock(0..P, true, LockWait::Park).unwrap();
                got.store(true, Ordering::SeqCst);
            })
        };
        while l.waiting() == 0 {
            std::thread::yield_now();
        }
        drop(r1);
        // The first reader's release does not free the stripe: the writer stays registered.
        assert_eq!(l.waiting(), 1);
        assert!(!got.load(Ordering::SeqCst));
        drop(r2);
        t.join().unwrap();
        assert!(got.load(Ordering::SeqCst));
    }

    #[test]
    fn a_polling_waiter_polls_until_free() {
        let _w = test_watchdog::arm(test_watchdog::UNIT);
        let l = Arc::new(RangeLock::new(64 * P));
        let g = std::cell::RefCell::new(Some(l.try_lock(0..P, true).unwrap()));
        let polls = std::cell::Cell::new(0);
        let poll = || {
            polls.set(polls.get() + 1);
            if polls.get() == 3 {
                g.borrow_mut().take();
            }
            true
        };
        let _w = l.lock(0..P, true, LockWait::Poll(&poll)).unwrap();
        assert_eq!(polls.get(), 3);
        assert_eq!(l.waiting(), 0, "a polling waiter never registers");
    }

    /// Threads lock random ranges (shared or exclusive, parked or polling) and check, in a
    /// shadow table of per-page counters, that no page is ever held by a writer and anyone
    /// else at once. The table is small and the ranges wrap around it, so stripes alias.
    #[test]
    fn stress_exclusion_against_a_shadow_table() {
        let _w = test_watchdog::arm(test_watchdog::STRESS);
        const PAGES: u64 = 64;
        let l = Arc::new(RangeLock::new(16 * P));
        // Per page: readers inside, or -1 for a writer.
        let shadow: Arc<Vec<AtomicI64>> = Arc::new((0..PAGES).map(|_| AtomicI64::new(0)).collect());
        let granted = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let (l, shadow, granted) = (l.clone(), shadow.clone(), granted.clone());
                std::thread::spawn(move || {
                    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (t + 1);
                    let mut rnd = move || {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x
                    };
                    for _ in 0..20_000 {
                        let first = rnd() % PAGES;
                        let n = 1 + rnd() % 20;
                        let end = (first + n).min(PAGES);
                        let exclusive = rnd() % 3 == 0;
                        let range = first * P + rnd() % P..end * P - rnd() % P;
                        let g = match rnd() % 3 {
                            0 => match l.try_lock(range.clone(), exclusive) {
                                Some(g) => g,
                                None => continue,
                            },
                            1 => l
                                .lock(
                                    range.clone(),
                                    exclusive,
                                    LockWait::Poll(&|| {
                                        std::thread::yield_now();
                                        true
                                    }),
                                )
                                .unwrap(),
                            _ => l.lock(range.clone(), exclusive, LockWait::Park).unwrap(),
                        };
                        let pages = range.start / P..range.end.div_ceil(P);
                        for p in pages.clone() {
                            let s = &shadow[p as usize];
                            if exclusive {
                                let r =
                                    s.compare_exchange(0, -1, Ordering::SeqCst, Ordering::SeqCst);
                                assert_eq!(r, Ok(0), "page {p}: a writer got in beside someone");
                            } else {
                                let r = s.fetch_add(1, Ordering::SeqCst);
                                assert!(r >= 0, "page {p}: a reader got in beside a writer");
                            }
                        }
                        if rnd() % 8 == 0 {
                            std::thread::yield_now();
                        }
                        for p in pages {
                            let s = &shadow[p as usize];
                            if exclusive {
                                s.store(0, Ordering::SeqCst);
                            } else {
                                s.fetch_sub(1, Ordering::SeqCst);
                            }
                        }
                        drop(g);
                        granted.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(granted.load(Ordering::Relaxed) > 0);
        assert_eq!((l.held(), l.waiting()), (0, 0));
        for s in l.stripes.iter() {
            assert_eq!(s.load(Ordering::Relaxed), 0);
        }
    }

    #[test]
    fn a_try_lock_failing_past_the_wrap_gives_everything_back() {
        let l = RangeLock::new(16 * P);
        let g = l.try_lock(15 * P..16 * P, true).unwrap();
        // Pages 14..18 are stripes 0, 1 then 14, 15: fails at 15 holding 0, 1 and 14.
        assert!(l.try_lock(14 * P..18 * P, false).is_none());
        assert_eq!(l.held(), 1);
        drop(g);
        assert!(l.try_lock(14 * P..18 * P, true).is_some());
        assert_eq!(l.held(), 0);
    }

    /// Run to completion, a waiter's poll runs callbacks, which may issue requests of their
    /// own: one overlapping the waiter's span must not find part of it held by the waiter (it
    /// would wait forever for a frame below it on the same stack).
    #[test]
    fn a_waiter_holds_nothing_while_it_polls() {
        let _w = test_watchdog::arm(test_watchdog::UNIT);
        let l = RangeLock::new(64 * P);
        // An asynchronous request in flight on page 1.
        let in_flight = std::cell::RefCell::new(Some(l.try_lock(P..2 * P, true).unwrap()));
        let nested = std::cell::Cell::new(false);
        let poll = || {
            // A callback run by the poll locks page 0, which the waiter also wants.
            let g = l.try_lock(0..P, true);
            nested.set(g.is_some());
            drop(g);
            in_flight.borrow_mut().take();
            true
        };
        let g = l.lock(0..2 * P, true, LockWait::Poll(&poll)).unwrap();
        assert!(nested.get(), "the waiter held page 0 while it polled");
        drop(g);
        assert_eq!(l.held(), 0);
    }

    #[test]
    fn a_detached_range_stays_held_until_unlocked() {
        let l = RangeLock::new(64 * P);
        let held = l
            .lock(0..2 * P, true, LockWait::Park)
            .unwrap()
            .into_held()
            .unwrap();
        assert!(l.try_lock(P..P + 1, false).is_none());
        assert_eq!(l.held(), 2);
        l.unlock(held);
        assert_eq!(l.held(), 0);
        assert!(l.try_lock(0..2 * P, true).is_some());
    }

    #[test]
    fn a_failed_try_lock_wakes_nobody_and_keeps_nothing() {
        let l = Arc::new(RangeLock::new(64 * P));
        let g = l.try_lock(3 * P..4 * P, true).unwrap();
        assert!(l.try_lock(0..8 * P, false).is_none());
        assert_eq!(l.held(), 1);
        drop(g);
        assert_eq!(l.held(), 0);
    }

    /// A writer parked behind a reader keeps new readers out: the stream of readers that
    /// overlap the held one (each would find the stripe shared) cannot hold the writer off;
    /// the writer gets the range as soon as the reader that was inside leaves.
    #[test]
    fn a_parked_writer_is_not_starved_by_new_readers() {
        let _w = test_watchdog::arm(test_watchdog::UNIT);
        let l = Arc::new(RangeLock::new(64 * P));
        let inside = l.try_lock(0..2 * P, false).unwrap();
        let got = Arc::new(AtomicBool::new(false));
        let writer = {
            let (l, got) = (l.clone(), got.clone());
            std::thread::spawn(move || {
                let g = l.lock(P..2 * P, true, LockWait::Park).unwrap();
                got.store(true, Ordering::SeqCst);
                drop(g);
            })
        };
        while l.waiting() == 0 {
            std::thread::yield_now();
        }
        // New readers of the writer's page are refused (a try) or wait (a parked reader);
        // readers of other pages are not affected.
        assert!(
            l.try_lock(P..P + 1, false).is_none(),
            "a new reader got in ahead of a parked writer"
        );
        assert!(l.try_lock(0..P, false).is_some());
        let reader = {
            let l = l.clone();
            std::thread::spawn(move || drop(l.lock(P..2 * P, false, LockWait::Park).unwrap()))
        };
        while l.waiting() < 2 {
            std::thread::yield_now();
        }
        assert!(!got.load(Ordering::SeqCst));
        drop(inside);
        writer.join().unwrap();
        reader.join().unwrap();
        assert!(got.load(Ordering::SeqCst));
        assert_eq!((l.held(), l.waiting()), (0, 0));
        for s in l.stripes.iter() {
            assert_eq!(s.load(Ordering::Relaxed), 0, "no bit left behind");
        }
    }

    /// Two reader threads keep the page shared without a gap: each takes it again (a try,
    /// which never waits) before it lets go of its previous hold, and only when a try fails
    /// does it let go first and wait. Without writer preference the page is never free and
    /// the writer waits forever (the watchdog fails the test); with it, writers get in.
    #[test]
    fn overlapping_readers_without_a_gap_do_not_starve_writers() {
        let _w = test_watchdog::arm(test_watchdog::UNIT);
        let l = Arc::new(RangeLock::new(64 * P));
        let stop = Arc::new(AtomicBool::new(false));
        let started = Arc::new(AtomicUsize::new(0));
        let first = l.try_lock(0..P, false).unwrap().into_held().unwrap();
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (l, stop, started) = (l.clone(), stop.clone(), started.clone());
                std::thread::spawn(move || {
                    let mut mine = l.try_lock(0..P, false).unwrap().into_held();
                    started.fetch_add(1, Ordering::SeqCst);
                    while !stop.load(Ordering::SeqCst) {
                        let next = match l.try_lock(0..P, false) {
                            Some(g) => g.into_held(),
                            None => {
                                if let Some(h) = mine.take() {
                                    l.unlock(h);
                                }
                                l.lock(0..P, false, LockWait::Park).unwrap().into_held()
                            }
                        };
                        if let Some(h) = mine.take() {
                            l.unlock(h);
                        }
                        mine = next;
                    }
                    if let Some(h) = mine {
                        l.unlock(h);
                    }
                })
            })
            .collect();
        while started.load(Ordering::SeqCst) < 2 {
            std::thread::yield_now();
        }
        l.unlock(first);
        for _ in 0..3 {
            drop(l.lock(0..P, true, LockWait::Park).unwrap());
        }
        stop.store(true, Ordering::SeqCst);
        for r in readers {
            r.join().unwrap();
        }
        assert_eq!((l.held(), l.waiting()), (0, 0));
    }

    /// A polling waiter whose poll reports nothing in flight, with the range still taken (by a
    /// frame below it on its stack), fails instead of polling forever.
    #[test]
    fn a_polling_waiter_gives_up_when_nothing_can_free_the_range() {
        let _w = test_watchdog::arm(test_watchdog::UNIT);
        let l = RangeLock::new(64 * P);
        let below = l.try_lock(0..P, true).unwrap();
        let polls = std::cell::Cell::new(0);
        let poll = || {
            polls.set(polls.get() + 1);
            polls.get() < 3
        };
        assert!(l.lock(0..2 * P, false, LockWait::Poll(&poll)).is_none());
        assert_eq!(polls.get(), 3);
        assert_eq!(l.held(), 1, "the failed waiter holds nothing");
        drop(below);
        assert!(l.lock(0..2 * P, true, LockWait::Poll(&|| false)).is_some());
    }
}
