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
/// accepted bio is completed at most once. Its command ([`BioCmd`]: operation, LBA, file
/// offset, length, segment) is read through `Deref` (`bio.op()`, `bio.lba()`, ...).
pub struct Bio<B: IoBuf> {
    pub(crate) dio: Arc<DioShared<B>>,
    pub(crate) cmd: BioCmd<B::Seg>,
}

impl<B: IoBuf> std::ops::Deref for Bio<B> {
    type Target = BioCmd<B::Seg>;

    fn deref(&self) -> &BioCmd<B::Seg> {
        &self.cmd
    }
}

impl<B: IoBuf> Bio<B> {
    /// Direction of the request this bio belongs to.
    pub fn dir(&self) -> Dir {
        self.dio.dir()
    }

    /// The device finished this command. Per-bio cleanup runs first, then the reference drop
    /// (decrement, error record and wake-up in one critical section). If that was the last
    /// reference, the request's completion runs here (or is deferred).
    pub fn complete(self, status: Result<(), DeviceStatus>) {
        let Bio { dio, cmd } = self;
        if let Some(seg) = cmd.seg {
            seg.unmap();
        }
        DioShared::bio_done(dio, status);
    }

    /// A bio the device refused and that will not be retried: clean up its segment. The
    /// reference it counted was already given back by the submitter.
    pub(crate) fn abandon(self) {
        if let Some(seg) = self.cmd.seg {
            seg.unmap();
        }
    }
}

impl<B: IoBuf> Bio<B> {
    /// Split an accepted bio into what the device needs to issue its command ([`BioCmd`]) and
    /// the small handle that completes it ([`BioHandle`]: the reference on the request, one
    /// pointer). For segments whose `unmap` is a no-op only ([`DmaSegment::NOOP_UNMAP`],
    /// checked when the code is built, after monomorphization: `cargo build` fails, `cargo
    /// check` does not see it): the handle does not keep the segment, so nothing is left to
    /// clean up at completion. A device that refuses the command gives the bio back whole
    /// with [`BioHandle::rejoin`].
    ///
    /// A segment that did not declare its `unmap` a no-op cannot be split (the build fails):
    ///
    /// ```compile_fail,E0080
    /// use dio_core::{Bio, DioError, Dir, DmaSegment, IoBuf};
    /// struct Seg;
    /// impl DmaSegment for Seg {
    ///     // `NOOP_UNMAP` left at false: this cleanup must run.
    ///     fn unmap(self) {}
    /// }
    /// struct Buf;
    /// impl IoBuf for Buf {
    ///     type Seg = Seg;
    ///     fn len(&self) -> u64 { 0 }
    ///     fn dma_map(&self, _: u64, _: u64, _: Dir) -> Result<Seg, DioError> { Ok(Seg) }
    ///     fn zero_fill(&mut self, _: u64, _: u64) {}
    /// }
    /// fn device(bio: Bio<Buf>) {
    ///     let (_cmd, handle) = bio.split();
    ///     handle.complete(Ok(()));
    /// }
    /// let _used: fn(Bio<Buf>) = device;
    /// ```
    #[inline]
    pub fn split(self) -> (BioCmd<B::Seg>, BioHandle<B>) {
        const {
            assert!(
                <B::Seg as DmaSegment>::NOOP_UNMAP,
                "Bio::split needs a segment whose unmap is a no-op (DmaSegment::NOOP_UNMAP)"
            )
        };
        let Bio { dio, cmd } = self;
        (cmd, BioHandle { dio })
    }
}

/// A bio's command: what the device needs at submission (read through a [`Bio`], or the
/// command half of a split bio, [`Bio::split`]). The memory its segment names stays the
/// request's until the bio (or its [`BioHandle`]) completes.
pub struct BioCmd<S> {
    pub(crate) op: BioOp,
    pub(crate) lba: u64,
    pub(crate) file_offset: u64,
    pub(crate) len: u64,
    pub(crate) seg: Option<S>,
}

impl<S> BioCmd<S> {
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
    /// True for a zero-length command (built by dio-core only for a Flush).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The DMA segment (`None` for `WriteZeroes` and `Flush`).
    pub fn segment(&self) -> Option<&S> {
        self.seg.as_ref()
    }
}

impl<S> std::fmt::Debug for BioCmd<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BioCmd")
            .field("op", &self.op)
            .field("lba", &self.lba)
            .field("file_offset", &self.file_offset)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

/// The completion half of a split bio ([`Bio::split`]): it owns the bio's reference on its
/// request, and [`complete`](Self::complete) consumes it, so it completes the bio at most once.
/// Like a [`Bio`], a handle dropped without completing keeps its request in flight for ever
/// (its count is never given back); the device side must complete every handle it accepted.
#[must_use = "an accepted bio must be completed exactly once"]
pub struct BioHandle<B: IoBuf> {
    dio: Arc<DioShared<B>>,
}

impl<B: IoBuf> BioHandle<B> {
    /// The device finished this command: as [`Bio::complete`] (the segment's cleanup is the
    /// no-op [`DmaSegment::NOOP_UNMAP`] promised, so only the reference drop is left).
    #[inline]
    pub fn complete(self, status: Result<(), DeviceStatus>) {
        DioShared::bio_done(self.dio, status);
    }

    /// The device did not accept the command: the bio again, whole, to hand back in a
    /// [`Rejected`](crate::Rejected). `cmd` must be the command split from this handle's bio.
    #[inline]
    pub fn rejoin(self, cmd: BioCmd<B::Seg>) -> Bio<B> {
        Bio { dio: self.dio, cmd }
    }

    /// Direction of the request this bio belongs to.
    pub fn dir(&self) -> Dir {
        self.dio.dir()
    }
}

impl<B: IoBuf> std::fmt::Debug for BioHandle<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BioHandle").finish_non_exhaustive()
    }
}

impl<B: IoBuf> std::fmt::Debug for Bio<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Bio").field(&self.cmd).finish()
    }
}
