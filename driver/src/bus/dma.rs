//! DMA memory: pinned memory the controller can reach, and its I/O virtual addresses.
//!
//! A backend supplies large *chunks* (2 MiB hugepages mapped once with `VFIO_IOMMU_MAP_DMA`, or
//! anonymous memory for the emulated controller) through [`ChunkSource`]; [`DmaMemory`]
//! sub-allocates them in 4 KiB pages. Allocation and freeing take a lock, and happen when queues
//! and buffers are created, never per I/O. Translation (address to IOVA, IOVA to address) reads an
//! append-only chunk table without a lock, through a hint per 2 MiB granule of the address (the
//! chunk that last held one of its addresses): one range check for every chunk seen before,
//! whatever the number of chunks, and a scan of the table only when the hint does not hold.
//!
//! Ownership of data buffers: a [`DmaBuffer`] belongs to the CPU while no command uses it, and
//! may then be read and written as an ordinary slice; while a command is in flight the device
//! owns it, which the APIs that submit I/O enforce by borrowing or taking the buffer (or, for the
//! raw [`DmaSlice`] interface, by an `unsafe` contract). Queue memory (submission and completion
//! queues, PRP lists) is shared with the device for its whole life and is only accessed with
//! volatile or atomic operations by the code that owns it.

use core::ptr::NonNull;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crate::spec::PAGE_SIZE;
use crate::types::Iova;

/// Most chunks one [`DmaMemory`] can hold.
pub const MAX_CHUNKS: usize = 1024;

/// Slots of each translation hint table (a power of two).
const HINT_SLOTS: usize = 64;
/// Addresses in one 2 MiB granule share a hint slot.
const HINT_GRANULE_SHIFT: u32 = 21;

/// The hint slot of an address (IOVA or process address): its 2 MiB granule, hashed so that
/// granules spaced at any power of two spread over the slots.
#[inline(always)]
fn hint_slot(addr: u64) -> usize {
    ((addr >> HINT_GRANULE_SHIFT).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        >> (64 - HINT_SLOTS.trailing_zeros())) as usize
}

/// Errors from DMA memory.
#[derive(Debug, thiserror::Error)]
pub enum DmaError {
    /// A zero-length allocation.
    #[error("cannot allocate a zero-length DMA buffer")]
    ZeroLength,
    /// A length no allocation can have (its page-rounded size overflows the address space).
    #[error(
        "cannot allocate a DMA buffer of {len} bytes: larger than the address space; ask for less"
    )]
    TooLarge {
        /// Bytes asked for.
        len: usize,
    },
    /// The chunk table is full.
    #[error(
        "DMA memory has reached its limit of {MAX_CHUNKS} chunks; allocate fewer, larger buffers"
    )]
    TooManyChunks,
    /// The backend could not supply a chunk.
    #[error("failed to get {len} bytes of DMA memory from {source_name}: {source}")]
    Source {
        /// Bytes asked for.
        len: usize,
        /// Which backend.
        source_name: &'static str,
        /// The backend's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// A chunk of pinned memory mapped for device access at a contiguous IOVA range.
#[derive(Clone, Copy, Debug)]
pub struct DmaChunk {
    /// Address in this process.
    pub vaddr: NonNull<u8>,
    /// Address the device uses.
    pub iova: Iova,
    /// Length in bytes (a multiple of `PAGE_SIZE`, 4 KiB).
    pub len: usize,
}

// SAFETY: a chunk is a description of memory owned by the `ChunkSource`; it carries no borrowed
// data and the memory stays mapped until the source unmaps it when `DmaMemory` is dropped.
unsafe impl Send for DmaChunk {}
// SAFETY: as above; sharing the description does not access the memory.
unsafe impl Sync for DmaChunk {}

/// Where DMA chunks come from (the backend).
pub trait ChunkSource: Send + Sync {
    /// A name for messages (`vfio 0000:01:00.0 hugepages`, `emulated`).
    fn name(&self) -> &'static str;
    /// Allocates, pins and maps a zeroed chunk of at least `min_len` bytes.
    fn map_chunk(
        &self,
        min_len: usize,
    ) -> Result<DmaChunk, Box<dyn std::error::Error + Send + Sync>>;
    /// Unmaps and frees a chunk returned by `map_chunk`.
    ///
    /// # Safety
    /// `chunk` came from `map_chunk` on this source, is unmapped at most once, and no buffer
    /// in it is used afterwards (no CPU access and no device DMA).
    unsafe fn unmap_chunk(&self, chunk: DmaChunk);
}

struct ChunkState {
    /// Free page runs (first page, page count), sorted by first page.
    free: Vec<(usize, usize)>,
}

struct Inner {
    source: Box<dyn ChunkSource>,
    /// A fixed-size array, so that a hinted index masked to its size needs no bounds check.
    table: Box<[OnceLock<DmaChunk>; MAX_CHUNKS]>,
    count: AtomicUsize,
    /// Translation hints, by [`hint_slot`] of an IOVA: the index of the chunk that last held an
    /// IOVA of that slot. Only a hint: a lookup checks the chunk's range and scans the table
    /// when it does not match (a slot shared by two chunks, or never filled), then stores what
    /// it found. So a lookup costs one slot and one range check for every chunk once seen,
    /// not a scan of the table.
    by_iova: [AtomicU16; HINT_SLOTS],
    /// The same, by [`hint_slot`] of a process address.
    by_addr: [AtomicU16; HINT_SLOTS],
    state: Mutex<Vec<ChunkState>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let n = *self.count.get_mut();
        for slot in &self.table[..n] {
            if let Some(chunk) = slot.get() {
                // SAFETY: every chunk came from `map_chunk`, is unmapped once here, and no buffer
                // outlives `Inner` (each `DmaBuffer` holds an `Arc<Inner>`).
                unsafe { self.source.unmap_chunk(*chunk) };
            }
        }
    }
}

