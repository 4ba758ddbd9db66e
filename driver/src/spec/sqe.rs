//! The 64-byte submission queue entry and the command builders (NVMe 1.4 section 4.2).

/// Admin command opcodes (NVMe 1.4 figure 139).
pub mod admin {
    /// Delete I/O Submission Queue.
    pub const DELETE_IO_SQ: u8 = 0x00;
    /// Create I/O Submission Queue.
    pub const CREATE_IO_SQ: u8 = 0x01;
    /// Get Log Page.
    pub const GET_LOG_PAGE: u8 = 0x02;
    /// Delete I/O Completion Queue.
    pub const DELETE_IO_CQ: u8 = 0x04;
    /// Create I/O Completion Queue.
    pub const CREATE_IO_CQ: u8 = 0x05;
    /// Identify.
    pub const IDENTIFY: u8 = 0x06;
    /// Abort.
    pub const ABORT: u8 = 0x08;
    /// Set Features.
    pub const SET_FEATURES: u8 = 0x09;
    /// Get Features.
    pub const GET_FEATURES: u8 = 0x0a;
    /// Asynchronous Event Request.
    pub const ASYNC_EVENT_REQUEST: u8 = 0x0c;
    /// Firmware Commit.
    pub const FIRMWARE_COMMIT: u8 = 0x10;
    /// Firmware Image Download.
    pub const FIRMWARE_DOWNLOAD: u8 = 0x11;
    /// Keep Alive.
    pub const KEEP_ALIVE: u8 = 0x18;
    /// Format NVM.
    pub const FORMAT_NVM: u8 = 0x80;
}

/// NVM command set I/O opcodes (NVMe 1.4 figure 346).
pub mod io {
    /// Flush.
    pub const FLUSH: u8 = 0x00;
    /// Write.
    pub const WRITE: u8 = 0x01;
    /// Read.
    pub const READ: u8 = 0x02;
    /// Write Uncorrectable.
    pub const WRITE_UNCORRECTABLE: u8 = 0x04;
    /// Compare.
    pub const COMPARE: u8 = 0x05;
    /// Write Zeroes.
    pub const WRITE_ZEROES: u8 = 0x08;
    /// Dataset Management.
    pub const DATASET_MANAGEMENT: u8 = 0x09;
}

/// Identify CNS values.
pub mod cns {
    /// Identify Namespace data structure for NSID.
    pub const NAMESPACE: u32 = 0x00;
    /// Identify Controller data structure.
    pub const CONTROLLER: u32 = 0x01;
    /// Active namespace ID list (NSIDs greater than NSID).
    pub const ACTIVE_NAMESPACES: u32 = 0x02;
    /// I/O command set specific Identify Controller data structure (CSI in CDW11 bits
    /// 31:24; 0 is the NVM command set: VSL, WZSL, WUSL, DMRL, DMRSL, DMSL).
    pub const CONTROLLER_CSI: u32 = 0x06;
}

/// Byte of WZSL (Write Zeroes Size Limit) in the NVM command set's Identify Controller
/// ([`cns::CONTROLLER_CSI`], CSI 0).
pub const NVM_ID_WZSL: usize = 1;

/// Feature identifiers.
pub mod fid {
    /// Arbitration.
    pub const ARBITRATION: u8 = 0x01;
    /// Power Management.
    pub const POWER_MANAGEMENT: u8 = 0x02;
    /// Temperature Threshold.
    pub const TEMPERATURE_THRESHOLD: u8 = 0x04;
    /// Volatile Write Cache.
    pub const VOLATILE_WRITE_CACHE: u8 = 0x06;
    /// Number of Queues.
    pub const NUMBER_OF_QUEUES: u8 = 0x07;
}

/// Log page identifiers.
pub mod lid {
    /// Error Information.
    pub const ERROR: u8 = 0x01;
    /// SMART / Health Information.
    pub const SMART: u8 = 0x02;
    /// Firmware Slot Information.
    pub const FIRMWARE_SLOT: u8 = 0x03;
}

/// A submission queue entry: 64 bytes, laid out as in NVMe 1.4 figure 105.
///
/// Built on the stack and copied into the submission queue with volatile writes; the driver never
/// holds a reference into the queue memory itself.
#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub struct Sqe {
    /// CDW0: opcode (7:0), fused (9:8), PSDT (15:14), command identifier (31:16).
    pub cdw0: u32,
    /// Namespace identifier.
    pub nsid: u32,
    /// CDW2.
    pub cdw2: u32,
    /// CDW3.
    pub cdw3: u32,
    /// Metadata pointer.
    pub mptr: u64,
    /// PRP entry 1.
    pub prp1: u64,
    /// PRP entry 2 (or a PRP list pointer).
    pub prp2: u64,
    /// Command dword 10.
    pub cdw10: u32,
    /// Command dword 11.
    pub cdw11: u32,
    /// Command dword 12.
    pub cdw12: u32,
    /// Command dword 13.
    pub cdw13: u32,
    /// Command dword 14.
    pub cdw14: u32,
    /// Command dword 15.
    pub cdw15: u32,
}

