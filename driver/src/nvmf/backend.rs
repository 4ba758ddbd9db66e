//! What the target serves: the [`Backend`] trait (namespaces, data buffers, asynchronous
//! I/O), a memory-backed implementation for tests, and one over the embedding API
//! ([`BlockFile`] on a [`Dioxide`]).
//!
//! I/O is asynchronous: [`Backend::submit`] starts the operation and returns; the backend
//! finishes it later, from any thread, with [`IoCompletion::complete`], which puts the result
//! on the owning connection's completion queue (a bounded lock-free queue the connection
//! drains in its `poll`). Dropping an [`IoCompletion`] without completing it completes it with
//! Internal Error, so a buggy backend cannot lose a command. Data buffers come from
//! [`Backend::alloc`] (DMA memory for a device backend) and the connection receives socket
//! data straight into them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use crossbeam_queue::ArrayQueue;

use super::target::wait::Notifier;
use crate::spec::status::generic;
use crate::spec::{Sct, Status};
use crate::{BlockFile, Dioxide, FileOptions, IoBuffer, Nsid, Refused, Request};

/// One namespace a backend serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NsInfo {
    /// Namespace ID (1-based).
    pub nsid: Nsid,
    /// Logical block size (a power of two, at least 512).
    pub block_size: u32,
    /// Size in logical blocks.
    pub blocks: u64,
    /// Write Zeroes is supported.
    pub write_zeroes: bool,
    /// Dataset Management (deallocate) is supported.
    pub deallocate: bool,
}

/// An operation on a namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendOp {
    /// Read `blocks` blocks into the buffer.
    Read,
    /// Write `blocks` blocks from the buffer.
    Write,
    /// Make completed writes durable.
    Flush,
    /// Write zeroes to `blocks` blocks.
    WriteZeroes,
    /// Deallocate these ranges (first LBA, blocks).
    Deallocate(Vec<(u64, u32)>),
}

/// An I/O request (already checked against the namespace's size).
#[derive(Debug)]
pub struct BackendIo {
    /// What to do.
    pub op: BackendOp,
    /// Namespace.
    pub nsid: Nsid,
    /// First LBA.
    pub slba: u64,
    /// Blocks (1-based).
    pub blocks: u32,
    /// Force Unit Access.
    pub fua: bool,
    /// The data buffer of a Read or Write (exactly `blocks × block size` long or longer).
    pub buf: Option<IoBuffer>,
}

/// A finished I/O, as the connection drains it.
#[derive(Debug)]
pub struct Done {
    /// Command slot of the connection.
    pub slot: u16,
    /// Generation of the slot when the command was submitted.
    pub generation: u32,
    /// Status.
    pub status: Status,
    /// The buffer, handed back.
    pub buf: Option<IoBuffer>,
}

/// A connection's completion queue (bounded by its queue depth).
pub type CompletionQueue = Arc<ArrayQueue<Done>>;

/// Completes one I/O exactly once.
#[derive(Debug)]
pub struct IoCompletion {
    queue: Option<CompletionQueue>,
    slot: u16,
    generation: u32,
    notifier: Option<Arc<Notifier>>,
    /// The in-flight count of the association the command belongs to: up while the backend
    /// holds the command, down once its completion is on the queue.
    inflight: Option<Arc<AtomicU32>>,
}

impl IoCompletion {
    /// A completion handle for a command slot.
    pub(crate) fn new(
        queue: CompletionQueue,
        slot: u16,
        generation: u32,
        notifier: Option<Arc<Notifier>>,
    ) -> IoCompletion {
        IoCompletion {
            queue: Some(queue),
            slot,
            generation,
            notifier,
            inflight: None,
        }
    }

    /// Counts the command in `inflight` until it completes (the association's count, which
    /// its teardown waits for).
    pub(crate) fn counted(mut self, inflight: &Arc<AtomicU32>) -> IoCompletion {
        inflight.fetch_add(1, Ordering::SeqCst);
        self.inflight = Some(inflight.clone());
        self
    }

    /// Finishes the I/O with `status`, handing the buffer back.
    pub fn complete(mut self, status: Status, buf: Option<IoBuffer>) {
        self.push(status, buf);
    }

