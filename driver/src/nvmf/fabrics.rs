//! The Fabrics command set (NVMe-oF 1.1): Connect, Property Get/Set, Disconnect, their status
//! codes, the SGL descriptors NVMe/TCP commands carry, the fabrics fields of Identify
//! Controller, and the discovery log page.

use crate::spec::Sqe;
use crate::spec::sqe::admin;

/// Opcode of every Fabrics command.
pub const OPCODE: u8 = 0x7f;

/// Fabrics command types (FCTYPE, byte 4 of the command).
pub mod fctype {
    /// Property Set.
    pub const PROPERTY_SET: u8 = 0x00;
    /// Connect.
    pub const CONNECT: u8 = 0x01;
    /// Property Get.
    pub const PROPERTY_GET: u8 = 0x04;
    /// Disconnect.
    pub const DISCONNECT: u8 = 0x08;
}

/// NQN of the discovery subsystem.
pub const DISCOVERY_NQN: &str = "nqn.2014-08.org.nvmexpress.discovery";
/// Size of an NQN field.
pub const NQN_FIELD: usize = 256;
/// Longest NQN (NVMe base specification: 223 bytes).
pub const NQN_MAX: usize = 223;
/// Length of the Connect command's data.
pub const CONNECT_DATA_LEN: usize = 1024;
/// CNTLID a host sends to ask for a dynamic controller.
pub const CNTLID_DYNAMIC: u16 = 0xffff;
/// Largest CNTLID a controller may use (0xFFF0..=0xFFFF are reserved).
pub const CNTLID_MAX: u16 = 0xffef;

/// Fabrics and NVMe/TCP status codes.
pub mod sc {
    /// Command specific (SCT 1): Incompatible Format.
    pub const INCOMPATIBLE_FORMAT: u8 = 0x80;
    /// Command specific (SCT 1): Controller Busy.
    pub const CONTROLLER_BUSY: u8 = 0x81;
    /// Command specific (SCT 1): Connect Invalid Parameters.
    pub const CONNECT_INVALID_PARAMETERS: u8 = 0x82;
    /// Command specific (SCT 1): Connect Invalid Host.
    pub const CONNECT_INVALID_HOST: u8 = 0x84;
    /// Generic (SCT 0): Transient Transport Error.
    pub const TRANSIENT_TRANSPORT_ERROR: u8 = 0x22;
    /// Generic (SCT 0): Data SGL Length Invalid.
    pub const DATA_SGL_LENGTH_INVALID: u8 = 0x0f;
    /// Generic (SCT 0): SGL Descriptor Type Invalid.
    pub const SGL_DESCRIPTOR_TYPE_INVALID: u8 = 0x11;
    /// Generic (SCT 0): SGL Offset Invalid.
    pub const SGL_OFFSET_INVALID: u8 = 0x16;
}

/// Property offsets.
pub mod prop {
    /// Controller Capabilities (8 bytes).
    pub const CAP: u32 = 0x00;
    /// Version.
    pub const VS: u32 = 0x08;
    /// Controller Configuration.
    pub const CC: u32 = 0x14;
    /// Controller Status.
    pub const CSTS: u32 = 0x1c;
}

/// The fields of a Connect command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Connect {
    /// Record format (0).
    pub recfmt: u16,
    /// Queue ID (0: admin).
    pub qid: u16,
    /// Submission queue size, 0's based.
    pub sqsize: u16,
    /// Connect attributes.
    pub cattr: u8,
    /// Keep Alive Timeout in milliseconds (admin queue only; 0: none).
    pub kato: u32,
}

impl Connect {
    /// From a Connect command.
    pub const fn from_sqe(s: &Sqe) -> Connect {
        Connect {
            recfmt: s.cdw10 as u16,
            qid: (s.cdw10 >> 16) as u16,
            sqsize: s.cdw11 as u16,
            cattr: (s.cdw11 >> 16) as u8,
            kato: s.cdw12,
        }
    }
    /// The command (the SGL is the caller's: see [`Sgl`]).
    pub const fn to_sqe(self) -> Sqe {
        let mut s = fabrics_sqe(fctype::CONNECT);
        s.cdw10 = self.recfmt as u32 | (self.qid as u32) << 16;
        s.cdw11 = self.sqsize as u32 | (self.cattr as u32) << 16;
        s.cdw12 = self.kato;
        s
    }
}

/// A Fabrics command with only its FCTYPE set (PSDT: SGL).
pub const fn fabrics_sqe(fctype: u8) -> Sqe {
    let mut s = Sqe::new(OPCODE);
    s.cdw0 |= PSDT_SGL;
    s.nsid = fctype as u32;
    s
}

