//! `identify`: controller and namespace data, in the layout of `spdk_nvme_identify`, or as
//! JSON (`--json`, schema `dioxide-identify/1`: the [`ControllerInfo`] structure below, one per
//! controller, in a list).

use crate::cli::{self, IdentifyConfig, Parsed};
use crate::device::{self, Device};
use crate::trid::{Target, TransportId};
use dioxide::Nsid;
use dioxide::spec::regs::offset;
use dioxide::spec::{IdentifyController, IdentifyNamespace, Oacs, Oncs};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::process::ExitCode;

/// The schema name and version of `identify --json`.
pub const IDENTIFY_SCHEMA: &str = "dioxide-identify/1";

/// One LBA format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LbaFormatInfo {
    /// Index.
    pub index: usize,
    /// Data size in bytes.
    pub data_size: u32,
    /// Metadata bytes per block.
    pub metadata_size: u16,
    /// Relative performance (0 best).
    pub relative_performance: u8,
    /// The format in use.
    pub in_use: bool,
}

/// One namespace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NamespaceInfo {
    /// Namespace ID.
    pub nsid: u32,
    /// NSZE, blocks.
    pub size_blocks: u64,
    /// NCAP, blocks.
    pub capacity_blocks: u64,
    /// NUSE, blocks.
    pub utilization_blocks: u64,
    /// Block size in use.
    pub block_size: u32,
    /// LBA formats.
    pub lba_formats: Vec<LbaFormatInfo>,
    /// Metadata capabilities (MC).
    pub metadata_capabilities: u8,
    /// End-to-end protection type in use (0: none).
    pub protection_type: u8,
    /// Protection capabilities (DPC).
    pub protection_capabilities: u8,
    /// NGUID, hex (all zero: not reported).
    pub nguid: String,
    /// EUI64, hex.
    pub eui64: String,
    /// Thin provisioning (NSFEAT bit 0).
    pub thin_provisioning: bool,
    /// Shared (NMIC bit 0).
    pub shared: bool,
}

/// SMART / health log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Health {
    /// Critical warning bits.
    pub critical_warning: u8,
    /// Composite temperature, kelvin.
    pub temperature_kelvin: u16,
    /// Available spare, percent.
    pub available_spare: u8,
    /// Available spare threshold, percent.
    pub available_spare_threshold: u8,
    /// Percentage used.
    pub percentage_used: u8,
    /// Data units read (1000 × 512 bytes).
    pub data_units_read: u128,
    /// Data units written.
    pub data_units_written: u128,
    /// Host read commands.
    pub host_read_commands: u128,
    /// Host write commands.
    pub host_write_commands: u128,
    /// Controller busy time, minutes.
    pub controller_busy_minutes: u128,
    /// Power cycles.
    pub power_cycles: u128,
    /// Power-on hours.
    pub power_on_hours: u128,
    /// Unsafe shutdowns.
    pub unsafe_shutdowns: u128,
    /// Media and data integrity errors.
    pub media_errors: u128,
    /// Error log entries over the controller's life.
    pub error_log_entries: u128,
}

/// One error log entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorEntry {
    /// Error count.
    pub error_count: u64,
    /// Submission queue.
    pub sqid: u16,
    /// Command id.
    pub cid: u16,
    /// Status field.
    pub status: u16,
    /// LBA.
    pub lba: u64,
    /// Namespace.
    pub nsid: u32,
}

