//! The 16-byte completion queue entry and its status field (NVMe 1.4 section 4.6).

use super::status::Status;

/// A completion queue entry: 16 bytes, laid out as in NVMe 1.4 figure 121.
///
/// The driver copies an entry out of the completion queue with volatile reads after it has seen
/// the expected phase tag with an acquire load of the last dword.
#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub struct Cqe {
    /// DW0: command specific result.
    pub dw0: u32,
    /// DW1: command specific.
    pub dw1: u32,
    /// SQ head pointer at the time of the completion.
    pub sq_head: u16,
    /// SQ identifier.
    pub sq_id: u16,
    /// Command identifier.
    pub cid: u16,
    /// Phase tag (bit 0) and status field (15:1).
    pub status: u16,
}

const _: () = assert!(core::mem::size_of::<Cqe>() == 16);

impl Cqe {
    /// The phase tag.
    pub const fn phase(&self) -> bool {
        self.status & 1 != 0
    }
    /// The status field, decoded.
    pub const fn status(&self) -> Status {
        Status::from_field(self.status >> 1)
    }
    /// Builds the last dword (CID and status with phase) as the device writes it.
    pub const fn dw3(cid: u16, status: Status, phase: bool) -> u32 {
        cid as u32 | (((status.to_field() << 1) | phase as u16) as u32) << 16
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::status::{Sct, generic};

    #[test]
    fn dw3_round_trips() {
        let st = Status::new(Sct::Generic, generic::INVALID_FIELD).with_dnr(true);
        let dw3 = Cqe::dw3(0x1234, st, true);
        let cqe = Cqe {
            cid: dw3 as u16,
            status: (dw3 >> 16) as u16,
            ..Cqe::default()
        };
        assert_eq!(cqe.cid, 0x1234);
        assert!(cqe.phase());
        assert_eq!(cqe.status(), st);
        assert!(cqe.status().dnr());
    }
}
