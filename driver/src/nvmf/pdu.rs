//! NVMe/TCP PDUs (NVMe/TCP transport binding, TP 8000): layouts, strict validation, encoding
//! into caller buffers, and an incremental decoder for a non-blocking byte stream.
//!
//! Every PDU starts with the 8-byte common header (type, flags, HLEN, PDO, PLEN). The decoder
//! checks it **before** reading anything else, so a bogus length never makes it read (or wait
//! for) more than the PDU type allows; then it reads the rest of the header and its digest,
//! parses the type-specific fields, and hands the PDU to the caller, who says where the data
//! goes (straight into the command's DMA buffer: no intermediate copy for large payloads).
//! A violation is a [`FatalError`]: the Fatal Error Status and Fatal Error Information the
//! specification names for it (the byte offset of the offending header field, for "Invalid
//! PDU Header Field"), ready to be sent in a C2HTermReq or H2CTermReq.
//!
//! Nothing here allocates per PDU: the header lives in a fixed array in the [`PduReader`], the
//! staging buffer ([`RxBuf`]) is allocated once per connection.

use std::io::{self, Read};

use crate::spec::{Cqe, Sqe};

/// PDU types.
pub mod pdu_type {
    /// Initialize Connection Request (host to controller).
    pub const IC_REQ: u8 = 0x00;
    /// Initialize Connection Response (controller to host).
    pub const IC_RESP: u8 = 0x01;
    /// Host to Controller Terminate Connection Request.
    pub const H2C_TERM_REQ: u8 = 0x02;
    /// Controller to Host Terminate Connection Request.
    pub const C2H_TERM_REQ: u8 = 0x03;
    /// Command capsule.
    pub const CAPSULE_CMD: u8 = 0x04;
    /// Response capsule.
    pub const CAPSULE_RESP: u8 = 0x05;
    /// Host to Controller Data.
    pub const H2C_DATA: u8 = 0x06;
    /// Controller to Host Data.
    pub const C2H_DATA: u8 = 0x07;
    /// Ready to Transfer.
    pub const R2T: u8 = 0x09;
}

/// Common header flags.
pub mod flags {
    /// HDGSTF: a header digest follows the header.
    pub const HDGST: u8 = 1 << 0;
    /// DDGSTF: a data digest follows the data.
    pub const DDGST: u8 = 1 << 1;
    /// LAST_PDU: last data PDU of a transfer (H2CData / C2HData).
    pub const LAST: u8 = 1 << 2;
    /// SUCCESS: the command completed successfully, no response capsule (C2HData).
    pub const SUCCESS: u8 = 1 << 3;
}

/// Common header length.
pub const CH_LEN: usize = 8;
/// Header length of ICReq and ICResp.
pub const IC_HLEN: usize = 128;
/// Header length of H2CTermReq and C2HTermReq.
pub const TERM_HLEN: usize = 24;
/// Header length of a command capsule (8 + the 64-byte command).
pub const CMD_HLEN: usize = 72;
/// Header length of a response capsule (8 + the 16-byte completion).
pub const RESP_HLEN: usize = 24;
/// Header length of H2CData, C2HData and R2T.
pub const DATA_HLEN: usize = 24;
/// Length of a header or data digest.
pub const DIGEST_LEN: usize = 4;
/// Largest header plus header digest.
pub const MAX_HDR: usize = IC_HLEN + DIGEST_LEN;
/// Largest data of a TermReq: a copy of the offending PDU header (PLEN at most 152).
pub const MAX_TERM_DATA: usize = 128;
/// Largest PDU data alignment (HPDA / CPDA are 0's based dwords, at most 31: 128 bytes).
pub const MAX_PDA: u8 = 31;
/// Room an encoded header needs: header, header digest and padding up to the largest PDO.
pub const MAX_ENC: usize = 256;
/// PLEN limit for PDUs whose data has no negotiated bound (a sanity cap: 16 MiB).
pub const MAX_PDU_DATA: u32 = 16 << 20;

/// Offsets of the common header fields (the FEI of "Invalid PDU Header Field").
pub mod field {
    /// PDU type.
    pub const TYPE: u32 = 0;
    /// Flags.
    pub const FLAGS: u32 = 1;
    /// HLEN.
    pub const HLEN: u32 = 2;
    /// PDO.
    pub const PDO: u32 = 3;
    /// PLEN.
    pub const PLEN: u32 = 4;
    /// ICReq / ICResp PFV.
    pub const PFV: u32 = 8;
    /// ICReq HPDA / ICResp CPDA.
    pub const PDA: u32 = 10;
    /// ICReq / ICResp digest types.
    pub const DGST: u32 = 11;
    /// ICResp MAXH2CDATA.
    pub const MAXDATA: u32 = 12;
    /// H2CData / C2HData / R2T: command capsule CID.
    pub const CCCID: u32 = 8;
    /// H2CData / R2T: transfer tag.
    pub const TTAG: u32 = 10;
    /// H2CData / C2HData: data offset; R2T: R2T offset.
    pub const DATAO: u32 = 12;
    /// H2CData / C2HData: data length; R2T: R2T length.
    pub const DATAL: u32 = 16;
}

