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
//! dio-core sees a [`Window`]: the buffer plus the byte of it where the direct part starts (an
//! unaligned head is done through the cache first), and, for an asynchronous request, a pointer
//! to its pooled context (held range, byte accounting, the user's callback), which dio-core
//! hands back to the completion function with the buffer (its `cb_arg`). [`IoBuf::dma_map`]
//! answers `Fault` for a heap buffer or a segment whose address is not dword aligned (NVMe PRP
//! rule).

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

/// The part of an [`IoBuffer`] a dio-core request covers: `buf[start..]`, and the context of
/// an asynchronous request (dio-core's `cb_arg`).
///
/// dio-core moves the window by value a dozen times per request, so it is kept to the buffer
/// and one word, a tagged pointer: without a context, an address-only pointer (no provenance)
/// whose address is `start << 1`; while a context is attached, the pointer to that context (a
/// pooled `Box<Context>`, which then holds `start`) with bit 0 of its address set. A
/// `Box<Context>` is at least 2-aligned, so bit 0 of its address is free. The tag is set and
/// cleared with the strict-provenance APIs (`map_addr`), so the pointer keeps the provenance
/// of the box all the way (as Miri or a CHERI target require). The window owns an attached
/// context: [`detach`](Window::detach) hands it back, dropping the window drops it.
#[derive(Debug)]
pub struct Window {
    pub(crate) buf: IoBuffer,
    tail: *mut Context,
}

// SAFETY: `buf` is an `IoBuffer`, itself `Send` and `Sync` (checked below). `tail` is either
// an address without provenance (nothing is reached through it) or the pointer of a
// `Box<Context>` that the window owns exclusively (as if it held the box): moving the window
// to another thread moves that box, and a `&Window` only reads the context's `start`. Both are
// sound because `Context` is `Send` and `Sync` (checked below).
unsafe impl Send for Window {}
// SAFETY: see `Send` above.
unsafe impl Sync for Window {}

const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<Context>();
    send_sync::<IoBuffer>();
};

impl Window {
    pub(crate) fn new(buf: IoBuffer, start: usize) -> Self {
        debug_assert!(start <= usize::MAX >> 1);
        Window {
            buf,
            tail: std::ptr::without_provenance_mut(start << 1),
        }
    }

    /// The attached context, if any (its pointer, tag cleared, provenance kept).
    #[inline(always)]
    fn context(&self) -> Option<*mut Context> {
        (self.tail.addr() & 1 == 1).then(|| self.tail.map_addr(|a| a & !1))
    }

    /// The byte of the buffer where the request starts.
    #[inline(always)]
    pub(crate) fn start(&self) -> usize {
        match self.context() {
            None => self.tail.addr() >> 1,
            // SAFETY: bit 0 set: `tail` is the pointer of the box leaked by `attach`, which
            // this window owns (only `detach` and `drop` free it, and both clear the tag
            // first), so it is alive; we only read it.
            Some(c) => unsafe { (*c).start() },
        }
    }

    /// Attach an asynchronous request's context (at most one).
    #[inline(always)]
    pub(crate) fn attach(&mut self, mut ctx: Box<Context>) {
        if let Some(old) = self.detach() {
            drop(old);
        }
        ctx.set_start(self.tail.addr() >> 1);
        let p = Box::into_raw(ctx);
        debug_assert_eq!(p.addr() & 1, 0, "a Box<Context> is at least 2-aligned");
        self.tail = p.map_addr(|a| a | 1);
    }

    /// Take the attached context back.
    #[inline(always)]
    pub(crate) fn detach(&mut self) -> Option<Box<Context>> {
        let c = self.context()?;
        // SAFETY: `c` is the pointer `Box::into_raw` gave in `attach` (its tag cleared, its
        // provenance kept), owned by this window and not freed (the tag was still set); the
        // tag is cleared right below, so it is turned back into a box exactly once.
        let ctx = unsafe { Box::from_raw(c) };
        self.tail = std::ptr::without_provenance_mut(ctx.start() << 1);
        Some(ctx)
    }

    /// The buffer, the window consumed (an attached context is dropped).
    #[inline(always)]
    pub(crate) fn into_buf(mut self) -> IoBuffer {
        drop(self.detach());
        let this = std::mem::ManuallyDrop::new(self);
        // SAFETY: `this` is never used nor dropped again, so its buffer is moved out exactly
        // once; nothing else of the window needs dropping (the context was detached above).
        unsafe { std::ptr::read(&this.buf) }
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        &self.buf.as_slice()[self.start()..]
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        drop(self.detach());
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
        (self.buf.len() - self.start()) as u64
    }

    #[inline(always)]
    fn dma_map(&self, off: u64, len: u64, _dir: Dir) -> Result<Seg, DioError> {
        let IoBuffer::Dma(b) = &self.buf else {
            return Err(DioError::Fault);
        };
        let at = self.start() + off as usize;
        match b.slice(at, len as usize) {
            Some(s) if (b.as_ptr() as usize + at) % 4 == 0 => Ok(Seg(s)),
            _ => Err(DioError::Fault),
        }
    }

    fn zero_fill(&mut self, off: u64, len: u64) {
        let at = self.start() + off as usize;
        self.buf.as_mut_slice()[at..at + len as usize].fill(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heap_windows_are_not_dma_mappable() {
        let w = Window::new(IoBuffer::Heap(vec![1; 4096]), 100);
        assert_eq!(w.len(), 3996);
        assert_eq!(w.dma_map(0, 512, Dir::Read).unwrap_err(), DioError::Fault);
        assert_eq!(w.bytes()[0], 1);
    }
}
