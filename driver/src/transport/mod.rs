//! The transport seam above the queue pair, like SPDK's `nvme_transport`: one controller type
//! ([`TransportController`]) and one I/O queue type ([`TransportQueue`]) over PCIe (the
//! [`Controller`] / [`QueuePair`] of the VFIO and emulated buses) and NVMe/TCP (the host of
//! the NVMe/TCP transport, [`TcpController`] / [`TcpQueue`]).
//!
//! Dispatch is static: each type is an enum with one arm per transport, and each per-I/O call
//! is one `match` whose PCIe arm is the queue pair's own `#[inline]` call, so the PCIe path
//! costs a compare and a branch more than using [`QueuePair`] directly (the queue pair itself
//! is unchanged). Data buffers are [`TransportBuf`]s from [`TransportController::alloc`]: DMA
//! memory for PCIe, ordinary memory for TCP, where read data is received straight into them.
//!
//! What differs between the transports stays visible where it matters: a TCP command that
//! times out ends its connection (NVMe/TCP cannot take a command back), a TCP queue whose
//! connection dies fails every outstanding command once with "controller lost", and
//! [`TransportController::process_admin`] must be called every so often for a TCP controller
//! (it sends the Keep Alive; for PCIe it does nothing).

mod tcp;
pub mod trid;

pub use tcp::{HostBuf, HostChunks, TcpController, TcpOptions, TcpQueue};

use crate::bus::dma::{DmaBuffer, DmaMemory};
use crate::nvme::controller::Controller;
use crate::nvme::error::{Error, IoError};
use crate::nvme::namespace::Namespace;
use crate::nvme::qpair::{IoFlags, IoOp, QueueOptions, QueuePair, Rejected};
use crate::nvmf::HostError;
use crate::spec::identify::{ErrorLogEntry, FirmwareSlotLog};
use crate::spec::{Cap, IdentifyController, SmartLog, Status, Vs};
use crate::types::{Lba, Nsid, QueueId};

