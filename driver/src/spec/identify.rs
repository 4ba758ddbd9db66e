//! Identify data structures and log pages (NVMe 1.4 sections 5.14 and 5.15), as plain Rust
//! structs with the specification's field names, parsed from and serialised to the 4 KiB (or
//! log-sized) little-endian byte layout at the specification's byte offsets.
//!
//! Only the fields the driver and the tools use are kept; `to_bytes` writes zero elsewhere.

/// Size of an identify data structure.
pub const IDENTIFY_LEN: usize = 4096;

fn le16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}
fn le64(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}
fn le128(b: &[u8], o: usize) -> u128 {
    u128::from_le_bytes(b[o..o + 16].try_into().expect("16 bytes"))
}
fn put(b: &mut [u8], o: usize, v: &[u8]) {
    b[o..o + v.len()].copy_from_slice(v);
}
/// An ASCII field, space padded, trailing spaces and NULs removed.
fn ascii(b: &[u8], o: usize, len: usize) -> String {
    let s: String = b[o..o + len]
        .iter()
        .map(|&c| {
            if c.is_ascii_graphic() || c == b' ' {
                c as char
            } else {
                ' '
            }
        })
        .collect();
    s.trim_end().to_string()
}
fn put_ascii(b: &mut [u8], o: usize, len: usize, s: &str) {
    let field = &mut b[o..o + len];
    field.fill(b' ');
    let n = s.len().min(len);
    field[..n].copy_from_slice(&s.as_bytes()[..n]);
}

bitflags::bitflags! {
    /// ONCS: optional NVM commands supported. Bits this version does not name are kept (a
    /// parsed structure serialises back unchanged).
    #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
    pub struct Oncs: u16 {
        /// Compare.
        const COMPARE = 1 << 0;
        /// Write Uncorrectable.
        const WRITE_UNCORRECTABLE = 1 << 1;
        /// Dataset Management.
        const DSM = 1 << 2;
        /// Write Zeroes.
        const WRITE_ZEROES = 1 << 3;
        /// Save field in Set/Get Features.
        const SAVE_SELECT = 1 << 4;
        /// Reservations.
        const RESERVATIONS = 1 << 5;
        /// Timestamp.
        const TIMESTAMP = 1 << 6;
        /// Verify.
        const VERIFY = 1 << 7;
        /// Copy (NVMe 2.0).
        const COPY = 1 << 8;
    }
}

bitflags::bitflags! {
    /// OACS: optional admin commands supported. Bits this version does not name are kept.
    #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
    pub struct Oacs: u16 {
        /// Security Send/Receive.
        const SECURITY = 1 << 0;
        /// Format NVM.
        const FORMAT = 1 << 1;
        /// Firmware Commit/Download.
        const FIRMWARE = 1 << 2;
        /// Namespace Management.
        const NS_MANAGEMENT = 1 << 3;
        /// Device Self-test.
        const SELF_TEST = 1 << 4;
        /// Directives.
        const DIRECTIVES = 1 << 5;
        /// NVMe-MI Send/Receive.
        const NVME_MI = 1 << 6;
        /// Virtualization Management.
        const VIRTUALIZATION = 1 << 7;
        /// Doorbell Buffer Config.
        const DOORBELL_BUFFER_CONFIG = 1 << 8;
    }
}

