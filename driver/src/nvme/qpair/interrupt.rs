//! Interrupt mode: how the owner of a queue pair sleeps until the device posts a completion.
//!
//! A queue pair created with [`QueueOptions::interrupts`](super::QueueOptions::interrupts) has
//! its CQ created with IEN = 1 on an MSI-X vector of its own (its queue id; vector 0 stays the
//! admin queue's), whose eventfd ([`QueuePair::completion_fd`]) becomes readable each time the
//! device posts a completion. Nothing changes on the I/O path: `poll` reads the CQ as in polled
//! mode and never touches the eventfd, so a busy queue costs no system call.
//!
//! **Sleeping without losing a wake-up.** The owner calls [`QueuePair::arm_interrupt`] when it
//! wants to sleep. It rings commands not yet on the device, writes the CQ head doorbell if
//! entries were consumed since it was last written, clears the eventfd, and *then* looks
//! at the CQ once more: a completion posted before the clear is found by that look, one posted
//! after it signals the eventfd again. So if `arm_interrupt` returns true, sleeping in
//! `poll(2)`/`epoll` on the descriptor ends as soon as there is a completion; if it returns
//! false the owner polls instead. The eventfd is readable from the device's signal until the
//! next arm, so signals that arrive while the owner is polling only cost one spurious return.
//!
//! **How long to sleep.** Timeouts and health checks run inside `poll`; a sleep that could
//! last forever would stop them. [`QueuePair::sleep_limit`] says how long the owner may sleep:
//! 10 ms while commands are on the device (the health check interval), without limit when
//! nothing is.
//! [`QueuePair::wait_interrupt`] does the whole dance for an owner with nothing else to wait on.
//!
//! **Edge-triggered owners.** An owner that waits with `epoll` and `EPOLLET` (the descriptor
//! registered once) needs no clear: every signal queues an edge, so
//! [`QueuePair::arm_interrupt_edge`] only looks at the CQ, and a sleep costs one system call
//! (`epoll_wait`) instead of two (the eventfd read of the arm, then `poll`).

use core::sync::atomic::{Ordering, fence};
use std::os::fd::RawFd;
use std::time::Duration;

use super::{HEALTH_INTERVAL, NIL, QueuePair};

impl<T> QueuePair<T> {
    /// True if the queue pair was created in interrupt mode.
    pub fn interrupts(&self) -> bool {
        self.irq.is_some()
    }

    /// Interrupt mode: a descriptor (an eventfd) that becomes readable after the device posted
    /// a completion to this queue pair's CQ; `None` in polled mode. Wait on it for reading with
    /// `poll(2)` or `epoll` after [`arm_interrupt`](Self::arm_interrupt) returned true. It stays
    /// open as long as the queue pair (and the controller's bus) lives; do not read or close it.
    pub fn completion_fd(&self) -> Option<RawFd> {
        self.irq.as_ref().map(|f| f.raw_fd())
    }

    /// Interrupt mode: prepares to sleep on [`completion_fd`](Self::completion_fd). Rings
    /// commands not yet on the device and the CQ head, clears the eventfd, and looks at the CQ
    /// again; returns
    /// true if sleeping is safe (nothing to deliver and no completion posted: the next one will
    /// make the descriptor readable), false if the owner must [`poll`](Self::poll) first. Also
    /// false in polled mode and on a dead queue pair (whose `poll` reports why).
    pub fn arm_interrupt(&mut self) -> bool {
        self.arm(true)
    }

    /// Interrupt mode, for an owner that sleeps edge-triggered: `epoll` with the descriptor
    /// registered once with `EPOLLIN | EPOLLET`. As [`arm_interrupt`](Self::arm_interrupt)
    /// without clearing the eventfd, so arming makes no system call: each signal of the device
    /// queues an edge that the next `epoll_wait` returns, so a completion posted after this
    /// look wakes the sleep, and one posted before it (already seen by this look or an earlier
    /// poll) at worst ends the next sleep at once. Never use it with a level-triggered wait
    /// (`poll(2)`, plain `epoll`): the eventfd stays readable and such a wait never sleeps.
    pub fn arm_interrupt_edge(&mut self) -> bool {
        self.arm(false)
    }