/// FCTYPE of a Fabrics command.
pub const fn fctype_of(s: &Sqe) -> u8 {
    s.nsid as u8
}

/// Property Get of `offset`, 4 or 8 bytes.
pub const fn property_get(offset: u32, eight: bool) -> Sqe {
    let mut s = fabrics_sqe(fctype::PROPERTY_GET);
    s.cdw10 = eight as u32;
    s.cdw11 = offset;
    s
}

/// Property Set of `offset` to `value`, 4 or 8 bytes.
pub const fn property_set(offset: u32, eight: bool, value: u64) -> Sqe {
    let mut s = fabrics_sqe(fctype::PROPERTY_SET);
    s.cdw10 = eight as u32;
    s.cdw11 = offset;
    s.cdw12 = value as u32;
    s.cdw13 = (value >> 32) as u32;
    s
}

/// Disconnect (of the queue the command is sent on).
pub const fn disconnect() -> Sqe {
    fabrics_sqe(fctype::DISCONNECT)
}

/// The Connect command's data: host identifier, controller ID, subsystem and host NQNs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectData {
    /// Host identifier.
    pub hostid: [u8; 16],
    /// Controller ID (0xFFFF: dynamic, on the admin queue).
    pub cntlid: u16,
    /// NQN of the subsystem.
    pub subnqn: String,
    /// NQN of the host.
    pub hostnqn: String,
}

/// Offsets in the Connect data (for the IPO of "Connect Invalid Parameters").
pub mod connect_data {
    /// HOSTID.
    pub const HOSTID: u16 = 0;
    /// CNTLID.
    pub const CNTLID: u16 = 16;
    /// SUBNQN.
    pub const SUBNQN: u16 = 256;
    /// HOSTNQN.
    pub const HOSTNQN: u16 = 512;
}

/// DW0 of a "Connect Invalid Parameters" completion for a field of the Connect data.
pub const fn invalid_param_in_data(offset: u16) -> u32 {
    1 << 16 | offset as u32
}

/// DW0 of a "Connect Invalid Parameters" completion for a byte of the command.
pub const fn invalid_param_in_cmd(offset: u16) -> u32 {
    offset as u32
}

/// An NQN field: NUL-terminated UTF-8 of at most [`NQN_MAX`] bytes, or `None` when it is
/// not.
fn nqn_field(b: &[u8]) -> Option<String> {
    let end = b.iter().position(|&c| c == 0).filter(|&e| e <= NQN_MAX)?;
    core::str::from_utf8(&b[..end]).ok().map(str::to_owned)
}

impl ConnectData {
    /// Parses the 1 KiB data; `Err(offset)` names the malformed field.
    pub fn from_bytes(b: &[u8]) -> Result<ConnectData, u16> {
        if b.len() < CONNECT_DATA_LEN {
            return Err(0);
        }
        let mut hostid = [0u8; 16];
        hostid.copy_from_slice(&b[..16]);
        Ok(ConnectData {
            hostid,
            cntlid: u16::from_le_bytes([b[16], b[17]]),
            subnqn: nqn_field(&b[256..512]).ok_or(connect_data::SUBNQN)?,
            hostnqn: nqn_field(&b[512..768]).ok_or(connect_data::HOSTNQN)?,
        })
    }
    /// The 1 KiB wire form (NQNs longer than 255 bytes are cut).
    pub fn to_bytes(&self) -> [u8; CONNECT_DATA_LEN] {
        let mut b = [0u8; CONNECT_DATA_LEN];
        b[..16].copy_from_slice(&self.hostid);
        b[16..18].copy_from_slice(&self.cntlid.to_le_bytes());
        let sn = self.subnqn.as_bytes();
        let n = sn.len().min(NQN_FIELD - 1);
        b[256..256 + n].copy_from_slice(&sn[..n]);
        let hn = self.hostnqn.as_bytes();
        let n = hn.len().min(NQN_FIELD - 1);
        b[512..512 + n].copy_from_slice(&hn[..n]);
        b
    }
}

/// CDW0 PSDT = 01b: the data pointer is an SGL.
pub const PSDT_SGL: u32 = 1 << 14;
/// SGL descriptor type of in-capsule data: Data Block, Offset subtype.
pub const SGL_INCAPSULE: u8 = 0x01;
/// SGL descriptor type of data the transport moves (R2T/H2CData, C2HData): Transport Data
/// Block, transport specific subtype.
pub const SGL_TRANSPORT: u8 = 0x5a;

