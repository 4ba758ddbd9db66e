//! Pollers: the threads that own the queue pairs, and the two ways bios reach a queue pair.
//!
//! **Pooled** ([`Pollers`]): N threads, each pinned to a core (`sched_setaffinity`), each
//! owning one [`QueuePair`] per controller. Any thread hands a poller a bio through that
//! poller's bounded ring (crossbeam's lock-free `ArrayQueue`: a multi-producer ring whose only
//! consumer is the poller, so the poller's I/O path takes no lock). A bio submitted *by* a
//! poller thread (a completion callback that issues I/O) goes to a thread-local queue of that
//! poller instead, which never fills. The poller submits what it received, rings each doorbell
//! once per batch, polls every queue pair, and completes each finished bio into dio-core on its
//! own thread. With nothing in flight and nothing queued it keeps polling for a bounded time
//! (`Builder::poller_idle`, default 1 ms, yielding the CPU between rounds), then parks on a
//! crossbeam-utils `Parker`; a submitter unparks it only if it really parked (a Dekker handshake
//! on `sleeping` with SeqCst fences, so no wake-up is lost). A full ring makes a submitter on
//! another thread back off until the poller drains it.
//!
//! A client thread waiting for its own bios (a synchronous call, a page-cache fill, dio-core's
//! throttle) waits in dio-core's `Wait::PollInPlace` loop with [`SpinThenPark`]: every bio
//! carries the submitting thread's [`Waiter`]; the poller completes the bio into dio-core, then
//! sets the waiter's flag and unparks the thread only if it parked. The client spins on the
//! flag for `Builder::wait_spin` (default 20 µs; the first 2 µs without yielding), then parks.
//! dio-core re-checks the request under its own lock after each wake-up, so a wake-up for
//! another request of the same thread costs one check; its condition variable is not used.
//!
//! Allocation on the I/O path: none in the pollers (the ring, the thread-local queue and the
//! failed list keep their capacity; run to completion reuses its list of reaped bios). Per
//! request there remain dio-core's request state (one `Arc`), and for asynchronous requests
//! the boxed callback (`Box<dyn FnOnce>`) and dio-core's boxed `Completion` wrapping it; a
//! deferred completion adds the boxed job (and, amortised, a block of the completion thread's
//! channel every 31 jobs).
//!
//! **Run to completion** ([`Local`]): the caller's thread owns the queue pair (kept in a
//! thread-local slot) and polls it itself while it waits: dio-core's `Wait::PollInPlace`.
//!
//! Errors a queue pair reports at submission (a dead queue, a bad range) complete the bio with
//! an error status on the next poll, never inside `BioSink::submit` (dio-core's rule).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering, fence};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;
use crossbeam_utils::sync::{Parker, Unparker};
use crossbeam_utils::{Backoff, CachePadded};
use dio_core::{Bio, BioOp, BioSink, DeviceStatus, DioError, Poller, Rejected};

use crate::bus::dma::DmaSlice;
use crate::embed::iobuf::Window;
use crate::nvme::controller::Controller;
use crate::nvme::error::{Error, IoError};
use crate::nvme::namespace::Namespace;
use crate::nvme::qpair::{DmaOwner, IoFlags, IoResult, QueueOptions, QueuePair};
use crate::spec::status::generic;
use crate::types::{Iova, Lba};

/// The context of one bio on a queue pair: the bio, and the waiter of the thread that
/// submitted it (pooled mode), woken once the bio has been completed into dio-core.
pub(crate) struct BioCtx(Bio<Window>, Option<Arc<Waiter>>);

impl BioCtx {
    /// Complete the bio into dio-core (its reference drop, and the request's completion if it
    /// was the last), then wake its submitter's waiter. The waiter is a per-thread object held
    /// by this context, not part of the request, so touching it after the drop is fine.
    fn complete(self, status: Result<(), DeviceStatus>) {
        let BioCtx(bio, waiter) = self;
        bio.complete(status);
        if let Some(w) = waiter {
            w.wake();
        }
    }
}