/// Everything `identify` reports about one controller.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ControllerInfo {
    /// `dioxide-identify/1`.
    pub schema: String,
    /// Where it is (`0000:01:00.0`, `emulated (inline)`).
    pub address: String,
    /// PCI vendor ID.
    pub vendor_id: u16,
    /// PCI device ID.
    pub device_id: u16,
    /// PCI subsystem vendor ID (Identify SSVID).
    pub subsystem_vendor_id: u16,
    /// Serial number.
    pub serial: String,
    /// Model number.
    pub model: String,
    /// Firmware revision.
    pub firmware: String,
    /// IEEE OUI, hex.
    pub ieee_oui: String,
    /// Controller ID.
    pub controller_id: u16,
    /// Max data transfer size in bytes (`None`: unlimited).
    pub mdts_bytes: Option<u64>,
    /// Maximum queue entries (CAP.MQES + 1).
    pub max_queue_entries: u32,
    /// Contiguous queues required.
    pub contiguous_queues_required: bool,
    /// CAP.TO in milliseconds.
    pub reset_timeout_ms: u64,
    /// Doorbell stride in bytes.
    pub doorbell_stride: u32,
    /// Memory page size minimum and maximum, bytes.
    pub page_size_min: u64,
    /// Memory page size maximum, bytes.
    pub page_size_max: u64,
    /// NVMe version from the VS register.
    pub version: String,
    /// Number of namespaces (NN).
    pub max_namespaces: u32,
    /// Optional admin commands.
    pub admin: OptionalAdmin,
    /// Optional NVM commands.
    pub nvm: OptionalNvm,
    /// Volatile write cache present.
    pub volatile_write_cache: bool,
    /// SGL support (SGLS bits 1:0 non-zero).
    pub sgl_supported: bool,
    /// Controller memory buffer (CMBSZ non-zero).
    pub cmb_supported: bool,
    /// Persistent memory region (CAP.PMRS).
    pub pmr_supported: bool,
    /// Number of firmware slots.
    pub firmware_slots: u8,
    /// Active firmware slot and the revisions in each slot (from the firmware slot log).
    pub firmware_slot_log: Option<FirmwareInfo>,
    /// Error log page entries supported (ELPE + 1).
    pub error_log_page_entries: u16,
    /// Recent error log entries with a non-zero error count.
    pub error_log: Vec<ErrorEntry>,
    /// SMART / health log.
    pub health: Option<Health>,
    /// Subsystem NQN.
    pub subnqn: String,
    /// Active namespaces.
    pub namespaces: Vec<NamespaceInfo>,
    /// Log pages that could not be read, with the reason.
    pub unavailable: Vec<String>,
}

/// Optional admin commands (OACS).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OptionalAdmin {
    /// Security Send/Receive.
    pub security: bool,
    /// Format NVM.
    pub format: bool,
    /// Firmware Commit/Image Download.
    pub firmware: bool,
    /// Namespace Management.
    pub namespace_management: bool,
    /// Device Self-test.
    pub self_test: bool,
    /// Directives.
    pub directives: bool,
}

/// Optional NVM commands (ONCS).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OptionalNvm {
    /// Compare.
    pub compare: bool,
    /// Write Uncorrectable.
    pub write_uncorrectable: bool,
    /// Dataset Management.
    pub dataset_management: bool,
    /// Write Zeroes.
    pub write_zeroes: bool,
    /// Reservations.
    pub reservations: bool,
    /// Copy.
    pub copy: bool,
    /// Verify.
    pub verify: bool,
}

/// The firmware slot log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirmwareInfo {
    /// Active slot (AFI bits 2:0).
    pub active_slot: u8,
    /// Revision per slot (empty: no image).
    pub slots: Vec<String>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn namespace_info(nsid: u32, id: &IdentifyNamespace) -> NamespaceInfo {
    let cur = id.flbas_index();
    NamespaceInfo {
        nsid,
        size_blocks: id.nsze,
        capacity_blocks: id.ncap,
        utilization_blocks: id.nuse,
        block_size: id.block_size(),
        lba_formats: id
            .lbaf
            .iter()
            .enumerate()
            .map(|(i, f)| LbaFormatInfo {
                index: i,
                data_size: f.block_size(),
                metadata_size: f.ms,
                relative_performance: f.rp,
                in_use: i == cur,
            })
            .collect(),
        metadata_capabilities: id.mc,
        protection_type: id.dps & 7,
        protection_capabilities: id.dpc,
        nguid: hex(&id.nguid),
        eui64: hex(&id.eui64),
        thin_provisioning: id.nsfeat & 1 != 0,
        shared: id.nmic & 1 != 0,
    }
}