/// Fatal Error Status of a TermReq (TP 8000, H2CTermReq / C2HTermReq).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fes {
    /// 01h: Invalid PDU Header Field (FEI: byte offset of the field).
    InvalidHeaderField,
    /// 02h: PDU Sequence Error.
    SequenceError,
    /// 03h: Header Digest Error.
    HeaderDigest,
    /// 04h: Data Transfer Out of Range.
    DataOutOfRange,
    /// 05h: Data Transfer Limit Exceeded (R2T Limit Exceeded).
    DataLimitExceeded,
    /// 06h: Unsupported Parameter (FEI: byte offset of the field).
    UnsupportedParameter,
    /// Any other value a peer sent.
    Other(u16),
}

impl Fes {
    /// The wire value.
    pub const fn to_u16(self) -> u16 {
        match self {
            Fes::InvalidHeaderField => 1,
            Fes::SequenceError => 2,
            Fes::HeaderDigest => 3,
            Fes::DataOutOfRange => 4,
            Fes::DataLimitExceeded => 5,
            Fes::UnsupportedParameter => 6,
            Fes::Other(v) => v,
        }
    }
    /// From the wire value.
    pub const fn from_u16(v: u16) -> Fes {
        match v {
            1 => Fes::InvalidHeaderField,
            2 => Fes::SequenceError,
            3 => Fes::HeaderDigest,
            4 => Fes::DataOutOfRange,
            5 => Fes::DataLimitExceeded,
            6 => Fes::UnsupportedParameter,
            v => Fes::Other(v),
        }
    }
}

/// A fatal transport error: what goes into a TermReq, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("NVMe/TCP fatal error {fes:?} (FEI {fei:#x}): {what}")]
pub struct FatalError {
    /// Fatal Error Status.
    pub fes: Fes,
    /// Fatal Error Information (a field offset, or 0).
    pub fei: u32,
    /// What was wrong, for logs and error messages.
    pub what: &'static str,
}

impl FatalError {
    /// Invalid PDU Header Field at byte `fei`.
    pub const fn field(fei: u32, what: &'static str) -> FatalError {
        FatalError {
            fes: Fes::InvalidHeaderField,
            fei,
            what,
        }
    }
    /// Any other status.
    pub const fn new(fes: Fes, what: &'static str) -> FatalError {
        FatalError { fes, fei: 0, what }
    }
}

/// Digests enabled on a connection (negotiated by ICReq/ICResp).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Digests {
    /// Header digest (HDGST_ENABLE).
    pub header: bool,
    /// Data digest (DDGST_ENABLE).
    pub data: bool,
}

impl Digests {
    /// From the ICReq/ICResp DGST byte.
    pub const fn from_bits(b: u8) -> Digests {
        Digests {
            header: b & 1 != 0,
            data: b & 2 != 0,
        }
    }
    /// The DGST byte.
    pub const fn bits(self) -> u8 {
        self.header as u8 | (self.data as u8) << 1
    }
}

/// CRC-32C (Castagnoli) as NVMe/TCP digests use it: seed all ones, result inverted.
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

/// Continues a CRC-32C over more bytes (`crc32c(a ++ b) == crc32c_append(crc32c(a), b)`).
pub fn crc32c_append(crc: u32, data: &[u8]) -> u32 {
    crc32c::crc32c_append(crc, data)
}

/// ICReq.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcReq {
    /// PDU format version (0).
    pub pfv: u16,
    /// Host PDU data alignment (0's based dwords).
    pub hpda: u8,
    /// Digests asked for.
    pub digests: Digests,
    /// Maximum outstanding R2Ts per command, 0's based.
    pub maxr2t: u32,
}

/// ICResp.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcResp {
    /// PDU format version (0).
    pub pfv: u16,
    /// Controller PDU data alignment (0's based dwords).
    pub cpda: u8,
    /// Digests enabled.
    pub digests: Digests,
    /// Largest H2CData payload the controller accepts.
    pub maxh2cdata: u32,
}

/// H2CTermReq / C2HTermReq.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TermReq {
    /// Fatal Error Status.
    pub fes: Fes,
    /// Fatal Error Information.
    pub fei: u32,
}

/// H2CData / C2HData.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataHdr {
    /// CID of the command the data belongs to.
    pub cccid: u16,
    /// Transfer tag (from the R2T; 0 for C2HData).
    pub ttag: u16,
    /// Offset of the data in the command's data.
    pub offset: u32,
    /// Length of the data.
    pub len: u32,
    /// LAST_PDU flag.
    pub last: bool,
    /// SUCCESS flag (C2HData only).
    pub success: bool,
}

/// R2T.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct R2t {
    /// CID of the command.
    pub cccid: u16,
    /// Transfer tag the host echoes in its H2CData.
    pub ttag: u16,
    /// Offset of the requested data.
    pub offset: u32,
    /// Length of the requested data.
    pub len: u32,
}

/// A decoded PDU header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pdu {
    /// ICReq.
    IcReq(IcReq),
    /// ICResp.
    IcResp(IcResp),
    /// H2CTermReq; `data_len` bytes (a copy of the offending header) follow.
    H2cTermReq(TermReq),
    /// C2HTermReq.
    C2hTermReq(TermReq),
    /// A command capsule and the length of its in-capsule data.
    CapsuleCmd(Sqe, u32),
    /// A response capsule.
    CapsuleResp(Cqe),
    /// H2CData.
    H2cData(DataHdr),
    /// C2HData.
    C2hData(DataHdr),
    /// R2T.
    R2t(R2t),
}

