//! `dio_complete` as pure functions: the EOF clamp and the error precedence.

use crate::error::{DioError, DioResult};
use crate::request::Dir;

/// Errors gathered while a request ran.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Errors {
    /// Found by the submitter (DMA fault, pool exhausted, mapper error).
    pub submit: Option<DioError>,
    /// The `page_errors` analogue: a DMA fault after blocks were allocated (zeroes written).
    pub deferred: Option<DioError>,
    /// The first device error, in the order completions took the lock.
    pub io: Option<DioError>,
}

impl Errors {
    /// The error the end-io hook is told about: the first by precedence.
    pub fn first(&self) -> Option<DioError> {
        self.submit.or(self.deferred).or(self.io)
    }
}

/// Bytes reported for `handled` bytes: reads are clamped at the `i_size` snapshot taken when
/// the request started (saturating: never underflows), writes are not.
pub fn transferred(dir: Dir, offset: u64, i_size: u64, handled: u64) -> u64 {
    if dir == Dir::Read && handled > 0 && offset.saturating_add(handled) > i_size {
        i_size.saturating_sub(offset)
    } else {
        handled
    }
}

/// The result by precedence: submission ▸ deferred ▸ device ▸ end-io hook ▸ `Ok(transferred)`.
pub fn precedence(errs: Errors, hook: Option<DioError>, transferred: u64) -> DioResult {
    match errs.first().or(hook) {
        Some(e) => Err(e),
        None => Ok(transferred),
    }
}
