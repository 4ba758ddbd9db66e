//! DMA chunks for a VFIO device: 2 MiB hugepages (or 4 KiB pages), pinned and mapped into the
//! IOMMU once per chunk at an IOVA from our allocator.
//!
//! Each chunk is an anonymous private mapping (`MAP_HUGETLB | MAP_HUGE_2MB` for hugepages,
//! `MAP_POPULATE` so it is backed at once) held as a vm-memory [`GuestRegionMmap`] whose
//! "guest address" is the chunk's IOVA: to the device, IOVA space is what guest-physical space is
//! to a VM. Anonymous hugepages leave no files behind in a hugetlbfs mount when the process
//! dies. `MADV_DONTFORK` keeps a forked child from sharing (and copy-on-write splitting) pages
//! the device writes to.
//!
//! `VFIO_IOMMU_MAP_DMA` pins the pages (charged to RLIMIT_MEMLOCK unless the process has
//! CAP_IPC_LOCK) and installs the translation; `VFIO_IOMMU_UNMAP_DMA` undoes both. A chunk is
//! unmapped from the IOMMU before its memory is freed, so the device can never reach a page the
//! kernel has given to someone else.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vfio_ioctls::VfioContainer;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{GuestAddress, GuestMemoryRegion, GuestRegionMmap};

use crate::bus::dma::{ChunkSource, DmaChunk};
use crate::types::Iova;

use super::diag::{self, SysRoots};
use super::error::VfioError;
use super::iova::IovaAllocator;
use super::sys;

/// Bytes in a hugepage.
pub const HUGEPAGE: usize = 2 << 20;

struct State {
    iova: IovaAllocator,
    regions: Vec<GuestRegionMmap>,
}

/// The [`ChunkSource`] of a [`super::VfioBus`].
pub(crate) struct VfioMemory {
    container: Arc<VfioContainer>,
    state: Mutex<State>,
    hugepages: bool,
    granule: usize,
    align: u64,
    /// Set once the device is closed and its group left the container: the kernel has then
    /// dropped every IOMMU mapping itself, and `VFIO_IOMMU_UNMAP_DMA` would fail.
    detached: Arc<AtomicBool>,
    /// Set when the device was removed and released ([`Bus::release_removed`]): the kernel may
    /// refuse unmaps then (the container keeps the pinned memory until it is closed, which
    /// the bus's drop does right after), so a failure is expected and not an error.
    ///
    /// [`Bus::release_removed`]: crate::bus::Bus::release_removed
    removed: Arc<AtomicBool>,
    roots: SysRoots,
}

/// What the DMA memory must know of its device: closed and its group detached, or removed and
/// released (see the fields of [`VfioMemory`]).
pub(crate) struct DeviceFlags {
    pub detached: Arc<AtomicBool>,
    pub removed: Arc<AtomicBool>,
}

impl VfioMemory {
    pub fn new(
        container: Arc<VfioContainer>,
        iova: IovaAllocator,
        hugepages: bool,
        granule: usize,
        iommu_page: u64,
        device: DeviceFlags,
        roots: SysRoots,
    ) -> VfioMemory {
        let DeviceFlags { detached, removed } = device;
        let page = if hugepages {
            HUGEPAGE
        } else {
            crate::spec::PAGE_SIZE
        };
        let granule = granule.max(page).next_multiple_of(page);
        VfioMemory {
            container,
            state: Mutex::new(State {
                iova,
                regions: Vec::new(),
            }),
            hugepages,
            granule,
            align: (page as u64).max(iommu_page),
            detached,
            removed,
            roots,
        }
    }

