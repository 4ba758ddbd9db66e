//! The user completion, consumed when run, so "at most once" is a type fact. Two shapes:
//! SPDK's `cb_fn` (a plain function; its `cb_arg` is the request's buffer `B`, which the upper
//! layer makes carry whatever per-request context it needs), which costs no allocation, and a
//! boxed closure for callers that prefer one.

use crate::dio::Slot;
use crate::error::DioResult;

enum Callback<B> {
    Fn(fn(DioResult, B)),
    Slotted(fn(DioResult, B, Option<&mut Slot>)),
    Boxed(Box<dyn FnOnce(DioResult, B) + Send>),
}

/// The user's completion callback. [`complete`](Completion::complete) consumes it, so it runs
/// at most once. In debug builds, dropping one that was neither completed nor
/// [`discard`](Completion::discard)ed is an invariant failure (a lost completion).
#[must_use]
pub struct Completion<B>(Option<Callback<B>>);

impl<B> Completion<B> {
    /// Wrap a closure (one allocation).
    pub fn new(f: impl FnOnce(DioResult, B) + Send + 'static) -> Self {
        Completion(Some(Callback::Boxed(Box::new(f))))
    }

    /// A plain function (no allocation): the request's context travels in its buffer `B`.
    pub fn from_fn(f: fn(DioResult, B)) -> Self {
        Completion(Some(Callback::Fn(f)))
    }

    /// A plain function that is also lent the user slot of the request's pooled state
    /// ([`DioCore::reserve`](crate::DioCore::reserve)) when dio-core completes a queued
    /// request, before the state goes back to the pool: what the function puts there stays
    /// with the state for its next request. `None` when the request finished on the
    /// submitter's stack (its state was already given back).
    pub fn from_slotted_fn(f: fn(DioResult, B, Option<&mut Slot>)) -> Self {
        Completion(Some(Callback::Slotted(f)))
    }

    /// A completion with nothing to run (the synchronous API). Dropping it is fine.
    pub fn noop() -> Self {
        Completion(None)
    }

    /// Run the callback.
    #[inline(always)]
    pub fn complete(mut self, result: DioResult, buf: B) {
        match self.0.take() {
            Some(Callback::Fn(f)) => f(result, buf),
            Some(Callback::Slotted(f)) => f(result, buf, None),
            Some(Callback::Boxed(f)) => f(result, buf),
            None => {}
        }
    }

    /// The function of a slotted completion, taken out (the completion is then spent), so that
    /// the caller calls it directly with the buffer: not through a further by-value call,
    /// which is one more copy of the buffer. `None` (and nothing taken) for the other shapes.
    #[inline(always)]
    pub(crate) fn take_slotted(&mut self) -> Option<fn(DioResult, B, Option<&mut Slot>)> {
        match self.0 {
            Some(Callback::Slotted(f)) => {
                self.0 = None;
                Some(f)
            }
            _ => None,
        }
    }

    /// Drop the callback without running it (the submission-error path: the error is returned
    /// to the caller instead).
    pub fn discard(mut self) {
        self.0 = None;
    }
}

impl<B> Drop for Completion<B> {
    fn drop(&mut self) {
        if cfg!(debug_assertions) && !std::thread::panicking() {
            assert!(
                self.0.is_none(),
                "a completion was dropped without being run or discarded"
            );
        }
    }
}

impl<B> std::fmt::Debug for Completion<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Completion(pending)"
        } else {
            "Completion(none)"
        })
    }
}