/// Gathers everything about `c`.
pub fn gather(c: &Device, only_nsid: Option<u32>) -> Result<ControllerInfo, String> {
    let ctrl = &c.ctrl;
    let id: IdentifyController = ctrl.identify();
    let cap = ctrl.cap();
    let vs = ctrl.version();
    let mut unavailable = Vec::new();
    let health = match ctrl.smart_log() {
        Ok(s) => Some(Health {
            critical_warning: s.critical_warning,
            temperature_kelvin: s.temperature,
            available_spare: s.available_spare,
            available_spare_threshold: s.available_spare_threshold,
            percentage_used: s.percentage_used,
            data_units_read: s.data_units_read,
            data_units_written: s.data_units_written,
            host_read_commands: s.host_read_commands,
            host_write_commands: s.host_write_commands,
            controller_busy_minutes: s.controller_busy_time,
            power_cycles: s.power_cycles,
            power_on_hours: s.power_on_hours,
            unsafe_shutdowns: s.unsafe_shutdowns,
            media_errors: s.media_errors,
            error_log_entries: s.num_err_log_entries,
        }),
        Err(e) => {
            unavailable.push(format!("SMART / health log: {e}"));
            None
        }
    };
    let firmware_slot_log = match ctrl.firmware_slot_log() {
        Ok(f) => Some(FirmwareInfo {
            active_slot: f.afi & 7,
            slots: f.frs.to_vec(),
        }),
        Err(e) => {
            unavailable.push(format!("firmware slot log: {e}"));
            None
        }
    };
    let entries = (id.elpe as usize + 1).min(64);
    let error_log = match ctrl.error_log(entries) {
        Ok(v) => v
            .into_iter()
            .filter(|e| e.error_count != 0)
            .map(|e| ErrorEntry {
                error_count: e.error_count,
                sqid: e.sqid,
                cid: e.cid,
                status: e.status,
                lba: e.lba,
                nsid: e.nsid,
            })
            .collect(),
        Err(e) => {
            unavailable.push(format!("error log: {e}"));
            Vec::new()
        }
    };
    let namespaces = match only_nsid {
        Some(n) => vec![ctrl.namespace(Nsid(n)).map_err(|e| e.to_string())?],
        None => ctrl.namespaces(),
    }
    .iter()
    .map(|ns| namespace_info(ns.nsid().0, ns.identify()))
    .collect();
    let cmbsz = ctrl.pcie().map_or(0, |p| p.bus().read32(offset::CMBSZ));
    Ok(ControllerInfo {
        schema: IDENTIFY_SCHEMA.to_string(),
        address: c.addr.clone(),
        vendor_id: c.ids.0,
        device_id: c.ids.1,
        subsystem_vendor_id: id.ssvid,
        serial: id.sn.trim().to_string(),
        model: id.mn.trim().to_string(),
        firmware: id.fr.trim().to_string(),
        ieee_oui: format!("{:02x} {:02x} {:02x}", id.ieee[0], id.ieee[1], id.ieee[2]),
        controller_id: id.cntlid,
        mdts_bytes: (id.mdts != 0).then(|| (cap.min_page_size() as u64) << id.mdts),
        max_queue_entries: cap.max_queue_entries(),
        contiguous_queues_required: cap.cqr(),
        reset_timeout_ms: cap.timeout_ms(),
        doorbell_stride: 4 << cap.dstrd(),
        page_size_min: 1 << (12 + cap.mpsmin()),
        page_size_max: 1 << (12 + cap.mpsmax()),
        version: format!("{}.{}.{}", vs.major(), vs.minor(), vs.tertiary()),
        max_namespaces: id.nn,
        admin: OptionalAdmin {
            security: id.oacs.contains(Oacs::SECURITY),
            format: id.oacs.contains(Oacs::FORMAT),
            firmware: id.oacs.contains(Oacs::FIRMWARE),
            namespace_management: id.oacs.contains(Oacs::NS_MANAGEMENT),
            self_test: id.oacs.contains(Oacs::SELF_TEST),
            directives: id.oacs.contains(Oacs::DIRECTIVES),
        },
        nvm: OptionalNvm {
            compare: id.oncs.contains(Oncs::COMPARE),
            write_uncorrectable: id.oncs.contains(Oncs::WRITE_UNCORRECTABLE),
            dataset_management: id.oncs.contains(Oncs::DSM),
            write_zeroes: id.oncs.contains(Oncs::WRITE_ZEROES),
            reservations: id.oncs.contains(Oncs::RESERVATIONS),
            copy: id.oncs.contains(Oncs::COPY),
            verify: id.oncs.contains(Oncs::VERIFY),
        },
        volatile_write_cache: id.vwc & 1 != 0,
        sgl_supported: id.sgls & 3 != 0,
        cmb_supported: cap.cmbs() || cmbsz != 0,
        pmr_supported: cap.pmrs(),
        firmware_slots: (id.frmw >> 1) & 7,
        firmware_slot_log,
        error_log_page_entries: id.elpe as u16 + 1,
        error_log,
        health,
        subnqn: id.subnqn.trim().to_string(),
        namespaces,
        unavailable,
    })
}

