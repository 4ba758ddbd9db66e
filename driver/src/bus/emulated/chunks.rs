//! DMA memory of the emulated controller: anonymous memory at IOVAs unrelated to its addresses.
//!
//! Chunks get IOVAs from [`IOVA_BASE`] upwards with a [`GUARD`] gap between them, far from where
//! Linux places user mappings, so a driver that puts a virtual address (or an address just past a
//! buffer) into a PRP is caught by [`crate::bus::dma::DmaMemory::ptr_of`] as a DMA fault instead of
//! silently working.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::bus::dma::{ChunkSource, DmaChunk, anon};
use crate::types::Iova;

/// IOVA of the first chunk.
pub const IOVA_BASE: u64 = 0x1_0000_0000;
/// Unmapped IOVA space left after each chunk.
pub const GUARD: u64 = 2 << 20;
/// Chunk granule: chunks are a multiple of this size.
pub const GRANULE: usize = 2 << 20;

/// A [`ChunkSource`] over anonymous memory for the emulated controller.
#[derive(Debug)]
pub struct EmulatedChunkSource {
    next_iova: AtomicU64,
}

impl EmulatedChunkSource {
    /// A source whose first chunk is at [`IOVA_BASE`].
    pub fn new() -> EmulatedChunkSource {
        EmulatedChunkSource {
            next_iova: AtomicU64::new(IOVA_BASE),
        }
    }
}

impl Default for EmulatedChunkSource {
    fn default() -> Self {
        Self::new()
    }
}

impl ChunkSource for EmulatedChunkSource {
    fn name(&self) -> &'static str {
        "emulated"
    }

    fn map_chunk(
        &self,
        min_len: usize,
    ) -> Result<DmaChunk, Box<dyn std::error::Error + Send + Sync>> {
        let len = min_len.max(1).div_ceil(GRANULE) * GRANULE;
        let vaddr = anon::map(len, false)?;
        let iova = self
            .next_iova
            .fetch_add(len as u64 + GUARD, Ordering::Relaxed);
        Ok(DmaChunk {
            vaddr,
            iova: Iova(iova),
            len,
        })
    }

    unsafe fn unmap_chunk(&self, chunk: DmaChunk) {
        // SAFETY: the chunk came from `anon::map` with exactly this length (contract of
        // `unmap_chunk`), and is not used afterwards.
        unsafe { anon::unmap(chunk.vaddr, chunk.len) };
    }
}
