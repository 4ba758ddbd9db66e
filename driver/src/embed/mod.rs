//! The embedding facade: [`Dioxide`] ties controllers, pollers, page caches and files together
//! for an appliance, with no `unsafe` on its side.
//!
//! The engine below dio-core's `BioSink` (pooled pollers, run to completion, poller tasks, the
//! wake-up and shutdown protocols) is described in the `poller` module; the per-request path
//! above it in `blockfile`.
//!
//! Controllers may be local (PCIe: VFIO or the emulated bus) or remote (NVMe/TCP: a
//! [`TcpController`] given to [`Builder::controller`], or an SPDK transport ID such as
//! `trtype:TCP adrfam:IPv4 traddr:192.0.2.1 trsvcid:4420 subnqn:NQN` given to
//! [`Builder::transport_id`]); files, buffers and the page cache work the same on both. A
//! remote controller's buffers are ordinary memory (there is no device DMA: the host copies to
//! and from the socket); its Keep Alive is sent by poller 0; when its connection ends, every
//! request outstanding or issued on it fails once with [`EmbedError::ControllerLost`], and the
//! appliance reconnects by building a new instance.

pub(crate) mod blockfile;
pub(crate) mod cache;
pub(crate) mod ctrl;
pub(crate) mod error;
pub(crate) mod iobuf;
pub(crate) mod poller;
pub(crate) mod rangelock;
pub(crate) mod sleep;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_queue::ArrayQueue;
use crossbeam_utils::sync::{Parker, Unparker};
use dio_core::Deferral;

use crate::bus::dma::DmaBuffer;
use crate::embed::blockfile::{BlockFile, EngineRef, Extents, FileOptions};
use crate::embed::cache::{CacheStats, PageCache};
use crate::embed::ctrl::EmbedCtrl;
use crate::embed::error::{EmbedError, EmbedResult};
use crate::embed::poller::{
    Local, PollerConfig, PollerStats, PollerTask, PollerTaskId, Pollers, StartError, Targets,
    TaskError,
};
use crate::embed::sleep::InterruptMode;
use crate::nvme::aer::AsyncEvent;
use crate::nvme::controller::Controller;
use crate::nvme::error::Error;
use crate::nvme::namespace::Namespace;
use crate::nvme::qpair::QueueOptions;
use crate::nvmf::{Digests, HostOptions};
use crate::transport::trid::{Target, TransportId};
use crate::transport::{TcpController, TcpOptions, TransportController};
use crate::types::Nsid;

/// Where completion callbacks run.
#[derive(Clone, Default)]
pub enum Completions {
    /// On the poller thread that reaped the last command of the request (lowest latency).
    /// Callbacks must not block; from a callback only requests that can be queued at once are
    /// accepted (see [`EmbedError::WouldBlockOnPoller`]).
    #[default]
    OnPoller,
    /// Through this deferral hook (dio-core's `Deferral`), e.g. a [`CompletionThread`]: the
    /// callback may block and may issue any request.
    Deferred(Arc<dyn Deferral>),
}

impl std::fmt::Debug for Completions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Completions::OnPoller => "OnPoller",
            Completions::Deferred(_) => "Deferred",
        })
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// What a [`CompletionThread`] runs: a request's pooled final completion (dio-core's
/// [`Deferred`](dio_core::Deferred), a pointer: no allocation) or a boxed job.
enum Work {
    Completion(dio_core::Deferred),
    Job(Job),
}

impl Work {
    fn run(self) {
        match self {
            Work::Completion(d) => d.run(),
            Work::Job(j) => j(),
        }
    }
}

/// Completions a [`CompletionThread`] queues without allocating; more wait in an overflow list.
const COMPLETION_RING: usize = 4096;

/// What a [`CompletionThread`] shares with those that hand it work.
struct CtShared {
    /// The queue: lock-free, bounded, allocated once.
    ring: ArrayQueue<Work>,
    /// Work that found the ring full (allocates; run after the ring's).
    overflow: Mutex<VecDeque<Work>>,
    /// Set (under the overflow lock) while the overflow list may hold work: later work goes
    /// there too, behind it, so that work runs in the order it was handed over.
    spilled: AtomicBool,
    /// Producers between their check of `stop` and the end of their push.
    active: AtomicUsize,
    stop: AtomicBool,
    unparker: Unparker,
}

