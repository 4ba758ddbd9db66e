//! The NVMe/TCP arm of the seam: a [`HostController`] behind a mutex (admin commands and the
//! Keep Alive from any thread), with its namespaces read at connect time, and I/O queues that
//! map the caller's tags onto the host queue's command slots. As on a PCIe queue pair, a
//! read or write above MDTS is split into several commands that complete as one request, and
//! the ID of a dropped queue goes to the next queue created (once the target let go of it).
//!
//! Data buffers of the embedding API ([`DmaBuffer`](crate::DmaBuffer)s, the page cache) come
//! from [`TcpController::memory`]: ordinary memory handed out by the same page allocator as
//! DMA memory ([`DmaMemory`] over a [`HostChunks`] source, whose "IOVA" is the address), so
//! the file layer works unchanged; the queue receives read data straight into it.
//!
//! When the Keep Alive fails, or any I/O connection ends, the controller is lost: a flag every
//! [`TcpQueue`] checks on each poll (one relaxed load) makes the other I/O queues end their
//! connections too (as Linux's host tears the whole association down), so every outstanding
//! command of the association ends once with "controller lost".

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{TransportError, TransportIoError, TransportRejected};
use crate::bus::dma::{ChunkSource, DmaChunk, DmaMemory};
use crate::nvme::namespace::Namespace;
use crate::nvme::qpair::{IoFlags, IoOp, QueueOptions};
use crate::nvmf::fabrics::DiscoveryEntry;
use crate::nvmf::{HostController, HostError, HostOptions, HostQueue};
use crate::spec::identify::{
    ERROR_LOG_ENTRY_LEN, ErrorLogEntry, FIRMWARE_SLOT_LOG_LEN, FirmwareSlotLog, SMART_LOG_LEN,
};
use crate::spec::sqe::{DSM_RANGE_LEN, io, lid};
use crate::spec::{Cap, IdentifyController, SmartLog, Sqe, Vs};
use crate::types::{Iova, Lba, Nsid, QueueId};

/// Default I/O queue entries when the options say 0.
const DEFAULT_ENTRIES: u16 = 128;

/// Options of a [`TcpController`]: the host's, plus the target's address.
#[derive(Clone, Debug)]
pub struct TcpOptions {
    /// The target.
    pub addr: SocketAddr,
    /// How the host connects (subsystem NQN, host NQN, KATO, digests, time limits).
    pub host: HostOptions,
}

#[derive(Debug, Default)]
struct Lost {
    flag: AtomicBool,
    why: Mutex<String>,
}

