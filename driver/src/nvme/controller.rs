//! Controller bring-up, shutdown, reset, namespaces and queue-pair creation.
//!
//! Bring-up is an explicit state machine ([`InitState`]); each state has a time limit (CAP.TO
//! for register handshakes, [`ControllerOptions::admin_timeout`] for admin commands) and a
//! timeout names the state it happened in. The same machine re-initialises the controller in
//! [`Controller::reset`] (after CSTS.CFS, for example): clearing CC.EN deletes every I/O queue
//! on the device, so the driver never sends Delete SQ/CQ before a reset; queue pairs created
//! before the reset notice it and fail their requests with [`DeadReason::ControllerReset`],
//! but only once the reset has seen the device stop (CSTS.RDY = 0 after CC.EN was cleared):
//! until then the device may still write their buffers. A reset whose disable times out
//! leaves them leaked, never handed back (see [`Shared::stop_state`]). A shutdown
//! ([`Controller::shutdown`]) follows the same rule: queue pairs hand their requests back once
//! CSTS.SHST reads complete, and leak them if it never does.
//!
//! A [`Controller`] is a cheap handle (`Clone`, `Send`, `Sync`); the controller is shut down
//! (CC.SHN normal, waiting for CSTS.SHST complete) when the last handle and the last queue pair
//! are dropped.
//!
//! # Removal watch
//! A removal the platform announces (vfio-pci's device request eventfd on `device_del` or an
//! unbind) must be answered even when nobody polls: the kernel waits, re-signalling every 10 s,
//! until the device file is closed, and `device_del` never completes before. Queue pairs with
//! requests outstanding look for the announcement in their housekeeping (every
//! [`REMOVAL_CHECK`]); for the idle case each controller whose bus offers a notifier
//! ([`Bus::removal_notifier`]) keeps one thread (`nvme-removal`) asleep in `poll(2)` on it and
//! on a stop eventfd: no wake-ups, no CPU while the device is healthy. When the notifier fires
//! the thread has the bus release the device (exactly once, by whoever notices first; others
//! wait until it is done) and only then marks the controller gone: every queue pair's next poll
//! or submission fails its requests once with "device removed" (new requests are refused with
//! it), so a buffer is handed back only when the device can no longer write to it. Then the
//! thread exits. The thread holds no reference to the controller (only the health state and
//! the bus), so it never keeps a controller alive and the controller's last drop (the last
//! handle or queue pair) always runs on the user's thread: it stops and joins the thread (waiting
//! for a release under way) before the bus is closed, so when that drop returns the device file
//! is closed and the PCI address can be opened again at once.
//!
//! A removal and a reset never overlap on the device: once a removal is noticed a reset is
//! refused, one under way stops at its next step, and the release waits for it (see
//! [`Removal`]). The controller is marked gone even if the release panics.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::AtomicBool;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Once, RwLock};
use std::thread::{JoinHandle, ThreadId};
use std::time::{Duration, Instant};

use crate::bus::Bus;
use crate::bus::dma::{DmaBuffer, DmaMemory};
use crate::bus::interrupt::EventFd;
use crate::nvme::admin::AdminQueue;
use crate::nvme::error::{DeadReason, Error, Result};
use crate::nvme::namespace::Namespace;
use crate::nvme::qpair::{QueueOptions, QueuePair};
use crate::nvme::shadow::ShadowPages;
use crate::spec::regs::{offset, shn, shst};
use crate::spec::{Cap, Cc, Csts, IdentifyController, Oacs, Vs};
use crate::types::{Nsid, QueueId};

/// Options for opening a controller.
#[derive(Clone, Debug)]
pub struct ControllerOptions {
    /// I/O queue pairs to ask for with Set Features / Number of Queues (the controller may grant
    /// fewer). Default 64.
    pub io_queues: u16,
    /// Admin queue entries (2..=4096). Default 32.
    pub admin_entries: u16,
    /// Time limit of one admin command. Default 5 s.
    pub admin_timeout: Duration,
    /// Time limit of the shutdown handshake on drop. Default 10 s.
    pub shutdown_timeout: Duration,
    /// Shadow doorbells for the I/O queues when the controller offers them (Doorbell Buffer
    /// Config, OACS bit 8): doorbell values go to a page of host memory, and a register is
    /// written only when the controller's event index asks for it. Default on; off writes every
    /// doorbell to its register.
    pub shadow_doorbells: bool,
}

impl ControllerOptions {
    /// With shadow doorbells on (when the controller offers them) or off.
    pub fn with_shadow_doorbells(mut self, on: bool) -> Self {
        self.shadow_doorbells = on;
        self
    }
}

impl Default for ControllerOptions {
    fn default() -> Self {
        ControllerOptions {
            io_queues: 64,
            admin_entries: 32,
            admin_timeout: Duration::from_secs(5),
            shutdown_timeout: Duration::from_secs(10),
            shadow_doorbells: true,
        }
    }
}

/// The states of controller bring-up, in order.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum InitState {
    /// Clear CC.EN if it is set.
    Disable,
    /// Wait for CSTS.RDY = 0 (limit CAP.TO).
    WaitForNotReady,
    /// Allocate the admin queues and program AQA, ASQ, ACQ.
    ConfigureAdminQueue,
    /// Write CC (IOSQES 6, IOCQES 4, MPS 0, CSS NVM) with EN = 1.
    Enable,
    /// Wait for CSTS.RDY = 1 (limit CAP.TO).
    WaitForReady,
    /// Identify Controller.
    IdentifyController,
    /// Active namespace ID list (CNS 02h), paging past 1024 entries.
    ActiveNamespaces,
    /// Identify Namespace for each active namespace.
    IdentifyNamespaces,
    /// Set Features / Number of Queues.
    SetNumberOfQueues,
    /// Doorbell Buffer Config (shadow doorbells), if the controller offers it and the options
    /// ask for it.
    DoorbellBufferConfig,
    /// Done.
    Ready,
}

/// How often queue pairs with requests outstanding look for an announced removal.
pub(crate) const REMOVAL_CHECK: Duration = Duration::from_millis(10);

pub(crate) const LIVE: u8 = 0;
pub(crate) const FATAL: u8 = 1;
pub(crate) const GONE: u8 = 2;
pub(crate) const SHUT_DOWN: u8 = 3;
pub(crate) const FAILED: u8 = 4;

pub(crate) struct CtrlData {
    pub(crate) identify: IdentifyController,
    pub(crate) namespaces: Vec<Namespace>,
    pub(crate) granted: u16,
    pub(crate) max_transfer: usize,
    /// The shadow doorbell pages the controller took at bring-up, if it did.
    pub(crate) shadow: Option<Arc<ShadowPages>>,
}