    fn arm(&mut self, clear: bool) -> bool {
        if self.irq.is_none() {
            return false;
        }
        if self.unrung != 0 && !self.died {
            self.ring_sq();
        }
        // Sleeping: the device gets back every consumed entry first (the CQ head doorbell is
        // otherwise written only every few polls).
        if self.cq_unrung() != 0 && !self.died {
            self.ring_cq();
        }
        if self.done_head != NIL || self.died || self.dead.is_some() || self.protocol.is_some() {
            return false;
        }
        if clear {
            if let Some(irq) = &self.irq {
                irq.clear();
            }
        }
        // The clear (a system call on the eventfd the device signals after posting), or the
        // edge-triggered registration, comes before this look at the CQ; the phase tag is read
        // with an acquire load.
        fence(Ordering::SeqCst);
        if self.ring.cq_cursor().peek().is_some() {
            return false;
        }
        self.stats.interrupt_arms += 1;
        true
    }

    /// How long the owner may sleep after [`arm_interrupt`](Self::arm_interrupt) returned true
    /// before it must [`poll`](Self::poll) again so that timeouts and health checks run: 10 ms
    /// while commands are on the device or quarantined, `None` (no limit) when none is.
    pub fn sleep_limit(&self) -> Option<Duration> {
        if self.inflight != 0 || self.quarantined != 0 {
            Some(HEALTH_INTERVAL)
        } else {
            None
        }
    }

    /// Interrupt mode: arms and, if that allows, sleeps in `poll(2)` on the completion fd until
    /// the device posts a completion or [`sleep_limit`](Self::sleep_limit) passes (with nothing
    /// on the device it returns at once instead of sleeping forever). Returns true if it slept.
    /// Call [`poll`](Self::poll) afterwards. In polled mode it returns false at once.
    pub fn wait_interrupt(&mut self) -> bool {
        let Some(limit) = self.sleep_limit() else {
            return false;
        };
        if !self.arm_interrupt() {
            return false;
        }
        let Some(fd) = self.completion_fd() else {
            return false;
        };
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = limit.as_millis().min(i32::MAX as u128) as libc::c_int;
        // SAFETY: `p` is one initialised pollfd that outlives the call, which writes only its
        // `revents`. EINTR or an error is a wake-up like any other: the caller polls the CQ.
        unsafe { libc::poll(&mut p, 1, ms) };
        true
    }
}

#[cfg(all(test, feature = "emulated"))]
mod tests {
    use std::sync::Arc;

    use super::super::QueueOptions;
    use super::*;
    use crate::bus::emulated::{EmulatedConfig, EmulatedController, Mode, NamespaceConfig};
    use crate::nvme::controller::Controller;
    use crate::types::Lba;

    fn setup(mode: Mode, interrupts: bool) -> (Controller, QueuePair<u64>) {
        let emu = EmulatedController::new(EmulatedConfig {
            mode,
            namespaces: vec![NamespaceConfig::memory(512, 1 << 16)],
            ..EmulatedConfig::default()
        })
        .unwrap();
        let c = Controller::new(emu as Arc<_>).unwrap();
        let q = c
            .create_qpair::<u64>(QueueOptions::default().with_interrupts(interrupts))
            .unwrap();
        (c, q)
    }

    fn readable(fd: RawFd) -> bool {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: as above; a zero timeout only looks.
        unsafe { libc::poll(&mut p, 1, 0) == 1 }
    }

    #[test]
    fn parks_after_every_request_and_never_loses_a_wakeup() {
        let _w = test_watchdog::arm(test_watchdog::UNIT);
        let (c, mut q) = setup(Mode::Threaded, true);
        let ns = c.namespaces().remove(0);
        let buf = c.alloc(8 * 512).unwrap();
        let fd = q.completion_fd().expect("interrupt mode");
        let mut seen = vec![0u8; 4 * 400];
        let mut tag = 0u64;
        let mut parks = 0u64;
        for depth in [1usize, 4] {
            for _ in 0..200 {
                let first = tag;
                for k in 0..depth {
                    let s = buf.slice(k * 512, 512).unwrap();
                    // SAFETY: `buf` outlives the requests; each has its own sector, and the
                    // data read is never looked at.
                    unsafe { q.read_raw(&ns, Lba(tag % 1000), s, tag) }.unwrap();
                    tag += 1;
                }
                let mut got = 0;
                while got < depth {
                    got += q
                        .poll(64, |t, r| {
                            r.unwrap();
                            seen[t as usize] += 1;
                        })
                        .unwrap();
                    // Park whenever the queue allows it, after every request.
                    if got < depth && q.arm_interrupt() {
                        assert!(q.sleep_limit().is_some(), "commands are on the device");
                        parks += 1;
                        super::super::tests::sleep_on(fd);
                    }
                }
                assert!((first..tag).all(|t| seen[t as usize] == 1));
            }
        }
        assert!(
            seen[..tag as usize].iter().all(|&n| n == 1),
            "each exactly once"
        );
        assert!(parks > 0, "the threaded device never let the queue park");
        assert_eq!(q.stats().interrupt_arms, parks);
        assert_eq!(q.in_flight(), 0);
        assert_eq!(q.sleep_limit(), None);
    }