/// Why a call on a transport failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// From the PCIe controller or queue pair.
    #[error(transparent)]
    Pcie(#[from] Error),
    /// From the NVMe/TCP host.
    #[error(transparent)]
    Tcp(#[from] HostError),
    /// A request the transport cannot carry (wrong buffer kind, out of the namespace, ...).
    #[error("{0}")]
    Invalid(String),
}

impl TransportError {
    /// Whether the queue's request table was full (retry after a poll frees entries).
    pub fn is_queue_full(&self) -> bool {
        matches!(
            self,
            TransportError::Pcie(Error::PoolExhausted { .. })
                | TransportError::Tcp(HostError::QueueFull(_))
        )
    }
}

/// How a failed I/O request ended.
#[derive(Debug, thiserror::Error)]
pub enum TransportIoError {
    /// On PCIe.
    #[error(transparent)]
    Pcie(#[from] IoError),
    /// Over NVMe/TCP.
    #[error(transparent)]
    Tcp(#[from] HostError),
}

impl TransportIoError {
    /// The NVMe status of the failed command, if the controller gave one.
    pub fn status(&self) -> Option<Status> {
        match self {
            TransportIoError::Pcie(IoError::Status { status, .. }) => Some(*status),
            TransportIoError::Tcp(HostError::Status { status, .. }) => Some(*status),
            _ => None,
        }
    }
    /// Whether the request's buffer may still be written by the device (a PCIe timeout: the
    /// command is still in the device); such a buffer must never be used again.
    pub fn buffer_still_in_use(&self) -> bool {
        matches!(self, TransportIoError::Pcie(IoError::Timeout { .. }))
    }
}

/// A data buffer an I/O queue of its controller can use.
#[derive(Debug)]
pub enum TransportBuf {
    /// DMA memory of a PCIe controller.
    Dma(DmaBuffer),
    /// Ordinary memory (NVMe/TCP).
    Host(HostBuf),
}

impl TransportBuf {
    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        match self {
            TransportBuf::Dma(b) => b.as_slice(),
            TransportBuf::Host(b) => b.as_slice(),
        }
    }
    /// The bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        match self {
            TransportBuf::Dma(b) => b.as_mut_slice(),
            TransportBuf::Host(b) => b.as_mut_slice(),
        }
    }
    /// Length in bytes.
    pub fn len(&self) -> usize {
        match self {
            TransportBuf::Dma(b) => b.len(),
            TransportBuf::Host(b) => b.len(),
        }
    }
    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A controller on any transport.
#[derive(Debug)]
pub enum TransportController {
    /// A PCIe controller (VFIO or emulated bus).
    Pcie(Controller),
    /// An NVMe/TCP controller (boxed: it carries its Identify data).
    Tcp(Box<TcpController>),
}

impl From<Controller> for TransportController {
    fn from(c: Controller) -> Self {
        TransportController::Pcie(c)
    }
}

impl From<TcpController> for TransportController {
    fn from(c: TcpController) -> Self {
        TransportController::Tcp(Box::new(c))
    }
}

impl TransportController {
    /// The PCIe controller, if it is one.
    pub fn pcie(&self) -> Option<&Controller> {
        match self {
            TransportController::Pcie(c) => Some(c),
            TransportController::Tcp(_) => None,
        }
    }
    /// The NVMe/TCP controller, if it is one.
    pub fn tcp(&self) -> Option<&TcpController> {
        match self {
            TransportController::Pcie(_) => None,
            TransportController::Tcp(c) => Some(c),
        }
    }
    /// Identify Controller.
    pub fn identify(&self) -> IdentifyController {
        match self {
            TransportController::Pcie(c) => c.identify(),
            TransportController::Tcp(c) => c.identify().clone(),
        }
    }
    /// CAP (a register on PCIe, a property over fabrics).
    pub fn cap(&self) -> Cap {
        match self {
            TransportController::Pcie(c) => c.cap(),
            TransportController::Tcp(c) => c.cap(),
        }
    }
    /// VS.
    pub fn version(&self) -> Vs {
        match self {
            TransportController::Pcie(c) => c.version(),
            TransportController::Tcp(c) => c.version(),
        }
    }
    /// Largest transfer of one command in bytes.
    pub fn max_transfer(&self) -> usize {
        match self {
            TransportController::Pcie(c) => c.max_transfer(),
            TransportController::Tcp(c) => c.max_transfer(),
        }
    }
    /// I/O queues the controller granted.
    pub fn io_queues(&self) -> u16 {
        match self {
            TransportController::Pcie(c) => c.io_queues(),
            TransportController::Tcp(c) => c.io_queues(),
        }
    }
    /// The usable active namespaces.
    pub fn namespaces(&self) -> Vec<Namespace> {
        match self {
            TransportController::Pcie(c) => c.namespaces(),
            TransportController::Tcp(c) => c.namespaces().to_vec(),
        }
    }
    /// One active namespace.
    pub fn namespace(&self, nsid: Nsid) -> Result<Namespace, TransportError> {
        match self {
            TransportController::Pcie(c) => Ok(c.namespace(nsid)?),
            TransportController::Tcp(c) => c.namespace(nsid),
        }
    }
    /// A data buffer of `len` bytes for this controller's queues.
    pub fn alloc(&self, len: usize) -> Result<TransportBuf, TransportError> {
        match self {
            TransportController::Pcie(c) => Ok(TransportBuf::Dma(c.alloc(len)?)),
            TransportController::Tcp(_) => Ok(TransportBuf::Host(HostBuf::new(len))),
        }
    }
    /// Memory for data buffers as the embedding API hands them out: the DMA memory of a PCIe
    /// controller, host memory for NVMe/TCP ([`TcpController::memory`]).
    pub fn dma(&self) -> &DmaMemory {
        match self {
            TransportController::Pcie(c) => c.dma(),
            TransportController::Tcp(c) => c.memory(),
        }
    }
    /// A new I/O queue (`opts.entries` entries; the other options are PCIe's).
    pub fn create_qpair<T>(&self, opts: QueueOptions) -> Result<TransportQueue<T>, TransportError> {
        match self {
            TransportController::Pcie(c) => Ok(TransportQueue::Pcie(c.create_qpair(opts)?)),
            TransportController::Tcp(c) => Ok(TransportQueue::Tcp(c.create_qpair(opts)?)),
        }
    }
    /// Admin housekeeping to call every so often (about once a second or more often) from one
    /// thread: the Keep Alive of a TCP controller. Nothing on PCIe.
    pub fn process_admin(&self) -> Result<(), TransportError> {
        match self {
            TransportController::Pcie(_) => Ok(()),
            TransportController::Tcp(c) => c.process_admin(),
        }
    }
    /// The SMART / health log.
    pub fn smart_log(&self) -> Result<SmartLog, TransportError> {
        match self {
            TransportController::Pcie(c) => Ok(c.smart_log()?),
            TransportController::Tcp(c) => c.smart_log(),
        }
    }
    /// The firmware slot log.
    pub fn firmware_slot_log(&self) -> Result<FirmwareSlotLog, TransportError> {
        match self {
            TransportController::Pcie(c) => Ok(c.firmware_slot_log()?),
            TransportController::Tcp(c) => c.firmware_slot_log(),
        }
    }
    /// The first `entries` entries of the error log.
    pub fn error_log(&self, entries: usize) -> Result<Vec<ErrorLogEntry>, TransportError> {
        match self {
            TransportController::Pcie(c) => Ok(c.error_log(entries)?),
            TransportController::Tcp(c) => c.error_log(entries),
        }
    }
}

/// A request the queue did not take, with the caller's tag.
#[derive(Debug)]
pub struct TransportRejected<T> {
    /// Why.
    pub error: TransportError,
    /// The tag given to the call.
    pub tag: T,
}

fn pcie_rejected<T>(r: Rejected<T>) -> TransportRejected<T> {
    TransportRejected {
        error: r.error.into(),
        tag: r.ctx,
    }
}

/// An I/O queue on any transport; one thread uses it (`Send`, not `Sync`).
#[derive(Debug)]
pub enum TransportQueue<T> {
    /// A PCIe queue pair.
    Pcie(QueuePair<T>),
    /// An NVMe/TCP I/O queue (one connection).
    Tcp(TcpQueue<T>),
}

impl<T> TransportQueue<T> {
    /// The queue ID.
    pub fn qid(&self) -> QueueId {
        match self {
            TransportQueue::Pcie(q) => q.qid(),
            TransportQueue::Tcp(q) => q.qid(),
        }
    }
    /// Queue entries.
    pub fn entries(&self) -> u16 {
        match self {
            TransportQueue::Pcie(q) => q.entries(),
            TransportQueue::Tcp(q) => q.entries(),
        }
    }
    /// The poll loop's counters of a PCIe queue pair (doorbells, polls, register reads);
    /// `None` over NVMe/TCP, which has no doorbells or registers to count.
    pub fn stats(&self) -> Option<crate::QueueStats> {
        match self {
            TransportQueue::Pcie(q) => Some(q.stats()),
            TransportQueue::Tcp(_) => None,
        }
    }

    /// Requests taken and not yet completed.
    pub fn outstanding(&self) -> usize {
        match self {
            TransportQueue::Pcie(q) => q.outstanding(),
            TransportQueue::Tcp(q) => q.outstanding(),
        }
    }

    /// Queues a read or write of `buf` (whole blocks of `ns`) at `lba`, to complete with
    /// `tag`; nothing is sent until [`ring`](Self::ring) (or the next poll). A request larger
    /// than the controller's MDTS is split into several commands and completes once.
    ///
    /// # Safety
    /// `buf` must come from this queue's controller ([`TransportController::alloc`]), stay
    /// alive, and be neither read nor written by the CPU until the completion carrying `tag`
    /// has been returned by [`poll`](Self::poll) (or the queue dropped); a buffer whose
    /// command failed with [`TransportIoError::buffer_still_in_use`] must never be used again.
    #[inline]
    pub unsafe fn submit_raw(
        &mut self,
        op: IoOp,
        ns: &Namespace,
        lba: Lba,
        buf: &TransportBuf,
        tag: T,
    ) -> Result<(), TransportRejected<T>> {
        // SAFETY: this function's contract is submit_raw_with's.
        unsafe { self.submit_raw_with(op, ns, lba, buf, IoFlags::NONE, tag) }
    }

    /// [`submit_raw`](Self::submit_raw) with per-command flags (FUA).
    ///
    /// # Safety
    /// As [`submit_raw`](Self::submit_raw).
    #[inline]
    pub unsafe fn submit_raw_with(
        &mut self,
        op: IoOp,
        ns: &Namespace,
        lba: Lba,
        buf: &TransportBuf,
        flags: IoFlags,
        tag: T,
    ) -> Result<(), TransportRejected<T>> {
        match (self, buf) {
            (TransportQueue::Pcie(q), TransportBuf::Dma(b)) => {
                // SAFETY: the buffer is this controller's DMA memory and the caller keeps it
                // alive and untouched until the completion (this function's contract).
                unsafe { q.submit_raw(op, ns, lba, b.as_dma_slice(), flags, tag) }
                    .map_err(pcie_rejected)
            }
            // SAFETY: as above; the TCP queue receives into / sends from the buffer's memory.
            (TransportQueue::Tcp(q), TransportBuf::Host(b)) => unsafe {
                q.submit_raw_with(op, ns, lba, b, flags, tag)
            },
            (_, _) => Err(TransportRejected {
                error: TransportError::Invalid(
                    "the buffer was allocated by a controller of another transport".into(),
                ),
                tag,
            }),
        }
    }

    /// Queues a Flush of `ns`.
    pub fn flush(&mut self, ns: &Namespace, tag: T) -> Result<(), TransportRejected<T>> {
        match self {
            TransportQueue::Pcie(q) => q.flush(ns, tag).map_err(pcie_rejected),
            TransportQueue::Tcp(q) => q.flush(ns, tag),
        }
    }

    /// Queues a Write Zeroes of `blocks` blocks of `ns` at `lba` (FUA per `flags`).
    pub fn write_zeroes(
        &mut self,
        ns: &Namespace,
        lba: Lba,
        blocks: u32,
        flags: IoFlags,
        tag: T,
    ) -> Result<(), TransportRejected<T>> {
        match self {
            TransportQueue::Pcie(q) => q
                .write_zeroes(ns, lba, blocks, flags, tag)
                .map_err(pcie_rejected),
            TransportQueue::Tcp(q) => q.write_zeroes(ns, lba, blocks, flags, tag),
        }
    }

    /// Queues a Deallocate (Dataset Management) of `ranges` (LBA, blocks) of `ns`.
    pub fn deallocate(
        &mut self,
        ns: &Namespace,
        ranges: &[(Lba, u32)],
        tag: T,
    ) -> Result<(), TransportRejected<T>> {
        match self {
            TransportQueue::Pcie(q) => q.deallocate(ns, ranges, tag).map_err(pcie_rejected),
            TransportQueue::Tcp(q) => q.deallocate(ns, ranges, tag),
        }
    }

    /// Sends what was queued (the SQ tail doorbell on PCIe, the socket on TCP).
    #[inline]
    pub fn ring(&mut self) {
        match self {
            TransportQueue::Pcie(q) => q.ring(),
            TransportQueue::Tcp(q) => q.ring(),
        }
    }

    /// Reaps up to `max` completions, calling `f(tag, result)` for each; returns how many. On
    /// TCP a dead connection is an error, after every outstanding command was handed to `f`
    /// (failed, exactly once). `usize::MAX` reaps all on both transports; 0 differs (PCIe:
    /// none, TCP: all, as [`TcpQueue::poll`]), so generic code passes a count.
    #[inline]
    pub fn poll<F: FnMut(T, Result<(), TransportIoError>)>(
        &mut self,
        max: usize,
        mut f: F,
    ) -> Result<usize, TransportError> {
        match self {
            TransportQueue::Pcie(q) => Ok(q.poll(max, |t, r| {
                f(t, r.map(|_| ()).map_err(TransportIoError::Pcie))
            })?),
            TransportQueue::Tcp(q) => q.poll(max, f),
        }
    }
}