const _: () = assert!(core::mem::size_of::<Sqe>() == 64);

/// CDW12 bit 30: Force Unit Access.
pub const RW_FUA: u32 = 1 << 30;
/// CDW12 bit 31: Limited Retry.
pub const RW_LR: u32 = 1 << 31;
/// Dataset Management CDW11 bit 2: Attribute – Deallocate.
pub const DSM_AD: u32 = 1 << 2;

impl Sqe {
    /// A command with only the opcode set.
    pub const fn new(opcode: u8) -> Sqe {
        Sqe {
            cdw0: opcode as u32,
            nsid: 0,
            cdw2: 0,
            cdw3: 0,
            mptr: 0,
            prp1: 0,
            prp2: 0,
            cdw10: 0,
            cdw11: 0,
            cdw12: 0,
            cdw13: 0,
            cdw14: 0,
            cdw15: 0,
        }
    }
    /// The opcode.
    pub const fn opcode(&self) -> u8 {
        self.cdw0 as u8
    }
    /// PSDT: 0 for PRPs (the only form this driver uses).
    pub const fn psdt(&self) -> u8 {
        ((self.cdw0 >> 14) & 3) as u8
    }
    /// FUSE: fused operation bits.
    pub const fn fuse(&self) -> u8 {
        ((self.cdw0 >> 8) & 3) as u8
    }
    /// The command identifier.
    pub const fn cid(&self) -> u16 {
        (self.cdw0 >> 16) as u16
    }
    /// Sets the command identifier.
    pub fn set_cid(&mut self, cid: u16) {
        self.cdw0 = (self.cdw0 & 0xffff) | (cid as u32) << 16;
    }
    /// Starting LBA of a read/write/write-zeroes command (CDW10/11).
    pub const fn slba(&self) -> u64 {
        self.cdw10 as u64 | (self.cdw11 as u64) << 32
    }
    /// Number of logical blocks, **0's based** (CDW12 15:0).
    pub const fn nlb(&self) -> u16 {
        self.cdw12 as u16
    }