/// DMA memory of one bus: allocation of [`DmaBuffer`]s and address translation.
#[derive(Clone)]
pub struct DmaMemory {
    inner: Arc<Inner>,
}

impl core::fmt::Debug for DmaMemory {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "DmaMemory({}, {} chunks)",
            self.inner.source.name(),
            self.chunk_count()
        )
    }
}

impl DmaMemory {
    /// DMA memory fed by `source`.
    pub fn new(source: Box<dyn ChunkSource>) -> DmaMemory {
        DmaMemory {
            inner: Arc::new(Inner {
                source,
                table: Box::new([const { OnceLock::new() }; MAX_CHUNKS]),
                count: AtomicUsize::new(0),
                by_iova: [const { AtomicU16::new(0) }; HINT_SLOTS],
                by_addr: [const { AtomicU16::new(0) }; HINT_SLOTS],
                state: Mutex::new(Vec::new()),
            }),
        }
    }

    /// True if `self` and `other` are handles of one memory (one address space of one bus).
    pub fn same(&self, other: &DmaMemory) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// Allocates a zeroed, 4 KiB aligned buffer of at least `len` bytes, contiguous in IOVA space.
    pub fn alloc(&self, len: usize) -> Result<DmaBuffer, DmaError> {
        if len == 0 {
            return Err(DmaError::ZeroLength);
        }
        let pages = len.div_ceil(PAGE_SIZE);
        let bytes = pages
            .checked_mul(PAGE_SIZE)
            .filter(|&b| b <= isize::MAX as usize)
            .ok_or(DmaError::TooLarge { len })?;
        let mut state = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
        let found = state.iter_mut().enumerate().find_map(|(ci, c)| {
            let run = c.free.iter().position(|&(_, n)| n >= pages)?;
            let (first, n) = c.free[run];
            if n == pages {
                c.free.remove(run);
            } else {
                c.free[run] = (first + pages, n - pages);
            }
            Some((ci, first))
        });
        let (ci, first) = match found {
            Some(f) => f,
            None => {
                let idx = self.inner.count.load(Ordering::Relaxed);
                if idx >= MAX_CHUNKS {
                    return Err(DmaError::TooManyChunks);
                }
                let chunk =
                    self.inner
                        .source
                        .map_chunk(bytes)
                        .map_err(|source| DmaError::Source {
                            len: bytes,
                            source_name: self.inner.source.name(),
                            source,
                        })?;
                let total = chunk.len / PAGE_SIZE;
                debug_assert!(total >= pages, "chunk source returned a short chunk");
                let _ = self.inner.table[idx].set(chunk);
                self.inner.count.store(idx + 1, Ordering::Release);
                let free = if total > pages {
                    vec![(pages, total - pages)]
                } else {
                    Vec::new()
                };
                state.push(ChunkState { free });
                (idx, 0)
            }
        };
        drop(state);
        let chunk = self.chunk(ci).expect("chunk index was just allocated");
        let off = first * PAGE_SIZE;
        // SAFETY: `off + pages * PAGE_SIZE <= chunk.len`, so the pointer stays inside the chunk.
        let ptr = unsafe { NonNull::new_unchecked(chunk.vaddr.as_ptr().add(off)) };
        // SAFETY: the pages were free: no other buffer and no device command refers to them.
        unsafe { ptr.as_ptr().write_bytes(0, bytes) };
        Ok(DmaBuffer {
            mem: self.clone(),
            ptr,
            iova: Iova(chunk.iova.0 + off as u64),
            len,
            chunk: ci,
            first_page: first,
            pages,
        })
    }