/// State shared by the controller handles and its queue pairs.
pub(crate) struct Shared {
    pub(crate) location: String,
    pub(crate) cap: Cap,
    pub(crate) opts: ControllerOptions,
    pub(crate) admin: Mutex<Option<AdminQueue>>,
    pub(crate) data: RwLock<CtrlData>,
    /// Bumped by every reset, disable and shutdown, before CC.EN is cleared (CC.SHN set): queue
    /// pairs of an older generation are dead (they submit nothing more), but the device may
    /// still be working on their commands until
    /// [`stopped_generation`](Self::stopped_generation) says otherwise.
    pub(crate) generation: AtomicU64,
    /// Orders the health and generation changes that must be seen together: a new generation
    /// with the health that goes with it ([`Shared::begin_disable`]), a bring-up publishing
    /// [`LIVE`] only if no newer generation started ([`Shared::publish_live`]), and a queue
    /// pair creation reading both ([`Shared::live_generation`]). Never held across a register
    /// wait or an admin command.
    transition: Mutex<()>,
    /// The newest generation whose disable saw the device stop: CC.EN cleared and CSTS.RDY read
    /// 0 after `generation` had reached it. Every queue of an older generation was deleted then
    /// (see [`Shared::stop_state`]).
    stopped_generation: AtomicU64,
    /// The newest generation whose disable has finished, stopping the device or not (timed
    /// out, device gone, a panic): published after `stopped_generation`.
    settled_generation: AtomicU64,
    /// Abort commands sent (by timed-out queue pairs and [`Controller::abort`]).
    pub(crate) aborts_sent: AtomicU64,
    /// Times a queue pair being dropped found a disable or shutdown under way that had not yet
    /// settled, and waited for it (see [`Shared::settle_limit`]).
    pub(crate) drop_waits: AtomicU64,
    /// Shared with the removal watch, which holds no reference to `Shared` (see the module
    /// docs).
    pub(crate) health: Arc<AtomicU8>,
    /// A removal under way or done, and the reset it must not overlap. Shared with the
    /// removal watch.
    removal: Arc<Removal>,
    qids: Mutex<QidTable>,
    /// When the controller was opened: the time base of `removal_checked`.
    born: Instant,
    /// Nanoseconds after `born` of the last [`Bus::removal_requested`] look from I/O.
    removal_checked: AtomicU64,
    /// The removal watch thread, if the bus offers a notifier (see the module docs).
    watch: Mutex<Option<RemovalWatch>>,
    /// Last: dropped after the admin queue, whose doorbells and DMA memory belong to it (a
    /// VFIO device whose BAR is still mapped cannot leave its container).
    pub(crate) bus: Arc<dyn Bus>,
}

/// I/O queue ids in use, by queue pairs of any generation.
///
/// A reset deletes every I/O queue on the device, but an id stays reserved until the queue pair
/// that held it is dropped: a stale queue pair may still write its doorbells (the CQ head after
/// consuming an entry posted before the reset), and with its id reserved those writes hit a
/// queue that does not exist on the device rather than a new queue pair's.
#[derive(Default)]
struct QidTable {
    /// `used[i]`: queue id `i + 1` is held. May extend past `granted` with ids held by queue
    /// pairs from before a reset that granted fewer queues.
    used: Vec<bool>,
    /// Queues granted by the last bring-up: ids `1..=granted` can be handed out.
    granted: u16,
}

impl QidTable {
    /// After a bring-up that granted `granted` queues: ids still held stay held.
    fn regrant(&mut self, granted: u16) {
        self.granted = granted;
        if self.used.len() < granted as usize {
            self.used.resize(granted as usize, false);
        }
        while self.used.len() > granted as usize && self.used.last() == Some(&false) {
            self.used.pop();
        }
    }
    fn alloc(&mut self) -> Option<QueueId> {
        let i = self.used[..self.granted as usize].iter().position(|u| !u)?;
        self.used[i] = true;
        Some(QueueId(i as u16 + 1))
    }
    fn free(&mut self, qid: QueueId) {
        if let Some(u) = (qid.0 as usize)
            .checked_sub(1)
            .and_then(|i| self.used.get_mut(i))
        {
            *u = false;
        }
        self.regrant(self.granted);
    }
}

/// A removal and the resets it keeps off the device.
///
/// [`mark_gone`] sets `started`, waits until no reset is touching the device (unless it runs
/// on the resetting thread itself), releases the device and publishes [`GONE`]. A reset refuses
/// to start once `started` is set, and its bring-up stops at the next step (or register wait)
/// when it sees it; so the device is never re-initialised while the bus lets it go.
pub(crate) struct Removal {
    /// A removal was noticed: set before the device is released.
    started: AtomicBool,
    /// The thread whose reset is bringing the controller up (set and cleared under the admin
    /// lock, so at most one).
    resetting: Mutex<Option<ThreadId>>,
    /// [`Bus::release_removed`] has run: released inside it, [`GONE`] published afterwards.
    released: Once,
    /// Times a removal found a reset under way on another thread and waited for it to stop.
    reset_waits: AtomicU64,
}

impl Removal {
    fn new() -> Removal {
        Removal {
            started: AtomicBool::new(false),
            resetting: Mutex::new(None),
            released: Once::new(),
            reset_waits: AtomicU64::new(0),
        }
    }

    fn started(&self) -> bool {
        self.started.load(Ordering::Acquire)
    }

    fn lock_resetting(&self) -> MutexGuard<'_, Option<ThreadId>> {
        self.resetting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until no other thread's reset touches the device. `started` is set before: a
    /// reset that registers after this look sees it (the lock orders the two).
    fn wait_for_reset(&self, location: &str) {
        let me = std::thread::current().id();
        let mut waited = false;
        loop {
            match *self.lock_resetting() {
                Some(t) if t != me => {}
                _ => return,
            }
            if !waited {
                waited = true;
                let n = self.reset_waits.fetch_add(1, Ordering::AcqRel) + 1;
                log::warn!(
                    "{location}: removal: waiting for the reset under way to stop before \
                     releasing the device ({n} such waits)"
                );
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }
}

/// A reset's hold on the device (see [`Removal`]): cleared when dropped.
struct Resetting<'a>(&'a Removal);

impl<'a> Resetting<'a> {
    /// Registers the calling thread as the resetting one, unless a removal has started.
    fn begin(removal: &'a Removal) -> Option<Resetting<'a>> {
        *removal.lock_resetting() = Some(std::thread::current().id());
        let r = Resetting(removal);
        (!removal.started()).then_some(r)
    }
}

impl Drop for Resetting<'_> {
    fn drop(&mut self) {
        *self.0.lock_resetting() = None;
    }
}

/// Whether the device has stopped using the queues of a generation (see
/// [`Shared::stop_state`]).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum StopState {
    /// CC.EN was cleared and CSTS.RDY read 0 since: its queues no longer exist on the device.
    Stopped,
    /// A disable is under way (CC.EN may still be 1): nothing the device was given may be
    /// reused yet; look again.
    Pending,
    /// Every disable since has finished without seeing the device stop (timed out, device
    /// gone): the device may still use the memory for good.
    NotStopped,
}

/// The disable of one generation: publishes its outcome when dropped (on every path: errors,
/// early returns, panics), so that queue pairs waiting for it never wait for ever.
struct Settle<'a> {
    shared: &'a Shared,
    generation: u64,
}

impl Settle<'_> {
    /// CSTS.RDY read 0 after CC.EN was cleared: the device stopped. Published at once.
    fn stopped(self) {
        self.shared
            .stopped_generation
            .fetch_max(self.generation, Ordering::AcqRel);
    }
}

impl Drop for Settle<'_> {
    fn drop(&mut self) {
        self.shared
            .settled_generation
            .fetch_max(self.generation, Ordering::AcqRel);
    }
}