/// Identify Controller data structure (CNS 01h), the fields Dioxide uses.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct IdentifyController {
    /// PCI vendor ID.
    pub vid: u16,
    /// PCI subsystem vendor ID.
    pub ssvid: u16,
    /// Serial number.
    pub sn: String,
    /// Model number.
    pub mn: String,
    /// Firmware revision.
    pub fr: String,
    /// Recommended arbitration burst.
    pub rab: u8,
    /// IEEE OUI identifier.
    pub ieee: [u8; 3],
    /// Controller multi-path I/O and namespace sharing capabilities.
    pub cmic: u8,
    /// Maximum data transfer size as a power of two of the minimum page size; 0 = no limit.
    pub mdts: u8,
    /// Controller ID.
    pub cntlid: u16,
    /// Version (same encoding as VS).
    pub ver: u32,
    /// Optional asynchronous events supported.
    pub oaes: u32,
    /// Controller attributes.
    pub ctratt: u32,
    /// Optional admin command support.
    pub oacs: Oacs,
    /// Abort command limit, 0's based.
    pub acl: u8,
    /// Asynchronous event request limit, 0's based.
    pub aerl: u8,
    /// Firmware updates.
    pub frmw: u8,
    /// Log page attributes.
    pub lpa: u8,
    /// Error log page entries, 0's based.
    pub elpe: u8,
    /// Number of power states supported, 0's based.
    pub npss: u8,
    /// Warning composite temperature threshold (K).
    pub wctemp: u16,
    /// Critical composite temperature threshold (K).
    pub cctemp: u16,
    /// Total NVM capacity in bytes.
    pub tnvmcap: u128,
    /// Unallocated NVM capacity in bytes.
    pub unvmcap: u128,
    /// Submission queue entry size: required (3:0) and maximum (7:4), powers of two.
    pub sqes: u8,
    /// Completion queue entry size: required (3:0) and maximum (7:4), powers of two.
    pub cqes: u8,
    /// Maximum outstanding commands (fabrics; 0 on PCIe).
    pub maxcmd: u16,
    /// Number of namespaces (the largest valid NSID).
    pub nn: u32,
    /// Optional NVM command support.
    pub oncs: Oncs,
    /// Fused operation support.
    pub fuses: u16,
    /// Format NVM attributes.
    pub fna: u8,
    /// Volatile write cache (bit 0: present).
    pub vwc: u8,
    /// Atomic write unit normal, 0's based.
    pub awun: u16,
    /// Atomic write unit power fail, 0's based.
    pub awupf: u16,
    /// SGL support (bits 1:0 non-zero: SGLs supported).
    pub sgls: u32,
    /// NVM subsystem NVMe qualified name.
    pub subnqn: String,
}

impl IdentifyController {
    /// Parses the 4 KiB structure.
    pub fn from_bytes(b: &[u8; IDENTIFY_LEN]) -> IdentifyController {
        let subnqn = {
            let raw = &b[768..1024];
            let end = raw.iter().position(|&c| c == 0).unwrap_or(raw.len());
            String::from_utf8_lossy(&raw[..end]).into_owned()
        };
        IdentifyController {
            vid: le16(b, 0),
            ssvid: le16(b, 2),
            sn: ascii(b, 4, 20),
            mn: ascii(b, 24, 40),
            fr: ascii(b, 64, 8),
            rab: b[72],
            ieee: [b[73], b[74], b[75]],
            cmic: b[76],
            mdts: b[77],
            cntlid: le16(b, 78),
            ver: le32(b, 80),
            oaes: le32(b, 92),
            ctratt: le32(b, 96),
            oacs: Oacs::from_bits_retain(le16(b, 256)),
            acl: b[258],
            aerl: b[259],
            frmw: b[260],
            lpa: b[261],
            elpe: b[262],
            npss: b[263],
            wctemp: le16(b, 266),
            cctemp: le16(b, 268),
            tnvmcap: le128(b, 280),
            unvmcap: le128(b, 296),
            sqes: b[512],
            cqes: b[513],
            maxcmd: le16(b, 514),
            nn: le32(b, 516),
            oncs: Oncs::from_bits_retain(le16(b, 520)),
            fuses: le16(b, 522),
            fna: b[524],
            vwc: b[525],
            awun: le16(b, 526),
            awupf: le16(b, 528),
            sgls: le32(b, 536),
            subnqn,
        }
    }