/// The data pointer of an NVMe/TCP command: an SGL descriptor in bytes 24..40.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sgl {
    /// Address (the offset into the capsule for in-capsule data).
    pub addr: u64,
    /// Length of the command's data.
    pub len: u32,
    /// Descriptor type and subtype byte.
    pub kind: u8,
}

impl Sgl {
    /// The descriptor of a command.
    pub const fn of(s: &Sqe) -> Sgl {
        Sgl {
            addr: s.prp1,
            len: s.prp2 as u32,
            kind: (s.prp2 >> 56) as u8,
        }
    }
    /// Writes the descriptor (and PSDT) into a command.
    pub const fn set(self, s: &mut Sqe) {
        s.cdw0 = (s.cdw0 & !(3 << 14)) | PSDT_SGL;
        s.prp1 = self.addr;
        s.prp2 = self.len as u64 | (self.kind as u64) << 56;
    }
    /// In-capsule data of `len` bytes at offset 0.
    pub const fn incapsule(len: u32) -> Sgl {
        Sgl {
            addr: 0,
            len,
            kind: SGL_INCAPSULE,
        }
    }
    /// Data moved by the transport (or none, with `len` 0).
    pub const fn transport(len: u32) -> Sgl {
        Sgl {
            addr: 0,
            len,
            kind: SGL_TRANSPORT,
        }
    }
}

/// Identify Controller fields of a fabrics controller, written over a serialised
/// [`IdentifyController`](crate::spec::IdentifyController).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FabricsIdentify {
    /// Controller type (1: I/O, 2: discovery).
    pub cntrltype: u8,
    /// Keep Alive Support, in 100 ms units (0: no keep alive).
    pub kas: u16,
    /// I/O queue command capsule size, in 16-byte units.
    pub ioccsz: u32,
    /// I/O queue response capsule size, in 16-byte units.
    pub iorcsz: u32,
    /// In-capsule data offset, in 16-byte units (0).
    pub icdoff: u16,
    /// Fabrics controller attributes (0: dynamic controller model).
    pub fcatt: u8,
    /// Maximum SGL data block descriptors (1).
    pub msdbd: u8,
}

/// Identify Controller offsets of the fabrics fields.
pub mod id_ofs {
    /// CNTRLTYPE.
    pub const CNTRLTYPE: usize = 111;
    /// KAS.
    pub const KAS: usize = 320;
    /// IOCCSZ.
    pub const IOCCSZ: usize = 1792;
    /// IORCSZ.
    pub const IORCSZ: usize = 1796;
    /// ICDOFF.
    pub const ICDOFF: usize = 1800;
    /// FCATT.
    pub const FCATT: usize = 1802;
    /// MSDBD.
    pub const MSDBD: usize = 1803;
}

impl FabricsIdentify {
    /// Writes the fields into a 4 KiB Identify Controller page.
    pub fn write(&self, b: &mut [u8]) {
        b[id_ofs::CNTRLTYPE] = self.cntrltype;
        b[id_ofs::KAS..id_ofs::KAS + 2].copy_from_slice(&self.kas.to_le_bytes());
        b[id_ofs::IOCCSZ..id_ofs::IOCCSZ + 4].copy_from_slice(&self.ioccsz.to_le_bytes());
        b[id_ofs::IORCSZ..id_ofs::IORCSZ + 4].copy_from_slice(&self.iorcsz.to_le_bytes());
        b[id_ofs::ICDOFF..id_ofs::ICDOFF + 2].copy_from_slice(&self.icdoff.to_le_bytes());
        b[id_ofs::FCATT] = self.fcatt;
        b[id_ofs::MSDBD] = self.msdbd;
    }
    /// Reads the fields from a 4 KiB Identify Controller page.
    pub fn read(b: &[u8]) -> FabricsIdentify {
        let le32 = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        FabricsIdentify {
            cntrltype: b[id_ofs::CNTRLTYPE],
            kas: u16::from_le_bytes([b[id_ofs::KAS], b[id_ofs::KAS + 1]]),
            ioccsz: le32(id_ofs::IOCCSZ),
            iorcsz: le32(id_ofs::IORCSZ),
            icdoff: u16::from_le_bytes([b[id_ofs::ICDOFF], b[id_ofs::ICDOFF + 1]]),
            fcatt: b[id_ofs::FCATT],
            msdbd: b[id_ofs::MSDBD],
        }
    }
}

