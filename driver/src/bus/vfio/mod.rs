//! The VFIO backend: a real NVMe controller owned by this process through Linux VFIO.
//!
//! [`VfioBus::open`] is the one call a user needs:
//!
//! ```no_run
//! use dioxide::Bus;
//! use dioxide::vfio::{VfioBus, VfioOptions};
//! let bus = VfioBus::open("0000:01:00.0", VfioOptions::default())?;
//! println!("{} CAP {:#x}", bus.location(), bus.read64(0));
//! # Ok::<(), dioxide::vfio::VfioError>(())
//! ```
//!
//! # Set-up, in order
//! 1. **Diagnose before touching anything** (`diag`): the address parses, the device exists,
//!    the IOMMU is on, the device has an IOMMU group, it is bound to vfio-pci, every other
//!    device of its group is bound to vfio-pci or unbound (the group is *viable*), the VFIO
//!    files exist and open, the locked-memory limit covers the DMA memory, the hugepage pool has
//!    enough free pages. Each failure is a [`VfioError`] variant whose message says how to fix it.
//! 2. **Container** (`/dev/vfio/vfio`): one IOMMU address space; **group** (`/dev/vfio/<n>`):
//!    attached to the container, which then gets the type1v2 IOMMU; **device** fd from the group
//!    by its PCI address (opening it resets the function). vfio-ioctls does these three steps.
//! 3. **IOMMU facts** (`VFIO_IOMMU_GET_INFO`): page sizes and the usable IOVA ranges, which
//!    seed our IOVA allocator (`iova`).
//! 4. **PCI command register** through the config region: memory space and bus master on,
//!    INTx off. Nothing else: the driver polls, no interrupt is ever set up.
//! 5. **BAR0** (`bar`): mapped where VFIO allows mmap (the whole BAR, or the areas of its
//!    sparse-mmap capability), with `pread`/`pwrite` on the region for registers outside them.
//! 6. **DMA memory** (`memory`): chunks of 2 MiB hugepages (or 4 KiB pages), each pinned and
//!    mapped once with `VFIO_IOMMU_MAP_DMA`, handed to [`DmaMemory`] for sub-allocation.
//!
//! # Why IOVAs are not virtual addresses
//! The device sees IOVAs, translated by the IOMMU. We pick them from the IOMMU's usable ranges,
//! from a low nonzero base, skipping the MSI window, and below the IOMMU's address width; a
//! process's virtual addresses satisfy none of these reliably. [`DmaMemory`] translates between
//! the two for every buffer.
//!
//! # Teardown, in order (Drop)
//! Fields drop in declaration order: DMA memory first (each chunk `VFIO_IOMMU_UNMAP_DMA`, then
//! its memory freed), then BAR0 unmapped, then the device closed (vfio-ioctls then detaches the
//! group from the container), then the container closed. The controller layer must have shut
//! the controller down (CC.SHN) and dropped its queues, buffers and doorbells first. Buffers
//! that outlive the bus keep their chunks (and the container fd) alive; when the device has
//! already been closed the kernel has removed the IOMMU mappings itself, so only the memory is
//! freed then. A doorbell that outlives the bus keeps BAR0 mapped and so the device file open.
//!
//! # Surprise removal
//! A removed device reads all ones; the driver checks registers and completions for that. Some
//! platforms raise SIGBUS on an access to a BAR whose device is gone: a process-wide handler
//! (`sigbus`) maps all-ones memory over the BAR mapping that faulted, so the access reads all
//! ones too and the process lives on.
//!
//! An orderly removal (`device_del`, sysfs `remove`, unbinding vfio-pci) first asks the user of
//! the device to let it go: vfio-pci signals the device request eventfd
//! (`VFIO_PCI_REQ_IRQ_INDEX`, registered at open) and waits until the device file is closed,
//! signalling again every 10 s. The controller layer notices it from I/O (queue pairs with
//! requests outstanding ask [`Bus::removal_requested`]) and, idle or not, from its removal watch
//! thread asleep on a duplicate of the eventfd ([`Bus::removal_notifier`]); the bus then
//! reports the device removed and [`Bus::release_removed`] lets the file go, once, while the
//! `VfioBus` lives on: BAR mappings are replaced by all-ones memory and the device descriptors
//! are pointed at `/dev/null` (`dup2`), so in-flight requests fail as "device removed" and the
//! kernel completes the removal (in the QEMU guest, `device_del` completes within 0.3 s of
//! the request). DMA memory stays mapped until dropped (unmap failures after the removal are
//! expected and logged at debug level). Dropping the bus then closes the device: vfio-ioctls
//! panics there on a device whose sysfs entry is gone (it looks its group up again); the panic
//! is caught, kept off stderr and logged as a warning, and the group file is closed with the
//! container. A new controller plugged at the same address is opened with a new
//! [`VfioBus::open`] once it is bound to vfio-pci again.

