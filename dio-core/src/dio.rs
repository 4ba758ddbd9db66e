//! The shared state of one request (`DioShared`), what the submitter publishes, and the final
//! completion. The reference counting itself is in [`crate::locked`] (the baseline, one lock)
//! or [`crate::atomic`] (the §3.13 variant); this module dispatches between them.

use crate::atomic::AtomicRefs;
use crate::completion::Completion;
use crate::error::{DeviceStatus, DioError, DioResult};
use crate::hooks::{Deferral, EndIo};
use crate::locked::LockedRefs;
use crate::request::Dir;
use crate::result::{self, Errors};
use crate::sync::Arc;

/// Which reference-counting implementation a [`DioCore`](crate::DioCore) uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum RefCounting {
    /// The baseline: refcount, waiter and first error under one lock (the `bio_lock`).
    #[default]
    Locked,
    /// §3.13: an atomic refcount, iomap's waiter protocol, a lock only on errors and at the
    /// hand-over of the payload.
    Atomic,
}

/// How the submitter waits for its own bios.
#[derive(Clone, Default)]
pub enum Wait {
    /// Sleep on the request's condition variable (or park); another thread polls the device.
    #[default]
    Park,
    /// Call `poll_once` between checks: completions may run on the submitter's stack.
    PollInPlace(std::sync::Arc<dyn crate::hooks::Poller>),
}

impl std::fmt::Debug for Wait {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Wait::Park => "Park",
            Wait::PollInPlace(_) => "PollInPlace",
        })
    }
}

/// What the submitter found while walking the request.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Walk {
    pub handled: u64,
    pub submit_err: Option<DioError>,
    pub deferred_err: Option<DioError>,
}

/// The buffer and the completion: taken only by the holder of the last reference.
pub(crate) struct Payload<B> {
    pub buf: B,
    pub completion: Completion<B>,
}

/// Everything the last-reference holder needs, taken in its final critical section.
pub(crate) struct Final<B> {
    pub walk: Walk,
    pub io_error: Option<DioError>,
    pub payload: Payload<B>,
}

pub(crate) enum Refs<B> {
    Locked(LockedRefs<B>),
    Atomic(AtomicRefs<B>),
}

/// One request, shared by the submitter and every bio.
pub(crate) struct DioShared<B> {
    pub dir: Dir,
    pub offset: u64,
    /// Snapshot at submit start; the EOF clamp never uses a live size.
    pub i_size: u64,
    pub end_io: Option<std::sync::Arc<dyn EndIo>>,
    pub deferral: Option<std::sync::Arc<dyn Deferral>>,
    refs: Refs<B>,
}

impl<B: Send + 'static> DioShared<B> {
    pub fn new(
        dir: Dir,
        offset: u64,
        i_size: u64,
        end_io: Option<std::sync::Arc<dyn EndIo>>,
        deferral: Option<std::sync::Arc<dyn Deferral>>,
        counting: RefCounting,
    ) -> Self {
        let refs = match counting {
            RefCounting::Locked => Refs::Locked(LockedRefs::new()),
            RefCounting::Atomic => Refs::Atomic(AtomicRefs::new()),
        };
        DioShared {
            dir,
            offset,
            i_size,
            end_io,
            deferral,
            refs,
        }
    }

    /// Take a reference for a bio about to be submitted (§3.4 step 5, before `submit`).
    /// Returns the bios that were in flight before it.
    pub fn get_ref(&self) -> u32 {
        match &self.refs {
            Refs::Locked(r) => r.get_ref(),
            Refs::Atomic(r) => r.get_ref(),
        }
    }

    /// Give back the reference of a rejected bio; returns the bios still in flight.
    pub fn undo_ref(&self) -> u32 {
        match &self.refs {
            Refs::Locked(r) => r.undo_ref(),
            Refs::Atomic(r) => r.undo_ref(),
        }
    }

    /// Throttle: wait until at most `in_flight` bios of this request are in flight.
    pub fn wait_in_flight(&self, in_flight: u32, wait: &Wait) {
        match &self.refs {
            Refs::Locked(r) => r.wait_refs(in_flight + 1, wait),
            Refs::Atomic(r) => r.wait_refs(in_flight + 1, wait),
        }
    }

    /// §3.4 steps 7–8: drain unless queued, then drop the submitter's reference. `Some` when
    /// the submitter held the last reference (it owns the request again); `None` means
    /// `Queued`, and `self` has been dropped: no further access (B8).
    pub fn submitter_done(
        this: Arc<Self>,
        queued: bool,
        walk: Walk,
        payload: Payload<B>,
        wait: &Wait,
    ) -> Option<(Arc<Self>, Final<B>)> {
        let fin = match &this.refs {
            Refs::Locked(r) => r.submitter_done(queued, walk, payload, wait),
            Refs::Atomic(r) => r.submitter_done(queued, walk, payload, wait),
        };
        // `None`: `this` is dropped here, at the end of the decrement's scope.
        fin.map(|f| (this, f))
    }

    /// §3.5 steps 2–4: drop a bio's reference; if it was the last one, complete the request.
    pub fn bio_done(this: Arc<Self>, status: Result<(), DeviceStatus>) {
        let err = status.err().map(DioError::Io);
        let fin = match &this.refs {
            Refs::Locked(r) => r.bio_done(err),
            Refs::Atomic(r) => r.bio_done(err),
        };
        // Not last: `this` (an Arc clone) is dropped here without any access (B1, B7).
        if let Some(fin) = fin {
            Self::complete_queued(this, fin);
        }
    }

    /// The only call site of the user completion inside dio-core: the last reference was a
    /// bio's, so the submitter returned `Queued`.
    fn complete_queued(dio: Arc<Self>, fin: Final<B>) {
        let deferral = dio.deferral.clone();
        let job = move || {
            let (res, payload) = dio.resolve(fin);
            payload.completion.complete(res, payload.buf);
        };
        match deferral {
            Some(d) => d.defer(Box::new(job)),
            None => job(),
        }
    }

    /// `dio_complete`: EOF clamp, end-io hook (only if bytes were handled), precedence.
    pub fn resolve(&self, fin: Final<B>) -> (DioResult, Payload<B>) {
        let Final {
            walk,
            io_error,
            payload,
        } = fin;
        let errs = Errors {
            submit: walk.submit_err,
            deferred: walk.deferred_err,
            io: io_error,
        };
        let transferred = result::transferred(self.dir, self.offset, self.i_size, walk.handled);
        let hook = match &self.end_io {
            Some(h) if walk.handled > 0 => h.end_io(self.offset, transferred, errs.first()).err(),
            _ => None,
        };
        (result::precedence(errs, hook, transferred), payload)
    }
}