    fn push(&mut self, status: Status, buf: Option<IoBuffer>) {
        if let Some(q) = self.queue.take() {
            let done = Done {
                slot: self.slot,
                generation: self.generation,
                status,
                buf,
            };
            // The queue holds one entry per command slot and a slot has at most one I/O in
            // flight, so it is never full; if it were (a bug), the command is lost: say which.
            if let Err(lost) = q.push(done) {
                log::error!(
                    "nvmf: the completion queue is full: the completion of command slot {} \
                     (generation {}, {:?}) is lost",
                    lost.slot,
                    lost.generation,
                    lost.status
                );
                debug_assert!(
                    false,
                    "the completion queue is full: slot {} lost its completion",
                    lost.slot
                );
            }
            // After the push: whoever sees the count drop finds the completion queued.
            if let Some(c) = self.inflight.take() {
                c.fetch_sub(1, Ordering::SeqCst);
            }
            if let Some(n) = &self.notifier {
                n.notify();
            }
        }
    }
}

impl Drop for IoCompletion {
    fn drop(&mut self) {
        self.push(Status::new(Sct::Generic, generic::INTERNAL_ERROR), None);
    }
}

/// Storage behind a subsystem.
pub trait Backend: Send + Sync {
    /// The namespaces, in NSID order.
    fn namespaces(&self) -> Vec<NsInfo>;
    /// A data buffer of at least `len` bytes (DMA memory for a device backend), or `None` when
    /// none is available now.
    fn alloc(&self, len: usize) -> Option<IoBuffer>;
    /// Starts `io`; `done` is completed exactly once, now or later, from any thread.
    fn submit(&self, io: BackendIo, done: IoCompletion);
    /// Reads the SMART / Health Information log of the backing controller: `done` gets the
    /// 512-byte page in a heap buffer, now or later, from any thread (a device backend reads
    /// it through the controller's admin queue, off the calling poller). A backend with no
    /// controller completes `done` with no buffer; the target then reports what it counted
    /// itself for the subsystem (host commands and data units).
    fn smart_log(&self, done: IoCompletion) {
        done.complete(Status::SUCCESS, None);
    }
    /// True if the backend has a volatile write cache (Flush matters).
    fn volatile_write_cache(&self) -> bool {
        false
    }
}

fn status(sc: u8) -> Status {
    Status::new(Sct::Generic, sc)
}

/// A memory-backed backend (tests and examples): namespaces in heap memory, I/O completed
/// inline or, with [`MemBackend::deferred`], on a worker thread.
#[derive(Debug)]
pub struct MemBackend {
    namespaces: Vec<(NsInfo, std::sync::Mutex<Vec<u8>>)>,
    worker: Option<std::sync::mpsc::SyncSender<Box<dyn FnOnce() + Send>>>,
    /// Flushes seen (tests check Flush reaches the backend).
    pub flushes: std::sync::atomic::AtomicU64,
}

impl MemBackend {
    /// Namespaces of `(block_size, blocks)`, NSIDs from 1, completing I/O inline.
    pub fn new(spec: &[(u32, u64)]) -> MemBackend {
        let namespaces = spec
            .iter()
            .enumerate()
            .map(|(i, &(bs, blocks))| {
                (
                    NsInfo {
                        nsid: Nsid(i as u32 + 1),
                        block_size: bs,
                        blocks,
                        write_zeroes: true,
                        deallocate: true,
                    },
                    std::sync::Mutex::new(vec![0u8; (bs as u64 * blocks) as usize]),
                )
            })
            .collect();
        MemBackend {
            namespaces,
            worker: None,
            flushes: Default::default(),
        }
    }

