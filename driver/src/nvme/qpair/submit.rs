//! The submission path: the checks of a request (range, block multiple, alignment, room in
//! the pool), splitting at the maximum transfer, the waiting queue for commands the device has
//! no room for, and the copy of each command into the SQ.

use std::sync::atomic::Ordering;

use super::{
    Cmd, DmaOwner, F_CTX, F_HOLDS, F_SYNC, IN_FLIGHT, IoFlags, NIL, PARENT, QueuePair, Rejected,
    WAITING, rejected,
};
use crate::nvme::error::Error;
use crate::nvme::namespace::Namespace;
use crate::nvme::prp;
use crate::spec::sqe::DSM_RANGE_LEN;
use crate::spec::sqe::{DSM_AD, DsmRange, io};
use crate::types::{Iova, Lba, Nsid};

/// The data of a command without a data transfer of its own (Flush, Write Zeroes, Dataset
/// Management).
#[derive(Clone, Copy)]
pub(super) enum SimpleData<'a> {
    /// None.
    None,
    /// Dataset Management ranges, copied into the slot's page.
    Ranges(&'a [(Lba, u32)]),
    /// At this IOVA (at most one page), in memory the command's context owns.
    At(u64),
}

impl<T> QueuePair<T> {
    #[inline]
    pub(super) fn ring_sq(&mut self) {
        // A reset deletes the queue on the device. Its id stays reserved until this pair is
        // dropped (so no new queue pair shares the doorbell), but a stale pair fails early
        // rather than ring a doorbell of a queue the device no longer has.
        if self.shared.generation.load(Ordering::Relaxed) != self.generation {
            self.dead.get_or_insert(self.stale_reason());
            self.countdown = 0; // fail the requests at the end of this poll
            return;
        }
        // The device may complete every command on it once it sees the tail: it must have
        // room for each, besides the entries consumed that it still counts as taken.
        if self.inflight as i32 > self.cq_room {
            self.make_cq_room();
        }
        self.ring.ring_sq();
        self.unrung = 0;
        self.stats.sq_doorbells += 1;
    }

    /// Hands the consumed CQ entries back to the device before commands that need their room
    /// are rung.
    #[cold]
    #[inline(never)]
    fn make_cq_room(&mut self) {
        self.ring_cq();
    }

    // ---------------------------------------------------------------------------------------
    // Submission internals.