mod bar;
mod diag;
mod error;
mod iova;
mod memory;
mod msix;
mod sigbus;
mod sys;

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_SET_DATA_EVENTFD, VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX,
    VFIO_PCI_MSIX_IRQ_INDEX, VFIO_PCI_REQ_IRQ_INDEX, VFIO_REGION_INFO_FLAG_MMAP,
};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioOps, VfioRegionInfoCap};

use crate::bus::dma::DmaMemory;
use crate::bus::interrupt::{EventFd, InterruptError};
use crate::bus::{Bus, Doorbell, PciId};

pub use diag::{HostFacts, SysRoots};
pub use error::{GroupMember, Result, VfioError};
pub use iova::{IommuInfo, IovaRange};

/// PCI command register bits.
mod pci_cmd {
    /// Memory space enable.
    pub const MEMORY: u16 = 1 << 1;
    /// Bus master enable.
    pub const BUS_MASTER: u16 = 1 << 2;
    /// INTx emulation disable.
    pub const INTX_DISABLE: u16 = 1 << 10;
}

/// Options of [`VfioBus::open`].
#[derive(Clone, Debug)]
pub struct VfioOptions {
    /// DMA memory from 2 MiB hugepages (default) or, when false, from 4 KiB pages (no hugepage
    /// pool needed; more IOMMU and TLB entries).
    pub hugepages: bool,
    /// DMA memory the caller expects to pin, checked against the hugepage pool and the
    /// locked-memory limit before anything is opened (default 4 MiB).
    pub dma_bytes: u64,
    /// Size of each DMA chunk mapped into the IOMMU (rounded up to the page size; default 2 MiB).
    /// A larger buffer gets a chunk of its own size.
    pub chunk_bytes: usize,
    /// Lowest IOVA handed out (default 2 MiB).
    pub iova_base: u64,
    /// Where `/sys`, `/dev` and `/proc` are (for the diagnostics).
    pub roots: SysRoots,
}

impl Default for VfioOptions {
    fn default() -> VfioOptions {
        VfioOptions {
            hugepages: true,
            dma_bytes: 4 << 20,
            chunk_bytes: memory::HUGEPAGE,
            iova_base: iova::DEFAULT_BASE,
            roots: SysRoots::default(),
        }
    }
}

impl VfioOptions {
    /// With hugepages on or off.
    pub fn with_hugepages(mut self, on: bool) -> VfioOptions {
        self.hugepages = on;
        self
    }
    /// With the expected DMA memory size.
    pub fn with_dma_bytes(mut self, bytes: u64) -> VfioOptions {
        self.dma_bytes = bytes;
        self
    }
    /// With the chunk size.
    pub fn with_chunk_bytes(mut self, bytes: usize) -> VfioOptions {
        self.chunk_bytes = bytes;
        self
    }
    /// With other sysfs/devfs/procfs roots.
    pub fn with_roots(mut self, roots: SysRoots) -> VfioOptions {
        self.roots = roots;
        self
    }
}

