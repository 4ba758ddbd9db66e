//! Checks that run before anything is opened, so a failure says what is wrong and how to fix it.
//!
//! Each check is a pure function of a file tree (`/sys`, `/dev`, `/proc`, relocatable through
//! [`SysRoots`]) and of a few facts about the process ([`HostFacts`]: the memlock limit and
//! whether the group file can be opened). The unit tests build a fake tree in a temporary
//! directory and check every message.
//!
//! Order, from the most fundamental problem to the least (the first failure is reported):
//! address syntax → device exists → IOMMU enabled → device has a group → bound to vfio-pci →
//! group viable → `/dev/vfio/vfio` and `/dev/vfio/<group>` exist and open → locked-memory limit →
//! hugepage pool.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::error::{GroupMember, Result, VfioError};

/// Where sysfs, devfs and procfs are mounted (tests point them at a fake tree).
///
/// The diagnostics read only these. The VFIO calls themselves go through vfio-ioctls, which
/// opens `/dev/vfio/vfio` and `/dev/vfio/<group>` at their fixed paths.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SysRoots {
    /// sysfs, default `/sys`.
    pub sysfs: PathBuf,
    /// devfs, default `/dev`.
    pub devfs: PathBuf,
    /// procfs, default `/proc`.
    pub procfs: PathBuf,
}

impl Default for SysRoots {
    fn default() -> SysRoots {
        SysRoots {
            sysfs: "/sys".into(),
            devfs: "/dev".into(),
            procfs: "/proc".into(),
        }
    }
}

impl SysRoots {
    /// All three under one directory (`<dir>/sys`, `<dir>/dev`, `<dir>/proc`).
    pub fn under(dir: impl AsRef<Path>) -> SysRoots {
        let d = dir.as_ref();
        SysRoots {
            sysfs: d.join("sys"),
            devfs: d.join("dev"),
            procfs: d.join("proc"),
        }
    }
    /// `/sys/bus/pci/devices/<addr>`.
    pub fn pci_device(&self, addr: &str) -> PathBuf {
        self.sysfs.join("bus/pci/devices").join(addr)
    }
    /// `/dev/vfio/<group>`.
    pub fn group_file(&self, group: u32) -> PathBuf {
        self.devfs.join("vfio").join(group.to_string())
    }
}

/// Facts about the process the checks need besides the file tree.
pub struct HostFacts<'a> {
    /// RLIMIT_MEMLOCK soft limit in bytes (`u64::MAX`: unlimited).
    pub memlock: u64,
    /// Can `path` be opened for reading and writing? (`access(2)` in real life.)
    pub can_open_rw: &'a dyn Fn(&Path) -> io::Result<()>,
}

impl HostFacts<'static> {
    /// The facts of this process.
    pub fn current() -> HostFacts<'static> {
        HostFacts {
            memlock: super::sys::memlock_limit().unwrap_or(u64::MAX),
            can_open_rw: &super::sys::access_rw,
        }
    }
}

/// What the preflight found out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Preflight {
    /// Normalised PCI address (`0000:01:00.0`).
    pub addr: String,
    /// Its sysfs directory.
    pub sysfs_dir: PathBuf,
    /// IOMMU group number.
    pub group: u32,
}

/// Size of the hugepages the backend uses.
pub const HUGEPAGE_KB: u64 = 2048;

/// Normalises `0000:01:00.0` / `01:00.0` (any case) to `0000:01:00.0`, or `None`.
pub fn parse_pci_addr(s: &str) -> Option<String> {
    let s = s.trim();
    let parts: Vec<&str> = s.split(':').collect();
    let (dom, bus, devfn) = match parts.as_slice() {
        [d, b, df] => (*d, *b, *df),
        [b, df] => ("0000", *b, *df),
        _ => return None,
    };
    let (dev, func) = devfn.split_once('.')?;
    let hex = |x: &str, max_len: usize| {
        (!x.is_empty() && x.len() <= max_len && x.chars().all(|c| c.is_ascii_hexdigit()))
            .then(|| u32::from_str_radix(x, 16).ok())
            .flatten()
    };
    let (d, b, v, f) = (hex(dom, 4)?, hex(bus, 2)?, hex(dev, 2)?, hex(func, 1)?);
    (v < 32 && f < 8).then(|| format!("{d:04x}:{b:02x}:{v:02x}.{f:x}"))
}

