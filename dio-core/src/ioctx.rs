//! The upper layer (the "aio core", §3.7): turns an [`Outcome`] into a returned value or
//! exactly one callback, updates the file size before a write's completion, and runs the
//! buffered remainder of a partial direct write.

use std::ops::Range;

use crate::completion::Completion;
use crate::core::{DioCore, Reserved, SyncOutcome};
use crate::dio::Slot;
use crate::error::{DioError, DioResult};
use crate::hooks::Mapper;
use crate::request::{DioRequest, Dir, IoBuf, Outcome};

/// The file as the upper layer needs it. Implemented by the driver integration (and by test
/// doubles).
pub trait File<B>: Send + Sync {
    /// Current size in bytes.
    fn size(&self) -> u64;
    /// Raise the size to `new_size` if it is larger (never moves EOF backwards).
    fn extend_to(&self, new_size: u64);
    /// Write `buf[buf_range]` at `file_offset` through the buffered path, write-through: when
    /// it returns, the range is on the device and no cached page overlapping it is stale.
    /// Returns the bytes written.
    fn write_buffered(&self, file_offset: u64, buf: &B, buf_range: Range<u64>) -> DioResult;
}

/// How a submission-class error of `submit_async` is reported.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum SubmitErrorDelivery {
    /// Returned as `Err`; the callback never runs (SPDK's contract, the default).
    #[default]
    Return,
    /// Delivered through the callback, like Linux `aio_rw_done`; `submit_async` returns `Ok`.
    Callback,
}

/// How `submit_async` ended when it returned `Ok`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Submitted {
    /// In flight; the callback runs later, from the completion path.
    Queued,
    /// Finished synchronously; the callback has run (or has been handed to the deferral hook).
    Completed,
}

/// The user-facing API over a [`DioCore`] and a [`File`].
pub struct IoCtx<B: IoBuf, F: File<B>, M: Mapper + ?Sized = dyn Mapper> {
    core: DioCore<B, M>,
    file: F,
    delivery: SubmitErrorDelivery,
}

impl<B: IoBuf, F: File<B>, M: Mapper + ?Sized> IoCtx<B, F, M> {
    /// A context with [`SubmitErrorDelivery::Return`].
    pub fn new(core: DioCore<B, M>, file: F) -> Self {
        IoCtx {
            core,
            file,
            delivery: SubmitErrorDelivery::Return,
        }
    }

    /// Choose how submission errors are delivered.
    pub fn with_delivery(mut self, delivery: SubmitErrorDelivery) -> Self {
        self.delivery = delivery;
        self
    }

    /// The file.
    pub fn file(&self) -> &F {
        &self.file
    }

    /// The core.
    pub fn core(&self) -> &DioCore<B, M> {
        &self.core
    }

    /// Submit asynchronously. `Err((e, buf))`: `cb` never runs. `Ok(())`: `cb` runs exactly
    /// once (I-CB-3).
    pub fn submit_async(
        &self,
        req: DioRequest<B>,
        cb: impl FnOnce(DioResult, B) + Send + 'static,
    ) -> Result<(), (DioError, B)> {
        self.submit_async_traced(req, cb).map(|_| ())
    }

    /// [`submit_async`](Self::submit_async), also telling whether the request was queued.
    pub fn submit_async_traced(
        &self,
        req: DioRequest<B>,
        cb: impl FnOnce(DioResult, B) + Send + 'static,
    ) -> Result<Submitted, (DioError, B)> {
        self.submit_async_with(req, Completion::new(cb))
    }

    /// [`submit_async_traced`](Self::submit_async_traced) with SPDK's callback shape: a plain
    /// function, no allocation; the request's context travels in its buffer.
    #[inline]
    pub fn submit_async_fn(
        &self,
        req: DioRequest<B>,
        cb: fn(DioResult, B),
    ) -> Result<Submitted, (DioError, B)> {
        self.submit_async_with(req, Completion::from_fn(cb))
    }

    /// [`submit_async_fn`](Self::submit_async_fn) on a state taken by
    /// [`DioCore::reserve`], whose user slot `cb` is lent when dio-core completes the request
    /// ([`Completion::from_slotted_fn`]): the upper layer's per-request context lives in
    /// dio-core's pooled state, one pool per request instead of two.
    #[inline(always)]
    pub fn submit_async_reserved(
        &self,
        reserved: Reserved<B>,
        req: DioRequest<B>,
        cb: fn(DioResult, B, Option<&mut Slot>),
    ) -> Result<Submitted, (DioError, B)> {
        let (dir, offset, len) = (req.dir, req.offset, req.len);
        let outcome = self.core.submit_reserved(
            reserved,
            req,
            self.file.size(),
            Completion::from_slotted_fn(cb),
        );
        self.submitted(dir, offset, len, outcome)
    }