impl CtShared {
    fn lock_overflow(&self) -> std::sync::MutexGuard<'_, VecDeque<Work>> {
        self.overflow.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queue `w` (or run it here once the thread is stopping: nothing is lost).
    fn push(&self, w: Work) {
        // Dekker with `stop` (both SeqCst): either this push sees `stop` and runs the work
        // itself, or the thread, which stores `stop` before it reads `active`, waits for this
        // push to end and then drains the queue once more.
        self.active.fetch_add(1, Ordering::SeqCst);
        if self.stop.load(Ordering::SeqCst) {
            self.active.fetch_sub(1, Ordering::SeqCst);
            w.run();
            return;
        }
        let w = if self.spilled.load(Ordering::Acquire) {
            Err(w)
        } else {
            self.ring.push(w)
        };
        if let Err(w) = w {
            let mut o = self.lock_overflow();
            o.push_back(w);
            self.spilled.store(true, Ordering::Release);
        }
        self.active.fetch_sub(1, Ordering::SeqCst);
        self.unparker.unpark();
    }

    /// Run everything queued, oldest first; false if there was nothing.
    ///
    /// The ring's work is older than the overflow's (while the overflow holds work, new work
    /// queues behind it, not in the ring), so the ring runs first, then the overflow until it
    /// is empty; then the ring takes new work again.
    fn drain(&self) -> bool {
        let mut ran = false;
        while let Some(w) = self.ring.pop() {
            run_caught(w);
            ran = true;
        }
        loop {
            let w = {
                let mut o = self.lock_overflow();
                let w = o.pop_front();
                if w.is_none() {
                    self.spilled.store(false, Ordering::Release);
                }
                w
            };
            let Some(w) = w else { break };
            run_caught(w);
            ran = true;
        }
        ran
    }
}

/// Runs `w`; a panic in it is logged and goes no further: the thread keeps running the work
/// queued behind it.
fn run_caught(w: Work) {
    if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| w.run())) {
        let why = p
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| p.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(not a string)");
        log::error!("completion thread: a deferred job panicked: {why}; running the next ones");
    }
}

/// A thread of the appliance's that runs deferred completions, in the order they were handed
/// over (beyond 4096 waiting at once the excess waits in an overflow list, still in order).
/// A job that panics is logged and the thread goes on with the next.
///
/// A request's completion reaches it without an allocation ([`Deferral::defer_completion`]
/// puts dio-core's pooled [`Deferred`](dio_core::Deferred) on a preallocated lock-free ring);
/// the thread parks when there is nothing to run and is unparked by the next hand-over.
pub struct CompletionThread {
    shared: Arc<CtShared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for CompletionThread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CompletionThread")
    }
}

impl CompletionThread {
    /// Start the thread.
    pub fn spawn(name: &str) -> EmbedResult<Arc<CompletionThread>> {
        let parker = Parker::new();
        let shared = Arc::new(CtShared {
            ring: ArrayQueue::new(COMPLETION_RING),
            overflow: Mutex::new(VecDeque::new()),
            spilled: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            unparker: parker.unparker().clone(),
        });
        let sh = shared.clone();
        let t = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                loop {
                    if sh.drain() {
                        continue;
                    }
                    if sh.stop.load(Ordering::SeqCst) {
                        while sh.active.load(Ordering::SeqCst) != 0 {
                            std::thread::yield_now();
                        }
                        sh.drain();
                        return;
                    }
                    // A hand-over after the drain left its token: no lost wake-up.
                    parker.park();
                }
            })
            .map_err(EmbedError::Spawn)?;
        Ok(Arc::new(CompletionThread {
            shared,
            thread: Mutex::new(Some(t)),
        }))
    }

    /// Run what is queued, then stop the thread. Work handed over afterwards runs on the
    /// caller's thread.
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.unparker.unpark();
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

impl Deferral for CompletionThread {
    fn defer(&self, job: Box<dyn FnOnce() + Send>) {
        self.shared.push(Work::Job(job));
    }

    fn defer_completion(&self, job: dio_core::Deferred) {
        self.shared.push(Work::Completion(job));
    }
}

