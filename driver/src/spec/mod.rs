//! The NVMe specification as types: registers, queue entries, status codes, identify pages.
//!
//! Nothing here touches a device: these are values, built and parsed in ordinary memory and
//! moved to and from device or DMA memory by the bus with volatile accesses.

pub mod cqe;
pub mod identify;
pub mod regs;
pub mod sqe;
pub mod status;

pub use cqe::Cqe;
pub use identify::{IdentifyController, IdentifyNamespace, LbaFormat, Oacs, Oncs, SmartLog};
pub use regs::{Aqa, Cap, Cc, Csts, Vs};
pub use sqe::Sqe;
pub use status::{Sct, Status};

/// Size of a submission queue entry as a power of two (64 bytes).
pub const SQES: u32 = 6;
/// Size of a completion queue entry as a power of two (16 bytes).
pub const CQES: u32 = 4;
/// The page size, 4 KiB, and the only definition of it in Dioxide: the memory page size the driver
/// configures (CC.MPS = 0, so PRP entries describe 4 KiB pages and MDTS counts them), the
/// granularity and alignment of DMA memory, and the page of the page cache.
pub const PAGE_SIZE: usize = 4096;
