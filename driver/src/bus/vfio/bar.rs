//! BAR0: the controller's registers, mapped where VFIO allows it and read or written through the
//! region file offset where it does not.
//!
//! VFIO describes which parts of a BAR may be mapped: the whole region when it has the MMAP flag
//! and no sparse-mmap capability, only the listed areas when it has one (typically everything but
//! the page holding the MSI-X table on kernels that do not report `MSIX_MAPPABLE`), nothing
//! without the flag. Registers inside a mapped area are accessed with single volatile 32-bit
//! loads and stores; the others with `pread`/`pwrite` on the device file, which the kernel turns
//! into the same bus accesses. A failed `pread` reads as all ones, like a removed device.
//!
//! Surprise removal: reads of a mapped BAR of a device that has gone return all ones (the driver
//! checks for that); on some platforms an access raises SIGBUS instead: every mapped area is
//! registered with the process-wide SIGBUS handler (`sigbus`), which maps all-ones memory over
//! it so the access reads all ones too. [`Bar0::retire`] does the same on the kernel's request
//! to release the device, and points the file descriptor at `/dev/null`, so neither the mapping
//! nor the descriptor keeps the device file open while doorbells still hold this `Bar0`.

use core::ptr::NonNull;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::bus::DoorbellSink;

use super::{sigbus, sys};

/// One mapped part of BAR0.
#[derive(Debug)]
pub(crate) struct Area {
    /// Offset within BAR0.
    pub offset: u64,
    /// Length.
    pub len: usize,
    /// Where it is mapped.
    pub ptr: NonNull<u8>,
}

/// BAR0 of an open device.
#[derive(Debug)]
pub(crate) struct Bar0 {
    /// Our own duplicate of the device fd, for the `pread`/`pwrite` path; it also keeps the
    /// device open as long as a doorbell holds this BAR.
    fd: OwnedFd,
    /// Offset of the BAR0 region in the device file.
    region_offset: u64,
    /// Size of BAR0.
    size: u64,
    /// Mapped areas.
    areas: Vec<Area>,
    /// Register accesses that failed on the `pread`/`pwrite` path.
    io_errors: AtomicU64,
    /// The areas' registrations with the SIGBUS handler.
    guards: Vec<sigbus::Registration>,
    /// Set by [`Bar0::retire`].
    retired: AtomicBool,
}

// SAFETY: the areas are device memory accessed only with volatile single-register operations,
// which any thread may perform; the fd is a plain owned descriptor.
unsafe impl Send for Bar0 {}
// SAFETY: as above; no method hands out references into the mapping.
unsafe impl Sync for Bar0 {}

impl Bar0 {
    /// Maps the areas `areas` (offset, length within BAR0) of the region at `region_offset`.
    pub fn map(
        fd: OwnedFd,
        region_offset: u64,
        size: u64,
        areas: &[(u64, u64)],
    ) -> std::io::Result<Bar0> {
        let mut bar = Bar0 {
            fd,
            region_offset,
            size,
            areas: Vec::new(),
            io_errors: AtomicU64::new(0),
            guards: Vec::new(),
            retired: AtomicBool::new(false),
        };
        for &(offset, len) in areas {
            if len == 0 || offset.checked_add(len).is_none_or(|e| e > size) {
                continue;
            }
            let ptr = sys::mmap_device(bar.fd.as_raw_fd(), region_offset + offset, len as usize)?;
            bar.areas.push(Area {
                offset,
                len: len as usize,
                ptr,
            });
            bar.guards
                .extend(sigbus::register(ptr.as_ptr() as usize, len as usize));
        }
        Ok(bar)
    }