// SAFETY: the slice is the DMA segment dio-core mapped from the request's `Window`, i.e. a
// sub-range of a `DmaBuffer` (`IoBuffer::Dma`) that lies in this controller's DMA memory (the
// queue pair re-checks the IOVA). That buffer is owned by the request (dio-core keeps it in the
// request's payload, which is taken only when the last reference goes, after this bio has been
// completed), and its pages never move. While bios are in flight nobody else touches the
// buffer: the submitter handed it to dio-core by value, dio-core only zero-fills read holes
// (which the mapper of this crate never reports), and the user gets it back only after the
// last bio completed. The queue pair hands a `BioCtx` back only once the device has let go of
// the memory (owned-buffer API, `F_HOLDS`). The same bio returns the same slice every time.
unsafe impl DmaOwner for BioCtx {
    fn dma_slice(&self) -> DmaSlice {
        match self.0.segment() {
            Some(s) => s.0,
            None => DmaSlice {
                ptr: core::ptr::NonNull::dangling(),
                iova: Iova(0),
                len: 0,
            },
        }
    }
}

/// One bio addressed to a namespace of the engine (`target` indexes the engine's table).
pub(crate) struct Work {
    target: u32,
    bio: Bio<Window>,
    waiter: Option<Arc<Waiter>>,
}

/// The namespaces an engine serves: `(controller index, namespace)`.
pub(crate) type Targets = Vec<(usize, Namespace)>;

/// The status reported for a request the driver failed without the device: the queue pair
/// refused it (dead queue, controller reset) or the device never completed it (timeout).
fn driver_status(e: &Error) -> DeviceStatus {
    match e {
        Error::QueueDead { .. } | Error::NotReady { .. } => {
            DeviceStatus::new(0, generic::ABORTED_SQ_DELETION)
        }
        Error::LbaOutOfRange { .. } => DeviceStatus::new(0, generic::LBA_OUT_OF_RANGE),
        _ => DeviceStatus::new(0, generic::INTERNAL_ERROR),
    }
}

/// The dio-core status of a completion.
pub(crate) fn status_of(r: IoResult) -> Result<(), DeviceStatus> {
    match r {
        Ok(_) => Ok(()),
        Err(IoError::Status { status, lba, .. }) => Err(DeviceStatus {
            sct: status.sct.bits(),
            sc: status.sc,
            lba: Some(lba.0),
        }),
        Err(IoError::Timeout { lba, .. }) => Err(DeviceStatus {
            sct: 0,
            sc: generic::ABORT_REQUESTED,
            lba: Some(lba.0),
        }),
        Err(_) => Err(DeviceStatus::new(0, generic::ABORTED_SQ_DELETION)),
    }
}

