//! The shared state of one request (`DioShared`), what the submitter publishes, and the final
//! completion. The reference counting itself is in [`crate::locked`] (the baseline, one lock)
//! or [`crate::atomic`] (the §3.13 variant); this module dispatches between them.

use crate::atomic::AtomicRefs;
use crate::completion::Completion;
use crate::error::{DeviceStatus, DioError, DioResult};
use crate::hooks::{Deferral, EndIo};
use crate::locked::LockedRefs;
use crate::pool::Pool;
use crate::request::Dir;
use crate::result::{self, Errors};
use crate::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU64};

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
    /// Bios the device accepted.
    pub bios: u32,
    pub submit_err: Option<DioError>,
    pub deferred_err: Option<DioError>,
    /// The reference of the request's first bio, taken with the state's exclusive access when
    /// the request started ([`DioShared::start_request`]) and not yet used by a bio: the next
    /// bio takes it over instead of taking one; a walk that submitted none gives it back.
    pub first_ref: bool,
}

/// The buffer and the completion: taken only by the holder of the last reference.
pub(crate) struct Payload<B> {
    pub buf: B,
    pub completion: Completion<B>,
}

/// Everything the last-reference holder of a queued request needs, taken in its final
/// critical section. (A queued request has no submission error: `handled` is its walk.)
pub(crate) struct Final<B> {
    pub handled: u64,
    pub io_error: Option<DioError>,
    pub payload: Payload<B>,
}

pub(crate) enum Refs<B> {
    Locked(LockedRefs<B>),
    Atomic(AtomicRefs<B>),
}

/// The upper layer's per-request slot in a pooled request state: whatever it keeps there
/// (typically a box of its own request context) stays with the state from one request to the
/// next, so that the upper layer needs no pool of its own (see
/// [`DioCore::reserve`](crate::DioCore::reserve)). dio-core never looks inside.
pub type Slot = Option<Box<dyn std::any::Any + Send>>;

/// A request's parameters (set when it starts, read by its bios and its completer). Atomics
/// only so that they can be set through `&self` on a reserved state ([`DioShared::set_request`]),
/// relaxed, and std's even under loom (like the slot): every access is ordered by the
/// request's reference count (its lock, or the bio hand-over), which loom does model.
struct Params {
    write: AtomicBool,
    offset: AtomicU64,
    /// Snapshot at submit start; the EOF clamp never uses a live size.
    i_size: AtomicU64,
}

/// The free list of a core's request states.
pub(crate) type StatePool<B> = Pool<Arc<DioShared<B>>>;

/// What a deferred job finishes: a queued request whose last reference was a bio's (resolve,
/// then complete), or a result the upper layer already has (complete only).
#[cfg_attr(loom, allow(dead_code))]
pub(crate) enum Handoff<B> {
    Resolve(Final<B>),
    Ready(DioResult, Payload<B>),
}

/// One request, shared by the submitter and every bio.
///
/// Pooled: a core reuses its request states (module `pool`). The per-core fields (`end_io`,
/// `deferral`, `pool`) are set when a state is allocated; the per-request ones are set again by
/// [`reuse`](Self::reuse), which needs `&mut` and so the only `Arc`: a state is never
/// reinitialised while anyone else can still reach it. (A reserved state, reinitialised when
/// it was reserved, has its request's parameters set at submission through `&self`, while it
/// is still the only `Arc`: [`set_request`](Self::set_request).)
pub(crate) struct DioShared<B> {
    /// The request's direction, offset and size snapshot.
    params: Params,
    pub end_io: Option<std::sync::Arc<dyn EndIo>>,
    pub deferral: Option<std::sync::Arc<dyn Deferral>>,
    /// The pool this state returns to once its request is over.
    pub(crate) pool: std::sync::Arc<StatePool<B>>,
    refs: Refs<B>,
    /// The upper layer's slot: taken by [`DioCore::reserve`](crate::DioCore::reserve),
    /// lent to a slotted completion by whoever finishes the request. A mutex only for the
    /// rare case where the finisher is not yet the only `Arc` holder (the submitter drops its
    /// clone just after its final decrement); otherwise reached through `Arc::get_mut`.
    slot: std::sync::Mutex<Slot>,
    /// A deferred job's input (empty otherwise). Under loom the job is a closure instead.
    #[cfg(not(loom))]
    handoff: std::sync::Mutex<Option<Handoff<B>>>,
}

