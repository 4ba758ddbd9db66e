//! Our IOVA allocator, and the parser of `VFIO_IOMMU_GET_INFO`'s answer.
//!
//! IOVAs are the addresses the controller puts on the bus; the IOMMU translates them to the
//! physical pages behind our DMA chunks. We choose them ourselves instead of reusing virtual
//! addresses (what SPDK calls "VA mode") because user virtual addresses can exceed the IOMMU's
//! address width (47 bits against 39 or 48 on common VT-d units), and can land in the ranges the
//! IOMMU reserves. The allocator hands out ranges only inside the *usable* space:
//!
//! - the ranges the kernel reports in the "iova ranges" capability of `VFIO_IOMMU_GET_INFO`
//!   (they already exclude the MSI window and firmware-reserved regions and end at the IOMMU's
//!   address width), or, without that capability, `[base, 2^39)` — 39 bits is the narrowest
//!   address width of current VT-d and AMD-Vi units;
//! - minus the x86 MSI window `0xfee00000..=0xfeffffff` in every case (writes there are
//!   interrupts, not memory);
//! - at or above a low nonzero base (IOVA 0 would make a null PRP look valid).
//!
//! Chunks are allocated when DMA memory grows and freed at teardown, never per I/O, so a
//! first-fit list of free ranges is all it needs.

use core::fmt;

use vfio_bindings::bindings::vfio::{
    VFIO_IOMMU_INFO_CAPS, VFIO_IOMMU_INFO_PGSIZES, VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE,
    VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL,
};

/// The x86 MSI window: device writes here are interrupt messages.
pub const MSI_WINDOW: IovaRange = IovaRange {
    start: 0xfee0_0000,
    end: 0xfeff_ffff,
};
/// Address width assumed when the kernel does not report IOVA ranges.
pub const DEFAULT_ADDRESS_BITS: u32 = 39;
/// Lowest IOVA handed out by default (2 MiB: nonzero and hugepage aligned).
pub const DEFAULT_BASE: u64 = 0x20_0000;

/// An inclusive range of IOVAs, `start..=end` (the kernel's convention).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct IovaRange {
    /// First address.
    pub start: u64,
    /// Last address (inclusive).
    pub end: u64,
}

impl IovaRange {
    /// Bytes in the range (saturating at `u64::MAX` for the whole space).
    pub fn len(&self) -> u64 {
        (self.end - self.start).saturating_add(1)
    }
    /// Never empty: a range holds at least its first address.
    pub fn is_empty(&self) -> bool {
        false
    }
}

impl fmt::Display for IovaRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}..={:#x}", self.start, self.end)
    }
}

/// What `VFIO_IOMMU_GET_INFO` said about the IOMMU.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IommuInfo {
    /// Supported IOMMU page sizes (bit n set: 2^n bytes), 0 if not reported.
    pub page_sizes: u64,
    /// Usable IOVA ranges, if the kernel reported them (Linux 5.4 and later).
    pub ranges: Option<Vec<IovaRange>>,
    /// Mappings still available (`dma_entry_limit`), if reported.
    pub dma_avail: Option<u32>,
}

