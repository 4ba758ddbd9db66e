//! The free list of request states of one [`DioCore`](crate::DioCore).
//!
//! A bounded, lock-free queue (crossbeam's `ArrayQueue`: no lock shared between the client
//! threads of a core, and no allocation after its creation), with one *hot slot* in front of
//! it: a single atomic pointer-sized cell that a push fills and a pop empties with one atomic
//! exchange each. In the steady state of one client thread (submit, complete, submit again)
//! every request takes and returns its state through the hot slot, about a tenth of the
//! queue's instructions; the queue takes the overflow when several requests are in flight.
//! Under loom the pool is a loom mutex around a deque, so that the model checker sees the
//! hand-over of a state from the thread that returns it to the thread that reuses it.
//!
//! Each pooled state keeps a pointer to its pool (to return itself from whichever thread drops
//! the last reference), so the pool and its idle states form a cycle. [`close`](Pool::close),
//! called when the core is dropped, breaks it: it empties the queue, and a state returned
//! after that is dropped instead of queued.

#[cfg(not(loom))]
pub(crate) struct Pool<T> {
    /// The most recently returned idle state, if any (lock-free for a pointer-sized `T` such
    /// as an `Arc`: `AtomicCell<Option<Arc<_>>>` is one atomic word).
    hot: crossbeam_utils::atomic::AtomicCell<Option<T>>,
    free: crossbeam_queue::ArrayQueue<T>,
    closed: std::sync::atomic::AtomicBool,
}

#[cfg(not(loom))]
impl<T> Pool<T> {
    /// A pool holding at most `cap` (at least 1) idle states.
    pub fn new(cap: usize) -> Self {
        Pool {
            hot: crossbeam_utils::atomic::AtomicCell::new(None),
            free: crossbeam_queue::ArrayQueue::new(cap.max(1)),
            closed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// An idle state, if any: the hot slot's, else one from the queue.
    #[inline(always)]
    pub fn pop(&self) -> Option<T> {
        match self.hot.take() {
            Some(t) => Some(t),
            None => self.free.pop(),
        }
    }

    /// Keep `t` for reuse (in the hot slot; the state it held, if any, goes to the queue);
    /// dropped if the pool is full or closed.
    #[inline(always)]
    pub fn push(&self, t: T) {
        use std::sync::atomic::{Ordering, fence};
        if let Some(older) = self.hot.swap(Some(t)) {
            // Full: `older` is dropped, which is fine (the pool only bounds what it keeps).
            let _ = self.free.push(older);
        }
        // Dekker with `close`: either this load sees `closed`, or `close`'s drain sees the push.
        fence(Ordering::SeqCst);
        if self.closed.load(Ordering::Relaxed) {
            self.drain();
        }
    }

    /// Keep `t` for reuse behind every other idle state (the queue's tail): for a state that
    /// was popped too early, while a completer still held it.
    pub fn push_cold(&self, t: T) {
        use std::sync::atomic::{Ordering, fence};
        if self.free.push(t).is_err() {
            return;
        }
        fence(Ordering::SeqCst);
        if self.closed.load(Ordering::Relaxed) {
            self.drain();
        }
    }

    /// Drop every idle state and refuse further ones.
    pub fn close(&self) {
        use std::sync::atomic::{Ordering, fence};
        self.closed.store(true, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        self.drain();
    }

    fn drain(&self) {
        drop(self.hot.take());
        while self.free.pop().is_some() {}
    }
}

#[cfg(loom)]
pub(crate) struct Pool<T> {
    free: crate::sync::Mutex<(std::collections::VecDeque<T>, bool)>,
    cap: usize,
}

#[cfg(loom)]
impl<T> Pool<T> {
    pub fn new(cap: usize) -> Self {
        Pool {
            free: crate::sync::Mutex::new((std::collections::VecDeque::new(), false)),
            cap: cap.max(1),
        }
    }

    pub fn pop(&self) -> Option<T> {
        crate::sync::lock(&self.free).0.pop_front()
    }

    pub fn push(&self, t: T) {
        let mut g = crate::sync::lock(&self.free);
        if !g.1 && g.0.len() < self.cap {
            g.0.push_back(t);
            return;
        }
        drop(g);
        drop(t);
    }

    pub fn push_cold(&self, t: T) {
        self.push(t);
    }

    pub fn close(&self) {
        let idle = {
            let mut g = crate::sync::lock(&self.free);
            g.1 = true;
            std::mem::take(&mut g.0)
        };
        // Dropped outside the lock: a state's drop drops its pointer to this pool.
        drop(idle);
    }
}