/// Closes the device, and records that the group has left the container.
struct DeviceGuard {
    device: Option<VfioDevice>,
    detached: Arc<AtomicBool>,
}

impl Drop for DeviceGuard {
    fn drop(&mut self) {
        if let Some(d) = self.device.take() {
            // vfio-ioctls' Drop unwraps the sysfs lookup of the group, which fails once the
            // device was hot-removed. The panic is caught (a panic must not escape a
            // destructor) and kept off stderr (`quiet_panics`): it is logged here instead. The
            // unwinding still drops the device's fields; the group stays in the container's
            // table and is closed with the container.
            let r = quiet_panics(|| drop(d));
            if let Err(p) = r {
                let why = p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                log::warn!(
                    "vfio: vfio-ioctls could not look the removed device's group up while closing \
                     it ({why}); the group file is closed with the container"
                );
            }
        }
        self.detached.store(true, Ordering::Release);
    }
}

std::thread_local! {
    /// Set while this thread runs code whose panics are caught and reported otherwise.
    static QUIET_PANICS: core::cell::Cell<bool> = const { core::cell::Cell::new(false) };
}

/// Wraps the process's panic hook, once: silent on a thread while it runs [`quiet_panics`],
/// unchanged everywhere else. Called by [`VfioBus::open`], before any device can be closed:
/// the hook cannot be changed from a panicking thread (`take_hook`/`set_hook` abort the process
/// there), and a device may be closed by the unwinding of a panic. Skipped on a panicking
/// thread (a later call installs it).
fn install_quiet_hook() {
    static HOOK: std::sync::Once = std::sync::Once::new();
    if std::thread::panicking() {
        return;
    }
    HOOK.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET_PANICS.with(|q| q.get()) {
                prev(info)
            }
        }));
    });
}

/// Runs `f`, catching a panic without the panic hook's message on stderr (the caller reports
/// it). Silent only on this thread and only during `f`, so every other panic is reported as
/// before; on a thread that is already panicking (a device closed by unwinding) the hook is left
/// alone and the message is printed.
fn quiet_panics<R>(f: impl FnOnce() -> R) -> std::thread::Result<R> {
    let quiet = !std::thread::panicking();
    if quiet {
        install_quiet_hook();
    }
    let was = QUIET_PANICS.with(|q| q.replace(quiet));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    QUIET_PANICS.with(|q| q.set(was));
    r
}

/// A controller opened through VFIO: BAR0 and DMA memory behind the IOMMU.
pub struct VfioBus {
    // Drop order is teardown order: MSI-X, DMA memory, BAR0, device (and group), container. No
    // Drop impl: the field order is the whole teardown.
    msix: msix::Msix,
    dma: DmaMemory,
    bar: Arc<bar::Bar0>,
    _device: DeviceGuard,
    _container: Arc<VfioContainer>,
    addr: String,
    group: u32,
    id: PciId,
    command: u16,
    iommu: IommuInfo,
    hugepages: bool,
    /// The device request eventfd (`VFIO_PCI_REQ_IRQ_INDEX`), if the kernel offers it.
    request: Option<EventFd>,
    /// The kernel asked for the device back (or the controller layer found it gone).
    removed: AtomicBool,
    /// The device file was let go ([`Bus::release_removed`]); shared with the DMA memory,
    /// whose unmaps may fail from then on.
    released: Arc<AtomicBool>,
}

impl core::fmt::Debug for VfioBus {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("VfioBus")
            .field("addr", &self.addr)
            .field("group", &self.group)
            .field("id", &self.id)
            .field("dma", &self.dma)
            .finish_non_exhaustive()
    }
}

fn vfio_err(addr: &str, step: &'static str, source: vfio_ioctls::VfioError) -> VfioError {
    VfioError::Vfio {
        addr: addr.to_string(),
        step,
        source,
    }
}

fn io_err(addr: &str, step: impl Into<String>, source: std::io::Error) -> VfioError {
    VfioError::Io {
        addr: addr.to_string(),
        step: step.into(),
        source,
    }
}

