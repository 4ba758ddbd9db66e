//! The §3.13 variant: `refs` is an `AtomicU32`; a completion that is not last does one
//! `fetch_sub` and nothing else.
//!
//! * Every decrement is `fetch_sub(1, AcqRel)`; only the thread that sees 0 touches the request
//!   afterwards.
//! * A waiting submitter uses iomap's protocol: it records that it waits (and its thread
//!   handle), drops its own reference first, and if that was not the last one, parks until
//!   `done` is set. The last completer takes the waiter handle into a local, stores `done`
//!   (Release) and unparks the local handle, with no access to the request after the store.
//! * Anything read after the drop was copied before it. Sampling "is someone waiting" before
//!   the decrement and waking through the request after it (B7) is not done.
//! * A small mutex (`slots`) is taken only on a device error (before the decrement), by the
//!   submitter to publish, and by the last holder to take the payload.
//! * Throttling (waiting for some of one's own bios mid-submission) cannot be woken by a
//!   completer without touching the request after its decrement, so it polls the counter:
//!   `poll_once` under [`Wait::PollInPlace`], `yield_now` under [`Wait::Park`]. It only runs
//!   when the driver's request pool is exhausted.

use crate::dio::{Final, Payload, Wait};
use crate::error::DioError;
use crate::sync::bio_lock::{self, Guard, Mutex};
use crate::sync::{AtomicBool, AtomicU32, Ordering, invariant, thread};

enum Fin<B> {
    /// The submitter has not dropped its reference yet.
    Pending,
    /// The submitter returned `Queued` (or is about to): the last completer completes.
    Queued(u64, Payload<B>),
    /// The submitter waits; the last completer only wakes it.
    Waiting(Option<thread::Thread>),
}

struct Slots<B> {
    io_error: Option<DioError>,
    fin: Fin<B>,
    released: bool,
}

pub(crate) struct AtomicRefs<B> {
    refs: AtomicU32,
    done: AtomicBool,
    slots: Mutex<Slots<B>>,
}

impl<B> AtomicRefs<B> {
    pub fn new() -> Self {
        AtomicRefs {
            refs: AtomicU32::new(1),
            done: AtomicBool::new(false),
            slots: Mutex::new(Slots {
                io_error: None,
                fin: Fin::Pending,
                released: false,
            }),
        }
    }

    /// A recycled state starts over (`&mut`: nobody else can reach it).
    #[inline(always)]
    pub fn reuse(&mut self) {
        *self = AtomicRefs::new();
    }

    #[inline(always)]
    fn slots(&self) -> Guard<'_, Slots<B>> {
        let g = bio_lock::lock(&self.slots);
        invariant!(!g.released, "touched a released Dio");
        g
    }

    pub fn get_ref(&self) -> u32 {
        // The submitter holds a reference, so the count cannot be 0 here (like `Arc::clone`).
        self.refs.fetch_add(1, Ordering::Relaxed) - 1
    }

    pub fn undo_ref(&self) -> u32 {
        let r = self.refs.fetch_sub(1, Ordering::AcqRel) - 1;
        invariant!(
            r >= 1,
            "undo of a rejected bio dropped the submitter's reference"
        );
        r - 1
    }

    pub fn wait_refs(&self, target: u32, wait: &Wait) {
        while self.refs.load(Ordering::Acquire) > target {
            match wait {
                Wait::Park => thread::yield_now(),
                Wait::PollInPlace(p) => p.poll_once(),
            }
        }
    }

    pub fn submitter_queue(&self, handled: u64, payload: Payload<B>) -> Option<Final<B>> {
        self.slots().fin = Fin::Queued(handled, payload);
        if self.refs.fetch_sub(1, Ordering::AcqRel) != 1 {
            return None; // Queued: no further access.
        }
        // Every bio already completed: we are last after all.
        let mut s = self.slots();
        s.released = true;
        let Fin::Queued(handled, payload) = std::mem::replace(&mut s.fin, Fin::Pending) else {
            unreachable!("only the submitter publishes");
        };
        Some(Final {
            handled,
            io_error: s.io_error,
            payload,
        })
    }

    pub fn submitter_wait(&self, wait: &Wait, _bios: u32) -> Option<DioError> {
        let me = matches!(wait, Wait::Park).then(thread::current);
        self.slots().fin = Fin::Waiting(me);
        if self.refs.fetch_sub(1, Ordering::AcqRel) != 1 {
            while !self.done.load(Ordering::Acquire) {
                match wait {
                    Wait::Park => thread::park(),
                    Wait::PollInPlace(p) => p.poll_once(),
                }
            }
        }
        let mut s = self.slots();
        s.released = true;
        s.fin = Fin::Pending;
        s.io_error
    }

    pub fn bio_done(&self, err: Option<DioError>) -> Option<Final<B>> {
        if let Some(e) = err {
            let mut s = self.slots();
            if s.io_error.is_none() {
                s.io_error = Some(e);
            }
        }
        if self.refs.fetch_sub(1, Ordering::AcqRel) != 1 {
            return None; // Not last: no further access (B1, B7).
        }
        let mut s = self.slots();
        match std::mem::replace(&mut s.fin, Fin::Pending) {
            Fin::Queued(handled, payload) => {
                s.released = true;
                Some(Final {
                    handled,
                    io_error: s.io_error,
                    payload,
                })
            }
            Fin::Waiting(waiter) => {
                drop(s);
                self.done.store(true, Ordering::Release);
                // From here on the submitter owns the request: only the local handle is used.
                if let Some(t) = waiter {
                    t.unpark();
                }
                None
            }
            Fin::Pending => {
                panic!("the last reference was a bio's but the submitter published nothing")
            }
        }
    }
}
