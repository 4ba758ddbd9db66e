//! Completion status: status code type, status code, and their names (NVMe 1.4 section 4.6.1).

/// Status Code Type.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum Sct {
    /// Generic command status (0).
    Generic,
    /// Command specific status (1).
    CommandSpecific,
    /// Media and data integrity errors (2).
    Media,
    /// Path related status (3).
    Path,
    /// Vendor specific (7).
    Vendor,
    /// A reserved value (4..=6).
    Reserved(u8),
}

impl Sct {
    /// From the 3-bit field.
    pub const fn from_bits(v: u8) -> Sct {
        match v & 7 {
            0 => Sct::Generic,
            1 => Sct::CommandSpecific,
            2 => Sct::Media,
            3 => Sct::Path,
            7 => Sct::Vendor,
            r => Sct::Reserved(r),
        }
    }
    /// The 3-bit field.
    pub const fn bits(self) -> u8 {
        match self {
            Sct::Generic => 0,
            Sct::CommandSpecific => 1,
            Sct::Media => 2,
            Sct::Path => 3,
            Sct::Vendor => 7,
            Sct::Reserved(r) => r & 7,
        }
    }
}

/// Generic command status codes (SCT 0).
pub mod generic {
    /// Successful Completion.
    pub const SUCCESS: u8 = 0x00;
    /// Invalid Command Opcode.
    pub const INVALID_OPCODE: u8 = 0x01;
    /// Invalid Field in Command.
    pub const INVALID_FIELD: u8 = 0x02;
    /// Command ID Conflict.
    pub const CID_CONFLICT: u8 = 0x03;
    /// Data Transfer Error.
    pub const DATA_TRANSFER_ERROR: u8 = 0x04;
    /// Commands Aborted due to Power Loss Notification.
    pub const ABORTED_POWER_LOSS: u8 = 0x05;
    /// Internal Error.
    pub const INTERNAL_ERROR: u8 = 0x06;
    /// Command Abort Requested.
    pub const ABORT_REQUESTED: u8 = 0x07;
    /// Command Aborted due to SQ Deletion.
    pub const ABORTED_SQ_DELETION: u8 = 0x08;
    /// Invalid Namespace or Format.
    pub const INVALID_NAMESPACE: u8 = 0x0b;
    /// Command Sequence Error.
    pub const COMMAND_SEQUENCE_ERROR: u8 = 0x0c;
    /// PRP Offset Invalid.
    pub const PRP_OFFSET_INVALID: u8 = 0x13;
    /// Namespace is Write Protected.
    pub const NAMESPACE_WRITE_PROTECTED: u8 = 0x20;
    /// LBA Out of Range.
    pub const LBA_OUT_OF_RANGE: u8 = 0x80;
    /// Capacity Exceeded.
    pub const CAPACITY_EXCEEDED: u8 = 0x81;
    /// Namespace Not Ready.
    pub const NAMESPACE_NOT_READY: u8 = 0x82;
}

/// Command specific status codes (SCT 1).
pub mod command_specific {
    /// Completion Queue Invalid.
    pub const CQ_INVALID: u8 = 0x00;
    /// Invalid Queue Identifier.
    pub const INVALID_QUEUE_ID: u8 = 0x01;
    /// Invalid Queue Size.
    pub const INVALID_QUEUE_SIZE: u8 = 0x02;
    /// Abort Command Limit Exceeded.
    pub const ABORT_LIMIT_EXCEEDED: u8 = 0x03;
    /// Invalid Interrupt Vector.
    pub const INVALID_INTERRUPT_VECTOR: u8 = 0x08;
    /// Invalid Log Page.
    pub const INVALID_LOG_PAGE: u8 = 0x09;
    /// Invalid Format.
    pub const INVALID_FORMAT: u8 = 0x0a;
    /// Invalid Queue Deletion.
    pub const INVALID_QUEUE_DELETION: u8 = 0x0c;
    /// Feature Identifier Not Saveable.
    pub const FEATURE_NOT_SAVEABLE: u8 = 0x0d;
    /// Feature Not Changeable.
    pub const FEATURE_NOT_CHANGEABLE: u8 = 0x0e;
    /// Conflicting Attributes (Dataset Management, Read, Write).
    pub const CONFLICTING_ATTRIBUTES: u8 = 0x80;
    /// Attempted Write to Read Only Range.
    pub const WRITE_TO_READ_ONLY: u8 = 0x82;
}