    fn free(&self, chunk: usize, first: usize, pages: usize) {
        let mut state = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
        let free = &mut state[chunk].free;
        let at = free.partition_point(|&(f, _)| f < first);
        free.insert(at, (first, pages));
        // Merge with the next run, then with the previous one.
        if at + 1 < free.len() && free[at].0 + free[at].1 == free[at + 1].0 {
            free[at].1 += free[at + 1].1;
            free.remove(at + 1);
        }
        if at > 0 && free[at - 1].0 + free[at - 1].1 == free[at].0 {
            free[at - 1].1 += free[at].1;
            free.remove(at);
        }
    }

    fn chunk(&self, i: usize) -> Option<&DmaChunk> {
        self.inner.table.get(i)?.get()
    }

    /// The chunk a translation hint names, if it is mapped (whether it holds the range is the
    /// caller's check).
    #[inline(always)]
    fn hinted(&self, hint: &AtomicU16) -> Option<&DmaChunk> {
        const { assert!(MAX_CHUNKS.is_power_of_two() && MAX_CHUNKS <= 1 << 16) };
        // Masked: a hint is always a table index, and the mask spares the bounds check.
        self.inner.table[hint.load(Ordering::Relaxed) as usize & (MAX_CHUNKS - 1)].get()
    }

    /// The chunks mapped so far with their index in the table.
    fn indexed_chunks(&self) -> impl Iterator<Item = (usize, &DmaChunk)> {
        let n = self.inner.count.load(Ordering::Acquire);
        self.inner.table[..n]
            .iter()
            .enumerate()
            .filter_map(|(i, slot)| Some((i, slot.get()?)))
    }

    /// Number of chunks mapped so far.
    pub fn chunk_count(&self) -> usize {
        self.inner.count.load(Ordering::Acquire)
    }

    /// The IOVA of `[ptr, ptr + len)` if the whole range lies in one chunk of this memory.
    pub fn translate(&self, ptr: *const u8, len: usize) -> Option<Iova> {
        let a = ptr as usize;
        let end = a.checked_add(len)?;
        let (base, c) = self.chunk_of_addr(a, end)?;
        Some(Iova(c.iova.0 + (a - base) as u64))
    }

    /// The chunk holding the process addresses `[a, end)`, and its base address: the hinted one
    /// if it does, else found by a scan (which updates the hint).
    #[inline(always)]
    fn chunk_of_addr(&self, a: usize, end: usize) -> Option<(usize, &DmaChunk)> {
        let hint = &self.inner.by_addr[hint_slot(a as u64)];
        if let Some(c) = self.hinted(hint) {
            let base = c.vaddr.as_ptr() as usize;
            if a >= base && end <= base + c.len {
                return Some((base, c));
            }
        }
        self.chunk_of_addr_scan(hint, a, end)
    }

    #[cold]
    #[inline(never)]
    fn chunk_of_addr_scan(
        &self,
        hint: &AtomicU16,
        a: usize,
        end: usize,
    ) -> Option<(usize, &DmaChunk)> {
        let (i, c) = self.indexed_chunks().find(|(_, c)| {
            let base = c.vaddr.as_ptr() as usize;
            a >= base && end <= base + c.len
        })?;
        // `i < MAX_CHUNKS`, which fits in a u16.
        hint.store(i as u16, Ordering::Relaxed);
        Some((c.vaddr.as_ptr() as usize, c))
    }

