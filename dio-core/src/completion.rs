//! The user completion: a boxed `FnOnce`, consumed when run, so "at most once" is a type fact.

use crate::error::DioResult;

type Callback<B> = Box<dyn FnOnce(DioResult, B) + Send>;

/// The user's completion callback. [`complete`](Completion::complete) consumes it, so it runs
/// at most once. In debug builds, dropping one that was neither completed nor
/// [`discard`](Completion::discard)ed is an invariant failure (a lost completion).
#[must_use]
pub struct Completion<B>(Option<Callback<B>>);

impl<B> Completion<B> {
    /// Wrap a callback.
    pub fn new(f: impl FnOnce(DioResult, B) + Send + 'static) -> Self {
        Completion(Some(Box::new(f)))
    }

    /// A completion with nothing to run (the synchronous API). Dropping it is fine.
    pub fn noop() -> Self {
        Completion(None)
    }

    /// Run the callback.
    pub fn complete(mut self, result: DioResult, buf: B) {
        if let Some(f) = self.0.take() {
            f(result, buf);
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