impl Shared {
    fn lock_transition(&self) -> MutexGuard<'_, ()> {
        self.transition.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a new generation before the device is disabled or shut down; the returned guard
    /// publishes how that ended. `health` first moves the health away from [`LIVE`] (to
    /// [`FAILED`] or [`SHUT_DOWN`], or leaves it fatal or gone) and says whether to go on;
    /// both happen together under the transition lock, so a queue pair creation that finds the
    /// controller live read the generation before this bump (and its queues are stale), and a
    /// bring-up finishing meanwhile does not publish [`LIVE`] for an older generation.
    fn begin_disable(&self, health: impl FnOnce(&AtomicU8) -> bool) -> Option<Settle<'_>> {
        let _t = self.lock_transition();
        if !health(&self.health) {
            return None;
        }
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        Some(Settle {
            shared: self,
            generation,
        })
    }

    /// The end of a bring-up of `generation`: the controller becomes [`LIVE`], unless a newer
    /// generation started meanwhile (another reset waiting for the admin lock, or a disable:
    /// the health stays [`FAILED`] and that one decides), or the controller was shut down or
    /// removed.
    fn publish_live(&self, generation: u64) -> Result<()> {
        let _t = self.lock_transition();
        match self.health.load(Ordering::Acquire) {
            LIVE => Ok(()),
            FAILED if self.generation.load(Ordering::Acquire) == generation => {
                self.health.store(LIVE, Ordering::Release);
                Ok(())
            }
            FAILED => {
                log::info!(
                    "{}: another reset or disable started during this reset: the controller is \
                     ready once a newer reset has brought it up (a disable alone does not)",
                    self.location
                );
                Err(Error::NotReady {
                    location: self.location.clone(),
                    state: "being reset again (another reset or disable started during this one)",
                    hint: "if a reset follows, wait for it; otherwise call Controller::reset \
                           again",
                })
            }
            _ => Err(self.not_ready().unwrap_or_else(|| self.gone())),
        }
    }

    /// For a queue pair creation, under the admin lock: the generation its queues belong to,
    /// or why the controller cannot take new queues. Read with the health under the
    /// transition lock: a generation whose disable is still to come is never returned with
    /// [`LIVE`] (see [`Shared::begin_disable`]).
    pub(crate) fn live_generation(&self) -> Result<u64> {
        let _t = self.lock_transition();
        match self.not_ready() {
            Some(e) => Err(e),
            None => Ok(self.generation.load(Ordering::Acquire)),
        }
    }

    /// Whether the device has stopped using the queues of queue pairs of `generation`, which
    /// learnt that a reset or disable made them dead: only [`StopState::Stopped`] lets them
    /// hand back memory the device was given.
    pub(crate) fn stop_state(&self, generation: u64) -> StopState {
        let current = self.generation.load(Ordering::Acquire);
        let settled = self.settled_generation.load(Ordering::Acquire);
        // Read after `settled`: a disable that settled having stopped the device published
        // `stopped_generation` first.
        if self.stopped_generation.load(Ordering::Acquire) > generation {
            StopState::Stopped
        } else if generation < current && settled >= current {
            StopState::NotStopped
        } else {
            StopState::Pending
        }
    }

    /// A removal was noticed: the device is being released, or was ([`GONE`] follows).
    pub(crate) fn removal_started(&self) -> bool {
        self.removal.started()
    }

    /// Allocates a zeroed DMA buffer of `len` bytes; `what` names it in the error.
    pub(crate) fn alloc(&self, len: usize, what: &'static str) -> Result<DmaBuffer> {
        self.bus
            .dma()
            .alloc(len)
            .map_err(|source| Error::Dma { what, source })
    }

    pub(crate) fn lock_admin(&self) -> MutexGuard<'_, Option<AdminQueue>> {
        self.admin.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The device was removed (registers read all ones, or the platform asked for it back):
    /// the bus lets the device go: once, by whichever caller (a queue pair, the removal watch,
    /// a register read) gets here first; then every queue pair's next health check or
    /// submission fails its requests with [`DeadReason::DeviceGone`].
    ///
    /// Release first, publish after: a queue pair that sees [`GONE`] hands its in-flight
    /// buffers back to the user, which is safe only once the device can no longer write to
    /// them (an announced removal leaves the device working until the bus lets it go).
    /// Callers arriving while another thread releases wait for it to finish.
    pub(crate) fn mark_gone(&self) {
        mark_gone(&self.health, &self.removal, &*self.bus, &self.location);
    }

    /// From the housekeeping of a queue pair with requests outstanding, at most once per
    /// [`REMOVAL_CHECK`] per controller: asks the bus whether the platform wants the device
    /// back, and marks it gone if so. True when the device is gone. (A device that keeps
    /// completing commands is never health-checked, so the announcement is looked for here.)
    pub(crate) fn poll_removal(&self, now: Instant) -> bool {
        let t = now.saturating_duration_since(self.born).as_nanos() as u64;
        let last = self.removal_checked.load(Ordering::Relaxed);
        if t.saturating_sub(last) < REMOVAL_CHECK.as_nanos() as u64
            || self
                .removal_checked
                .compare_exchange(last, t, Ordering::AcqRel, Ordering::Relaxed)
                .is_err()
        {
            return self.health.load(Ordering::Acquire) == GONE;
        }
        if self.bus.removal_requested() {
            self.mark_gone();
        }
        self.health.load(Ordering::Acquire) == GONE
    }

    /// Reads CSTS and turns all ones and CFS into errors (updating the health state). A removal
    /// the platform announced ([`Bus::removal_requested`]) counts as all ones.
    pub(crate) fn check_csts(&self) -> Result<Csts> {
        let csts = Csts(self.bus.read32(offset::CSTS));
        if csts.is_all_ones() || self.removal.started() || self.bus.removal_requested() {
            self.mark_gone();
            return Err(self.gone());
        }
        if csts.cfs() {
            let _ = self
                .health
                .compare_exchange(LIVE, FATAL, Ordering::AcqRel, Ordering::Acquire);
            return Err(Error::ControllerFatal {
                location: self.location.clone(),
            });
        }
        Ok(csts)
    }

    pub(crate) fn gone(&self) -> Error {
        Error::DeviceGone {
            location: self.location.clone(),
        }
    }

    /// Why queue pairs of generation `generation` can no longer work, if they cannot.
    pub(crate) fn dead_reason(&self, generation: u64) -> Option<DeadReason> {
        match self.health.load(Ordering::Acquire) {
            FATAL => Some(DeadReason::ControllerFatal),
            GONE => Some(DeadReason::DeviceGone),
            SHUT_DOWN => Some(DeadReason::ShutDown),
            _ if self.generation.load(Ordering::Acquire) != generation => {
                Some(DeadReason::ControllerReset)
            }
            LIVE => None,
            _ => Some(DeadReason::ControllerReset),
        }
    }

    pub(crate) fn not_ready(&self) -> Option<Error> {
        let (state, hint) = match self.health.load(Ordering::Acquire) {
            LIVE => return None,
            GONE => return Some(self.gone()),
            FATAL => ("in fatal status (CSTS.CFS)", "call Controller::reset"),
            SHUT_DOWN => ("shut down", "open the controller again"),
            _ => ("failed", "call Controller::reset"),
        };
        Some(Error::NotReady {
            location: self.location.clone(),
            state,
            hint,
        })
    }

    /// Polls CSTS until `done`, all ones (device gone), CFS (if `fail_on_cfs`) or `limit`
    /// after `entered` ([`Error::InitTimeout`] in `state`).
    fn wait_csts(
        &self,
        state: InitState,
        entered: Instant,
        limit: Duration,
        done: impl Fn(Csts) -> bool,
        fail_on_cfs: bool,
        stop_on_removal: bool,
    ) -> Result<()> {
        let mut spins = 0u32;
        loop {
            if stop_on_removal && self.removal.started() {
                return Err(self.gone());
            }
            let csts = Csts(self.bus.read32(offset::CSTS));
            if csts.is_all_ones() {
                self.mark_gone();
                return Err(self.gone());
            }
            if fail_on_cfs && csts.cfs() {
                return Err(Error::ControllerFatal {
                    location: self.location.clone(),
                });
            }
            if done(csts) {
                return Ok(());
            }
            let waited = entered.elapsed();
            if waited > limit {
                return Err(Error::InitTimeout {
                    location: self.location.clone(),
                    state,
                    waited,
                });
            }
            spins += 1;
            if spins < 64 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }

    /// Runs the bring-up state machine. Holds the admin lock throughout.
    ///
    /// For a reset, `settle` is the disable of the reset's generation: it publishes that the
    /// device stopped as soon as CSTS.RDY reads 0 (or that it did not, on any other way out).
    /// A reset also keeps off a removal (see [`Removal`]): it does not start once a removal has
    /// started, and stops at the next step when one starts.
    fn initialize(&self, settle: Option<Settle<'_>>) -> Result<()> {
        let mut admin = self.lock_admin();
        let mine = settle
            .as_ref()
            .map_or_else(|| self.generation.load(Ordering::Acquire), |s| s.generation);
        let mut settle = settle;
        let resetting = match settle {
            Some(_) => match Resetting::begin(&self.removal) {
                Some(r) => Some(r),
                None => return Err(self.gone()),
            },
            None => None,
        };
        let stop_on_removal = resetting.is_some();
        let limit = self.disable_limit();
        let dstrd = self.cap.dstrd();
        let mut identify = None;
        let mut nsids = Vec::new();
        let mut namespaces = Vec::new();
        let mut state = InitState::Disable;
        let mut entered = Instant::now();
        loop {
            if stop_on_removal && self.removal.started() {
                log::warn!(
                    "{}: a removal started during the reset: the reset stops in state {state:?}",
                    self.location
                );
                return Err(self.gone());
            }
            let next = match state {
                InitState::Disable => {
                    let cc = Cc(self.bus.read32(offset::CC));
                    if Csts(self.bus.read32(offset::CSTS)).is_all_ones() {
                        self.mark_gone();
                        return Err(self.gone());
                    }
                    if cc.en() {
                        self.bus.write32(offset::CC, cc.with_en(false).0);
                    }
                    InitState::WaitForNotReady
                }
                InitState::WaitForNotReady => {
                    // CFS may be set here; disabling is how we recover from it.
                    self.wait_csts(state, entered, limit, |c| !c.rdy(), false, stop_on_removal)?;
                    // Every I/O queue is deleted: the queue pairs of older generations may
                    // hand their memory back now.
                    if let Some(s) = settle.take() {
                        s.stopped();
                    }
                    InitState::ConfigureAdminQueue
                }
                InitState::ConfigureAdminQueue => {
                    // The controller is disabled: the old admin queue memory is no longer used.
                    *admin = None;
                    let q = AdminQueue::new(self, self.opts.admin_entries, dstrd)?;
                    let (asq, acq, aqa) = q.registers();
                    self.bus.write32(offset::AQA, aqa.0);
                    self.bus.write64(offset::ASQ, asq.0);
                    self.bus.write64(offset::ACQ, acq.0);
                    *admin = Some(q);
                    InitState::Enable
                }
                InitState::Enable => {
                    let cc = Cc::default()
                        .with_iosqes(crate::spec::SQES)
                        .with_iocqes(crate::spec::CQES)
                        .with_mps(0)
                        .with_css(0)
                        .with_ams(0)
                        .with_shn(shn::NONE)
                        .with_en(true);
                    self.bus.write32(offset::CC, cc.0);
                    InitState::WaitForReady
                }
                InitState::WaitForReady => {
                    self.wait_csts(state, entered, limit, |c| c.rdy(), true, stop_on_removal)?;
                    InitState::IdentifyController
                }
                InitState::IdentifyController => {
                    let q = admin.as_mut().expect("admin queue configured");
                    identify = Some(q.identify_controller(self)?);
                    InitState::ActiveNamespaces
                }
                InitState::ActiveNamespaces => {
                    let q = admin.as_mut().expect("admin queue configured");
                    nsids = q.active_namespaces(self)?;
                    InitState::IdentifyNamespaces
                }
                InitState::IdentifyNamespaces => {
                    let q = admin.as_mut().expect("admin queue configured");
                    namespaces.clear();
                    for &n in &nsids {
                        let id = q.identify_namespace(self, Nsid(n))?;
                        // A namespace with an unusable format (invalid LBADS, metadata-only)
                        // or a zero or overflowing size is skipped rather than failing the
                        // controller; Controller::namespace then reports it as not active.
                        namespaces.extend(Namespace::new(Nsid(n), id));
                    }
                    InitState::SetNumberOfQueues
                }
                InitState::SetNumberOfQueues => {
                    let q = admin.as_mut().expect("admin queue configured");
                    let want = self.opts.io_queues.clamp(1, 65534);
                    let dw0 = q.execute_checked(
                        self,
                        "Set Features (Number of Queues)",
                        crate::spec::Sqe::set_number_of_queues(want, want),
                    )?;
                    let nsqa = (dw0 & 0xffff) as u16;
                    let ncqa = (dw0 >> 16) as u16;
                    let granted = nsqa.min(ncqa).saturating_add(1).min(want);
                    let id = identify.take().expect("identified");
                    let mdts = id
                        .max_transfer_bytes(self.cap.min_page_size())
                        .unwrap_or(usize::MAX);
                    let mut data = self.data.write().unwrap_or_else(|e| e.into_inner());
                    *data = CtrlData {
                        identify: id,
                        namespaces: core::mem::take(&mut namespaces),
                        granted,
                        max_transfer: mdts.min(crate::nvme::prp::MAX_TRANSFER),
                        shadow: None,
                    };
                    self.qids
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .regrant(granted);
                    InitState::DoorbellBufferConfig
                }
                InitState::DoorbellBufferConfig => {
                    let q = admin.as_mut().expect("admin queue configured");
                    let shadow = self.doorbell_buffer_config(q)?;
                    self.data.write().unwrap_or_else(|e| e.into_inner()).shadow = shadow;
                    InitState::Ready
                }
                InitState::Ready => break,
            };
            if next != state {
                state = next;
                entered = Instant::now();
            }
        }
        if stop_on_removal && self.removal.started() {
            log::warn!(
                "{}: a removal started during the reset: the reset stops before enabling \
                 asynchronous events",
                self.location
            );
            return Err(self.gone());
        }
        self.start_async_events(&mut admin);
        // Only now: starting asynchronous events sends admin commands to the device.
        drop(resetting);
        // Only from FAILED and only if no newer reset or disable started: a removal noticed
        // meanwhile (GONE, by the removal watch or a queue pair) or a shutdown must not be
        // overwritten with LIVE, and a reset waiting for the admin lock is about to delete
        // every queue a creation would make now. Under the admin lock: a creation waiting for
        // it reads the outcome.
        self.publish_live(mine)
    }

    /// After bring-up: asynchronous events enabled and their requests outstanding (a separate
    /// step: a controller that refuses them still works).
    fn start_async_events(&self, admin: &mut Option<AdminQueue>) {
        let aerl = self
            .data
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .identify
            .aerl;
        if let Some(q) = admin.as_mut() {
            q.start_async_events(self, aerl);
        }
    }

    /// The bring-up step [`InitState::DoorbellBufferConfig`]: gives the controller a shadow
    /// doorbell page and an event index page for every queue id it granted, if it offers
    /// Doorbell Buffer Config and the options want shadow doorbells. A controller that refuses
    /// the command is used without them (logged), as Linux does.
    fn doorbell_buffer_config(&self, q: &mut AdminQueue) -> Result<Option<Arc<ShadowPages>>> {
        let (offered, granted) = {
            let d = self.data.read().unwrap_or_else(|e| e.into_inner());
            let oacs = d.identify.oacs;
            (oacs.contains(Oacs::DOORBELL_BUFFER_CONFIG), d.granted)
        };
        if !self.opts.shadow_doorbells || !offered {
            return Ok(None);
        }
        let dstrd = self.cap.dstrd();
        let len = ShadowPages::len_for(granted, dstrd);
        // Two pages for up to 256 queues at stride 4; a large stride times many queues may not
        // fit in DMA memory: then the doorbells stay on the registers.
        let pages = match (
            self.alloc(len, "the shadow doorbell page"),
            self.alloc(len, "the event index page"),
        ) {
            (Ok(shadow), Ok(event_idx)) => ShadowPages::new(shadow, event_idx, granted, dstrd),
            (Err(e), _) | (_, Err(e)) => {
                log::warn!(
                    "{}: no shadow doorbells: {e}; doorbells go to the registers",
                    self.location
                );
                return Ok(None);
            }
        };
        let (dbs, eis) = pages.iovas();
        let sqe = crate::spec::Sqe::doorbell_buffer_config(dbs, eis);
        match q.execute_checked(self, "Doorbell Buffer Config", sqe) {
            Ok(_) => {
                log::debug!("{}: shadow doorbells for {granted} queues", self.location);
                Ok(Some(Arc::new(pages)))
            }
            Err(Error::AdminStatus { status, .. }) => {
                log::warn!(
                    "{}: the controller refused Doorbell Buffer Config ({status}); \
                     doorbells go to the registers",
                    self.location
                );
                Ok(None)
            }
            Err(e) => {
                // The controller may still take the pages and write event indexes into them:
                // they are never given back to the allocator.
                core::mem::forget(pages);
                Err(e)
            }
        }
    }

    pub(crate) fn alloc_qid(&self) -> Result<QueueId> {
        let mut q = self.qids.lock().unwrap_or_else(|e| e.into_inner());
        q.alloc().ok_or_else(|| Error::NoQueueIds {
            location: self.location.clone(),
            granted: q.granted,
        })
    }

    /// Frees a queue id when its queue pair is dropped, whatever its generation: ids held
    /// across a reset stay reserved until then (see [`QidTable`]).
    pub(crate) fn free_qid(&self, qid: QueueId) {
        self.qids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .free(qid);
    }

    /// Clears CC.EN and waits for RDY = 0: the device stops every command and forgets every
    /// queue. Used when a command cannot be reclaimed any other way. Queue pairs become dead.
    ///
    /// The queue pairs of older generations learn that the device stopped (or did not) only
    /// when CSTS.RDY has read 0 (or the wait ended otherwise): see [`Shared::stop_state`].
    pub(crate) fn disable(&self) -> Result<()> {
        let settle = self
            .begin_disable(|h| {
                let _ = h.compare_exchange(LIVE, FAILED, Ordering::AcqRel, Ordering::Acquire);
                true
            })
            .expect("a disable always starts");
        let cc = Cc(self.bus.read32(offset::CC));
        self.bus.write32(offset::CC, cc.with_en(false).0);
        self.wait_csts(
            InitState::WaitForNotReady,
            Instant::now(),
            self.disable_limit(),
            |c| !c.rdy(),
            false,
            false,
        )?;
        settle.stopped();
        Ok(())
    }

    /// How long a disable may wait for CSTS.RDY = 0: CAP.TO, at least 500 ms.
    fn disable_limit(&self) -> Duration {
        Duration::from_millis(self.cap.timeout_ms().max(500))
    }

    /// How long a queue pair being dropped waits for a disable or shutdown under way to settle
    /// (see [`Shared::stop_state`]): a reset or shutdown may first wait for the admin queue
    /// (one admin command) and then for CSTS.RDY = 0 (or CSTS.SHST complete), and every way
    /// out of it settles.
    pub(crate) fn settle_limit(&self) -> Duration {
        self.opts.admin_timeout
            + self.disable_limit().max(self.opts.shutdown_timeout)
            + Duration::from_secs(1)
    }

    /// The shutdown (CC.SHN normal, waiting for CSTS.SHST complete). Like a disable, it starts
    /// a new generation and publishes that the device stopped only once CSTS.SHST reads
    /// complete: queue pairs hand back their requests then, and leak them if the shutdown
    /// times out or fails (see [`Shared::stop_state`]).
    fn shutdown(&self) -> Result<()> {
        // A removed controller stays GONE (its queue pairs keep reporting "device removed").
        let Some(settle) = self.begin_disable(|h| {
            h.fetch_update(Ordering::AcqRel, Ordering::Acquire, |h| {
                (h != SHUT_DOWN && h != GONE).then_some(SHUT_DOWN)
            })
            .is_ok()
        }) else {
            return Ok(());
        };
        // Hold the admin lock so no admin command races the shutdown (and a reset bringing the
        // controller up finishes first: it then finds it shut down).
        let _admin = self.lock_admin();
        let csts = Csts(self.bus.read32(offset::CSTS));
        if csts.is_all_ones() {
            return Err(self.gone());
        }
        let cc = Cc(self.bus.read32(offset::CC));
        if !cc.en() {
            // Disabled already: stopped if CSTS.RDY reads 0 (a disable that timed out leaves
            // the device possibly working: not published, the queue pairs leak).
            if !csts.rdy() {
                settle.stopped();
            }
            return Ok(());
        }
        self.bus.write32(offset::CC, cc.with_shn(shn::NORMAL).0);
        let limit = self.opts.shutdown_timeout;
        // The state only names an InitTimeout, which is turned into a ShutdownTimeout.
        let state = InitState::Disable;
        let done = |c: Csts| c.shst() == shst::COMPLETE;
        match self.wait_csts(state, Instant::now(), limit, done, false, false) {
            Ok(()) => {
                // The device finished its shutdown processing: it no longer uses the queues.
                settle.stopped();
                Ok(())
            }
            Err(Error::InitTimeout {
                location, waited, ..
            }) => Err(Error::ShutdownTimeout { location, waited }),
            Err(e) => Err(e),
        }
    }
}