    /// Completes I/O on a worker thread (the asynchronous shape of a device).
    pub fn deferred(mut self) -> Arc<MemBackend> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Box<dyn FnOnce() + Send>>(1024);
        std::thread::Builder::new()
            .name("mem-backend".into())
            .spawn(move || {
                while let Ok(f) = rx.recv() {
                    f();
                }
            })
            .expect("spawn the memory backend's worker");
        self.worker = Some(tx);
        Arc::new(self)
    }

    /// A copy of a namespace's bytes (tests verify what was written).
    pub fn snapshot(&self, nsid: Nsid) -> Vec<u8> {
        self.namespaces
            .iter()
            .find(|(n, _)| n.nsid == nsid)
            .map(|(_, m)| m.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .unwrap_or_default()
    }

    fn run(&self, mut io: BackendIo) -> (Status, Option<IoBuffer>) {
        let Some((ns, mem)) = self.namespaces.iter().find(|(n, _)| n.nsid == io.nsid) else {
            return (status(generic::INVALID_NAMESPACE), io.buf);
        };
        let bs = ns.block_size as u64;
        let mut mem = mem.lock().unwrap_or_else(|e| e.into_inner());
        let span = |slba: u64, blocks: u64| -> Option<std::ops::Range<usize>> {
            let end = slba.checked_add(blocks)?;
            (end <= ns.blocks).then(|| (slba * bs) as usize..(end * bs) as usize)
        };
        match &io.op {
            BackendOp::Read | BackendOp::Write | BackendOp::WriteZeroes => {
                let Some(r) = span(io.slba, io.blocks as u64) else {
                    return (status(generic::LBA_OUT_OF_RANGE), io.buf);
                };
                match (&io.op, io.buf.as_mut()) {
                    (BackendOp::Read, Some(b)) if b.len() >= r.len() => {
                        let n = r.len();
                        b.as_mut_slice()[..n].copy_from_slice(&mem[r]);
                    }
                    (BackendOp::Write, Some(b)) if b.len() >= r.len() => {
                        let n = r.len();
                        mem[r].copy_from_slice(&b.as_slice()[..n]);
                    }
                    (BackendOp::WriteZeroes, _) => mem[r].fill(0),
                    _ => return (status(generic::DATA_TRANSFER_ERROR), io.buf),
                }
            }
            BackendOp::Flush => {
                self.flushes
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            BackendOp::Deallocate(ranges) => {
                for &(slba, blocks) in ranges {
                    match span(slba, blocks as u64) {
                        Some(r) => mem[r].fill(0),
                        None => return (status(generic::LBA_OUT_OF_RANGE), io.buf),
                    }
                }
            }
        }
        (Status::SUCCESS, io.buf)
    }
}

impl Backend for MemBackend {
    fn namespaces(&self) -> Vec<NsInfo> {
        self.namespaces.iter().map(|(n, _)| n.clone()).collect()
    }
    fn alloc(&self, len: usize) -> Option<IoBuffer> {
        Some(IoBuffer::Heap(vec![0u8; len]))
    }
    fn submit(&self, io: BackendIo, done: IoCompletion) {
        match &self.worker {
            None => {
                let (st, buf) = self.run(io);
                done.complete(st, buf);
            }
            Some(w) => {
                // The worker needs the backend: run the data movement now (it is memory), and
                // let the worker deliver the completion later, as a device would.
                let (st, buf) = self.run(io);
                let job: Box<dyn FnOnce() + Send> = Box::new(move || done.complete(st, buf));
                if let Err(e) = w.send(job) {
                    (e.0)();
                }
            }
        }
    }
    fn volatile_write_cache(&self) -> bool {
        true
    }
}

/// A backend over the embedding API: one [`BlockFile`] spanning each namespace of a
/// controller of a [`Dioxide`]. Buffers are DMA memory of the controller, so reads and writes
/// are zero copy between the socket and the device.
pub struct FileBackend {
    files: Vec<(NsInfo, BlockFile)>,
    /// The controller, for its logs.
    ctrl: Option<crate::Controller>,
    /// SMART reads in flight (each on a short-lived thread of its own).
    smart_reads: Arc<AtomicU32>,
}

impl core::fmt::Debug for FileBackend {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("FileBackend")
            .field("namespaces", &self.files.len())
            .finish()
    }
}