    /// Serialises to the 4 KiB structure.
    pub fn to_bytes(&self) -> Box<[u8; IDENTIFY_LEN]> {
        let mut b = Box::new([0u8; IDENTIFY_LEN]);
        put(&mut b[..], 0, &self.vid.to_le_bytes());
        put(&mut b[..], 2, &self.ssvid.to_le_bytes());
        put_ascii(&mut b[..], 4, 20, &self.sn);
        put_ascii(&mut b[..], 24, 40, &self.mn);
        put_ascii(&mut b[..], 64, 8, &self.fr);
        b[72] = self.rab;
        put(&mut b[..], 73, &self.ieee);
        b[76] = self.cmic;
        b[77] = self.mdts;
        put(&mut b[..], 78, &self.cntlid.to_le_bytes());
        put(&mut b[..], 80, &self.ver.to_le_bytes());
        put(&mut b[..], 92, &self.oaes.to_le_bytes());
        put(&mut b[..], 96, &self.ctratt.to_le_bytes());
        put(&mut b[..], 256, &self.oacs.bits().to_le_bytes());
        b[258] = self.acl;
        b[259] = self.aerl;
        b[260] = self.frmw;
        b[261] = self.lpa;
        b[262] = self.elpe;
        b[263] = self.npss;
        put(&mut b[..], 266, &self.wctemp.to_le_bytes());
        put(&mut b[..], 268, &self.cctemp.to_le_bytes());
        put(&mut b[..], 280, &self.tnvmcap.to_le_bytes());
        put(&mut b[..], 296, &self.unvmcap.to_le_bytes());
        b[512] = self.sqes;
        b[513] = self.cqes;
        put(&mut b[..], 514, &self.maxcmd.to_le_bytes());
        put(&mut b[..], 516, &self.nn.to_le_bytes());
        put(&mut b[..], 520, &self.oncs.bits().to_le_bytes());
        put(&mut b[..], 522, &self.fuses.to_le_bytes());
        b[524] = self.fna;
        b[525] = self.vwc;
        put(&mut b[..], 526, &self.awun.to_le_bytes());
        put(&mut b[..], 528, &self.awupf.to_le_bytes());
        put(&mut b[..], 536, &self.sgls.to_le_bytes());
        let n = self.subnqn.len().min(255);
        put(&mut b[..], 768, &self.subnqn.as_bytes()[..n]);
        b
    }

    /// Maximum data transfer size in bytes for a minimum page size, or `None` for no limit.
    ///
    /// MDTS comes from the device: a value whose size does not fit a `usize` (MDTS 64 with
    /// 4 KiB pages, say) is a limit no transfer can reach, so it is treated as no limit too.
    pub fn max_transfer_bytes(&self, min_page_size: usize) -> Option<usize> {
        if self.mdts == 0 {
            return None;
        }
        1usize
            .checked_shl(self.mdts as u32)
            .and_then(|m| m.checked_mul(min_page_size))
    }
}

/// One LBA format descriptor.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct LbaFormat {
    /// Metadata size in bytes.
    pub ms: u16,
    /// LBA data size as a power of two (9 = 512 B, 12 = 4 KiB).
    pub lbads: u8,
    /// Relative performance (0 best).
    pub rp: u8,
}

impl LbaFormat {
    /// Smallest valid LBADS (512 B blocks).
    pub const MIN_LBADS: u8 = 9;
    /// Largest LBADS Dioxide accepts (64 KiB blocks); larger values come from a broken or
    /// hostile device and are treated as an invalid format.
    pub const MAX_LBADS: u8 = 16;

    /// The logical block size in bytes (0 if the format is unused or invalid: LBADS outside
    /// [`MIN_LBADS`](Self::MIN_LBADS)..=[`MAX_LBADS`](Self::MAX_LBADS)).
    pub const fn block_size(self) -> u32 {
        if self.lbads < Self::MIN_LBADS || self.lbads > Self::MAX_LBADS {
            0
        } else {
            1 << self.lbads
        }
    }
    fn from_u32(v: u32) -> LbaFormat {
        LbaFormat {
            ms: v as u16,
            lbads: (v >> 16) as u8,
            rp: ((v >> 24) & 3) as u8,
        }
    }
    fn to_u32(self) -> u32 {
        self.ms as u32 | (self.lbads as u32) << 16 | ((self.rp & 3) as u32) << 24
    }
}