impl Lost {
    fn set(&self, why: String) {
        *self.why.lock().unwrap_or_else(|p| p.into_inner()) = why;
        self.flag.store(true, Ordering::Release);
    }
    fn why(&self) -> String {
        self.why.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Bytes of one chunk of [`HostChunks`] (larger requests get a chunk of their own size).
const HOST_CHUNK: usize = 2 << 20;

/// A [`ChunkSource`] of ordinary, page-aligned heap memory for NVMe/TCP data: nothing is
/// pinned or mapped for a device (the host copies to and from the socket), and a chunk's
/// "IOVA" is its address.
#[derive(Debug, Default)]
pub struct HostChunks;

impl HostChunks {
    fn layout(len: usize) -> Result<std::alloc::Layout, std::alloc::LayoutError> {
        std::alloc::Layout::from_size_align(len, crate::spec::PAGE_SIZE)
    }
}

impl ChunkSource for HostChunks {
    fn name(&self) -> &'static str {
        "host memory (NVMe/TCP)"
    }
    fn map_chunk(
        &self,
        min_len: usize,
    ) -> Result<DmaChunk, Box<dyn std::error::Error + Send + Sync>> {
        let len = min_len
            .max(1)
            .div_ceil(HOST_CHUNK)
            .checked_mul(HOST_CHUNK)
            .ok_or_else(|| {
                format!("{min_len} bytes of NVMe/TCP buffers: larger than the address space; ask for less")
            })?;
        let layout = Self::layout(len)?;
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        let vaddr = NonNull::new(p).ok_or_else(|| {
            format!("out of memory: {len} bytes for NVMe/TCP buffers; use a smaller page cache")
        })?;
        Ok(DmaChunk {
            vaddr,
            iova: Iova(p as u64),
            len,
        })
    }
    unsafe fn unmap_chunk(&self, chunk: DmaChunk) {
        if let Ok(layout) = Self::layout(chunk.len) {
            // SAFETY: the chunk came from `alloc_zeroed` with this layout (map_chunk) and is
            // freed once, with no buffer in it used afterwards (the caller's contract).
            unsafe { std::alloc::dealloc(chunk.vaddr.as_ptr(), layout) };
        }
    }
}

/// An NVMe/TCP controller as a transport: an association with its admin queue.
#[derive(Debug)]
pub struct TcpController {
    host: Mutex<HostController>,
    addr: SocketAddr,
    subnqn: String,
    identify: IdentifyController,
    cap: Cap,
    vs: Vs,
    max_transfer: usize,
    discovery: bool,
    namespaces: Vec<Namespace>,
    lost: Arc<Lost>,
    /// Queue IDs given back by dropped queues (the lowest is used first).
    released: Arc<Mutex<BTreeSet<u16>>>,
    memory: DmaMemory,
}

impl TcpController {
    /// Connects and brings the controller up; reads its active namespaces (none for a
    /// discovery controller).
    pub fn connect(opts: TcpOptions) -> Result<TcpController, TransportError> {
        let subnqn = opts.host.subnqn.clone();
        let mut host = HostController::connect(opts.addr, opts.host)?;
        let discovery = host.is_discovery();
        let mut namespaces = Vec::new();
        if !discovery {
            for n in host.active_namespaces()? {
                let id = host.identify_namespace(n)?;
                match Namespace::new(Nsid(n), id) {
                    Some(ns) => namespaces.push(ns),
                    None => log::warn!(
                        "nvmf host: namespace {n} of {subnqn} has an unusable format or size; skipped"
                    ),
                }
            }
        }
        Ok(TcpController {
            addr: opts.addr,
            subnqn,
            identify: host.identify().clone(),
            cap: host.cap(),
            vs: host.version(),
            max_transfer: host.max_transfer(),
            discovery,
            namespaces,
            host: Mutex::new(host),
            lost: Arc::new(Lost::default()),
            released: Arc::default(),
            memory: DmaMemory::new(Box::new(HostChunks)),
        })
    }

    fn host(&self) -> MutexGuard<'_, HostController> {
        self.host.lock().unwrap_or_else(|p| p.into_inner())
    }
    /// The target's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    /// The subsystem NQN.
    pub fn subnqn(&self) -> &str {
        &self.subnqn
    }
    /// Whether it is a discovery controller.
    pub fn is_discovery(&self) -> bool {
        self.discovery
    }
    /// Identify Controller.
    pub fn identify(&self) -> &IdentifyController {
        &self.identify
    }
    /// CAP.
    pub fn cap(&self) -> Cap {
        self.cap
    }
    /// VS.
    pub fn version(&self) -> Vs {
        self.vs
    }
    /// Largest transfer of one command in bytes.
    pub fn max_transfer(&self) -> usize {
        self.max_transfer
    }
    /// The usable active namespaces.
    pub fn namespaces(&self) -> &[Namespace] {
        &self.namespaces
    }
    /// One of them.
    pub fn namespace(&self, nsid: Nsid) -> Result<Namespace, TransportError> {
        self.namespaces
            .iter()
            .find(|n| n.nsid() == nsid)
            .cloned()
            .ok_or_else(|| {
                TransportError::Invalid(format!(
                    "namespace {nsid} is not an active, usable namespace of {} at {}; list them with identify",
                    self.subnqn, self.addr
                ))
            })
    }
    /// I/O queues the target granted (Set Features Number of Queues at bring-up).
    pub fn io_queues(&self) -> u16 {
        self.host().io_queue_count()
    }
    /// Memory for the data of this controller's I/O as the embedding API hands it out
    /// ([`DmaBuffer`](crate::DmaBuffer)s of ordinary memory; see the module docs).
    pub fn memory(&self) -> &DmaMemory {
        &self.memory
    }
    /// Why the controller was lost, if it was.
    pub fn lost(&self) -> Option<String> {
        self.lost
            .flag
            .load(Ordering::Acquire)
            .then(|| self.lost.why())
    }