    /// [`translate`](Self::translate) that looks in the chunk `cache` remembers first, and
    /// remembers the chunk it found otherwise: not even a hint lookup while ranges come from
    /// one chunk. `cache` must only ever be used with this memory (chunks stay mapped as long as
    /// it lives).
    #[inline]
    pub(crate) fn translate_cached(
        &self,
        cache: &mut ChunkCache,
        ptr: *const u8,
        len: usize,
    ) -> Option<Iova> {
        let a = ptr as usize;
        let end = a.checked_add(len)?;
        if a >= cache.base && end <= cache.end {
            return Some(Iova(cache.iova + (a - cache.base) as u64));
        }
        self.translate_miss(cache, a, end)
    }

    #[cold]
    #[inline(never)]
    fn translate_miss(&self, cache: &mut ChunkCache, a: usize, end: usize) -> Option<Iova> {
        let (base, c) = self.chunk_of_addr(a, end)?;
        *cache = ChunkCache {
            base,
            end: base + c.len,
            iova: c.iova.0,
        };
        Some(Iova(c.iova.0 + (a - base) as u64))
    }

    /// The process address of `[iova, iova + len)` if the whole range lies in one chunk.
    ///
    /// This is how the emulated controller reaches host memory, like an IOMMU translating a
    /// device's request. A range outside every chunk is a DMA fault. The chunk is looked up
    /// through a hint by the IOVA's 2 MiB granule (one range check for a chunk seen before),
    /// and the table is scanned only when the hint does not hold the range.
    #[inline]
    pub fn ptr_of(&self, iova: Iova, len: usize) -> Option<NonNull<u8>> {
        match self.ptr_of_hinted(iova, len) {
            Some(p) => Some(p),
            None => self.ptr_of_scanned(iova, len),
        }
    }

    /// [`ptr_of`](Self::ptr_of) if the chunk the IOVA's hint names holds the range; `None`
    /// otherwise (not a fault: ask [`ptr_of_scanned`](Self::ptr_of_scanned)). For a caller
    /// that keeps the rare scan out of line whole, so its own fast path saves no registers
    /// for a call.
    #[inline(always)]
    pub(crate) fn ptr_of_hinted(&self, iova: Iova, len: usize) -> Option<NonNull<u8>> {
        let end = iova.0.checked_add(len as u64)?;
        let c = self.hinted(&self.inner.by_iova[hint_slot(iova.0)])?;
        if iova.0 >= c.iova.0 && end <= c.iova.0 + c.len as u64 {
            // SAFETY: the offset is within the chunk, so the result is in bounds and non-null.
            Some(unsafe {
                NonNull::new_unchecked(c.vaddr.as_ptr().add((iova.0 - c.iova.0) as usize))
            })
        } else {
            None
        }
    }

    /// [`ptr_of`](Self::ptr_of) by a scan of the table, which makes the chunk found the hint of
    /// the IOVA's slot.
    #[cold]
    #[inline(never)]
    pub(crate) fn ptr_of_scanned(&self, iova: Iova, len: usize) -> Option<NonNull<u8>> {
        let end = iova.0.checked_add(len as u64)?;
        let hint = &self.inner.by_iova[hint_slot(iova.0)];
        let c = self.chunk_of_iova_scan(hint, iova.0, end)?;
        // SAFETY: the offset is within the chunk, so the result is in bounds and non-null.
        Some(unsafe { NonNull::new_unchecked(c.vaddr.as_ptr().add((iova.0 - c.iova.0) as usize)) })
    }

    #[inline(always)]
    fn chunk_of_iova_scan(&self, hint: &AtomicU16, iova: u64, end: u64) -> Option<&DmaChunk> {
        let (i, c) = self
            .indexed_chunks()
            .find(|(_, c)| iova >= c.iova.0 && end <= c.iova.0 + c.len as u64)?;
        // `i < MAX_CHUNKS`, which fits in a u16.
        hint.store(i as u16, Ordering::Relaxed);
        Some(c)
    }