/// [`Shared::mark_gone`] on its parts (the removal watch has no `Shared`).
///
/// A reset bringing the controller up on another thread is waited for first: it sees the
/// removal and stops at its next step (see [`Removal`]). [`GONE`] is published even if the
/// release panics (the panic goes on): a controller whose removal was noticed never stays
/// live, whichever thread noticed it.
fn mark_gone(health: &AtomicU8, removal: &Removal, bus: &dyn Bus, location: &str) {
    removal.started.store(true, Ordering::Release);
    removal.wait_for_reset(location);
    struct PublishGone<'a>(&'a AtomicU8, &'a str);
    impl Drop for PublishGone<'_> {
        fn drop(&mut self) {
            if std::thread::panicking() {
                log::error!(
                    "{}: releasing the removed device panicked; the controller is marked \
                     removed anyway",
                    self.1
                );
            }
            self.0.store(GONE, Ordering::Release);
        }
    }
    let _publish = PublishGone(health, location);
    // call_once_force: a release that panicked is tried again by the next caller rather than
    // poisoning every later one.
    removal.released.call_once_force(|_| {
        log::error!("{location}: device removed; every request fails with \"device removed\"");
        bus.release_removed();
    });
}

/// What the removal watch thread works with: the parts of [`Shared`] that marking the
/// controller gone needs, never `Shared` itself, so that the last handle's drop (and with it
/// the bus's close) always happens on the user's thread, after the watch has been joined.
struct Watched {
    health: Arc<AtomicU8>,
    removal: Arc<Removal>,
    bus: Arc<dyn Bus>,
    location: String,
}