impl<B: Send + 'static> DioShared<B> {
    pub fn new(
        end_io: Option<std::sync::Arc<dyn EndIo>>,
        deferral: Option<std::sync::Arc<dyn Deferral>>,
        pool: std::sync::Arc<StatePool<B>>,
        counting: RefCounting,
    ) -> Self {
        let refs = match counting {
            RefCounting::Locked => Refs::Locked(LockedRefs::new()),
            RefCounting::Atomic => Refs::Atomic(AtomicRefs::new()),
        };
        DioShared {
            params: Params {
                write: AtomicBool::new(false),
                offset: AtomicU64::new(0),
                i_size: AtomicU64::new(0),
            },
            end_io,
            deferral,
            pool,
            refs,
            slot: std::sync::Mutex::new(None),
            #[cfg(not(loom))]
            handoff: std::sync::Mutex::new(None),
        }
    }

    /// Start a request on this (fresh or recycled) state: the submitter's reference only,
    /// nothing published, no error, not released. Inlined: once per request, a handful of
    /// stores.
    #[inline(always)]
    pub fn reuse(&mut self, dir: Dir, offset: u64, i_size: u64) {
        self.set_request(dir, offset, i_size);
        match &mut self.refs {
            Refs::Locked(r) => r.reuse(),
            Refs::Atomic(r) => r.reuse(),
        }
    }

    /// [`reuse`](Self::reuse), then, if `first_ref`, the reference of the request's first bio,
    /// through the same exclusive access (no lock: nobody else can observe the count before
    /// that bio is handed over). The caller either hands it to its first bio or gives it back
    /// with [`undo_ref`](Self::undo_ref) (`Walk::first_ref`).
    #[inline(always)]
    pub fn start_request(&mut self, dir: Dir, offset: u64, i_size: u64, first_ref: bool) {
        self.reuse(dir, offset, i_size);
        if first_ref {
            match &mut self.refs {
                Refs::Locked(r) => r.get_ref_exclusive(),
                Refs::Atomic(r) => r.get_ref(),
            };
        }
    }

    /// Set the request's parameters, on a state nobody else can reach yet (a reserved one,
    /// about to be submitted): the stores are published to the bios and the completer by the
    /// bio hand-over and the reference count's lock, like everything else the submitter set.
    #[inline(always)]
    pub fn set_request(&self, dir: Dir, offset: u64, i_size: u64) {
        self.params.write.store(dir == Dir::Write, Relaxed);
        self.params.offset.store(offset, Relaxed);
        self.params.i_size.store(i_size, Relaxed);
    }

    /// The request's direction.
    #[inline(always)]
    pub fn dir(&self) -> Dir {
        match self.params.write.load(Relaxed) {
            true => Dir::Write,
            false => Dir::Read,
        }
    }

    /// Take the upper layer's slot (`&mut`: the state is not shared).
    #[inline(always)]
    pub fn take_slot(&mut self) -> Slot {
        match self.slot.get_mut() {
            Ok(s) => s.take(),
            Err(p) => p.into_inner().take(),
        }
    }

    /// Set the upper layer's slot (`&mut`: the state is not shared).
    pub fn put_slot(&mut self, slot: Slot) {
        match self.slot.get_mut() {
            Ok(s) => *s = slot,
            Err(p) => *p.into_inner() = slot,
        }
    }

    /// Give the state back to its pool, to be reused once nobody else holds it (a completer
    /// that dropped its reference count but not yet its `Arc` may still hold it for a moment:
    /// [`DioCore`](crate::DioCore) reuses a state only through `Arc::get_mut`).
    pub fn recycle(this: Arc<Self>, pool: &StatePool<B>) {
        pool.push(this);
    }

    /// Take a reference for a bio about to be submitted (§3.4 step 5, before `submit`).
    /// Returns the bios that were in flight before it.
    ///
    /// When the submitter holds the only `Arc` (every bio it submitted has completed and
    /// dropped its clone), the count is changed through `&mut`, without the lock: nobody else
    /// can observe it. Otherwise it takes the lock. (A request's first bio does not come here:
    /// its reference was taken by [`start_request`](Self::start_request).)
    #[inline(always)]
    pub fn get_ref(this: &mut Arc<Self>) -> u32 {
        match Arc::get_mut(this) {
            Some(d) => match &mut d.refs {
                Refs::Locked(r) => r.get_ref_exclusive(),
                Refs::Atomic(r) => r.get_ref(),
            },
            None => match &this.refs {
                Refs::Locked(r) => r.get_ref(),
                Refs::Atomic(r) => r.get_ref(),
            },
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

    /// §3.4 steps 7–8 for a request that is not queued: drain, then drop the submitter's
    /// reference, which is then the last one: the submitter owns the request again. Returns
    /// the first device error. `bios`: how many bios the device accepted (none: nothing to
    /// wait for).
    #[inline(always)]
    pub fn submitter_wait(&self, wait: &Wait, bios: u32) -> Option<DioError> {
        match &self.refs {
            Refs::Locked(r) => r.submitter_wait(wait, bios),
            Refs::Atomic(r) => r.submitter_wait(wait, bios),
        }
    }

    /// §3.4 step 8 for a queued request: publish the walk and the payload, then drop the
    /// submitter's reference. `Some` when the submitter held the last reference after all
    /// (it owns the request again); `None` means `Queued`, and `self` has been dropped: no
    /// further access (B8).
    #[inline(always)]
    pub fn submitter_queue(
        this: Arc<Self>,
        handled: u64,
        payload: Payload<B>,
    ) -> Option<(Arc<Self>, Final<B>)> {
        let fin = match &this.refs {
            Refs::Locked(r) => r.submitter_queue(handled, payload),
            Refs::Atomic(r) => r.submitter_queue(handled, payload),
        };
        // `None`: `this` is dropped here, at the end of the decrement's scope.
        fin.map(|f| (this, f))
    }

    /// §3.5 steps 2–4: drop a bio's reference; if it was the last one, complete the request.
    #[inline(always)]
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
    #[inline(always)]
    fn complete_queued(dio: Arc<Self>, fin: Final<B>) {
        match dio.deferral.clone() {
            Some(d) => d.defer_completion(Deferred::new(dio, Handoff::Resolve(fin))),
            None => {
                // Taken apart here, not through a `Handoff`: every aggregate the payload
                // passes through on its way to the callback is one more copy of it.
                let Final {
                    handled,
                    io_error,
                    payload: Payload { buf, completion },
                } = fin;
                let res = dio.resolve_queued(handled, io_error);
                Self::complete(dio, res, buf, completion);
            }
        }
    }

    /// Resolve if needed, recycle the state, then run the completion (see
    /// [`complete`](Self::complete)).
    #[inline(always)]
    pub(crate) fn finish(dio: Arc<Self>, h: Handoff<B>) {
        match h {
            Handoff::Resolve(Final {
                handled,
                io_error,
                payload: Payload { buf, completion },
            }) => {
                let res = dio.resolve_queued(handled, io_error);
                Self::complete(dio, res, buf, completion);
            }
            Handoff::Ready(res, Payload { buf, completion }) => {
                Self::complete(dio, res, buf, completion)
            }
        }
    }

    /// [`resolve`](Self::resolve) for a queued request: no submission or deferred error,
    /// `handled` is its walk.
    #[inline(always)]
    fn resolve_queued(&self, handled: u64, io_error: Option<DioError>) -> DioResult {
        let walk = Walk {
            handled,
            ..Walk::default()
        };
        self.resolve(&walk, io_error)
    }

    /// Recycle the state, then run the completion (after the recycling, so that a completion
    /// that submits again finds the state in the pool). A slotted completion runs before the
    /// recycling instead, lent the state's slot.
    #[inline(always)]
    fn complete(mut dio: Arc<Self>, res: DioResult, buf: B, mut completion: Completion<B>) {
        if let Some(f) = completion.take_slotted() {
            match Arc::get_mut(&mut dio) {
                Some(d) => {
                    let slot = match d.slot.get_mut() {
                        Ok(s) => s,
                        Err(p) => p.into_inner(),
                    };
                    f(res, buf, Some(slot));
                }
                // The submitter has not dropped its clone yet (it is about to): nobody else
                // uses the slot, the lock is uncontended. The slot is moved out and back, so
                // that the user's completion never runs under a dio-core lock (rule L3).
                None => {
                    let mut slot = std::mem::take(&mut *crate::sync::lock_std(&dio.slot));
                    f(res, buf, Some(&mut slot));
                    *crate::sync::lock_std(&dio.slot) = slot;
                }
            }
            let pool = std::sync::Arc::clone(&dio.pool);
            Self::recycle(dio, &pool);
            return;
        }
        let pool = std::sync::Arc::clone(&dio.pool);
        Self::recycle(dio, &pool);
        drop(pool);
        completion.complete(res, buf);
    }

    /// `dio_complete`: EOF clamp, end-io hook (only if bytes were handled), precedence.
    #[inline(always)]
    pub fn resolve(&self, walk: &Walk, io_error: Option<DioError>) -> DioResult {
        let offset = self.params.offset.load(Relaxed);
        let i_size = self.params.i_size.load(Relaxed);
        let transferred = result::transferred(self.dir(), offset, i_size, walk.handled);
        if self.end_io.is_none()
            && walk.submit_err.is_none()
            && walk.deferred_err.is_none()
            && io_error.is_none()
        {
            // The common case: no hook, no error (the precedence below would give the same).
            return Ok(transferred);
        }
        let errs = Errors {
            submit: walk.submit_err,
            deferred: walk.deferred_err,
            io: io_error,
        };
        let hook = match &self.end_io {
            Some(h) if walk.handled > 0 => h.end_io(offset, transferred, errs.first()).err(),
            _ => None,
        };
        result::precedence(errs, hook, transferred)
    }
}

/// A request's final completion, handed to [`Deferral::defer_completion`] to be run on
/// another thread: [`run`](Deferred::run) resolves the request (end-io hook, precedence) and
/// calls the user's completion.
///
/// It is the request's pooled state itself (a pointer; no allocation): the completion and the
/// buffer wait inside it until `run`. Dropping it without running it loses the completion
/// (an invariant failure in debug builds).
#[must_use = "dropping a Deferred loses a completion"]
pub struct Deferred(DeferredJob);

#[cfg(not(loom))]
type DeferredJob = std::sync::Arc<dyn Finish>;
#[cfg(loom)]
type DeferredJob = Box<dyn FnOnce() + Send>;

/// The type-erased side of [`Deferred`].
#[cfg(not(loom))]
trait Finish: Send + Sync {
    fn finish(self: std::sync::Arc<Self>);
}

#[cfg(not(loom))]
impl<B: Send + 'static> Finish for DioShared<B> {
    fn finish(self: std::sync::Arc<Self>) {
        let h = crate::sync::lock(&self.handoff).take();
        match h {
            Some(h) => DioShared::finish(self, h),
            None => panic!("a deferred request ran twice or had nothing to finish"),
        }
    }
}

impl Deferred {
    pub(crate) fn new<B: Send + 'static>(dio: Arc<DioShared<B>>, h: Handoff<B>) -> Self {
        #[cfg(not(loom))]
        {
            *crate::sync::lock(&dio.handoff) = Some(h);
            Deferred(dio)
        }
        #[cfg(loom)]
        {
            Deferred(Box::new(move || DioShared::finish(dio, h)))
        }
    }

    /// Run the completion (on the calling thread).
    pub fn run(self) {
        #[cfg(not(loom))]
        Finish::finish(self.0);
        #[cfg(loom)]
        (self.0)();
    }
}

impl std::fmt::Debug for Deferred {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Deferred")
    }
}