impl FileBackend {
    /// Serves every namespace of controller `ctrl` of `dx`.
    pub fn new(dx: &Dioxide, ctrl: usize) -> crate::EmbedResult<FileBackend> {
        let mut files = Vec::new();
        for (c, ns) in dx.namespaces() {
            if c != ctrl {
                continue;
            }
            let cap = ns.blocks() * ns.block_size() as u64;
            let file = dx.open_file(
                ctrl,
                ns.nsid(),
                FileOptions::new(0, ns.blocks()).with_len(cap),
            )?;
            files.push((
                NsInfo {
                    nsid: ns.nsid(),
                    block_size: ns.block_size(),
                    blocks: ns.blocks(),
                    // Always offered: the backing controller's Write Zeroes when it has them,
                    // else writes of a zeroed buffer on the target's side (never zeroes over
                    // the network).
                    write_zeroes: true,
                    // As the backing controller: Dataset Management (ONCS bit 2).
                    deallocate: file.supports_deallocate(),
                },
                file,
            ));
        }
        Ok(FileBackend {
            files,
            ctrl: dx.controller(ctrl).cloned(),
            smart_reads: Arc::new(AtomicU32::new(0)),
        })
    }
}

/// SMART reads a [`FileBackend`] runs at once; more are answered Command Interrupted (the
/// host retries), so hosts cannot make the target start threads without bound.
const MAX_SMART_READS: u32 = 4;
/// Status Command Interrupted (generic, NVMe 1.4): retry the command.
const COMMAND_INTERRUPTED: u8 = 0x21;

fn embed_status(e: &crate::EmbedError) -> Status {
    match e {
        crate::EmbedError::Device { status, .. }
        | crate::EmbedError::Maint {
            source: dio_core::DioError::Io(status),
            ..
        } => Status::new(Sct::from_bits(status.sct), status.sc),
        crate::EmbedError::BeyondCapacity { .. } | crate::EmbedError::MaintRange { .. } => {
            status(generic::LBA_OUT_OF_RANGE)
        }
        crate::EmbedError::Unsupported { .. } => status(generic::INVALID_OPCODE),
        _ => status(generic::INTERNAL_ERROR),
    }
}

impl Backend for FileBackend {
    fn namespaces(&self) -> Vec<NsInfo> {
        self.files.iter().map(|(n, _)| n.clone()).collect()
    }
    fn alloc(&self, len: usize) -> Option<IoBuffer> {
        let (_, f) = self.files.first()?;
        f.alloc(len).ok().map(IoBuffer::Dma)
    }
    fn submit(&self, io: BackendIo, done: IoCompletion) {
        let Some((ns, file)) = self.files.iter().find(|(n, _)| n.nsid == io.nsid) else {
            done.complete(status(generic::INVALID_NAMESPACE), io.buf);
            return;
        };
        let bs = ns.block_size as u64;
        let offset = io.slba * bs;
        let len = io.blocks as usize * bs as usize;
        match io.op {
            BackendOp::Read | BackendOp::Write => {
                let Some(buf) = io.buf else {
                    done.complete(status(generic::DATA_TRANSFER_ERROR), None);
                    return;
                };
                let kind = if io.op == BackendOp::Write {
                    Kind::Write
                } else {
                    Kind::Read
                };
                start(file.clone(), kind, offset, len, buf, done);
            }
            // BlockFile writes complete once the device completed them; Flush empties the
            // backing controller's volatile write cache (at once when it has none).
            BackendOp::Flush => {
                start_maint(file.clone(), Maint::Flush, (done, io.buf));
            }
            BackendOp::WriteZeroes => {
                let m = Maint::Zeroes(offset, len as u64);
                start_maint(file.clone(), m, (done, io.buf));
            }
            BackendOp::Deallocate(ranges) => {
                let r = ranges
                    .iter()
                    .map(|&(slba, n)| slba * bs..(slba + n as u64) * bs)
                    .collect();
                start_maint(file.clone(), Maint::Deallocate(r), (done, io.buf));
            }
        }
    }

