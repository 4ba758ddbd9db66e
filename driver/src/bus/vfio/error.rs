//! Errors of the VFIO backend: one variant per failure, each message saying what to do about it.

use std::io;
use std::path::PathBuf;

/// `Result` of the VFIO backend.
pub type Result<T> = core::result::Result<T, VfioError>;

/// A device sharing the IOMMU group with the controller, and its driver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupMember {
    /// PCI address.
    pub addr: String,
    /// Bound driver, `None` when unbound.
    pub driver: Option<String>,
}

impl core::fmt::Display for GroupMember {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match &self.driver {
            Some(d) => write!(f, "{} (driver {d})", self.addr),
            None => write!(f, "{} (no driver)", self.addr),
        }
    }
}

fn list(members: &[GroupMember]) -> String {
    members
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn driver_name(d: &Option<String>) -> &str {
    d.as_deref().unwrap_or("no driver")
}

fn kib(bytes: u64) -> String {
    if bytes == u64::MAX {
        "unlimited".into()
    } else {
        format!("{} KiB", bytes / 1024)
    }
}

/// Why the VFIO backend could not open a controller or supply DMA memory.
///
/// The checks that produce most of these run before anything is opened (step 1, "Diagnose
/// before touching anything", of the module documentation); the rest map the kernel's answer to
/// the first call that failed.
#[derive(Debug, thiserror::Error)]
pub enum VfioError {
    /// The PCI address is not `domain:bus:device.function`.
    #[error(
        "malformed PCI address '{addr}': expected domain:bus:device.function in hex, like \
         0000:01:00.0 (`lspci -D -d ::0108` lists NVMe controllers)"
    )]
    BadAddress {
        /// What was given.
        addr: String,
    },
    /// No such PCI device.
    #[error(
        "no PCI device {addr}: {} does not exist; check the address with `lspci -D -d ::0108`",
        path.display()
    )]
    NoDevice {
        /// The normalised address.
        addr: String,
        /// The sysfs directory that is missing.
        path: PathBuf,
    },
    /// No IOMMU groups at all: the IOMMU is off.
    #[error(
        "the IOMMU is not enabled: {} is empty, so VFIO cannot isolate {addr}. Add `{suggest}` to \
         the kernel command line (GRUB_CMDLINE_LINUX in /etc/default/grub, then update-grub and \
         reboot) and enable VT-d/AMD-Vi in the firmware; current command line: {cmdline}",
        groups_dir.display()
    )]
    IommuDisabled {
        /// The controller.
        addr: String,
        /// `/sys/kernel/iommu_groups`.
        groups_dir: PathBuf,
        /// The running kernel's command line.
        cmdline: String,
        /// The parameters to add for this CPU vendor.
        suggest: &'static str,
    },
    /// The IOMMU is on but does not cover this device.
    #[error(
        "{addr} has no IOMMU group ({} is missing) although the IOMMU is enabled: the device is \
         not behind the IOMMU; check the firmware's DMAR/IVRS tables and `dmesg | grep -i iommu`",
        path.display()
    )]
    NoIommuGroup {
        /// The controller.
        addr: String,
        /// The missing `iommu_group` link.
        path: PathBuf,
    },
    /// The device is not bound to vfio-pci.
    #[error(
        "{addr} is bound to {}, not vfio-pci: run `sudo ./hugepage-setup.sh config` (or \
         `sudo PCI_ALLOWED={addr} ./hugepage-setup.sh config` for this controller only)",
        driver_name(driver)
    )]
    NotBound {
        /// The controller.
        addr: String,
        /// Its current driver.
        driver: Option<String>,
    },
    /// Another device of the group is bound to a host driver.
    #[error(
        "IOMMU group {group} of {addr} is not viable: every device in it must be bound to \
         vfio-pci or unbound, but it holds {}; bind them with `sudo PCI_ALLOWED=\"<bdfs>\" \
         ./hugepage-setup.sh config`, unbind them (`echo <bdf> > \
         /sys/bus/pci/devices/<bdf>/driver/unbind`), or move the controller to a slot with its \
         own group",
        list(others)
    )]
    GroupNotViable {
        /// The controller.
        addr: String,
        /// The group number.
        group: u32,
        /// The devices that make the group not viable (or, when the kernel disagreed with our
        /// reading of sysfs, every other member).
        others: Vec<GroupMember>,
    },
    /// The VFIO modules are not loaded.
    #[error(
        "{} does not exist: the vfio modules are not loaded; run `sudo modprobe vfio-pci` (or \
         `sudo ./hugepage-setup.sh config`, which loads them)",
        path.display()
    )]
    VfioMissing {
        /// `/dev/vfio/vfio` or `/dev/vfio/<group>`.
        path: PathBuf,
    },
    /// No permission to open the VFIO container or group.
    #[error(
        "cannot open {} for {addr} (IOMMU group {group}): {source}; run as root, or give your \
         user the device: `sudo TARGET_USER=$USER ./hugepage-setup.sh config` (or `sudo chown \
         $USER {}`)",
        path.display(), path.display()
    )]
    Permission {
        /// The controller.
        addr: String,
        /// The group number.
        group: u32,
        /// The file.
        path: PathBuf,
        /// The error (EACCES or EPERM).
        #[source]
        source: io::Error,
    },
    /// The kernel kept answering the request for the device's file with EAGAIN: it could not
    /// take the device's lock, which a hot-unplug, an unbind or a reset of the device holds
    /// while it runs.
    #[error(
        "{addr} (IOMMU group {group}) is busy in the kernel: VFIO_GROUP_GET_DEVICE_FD answered \
         EAGAIN for {waited:?} (a hot-unplug, an unbind or a reset of the device is under way); \
         wait until it has finished and open the device again (`lspci -s {addr}` shows whether \
         it is still there; a device that was removed must be plugged back and bound with \
         `hugepage-setup.sh`)"
    )]
    KernelBusy {
        /// The controller.
        addr: String,
        /// The group number.
        group: u32,
        /// How long the open kept asking.
        waited: std::time::Duration,
    },
    /// Another process has the group or the device open.
    #[error(
        "{addr} (IOMMU group {group}) is already in use: {what} failed with EBUSY; one process \
         owns a VFIO group at a time, and opens it once: find the owner with `fuser -v \
         /dev/vfio/{group}` and stop it, or share this process's open bus"
    )]
    Busy {
        /// The controller.
        addr: String,
        /// The group number.
        group: u32,
        /// The step that failed (`open /dev/vfio/N`, `VFIO_GROUP_GET_DEVICE_FD`).
        what: &'static str,
    },
    /// Too few free hugepages.
    #[error(
        "hugepage pool too small: {free} of {total} {size_kb} kB hugepages free, need {needed} \
         ({}); reserve more with `sudo HUGEMEM=<MB> ./hugepage-setup.sh config` (HUGEMEM={} or \
         more), free hugepages held by other processes, or open with hugepages off (4 KiB pages, \
         slower)",
        source_path.display(), hugemem_mb(*needed, *free, *total, *size_kb)
    )]
    HugepagesShort {
        /// Pages needed.
        needed: u64,
        /// Pages free.
        free: u64,
        /// Pages in the pool.
        total: u64,
        /// Page size in kB.
        size_kb: u64,
        /// Where the numbers came from.
        source_path: PathBuf,
    },
    /// RLIMIT_MEMLOCK does not allow pinning the DMA memory.
    #[error(
        "locked-memory limit too low: pinning DMA memory needs {} but RLIMIT_MEMLOCK is {}; \
         raise it (`ulimit -l {}` in the shell, or `memlock` in /etc/security/limits.conf; \
         `sudo TARGET_USER=$USER ./hugepage-setup.sh config` warns about it) or run as root",
        kib(*required), kib(*current), required.div_ceil(1024)
    )]
    MemlockTooLow {
        /// Bytes needed.
        required: u64,
        /// Current soft limit in bytes (`u64::MAX`: unlimited).
        current: u64,
    },
    /// `VFIO_SET_IOMMU` was refused because the platform cannot remap interrupts.
    #[error(
        "the IOMMU of {addr} cannot remap interrupts, so VFIO refused it (VFIO_SET_IOMMU: \
         {source}); enable interrupt remapping (x2APIC/intremap in firmware, `intremap=on`), \
         or, accepting the risk, `modprobe vfio_iommu_type1 allow_unsafe_interrupts=1`"
    )]
    NoInterruptRemapping {
        /// The controller.
        addr: String,
        /// The error.
        #[source]
        source: vfio_ioctls::VfioError,
    },
    /// A VFIO call failed in a way none of the other variants explains.
    #[error("failed to {step} for {addr}: {source}")]
    Vfio {
        /// The controller.
        addr: String,
        /// What was being done.
        step: &'static str,
        /// The error from vfio-ioctls.
        #[source]
        source: vfio_ioctls::VfioError,
    },
    /// A system call failed.
    #[error("failed to {step} for {addr}: {source}")]
    Io {
        /// The controller.
        addr: String,
        /// What was being done.
        step: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// BAR0 cannot be used.
    #[error("BAR0 of {addr} is unusable: {reason}")]
    Bar {
        /// The controller.
        addr: String,
        /// Why.
        reason: String,
    },
    /// No IOVA space left for a chunk.
    #[error(
        "no IOVA space left for {len} bytes of DMA memory ({mapped} bytes mapped so far in \
         usable ranges {ranges})"
    )]
    IovaExhausted {
        /// Bytes asked for.
        len: u64,
        /// Bytes already mapped.
        mapped: u64,
        /// The usable ranges, for the message.
        ranges: String,
    },
    /// `VFIO_IOMMU_MAP_DMA` failed.
    #[error(
        "VFIO_IOMMU_MAP_DMA of {len} bytes at iova {iova:#x} failed: {source}{}",
        map_hint(source)
    )]
    DmaMap {
        /// IOVA.
        iova: u64,
        /// Length.
        len: u64,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// HUGEMEM (MB) that leaves `needed` pages free beside the ones in use now.
fn hugemem_mb(needed: u64, free: u64, total: u64, size_kb: u64) -> u64 {
    ((total.saturating_sub(free) + needed) * size_kb).div_ceil(1024)
}

fn map_hint(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::ENOMEM) => {
            " (the locked-memory limit is exhausted: raise `ulimit -l` or run as root)"
        }
        Some(libc::ENOSPC) => {
            " (the IOMMU's mapping limit is reached: vfio_iommu_type1 dma_entry_limit; allocate \
             larger buffers)"
        }
        Some(libc::EEXIST) => " (the IOVA range overlaps an existing mapping)",
        _ => "",
    }
}

/// The errno carried by a vfio-ioctls error, if any.
pub(crate) fn errno_of(e: &vfio_ioctls::VfioError) -> Option<i32> {
    use vfio_ioctls::VfioError as E;
    match e {
        E::OpenContainer(io) | E::OpenGroup(io, _) => io.raw_os_error(),
        E::ContainerSetIOMMU(s)
        | E::GroupGetDeviceFD(s)
        | E::VfioDeviceGetInfo(s)
        | E::VfioDeviceGetRegionInfo(s)
        | E::IommuDmaMap(s)
        | E::IommuDmaUnmap(s) => Some(s.errno()),
        _ => None,
    }
}