    /// A raw slice descriptor for `[ptr, ptr + len)` if it lies in DMA memory.
    pub fn slice_of(&self, ptr: *mut u8, len: usize) -> Option<DmaSlice> {
        let iova = self.translate(ptr, len)?;
        Some(DmaSlice {
            ptr: NonNull::new(ptr)?,
            iova,
            len,
        })
    }
}

/// The address range and IOVA of the chunk of the last translation
/// ([`DmaMemory::translate_cached`]); empty at first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ChunkCache {
    base: usize,
    end: usize,
    iova: u64,
}

impl Default for ChunkCache {
    fn default() -> Self {
        // `base > end`: no range lies inside.
        ChunkCache {
            base: usize::MAX,
            end: 0,
            iova: 0,
        }
    }
}

/// A buffer in DMA memory, 4 KiB aligned, zeroed at allocation; freed on drop.
pub struct DmaBuffer {
    mem: DmaMemory,
    ptr: NonNull<u8>,
    iova: Iova,
    len: usize,
    chunk: usize,
    first_page: usize,
    pages: usize,
}

// SAFETY: the buffer exclusively owns its pages; moving it to another thread moves that ownership.
unsafe impl Send for DmaBuffer {}
// SAFETY: shared access only hands out `&[u8]` and addresses; mutation needs `&mut self`.
unsafe impl Sync for DmaBuffer {}

impl DmaBuffer {
    /// Length asked for at allocation.
    pub fn len(&self) -> usize {
        self.len
    }
    /// True if the length is zero (never, since zero-length allocations fail).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Bytes actually reserved (a multiple of 4 KiB).
    pub fn capacity(&self) -> usize {
        self.pages * PAGE_SIZE
    }
    /// IOVA of the first byte.
    pub fn iova(&self) -> Iova {
        self.iova
    }
    /// Address of the first byte.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    /// The contents (no command is using the buffer while it is borrowed).
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `len` bytes at `ptr` belong to this buffer; a device write would need a command
        // submitted with this buffer, which requires `&mut self` or the unsafe raw interface.
        unsafe { core::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
    /// The contents, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` excludes every other access.
        unsafe { core::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
    /// The whole buffer as a raw descriptor.
    pub fn as_dma_slice(&self) -> DmaSlice {
        DmaSlice {
            ptr: self.ptr,
            iova: self.iova,
            len: self.len,
        }
    }
    /// `[start, start + len)` of the buffer as a raw descriptor, or `None` if out of bounds.
    pub fn slice(&self, start: usize, len: usize) -> Option<DmaSlice> {
        if start.checked_add(len)? > self.len {
            return None;
        }
        Some(DmaSlice {
            // SAFETY: `start <= self.len`, so the pointer stays within the buffer.
            ptr: unsafe { NonNull::new_unchecked(self.ptr.as_ptr().add(start)) },
            iova: Iova(self.iova.0 + start as u64),
            len,
        })
    }
    /// The memory this buffer came from.
    pub fn memory(&self) -> &DmaMemory {
        &self.mem
    }
    /// True if this buffer came from `mem` (the same memory, not merely the same kind).
    pub fn is_from(&self, mem: &DmaMemory) -> bool {
        self.mem.same(mem)
    }
}

impl Drop for DmaBuffer {
    fn drop(&mut self) {
        self.mem.free(self.chunk, self.first_page, self.pages);
    }
}

impl core::fmt::Debug for DmaBuffer {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "DmaBuffer({} bytes at {:p}, iova {})",
            self.len,
            self.ptr.as_ptr(),
            self.iova
        )
    }
}

/// A raw descriptor of a range of DMA memory: address, IOVA and length. It does not own the
/// memory; the interfaces that hand it to the device say what must hold while it is in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaSlice {
    /// Address of the first byte in this process.
    pub ptr: NonNull<u8>,
    /// IOVA of the first byte.
    pub iova: Iova,
    /// Length in bytes.
    pub len: usize,
}

// SAFETY: a descriptor is plain data; using the memory it names is governed by the interfaces
// that accept it.
unsafe impl Send for DmaSlice {}
// SAFETY: as above.
unsafe impl Sync for DmaSlice {}