    /// Connects a new I/O queue of `opts.entries` entries (0: 128), at most MQES + 1.
    pub fn create_qpair<T>(&self, opts: QueueOptions) -> Result<TcpQueue<T>, TransportError> {
        if let Some(why) = self.lost() {
            return Err(HostError::Lost(why).into());
        }
        let max = (self.cap.mqes() as u32 + 1).min(u16::MAX as u32) as u16;
        let entries = match opts.entries {
            0 => DEFAULT_ENTRIES,
            n => n,
        }
        .clamp(2, max.max(2));
        let reused = self
            .released
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_first();
        let mut host = self.host();
        let q = match reused {
            None => host.io_queue(entries)?,
            Some(qid) => match host.io_queue_at(qid, entries) {
                Ok(q) => q,
                Err(e) => {
                    // The target may not have let go of it yet: a new ID, if one is left.
                    log::debug!("nvmf host: queue ID {qid} not reusable yet: {e}");
                    self.released
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(qid);
                    host.io_queue(entries)?
                }
            },
        };
        drop(host);
        let requests = (opts.requests as usize).max(entries as usize);
        Ok(TcpQueue::new(
            q,
            entries,
            requests,
            self.max_transfer,
            self.lost.clone(),
            self.released.clone(),
        ))
    }

    /// The Keep Alive timer ([`HostController::process_admin`]); a failure marks the whole
    /// controller lost (its I/O queues end their connections on their next poll).
    pub fn process_admin(&self) -> Result<(), TransportError> {
        if let Some(why) = self.lost() {
            return Err(HostError::Lost(why).into());
        }
        self.keep_alive(self.host())
    }

    fn keep_alive(&self, mut host: MutexGuard<'_, HostController>) -> Result<(), TransportError> {
        let r = host.process_admin();
        drop(host);
        if let Err(e) = &r {
            if e.is_fatal() {
                self.lost.set(e.to_string());
            }
        }
        Ok(r?)
    }

    /// [`process_admin`](Self::process_admin) unless another thread is using the admin queue
    /// (a blocking admin command such as [`smart_log`](Self::smart_log)): then nothing is done
    /// and the answer is `Ok(false)`, so a poller never waits for an admin command; try again
    /// on the next tick.
    pub fn try_process_admin(&self) -> Result<bool, TransportError> {
        if let Some(why) = self.lost() {
            return Err(HostError::Lost(why).into());
        }
        let host = match self.host.try_lock() {
            Ok(h) => h,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return Ok(false),
        };
        self.keep_alive(host).map(|()| true)
    }

    /// Holds the admin queue as a blocking admin command does (tests of the poller's skip).
    #[cfg(test)]
    pub(crate) fn hold_admin(&self) -> MutexGuard<'_, HostController> {
        self.host()
    }

    /// The discovery log page entries (a discovery controller).
    pub fn discover(&self) -> Result<Vec<DiscoveryEntry>, TransportError> {
        Ok(self.host().discover()?)
    }

    fn log(&self, lid: u8, len: usize) -> Result<Vec<u8>, TransportError> {
        Ok(self.host().log_page(lid, 0xffff_ffff, len as u32, 0)?)
    }
    /// The SMART / health log.
    pub fn smart_log(&self) -> Result<SmartLog, TransportError> {
        let b = self.log(lid::SMART, SMART_LOG_LEN)?;
        let page: &[u8; SMART_LOG_LEN] = b[..]
            .try_into()
            .map_err(|_| TransportError::Invalid("short SMART log".into()))?;
        Ok(SmartLog::from_bytes(page))
    }
    /// The firmware slot log.
    pub fn firmware_slot_log(&self) -> Result<FirmwareSlotLog, TransportError> {
        let b = self.log(lid::FIRMWARE_SLOT, FIRMWARE_SLOT_LOG_LEN)?;
        let page: &[u8; FIRMWARE_SLOT_LOG_LEN] = b[..]
            .try_into()
            .map_err(|_| TransportError::Invalid("short firmware slot log".into()))?;
        Ok(FirmwareSlotLog::from_bytes(page))
    }
    /// The first `entries` entries of the error log.
    pub fn error_log(&self, entries: usize) -> Result<Vec<ErrorLogEntry>, TransportError> {
        let n = entries.clamp(1, 128);
        let b = self.log(lid::ERROR, n * ERROR_LOG_ENTRY_LEN)?;
        Ok(b.chunks_exact(ERROR_LOG_ENTRY_LEN)
            .map(ErrorLogEntry::from_bytes)
            .collect())
    }
}