/// Identify Namespace data structure (CNS 00h), the fields Dioxide uses.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct IdentifyNamespace {
    /// Namespace size in logical blocks.
    pub nsze: u64,
    /// Namespace capacity in logical blocks.
    pub ncap: u64,
    /// Namespace utilization in logical blocks.
    pub nuse: u64,
    /// Namespace features (bit 0: thin provisioning).
    pub nsfeat: u8,
    /// Number of LBA formats, 0's based.
    pub nlbaf: u8,
    /// Formatted LBA size: bits 3:0 index the format in use; bit 4 metadata at end of LBA.
    pub flbas: u8,
    /// Metadata capabilities.
    pub mc: u8,
    /// End-to-end data protection capabilities.
    pub dpc: u8,
    /// End-to-end data protection type settings.
    pub dps: u8,
    /// Namespace multi-path I/O and sharing capabilities.
    pub nmic: u8,
    /// Deallocate logical block features.
    pub dlfeat: u8,
    /// NVM capacity in bytes.
    pub nvmcap: u128,
    /// Namespace globally unique identifier.
    pub nguid: [u8; 16],
    /// IEEE extended unique identifier.
    pub eui64: [u8; 8],
    /// LBA formats (up to 16).
    pub lbaf: Vec<LbaFormat>,
}

impl IdentifyNamespace {
    /// Parses the 4 KiB structure.
    pub fn from_bytes(b: &[u8; IDENTIFY_LEN]) -> IdentifyNamespace {
        let nlbaf = b[25];
        let count = (nlbaf as usize + 1).min(16);
        IdentifyNamespace {
            nsze: le64(b, 0),
            ncap: le64(b, 8),
            nuse: le64(b, 16),
            nsfeat: b[24],
            nlbaf,
            flbas: b[26],
            mc: b[27],
            dpc: b[28],
            dps: b[29],
            nmic: b[30],
            dlfeat: b[33],
            nvmcap: le128(b, 48),
            nguid: b[104..120].try_into().expect("16 bytes"),
            eui64: b[120..128].try_into().expect("8 bytes"),
            lbaf: (0..count)
                .map(|i| LbaFormat::from_u32(le32(b, 128 + 4 * i)))
                .collect(),
        }
    }

    /// Serialises to the 4 KiB structure.
    pub fn to_bytes(&self) -> Box<[u8; IDENTIFY_LEN]> {
        let mut b = Box::new([0u8; IDENTIFY_LEN]);
        put(&mut b[..], 0, &self.nsze.to_le_bytes());
        put(&mut b[..], 8, &self.ncap.to_le_bytes());
        put(&mut b[..], 16, &self.nuse.to_le_bytes());
        b[24] = self.nsfeat;
        b[25] = self.nlbaf;
        b[26] = self.flbas;
        b[27] = self.mc;
        b[28] = self.dpc;
        b[29] = self.dps;
        b[30] = self.nmic;
        b[33] = self.dlfeat;
        put(&mut b[..], 48, &self.nvmcap.to_le_bytes());
        put(&mut b[..], 104, &self.nguid);
        put(&mut b[..], 120, &self.eui64);
        for (i, f) in self.lbaf.iter().take(16).enumerate() {
            put(&mut b[..], 128 + 4 * i, &f.to_u32().to_le_bytes());
        }
        b
    }

    /// Index of the LBA format in use.
    pub fn flbas_index(&self) -> usize {
        (self.flbas & 0xf) as usize
    }
    /// Whether metadata is transferred at the end of each logical block (FLBAS bit 4, "extended
    /// LBA") rather than in a separate buffer.
    pub fn metadata_extended(&self) -> bool {
        self.flbas & 0x10 != 0
    }
    /// The LBA format in use, if the index is valid.
    pub fn lba_format(&self) -> Option<LbaFormat> {
        self.lbaf.get(self.flbas_index()).copied()
    }
    /// The logical block size in bytes (0 if the format in use is not valid).
    pub fn block_size(&self) -> u32 {
        self.lba_format().map_or(0, LbaFormat::block_size)
    }
}

