//! Namespace storage: sparse memory, a file, or null.
//!
//! * **Sparse memory**: a two-level table from 64 KiB piece index to a lazily allocated piece, so
//!   a 1 TiB namespace costs a 256 KiB top table until it is written. Unwritten and deallocated
//!   blocks read as zeroes. Pieces are arrays of `AtomicU64` and are only ever freed with the
//!   namespace, so commands on several queues (inline mode runs them on the submitting threads)
//!   can touch the same blocks without a lock and without undefined behaviour: overlapping
//!   concurrent writes give some mix of the two, as on a real device.
//! * **File**: `pread`/`pwrite` at `lba * block_size`; the file is created and extended with
//!   `set_len` to the namespace size.
//! * **Null**: moves no data (like Linux `null_blk`): reads leave the host buffer untouched,
//!   writes are discarded.

use std::alloc::{Layout, alloc_zeroed, dealloc, handle_alloc_error};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};

use super::prp::{Cursor, Seg};

/// Bytes in one piece of sparse storage.
pub(crate) const PIECE: usize = 64 << 10;
const PIECE_WORDS: usize = PIECE / 8;
/// Pieces per second-level table.
const LEAF: usize = 512;
/// Bytes moved through the stack bounce buffer at a time.
const BOUNCE: usize = 4096;

struct Piece([AtomicU64; PIECE_WORDS]);
struct Leaf([AtomicPtr<Piece>; LEAF]);

/// Allocates a zeroed `T` whose all-zero bit pattern is valid (atomics and atomic pointers).
fn zeroed_box<T>() -> *mut T {
    let layout = Layout::new::<T>();
    // SAFETY: `T` is a non-zero-sized array type here (`Piece` or `Leaf`).
    let p = unsafe { alloc_zeroed(layout) };
    if p.is_null() {
        handle_alloc_error(layout);
    }
    p.cast()
}

/// The table entry in `slot`; when it is empty and `create` is set, a zeroed one is allocated,
/// published with a release compare-exchange (a racing loser frees its own), and `count`ed.
/// Only for `Leaf` and `Piece`, whose all-zero bit pattern is valid.
fn get_or_create<'a, T>(slot: &'a AtomicPtr<T>, create: bool, count: &AtomicU64) -> Option<&'a T> {
    let mut p = slot.load(Ordering::Acquire);
    if p.is_null() {
        if !create {
            return None;
        }
        let new = zeroed_box::<T>();
        p = match slot.compare_exchange(
            core::ptr::null_mut(),
            new,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => {
                count.fetch_add(1, Ordering::Relaxed);
                new
            }
            Err(current) => {
                // SAFETY: `new` came from `zeroed_box::<T>` and was never shared.
                unsafe { dealloc(new.cast(), Layout::new::<T>()) };
                current
            }
        };
    }
    // SAFETY: entries are published with release stores and freed only when the `Sparse` that
    // owns the table is dropped, which outlives the borrow of `slot`.
    Some(unsafe { &*p })
}

/// Sparse memory storage.
pub(crate) struct Sparse {
    top: Box<[AtomicPtr<Leaf>]>,
    pieces: AtomicU64,
    leaves: AtomicU64,
}

impl Sparse {
    fn new(bytes: u64) -> Sparse {
        let pieces = bytes.div_ceil(PIECE as u64) as usize;
        Sparse {
            top: (0..pieces.div_ceil(LEAF))
                .map(|_| AtomicPtr::new(core::ptr::null_mut()))
                .collect(),
            pieces: AtomicU64::new(0),
            leaves: AtomicU64::new(0),
        }
    }

    /// The piece `idx`, allocated if `create` is set.
    fn piece(&self, idx: usize, create: bool) -> Option<&Piece> {
        let leaf = get_or_create(&self.top[idx / LEAF], create, &self.leaves)?;
        get_or_create(&leaf.0[idx % LEAF], create, &self.pieces)
    }

    /// Splits `[pos, pos + len)` at piece boundaries: `f(piece index, offset in piece, length)`.
    fn split(pos: u64, len: u64, mut f: impl FnMut(usize, usize, usize)) {
        let (mut pos, end) = (pos, pos + len);
        while pos < end {
            let idx = (pos / PIECE as u64) as usize;
            let off = (pos % PIECE as u64) as usize;
            let n = ((PIECE - off) as u64).min(end - pos) as usize;
            f(idx, off, n);
            pos += n as u64;
        }
    }

    fn read(&self, pos: u64, len: u64, cur: &mut Cursor<'_>) {
        let mut buf = [0u8; BOUNCE];
        Self::split(pos, len, |idx, off, n| match self.piece(idx, false) {
            None => cur.zero_out(n),
            Some(p) => {
                let mut done = 0;
                while done < n {
                    let k = (n - done).min(BOUNCE);
                    let w0 = (off + done) / 8;
                    for (i, chunk) in buf[..k].chunks_exact_mut(8).enumerate() {
                        let w = p.0[w0 + i].load(Ordering::Relaxed);
                        chunk.copy_from_slice(&w.to_ne_bytes());
                    }
                    cur.write_out(&buf[..k]);
                    done += k;
                }
            }
        });
    }