/// Log page identifiers the target serves beyond [`crate::spec::sqe::lid`].
pub mod lid {
    /// Changed Namespace List.
    pub const CHANGED_NS_LIST: u8 = 0x04;
    /// Discovery.
    pub const DISCOVERY: u8 = 0x70;
}

/// Feature identifiers beyond [`crate::spec::sqe::fid`].
pub mod fid {
    /// Asynchronous Event Configuration.
    pub const ASYNC_EVENT_CONFIG: u8 = 0x0b;
    /// Keep Alive Timer.
    pub const KEEP_ALIVE_TIMER: u8 = 0x0f;
}

/// Identify CNS values beyond [`crate::spec::sqe::cns`].
pub mod cns {
    /// Namespace Identification Descriptor list.
    pub const NS_DESCRIPTORS: u32 = 0x03;
}

/// Namespace identification descriptor types (NIDT).
pub mod nidt {
    /// NGUID (16 bytes).
    pub const NGUID: u8 = 2;
    /// UUID (16 bytes).
    pub const UUID: u8 = 3;
}

/// Get Log Page of `len` bytes (a multiple of 4) at byte `offset` of the page.
pub const fn get_log_page(lid: u8, nsid: u32, len: u32, offset: u64) -> Sqe {
    let numd = (len / 4).saturating_sub(1);
    let mut s = Sqe::new(admin::GET_LOG_PAGE);
    s.nsid = nsid;
    s.cdw10 = lid as u32 | (numd & 0xffff) << 16;
    s.cdw11 = numd >> 16;
    s.cdw12 = offset as u32;
    s.cdw13 = (offset >> 32) as u32;
    s
}

/// Fields of a Get Log Page command: (LID, bytes, offset).
pub const fn log_page_args(s: &Sqe) -> (u8, u64, u64) {
    let numd = (s.cdw10 >> 16) as u64 | ((s.cdw11 & 0xffff) as u64) << 16;
    (
        s.cdw10 as u8,
        (numd + 1) * 4,
        s.cdw12 as u64 | (s.cdw13 as u64) << 32,
    )
}

/// Length of the discovery log page header and of each record.
pub const DISC_RECORD_LEN: usize = 1024;

/// One discovery log page record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiscoveryEntry {
    /// Transport type (3: TCP).
    pub trtype: u8,
    /// Address family (1: IPv4, 2: IPv6).
    pub adrfam: u8,
    /// Subsystem type (2: NVM, 3: current discovery subsystem).
    pub subtype: u8,
    /// Transport requirements.
    pub treq: u8,
    /// Port ID.
    pub portid: u16,
    /// Controller ID (0xFFFF: dynamic).
    pub cntlid: u16,
    /// Admin max SQ size.
    pub asqsz: u16,
    /// Transport service ID (the TCP port, as text).
    pub trsvcid: String,
    /// Subsystem NQN.
    pub subnqn: String,
    /// Transport address (the IP address, as text).
    pub traddr: String,
}

/// Transport type: TCP.
pub const TRTYPE_TCP: u8 = 3;
/// Address family: IPv4.
pub const ADRFAM_IPV4: u8 = 1;
/// Address family: IPv6.
pub const ADRFAM_IPV6: u8 = 2;
/// Subsystem type: NVM subsystem.
pub const SUBTYPE_NVME: u8 = 2;
/// Transport requirements: secure channel not required.
pub const TREQ_NOT_REQUIRED: u8 = 2;

fn put_str(b: &mut [u8], s: &str) {
    let n = s.len().min(b.len());
    b[..n].copy_from_slice(&s.as_bytes()[..n]);
}

fn get_str(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).trim_end().to_owned()
}

impl DiscoveryEntry {
    /// The 1 KiB record.
    pub fn to_bytes(&self) -> [u8; DISC_RECORD_LEN] {
        let mut b = [0u8; DISC_RECORD_LEN];
        b[0] = self.trtype;
        b[1] = self.adrfam;
        b[2] = self.subtype;
        b[3] = self.treq;
        b[4..6].copy_from_slice(&self.portid.to_le_bytes());
        b[6..8].copy_from_slice(&self.cntlid.to_le_bytes());
        b[8..10].copy_from_slice(&self.asqsz.to_le_bytes());
        // TRSVCID and TRADDR are space padded ASCII.
        b[32..64].fill(b' ');
        put_str(&mut b[32..64], &self.trsvcid);
        put_str(&mut b[256..256 + NQN_FIELD - 1], &self.subnqn);
        b[512..768].fill(b' ');
        put_str(&mut b[512..768], &self.traddr);
        // TSAS for TCP: SECTYPE 0 (no security).
        b
    }
    /// Parses a record.
    pub fn from_bytes(b: &[u8; DISC_RECORD_LEN]) -> DiscoveryEntry {
        DiscoveryEntry {
            trtype: b[0],
            adrfam: b[1],
            subtype: b[2],
            treq: b[3],
            portid: u16::from_le_bytes([b[4], b[5]]),
            cntlid: u16::from_le_bytes([b[6], b[7]]),
            asqsz: u16::from_le_bytes([b[8], b[9]]),
            trsvcid: get_str(&b[32..64]),
            subnqn: get_str(&b[256..512]),
            traddr: get_str(&b[512..768]),
        }
    }
}