    /// Identify with the given CNS, writing 4 KiB at `prp1`.
    pub const fn identify(cns: u32, nsid: u32, prp1: u64) -> Sqe {
        let mut s = Sqe::new(admin::IDENTIFY);
        s.nsid = nsid;
        s.prp1 = prp1;
        s.cdw10 = cns;
        s
    }
    /// Create I/O Completion Queue: physically contiguous, interrupts disabled (polled).
    pub const fn create_io_cq(qid: u16, entries: u16, prp1: u64) -> Sqe {
        let mut s = Sqe::new(admin::CREATE_IO_CQ);
        s.prp1 = prp1;
        s.cdw10 = qid as u32 | ((entries - 1) as u32) << 16;
        s.cdw11 = 1; // PC = 1, IEN = 0
        s
    }
    /// Create I/O Completion Queue with interrupts enabled (IEN = 1) on MSI-X vector `vector`.
    pub const fn create_io_cq_irq(qid: u16, entries: u16, prp1: u64, vector: u16) -> Sqe {
        let mut s = Sqe::create_io_cq(qid, entries, prp1);
        s.cdw11 = 1 | 2 | (vector as u32) << 16; // PC = 1, IEN = 1, IV
        s
    }
    /// Create I/O Submission Queue bound to `cqid`, physically contiguous, medium priority.
    pub const fn create_io_sq(qid: u16, entries: u16, prp1: u64, cqid: u16) -> Sqe {
        let mut s = Sqe::new(admin::CREATE_IO_SQ);
        s.prp1 = prp1;
        s.cdw10 = qid as u32 | ((entries - 1) as u32) << 16;
        s.cdw11 = 1 | (cqid as u32) << 16; // PC = 1
        s
    }
    /// Delete I/O Submission Queue.
    pub const fn delete_io_sq(qid: u16) -> Sqe {
        let mut s = Sqe::new(admin::DELETE_IO_SQ);
        s.cdw10 = qid as u32;
        s
    }
    /// Delete I/O Completion Queue.
    pub const fn delete_io_cq(qid: u16) -> Sqe {
        let mut s = Sqe::new(admin::DELETE_IO_CQ);
        s.cdw10 = qid as u32;
        s
    }
    /// Set Features.
    pub const fn set_features(fid: u8, cdw11: u32) -> Sqe {
        let mut s = Sqe::new(admin::SET_FEATURES);
        s.cdw10 = fid as u32;
        s.cdw11 = cdw11;
        s
    }
    /// Get Features (current value).
    pub const fn get_features(fid: u8) -> Sqe {
        let mut s = Sqe::new(admin::GET_FEATURES);
        s.cdw10 = fid as u32;
        s
    }
    /// Set Features / Number of Queues: requested I/O SQ and CQ counts (not 0's based).
    pub const fn set_number_of_queues(sqs: u16, cqs: u16) -> Sqe {
        Sqe::set_features(
            fid::NUMBER_OF_QUEUES,
            (sqs - 1) as u32 | ((cqs - 1) as u32) << 16,
        )
    }
    /// Get Log Page of `bytes` bytes (a multiple of 4; at least 4) into `prp1`/`prp2`.
    pub const fn get_log_page(lid: u8, nsid: u32, bytes: u32, prp1: u64, prp2: u64) -> Sqe {
        let numd = (bytes / 4).saturating_sub(1);
        let mut s = Sqe::new(admin::GET_LOG_PAGE);
        s.nsid = nsid;
        s.prp1 = prp1;
        s.prp2 = prp2;
        s.cdw10 = lid as u32 | (numd & 0xffff) << 16;
        s.cdw11 = numd >> 16;
        s
    }
    /// Abort the command `cid` on submission queue `sqid`.
    pub const fn abort(sqid: u16, cid: u16) -> Sqe {
        let mut s = Sqe::new(admin::ABORT);
        s.cdw10 = sqid as u32 | (cid as u32) << 16;
        s
    }
    /// Read or Write of `blocks` logical blocks (not 0's based, 1..=65536).
    pub const fn rw(opcode: u8, nsid: u32, slba: u64, blocks: u32, fua: bool) -> Sqe {
        let mut s = Sqe::new(opcode);
        s.nsid = nsid;
        s.cdw10 = slba as u32;
        s.cdw11 = (slba >> 32) as u32;
        s.cdw12 = (blocks - 1) & 0xffff;
        if fua {
            s.cdw12 |= RW_FUA;
        }
        s
    }
    /// Write Zeroes of `blocks` logical blocks.
    pub const fn write_zeroes(nsid: u32, slba: u64, blocks: u32, fua: bool) -> Sqe {
        let mut s = Sqe::rw(io::WRITE_ZEROES, nsid, slba, blocks, fua);
        s.cdw0 = io::WRITE_ZEROES as u32;
        s
    }
    /// Flush.
    pub const fn flush(nsid: u32) -> Sqe {
        let mut s = Sqe::new(io::FLUSH);
        s.nsid = nsid;
        s
    }
    /// Dataset Management with `ranges` range entries (1..=256) at `prp1`, deallocate set.
    pub const fn dsm_deallocate(nsid: u32, ranges: u32, prp1: u64) -> Sqe {
        let mut s = Sqe::new(io::DATASET_MANAGEMENT);
        s.nsid = nsid;
        s.prp1 = prp1;
        s.cdw10 = (ranges - 1) & 0xff;
        s.cdw11 = DSM_AD;
        s
    }
}

/// One Dataset Management range (16 bytes, NVMe 1.4 figure 364).
#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub struct DsmRange {
    /// Context attributes.
    pub cattr: u32,
    /// Length in logical blocks.
    pub nlb: u32,
    /// Starting LBA.
    pub slba: u64,
}

/// Bytes of one [`DsmRange`].
pub const DSM_RANGE_LEN: usize = 16;

const _: () = assert!(core::mem::size_of::<DsmRange>() == DSM_RANGE_LEN);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rw_encodes_lba_count_and_fua() {
        let mut s = Sqe::rw(io::READ, 1, 0x1_2345_6789, 8, true);
        s.set_cid(0xbeef);
        assert_eq!(s.opcode(), io::READ);
        assert_eq!(s.cid(), 0xbeef);
        assert_eq!(s.slba(), 0x1_2345_6789);
        assert_eq!(s.nlb(), 7);
        assert_ne!(s.cdw12 & RW_FUA, 0);
        assert_eq!(Sqe::rw(io::WRITE, 1, 0, 65536, false).nlb(), 0xffff);
    }

    #[test]
    fn queue_creation_and_features() {
        let cq = Sqe::create_io_cq(3, 1024, 0x1000);
        assert_eq!(cq.cdw10, 3 | 1023 << 16);
        assert_eq!(cq.cdw11, 1);
        let sq = Sqe::create_io_sq(3, 1024, 0x2000, 3);
        assert_eq!(sq.cdw11, 1 | 3 << 16);
        assert_eq!(Sqe::set_number_of_queues(4, 4).cdw11, 0x0003_0003);
        let log = Sqe::get_log_page(lid::SMART, u32::MAX, 512, 0x3000, 0);
        assert_eq!(log.cdw10, 2 | 127 << 16);
        assert_eq!(Sqe::write_zeroes(1, 5, 2, false).opcode(), io::WRITE_ZEROES);
    }
}