impl Drop for CompletionThread {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Builds a [`Dioxide`].
#[derive(Debug)]
pub struct Builder {
    ctrls: Vec<Pending>,
    digests: Digests,
    kato_ms: u32,
    tcp_command_timeout: Duration,
    cores: Vec<Option<usize>>,
    run_to_completion: bool,
    ring: usize,
    spin: u32,
    idle: Duration,
    io_yield: u32,
    wait_spin: Duration,
    queue: QueueOptions,
    cache_pages: usize,
    completions: Completions,
    interrupts: InterruptMode,
}

/// A controller given to the builder: ready, or a remote one to connect at `build`.
#[derive(Debug)]
enum Pending {
    Ready(EmbedCtrl),
    Tcp(TransportId),
}

/// The Keep Alive Timeout asked of remote controllers unless told otherwise (ms), the Linux
/// host's default; a Keep Alive goes out every half of it.
pub const DEFAULT_KATO_MS: u32 = 5_000;

/// Default of [`Builder::poller_io_yield`].
pub const DEFAULT_IO_YIELD: u32 = 32;

impl Builder {
    /// Serve this controller (index = order of the calls, whatever the transport): a PCIe
    /// [`Controller`] or a connected [`TcpController`].
    pub fn controller(mut self, ctrl: impl Into<TransportController>) -> Self {
        self.ctrls
            .push(Pending::Ready(EmbedCtrl::from(ctrl.into())));
        self
    }
    /// Serve the remote controller of an SPDK transport ID, connected at
    /// [`build`](Self::build) (index = order of the calls): `trtype:TCP` with `traddr` (an IP
    /// address), and optionally `adrfam`, `trsvcid` (default 4420), `subnqn` (required in
    /// practice: the default is the discovery subsystem, which has no namespaces) and
    /// `hostnqn`; `ns` is not taken (every namespace is served). Digests:
    /// [`tcp_digests`](Self::tcp_digests). Local controllers are opened by the caller and
    /// given to [`controller`](Self::controller).
    ///
    /// The Keep Alive of such a controller goes out from poller 0, or, in
    /// [`run_to_completion`](Self::run_to_completion) mode, from the owner's polls only: the
    /// owner must then call [`Dioxide::poll`] (or make requests) at least every KATO / 2
    /// ([`tcp_keep_alive`](Self::tcp_keep_alive)), also while it has nothing to do, or ask for
    /// no Keep Alive (`tcp_keep_alive(0)`); otherwise the target ends the association and the
    /// controller is lost.
    ///
    /// ```no_run
    /// # fn main() -> Result<(), dioxide::EmbedError> {
    /// let dx = dioxide::Dioxide::builder()
    ///     .transport_id("trtype:TCP adrfam:IPv4 traddr:192.0.2.1 trsvcid:4420 subnqn:nqn.2016-06.io.spdk:cnode1")?
    ///     .pollers([Some(1)])
    ///     .build()?;
    /// # Ok(()) }
    /// ```
    pub fn transport_id(mut self, trid: &str) -> EmbedResult<Self> {
        let bad = |why: String| EmbedError::TransportId {
            trid: trid.to_string(),
            why,
        };
        let t: TransportId = trid.parse().map_err(|e| bad(format!("{e}")))?;
        match t.target {
            Target::Tcp(_) => {}
            _ => {
                return Err(bad(
                    "Builder::transport_id takes remote controllers (trtype:TCP); open a PCIe \
                     or emulated controller with Controller::new and give it to \
                     Builder::controller"
                        .into(),
                ));
            }
        }
        if t.nsid.is_some() {
            return Err(bad(
                "the key ns is not taken here: every namespace is served; pick one with \
                 Dioxide::open_file"
                    .into(),
            ));
        }
        self.ctrls.push(Pending::Tcp(t));
        Ok(self)
    }
    /// Header and data digests (CRC32C) asked of remote controllers given as transport IDs
    /// (default: none).
    pub fn tcp_digests(mut self, header: bool, data: bool) -> Self {
        self.digests = Digests { header, data };
        self
    }
    /// How long a command of a remote controller given as a transport ID may take (default
    /// 30 s): NVMe/TCP cannot take a command back, so past it the connection, and with it the
    /// controller, is lost (every request on it fails with [`EmbedError::ControllerLost`]).
    pub fn tcp_command_timeout(mut self, d: Duration) -> Self {
        self.tcp_command_timeout = d;
        self
    }
    /// Keep Alive Timeout asked of remote controllers given as transport IDs, in ms
    /// (default [`DEFAULT_KATO_MS`]; 0: none, the target never times the host out).
    pub fn tcp_keep_alive(mut self, kato_ms: u32) -> Self {
        self.kato_ms = kato_ms;
        self
    }
    /// One poller per entry, pinned to that core (`None`: not pinned). Default: one unpinned.
    pub fn pollers(mut self, cores: impl IntoIterator<Item = Option<usize>>) -> Self {
        self.cores = cores.into_iter().collect();
        self
    }
    /// No poller threads: the thread that calls [`build`](Self::build) owns the queue pairs and
    /// polls them itself while it waits (run to completion, dio-core `Wait::PollInPlace`). The
    /// instance and its files are then usable from that thread only.
    ///
    /// With remote controllers ([`transport_id`](Self::transport_id)) the Keep Alive goes out
    /// from that thread's polls only: call [`Dioxide::poll`] at least every KATO / 2 while
    /// idle (or use `tcp_keep_alive(0)`), or the target drops the controller.
    pub fn run_to_completion(mut self) -> Self {
        self.run_to_completion = true;
        self
    }
    /// Entries of each poller's hand-over ring (default 1024).
    pub fn ring(mut self, entries: usize) -> Self {
        self.ring = entries;
        self
    }
    /// How long an idle poller (nothing in flight, nothing queued) keeps polling before it
    /// parks (default 1 ms). A client that submits within that time finds it awake, so the
    /// hand-over costs no system call and no wake-up; a parked poller is unparked by the next
    /// submission. `Duration::ZERO`: park after a short burst of empty polls (2000).
    pub fn poller_idle(mut self, d: Duration) -> Self {
        self.idle = d;
        self
    }
    /// How many empty polls an idle poller makes at least before it parks (default 2000). A
    /// poller that shares its core with its clients (an NVMe/TCP target on a small machine,
    /// whose tasks poll sockets) wants few: with `poller_idle(Duration::ZERO)` and a small
    /// count it sleeps almost at once and leaves the core to them.
    pub fn poller_spin(mut self, polls: u32) -> Self {
        self.spin = polls;
        self
    }
    /// After how many empty polls a polled poller with requests on the device starts to yield
    /// the CPU (`sched_yield`) after each further empty poll (default 32). A poller that
    /// shares its core with its clients (an NVMe/TCP target on a one-CPU machine at low queue
    /// depth) wants 0: every round that found nothing lets a runnable client go first, instead
    /// of holding the core until the scheduler's tick.
    pub fn poller_io_yield(mut self, polls: u32) -> Self {
        self.io_yield = polls;
        self
    }
    /// How long a client thread waiting for its own request (a synchronous call, a page-cache
    /// fill) spins for the completion before it parks (default 20 µs). The poller wakes a
    /// parked client only if it really parked. `Duration::ZERO`: park at once.
    pub fn wait_spin(mut self, d: Duration) -> Self {
        self.wait_spin = d;
        self
    }
    /// Options of every queue pair.
    pub fn queue(mut self, opts: QueueOptions) -> Self {
        self.queue = opts;
        self
    }
    /// Whether pollers with requests on the device sleep until their completions (default
    /// [`InterruptMode::Polled`]); see [`InterruptMode`]. The sleeping modes create every
    /// queue pair of the pollers in interrupt mode (one MSI-X vector each).
    pub fn interrupt_mode(mut self, mode: InterruptMode) -> Self {
        self.interrupts = mode;
        self
    }
    /// Pages (4 KiB) of the page cache of each controller (default 1024 = 4 MiB).
    pub fn cache_pages(mut self, pages: usize) -> Self {
        self.cache_pages = pages;
        self
    }
    /// Where callbacks run (default: on the poller).
    pub fn completions(mut self, c: Completions) -> Self {
        self.completions = c;
        self
    }
    /// Shorthand: run callbacks on `thread`.
    pub fn deferred_completions(self, thread: Arc<CompletionThread>) -> Self {
        self.completions(Completions::Deferred(thread))
    }