/// How long [`VfioBus::open`] asks again while the kernel answers the request for the device's
/// file with EAGAIN ([`kernel_busy`]), and how long it pauses between tries.
const KERNEL_BUSY_LIMIT: Duration = Duration::from_secs(2);
const KERNEL_BUSY_PAUSE: Duration = Duration::from_millis(20);

/// `VFIO_GROUP_GET_DEVICE_FD` failed with EAGAIN: vfio-pci could not take the device's lock
/// (held by a hot-unplug, an unbind or a reset of the device under way). Worth asking again.
fn kernel_busy(e: &vfio_ioctls::VfioError) -> bool {
    matches!(e, vfio_ioctls::VfioError::GroupGetDeviceFD(_))
        && error::errno_of(e) == Some(libc::EAGAIN)
}

/// Runs `f` until it succeeds or fails with an error `busy` does not accept, pausing `pause`
/// between tries, for up to `limit`; the last error comes with the time spent.
fn retry_while<T, E>(
    limit: Duration,
    pause: Duration,
    busy: impl Fn(&E) -> bool,
    mut f: impl FnMut() -> core::result::Result<T, E>,
) -> core::result::Result<T, (E, Duration)> {
    let start = Instant::now();
    loop {
        match f() {
            Ok(t) => return Ok(t),
            Err(e) if busy(&e) && start.elapsed() < limit => {
                log::debug!("VFIO: the device is busy in the kernel; trying again");
                std::thread::sleep(pause);
            }
            Err(e) => return Err((e, start.elapsed())),
        }
    }
}

/// Maps vfio-ioctls' answer while opening container, group and device to our diagnosis.
fn open_error(pre: &diag::Preflight, roots: &SysRoots, e: vfio_ioctls::VfioError) -> VfioError {
    use vfio_ioctls::VfioError as E;
    let (addr, group) = (pre.addr.clone(), pre.group);
    let errno = error::errno_of(&e);
    match (&e, errno) {
        (E::OpenContainer(_) | E::OpenGroup(..), Some(libc::EACCES | libc::EPERM)) => {
            let path = match e {
                E::OpenContainer(_) => roots.devfs.join("vfio/vfio"),
                _ => roots.group_file(group),
            };
            VfioError::Permission {
                addr,
                group,
                path,
                source: std::io::Error::from_raw_os_error(errno.unwrap_or(libc::EACCES)),
            }
        }
        (E::OpenContainer(_), Some(libc::ENOENT)) => VfioError::VfioMissing {
            path: roots.devfs.join("vfio/vfio"),
        },
        (E::OpenGroup(..), Some(libc::EBUSY)) => VfioError::Busy {
            addr,
            group,
            what: "open of the group file",
        },
        (E::GroupGetDeviceFD(_), Some(libc::EBUSY)) => VfioError::Busy {
            addr,
            group,
            what: "VFIO_GROUP_GET_DEVICE_FD",
        },
        (E::GroupSetContainer, _) => VfioError::Busy {
            addr,
            group,
            what: "VFIO_GROUP_SET_CONTAINER",
        },
        (E::GroupViable, _) => VfioError::GroupNotViable {
            others: diag::group_members(roots, group, &addr),
            addr,
            group,
        },
        (E::ContainerSetIOMMU(_), Some(libc::EPERM)) => {
            VfioError::NoInterruptRemapping { addr, source: e }
        }
        (E::OpenContainer(_) | E::VfioApiVersion | E::VfioExtension, _) => {
            vfio_err(&addr, "open the VFIO container (type1v2 IOMMU)", e)
        }
        _ => vfio_err(&addr, "open the device through VFIO", e),
    }
}

impl VfioBus {
    /// Opens the controller at PCI address `addr` (`0000:01:00.0`; `01:00.0` means domain 0).
    ///
    /// Runs every diagnostic first, then sets the device up (see the module docs). The
    /// controller is left as the device reset left it: the controller layer disables and
    /// enables it.
    pub fn open(addr: &str, opts: VfioOptions) -> Result<Arc<VfioBus>> {
        Self::open_with(addr, opts, &HostFacts::current())
    }