/// A command waiting for a free command slot of the connection.
struct Waiting {
    sqe: Sqe,
    ptr: NonNull<u8>,
    len: usize,
    out: bool,
    slot: u32,
}

/// One request of the table: the caller's tag, and for a request split into several
/// commands (larger than MDTS), how many are still out and the first failure.
struct Request<T> {
    tag: Option<T>,
    pending: u32,
    error: Option<TransportIoError>,
    /// Data the queue owns until the request completes (a Deallocate's range list).
    keep: Option<Box<[u8]>>,
}

/// An NVMe/TCP I/O queue: one connection; the caller's tags ride in a request table
/// (`QueueOptions::requests`, at least the queue's entries). Requests beyond the commands the
/// connection may have outstanding wait in order, in software, as on a PCIe queue pair; a
/// read or write larger than the controller's MDTS is split into MDTS-sized commands and
/// completes once, when all of them did (with the first failure, if any).
///
/// Dropping the queue ends its connection and waits (briefly) for the target to close its
/// side, which it does once it let go of the queue ID: the ID is then handed to the next
/// queue the controller creates, as a PCIe queue pair's ID is after Delete SQ / CQ.
pub struct TcpQueue<T> {
    q: HostQueue,
    reqs: Vec<Request<T>>,
    free: Vec<u32>,
    waiting: std::collections::VecDeque<Waiting>,
    entries: u16,
    max_transfer: usize,
    lost: Arc<Lost>,
    released: Arc<Mutex<BTreeSet<u16>>>,
}

/// How long dropping a [`TcpQueue`] waits for the target to close the connection.
const CLOSE_LIMIT: Duration = Duration::from_millis(500);

// SAFETY: the raw pointers of waiting requests name memory given under submit_raw's contract
// (valid and untouched by others until the completion); the queue is used by one thread at a
// time (`&mut self`), and moving it moves that use along; the tags are `T: Send`.
unsafe impl<T: Send> Send for TcpQueue<T> {}

impl<T> core::fmt::Debug for TcpQueue<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("TcpQueue")
            .field("qid", &self.q.qid())
            .field("entries", &self.entries)
            .finish()
    }
}

impl<T> TcpQueue<T> {
    fn new(
        q: HostQueue,
        entries: u16,
        requests: usize,
        max_transfer: usize,
        lost: Arc<Lost>,
        released: Arc<Mutex<BTreeSet<u16>>>,
    ) -> TcpQueue<T> {
        let n = requests.max(q.slots());
        TcpQueue {
            q,
            reqs: (0..n)
                .map(|_| Request {
                    tag: None,
                    pending: 0,
                    error: None,
                    keep: None,
                })
                .collect(),
            free: (0..n as u32).rev().collect(),
            waiting: std::collections::VecDeque::new(),
            entries,
            max_transfer,
            lost,
            released,
        }
    }
    /// The queue ID.
    pub fn qid(&self) -> QueueId {
        QueueId(self.q.qid())
    }
    /// Entries.
    pub fn entries(&self) -> u16 {
        self.entries
    }
    /// Commands outstanding.
    pub fn outstanding(&self) -> usize {
        self.reqs.len() - self.free.len()
    }
    /// The host queue underneath.
    pub fn host_queue(&mut self) -> &mut HostQueue {
        &mut self.q
    }

    /// Queues a read or write of `buf` (whole blocks of `ns`) at `lba`.
    ///
    /// # Safety
    /// `buf`'s memory must stay alive, and must be neither read nor written by anyone else
    /// (for a write: not written), until the completion carrying `tag` has been returned by
    /// [`poll`](Self::poll) or the queue dropped.
    pub unsafe fn submit_raw(
        &mut self,
        op: IoOp,
        ns: &Namespace,
        lba: Lba,
        buf: &HostBuf,
        tag: T,
    ) -> Result<(), TransportRejected<T>> {
        // SAFETY: this function's contract is submit_raw_with's.
        unsafe { self.submit_raw_with(op, ns, lba, buf, IoFlags::NONE, tag) }
    }