fn yes(b: bool) -> &'static str {
    if b { "Supported" } else { "Not Supported" }
}

/// Bytes with a binary unit, as SPDK prints namespace sizes: `1310720 (5GiB)`.
fn blocks_human(blocks: u64, bs: u32) -> String {
    let b = blocks as u128 * bs as u128;
    let (v, u) = [
        (1u128 << 40, "TiB"),
        (1 << 30, "GiB"),
        (1 << 20, "MiB"),
        (1 << 10, "KiB"),
    ]
    .into_iter()
    .find(|(d, _)| b >= *d)
    .map_or((b, "B"), |(d, u)| (b / d, u));
    format!("{blocks} ({v}{u})")
}

/// The text report of one controller, laid out like `spdk_nvme_identify`.
pub fn render(c: &ControllerInfo) -> String {
    let mut o = String::new();
    macro_rules! kv {
        ($k:expr, $($v:tt)*) => {{
            let _ = writeln!(o, "{:<39}{}", concat!($k, ":"), format_args!($($v)*));
        }};
    }
    let rule = "=====================================================";
    let _ = writeln!(o, "{rule}");
    let _ = writeln!(
        o,
        "NVMe Controller at {} [{:04x}:{:04x}]",
        c.address, c.vendor_id, c.device_id
    );
    let _ = writeln!(o, "{rule}");
    let _ = writeln!(
        o,
        "Controller Capabilities/Features\n================================"
    );
    kv!("Vendor ID", "{:04x}", c.vendor_id);
    kv!("Subsystem Vendor ID", "{:04x}", c.subsystem_vendor_id);
    kv!("Serial Number", "{}", c.serial);
    kv!("Model Number", "{}", c.model);
    kv!("Firmware Version", "{}", c.firmware);
    kv!("IEEE OUI Identifier", "{}", c.ieee_oui);
    kv!("Controller ID", "{}", c.controller_id);
    match c.mdts_bytes {
        Some(b) => kv!("Max Data Transfer Size", "{b}"),
        None => kv!("Max Data Transfer Size", "Unlimited"),
    }
    kv!("Max Number of Namespaces", "{}", c.max_namespaces);
    kv!("NVMe Specification Version (VS)", "{}", c.version);
    kv!("Maximum Queue Entries", "{}", c.max_queue_entries);
    kv!(
        "Contiguous Queues Required",
        "{}",
        if c.contiguous_queues_required {
            "Yes"
        } else {
            "No"
        }
    );
    kv!("Reset Timeout", "{} ms", c.reset_timeout_ms);
    kv!("Doorbell Stride", "{} bytes", c.doorbell_stride);
    kv!("Memory Page Size Minimum", "{} bytes", c.page_size_min);
    kv!("Memory Page Size Maximum", "{} bytes", c.page_size_max);
    kv!(
        "Volatile Write Cache",
        "{}",
        if c.volatile_write_cache {
            "Present"
        } else {
            "Not Present"
        }
    );
    kv!("SGL Support", "{}", yes(c.sgl_supported));
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "Controller Memory Buffer Support\n================================"
    );
    kv!(
        "Supported",
        "{}",
        if c.cmb_supported { "Yes" } else { "No" }
    );
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "Persistent Memory Region Support\n================================"
    );
    kv!(
        "Supported",
        "{}",
        if c.pmr_supported { "Yes" } else { "No" }
    );
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "Admin Command Set Attributes\n============================"
    );
    kv!("Security Send/Receive", "{}", yes(c.admin.security));
    kv!("Format NVM", "{}", yes(c.admin.format));
    kv!("Firmware Activate/Download", "{}", yes(c.admin.firmware));
    kv!(
        "Namespace Management",
        "{}",
        yes(c.admin.namespace_management)
    );
    kv!("Device Self-Test", "{}", yes(c.admin.self_test));
    kv!("Directives", "{}", yes(c.admin.directives));
    kv!("Number of Firmware Slots", "{}", c.firmware_slots);
    kv!(
        "Error Log Page Entries Supported",
        "{}",
        c.error_log_page_entries
    );
    kv!("Subsystem NQN", "{}", c.subnqn);
    let _ = writeln!(o);
    let _ = writeln!(o, "NVM Command Set Attributes\n==========================");
    kv!("Compare Command", "{}", yes(c.nvm.compare));
    kv!(
        "Write Uncorrectable Command",
        "{}",
        yes(c.nvm.write_uncorrectable)
    );
    kv!(
        "Dataset Management Command",
        "{}",
        yes(c.nvm.dataset_management)
    );
    kv!("Write Zeroes Command", "{}", yes(c.nvm.write_zeroes));
    kv!("Reservations", "{}", yes(c.nvm.reservations));
    kv!("Copy", "{}", yes(c.nvm.copy));
    kv!("Verify", "{}", yes(c.nvm.verify));
    let _ = writeln!(o);
    let _ = writeln!(o, "Firmware Slot Information\n=========================");
    match &c.firmware_slot_log {
        Some(f) => {
            kv!("Active slot", "{}", f.active_slot);
            for (i, r) in f
                .slots
                .iter()
                .enumerate()
                .filter(|(_, r)| !r.trim().is_empty())
            {
                let _ = writeln!(
                    o,
                    "{:<39}{}",
                    format!("Slot {} Firmware Revision:", i + 1),
                    r.trim()
                );
            }
        }
        None => {
            let _ = writeln!(o, "Not available");
        }
    }
    let _ = writeln!(o);
    let _ = writeln!(o, "Error Log\n=========");
    if c.error_log.is_empty() {
        let _ = writeln!(o, "No errors logged");
    }
    for e in &c.error_log {
        let _ = writeln!(
            o,
            "Entry {}: SQ {} CID {} status {:#06x} NSID {} LBA {}",
            e.error_count, e.sqid, e.cid, e.status, e.nsid, e.lba
        );
    }
    let _ = writeln!(o);
    let _ = writeln!(o, "Health Information\n==================");
    match &c.health {
        Some(h) => {
            let w = h.critical_warning;
            let ok = |bit: u8| if w & bit != 0 { "WARNING" } else { "OK" };
            let _ = writeln!(o, "Critical Warnings:");
            kv!("  Available Spare Space", "{}", ok(1));
            kv!("  Temperature", "{}", ok(2));
            kv!("  Device Reliability", "{}", ok(4));
            kv!("  Read Only", "{}", if w & 8 != 0 { "Yes" } else { "No" });
            kv!("  Volatile Memory Backup", "{}", ok(16));
            let t = h.temperature_kelvin;
            kv!(
                "Current Temperature",
                "{} Kelvin ({} Celsius)",
                t,
                t as i32 - 273
            );
            kv!("Available Spare", "{}%", h.available_spare);
            kv!(
                "Available Spare Threshold",
                "{}%",
                h.available_spare_threshold
            );
            kv!("Life Percentage Used", "{}%", h.percentage_used);
            kv!("Data Units Read", "{}", h.data_units_read);
            kv!("Data Units Written", "{}", h.data_units_written);
            kv!("Host Read Commands", "{}", h.host_read_commands);
            kv!("Host Write Commands", "{}", h.host_write_commands);
            kv!(
                "Controller Busy Time",
                "{} minutes",
                h.controller_busy_minutes
            );
            kv!("Power Cycles", "{}", h.power_cycles);
            kv!("Power On Hours", "{} hours", h.power_on_hours);
            kv!("Unsafe Shutdowns", "{}", h.unsafe_shutdowns);
            kv!("Unrecoverable Media Errors", "{}", h.media_errors);
            kv!("Lifetime Error Log Entries", "{}", h.error_log_entries);
        }
        None => {
            let _ = writeln!(o, "Not available");
        }
    }
    let _ = writeln!(o);
    let _ = writeln!(o, "Active Namespaces\n=================");
    for ns in &c.namespaces {
        let _ = writeln!(o, "Namespace ID:{}", ns.nsid);
        kv!(
            "Size (in LBAs)",
            "{}",
            blocks_human(ns.size_blocks, ns.block_size)
        );
        kv!(
            "Capacity (in LBAs)",
            "{}",
            blocks_human(ns.capacity_blocks, ns.block_size)
        );
        kv!(
            "Utilization (in LBAs)",
            "{}",
            blocks_human(ns.utilization_blocks, ns.block_size)
        );
        kv!("Thin Provisioning", "{}", yes(ns.thin_provisioning));
        kv!(
            "Namespace Sharing Capabilities",
            "{}",
            if ns.shared {
                "Multiple Controllers"
            } else {
                "Private"
            }
        );
        kv!("NGUID", "{}", ns.nguid.to_uppercase());
        kv!("EUI64", "{}", ns.eui64.to_uppercase());
        kv!(
            "Metadata Transferred as",
            "{}",
            match ns.metadata_capabilities & 3 {
                0 => "None supported",
                1 => "Extended Data LBA",
                2 => "Separate Metadata Buffer",
                _ => "Extended Data LBA or Separate Buffer",
            }
        );
        match ns.protection_type {
            0 => kv!("End-to-End Data Protection", "Not Enabled"),
            t => kv!("End-to-End Data Protection", "Type {t}"),
        }
        kv!("Number of LBA Formats", "{}", ns.lba_formats.len());
        if let Some(f) = ns.lba_formats.iter().find(|f| f.in_use) {
            kv!("Current LBA Format", "LBA Format #{:02}", f.index);
        }
        for f in &ns.lba_formats {
            let _ = writeln!(
                o,
                "LBA Format #{:02}: Data Size: {:5}  Metadata Size: {:5}{}",
                f.index,
                f.data_size,
                f.metadata_size,
                if f.in_use { "  (in use)" } else { "" }
            );
        }
        let _ = writeln!(o);
    }
    for u in &c.unavailable {
        let _ = writeln!(o, "Not available: {u}");
    }
    o
}