    /// [`VfioBus::open`] with injected host facts (tests, tools that know better).
    pub fn open_with(addr: &str, opts: VfioOptions, facts: &HostFacts<'_>) -> Result<Arc<VfioBus>> {
        install_quiet_hook();
        let roots = &opts.roots;
        let pre = diag::preflight(roots, facts, addr, opts.dma_bytes, opts.hugepages)?;
        let addr = pre.addr.clone();

        // A fresh container for each try: a failed one is dropped as a failed open drops it.
        let open = || -> core::result::Result<_, vfio_ioctls::VfioError> {
            let container = Arc::new(VfioContainer::new(None)?);
            let ops: Arc<dyn VfioOps> = container.clone();
            let device = VfioDevice::new(&pre.sysfs_dir, ops, false)?;
            Ok((container, device))
        };
        let (container, device) =
            retry_while(KERNEL_BUSY_LIMIT, KERNEL_BUSY_PAUSE, kernel_busy, open).map_err(
                |(e, waited)| match kernel_busy(&e) {
                    true => VfioError::KernelBusy {
                        addr: addr.clone(),
                        group: pre.group,
                        waited,
                    },
                    false => open_error(&pre, roots, e),
                },
            )?;
        let detached = Arc::new(AtomicBool::new(false));
        let device = DeviceGuard {
            device: Some(device),
            detached: detached.clone(),
        };
        let dev = device.device.as_ref().expect("just opened");

        // IOMMU facts.
        let raw = sys::iommu_get_info(container.as_raw_fd())
            .map_err(|e| io_err(&addr, "query the IOMMU (VFIO_IOMMU_GET_INFO)", e))?;
        let iommu = iova::parse_iommu_info(&raw).ok_or_else(|| {
            io_err(
                &addr,
                "parse VFIO_IOMMU_GET_INFO",
                std::io::Error::other("malformed capability chain"),
            )
        })?;
        let allocator = iova::IovaAllocator::new(
            iommu.ranges.as_deref(),
            opts.iova_base.max(iommu.min_page_size()),
            iova::DEFAULT_ADDRESS_BITS,
        );

        // Config space: identity, then memory space + bus master on, INTx off.
        let fd = dev.as_raw_fd();
        let cfg = dev.get_region_offset(VFIO_PCI_CONFIG_REGION_INDEX);
        let mut hdr = [0u8; 0x30];
        sys::pread_exact(fd, &mut hdr, cfg)
            .map_err(|e| io_err(&addr, "read PCI config space", e))?;
        let le16 = |o: usize| u16::from_le_bytes([hdr[o], hdr[o + 1]]);
        let id = PciId {
            vendor: le16(0),
            device: le16(2),
            subsystem_vendor: le16(0x2c),
            subsystem_device: le16(0x2e),
        };
        let want = le16(4) | pci_cmd::MEMORY | pci_cmd::BUS_MASTER | pci_cmd::INTX_DISABLE;
        sys::pwrite_all(fd, &want.to_le_bytes(), cfg + 4)
            .map_err(|e| io_err(&addr, "write the PCI command register", e))?;
        let mut b = [0u8; 2];
        sys::pread_exact(fd, &mut b, cfg + 4)
            .map_err(|e| io_err(&addr, "read the PCI command register", e))?;
        let command = u16::from_le_bytes(b);
        if command & (pci_cmd::MEMORY | pci_cmd::BUS_MASTER)
            != pci_cmd::MEMORY | pci_cmd::BUS_MASTER
        {
            return Err(VfioError::Bar {
                addr,
                reason: format!(
                    "PCI command register reads {command:#06x} after enabling memory space and \
                     bus master"
                ),
            });
        }

        // BAR0.
        let i = VFIO_PCI_BAR0_REGION_INDEX;
        let (size, flags) = (dev.get_region_size(i), dev.get_region_flags(i));
        if size < 0x1010 {
            return Err(VfioError::Bar {
                addr,
                reason: format!("BAR0 is {size:#x} bytes, too small for NVMe registers"),
            });
        }
        let sparse: Option<Vec<(u64, u64)>> =
            dev.get_region_caps(i).into_iter().find_map(|c| match c {
                VfioRegionInfoCap::SparseMmap(s) => {
                    Some(s.areas.iter().map(|a| (a.offset, a.size)).collect())
                }
                _ => None,
            });
        let areas = bar::mmap_areas(
            size,
            flags & VFIO_REGION_INFO_FLAG_MMAP != 0,
            sparse.as_deref(),
        );
        // SAFETY: `fd` is the device fd owned by `dev`, open for this whole block.
        let own = unsafe { BorrowedFd::borrow_raw(fd) }
            .try_clone_to_owned()
            .map_err(|e| io_err(&addr, "duplicate the device fd", e))?;
        let bar = bar::Bar0::map(own, dev.get_region_offset(i), size, &areas)
            .map_err(|e| io_err(&addr, "mmap BAR0", e))?;

        let removed_flag = Arc::new(AtomicBool::new(false));
        let mem = memory::VfioMemory::new(
            container.clone(),
            allocator,
            opts.hugepages,
            opts.chunk_bytes,
            iommu.min_page_size(),
            memory::DeviceFlags {
                detached,
                removed: removed_flag.clone(),
            },
            opts.roots.clone(),
        );
        let vectors = dev
            .get_irq_info(VFIO_PCI_MSIX_IRQ_INDEX)
            .map_or(0, |i| i.count);
        let request = request_notifier(
            fd,
            dev.get_irq_info(VFIO_PCI_REQ_IRQ_INDEX)
                .map_or(0, |i| i.count),
            &addr,
        );
        Ok(Arc::new(VfioBus {
            msix: msix::Msix::new(fd, vectors, addr.clone()),
            dma: DmaMemory::new(Box::new(mem)),
            bar: Arc::new(bar),
            _device: device,
            _container: container,
            group: pre.group,
            addr,
            id,
            command,
            iommu,
            hugepages: opts.hugepages,
            request,
            removed: AtomicBool::new(false),
            released: removed_flag,
        }))
    }