    /// The per-I/O submission. The common case (a live queue, `1..=max_transfer` bytes in whole
    /// blocks inside the namespace, a dword-aligned buffer, a free slot) is checked and issued
    /// inline, without a call; anything else, including every error, takes
    /// [`submit_data_general`](Self::submit_data_general), which checks again in the documented
    /// order and reports the first error or splits the request.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn submit_data(
        &mut self,
        opcode: u8,
        ns: &Namespace,
        lba: Lba,
        iova: Iova,
        len: usize,
        cdw12: u32,
        flags: u8,
        ctx: Option<T>,
    ) -> core::result::Result<(), (Error, Option<T>)> {
        let shift = ns.block_shift();
        let blocks = (len >> shift) as u64;
        let ns_blocks = ns.io_blocks();
        // `len - 1 < max_transfer` is `1 <= len <= max_transfer`; `blocks << shift == len`
        // is "a whole number of blocks"; `lba < ns_blocks && blocks <= ns_blocks - lba` is
        // `lba + blocks <= ns_blocks` without overflow.
        if self.dead.is_some()
            || len.wrapping_sub(1) >= self.max_transfer
            || (blocks << shift) as usize != len
            || lba.0 >= ns_blocks
            || blocks > ns_blocks - lba.0
            || iova.0 & 3 != 0
            || self.free_head == NIL
        {
            return self.submit_data_general(opcode, ns, lba, iova, len, cdw12, flags, ctx);
        }
        self.start_data(opcode, ns.nsid(), lba, iova, len, blocks, cdw12, flags, ctx);
        Ok(())
    }

    /// [`submit_data`](Self::submit_data) off the fast path: errors, splits.
    #[cold]
    #[inline(never)]
    #[allow(clippy::too_many_arguments)]
    fn submit_data_general(
        &mut self,
        opcode: u8,
        ns: &Namespace,
        lba: Lba,
        iova: Iova,
        len: usize,
        cdw12: u32,
        flags: u8,
        ctx: Option<T>,
    ) -> core::result::Result<(), (Error, Option<T>)> {
        if let Some(reason) = self.dead {
            return Err((self.dead_error(reason), ctx));
        }
        let shift = ns.block_shift();
        if len & ((1usize << shift) - 1) != 0 || len == 0 {
            return Err((bad_length(ns, len), ctx));
        }
        let blocks = (len >> shift) as u64;
        match lba.0.checked_add(blocks) {
            Some(end) if end <= ns.io_blocks() => {}
            _ => return Err((out_of_range(ns, lba, blocks), ctx)),
        }
        if iova.0 & 3 != 0 {
            return Err((Error::Unaligned { iova }, ctx));
        }
        if len > self.max_transfer {
            return self.submit_split(opcode, ns, lba, iova, len, cdw12, flags, ctx);
        }
        // Every other reason the fast path declined was checked above: the pool is empty.
        debug_assert_eq!(self.free_head, NIL);
        Err((self.exhausted(1), ctx))
    }

    /// Takes a free slot for a checked data command of `blocks` blocks (`1 <= len <=
    /// max_transfer`, dword-aligned IOVA; a free slot exists) and issues or queues it.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn start_data(
        &mut self,
        opcode: u8,
        nsid: Nsid,
        lba: Lba,
        iova: Iova,
        len: usize,
        blocks: u64,
        cdw12: u32,
        flags: u8,
        ctx: Option<T>,
    ) {
        debug_assert!(len >= 1 && len <= self.max_transfer && iova.0 & 3 == 0);
        let Some(idx) = self.pop_free() else {
            unreachable!("the caller checked for a free slot")
        };
        // SAFETY: the slot was free, so no command uses its PRP page; `len <= max_transfer <=
        // MAX_TRANSFER` and the IOVA is dword aligned (checked by the caller).
        let (prp1, prp2) =
            unsafe { prp::build(iova.0, len, self.prp_list(idx), self.prp_list_iova(idx)) };
        let s = self.slot(idx);
        s.opcode = opcode;
        s.flags = flags;
        s.nsid = nsid.0;
        s.cdw10_11 = lba.0;
        if let Some(c) = ctx {
            s.ctx.write(c);
            s.flags |= F_CTX;
        }
        self.stats.submitted += 1;
        self.enqueue(
            idx,
            Cmd {
                opcode,
                nsid: nsid.0,
                prp1,
                prp2,
                cdw10_11: lba.0,
                cdw12: (blocks - 1) as u32 | cdw12,
            },
        );
    }

    #[inline(never)]
    #[allow(clippy::too_many_arguments)]
    fn submit_split(
        &mut self,
        opcode: u8,
        ns: &Namespace,
        lba: Lba,
        iova: Iova,
        total: usize,
        cdw12: u32,
        flags: u8,
        ctx: Option<T>,
    ) -> core::result::Result<(), (Error, Option<T>)> {
        let bs = ns.block_size() as usize;
        let per_child = self.max_transfer & !(bs - 1);
        if per_child == 0 {
            return Err((
                Error::Unsupported {
                    location: self.shared.location.clone(),
                    what: format!(
                        "block size {bs} larger than the maximum transfer {}",
                        self.max_transfer
                    ),
                },
                ctx,
            ));
        }
        let children = total.div_ceil(per_child);
        let needed = children + 1;
        if needed > self.slots.len() || children > u16::MAX as usize {
            return Err((
                Error::RequestTooLarge {
                    qid: self.qid,
                    bytes: total,
                    children,
                    max_transfer: per_child,
                    needed,
                    pool: self.slots.len(),
                },
                ctx,
            ));
        }
        if needed > self.free_count as usize {
            return Err((self.exhausted(needed), ctx));
        }
        let parent = self.pop_free().expect("counted");
        {
            let p = self.slot(parent);
            p.state = PARENT;
            p.opcode = opcode;
            p.flags = flags;
            p.nsid = ns.nsid().0;
            p.cdw10_11 = lba.0;
            p.count = children as u16;
            p.err = None;
            if let Some(c) = ctx {
                p.ctx.write(c);
                p.flags |= F_CTX;
            }
        }
        let child_flags = flags & (F_HOLDS | F_SYNC);
        let shift = ns.block_shift();
        for i in 0..children {
            let off = i * per_child;
            let len = per_child.min(total - off);
            let iova = iova.0 + off as u64;
            let idx = self.pop_free().expect("counted");
            // SAFETY: the slot was free; `len <= per_child <= MAX_TRANSFER`.
            let (prp1, prp2) =
                unsafe { prp::build(iova, len, self.prp_list(idx), self.prp_list_iova(idx)) };
            let s = self.slot(idx);
            s.opcode = opcode;
            s.flags = child_flags;
            s.parent = parent;
            s.count = i as u16;
            s.nsid = ns.nsid().0;
            s.cdw10_11 = lba.0 + (off >> shift) as u64;
            let cmd = Cmd {
                opcode,
                nsid: s.nsid,
                prp1,
                prp2,
                cdw10_11: s.cdw10_11,
                cdw12: ((len >> shift) - 1) as u32 | cdw12,
            };
            self.enqueue(idx, cmd);
        }
        self.stats.submitted += 1;
        self.stats.split_children += children as u64;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn submit_simple(
        &mut self,
        opcode: u8,
        nsid: Nsid,
        cdw10_11: u64,
        cdw12: u32,
        data: SimpleData<'_>,
        ctx: Option<T>,
        flags: u8,
    ) -> core::result::Result<(), (Error, Option<T>)> {
        if let Some(reason) = self.dead {
            return Err((self.dead_error(reason), ctx));
        }
        let Some(idx) = self.pop_free() else {
            return Err((self.exhausted(1), ctx));
        };
        let prp1 = match data {
            SimpleData::None => 0,
            SimpleData::At(iova) => iova,
            SimpleData::Ranges(ranges) => {
                let list = self.prp_list(idx).cast::<DsmRange>();
                for (i, &(lba, nlb)) in ranges.iter().enumerate() {
                    let r = DsmRange {
                        cattr: 0,
                        nlb,
                        slba: lba.0,
                    };
                    // SAFETY: at most 256 ranges of 16 bytes fill the slot's 4 KiB page, which
                    // no command uses (the slot was free).
                    unsafe { list.add(i).write_volatile(r) };
                }
                self.prp_list_iova(idx)
            }
        };
        let s = self.slot(idx);
        s.opcode = opcode;
        s.flags = flags;
        s.nsid = nsid.0;
        s.cdw10_11 = cdw10_11;
        if let Some(c) = ctx {
            s.ctx.write(c);
            s.flags |= F_CTX;
        }
        self.stats.submitted += 1;
        let cmd = Cmd {
            opcode,
            nsid: nsid.0,
            prp1,
            prp2: 0,
            cdw10_11,
            cdw12,
        };
        self.enqueue(idx, cmd);
        Ok(())
    }

    pub(super) fn submit_write_zeroes(
        &mut self,
        ns: &Namespace,
        lba: Lba,
        blocks: u32,
        flags: IoFlags,
        ctx: Option<T>,
        sflags: u8,
    ) -> core::result::Result<(), (Error, Option<T>)> {
        if blocks == 0 {
            return Err((Error::ZeroLength { nsid: ns.nsid() }, ctx));
        }
        if blocks > 65536 {
            return Err((
                Error::InvalidOption {
                    name: "write_zeroes blocks",
                    reason: format!("{blocks} is more than one command's 65536 blocks"),
                },
                ctx,
            ));
        }
        match lba.0.checked_add(blocks as u64) {
            Some(end) if end <= ns.io_blocks() => {}
            _ => return Err((out_of_range(ns, lba, blocks as u64), ctx)),
        }
        let cdw12 = (blocks - 1) | flags.cdw12();
        let data = SimpleData::None;
        self.submit_simple(io::WRITE_ZEROES, ns.nsid(), lba.0, cdw12, data, ctx, sflags)
    }

    pub(super) fn submit_deallocate(
        &mut self,
        ns: &Namespace,
        ranges: &[(Lba, u32)],
        ctx: Option<T>,
        sflags: u8,
    ) -> core::result::Result<(), (Error, Option<T>)> {
        if ranges.is_empty() || ranges.len() > 256 {
            return Err((Error::BadRangeCount(ranges.len()), ctx));
        }
        for &(lba, n) in ranges {
            match lba.0.checked_add(n as u64) {
                Some(end) if end <= ns.io_blocks() => {}
                _ => return Err((out_of_range(ns, lba, n as u64), ctx)),
            }
        }
        let cdw10_11 = (ranges.len() as u64 - 1) | (DSM_AD as u64) << 32;
        self.submit_simple(
            io::DATASET_MANAGEMENT,
            ns.nsid(),
            cdw10_11,
            0,
            SimpleData::Ranges(ranges),
            ctx,
            sflags,
        )
    }

    /// Checks a Dataset Management range list in DMA memory (whole 16-byte ranges, 1 to
    /// 256 of them, one page, inside the namespace) and submits a Deallocate of it.
    fn submit_deallocate_list(
        &mut self,
        ns: &Namespace,
        list: crate::bus::dma::DmaSlice,
        ctx: Option<T>,
        sflags: u8,
    ) -> core::result::Result<(), (Error, Option<T>)> {
        let n = list.len / DSM_RANGE_LEN;
        if list.len % DSM_RANGE_LEN != 0 || n == 0 || n > 256 {
            return Err((Error::BadRangeCount(n), ctx));
        }
        // One PRP entry: the list must not cross a page (dword alignment is the PRP rule).
        if list.iova.0 & 3 != 0 || (list.iova.0 & 0xfff) + list.len as u64 > 0x1000 {
            return Err((Error::Unaligned { iova: list.iova }, ctx));
        }
        for i in 0..n {
            // SAFETY: `list` is a mapped DMA slice of `n * 16` bytes that the caller's context
            // owns; range `i` lies inside it; an unaligned read needs no alignment.
            let r = unsafe {
                list.ptr
                    .as_ptr()
                    .add(i * DSM_RANGE_LEN)
                    .cast::<DsmRange>()
                    .read_unaligned()
            };
            let (slba, nlb) = (u64::from_le(r.slba), u32::from_le(r.nlb));
            match slba.checked_add(nlb as u64) {
                Some(end) if end <= ns.io_blocks() => {}
                _ => return Err((out_of_range(ns, Lba(slba), nlb as u64), ctx)),
            }
        }
        let cdw10_11 = (n as u64 - 1) | (DSM_AD as u64) << 32;
        self.submit_simple(
            io::DATASET_MANAGEMENT,
            ns.nsid(),
            cdw10_11,
            0,
            SimpleData::At(list.iova.0),
            ctx,
            sflags,
        )
    }

    /// Puts a filled slot on the device, or at the back of the waiting queue (which keeps the
    /// command's remaining fields in the slot until it is issued).
    #[inline(always)]
    fn enqueue(&mut self, idx: u16, cmd: Cmd) {
        if self.wait_head == NIL && self.inflight < self.max_inflight {
            self.issue(idx, cmd);
            if self.per_command {
                self.ring_sq();
            }
        } else {
            let s = self.slot(idx);
            s.cdw12 = cmd.cdw12;
            s.prp1 = cmd.prp1;
            s.prp2 = cmd.prp2;
            self.wait(idx);
        }
    }

    /// Appends slot `idx` to the waiting queue.
    #[inline(never)]
    fn wait(&mut self, idx: u16) {
        self.stats.waited += 1;
        let s = self.slot(idx);
        s.state = WAITING;
        s.next = NIL;
        if self.wait_tail == NIL {
            self.wait_head = idx;
        } else {
            let t = self.wait_tail;
            self.slot(t).next = idx;
        }
        self.wait_tail = idx;
    }

    /// Copies the command of slot `idx` into the SQ at the tail: eight volatile 64-bit stores of
    /// words built in registers.
    #[inline(always)]
    fn issue(&mut self, idx: u16, cmd: Cmd) {
        let epoch = self.epoch;
        let s = self.slot(idx);
        s.state = IN_FLIGHT;
        s.epoch = epoch;
        let words = [
            cmd.opcode as u64 | (idx as u64) << 16 | (cmd.nsid as u64) << 32,
            0,
            0,
            cmd.prp1,
            cmd.prp2,
            cmd.cdw10_11,
            cmd.cdw12 as u64,
            0,
        ];
        debug_assert!(self.inflight < self.max_inflight);
        // SAFETY: fewer than `entries - 1` commands are on the device (`inflight <
        // max_inflight`, checked by every caller), so it is not reading the entry at the tail.
        unsafe { self.ring.push(words) };
        self.inflight += 1;
        self.unrung += 1;
    }

    pub(super) fn issue_waiting(&mut self) {
        // A dead queue (stale after a reset, for one) takes nothing more: the waiting requests
        // are failed by the next poll.
        while self.dead.is_none() && self.wait_head != NIL && self.inflight < self.max_inflight {
            let idx = self.wait_head;
            self.wait_head = self.slot(idx).next;
            if self.wait_head == NIL {
                self.wait_tail = NIL;
            }
            let s = self.slot(idx);
            let cmd = Cmd {
                opcode: s.opcode,
                nsid: s.nsid,
                prp1: s.prp1,
                prp2: s.prp2,
                cdw10_11: s.cdw10_11,
                cdw12: s.cdw12,
            };
            self.issue(idx, cmd);
            if self.per_command {
                self.ring_sq();
            }
        }
    }
}

