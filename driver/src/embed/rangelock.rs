//! A byte-range reader/writer lock per file: what makes overlapping requests on different
//! threads see each other's data whole.
//!
//! Every request locks the 4 KiB pages it touches (writes exclusive, reads shared) before it
//! looks at the file size, the page cache or the device, and unlocks when its result is known:
//! on return for a synchronous call, just before the callback for an asynchronous one. Two
//! requests touching a common page therefore run one after the other, in the order they got
//! the lock; requests on disjoint pages run in parallel. The lock is taken once per request, not
//! per bio. A poller thread does touch it: it drops the guard of an asynchronous request when
//! the request completes (a short critical section on the lock's mutex, and an unpark of the
//! waiters it overlapped), and a request a callback issues on the poller only *tries* the lock
//! (refused with `WouldBlockOnPoller` rather than waiting). A poller never waits for a range to
//! be released, only, briefly, for the internal mutex.
//!
//! A waiter parks on a crossbeam-utils [`Parker`]; an unlock wakes the waiters whose range it
//! overlapped. A waiter that must not sleep (a run-to-completion caller that polls its own queue
//! pair) passes a poll function instead.

use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};

use crossbeam_utils::sync::{Parker, Unparker};

fn overlaps(a: &Range<u64>, b: &Range<u64>) -> bool {
    a.start < b.end && b.start < a.end
}

struct Held {
    id: u64,
    range: Range<u64>,
    exclusive: bool,
}

#[derive(Default)]
struct State {
    held: Vec<Held>,
    waiters: Vec<(Range<u64>, Unparker)>,
    next: u64,
}

impl State {
    fn conflicts(&self, range: &Range<u64>, exclusive: bool) -> bool {
        self.held
            .iter()
            .any(|h| (exclusive || h.exclusive) && overlaps(&h.range, range))
    }
    fn grant(&mut self, range: Range<u64>, exclusive: bool) -> u64 {
        self.next += 1;
        let id = self.next;
        self.held.push(Held {
            id,
            range,
            exclusive,
        });
        id
    }
}

/// How a blocked locker waits.
pub(crate) enum LockWait<'a> {
    /// Park until an overlapping range is unlocked.
    Park,
    /// Call this between attempts (run-to-completion: it polls the caller's queue pair).
    Poll(&'a dyn Fn()),
}

/// The range lock of one file.
#[derive(Default)]
pub(crate) struct RangeLock {
    st: Mutex<State>,
}

/// A held range; unlocks on drop.
pub(crate) struct RangeGuard {
    lock: Arc<RangeLock>,
    id: u64,
}

impl std::fmt::Debug for RangeGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RangeGuard({})", self.id)
    }
}

impl RangeLock {
    fn state(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Lock `range` if nothing conflicting is held.
    pub(crate) fn try_lock(
        self: &Arc<Self>,
        range: Range<u64>,
        exclusive: bool,
    ) -> Option<RangeGuard> {
        let mut st = self.state();
        if st.conflicts(&range, exclusive) {
            return None;
        }
        let id = st.grant(range, exclusive);
        Some(RangeGuard {
            lock: Arc::clone(self),
            id,
        })
    }

    /// Lock `range`, waiting as told while a conflicting range is held.
    pub(crate) fn lock(
        self: &Arc<Self>,
        range: Range<u64>,
        exclusive: bool,
        wait: LockWait<'_>,
    ) -> RangeGuard {
        let mut parker: Option<Parker> = None;
        loop {
            {
                let mut st = self.state();
                if !st.conflicts(&range, exclusive) {
                    let id = st.grant(range, exclusive);
                    return RangeGuard {
                        lock: Arc::clone(self),
                        id,
                    };
                }
                if let LockWait::Park = wait {
                    let p = parker.get_or_insert_with(Parker::new);
                    st.waiters.push((range.clone(), p.unparker().clone()));
                }
            }
            match &wait {
                LockWait::Park => parker.as_ref().expect("created above").park(),
                LockWait::Poll(poll) => poll(),
            }
        }
    }

    fn unlock(&self, id: u64) {
        let mut st = self.state();
        let Some(i) = st.held.iter().position(|h| h.id == id) else {
            return;
        };
        let h = st.held.swap_remove(i);
        // Wake everyone whose range this one blocked; they retry (and re-register if needed).
        let mut i = 0;
        while i < st.waiters.len() {
            if overlaps(&st.waiters[i].0, &h.range) {
                let (_, u) = st.waiters.swap_remove(i);
                u.unpark();
            } else {
                i += 1;
            }
        }
    }

    #[cfg(test)]
    fn held(&self) -> usize {
        self.state().held.len()
    }
}

impl Drop for RangeGuard {
    fn drop(&mut self) {
        self.lock.unlock(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    #[test]
    fn readers_share_writers_exclude() {
        let l = Arc::new(RangeLock::default());
        let r1 = l.try_lock(0..4096, false).unwrap();
        let r2 = l.try_lock(0..8192, false).unwrap();
        assert!(l.try_lock(4096..8192, true).is_none());
        let w = l.try_lock(8192..12288, true).unwrap();
        assert!(l.try_lock(8192..8193, false).is_none());
        drop((r1, r2, w));
        assert_eq!(l.held(), 0);
        assert!(l.try_lock(0..12288, true).is_some());
    }

    #[test]
    fn a_parked_waiter_is_woken_by_the_overlapping_unlock() {
        let l = Arc::new(RangeLock::default());
        let g = l.try_lock(0..4096, true).unwrap();
        let got = Arc::new(AtomicBool::new(false));
        let t = {
            let (l, got) = (l.clone(), got.clone());
            std::thread::spawn(move || {
                let _g = l.lock(0..100, false, LockWait::Park);
                got.store(true, Ordering::SeqCst);
            })
        };
        std::thread::sleep(Duration::from_millis(20));
        assert!(
            !got.load(Ordering::SeqCst),
            "the reader got in under a writer"
        );
        drop(g);
        t.join().unwrap();
        assert!(got.load(Ordering::SeqCst));
    }

    #[test]
    fn a_polling_waiter_polls_until_free() {
        let l = Arc::new(RangeLock::default());
        let g = std::cell::RefCell::new(Some(l.try_lock(0..4096, true).unwrap()));
        let polls = std::cell::Cell::new(0);
        let poll = || {
            polls.set(polls.get() + 1);
            if polls.get() == 3 {
                g.borrow_mut().take();
            }
        };
        let _w = l.lock(0..4096, true, LockWait::Poll(&poll));
        assert_eq!(polls.get(), 3);
    }
}