    /// True once the device file was let go after the device's removal.
    pub fn released(&self) -> bool {
        self.released.load(Ordering::Acquire)
    }
    /// SIGBUS faults on BAR mappings (of any device) turned into all-ones reads since the
    /// process started.
    pub fn sigbus_caught() -> u64 {
        sigbus::caught()
    }
    /// True if vfio-pci's device request notification is set up (kernels since 4.0).
    pub fn has_request_notifier(&self) -> bool {
        self.request.is_some()
    }

    /// The IOMMU group number.
    pub fn group(&self) -> u32 {
        self.group
    }
    /// What the IOMMU reported.
    pub fn iommu(&self) -> &IommuInfo {
        &self.iommu
    }
    /// The PCI command register after set-up.
    pub fn pci_command(&self) -> u16 {
        self.command
    }
    /// Size of BAR0 and its mmapped areas `(offset, len)`.
    pub fn bar0_layout(&self) -> (u64, Vec<(u64, usize)>) {
        (
            self.bar.size(),
            self.bar.areas().iter().map(|a| (a.offset, a.len)).collect(),
        )
    }
    /// Register accesses that failed on the `pread`/`pwrite` path (read as all ones).
    pub fn register_io_errors(&self) -> u64 {
        self.bar.io_errors()
    }
    /// True if DMA memory comes from 2 MiB hugepages.
    pub fn hugepages(&self) -> bool {
        self.hugepages
    }
}

