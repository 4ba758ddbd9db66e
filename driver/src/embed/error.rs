//! Errors of the embedding API ([`Dioxide`](crate::Dioxide), [`BlockFile`](crate::BlockFile)).

use dio_core::{DeviceStatus, DioError};

use crate::nvme::error::Error;
use crate::spec::status::{Sct, Status, generic, path};
use crate::types::Nsid;

/// Result of the embedding API.
pub type EmbedResult<T> = core::result::Result<T, EmbedError>;

/// Read or write, for error messages and requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// Device to buffer.
    Read,
    /// Buffer to device.
    Write,
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Op::Read => "read",
            Op::Write => "write",
        })
    }
}

/// A maintenance operation of a [`BlockFile`](crate::BlockFile), for error messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MaintOp {
    /// Flush of the device's volatile write cache.
    Flush,
    /// Write Zeroes.
    WriteZeroes,
    /// Deallocate (Dataset Management).
    Deallocate,
}

impl std::fmt::Display for MaintOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MaintOp::Flush => "flush",
            MaintOp::WriteZeroes => "write zeroes",
            MaintOp::Deallocate => "deallocate",
        })
    }
}

/// What went wrong, where, and what to do about it.
///
/// Small (its two large causes, [`Driver`](Self::Driver) and [`Remote`](Self::Remote), are
/// boxed: errors are cold): every request's result is an [`EmbedResult`], moved several times
/// on the request path, and a [`Completed`](crate::Completed) of more than 128 bytes was
/// copied by a call to `memcpy` (measured, QD32 asynchronous read: 2268 -> 2242 instructions).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EmbedError {
    /// A poller thread could not be pinned to its core.
    #[error(
        "failed to pin poller {poller} to core {core}: {source}; give cores that exist and that \
         this process may use (see `nproc` and `taskset -p $$`), or `None` to leave it unpinned"
    )]
    Pin {
        /// Poller index.
        poller: usize,
        /// The core asked for.
        core: usize,
        /// The system error (EINVAL for a core that does not exist).
        #[source]
        source: std::io::Error,
    },
    /// A poller thread could not be started.
    #[error("failed to start a poller thread: {0}")]
    Spawn(#[source] std::io::Error),
    /// The builder was given no controller or no poller.
    #[error("invalid configuration: {0}")]
    Config(&'static str),
    /// The driver failed (bring-up, queue creation, DMA allocation). Boxed, as
    /// [`Remote`](Self::Remote): see [`EmbedError`]'s size note.
    #[error("driver: {0}")]
    Driver(#[source] Box<Error>),
    /// An NVMe/TCP controller failed (connection, bring-up, queue creation).
    #[error("NVMe/TCP: {0}")]
    Remote(#[source] Box<crate::transport::TransportError>),
    /// A transport ID given to [`Builder::transport_id`](crate::Builder::transport_id) that
    /// does not parse or names no remote controller.
    #[error("transport ID '{trid}': {why}")]
    TransportId {
        /// The string given.
        trid: String,
        /// What is wrong and how to fix it.
        why: String,
    },
    /// The request's controller was lost (its NVMe/TCP connection ended, or its Keep Alive
    /// failed): the request failed, as does every request outstanding or issued on it.
    #[error(
        "{op} of {len} bytes at offset {offset} failed: controller lost (its NVMe/TCP \
         connection ended or its Keep Alive failed; every request on it fails); reconnect: \
         build a new Dioxide on a new connection, once the target is back"
    )]
    ControllerLost {
        /// Operation.
        op: Op,
        /// File offset of the request.
        offset: u64,
        /// Length of the request.
        len: u64,
    },
    /// The request's NVMe device was removed (hot-unplugged, unbound, or its registers read
    /// all ones): the request failed, as does every request outstanding or issued on it.
    #[error(
        "{op} of {len} bytes at offset {offset} failed: device removed (hot-unplugged or \
         unbound; every request on it fails); once a device is back, bind it with \
         hugepage-setup.sh and build a new Dioxide on it"
    )]
    DeviceRemoved {
        /// Operation.
        op: Op,
        /// File offset of the request.
        offset: u64,
        /// Length of the request.
        len: u64,
    },
    /// No controller or namespace with this index / id.
    #[error("controller {ctrl} has no namespace {nsid}; list them with Dioxide::namespaces")]
    NoSuchNamespace {
        /// Controller index (order given to the builder).
        ctrl: usize,
        /// The id asked for.
        nsid: Nsid,
    },
    /// The file's extent does not fit its namespace or is not whole pages.
    #[error(
        "file extent LBA {first_lba} + {blocks} blocks is not usable on namespace {nsid} \
         ({ns_blocks} blocks of {block_size} bytes): {why}"
    )]
    BadExtent {
        /// Namespace.
        nsid: Nsid,
        /// First LBA asked for.
        first_lba: u64,
        /// Blocks asked for.
        blocks: u64,
        /// Namespace size in blocks.
        ns_blocks: u64,
        /// Block size.
        block_size: u32,
        /// What is wrong and how to fix it.
        why: &'static str,
    },
    /// The file's extent overlaps a file already open.
    #[error(
        "file extent LBA {first_lba} + {blocks} blocks on namespace {nsid} overlaps a file that \
         is already open; give each file its own LBA range"
    )]
    ExtentInUse {
        /// Namespace.
        nsid: Nsid,
        /// First LBA asked for.
        first_lba: u64,
        /// Blocks asked for.
        blocks: u64,
    },
    /// A request reaches past the file's capacity.
    #[error(
        "{op} of {len} bytes at offset {offset} runs past the file's capacity of {capacity} \
         bytes; open the file with a larger extent"
    )]
    BeyondCapacity {
        /// Operation.
        op: Op,
        /// File offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Capacity in bytes.
        capacity: u64,
    },
    /// The buffer is shorter than the length asked for.
    #[error("{op} of {len} bytes at offset {offset} given a buffer of only {buf_len} bytes")]
    ShortBuffer {
        /// Operation.
        op: Op,
        /// File offset.
        offset: u64,
        /// Length asked for.
        len: u64,
        /// Buffer length.
        buf_len: usize,
    },
    /// The device completed a command of the request with an error status.
    #[error(
        "{op} of {len} bytes at offset {offset} failed on the device: {}{status}",
        Named(status)
    )]
    Device {
        /// Operation.
        op: Op,
        /// File offset of the request.
        offset: u64,
        /// Length of the request.
        len: u64,
        /// Status (type, code, first failing LBA when known).
        status: DeviceStatus,
    },
    /// dio-core refused the request (pool exhausted, DMA fault, invalid, end-io hook).
    #[error(
        "{op} of {len} bytes at offset {offset} failed: {source}{}",
        hint(source)
    )]
    Dio {
        /// Operation.
        op: Op,
        /// File offset.
        offset: u64,
        /// Length.
        len: u64,
        /// dio-core's error.
        #[source]
        source: DioError,
    },
    /// A request that would have to wait was issued on a poller thread (from a callback).
    #[error(
        "{op} at offset {offset} cannot run on a poller thread without waiting ({why}); enable \
         deferred completions (Builder::deferred_completions) so callbacks run on a thread of \
         yours, or issue asynchronous, block-aligned, non-extending requests with a DMA buffer"
    )]
    WouldBlockOnPoller {
        /// Operation.
        op: Op,
        /// File offset.
        offset: u64,
        /// What would have waited.
        why: &'static str,
    },
    /// A write to a file opened read-only.
    #[error(
        "write at offset {offset}: the file was opened read-only; open it with \
         FileOptions::writable (on real hardware only with --allow-write or \
         NVME_HIL_ALLOW_WRITE=1)"
    )]
    ReadOnly {
        /// File offset.
        offset: u64,
    },
    /// Run to completion: the request overlaps one that can only finish after this one
    /// returns (a request lower on the same thread's stack, whose poll ran the callback that
    /// issued this one). Waiting would hang.
    #[error(
        "{op} of {len} bytes at offset {offset} overlaps a request that is waiting lower on \
         this thread's stack (a callback run by its poll issued this one), so it would wait \
         forever; issue it after that request returned (e.g. from your next poll), or build \
         with pollers"
    )]
    WouldDeadlock {
        /// Read or write.
        op: Op,
        /// File offset.
        offset: u64,
        /// Bytes.
        len: u64,
    },
    /// A maintenance operation the controller does not offer.
    #[error(
        "{op} is not supported: {why}; check the controller's Identify data (ONCS) with the \
         identify tool, or do without it"
    )]
    Unsupported {
        /// Operation.
        op: MaintOp,
        /// What the controller lacks.
        why: &'static str,
    },
    /// A maintenance operation with a range outside the file or not on block boundaries.
    #[error(
        "{op} of {len} bytes at offset {offset} refused: {why} (the file holds {capacity} bytes \
         in blocks of {block_size})"
    )]
    MaintRange {
        /// Operation.
        op: MaintOp,
        /// File offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Capacity in bytes.
        capacity: u64,
        /// Logical block size.
        block_size: u64,
        /// What is wrong and how to fix it.
        why: &'static str,
    },
    /// A maintenance operation failed on the device or in dio-core.
    #[error(
        "{op} of {len} bytes at offset {offset} failed: {source}{}",
        hint(source)
    )]
    Maint {
        /// Operation.
        op: MaintOp,
        /// File offset (of the first range for a deallocate; 0 for a flush).
        offset: u64,
        /// Length (bytes of every range for a deallocate; 0 for a flush).
        len: u64,
        /// dio-core's error (`Io` carries the device status).
        #[source]
        source: DioError,
    },
    /// The instance is shutting down.
    #[error("Dioxide is shut down or shutting down; no new requests are accepted")]
    ShutDown,
    /// A run-to-completion file used from a thread that does not own its queue pair.
    #[error(
        "this run-to-completion instance belongs to the thread that built it (it polls its own \
         queue pair); use it from that thread, or build with pollers for multi-threaded use"
    )]
    WrongThread,
}