/// The thread that waits for the bus's removal notifier (see the module docs).
struct RemovalWatch {
    stop: Arc<EventFd>,
    thread: JoinHandle<()>,
}

impl RemovalWatch {
    /// Starts the watch of `shared`'s bus, if the bus offers a notifier. Failures are logged:
    /// removal is then noticed by I/O only.
    fn start(shared: &Arc<Shared>) -> Option<RemovalWatch> {
        let notifier = shared.bus.removal_notifier()?;
        let stop = match EventFd::new() {
            Ok(e) => Arc::new(e),
            Err(e) => {
                log::warn!(
                    "{}: no removal watch (eventfd: {e}); an idle controller notices its \
                     removal only at its next I/O",
                    shared.location
                );
                return None;
            }
        };
        let watched = Watched {
            health: shared.health.clone(),
            removal: shared.removal.clone(),
            bus: shared.bus.clone(),
            location: shared.location.clone(),
        };
        let s = stop.clone();
        match std::thread::Builder::new()
            .name("nvme-removal".into())
            .spawn(move || watch_removal(watched, notifier, s))
        {
            Ok(thread) => Some(RemovalWatch { stop, thread }),
            Err(e) => {
                log::warn!(
                    "{}: no removal watch (thread: {e}); an idle controller notices its removal \
                     only at its next I/O",
                    shared.location
                );
                None
            }
        }
    }

