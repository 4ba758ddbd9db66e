//! The NVMe/TCP host transport: queues over non-blocking sockets, polled by the thread that
//! owns them.
//!
//! * [`HostQueue`] (`queue.rs`): one TCP connection = one NVMe queue. [`HostQueue::submit`]
//!   (owned buffers) and [`HostQueue::submit_raw`] (the caller's memory, read data lands there
//!   directly) queue a command: write data in-capsule when it fits the queue's in-capsule size
//!   (IOCCSZ), otherwise sent in H2CData PDUs of at most MAXH2CDATA when the target's R2T asks
//!   for it. [`HostQueue::poll`] sends what the socket takes and handles what arrived;
//!   finished commands come out of [`HostQueue::pop`]. [`HostQueue::run`] is the blocking form.
//!   Every command has a time limit (checked on a coarse clock); NVMe/TCP cannot take a
//!   command back, so a late command ends the connection.
//! * [`HostController`] (`controller.rs`): an association. The admin queue is brought up the
//!   way the Linux host does it (ICReq, Fabrics Connect, Property Get CAP, Property Set CC.EN,
//!   wait for CSTS.RDY within CAP.TO, Identify, Number of Queues); I/O queues are connected with
//!   its CNTLID; [`HostController::process_admin`] is the Keep Alive timer (every KATO/2);
//!   discovery reads log page 70h; CC.SHN on [`HostController::shutdown`] or on drop.
//! * [`HostError`] (`error.rs`): every transport failure by name (refused connection, a
//!   C2HTermReq and its reason, header or data digest mismatch, a malformed PDU answered with an
//!   H2CTermReq, Keep Alive timeout, the peer closing), each message saying what to do.
//!
//! After a fatal error every command still outstanding completes exactly once with
//! [`HostError::Lost`] ("controller lost"); reconnecting is the caller's call (a new
//! [`HostController`]). Nothing here spawns a thread: all progress happens in the owner's calls.

mod controller;
mod error;
mod queue;

use std::time::Duration;

pub use controller::HostController;
pub use error::HostError;
pub use queue::{HostCompletion, HostData, HostQueue};

use crate::nvmf::pdu::Digests;

/// How a host connects.
#[derive(Clone, Debug)]
pub struct HostOptions {
    /// NQN of the subsystem.
    pub subnqn: String,
    /// NQN of this host.
    pub hostnqn: String,
    /// Host identifier.
    pub hostid: [u8; 16],
    /// Digests to ask for.
    pub digests: Digests,
    /// Keep Alive Timeout asked for in Connect (ms; 0: none). With one,
    /// [`HostController::process_admin`] must be called every so often.
    pub kato_ms: u32,
    /// Entries of the admin queue.
    pub admin_queue_size: u16,
    /// Time limit of connection set-up and of each blocking call.
    pub timeout: Duration,
    /// Time limit of each command (past it the connection is ended).
    pub command_timeout: Duration,
}

/// The host NQN Dioxide uses unless told otherwise.
pub const DEFAULT_HOSTNQN: &str =
    "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-000000000000";

impl HostOptions {
    /// Options for subsystem `subnqn` with a host NQN and ID of this process.
    pub fn new(subnqn: impl Into<String>) -> HostOptions {
        HostOptions {
            subnqn: subnqn.into(),
            hostnqn: DEFAULT_HOSTNQN.into(),
            hostid: [0x11; 16],
            digests: Digests::default(),
            kato_ms: 0,
            admin_queue_size: 32,
            timeout: Duration::from_secs(10),
            command_timeout: Duration::from_secs(30),
        }
    }
}
