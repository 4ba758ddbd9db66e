//! How an idle poller whose tasks wait on descriptors sleeps: in `poll(2)` on those
//! descriptors and on an eventfd of its own that submitters ring, instead of parking.
//!
//! A [`PollerTask`](crate::PollerTask) that waits for outside events (the sockets of an
//! NVMe/TCP poll group) fills a [`PollerWait`] before the poller sleeps: descriptors whose
//! readiness means the task has work, and a timeout for its timers (keep-alive, say). The
//! poller adds its [`WakeFd`] and sleeps in one `poll(2)` on all of them, so a bio handed over
//! by a client, a task change, shutdown, a socket that becomes readable and a timer all end the
//! same sleep: the poller costs no CPU while idle and no wake-up is lost (the poller's
//! `sleeping` handshake decides whether a submitter rings the eventfd; see the wake-up protocol
//! in the `poller` module). In interrupt mode ([`InterruptMode`]) a poller with requests on the
//! device sleeps the same way, with its queue pairs' completion eventfds added after arming
//! them ([`arm_queues`]). The only system calls of this module are here, each checked.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use crate::nvme::qpair::QueuePair;

/// Whether a poller with requests on the device sleeps until their completions (SPDK's
/// interrupt mode), set with [`Builder::interrupt_mode`](crate::Builder::interrupt_mode).
///
/// In the sleeping modes every queue pair of the pooled pollers is created in interrupt mode
/// (an MSI-X vector and eventfd each, see [`QueuePair::arm_interrupt`]). A poller that decides
/// to sleep arms its queue pairs and sleeps in one `poll(2)` on their completion eventfds, its
/// own wake-up eventfd (submitters, task changes) and its tasks' descriptors; a completion, a
/// new bio or a task's socket wakes it, and it polls again. Run to completion
/// ([`Builder::run_to_completion`](crate::Builder::run_to_completion)) always polls.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum InterruptMode {
    /// Always poll while requests are on the device (lowest latency, a core per poller).
    #[default]
    Polled,
    /// Sleep as soon as a round finds no completion and nothing else to do (least CPU; each
    /// I/O pays an interrupt and a wake-up).
    Interrupt,
    /// Poll while completions keep coming; sleep once a poller with requests on the device
    /// has found nothing for this long (polled mode's latency under load, interrupt mode's CPU
    /// when the device is slow or the load light).
    Adaptive(Duration),
}

impl InterruptMode {
    /// [`Adaptive`](Self::Adaptive) with the default quiet time: 20 µs without a completion.
    pub const ADAPTIVE: InterruptMode = InterruptMode::Adaptive(Duration::from_micros(20));

    /// True if queue pairs are created in interrupt mode.
    pub fn sleeps(self) -> bool {
        self != InterruptMode::Polled
    }
}

/// Arms every queue pair before a poller sleeps with requests on the device: adds each
/// interrupt-mode queue's completion eventfd to `wait`, with the queue's sleep limit (timeouts
/// and health checks keep running). False if the poller must not sleep: a queue found a
/// completion while arming, or a polled-mode queue has requests outstanding.
pub(crate) fn arm_queues<T>(qpairs: &mut [QueuePair<T>], wait: &mut PollerWait) -> bool {
    for q in qpairs.iter_mut() {
        if !q.interrupts() {
            if q.outstanding() > 0 {
                return false;
            }
            continue;
        }
        if !q.arm_interrupt() {
            return false;
        }
        if let Some(fd) = q.completion_fd() {
            wait.fd(fd, false);
        }
        if let Some(limit) = q.sleep_limit() {
            wait.timeout(limit);
        }
    }
    true
}

/// What a sleeping poller waits for on behalf of its tasks: descriptors and a timeout.
#[derive(Debug, Default)]
pub struct PollerWait {
    fds: Vec<libc::pollfd>,
    timeout: Option<Duration>,
}

impl PollerWait {
    /// Wake the poller when `fd` is readable (or hung up), and also when it is writable if
    /// `write`. The descriptor must stay open until the task's `end_wait`.
    pub fn fd(&mut self, fd: RawFd, write: bool) {
        self.fd_events(fd, true, write);
    }

    /// Wake the poller when `fd` is readable if `read`, writable if `write`, and hung up or
    /// in error in any case (a task that will not read now must not be woken by pending input).
    pub fn fd_events(&mut self, fd: RawFd, read: bool, write: bool) {
        self.fds.push(libc::pollfd {
            fd,
            events: if read { libc::POLLIN } else { 0 } | if write { libc::POLLOUT } else { 0 },
            revents: 0,
        });
    }

    /// Wake the poller after `d` at the latest (the shortest of the tasks' timeouts wins).
    pub fn timeout(&mut self, d: Duration) {
        self.timeout = Some(self.timeout.map_or(d, |t| t.min(d)));
    }

    /// Descriptors added so far.
    pub fn len(&self) -> usize {
        self.fds.len()
    }

    /// True with no descriptor.
    pub fn is_empty(&self) -> bool {
        self.fds.is_empty()
    }

    /// True if the last sleep found `fd` ready (readable, writable as asked, hung up or in
    /// error); false for a descriptor not waited on, and when no sleep happened (a task then
    /// looks itself, at the cost of a system call).
    pub fn ready(&self, fd: RawFd) -> bool {
        self.fds.iter().any(|p| p.fd == fd && p.revents != 0)
    }

    pub(crate) fn clear(&mut self) {
        self.fds.clear();
        self.timeout = None;
    }

    /// Sleeps in `poll(2)` until a descriptor is ready or the timeout passes (none: no limit).
    /// `EINTR` is a wake-up with nothing ready; an error (ENOMEM) is a short nap.
    pub(crate) fn sleep(&mut self) {
        let ms = match self.timeout {
            None => -1,
            // Round up: a timer due in 0.3 ms must not turn into a busy loop of 0 ms polls.
            Some(d) => d.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int,
        };
        // SAFETY: `fds` holds `fds.len()` initialised pollfd entries and outlives the call,
        // which writes only their `revents`.
        let n = unsafe { libc::poll(self.fds.as_mut_ptr(), self.fds.len() as libc::nfds_t, ms) };
        if n < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// The poller's own wake-up: an eventfd submitters ring while the poller sleeps in `poll(2)`.
#[derive(Debug)]
pub(crate) struct WakeFd {
    fd: OwnedFd,
}

impl WakeFd {
    /// A new eventfd (non-blocking, close-on-exec).
    pub(crate) fn new() -> io::Result<WakeFd> {
        // SAFETY: eventfd takes no pointers; the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(WakeFd {
            // SAFETY: `fd` is a fresh descriptor this process owns and nothing else holds.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Makes the eventfd readable (wakes a `poll(2)` on it).
    pub(crate) fn ring(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our own eventfd. A failure (the counter
        // would overflow: it is readable anyway) needs no handling.
        let _ = unsafe {
            libc::write(
                self.fd.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
    }

    /// Resets the counter (EAGAIN, nothing to reset, is fine).
    pub(crate) fn drain(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads at most 8 bytes into a live u64 from our own non-blocking eventfd.
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