impl Pdu {
    /// The PDU type byte.
    pub const fn type_byte(&self) -> u8 {
        match self {
            Pdu::IcReq(_) => pdu_type::IC_REQ,
            Pdu::IcResp(_) => pdu_type::IC_RESP,
            Pdu::H2cTermReq(_) => pdu_type::H2C_TERM_REQ,
            Pdu::C2hTermReq(_) => pdu_type::C2H_TERM_REQ,
            Pdu::CapsuleCmd(..) => pdu_type::CAPSULE_CMD,
            Pdu::CapsuleResp(_) => pdu_type::CAPSULE_RESP,
            Pdu::H2cData(_) => pdu_type::H2C_DATA,
            Pdu::C2hData(_) => pdu_type::C2H_DATA,
            Pdu::R2t(_) => pdu_type::R2T,
        }
    }
}

/// Header length of a PDU type, or `None` for an unknown type.
pub const fn hlen_of(ty: u8) -> Option<usize> {
    match ty {
        pdu_type::IC_REQ | pdu_type::IC_RESP => Some(IC_HLEN),
        pdu_type::H2C_TERM_REQ | pdu_type::C2H_TERM_REQ => Some(TERM_HLEN),
        pdu_type::CAPSULE_CMD => Some(CMD_HLEN),
        pdu_type::CAPSULE_RESP => Some(RESP_HLEN),
        pdu_type::H2C_DATA | pdu_type::C2H_DATA | pdu_type::R2T => Some(DATA_HLEN),
        _ => None,
    }
}

/// True for the types that never carry digests (ICReq, ICResp, TermReqs).
const fn undigested(ty: u8) -> bool {
    matches!(
        ty,
        pdu_type::IC_REQ | pdu_type::IC_RESP | pdu_type::H2C_TERM_REQ | pdu_type::C2H_TERM_REQ
    )
}

/// `v` rounded up to a multiple of `align` (a power of two up to 128).
const fn align_up(v: usize, align: usize) -> usize {
    (v + align - 1) & !(align - 1)
}

// ---------------------------------------------------------------------------------------------
// Little-endian helpers on byte slices whose length the caller has checked.

fn le16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn le64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}
fn put16(b: &mut [u8], o: usize, v: u16) {
    b[o..o + 2].copy_from_slice(&v.to_le_bytes());
}
fn put32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_le_bytes());
}
fn put64(b: &mut [u8], o: usize, v: u64) {
    b[o..o + 8].copy_from_slice(&v.to_le_bytes());
}

/// The 64-byte command from its wire form.
pub fn sqe_from_bytes(b: &[u8; 64]) -> Sqe {
    Sqe {
        cdw0: le32(b, 0),
        nsid: le32(b, 4),
        cdw2: le32(b, 8),
        cdw3: le32(b, 12),
        mptr: le64(b, 16),
        prp1: le64(b, 24),
        prp2: le64(b, 32),
        cdw10: le32(b, 40),
        cdw11: le32(b, 44),
        cdw12: le32(b, 48),
        cdw13: le32(b, 52),
        cdw14: le32(b, 56),
        cdw15: le32(b, 60),
    }
}

/// The wire form of a command.
pub fn sqe_to_bytes(s: &Sqe, b: &mut [u8]) {
    put32(b, 0, s.cdw0);
    put32(b, 4, s.nsid);
    put32(b, 8, s.cdw2);
    put32(b, 12, s.cdw3);
    put64(b, 16, s.mptr);
    put64(b, 24, s.prp1);
    put64(b, 32, s.prp2);
    put32(b, 40, s.cdw10);
    put32(b, 44, s.cdw11);
    put32(b, 48, s.cdw12);
    put32(b, 52, s.cdw13);
    put32(b, 56, s.cdw14);
    put32(b, 60, s.cdw15);
}

/// A completion from its wire form.
pub fn cqe_from_bytes(b: &[u8]) -> Cqe {
    Cqe {
        dw0: le32(b, 0),
        dw1: le32(b, 4),
        sq_head: le16(b, 8),
        sq_id: le16(b, 10),
        cid: le16(b, 12),
        status: le16(b, 14),
    }
}

/// The wire form of a completion.
pub fn cqe_to_bytes(c: &Cqe, b: &mut [u8]) {
    put32(b, 0, c.dw0);
    put32(b, 4, c.dw1);
    put16(b, 8, c.sq_head);
    put16(b, 10, c.sq_id);
    put16(b, 12, c.cid);
    put16(b, 14, c.status);
}

// ---------------------------------------------------------------------------------------------
// Encoding.

/// An encoded PDU header: common header, type-specific header, header digest, padding up to
/// PDO. The data (if any) and its digest are sent after it from the caller's buffer.
#[derive(Clone)]
pub struct EncodedHdr {
    bytes: [u8; MAX_ENC],
    len: usize,
}

impl core::fmt::Debug for EncodedHdr {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "EncodedHdr({:02x?})", self.as_bytes())
    }
}

