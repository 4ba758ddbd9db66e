//! Buffers of the embedding API: [`IoBuffer`] (what the user owns) and the window of it that
//! dio-core sees ([`Window`], an [`IoBuf`]).
//!
//! * [`IoBuffer::Dma`]: a [`DmaBuffer`] from [`Controller::alloc`](crate::Controller::alloc) or
//!   [`Dioxide::alloc`](crate::Dioxide::alloc): 4 KiB aligned, in the controller's DMA memory.
//!   The block-aligned part of a request goes straight to the device (zero copy), if the
//!   buffer is in the memory of the file's own controller: a buffer of another controller of
//!   the instance (another device's IOVA space, or NVMe/TCP host memory whose "IOVA" is its
//!   address) is treated like a heap buffer.
//! * [`IoBuffer::Heap`]: any `Vec<u8>`. The device cannot reach it, so the whole request goes
//!   through the page cache (the buffered path), which copies.
//!
//! dio-core sees a [`Window`], one word: a pointer to a [`Frame`] (the buffer plus the byte of
//! it where the direct part starts; an unaligned head is done through the cache first). For an
//! asynchronous request the frame is the first field of the request's pooled context (held
//! range, byte accounting, the user's callback), which the window then owns and dio-core hands
//! back to the completion function (its `cb_arg`); for a synchronous one it is a frame on the
//! submitter's stack, lent for the call ([`Frame::lend`]). [`IoBuf::dma_map`] answers `Fault`
//! for a heap buffer or a segment whose address is not dword aligned (NVMe PRP rule).

use std::num::NonZeroUsize;
use std::ptr::NonNull;

use dio_core::{DioError, Dir, DmaSegment, IoBuf};

use crate::bus::dma::{DmaBuffer, DmaMemory, DmaSlice};
use crate::embed::blockfile::Context;

/// A buffer owned by a request: DMA memory (zero copy) or heap memory (copied through the page
/// cache).
#[derive(Debug)]
pub enum IoBuffer {
    /// DMA memory: the block-aligned part of a request is transferred in place.
    Dma(DmaBuffer),
    /// Heap memory: transferred through the page cache.
    Heap(Vec<u8>),
}

impl IoBuffer {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        match self {
            IoBuffer::Dma(b) => b.len(),
            IoBuffer::Heap(v) => v.len(),
        }
    }
    /// True for an empty buffer.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        match self {
            IoBuffer::Dma(b) => b.as_slice(),
            IoBuffer::Heap(v) => v,
        }
    }
    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        match self {
            IoBuffer::Dma(b) => b.as_mut_slice(),
            IoBuffer::Heap(v) => v,
        }
    }
    /// True for DMA memory.
    pub fn is_dma(&self) -> bool {
        matches!(self, IoBuffer::Dma(_))
    }
    /// True for DMA memory from `mem` (one pointer compare): only such a buffer may be handed
    /// to the device behind `mem`; a buffer of another controller's memory takes the buffered
    /// path like a heap buffer.
    pub fn is_dma_of(&self, mem: &DmaMemory) -> bool {
        matches!(self, IoBuffer::Dma(b) if b.is_from(mem))
    }
    /// The DMA buffer, if it is one.
    pub fn into_dma(self) -> Option<DmaBuffer> {
        match self {
            IoBuffer::Dma(b) => Some(b),
            IoBuffer::Heap(_) => None,
        }
    }
    /// The heap vector, if it is one.
    pub fn into_vec(self) -> Option<Vec<u8>> {
        match self {
            IoBuffer::Heap(v) => Some(v),
            IoBuffer::Dma(_) => None,
        }
    }
}

impl From<DmaBuffer> for IoBuffer {
    fn from(b: DmaBuffer) -> Self {
        IoBuffer::Dma(b)
    }
}

impl From<Vec<u8>> for IoBuffer {
    fn from(v: Vec<u8>) -> Self {
        IoBuffer::Heap(v)
    }
}

/// What a [`Window`] points at: the buffer and the byte of it where the request starts (an
/// unaligned head is done through the cache first).
#[derive(Debug)]
pub(crate) struct Frame {
    pub(crate) buf: IoBuffer,
    pub(crate) start: usize,
}

