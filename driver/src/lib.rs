//! Dioxide: a polled-mode userspace NVMe driver.
//!
//! (Crate documentation is completed as the layers land.)
#![warn(missing_docs)]

pub mod admin;
pub mod bus;
pub mod controller;
pub mod dma;
pub mod emulated;
pub mod error;
pub mod prp;
pub mod qpair;
pub mod spec;
pub mod types;
pub mod vfio;

pub use admin::AbortOutcome;
pub use bus::{Bus, Doorbell, DoorbellSink, PciId};
pub use controller::{Controller, ControllerOptions, InitState, Namespace};
pub use dma::{ChunkSource, DmaBuffer, DmaChunk, DmaError, DmaMemory, DmaSlice};
pub use error::{DeadReason, Error, IoError, ProtocolError, Result};
pub use qpair::{
    DmaOwner, DoorbellMode, IoDone, IoFlags, IoOp, IoResult, QueueOptions, QueuePair, QueueStats,
    Rejected,
};
pub use types::{Cid, Iova, Lba, Nsid, QueueId};