/// Commands whose data the context owns.
impl<T: DmaOwner> QueuePair<T> {
    /// Submits a Dataset Management / Deallocate whose range list (16-byte
    /// [`DsmRange`]s, little endian, 1 to 256, within one page) is the context's buffer, in
    /// this controller's DMA memory. Like [`submit`](Self::submit), the context is handed back
    /// only once the device has let go of the list.
    pub fn deallocate_list(
        &mut self,
        ns: &Namespace,
        ctx: T,
    ) -> core::result::Result<(), Rejected<T>> {
        let list = ctx.dma_slice();
        // SAFETY: `DmaOwner`'s contract: the context owns the list, which stays where it is
        // while the context exists.
        unsafe { self.deallocate_list_held(ns, list, ctx) }
    }
}

impl<T> QueuePair<T> {
    /// [`deallocate_list`](QueuePair::deallocate_list) for a context that does not name its
    /// memory itself: the range list is `list`, checked to lie in this controller's DMA memory,
    /// and `ctx` is handed back only once the device has let go of it.
    ///
    /// # Safety
    /// As for [`submit_held`](QueuePair::submit_held): nothing writes the memory of `list`, and
    /// it stays allocated at the same address until `ctx` comes back (for ever if it never
    /// does); `ctx` need not own it.
    pub unsafe fn deallocate_list_held(
        &mut self,
        ns: &Namespace,
        list: crate::bus::dma::DmaSlice,
        ctx: T,
    ) -> core::result::Result<(), Rejected<T>> {
        if let Err(error) = self.check_owned(&list) {
            return Err(Rejected { error, ctx });
        }
        self.submit_deallocate_list(ns, list, Some(ctx), F_HOLDS)
            .map_err(rejected)
    }
}