    #[test]
    fn arm_refuses_while_a_completion_waits() {
        let _w = test_watchdog::arm(test_watchdog::UNIT);
        let (c, mut q) = setup(Mode::Inline, true);
        let ns = c.namespaces().remove(0);
        let buf = c.alloc(1024).unwrap();
        let (a, b) = (buf.slice(0, 512).unwrap(), buf.slice(512, 512).unwrap());
        let fd = q.completion_fd().unwrap();
        assert!(q.interrupts());
        assert!(q.arm_interrupt(), "nothing posted");
        assert!(!readable(fd));
        assert!(!q.wait_interrupt(), "nothing on the device: no sleep");
        // SAFETY: `buf` outlives the requests, one half each.
        unsafe { q.read_raw(&ns, Lba(0), a, 7) }.unwrap();
        // The inline device completes inside the doorbell write and signals the vector.
        q.ring();
        assert!(readable(fd));
        // Arming clears the eventfd, finds the entry: sleeping is not safe.
        assert!(!q.arm_interrupt());
        // Arming rings commands not yet on the device first.
        // SAFETY: as above.
        unsafe { q.read_raw(&ns, Lba(1), b, 8) }.unwrap();
        assert!(!q.arm_interrupt());
        let mut got = Vec::new();
        q.poll(8, |t, r| {
            r.unwrap();
            got.push(t)
        })
        .unwrap();
        assert_eq!(got, vec![7, 8]);
        assert!(q.arm_interrupt());
        assert!(!readable(fd), "arming cleared it");
        assert_eq!(q.stats().interrupt_arms, 2);
    }

    #[test]
    fn polled_queues_have_no_descriptor() {
        let _w = test_watchdog::arm(test_watchdog::UNIT);
        let (_c, mut q) = setup(Mode::Inline, false);
        assert!(!q.interrupts());
        assert_eq!(q.completion_fd(), None);
        assert!(!q.arm_interrupt());
        assert!(!q.wait_interrupt());
    }

    #[test]
    fn edge_triggered_parking_after_every_request_loses_no_wakeup() {
        let _w = test_watchdog::arm(test_watchdog::UNIT);
        let (c, mut q) = setup(Mode::Threaded, true);
        let ns = c.namespaces().remove(0);
        let buf = c.alloc(512).unwrap();
        let fd = q.completion_fd().unwrap();
        // SAFETY: epoll_create1 takes no pointers; checked below.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        assert!(ep >= 0);
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLET) as u32,
            u64: 0,
        };
        // SAFETY: `ep` and `fd` are open descriptors; `ev` is a valid event for the call.
        let r = unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) };
        assert_eq!(r, 0);
        let mut parks = 0u64;
        for i in 0..300u64 {
            // SAFETY: `buf` outlives the request, one at a time.
            unsafe { q.read_raw(&ns, Lba(i), buf.as_dma_slice(), i) }.unwrap();
            let mut got = 0;
            while got == 0 {
                got = q
                    .poll(8, |t, r| {
                        r.unwrap();
                        assert_eq!(t, i);
                    })
                    .unwrap();
                if got == 0 && q.arm_interrupt_edge() {
                    parks += 1;
                    let mut out = libc::epoll_event { events: 0, u64: 0 };
                    // SAFETY: one writable event; no timeout: a lost wake-up hangs and the
                    // watchdog fails the test.
                    let n = unsafe { libc::epoll_wait(ep, &mut out, 1, -1) };
                    assert_eq!(n, 1);
                }
            }
        }
        assert!(parks > 0);
        assert_eq!(q.stats().interrupt_arms, parks);
        // SAFETY: our own epoll descriptor, closed once.
        unsafe { libc::close(ep) };
    }

    #[test]
    fn a_queue_marked_dead_does_not_arm_its_interrupt() {
        let _w = test_watchdog::arm(test_watchdog::UNIT);
        let (_c, mut q) = setup(Mode::Inline, true);
        assert!(q.arm_interrupt(), "an idle live queue arms");
        // As renew does: dead, failed by the next poll, which a sleep must not delay.
        q.dead = Some(crate::nvme::error::DeadReason::ControllerReset);
        q.countdown = 0;
        assert!(!q.arm_interrupt());
        assert!(!q.arm_interrupt_edge());
    }
}