    fn write(&self, pos: u64, len: u64, cur: &mut Cursor<'_>) {
        let mut buf = [0u8; BOUNCE];
        Self::split(pos, len, |idx, off, n| {
            let p = self.piece(idx, true).expect("created on demand");
            let mut done = 0;
            while done < n {
                let k = (n - done).min(BOUNCE);
                cur.read_in(&mut buf[..k]);
                let w0 = (off + done) / 8;
                for (i, chunk) in buf[..k].chunks_exact(8).enumerate() {
                    let w = u64::from_ne_bytes(chunk.try_into().expect("8 bytes"));
                    p.0[w0 + i].store(w, Ordering::Relaxed);
                }
                done += k;
            }
        });
    }

    fn zero(&self, pos: u64, len: u64) {
        Self::split(pos, len, |idx, off, n| {
            if let Some(p) = self.piece(idx, false) {
                for w in &p.0[off / 8..(off + n) / 8] {
                    w.store(0, Ordering::Relaxed);
                }
            }
        });
    }

    fn resident_bytes(&self) -> u64 {
        self.pieces.load(Ordering::Relaxed) * PIECE as u64
            + self.leaves.load(Ordering::Relaxed) * size_of::<Leaf>() as u64
            + (self.top.len() * size_of::<AtomicPtr<Leaf>>()) as u64
    }
}

impl Drop for Sparse {
    fn drop(&mut self) {
        for slot in self.top.iter_mut() {
            let leaf = *slot.get_mut();
            if leaf.is_null() {
                continue;
            }
            // SAFETY: `leaf` was allocated by `zeroed_box::<Leaf>` and is freed once, here.
            let leaf_ref = unsafe { &mut *leaf };
            for p in leaf_ref.0.iter_mut() {
                let piece = *p.get_mut();
                if !piece.is_null() {
                    // SAFETY: allocated by `zeroed_box::<Piece>`, freed once, here.
                    unsafe { dealloc(piece.cast(), Layout::new::<Piece>()) };
                }
            }
            // SAFETY: as above, for the leaf.
            unsafe { dealloc(leaf.cast(), Layout::new::<Leaf>()) };
        }
    }
}

/// Where a namespace keeps its blocks.
pub(crate) enum Store {
    Sparse(Sparse),
    File(File),
    Null,
}

static ZEROES: [u8; PIECE] = [0; PIECE];

/// One namespace of the emulated controller.
pub(crate) struct Namespace {
    /// log2 of the block size.
    pub shift: u32,
    /// Size in blocks.
    pub blocks: u64,
    /// Metadata bytes per block of the format in use (0: none); never transferred.
    pub metadata: u16,
    /// Metadata at the end of each block (FLBAS bit 4).
    pub metadata_extended: bool,
    pub store: Store,
}

impl Namespace {
    pub(crate) fn sparse(block_size: u32, blocks: u64) -> Namespace {
        Namespace {
            shift: block_size.trailing_zeros(),
            blocks,
            metadata: 0,
            metadata_extended: false,
            store: Store::Sparse(Sparse::new(blocks * block_size as u64)),
        }
    }

    pub(crate) fn null(block_size: u32, blocks: u64) -> Namespace {
        Namespace {
            shift: block_size.trailing_zeros(),
            blocks,
            metadata: 0,
            metadata_extended: false,
            store: Store::Null,
        }
    }

    pub(crate) fn file(path: &Path, block_size: u32, blocks: u64) -> std::io::Result<Namespace> {
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let bytes = blocks * block_size as u64;
        if f.metadata()?.len() < bytes {
            f.set_len(bytes)?;
        }
        Ok(Namespace {
            shift: block_size.trailing_zeros(),
            blocks,
            metadata: 0,
            metadata_extended: false,
            store: Store::File(f),
        })
    }

    /// Reads `blocks` blocks at `lba` into the host segments.
    pub(crate) fn read(&self, lba: u64, blocks: u64, segs: &[Seg]) -> std::io::Result<()> {
        let (pos, len) = (lba << self.shift, blocks << self.shift);
        match &self.store {
            Store::Sparse(s) => s.read(pos, len, &mut Cursor::new(segs)),
            Store::File(f) => {
                let mut off = pos;
                for s in segs {
                    let mut done = 0;
                    while done < s.len {
                        // SAFETY: `s` is a translated DMA segment of `s.len` bytes; the kernel
                        // writes into it like a device would, and no reference to it exists.
                        let r = retry_eintr(|| unsafe {
                            libc::pread(
                                f.as_raw_fd(),
                                s.ptr.as_ptr().add(done).cast(),
                                s.len - done,
                                (off + done as u64) as libc::off_t,
                            )
                        })?;
                        if r == 0 {
                            // Past the end of a file shortened behind our back: zeroes.
                            // SAFETY: as above.
                            unsafe { s.ptr.as_ptr().add(done).write_bytes(0, s.len - done) };
                            break;
                        }
                        done += r;
                    }
                    off += s.len as u64;
                }
            }
            Store::Null => {}
        }
        Ok(())
    }

