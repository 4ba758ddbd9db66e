//! The loom switch: every synchronisation primitive the crate uses comes from here, so that
//! `RUSTFLAGS="--cfg loom"` puts the whole crate under the model checker.
//!
//! Public but hidden: the test doubles in `tests/` use the same types so that loom sees them.

#[cfg(loom)]
pub use loom::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
#[cfg(loom)]
pub use loom::sync::{Arc, Condvar, Mutex, MutexGuard};

#[cfg(not(loom))]
pub use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
#[cfg(not(loom))]
pub use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// Threads, parking and yielding (loom or std).
pub mod thread {
    #[cfg(loom)]
    pub use loom::thread::{JoinHandle, Thread, current, park, spawn, yield_now};
    #[cfg(not(loom))]
    pub use std::thread::{JoinHandle, Thread, current, park, spawn, yield_now};
}

/// The per-request lock (the `bio_lock` of module `locked`, the `slots` of module `atomic`) and
/// its condition variable: `parking_lot`'s outside loom (no poison bookkeeping, and the
/// uncontended lock and unlock are inline), loom's under it, so that loom still models every
/// acquisition. Only through [`bio_lock::lock`], [`bio_lock::get_mut`] and [`bio_lock::wait`],
/// which have the same meaning in both builds.
pub(crate) mod bio_lock {
    #[cfg(loom)]
    pub(crate) use loom::sync::{Condvar, Mutex, MutexGuard as Guard};
    #[cfg(not(loom))]
    pub(crate) use parking_lot::{Condvar, Mutex, MutexGuard as Guard};

    /// Lock (a panic while holding the lock is already a reported invariant failure: loom's
    /// poisoning is ignored, `parking_lot` has none).
    #[inline(always)]
    pub(crate) fn lock<T>(m: &Mutex<T>) -> Guard<'_, T> {
        #[cfg(loom)]
        return super::lock(m);
        #[cfg(not(loom))]
        m.lock()
    }

    /// The state through `&mut` (nobody else can reach it): no lock.
    #[inline(always)]
    pub(crate) fn get_mut<T>(m: &mut Mutex<T>) -> &mut T {
        #[cfg(loom)]
        return match m.get_mut() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        #[cfg(not(loom))]
        m.get_mut()
    }

    /// Release the lock, sleep until notified (or spuriously), lock again.
    pub(crate) fn wait<'a, T>(cv: &Condvar, g: Guard<'a, T>) -> Guard<'a, T> {
        #[cfg(loom)]
        return match cv.wait(g) {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        #[cfg(not(loom))]
        {
            let mut g = g;
            cv.wait(&mut g);
            g
        }
    }
}

/// Lock a mutex, ignoring poisoning: a panic while holding a dio-core lock is already a failed
/// invariant that has been reported.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// [`lock`] for a std mutex (the same under loom: the user slot, which loom need not model,
/// its accesses being ordered by the request's reference count).
pub(crate) fn lock_std<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// Internal invariant check, active in debug builds and under loom (loom tests run with
/// `--release`, where `debug_assert!` would be compiled out).
macro_rules! invariant {
    ($cond:expr, $($msg:tt)+) => {
        if cfg!(any(loom, debug_assertions)) {
            assert!($cond, $($msg)+);
        }
    };
}
pub(crate) use invariant;