    /// Get Log Page through the controller's admin queue, on a thread of its own: the admin
    /// command waits for its completion, which a poller must not.
    fn smart_log(&self, done: IoCompletion) {
        let Some(ctrl) = self.ctrl.clone() else {
            return done.complete(Status::SUCCESS, None);
        };
        let busy = self.smart_reads.clone();
        if busy.fetch_add(1, Ordering::AcqRel) >= MAX_SMART_READS {
            busy.fetch_sub(1, Ordering::AcqRel);
            return done.complete(status(COMMAND_INTERRUPTED), None);
        }
        let cell = Arc::new(std::sync::Mutex::new(Some(done)));
        let in_thread = cell.clone();
        let spawned = std::thread::Builder::new()
            .name("nvmf-smart".into())
            .spawn(move || {
                let r = ctrl.smart_log();
                busy.fetch_sub(1, Ordering::AcqRel);
                let Some(done) = in_thread.lock().unwrap_or_else(|e| e.into_inner()).take() else {
                    return;
                };
                match r {
                    Ok(log) => done.complete(
                        Status::SUCCESS,
                        Some(IoBuffer::Heap(log.to_bytes().to_vec())),
                    ),
                    Err(e) => {
                        log::warn!("nvmf: reading the backing controller's SMART log: {e}");
                        done.complete(status(generic::INTERNAL_ERROR), None)
                    }
                }
            });
        if let Err(e) = spawned {
            log::warn!("nvmf: no thread to read the SMART log: {e}");
            self.smart_reads.fetch_sub(1, Ordering::AcqRel);
            if let Some(done) = cell.lock().unwrap_or_else(|e| e.into_inner()).take() {
                done.complete(status(generic::INTERNAL_ERROR), None);
            }
        }
    }

    fn volatile_write_cache(&self) -> bool {
        self.files.iter().any(|(_, f)| f.has_volatile_write_cache())
    }
}

/// A completion kept in a cell shared with a callback: whoever takes it first owns it (the
/// callback when the request ran, the submitter when it was refused).
type Cell<T> = Arc<std::sync::Mutex<Option<T>>>;

fn take<T>(cell: &Cell<T>) -> Option<T> {
    cell.lock().unwrap_or_else(|e| e.into_inner()).take()
}

/// A refusal that only means "overlaps a request in flight, try again later".
fn overlaps(e: &crate::EmbedError) -> bool {
    matches!(e, crate::EmbedError::WouldBlockOnPoller { why, .. } if why.contains("overlaps"))
}

/// A Flush, Write Zeroes or Deallocate on a [`BlockFile`].
enum Maint {
    Flush,
    /// Byte offset and length.
    Zeroes(u64, u64),
    /// Byte ranges (block aligned: from the command's LBAs).
    Deallocate(Vec<std::ops::Range<u64>>),
}

/// The completion of a command and its buffer (a Deallocate's range list), handed back.
type MaintDone = (IoCompletion, Option<IoBuffer>);

thread_local! {
    /// The maintenance commands of this (poller) thread waiting for an overlapping request.
    static PENDING_MAINT: std::cell::RefCell<std::collections::VecDeque<(BlockFile, Maint, MaintDone)>> =
        const { std::cell::RefCell::new(std::collections::VecDeque::new()) };
}

/// Starts a maintenance command; false if it overlapped a request in flight and waits in
/// [`PENDING_MAINT`].
fn start_maint(file: BlockFile, m: Maint, done: MaintDone) -> bool {
    // As in `start`: the completion comes back out of the cell if the command is refused.
    let cell: Cell<MaintDone> = Arc::new(std::sync::Mutex::new(Some(done)));
    let in_cb = cell.clone();
    let cb = move |r: crate::EmbedResult<()>| {
        if let Some((done, buf)) = take(&in_cb) {
            let st = match &r {
                Ok(()) => Status::SUCCESS,
                Err(e) => embed_status(e),
            };
            done.complete(st, buf);
        }
    };
    let r = match &m {
        Maint::Flush => file.submit_flush(cb),
        Maint::Zeroes(offset, len) => file.submit_write_zeroes(*offset, *len, cb),
        Maint::Deallocate(ranges) => file.submit_deallocate(ranges, cb),
    };
    let Err(error) = r else { return true };
    let Some(done) = take(&cell) else { return true };
    if overlaps(&error) {
        PENDING_MAINT.with(|p| p.borrow_mut().push_back((file, m, done)));
        return false;
    }
    log::warn!("nvmf: a maintenance command was refused: {error}");
    let (done, buf) = done;
    done.complete(embed_status(&error), buf);
    true
}