impl IommuInfo {
    /// The smallest IOMMU page size (4 KiB if not reported).
    pub fn min_page_size(&self) -> u64 {
        if self.page_sizes == 0 {
            crate::spec::PAGE_SIZE as u64
        } else {
            1 << self.page_sizes.trailing_zeros()
        }
    }
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(off..off + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(off..off + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

/// Parses the buffer filled by `VFIO_IOMMU_GET_INFO` (a `vfio_iommu_type1_info` followed by its
/// capability chain). Returns `None` if the buffer is malformed.
pub fn parse_iommu_info(buf: &[u8]) -> Option<IommuInfo> {
    // struct vfio_iommu_type1_info { u32 argsz, flags; u64 iova_pgsizes; u32 cap_offset, pad; }
    let flags = u32_at(buf, 4)?;
    let mut info = IommuInfo::default();
    if flags & VFIO_IOMMU_INFO_PGSIZES != 0 {
        info.page_sizes = u64_at(buf, 8)?;
    }
    if flags & VFIO_IOMMU_INFO_CAPS == 0 {
        return Some(info);
    }
    let mut off = u32_at(buf, 16)? as usize;
    let mut hops = 0;
    while off != 0 {
        hops += 1;
        if hops > 64 || off < 24 {
            return None; // a loop or a pointer back into the header
        }
        // struct vfio_info_cap_header { u16 id, version; u32 next; }
        let id = u16_at(buf, off)? as u32;
        let next = u32_at(buf, off + 4)? as usize;
        match id {
            VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE => {
                // { header; u32 nr_iovas, reserved; struct { u64 start, end; } ranges[]; }
                let n = u32_at(buf, off + 8)? as usize;
                let mut ranges = Vec::with_capacity(n.min(64));
                for i in 0..n {
                    let at = off + 16 + i * 16;
                    let (start, end) = (u64_at(buf, at)?, u64_at(buf, at + 8)?);
                    if end < start {
                        return None;
                    }
                    ranges.push(IovaRange { start, end });
                }
                info.ranges = Some(ranges);
            }
            VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL => info.dma_avail = Some(u32_at(buf, off + 8)?),
            _ => {}
        }
        off = next;
    }
    Some(info)
}

/// First-fit allocator of IOVA ranges inside the usable space.
#[derive(Clone, Debug)]
pub struct IovaAllocator {
    /// Free ranges, sorted and disjoint.
    free: Vec<IovaRange>,
    /// The usable space at creation, for messages.
    usable: Vec<IovaRange>,
    allocated: u64,
}

impl IovaAllocator {
    /// An allocator over `ranges` (the kernel's usable ranges, or `None` for
    /// `[0, 2^address_bits)`), clipped to `base..` and with the MSI window removed.
    pub fn new(ranges: Option<&[IovaRange]>, base: u64, address_bits: u32) -> IovaAllocator {
        let whole = [IovaRange {
            start: 0,
            end: if address_bits >= 64 {
                u64::MAX
            } else {
                (1u64 << address_bits) - 1
            },
        }];
        let mut src: Vec<IovaRange> = ranges.unwrap_or(&whole).to_vec();
        src.sort_by_key(|r| r.start);
        let mut free: Vec<IovaRange> = Vec::new();
        for r in src {
            let start = r.start.max(base);
            if start > r.end {
                continue;
            }
            let r = IovaRange { start, end: r.end };
            for piece in subtract(r, MSI_WINDOW) {
                // Merge touching or overlapping input ranges.
                match free.last_mut() {
                    Some(last) if piece.start <= last.end.saturating_add(1) => {
                        last.end = last.end.max(piece.end)
                    }
                    _ => free.push(piece),
                }
            }
        }
        IovaAllocator {
            usable: free.clone(),
            free,
            allocated: 0,
        }
    }

    /// Allocates `len` bytes aligned to `align` (a power of two). `None` when no free range fits.
    pub fn alloc(&mut self, len: u64, align: u64) -> Option<u64> {
        assert!(
            align.is_power_of_two(),
            "IOVA alignment must be a power of two"
        );
        if len == 0 {
            return None;
        }
        let (i, start) = self.free.iter().enumerate().find_map(|(i, r)| {
            let start = r.start.checked_add(align - 1)? & !(align - 1);
            let last = start.checked_add(len - 1)?;
            (last <= r.end).then_some((i, start))
        })?;
        let r = self.free.remove(i);
        let taken = IovaRange {
            start,
            end: start + len - 1,
        };
        for (k, piece) in subtract(r, taken).into_iter().enumerate() {
            self.free.insert(i + k, piece);
        }
        self.allocated += len;
        Some(start)
    }

    /// Returns `[iova, iova + len)` to the free space.
    pub fn free(&mut self, iova: u64, len: u64) {
        if len == 0 {
            return;
        }
        let r = IovaRange {
            start: iova,
            end: iova + len - 1,
        };
        let at = self.free.partition_point(|f| f.start < r.start);
        debug_assert!(
            at == self.free.len() || self.free[at].start > r.end,
            "double free of IOVA {r}"
        );
        debug_assert!(
            at == 0 || self.free[at - 1].end < r.start,
            "double free of {r}"
        );
        self.free.insert(at, r);
        if at + 1 < self.free.len() && self.free[at].end + 1 == self.free[at + 1].start {
            self.free[at].end = self.free[at + 1].end;
            self.free.remove(at + 1);
        }
        if at > 0 && self.free[at - 1].end + 1 == self.free[at].start {
            self.free[at - 1].end = self.free[at].end;
            self.free.remove(at);
        }
        self.allocated -= len;
    }

    /// Bytes currently allocated.
    pub fn allocated(&self) -> u64 {
        self.allocated
    }

    /// The usable space as text.
    pub fn describe(&self) -> String {
        let v: Vec<String> = self.usable.iter().map(ToString::to_string).collect();
        format!("[{}]", v.join(", "))
    }
}

/// `r` minus `hole`: zero, one or two ranges.
fn subtract(r: IovaRange, hole: IovaRange) -> Vec<IovaRange> {
    if hole.end < r.start || hole.start > r.end {
        return vec![r];
    }
    let mut out = Vec::with_capacity(2);
    if hole.start > r.start {
        out.push(IovaRange {
            start: r.start,
            end: hole.start - 1,
        });
    }
    if hole.end < r.end {
        out.push(IovaRange {
            start: hole.end + 1,
            end: r.end,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB2: u64 = 2 << 20;

    fn overlaps_msi(start: u64, len: u64) -> bool {
        start <= MSI_WINDOW.end && start + len > MSI_WINDOW.start
    }

    #[test]
    fn default_space_starts_at_base_and_skips_msi_window() {
        let a = IovaAllocator::new(None, DEFAULT_BASE, 39);
        assert_eq!(
            a.usable,
            &[
                IovaRange {
                    start: DEFAULT_BASE,
                    end: 0xfedf_ffff
                },
                IovaRange {
                    start: 0xff00_0000,
                    end: (1 << 39) - 1
                }
            ]
        );
        let mut a = a;
        let first = a.alloc(MB2, MB2).unwrap();
        assert_eq!(first, DEFAULT_BASE, "first chunk at the low nonzero base");
        // Fill up to the window: no allocation may touch it.
        let mut last = first;
        while let Some(i) = a.alloc(MB2, MB2) {
            assert!(!overlaps_msi(i, MB2), "{i:#x} overlaps the MSI window");
            last = i;
            if i > 0x1_0000_0000 {
                break;
            }
        }
        assert!(last > MSI_WINDOW.end);
    }

    #[test]
    fn big_allocation_jumps_over_the_window() {
        // 3.5 GiB free below the window at base 2 MiB; ask for 4 GiB.
        let mut a = IovaAllocator::new(None, DEFAULT_BASE, 39);
        let i = a.alloc(4 << 30, MB2).unwrap();
        assert_eq!(
            i, 0xff00_0000,
            "first 2 MiB aligned address above the window"
        );
        assert!(!overlaps_msi(i, 4 << 30));
        // The space below the window is still there.
        assert_eq!(a.alloc(MB2, MB2), Some(DEFAULT_BASE));
    }

    #[test]
    fn kernel_ranges_are_respected() {
        // What VT-d with a 39-bit width reports: the MSI window carved out already.
        let ranges = [
            IovaRange {
                start: 0,
                end: 0xfedf_ffff,
            },
            IovaRange {
                start: 0xfef0_0000,
                end: 0x7f_ffff_ffff,
            },
        ];
        let mut a = IovaAllocator::new(Some(&ranges), 0x1000, 64);
        // Our own MSI carve-out also removes 0xfef00000..=0xfeffffff.
        assert_eq!(a.usable[1].start, 0xff00_0000);
        assert_eq!(
            a.usable[1].end, 0x7f_ffff_ffff,
            "the reported width is kept"
        );
        assert_eq!(a.alloc(4096, 4096), Some(0x1000));
        // A range above the width is never handed out.
        let mut n = 0;
        while let Some(i) = a.alloc(1 << 36, 1 << 36) {
            assert!(i + (1 << 36) - 1 <= 0x7f_ffff_ffff);
            n += 1;
        }
        assert_eq!(
            n, 7,
            "the eight 64 GiB slots minus the first one (low space in use)"
        );

        // A narrow window from the kernel (e.g. a reserved region splitting the space).
        let narrow = [
            IovaRange {
                start: 0x10_0000,
                end: 0x3f_ffff,
            },
            IovaRange {
                start: 0x100_0000,
                end: 0x1ff_ffff,
            },
        ];
        let mut a = IovaAllocator::new(Some(&narrow), 0x1000, 64);
        assert_eq!(a.alloc(MB2, MB2), Some(0x20_0000));
        assert_eq!(a.alloc(MB2, MB2), Some(0x100_0000), "skips the hole");
    }

    #[test]
    fn alignment_and_exhaustion() {
        let r = [IovaRange {
            start: 0x1000,
            end: 0x80_0fff,
        }];
        let mut a = IovaAllocator::new(Some(&r), 0x1000, 64);
        let x = a.alloc(4096, 4096).unwrap();
        assert_eq!(x, 0x1000);
        let y = a.alloc(MB2, MB2).unwrap();
        assert_eq!(y % MB2, 0);
        assert_eq!(y, 0x20_0000);
        let z = a.alloc(MB2, MB2).unwrap();
        let w = a.alloc(MB2, MB2).unwrap();
        assert_eq!((z, w), (0x40_0000, 0x60_0000));
        assert_eq!(a.alloc(MB2, MB2), None, "no 2 MiB aligned slot left");
        // The unaligned leftovers still serve small allocations.
        assert_eq!(a.alloc(4096, 4096), Some(0x2000));
        assert_eq!(a.allocated(), 3 * MB2 + 2 * 4096);
        // Freeing merges the space back.
        a.free(z, MB2);
        assert_eq!(a.alloc(MB2, MB2), Some(z));
        a.free(y, MB2);
        a.free(z, MB2);
        a.free(w, MB2);
        a.free(x, 4096);
        a.free(0x2000, 4096);
        assert_eq!(a.allocated(), 0);
        assert_eq!(a.alloc(0x80_0000, 4096), Some(0x1000), "fully merged");
        assert_eq!(a.alloc(1, 1), None, "exhausted");
        assert_eq!(a.alloc(0, 4096), None);
    }

    #[test]
    fn top_of_64_bit_space_does_not_overflow() {
        let r = [IovaRange {
            start: u64::MAX - 0x1fff,
            end: u64::MAX,
        }];
        let mut a = IovaAllocator::new(Some(&r), 0x1000, 64);
        assert_eq!(a.alloc(0x1000, 0x1000), Some(u64::MAX - 0x1fff));
        assert_eq!(a.alloc(0x2000, 0x1000), None);
        assert_eq!(a.alloc(0x1000, 1 << 63), None);
    }

    fn info_buf(flags: u32, pgsizes: u64, caps: &[Vec<u8>]) -> Vec<u8> {
        let mut b = vec![0u8; 24];
        b[4..8].copy_from_slice(&flags.to_ne_bytes());
        b[8..16].copy_from_slice(&pgsizes.to_ne_bytes());
        let mut off = 24u32;
        if !caps.is_empty() {
            b[16..20].copy_from_slice(&off.to_ne_bytes());
        }
        for (i, c) in caps.iter().enumerate() {
            let mut c = c.clone();
            let next = if i + 1 < caps.len() {
                off + c.len() as u32
            } else {
                0
            };
            c[4..8].copy_from_slice(&next.to_ne_bytes());
            off += c.len() as u32;
            b.extend_from_slice(&c);
        }
        let len = b.len() as u32;
        b[0..4].copy_from_slice(&len.to_ne_bytes());
        b
    }

    fn cap(id: u16, body: &[u8]) -> Vec<u8> {
        let mut c = vec![0u8; 8];
        c[0..2].copy_from_slice(&id.to_ne_bytes());
        c[2..4].copy_from_slice(&1u16.to_ne_bytes());
        c.extend_from_slice(body);
        c
    }

    #[test]
    fn parses_get_info_with_ranges_and_dma_avail() {
        let mut body = Vec::new();
        body.extend_from_slice(&2u32.to_ne_bytes());
        body.extend_from_slice(&0u32.to_ne_bytes());
        for (s, e) in [(0u64, 0xfedf_ffffu64), (0xfef0_0000, 0x7f_ffff_ffff)] {
            body.extend_from_slice(&s.to_ne_bytes());
            body.extend_from_slice(&e.to_ne_bytes());
        }
        let caps = [
            cap(VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE as u16, &body),
            cap(9, &[0; 8]), // unknown: skipped
            cap(
                VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL as u16,
                &65535u32.to_ne_bytes(),
            ),
        ];
        let b = info_buf(
            VFIO_IOMMU_INFO_PGSIZES | VFIO_IOMMU_INFO_CAPS,
            0x4020_1000,
            &caps,
        );
        let info = parse_iommu_info(&b).unwrap();
        assert_eq!(info.page_sizes, 0x4020_1000);
        assert_eq!(info.min_page_size(), 4096);
        assert_eq!(info.dma_avail, Some(65535));
        let r = info.ranges.unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[1].end, 0x7f_ffff_ffff);
    }

    #[test]
    fn parses_get_info_without_caps_and_rejects_garbage() {
        let b = info_buf(VFIO_IOMMU_INFO_PGSIZES, 0x1000, &[]);
        let info = parse_iommu_info(&b).unwrap();
        assert_eq!(info.ranges, None);
        assert_eq!(IommuInfo::default().min_page_size(), 4096);
        // Truncated buffer.
        assert_eq!(parse_iommu_info(&b[..6]), None);
        // A capability chain that points into the header.
        let mut bad = info_buf(VFIO_IOMMU_INFO_CAPS, 0, &[cap(3, &[0; 8])]);
        bad[28..32].copy_from_slice(&8u32.to_ne_bytes());
        assert_eq!(parse_iommu_info(&bad), None);
        // A range list longer than the buffer.
        let mut body = 5u32.to_ne_bytes().to_vec();
        body.extend_from_slice(&[0; 4]);
        let b = info_buf(VFIO_IOMMU_INFO_CAPS, 0, &[cap(1, &body)]);
        assert_eq!(parse_iommu_info(&b), None);
    }
}
