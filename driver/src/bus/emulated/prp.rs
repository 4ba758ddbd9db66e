//! PRP walking (NVMe 1.4 section 4.3) and data movement to and from host memory.
//!
//! [`map`] turns PRP1/PRP2 of a command into the host memory segments of its data buffer,
//! validating every rule a real controller checks and translating each IOVA through
//! [`DmaMemory::ptr_of`] (the emulated IOMMU). A [`Cursor`] then streams bytes into or out of the
//! segments with raw pointer copies: the device never makes a reference into DMA memory.

use core::ptr::NonNull;

use crate::bus::dma::DmaMemory;
use crate::types::Iova;

/// One contiguous piece of a command's data buffer in host memory.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Seg {
    pub ptr: NonNull<u8>,
    pub len: usize,
}

// SAFETY: a segment only describes DMA memory (kept mapped by the device's `DmaMemory`); the
// device accesses it with raw copies while the command that named it is being processed.
unsafe impl Send for Seg {}

/// Why a PRP could not be mapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PrpError {
    /// PRP1 is not dword aligned: Invalid Field in Command.
    Prp1Alignment,
    /// A PRP entry or list pointer has an offset where none is allowed: PRP Offset Invalid.
    Offset,
    /// An address outside DMA memory: Data Transfer Error (a DMA fault).
    Fault,
}

/// Maps the `len`-byte data buffer described by `prp1`/`prp2` into `out`, for a memory page of
/// `page` bytes. Adjacent pages are merged into one segment.
pub(crate) fn map(
    dma: &DmaMemory,
    prp1: u64,
    prp2: u64,
    len: usize,
    page: usize,
    out: &mut Vec<Seg>,
) -> Result<(), PrpError> {
    out.clear();
    if len == 0 {
        return Ok(());
    }
    let mask = page as u64 - 1;
    if prp1 & 3 != 0 {
        return Err(PrpError::Prp1Alignment);
    }
    let first = len.min(page - (prp1 & mask) as usize);
    push(dma, out, prp1, first)?;
    let mut rem = len - first;
    if rem == 0 {
        return Ok(());
    }
    if rem <= page {
        // PRP2 is the second (and last) page.
        if prp2 & mask != 0 {
            return Err(PrpError::Offset);
        }
        return push(dma, out, prp2, rem);
    }
    // PRP2 is a PRP list pointer: qword aligned, may have an offset into its page.
    if prp2 & 7 != 0 {
        return Err(PrpError::Offset);
    }
    let mut list = prp2;
    loop {
        let slots = (page - (list & mask) as usize) / 8;
        let needed = rem.div_ceil(page);
        // Entries of this list page that will be read: all of them when the list chains on.
        let used = if needed > slots { slots } else { needed };
        let entries = dma.ptr_of(Iova(list), used * 8).ok_or(PrpError::Fault)?;
        for i in 0..used {
            // SAFETY: `ptr_of` checked that `used * 8` bytes at `entries` are DMA memory, and the
            // list pointer is qword aligned; the host does not change a PRP list while its
            // command is outstanding, and a volatile read never makes a reference.
            let ent =
                u64::from_le(unsafe { entries.as_ptr().cast::<u64>().add(i).read_volatile() });
            if ent & mask != 0 {
                return Err(PrpError::Offset);
            }
            if i == slots - 1 && rem > page {
                // The last entry of a full list page points to the next list page.
                list = ent;
                break;
            }
            let n = rem.min(page);
            push(dma, out, ent, n)?;
            rem -= n;
            if rem == 0 {
                return Ok(());
            }
        }
    }
}

/// Translates `[iova, iova + len)` and appends it to `out`. The IOVA's chunk is looked up by
/// its hint ([`DmaMemory::ptr_of_hinted`]); the rare scan, with its append, is a tail call
/// ([`push_scanned`]), so that this path saves no registers for a call.
#[inline]
fn push(dma: &DmaMemory, out: &mut Vec<Seg>, iova: u64, len: usize) -> Result<(), PrpError> {
    match dma.ptr_of_hinted(Iova(iova), len) {
        Some(ptr) => {
            append(out, ptr, len);
            Ok(())
        }
        None => push_scanned(dma, out, iova, len),
    }
}