fn link_name(p: &Path) -> Option<String> {
    let t = fs::read_link(p).ok()?;
    Some(t.file_name()?.to_string_lossy().into_owned())
}

/// The driver bound to the PCI device at `dir`, if any.
pub fn driver_of(dir: &Path) -> Option<String> {
    link_name(&dir.join("driver"))
}

/// Drivers that leave a group viable besides vfio-pci: they never let the device do DMA for the
/// host (the kernel's `driver_managed_dma` drivers).
const VIABLE_DRIVERS: &[&str] = &["vfio-pci", "pci-stub", "pcieport"];

/// Members of `group` other than `addr`, and their drivers.
pub fn group_members(roots: &SysRoots, group: u32, addr: &str) -> Vec<GroupMember> {
    let dir = roots
        .sysfs
        .join("kernel/iommu_groups")
        .join(group.to_string())
        .join("devices");
    let mut v: Vec<GroupMember> = fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != addr)
        .map(|n| GroupMember {
            driver: driver_of(&roots.pci_device(&n)),
            addr: n,
        })
        .collect();
    v.sort_by(|a, b| a.addr.cmp(&b.addr));
    v
}

fn iommu_suggestion(roots: &SysRoots) -> &'static str {
    let cpu = fs::read_to_string(roots.procfs.join("cpuinfo")).unwrap_or_default();
    if cpu.contains("AuthenticAMD") {
        "amd_iommu=on iommu=pt"
    } else if cpu.contains("GenuineIntel") {
        "intel_iommu=on iommu=pt"
    } else {
        "intel_iommu=on iommu=pt` (Intel) or `amd_iommu=on iommu=pt` (AMD)"
    }
}

/// Checks the device side: address, existence, IOMMU, group, driver, viability, VFIO files.
pub fn check_device(roots: &SysRoots, facts: &HostFacts<'_>, addr: &str) -> Result<Preflight> {
    let norm = parse_pci_addr(addr).ok_or_else(|| VfioError::BadAddress {
        addr: addr.to_string(),
    })?;
    let dir = roots.pci_device(&norm);
    if !dir.exists() {
        return Err(VfioError::NoDevice {
            addr: norm,
            path: dir,
        });
    }
    let groups_dir = roots.sysfs.join("kernel/iommu_groups");
    let any_group = fs::read_dir(&groups_dir)
        .map(|mut d| d.next().is_some())
        .unwrap_or(false);
    if !any_group {
        let cmdline = fs::read_to_string(roots.procfs.join("cmdline"))
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "(unreadable)".into());
        return Err(VfioError::IommuDisabled {
            addr: norm,
            groups_dir,
            cmdline,
            suggest: iommu_suggestion(roots),
        });
    }
    let link = dir.join("iommu_group");
    let Some(group) = link_name(&link).and_then(|g| g.parse::<u32>().ok()) else {
        return Err(VfioError::NoIommuGroup {
            addr: norm,
            path: link,
        });
    };
    let driver = driver_of(&dir);
    if driver.as_deref() != Some("vfio-pci") {
        return Err(VfioError::NotBound { addr: norm, driver });
    }
    let others: Vec<GroupMember> = group_members(roots, group, &norm)
        .into_iter()
        .filter(|m| {
            m.driver
                .as_deref()
                .is_some_and(|d| !VIABLE_DRIVERS.contains(&d))
        })
        .collect();
    if !others.is_empty() {
        return Err(VfioError::GroupNotViable {
            addr: norm,
            group,
            others,
        });
    }
    let container = roots.devfs.join("vfio/vfio");
    if !container.exists() {
        return Err(VfioError::VfioMissing { path: container });
    }
    let gfile = roots.group_file(group);
    if !gfile.exists() {
        return Err(VfioError::VfioMissing { path: gfile });
    }
    for path in [container, gfile] {
        if let Err(source) = (facts.can_open_rw)(&path) {
            return Err(VfioError::Permission {
                addr: norm,
                group,
                path,
                source,
            });
        }
    }
    Ok(Preflight {
        addr: norm,
        sysfs_dir: dir,
        group,
    })
}