/// Parses an active namespace ID list (CNS 02h): the non-zero NSIDs, in order.
pub fn parse_ns_list(b: &[u8; IDENTIFY_LEN]) -> Vec<u32> {
    (0..IDENTIFY_LEN / 4)
        .map(|i| le32(b, 4 * i))
        .take_while(|&n| n != 0)
        .collect()
}

/// Builds an active namespace ID list of the NSIDs greater than `after` (at most 1024).
pub fn build_ns_list(nsids: &[u32], after: u32) -> Box<[u8; IDENTIFY_LEN]> {
    let mut b = Box::new([0u8; IDENTIFY_LEN]);
    for (i, n) in nsids.iter().filter(|&&n| n > after).take(1024).enumerate() {
        put(&mut b[..], 4 * i, &n.to_le_bytes());
    }
    b
}

/// SMART / Health Information log page (LID 02h), 512 bytes.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct SmartLog {
    /// Critical warning bits.
    pub critical_warning: u8,
    /// Composite temperature in kelvin.
    pub temperature: u16,
    /// Available spare, percent.
    pub available_spare: u8,
    /// Available spare threshold, percent.
    pub available_spare_threshold: u8,
    /// Percentage used.
    pub percentage_used: u8,
    /// Data units read (thousands of 512-byte units).
    pub data_units_read: u128,
    /// Data units written (thousands of 512-byte units).
    pub data_units_written: u128,
    /// Host read commands.
    pub host_read_commands: u128,
    /// Host write commands.
    pub host_write_commands: u128,
    /// Controller busy time, minutes.
    pub controller_busy_time: u128,
    /// Power cycles.
    pub power_cycles: u128,
    /// Power on hours.
    pub power_on_hours: u128,
    /// Unsafe shutdowns.
    pub unsafe_shutdowns: u128,
    /// Media and data integrity errors.
    pub media_errors: u128,
    /// Number of error information log entries.
    pub num_err_log_entries: u128,
}

/// Size of the SMART / Health log page.
pub const SMART_LOG_LEN: usize = 512;

impl SmartLog {
    /// Parses the 512-byte page.
    pub fn from_bytes(b: &[u8; SMART_LOG_LEN]) -> SmartLog {
        SmartLog {
            critical_warning: b[0],
            temperature: le16(b, 1),
            available_spare: b[3],
            available_spare_threshold: b[4],
            percentage_used: b[5],
            data_units_read: le128(b, 32),
            data_units_written: le128(b, 48),
            host_read_commands: le128(b, 64),
            host_write_commands: le128(b, 80),
            controller_busy_time: le128(b, 96),
            power_cycles: le128(b, 112),
            power_on_hours: le128(b, 128),
            unsafe_shutdowns: le128(b, 144),
            media_errors: le128(b, 160),
            num_err_log_entries: le128(b, 176),
        }
    }
    /// Serialises to the 512-byte page.
    pub fn to_bytes(&self) -> [u8; SMART_LOG_LEN] {
        let mut b = [0u8; SMART_LOG_LEN];
        b[0] = self.critical_warning;
        put(&mut b, 1, &self.temperature.to_le_bytes());
        b[3] = self.available_spare;
        b[4] = self.available_spare_threshold;
        b[5] = self.percentage_used;
        for (o, v) in [
            (32, self.data_units_read),
            (48, self.data_units_written),
            (64, self.host_read_commands),
            (80, self.host_write_commands),
            (96, self.controller_busy_time),
            (112, self.power_cycles),
            (128, self.power_on_hours),
            (144, self.unsafe_shutdowns),
            (160, self.media_errors),
            (176, self.num_err_log_entries),
        ] {
            put(&mut b, o, &v.to_le_bytes());
        }
        b
    }
}

/// One Error Information log entry (LID 01h), 64 bytes.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct ErrorLogEntry {
    /// Error count (0 = entry unused).
    pub error_count: u64,
    /// Submission queue ID.
    pub sqid: u16,
    /// Command ID.
    pub cid: u16,
    /// Status field (without the phase bit).
    pub status: u16,
    /// Parameter error location.
    pub parameter_error_location: u16,
    /// LBA.
    pub lba: u64,
    /// Namespace.
    pub nsid: u32,
}