    /// Stops the thread and waits for it (for a release it is doing, too).
    fn stop(self) {
        self.stop.signal();
        let _ = self.thread.join();
    }
}

/// The removal watch thread: sleeps until `notifier` or `stop` is readable. On the notifier it
/// asks the bus, and marks the controller gone if the removal is announced.
fn watch_removal(w: Watched, notifier: OwnedFd, stop: Arc<EventFd>) {
    loop {
        let mut fds = [
            libc::pollfd {
                fd: notifier.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a live array of two pollfd whose descriptors are open (owned by
        // `notifier` and `stop`) for the whole call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            log::warn!("removal watch: poll failed ({e}); removal is noticed by I/O only");
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
        if fds[0].revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
            log::warn!("removal watch: the notifier failed; removal is noticed by I/O only");
            return;
        }
        if fds[0].revents & libc::POLLIN == 0 {
            continue;
        }
        if w.health.load(Ordering::Acquire) == GONE || w.bus.removal_requested() {
            log::warn!(
                "{}: removal announced while idle or in I/O: failing every request with \
                 \"device removed\" and releasing the device",
                w.location
            );
            mark_gone(&w.health, &w.removal, &*w.bus, &w.location);
            return;
        }
        // Readable without an announcement (someone else consumed it between the wake-up and
        // the look, or a spurious signal): do not spin on a level that stays readable.
        std::thread::sleep(REMOVAL_CHECK);
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Some(w) = self
            .watch
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            w.stop();
        }
        // Errors cannot be returned from drop; a failed shutdown leaves the controller to the
        // next owner's reset, which is what an unclean shutdown means anyway.
        let _ = self.shutdown();
    }
}

/// An NVMe controller owned through a [`Bus`].
#[derive(Clone)]
pub struct Controller {
    pub(crate) shared: Arc<Shared>,
}

impl core::fmt::Debug for Controller {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Controller({})", self.shared.location)
    }
}

impl Controller {
    /// Brings up the controller behind `bus` with default options.
    pub fn new(bus: Arc<dyn Bus>) -> Result<Controller> {
        Controller::with_options(bus, ControllerOptions::default())
    }

    /// Brings up the controller behind `bus`: disable, admin queue, enable, identify, active
    /// namespaces, number of queues, shadow doorbells.
    pub fn with_options(bus: Arc<dyn Bus>, opts: ControllerOptions) -> Result<Controller> {
        if !(2..=4096).contains(&opts.admin_entries) {
            return Err(Error::InvalidOption {
                name: "admin_entries",
                reason: format!("{} is not in 2..=4096", opts.admin_entries),
            });
        }
        let location = bus.location().to_string();
        let cap = Cap(bus.read64(offset::CAP));
        if cap.0 == u64::MAX {
            return Err(Error::DeviceGone { location });
        }
        if cap.css() & 1 == 0 {
            return Err(Error::Unsupported {
                location,
                what: "the NVM command set (CAP.CSS bit 0 clear)".into(),
            });
        }
        if cap.mpsmin() != 0 {
            return Err(Error::Unsupported {
                location,
                what: format!(
                    "4 KiB memory pages (CAP.MPSMIN = {} means at least {} bytes)",
                    cap.mpsmin(),
                    cap.min_page_size()
                ),
            });
        }
        let shared = Arc::new(Shared {
            bus,
            location,
            cap,
            opts,
            admin: Mutex::new(None),
            data: RwLock::new(CtrlData {
                identify: IdentifyController::default(),
                namespaces: Vec::new(),
                granted: 0,
                max_transfer: crate::nvme::prp::PAGE as usize,
                shadow: None,
            }),
            generation: AtomicU64::new(0),
            transition: Mutex::new(()),
            stopped_generation: AtomicU64::new(0),
            settled_generation: AtomicU64::new(0),
            aborts_sent: AtomicU64::new(0),
            drop_waits: AtomicU64::new(0),
            health: Arc::new(AtomicU8::new(FAILED)),
            removal: Arc::new(Removal::new()),
            qids: Mutex::new(QidTable::default()),
            born: Instant::now(),
            removal_checked: AtomicU64::new(0),
            watch: Mutex::new(None),
        });
        shared.initialize(None)?;
        *shared.watch.lock().unwrap_or_else(|e| e.into_inner()) = RemovalWatch::start(&shared);
        Ok(Controller { shared })
    }

    /// Re-initialises the controller: disable (which deletes every I/O queue on the device),
    /// admin queue, enable, identify, number of queues. Use it after CSTS.CFS or a timeout the
    /// device did not recover from. Queue pairs created before fail their requests with
    /// [`DeadReason::ControllerReset`] and refuse new ones; create new queue pairs.
    ///
    /// Requests of the old queue pairs are handed back only once the device has stopped (CC.EN
    /// cleared, CSTS.RDY read 0); if the disable times out they are never handed back (their
    /// memory is leaked, as the device may still write it).
    ///
    /// A removed controller cannot be reset: [`Error::DeviceGone`] (open the device again once
    /// it is back). Nor can one whose removal is under way, and a removal noticed while the
    /// reset runs stops it at its next step: the controller ends up gone, and the device is
    /// never re-initialised while it is being released.
    ///
    /// Resets on several threads run one after the other (each holds the admin queue for its
    /// whole bring-up). One that finishes while a newer one (or a disable) has already started
    /// leaves the controller to it and returns [`Error::NotReady`]: the controller becomes
    /// ready only when the newest reset has brought it up, so no queue pair is created on
    /// queues that reset is about to delete.
    pub fn reset(&self) -> Result<()> {
        let sh = &self.shared;
        if sh.removal.started() {
            return Err(sh.gone());
        }
        if sh.bus.removal_requested() {
            sh.mark_gone();
            return Err(sh.gone());
        }
        let Some(settle) = sh.begin_disable(|h| {
            h.fetch_update(Ordering::AcqRel, Ordering::Acquire, |h| {
                (h != GONE).then_some(FAILED)
            })
            .is_ok()
        }) else {
            return Err(sh.gone());
        };
        sh.initialize(Some(settle))
    }

    /// Shuts the controller down now (CC.SHN normal, waiting for CSTS.SHST complete). Queue
    /// pairs fail afterwards, with [`DeadReason::ShutDown`]: their requests are handed back only
    /// once CSTS.SHST reads complete (the device has stopped); if the shutdown times out they
    /// are never handed back (leaked, as the device may still write their memory). Dropping
    /// the last handle does this too.
    pub fn shutdown(&self) -> Result<()> {
        self.shared.shutdown()
    }

    /// Creates an I/O queue pair (Create I/O CQ, then Create I/O SQ) whose requests carry a
    /// context of type `T`.
    pub fn create_qpair<T>(&self, opts: QueueOptions) -> Result<QueuePair<T>> {
        QueuePair::create(self.shared.clone(), opts)
    }

