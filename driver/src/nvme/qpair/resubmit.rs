//! Submitting from inside a poll: the handle [`QueuePair::poll_resubmit`] gives its closure.
//!
//! The closure cannot be handed the queue pair itself: a poll from inside a poll would consume
//! completion entries behind the outer poll's copy of the CQ position, and a blocking call
//! polls. A [`Resubmit`] offers the submissions only (they touch the SQ, the slots and the
//! waiting queue, never the CQ), so SPDK's pattern, resubmitting from the completion callback
//! and writing the SQ tail doorbell once after the poll, works without giving up safety.

use super::{DmaOwner, IoFlags, IoOp, QueuePair, Rejected};
use crate::bus::dma::DmaSlice;
use crate::nvme::namespace::Namespace;
use crate::types::Lba;

/// Submissions from inside [`QueuePair::poll_resubmit`]'s closure. What is submitted here is
/// on the device after the poll's SQ doorbell write (at once with
/// [`DoorbellMode::PerCommand`](super::DoorbellMode::PerCommand)).
pub struct Resubmit<'a, T> {
    pub(super) qp: &'a mut QueuePair<T>,
}

impl<T> Resubmit<'_, T> {
    /// [`QueuePair::read_raw`].
    ///
    /// # Safety
    /// As for [`QueuePair::read_raw`].
    #[inline]
    pub unsafe fn read_raw(
        &mut self,
        ns: &Namespace,
        lba: Lba,
        buf: DmaSlice,
        ctx: T,
    ) -> core::result::Result<(), Rejected<T>> {
        // SAFETY: the caller's contract is `read_raw`'s.
        unsafe { self.qp.read_raw(ns, lba, buf, ctx) }
    }

    /// [`QueuePair::write_raw`].
    ///
    /// # Safety
    /// As for [`QueuePair::write_raw`].
    #[inline]
    pub unsafe fn write_raw(
        &mut self,
        ns: &Namespace,
        lba: Lba,
        buf: DmaSlice,
        ctx: T,
    ) -> core::result::Result<(), Rejected<T>> {
        // SAFETY: the caller's contract is `write_raw`'s.
        unsafe { self.qp.write_raw(ns, lba, buf, ctx) }
    }

    /// [`QueuePair::submit_raw`].
    ///
    /// # Safety
    /// As for [`QueuePair::submit_raw`].
    #[inline]
    pub unsafe fn submit_raw(
        &mut self,
        op: IoOp,
        ns: &Namespace,
        lba: Lba,
        buf: DmaSlice,
        flags: IoFlags,
        ctx: T,
    ) -> core::result::Result<(), Rejected<T>> {
        // SAFETY: the caller's contract is `submit_raw`'s.
        unsafe { self.qp.submit_raw(op, ns, lba, buf, flags, ctx) }
    }

    /// [`QueuePair::flush`].
    pub fn flush(&mut self, ns: &Namespace, ctx: T) -> core::result::Result<(), Rejected<T>> {
        self.qp.flush(ns, ctx)
    }

    /// Commands on the device.
    pub fn in_flight(&self) -> usize {
        self.qp.in_flight()
    }

    /// Requests taken from the pool.
    pub fn outstanding(&self) -> usize {
        self.qp.outstanding()
    }
}

impl<T: DmaOwner> Resubmit<'_, T> {
    /// [`QueuePair::submit`]: a read or write of the context's buffer.
    pub fn submit(
        &mut self,
        op: IoOp,
        ns: &Namespace,
        lba: Lba,
        flags: IoFlags,
        ctx: T,
    ) -> core::result::Result<(), Rejected<T>> {
        self.qp.submit(op, ns, lba, flags, ctx)
    }
}
