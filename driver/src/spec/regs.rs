//! Controller registers (NVMe 1.4 section 3.1): offsets in BAR0 and typed views of the values.
//!
//! Each register is a newtype over its raw value with accessors named after the specification's
//! fields. Multi-bit fields are plain integers; the values are never interpreted as references
//! into device memory (the bus reads and writes them with volatile accesses).

/// Byte offsets of the controller registers in BAR0.
pub mod offset {
    /// Controller Capabilities (64-bit).
    pub const CAP: u32 = 0x00;
    /// Version.
    pub const VS: u32 = 0x08;
    /// Interrupt Mask Set.
    pub const INTMS: u32 = 0x0c;
    /// Interrupt Mask Clear.
    pub const INTMC: u32 = 0x10;
    /// Controller Configuration.
    pub const CC: u32 = 0x14;
    /// Controller Status.
    pub const CSTS: u32 = 0x1c;
    /// NVM Subsystem Reset.
    pub const NSSR: u32 = 0x20;
    /// Admin Queue Attributes.
    pub const AQA: u32 = 0x24;
    /// Admin Submission Queue Base Address (64-bit).
    pub const ASQ: u32 = 0x28;
    /// Admin Completion Queue Base Address (64-bit).
    pub const ACQ: u32 = 0x30;
    /// Controller Memory Buffer Location.
    pub const CMBLOC: u32 = 0x38;
    /// Controller Memory Buffer Size.
    pub const CMBSZ: u32 = 0x3c;
    /// First doorbell (admin SQ tail).
    pub const DOORBELLS: u32 = 0x1000;
}

/// Offset of doorbell number `index` (2 × qid for an SQ tail, 2 × qid + 1 for a CQ head) for a
/// doorbell stride `CAP.DSTRD`, or `None` if it does not fit the 32-bit register space (a large
/// stride times a large queue id) or the stride is not a 4-bit CAP.DSTRD value.
#[inline]
const fn checked_doorbell(index: u32, dstrd: u8) -> Option<u32> {
    if dstrd > 15 {
        return None;
    }
    match index.checked_mul(4 << dstrd) {
        Some(o) => o.checked_add(offset::DOORBELLS),
        None => None,
    }
}

/// Offset of the submission queue `qid` tail doorbell, for a doorbell stride `CAP.DSTRD`, or
/// `None` if it overflows (see [`checked_cq_head_doorbell`]).
#[inline]
pub const fn checked_sq_tail_doorbell(qid: u16, dstrd: u8) -> Option<u32> {
    checked_doorbell(2 * qid as u32, dstrd)
}

/// Offset of the completion queue `qid` head doorbell, for a doorbell stride `CAP.DSTRD`, or
/// `None` if it does not fit in 32 bits: CAP.DSTRD comes from the device, and a queue whose
/// doorbell cannot be addressed must not be created.
#[inline]
pub const fn checked_cq_head_doorbell(qid: u16, dstrd: u8) -> Option<u32> {
    checked_doorbell(2 * qid as u32 + 1, dstrd)
}

/// Offset of the submission queue `qid` tail doorbell, for a doorbell stride `CAP.DSTRD`.
///
/// # Panics
///
/// If the offset overflows 32 bits; use [`checked_sq_tail_doorbell`] for device-supplied values.
#[inline]
pub const fn sq_tail_doorbell(qid: u16, dstrd: u8) -> u32 {
    match checked_sq_tail_doorbell(qid, dstrd) {
        Some(o) => o,
        None => panic!("SQ tail doorbell offset overflows 32 bits"),
    }
}

/// Offset of the completion queue `qid` head doorbell, for a doorbell stride `CAP.DSTRD`.
///
/// # Panics
///
/// If the offset overflows 32 bits; use [`checked_cq_head_doorbell`] for device-supplied values.
#[inline]
pub const fn cq_head_doorbell(qid: u16, dstrd: u8) -> u32 {
    match checked_cq_head_doorbell(qid, dstrd) {
        Some(o) => o,
        None => panic!("CQ head doorbell offset overflows 32 bits"),
    }
}

#[inline]
const fn bits64(v: u64, lo: u32, width: u32) -> u64 {
    (v >> lo) & ((1u64 << width) - 1)
}