/// Media and data integrity status codes (SCT 2).
pub mod media {
    /// Write Fault.
    pub const WRITE_FAULT: u8 = 0x80;
    /// Unrecovered Read Error.
    pub const UNRECOVERED_READ_ERROR: u8 = 0x81;
    /// End-to-end Guard Check Error.
    pub const GUARD_CHECK_ERROR: u8 = 0x82;
    /// End-to-end Application Tag Check Error.
    pub const APP_TAG_CHECK_ERROR: u8 = 0x83;
    /// End-to-end Reference Tag Check Error.
    pub const REF_TAG_CHECK_ERROR: u8 = 0x84;
    /// Compare Failure.
    pub const COMPARE_FAILURE: u8 = 0x85;
    /// Access Denied.
    pub const ACCESS_DENIED: u8 = 0x86;
    /// Deallocated or Unwritten Logical Block.
    pub const DEALLOCATED_OR_UNWRITTEN: u8 = 0x87;
}

/// Path related status codes (SCT 3).
pub mod path {
    /// Internal Path Error.
    pub const INTERNAL_PATH_ERROR: u8 = 0x00;
    /// Asymmetric Access Persistent Loss.
    pub const ANA_PERSISTENT_LOSS: u8 = 0x01;
    /// Asymmetric Access Inaccessible.
    pub const ANA_INACCESSIBLE: u8 = 0x02;
    /// Asymmetric Access Transition.
    pub const ANA_TRANSITION: u8 = 0x03;
    /// Controller Pathing Error: the controller cannot be reached (it was removed, say).
    pub const CONTROLLER_PATHING_ERROR: u8 = 0x60;
    /// Host Pathing Error: the host lost its path to the controller (a transport connection
    /// ended); what Linux's host reports for the commands of a lost connection.
    pub const HOST_PATHING_ERROR: u8 = 0x70;
    /// Command Aborted By Host.
    pub const ABORTED_BY_HOST: u8 = 0x71;
}

/// A decoded status field: type, code, and the More / Do Not Retry bits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Status {
    /// Status code type.
    pub sct: Sct,
    /// Status code.
    pub sc: u8,
    /// M: more information in the Error Information log page.
    pub more: bool,
    /// DNR: do not retry.
    pub dnr: bool,
}

impl Status {
    /// Successful completion.
    pub const SUCCESS: Status = Status::new(Sct::Generic, generic::SUCCESS);

