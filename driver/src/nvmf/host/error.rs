//! Why a host operation failed: one variant per transport failure, each message naming the
//! problem and what to do about it.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use crate::nvmf::pdu::{FatalError, Fes, RecvError};
use crate::spec::Status;

/// Why a host operation failed.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The TCP connection could not be made (other than refused).
    #[error(
        "failed to connect to {addr}: {source}; check the address and that the network reaches it"
    )]
    Connect {
        /// Target address.
        addr: SocketAddr,
        /// The system error.
        #[source]
        source: io::Error,
    },
    /// Nothing listens at the address.
    #[error(
        "connection to {addr} refused: no NVMe/TCP target listens there; start the target or fix traddr/trsvcid"
    )]
    Refused {
        /// Target address.
        addr: SocketAddr,
    },
    /// The socket failed (a reset connection among others).
    #[error("NVMe/TCP socket error: {0}; the connection is gone, reconnect to go on")]
    Io(#[source] io::Error),
    /// The target closed the connection.
    #[error("the target closed the connection (was it stopped or restarted?); reconnect to go on")]
    Closed,
    /// The target terminated the connection with a C2HTermReq.
    #[error(
        "the target terminated the connection with a C2HTermReq: {} (FES {:#x}, FEI {fei:#x}); the host sent something it refused, reconnect to go on",
        fes_reason(*fes),
        fes.to_u16()
    )]
    Terminated {
        /// Fatal Error Status.
        fes: Fes,
        /// Fatal Error Information.
        fei: u32,
    },
    /// A PDU header arrived with a bad header digest (an H2CTermReq was sent back).
    #[error(
        "header digest mismatch in a PDU from the target: the data was corrupted on the way; reconnect (and check the network path)"
    )]
    HeaderDigest,
    /// The target sent a malformed PDU (an H2CTermReq was sent back).
    #[error(
        "the target broke the NVMe/TCP protocol: {0}; the target is faulty, reconnect or fix it"
    )]
    Protocol(#[source] FatalError),
    /// ICResp refused.
    #[error("ICResp refused: {0}; the target does not speak NVMe/TCP as this host needs")]
    IcResp(&'static str),
    /// A command completed with an error status.
    #[error("{what} failed: {}", status_text(what, status, *dw0))]
    Status {
        /// The command.
        what: &'static str,
        /// Its status.
        status: Status,
        /// DW0 of the completion.
        dw0: u32,
    },
    /// The data of a command arrived with a bad data digest.
    #[error(
        "data digest mismatch on the data of command {cid}: the data was corrupted on the way; retry the command"
    )]
    DataDigest {
        /// Command ID.
        cid: u16,
    },
    /// No answer in time.
    #[error("{what} timed out after {after:?}; the target does not answer, reconnect to go on")]
    Timeout {
        /// What was waited for.
        what: &'static str,
        /// How long.
        after: Duration,
    },
    /// A Keep Alive command was not answered within KATO.
    #[error(
        "Keep Alive not answered within KATO ({kato:?}): the target or the network is down; reconnect to go on"
    )]
    KeepAliveTimeout {
        /// The Keep Alive Timeout.
        kato: Duration,
    },
    /// The queue has no free command slot.
    #[error("the queue is full ({0} commands outstanding); poll for completions first")]
    QueueFull(usize),
    /// The controller is not usable (Identify fields the host needs are wrong).
    #[error("controller not usable: {0}")]
    Controller(String),
    /// The connection failed earlier; the command was lost with it.
    #[error("controller lost: {0}")]
    Lost(String),
}

/// A command's error status in words; Connect's own statuses (Fabrics) with what to do.
fn status_text(what: &str, status: &Status, dw0: u32) -> String {
    use crate::nvmf::fabrics::{connect_data, sc};
    use crate::spec::Sct;
    if what != "Connect" || status.sct != Sct::CommandSpecific {
        return format!("{status:?} (DW0 {dw0:#x})");
    }
    let (in_data, offset) = (dw0 & (1 << 16) != 0, dw0 as u16);
    match status.sc {
        sc::INCOMPATIBLE_FORMAT => "Incompatible Format: the target does not take this Connect".into(),
        sc::CONTROLLER_BUSY => "Controller Busy: the target has no room for this queue now; retry later".into(),
        sc::CONNECT_INVALID_PARAMETERS => {
            let which = match (in_data, offset) {
                (true, connect_data::SUBNQN) => "the target offers no subsystem of this NQN (check subnqn; identify without subnqn lists them)",
                (true, connect_data::HOSTNQN) => "the host NQN (check hostnqn)",
                (true, connect_data::CNTLID) => "the controller ID (the association is gone; reconnect)",
                (true, _) => "a field of the Connect data",
                (false, _) => "a field of the command (queue size or ID)",
            };
            format!("Connect Invalid Parameters (DW0 {dw0:#x}): {which}")
        }
        sc::CONNECT_INVALID_HOST => {
            "Connect Invalid Host: the target does not allow this host NQN (allow it on the target, or pass the allowed one with hostnqn:)".into()
        }
        _ => format!("{status:?} (DW0 {dw0:#x})"),
    }
}

/// What a Fatal Error Status means, in words.
pub(crate) fn fes_reason(fes: Fes) -> &'static str {
    match fes {
        Fes::InvalidHeaderField => "invalid PDU header field",
        Fes::SequenceError => "PDU sequence error",
        Fes::HeaderDigest => "header digest error",
        Fes::DataOutOfRange => "data transfer out of range",
        Fes::DataLimitExceeded => "data transfer limit exceeded",
        Fes::UnsupportedParameter => "unsupported parameter",
        Fes::Other(_) => "unknown fatal error status",
    }
}

impl HostError {
    /// Whether the connection is gone after this error (every later command fails).
    pub fn is_fatal(&self) -> bool {
        !matches!(
            self,
            HostError::Status { .. } | HostError::DataDigest { .. } | HostError::QueueFull(_)
        )
    }
}

/// The error of a failed receive.
pub(crate) fn recv_err(e: RecvError) -> HostError {
    match e {
        RecvError::Closed => HostError::Closed,
        RecvError::Io(e) => HostError::Io(e),
        RecvError::Fatal(f) if f.fes == Fes::HeaderDigest => HostError::HeaderDigest,
        RecvError::Fatal(f) => HostError::Protocol(f),
    }
}

/// The error of a failed connect.
pub(crate) fn connect_err(addr: SocketAddr, source: io::Error) -> HostError {
    if source.kind() == io::ErrorKind::ConnectionRefused {
        HostError::Refused { addr }
    } else {
        HostError::Connect { addr, source }
    }
}