#[inline]
const fn bits32(v: u32, lo: u32, width: u32) -> u32 {
    (v >> lo) & ((1u32 << width) - 1)
}

#[inline]
const fn set32(v: u32, lo: u32, width: u32, field: u32) -> u32 {
    let mask = ((1u32 << width) - 1) << lo;
    (v & !mask) | ((field << lo) & mask)
}

/// CAP: Controller Capabilities.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Cap(pub u64);

impl Cap {
    /// MQES: maximum queue entries supported, **0's based** (the raw field).
    pub const fn mqes(self) -> u16 {
        bits64(self.0, 0, 16) as u16
    }
    /// Maximum entries of one I/O queue (MQES + 1).
    pub const fn max_queue_entries(self) -> u32 {
        self.mqes() as u32 + 1
    }
    /// CQR: contiguous queues required.
    pub const fn cqr(self) -> bool {
        bits64(self.0, 16, 1) != 0
    }
    /// AMS: arbitration mechanisms supported.
    pub const fn ams(self) -> u8 {
        bits64(self.0, 17, 2) as u8
    }
    /// TO: worst-case time for CSTS.RDY to change, in 500 ms units.
    pub const fn to(self) -> u8 {
        bits64(self.0, 24, 8) as u8
    }
    /// CAP.TO in milliseconds.
    pub const fn timeout_ms(self) -> u64 {
        self.to() as u64 * 500
    }
    /// DSTRD: doorbell stride, as the exponent (stride = 4 << DSTRD bytes).
    pub const fn dstrd(self) -> u8 {
        bits64(self.0, 32, 4) as u8
    }
    /// NSSRS: NVM subsystem reset supported.
    pub const fn nssrs(self) -> bool {
        bits64(self.0, 36, 1) != 0
    }
    /// CSS: command sets supported (bit 0: NVM command set).
    pub const fn css(self) -> u8 {
        bits64(self.0, 37, 8) as u8
    }
    /// BPS: boot partition support.
    pub const fn bps(self) -> bool {
        bits64(self.0, 45, 1) != 0
    }
    /// MPSMIN: minimum memory page size is 2 ^ (12 + MPSMIN).
    pub const fn mpsmin(self) -> u8 {
        bits64(self.0, 48, 4) as u8
    }
    /// MPSMAX: maximum memory page size is 2 ^ (12 + MPSMAX).
    pub const fn mpsmax(self) -> u8 {
        bits64(self.0, 52, 4) as u8
    }
    /// PMRS: persistent memory region supported.
    pub const fn pmrs(self) -> bool {
        bits64(self.0, 56, 1) != 0
    }
    /// CMBS: controller memory buffer supported.
    pub const fn cmbs(self) -> bool {
        bits64(self.0, 57, 1) != 0
    }
    /// Minimum memory page size in bytes.
    pub const fn min_page_size(self) -> usize {
        super::PAGE_SIZE << self.mpsmin()
    }
    /// Builds a CAP value from its fields (used by the emulated controller).
    pub const fn build(mqes: u16, cqr: bool, to: u8, dstrd: u8, mpsmin: u8, mpsmax: u8) -> Cap {
        Cap(mqes as u64
            | (cqr as u64) << 16
            | (to as u64) << 24
            | ((dstrd & 0xf) as u64) << 32
            | 1u64 << 37 // CSS: NVM command set
            | ((mpsmin & 0xf) as u64) << 48
            | ((mpsmax & 0xf) as u64) << 52)
    }
}

impl core::fmt::Debug for Cap {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Cap")
            .field("raw", &format_args!("{:#018x}", self.0))
            .field("mqes", &self.mqes())
            .field("cqr", &self.cqr())
            .field("to", &self.to())
            .field("dstrd", &self.dstrd())
            .field("mpsmin", &self.mpsmin())
            .field("mpsmax", &self.mpsmax())
            .finish()
    }
}

/// VS: Version.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Vs(pub u32);

impl Vs {
    /// NVMe 1.4.0.
    pub const V1_4: Vs = Vs(0x0001_0400);
    /// Major version.
    pub const fn major(self) -> u16 {
        (self.0 >> 16) as u16
    }
    /// Minor version.
    pub const fn minor(self) -> u8 {
        (self.0 >> 8) as u8
    }
    /// Tertiary version.
    pub const fn tertiary(self) -> u8 {
        self.0 as u8
    }
}