/// `identify`'s main: returns the exit code.
pub fn main(args: impl IntoIterator<Item = String>) -> ExitCode {
    Parsed::run_main(cli::parse_identify(args), |cfg| run(cfg).map(|()| true))
}

fn run(cfg: &IdentifyConfig) -> Result<(), String> {
    let targets: Vec<TransportId> = if cfg.trids.is_empty() {
        let line = format!(
            "Using the built-in emulated NVMe controller ({}): no device was named with -r",
            cfg.emulated.describe()
        );
        if cfg.json {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
        vec![TransportId::of(Target::Emulated, None)]
    } else {
        cfg.trids.clone()
    };
    let mut infos = Vec::new();
    let mut discovery_json = Vec::new();
    for t in &targets {
        let opened = device::open(t, &cfg.emulated, 4 << 20, (false, false))?;
        if let Some(d) = opened.ctrl.tcp().filter(|d| d.is_discovery()) {
            let entries = d
                .discover()
                .map_err(|e| format!("{}: reading the discovery log: {e}", opened.label))?;
            if cfg.json {
                discovery_json.push(discovery_info(&opened, &entries));
            } else {
                print!("{}", render_discovery(&opened, &entries));
            }
            continue;
        }
        let info = gather(&opened, t.nsid)?;
        if !cfg.json {
            print!("{}", render(&info));
        }
        infos.push(info);
    }
    if cfg.json {
        // Controllers first, then discovery controllers (told apart by their "schema").
        let mut all: Vec<serde_json::Value> = Vec::new();
        for i in &infos {
            all.push(serde_json::to_value(i).map_err(|e| e.to_string())?);
        }
        for d in &discovery_json {
            all.push(serde_json::to_value(d).map_err(|e| e.to_string())?);
        }
        println!(
            "{}",
            serde_json::to_string_pretty(&all).map_err(|e| e.to_string())?
        );
    }
    Ok(())
}

/// The schema name and version of a discovery controller in `identify --json`.
pub const DISCOVERY_SCHEMA: &str = "dioxide-discovery/1";

/// One discovery log page entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiscoveryRecord {
    /// Transport type (3: TCP).
    pub trtype: u8,
    /// Address family (1: IPv4, 2: IPv6).
    pub adrfam: u8,
    /// Subsystem type (2: NVM subsystem, 3: current discovery subsystem).
    pub subtype: u8,
    /// Port ID.
    pub portid: u16,
    /// Controller ID (0xffff: dynamic).
    pub cntlid: u16,
    /// Admin max SQ size.
    pub asqsz: u16,
    /// Transport service ID (the port).
    pub trsvcid: String,
    /// Subsystem NQN.
    pub subnqn: String,
    /// Transport address.
    pub traddr: String,
}