impl Bus for VfioBus {
    fn location(&self) -> &str {
        &self.addr
    }
    fn pci_id(&self) -> PciId {
        self.id
    }
    #[inline]
    fn read32(&self, offset: u32) -> u32 {
        self.bar.read32(offset)
    }
    #[inline]
    fn write32(&self, offset: u32, value: u32) {
        self.bar.write32(offset, value)
    }
    fn doorbell(&self, offset: u32) -> Doorbell {
        match self.bar.reg_ptr(offset) {
            // SAFETY: `reg` is an aligned register inside a BAR0 mapping, which the `Arc<Bar0>`
            // given as keep-alive holds mapped.
            Some(reg) => unsafe { Doorbell::mmio(reg, self.bar.clone()) },
            None => Doorbell::sink(self.bar.clone(), offset),
        }
    }
    fn dma(&self) -> &DmaMemory {
        &self.dma
    }
    fn interrupt(&self, vector: u16) -> core::result::Result<Arc<EventFd>, InterruptError> {
        self.msix.get(vector)
    }
    fn removal_requested(&self) -> bool {
        if self.removed.load(Ordering::Acquire) {
            return true;
        }
        if self.request.as_ref().is_some_and(|e| e.clear()) {
            log::warn!(
                "{}: the kernel asks for the device back (hot-unplug or unbind): treating it \
                 as removed",
                self.addr
            );
            self.removed.store(true, Ordering::Release);
            return true;
        }
        false
    }
    fn removal_notifier(&self) -> Option<std::os::fd::OwnedFd> {
        let ev = self.request.as_ref()?;
        // SAFETY: the eventfd is owned by `self.request`, open for this call.
        match unsafe { BorrowedFd::borrow_raw(ev.raw_fd()) }.try_clone_to_owned() {
            Ok(fd) => Some(fd),
            Err(e) => {
                log::warn!(
                    "{}: could not duplicate the device request eventfd ({e}); an idle \
                     controller notices its removal only at its next I/O",
                    self.addr
                );
                None
            }
        }
    }
    fn release_removed(&self) {
        self.removed.store(true, Ordering::Release);
        if self.released.swap(true, Ordering::AcqRel) {
            return;
        }
        self.msix.release();
        self.bar.retire();
        if let Some(d) = self._device.device.as_ref()
            && let Err(e) = sys::point_at_dev_null(d.as_raw_fd())
        {
            log::warn!("{}: could not release the device file: {e}", self.addr);
        }
        log::info!(
            "{}: device removed; its VFIO device file was released so the kernel can complete \
             the removal",
            self.addr
        );
    }
}

