//! Interrupt vectors as eventfds: how a device tells a sleeping poller that a completion queue
//! has new entries.
//!
//! A queue pair created in interrupt mode asks its bus for one vector of its own
//! ([`Bus::interrupt`](super::Bus::interrupt)); the bus answers with an [`EventFd`] that becomes
//! readable each time the device signals that vector. The VFIO backend enables MSI-X and hands
//! the vector's eventfd to the kernel (`VFIO_DEVICE_SET_IRQS`), so the kernel writes it from the
//! interrupt handler; the emulated controller writes it itself after it posted a completion to a
//! completion queue created with IEN set. Vector 0 belongs to the admin queue and is never
//! handed out: the admin queue is polled.
//!
//! The eventfd is a level: it stays readable until someone clears it, so a signal that arrives
//! while the poller is busy is not lost, it only makes the next sleep return at once. The
//! poller clears it *before* its last look at the completion queue and sleeps only if that look
//! found nothing (see `QueuePair::arm_interrupt`).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use thiserror::Error;

/// Why a bus could not give an interrupt vector.
#[derive(Debug, Error)]
pub enum InterruptError {
    /// The bus has no interrupts.
    #[error("{location}: this bus delivers no interrupts; use polled mode")]
    Unsupported {
        /// The controller.
        location: String,
    },
    /// The vector does not exist.
    #[error(
        "{location}: interrupt vector {vector} does not exist (the device has {available} MSI-X \
         vectors, vector 0 is the admin queue's); create fewer interrupt-mode queue pairs"
    )]
    NoVector {
        /// The controller.
        location: String,
        /// The vector asked for.
        vector: u16,
        /// Vectors the device has.
        available: u16,
    },
    /// A system call failed.
    #[error("{location}: could not {step}: {source}")]
    Io {
        /// The controller.
        location: String,
        /// What was being done.
        step: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// An eventfd (non-blocking, close-on-exec) that one interrupt vector signals.
#[derive(Debug)]
pub struct EventFd {
    fd: OwnedFd,
}

impl EventFd {
    /// A new eventfd with a zero counter.
    pub fn new() -> io::Result<EventFd> {
        // SAFETY: eventfd takes no pointers; the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(EventFd {
            // SAFETY: `fd` is a fresh descriptor this process owns and nothing else holds.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Makes the eventfd readable (what an interrupt does).
    pub fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our own eventfd. The only failure, a counter
        // that would overflow, leaves it readable, which is all a signal means.
        let _ = unsafe {
            libc::write(
                self.fd.as_raw_fd(),
                (&one as *const u64).cast(),
                size_of::<u64>(),
            )
        };
    }

    /// Resets the counter; returns true if the eventfd had been signalled since the last clear.
    pub fn clear(&self) -> bool {
        let mut v: u64 = 0;
        // SAFETY: reads at most 8 bytes into a live u64 from our own non-blocking eventfd;
        // EAGAIN (nothing signalled) returns -1 and leaves `v` alone.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&mut v as *mut u64).cast(),
                size_of::<u64>(),
            )
        };
        n == size_of::<u64>() as isize && v != 0
    }

    /// The descriptor, for `poll(2)`/`epoll`.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
