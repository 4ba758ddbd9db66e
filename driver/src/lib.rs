//! Dioxide: a polled-mode userspace NVMe driver.
//!
//! (Crate documentation is completed as the layers land.)
#![warn(missing_docs)]

pub mod bus;
pub mod dma;
pub mod emulated;
pub mod spec;
pub mod types;
pub mod vfio;

pub use bus::{Bus, Doorbell, DoorbellSink, PciId};
pub use dma::{ChunkSource, DmaBuffer, DmaChunk, DmaError, DmaMemory, DmaSlice};
pub use types::{Cid, Iova, Lba, Nsid, QueueId};