    fn map(&self, min_len: usize) -> Result<DmaChunk, VfioError> {
        let len = min_len.max(1).next_multiple_of(self.granule);
        let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE;
        if self.hugepages {
            flags |= libc::MAP_HUGETLB | libc::MAP_HUGE_2MB;
        }
        let region = MmapRegionBuilder::<()>::new(len)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(flags)
            .with_hugetlbfs(self.hugepages)
            .build()
            .map_err(|e| {
                if self.hugepages {
                    if let Err(short) = diag::check_hugepages(&self.roots, len as u64) {
                        return short;
                    }
                }
                VfioError::Io {
                    addr: String::new(),
                    step: format!(
                        "allocate {len} bytes of DMA memory ({})",
                        if self.hugepages {
                            "2 MiB hugepages"
                        } else {
                            "4 KiB pages"
                        }
                    ),
                    source: std::io::Error::other(e),
                }
            })?;
        let ptr = core::ptr::NonNull::new(region.as_ptr()).ok_or_else(|| VfioError::Io {
            addr: String::new(),
            step: "map DMA memory".into(),
            source: std::io::Error::other("null mapping"),
        })?;
        // Not fatal: only a fork would be affected.
        let _ = sys::dont_fork(ptr, len);

        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let iova =
            st.iova
                .alloc(len as u64, self.align)
                .ok_or_else(|| VfioError::IovaExhausted {
                    len: len as u64,
                    mapped: st.iova.allocated(),
                    ranges: st.iova.describe(),
                })?;
        // SAFETY: `[ptr, ptr + len)` is a fresh private mapping owned by `region`, which we keep
        // in `st.regions` until `unmap_chunk` has unmapped the IOVA range; no Rust reference to it
        // exists now, and afterwards the DMA-memory ownership rules (crate::bus::dma) decide who may
        // touch which bytes: buffers are borrowed by the CPU only while no command uses them,
        // queue memory only with volatile accesses.
        let mapped = unsafe { self.container.vfio_dma_map(iova, len, ptr.as_ptr()) };
        if let Err(e) = mapped {
            st.iova.free(iova, len as u64);
            let errno = super::error::errno_of(&e).unwrap_or(libc::EIO);
            return Err(VfioError::DmaMap {
                iova,
                len: len as u64,
                source: std::io::Error::from_raw_os_error(errno),
            });
        }
        let region = GuestRegionMmap::new(region, GuestAddress(iova)).ok_or_else(|| {
            VfioError::IovaExhausted {
                len: len as u64,
                mapped: st.iova.allocated(),
                ranges: st.iova.describe(),
            }
        })?;
        st.regions.push(region);
        Ok(DmaChunk {
            vaddr: ptr,
            iova: Iova(iova),
            len,
        })
    }
}

impl ChunkSource for VfioMemory {
    fn name(&self) -> &'static str {
        if self.hugepages {
            "vfio (2 MiB hugepages)"
        } else {
            "vfio (4 KiB pages)"
        }
    }

    fn map_chunk(
        &self,
        min_len: usize,
    ) -> Result<DmaChunk, Box<dyn std::error::Error + Send + Sync>> {
        self.map(min_len).map_err(Into::into)
    }

    unsafe fn unmap_chunk(&self, chunk: DmaChunk) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let Some(i) = st
            .regions
            .iter()
            .position(|r| r.start_addr().0 == chunk.iova.0)
        else {
            log::error!("vfio: unmap of unknown DMA chunk at iova {}", chunk.iova);
            return;
        };
        let region = st.regions.swap_remove(i);
        // First the IOMMU mapping (the device loses access), then the memory.
        if !self.detached.load(Ordering::Acquire) {
            if let Err(e) = self.container.vfio_dma_unmap(chunk.iova.0, chunk.len) {
                let level = if self.removed.load(Ordering::Acquire) {
                    log::Level::Debug
                } else {
                    log::Level::Error
                };
                log::log!(
                    level,
                    "vfio: VFIO_IOMMU_UNMAP_DMA of iova {} ({} bytes) failed: {e}",
                    chunk.iova,
                    chunk.len
                );
            }
        }
        drop(region);
        st.iova.free(chunk.iova.0, chunk.len as u64);
    }
}