    /// Writes `blocks` blocks at `lba` from the host segments; `fua` makes a file write durable.
    pub(crate) fn write(
        &self,
        lba: u64,
        blocks: u64,
        segs: &[Seg],
        fua: bool,
    ) -> std::io::Result<()> {
        let (pos, len) = (lba << self.shift, blocks << self.shift);
        match &self.store {
            Store::Sparse(s) => s.write(pos, len, &mut Cursor::new(segs)),
            Store::File(f) => {
                let mut off = pos;
                for s in segs {
                    // SAFETY: `s` is a translated DMA segment of `s.len` readable bytes.
                    unsafe { write_all_at(f, s.ptr.as_ptr().cast_const(), s.len, off)? };
                    off += s.len as u64;
                }
                if fua {
                    f.sync_data()?;
                }
            }
            Store::Null => {}
        }
        Ok(())
    }

    /// Zeroes (deallocates) `blocks` blocks at `lba`.
    pub(crate) fn zero(&self, lba: u64, blocks: u64) -> std::io::Result<()> {
        let (pos, len) = (lba << self.shift, blocks << self.shift);
        match &self.store {
            Store::Sparse(s) => s.zero(pos, len),
            Store::File(f) => {
                let mut done = 0;
                while done < len {
                    let n = (len - done).min(PIECE as u64) as usize;
                    // SAFETY: `ZEROES` has `PIECE >= n` readable bytes.
                    unsafe { write_all_at(f, ZEROES.as_ptr(), n, pos + done)? };
                    done += n as u64;
                }
            }
            Store::Null => {}
        }
        Ok(())
    }

    /// Makes written data durable.
    pub(crate) fn flush(&self) -> std::io::Result<()> {
        match &self.store {
            Store::File(f) => f.sync_data(),
            _ => Ok(()),
        }
    }

    /// Memory held by the storage (sparse memory only; 0 otherwise).
    pub(crate) fn resident_bytes(&self) -> u64 {
        match &self.store {
            Store::Sparse(s) => s.resident_bytes(),
            _ => 0,
        }
    }
}

/// `pwrite` of `len` bytes at `ptr` to `off`, retried until complete.
///
/// # Safety
/// `ptr` must be valid for reads of `len` bytes for the duration of the call.
unsafe fn write_all_at(f: &File, ptr: *const u8, len: usize, off: u64) -> std::io::Result<()> {
    let mut done = 0;
    while done < len {
        // SAFETY: `len` bytes at `ptr` are readable (contract of this function).
        let r = retry_eintr(|| unsafe {
            libc::pwrite(
                f.as_raw_fd(),
                ptr.add(done).cast(),
                len - done,
                (off + done as u64) as libc::off_t,
            )
        })?;
        if r == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::WriteZero));
        }
        done += r;
    }
    Ok(())
}

/// Calls a `pread`/`pwrite`-like system call again while it fails with EINTR; the bytes it
/// moved, or its error.
fn retry_eintr(mut call: impl FnMut() -> isize) -> std::io::Result<usize> {
    loop {
        let r = call();
        if r >= 0 {
            return Ok(r as usize);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::ptr::NonNull;

    #[test]
    fn sparse_read_write_zero() {
        let ns = Namespace::sparse(512, 1 << 31); // 1 TiB
        let mut data = vec![0xa5u8; 8192];
        data[0] = 1;
        let seg = Seg {
            ptr: NonNull::new(data.as_mut_ptr()).unwrap(),
            len: 8192,
        };
        let last = (1u64 << 31) - 16;
        ns.write(last, 16, &[seg], false).unwrap();
        let mut back = vec![0u8; 8192];
        let bseg = Seg {
            ptr: NonNull::new(back.as_mut_ptr()).unwrap(),
            len: 8192,
        };
        ns.read(last, 16, &[bseg]).unwrap();
        assert_eq!(back[0], 1);
        assert!(back[1..].iter().all(|&b| b == 0xa5));
        // Untouched blocks read as zeroes.
        ns.read(0, 16, &[bseg]).unwrap();
        assert!(back.iter().all(|&b| b == 0));
        assert!(ns.resident_bytes() < 1 << 20, "{}", ns.resident_bytes());
        ns.zero(last, 1).unwrap();
        ns.read(last, 16, &[bseg]).unwrap();
        assert!(back[..512].iter().all(|&b| b == 0));
        assert!(back[512..].iter().all(|&b| b == 0xa5));
    }
}