/// Registers an eventfd on the device request IRQ (`VFIO_PCI_REQ_IRQ_INDEX`), which vfio-pci
/// signals when it wants the device back. `None` (logged) if the kernel does not offer it.
fn request_notifier(fd: std::os::fd::RawFd, count: u32, addr: &str) -> Option<EventFd> {
    if count == 0 {
        log::debug!("{addr}: no device request IRQ; removal is noticed by registers only");
        return None;
    }
    let ev = match EventFd::new() {
        Ok(ev) => ev,
        Err(e) => {
            log::warn!("{addr}: no eventfd for the device request IRQ: {e}");
            return None;
        }
    };
    match msix::set_irqs(
        fd,
        VFIO_PCI_REQ_IRQ_INDEX,
        VFIO_IRQ_SET_DATA_EVENTFD,
        0,
        &[ev.raw_fd()],
    ) {
        Ok(()) => Some(ev),
        Err(e) => {
            log::warn!(
                "{addr}: could not register the device request eventfd (VFIO_DEVICE_SET_IRQS): \
                 {e}; removal is noticed by registers only"
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::quiet_panics;
    use super::{kernel_busy, retry_while};
    use std::time::Duration;
    use vfio_ioctls::VfioError as E;
    use vmm_sys_util::errno::Error as SysError;

    /// Only EAGAIN from the request for the device's file is the kernel being busy; EBUSY there
    /// is another process owning the device (reported at once), and EAGAIN elsewhere is not
    /// this case.
    #[test]
    fn only_eagain_from_get_device_fd_is_the_kernel_being_busy() {
        assert!(kernel_busy(&E::GroupGetDeviceFD(SysError::new(
            libc::EAGAIN
        ))));
        assert!(!kernel_busy(&E::GroupGetDeviceFD(SysError::new(
            libc::EBUSY
        ))));
        assert!(!kernel_busy(&E::ContainerSetIOMMU(SysError::new(
            libc::EAGAIN
        ))));
        assert!(!kernel_busy(&E::InvalidPath));
    }

    /// An open that finds the kernel busy asks again until it succeeds; one that keeps finding
    /// it busy gives up after the limit with the time it waited; any other failure is reported
    /// at once.
    #[test]
    fn a_busy_kernel_is_asked_again_within_a_limit() {
        let busy = || Err::<u32, _>(E::GroupGetDeviceFD(SysError::new(libc::EAGAIN)));
        let (limit, pause) = (Duration::from_millis(200), Duration::from_millis(5));
        let mut tries = 0;
        let r = retry_while(limit, pause, kernel_busy, || {
            tries += 1;
            if tries < 4 { busy() } else { Ok(7) }
        });
        assert_eq!(r.unwrap(), 7);
        assert_eq!(tries, 4);

        let mut tries = 0;
        let (e, waited) = retry_while(limit, pause, kernel_busy, || {
            tries += 1;
            busy()
        })
        .unwrap_err();
        assert!(kernel_busy(&e));
        assert!(
            waited >= limit && tries > 1,
            "{waited:?} after {tries} tries"
        );

        let mut tries = 0;
        let (e, _) = retry_while(limit, pause, kernel_busy, || {
            tries += 1;
            Err::<u32, _>(E::GroupGetDeviceFD(SysError::new(libc::EBUSY)))
        })
        .unwrap_err();
        assert!(!kernel_busy(&e));
        assert_eq!(tries, 1);
    }

    /// The error names the state, how long the open waited, and what to do.
    #[test]
    fn the_kernel_busy_error_says_what_to_do() {
        let e = super::VfioError::KernelBusy {
            addr: "0000:00:04.0".into(),
            group: 7,
            waited: Duration::from_secs(2),
        }
        .to_string();
        assert!(
            e.contains("0000:00:04.0 (IOMMU group 7) is busy in the kernel")
                && e.contains("EAGAIN for 2s")
                && e.contains("open the device again")
                && e.contains("hugepage-setup.sh"),
            "{e}"
        );
    }

    #[test]
    fn quiet_panics_catches_and_returns_the_panic() {
        assert_eq!(quiet_panics(|| 7).unwrap(), 7);
        let p = quiet_panics(|| -> u32 { panic!("group lookup failed") }).unwrap_err();
        assert_eq!(p.downcast_ref::<&str>(), Some(&"group lookup failed"));
        // Afterwards panics on this thread are reported again (the flag is restored).
        assert!(!super::QUIET_PANICS.with(|q| q.get()));
    }

    /// A device closed by the unwinding of a panic (its first close in the process) must not
    /// abort the process: the hook cannot be changed from a panicking thread. Run in a child
    /// process of this test binary, where no earlier close can have installed the hook.
    #[test]
    fn quiet_panics_during_unwinding_does_not_abort() {
        const CHILD: &str = "DIOXIDE_QUIET_PANICS_CHILD";
        if std::env::var_os(CHILD).is_some() {
            struct CloseOnUnwind;
            impl Drop for CloseOnUnwind {
                fn drop(&mut self) {
                    let r = quiet_panics(|| -> u32 { panic!("group lookup failed") });
                    assert!(r.is_err());
                }
            }
            let r = std::panic::catch_unwind(|| {
                let _d = CloseOnUnwind;
                panic!("the user's panic");
            });
            assert!(r.is_err());
            return;
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "bus::vfio::tests::quiet_panics_during_unwinding_does_not_abort",
                "--test-threads=1",
            ])
            .env(CHILD, "1")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "the child test failed ({}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