impl EncodedHdr {
    /// The bytes to send.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
    /// Mutable bytes (tests corrupt headers with it).
    #[cfg(test)]
    pub fn as_mut_bytes(&mut self) -> &mut [u8] {
        &mut self.bytes[..self.len]
    }
}

/// Encodes `pdu` followed by `data_len` bytes of data.
///
/// `digests` are the connection's (ignored for the PDU types that never carry them); `pda` is
/// the data alignment the receiver asked for (0's based dwords, at most [`MAX_PDA`]). The
/// header digest is computed here; the data digest, over the data, is the caller's (see
/// [`crc32c`]), sent after the data when `digests.data` and `data_len > 0`.
pub fn encode(pdu: &Pdu, data_len: u32, digests: Digests, pda: u8) -> EncodedHdr {
    let ty = pdu.type_byte();
    let hlen = hlen_of(ty).unwrap_or(CH_LEN);
    let dg = if undigested(ty) {
        Digests::default()
    } else {
        digests
    };
    let hd = if dg.header { DIGEST_LEN } else { 0 };
    let has_data = data_len > 0;
    let pdo = if has_data {
        if undigested(ty) {
            hlen
        } else {
            align_up(hlen + hd, (pda.min(MAX_PDA) as usize + 1) * 4)
        }
    } else {
        0
    };
    let dd = if dg.data && has_data { DIGEST_LEN } else { 0 };
    let plen = if has_data {
        pdo as u64 + data_len as u64 + dd as u64
    } else {
        (hlen + hd) as u64
    };
    let mut e = EncodedHdr {
        bytes: [0; MAX_ENC],
        len: if has_data { pdo } else { hlen + hd },
    };
    let b = &mut e.bytes;
    let mut fl = 0u8;
    if dg.header {
        fl |= flags::HDGST;
    }
    if dd != 0 {
        fl |= flags::DDGST;
    }
    match pdu {
        Pdu::IcReq(r) => {
            put16(b, 8, r.pfv);
            b[10] = r.hpda;
            b[11] = r.digests.bits();
            put32(b, 12, r.maxr2t);
        }
        Pdu::IcResp(r) => {
            put16(b, 8, r.pfv);
            b[10] = r.cpda;
            b[11] = r.digests.bits();
            put32(b, 12, r.maxh2cdata);
        }
        Pdu::H2cTermReq(t) | Pdu::C2hTermReq(t) => {
            put16(b, 8, t.fes.to_u16());
            put32(b, 10, t.fei);
        }
        Pdu::CapsuleCmd(sqe, _) => sqe_to_bytes(sqe, &mut b[8..72]),
        Pdu::CapsuleResp(cqe) => cqe_to_bytes(cqe, &mut b[8..24]),
        Pdu::H2cData(d) | Pdu::C2hData(d) => {
            if d.last {
                fl |= flags::LAST;
            }
            if d.success {
                fl |= flags::SUCCESS;
            }
            put16(b, 8, d.cccid);
            put16(b, 10, d.ttag);
            put32(b, 12, d.offset);
            put32(b, 16, d.len);
        }
        Pdu::R2t(r) => {
            put16(b, 8, r.cccid);
            put16(b, 10, r.ttag);
            put32(b, 12, r.offset);
            put32(b, 16, r.len);
        }
    }
    b[0] = ty;
    b[1] = fl;
    b[2] = hlen as u8;
    b[3] = pdo as u8;
    put32(b, 4, u32::try_from(plen).unwrap_or(u32::MAX));
    if hd != 0 {
        let c = crc32c(&b[..hlen]);
        put32(b, hlen, c);
    }
    e
}

// ---------------------------------------------------------------------------------------------
// Decoding.

/// Which side of the connection receives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The controller (receives host-to-controller PDUs).
    Controller,
    /// The host (receives controller-to-host PDUs).
    Host,
}

/// What the receiver accepts; set at connection start and updated after ICReq/ICResp.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecvConfig {
    /// The receiving side.
    pub role: Role,
    /// ICReq/ICResp exchanged: every other PDU is a sequence error before, ICReq/ICResp after.
    pub ic_done: bool,
    /// Negotiated digests.
    pub digests: Digests,
    /// The data alignment the sender must use (0's based dwords): CPDA for a controller,
    /// HPDA for a host.
    pub pda: u8,
    /// Largest in-capsule data of a command capsule (controller side).
    pub max_incapsule: u32,
    /// Largest H2CData (controller side, our MAXH2CDATA) or C2HData (host side) payload.
    pub max_data: u32,
}

impl RecvConfig {
    /// Before ICReq/ICResp: no digests, no alignment.
    pub const fn new(role: Role) -> RecvConfig {
        RecvConfig {
            role,
            ic_done: false,
            digests: Digests {
                header: false,
                data: false,
            },
            pda: 0,
            max_incapsule: 0,
            max_data: MAX_PDU_DATA,
        }
    }
}

/// A validated common header: what the rest of the PDU looks like.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommonHdr {
    /// Type.
    pub ty: u8,
    /// Flags.
    pub flags: u8,
    /// Header length.
    pub hlen: usize,
    /// Header digest present.
    pub hdgst: bool,
    /// Data digest present.
    pub ddgst: bool,
    /// Padding between header digest and data.
    pub pad: usize,
    /// Data length.
    pub data_len: u32,
}