/// True if the process has CAP_IPC_LOCK (then the memlock limit does not apply to VFIO).
pub fn has_cap_ipc_lock(roots: &SysRoots) -> bool {
    const CAP_IPC_LOCK: u32 = 14;
    let status = fs::read_to_string(roots.procfs.join("self/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0)
}

/// Checks that `bytes` of DMA memory may be pinned.
pub fn check_memlock(roots: &SysRoots, facts: &HostFacts<'_>, bytes: u64) -> Result<()> {
    if facts.memlock == u64::MAX || facts.memlock >= bytes || has_cap_ipc_lock(roots) {
        return Ok(());
    }
    Err(VfioError::MemlockTooLow {
        required: bytes,
        current: facts.memlock,
    })
}

/// Free and total 2 MiB hugepages, and where the numbers came from.
pub fn hugepage_counts(roots: &SysRoots) -> Option<(u64, u64, PathBuf)> {
    let dir = roots
        .sysfs
        .join(format!("kernel/mm/hugepages/hugepages-{HUGEPAGE_KB}kB"));
    let read = |name: &str| -> Option<u64> {
        fs::read_to_string(dir.join(name)).ok()?.trim().parse().ok()
    };
    if let (Some(free), Some(total)) = (read("free_hugepages"), read("nr_hugepages")) {
        return Some((free, total, dir));
    }
    // Older layouts: /proc/meminfo describes the default hugepage size only.
    let path = roots.procfs.join("meminfo");
    let text = fs::read_to_string(&path).ok()?;
    let field = |name: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    if field("Hugepagesize:")? != HUGEPAGE_KB {
        return Some((0, 0, path));
    }
    Some((field("HugePages_Free:")?, field("HugePages_Total:")?, path))
}

/// Checks that `bytes` of DMA memory can come from free 2 MiB hugepages.
pub fn check_hugepages(roots: &SysRoots, bytes: u64) -> Result<()> {
    let needed = bytes.div_ceil(HUGEPAGE_KB * 1024).max(1);
    let (free, total, source_path) =
        hugepage_counts(roots).unwrap_or((0, 0, roots.sysfs.join("kernel/mm/hugepages")));
    if free >= needed {
        return Ok(());
    }
    Err(VfioError::HugepagesShort {
        needed,
        free,
        total,
        size_kb: HUGEPAGE_KB,
        source_path,
    })
}

/// Every check, in order, for opening `addr` with `dma_bytes` of DMA memory to pin.
pub fn preflight(
    roots: &SysRoots,
    facts: &HostFacts<'_>,
    addr: &str,
    dma_bytes: u64,
    hugepages: bool,
) -> Result<Preflight> {
    let p = check_device(roots, facts, addr)?;
    check_memlock(roots, facts, dma_bytes)?;
    if hugepages {
        check_hugepages(roots, dma_bytes)?;
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    const BDF: &str = "0000:01:00.0";

    /// A fake `/sys`, `/dev`, `/proc` tree with one NVMe controller in group 7.
    struct Tree {
        dir: PathBuf,
        roots: SysRoots,
    }

    impl Tree {
        fn new(name: &str) -> Tree {
            let dir = std::env::temp_dir()
                .join(format!("dioxide-vfio-diag-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            let roots = SysRoots::under(&dir);
            let t = Tree { dir, roots };
            t.mkdir("sys/bus/pci/drivers/vfio-pci");
            t.mkdir("sys/bus/pci/drivers/nvme");
            t.mkdir("sys/kernel/iommu_groups");
            t.mkdir("dev/vfio");
            t.mkdir("proc/self");
            t.write("proc/cmdline", "BOOT_IMAGE=/vmlinuz root=/dev/sda1 quiet\n");
            t.write("proc/cpuinfo", "vendor_id\t: GenuineIntel\n");
            t.write("proc/self/status", "Name:\tx\nCapEff:\t0000000000000000\n");
            t.hugepages(64, 64);
            t.device(BDF, 7, Some("vfio-pci"));
            t.write("dev/vfio/vfio", "");
            t.write("dev/vfio/7", "");
            t
        }
        fn mkdir(&self, p: &str) {
            fs::create_dir_all(self.dir.join(p)).unwrap();
        }
        fn write(&self, p: &str, s: &str) {
            let p = self.dir.join(p);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, s).unwrap();
        }
        fn rm(&self, p: &str) {
            let p = self.dir.join(p);
            if p.is_dir() && !p.is_symlink() {
                fs::remove_dir_all(p).unwrap();
            } else {
                fs::remove_file(p).unwrap();
            }
        }
        fn hugepages(&self, free: u64, total: u64) {
            let d = "sys/kernel/mm/hugepages/hugepages-2048kB";
            self.write(&format!("{d}/free_hugepages"), &format!("{free}\n"));
            self.write(&format!("{d}/nr_hugepages"), &format!("{total}\n"));
        }
        fn device(&self, bdf: &str, group: u32, driver: Option<&str>) {
            let dev = self.dir.join("sys/devices/pci0000:00").join(bdf);
            fs::create_dir_all(&dev).unwrap();
            fs::create_dir_all(self.roots.sysfs.join("bus/pci/devices")).unwrap();
            symlink(&dev, self.roots.pci_device(bdf)).unwrap();
            let g = self
                .roots
                .sysfs
                .join("kernel/iommu_groups")
                .join(group.to_string());
            fs::create_dir_all(g.join("devices")).unwrap();
            symlink(&g, dev.join("iommu_group")).unwrap();
            symlink(&dev, g.join("devices").join(bdf)).unwrap();
            self.bind(bdf, driver);
        }
        fn bind(&self, bdf: &str, driver: Option<&str>) {
            let link = self.roots.pci_device(bdf).join("driver");
            let _ = fs::remove_file(&link);
            if let Some(d) = driver {
                let dd = self.roots.sysfs.join("bus/pci/drivers").join(d);
                fs::create_dir_all(&dd).unwrap();
                symlink(dd, link).unwrap();
            }
        }
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }

    fn ok_access(_: &Path) -> io::Result<()> {
        Ok(())
    }
    fn facts(memlock: u64) -> HostFacts<'static> {
        HostFacts {
            memlock,
            can_open_rw: &ok_access,
        }
    }
    const MB: u64 = 1 << 20;

    fn err(t: &Tree, addr: &str, f: &HostFacts<'_>, bytes: u64) -> (VfioError, String) {
        let e = preflight(&t.roots, f, addr, bytes, true).unwrap_err();
        let s = e.to_string();
        println!("{s}");
        (e, s)
    }

    #[test]
    fn pci_address_forms() {
        assert_eq!(parse_pci_addr("0000:01:00.0").as_deref(), Some(BDF));
        assert_eq!(parse_pci_addr("01:00.0").as_deref(), Some(BDF));
        assert_eq!(
            parse_pci_addr(" 0001:3A:1f.7 ").as_deref(),
            Some("0001:3a:1f.7")
        );
        for bad in [
            "",
            "0000:01:00",
            "0000:01:00.8",
            "0000:01:20.0",
            "000g:01:00.0",
            "1:2:3:4.0",
            "0000:001:00.0",
            "nvme0",
            "0000:01:00.0.1",
        ] {
            assert_eq!(parse_pci_addr(bad), None, "{bad}");
        }
    }

    #[test]
    fn all_good() {
        let t = Tree::new("good");
        let p = preflight(&t.roots, &facts(u64::MAX), "01:00.0", 4 * MB, true).unwrap();
        assert_eq!(p.addr, BDF);
        assert_eq!(p.group, 7);
        assert_eq!(p.sysfs_dir, t.roots.pci_device(BDF));
    }

    #[test]
    fn malformed_address() {
        let t = Tree::new("addr");
        let (e, s) = err(&t, "01:00", &facts(u64::MAX), MB);
        assert!(matches!(e, VfioError::BadAddress { .. }));
        assert!(s.contains("malformed PCI address '01:00'"));
        assert!(s.contains("0000:01:00.0"));
    }

    #[test]
    fn missing_device() {
        let t = Tree::new("nodev");
        let (e, s) = err(&t, "0000:02:00.0", &facts(u64::MAX), MB);
        assert!(matches!(e, VfioError::NoDevice { .. }));
        assert!(s.contains("no PCI device 0000:02:00.0"));
        assert!(s.contains("sys/bus/pci/devices/0000:02:00.0 does not exist"));
    }

    #[test]
    fn iommu_disabled_prints_the_command_line_fix() {
        let t = Tree::new("noiommu");
        t.rm("sys/kernel/iommu_groups");
        t.mkdir("sys/kernel/iommu_groups");
        let (e, s) = err(&t, BDF, &facts(u64::MAX), MB);
        assert!(matches!(e, VfioError::IommuDisabled { .. }));
        assert!(s.contains("the IOMMU is not enabled"));
        assert!(s.contains("iommu_groups is empty"));
        assert!(s.contains("intel_iommu=on iommu=pt"));
        assert!(s.contains("BOOT_IMAGE=/vmlinuz root=/dev/sda1 quiet"));
        t.write("proc/cpuinfo", "vendor_id\t: AuthenticAMD\n");
        let (_, s) = err(&t, BDF, &facts(u64::MAX), MB);
        assert!(s.contains("amd_iommu=on iommu=pt"));
        assert!(!s.contains("intel_iommu"));
        t.write("proc/cpuinfo", "");
        let (_, s) = err(&t, BDF, &facts(u64::MAX), MB);
        assert!(s.contains("intel_iommu=on iommu=pt` (Intel) or `amd_iommu=on"));
    }

    #[test]
    fn device_outside_the_iommu() {
        let t = Tree::new("nogroup");
        t.rm(&format!("sys/devices/pci0000:00/{BDF}/iommu_group"));
        let (e, s) = err(&t, BDF, &facts(u64::MAX), MB);
        assert!(matches!(e, VfioError::NoIommuGroup { .. }));
        assert!(s.contains("has no IOMMU group"));
    }

    #[test]
    fn not_bound_names_the_driver_and_the_fix() {
        let t = Tree::new("unbound");
        t.bind(BDF, Some("nvme"));
        let (e, s) = err(&t, BDF, &facts(u64::MAX), MB);
        assert!(matches!(e, VfioError::NotBound { .. }));
        assert!(s.contains("0000:01:00.0 is bound to nvme, not vfio-pci"));
        assert!(s.contains("sudo ./hugepage-setup.sh config"));
        assert!(s.contains("PCI_ALLOWED=0000:01:00.0"));
        t.bind(BDF, None);
        let (_, s) = err(&t, BDF, &facts(u64::MAX), MB);
        assert!(s.contains("is bound to no driver, not vfio-pci"));
    }

    #[test]
    fn group_not_viable_lists_the_other_devices() {
        let t = Tree::new("viable");
        t.device("0000:01:00.1", 7, Some("ahci"));
        t.device("0000:01:00.2", 7, None);
        t.device("0000:00:1c.0", 7, Some("pcieport"));
        t.device("0000:01:00.3", 7, Some("e1000e"));
        let (e, s) = err(&t, BDF, &facts(u64::MAX), MB);
        let VfioError::GroupNotViable { group, others, .. } = &e else {
            panic!("{e:?}")
        };
        assert_eq!(*group, 7);
        assert_eq!(others.len(), 2, "unbound and pcieport members are fine");
        assert!(s.contains("IOMMU group 7 of 0000:01:00.0 is not viable"));
        assert!(s.contains("0000:01:00.1 (driver ahci), 0000:01:00.3 (driver e1000e)"));
        assert!(s.contains("vfio-pci or unbound"));
        // The full listing used when the kernel says "not viable".
        let all = group_members(&t.roots, 7, BDF);
        assert_eq!(all.len(), 4);
        assert_eq!(all[2].to_string(), "0000:01:00.2 (no driver)");
    }

    #[test]
    fn vfio_not_loaded() {
        let t = Tree::new("novfio");
        t.rm("dev/vfio/vfio");
        let (e, s) = err(&t, BDF, &facts(u64::MAX), MB);
        assert!(matches!(e, VfioError::VfioMissing { .. }));
        assert!(s.contains("dev/vfio/vfio does not exist"));
        assert!(s.contains("modprobe vfio-pci"));
    }

    #[test]
    fn group_file_not_accessible() {
        let t = Tree::new("perm");
        let deny = |p: &Path| {
            if p.ends_with("vfio/7") {
                Err(io::Error::from_raw_os_error(libc::EACCES))
            } else {
                Ok(())
            }
        };
        let f = HostFacts {
            memlock: u64::MAX,
            can_open_rw: &deny,
        };
        let (e, s) = err(&t, BDF, &f, MB);
        assert!(matches!(e, VfioError::Permission { group: 7, .. }));
        assert!(s.contains("cannot open"));
        assert!(s.contains("dev/vfio/7 for 0000:01:00.0 (IOMMU group 7)"));
        assert!(s.contains("Permission denied"));
        assert!(s.contains("TARGET_USER=$USER"));
        assert!(s.contains("chown"));
    }

    #[test]
    fn hugepages_short() {
        let t = Tree::new("huge");
        t.hugepages(0, 0);
        let (e, s) = err(&t, BDF, &facts(u64::MAX), 4 * MB);
        assert!(matches!(
            e,
            VfioError::HugepagesShort {
                needed: 2,
                free: 0,
                total: 0,
                ..
            }
        ));
        assert!(s.contains("0 of 0 2048 kB hugepages free, need 2"));
        assert!(s.contains("HUGEMEM=<MB> ./hugepage-setup.sh config"));
        assert!(s.contains("HUGEMEM=4 or more"));
        // Some pages in use by others: the suggestion covers them too.
        t.hugepages(1, 10);
        let (_, s) = err(&t, BDF, &facts(u64::MAX), 4 * MB);
        assert!(s.contains("1 of 10 2048 kB hugepages free, need 2"));
        assert!(s.contains("HUGEMEM=22 or more"));
        // Enough now; and not checked at all with 4 KiB pages.
        t.hugepages(2, 10);
        assert!(preflight(&t.roots, &facts(u64::MAX), BDF, 4 * MB, true).is_ok());
        t.hugepages(0, 0);
        assert!(preflight(&t.roots, &facts(u64::MAX), BDF, 4 * MB, false).is_ok());
    }

    #[test]
    fn hugepages_from_meminfo_when_sysfs_lacks_them() {
        let t = Tree::new("meminfo");
        t.rm("sys/kernel/mm/hugepages");
        t.write(
            "proc/meminfo",
            "MemTotal: 1000 kB\nHugePages_Total:       8\nHugePages_Free:        1\n\
             Hugepagesize:       2048 kB\n",
        );
        let (_, s) = err(&t, BDF, &facts(u64::MAX), 4 * MB);
        assert!(s.contains("1 of 8 2048 kB hugepages free, need 2"));
        assert!(s.contains("proc/meminfo"));
        // Default hugepage size 1 GiB: no 2 MiB pages at all.
        t.write(
            "proc/meminfo",
            "HugePages_Total: 4\nHugePages_Free: 4\nHugepagesize: 1048576 kB\n",
        );
        let (_, s) = err(&t, BDF, &facts(u64::MAX), 4 * MB);
        assert!(s.contains("0 of 0 2048 kB"));
    }

    #[test]
    fn memlock_too_low() {
        let t = Tree::new("memlock");
        let (e, s) = err(&t, BDF, &facts(64 * 1024), 8 * MB);
        assert!(matches!(
            e,
            VfioError::MemlockTooLow {
                required: 0x80_0000,
                current: 65536
            }
        ));
        assert!(s.contains("needs 8192 KiB but RLIMIT_MEMLOCK is 64 KiB"));
        assert!(s.contains("ulimit -l 8192"));
        // Enough, unlimited, or CAP_IPC_LOCK: fine.
        assert!(preflight(&t.roots, &facts(8 * MB), BDF, 8 * MB, true).is_ok());
        assert!(preflight(&t.roots, &facts(u64::MAX), BDF, 8 * MB, true).is_ok());
        t.write("proc/self/status", "CapEff:\t000001ffffffffff\n");
        assert!(preflight(&t.roots, &facts(0), BDF, 8 * MB, true).is_ok());
    }

    #[test]
    fn busy_and_runtime_messages() {
        // Produced after the preflight, from the kernel's answers; the text is checked here.
        let e = VfioError::Busy {
            addr: BDF.into(),
            group: 7,
            what: "open /dev/vfio/7",
        };
        let s = e.to_string();
        assert!(s.contains("already in use"));
        assert!(s.contains("EBUSY"));
        assert!(s.contains("fuser -v /dev/vfio/7"));
        let e = VfioError::DmaMap {
            iova: 0x20_0000,
            len: 2 * MB,
            source: io::Error::from_raw_os_error(libc::ENOMEM),
        };
        assert!(e.to_string().contains("ulimit -l"));
        let e = VfioError::IovaExhausted {
            len: 2 * MB,
            mapped: 0,
            ranges: "[0x200000..=0x3fffff]".into(),
        };
        assert!(e.to_string().contains("no IOVA space left"));
    }
}