impl core::fmt::Display for Vs {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}.{}.{}", self.major(), self.minor(), self.tertiary())
    }
}

/// CC: Controller Configuration.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Cc(pub u32);

/// CC.SHN / CSTS.SHST values.
pub mod shn {
    /// No notification / normal operation.
    pub const NONE: u32 = 0;
    /// Normal shutdown notification.
    pub const NORMAL: u32 = 1;
    /// Abrupt shutdown notification.
    pub const ABRUPT: u32 = 2;
}

/// CSTS.SHST values.
pub mod shst {
    /// Normal operation.
    pub const NORMAL: u32 = 0;
    /// Shutdown processing occurring.
    pub const OCCURRING: u32 = 1;
    /// Shutdown processing complete.
    pub const COMPLETE: u32 = 2;
}

impl Cc {
    /// EN: enable.
    pub const fn en(self) -> bool {
        self.0 & 1 != 0
    }
    /// CSS: I/O command set selected.
    pub const fn css(self) -> u32 {
        bits32(self.0, 4, 3)
    }
    /// MPS: memory page size is 2 ^ (12 + MPS).
    pub const fn mps(self) -> u32 {
        bits32(self.0, 7, 4)
    }
    /// AMS: arbitration mechanism selected.
    pub const fn ams(self) -> u32 {
        bits32(self.0, 11, 3)
    }
    /// SHN: shutdown notification.
    pub const fn shn(self) -> u32 {
        bits32(self.0, 14, 2)
    }
    /// IOSQES: I/O submission queue entry size, as a power of two.
    pub const fn iosqes(self) -> u32 {
        bits32(self.0, 16, 4)
    }
    /// IOCQES: I/O completion queue entry size, as a power of two.
    pub const fn iocqes(self) -> u32 {
        bits32(self.0, 20, 4)
    }
    /// With EN set or cleared.
    pub const fn with_en(self, en: bool) -> Cc {
        Cc(set32(self.0, 0, 1, en as u32))
    }
    /// With CSS set.
    pub const fn with_css(self, css: u32) -> Cc {
        Cc(set32(self.0, 4, 3, css))
    }
    /// With MPS set.
    pub const fn with_mps(self, mps: u32) -> Cc {
        Cc(set32(self.0, 7, 4, mps))
    }
    /// With AMS set.
    pub const fn with_ams(self, ams: u32) -> Cc {
        Cc(set32(self.0, 11, 3, ams))
    }
    /// With SHN set.
    pub const fn with_shn(self, shn: u32) -> Cc {
        Cc(set32(self.0, 14, 2, shn))
    }
    /// With IOSQES set.
    pub const fn with_iosqes(self, v: u32) -> Cc {
        Cc(set32(self.0, 16, 4, v))
    }
    /// With IOCQES set.
    pub const fn with_iocqes(self, v: u32) -> Cc {
        Cc(set32(self.0, 20, 4, v))
    }
}

/// CSTS: Controller Status.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Csts(pub u32);

impl Csts {
    /// RDY: ready.
    pub const fn rdy(self) -> bool {
        self.0 & 1 != 0
    }
    /// CFS: controller fatal status.
    pub const fn cfs(self) -> bool {
        self.0 & 2 != 0
    }
    /// SHST: shutdown status.
    pub const fn shst(self) -> u32 {
        bits32(self.0, 2, 2)
    }
    /// NSSRO: NVM subsystem reset occurred.
    pub const fn nssro(self) -> bool {
        self.0 & 0x10 != 0
    }
    /// PP: processing paused.
    pub const fn pp(self) -> bool {
        self.0 & 0x20 != 0
    }
    /// True when the register reads all ones: the device is gone (surprise removal) or the
    /// link is down.
    pub const fn is_all_ones(self) -> bool {
        self.0 == u32::MAX
    }
    /// Builds a CSTS value (used by the emulated controller).
    pub const fn build(rdy: bool, cfs: bool, shst: u32) -> Csts {
        Csts(rdy as u32 | (cfs as u32) << 1 | (shst & 3) << 2)
    }
}

/// AQA: Admin Queue Attributes (sizes are 0's based).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Aqa(pub u32);