/// Validates the 8-byte common header against the receiver's state.
pub fn check_common(ch: &[u8; CH_LEN], cfg: &RecvConfig) -> Result<CommonHdr, FatalError> {
    let (ty, fl, hlen, pdo) = (ch[0], ch[1], ch[2] as usize, ch[3] as usize);
    let plen = le32(ch, 4) as u64;
    let ours = match cfg.role {
        Role::Controller => matches!(
            ty,
            pdu_type::IC_REQ | pdu_type::H2C_TERM_REQ | pdu_type::CAPSULE_CMD | pdu_type::H2C_DATA
        ),
        Role::Host => matches!(
            ty,
            pdu_type::IC_RESP
                | pdu_type::C2H_TERM_REQ
                | pdu_type::CAPSULE_RESP
                | pdu_type::C2H_DATA
                | pdu_type::R2T
        ),
    };
    let Some(want_hlen) = hlen_of(ty).filter(|_| ours) else {
        return Err(FatalError::field(
            field::TYPE,
            "unknown PDU type for this direction",
        ));
    };
    let is_ic = matches!(ty, pdu_type::IC_REQ | pdu_type::IC_RESP);
    let is_term = matches!(ty, pdu_type::H2C_TERM_REQ | pdu_type::C2H_TERM_REQ);
    if !cfg.ic_done && !is_ic && !is_term {
        return Err(FatalError::new(
            Fes::SequenceError,
            "PDU before the connection was initialized (ICReq/ICResp)",
        ));
    }
    if cfg.ic_done && is_ic {
        return Err(FatalError::new(
            Fes::SequenceError,
            "a second ICReq/ICResp on an initialized connection",
        ));
    }
    if hlen != want_hlen {
        return Err(FatalError::field(
            field::HLEN,
            "HLEN is not the length of this PDU type",
        ));
    }
    if is_ic || is_term {
        // No digests, no flags; TermReqs carry the offending header as data, PDO = HLEN.
        if fl != 0 {
            return Err(FatalError::field(
                field::FLAGS,
                "flags set on an ICReq/ICResp/TermReq",
            ));
        }
        if is_ic {
            if pdo != 0 {
                return Err(FatalError::field(
                    field::PDO,
                    "PDO set on a PDU without data",
                ));
            }
            if plen != hlen as u64 {
                return Err(FatalError::field(
                    field::PLEN,
                    "PLEN of an ICReq/ICResp is not 128",
                ));
            }
            return Ok(CommonHdr {
                ty,
                flags: fl,
                hlen,
                hdgst: false,
                ddgst: false,
                pad: 0,
                data_len: 0,
            });
        }
        if plen < hlen as u64 || plen > (hlen + MAX_TERM_DATA) as u64 {
            return Err(FatalError::field(
                field::PLEN,
                "PLEN of a TermReq out of 24..=152",
            ));
        }
        let data_len = (plen - hlen as u64) as u32;
        if data_len > 0 && pdo != hlen && pdo != 0 {
            return Err(FatalError::field(
                field::PDO,
                "PDO of a TermReq is not HLEN",
            ));
        }
        return Ok(CommonHdr {
            ty,
            flags: fl,
            hlen,
            hdgst: false,
            ddgst: false,
            pad: 0,
            data_len,
        });
    }
    let allowed = match ty {
        pdu_type::H2C_DATA => flags::HDGST | flags::DDGST | flags::LAST,
        pdu_type::C2H_DATA => flags::HDGST | flags::DDGST | flags::LAST | flags::SUCCESS,
        _ => flags::HDGST | flags::DDGST,
    };
    if fl & !allowed != 0 {
        return Err(FatalError::field(
            field::FLAGS,
            "reserved flag set for this PDU type",
        ));
    }
    if fl & flags::SUCCESS != 0 && fl & flags::LAST == 0 {
        return Err(FatalError::field(field::FLAGS, "SUCCESS without LAST_PDU"));
    }
    let hdgst = fl & flags::HDGST != 0;
    if hdgst != cfg.digests.header {
        return Err(FatalError::field(
            field::FLAGS,
            "HDGSTF does not match the negotiated header digest",
        ));
    }
    let hd = if hdgst { DIGEST_LEN } else { 0 };
    let may_have_data = matches!(
        ty,
        pdu_type::CAPSULE_CMD | pdu_type::H2C_DATA | pdu_type::C2H_DATA
    );
    let must_have_data = matches!(ty, pdu_type::H2C_DATA | pdu_type::C2H_DATA);
    let no_data = pdo == 0 && plen == (hlen + hd) as u64;
    if !may_have_data || no_data {
        if must_have_data {
            return Err(FatalError::field(field::PDO, "a data PDU without data"));
        }
        if pdo != 0 {
            return Err(FatalError::field(
                field::PDO,
                "PDO set on a PDU without data",
            ));
        }
        if plen != (hlen + hd) as u64 {
            return Err(FatalError::field(
                field::PLEN,
                "PLEN does not match HLEN and digest",
            ));
        }
        if fl & flags::DDGST != 0 {
            return Err(FatalError::field(
                field::FLAGS,
                "DDGSTF set on a PDU without data",
            ));
        }
        return Ok(CommonHdr {
            ty,
            flags: fl,
            hlen,
            hdgst,
            ddgst: false,
            pad: 0,
            data_len: 0,
        });
    }
    if pdo == 0 && !must_have_data {
        return Err(FatalError::field(
            field::PLEN,
            "PLEN does not match HLEN and digest",
        ));
    }
    let want_pdo = align_up(hlen + hd, (cfg.pda.min(MAX_PDA) as usize + 1) * 4);
    if pdo != want_pdo {
        return Err(FatalError::field(
            field::PDO,
            "PDO is not the header (and digest) length aligned to the PDU data alignment",
        ));
    }
    let ddgst = fl & flags::DDGST != 0;
    if ddgst != cfg.digests.data {
        return Err(FatalError::field(
            field::FLAGS,
            "DDGSTF does not match the negotiated data digest",
        ));
    }
    let dd = if ddgst { DIGEST_LEN as u64 } else { 0 };
    if plen == (hlen + hd) as u64 {
        return Err(FatalError::field(
            field::PDO,
            "PDO set on a PDU without data",
        ));
    }
    if plen <= pdo as u64 + dd {
        return Err(FatalError::field(
            field::PLEN,
            "PLEN leaves no room for the data",
        ));
    }
    let data_len = plen - pdo as u64 - dd;
    let limit = match ty {
        pdu_type::CAPSULE_CMD => cfg.max_incapsule,
        _ => cfg.max_data,
    };
    if data_len > limit as u64 {
        return Err(FatalError {
            fes: Fes::DataLimitExceeded,
            fei: field::PLEN,
            what: "PDU data larger than the negotiated limit",
        });
    }
    Ok(CommonHdr {
        ty,
        flags: fl,
        hlen,
        hdgst,
        ddgst,
        pad: pdo - (hlen + hd),
        data_len: data_len as u32,
    })
}