fn hint(e: &DioError) -> &'static str {
    match e {
        DioError::QueueFull => {
            "; poll for completions and resubmit, or raise QueueOptions::requests"
        }
        DioError::Invalid => "; offsets and lengths of direct I/O must be block aligned",
        DioError::Io(s) if is_path_error(s) => {
            " (host pathing error: controller lost, its NVMe/TCP connection ended or its Keep \
             Alive failed); reconnect: build a new Dioxide once the target is back"
        }
        DioError::Io(s) if is_removed(s) => {
            " (device removed: hot-unplugged or unbound; every request on it fails)"
        }
        _ => "",
    }
}

/// The status a request gets when its PCIe device was removed: NVMe "Controller Pathing
/// Error" (SCT 3h SC 60h), which no device of ours reports by itself.
pub(crate) const DEVICE_REMOVED: DeviceStatus =
    DeviceStatus::new(3, path::CONTROLLER_PATHING_ERROR);

fn is_removed(s: &DeviceStatus) -> bool {
    s.sct == DEVICE_REMOVED.sct && s.sc == DEVICE_REMOVED.sc
}

/// The status a request gets when its transport connection is lost (NVMe "Host Pathing
/// Error", SCT 3h SC 70h, as Linux's host reports it for the same reason).
pub(crate) const HOST_PATH_ERROR: DeviceStatus = DeviceStatus::new(3, path::HOST_PATHING_ERROR);