/// Size of one error log entry.
pub const ERROR_LOG_ENTRY_LEN: usize = 64;

impl ErrorLogEntry {
    /// Parses one 64-byte entry.
    pub fn from_bytes(b: &[u8]) -> ErrorLogEntry {
        ErrorLogEntry {
            error_count: le64(b, 0),
            sqid: le16(b, 8),
            cid: le16(b, 10),
            status: le16(b, 12) >> 1,
            parameter_error_location: le16(b, 14),
            lba: le64(b, 16),
            nsid: le32(b, 24),
        }
    }
    /// Serialises one 64-byte entry.
    pub fn to_bytes(&self) -> [u8; ERROR_LOG_ENTRY_LEN] {
        let mut b = [0u8; ERROR_LOG_ENTRY_LEN];
        put(&mut b, 0, &self.error_count.to_le_bytes());
        put(&mut b, 8, &self.sqid.to_le_bytes());
        put(&mut b, 10, &self.cid.to_le_bytes());
        put(&mut b, 12, &(self.status << 1).to_le_bytes());
        put(&mut b, 14, &self.parameter_error_location.to_le_bytes());
        put(&mut b, 16, &self.lba.to_le_bytes());
        put(&mut b, 24, &self.nsid.to_le_bytes());
        b
    }
}

/// Firmware Slot Information log page (LID 03h), 512 bytes.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct FirmwareSlotLog {
    /// Active firmware info: slot running (2:0), slot for next reset (6:4).
    pub afi: u8,
    /// Firmware revision of slots 1 to 7 (empty for an empty slot).
    pub frs: [String; 7],
}

/// Size of the firmware slot log page.
pub const FIRMWARE_SLOT_LOG_LEN: usize = 512;