    /// The device was removed: maps all-ones memory over every area (register reads return
    /// all ones, doorbell writes go nowhere) and points the file descriptor at `/dev/null`
    /// (`pread` then fails: all ones), so that this `Bar0` no longer holds the device file.
    /// Errors are logged: the device is gone either way. Idempotent.
    pub fn retire(&self) {
        if self.retired.swap(true, Ordering::AcqRel) {
            return;
        }
        for a in &self.areas {
            if let Err(e) = sigbus::retire(a.ptr.as_ptr() as usize, a.len) {
                log::warn!("vfio: could not replace a BAR0 mapping after removal: {e}");
            }
        }
        if let Err(e) = sys::point_at_dev_null(self.fd.as_raw_fd()) {
            log::warn!("vfio: could not release BAR0's device file descriptor: {e}");
        }
    }

    /// Mapped areas.
    pub fn areas(&self) -> &[Area] {
        &self.areas
    }

    /// Size of BAR0.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The mapped address of the 4-byte register at `offset`, if mapped.
    #[inline]
    pub fn reg_ptr(&self, offset: u32) -> Option<NonNull<u32>> {
        let off = offset as u64;
        if off % 4 != 0 {
            return None;
        }
        self.areas.iter().find_map(|a| {
            (off >= a.offset && off + 4 <= a.offset + a.len as u64).then(|| {
                // SAFETY: the register lies inside the area, so the pointer stays in the mapping.
                unsafe { NonNull::new_unchecked(a.ptr.as_ptr().add((off - a.offset) as usize)) }
                    .cast()
            })
        })
    }

    /// Reads the 32-bit register at `offset`; all ones if it cannot be read.
    #[inline]
    pub fn read32(&self, offset: u32) -> u32 {
        if let Some(p) = self.reg_ptr(offset) {
            // SAFETY: `p` is an aligned register inside a live mapping of BAR0.
            return unsafe { p.as_ptr().read_volatile() };
        }
        let mut b = [0xffu8; 4];
        if !self.in_bar(offset)
            || sys::pread_exact(
                self.fd.as_raw_fd(),
                &mut b,
                self.region_offset + offset as u64,
            )
            .is_err()
        {
            self.io_errors.fetch_add(1, Ordering::Relaxed);
            return u32::MAX;
        }
        u32::from_le_bytes(b)
    }