/// Builds the discovery log page: the header (generation counter, record count, record format
/// 0) and the records.
pub fn discovery_log(genctr: u64, entries: &[DiscoveryEntry]) -> Vec<u8> {
    let mut v = vec![0u8; DISC_RECORD_LEN * (1 + entries.len())];
    v[0..8].copy_from_slice(&genctr.to_le_bytes());
    v[8..16].copy_from_slice(&(entries.len() as u64).to_le_bytes());
    for (i, e) in entries.iter().enumerate() {
        let o = DISC_RECORD_LEN * (i + 1);
        v[o..o + DISC_RECORD_LEN].copy_from_slice(&e.to_bytes());
    }
    v
}

/// Parses a discovery log page: (generation counter, records present in `b`).
pub fn parse_discovery_log(b: &[u8]) -> Option<(u64, u64, Vec<DiscoveryEntry>)> {
    if b.len() < 16 {
        return None;
    }
    let genctr = u64::from_le_bytes(b[0..8].try_into().ok()?);
    let numrec = u64::from_le_bytes(b[8..16].try_into().ok()?);
    let mut out = Vec::new();
    for i in 0..numrec.min(1024) as usize {
        let o = DISC_RECORD_LEN * (i + 1);
        let Some(rec) = b.get(o..o + DISC_RECORD_LEN) else {
            break;
        };
        let rec: &[u8; DISC_RECORD_LEN] = rec.try_into().ok()?;
        out.push(DiscoveryEntry::from_bytes(rec));
    }
    Some((genctr, numrec, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_round_trips() {
        let c = Connect {
            recfmt: 0,
            qid: 3,
            sqsize: 127,
            cattr: 0,
            kato: 5000,
        };
        let s = c.to_sqe();
        assert_eq!(s.opcode(), OPCODE);
        assert_eq!(fctype_of(&s), fctype::CONNECT);
        assert_eq!(Connect::from_sqe(&s), c);
        let d = ConnectData {
            hostid: [7; 16],
            cntlid: 0xffff,
            subnqn: "nqn.2026-12.io.dioxide:sub".into(),
            hostnqn: "nqn.2026-12.io.dioxide:host".into(),
        };
        assert_eq!(ConnectData::from_bytes(&d.to_bytes()), Ok(d));
        let mut bad = [b'x'; CONNECT_DATA_LEN];
        bad[256..512].fill(b'a');
        assert_eq!(ConnectData::from_bytes(&bad), Err(connect_data::SUBNQN));
    }

    #[test]
    fn sgl_and_log_page_fields() {
        let mut s = Sqe::new(0x01);
        Sgl::transport(65536).set(&mut s);
        assert_eq!(s.psdt(), 1);
        assert_eq!(Sgl::of(&s), Sgl::transport(65536));
        let g = get_log_page(lid::DISCOVERY, 0, 4096, 1024);
        assert_eq!(log_page_args(&g), (lid::DISCOVERY, 4096, 1024));
    }

    #[test]
    fn discovery_log_round_trips() {
        let e = DiscoveryEntry {
            trtype: TRTYPE_TCP,
            adrfam: ADRFAM_IPV4,
            subtype: SUBTYPE_NVME,
            treq: TREQ_NOT_REQUIRED,
            portid: 1,
            cntlid: 0xffff,
            asqsz: 32,
            trsvcid: "4420".into(),
            subnqn: "nqn.x".into(),
            traddr: "127.0.0.1".into(),
        };
        let page = discovery_log(3, &[e.clone(), e.clone()]);
        assert_eq!(page.len(), 3072);
        let (g, n, recs) = parse_discovery_log(&page).unwrap();
        assert_eq!((g, n), (3, 2));
        assert_eq!(recs, vec![e.clone(), e]);
    }
}
