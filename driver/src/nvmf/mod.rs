//! NVMe over Fabrics on TCP (NVMe/TCP transport binding, TP 8000): a target that serves
//! Dioxide namespaces to any NVMe/TCP host (the Linux kernel's `nvme-tcp` among them), and a
//! host.
//!
//! # Layers
//! * [`pdu`]: the PDUs, strict validation with the Fatal Error Status the specification names
//!   for each violation, CRC-32C header and data digests, an encoder into caller buffers and an
//!   incremental decoder for a non-blocking byte stream that receives PDU data straight into
//!   the caller's buffer.
//! * [`fabrics`]: the Fabrics command set (Connect, Property Get/Set, Disconnect), its status
//!   codes, the SGL descriptors of NVMe/TCP commands, the fabrics fields of Identify
//!   Controller, the discovery log page.
//! * [`backend`]: what a subsystem serves: the [`Backend`] trait (namespaces, data buffers,
//!   asynchronous I/O completed through a per-connection completion queue), a memory backend
//!   and one over [`BlockFile`](crate::BlockFile)s of a [`Dioxide`](crate::Dioxide).
//! * [`target`]: subsystems, controllers (one per association), connections (one per queue),
//!   and [`PollGroup`]s that poll them without ever blocking.
//! * [`host`]: the NVMe/TCP host transport (queues, controllers, discovery); the transport
//!   seam (`transport/`) puts it beside PCIe.
//!
//! # Threads
//! A connection belongs to one poll group and is touched only by the thread polling it; the
//! only state shared between connections is the controller of an association (admin queue and
//! I/O queues may sit on different groups), behind a mutex taken on admin commands and
//! atomics on the I/O path. Backend completions arrive from any thread through a bounded
//! lock-free queue per connection, and wake the group if it sleeps in
//! [`PollGroup::wait`].
//!
//! In an appliance the groups run inside the pinned pollers of a [`Dioxide`](crate::Dioxide)
//! ([`Serving`], SPDK's poll-group model): one group per poller, as a poller task; a
//! connection's I/O goes to its poller's own queue pairs and completes on that thread, and an
//! idle poller sleeps in one `poll(2)` on its group's sockets and its own wake-up eventfd.
//!
//! # Memory a host can make the target hold
//! Per connection: `max_queue_depth` command slots, each with at most one data buffer of at
//! most `max_transfer` bytes (in-capsule data at most `in_capsule`), `max_r2t_per_conn` R2Ts
//! outstanding, a send queue of at most two PDUs per slot (reading stops while it is full),
//! and a fixed staging buffer. Nothing grows with what a host sends.

pub mod backend;
pub mod fabrics;
pub mod host;
pub mod pdu;
pub mod target;

pub use backend::{Backend, BackendIo, BackendOp, FileBackend, IoCompletion, MemBackend, NsInfo};
pub use fabrics::{DISCOVERY_NQN, DiscoveryEntry};
pub use host::{
    DEFAULT_HOSTNQN, HostCompletion, HostController, HostData, HostError, HostOptions, HostQueue,
};
pub use pdu::Digests;
pub use target::group::{ClosedLog, Inbox};
pub use target::{ConnStats, GroupReport, PollGroup, Serving, Subsystem, Target, TargetOptions};

#[cfg(test)]
mod tests;
