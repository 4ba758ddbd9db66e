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
