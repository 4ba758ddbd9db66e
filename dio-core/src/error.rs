//! Errors and device status.

use std::fmt;

/// Completion status of a failed device command (decision 5): NVMe's status code type and
/// status code, and the first LBA that failed if the device reported it. Kept generic: dio-core
/// does not interpret the codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DeviceStatus {
    /// Status code type (NVMe SCT).
    pub sct: u8,
    /// Status code (NVMe SC).
    pub sc: u8,
    /// First failing logical block, if known.
    pub lba: Option<u64>,
}

impl DeviceStatus {
    /// A status without LBA detail.
    pub const fn new(sct: u8, sc: u8) -> Self {
        DeviceStatus { sct, sc, lba: None }
    }
}

impl fmt::Display for DeviceStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "status code type {:#x}, status code {:#04x}",
            self.sct, self.sc
        )?;
        if let Some(lba) = self.lba {
            write!(f, ", first failing LBA {lba}")?;
        }
        Ok(())
    }
}

/// Why a direct-I/O request failed.
///
/// `Fault`, `QueueFull` and `Invalid` are *submission-class*: found by the submitter before it
/// returns, always reported synchronously. `Io` and `EndIo` are *completion-class*.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum DioError {
    /// A buffer segment could not be DMA-mapped or pinned (EFAULT).
    #[error("buffer segment cannot be mapped for DMA")]
    Fault,
    /// The driver's request pool is exhausted and this request has nothing in flight (EAGAIN).
    #[error("device request pool exhausted")]
    QueueFull,
    /// Misaligned offset or length, a length larger than the buffer, or an offset overflow
    /// (EINVAL); checked before any device command is issued.
    #[error("invalid request: misaligned or out of bounds")]
    Invalid,
    /// A device command ended with an error status (the first one to complete wins).
    #[error("device error: {0}")]
    Io(DeviceStatus),
    /// The filesystem end-io hook failed with this code.
    #[error("end-io hook failed with code {0}")]
    EndIo(i32),
}

impl DioError {
    /// `Fault`, `QueueFull` and `Invalid`: errors discovered while submitting.
    pub fn is_submission_class(&self) -> bool {
        matches!(
            self,
            DioError::Fault | DioError::QueueFull | DioError::Invalid
        )
    }
}

/// Bytes transferred, or the error.
pub type DioResult = Result<u64, DioError>;