    /// Create the queue pairs, start (and pin) the pollers, allocate the page caches.
    pub fn build(self) -> EmbedResult<Dioxide> {
        if self.ctrls.is_empty() {
            return Err(EmbedError::Config(
                "no controller; add one with Builder::controller",
            ));
        }
        if !self.run_to_completion && self.cores.is_empty() {
            return Err(EmbedError::Config(
                "no poller; give at least one core with Builder::pollers",
            ));
        }
        let mut ctrls = Vec::with_capacity(self.ctrls.len());
        for p in self.ctrls {
            ctrls.push(match p {
                Pending::Ready(c) => c,
                Pending::Tcp(t) => {
                    connect(&t, self.digests, self.kato_ms, self.tcp_command_timeout)?
                }
            });
        }
        let mut targets: Targets = Vec::new();
        for (ci, c) in ctrls.iter().enumerate() {
            for ns in c.namespaces() {
                targets.push((ci, ns));
            }
        }
        let caches = ctrls
            .iter()
            .map(|c| {
                PageCache::new(c.dma(), self.cache_pages)
                    .map(Arc::new)
                    .map_err(|source| {
                        EmbedError::from(Error::Dma {
                            what: "the page cache",
                            source,
                        })
                    })
            })
            .collect::<EmbedResult<Vec<_>>>()?;
        let engine = if self.run_to_completion {
            EngineRef::Local(Arc::new(Local::new(&ctrls, &targets, &self.queue)?))
        } else {
            let cfg = PollerConfig {
                cores: self.cores.clone(),
                ring: self.ring,
                spin: self.spin,
                idle: self.idle,
                io_yield: self.io_yield,
                wait_spin: self.wait_spin,
                queue: self
                    .queue
                    .clone()
                    .with_interrupts(self.queue.interrupts || self.interrupts.sleeps()),
                interrupts: self.interrupts,
            };
            let p = Pollers::start(&ctrls, &targets, &cfg).map_err(|e| match e {
                StartError::Pin(poller, core, source) => EmbedError::Pin {
                    poller,
                    core,
                    source,
                },
                StartError::Spawn(e) => EmbedError::Spawn(e),
                StartError::Queue(e) => e,
            })?;
            EngineRef::Pooled(p)
        };
        let deferral = match self.completions {
            Completions::OnPoller => None,
            Completions::Deferred(d) => Some(d),
        };
        Ok(Dioxide {
            ctrls,
            targets,
            caches,
            engine,
            deferral,
            extents: Arc::default(),
        })
    }
}

/// Connect the remote controller of `t` (a `trtype:TCP` transport ID).
fn connect(
    t: &TransportId,
    digests: Digests,
    kato_ms: u32,
    command_timeout: Duration,
) -> EmbedResult<EmbedCtrl> {
    let Target::Tcp(addr) = t.target else {
        return Err(EmbedError::Config("a remote controller needs trtype:TCP"));
    };
    let mut host = HostOptions::new(t.subnqn());
    if let Some(h) = &t.hostnqn {
        host.hostnqn = h.clone();
    }
    host.digests = digests;
    host.kato_ms = kato_ms;
    host.command_timeout = command_timeout;
    let c = TcpController::connect(TcpOptions { addr, host }).map_err(EmbedError::from)?;
    if c.is_discovery() {
        return Err(EmbedError::TransportId {
            trid: t.tcp_label().unwrap_or_default(),
            why: "this is a discovery controller, which has no namespaces; give the subsystem \
                  with subnqn:NQN (list them with identify -r 'trtype:TCP traddr:...')"
                .into(),
        });
    }
    Ok(EmbedCtrl::from(TransportController::from(c)))
}

/// A running instance: controllers, their pollers and page caches, and the files opened on
/// them. Dropping it (or [`shutdown`](Self::shutdown)) lets the pollers finish what is in
/// flight and joins them.
pub struct Dioxide {
    ctrls: Vec<EmbedCtrl>,
    targets: Targets,
    caches: Vec<Arc<PageCache>>,
    engine: EngineRef,
    deferral: Option<Arc<dyn Deferral>>,
    extents: Extents,
}

impl std::fmt::Debug for Dioxide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dioxide")
            .field("controllers", &self.ctrls.len())
            .field("namespaces", &self.targets.len())
            .finish_non_exhaustive()
    }
}