    /// [`submit_raw`](Self::submit_raw) with per-command flags (FUA).
    ///
    /// # Safety
    /// As [`submit_raw`](Self::submit_raw).
    pub unsafe fn submit_raw_with(
        &mut self,
        op: IoOp,
        ns: &Namespace,
        lba: Lba,
        buf: &HostBuf,
        flags: IoFlags,
        tag: T,
    ) -> Result<(), TransportRejected<T>> {
        let reject = |error: TransportError, tag: T| Err(TransportRejected { error, tag });
        let len = buf.len();
        let bs = ns.block_size() as usize;
        if len == 0 || len % bs != 0 {
            return reject(
                TransportError::Invalid(format!(
                    "a transfer of {len} bytes is not whole {bs}-byte blocks of namespace {}",
                    ns.nsid()
                )),
                tag,
            );
        }
        let blocks = (len / bs) as u64;
        if lba
            .0
            .checked_add(blocks)
            .is_none_or(|end| end > ns.io_blocks())
        {
            return reject(
                TransportError::Invalid(format!(
                    "{blocks} blocks at LBA {} are beyond namespace {} ({} usable blocks)",
                    lba.0,
                    ns.nsid(),
                    ns.io_blocks()
                )),
                tag,
            );
        }
        let (opcode, out) = match op {
            IoOp::Read => (io::READ, false),
            IoOp::Write => (io::WRITE, true),
        };
        // One command carries at most MDTS (a whole number of blocks: MDTS is a power of two
        // of at least 4 KiB, a block one of at most 4 KiB) and 65536 blocks.
        let child = (self.max_transfer / bs).clamp(1, 65536) * bs;
        if len <= child {
            let sqe = Sqe::rw(opcode, ns.nsid().0, lba.0, blocks as u32, flags.fua);
            // SAFETY: the caller's contract (this function's) covers the buffer's memory.
            return unsafe { self.submit_sqe(sqe, buf.ptr, len, out, tag) };
        }
        if let Some(why) = self.q.lost() {
            return reject(HostError::Lost(why.to_owned()).into(), tag);
        }
        let Some(slot) = self.free.pop() else {
            return reject(HostError::QueueFull(self.reqs.len()).into(), tag);
        };
        let children = len.div_ceil(child);
        let r = &mut self.reqs[slot as usize];
        r.tag = Some(tag);
        r.pending = children as u32;
        r.error = None;
        r.keep = None;
        for i in 0..children {
            let off = i * child;
            let n = child.min(len - off);
            let sqe = Sqe::rw(
                opcode,
                ns.nsid().0,
                lba.0 + (off / bs) as u64,
                (n / bs) as u32,
                flags.fua,
            );
            // SAFETY: `off + n <= len`: the pointer stays inside the caller's buffer.
            let ptr = unsafe { NonNull::new_unchecked(buf.ptr.as_ptr().add(off)) };
            // The caller's contract covers the wait, as in submit_sqe.
            self.waiting.push_back(Waiting {
                sqe,
                ptr,
                len: n,
                out,
                slot,
            });
        }
        self.start_waiting();
        Ok(())
    }

    /// Queues any I/O command `sqe` whose data (`len` bytes at `ptr`, 0 for none) is written
    /// to the controller if `out`, else read into `ptr`.
    ///
    /// # Safety
    /// As [`submit_raw`](Self::submit_raw): the `len` bytes at `ptr` stay valid and untouched
    /// by anyone else (for an `out` command: not written) until the completion carrying `tag`
    /// has been returned by [`poll`](Self::poll) or the queue dropped.
    pub(crate) unsafe fn submit_sqe(
        &mut self,
        sqe: Sqe,
        ptr: NonNull<u8>,
        len: usize,
        out: bool,
        tag: T,
    ) -> Result<(), TransportRejected<T>> {
        // SAFETY: this function's contract is submit_keep's, with nothing kept.
        unsafe { self.submit_keep(sqe, ptr, len, out, None, tag) }
    }

