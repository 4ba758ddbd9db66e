//! The request, its buffer, and the outcome the core reports to the upper layer.

use crate::completion::Completion;
use crate::error::{DioError, DioResult};

/// Transfer direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dir {
    /// Device to buffer.
    Read,
    /// Buffer to device.
    Write,
}

/// Whether the caller may be answered with [`Outcome::Queued`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// The submitter always waits for every bio and returns the result.
    Sync,
    /// The submitter may return `Queued`; the last bio completion then completes the request.
    Async,
}

/// A DMA-mapped part of a request's buffer, carried by one [`Bio`](crate::Bio).
pub trait DmaSegment: Send + 'static {
    /// True when [`unmap`](Self::unmap) does nothing (the segment only names memory that stays
    /// mapped for the buffer's life). Only a bio of such a segment may be split into its
    /// command and a small completion handle ([`Bio::split`](crate::Bio::split)): the handle
    /// does not keep the segment, so dio-core does not call `unmap` for it. Default: false.
    const NOOP_UNMAP: bool = false;

    /// Per-bio cleanup (DMA unmap, read post-processing). dio-core calls it exactly once per
    /// mapped segment, before the bio's reference on the request is dropped (I-LT-4), except
    /// for a split bio, whose segment declared it a no-op ([`NOOP_UNMAP`](Self::NOOP_UNMAP)).
    fn unmap(self);
}

/// The user buffer of a request.
///
/// It stays with the request while bios are in flight and is handed back exactly once: in the
/// [`Outcome`] or to the completion.
pub trait IoBuf: Send + 'static {
    /// The DMA handle of one segment.
    type Seg: DmaSegment;
    /// Length in bytes.
    fn len(&self) -> u64;
    /// True when the buffer holds no bytes.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// DMA-map `[off, off + len)` of the buffer for a transfer in `dir`. `Err(Fault)` when the
    /// segment is not in DMA-able memory; the request then stops there (or, for a write that
    /// allocated blocks, zeroes the rest of the extent, see [`Extent::Mapped`](crate::Extent)).
    fn dma_map(&self, off: u64, len: u64, dir: Dir) -> Result<Self::Seg, DioError>;
    /// Zero `[off, off + len)` of the buffer (a read over a hole).
    fn zero_fill(&mut self, off: u64, len: u64);
}

/// One user request.
#[derive(Debug)]
pub struct DioRequest<B> {
    /// Direction.
    pub dir: Dir,
    /// File offset in bytes; must be a multiple of the core's alignment.
    pub offset: u64,
    /// Length in bytes; `<= buf.len()`. Reads must be aligned; a write's unaligned tail goes
    /// through the buffered path.
    pub len: u64,
    /// The buffer.
    pub buf: B,
    /// Sync or async.
    pub mode: Mode,
    /// Never return `Queued` even if allowed (iomap's `IOMAP_DIO_FORCE_WAIT`).
    pub force_wait: bool,
}

impl<B> DioRequest<B> {
    /// A request with `force_wait = false`.
    pub fn new(dir: Dir, offset: u64, len: u64, buf: B, mode: Mode) -> Self {
        DioRequest {
            dir,
            offset,
            len,
            buf,
            mode,
            force_wait: false,
        }
    }
}

/// What the core tells the upper layer. Exactly one owner of the completion at all times.
#[must_use]
pub enum Outcome<B> {
    /// Async only: the bio completion path owns the completion and runs it exactly once. The
    /// submitter has no access to the request or its buffer any more.
    Queued,
    /// The result is known synchronously; the upper layer completes the request (updating the
    /// file size first for a write that extends it).
    Done {
        /// The request's result.
        result: DioResult,
        /// The buffer, handed back.
        buf: B,
        /// The completion, handed back unrun.
        completion: Completion<B>,
    },
    /// Write only: `[offset, offset + done)` was written directly, every direct bio completed
    /// without error, and the upper layer must write `[offset + done, offset + len)` through
    /// the buffered path. `done` may be 0.
    Fallback {
        /// Bytes written directly.
        done: u64,
        /// The buffer, handed back.
        buf: B,
        /// The completion, handed back unrun.
        completion: Completion<B>,
    },
}

impl<B> Outcome<B> {
    /// True for [`Outcome::Queued`].
    pub fn is_queued(&self) -> bool {
        matches!(self, Outcome::Queued)
    }
}

impl<B> std::fmt::Debug for Outcome<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Queued => f.write_str("Queued"),
            Outcome::Done { result, .. } => f.debug_struct("Done").field("result", result).finish(),
            Outcome::Fallback { done, .. } => {
                f.debug_struct("Fallback").field("done", done).finish()
            }
        }
    }
}