impl Frame {
    /// A frame holding no buffer (an empty heap vector: nothing allocated, nothing to free).
    pub(crate) fn empty() -> Frame {
        Frame {
            buf: IoBuffer::Heap(Vec::new()),
            start: 0,
        }
    }

    /// The buffer, an empty one left in its place.
    #[inline(always)]
    pub(crate) fn take_buf(&mut self) -> IoBuffer {
        std::mem::replace(&mut self.buf, IoBuffer::Heap(Vec::new()))
    }

    /// A [`Window`] of this frame that does not own it: how a synchronous request hands its
    /// buffer to dio-core's `submit_sync_mut`, which borrows the window for the call (its bios
    /// only carry DMA segments of the buffer, and it returns normally only after every one of
    /// them completed: `DioCore::submit_sync_mut` waits for them in `submitter_wait`), so the
    /// buffer is never moved. Give the window and the [`Lent`] guard back with
    /// [`end_lend`](Self::end_lend) before the frame is used again.
    ///
    /// The guard covers the other way out: a panic unwinding out of the synchronous request
    /// (a broken invariant in dio-core, a panicking poll) may leave bios on the device, which
    /// can still write the buffer. Dropped there, the guard leaks the frame's buffer instead of
    /// letting the frame free it under the device.
    ///
    /// # Safety
    /// The window must not be used (nor be reachable) after the frame is used again or goes
    /// away: lend it only by `&mut` to code that does not move it out (dio-core's
    /// `submit_sync_mut` only reads and writes through it: its `len`, `dma_map`, `zero_fill`,
    /// and the file's `write_buffered`), then give it to `end_lend`. The guard must be dropped
    /// (if not given to `end_lend`) before the frame: declared after it, in the same scope.
    #[inline(always)]
    pub(crate) unsafe fn lend(&mut self) -> (Window, Lent) {
        let p = NonNull::from(&mut *self);
        (Window { p }, Lent { frame: p })
    }

    /// The end of a [`lend`](Self::lend): `w` must be the lent window (a different one means
    /// the lent one was moved out and may outlive this frame: the process aborts).
    #[inline(always)]
    pub(crate) fn end_lend(&mut self, w: Window, lent: Lent) {
        if w.p != NonNull::from(&mut *self) || lent.frame != w.p {
            lent_window_escaped();
        }
        // A lent window owns nothing: nothing to drop; the guard's work is for an unwind only.
        std::mem::forget(w);
        std::mem::forget(lent);
    }
}

/// Armed while a [`Frame`] is lent to a synchronous request ([`Frame::lend`]); disarmed by
/// [`Frame::end_lend`]. Dropped, it was not disarmed: a panic is unwinding out of the request,
/// whose bios may still be on the device, so the frame's buffer is leaked (the device may
/// still write it: it must stay allocated) rather than freed with the frame.
pub(crate) struct Lent {
    frame: NonNull<Frame>,
}

impl Drop for Lent {
    #[cold]
    fn drop(&mut self) {
        log::error!(
            "a synchronous request unwound with its buffer lent to the device: the buffer is \
             leaked, not freed, so the device cannot write freed memory"
        );
        // SAFETY: `lend`'s contract: the guard is dropped before the frame it points at (it is
        // declared after it in the same scope), so the frame is alive; nothing else uses it
        // during the unwind (the lent window is only borrowed by the frames being unwound).
        let frame = unsafe { &mut *self.frame.as_ptr() };
        std::mem::forget(frame.take_buf());
    }
}

#[cold]
#[inline(never)]
fn lent_window_escaped() -> ! {
    log::error!("a window lent for a synchronous request was kept past the request: aborting");
    std::process::abort()
}