#[cold]
#[inline(never)]
fn push_scanned(
    dma: &DmaMemory,
    out: &mut Vec<Seg>,
    iova: u64,
    len: usize,
) -> Result<(), PrpError> {
    let ptr = dma.ptr_of_scanned(Iova(iova), len).ok_or(PrpError::Fault)?;
    append(out, ptr, len);
    Ok(())
}

/// Appends a segment, merged into the last one when it continues it.
#[inline(always)]
fn append(out: &mut Vec<Seg>, ptr: NonNull<u8>, len: usize) {
    if let Some(last) = out.last_mut() {
        if last.ptr.as_ptr().wrapping_add(last.len) == ptr.as_ptr() {
            last.len += len;
            return;
        }
    }
    out.push(Seg { ptr, len });
}

/// A position in a list of segments, for streaming bytes to or from host memory.
pub(crate) struct Cursor<'a> {
    segs: &'a [Seg],
    idx: usize,
    off: usize,
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(segs: &'a [Seg]) -> Cursor<'a> {
        Cursor {
            segs,
            idx: 0,
            off: 0,
        }
    }

    /// Calls `f(host pointer, length, bytes done before)` for the next `n` bytes (fewer if the
    /// segments end first).
    fn step(&mut self, mut n: usize, mut f: impl FnMut(*mut u8, usize, usize)) {
        let mut done = 0;
        while n > 0 && self.idx < self.segs.len() {
            let s = self.segs[self.idx];
            let k = n.min(s.len - self.off);
            f(s.ptr.as_ptr().wrapping_add(self.off), k, done);
            done += k;
            n -= k;
            self.off += k;
            if self.off == s.len {
                self.idx += 1;
                self.off = 0;
            }
        }
    }

    /// Device to host: copies `src` into host memory.
    pub(crate) fn write_out(&mut self, src: &[u8]) {
        self.step(src.len(), |p, k, done| {
            // SAFETY: `p..p+k` lies in a segment that `map` translated into DMA memory; `src` is
            // device-side memory, so the ranges do not overlap. The host does not touch a data
            // buffer while its command is in flight.
            unsafe { core::ptr::copy_nonoverlapping(src.as_ptr().add(done), p, k) };
        });
    }

    /// Device to host: writes `n` zero bytes.
    pub(crate) fn zero_out(&mut self, n: usize) {
        self.step(n, |p, k, _| {
            // SAFETY: as in `write_out`: `p..p+k` is in a translated segment.
            unsafe { p.write_bytes(0, k) };
        });
    }

    /// Host to device: fills `dst` from host memory.
    pub(crate) fn read_in(&mut self, dst: &mut [u8]) {
        let d = dst.as_mut_ptr();
        self.step(dst.len(), |p, k, done| {
            // SAFETY: `p..p+k` is in a translated segment; `dst` is device-side memory with room
            // for `done + k` bytes.
            unsafe { core::ptr::copy_nonoverlapping(p, d.add(done), k) };
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::emulated::chunks::EmulatedChunkSource;

    const P: usize = crate::spec::PAGE_SIZE;

    fn put_list(buf: &crate::bus::dma::DmaBuffer, at: usize, entries: &[u64]) {
        for (i, e) in entries.iter().enumerate() {
            // SAFETY: the test keeps `at + 8 * i + 8` within the buffer.
            unsafe {
                buf.as_ptr()
                    .add(at + 8 * i)
                    .cast::<u64>()
                    .write_unaligned(e.to_le())
            };
        }
    }

    #[test]
    fn alignment_classes() {
        let dma = DmaMemory::new(Box::new(EmulatedChunkSource::new()));
        let data = dma.alloc(64 * P).unwrap();
        let list = dma.alloc(2 * P).unwrap();
        let base = data.iova().0;
        let mut out = Vec::new();
        // One page, with a dword offset.
        map(&dma, base + 4, 0, 100, P, &mut out).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].len, 100);
        // Misaligned PRP1.
        assert_eq!(
            map(&dma, base + 2, 0, 100, P, &mut out),
            Err(PrpError::Prp1Alignment)
        );
        // Two pages: PRP2 a page pointer; an offset there is invalid.
        map(&dma, base + 512, base + 8 * P as u64, P, P, &mut out).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!((out[0].len, out[1].len), (P - 512, 512));
        assert_eq!(
            map(&dma, base + 512, base + 8 * P as u64 + 8, P, P, &mut out),
            Err(PrpError::Offset)
        );
        // A list of three entries, with a list offset.
        let pages = [base + P as u64, base + 2 * P as u64, base + 3 * P as u64];
        put_list(&list, 64, &pages);
        map(&dma, base, list.iova().0 + 64, 4 * P, P, &mut out).unwrap();
        assert_eq!(out.len(), 1, "contiguous pages merge");
        assert_eq!(out[0].len, 4 * P);
        // A list pointer that is not qword aligned.
        assert_eq!(
            map(&dma, base, list.iova().0 + 4, 4 * P, P, &mut out),
            Err(PrpError::Offset)
        );
        // A list entry with an offset.
        put_list(&list, 64, &[base + P as u64 + 512]);
        assert_eq!(
            map(&dma, base, list.iova().0 + 64, 4 * P, P, &mut out),
            Err(PrpError::Offset)
        );
        // Chained: a list that starts 2 entries before the end of its page chains to page 2.
        let first_at = P - 16;
        put_list(
            &list,
            first_at,
            &[base + 10 * P as u64, list.iova().0 + P as u64],
        );
        put_list(&list, P, &[base + 20 * P as u64, base + 30 * P as u64]);
        map(
            &dma,
            base,
            list.iova().0 + first_at as u64,
            4 * P,
            P,
            &mut out,
        )
        .unwrap();
        let starts: Vec<usize> = out
            .iter()
            .map(|s| s.ptr.as_ptr() as usize - data.as_ptr() as usize)
            .collect();
        assert_eq!(starts, vec![0, 10 * P, 20 * P, 30 * P]);
        // An unmapped entry is a fault, and so is an unmapped list.
        put_list(&list, 64, &[0x1000, base, base]);
        assert_eq!(
            map(&dma, base, list.iova().0 + 64, 4 * P, P, &mut out),
            Err(PrpError::Fault)
        );
        assert_eq!(
            map(&dma, base, 0x7000, 4 * P, P, &mut out),
            Err(PrpError::Fault)
        );
        assert_eq!(
            map(&dma, data.as_ptr() as u64, 0, 8, P, &mut out),
            Err(PrpError::Fault),
            "a virtual address is not an IOVA"
        );
    }

    #[test]
    fn cursor_streams_across_segments() {
        let dma = DmaMemory::new(Box::new(EmulatedChunkSource::new()));
        let a = dma.alloc(P).unwrap();
        let mut out = Vec::new();
        map(&dma, a.iova().0 + P as u64 - 8, a.iova().0, 16, P, &mut out).unwrap();
        assert_eq!(out.len(), 2);
        Cursor::new(&out).write_out(&[7u8; 16]);
        assert_eq!(&a.as_slice()[..8], &[7; 8]);
        assert_eq!(&a.as_slice()[P - 8..], &[7; 8]);
        let mut back = [0u8; 16];
        Cursor::new(&out).read_in(&mut back);
        assert_eq!(back, [7; 16]);
        Cursor::new(&out).zero_out(16);
        assert!(a.as_slice().iter().all(|&b| b == 0));
    }
}
