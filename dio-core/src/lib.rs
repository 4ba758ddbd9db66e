//! # dio-core: one request, many device commands, completed exactly once
//!
//! A *dio* is one user request `(dir, offset, len, buf)`. dio-core splits it into *bios*, one
//! per device command, following the file's block map ([`Mapper`]), hands them to the device
//! through [`BioSink`], and learns of their end through [`Bio::complete`]. It knows nothing
//! about NVMe.
//!
//! The design is the Linux direct-I/O core after its race fixes (2.6.11 "AIO+DIO bio_count
//! race fix", 2.6.22–24 "only call aio_complete() after returning -EIOCBQUEUED" and "lock
//! refcount operations"), with iomap's and SPDK's contracts:
//!
//! * **One lock.** A dio's reference count (1 for the submitter + one per accepted bio), the
//!   waiter, the first device error and a poison flag live under one mutex (module `locked`).
//!   A completion decrements, tests and wakes the waiter in one critical section, so the
//!   waiter cannot free the dio between the decrement and the wake-up (Linux bug B1/B7).
//! * **One decision.** [`DioCore::submit`] decides in one place whether to return
//!   [`Outcome::Queued`]: async, nothing failed, something was transferred, and a read or a
//!   complete write that does not extend the file. Only then does the completion path call the
//!   user's completion (exactly once, by whoever drops the last reference). Otherwise the
//!   submitter waits for its bios, drops the last reference itself and hands the result *and*
//!   the [`Completion`] back to the upper layer, so nobody ever sees two completions (B3, B4).
//! * **Partial writes.** A direct write that cannot continue (hole, unaligned tail, an extent
//!   the mapper wants buffered) returns [`Outcome::Fallback`] with the bytes done, after all its
//!   bios completed, and [`IoCtx`] writes only the remainder through the buffered path (B2).
//! * **Sizes.** A write that extends the file is forced synchronous, and the upper layer
//!   raises the size before it runs the callback (B5). Reads are clamped at the size snapshot
//!   taken when the request started.
//! * **Errors.** Submission errors come back synchronously and never through the callback;
//!   otherwise the precedence is submission ▸ deferred ▸ first device error in completion
//!   order ▸ end-io hook error ([`result::precedence`]); a device error never changes the byte
//!   count or who completes (B6).
//!
//! [`RefCounting::Atomic`] selects the alternative of §3.13 (module `atomic`): an atomic
//! count and iomap's waiter protocol. Both pass the same loom suite.
//!
//! ## Cost per request: pooled states, two callback shapes
//!
//! A [`DioCore`] recycles its request states (module `pool`): `submit` takes an idle one from
//! a lock-free bounded free list, behind a hot stack of up to 32 states that a client with
//! up to 32 requests in flight reuses most recent first, and allocates only when both are
//! empty ([`Config::pool`] bounds it). Whoever resolves a request (the submitter, or the last bio completer) hands its state
//! back after taking the result out. A state is reinitialised only through `Arc::get_mut`, so
//! never while anyone else can reach it: a completer that has dropped its count but not yet
//! its `Arc` merely delays the reuse. A request's first bio reference is taken through that
//! same exclusive access, without the lock, a polling submitter polls before its first drain
//! check, and its last drain check and its final drop share one critical section: a one-bio
//! request takes the lock twice (the submitter's drop, the bio's completion), and every
//! reference still goes through it. A request that is not queued keeps its buffer and
//! completion on the submitter's stack throughout; a queued one publishes them once.
//!
//! The completion has two shapes: [`Completion::from_fn`] / [`IoCtx::submit_async_fn`],
//! SPDK's `cb_fn` whose `cb_arg` is the request's buffer (no allocation), and
//! [`Completion::new`] / [`IoCtx::submit_async`], a boxed closure. A deferred completion is
//! handed to [`Deferral::defer_completion`] as a [`Deferred`], which is the request's pooled
//! state itself; with both, a request allocates nothing in the steady state (test `alloc`).
//!
//! ## Invariants (checked by the tests)
//!
//! * The completion runs at most once for every dio, and dio-core runs it iff `submit`
//!   returned `Queued`; at [`IoCtx::submit_async`] the callback runs exactly once iff it
//!   returned `Ok`.
//! * No thread touches a dio after its last reference is dropped (a poison flag checked at
//!   every lock acquisition in debug and loom builds); the submitter never touches it after
//!   returning `Queued`; a completer that was not last never touches it after its decrement.
//! * Per-bio cleanup ([`DmaSegment::unmap`]) happens before that bio's reference is dropped.
//! * No lost wake-up: the waiter is woken in the critical section of the decrement.
//! * The buffered fallback covers exactly `[offset + done, offset + len)`, only after every
//!   direct bio completed, and only when nothing failed.
//! * The file size seen by a write's completion covers the write; an extending write is never
//!   `Queued`.
//! * No driver call, hook or callback runs under a dio-core lock.
//!
//! `unsafe` is forbidden in this crate.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod atomic;
mod bio;
mod completion;
mod core;
mod dio;
mod error;
mod hooks;
mod ioctx;
mod locked;
mod pool;
mod request;
pub mod result;
#[doc(hidden)]
pub mod sync;

pub use crate::bio::{Bio, BioCmd, BioHandle, BioOp};
pub use crate::completion::Completion;
pub use crate::core::{Command, Config, DioCore, QueueFullPolicy, Reserved, SyncOutcome};
pub use crate::dio::{Deferred, RefCounting, Slot, Wait};
pub use crate::error::{DeviceStatus, DioError, DioResult};
pub use crate::hooks::{BioSink, Deferral, EndIo, Extent, Mapper, Poller, Rejected};
pub use crate::ioctx::{File, IoCtx, SubmitErrorDelivery, Submitted};
pub use crate::request::{DioRequest, Dir, DmaSegment, IoBuf, Mode, Outcome};
