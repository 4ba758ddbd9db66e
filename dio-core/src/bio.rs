//! One device command of a request.

use crate::dio::DioShared;
use crate::error::DeviceStatus;
use crate::request::{Dir, DmaSegment, IoBuf};
use crate::sync::Arc;

/// The device operation of a bio.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BioOp {
    /// Read into the segment.
    Read,
    /// Write from the segment.
    Write,
    /// Write zeroes (no segment): covers freshly allocated blocks whose data could not be
    /// DMA-mapped.
    WriteZeroes,
    /// Deallocate (Dataset Management): the segment holds the device's range list
    /// ([`DioCore::submit_commands`](crate::DioCore::submit_commands) only).
    Deallocate,
    /// Flush the device's volatile write cache (no segment;
    /// [`DioCore::submit_commands`](crate::DioCore::submit_commands) only).
    Flush,
}

/// One device command. Owns a reference on its request; [`Bio::complete`] consumes it, so an
/// accepted bio is completed at most once.
pub struct Bio<B: IoBuf> {
    pub(crate) dio: Arc<DioShared<B>>,
    pub(crate) op: BioOp,
    pub(crate) lba: u64,
    pub(crate) file_offset: u64,
    pub(crate) len: u64,
    pub(crate) seg: Option<B::Seg>,
}

impl<B: IoBuf> Bio<B> {
    /// Operation.
    pub fn op(&self) -> BioOp {
        self.op
    }
    /// First logical block.
    pub fn lba(&self) -> u64 {
        self.lba
    }
    /// File offset of the first byte.
    pub fn file_offset(&self) -> u64 {
        self.file_offset
    }
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }
    /// True for a zero-length bio (built by dio-core only for a Flush).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The DMA segment (`None` for `WriteZeroes`).
    pub fn segment(&self) -> Option<&B::Seg> {
        self.seg.as_ref()
    }
    /// Direction of the request this bio belongs to.
    pub fn dir(&self) -> Dir {
        self.dio.dir()
    }

    /// The device finished this command. Per-bio cleanup runs first, then the reference drop
    /// (decrement, error record and wake-up in one critical section). If that was the last
    /// reference, the request's completion runs here (or is deferred).
    pub fn complete(self, status: Result<(), DeviceStatus>) {
        let Bio { dio, seg, .. } = self;
        if let Some(seg) = seg {
            seg.unmap();
        }
        DioShared::bio_done(dio, status);
    }

    /// A bio the device refused and that will not be retried: clean up its segment. The
    /// reference it counted was already given back by the submitter.
    pub(crate) fn abandon(self) {
        if let Some(seg) = self.seg {
            seg.unmap();
        }
    }
}

impl<B: IoBuf> std::fmt::Debug for Bio<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bio")
            .field("op", &self.op)
            .field("lba", &self.lba)
            .field("file_offset", &self.file_offset)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}
