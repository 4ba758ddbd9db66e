//! The baseline reference counting (§3.3): `refs`, `waiter`, the first device error, the
//! published payload and the poison flag live under one lock, the `bio_lock`.
//!
//! Lock rules: every read and write of this state is under the lock (L1); a completion
//! decrements, tests and wakes in one critical section (L2); nothing external runs under the
//! lock (L3); whoever brings `refs` to 0 sets `released` and takes the payload in that same
//! critical section, and nobody touches the state afterwards (L4, checked at every lock).

use crate::dio::{Final, Payload, Wait};
use crate::error::DioError;
use crate::sync::bio_lock::{self, Condvar, Guard, Mutex};
use crate::sync::invariant;

struct State<B> {
    /// 1 (the submitter, until its final drop) + accepted bios not yet completed.
    refs: u32,
    /// `Some(t)`: the submitter sleeps until `refs <= t`.
    waiter: Option<u32>,
    /// First completion-class error, in lock order.
    io_error: Option<DioError>,
    /// Published by the submitter in the critical section of its final decrement (only a
    /// queued request publishes, and it has no submission error: `handled` is all it found).
    /// Already in the shape the last completer returns (its `io_error` is filled in then), so
    /// that the hand-over moves the payload once each way.
    published: Option<Final<B>>,
    /// Poison flag: `refs` reached 0.
    released: bool,
}

pub(crate) struct LockedRefs<B> {
    st: Mutex<State<B>>,
    cv: Condvar,
}

impl<B> LockedRefs<B> {
    pub fn new() -> Self {
        LockedRefs {
            st: Mutex::new(State {
                refs: 1,
                waiter: None,
                io_error: None,
                published: None,
                released: false,
            }),
            cv: Condvar::new(),
        }
    }

    /// A recycled state starts over: the submitter's reference only. `&mut`: nobody else can
    /// reach the state (`Arc::get_mut` proved it), so no lock is taken.
    #[inline(always)]
    pub fn reuse(&mut self) {
        let s = bio_lock::get_mut(&mut self.st);
        s.refs = 1;
        s.waiter = None;
        s.io_error = None;
        s.published = None;
        s.released = false;
    }

    /// `get_ref` when the submitter holds the only `Arc` (a request's first bio): no other
    /// thread can observe the count, so it is changed without the lock.
    pub fn get_ref_exclusive(&mut self) -> u32 {
        let s = bio_lock::get_mut(&mut self.st);
        invariant!(!s.released, "touched a released Dio");
        s.refs += 1;
        s.refs - 2
    }

    /// Every acquisition checks the poison flag (I-LT-1).
    #[inline(always)]
    fn lock(&self) -> Guard<'_, State<B>> {
        let g = bio_lock::lock(&self.st);
        invariant!(!g.released, "touched a released Dio");
        g
    }

    pub fn get_ref(&self) -> u32 {
        let mut g = self.lock();
        g.refs += 1;
        g.refs - 2
    }

    pub fn undo_ref(&self) -> u32 {
        let mut g = self.lock();
        g.refs -= 1;
        invariant!(
            g.refs >= 1,
            "undo of a rejected bio dropped the submitter's reference"
        );
        g.refs - 1
    }

    /// Wait until `refs <= target`. The submitter holds its reference throughout.
    pub fn wait_refs(&self, target: u32, wait: &Wait) {
        drop(self.wait_locked(target, wait, false));
    }

    /// Wait until `refs <= target` and return with the lock held, so that the submitter's
    /// final drop can follow in the same critical section as its last check. `poll_first`:
    /// with [`Wait::PollInPlace`], poll before the first check (the submitter has bios in
    /// flight, so a first check before any poll would most likely be a wasted lock round trip).
    #[inline(always)]
    fn wait_locked(&self, target: u32, wait: &Wait, poll_first: bool) -> Guard<'_, State<B>> {
        if let (true, Wait::PollInPlace(poller)) = (poll_first, wait) {
            // Never with the lock held (L3).
            poller.poll_once();
        }
        match wait {
            Wait::Park => {
                let mut g = self.lock();
                while g.refs > target {
                    g.waiter = Some(target);
                    g = bio_lock::wait(&self.cv, g);
                    invariant!(!g.released, "touched a released Dio");
                }
                g.waiter = None;
                g
            }
            Wait::PollInPlace(poller) => loop {
                let g = self.lock();
                if g.refs <= target {
                    break g;
                }
                drop(g);
                // Never with the lock held: completions may run right here (L3).
                poller.poll_once();
            },
        }
    }

    /// §3.4 steps 7–8 for a request that is not queued: drain, then the final decrement in
    /// the same critical section as the drain's last check. The submitter's reference is the
    /// last one, so it owns the request again; returns the first device error.
    #[inline(always)]
    pub fn submitter_wait(&self, wait: &Wait, bios: u32) -> Option<DioError> {
        let mut g = self.wait_locked(1, wait, bios > 0);
        g.refs -= 1;
        invariant!(
            g.refs == 0,
            "the submitter left bios in flight without returning Queued"
        );
        g.released = true;
        g.io_error
    }

    /// §3.4 step 8 for a queued request: publish the walk and the payload and drop the
    /// submitter's reference, in one critical section. `Some` if every bio had already
    /// completed (the submitter was last after all and gets everything back).
    #[inline(always)]
    pub fn submitter_queue(&self, handled: u64, payload: Payload<B>) -> Option<Final<B>> {
        let mut g = self.lock();
        g.refs -= 1;
        if g.refs == 0 {
            g.released = true;
            let io_error = g.io_error;
            drop(g);
            return Some(Final {
                handled,
                io_error,
                payload,
            });
        }
        g.published = Some(Final {
            handled,
            io_error: None,
            payload,
        });
        None
    }

    #[inline(always)]
    pub fn bio_done(&self, err: Option<DioError>) -> Option<Final<B>> {
        let mut g = self.lock();
        if let Some(e) = err {
            if g.io_error.is_none() {
                g.io_error = Some(e);
            }
        }
        g.refs -= 1;
        let r = g.refs;
        if let Some(t) = g.waiter {
            if r <= t {
                self.cv.notify_one();
            }
        }
        if r > 0 {
            return None;
        }
        g.released = true;
        let io_error = g.io_error;
        match g.published.take() {
            Some(mut fin) => {
                fin.io_error = io_error;
                Some(fin)
            }
            None => panic!(
                "the last reference was a bio's but the submitter published nothing (I-CB-5)"
            ),
        }
    }
}
