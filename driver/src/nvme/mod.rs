//! The NVMe core: controller bring-up and reset, the admin queue, namespaces, I/O queue pairs,
//! PRP construction and the driver's error types. It reaches the device only through the bus
//! seam (`crate::bus`).

pub(crate) mod admin;
pub(crate) mod aer;
pub(crate) mod controller;
pub(crate) mod error;
pub(crate) mod namespace;
pub(crate) mod prp;
pub(crate) mod qpair;
pub(crate) mod ring;
pub(crate) mod shadow;