    /// [`submit_sqe`](Self::submit_sqe) that also holds `keep` (which `ptr` may point into)
    /// until the request completes.
    ///
    /// # Safety
    /// As [`submit_sqe`](Self::submit_sqe) for memory outside `keep`.
    unsafe fn submit_keep(
        &mut self,
        sqe: Sqe,
        ptr: NonNull<u8>,
        len: usize,
        out: bool,
        keep: Option<Box<[u8]>>,
        tag: T,
    ) -> Result<(), TransportRejected<T>> {
        let reject = |error: TransportError, tag: T| Err(TransportRejected { error, tag });
        let Some(slot) = self.free.pop() else {
            return reject(HostError::QueueFull(self.reqs.len()).into(), tag);
        };
        let r = &mut self.reqs[slot as usize];
        r.pending = 1;
        r.error = None;
        // A boxed slice's heap memory does not move with the box.
        r.keep = keep;
        let w = Waiting {
            sqe,
            ptr,
            len,
            out,
            slot,
        };
        if !self.waiting.is_empty() || self.q.outstanding() >= self.q.slots() {
            // The caller's contract covers the wait: the memory stays valid until the
            // completion, which comes after the command was sent or failed.
            self.reqs[slot as usize].tag = Some(tag);
            self.waiting.push_back(w);
            return Ok(());
        }
        match self.send_one(w) {
            Ok(()) => {
                self.reqs[slot as usize].tag = Some(tag);
                Ok(())
            }
            Err(e) => {
                self.reqs[slot as usize].keep = None;
                self.free.push(slot);
                reject(e.into(), tag)
            }
        }
    }

    /// Queues a Flush of `ns`.
    pub fn flush(&mut self, ns: &Namespace, tag: T) -> Result<(), TransportRejected<T>> {
        // SAFETY: a Flush moves no data.
        unsafe { self.submit_sqe(Sqe::flush(ns.nsid().0), NonNull::dangling(), 0, false, tag) }
    }

    /// Queues a Write Zeroes of `blocks` (1..=65536) blocks of `ns` at `lba` (FUA per `flags`).
    pub fn write_zeroes(
        &mut self,
        ns: &Namespace,
        lba: Lba,
        blocks: u32,
        flags: IoFlags,
        tag: T,
    ) -> Result<(), TransportRejected<T>> {
        if let Err(e) = check_range(ns, lba, blocks as u64, "Write Zeroes") {
            return Err(TransportRejected { error: e, tag });
        }
        let sqe = Sqe::write_zeroes(ns.nsid().0, lba.0, blocks, flags.fua);
        // SAFETY: a Write Zeroes moves no data.
        unsafe { self.submit_sqe(sqe, NonNull::dangling(), 0, false, tag) }
    }

    /// Queues a Dataset Management Deallocate of `ranges` (1..=256 of (LBA, blocks)).
    pub fn deallocate(
        &mut self,
        ns: &Namespace,
        ranges: &[(Lba, u32)],
        tag: T,
    ) -> Result<(), TransportRejected<T>> {
        let reject = |error: TransportError, tag: T| Err(TransportRejected { error, tag });
        if ranges.is_empty() || ranges.len() > 256 {
            return reject(
                TransportError::Invalid(format!(
                    "a Deallocate of {} ranges; give 1 to 256",
                    ranges.len()
                )),
                tag,
            );
        }
        let mut list = vec![0u8; ranges.len() * DSM_RANGE_LEN].into_boxed_slice();
        for (&(lba, nlb), r) in ranges.iter().zip(list.chunks_exact_mut(DSM_RANGE_LEN)) {
            if let Err(e) = check_range(ns, lba, nlb as u64, "Deallocate") {
                return reject(e, tag);
            }
            r[4..8].copy_from_slice(&nlb.to_le_bytes());
            r[8..16].copy_from_slice(&lba.0.to_le_bytes());
        }
        let sqe = Sqe::dsm_deallocate(ns.nsid().0, ranges.len() as u32, 0);
        let (ptr, len) = (NonNull::from(&mut list[..]).cast::<u8>(), list.len());
        // SAFETY: the list is kept by the request until it completes.
        unsafe { self.submit_keep(sqe, ptr, len, true, Some(list), tag) }
    }

    /// Why the connection ended, if it did.
    pub fn lost(&self) -> Option<&str> {
        self.q.lost()
    }