/// Parses the type-specific header (`hdr` holds HLEN bytes) once the common header passed
/// [`check_common`] and the header digest matched.
pub fn parse_header(ch: &CommonHdr, hdr: &[u8]) -> Result<Pdu, FatalError> {
    let h = &hdr[..ch.hlen];
    Ok(match ch.ty {
        pdu_type::IC_REQ | pdu_type::IC_RESP => {
            let pfv = le16(h, 8);
            if pfv != 0 {
                return Err(FatalError {
                    fes: Fes::UnsupportedParameter,
                    fei: field::PFV,
                    what: "unsupported PDU format version",
                });
            }
            let pda = h[10];
            if pda > MAX_PDA {
                return Err(FatalError::field(field::PDA, "PDU data alignment above 31"));
            }
            if h[11] & !3 != 0 {
                return Err(FatalError::field(
                    field::DGST,
                    "reserved digest type bits set",
                ));
            }
            let digests = Digests::from_bits(h[11]);
            let v = le32(h, 12);
            if ch.ty == pdu_type::IC_REQ {
                Pdu::IcReq(IcReq {
                    pfv,
                    hpda: pda,
                    digests,
                    maxr2t: v,
                })
            } else {
                if v < 4096 || v % 4 != 0 {
                    return Err(FatalError::field(
                        field::MAXDATA,
                        "MAXH2CDATA below 4096 or not a multiple of 4",
                    ));
                }
                Pdu::IcResp(IcResp {
                    pfv,
                    cpda: pda,
                    digests,
                    maxh2cdata: v,
                })
            }
        }
        pdu_type::H2C_TERM_REQ | pdu_type::C2H_TERM_REQ => {
            let t = TermReq {
                fes: Fes::from_u16(le16(h, 8)),
                fei: le32(h, 10),
            };
            if ch.ty == pdu_type::H2C_TERM_REQ {
                Pdu::H2cTermReq(t)
            } else {
                Pdu::C2hTermReq(t)
            }
        }
        pdu_type::CAPSULE_CMD => {
            let mut a = [0u8; 64];
            a.copy_from_slice(&h[8..72]);
            Pdu::CapsuleCmd(sqe_from_bytes(&a), ch.data_len)
        }
        pdu_type::CAPSULE_RESP => Pdu::CapsuleResp(cqe_from_bytes(&h[8..24])),
        pdu_type::H2C_DATA | pdu_type::C2H_DATA => {
            let d = DataHdr {
                cccid: le16(h, 8),
                ttag: le16(h, 10),
                offset: le32(h, 12),
                len: le32(h, 16),
                last: ch.flags & flags::LAST != 0,
                success: ch.flags & flags::SUCCESS != 0,
            };
            if d.len != ch.data_len {
                return Err(FatalError::field(
                    field::DATAL,
                    "DATAL does not match the PDU's data length",
                ));
            }
            if d.offset.checked_add(d.len).is_none() {
                return Err(FatalError::new(
                    Fes::DataOutOfRange,
                    "DATAO + DATAL overflows",
                ));
            }
            if ch.ty == pdu_type::H2C_DATA {
                Pdu::H2cData(d)
            } else {
                Pdu::C2hData(d)
            }
        }
        pdu_type::R2T => {
            let r = R2t {
                cccid: le16(h, 8),
                ttag: le16(h, 10),
                offset: le32(h, 12),
                len: le32(h, 16),
            };
            if r.len == 0 {
                return Err(FatalError::field(field::DATAL, "R2T of zero length"));
            }
            Pdu::R2t(r)
        }
        _ => return Err(FatalError::field(field::TYPE, "unknown PDU type")),
    })
}