impl Aqa {
    /// AQA from entry counts (not 0's based).
    pub const fn new(sq_entries: u16, cq_entries: u16) -> Aqa {
        Aqa(((sq_entries - 1) as u32 & 0xfff) | ((cq_entries - 1) as u32 & 0xfff) << 16)
    }
    /// ASQS: admin SQ size, 0's based.
    pub const fn asqs(self) -> u16 {
        bits32(self.0, 0, 12) as u16
    }
    /// ACQS: admin CQ size, 0's based.
    pub const fn acqs(self) -> u16 {
        bits32(self.0, 16, 12) as u16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_fields_match_qemu_value() {
        // CAP read from QEMU's NVMe controller (HIL.md): MQES 2047, CQR, TO 15, DSTRD 0.
        let cap = Cap(0x0040_0820_0f01_07ff);
        assert_eq!(cap.mqes(), 2047);
        assert_eq!(cap.max_queue_entries(), 2048);
        assert!(cap.cqr());
        assert_eq!(cap.to(), 15);
        assert_eq!(cap.timeout_ms(), 7500);
        assert_eq!(cap.dstrd(), 0);
        assert_eq!(cap.css(), 0x41);
        assert_eq!(cap.mpsmin(), 0);
        assert_eq!(cap.mpsmax(), 4);
        assert!(!cap.cmbs());
        assert_eq!(cap.min_page_size(), 4096);
    }

    #[test]
    fn cap_build_round_trips() {
        let cap = Cap::build(1023, true, 20, 2, 0, 4);
        assert_eq!(
            (cap.mqes(), cap.cqr(), cap.to(), cap.dstrd()),
            (1023, true, 20, 2)
        );
        assert_eq!((cap.mpsmin(), cap.mpsmax(), cap.css()), (0, 4, 1));
    }

    #[test]
    fn doorbells_respect_stride() {
        assert_eq!(sq_tail_doorbell(0, 0), 0x1000);
        assert_eq!(cq_head_doorbell(0, 0), 0x1004);
        assert_eq!(sq_tail_doorbell(1, 0), 0x1008);
        assert_eq!(cq_head_doorbell(1, 0), 0x100c);
        assert_eq!(sq_tail_doorbell(1, 2), 0x1000 + 2 * 16);
        assert_eq!(cq_head_doorbell(3, 1), 0x1000 + 7 * 8);
    }

    #[test]
    fn hostile_stride_and_qid_overflow_is_none_not_a_panic() {
        // DSTRD 15 (128 KiB stride): qid 16383 still fits, qid 16384 and up do not.
        assert_eq!(
            checked_sq_tail_doorbell(1, 15),
            Some(0x1000 + 2 * (4 << 15))
        );
        assert_eq!(
            checked_cq_head_doorbell(16383, 15),
            Some(0x1000 + (2 * 16383 + 1) * (4 << 15))
        );
        assert_eq!(checked_sq_tail_doorbell(16384, 15), None);
        assert_eq!(checked_cq_head_doorbell(u16::MAX, 15), None);
        assert_eq!(checked_sq_tail_doorbell(u16::MAX, 15), None);
        // Small strides never overflow for any qid.
        assert!(checked_cq_head_doorbell(u16::MAX, 0).is_some());
        // A stride wider than CAP.DSTRD's 4 bits is refused, not shifted out.
        assert_eq!(checked_sq_tail_doorbell(1, 16), None);
        assert_eq!(checked_sq_tail_doorbell(1, 255), None);
    }

    #[test]
    fn cc_setters_are_independent() {
        let cc = Cc::default()
            .with_iosqes(6)
            .with_iocqes(4)
            .with_mps(0)
            .with_en(true);
        assert_eq!(cc.0, 0x0046_0001);
        assert_eq!(cc.with_shn(shn::NORMAL).shn(), shn::NORMAL);
        assert!(!cc.with_en(false).en());
        assert_eq!(cc.with_en(false).iosqes(), 6);
    }

    #[test]
    fn csts_and_aqa() {
        assert!(Csts(u32::MAX).is_all_ones());
        let c = Csts::build(true, true, shst::COMPLETE);
        assert!(c.rdy() && c.cfs());
        assert_eq!(c.shst(), shst::COMPLETE);
        let a = Aqa::new(32, 64);
        assert_eq!((a.asqs(), a.acqs()), (31, 63));
        assert_eq!(Vs::V1_4.to_string(), "1.4.0");
    }
}
