//! The small traits through which dio-core talks to the device, the file system and the
//! execution context. They are the stable seam for the driver integration.

use crate::bio::Bio;
use crate::dio::Deferred;
use crate::error::DioError;
use crate::request::{Dir, IoBuf};

/// A bio the device did not accept, handed back with the reason (`QueueFull` or `Fault`).
pub struct Rejected<B: IoBuf> {
    /// The bio, unchanged.
    pub bio: Bio<B>,
    /// Why it was refused.
    pub why: DioError,
}

impl<B: IoBuf> std::fmt::Debug for Rejected<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rejected")
            .field("why", &self.why)
            .finish_non_exhaustive()
    }
}

/// The device side. `submit` must not block and must not call [`Bio::complete`] from inside
/// itself; an accepted bio must eventually be completed exactly once (by any thread).
pub trait BioSink<B: IoBuf>: Send + Sync {
    /// Queue one device command.
    fn submit(&self, bio: Bio<B>) -> Result<(), Rejected<B>>;
}

/// What the file's block map says about `[file_off, file_off + len)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Extent {
    /// Backed by device blocks starting at `lba`, for `len` bytes (may be shorter than asked).
    /// `fresh` is true when the blocks were allocated by this call (a write beyond EOF): if the
    /// buffer then cannot be DMA-mapped, dio-core writes zeroes to them instead, so stale data
    /// is never exposed, and fails the request with a deferred error.
    Mapped {
        /// First logical block.
        lba: u64,
        /// Bytes covered.
        len: u64,
        /// Allocated by this call.
        fresh: bool,
    },
    /// Not allocated, for `len` bytes. Reads see zeroes; a write stops here (buffered remainder).
    Hole {
        /// Bytes covered.
        len: u64,
    },
    /// This range cannot be done directly (Linux `-ENOTBLK`): a write stops here and the rest
    /// goes through the buffered path; a read ends short.
    NeedBuffered,
}

/// File offset to device mapping (the `get_block` analogue).
pub trait Mapper: Send + Sync {
    /// Map from `file_off`, at most `len` bytes. `may_alloc` is true only for a write beyond
    /// EOF. A mapper error stops the request and is returned synchronously.
    fn map(&self, file_off: u64, len: u64, dir: Dir, may_alloc: bool) -> Result<Extent, DioError>;
}

/// Filesystem completion hook, run once per request that transferred bytes, before the user
/// completion, outside every dio-core lock. Must not block (or configure a [`Deferral`]).
pub trait EndIo: Send + Sync {
    /// `transferred` is the EOF-clamped byte count; `err` the request's error so far.
    fn end_io(&self, offset: u64, transferred: u64, err: Option<DioError>) -> Result<(), DioError>;
}

/// Moves the final completion (end-io hook and user callback) of a queued request off the
/// poller thread, and, in the upper layer, off the submitter's stack.
pub trait Deferral: Send + Sync {
    /// Run `job` later on another thread.
    fn defer(&self, job: Box<dyn FnOnce() + Send>);

    /// Run a request's final completion later on another thread: call
    /// [`Deferred::run`] there. dio-core defers every completion through this method; a
    /// [`Deferred`] is a pointer to the request's pooled state, so an implementation that
    /// moves it through a queue of `Deferred` (rather than boxing it) defers without
    /// allocating. The default boxes it and calls [`defer`](Self::defer).
    fn defer_completion(&self, job: Deferred) {
        self.defer(Box::new(move || job.run()));
    }
}

/// Run-to-completion polling: the submitter calls `poll_once` while it waits.
pub trait Poller: Send + Sync {
    /// Reap whatever completions are ready (possibly none), without blocking for long. May
    /// complete bios of the waiting request on the caller's stack.
    fn poll_once(&self);
}