/// A per-connection staging buffer between the socket and the decoder.
///
/// Small reads (headers, short data) are served from one large `read` into the staging
/// buffer; a large data destination with nothing staged is read into directly, so payloads
/// land in their DMA buffer with no copy beyond the socket's own.
pub struct RxBuf {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl core::fmt::Debug for RxBuf {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "RxBuf({} staged)", self.end - self.start)
    }
}

/// A destination at least this long is read into directly when nothing is staged.
const DIRECT_MIN: usize = 1024;

impl RxBuf {
    /// A staging buffer of `cap` bytes (at least [`MAX_HDR`]).
    pub fn new(cap: usize) -> RxBuf {
        RxBuf {
            buf: vec![0u8; cap.max(MAX_HDR)].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }
    /// Reads into `dst` (at most `dst.len()` bytes, at least one unless the source has none).
    /// `Ok(0)` means the peer closed the stream; `WouldBlock` is passed through.
    pub fn read_into<R: Read + ?Sized>(
        &mut self,
        src: &mut R,
        dst: &mut [u8],
    ) -> io::Result<usize> {
        if dst.is_empty() {
            return Ok(0);
        }
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            if dst.len() >= DIRECT_MIN {
                return read_retry(src, dst);
            }
            let n = read_retry(src, &mut self.buf)?;
            if n == 0 {
                return Ok(0);
            }
            self.end = n;
        }
        let n = dst.len().min(self.end - self.start);
        dst[..n].copy_from_slice(&self.buf[self.start..self.start + n]);
        self.start += n;
        Ok(n)
    }
}

