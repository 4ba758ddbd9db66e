//! Transport IDs: the `-r` argument, in SPDK's syntax. The parser lives in the driver
//! (`dioxide::trid`), which `Dioxide::builder` shares; see it for the keys.

pub use dioxide::trid::*;