    #[inline(always)]
    fn submit_async_with(
        &self,
        req: DioRequest<B>,
        completion: Completion<B>,
    ) -> Result<Submitted, (DioError, B)> {
        let (dir, offset, len) = (req.dir, req.offset, req.len);
        let outcome = self.core.submit(req, self.file.size(), completion);
        self.submitted(dir, offset, len, outcome)
    }

    /// What `submit_async` returns for `outcome` (and the callback run if it is over).
    #[inline(always)]
    fn submitted(
        &self,
        dir: Dir,
        offset: u64,
        len: u64,
        outcome: Outcome<B>,
    ) -> Result<Submitted, (DioError, B)> {
        if let Outcome::Queued = outcome {
            // Nothing to drop: forgotten rather than dropped, which would be an out-of-line
            // call of `Outcome`'s drop glue on every queued request (13 instructions).
            std::mem::forget(outcome);
            return Ok(Submitted::Queued);
        }
        match outcome {
            Outcome::Queued => Ok(Submitted::Queued),
            Outcome::Done {
                result: Err(e),
                buf,
                completion,
            } if e.is_submission_class() && self.delivery == SubmitErrorDelivery::Return => {
                completion.discard();
                Err((e, buf))
            }
            other => {
                let (result, buf, completion) = self.finish(dir, offset, len, other);
                self.deliver(completion, result, buf);
                Ok(Submitted::Completed)
            }
        }
    }

    /// Submit and wait: the same steps, returning the value instead of calling back.
    #[inline(always)]
    pub fn submit_sync(&self, req: DioRequest<B>) -> (DioResult, B) {
        let DioRequest {
            dir,
            offset,
            len,
            mut buf,
            ..
        } = req;
        let result = self.submit_sync_mut(dir, offset, len, &mut buf);
        (result, buf)
    }

    /// [`submit_sync`](Self::submit_sync) on a borrowed buffer: the buffer is never moved
    /// (no copy of it per call, whatever its size), and it is the caller's again, every bio
    /// over, when this returns.
    #[inline(always)]
    pub fn submit_sync_mut(&self, dir: Dir, offset: u64, len: u64, buf: &mut B) -> DioResult {
        let result = match self
            .core
            .submit_sync_mut(dir, offset, len, buf, self.file.size())
        {
            // A read never falls back and never changes the size: answered as it is.
            SyncOutcome::Done(result) if dir == Dir::Read => return result,
            SyncOutcome::Done(result) => result,
            SyncOutcome::Fallback { done } => self.buffered_rest(offset, len, done, buf),
        };
        self.extend(dir, offset, result);
        result
    }

    /// The buffered remainder `[offset + done, offset + len)` of a direct write that stopped
    /// early: the bytes written in all (a buffered failure after direct bytes reports those).
    fn buffered_rest(&self, offset: u64, len: u64, done: u64, buf: &B) -> DioResult {
        match self.file.write_buffered(offset + done, buf, done..len) {
            Ok(n) => Ok(done + n),
            Err(_) if done > 0 => Ok(done),
            Err(e) => Err(e),
        }
    }

    /// A write's completion must see the size cover it (B5): raise it first.
    #[inline(always)]
    fn extend(&self, dir: Dir, offset: u64, result: DioResult) {
        if let (Dir::Write, Ok(n)) = (dir, result) {
            if n > 0 && offset + n > self.file.size() {
                self.file.extend_to(offset + n);
            }
        }
    }

    #[inline(always)]
    fn finish(
        &self,
        dir: Dir,
        offset: u64,
        len: u64,
        outcome: Outcome<B>,
    ) -> (DioResult, B, Completion<B>) {
        let (result, buf, completion) = match outcome {
            Outcome::Queued => unreachable!("a synchronous request was queued"),
            Outcome::Done {
                result,
                buf,
                completion,
            } => (result, buf, completion),
            Outcome::Fallback {
                done,
                buf,
                completion,
            } => (self.buffered_rest(offset, len, done, &buf), buf, completion),
        };
        self.extend(dir, offset, result);
        (result, buf, completion)
    }

    /// Step 4(b): run the callback, through the deferral hook if one is configured, so that
    /// no callback runs on the submitter's stack (I-CB-6).
    fn deliver(&self, completion: Completion<B>, result: DioResult, buf: B) {
        self.core.defer_completion(completion, result, buf);
    }
}
