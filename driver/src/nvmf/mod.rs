//! NVMe over Fabrics on TCP: the NVMe/TCP transport binding (TP 8000).
//!
//! * [`pdu`]: the PDUs, their validation and digests, and the incremental decoder.
pub mod backend;
pub mod fabrics;
pub mod host;
pub mod pdu;
pub mod target;

#[cfg(test)]
mod tests;
