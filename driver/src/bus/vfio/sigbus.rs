//! SIGBUS-safe BAR mappings.
//!
//! On some platforms a load or store to the BAR of a device that was pulled out raises SIGBUS
//! instead of reading all ones, and the process would die. Like SPDK, we install one
//! process-wide SIGBUS handler (`sigaction` with `SA_SIGINFO`, once, the first time a BAR is
//! mapped). When the faulting address lies inside a registered BAR mapping, the handler maps
//! anonymous memory filled with `0xff` over the whole mapping (`MAP_FIXED`) and returns: the
//! access re-executes and reads all ones, which the driver already treats as "device removed"
//! (stores land in the dummy memory). Any other SIGBUS goes to the handler that was installed
//! before ours, or gets the default action (the process dies with a core, as without us).
//!
//! The registered ranges live in a fixed static array of atomics, so the handler only does
//! async-signal-safe work: atomic loads, `mmap`, a byte fill and a counter increment.
//! [`retire`] does the same replacement from ordinary code when the kernel asks for the
//! device back: the BAR mapping then no longer holds the device file open.

use std::sync::Once;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Most BAR mappings registered at once (one or two per open controller).
const SLOTS: usize = 64;

/// One registered range: `len` 0 means free. `start` is written before `len` (release) and read
/// after it (acquire).
struct Slot {
    start: AtomicUsize,
    len: AtomicUsize,
}

#[allow(clippy::declare_interior_mutable_const)]
const FREE: Slot = Slot {
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
};
static RANGES: [Slot; SLOTS] = [FREE; SLOTS];
/// Faults turned into all-ones reads.
static CAUGHT: AtomicU64 = AtomicU64::new(0);
static INSTALL: Once = Once::new();
/// The SIGBUS action in place before ours.
static PREVIOUS: OnceLock<PrevAction> = OnceLock::new();

/// `libc::sigaction` holds a raw pointer-sized handler and a mask; it is plain data.
struct PrevAction(libc::sigaction);
// SAFETY: plain data (a handler address, a signal mask, flags), never mutated after being set.
unsafe impl Send for PrevAction {}
// SAFETY: as above.
unsafe impl Sync for PrevAction {}

/// A registered BAR mapping; unregistered on drop.
#[derive(Debug)]
pub(crate) struct Registration(usize);

impl Drop for Registration {
    fn drop(&mut self) {
        let s = &RANGES[self.0];
        s.len.store(0, Ordering::Release);
        s.start.store(0, Ordering::Release);
    }
}

/// Registers `[start, start + len)` as a BAR mapping whose faults read all ones. `None` when
/// every slot is taken (the mapping then stays unprotected: logged).
pub(crate) fn register(start: usize, len: usize) -> Option<Registration> {
    install();
    for (i, s) in RANGES.iter().enumerate() {
        if s.start
            .compare_exchange(0, start, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            s.len.store(len, Ordering::Release);
            return Some(Registration(i));
        }
    }
    log::warn!(
        "vfio: {SLOTS} BAR mappings are registered already; this one is not protected against \
         SIGBUS on surprise removal"
    );
    None
}

/// SIGBUS faults on BAR mappings turned into all-ones reads since the process started.
pub(crate) fn caught() -> u64 {
    CAUGHT.load(Ordering::Relaxed)
}