    /// Abort commands sent so far, answered or not: by queue pairs for their timed-out commands
    /// (after quarantining the command) and by [`Controller::abort`]. Another thread can watch
    /// it to learn that a stalled command has reached the Abort stage.
    pub fn aborts_sent(&self) -> u64 {
        self.shared.aborts_sent.load(Ordering::Acquire)
    }
    /// Where the controller is (PCI address, or `emulated`).
    pub fn location(&self) -> &str {
        &self.shared.location
    }
    /// The bus the controller sits on.
    pub fn bus(&self) -> &Arc<dyn Bus> {
        &self.shared.bus
    }
    /// The DMA memory of the controller's bus.
    pub fn dma(&self) -> &DmaMemory {
        self.shared.bus.dma()
    }
    /// Allocates a zeroed DMA buffer of `len` bytes for I/O on this controller.
    pub fn alloc(&self, len: usize) -> Result<DmaBuffer> {
        self.shared.alloc(len, "an I/O buffer")
    }
    /// CAP.
    pub fn cap(&self) -> Cap {
        self.shared.cap
    }
    /// VS.
    pub fn version(&self) -> Vs {
        Vs(self.shared.bus.read32(offset::VS))
    }
    /// CSTS, with all ones (removal) and CFS reported as errors.
    pub fn csts(&self) -> Result<Csts> {
        self.shared.check_csts()
    }
    /// The Identify Controller data read at bring-up.
    pub fn identify(&self) -> IdentifyController {
        self.data().identify.clone()
    }
    /// Largest transfer of one command in bytes: `min(MDTS, 2 MiB)`. Larger requests are split.
    pub fn max_transfer(&self) -> usize {
        self.data().max_transfer
    }
    /// I/O queue pairs granted by the controller.
    pub fn io_queues(&self) -> u16 {
        self.data().granted
    }
    /// True if the I/O queues use shadow doorbells: the controller offered Doorbell Buffer
    /// Config, the options asked for them ([`ControllerOptions::shadow_doorbells`]) and the
    /// controller took the pages.
    pub fn shadow_doorbells(&self) -> bool {
        self.data().shadow.is_some()
    }
    /// The active namespaces found at bring-up, including those formatted with metadata, which
    /// are listed with their format but refused for I/O ([`Namespace::check_io`]).
    pub fn namespaces(&self) -> Vec<Namespace> {
        self.data().namespaces.clone()
    }
    /// The active namespace `nsid`.
    pub fn namespace(&self, nsid: Nsid) -> Result<Namespace> {
        let d = self.data();
        d.namespaces
            .iter()
            .find(|n| n.nsid() == nsid)
            .cloned()
            .ok_or_else(|| Error::NoSuchNamespace {
                location: self.shared.location.clone(),
                nsid,
                active: d.namespaces.iter().map(|n| n.nsid().0).collect(),
            })
    }

    fn data(&self) -> std::sync::RwLockReadGuard<'_, CtrlData> {
        self.shared.data.read().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A controller with a 512+8 namespace between two plain ones: the metadata namespace is
    /// listed with its format and refused for every LBA-addressed command before anything
    /// reaches the device; the others work.
    #[cfg(feature = "emulated")]
    #[test]
    fn a_namespace_with_metadata_is_listed_but_refused_for_io() {
        use crate::bus::emulated::{EmulatedConfig, EmulatedController, NamespaceConfig};
        use crate::spec::sqe::io;
        use crate::types::Lba;

        for extended in [true, false] {
            let emu = EmulatedController::new(EmulatedConfig {
                namespaces: vec![
                    NamespaceConfig::memory(512, 64),
                    NamespaceConfig::memory(512, 64).with_metadata(8, extended),
                    NamespaceConfig::memory(4096, 64),
                ],
                ..EmulatedConfig::default()
            })
            .unwrap();
            let ctrl = Controller::new(emu.clone()).unwrap();
            let all = ctrl.namespaces();
            assert_eq!(
                all.iter().map(|n| n.nsid().0).collect::<Vec<_>>(),
                [1, 2, 3]
            );
            let md = ctrl.namespace(Nsid(2)).unwrap();
            assert_eq!((md.block_size(), md.blocks()), (512, 64));
            assert_eq!((md.metadata_size(), md.metadata_extended()), (8, extended));
            assert_eq!(md.lba_formats()[md.lba_format_index()].ms, 8);

            let mut q = ctrl.create_qpair::<u64>(QueueOptions::default()).unwrap();
            let mut buf = ctrl.alloc(4096).unwrap();
            let refused = |e: Error| {
                assert!(
                    matches!(
                        e,
                        Error::NamespaceHasMetadata {
                            nsid: Nsid(2),
                            block_size: 512,
                            metadata: 8,
                            without: Some(0),
                            ..
                        }
                    ),
                    "{e:?}"
                );
                assert!(e.to_string().contains("--lbaf=0"), "{e}");
            };
            refused(
                q.read_blocking(&md, Lba(0), buf.as_mut_slice())
                    .unwrap_err(),
            );
            refused(q.write_blocking(&md, Lba(0), buf.as_slice()).unwrap_err());
            refused(
                q.write_zeroes_blocking(&md, Lba(0), 1, crate::IoFlags::NONE)
                    .unwrap_err(),
            );
            refused(q.deallocate_blocking(&md, &[(Lba(0), 1)]).unwrap_err());
            // SAFETY: the buffer stays allocated and untouched; the call is refused anyway.
            let r = unsafe { q.read_raw(&md, Lba(0), buf.as_dma_slice(), 7) };
            let rejected = r.unwrap_err();
            assert_eq!(rejected.ctx, 7);
            refused(rejected.error);
            assert!(md.check_io().is_err());
            let stats = emu.stats();
            assert_eq!(
                stats.io_commands(),
                0,
                "nothing reached the device: {stats:?}"
            );

            // The other namespaces of the same controller work.
            for nsid in [1, 3] {
                let ns = ctrl.namespace(Nsid(nsid)).unwrap();
                ns.check_io().unwrap();
                buf.as_mut_slice().fill(nsid as u8);
                q.write_blocking(&ns, Lba(1), buf.as_slice()).unwrap();
                buf.as_mut_slice().fill(0);
                q.read_blocking(&ns, Lba(1), buf.as_mut_slice()).unwrap();
                assert!(buf.as_slice().iter().all(|&b| b == nsid as u8));
            }
            assert_eq!(emu.stats().commands_with(1, io::READ), 2);
        }
    }