fn is_path_error(s: &DeviceStatus) -> bool {
    s.sct == HOST_PATH_ERROR.sct && s.sc == HOST_PATH_ERROR.sc
}

/// The specification's name of a device status, and what it means for the caller when the
/// driver, not the device, ended the command (a torn-down queue); empty for an unnamed code.
struct Named<'a>(&'a DeviceStatus);

impl core::fmt::Display for Named<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let s = Status::from_field(u16::from(self.0.sct & 7) << 8 | u16::from(self.0.sc));
        match s.name() {
            Some(name) if s.sct == Sct::Generic && s.sc == generic::ABORTED_SQ_DELETION => write!(
                f,
                "{name} (the queue was torn down: controller reset, fatal status (CSTS.CFS) or \
                 shutdown; reset the controller or build a new Dioxide): "
            ),
            Some(name) => write!(f, "{name}: "),
            None => Ok(()),
        }
    }
}

// The size note above: a request's result stays within three words beside its buffer.
const _: () = assert!(std::mem::size_of::<EmbedResult<usize>>() <= 64);

impl From<Error> for EmbedError {
    fn from(e: Error) -> Self {
        EmbedError::Driver(Box::new(e))
    }
}

impl From<crate::transport::TransportError> for EmbedError {
    fn from(e: crate::transport::TransportError) -> Self {
        EmbedError::Remote(Box::new(e))
    }
}

impl EmbedError {
    /// The error of a request from dio-core's error.
    pub(crate) fn from_dio(e: DioError, op: Op, offset: u64, len: u64) -> EmbedError {
        match e {
            DioError::Io(status) if is_path_error(&status) => {
                EmbedError::ControllerLost { op, offset, len }
            }
            DioError::Io(status) if is_removed(&status) => {
                EmbedError::DeviceRemoved { op, offset, len }
            }
            DioError::Io(status) => EmbedError::Device {
                op,
                offset,
                len,
                status,
            },
            source => EmbedError::Dio {
                op,
                offset,
                len,
                source,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(sct: u8, sc: u8) -> String {
        EmbedError::Device {
            op: Op::Read,
            offset: 4096,
            len: 512,
            status: DeviceStatus::new(sct, sc),
        }
        .to_string()
    }

    #[test]
    fn device_errors_name_their_status() {
        let media = device(2, 0x81);
        assert!(
            media.contains("failed on the device: Unrecovered Read Error: status code type 0x2"),
            "{media}"
        );
        let torn_down = device(0, 0x08);
        assert!(
            torn_down.contains("Command Aborted due to SQ Deletion (the queue was torn down")
                && torn_down.contains("reset the controller or build a new Dioxide"),
            "{torn_down}"
        );
        // The statuses the driver itself gives requests are the specification's pathing errors,
        // named as such (a host that lost its connection reports Host Pathing Error, 70h, as
        // Linux's host does; 71h is Command Aborted By Host).
        let lost = device(HOST_PATH_ERROR.sct, HOST_PATH_ERROR.sc);
        assert!(lost.contains("Host Pathing Error: "), "{lost}");
        let removed = device(DEVICE_REMOVED.sct, DEVICE_REMOVED.sc);
        assert!(removed.contains("Controller Pathing Error: "), "{removed}");
        // A code the specification does not name: the numbers alone.
        let unnamed = device(0, 0x7f);
        assert!(
            unnamed.contains("failed on the device: status code type 0x0, status code 0x7f"),
            "{unnamed}"
        );
    }
}