/// Replaces `[start, start + len)` (page aligned) by private anonymous memory filled with
/// `0xff`. Async-signal-safe. False if `mmap` failed.
fn dummy_over(start: usize, len: usize) -> bool {
    // SAFETY: the range is one of our BAR mappings (registered or about to be retired); it is
    // replaced by ordinary memory of the same size, which every later access may use.
    let p = unsafe {
        libc::mmap(
            start as *mut libc::c_void,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return false;
    }
    // SAFETY: `p` is the fresh writable mapping of `len` bytes just made.
    unsafe { core::ptr::write_bytes(p.cast::<u8>(), 0xff, len) };
    true
}

/// Replaces the BAR mapping `[start, start + len)` by all-ones memory now (the device was
/// removed): later register reads return all ones, doorbell writes go nowhere, and the mapping
/// no longer keeps the device file open.
pub(crate) fn retire(start: usize, len: usize) -> std::io::Result<()> {
    if dummy_over(start, len) {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn install() {
    INSTALL.call_once(|| {
        // SAFETY: a zeroed sigaction is a valid "no handler, empty mask" value; it is then
        // filled in completely before use.
        let mut act: libc::sigaction = unsafe { core::mem::zeroed() };
        act.sa_sigaction = on_sigbus as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        // SAFETY: `act.sa_mask` is a valid sigset_t to initialise.
        unsafe { libc::sigemptyset(&mut act.sa_mask) };
        // SAFETY: zeroed is a valid sigaction for the kernel to overwrite.
        let mut old: libc::sigaction = unsafe { core::mem::zeroed() };
        // Until PREVIOUS is set (right below) a foreign SIGBUS gets the default action.
        // SAFETY: `act` is a complete action whose handler is an `extern "C"` function of the
        // SA_SIGINFO signature; `old` is writable.
        let r = unsafe { libc::sigaction(libc::SIGBUS, &act, &mut old) };
        if r != 0 {
            log::warn!(
                "vfio: could not install the SIGBUS handler ({}); a BAR access after surprise \
                 removal may kill the process",
                std::io::Error::last_os_error()
            );
            return;
        }
        let _ = PREVIOUS.set(PrevAction(old));
    });
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    for s in RANGES.iter() {
        let len = s.len.load(Ordering::Acquire);
        let start = s.start.load(Ordering::Acquire);
        if len != 0 && addr >= start && addr - start < len && dummy_over(start, len) {
            CAUGHT.fetch_add(1, Ordering::Relaxed);
            return;
        }
    }
    chain(sig, info, ctx);
}

/// Hands a SIGBUS that is not ours to the previous action.
fn chain(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let prev = PREVIOUS.get().map(|p| (p.0.sa_sigaction, p.0.sa_flags));
    match prev {
        Some((h, flags)) if h != libc::SIG_DFL && h != libc::SIG_IGN => {
            if flags & libc::SA_SIGINFO != 0 {
                // SAFETY: the previous action was installed with SA_SIGINFO, so its handler
                // has this signature.
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    unsafe { core::mem::transmute(h) };
                f(sig, info, ctx);
            } else {
                // SAFETY: without SA_SIGINFO the previous handler takes the signal number only.
                let f: extern "C" fn(libc::c_int) = unsafe { core::mem::transmute(h) };
                f(sig);
            }
        }
        _ => {
            // Default action: restore it and return; the access faults again and the process
            // dies as it would have without us (a hardware SIGBUS cannot be ignored).
            // SAFETY: a zeroed sigaction with SIG_DFL (0) is the default action.
            let mut dfl: libc::sigaction = unsafe { core::mem::zeroed() };
            dfl.sa_sigaction = libc::SIG_DFL;
            // SAFETY: `dfl` is a complete action; sigaction is async-signal-safe.
            unsafe { libc::sigaction(libc::SIGBUS, &dfl, core::ptr::null_mut()) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    /// A shared mapping of a file truncated under it faults with SIGBUS, like a BAR whose
    /// device is gone.
    #[test]
    fn faulting_access_in_a_registered_range_reads_all_ones() {
        let path = std::env::temp_dir().join(format!("dioxide-sigbus-{}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f.set_len(0x2000).unwrap();
        let p = crate::bus::vfio::sys::mmap_device(f.as_raw_fd(), 0, 0x2000).unwrap();
        // SAFETY: inside the mapping just made, file still long enough.
        unsafe { p.as_ptr().cast::<u32>().write_volatile(7) };
        // SAFETY: as above.
        assert_eq!(unsafe { p.as_ptr().cast::<u32>().read_volatile() }, 7);
        let reg = register(p.as_ptr() as usize, 0x2000).unwrap();
        let before = caught();
        f.set_len(0).unwrap(); // every access now raises SIGBUS
        // SAFETY: inside the registered mapping; the handler makes the access succeed.
        let v = unsafe { p.as_ptr().add(0x1004).cast::<u32>().read_volatile() };
        assert_eq!(v, u32::MAX);
        assert_eq!(caught(), before + 1);
        // SAFETY: now dummy memory: plain reads and writes.
        unsafe { p.as_ptr().cast::<u32>().write_volatile(1) };
        // SAFETY: as above.
        let w = unsafe { p.as_ptr().add(4).cast::<u32>().read_volatile() };
        assert_eq!(w, u32::MAX);
        drop(reg);
        // SAFETY: the whole mapping, unused from here on.
        unsafe { crate::bus::vfio::sys::munmap(p, 0x2000) }.unwrap();
    }

    #[test]
    fn retire_replaces_a_mapping_with_all_ones() {
        let f = tempfile_like();
        f.set_len(0x1000).unwrap();
        let p = crate::bus::vfio::sys::mmap_device(f.as_raw_fd(), 0, 0x1000).unwrap();
        // SAFETY: inside the mapping.
        unsafe { p.as_ptr().cast::<u32>().write_volatile(5) };
        retire(p.as_ptr() as usize, 0x1000).unwrap();
        // SAFETY: the dummy mapping has the same extent.
        let w = unsafe { p.as_ptr().cast::<u32>().read_volatile() };
        assert_eq!(w, u32::MAX);
        // SAFETY: the whole mapping, unused from here on.
        unsafe { crate::bus::vfio::sys::munmap(p, 0x1000) }.unwrap();
    }

    fn tempfile_like() -> std::fs::File {
        let path = std::env::temp_dir().join(format!("dioxide-retire-{}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f
    }
}