/// The part of an [`IoBuffer`] a dio-core request covers (`buf[start..]` of a [`Frame`]), and
/// the context of an asynchronous request (dio-core's `cb_arg`), in one word.
///
/// dio-core moves its buffer by value about a dozen times per asynchronous request, so the
/// window is one tagged pointer to a [`Frame`]:
/// * bit 0 set: the window owns a pooled `Box<Context>` (the context of an asynchronous
///   request, or the carrier of a maintenance operation's buffer), whose first field is the
///   frame (`Context` is `repr(C)`, checked below): the buffer moves into the context once at
///   submission and out of it once at completion. Dropping the window drops the box.
/// * bit 0 clear: the window borrows a frame on a synchronous submitter's stack
///   ([`Frame::lend`]) and owns nothing.
///
/// A `Box<Context>` and a `Frame` are pointer aligned, so bit 0 of their address is free. The
/// tag is set and cleared with the strict-provenance APIs (`map_addr`), so the pointer keeps
/// the provenance of the box (or of the borrow) all the way (as Miri or a CHERI target
/// require).
pub struct Window {
    p: NonNull<Frame>,
}

impl std::fmt::Debug for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Window")
            .field("owns_context", &self.owns())
            .field("frame", self.frame())
            .finish()
    }
}

// SAFETY: an owning window is as if it held its `Box<Context>`: moving it to another thread
// moves that box, and a `&Window` only reads the context's frame; a lent window is as if it
// held the `&mut Frame` it was made from (it never outlives the lend, see `Frame::lend`). Both
// are sound because `Context` and `Frame` are `Send` and `Sync` (checked below).
unsafe impl Send for Window {}
// SAFETY: see `Send` above.
unsafe impl Sync for Window {}

const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<Context>();
    send_sync::<Frame>();
    // The frame is the context's first field: a pointer to the context is one to its frame.
    assert!(std::mem::offset_of!(Context, frame) == 0);
    assert!(std::mem::align_of::<Context>() >= 2 && std::mem::align_of::<Frame>() >= 2);
};

impl Window {
    /// A window owning `ctx` (whose frame holds the buffer).
    #[inline(always)]
    pub(crate) fn owning(ctx: Box<Context>) -> Window {
        let p = NonNull::from(Box::leak(ctx)).cast::<Frame>();
        Window {
            p: p.map_addr(|a| a | 1),
        }
    }

    /// The frame's pointer, tag cleared, provenance kept.
    #[inline(always)]
    fn frame_ptr(&self) -> NonNull<Frame> {
        // SAFETY: clearing bit 0 of an address that is at least 2 (a pointer-aligned, non-null
        // one, possibly with bit 0 set) leaves it non-zero.
        self.p
            .map_addr(|a| unsafe { NonZeroUsize::new_unchecked(a.get() & !1) })
    }

    #[inline(always)]
    fn owns(&self) -> bool {
        self.p.addr().get() & 1 == 1
    }

    /// The buffer and the byte where the request starts.
    #[inline(always)]
    pub(crate) fn frame(&self) -> &Frame {
        // SAFETY: the pointer is that of a live frame: with bit 0 set, the first field of the
        // box this window owns (freed only by `into_context` and `drop`, which consume the
        // window); with bit 0 clear, the frame `Frame::lend` borrowed for longer than this
        // window lives. No `&mut` to it exists meanwhile but through `&mut self`.
        unsafe { self.frame_ptr().as_ref() }
    }

    /// [`frame`](Self::frame), mutably.
    #[inline(always)]
    pub(crate) fn frame_mut(&mut self) -> &mut Frame {
        // SAFETY: as in `frame`; `&mut self` makes the access exclusive (the window is the
        // only way to the frame while it lives).
        unsafe { self.frame_ptr().as_mut() }
    }

    /// The context this window owns, the window consumed (`None` for a lent window).
    #[inline(always)]
    pub(crate) fn into_context(self) -> Option<Box<Context>> {
        if !self.owns() {
            return None;
        }
        let this = std::mem::ManuallyDrop::new(self);
        // SAFETY: the window owns its context (checked above) and is never used nor dropped
        // again (`ManuallyDrop`).
        Some(unsafe { this.take_box() })
    }