fn read_retry<R: Read + ?Sized>(src: &mut R, dst: &mut [u8]) -> io::Result<usize> {
    loop {
        match src.read(dst) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

/// Why receiving stopped.
#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    /// The peer violated the protocol: send a TermReq with this status and close.
    #[error(transparent)]
    Fatal(#[from] FatalError),
    /// The peer closed the connection.
    #[error("the peer closed the connection")]
    Closed,
    /// The socket failed.
    #[error("failed to read from the socket: {0}")]
    Io(#[source] io::Error),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Collecting the common header.
    Common,
    /// Collecting the rest of the header and its digest.
    Rest,
    /// Header delivered; padding, data and data digest to go.
    Data,
    /// A fatal error was reported; nothing more is read.
    Failed,
}

/// The incremental PDU decoder of one connection.
///
/// Call [`poll_header`](Self::poll_header) until it yields a PDU; if the PDU has data
/// ([`data_len`](Self::data_len) > 0), call [`poll_data`](Self::poll_data) (or
/// [`poll_discard`](Self::poll_discard)) until it reports the end of the PDU. Each call reads
/// what the stream has and returns `Ok(None)` when it would block.
#[derive(Debug)]
pub struct PduReader {
    /// What the receiver accepts.
    pub cfg: RecvConfig,
    hdr: [u8; MAX_HDR],
    got: usize,
    ch: Option<CommonHdr>,
    phase: Phase,
    pad_left: usize,
    data_got: u32,
    crc: u32,
    ddgst: [u8; DIGEST_LEN],
    ddgst_got: usize,
}

impl PduReader {
    /// A decoder for a fresh connection.
    pub fn new(cfg: RecvConfig) -> PduReader {
        PduReader {
            cfg,
            hdr: [0; MAX_HDR],
            got: 0,
            ch: None,
            phase: Phase::Common,
            pad_left: 0,
            data_got: 0,
            crc: 0,
            ddgst: [0; DIGEST_LEN],
            ddgst_got: 0,
        }
    }

    /// The raw header of the current (or failed) PDU, as received so far (a TermReq carries
    /// it back to the sender).
    pub fn raw_header(&self) -> &[u8] {
        &self.hdr[..self.got]
    }

    /// Data length of the PDU whose header was delivered last (0 between PDUs).
    #[cfg(test)]
    pub fn data_len(&self) -> u32 {
        match (self.phase, self.ch) {
            (Phase::Data, Some(ch)) => ch.data_len,
            _ => 0,
        }
    }

    fn fail(&mut self, e: FatalError) -> RecvError {
        self.phase = Phase::Failed;
        RecvError::Fatal(e)
    }

    /// Reads header bytes; `Ok(Some(pdu))` once a whole header arrived and checked out.
    pub fn poll_header<R: Read + ?Sized>(
        &mut self,
        rx: &mut RxBuf,
        src: &mut R,
    ) -> Result<Option<Pdu>, RecvError> {
        loop {
            match self.phase {
                Phase::Failed => {
                    return Err(RecvError::Fatal(FatalError::new(
                        Fes::SequenceError,
                        "the connection already failed",
                    )));
                }
                Phase::Data => {
                    return Err(RecvError::Fatal(FatalError::new(
                        Fes::SequenceError,
                        "header asked for while PDU data is pending",
                    )));
                }
                Phase::Common | Phase::Rest => {}
            }
            let want = match self.ch {
                None => CH_LEN,
                Some(ch) => ch.hlen + if ch.hdgst { DIGEST_LEN } else { 0 },
            };
            if self.got < want {
                let n = match rx.read_into(src, &mut self.hdr[self.got..want]) {
                    Ok(0) => return Err(RecvError::Closed),
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                    Err(e) => return Err(RecvError::Io(e)),
                };
                self.got += n;
                if self.got < want {
                    continue;
                }
            }
            match self.ch {
                None => {
                    let mut c = [0u8; CH_LEN];
                    c.copy_from_slice(&self.hdr[..CH_LEN]);
                    match check_common(&c, &self.cfg) {
                        Ok(ch) => {
                            self.ch = Some(ch);
                            self.phase = Phase::Rest;
                        }
                        Err(e) => return Err(self.fail(e)),
                    }
                }
                Some(ch) => {
                    if ch.hdgst {
                        let want_crc = crc32c(&self.hdr[..ch.hlen]);
                        if le32(&self.hdr, ch.hlen) != want_crc {
                            return Err(self.fail(FatalError::new(
                                Fes::HeaderDigest,
                                "header digest mismatch",
                            )));
                        }
                    }
                    let pdu = match parse_header(&ch, &self.hdr) {
                        Ok(p) => p,
                        Err(e) => return Err(self.fail(e)),
                    };
                    if ch.data_len == 0 {
                        self.reset();
                    } else {
                        self.phase = Phase::Data;
                        self.pad_left = ch.pad;
                        self.data_got = 0;
                        self.crc = 0;
                        self.ddgst_got = 0;
                    }
                    return Ok(Some(pdu));
                }
            }
        }
    }

    fn reset(&mut self) {
        self.got = 0;
        self.ch = None;
        self.phase = Phase::Common;
    }

    /// Reads the data of the current PDU into `dst` (exactly [`data_len`](Self::data_len)
    /// bytes long). `Ok(Some(digest_ok))` at the end of the PDU (`true` without data digest);
    /// a data digest mismatch is not fatal: the caller fails the command.
    pub fn poll_data<R: Read + ?Sized>(
        &mut self,
        rx: &mut RxBuf,
        src: &mut R,
        dst: &mut [u8],
    ) -> Result<Option<bool>, RecvError> {
        self.poll_data_inner(rx, src, Some(dst))
    }

    /// Like [`poll_data`](Self::poll_data) but throws the data away.
    pub fn poll_discard<R: Read + ?Sized>(
        &mut self,
        rx: &mut RxBuf,
        src: &mut R,
    ) -> Result<Option<bool>, RecvError> {
        self.poll_data_inner(rx, src, None)
    }

    fn poll_data_inner<R: Read + ?Sized>(
        &mut self,
        rx: &mut RxBuf,
        src: &mut R,
        mut dst: Option<&mut [u8]>,
    ) -> Result<Option<bool>, RecvError> {
        let Some(ch) = self.ch.filter(|_| self.phase == Phase::Data) else {
            return Err(RecvError::Fatal(FatalError::new(
                Fes::SequenceError,
                "no PDU data pending",
            )));
        };
        if let Some(d) = dst.as_deref()
            && d.len() != ch.data_len as usize
        {
            return Err(RecvError::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                "data destination length differs from the PDU's data length",
            )));
        }
        let io = |r: io::Result<usize>| -> Result<Option<usize>, RecvError> {
            match r {
                Ok(0) => Err(RecvError::Closed),
                Ok(n) => Ok(Some(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
                Err(e) => Err(RecvError::Io(e)),
            }
        };
        let mut scratch = [0u8; 512];
        while self.pad_left > 0 {
            let n = self.pad_left.min(scratch.len());
            let Some(n) = io(rx.read_into(src, &mut scratch[..n]))? else {
                return Ok(None);
            };
            self.pad_left -= n;
        }
        while self.data_got < ch.data_len {
            let from = self.data_got as usize;
            let left = ch.data_len as usize - from;
            let got = match dst.as_deref_mut() {
                Some(d) => {
                    let Some(n) = io(rx.read_into(src, &mut d[from..]))? else {
                        return Ok(None);
                    };
                    if ch.ddgst {
                        self.crc = crc32c_append(self.crc, &d[from..from + n]);
                    }
                    n
                }
                None => {
                    let k = left.min(scratch.len());
                    let Some(n) = io(rx.read_into(src, &mut scratch[..k]))? else {
                        return Ok(None);
                    };
                    if ch.ddgst {
                        self.crc = crc32c_append(self.crc, &scratch[..n]);
                    }
                    n
                }
            };
            self.data_got += got as u32;
        }
        let mut ok = true;
        if ch.ddgst {
            while self.ddgst_got < DIGEST_LEN {
                let mut tmp = [0u8; DIGEST_LEN];
                let k = DIGEST_LEN - self.ddgst_got;
                let Some(n) = io(rx.read_into(src, &mut tmp[..k]))? else {
                    return Ok(None);
                };
                self.ddgst[self.ddgst_got..self.ddgst_got + n].copy_from_slice(&tmp[..n]);
                self.ddgst_got += n;
            }
            ok = u32::from_le_bytes(self.ddgst) == self.crc;
        }
        self.reset();
        Ok(Some(ok))
    }
}

#[cfg(test)]
mod tests;
