//! Waiting without spinning: a poll group that found nothing to do sleeps in `poll(2)` on its
//! sockets, its listener and an eventfd that backend completions ring.
//!
//! The eventfd is written only while the group sleeps (a flag the group raises before it
//! checks its queues one last time and sleeps), so a busy group pays no system call per
//! completion. The only system calls of this module are here, each returning a `Result`.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::embed::sleep::WakeFd;

/// Wakes a sleeping poll group: backend completions ring it. The eventfd is the pollers' own
/// [`WakeFd`]; this adds the "sleeping" flag that keeps a busy group free of system calls.
#[derive(Debug)]
pub struct Notifier {
    fd: WakeFd,
    sleeping: AtomicBool,
}

impl Notifier {
    /// A new eventfd (non-blocking, close-on-exec).
    pub fn new() -> io::Result<Notifier> {
        Ok(Notifier {
            fd: WakeFd::new()?,
            sleeping: AtomicBool::new(false),
        })
    }

    /// Rings the eventfd if the group sleeps (or is about to).
    pub fn notify(&self) {
        if self.sleeping.load(Ordering::SeqCst) {
            self.fd.ring();
        }
    }

    /// Announces the group is going to sleep; the caller then re-checks its queues.
    pub(crate) fn sleeping(&self, on: bool) {
        self.sleeping.store(on, Ordering::SeqCst);
    }

    /// Resets the eventfd's counter.
    pub(crate) fn drain(&self) {
        self.fd.drain();
    }

    pub(crate) fn raw_fd(&self) -> RawFd {
        self.fd.raw_fd()
    }
}

/// One descriptor to wait on.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Interest {
    /// The descriptor.
    pub fd: RawFd,
    /// Wait for it to be readable (false while the connection will not read).
    pub read: bool,
    /// Wait for it to be writable.
    pub write: bool,
}
