//! PRP entries: how a data buffer is described to the controller (NVMe 1.4 section 4.3).
//!
//! The driver configures a 4 KiB memory page (CC.MPS = 0). PRP entry 1 points at the first byte
//! and may have any dword-aligned offset; every further entry points at the start of a page. A
//! transfer that touches one page uses PRP1 only, two pages PRP1 and PRP2, more pages PRP1 and
//! a *PRP list*: PRP2 points at a page of 512 entries naming the 2nd, 3rd, ... pages.
//!
//! **Strategy: one list page per command, no chaining.** Each request slot owns one
//! preallocated 4 KiB list page. [`MAX_TRANSFER`] (2 MiB) is the largest transfer that one list
//! page can describe *for every start offset* (at most 513 pages touched: PRP1 plus 512 list
//! entries), so the queue pair caps each command at `min(MDTS, MAX_TRANSFER)` and splits larger
//! requests into child commands. This keeps the builder branch-light and a command's memory
//! fixed at one page, at the cost of one extra command per 2 MiB on controllers whose MDTS is
//! larger (rare: most report 128 KiB to 2 MiB).
//!
//! The buffers come from [`crate::bus::dma::DmaMemory`], which is IOVA-contiguous within an
//! allocation, so the list is plain page arithmetic from the first IOVA.

/// [`PAGE_SIZE`](crate::spec::PAGE_SIZE) as a `u64`, for IOVA arithmetic.
pub const PAGE: u64 = crate::spec::PAGE_SIZE as u64;
const PAGE_MASK: u64 = PAGE - 1;
/// Entries of one PRP list page.
pub const LIST_ENTRIES: usize = 512;
/// The largest transfer one command carries: 512 pages, describable with one list page at any
/// start offset.
pub const MAX_TRANSFER: usize = LIST_ENTRIES * PAGE as usize;

/// Builds PRP1 and PRP2 for `len` bytes at `iova`, writing a PRP list at `list` (whose IOVA is
/// `list_iova`) when the transfer touches more than two pages. Returns `(prp1, prp2)`.
///
/// Preconditions checked by the caller: `1 <= len <= MAX_TRANSFER`, `iova` dword aligned.
///
/// # Safety
/// `list` must be valid for volatile writes of [`LIST_ENTRIES`] `u64`s, and no command the
/// device may still be processing may use that list page.
#[inline]
pub unsafe fn build(iova: u64, len: usize, list: *mut u64, list_iova: u64) -> (u64, u64) {
    debug_assert!((1..=MAX_TRANSFER).contains(&len) && iova & 3 == 0);
    // Where the transfer ends, counted from the start of its first page (no overflow:
    // `len <= MAX_TRANSFER`).
    let end = (iova & PAGE_MASK) + len as u64;
    if end <= PAGE {
        return (iova, 0);
    }
    let next = (iova & !PAGE_MASK) + PAGE;
    if end <= 2 * PAGE {
        return (iova, next);
    }
    // Pages after the first.
    let n = (end.div_ceil(PAGE) - 1) as usize;
    debug_assert!(n <= LIST_ENTRIES);
    for i in 0..n {
        // SAFETY: `i < n <= LIST_ENTRIES`, inside the list page (contract of this function).
        unsafe { list.add(i).write_volatile(next + i as u64 * PAGE) };
    }
    (iova, list_iova)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Number of memory pages `[iova, iova + len)` touches (`len >= 1`): the oracle for
    /// `build`.
    const fn pages_touched(iova: u64, len: usize) -> usize {
        let first = iova & !PAGE_MASK;
        let last = (iova + len as u64 - 1) & !PAGE_MASK;
        ((last - first) / PAGE) as usize + 1
    }

    const LIST_IOVA: u64 = 0xdead_0000;

    /// Walks PRP1/PRP2/list as a controller would and returns the byte ranges transferred,
    /// checking the specification's rules on the way.
    fn walk(prp1: u64, prp2: u64, list: &[u64], len: usize) -> Vec<(u64, u64)> {
        assert_eq!(prp1 & 3, 0, "PRP1 must be dword aligned");
        let mut out = Vec::new();
        let mut left = len as u64;
        let first = (PAGE - (prp1 & PAGE_MASK)).min(left);
        out.push((prp1, first));
        left -= first;
        if left == 0 {
            assert_eq!(prp2, 0, "PRP2 must be unused for a one-page transfer");
            return out;
        }
        if left <= PAGE {
            assert_eq!(prp2 & PAGE_MASK, 0, "PRP2 must be page aligned");
            out.push((prp2, left));
            return out;
        }
        assert_eq!(prp2, LIST_IOVA, "PRP2 must point at the list");
        let mut i = 0;
        while left > 0 {
            assert!(i < LIST_ENTRIES, "list overflows its page");
            let e = list[i];
            assert_eq!(e & PAGE_MASK, 0, "list entries must be page aligned");
            let n = left.min(PAGE);
            out.push((e, n));
            left -= n;
            i += 1;
        }
        // Entries past the last one used are not written.
        assert!(list[i..].iter().all(|&e| e == u64::MAX));
        out
    }

    fn check(iova: u64, len: usize) {
        let mut list = [u64::MAX; LIST_ENTRIES];
        // SAFETY: `list` is a local array of LIST_ENTRIES entries.
        let (p1, p2) = unsafe { build(iova, len, list.as_mut_ptr(), LIST_IOVA) };
        let ranges = walk(p1, p2, &list, len);
        // The ranges cover exactly [iova, iova + len), in order, with no gap or overlap.
        let mut at = iova;
        for (start, n) in &ranges {
            assert_eq!(*start, at, "iova {iova:#x} len {len}: gap or overlap");
            at += n;
        }
        assert_eq!(
            at,
            iova + len as u64,
            "iova {iova:#x} len {len}: wrong total"
        );
        assert_eq!(ranges.len(), pages_touched(iova, len));
    }

    #[test]
    fn every_alignment_class_and_length() {
        let base = 0x1_0000_0000u64;
        for off in [0u64, 4, 512, 4092] {
            let iova = base + off;
            let mut lens = vec![1, 4, 512, 4096, 8192, 3 * 4096, 64 * 1024, 128 * 1024];
            for k in [1usize, 2, 3, 511, 512] {
                let edge = k * PAGE as usize - off as usize;
                lens.extend([edge.saturating_sub(4).max(4), edge, edge + 4]);
            }
            lens.extend([MAX_TRANSFER - 512, MAX_TRANSFER]);
            for len in lens {
                if (1..=MAX_TRANSFER).contains(&len) {
                    check(iova, len);
                }
            }
            // Every length in 512-byte blocks up to 5 pages.
            for blocks in 1..=40 {
                check(iova, blocks * 512);
            }
        }
    }

    #[test]
    fn max_transfer_fits_one_list_page_at_any_offset() {
        for off in (0..PAGE).step_by(4) {
            assert!(pages_touched(off, MAX_TRANSFER) <= LIST_ENTRIES + 1);
        }
        check(4092, MAX_TRANSFER);
    }

    #[test]
    fn pages_touched_counts() {
        assert_eq!(pages_touched(0, 1), 1);
        assert_eq!(pages_touched(0, 4096), 1);
        assert_eq!(pages_touched(0, 4097), 2);
        assert_eq!(pages_touched(4092, 8), 2);
        assert_eq!(pages_touched(512, 8192), 3);
    }
}