/// A discovery controller and its log page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiscoveryInfo {
    /// [`DISCOVERY_SCHEMA`].
    pub schema: String,
    /// The controller, as reports name it.
    pub controller: String,
    /// Its address.
    pub address: String,
    /// The log page entries.
    pub entries: Vec<DiscoveryRecord>,
}

fn discovery_info(d: &Device, entries: &[dioxide::NvmfDiscoveryEntry]) -> DiscoveryInfo {
    DiscoveryInfo {
        schema: DISCOVERY_SCHEMA.to_string(),
        controller: d.label.clone(),
        address: d.addr.clone(),
        entries: entries
            .iter()
            .map(|e| DiscoveryRecord {
                trtype: e.trtype,
                adrfam: e.adrfam,
                subtype: e.subtype,
                portid: e.portid,
                cntlid: e.cntlid,
                asqsz: e.asqsz,
                trsvcid: e.trsvcid.clone(),
                subnqn: e.subnqn.clone(),
                traddr: e.traddr.clone(),
            })
            .collect(),
    }
}

/// The discovery log page in the layout of `spdk_nvme_identify`.
pub fn render_discovery(d: &Device, entries: &[dioxide::NvmfDiscoveryEntry]) -> String {
    let mut o = String::new();
    let bar = "=====================================================";
    let _ = writeln!(o, "{bar}");
    let _ = writeln!(o, "Discovery Log Page of {}", d.label);
    let _ = writeln!(o, "{bar}");
    let _ = writeln!(
        o,
        "Number of Records:                     {}",
        entries.len()
    );
    for (i, e) in entries.iter().enumerate() {
        let trtype = match e.trtype {
            1 => "RDMA",
            2 => "FC",
            3 => "TCP",
            _ => "other",
        };
        let adrfam = match e.adrfam {
            1 => "IPv4",
            2 => "IPv6",
            _ => "other",
        };
        let subtype = match e.subtype {
            1 => "Referral to a Discovery Service",
            2 => "NVM Subsystem",
            3 => "Current Discovery Subsystem",
            _ => "other",
        };
        let _ = writeln!(o);
        let _ = writeln!(o, "Discovery Log Entry {i}");
        let _ = writeln!(o, "----------------------");
        let _ = writeln!(
            o,
            "Transport Type:                        {} ({trtype})",
            e.trtype
        );
        let _ = writeln!(
            o,
            "Address Family:                        {} ({adrfam})",
            e.adrfam
        );
        let _ = writeln!(
            o,
            "Subsystem Type:                        {} ({subtype})",
            e.subtype
        );
        let _ = writeln!(
            o,
            "Port ID:                               {} ({:#06x})",
            e.portid, e.portid
        );
        let _ = writeln!(
            o,
            "Controller ID:                         {} ({:#06x})",
            e.cntlid, e.cntlid
        );
        let _ = writeln!(o, "Admin Max SQ Size:                     {}", e.asqsz);
        let _ = writeln!(o, "Transport Service Identifier:          {}", e.trsvcid);
        let _ = writeln!(o, "NVM Subsystem Qualified Name:          {}", e.subnqn);
        let _ = writeln!(o, "Transport Address:                     {}", e.traddr);
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Backing, EmuMode, EmulatedShape};

    fn shape() -> EmulatedShape {
        EmulatedShape {
            fault: None,
            io_queues: None,
            mode: EmuMode::Inline,
            block_size: 4096,
            namespaces: 2,
            size_bytes: 1 << 30,
            backing: Backing::Null,
            fail_lba: None,
            metadata_ns: None,
        }
    }

    #[test]
    fn emulated_controller_fields() {
        let c = Device::from(device::open_emulated(&shape()).unwrap());
        let info = gather(&c, None).unwrap();
        assert_eq!(info.namespaces.len(), 2);
        assert_eq!(info.namespaces[0].block_size, 4096);
        assert_eq!(info.namespaces[0].size_blocks, (1 << 30) / 4096);
        assert!(
            info.namespaces[0]
                .lba_formats
                .iter()
                .any(|f| f.in_use && f.data_size == 4096)
        );
        assert!(info.max_queue_entries >= 2);
        let text = render(&info);
        for key in [
            "Vendor ID:",
            "Serial Number:",
            "Model Number:",
            "Firmware Version:",
            "Max Data Transfer Size:",
            "Maximum Queue Entries:",
            "Reset Timeout:",
            "Doorbell Stride:",
            "NVMe Specification Version (VS):",
            "Format NVM:",
            "Dataset Management Command:",
            "Volatile Write Cache:",
            "Health Information",
            "Namespace ID:2",
            "(in use)",
        ] {
            assert!(text.contains(key), "missing {key}:\n{text}");
        }
        let json = serde_json::to_string(&vec![info.clone()]).unwrap();
        let back: Vec<ControllerInfo> = serde_json::from_str(&json).unwrap();
        assert_eq!(back[0], info);
        let one = gather(&c, Some(2)).unwrap();
        assert_eq!(one.namespaces.len(), 1);
        assert!(gather(&c, Some(9)).unwrap_err().contains("does not exist"));
    }

    #[test]
    fn sizes() {
        assert_eq!(blocks_human(1310720, 4096), "1310720 (5GiB)");
        assert_eq!(blocks_human(3, 512), "3 (1KiB)");
        assert_eq!(blocks_human(1, 512), "1 (512B)");
    }
}
