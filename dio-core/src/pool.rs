//! The free list of request states of one [`DioCore`](crate::DioCore).
//!
//! A bounded, lock-free queue (crossbeam's `ArrayQueue`: no lock shared between the client
//! threads of a core, and no allocation after its creation), with a *hot stack* in front of
//! it: up to 32 atomic pointer-sized cells and a count of those in use; a push claims the next
//! cell (a compare-and-swap of the count) and fills it, a pop claims the top one and empties
//! it, with one atomic exchange each. A client with up to 32 requests in flight (submit them,
//! complete them, submit again) takes and returns every state through the stack, most recent
//! first, at about a quarter of the queue's instructions; the queue takes the overflow.
//! Under loom the pool is a loom mutex around a deque, so that the model checker sees the
//! hand-over of a state from the thread that returns it to the thread that reuses it.
//!
//! Each pooled state keeps a pointer to its pool (to return itself from whichever thread drops
//! the last reference), so the pool and its idle states form a cycle. [`close`](Pool::close),
//! called when the core is dropped, breaks it: it empties the queue, and a state returned
//! after that is dropped instead of queued.

/// Idle states kept in the hot stack in front of the queue (at most; fewer if the pool's
/// capacity is smaller).
#[cfg(not(loom))]
const HOT: usize = 32;

#[cfg(not(loom))]
pub(crate) struct Pool<T> {
    /// The most recently returned idle states, a stack of atomic cells (each one atomic word
    /// for a pointer-sized `T` such as an `Arc`): `top` counts the cells in use. A state moves
    /// in and out of a cell with one atomic exchange, so it is never in two places; a push and
    /// a pop racing on the same cell may find it still empty (the pop then takes from the
    /// queue) or already full (the push moves the older state to the queue): nothing is lost
    /// but a state the bounded queue has no room for, which is dropped.
    hot: Box<[crossbeam_utils::atomic::AtomicCell<Option<T>>]>,
    top: std::sync::atomic::AtomicUsize,
    free: crossbeam_queue::ArrayQueue<T>,
    closed: std::sync::atomic::AtomicBool,
}

#[cfg(not(loom))]
impl<T> Pool<T> {
    /// A pool holding at most `cap` (at least 1) idle states in its queue, plus up to
    /// `min(cap, 32)` in its hot stack.
    pub fn new(cap: usize) -> Self {
        let cap = cap.max(1);
        Pool {
            hot: (0..cap.min(HOT))
                .map(|_| crossbeam_utils::atomic::AtomicCell::new(None))
                .collect(),
            top: std::sync::atomic::AtomicUsize::new(0),
            free: crossbeam_queue::ArrayQueue::new(cap),
            closed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// An idle state, if any: the hot stack's top one, else one from the queue.
    #[inline(always)]
    pub fn pop(&self) -> Option<T> {
        use std::sync::atomic::Ordering::Relaxed;
        // `top` only picks the cell: the state itself is handed over by the cell's exchange
        // (acquire/release), so `Relaxed` suffices here.
        let mut t = self.top.load(Relaxed);
        while t > 0 {
            match self.top.compare_exchange_weak(t, t - 1, Relaxed, Relaxed) {
                Ok(_) => {
                    if let Some(s) = self.hot[t - 1].take() {
                        return Some(s);
                    }
                    // A racing push has claimed the cell but not filled it yet.
                    break;
                }
                Err(now) => t = now,
            }
        }
        self.free.pop()
    }

    /// Keep `t` for reuse (on the hot stack, else in the queue); dropped if the pool is full
    /// or closed.
    #[inline(always)]
    pub fn push(&self, t: T) {
        use std::sync::atomic::Ordering::{Relaxed, SeqCst};
        use std::sync::atomic::fence;
        let mut i = self.top.load(Relaxed);
        loop {
            if i >= self.hot.len() {
                // Full: `t` goes to the queue (dropped if that is full too: the pool only
                // bounds what it keeps).
                let _ = self.free.push(t);
                break;
            }
            match self.top.compare_exchange_weak(i, i + 1, Relaxed, Relaxed) {
                Ok(_) => {
                    if let Some(older) = self.hot[i].swap(Some(t)) {
                        // A racing pop gave up on this cell before it was filled.
                        let _ = self.free.push(older);
                    }
                    break;
                }
                Err(now) => i = now,
            }
        }
        // Dekker with `close`: either this load sees `closed`, or `close`'s drain sees the push.
        fence(SeqCst);
        if self.closed.load(Relaxed) {
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
        for c in self.hot.iter() {
            drop(c.take());
        }
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

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// The hot stack gives back the most recent state first, overflows into the queue, keeps no
    /// more than it has room for, and a closed pool keeps nothing.
    #[test]
    fn the_hot_stack_is_last_in_first_out_and_overflows_into_the_queue() {
        let p = Pool::new(40);
        assert_eq!(p.hot.len(), HOT);
        let items: Vec<Arc<usize>> = (0..HOT + 50).map(Arc::new).collect();
        for i in &items {
            p.push(Arc::clone(i));
        }
        // The stack holds the first `HOT`, the queue the next 40; the last 10 were dropped.
        assert_eq!(
            Arc::strong_count(&items[HOT + 49]),
            1,
            "beyond the queue: dropped"
        );
        let mut popped = vec![];
        while let Some(i) = p.pop() {
            popped.push(*i);
        }
        let want: Vec<usize> = (0..HOT).rev().chain(HOT..HOT + 40).collect();
        assert_eq!(popped, want);
        // Reused in place: push and pop alternate on the top cell.
        p.push(Arc::clone(&items[3]));
        assert_eq!(p.pop().as_deref(), Some(&3));
        assert!(p.pop().is_none());
        let small: Pool<Arc<usize>> = Pool::new(1);
        assert_eq!(small.hot.len(), 1);
        p.push(Arc::clone(&items[1]));
        p.push_cold(Arc::clone(&items[2]));
        p.close();
        assert!(p.pop().is_none(), "closed: drained");
        p.push(Arc::clone(&items[4]));
        assert!(p.pop().is_none(), "closed: refused");
        assert_eq!(Arc::strong_count(&items[1]), 1);
        assert_eq!(Arc::strong_count(&items[4]), 1);
    }

    /// Threads pushing and popping at once: every state is either in the pool or held by a
    /// thread, never in two places and never lost (the queue has room for all of them).
    #[test]
    fn concurrent_pushes_and_pops_lose_or_duplicate_nothing() {
        let p = Arc::new(Pool::new(64));
        let items: Vec<Arc<usize>> = (0..48).map(Arc::new).collect();
        for i in &items {
            p.push(Arc::clone(i));
        }
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let p = Arc::clone(&p);
                std::thread::spawn(move || {
                    for _ in 0..20_000 {
                        if let Some(s) = p.pop() {
                            p.push(s);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let mut seen = vec![];
        while let Some(i) = p.pop() {
            seen.push(*i);
        }
        // A cell filled after a racing pop gave up on it waits above the top for the next
        // push: take those too.
        seen.extend(p.hot.iter().filter_map(|c| c.take()).map(|i| *i));
        seen.sort_unstable();
        assert_eq!(seen, (0..48).collect::<Vec<_>>(), "each state exactly once");
        assert!(
            items.iter().all(|i| Arc::strong_count(i) == 1),
            "no copy left anywhere"
        );
    }
}