    /// A status with M and DNR clear.
    pub const fn new(sct: Sct, sc: u8) -> Status {
        Status {
            sct,
            sc,
            more: false,
            dnr: false,
        }
    }
    /// With DNR set or cleared.
    pub const fn with_dnr(mut self, dnr: bool) -> Status {
        self.dnr = dnr;
        self
    }
    /// Decodes the 15-bit status field (CQE DW3 bits 31:17, shifted down).
    pub const fn from_field(f: u16) -> Status {
        Status {
            sc: (f & 0xff) as u8,
            sct: Sct::from_bits(((f >> 8) & 7) as u8),
            more: f & (1 << 13) != 0,
            dnr: f & (1 << 14) != 0,
        }
    }
    /// Encodes the 15-bit status field.
    pub const fn to_field(self) -> u16 {
        self.sc as u16
            | (self.sct.bits() as u16) << 8
            | (self.more as u16) << 13
            | (self.dnr as u16) << 14
    }
    /// True for Successful Completion.
    pub const fn is_success(self) -> bool {
        matches!(self.sct, Sct::Generic) && self.sc == generic::SUCCESS
    }
    /// M bit.
    pub const fn more(self) -> bool {
        self.more
    }
    /// DNR bit.
    pub const fn dnr(self) -> bool {
        self.dnr
    }
    /// The specification's name of this status, or `None` for a code this crate does not name.
    pub const fn name(self) -> Option<&'static str> {
        use command_specific as cs;
        use generic as g;
        Some(match (self.sct, self.sc) {
            (Sct::Generic, g::SUCCESS) => "Successful Completion",
            (Sct::Generic, g::INVALID_OPCODE) => "Invalid Command Opcode",
            (Sct::Generic, g::INVALID_FIELD) => "Invalid Field in Command",
            (Sct::Generic, g::CID_CONFLICT) => "Command ID Conflict",
            (Sct::Generic, g::DATA_TRANSFER_ERROR) => "Data Transfer Error",
            (Sct::Generic, g::ABORTED_POWER_LOSS) => {
                "Commands Aborted due to Power Loss Notification"
            }
            (Sct::Generic, g::INTERNAL_ERROR) => "Internal Error",
            (Sct::Generic, g::ABORT_REQUESTED) => "Command Abort Requested",
            (Sct::Generic, g::ABORTED_SQ_DELETION) => "Command Aborted due to SQ Deletion",
            (Sct::Generic, 0x09) => "Command Aborted due to Failed Fused Command",
            (Sct::Generic, 0x0a) => "Command Aborted due to Missing Fused Command",
            (Sct::Generic, g::INVALID_NAMESPACE) => "Invalid Namespace or Format",
            (Sct::Generic, g::COMMAND_SEQUENCE_ERROR) => "Command Sequence Error",
            (Sct::Generic, 0x0d) => "Invalid SGL Segment Descriptor",
            (Sct::Generic, 0x0e) => "Invalid Number of SGL Descriptors",
            (Sct::Generic, 0x0f) => "Data SGL Length Invalid",
            (Sct::Generic, 0x10) => "Metadata SGL Length Invalid",
            (Sct::Generic, 0x11) => "SGL Descriptor Type Invalid",
            (Sct::Generic, 0x12) => "Invalid Use of Controller Memory Buffer",
            (Sct::Generic, g::PRP_OFFSET_INVALID) => "PRP Offset Invalid",
            (Sct::Generic, 0x14) => "Atomic Write Unit Exceeded",
            (Sct::Generic, 0x15) => "Operation Denied",
            (Sct::Generic, 0x16) => "SGL Offset Invalid",
            (Sct::Generic, 0x18) => "Host Identifier Inconsistent Format",
            (Sct::Generic, 0x19) => "Keep Alive Timer Expired",
            (Sct::Generic, 0x1a) => "Keep Alive Timeout Invalid",
            (Sct::Generic, 0x1b) => "Command Aborted due to Preempt and Abort",
            (Sct::Generic, 0x1c) => "Sanitize Failed",
            (Sct::Generic, 0x1d) => "Sanitize In Progress",
            (Sct::Generic, 0x1e) => "SGL Data Block Granularity Invalid",
            (Sct::Generic, 0x1f) => "Command Not Supported for Queue in CMB",
            (Sct::Generic, g::NAMESPACE_WRITE_PROTECTED) => "Namespace is Write Protected",
            (Sct::Generic, 0x21) => "Command Interrupted",
            (Sct::Generic, 0x22) => "Transient Transport Error",
            (Sct::Generic, g::LBA_OUT_OF_RANGE) => "LBA Out of Range",
            (Sct::Generic, g::CAPACITY_EXCEEDED) => "Capacity Exceeded",
            (Sct::Generic, g::NAMESPACE_NOT_READY) => "Namespace Not Ready",
            (Sct::Generic, 0x83) => "Reservation Conflict",
            (Sct::Generic, 0x84) => "Format In Progress",
            (Sct::CommandSpecific, cs::CQ_INVALID) => "Completion Queue Invalid",
            (Sct::CommandSpecific, cs::INVALID_QUEUE_ID) => "Invalid Queue Identifier",
            (Sct::CommandSpecific, cs::INVALID_QUEUE_SIZE) => "Invalid Queue Size",
            (Sct::CommandSpecific, cs::ABORT_LIMIT_EXCEEDED) => "Abort Command Limit Exceeded",
            (Sct::CommandSpecific, 0x05) => "Asynchronous Event Request Limit Exceeded",
            (Sct::CommandSpecific, 0x06) => "Invalid Firmware Slot",
            (Sct::CommandSpecific, 0x07) => "Invalid Firmware Image",
            (Sct::CommandSpecific, cs::INVALID_INTERRUPT_VECTOR) => "Invalid Interrupt Vector",
            (Sct::CommandSpecific, cs::INVALID_LOG_PAGE) => "Invalid Log Page",
            (Sct::CommandSpecific, cs::INVALID_FORMAT) => "Invalid Format",
            (Sct::CommandSpecific, 0x0b) => "Firmware Activation Requires Conventional Reset",
            (Sct::CommandSpecific, cs::INVALID_QUEUE_DELETION) => "Invalid Queue Deletion",
            (Sct::CommandSpecific, cs::FEATURE_NOT_SAVEABLE) => "Feature Identifier Not Saveable",
            (Sct::CommandSpecific, cs::FEATURE_NOT_CHANGEABLE) => "Feature Not Changeable",
            (Sct::CommandSpecific, 0x0f) => "Feature Not Namespace Specific",
            (Sct::CommandSpecific, cs::CONFLICTING_ATTRIBUTES) => "Conflicting Attributes",
            (Sct::CommandSpecific, 0x81) => "Invalid Protection Information",
            (Sct::CommandSpecific, cs::WRITE_TO_READ_ONLY) => "Attempted Write to Read Only Range",
            (Sct::Media, media::WRITE_FAULT) => "Write Fault",
            (Sct::Media, media::UNRECOVERED_READ_ERROR) => "Unrecovered Read Error",
            (Sct::Media, media::GUARD_CHECK_ERROR) => "End-to-end Guard Check Error",
            (Sct::Media, media::APP_TAG_CHECK_ERROR) => "End-to-end Application Tag Check Error",
            (Sct::Media, media::REF_TAG_CHECK_ERROR) => "End-to-end Reference Tag Check Error",
            (Sct::Media, media::COMPARE_FAILURE) => "Compare Failure",
            (Sct::Media, media::ACCESS_DENIED) => "Access Denied",
            (Sct::Media, media::DEALLOCATED_OR_UNWRITTEN) => {
                "Deallocated or Unwritten Logical Block"
            }
            (Sct::Path, path::INTERNAL_PATH_ERROR) => "Internal Path Error",
            (Sct::Path, path::ANA_PERSISTENT_LOSS) => "Asymmetric Access Persistent Loss",
            (Sct::Path, path::ANA_INACCESSIBLE) => "Asymmetric Access Inaccessible",
            (Sct::Path, path::ANA_TRANSITION) => "Asymmetric Access Transition",
            (Sct::Path, path::CONTROLLER_PATHING_ERROR) => "Controller Pathing Error",
            (Sct::Path, path::HOST_PATHING_ERROR) => "Host Pathing Error",
            (Sct::Path, path::ABORTED_BY_HOST) => "Command Aborted By Host",
            _ => return None,
        })
    }
}

