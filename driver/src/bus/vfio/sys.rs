//! The system calls of the VFIO backend that vfio-ioctls does not make for us, each a thin
//! wrapper returning `io::Result`.

use core::ptr::NonNull;
use std::ffi::CString;
use std::io;
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// RLIMIT_MEMLOCK's soft limit in bytes (`u64::MAX` when unlimited).
pub fn memlock_limit() -> io::Result<u64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `r` is a valid, writable rlimit.
    cvt(unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) })?;
    Ok(if r.rlim_cur == libc::RLIM_INFINITY {
        u64::MAX
    } else {
        r.rlim_cur
    })
}

/// `access(path, R_OK | W_OK)`.
pub fn access_rw(path: &Path) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `c` is a NUL-terminated path.
    cvt(unsafe { libc::access(c.as_ptr(), libc::R_OK | libc::W_OK) }).map(drop)
}

/// `pread` of exactly `buf.len()` bytes at `off`.
pub fn pread_exact(fd: RawFd, buf: &mut [u8], off: u64) -> io::Result<()> {
    // SAFETY: `buf` is valid for writes of its length.
    let n = unsafe { libc::pread(fd, buf.as_mut_ptr().cast(), buf.len(), off as libc::off_t) };
    match n {
        n if n < 0 => Err(io::Error::last_os_error()),
        n if n as usize == buf.len() => Ok(()),
        _ => Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
    }
}

/// `pwrite` of exactly `buf.len()` bytes at `off`.
pub fn pwrite_all(fd: RawFd, buf: &[u8], off: u64) -> io::Result<()> {
    // SAFETY: `buf` is valid for reads of its length.
    let n = unsafe { libc::pwrite(fd, buf.as_ptr().cast(), buf.len(), off as libc::off_t) };
    match n {
        n if n < 0 => Err(io::Error::last_os_error()),
        n if n as usize == buf.len() => Ok(()),
        _ => Err(io::Error::from(io::ErrorKind::WriteZero)),
    }
}

/// Maps `len` bytes of the device file at `off`, shared, read-write (a BAR area).
pub fn mmap_device(fd: RawFd, off: u64, len: usize) -> io::Result<NonNull<u8>> {
    // SAFETY: a new shared mapping with no address hint affects no existing memory.
    let p = unsafe {
        libc::mmap(
            core::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            off as libc::off_t,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    NonNull::new(p.cast()).ok_or_else(|| io::Error::other("mmap returned null"))
}

/// Unmaps a mapping made by [`mmap_device`].
///
/// # Safety
/// `ptr`/`len` is exactly one mapping from [`mmap_device`], and nothing uses it afterwards.
pub unsafe fn munmap(ptr: NonNull<u8>, len: usize) -> io::Result<()> {
    // SAFETY: by the caller's contract the range is a whole mapping of ours, unused from now on.
    cvt(unsafe { libc::munmap(ptr.as_ptr().cast(), len) }).map(drop)
}

/// `madvise(MADV_DONTFORK)`: a child process must not get (and copy-on-write) DMA memory.
pub fn dont_fork(ptr: NonNull<u8>, len: usize) -> io::Result<()> {
    // SAFETY: advice on our own mapping; MADV_DONTFORK does not change its contents.
    cvt(unsafe { libc::madvise(ptr.as_ptr().cast(), len, libc::MADV_DONTFORK) }).map(drop)
}

/// Atomically replaces what descriptor `fd` refers to by `/dev/null` (`dup2`): the file it
/// referred to is released, while the number stays valid (no other file can take it) until its
/// owner closes it. Reads then return end of file, writes are discarded, ioctls fail.
pub fn point_at_dev_null(fd: RawFd) -> io::Result<()> {
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    use std::os::fd::AsRawFd;
    // SAFETY: both are open descriptors; dup2 closes the old file of `fd` and makes `fd` a
    // duplicate of /dev/null; `null` itself is closed when dropped.
    cvt(unsafe { libc::dup2(null.as_raw_fd(), fd) }).map(drop)
}

/// `VFIO_IOMMU_GET_INFO` = `_IO(VFIO_TYPE, VFIO_BASE + 12)`.
const VFIO_IOMMU_GET_INFO: libc::c_ulong = ((b';' as libc::c_ulong) << 8) | (100 + 12);

/// `VFIO_IOMMU_GET_INFO` on a container with an IOMMU set: the raw answer, capability chain
/// included (asked twice when the chain does not fit the first buffer).
pub fn iommu_get_info(container: RawFd) -> io::Result<Vec<u8>> {
    let mut len = 256usize;
    for _ in 0..4 {
        // u64 backing for 8-byte alignment of the struct and its capabilities.
        let mut buf = vec![0u64; len.div_ceil(8)];
        let argsz = (buf.len() * 8) as u32;
        let mut head = [0u8; 8]; // u32 argsz, u32 flags = 0
        head[..4].copy_from_slice(&argsz.to_ne_bytes());
        buf[0] = u64::from_ne_bytes(head);
        // SAFETY: the buffer is writable for `argsz` bytes, which the kernel does not exceed.
        cvt(unsafe { libc::ioctl(container, VFIO_IOMMU_GET_INFO as _, buf.as_mut_ptr()) })?;
        let bytes: Vec<u8> = buf.iter().flat_map(|w| w.to_ne_bytes()).collect();
        let want = u32::from_ne_bytes(bytes[0..4].try_into().expect("4 bytes")) as usize;
        if want <= bytes.len() {
            return Ok(bytes);
        }
        len = want;
    }
    Err(io::Error::other("VFIO_IOMMU_GET_INFO keeps growing"))
}
