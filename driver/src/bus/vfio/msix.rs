//! MSI-X through VFIO: one eventfd per vector, handed to the kernel with
//! `VFIO_DEVICE_SET_IRQS` (`VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER`, index
//! `VFIO_PCI_MSIX_IRQ_INDEX`), so the kernel's interrupt handler writes the eventfd of the
//! vector that fired.
//!
//! MSI-X is enabled on the first request, for a block of vectors (at least 32, twice the
//! highest asked for, at most what the function has). Only vectors that were asked for get an
//! eventfd; the others stay masked (vector 0, the admin queue's, always does: the admin queue is
//! polled). A later vector inside the block is one more `SET_IRQS` of that vector alone. A
//! vector beyond the block needs a larger block: kernels without dynamic MSI-X allocation take
//! that only after disabling MSI-X, so the block is disabled and enabled again with every
//! eventfd, and every eventfd is then signalled once: an interrupt of the short window in
//! between is not lost, at worst a poller wakes for nothing.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE,
    VFIO_PCI_MSIX_IRQ_INDEX,
};

use crate::bus::interrupt::{EventFd, InterruptError};

/// `VFIO_DEVICE_SET_IRQS` = `_IO(VFIO_TYPE, VFIO_BASE + 10)`.
const VFIO_DEVICE_SET_IRQS: libc::c_ulong = ((b';' as libc::c_ulong) << 8) | (100 + 10);
/// Smallest block of vectors enabled at once.
const MIN_BLOCK: u32 = 32;

/// The MSI-X vectors of one function.
pub(crate) struct Msix {
    /// The device fd (owned by the bus, which outlives this).
    fd: RawFd,
    /// Vectors the function has (0: no MSI-X).
    available: u32,
    /// Enabled block: an entry per vector, `Some` for those handed out.
    table: Mutex<Vec<Option<Arc<EventFd>>>>,
    location: String,
    /// Set once the device was released after its removal.
    released: AtomicBool,
}

impl Msix {
    pub(crate) fn new(fd: RawFd, available: u32, location: String) -> Msix {
        Msix {
            fd,
            available,
            table: Mutex::new(Vec::new()),
            location,
            released: AtomicBool::new(false),
        }
    }

    /// The eventfd of `vector` (1 or more), enabling MSI-X or growing the block as needed.
    pub(crate) fn get(&self, vector: u16) -> Result<Arc<EventFd>, InterruptError> {
        let v = vector as u32;
        if v == 0 || v >= self.available {
            return Err(InterruptError::NoVector {
                location: self.location.clone(),
                vector,
                available: self.available.min(u16::MAX as u32) as u16,
            });
        }
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(Some(fd)) = t.get(v as usize) {
            return Ok(fd.clone());
        }
        let fd = Arc::new(EventFd::new().map_err(|source| self.io("create an eventfd", source))?);
        if (v as usize) < t.len() {
            // Inside the enabled block: this vector alone.
            self.set(v, &[fd.raw_fd()])
                .map_err(|e| self.io("enable an MSI-X vector (VFIO_DEVICE_SET_IRQS)", e))?;
            t[v as usize] = Some(fd.clone());
            return Ok(fd);
        }
        let block = (2 * (v + 1)).max(MIN_BLOCK).min(self.available) as usize;
        let mut grown = t.clone();
        grown.resize(block, None);
        grown[v as usize] = Some(fd.clone());
        let fds: Vec<RawFd> = grown
            .iter()
            .map(|e| e.as_ref().map_or(-1, |f| f.raw_fd()))
            .collect();
        let was_enabled = !t.is_empty();
        if was_enabled {
            self.disable()
                .map_err(|e| self.io("disable MSI-X to enlarge it (VFIO_DEVICE_SET_IRQS)", e))?;
        }
        if let Err(e) = self.set(0, &fds) {
            if was_enabled {
                // Put the old block back so the queues using it keep their interrupts.
                let old: Vec<RawFd> = t
                    .iter()
                    .map(|e| e.as_ref().map_or(-1, |f| f.raw_fd()))
                    .collect();
                if let Err(e2) = self.set(0, &old) {
                    log::error!(
                        "{}: could not restore MSI-X after a failed enlargement: {e2}",
                        self.location
                    );
                }
                t.iter().flatten().for_each(|f| f.signal());
            }
            return Err(self.io("enable MSI-X (VFIO_DEVICE_SET_IRQS)", e));
        }
        // An interrupt of the window where MSI-X was off would be lost: wake everyone once.
        t.iter().flatten().for_each(|f| f.signal());
        *t = grown;
        log::debug!(
            "{}: MSI-X enabled, {block} of {} vectors",
            self.location,
            self.available
        );
        Ok(fd)
    }

    fn io(&self, step: &'static str, source: std::io::Error) -> InterruptError {
        InterruptError::Io {
            location: self.location.clone(),
            step,
            source,
        }
    }

    /// `SET_IRQS` of the eventfds `fds` (-1: none) for vectors `start..start + fds.len()`.
    fn set(&self, start: u32, fds: &[RawFd]) -> std::io::Result<()> {
        self.set_irqs(VFIO_IRQ_SET_DATA_EVENTFD, start, fds)
    }

    /// Disables MSI-X (`DATA_NONE`, count 0).
    fn disable(&self) -> std::io::Result<()> {
        self.set_irqs(VFIO_IRQ_SET_DATA_NONE, 0, &[])
    }

    fn set_irqs(&self, data: u32, start: u32, fds: &[RawFd]) -> std::io::Result<()> {
        if self.released.load(Ordering::Acquire) {
            return Ok(());
        }
        set_irqs(self.fd, VFIO_PCI_MSIX_IRQ_INDEX, data, start, fds)
    }

    /// The device was released after its removal: no more `SET_IRQS` (the kernel disabled
    /// MSI-X when the device file closed).
    pub(crate) fn release(&self) {
        self.released.store(true, Ordering::Release);
    }
}

/// `VFIO_DEVICE_SET_IRQS` on device fd `fd`, IRQ index `index` (MSI-X, REQ, ...): the
/// eventfds `fds` (-1: none) for vectors `start..start + fds.len()` with
/// `VFIO_IRQ_SET_DATA_EVENTFD`, or nothing with `VFIO_IRQ_SET_DATA_NONE` and no fds (disable).
pub(crate) fn set_irqs(
    fd: RawFd,
    index: u32,
    data: u32,
    start: u32,
    fds: &[RawFd],
) -> std::io::Result<()> {
    // struct vfio_irq_set { u32 argsz, flags, index, start, count; u8 data[]; }: five u32
    // words, then one u32 (an fd) per vector.
    let mut words: Vec<u32> = Vec::with_capacity(5 + fds.len());
    words.push(((5 + fds.len()) * 4) as u32);
    words.push(data | VFIO_IRQ_SET_ACTION_TRIGGER);
    words.push(index);
    words.push(start);
    words.push(fds.len() as u32);
    words.extend(fds.iter().map(|&f| f as u32));
    // SAFETY: `words` is a complete vfio_irq_set of `argsz` bytes, readable for the whole
    // call; the kernel only reads it. `fd` is the device fd, kept open by the bus.
    let r = unsafe { libc::ioctl(fd, VFIO_DEVICE_SET_IRQS as _, words.as_ptr()) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl Drop for Msix {
    fn drop(&mut self) {
        let enabled = !self
            .table
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty();
        if enabled && !self.released.load(Ordering::Acquire) {
            if let Err(e) = self.disable() {
                log::warn!("{}: could not disable MSI-X: {e}", self.location);
            }
        }
    }
}