    fn send_one(&mut self, w: Waiting) -> Result<(), HostError> {
        // SAFETY: the buffer's memory is valid for `len` bytes and the caller keeps it alive and
        // untouched until the completion (submit_raw's contract), which the host queue hands
        // back (by `pop`) before `poll` returns it.
        unsafe { self.q.submit_raw(w.sqe, w.ptr, w.len, w.out, w.slot as u64) }.map(|_| ())
    }

    /// Moves waiting requests into free command slots.
    fn start_waiting(&mut self) {
        while self.q.outstanding() < self.q.slots() {
            let Some(w) = self.waiting.pop_front() else {
                return;
            };
            if let Err(e) = self.send_one_or_back(w) {
                // Only a dead connection refuses now; poll ends what waits.
                log::debug!("nvmf host: a waiting request stays queued: {e}");
                return;
            }
        }
    }

    fn send_one_or_back(&mut self, w: Waiting) -> Result<(), HostError> {
        let (sqe, ptr, len, out, slot) = (w.sqe, w.ptr, w.len, w.out, w.slot);
        self.send_one(w).inspect_err(|_| {
            self.waiting.push_front(Waiting {
                sqe,
                ptr,
                len,
                out,
                slot,
            })
        })
    }

    /// Sends what was queued (waiting requests stay for a poll to free slots).
    pub fn ring(&mut self) {
        // A failure kills the connection; the next poll reports it.
        let _ = self.q.send_now();
    }

    /// One command of request `slot` ended with `r`: the request completes (to `f`) when it
    /// was its last; true if it did.
    fn child_done<F: FnMut(T, Result<(), TransportIoError>)>(
        &mut self,
        slot: usize,
        r: Result<(), TransportIoError>,
        f: &mut F,
    ) -> bool {
        let Some(req) = self.reqs.get_mut(slot) else {
            return false;
        };
        if req.tag.is_none() {
            return false;
        }
        if let Err(e) = r {
            req.error.get_or_insert(e);
        }
        req.pending = req.pending.saturating_sub(1);
        if req.pending > 0 {
            return false;
        }
        let (Some(tag), error) = (req.tag.take(), req.error.take()) else {
            return false;
        };
        req.keep = None;
        self.free.push(slot as u32);
        f(tag, error.map_or(Ok(()), Err));
        true
    }

    /// The next finished command: `None` if there is none, else whether a request completed.
    fn deliver<F: FnMut(T, Result<(), TransportIoError>)>(&mut self, f: &mut F) -> Option<bool> {
        let c = self.q.pop()?;
        let r = match c.result {
            Ok(cqe) if cqe.status().is_success() => Ok(()),
            Ok(cqe) => Err(TransportIoError::Tcp(HostError::Status {
                what: "I/O command",
                status: cqe.status(),
                dw0: cqe.dw0,
            })),
            Err(e) => Err(TransportIoError::Tcp(e)),
        };
        Some(self.child_done(c.tag as usize, r, f))
    }

    /// Sends and receives without blocking, then hands up to `max` (0: all) completions to
    /// `f`. A dead connection (or a lost controller) is an error, returned after every
    /// outstanding command was handed to `f`, failed, exactly once.
    pub fn poll<F: FnMut(T, Result<(), TransportIoError>)>(
        &mut self,
        max: usize,
        mut f: F,
    ) -> Result<usize, TransportError> {
        if self.lost.flag.load(Ordering::Relaxed) && self.q.lost().is_none() {
            let e = HostError::Controller(format!("the admin queue failed: {}", self.lost.why()));
            self.q.kill(&e);
        }
        let r = self.q.poll();
        let max = if max == 0 { usize::MAX } else { max };
        let mut n = 0;
        if r.is_ok() {
            while n < max {
                match self.deliver(&mut f) {
                    None => break,
                    Some(done) => n += usize::from(done),
                }
            }
            if !self.waiting.is_empty() {
                self.start_waiting();
                let _ = self.q.send_now();
            }
            return Ok(n);
        }
        // The association is lost with any of its connections (as Linux's host resets the
        // whole controller): the other queues end theirs on their next poll, and the admin
        // housekeeping reports it.
        if !self.lost.flag.load(Ordering::Acquire) {
            if let Err(e) = &r {
                self.lost.set(format!("I/O queue {}: {e}", self.q.qid()));
            }
        }
        while let Some(done) = self.deliver(&mut f) {
            n += usize::from(done);
        }
        // Commands that never got a command slot end too; each request once.
        let why = self.q.lost().unwrap_or("the connection failed").to_owned();
        while let Some(w) = self.waiting.pop_front() {
            let lost = Err(TransportIoError::Tcp(HostError::Lost(why.clone())));
            n += usize::from(self.child_done(w.slot as usize, lost, &mut f));
        }
        r.map(|_| n).map_err(TransportError::from)
    }
}

