//! The free list of request states of one [`DioCore`](crate::DioCore).
//!
//! A bounded, lock-free queue (crossbeam's `ArrayQueue`: no lock shared between the client
//! threads of a core, and no allocation after its creation). Under loom it is a loom mutex
//! around a deque, so that the model checker sees the hand-over of a state from the thread that
//! returns it to the thread that reuses it.
//!
//! Each pooled state keeps a pointer to its pool (to return itself from whichever thread drops
//! the last reference), so the pool and its idle states form a cycle. [`close`](Pool::close),
//! called when the core is dropped, breaks it: it empties the queue, and a state returned
//! after that is dropped instead of queued.

#[cfg(not(loom))]
pub(crate) struct Pool<T> {
    free: crossbeam_queue::ArrayQueue<T>,
    closed: std::sync::atomic::AtomicBool,
}

#[cfg(not(loom))]
impl<T> Pool<T> {
    /// A pool holding at most `cap` (at least 1) idle states.
    pub fn new(cap: usize) -> Self {
        Pool {
            free: crossbeam_queue::ArrayQueue::new(cap.max(1)),
            closed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// An idle state, if any.
    pub fn pop(&self) -> Option<T> {
        self.free.pop()
    }

    /// Keep `t` for reuse; dropped if the pool is full or closed.
    pub fn push(&self, t: T) {
        use std::sync::atomic::{Ordering, fence};
        if self.free.push(t).is_err() {
            return;
        }
        // Dekker with `close`: either this load sees `closed`, or `close`'s drain sees the push.
        fence(Ordering::SeqCst);
        if self.closed.load(Ordering::Relaxed) {
            while self.free.pop().is_some() {}
        }
    }

    /// Drop every idle state and refuse further ones.
    pub fn close(&self) {
        use std::sync::atomic::{Ordering, fence};
        self.closed.store(true, Ordering::Relaxed);
        fence(Ordering::SeqCst);
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
