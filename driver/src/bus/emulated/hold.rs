//! A controller reset (CC.EN 1 to 0) or a shutdown notification (CC.SHN set) held back on its
//! way to the device, for tests of what the driver does between deciding to reset or shut down
//! and the device stopping.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// What becomes of the held write.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Verdict {
    /// Processed as usual: the controller resets (or shuts down).
    Release,
    /// Dropped: CC.EN stays 1 and CSTS.RDY stays 1 (or CSTS.SHST never reports the shutdown
    /// complete), as with a controller that never stops.
    Discard,
}

#[derive(Default)]
struct State {
    /// The write reached the device and waits.
    arrived: bool,
    verdict: Option<Verdict>,
}

#[derive(Default)]
pub(crate) struct Gate {
    state: Mutex<State>,
    cv: Condvar,
}

impl Gate {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// On the writing thread: waits for the verdict. True: process the write.
    pub(crate) fn pass(&self) -> bool {
        let mut s = self.lock();
        s.arrived = true;
        self.cv.notify_all();
        while s.verdict.is_none() {
            s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.verdict == Some(Verdict::Release)
    }

    fn decide(&self, v: Verdict) {
        let mut s = self.lock();
        s.verdict.get_or_insert(v);
        self.cv.notify_all();
    }
}

/// The next disable (a CC write clearing EN while it is set), held back by
/// [`EmulatedController::hold_next_disable`](super::EmulatedController::hold_next_disable), or
/// the next shutdown notification (a CC write setting SHN while it is clear), held back by
/// [`EmulatedController::hold_next_shutdown`](super::EmulatedController::hold_next_shutdown):
/// the writing thread waits inside its register write (before the device sees it, with no
/// device lock held) until [`release`](Self::release) or [`discard`](Self::discard). Dropping
/// the hold releases the write.
pub struct CcWriteHold {
    pub(crate) gate: Arc<Gate>,
}

impl CcWriteHold {
    /// Waits until the write has arrived (a thread is waiting in it), at most `limit`. True if
    /// it has.
    pub fn wait_held(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut s = self.gate.lock();
        while !s.arrived {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            s = self
                .gate
                .cv
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    /// Lets the write through: the controller resets (CSTS.RDY follows after the ready delay)
    /// or shuts down (CSTS.SHST complete).
    pub fn release(self) {
        self.gate.decide(Verdict::Release);
    }

    /// Drops the write: the controller stays enabled and ready (a shutdown never completes), as
    /// one that never stops would.
    pub fn discard(self) {
        self.gate.decide(Verdict::Discard);
    }
}

impl Drop for CcWriteHold {
    fn drop(&mut self) {
        self.gate.decide(Verdict::Release);
    }
}