impl<T> QueuePair<T> {
    /// Checks that a context's memory lies in this controller's DMA memory at the IOVA it
    /// claims.
    #[inline(always)]
    pub(super) fn check_owned(&mut self, s: &crate::bus::dma::DmaSlice) -> Result<(), Error> {
        let cache = &mut self.chunk_cache;
        match self.dma.translate_cached(cache, s.ptr.as_ptr(), s.len) {
            Some(iova) if iova == s.iova => Ok(()),
            _ => Err(Error::NotDmaMemory {
                ptr: s.ptr.as_ptr() as usize,
                len: s.len,
            }),
        }
    }
}

#[cold]
fn bad_length(ns: &Namespace, len: usize) -> Error {
    if len == 0 {
        Error::ZeroLength { nsid: ns.nsid() }
    } else {
        Error::NotBlockMultiple {
            nsid: ns.nsid(),
            len,
            block_size: ns.block_size(),
        }
    }
}

#[cold]
fn out_of_range(ns: &Namespace, lba: Lba, blocks: u64) -> Error {
    // A namespace refused for I/O has no addressable blocks (`io_blocks` 0): say why.
    if let Err(refused) = ns.check_io() {
        return refused;
    }
    Error::LbaOutOfRange {
        nsid: ns.nsid(),
        lba,
        blocks,
        ns_blocks: ns.blocks(),
    }
}