    /// Polls `done` until it holds; panics naming `what` after 20 s.
    #[cfg(feature = "emulated")]
    fn wait_until(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !done() {
            assert!(Instant::now() < deadline, "{what}: not within 20 s");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// A removal announced while a reset is stuck clearing CC.EN (the emulated controller holds
    /// the write back): the removal watch waits for the reset to stop rather than release the
    /// device under it, the reset stops at its next step with "device removed" (the device is
    /// not brought up again: no Identify), and the controller ends up gone, released once.
    #[cfg(feature = "emulated")]
    #[test]
    fn a_removal_during_a_reset_stops_the_reset_before_the_release() {
        use crate::bus::emulated::{EmulatedConfig, EmulatedController};
        use crate::spec::sqe::admin;
        use std::sync::atomic::AtomicBool;

        let _w = test_watchdog::arm(test_watchdog::UNIT);
        let emu = EmulatedController::new(EmulatedConfig::default()).unwrap();
        let c = Controller::new(emu.clone()).unwrap();
        let identifies = emu.stats().commands_with(0, admin::IDENTIFY);
        let hold = emu.hold_next_disable();
        let resetter = {
            let c = c.clone();
            std::thread::spawn(move || c.reset())
        };
        assert!(
            hold.wait_held(Duration::from_secs(20)),
            "the reset never cleared CC.EN"
        );
        // Whether the reset was still held in its CC write when the bus let the device go.
        let let_go = Arc::new(AtomicBool::new(false));
        let during = Arc::new(Mutex::new(None));
        {
            let (let_go, during) = (let_go.clone(), during.clone());
            emu.on_release(move || {
                *during.lock().unwrap() = Some(!let_go.load(Ordering::Acquire));
            });
        }
        emu.request_removal();
        let removal = c.shared.removal.clone();
        wait_until("the removal watch waits for the reset, or releases", || {
            removal.reset_waits.load(Ordering::Acquire) > 0 || emu.releases() > 0
        });
        let_go.store(true, Ordering::Release);
        hold.release();
        let e = resetter.join().unwrap().unwrap_err();
        assert!(matches!(e, Error::DeviceGone { .. }), "{e:?}");
        wait_until("the release", || emu.releases() > 0);
        assert_eq!(
            *during.lock().unwrap(),
            Some(false),
            "the device was released while the reset was still touching it"
        );
        assert_eq!(
            emu.stats().commands_with(0, admin::IDENTIFY),
            identifies,
            "the reset brought the device up again during its removal"
        );
        assert_eq!(c.shared.health.load(Ordering::Acquire), GONE);
        assert!(matches!(c.reset(), Err(Error::DeviceGone { .. })));
        assert_eq!(emu.releases(), 1);
    }

    /// A reset asked for while the device is being released is refused at once, touching
    /// nothing (no controller reset reaches the device).
    #[cfg(feature = "emulated")]
    #[test]
    fn a_reset_during_a_release_is_refused_without_touching_the_device() {
        use crate::bus::emulated::{EmulatedConfig, EmulatedController};

        let _w = test_watchdog::arm(test_watchdog::UNIT);
        let emu = EmulatedController::new(EmulatedConfig::default()).unwrap();
        let c = Controller::new(emu.clone()).unwrap();
        let resets = emu.stats().controller_resets;
        let outcome = Arc::new(Mutex::new(None));
        {
            let (c, outcome, emu2) = (c.clone(), outcome.clone(), emu.clone());
            emu.on_release(move || {
                let t = std::thread::spawn(move || c.reset());
                // A reset that went on would wait for this release (bounded wait).
                let deadline = Instant::now() + Duration::from_secs(2);
                while !t.is_finished() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(1));
                }
                let resets_now = emu2.stats().controller_resets;
                *outcome.lock().unwrap() = Some((t.is_finished(), resets_now, t));
            });
        }
        emu.request_removal();
        wait_until("the release", || emu.releases() > 0);
        let (finished, resets_then, t) = outcome.lock().unwrap().take().expect("the hook ran");
        let r = t.join().unwrap();
        assert!(finished, "the reset waited for the release: {r:?}");
        assert!(matches!(r, Err(Error::DeviceGone { .. })), "{r:?}");
        assert_eq!(
            resets_then, resets,
            "the reset touched the device being released"
        );
        assert_eq!(c.shared.health.load(Ordering::Acquire), GONE);
    }

    /// A release that panics on the removal watch thread still leaves the controller gone: new
    /// queue pairs are refused with "device removed" (rather than created on a device the
    /// platform is taking back).
    #[cfg(feature = "emulated")]
    #[test]
    fn a_panicking_release_on_the_watch_thread_leaves_the_controller_gone() {
        use crate::bus::emulated::{EmulatedConfig, EmulatedController};

        let _w = test_watchdog::arm(test_watchdog::UNIT);
        let emu = EmulatedController::new(EmulatedConfig::default()).unwrap();
        let c = Controller::new(emu.clone()).unwrap();
        emu.on_release(|| panic!("the release failed (a test panic)"));
        emu.request_removal();
        let watch = c
            .shared
            .watch
            .lock()
            .unwrap()
            .take()
            .expect("a removal watch");
        assert!(
            watch.thread.join().is_err(),
            "the release panicked on the watch thread"
        );
        assert_eq!(c.shared.health.load(Ordering::Acquire), GONE);
        assert!(matches!(
            c.create_qpair::<u64>(QueueOptions::default()),
            Err(Error::DeviceGone { .. })
        ));
        assert!(matches!(c.reset(), Err(Error::DeviceGone { .. })));
    }

    /// Two resets overlapping: the first is held in its CC.EN = 0 write (holding the admin
    /// queue), the second starts its generation and waits for the admin queue. When the first
    /// finishes its bring-up it must not make the controller ready: the second is about to
    /// delete every queue, and a queue pair created in between would carry the new generation
    /// on deleted queues. So while the second reset holds its own disable back, the controller
    /// is not ready, the first reset says so, and a creation is refused at once; after the
    /// second reset a queue pair works.
    #[cfg(feature = "emulated")]
    #[test]
    fn a_reset_finishing_during_a_newer_one_leaves_the_controller_not_ready() {
        use crate::bus::emulated::{EmulatedConfig, EmulatedController};
        use crate::types::Lba;

        let _w = test_watchdog::arm(test_watchdog::UNIT);
        let emu = EmulatedController::new(EmulatedConfig::default()).unwrap();
        let c = Controller::new(emu.clone()).unwrap();
        let spawn_reset = |c: &Controller| {
            let c = c.clone();
            std::thread::spawn(move || c.reset())
        };
        let hold_first = emu.hold_next_disable();
        let first = spawn_reset(&c);
        assert!(
            hold_first.wait_held(Duration::from_secs(20)),
            "the first reset never cleared CC.EN"
        );
        let g = c.shared.generation.load(Ordering::Acquire);
        let second = spawn_reset(&c);
        wait_until("the second reset starts its generation", || {
            c.shared.generation.load(Ordering::Acquire) == g + 1
        });
        let hold_second = emu.hold_next_disable();
        hold_first.release();
        assert!(
            hold_second.wait_held(Duration::from_secs(20)),
            "the second reset never cleared CC.EN"
        );
        // The first reset has let go of the admin queue: it finished.
        let r = first.join().unwrap();
        assert!(matches!(r, Err(Error::NotReady { .. })), "{r:?}");
        assert!(
            c.shared.not_ready().is_some(),
            "the controller is ready while a reset is about to delete every queue"
        );
        let creator = {
            let c = c.clone();
            std::thread::spawn(move || c.create_qpair::<u64>(QueueOptions::default()).map(drop))
        };
        let deadline = Instant::now() + Duration::from_secs(2);
        while !creator.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        let refused_at_once = creator.is_finished();
        hold_second.release();
        second.join().unwrap().expect("the second reset");
        let created = creator.join().unwrap();
        assert!(
            refused_at_once,
            "a creation waited for the second reset's admin queue: {created:?}"
        );
        assert!(
            matches!(created, Err(Error::NotReady { .. })),
            "{created:?}"
        );

        let ns = c.namespaces().remove(0);
        let mut q = c.create_qpair::<u64>(QueueOptions::default()).unwrap();
        assert!(!q.is_stale());
        let mut buf = c.alloc(ns.block_size() as usize).unwrap();
        buf.as_mut_slice().fill(0x5a);
        q.write_blocking(&ns, Lba(3), buf.as_slice()).unwrap();
        buf.as_mut_slice().fill(0);
        q.read_blocking(&ns, Lba(3), buf.as_mut_slice()).unwrap();
        assert!(buf.as_slice().iter().all(|&b| b == 0x5a));
    }

    #[test]
    fn queue_ids_held_across_a_reset_stay_reserved() {
        let mut t = QidTable::default();
        t.regrant(3);
        let ids: Vec<_> = (0..3).map(|_| t.alloc().unwrap().0).collect();
        assert_eq!(ids, [1, 2, 3]);
        assert_eq!(t.alloc(), None);
        t.free(QueueId(2));
        // A reset granting 2 queues: ids 1 and 3 are still held by old queue pairs.
        t.regrant(2);
        assert_eq!(t.alloc(), Some(QueueId(2)));
        assert_eq!(t.alloc(), None);
        t.free(QueueId(3));
        assert_eq!(t.used.len(), 2);
        t.free(QueueId(1));
        assert_eq!(t.alloc(), Some(QueueId(1)));
        // Out-of-range frees are ignored.
        t.free(QueueId(0));
        t.free(QueueId(100));
        assert_eq!(t.used, [true, true]);
    }
}