impl Dioxide {
    /// A builder with defaults (one unpinned poller, callbacks on the poller).
    pub fn builder() -> Builder {
        Builder {
            ctrls: Vec::new(),
            digests: Digests::default(),
            kato_ms: DEFAULT_KATO_MS,
            tcp_command_timeout: HostOptions::new("").command_timeout,
            cores: vec![None],
            run_to_completion: false,
            ring: 1024,
            spin: 2000,
            idle: Duration::from_millis(1),
            io_yield: DEFAULT_IO_YIELD,
            wait_spin: Duration::from_micros(20),
            queue: QueueOptions::default(),
            cache_pages: 1024,
            completions: Completions::OnPoller,
            interrupts: InterruptMode::Polled,
        }
    }

    /// `(controller index, namespace)` of every namespace served.
    pub fn namespaces(&self) -> Vec<(usize, Namespace)> {
        self.targets.clone()
    }

    /// Controller `ctrl` (the NVMe/TCP target reads its logs through the admin queue).
    pub(crate) fn controller(&self, ctrl: usize) -> Option<&Controller> {
        self.ctrls.get(ctrl).and_then(EmbedCtrl::pcie)
    }

    /// Remote controller `ctrl`, if it is an NVMe/TCP one (its address, subsystem, and why it
    /// was lost, if it was).
    pub fn tcp_controller(&self, ctrl: usize) -> Option<&TcpController> {
        self.ctrls.get(ctrl).and_then(EmbedCtrl::tcp)
    }