/// `blocks` (1..=65536) blocks at `lba` within `ns`, for command `what`.
fn check_range(ns: &Namespace, lba: Lba, blocks: u64, what: &str) -> Result<(), TransportError> {
    if blocks == 0 || blocks > 65536 {
        return Err(TransportError::Invalid(format!(
            "a {what} of {blocks} blocks; give 1 to 65536"
        )));
    }
    if lba
        .0
        .checked_add(blocks)
        .is_none_or(|end| end > ns.io_blocks())
    {
        return Err(TransportError::Invalid(format!(
            "a {what} of {blocks} blocks at LBA {} is beyond namespace {} ({} usable blocks)",
            lba.0,
            ns.nsid(),
            ns.io_blocks()
        )));
    }
    Ok(())
}

impl<T> Drop for TcpQueue<T> {
    fn drop(&mut self) {
        if self.q.lost().is_some() || self.lost.flag.load(Ordering::Acquire) {
            return; // the association is gone: its queue IDs with it
        }
        let qid = self.q.qid();
        if close_and_wait(self.q.socket(), CLOSE_LIMIT) {
            self.released
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(qid);
        } else {
            log::debug!("nvmf host: queue {qid}: the target did not close in time; ID not reused");
        }
    }
}

/// Ends the host's side of `sock` and waits up to `limit` for the peer's close (whatever it
/// still sends is discarded); true if it came.
fn close_and_wait(sock: &std::net::TcpStream, limit: Duration) -> bool {
    use std::io::Read;
    let deadline = Instant::now() + limit;
    if sock.shutdown(std::net::Shutdown::Write).is_err() || sock.set_nonblocking(false).is_err() {
        return false;
    }
    let mut scratch = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || sock.set_read_timeout(Some(left)).is_err() {
            return false;
        }
        match (&*sock).read(&mut scratch) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
}

/// Ordinary memory for NVMe/TCP data: allocated once, its address stable, written through a
/// raw pointer while a command holds it.
pub struct HostBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a HostBuf owns its allocation like a Box<[u8]>.
unsafe impl Send for HostBuf {}
// SAFETY: shared access only reads (as_slice); writes need &mut.
unsafe impl Sync for HostBuf {}

impl core::fmt::Debug for HostBuf {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "HostBuf({} bytes)", self.len)
    }
}

impl HostBuf {
    /// `len` zeroed bytes.
    pub fn new(len: usize) -> HostBuf {
        let b: Box<[u8]> = vec![0u8; len].into_boxed_slice();
        let len = b.len();
        // Box::into_raw never returns null.
        let ptr = NonNull::new(Box::into_raw(b).cast::<u8>()).unwrap_or(NonNull::dangling());
        HostBuf { ptr, len }
    }
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` is the start of the `len`-byte allocation this value owns.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
    /// The bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for HostBuf {
    fn drop(&mut self) {
        let raw = std::ptr::slice_from_raw_parts_mut(self.ptr.as_ptr(), self.len);
        // SAFETY: `raw` is exactly the allocation Box::into_raw gave in `new`, freed once here.
        drop(unsafe { Box::from_raw(raw) });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_memory_refuses_a_length_beyond_the_address_space() {
        for len in [usize::MAX, usize::MAX - HOST_CHUNK, isize::MAX as usize] {
            assert!(HostChunks.map_chunk(len).is_err(), "{len}");
        }
        let m = DmaMemory::new(Box::new(HostChunks));
        assert!(m.alloc(usize::MAX).is_err());
        assert_eq!(m.chunk_count(), 0);
        let b = m.alloc(100).expect("a small buffer");
        assert_eq!(b.iova().0, b.as_ptr() as u64);
    }
}
