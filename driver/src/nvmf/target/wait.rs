//! Waiting without spinning: a poll group that found nothing to do sleeps in `poll(2)` on its
//! sockets, its listener and an eventfd that backend completions ring.
//!
//! The eventfd is written only while the group sleeps (a flag the group raises before it
//! checks its queues one last time and sleeps), so a busy group pays no system call per
//! completion. The only system calls of this module are here, each returning a `Result`.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

/// Wakes a sleeping poll group: backend completions ring it.
#[derive(Debug)]
pub struct Notifier {
    fd: OwnedFd,
    sleeping: AtomicBool,
}

impl Notifier {
    /// A new eventfd (non-blocking, close-on-exec).
    pub fn new() -> io::Result<Notifier> {
        // SAFETY: eventfd takes no pointers; the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Notifier {
            // SAFETY: `fd` is a fresh descriptor this process owns and nothing else holds.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            sleeping: AtomicBool::new(false),
        })
    }

    /// Rings the eventfd if the group sleeps (or is about to).
    pub fn notify(&self) {
        if self.sleeping.load(Ordering::SeqCst) {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a live u64 to our own eventfd. A failure (counter
            // overflow: the group is awake anyway) needs no handling.
            let _ = unsafe {
                libc::write(
                    self.fd.as_raw_fd(),
                    (&one as *const u64).cast(),
                    std::mem::size_of::<u64>(),
                )
            };
        }
    }

    /// Announces the group is going to sleep; the caller then re-checks its queues.
    pub(crate) fn sleeping(&self, on: bool) {
        self.sleeping.store(on, Ordering::SeqCst);
    }

    /// Resets the eventfd's counter.
    pub(crate) fn drain(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads at most 8 bytes into a live u64 from our own non-blocking eventfd;
        // EAGAIN (nothing to drain) is fine.
        let _ = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&mut v as *mut u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
    }

    pub(crate) fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
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