impl core::fmt::Display for Status {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.name() {
            Some(n) => write!(f, "{n}")?,
            None => write!(f, "unknown status")?,
        }
        write!(f, " (sct {:#x}, sc {:#04x}", self.sct.bits(), self.sc)?;
        if self.dnr {
            write!(f, ", DNR")?;
        }
        write!(f, ")")
    }
}

impl core::fmt::Debug for Status {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        core::fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_round_trip_for_every_value() {
        for f in 0..(1u16 << 15) {
            let s = Status::from_field(f);
            // Bits 11 and 12 are CRD (command retry delay), which we do not keep.
            assert_eq!(s.to_field(), f & !(3 << 11), "field {f:#x}");
        }
    }

    #[test]
    fn names_and_display() {
        let s = Status::new(Sct::Media, media::UNRECOVERED_READ_ERROR).with_dnr(true);
        assert_eq!(
            s.to_string(),
            "Unrecovered Read Error (sct 0x2, sc 0x81, DNR)"
        );
        assert!(Status::SUCCESS.is_success());
        assert!(!s.is_success());
        assert_eq!(Status::new(Sct::Generic, 0x7f).name(), None);
        assert_eq!(
            Status::new(Sct::Generic, generic::PRP_OFFSET_INVALID).name(),
            Some("PRP Offset Invalid")
        );
    }
}