/// What one request to a [`BlockFile`] does for a command.
#[derive(Clone, Copy)]
enum Kind {
    Read,
    Write,
}

/// A request a poller could not start because it overlaps one in flight (the file's range
/// lock refuses to wait on a poller thread), retried by [`retry_pending`].
struct Pending {
    file: BlockFile,
    kind: Kind,
    offset: u64,
    len: usize,
    buf: IoBuffer,
    done: IoCompletion,
}

thread_local! {
    /// The overlapping requests of this (poller) thread waiting for their turn.
    static PENDING: std::cell::RefCell<std::collections::VecDeque<Pending>> =
        const { std::cell::RefCell::new(std::collections::VecDeque::new()) };
}

/// Retries the requests of this thread that overlapped one in flight (a poll group calls it
/// every round); returns how many were started.
pub(crate) fn retry_pending() -> usize {
    let n = PENDING.with(|p| p.borrow().len());
    let mut started = 0;
    for _ in 0..n {
        let Some(p) = PENDING.with(|q| q.borrow_mut().pop_front()) else {
            break;
        };
        if start(p.file, p.kind, p.offset, p.len, p.buf, p.done) {
            started += 1;
        }
    }
    let n = PENDING_MAINT.with(|p| p.borrow().len());
    for _ in 0..n {
        let Some((file, m, done)) = PENDING_MAINT.with(|q| q.borrow_mut().pop_front()) else {
            break;
        };
        if start_maint(file, m, done) {
            started += 1;
        }
    }
    started
}

/// True if this thread has requests waiting for an overlapping one to finish.
pub(crate) fn has_pending() -> bool {
    PENDING.with(|p| !p.borrow().is_empty()) || PENDING_MAINT.with(|p| !p.borrow().is_empty())
}

/// Starts a request on `file`; false if it overlapped a request in flight and waits in
/// [`PENDING`] (NVMe orders nothing between commands in flight, so it may start later).
fn start(
    file: BlockFile,
    kind: Kind,
    offset: u64,
    len: usize,
    buf: IoBuffer,
    done: IoCompletion,
) -> bool {
    let req = match kind {
        Kind::Read => Request::read(offset, buf).with_len(len),
        Kind::Write => Request::write(offset, buf).with_len(len),
    };
    // The completion goes into the callback, and comes back out of this cell if the request
    // is refused (the callback is then dropped unrun).
    let cell: Cell<IoCompletion> = Arc::new(std::sync::Mutex::new(Some(done)));
    let in_cb = cell.clone();
    let r = file.submit(req, move |c| {
        let Some(done) = take(&in_cb) else { return };
        let st = match &c.result {
            Ok(n) if *n == len => Status::SUCCESS,
            Ok(_) => status(generic::DATA_TRANSFER_ERROR),
            Err(e) => embed_status(e),
        };
        done.complete(st, Some(c.buf));
    });
    let Err(refused) = r else { return true };
    let Some(done) = take(&cell) else { return true };
    let Refused { error, buf } = *refused;
    if overlaps(&error) {
        PENDING.with(|p| {
            p.borrow_mut().push_back(Pending {
                file,
                kind,
                offset,
                len,
                buf,
                done,
            })
        });
        return false;
    }
    log::warn!("nvmf: request at offset {offset} refused: {error}");
    done.complete(embed_status(&error), Some(buf));
    true
}

/// Only in debug builds: the release build logs what the debug build stops at.
#[cfg(all(test, debug_assertions))]
mod tests {
    use super::*;

    /// A completion that does not fit is a bug the debug build stops at (and the release
    /// build logs, naming the command).
    #[test]
    #[should_panic(expected = "the completion queue is full: slot 1 lost its completion")]
    fn a_completion_that_does_not_fit_is_not_dropped_silently() {
        let q: CompletionQueue = Arc::new(ArrayQueue::new(1));
        IoCompletion::new(q.clone(), 0, 0, None).complete(Status::SUCCESS, None);
        IoCompletion::new(q, 1, 0, None).complete(Status::SUCCESS, None);
    }
}