    /// Open a file on namespace `nsid` of controller `ctrl`.
    pub fn open_file(&self, ctrl: usize, nsid: Nsid, opts: FileOptions) -> EmbedResult<BlockFile> {
        let Some(target) = self
            .targets
            .iter()
            .position(|(c, ns)| *c == ctrl && ns.nsid() == nsid)
        else {
            return Err(EmbedError::NoSuchNamespace { ctrl, nsid });
        };
        let ns = &self.targets[target].1;
        BlockFile::open(
            self.ctrls[ctrl].clone(),
            ns,
            ctrl,
            target as u32,
            self.engine.clone(),
            self.caches[ctrl].clone(),
            self.deferral.clone(),
            &self.extents,
            opts,
        )
    }

    /// A zero-copy buffer in the DMA memory of controller 0 (ordinary memory for a remote
    /// controller; use [`BlockFile::alloc`] for a file on another controller).
    pub fn alloc(&self, len: usize) -> EmbedResult<DmaBuffer> {
        Ok(self.ctrls[0].alloc(len)?)
    }

    /// Counters of each poller (empty in run-to-completion mode).
    pub fn poller_stats(&self) -> Vec<PollerStats> {
        match &self.engine {
            EngineRef::Pooled(p) => (0..p.len()).map(|i| p.stats(i)).collect(),
            EngineRef::Local(_) => Vec::new(),
        }
    }

    /// Run `task` on poller `poller` (an index into [`Builder::pollers`]), once per round of
    /// that poller's loop, on its thread, until it is removed or the instance shuts down (it is
    /// then dropped on that thread, after the poller's last I/O completed). What the task
    /// submits from there goes to that poller's own queue and completes on that thread, as
    /// from a completion callback; a busy task keeps the poller from parking (see
    /// [`PollerTask`]). Errors: [`EmbedError::Config`] in run-to-completion mode or when there
    /// is no such poller.
    pub fn add_poller_task(
        &self,
        poller: usize,
        task: impl PollerTask,
    ) -> EmbedResult<PollerTaskId> {
        let EngineRef::Pooled(p) = &self.engine else {
            return Err(EmbedError::Config(
                "add_poller_task: a run-to-completion instance has no poller; use Builder::pollers",
            ));
        };
        p.add_task(poller, Box::new(task)).map_err(|e| match e {
            TaskError::NoSuchPoller => EmbedError::Config(
                "add_poller_task: no poller with that index; Builder::pollers sets how many run",
            ),
            TaskError::Stopped => EmbedError::ShutDown,
        })
    }

    /// Remove a task: it is dropped on its poller's thread at the start of that poller's next
    /// round (its `Drop` tells when). A task already removed: nothing happens.
    pub fn remove_poller_task(&self, id: PollerTaskId) {
        if let EngineRef::Pooled(p) = &self.engine {
            p.remove_task(id);
        }
    }

