//! The controllers an instance serves, on any transport: a PCIe [`Controller`] (VFIO or the
//! emulated bus) or an NVMe/TCP [`TcpController`], as one cheap handle ([`EmbedCtrl`]) that
//! the builder, the pollers and the files share.
//!
//! What the layers above need from a controller is the same on both transports: its
//! namespaces, its limits (maximum transfer, Write Zeroes limit, Identify data), memory for
//! data buffers and the page cache (DMA memory on PCIe; ordinary memory handed out by the same
//! page allocator over NVMe/TCP, see [`TcpController::memory`]), and I/O queues
//! ([`TransportQueue`]). The one thing only TCP needs is the admin housekeeping (the Keep
//! Alive), which poller 0 drives ([`EmbedCtrl::process_admin`]).

use std::sync::Arc;

use crate::bus::dma::{DmaBuffer, DmaMemory};
use crate::embed::error::{EmbedError, EmbedResult};
use crate::nvme::controller::Controller;
use crate::nvme::error::Error;
use crate::nvme::namespace::Namespace;
use crate::nvme::qpair::QueueOptions;
use crate::spec::{Cap, IdentifyController};
use crate::transport::{TcpController, TransportController, TransportError, TransportQueue};

/// A controller of an instance (cheap to clone).
#[derive(Clone, Debug)]
pub(crate) struct EmbedCtrl(Arc<TransportController>);

impl From<TransportController> for EmbedCtrl {
    fn from(c: TransportController) -> Self {
        EmbedCtrl(Arc::new(c))
    }
}

impl EmbedCtrl {
    /// The PCIe controller, if it is one.
    pub(crate) fn pcie(&self) -> Option<&Controller> {
        self.0.pcie()
    }
    /// The NVMe/TCP controller, if it is one.
    pub(crate) fn tcp(&self) -> Option<&TcpController> {
        self.0.tcp()
    }
    /// The usable active namespaces.
    pub(crate) fn namespaces(&self) -> Vec<Namespace> {
        self.0.namespaces()
    }
    /// Memory for data buffers and the page cache.
    pub(crate) fn dma(&self) -> &DmaMemory {
        match &*self.0 {
            TransportController::Pcie(c) => c.dma(),
            TransportController::Tcp(c) => c.memory(),
        }
    }
    /// A zeroed data buffer of `len` bytes for this controller's I/O.
    pub(crate) fn alloc(&self, len: usize) -> Result<DmaBuffer, Error> {
        match &*self.0 {
            TransportController::Pcie(c) => c.alloc(len),
            TransportController::Tcp(c) => c.memory().alloc(len).map_err(|source| Error::Dma {
                what: "an I/O buffer (NVMe/TCP host memory)",
                source,
            }),
        }
    }
    /// Largest transfer of one command in bytes.
    pub(crate) fn max_transfer(&self) -> usize {
        self.0.max_transfer()
    }
    /// Identify Controller.
    pub(crate) fn identify(&self) -> IdentifyController {
        self.0.identify()
    }
    /// CAP.
    pub(crate) fn cap(&self) -> Cap {
        self.0.cap()
    }
    /// The Write Zeroes size limit (Identify Controller for the NVM command set); `None` over
    /// NVMe/TCP, where the host does not read it (the target splits what its device needs).
    pub(crate) fn wzsl(&self) -> Option<u8> {
        match &*self.0 {
            TransportController::Pcie(c) => c.wzsl(),
            TransportController::Tcp(_) => None,
        }
    }
    /// A new I/O queue for a poller.
    pub(crate) fn create_queue<T>(&self, opts: &QueueOptions) -> EmbedResult<TransportQueue<T>> {
        match &*self.0 {
            TransportController::Pcie(c) => Ok(TransportQueue::Pcie(c.create_qpair(opts.clone())?)),
            TransportController::Tcp(c) => Ok(TransportQueue::Tcp(
                c.create_qpair(opts.clone()).map_err(EmbedError::from)?,
            )),
        }
    }
    /// The Keep Alive of an NVMe/TCP controller (nothing on PCIe); an error means the
    /// controller is lost (its queues fail everything outstanding on their next poll). Skipped
    /// while another thread runs an admin command ([`TcpController::try_process_admin`]): a
    /// poller never waits for one.
    pub(crate) fn process_admin(&self) -> Result<(), TransportError> {
        match self.tcp() {
            Some(t) => t.try_process_admin().map(drop),
            None => Ok(()),
        }
    }
}