/// Submit one bio to its queue pair. `Err(work)`: the request pool is exhausted, retry after
/// a poll. Other refusals go to `failed`, completed by the next poll.
fn submit_one(
    qpairs: &mut [QueuePair<BioCtx>],
    targets: &Targets,
    w: Work,
    failed: &mut Vec<(BioCtx, DeviceStatus)>,
) -> Result<(), Work> {
    let Work {
        target,
        bio,
        waiter,
    } = w;
    let (qi, ns) = &targets[target as usize];
    let q = &mut qpairs[*qi];
    let lba = Lba(bio.lba());
    let r = match bio.op() {
        BioOp::Read => q.read(ns, lba, BioCtx(bio, waiter)),
        BioOp::Write => q.write(ns, lba, BioCtx(bio, waiter)),
        BioOp::WriteZeroes => {
            let blocks = (bio.len() >> ns.block_shift()) as u32;
            q.write_zeroes(ns, lba, blocks, IoFlags::NONE, BioCtx(bio, waiter))
        }
    };
    match r {
        Ok(()) => Ok(()),
        Err(rej) if matches!(rej.error, Error::PoolExhausted { .. }) => {
            let BioCtx(bio, waiter) = rej.ctx;
            Err(Work {
                target,
                bio,
                waiter,
            })
        }
        Err(rej) => {
            failed.push((rej.ctx, driver_status(&rej.error)));
            Ok(())
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Waiting for one's own bios (pooled mode): spin, then park.

/// The waiter of one client thread (one per thread, allocated on its first request). Every
/// bio it submits carries a clone; the poller completes the bio into dio-core, then calls
/// [`wake`](Waiter::wake). The thread waits in dio-core's `Wait::PollInPlace` loop through
/// [`SpinThenPark`]: dio-core re-checks the request's reference count (under its lock) between
/// calls, so a wake-up that was for another request only costs one more check.
pub(crate) struct Waiter {
    /// A bio of this thread completed since the last check.
    woken: AtomicBool,
    /// The thread is parked or about to park (Dekker handshake with `woken`, SeqCst).
    sleeping: AtomicBool,
    unparker: Unparker,
}

impl Waiter {
    fn wake(&self) {
        self.woken.store(true, Ordering::SeqCst);
        if self.sleeping.load(Ordering::SeqCst) {
            self.unparker.unpark();
        }
    }
}

struct WaitSlot {
    parker: Parker,
    waiter: Arc<Waiter>,
}

impl WaitSlot {
    fn new() -> Self {
        let parker = Parker::new();
        let waiter = Arc::new(Waiter {
            woken: AtomicBool::new(false),
            sleeping: AtomicBool::new(false),
            unparker: parker.unparker().clone(),
        });
        WaitSlot { parker, waiter }
    }
}

/// The waiter of the calling thread.
fn my_waiter() -> Arc<Waiter> {
    WAIT_SLOT.with(|w| Arc::clone(&w.waiter))
}

/// How long a waiting client spins without yielding the CPU.
const PURE_SPIN: Duration = Duration::from_micros(2);

/// dio-core's wait hook in pooled mode (`Wait::PollInPlace`): spin up to `spin` for a bio of
/// this thread to complete, then park until the poller wakes us.
pub(crate) struct SpinThenPark {
    pub spin: Duration,
}

impl Poller for SpinThenPark {
    fn poll_once(&self) {
        WAIT_SLOT.with(|slot| {
            let w = &*slot.waiter;
            if w.woken.swap(false, Ordering::AcqRel) {
                return;
            }
            if !self.spin.is_zero() {
                let start = Instant::now();
                let mut i = 0u32;
                let mut yielding = false;
                loop {
                    if yielding {
                        // Past the first microseconds, give the CPU to whoever is runnable
                        // here (on a small machine: the poller we just woke up) between checks.
                        std::thread::yield_now();
                    } else {
                        std::hint::spin_loop();
                    }
                    if w.woken.load(Ordering::Relaxed) && w.woken.swap(false, Ordering::AcqRel) {
                        return;
                    }
                    i = i.wrapping_add(1);
                    if yielding || i % 32 == 0 {
                        let t = start.elapsed();
                        if t >= self.spin {
                            break;
                        }
                        yielding = t >= PURE_SPIN;
                    }
                }
            }
            w.sleeping.store(true, Ordering::SeqCst);
            while !w.woken.load(Ordering::SeqCst) {
                slot.parker.park();
            }
            w.sleeping.store(false, Ordering::SeqCst);
            w.woken.store(false, Ordering::SeqCst);
        });
    }
}

// ---------------------------------------------------------------------------------------------
// Pooled pollers.

thread_local! {
    /// `(engine id, poller index)` when this thread is a poller.
    static ON_POLLER: Cell<Option<(u64, usize)>> = const { Cell::new(None) };
    /// Bios submitted by this poller thread itself (from completion callbacks).
    static OWN_QUEUE: RefCell<VecDeque<Work>> = const { RefCell::new(VecDeque::new()) };
    /// A per-thread number choosing the poller a client thread hands its bios to.
    static HOME: Cell<usize> = const { Cell::new(usize::MAX) };
    /// The waiter of this thread (see [`SpinThenPark`]).
    static WAIT_SLOT: WaitSlot = WaitSlot::new();
}

static NEXT_ENGINE: AtomicU64 = AtomicU64::new(1);
static NEXT_HOME: AtomicUsize = AtomicUsize::new(0);

/// Counters of one poller.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PollerStats {
    /// Bios submitted to a queue pair.
    pub submitted: u64,
    /// Bios completed.
    pub completed: u64,
    /// Times the poller parked.
    pub parks: u64,
    /// Times a submitter found the ring full and backed off.
    pub ring_full: u64,
}

/// What a poller shares with submitters.
pub(crate) struct PollerShared {
    ring: ArrayQueue<Work>,
    sleeping: AtomicBool,
    unparker: Unparker,
    submitted: AtomicU64,
    completed: AtomicU64,
    parks: AtomicU64,
    ring_full: AtomicU64,
}

/// Options of the pooled pollers.
#[derive(Clone, Debug)]
pub(crate) struct PollerConfig {
    pub cores: Vec<Option<usize>>,
    pub ring: usize,
    pub spin: u32,
    /// Minimum time an idle poller keeps polling before it parks.
    pub idle: Duration,
    /// How long a client thread spins for its completion before it parks.
    pub wait_spin: Duration,
    pub queue: QueueOptions,
}

/// The running pollers of an engine.
pub(crate) struct Pollers {
    id: u64,
    shared: Vec<CachePadded<Arc<PollerShared>>>,
    stop: AtomicBool,
    wait_spin: Duration,
    /// Requests between their start and the end of their submission (shutdown waits for 0).
    active: AtomicUsize,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// Why a poller could not start.
#[derive(Debug)]
pub(crate) enum StartError {
    /// Poller index, core, error.
    Pin(usize, usize, std::io::Error),
    Spawn(std::io::Error),
    Queue(Error),
}

/// Pin the calling thread to `core`.
pub(crate) fn pin_current_thread(core: usize) -> std::io::Result<()> {
    if core >= libc::CPU_SETSIZE as usize {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: `cpu_set_t` is plain data for which all zeroes is a valid (empty) set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `core < CPU_SETSIZE` (checked above), so the bit lies inside `set`.
    unsafe { libc::CPU_SET(core, &mut set) };
    // SAFETY: pid 0 is the calling thread; `set` is a valid, initialised `cpu_set_t` and the
    // size passed is its size. The call reads it and touches no other memory.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

impl Pollers {
    /// Start one poller per entry of `cfg.cores`, each with a queue pair on every controller.
    pub(crate) fn start(
        ctrls: &[Controller],
        targets: &Targets,
        cfg: &PollerConfig,
    ) -> Result<Arc<Pollers>, StartError> {
        let id = NEXT_ENGINE.fetch_add(1, Ordering::Relaxed);
        let mut shared = Vec::new();
        let mut parts = Vec::new();
        for _ in &cfg.cores {
            let parker = Parker::new();
            let mut qpairs = Vec::new();
            for c in ctrls {
                qpairs.push(
                    c.create_qpair::<BioCtx>(cfg.queue.clone())
                        .map_err(StartError::Queue)?,
                );
            }
            shared.push(CachePadded::new(Arc::new(PollerShared {
                ring: ArrayQueue::new(cfg.ring.max(1)),
                sleeping: AtomicBool::new(false),
                unparker: parker.unparker().clone(),
                submitted: AtomicU64::new(0),
                completed: AtomicU64::new(0),
                parks: AtomicU64::new(0),
                ring_full: AtomicU64::new(0),
            })));
            parts.push((parker, qpairs));
        }
        let pollers = Arc::new(Pollers {
            id,
            shared,
            stop: AtomicBool::new(false),
            wait_spin: cfg.wait_spin,
            active: AtomicUsize::new(0),
            threads: Mutex::new(Vec::new()),
        });
        let (tx, rx) = std::sync::mpsc::channel();
        for (i, (parker, qpairs)) in parts.into_iter().enumerate() {
            let core = cfg.cores[i];
            let p = Arc::clone(&pollers);
            let (tx, targets, spin) = (tx.clone(), targets.clone(), (cfg.spin, cfg.idle));
            let t = std::thread::Builder::new()
                .name(format!("dioxide-poller-{i}"))
                .spawn(move || {
                    if let Some(core) = core {
                        if let Err(e) = pin_current_thread(core) {
                            let _ = tx.send(Err(StartError::Pin(i, core, e)));
                            return;
                        }
                    }
                    let _ = tx.send(Ok(()));
                    drop(tx);
                    p.run(i, qpairs, targets, parker, spin);
                });
            match t {
                Ok(t) => pollers.lock_threads().push(t),
                Err(e) => {
                    pollers.shutdown();
                    return Err(StartError::Spawn(e));
                }
            }
        }
        drop(tx);
        let mut first_err = None;
        for _ in 0..cfg.cores.len() {
            match rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                Err(_) => break,
            }
        }
        if let Some(e) = first_err {
            pollers.shutdown();
            return Err(e);
        }
        Ok(pollers)
    }

    fn lock_threads(&self) -> std::sync::MutexGuard<'_, Vec<JoinHandle<()>>> {
        self.threads.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// dio-core's wait strategy for requests served by these pollers.
    pub(crate) fn wait(&self) -> dio_core::Wait {
        dio_core::Wait::PollInPlace(Arc::new(SpinThenPark {
            spin: self.wait_spin,
        }))
    }

    /// Number of pollers.
    pub(crate) fn len(&self) -> usize {
        self.shared.len()
    }

    /// True on a poller thread of this engine.
    pub(crate) fn on_poller(&self) -> bool {
        ON_POLLER.with(|p| p.get().is_some_and(|(id, _)| id == self.id))
    }

    /// Counters of poller `i`.
    pub(crate) fn stats(&self, i: usize) -> PollerStats {
        let s = &self.shared[i];
        PollerStats {
            submitted: s.submitted.load(Ordering::Relaxed),
            completed: s.completed.load(Ordering::Relaxed),
            parks: s.parks.load(Ordering::Relaxed),
            ring_full: s.ring_full.load(Ordering::Relaxed),
        }
    }

    /// A request starts: false once shutdown has begun (the request must be refused).
    pub(crate) fn enter(&self) -> bool {
        self.active.fetch_add(1, Ordering::SeqCst);
        if self.stop.load(Ordering::SeqCst) {
            self.leave();
            return false;
        }
        true
    }

    /// A request's submission phase ended.
    pub(crate) fn leave(&self) {
        if self.active.fetch_sub(1, Ordering::SeqCst) == 1 && self.stop.load(Ordering::SeqCst) {
            self.wake_all();
        }
    }

    fn wake_all(&self) {
        for s in &self.shared {
            s.unparker.unpark();
        }
    }

    /// Stop accepting requests, let the pollers finish everything in flight, join them.
    pub(crate) fn shutdown(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.wake_all();
        let threads: Vec<_> = self.lock_threads().drain(..).collect();
        for t in threads {
            let _ = t.join();
        }
    }

    /// Hand a bio to a poller (see the module docs).
    fn push(&self, target: u32, bio: Bio<Window>) {
        if let Some((id, _)) = ON_POLLER.with(Cell::get) {
            if id == self.id {
                let w = Work {
                    target,
                    bio,
                    waiter: None,
                };
                OWN_QUEUE.with(|q| q.borrow_mut().push_back(w));
                return;
            }
        }
        let w = Work {
            target,
            bio,
            waiter: Some(my_waiter()),
        };
        let home = HOME.with(|h| {
            if h.get() == usize::MAX {
                h.set(NEXT_HOME.fetch_add(1, Ordering::Relaxed));
            }
            h.get()
        });
        let s = &self.shared[home % self.shared.len()];
        let mut w = w;
        let backoff = Backoff::new();
        loop {
            match s.ring.push(w) {
                Ok(()) => break,
                Err(back) => {
                    w = back;
                    s.ring_full.fetch_add(1, Ordering::Relaxed);
                    s.unparker.unpark();
                    backoff.snooze();
                    if backoff.is_completed() {
                        std::thread::yield_now();
                    }
                }
            }
        }
        fence(Ordering::SeqCst);
        if s.sleeping.load(Ordering::SeqCst) {
            s.unparker.unpark();
        }
    }

    fn run(
        &self,
        index: usize,
        mut qpairs: Vec<QueuePair<BioCtx>>,
        targets: Targets,
        parker: Parker,
        (spin, idle_time): (u32, Duration),
    ) {
        ON_POLLER.with(|p| p.set(Some((self.id, index))));
        let s = Arc::clone(&self.shared[index]);
        let mut stalled: Option<Work> = None;
        let mut failed: Vec<(BioCtx, DeviceStatus)> = Vec::new();
        let mut idle = 0u32;
        let mut idle_since = Instant::now();
        loop {
            let mut progress = 0u64;
            // 1. Submit what was handed over, in order, until the pool runs out.
            loop {
                let w = match stalled.take() {
                    Some(w) => w,
                    None => match OWN_QUEUE
                        .with(|q| q.borrow_mut().pop_front())
                        .or_else(|| s.ring.pop())
                    {
                        Some(w) => w,
                        None => break,
                    },
                };
                match submit_one(&mut qpairs, &targets, w, &mut failed) {
                    Ok(()) => progress += 1,
                    Err(w) => {
                        stalled = Some(w);
                        break;
                    }
                }
            }
            if progress > 0 {
                s.submitted.fetch_add(progress, Ordering::Relaxed);
            }
            // 2. Poll every queue pair; complete into dio-core here, on this thread.
            let mut done = 0u64;
            for (ctx, st) in failed.drain(..) {
                ctx.complete(Err(st));
                done += 1;
            }
            for q in qpairs.iter_mut() {
                if let Ok(n) = q.poll(usize::MAX, |ctx, r| ctx.complete(status_of(r))) {
                    done += n as u64;
                }
            }
            if done > 0 {
                s.completed.fetch_add(done, Ordering::Relaxed);
            }
            if progress + done > 0 {
                idle = 0;
                continue;
            }
            idle = idle.saturating_add(1);
            if idle == 1 {
                idle_since = Instant::now();
            }
            let busy = stalled.is_some() || qpairs.iter().any(|q| q.outstanding() > 0);
            if busy {
                // Commands on the device: keep polling, but let other threads (an emulated
                // device, the clients) run on a small machine.
                if idle > 32 {
                    std::thread::yield_now();
                }
                continue;
            }
            if self.stop.load(Ordering::SeqCst)
                && self.active.load(Ordering::SeqCst) == 0
                && s.ring.is_empty()
                && OWN_QUEUE.with(|q| q.borrow().is_empty())
            {
                break;
            }
            // Idle: keep polling for at least `spin` polls and `idle_time` (the clock is read
            // every 64 polls), so that a client that submits again right after its completion
            // finds the poller awake: no unpark, no wake-up latency.
            if idle < spin || (!idle_time.is_zero() && idle % 64 != 0) {
                std::hint::spin_loop();
                continue;
            }
            if !idle_time.is_zero() && idle_since.elapsed() < idle_time {
                // Let a runnable client on this CPU go first (a small or busy machine).
                std::thread::yield_now();
                continue;
            }
            // 3. Nothing in flight, nothing queued: park until a submitter unparks us.
            s.sleeping.store(true, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            if s.ring.is_empty() && !self.stop.load(Ordering::SeqCst) {
                s.parks.fetch_add(1, Ordering::Relaxed);
                parker.park();
            } else if self.stop.load(Ordering::SeqCst) {
                // Waiting for the last requests to leave: a short sleep, woken by `leave`.
                parker.park_timeout(std::time::Duration::from_millis(1));
            }
            s.sleeping.store(false, Ordering::SeqCst);
            idle = 0;
        }
        ON_POLLER.with(|p| p.set(None));
        // Dropping the queue pairs deletes them on the device.
    }
}

/// The bio sink of one namespace on pooled pollers.
pub(crate) struct PollerSink {
    pub pollers: Arc<Pollers>,
    pub target: u32,
}

impl BioSink<Window> for PollerSink {
    fn submit(&self, bio: Bio<Window>) -> Result<(), Rejected<Window>> {
        self.pollers.push(self.target, bio);
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Run to completion.

struct LocalState {
    id: u64,
    qpairs: Vec<QueuePair<BioCtx>>,
    targets: Targets,
    failed: Vec<(BioCtx, DeviceStatus)>,
    /// What one poll reaped, completed after the state is released (kept for its capacity:
    /// a poll allocates nothing once it has grown to the queue depth).
    reaped: Vec<(BioCtx, Result<(), DeviceStatus>)>,
}

thread_local! {
    static LOCAL: RefCell<Vec<LocalState>> = const { RefCell::new(Vec::new()) };
}

/// A run-to-completion engine: its queue pairs live in a thread-local slot of the thread that
/// created it, which submits and polls them itself.
pub(crate) struct Local {
    id: u64,
    owner: std::thread::ThreadId,
}

impl Local {
    /// Create queue pairs on every controller, owned by the calling thread.
    pub(crate) fn new(
        ctrls: &[Controller],
        targets: &Targets,
        queue: &QueueOptions,
    ) -> Result<Local, Error> {
        let id = NEXT_ENGINE.fetch_add(1, Ordering::Relaxed);
        let mut qpairs = Vec::new();
        for c in ctrls {
            qpairs.push(c.create_qpair::<BioCtx>(queue.clone())?);
        }
        LOCAL.with(|l| {
            l.borrow_mut().push(LocalState {
                id,
                qpairs,
                targets: targets.clone(),
                failed: Vec::new(),
                reaped: Vec::new(),
            })
        });
        Ok(Local {
            id,
            owner: std::thread::current().id(),
        })
    }

    /// True on the thread that owns the queue pairs.
    pub(crate) fn on_owner(&self) -> bool {
        std::thread::current().id() == self.owner
    }

    fn with<R>(&self, f: impl FnOnce(&mut LocalState) -> R) -> Option<R> {
        LOCAL.with(|l| {
            let mut l = l.try_borrow_mut().ok()?;
            let st = l.iter_mut().find(|s| s.id == self.id)?;
            Some(f(st))
        })
    }

    /// Poll every queue pair once, then complete what finished (outside the borrow, so the
    /// completions may submit again, and even poll: a nested poll reaps into a fresh list).
    pub(crate) fn poll_once(&self) -> usize {
        let Some(mut done) = self.with(|st| {
            let mut done = std::mem::take(&mut st.reaped);
            for (ctx, s) in st.failed.drain(..) {
                done.push((ctx, Err(s)));
            }
            for q in st.qpairs.iter_mut() {
                let _ = q.poll(usize::MAX, |ctx, r| done.push((ctx, status_of(r))));
            }
            done
        }) else {
            return 0;
        };
        let n = done.len();
        for (ctx, s) in done.drain(..) {
            ctx.complete(s);
        }
        // Give the (empty) list back for the next poll, unless a nested poll already did.
        self.with(|st| {
            if st.reaped.capacity() < done.capacity() {
                st.reaped = done;
            }
        });
        n
    }

    /// Drop the queue pairs (on the owner thread; elsewhere they go with the thread).
    pub(crate) fn close(&self) {
        LOCAL.with(|l| {
            if let Ok(mut l) = l.try_borrow_mut() {
                l.retain(|s| s.id != self.id);
            }
        });
    }
}

/// dio-core's view of a [`Local`] engine: the sink and the in-place poller.
pub(crate) struct LocalSink {
    pub local: Arc<Local>,
    pub target: u32,
}

impl BioSink<Window> for LocalSink {
    fn submit(&self, bio: Bio<Window>) -> Result<(), Rejected<Window>> {
        if !self.local.on_owner() {
            return Err(Rejected {
                bio,
                why: DioError::Fault,
            });
        }
        let mut slot = Some(bio);
        let r = self.local.with(|st| {
            let bio = slot.take().expect("taken once");
            let w = Work {
                target: self.target,
                bio,
                waiter: None,
            };
            let LocalState {
                qpairs,
                targets,
                failed,
                ..
            } = st;
            submit_one(qpairs, targets, w, failed).map_err(|w| w.bio)
        });
        match r {
            Some(Ok(())) => Ok(()),
            Some(Err(bio)) => Err(Rejected {
                bio,
                why: DioError::QueueFull,
            }),
            None => Err(Rejected {
                bio: slot.expect("not taken"),
                why: DioError::Fault,
            }),
        }
    }
}

/// The in-place poller handed to dio-core (`Wait::PollInPlace`).
pub(crate) struct LocalPoller(pub Arc<Local>);

impl Poller for LocalPoller {
    fn poll_once(&self) {
        self.0.poll_once();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinning_to_a_core_that_does_not_exist_is_an_error() {
        let e = std::thread::spawn(|| pin_current_thread(100_000))
            .join()
            .unwrap()
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
        let e = std::thread::spawn(|| pin_current_thread(1000))
            .join()
            .unwrap()
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
        std::thread::spawn(|| pin_current_thread(0))
            .join()
            .unwrap()
            .unwrap();
    }
}