impl FirmwareSlotLog {
    /// Parses the 512-byte page.
    pub fn from_bytes(b: &[u8; FIRMWARE_SLOT_LOG_LEN]) -> FirmwareSlotLog {
        FirmwareSlotLog {
            afi: b[0],
            frs: core::array::from_fn(|i| ascii(b, 8 + 8 * i, 8)),
        }
    }
    /// Serialises to the 512-byte page.
    pub fn to_bytes(&self) -> [u8; FIRMWARE_SLOT_LOG_LEN] {
        let mut b = [0u8; FIRMWARE_SLOT_LOG_LEN];
        b[0] = self.afi;
        for (i, s) in self.frs.iter().enumerate() {
            if !s.is_empty() {
                put_ascii(&mut b, 8 + 8 * i, 8, s);
            }
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controller_round_trip_and_offsets() {
        let c = IdentifyController {
            vid: 0x1b36,
            ssvid: 0x1af4,
            sn: "deadbeef".into(),
            mn: "QEMU NVMe Ctrl".into(),
            fr: "10.0.2".into(),
            mdts: 7,
            cntlid: 1,
            ver: 0x0001_0400,
            oacs: Oacs::FORMAT,
            sqes: 0x66,
            cqes: 0x44,
            nn: 256,
            oncs: Oncs::DSM | Oncs::WRITE_ZEROES,
            vwc: 1,
            sgls: 0,
            tnvmcap: 1 << 40,
            subnqn: "nqn.2019-08.org.qemu:deadbeef".into(),
            ..Default::default()
        };
        let b = c.to_bytes();
        assert_eq!(&b[0..2], &[0x36, 0x1b]);
        assert_eq!(&b[24..38], b"QEMU NVMe Ctrl");
        assert_eq!(b[38], b' ');
        assert_eq!(b[77], 7);
        assert_eq!(b[512], 0x66);
        assert_eq!(&b[516..520], &256u32.to_le_bytes());
        assert_eq!(IdentifyController::from_bytes(&b), c);
        assert_eq!(c.max_transfer_bytes(4096), Some(512 * 1024));
        assert_eq!(&b[256..258], &[0x02, 0]);
        assert_eq!(&b[520..522], &[0x0c, 0]);
        // Bits this version does not name survive a round trip; named ones are recognised.
        let mut raw = b.clone();
        raw[256..258].copy_from_slice(&0x8009u16.to_le_bytes());
        raw[520..522].copy_from_slice(&0x4101u16.to_le_bytes());
        let p = IdentifyController::from_bytes(&raw);
        assert!(p.oacs.contains(Oacs::SECURITY | Oacs::NS_MANAGEMENT));
        assert!(!p.oacs.contains(Oacs::FORMAT));
        assert!(p.oncs.contains(Oncs::COMPARE | Oncs::COPY));
        assert!(!p.oncs.intersects(Oncs::DSM | Oncs::WRITE_ZEROES));
        assert_eq!((p.oacs.bits(), p.oncs.bits()), (0x8009, 0x4101));
        assert_eq!(p.to_bytes(), raw);
    }

    #[test]
    fn namespace_round_trip_and_block_size() {
        let n = IdentifyNamespace {
            nsze: 131072,
            ncap: 131072,
            nuse: 0,
            nlbaf: 1,
            flbas: 1,
            lbaf: vec![
                LbaFormat {
                    ms: 0,
                    lbads: 9,
                    rp: 0,
                },
                LbaFormat {
                    ms: 0,
                    lbads: 12,
                    rp: 0,
                },
            ],
            nguid: [7; 16],
            ..Default::default()
        };
        let b = n.to_bytes();
        assert_eq!(&b[128..132], &(9u32 << 16).to_le_bytes());
        let back = IdentifyNamespace::from_bytes(&b);
        assert_eq!(back, n);
        assert_eq!(back.block_size(), 4096);
    }

    #[test]
    fn hostile_mdts_is_no_limit_not_a_panic() {
        let mut c = IdentifyController::default();
        assert_eq!(c.max_transfer_bytes(4096), None);
        for (mdts, want) in [(1, Some(8192)), (20, Some(4096 << 20))] {
            c.mdts = mdts;
            assert_eq!(c.max_transfer_bytes(4096), want);
        }
        // 4096 << 52 overflows 64 bits; a shift of 64 or more is not even defined.
        for mdts in [52, 63, 64, 200, 255] {
            c.mdts = mdts;
            assert_eq!(c.max_transfer_bytes(4096), None, "mdts {mdts}");
        }
    }

    #[test]
    fn hostile_lbads_is_an_invalid_format_not_a_panic() {
        for (lbads, want) in [(0, 0), (8, 0), (9, 512), (12, 4096), (16, 65536), (17, 0)] {
            let f = LbaFormat {
                ms: 0,
                lbads,
                rp: 0,
            };
            assert_eq!(f.block_size(), want, "lbads {lbads}");
        }
        for lbads in [31, 32, 63, 64, 255] {
            let f = LbaFormat {
                ms: 0,
                lbads,
                rp: 0,
            };
            assert_eq!(f.block_size(), 0, "lbads {lbads}");
        }
        let n = IdentifyNamespace {
            nsze: 8,
            lbaf: vec![LbaFormat {
                ms: 0,
                lbads: 255,
                rp: 0,
            }],
            ..Default::default()
        };
        assert_eq!(n.block_size(), 0);
    }

    #[test]
    fn ns_list_and_logs() {
        let b = build_ns_list(&[1, 2, 5], 1);
        assert_eq!(parse_ns_list(&b), vec![2, 5]);
        let s = SmartLog {
            temperature: 300,
            power_on_hours: 12,
            media_errors: 3,
            ..Default::default()
        };
        assert_eq!(SmartLog::from_bytes(&s.to_bytes()), s);
        let e = ErrorLogEntry {
            error_count: 1,
            sqid: 1,
            cid: 9,
            status: 0x281,
            lba: 77,
            nsid: 1,
            ..Default::default()
        };
        assert_eq!(ErrorLogEntry::from_bytes(&e.to_bytes()), e);
        let mut f = FirmwareSlotLog {
            afi: 1,
            ..Default::default()
        };
        f.frs[0] = "1.0".into();
        assert_eq!(FirmwareSlotLog::from_bytes(&f.to_bytes()), f);
    }
}