    /// The owned context as a box again.
    ///
    /// # Safety
    /// The window must own its context (bit 0 set), and must never be used again afterwards
    /// (neither read nor dropped): the box is freed by whoever holds it.
    #[inline(always)]
    unsafe fn take_box(&self) -> Box<Context> {
        debug_assert!(self.owns());
        // SAFETY: bit 0 set (the caller's contract): the pointer (tag cleared, provenance
        // kept) is the one `Box::leak` gave in `owning`, cast from `Context` to its first
        // field and back, and not freed yet (only `into_context` and `drop` free it, each
        // once, as the window's last use): turned back into a box exactly once.
        unsafe { Box::from_raw(self.frame_ptr().cast::<Context>().as_ptr()) }
    }

    /// The bytes of the request.
    pub(crate) fn bytes(&self) -> &[u8] {
        let f = self.frame();
        &f.buf.as_slice()[f.start..]
    }
}

impl Drop for Window {
    #[inline(always)]
    fn drop(&mut self) {
        if self.owns() {
            // SAFETY: the window owns its context (checked above) and is being dropped: this
            // is its last use.
            drop(unsafe { self.take_box() });
        }
    }
}

/// One DMA-mapped segment of a [`Window`], carried by a bio to the poller.
#[derive(Debug)]
pub struct Seg(pub(crate) DmaSlice);

impl DmaSegment for Seg {
    const NOOP_UNMAP: bool = true;
    fn unmap(self) {
        // Nothing to undo: the memory was registered with the device once, at allocation.
    }
}

impl IoBuf for Window {
    type Seg = Seg;

    #[inline]
    fn len(&self) -> u64 {
        let f = self.frame();
        (f.buf.len() - f.start) as u64
    }

    #[inline(always)]
    fn dma_map(&self, off: u64, len: u64, _dir: Dir) -> Result<Seg, DioError> {
        let f = self.frame();
        let IoBuffer::Dma(b) = &f.buf else {
            return Err(DioError::Fault);
        };
        let at = f.start + off as usize;
        match b.slice(at, len as usize) {
            Some(s) if (b.as_ptr() as usize + at) % 4 == 0 => Ok(Seg(s)),
            _ => Err(DioError::Fault),
        }
    }

    fn zero_fill(&mut self, off: u64, len: u64) {
        let f = self.frame_mut();
        let at = f.start + off as usize;
        f.buf.as_mut_slice()[at..at + len as usize].fill(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heap_windows_are_not_dma_mappable() {
        let mut f = Frame {
            buf: IoBuffer::Heap(vec![1; 4096]),
            start: 100,
        };
        // SAFETY: the window is only used here, and given back before `f` is used again.
        let (mut w, lent) = unsafe { f.lend() };
        assert_eq!(w.len(), 3996);
        assert_eq!(w.dma_map(0, 512, Dir::Read).unwrap_err(), DioError::Fault);
        assert_eq!(w.bytes()[0], 1);
        w.zero_fill(1, 2);
        f.end_lend(w, lent);
        assert_eq!(f.buf.as_slice()[100..104], [1, 0, 0, 1]);
    }

    /// A panic unwinding out of a synchronous request while its frame is lent (bios possibly
    /// still on the device) leaks the buffer rather than leaving it to be freed with the frame.
    #[test]
    fn an_unwind_while_lent_leaks_the_buffer() {
        let mut f = Frame {
            buf: IoBuffer::Heap(vec![7; 4096]),
            start: 0,
        };
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            // SAFETY: the window is only used here; the guard is declared after the frame
            // (which outlives this closure).
            let (w, _lent) = unsafe { f.lend() };
            assert_eq!(w.len(), 4096);
            panic!("a broken invariant while the request is on the device");
        }));
        assert!(r.is_err());
        assert_eq!(
            f.buf.len(),
            0,
            "the lent buffer was left to the frame to free"
        );
    }

    /// The window is one word (what dio-core moves a dozen times per request), and so is an
    /// `Option` of it.
    #[test]
    fn a_window_is_one_word() {
        assert_eq!(std::mem::size_of::<Window>(), std::mem::size_of::<usize>());
        assert_eq!(
            std::mem::size_of::<Option<Window>>(),
            std::mem::size_of::<usize>()
        );
    }
}