/// Anonymous, page-aligned memory from `mmap`, optionally with hugepages; used by the emulated
/// controller's chunk source (the VFIO backend maps its chunks through vm-memory).
#[cfg(any(test, feature = "emulated"))]
pub(crate) mod anon {
    use core::ptr::NonNull;

    /// Maps `len` bytes of zeroed anonymous memory, from the hugepage pool when `hugetlb` is set.
    pub fn map(len: usize, hugetlb: bool) -> std::io::Result<NonNull<u8>> {
        let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
        if hugetlb {
            flags |= libc::MAP_HUGETLB;
        }
        // SAFETY: an anonymous mapping with no address hint has no preconditions.
        let p = unsafe {
            libc::mmap(
                core::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        NonNull::new(p.cast()).ok_or_else(|| std::io::Error::other("mmap returned null"))
    }

    /// Unmaps memory returned by [`map`].
    ///
    /// # Safety
    /// `ptr`/`len` must be exactly a mapping returned by [`map`], not used afterwards.
    pub unsafe fn unmap(ptr: NonNull<u8>, len: usize) {
        // SAFETY: by the caller's contract this is a whole mapping of ours.
        unsafe { libc::munmap(ptr.as_ptr().cast(), len) };
    }
}

/// DMA memory over anonymous mappings, for unit tests that need no device (whatever the bus
/// features).
#[cfg(test)]
pub(crate) fn test_memory() -> DmaMemory {
    DmaMemory::new(Box::new(tests::TestSource {
        next_iova: std::sync::atomic::AtomicU64::new(0x1_0000_0000),
        granule: 64 * 1024,
        unmapped: Arc::new(AtomicUsize::new(0)),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    /// A chunk source over anonymous memory with IOVAs in a separate range.
    pub(super) struct TestSource {
        pub next_iova: AtomicU64,
        pub granule: usize,
        pub unmapped: Arc<AtomicUsize>,
    }
    impl ChunkSource for TestSource {
        fn name(&self) -> &'static str {
            "test"
        }
        fn map_chunk(
            &self,
            min_len: usize,
        ) -> Result<DmaChunk, Box<dyn std::error::Error + Send + Sync>> {
            let len = min_len.div_ceil(self.granule) * self.granule;
            let vaddr = anon::map(len, false)?;
            let iova = Iova(
                self.next_iova
                    .fetch_add(len as u64 + 0x10_0000, Ordering::Relaxed),
            );
            Ok(DmaChunk { vaddr, iova, len })
        }
        unsafe fn unmap_chunk(&self, chunk: DmaChunk) {
            self.unmapped.fetch_add(1, Ordering::Relaxed);
            // SAFETY: the chunk came from `anon::map` with this length.
            unsafe { anon::unmap(chunk.vaddr, chunk.len) };
        }
    }

    fn mem(unmapped: Arc<AtomicUsize>) -> DmaMemory {
        DmaMemory::new(Box::new(TestSource {
            next_iova: AtomicU64::new(0x1_0000_0000),
            granule: 64 * 1024,
            unmapped,
        }))
    }

    #[test]
    fn a_length_beyond_the_address_space_is_refused() {
        let m = mem(Arc::new(AtomicUsize::new(0)));
        for len in [usize::MAX, usize::MAX - PAGE_SIZE, isize::MAX as usize + 1] {
            assert!(
                matches!(m.alloc(len), Err(DmaError::TooLarge { len: l }) if l == len),
                "{len}"
            );
        }
        assert_eq!(m.chunk_count(), 0);
        assert!(m.alloc(PAGE_SIZE).is_ok());
    }

    #[test]
    fn a_buffer_knows_its_memory() {
        let (m, n) = (mem(Arc::new(AtomicUsize::new(0))), test_memory());
        let b = m.alloc(100).unwrap();
        assert!(m.same(&m.clone()) && !m.same(&n));
        assert!(b.is_from(&m) && b.is_from(&m.clone()) && !b.is_from(&n));
    }

    #[test]
    fn alloc_translate_free_merge() {
        let unmapped = Arc::new(AtomicUsize::new(0));
        let m = mem(unmapped.clone());
        assert!(matches!(m.alloc(0), Err(DmaError::ZeroLength)));
        let mut a = m.alloc(100).unwrap();
        let b = m.alloc(3 * PAGE_SIZE).unwrap();
        assert_eq!(m.chunk_count(), 1);
        assert_eq!(a.iova().0 % PAGE_SIZE as u64, 0);
        assert_eq!(b.iova().0, a.iova().0 + PAGE_SIZE as u64);
        assert!(a.as_slice().iter().all(|&x| x == 0));
        a.as_mut_slice().fill(0xab);
        // Translation in both directions, and rejection outside the memory.
        // SAFETY: offset 10 is inside the 3-page buffer `b`.
        let p = unsafe { b.as_ptr().add(10) };
        assert_eq!(m.translate(p, 100), Some(Iova(b.iova().0 + 10)));
        assert_eq!(m.ptr_of(Iova(b.iova().0 + 10), 100).unwrap().as_ptr(), p);
        let heap = [0u8; 64];
        assert_eq!(m.translate(heap.as_ptr(), 64), None);
        assert_eq!(m.ptr_of(Iova(0x10), 1), None);
        assert!(m.slice_of(heap.as_ptr() as *mut u8, 64).is_none());
        // A range that runs past the chunk is not translated.
        assert_eq!(m.translate(a.as_ptr(), 64 * 1024 + 1), None);
        // A buffer larger than the granule gets its own chunk.
        let big = m.alloc(200 * 1024).unwrap();
        assert_eq!(m.chunk_count(), 2);
        assert_eq!(big.capacity(), 200 * 1024);
        // Freed pages are reused and zeroed again.
        let a_iova = a.iova();
        drop(a);
        drop(b);
        let c = m.alloc(4 * PAGE_SIZE).unwrap();
        assert_eq!(c.iova(), a_iova, "the freed runs merged into one");
        assert!(c.as_slice().iter().all(|&x| x == 0));
        assert_eq!(
            c.slice(PAGE_SIZE, 8).unwrap().iova.0,
            c.iova().0 + PAGE_SIZE as u64
        );
        assert!(c.slice(4 * PAGE_SIZE - 1, 2).is_none());
        drop((c, big));
        assert_eq!(unmapped.load(Ordering::Relaxed), 0);
        drop(m);
        assert_eq!(
            unmapped.load(Ordering::Relaxed),
            2,
            "every chunk unmapped once at teardown"
        );
    }

    #[test]
    fn cached_translation_agrees_with_the_table_and_follows_the_last_chunk() {
        let m = mem(Arc::new(AtomicUsize::new(0)));
        // Three chunks: the granule is 64 KiB, so each of these gets its own.
        let bufs: Vec<_> = (0..3).map(|_| m.alloc(64 * 1024).unwrap()).collect();
        assert_eq!(m.chunk_count(), 3);
        let heap = [0u8; 64];
        let mut cache = ChunkCache::default();
        // Probes: inside each chunk, its last byte, a range straddling its end, the whole chunk,
        // and memory outside every chunk.
        let mut probes = vec![(heap.as_ptr(), 64), (core::ptr::null(), 1)];
        for b in &bufs {
            let p = b.as_ptr().cast_const();
            // SAFETY: both offsets are within the buffer's 64 KiB.
            let (mid, last) = unsafe { (p.add(4096), p.add(65535)) };
            probes.extend([(p, 512), (mid, 4096), (last, 1), (last, 2), (p, 65536)]);
        }
        for round in 0..2 {
            for (i, &(p, len)) in probes.iter().enumerate() {
                let before = cache;
                let got = m.translate_cached(&mut cache, p, len);
                assert_eq!(got, m.translate(p, len), "round {round} probe {i}");
                if got.is_none() {
                    assert_eq!(cache, before, "a miss leaves the cache alone");
                } else {
                    // The cache now names the chunk of that range, and a hit needs no table.
                    assert!(cache.base <= p as usize && p as usize + len <= cache.end);
                    assert_eq!(cache.end - cache.base, 64 * 1024);
                }
            }
        }
        // A hit is answered from the cache alone: a cache naming made-up memory is believed.
        let fake = ChunkCache {
            base: heap.as_ptr() as usize,
            end: heap.as_ptr() as usize + 64,
            iova: 0x4000,
        };
        cache = fake;
        // SAFETY: offset 8 is inside `heap`.
        let p = unsafe { heap.as_ptr().add(8) };
        assert_eq!(m.translate_cached(&mut cache, p, 8), Some(Iova(0x4008)));
        assert_eq!(cache, fake);
    }

    #[test]
    fn hinted_lookups_agree_with_a_scan_for_every_chunk_and_remember_the_chunk() {
        let m = mem(Arc::new(AtomicUsize::new(0)));
        // More chunks than hint slots, so slots are shared and a hint is often another chunk's.
        let n = 3 * HINT_SLOTS;
        let bufs: Vec<_> = (0..n).map(|_| m.alloc(64 * 1024).unwrap()).collect();
        assert_eq!(m.chunk_count(), n);
        let scan_iova = |iova: u64, len: usize| {
            m.indexed_chunks().find_map(|(i, c)| {
                (iova >= c.iova.0 && iova + len as u64 <= c.iova.0 + c.len as u64).then_some(i)
            })
        };
        let scan_addr = |a: usize, len: usize| {
            m.indexed_chunks().find_map(|(i, c)| {
                let base = c.vaddr.as_ptr() as usize;
                (a >= base && a + len <= base + c.len).then_some(i)
            })
        };
        // Visit the chunks in an order that is not the table's, twice: the first visits fill
        // the hints, the second find them (or another chunk's, where slots are shared).
        for round in 0..2 {
            for k in 0..n {
                let i = (k * 7 + round) % n;
                let b = &bufs[i];
                for (off, len) in [(0, 512), (4096, 4096), (65535, 1), (0, 65536)] {
                    let iova = b.iova().0 + off as u64;
                    // SAFETY: `off < 64 KiB`, inside the buffer.
                    let p = unsafe { b.as_ptr().add(off) };
                    assert_eq!(scan_iova(iova, len), Some(i));
                    assert_eq!(
                        m.ptr_of(Iova(iova), len).map(NonNull::as_ptr),
                        Some(p),
                        "chunk {i} +{off}"
                    );
                    assert_eq!(
                        m.inner.by_iova[hint_slot(iova)].load(Ordering::Relaxed) as usize,
                        i,
                        "a found chunk is the IOVA's hint"
                    );
                    assert_eq!(scan_addr(p as usize, len), Some(i));
                    assert_eq!(m.translate(p, len), Some(Iova(iova)), "chunk {i} +{off}");
                    assert_eq!(
                        m.inner.by_addr[hint_slot(p as u64)].load(Ordering::Relaxed) as usize,
                        i,
                        "a found chunk is the address's hint"
                    );
                    // A range running past the chunk is in none, whatever the hint says.
                    assert_eq!(m.ptr_of(Iova(iova), 65537 - off), None);
                    assert_eq!(m.translate(p, 65537 - off), None);
                }
            }
        }
        // A stale hint (another chunk's, or past the table) is checked, not believed; a miss
        // leaves it alone.
        let b = &bufs[5];
        let slot = hint_slot(b.iova().0);
        for stale in [6, n, MAX_CHUNKS - 1] {
            m.inner.by_iova[slot].store(stale as u16, Ordering::Relaxed);
            assert_eq!(m.ptr_of(b.iova(), 8).map(NonNull::as_ptr), Some(b.as_ptr()));
            assert_eq!(m.inner.by_iova[slot].load(Ordering::Relaxed), 5);
        }
        let before = m.inner.by_iova[hint_slot(0x10)].load(Ordering::Relaxed);
        assert_eq!(m.ptr_of(Iova(0x10), 1), None);
        assert_eq!(
            m.inner.by_iova[hint_slot(0x10)].load(Ordering::Relaxed),
            before
        );
    }

    #[test]
    fn buffers_keep_memory_alive() {
        let unmapped = Arc::new(AtomicUsize::new(0));
        let m = mem(unmapped.clone());
        let a = m.alloc(1).unwrap();
        drop(m);
        assert_eq!(unmapped.load(Ordering::Relaxed), 0);
        drop(a);
        assert_eq!(unmapped.load(Ordering::Relaxed), 1);
    }
}