    /// Counters of the page cache of controller `ctrl` (`None`: no such controller).
    pub fn cache_stats(&self, ctrl: usize) -> Option<CacheStats> {
        self.caches.get(ctrl).map(|c| c.stats())
    }

    /// Run-to-completion mode: reap completions now (callbacks of asynchronous requests run
    /// here), and send the Keep Alive of remote controllers when it is due: an idle owner must
    /// call this at least every KATO / 2 ([`Builder::tcp_keep_alive`]). Returns the bios
    /// completed. Pooled mode: 0.
    pub fn poll(&self) -> usize {
        match &self.engine {
            EngineRef::Local(l) => l.poll_once(),
            EngineRef::Pooled(_) => 0,
        }
    }

    /// The asynchronous events (SMART / health warnings, errors, notices) the controllers
    /// reported since the last call, as `(controller index, event)`, oldest first; taking them
    /// re-arms their types ([`Controller::async_events`]). A controller that cannot answer
    /// (removed, being reset) is skipped and logged: the others' events are still returned.
    pub fn async_events(&self) -> Vec<(usize, AsyncEvent)> {
        let mut out = Vec::new();
        for (i, c) in self.ctrls.iter().enumerate() {
            // NVMe/TCP controllers: the host keeps no event requests outstanding (yet).
            let Some(c) = c.pcie() else { continue };
            match c.async_events() {
                Ok(evs) => out.extend(evs.into_iter().map(|e| (i, e))),
                Err(e) => log::warn!("controller {i}: asynchronous events not read: {e}"),
            }
        }
        out
    }

    /// Refuse new requests, let the pollers finish every request in flight, join them.
    pub fn shutdown(self) {
        drop(self);
    }
}

impl Drop for Dioxide {
    fn drop(&mut self) {
        match &self.engine {
            EngineRef::Pooled(p) => p.shutdown(),
            EngineRef::Local(l) => {
                // Every accepted request completes before the queue pairs go: poll until
                // nothing is in flight (each command's timeout bounds the wait).
                while l.on_owner() && (l.poll_once() > 0 || l.in_flight()) {
                    std::thread::yield_now();
                }
                l.close();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// A panicking deferred job does not stop the thread: the jobs behind it still run.
    #[test]
    fn a_panicking_job_does_not_stop_the_completion_thread() {
        let ct = CompletionThread::spawn("test-ct-panic").expect("spawn");
        let (tx, rx) = mpsc::channel();
        ct.defer(Box::new(|| panic!("a deferred job fails")));
        let tx2 = tx.clone();
        ct.defer(Box::new(move || tx2.send(1).expect("send")));
        ct.defer(Box::new(|| panic!("another")));
        ct.defer(Box::new(move || tx.send(2).expect("send")));
        assert_eq!(
            rx.recv_timeout(std::time::Duration::from_secs(30))
                .expect("the job after the panic ran"),
            1
        );
        assert_eq!(
            rx.recv_timeout(std::time::Duration::from_secs(30))
                .expect("and the one after the next panic"),
            2
        );
        ct.stop();
    }

    /// Work that spilled to the overflow list runs before work handed over after it, even when
    /// the ring has room again.
    #[test]
    fn work_runs_in_order_across_the_overflow() {
        let ct = CompletionThread::spawn("test-ct-order").expect("spawn");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (go_tx, go_rx) = mpsc::channel::<()>();
        ct.defer(Box::new(move || go_rx.recv().expect("go")));
        let n = COMPLETION_RING as u32 + 10;
        for i in 1..=n {
            let l = log.clone();
            let late = (i == 1).then(|| (ct.clone(), log.clone()));
            ct.defer(Box::new(move || {
                l.lock().expect("log").push(i);
                // The first job runs with the ring's room freed and the overflow full: what
                // it hands over must still wait behind the overflow.
                if let Some((ct, l)) = late {
                    ct.defer(Box::new(move || l.lock().expect("log").push(n + 1)));
                }
            }));
        }
        go_tx.send(()).expect("go");
        // All of it runs on the thread (after `stop`, a hand-over would run in place).
        while log.lock().expect("log").len() < n as usize + 1 {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        ct.stop();
        let got = log.lock().expect("log").clone();
        let first_wrong = got.iter().zip(1..).position(|(&g, want)| g != want);
        assert_eq!(first_wrong, None, "{:?}", &got[..got.len().min(8)]);
    }
}