    /// Writes the 32-bit register at `offset`, after every earlier store to DMA memory (the
    /// admin queue memory before CC.EN, for example) is visible to the device.
    #[inline]
    pub fn write32(&self, offset: u32, value: u32) {
        if let Some(p) = self.reg_ptr(offset) {
            crate::bus::dma_wmb();
            // SAFETY: `p` is an aligned register inside a live mapping of BAR0.
            unsafe { p.as_ptr().write_volatile(value) };
            return;
        }
        if !self.in_bar(offset)
            || sys::pwrite_all(
                self.fd.as_raw_fd(),
                &value.to_le_bytes(),
                self.region_offset + offset as u64,
            )
            .is_err()
        {
            self.io_errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn in_bar(&self, offset: u32) -> bool {
        offset % 4 == 0 && offset as u64 + 4 <= self.size
    }

    /// Register accesses that failed (outside the BAR, or `pread`/`pwrite` errors).
    pub fn io_errors(&self) -> u64 {
        self.io_errors.load(Ordering::Relaxed)
    }
}

/// A doorbell outside every mapped area is written through the region file.
impl DoorbellSink for Bar0 {
    fn ring(&self, offset: u32, value: u32) {
        self.write32(offset, value);
    }
}

impl Drop for Bar0 {
    fn drop(&mut self) {
        self.guards.clear();
        for a in self.areas.drain(..) {
            // SAFETY: each area is one whole mapping made in `map`; doorbells and the bus that
            // could still reach it hold this `Bar0`, which is being dropped.
            if let Err(e) = unsafe { sys::munmap(a.ptr, a.len) } {
                log::error!("vfio: munmap of BAR0 area failed: {e}");
            }
        }
    }
}

/// The areas of BAR0 to map, from the region's flags and sparse-mmap capability.
pub(crate) fn mmap_areas(
    size: u64,
    mmap_flag: bool,
    sparse: Option<&[(u64, u64)]>,
) -> Vec<(u64, u64)> {
    if !mmap_flag {
        return Vec::new();
    }
    match sparse {
        Some(areas) => areas.to_vec(),
        None => vec![(0, size)],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn areas_follow_flags_and_sparse_list() {
        assert_eq!(mmap_areas(0x4000, true, None), vec![(0, 0x4000)]);
        assert_eq!(mmap_areas(0x4000, false, None), vec![]);
        let sparse = [(0, 0x2000), (0x3000, 0x1000)];
        assert_eq!(mmap_areas(0x4000, true, Some(&sparse)), sparse.to_vec());
    }

    /// A file stands in for the device: mapped areas are read by mmap, the hole by pread.
    #[test]
    fn sparse_bar_uses_mapping_and_pread() {
        let path = std::env::temp_dir().join(format!("dioxide-bar-{}", std::process::id()));
        let mut f = std::fs::File::create(&path).unwrap();
        let mut data = vec![0u8; 0x5000];
        for (i, w) in data.chunks_mut(4).enumerate() {
            w.copy_from_slice(&(i as u32).to_le_bytes());
        }
        f.write_all(&data).unwrap();
        drop(f);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        // BAR0 at region offset 0x1000, 0x4000 long; the page at BAR offset 0x2000 not mappable.
        let bar = Bar0::map(
            OwnedFd::from(f),
            0x1000,
            0x4000,
            &[(0, 0x2000), (0x3000, 0x1000), (0x3000, 0x2000)],
        )
        .unwrap();
        assert_eq!(bar.areas().len(), 2, "an area past the BAR is ignored");
        assert!(bar.reg_ptr(0x1ffc).is_some());
        assert!(bar.reg_ptr(0x2000).is_none());
        assert!(bar.reg_ptr(0x3000).is_some());
        assert!(bar.reg_ptr(0x3002).is_none(), "unaligned");
        // Word i of the file is i; BAR offset x is file offset 0x1000 + x.
        assert_eq!(bar.read32(0), 0x400);
        assert_eq!(bar.read32(0x2004), (0x3004 / 4) as u32, "through pread");
        assert_eq!(bar.read32(0x3ffc), (0x4ffc / 4) as u32);
        bar.write32(0x2008, 0xdead_beef);
        assert_eq!(bar.read32(0x2008), 0xdead_beef);
        bar.ring(0x10, 7);
        assert_eq!(bar.read32(0x10), 7);
        assert_eq!(bar.io_errors(), 0);
        assert_eq!(
            bar.read32(0x4000),
            u32::MAX,
            "outside the BAR reads all ones"
        );
        bar.write32(0x4000, 1);
        assert_eq!(bar.io_errors(), 2);
        drop(bar);
        let back = std::fs::read(&path).unwrap();
        assert_eq!(&back[0x3008..0x300c], &0xdead_beefu32.to_le_bytes());
        assert_eq!(&back[0x1010..0x1014], &7u32.to_le_bytes());
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn retired_bar_reads_all_ones_and_drops_writes() {
        let path = std::env::temp_dir().join(format!("dioxide-bar-retire-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; 0x3000]).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        let bar = Bar0::map(
            OwnedFd::from(f),
            0,
            0x3000,
            &[(0, 0x1000), (0x2000, 0x1000)],
        )
        .unwrap();
        assert_eq!(bar.read32(0x1000), 0, "through pread");
        assert_eq!(bar.read32(0x4), 0);
        bar.retire();
        bar.retire();
        assert_eq!(bar.read32(0x4), u32::MAX, "mapped area");
        assert_eq!(bar.read32(0x2008), u32::MAX, "second mapped area");
        assert_eq!(bar.read32(0x1000), u32::MAX, "pread on /dev/null");
        bar.write32(0x4, 1);
        bar.write32(0x1000, 1);
        bar.ring(0x2000, 1);
    }
}
