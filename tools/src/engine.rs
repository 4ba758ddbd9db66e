//! The per-core worker loop of `perf`: submit, ring, poll, record, resubmit.
//!
//! The loop is written against [`IoQueue`], the three operations a queue pair offers (submit a
//! command with a `u64` tag, ring the SQ doorbell, poll completions), so it is tested here with
//! an in-memory queue and runs on the driver's `QueuePair` through a thin adapter.
//!
//! Per namespace on a core (a [`Job`]): `-q` slots, each with its own data buffer allocated up
//! front; a command's tag is its slot's index, with the slot's I/O sequence number (32 bits)
//! above it. A completion is matched to the I/O it names: one for a slot with no I/O in flight,
//! or for an earlier I/O of the slot (a duplicate arriving after the slot was resubmitted), is
//! a double completion: counted ([`Job::doubles`]), never taken for the slot's current I/O, and
//! it fails the job. Nothing is allocated while I/O runs: completions
//! are gathered into a vector of capacity `-q`, then each finished slot is resubmitted and the
//! doorbell of every queue that got a command is rung once (`--doorbell per-batch`, the
//! default) or after each command (`per-command`). Latency is the tick count from just before
//! submission to the moment the completion is seen.
//!
//! **Interrupt mode** (`--interrupt-mode`): when a pass over the jobs found no completion
//! (at once, or after `adaptive`'s quiet time), the worker arms every queue
//! ([`IoQueue::arm`]: look at the CQ once more) and sleeps in one `epoll_wait` on their
//! completion descriptors, registered once, edge-triggered (`EPOLLET`: every interrupt queues
//! an edge, so arming needs no system call to clear the eventfd), at most 10 ms (and never past
//! the end of the run); it counts the sleeps ([`WorkerResult::sleeps`]).
//!
//! `verify`: each slot owns a stripe of the namespace range (`slot, slot + q, slot + 2q, ...`),
//! so no two I/Os in flight touch the same block. A slot writes the [`crate::verify`] pattern
//! with a fresh generation, reads the same blocks back into a poisoned buffer, checks every
//! byte, then moves on to its next stripe offset.

mod share;
pub use share::{MAX_JOBS, QueueHandle, SharedQueue};

use crate::clock::Clock;
use crate::stats::NsStats;
use crate::verify;
use crate::workload::{Mix, Offsets, Workload, XorShift64};
use dioxide::spec::Status;
use std::fmt;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// What `perf` needs from a queue pair.
pub trait IoQueue {
    /// A data buffer the device can reach.
    type Buf: IoBuf;
    /// A failure to submit or poll.
    type Error: fmt::Display;
    /// Why one command failed.
    type IoErr: fmt::Display;

    /// Queues a read (`read`) or write of `blocks` blocks at `lba` of namespace `nsid` into or
    /// from `buf`, to complete with `tag`. The doorbell is not rung.
    ///
    /// # Safety
    /// `buf` must stay alive, and must be neither read nor written by the CPU, until the
    /// completion carrying `tag` has been returned by [`IoQueue::poll`].
    unsafe fn submit(
        &mut self,
        read: bool,
        nsid: u32,
        lba: u64,
        blocks: u32,
        buf: &Self::Buf,
        tag: u64,
    ) -> Result<(), Self::Error>;

    /// Writes the SQ tail doorbell for everything queued since the last ring.
    fn ring(&mut self);

    /// Reaps up to `max` completions (0: all available), calling `done(tag, status)` for each;
    /// returns how many.
    fn poll<F: FnMut(u64, Result<(), Self::IoErr>)>(
        &mut self,
        max: u32,
        done: F,
    ) -> Result<u32, Self::Error>;

    /// The NVMe status of a failed command, if the device gave one.
    fn status(e: &Self::IoErr) -> Option<Status>;

    /// Whether a failed command's buffer must never be used again (the device may still
    /// write it, e.g. after a timeout).
    fn retire(e: &Self::IoErr) -> bool;

    /// Whether the queue still works after `poll` returned this error (the device posted an
    /// invalid completion entry, which was rejected: the requests are still tracked and complete
    /// normally). False (the default): nothing more completes on the queue.
    fn survives(_e: &Self::Error) -> bool {
        false
    }

    /// Invalid completion entries the queue has rejected so far, if it counts them (one poll
    /// may reject several and report one error).
    fn rejected_entries(&self) -> Option<u64> {
        None
    }

    /// Interrupt mode: prepares to sleep until the device posts to this queue (dioxide's
    /// `QueuePair::arm_interrupt_edge`) and returns the descriptor to wait on, edge-triggered,
    /// if sleeping is safe; `None` if the queue must be polled first, or has no interrupts (the
    /// default).
    fn arm(&mut self) -> Option<RawFd> {
        None
    }
}

/// A data buffer the CPU may use while no command holds it.
pub trait IoBuf {
    /// The bytes.
    fn bytes(&mut self) -> &mut [u8];
}

/// The run's settings, shared by every worker.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `-q`.
    pub queue_depth: u32,
    /// `-w`.
    pub workload: Workload,
    /// The read/write mix from `-w` and `-M`.
    pub mix: Mix,
    /// `-t` in ticks.
    pub time_ticks: u64,
    /// `-a` in ticks (0: none).
    pub warmup_ticks: u64,
    /// `-d` (0: unlimited).
    pub number_ios: u64,
    /// `-C` (0: unlimited).
    pub max_completions: u32,
    /// `--doorbell per-command`.
    pub doorbell_per_command: bool,
    /// `-Q N`.
    pub continue_on_error: Option<u32>,
    /// Keep a latency histogram.
    pub track_latency: bool,
    /// Give up on I/Os still outstanding this long after the run (ticks).
    pub drain_timeout_ticks: u64,
    /// `--interrupt-mode`: sleep once a pass has found no completion for this many ticks
    /// (0: at once, interrupt mode; `None`: never, polled mode).
    pub sleep_after_ticks: Option<u64>,
}

/// One namespace on one core: what to run.
#[derive(Debug, Clone)]
pub struct JobSpec {
    /// Name in the report, e.g. `EMULATED (inline) NSID 1`.
    pub name: String,
    /// Namespace ID.
    pub nsid: u32,
    /// Core.
    pub core: u32,
    /// LBA size.
    pub block_size: u32,
    /// Blocks per I/O (`-o` / block size).
    pub io_blocks: u32,
    /// First I/O-sized slot of the range this job uses.
    pub first_io: u64,
    /// Number of I/O-sized slots in the range.
    pub ios: u64,
    /// Random seed.
    pub seed: u64,
}

/// What `verify` found in one job.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyStats {
    /// Blocks read back and checked.
    pub blocks_checked: u64,
    /// Blocks with a wrong byte.
    pub bad_blocks: u64,
    /// The first wrong byte.
    pub first: Option<verify::BadByte>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    submit_tick: u64,
    lba: u64,
    read: bool,
    /// verify: the next I/O of this slot reads back what it wrote.
    read_back: bool,
    /// verify: the next stripe offset (relative to `first_io`).
    next_io: u64,
    generation: u64,
    /// An I/O of this slot is in flight.
    in_flight: bool,
    /// The sequence number of the slot's current (or last) I/O, carried in its tag: 32 bits,
    /// so that a stale duplicate matches the slot's current I/O only after 2^32 I/Os of the
    /// slot (16 bits wrapped after 65 536, a few seconds of one slot at QD 1).
    seq: u32,
    /// The job's queue (index into its queues) the I/O was submitted to.
    qp: usize,
}

/// Where a slot's I/O sequence number sits in a tag: bits 16 to 47 (below it, the slot index:
/// `-q` is at most 65 535; above it, bits 48 to 63 are the shared queue's job number, see
/// `share`).
const SEQ_SHIFT: u32 = 16;

/// One namespace on one core: its queues (shared with the core's other jobs on the same
/// controller, see [`SharedQueue`]), buffers, slots and statistics.
///
/// When a job is dropped its buffers go to its first shared queue, which frees them only after
/// the queue pair is gone: a queue pair deletes its queues on the device before the memory its
/// commands used is freed.
pub struct Job<Q: IoQueue> {
    /// What to run.
    pub spec: JobSpec,
    qps: Vec<QueueHandle<Q>>,
    unrung: Vec<bool>,
    next_qp: usize,
    bufs: Vec<Q::Buf>,
    slots: Vec<Slot>,
    depth: u32,
    offsets: Offsets,
    rng: XorShift64,
    /// Statistics (reset after the warm-up).
    pub stats: NsStats,
    /// Completions over the whole run, for the progress line.
    pub lifetime_completed: u64,
    /// `verify` results.
    pub verify: VerifyStats,
    draining: bool,
    inflight: u32,
    /// I/Os in flight per queue (`-P`): a queue that fails abandons its own only.
    qp_inflight: Vec<u32>,
    /// Queues that failed: nothing more completes on them, they are polled no more.
    qp_failed: Vec<bool>,
    done: Vec<(u64, Result<(), Q::IoErr>)>,
    retry: Vec<u32>,
    generation: u64,
    errors_logged: u64,
    /// Why the job failed, if it did (an I/O error without `-Q`, a queue failure).
    pub failure: Option<String>,
    /// I/Os in flight that were never completed: on a queue that failed, or still in flight
    /// when the drain gave up.
    pub abandoned: u64,
    /// Completions for an I/O not in flight (double completions), each counted once and never
    /// taken for another I/O.
    pub doubles: u64,
    /// Invalid completion entries the job's queues rejected, and the first one's error.
    rejected: Option<(u64, String)>,
}

impl<Q: IoQueue> Job<Q> {
    /// A job over `qps` (at least one handle, each on its own shared queue) with one buffer of
    /// `io_blocks * block_size` bytes per slot in `bufs` (at least `-q`).
    pub fn new(
        spec: JobSpec,
        mut qps: Vec<QueueHandle<Q>>,
        bufs: Vec<Q::Buf>,
        s: &Settings,
        hz: u64,
    ) -> Job<Q> {
        assert!(!qps.is_empty(), "a job needs a queue pair");
        let verify = s.workload == Workload::Verify;
        let depth = if verify {
            (s.queue_depth as u64).min(spec.ios).max(1) as u32
        } else {
            s.queue_depth
        };
        assert!(bufs.len() >= depth as usize, "a buffer per slot");
        for q in &mut qps {
            // Every completion of this job may land in one queue's mailbox.
            q.reserve(depth as usize);
        }
        let slots = (0..depth)
            .map(|k| Slot {
                next_io: k as u64,
                ..Slot::default()
            })
            .collect();
        Job {
            offsets: Offsets::new(spec.ios, s.workload.is_random(), 0),
            rng: XorShift64::new(spec.seed),
            unrung: vec![false; qps.len()],
            qp_inflight: vec![0; qps.len()],
            qp_failed: vec![false; qps.len()],
            qps,
            next_qp: 0,
            bufs,
            slots,
            depth,
            stats: NsStats::new(hz, s.track_latency),
            lifetime_completed: 0,
            verify: VerifyStats::default(),
            draining: false,
            inflight: 0,
            done: Vec::with_capacity(depth as usize),
            retry: Vec::with_capacity(depth as usize),
            generation: spec.seed.rotate_left(17) | 1,
            errors_logged: 0,
            failure: None,
            abandoned: 0,
            doubles: 0,
            rejected: None,
            spec,
        }
    }

    /// I/Os in flight.
    pub fn inflight(&self) -> u32 {
        self.inflight
    }

    fn fail(&mut self, why: String) {
        if self.failure.is_none() {
            self.failure = Some(why);
        }
        self.draining = true;
    }

    fn log_error(&mut self, s: &Settings, msg: fmt::Arguments<'_>) {
        // SPDK's RATELIMIT_LOG: print every Nth, saying how many were suppressed.
        let quiet = s.continue_on_error.unwrap_or(1).max(1) as u64;
        if self.errors_logged % quiet == 0 {
            if self.errors_logged > 0 && quiet > 1 {
                eprint!("Message suppressed {} times: ", quiet - 1);
            }
            eprintln!("{msg}");
        }
        self.errors_logged += 1;
    }

    /// Submits slot `k`'s next I/O.
    #[inline]
    fn submit_slot(&mut self, k: u32, s: &Settings, clock: &Clock) {
        let bs = self.spec.block_size as usize;
        let io_blocks = self.spec.io_blocks as u64;
        let slot = &mut self.slots[k as usize];
        if s.workload == Workload::Verify {
            let buf = self.bufs[k as usize].bytes();
            if slot.read_back {
                slot.read = true;
                verify::poison(buf);
            } else {
                slot.lba = (self.spec.first_io + slot.next_io) * io_blocks;
                slot.next_io += self.depth as u64;
                if slot.next_io >= self.spec.ios {
                    slot.next_io = k as u64;
                }
                slot.generation = self.generation;
                self.generation = self.generation.wrapping_add(1);
                slot.read = false;
                verify::fill(buf, slot.lba, bs, slot.generation);
            }
        } else {
            slot.lba = (self.spec.first_io + self.offsets.next(&mut self.rng)) * io_blocks;
            slot.read = s.mix.is_read(&mut self.rng);
        }
        let q = self.next_qp;
        self.next_qp += 1;
        if self.next_qp == self.qps.len() {
            self.next_qp = 0;
        }
        slot.submit_tick = clock.now();
        slot.seq = slot.seq.wrapping_add(1);
        let tag = k as u64 | (slot.seq as u64) << SEQ_SHIFT;
        let (read, lba) = (slot.read, slot.lba);
        // SAFETY: slot k's buffer is not touched again until its completion (tag k) is polled:
        // the slot is only resubmitted, and its buffer only filled or checked, from the
        // completion path, and the job outlives every queue it submits to (drained before
        // being dropped).
        let r = unsafe {
            self.qps[q].submit(
                read,
                self.spec.nsid,
                lba,
                self.spec.io_blocks,
                &self.bufs[k as usize],
                tag,
            )
        };
        match r {
            Ok(()) => {
                let slot = &mut self.slots[k as usize];
                slot.in_flight = true;
                slot.qp = q;
                self.qp_inflight[q] += 1;
                self.inflight += 1;
                self.stats.io_submitted += 1;
                if s.doorbell_per_command {
                    self.qps[q].ring();
                } else {
                    self.unrung[q] = true;
                }
                if s.number_ios != 0 && self.stats.io_submitted >= s.number_ios {
                    self.draining = true;
                }
            }
            Err(e) => {
                if s.continue_on_error.is_some() {
                    // Retried on the next pass, as SPDK queues it.
                    self.retry.push(k);
                } else {
                    let msg = format!("starting I/O failed: {e}");
                    self.log_error(s, format_args!("{msg}"));
                    self.fail(format!("{}: {msg}", self.spec.name));
                }
            }
        }
    }

    /// Arms every queue of the job for a sleep, adding their descriptors to `fds`; false if
    /// the job must be polled instead (a completion arrived, a retry waits, a queue without
    /// interrupts).
    fn arm(&mut self, fds: &mut Vec<RawFd>) -> bool {
        if !self.retry.is_empty() {
            return false;
        }
        for (q, _) in self
            .qps
            .iter_mut()
            .zip(&self.qp_failed)
            .filter(|(_, f)| !**f)
        {
            let Some(fd) = q.arm() else {
                return false;
            };
            if !fds.contains(&fd) {
                fds.push(fd);
            }
        }
        true
    }

    fn ring_all(&mut self) {
        for (q, unrung) in self.qps.iter_mut().zip(self.unrung.iter_mut()) {
            if *unrung {
                q.ring();
                *unrung = false;
            }
        }
    }

    /// Submits the first `-q` I/Os.
    pub fn start(&mut self, s: &Settings, clock: &Clock) {
        for k in 0..self.depth {
            if self.draining {
                break;
            }
            self.submit_slot(k, s, clock);
        }
        self.ring_all();
    }

    /// Counts the I/Os in flight on queue `q` (every queue: `None`) as never completed; their
    /// slots are not resubmitted (the job is draining) and no completion is taken for them.
    fn abandon(&mut self, q: Option<usize>) {
        for slot in self.slots.iter_mut() {
            if slot.in_flight && q.is_none_or(|q| q == slot.qp) {
                slot.in_flight = false;
                self.qp_inflight[slot.qp] -= 1;
                self.inflight -= 1;
                self.abandoned += 1;
            }
        }
    }

    /// Polls every queue once, handles the completions and resubmits; returns how many
    /// completed.
    pub fn poll(&mut self, s: &Settings, clock: &Clock) -> u32 {
        if !self.retry.is_empty() && !self.draining {
            let n = self.retry.len();
            for i in 0..n {
                let k = self.retry[i];
                self.submit_slot(k, s, clock);
            }
            self.retry.drain(..n);
        }
        let mut failed_now = false;
        for q in 0..self.qps.len() {
            if self.qp_failed[q] {
                continue;
            }
            let done = &mut self.done;
            if let Err(e) = self.qps[q].poll(s.max_completions, |tag, st| done.push((tag, st))) {
                let msg = format!(
                    "{}: NVMe io qpair process completion error: {e}",
                    self.spec.name
                );
                eprintln!("{msg}");
                self.fail(msg);
                // Nothing more will complete on this queue; the others go on (the job drains
                // them), and what any queue delivered in this pass is handled below.
                self.qp_failed[q] = true;
                failed_now = true;
                continue;
            }
            if let Some(r) = self.qps[q].rejected() {
                // A device posting invalid completion entries: stop and drain (the queue still
                // completes what is in flight), then fail naming them.
                self.draining = true;
                self.rejected = Some(r);
            }
        }
        let mut done = std::mem::take(&mut self.done);
        let n = done.len();
        for (tag, st) in done.drain(..) {
            let now = clock.now();
            let (k, seq) = (tag & ((1 << SEQ_SHIFT) - 1), (tag >> SEQ_SHIFT) as u32);
            debug_assert!(tag >> 48 == 0, "the job number is the shared queue's");
            let Some(slot) = self.slots.get_mut(k as usize) else {
                let msg = format!("{}: completion with unknown tag {tag:#x}", self.spec.name);
                self.fail(msg);
                continue;
            };
            if !slot.in_flight || slot.seq != seq {
                // Not the slot's I/O in flight: completed already (a duplicate), or never
                // submitted. Counted, and never taken for the slot's current I/O.
                self.doubles += 1;
                let msg = format!(
                    "{}: double completion: a completion for tag {tag:#x} (slot {k}), which has \
                     no I/O in flight",
                    self.spec.name
                );
                eprintln!("{msg}");
                self.fail(msg);
                continue;
            }
            slot.in_flight = false;
            self.qp_inflight[slot.qp] -= 1;
            self.inflight -= 1;
            self.stats.record(now.saturating_sub(slot.submit_tick));
            self.lifetime_completed += 1;
            let read = slot.read;
            match st {
                Ok(()) => {
                    if s.workload == Workload::Verify {
                        if read {
                            let (lba, generation) = (slot.lba, slot.generation);
                            slot.read_back = false;
                            let bs = self.spec.block_size as usize;
                            let (bad, first) =
                                verify::check(self.bufs[k as usize].bytes(), lba, bs, generation);
                            self.verify.blocks_checked += self.spec.io_blocks as u64;
                            if bad > 0 {
                                self.verify.bad_blocks += bad;
                                if self.verify.first.is_none() {
                                    self.verify.first = first;
                                }
                            }
                        } else {
                            slot.read_back = true;
                        }
                    }
                }
                Err(e) => {
                    slot.read_back = false;
                    self.stats.io_errors += 1;
                    let what = if read { "Read" } else { "Write" };
                    match QueueHandle::<Q>::status(&e) {
                        Some(st) => {
                            let (sct, sc) = (st.sct.bits(), st.sc);
                            let m = format_args!(
                                "{what} completed with error (sct={sct}, sc={sc}): {e}"
                            );
                            self.log_error(s, m);
                        }
                        None => self.log_error(s, format_args!("{what} failed: {e}")),
                    }
                    if s.continue_on_error.is_none() {
                        let msg = format!("{}: {what} completed with error: {e}", self.spec.name);
                        self.fail(msg);
                    }
                    if QueueHandle::<Q>::retire(&e) {
                        // Never resubmitted: the device may still write its buffer.
                        continue;
                    }
                }
            }
            if !self.draining {
                self.submit_slot(k as u32, s, clock);
            }
        }
        self.done = done;
        if failed_now {
            // The driver delivered every request it knew of before saying the queue failed:
            // the I/Os still in flight on a failed queue are counted, not hidden.
            for q in 0..self.qps.len() {
                if self.qp_failed[q] && self.qp_inflight[q] > 0 {
                    self.abandon(Some(q));
                }
            }
        }
        self.ring_all();
        n as u32
    }
}

impl<Q: IoQueue> Drop for Job<Q> {
    fn drop(&mut self) {
        let bufs = std::mem::take(&mut self.bufs);
        if let Some(q) = self.qps.first_mut() {
            q.keep_buffers(bufs);
        }
    }
}

/// What a worker publishes for the progress line, updated every few milliseconds.
#[derive(Debug, Default)]
pub struct Progress {
    /// Completions so far (never reset).
    pub completed: AtomicU64,
    /// Polling ticks that found completions.
    pub busy: AtomicU64,
    /// Polling ticks that found none.
    pub idle: AtomicU64,
    /// Still warming up.
    pub warmup: AtomicBool,
    /// The worker has finished its run (draining or done).
    pub finished: AtomicBool,
}

/// How a worker's run went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerResult {
    /// Ticks from the start of measurement (after any warm-up) to the end of the run.
    pub elapsed_ticks: u64,
    /// Interrupt mode: sleeps in `poll(2)` (each ended by a completion's interrupt or the
    /// sleep limit), whole run.
    pub sleeps: u64,
    /// Sleeps that ended at the limit with no descriptor readable (an interrupt that did not
    /// come, or a device slower than the limit).
    pub sleep_limit_hits: u64,
    /// I/Os completed, whole run (warm-up and drain included).
    pub completed: u64,
}

/// The longest sleep in interrupt mode: timeouts and health checks run in the queue's poll.
const SLEEP_LIMIT_MS: u64 = 10;

/// The worker's edge-triggered wait on its queues' completion descriptors.
struct Sleeper {
    /// The epoll descriptor (-1: none could be made; the worker then polls).
    ep: RawFd,
    /// Descriptors registered (each once, `EPOLLIN | EPOLLET`).
    registered: Vec<RawFd>,
    /// Descriptors the jobs armed this time.
    armed: Vec<RawFd>,
    events: Vec<libc::epoll_event>,
}

impl Sleeper {
    fn new() -> Sleeper {
        // SAFETY: epoll_create1 takes no pointers; a failure (-1) disables sleeping.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        Sleeper {
            ep,
            registered: Vec::new(),
            armed: Vec::new(),
            events: vec![libc::epoll_event { events: 0, u64: 0 }; 8],
        }
    }

    /// Arms every job's queues and sleeps on their descriptors for at most `ms` milliseconds.
    /// `None`: no sleep (a job must be polled instead); `Some(true)`: slept until the limit
    /// with no interrupt.
    fn sleep<Q: IoQueue>(&mut self, jobs: &mut [Job<Q>], ms: u64) -> Option<bool> {
        if self.ep < 0 {
            return None;
        }
        self.armed.clear();
        for j in jobs.iter_mut() {
            if !j.arm(&mut self.armed) {
                return None;
            }
        }
        if self.armed.is_empty() {
            return None;
        }
        for &fd in &self.armed {
            if self.registered.contains(&fd) {
                continue;
            }
            let mut ev = libc::epoll_event {
                events: (libc::EPOLLIN | libc::EPOLLET) as u32,
                u64: fd as u64,
            };
            // SAFETY: `ep` and `fd` are open descriptors (the queue's eventfd lives as long as
            // the queue, which outlives the run); `ev` is a valid event for the call.
            if unsafe { libc::epoll_ctl(self.ep, libc::EPOLL_CTL_ADD, fd, &mut ev) } != 0 {
                return None;
            }
            // A descriptor already readable is reported at once (EPOLL_CTL_ADD checks): no
            // signal from before the registration is lost.
            self.registered.push(fd);
        }
        let cap = self.events.len() as libc::c_int;
        // SAFETY: `events` holds `cap` writable entries for the kernel to fill. EINTR or an
        // error is a wake-up: the loop polls again.
        let n =
            unsafe { libc::epoll_wait(self.ep, self.events.as_mut_ptr(), cap, ms as libc::c_int) };
        Some(n == 0)
    }
}

impl Drop for Sleeper {
    fn drop(&mut self) {
        if self.ep >= 0 {
            // SAFETY: our own epoll descriptor, closed once.
            unsafe { libc::close(self.ep) };
        }
    }
}

/// Runs `jobs` on this thread until `-t` (after `-a`) passes, every job has done `-d` I/Os,
/// or `stop` is set; then drains. Busy/idle ticks are counted per job as SPDK does (`-m`).
pub fn run<Q: IoQueue>(
    jobs: &mut [Job<Q>],
    s: &Settings,
    clock: &Clock,
    progress: &Progress,
    stop: &AtomicBool,
) -> WorkerResult {
    let mut start = clock.now();
    let mut warmup = s.warmup_ticks > 0;
    progress.warmup.store(warmup, Ordering::Relaxed);
    let mut end = start + if warmup { s.warmup_ticks } else { s.time_ticks };
    let publish_every = clock.hz() / 100;
    let mut next_publish = start + publish_every;
    let mut last = vec![start; jobs.len()];
    for j in jobs.iter_mut() {
        j.start(s, clock);
    }
    let mut now;
    let (mut sleeps, mut limit_hits, mut last_completion) = (0u64, 0u64, start);
    let mut sleeper = Sleeper::new();
    let ms_ticks = (clock.hz() / 1000).max(1);
    loop {
        let mut all_draining = true;
        let mut got = 0;
        for (j, last) in jobs.iter_mut().zip(last.iter_mut()) {
            let t = clock.now();
            let n = j.poll(s, clock);
            got += n;
            if n > 0 {
                j.stats.busy_ticks += t - *last;
            } else {
                j.stats.idle_ticks += t - *last;
            }
            *last = t;
            if !j.draining {
                all_draining = false;
            }
        }
        now = clock.now();
        if all_draining {
            break;
        }
        if got > 0 {
            last_completion = now;
        } else if let Some(after) = s.sleep_after_ticks {
            if now - last_completion >= after {
                let ms = (end.saturating_sub(now).div_ceil(ms_ticks)).clamp(1, SLEEP_LIMIT_MS);
                if let Some(timed_out) = sleeper.sleep(jobs, ms) {
                    sleeps += 1;
                    limit_hits += timed_out as u64;
                }
            }
        }
        if now > next_publish {
            next_publish = now + publish_every;
            publish(jobs, progress);
            if stop.load(Ordering::Relaxed) {
                break;
            }
        }
        if now > end {
            if warmup {
                for j in jobs.iter_mut() {
                    j.stats.reset();
                }
                start = clock.now();
                end = start + s.time_ticks;
                warmup = false;
                progress.warmup.store(false, Ordering::Relaxed);
            } else {
                break;
            }
        }
    }
    let elapsed_ticks = now - start;
    // Drain in round robin, as SPDK does, giving up after the drain timeout.
    let give_up = clock.now() + s.drain_timeout_ticks;
    for j in jobs.iter_mut() {
        j.draining = true;
    }
    loop {
        let mut left = 0;
        for j in jobs.iter_mut() {
            if j.inflight > 0 {
                j.poll(s, clock);
                left += j.inflight;
            }
        }
        if left == 0 {
            break;
        }
        if clock.now() > give_up {
            for j in jobs.iter_mut().filter(|j| j.inflight > 0) {
                let msg = format!("{}: {} I/Os did not complete", j.spec.name, j.inflight);
                j.abandon(None);
                j.fail(msg);
            }
            break;
        }
    }
    for j in jobs.iter_mut() {
        if let Some((n, first)) = j.rejected.take() {
            let msg = format!(
                "{}: the device posted {n} invalid completion entr{} (rejected by the driver; \
                 the job stopped and drained); the first: {first}",
                j.spec.name,
                if n == 1 { "y" } else { "ies" }
            );
            j.fail(msg);
        }
    }
    publish(jobs, progress);
    progress.finished.store(true, Ordering::Relaxed);
    WorkerResult {
        elapsed_ticks,
        sleeps,
        sleep_limit_hits: limit_hits,
        completed: jobs.iter().map(|j| j.lifetime_completed).sum(),
    }
}

fn publish<Q: IoQueue>(jobs: &[Job<Q>], p: &Progress) {
    let (mut c, mut b, mut i) = (0, 0, 0);
    for j in jobs {
        c += j.lifetime_completed;
        b += j.stats.busy_ticks;
        i += j.stats.idle_ticks;
    }
    p.completed.store(c, Ordering::Relaxed);
    p.busy.store(b, Ordering::Relaxed);
    p.idle.store(i, Ordering::Relaxed);
}

/// An in-memory queue for tests: completes commands when the doorbell is rung.
#[cfg(test)]
pub(crate) mod mock {
    use super::*;
    use std::cell::{RefCell, UnsafeCell};
    use std::collections::HashMap;
    use std::rc::Rc;

    pub struct MockBuf(pub UnsafeCell<Vec<u8>>);
    impl IoBuf for MockBuf {
        fn bytes(&mut self) -> &mut [u8] {
            self.0.get_mut()
        }
    }
    pub fn bufs(n: usize, len: usize) -> Vec<MockBuf> {
        (0..n)
            .map(|_| MockBuf(UnsafeCell::new(vec![0; len])))
            .collect()
    }

    #[derive(Default)]
    pub struct Media {
        pub blocks: HashMap<u64, Vec<u8>>,
        pub commands: u64,
        pub rings: u64,
    }

    pub struct MockQueue {
        pub media: Rc<RefCell<Media>>,
        pub block_size: usize,
        pub null: bool,
        /// Complete the n-th command (1-based) with an error.
        pub fail_nth: Option<u64>,
        /// Flip a bit in what the n-th read returns.
        pub corrupt_nth_read: Option<u64>,
        pub queued: Vec<(u64, Result<(), Status>)>,
        pub ready: Vec<(u64, Result<(), Status>)>,
        pub reads: u64,
        /// Fail every poll after this many.
        pub fail_poll_after: Option<u64>,
        /// Report a rejected (invalid) completion entry from this poll, after delivering its
        /// completions; the queue goes on working.
        pub reject_on_poll: Option<u64>,
        /// Deliver this poll's first completion twice (a device posting a duplicate entry).
        pub duplicate_on_poll: Option<u64>,
        /// Deliver the first command's completion once more (with a media error), before the
        /// others of the poll after the queue has taken this many more commands (a stale
        /// duplicate).
        pub replay_first_after: Option<u64>,
        /// The first command's tag, for `replay_first_after`.
        pub first_tag: Option<u64>,
        pub polls: u64,
    }

    impl MockQueue {
        pub fn new(media: Rc<RefCell<Media>>, block_size: usize) -> MockQueue {
            MockQueue {
                media,
                block_size,
                null: false,
                fail_nth: None,
                corrupt_nth_read: None,
                queued: Vec::new(),
                ready: Vec::new(),
                reads: 0,
                fail_poll_after: None,
                reject_on_poll: None,
                duplicate_on_poll: None,
                replay_first_after: None,
                first_tag: None,
                polls: 0,
            }
        }
    }

    impl IoQueue for MockQueue {
        type Buf = MockBuf;
        type Error = String;
        type IoErr = Status;
        fn status(e: &Status) -> Option<Status> {
            Some(*e)
        }
        fn retire(_: &Status) -> bool {
            false
        }
        fn survives(e: &String) -> bool {
            e.starts_with("rejected")
        }
        unsafe fn submit(
            &mut self,
            read: bool,
            _nsid: u32,
            lba: u64,
            blocks: u32,
            buf: &MockBuf,
            tag: u64,
        ) -> Result<(), String> {
            // SAFETY: the caller does not touch the buffer while the command is in flight.
            let data = unsafe { &mut *buf.0.get() };
            let bs = self.block_size;
            assert_eq!(data.len(), blocks as usize * bs);
            let mut m = self.media.borrow_mut();
            m.commands += 1;
            if Some(m.commands) == self.fail_nth {
                let st = Status::new(dioxide::spec::Sct::Media, 0x81);
                self.queued.push((tag, Err(st)));
                return Ok(());
            }
            if read {
                self.reads += 1;
                if !self.null {
                    for b in 0..blocks as usize {
                        let src = m
                            .blocks
                            .get(&(lba + b as u64))
                            .cloned()
                            .unwrap_or(vec![0; bs]);
                        data[b * bs..(b + 1) * bs].copy_from_slice(&src);
                    }
                }
                if Some(self.reads) == self.corrupt_nth_read {
                    data[bs + 17] ^= 0x40;
                }
            } else if !self.null {
                for b in 0..blocks as usize {
                    m.blocks
                        .insert(lba + b as u64, data[b * bs..(b + 1) * bs].to_vec());
                }
            }
            self.first_tag.get_or_insert(tag);
            self.queued.push((tag, Ok(())));
            Ok(())
        }
        fn ring(&mut self) {
            self.media.borrow_mut().rings += 1;
            self.ready.append(&mut self.queued);
        }
        fn poll<F: FnMut(u64, Result<(), Status>)>(
            &mut self,
            max: u32,
            mut done: F,
        ) -> Result<u32, String> {
            self.polls += 1;
            if self.fail_poll_after.is_some_and(|n| self.polls > n) {
                return Err("the mock queue died".into());
            }
            let n = if max == 0 {
                self.ready.len()
            } else {
                self.ready.len().min(max as usize)
            };
            let mut replayed = 0;
            if let (Some(after), Some(tag)) = (self.replay_first_after, self.first_tag) {
                if n > 0 && self.media.borrow().commands > after {
                    self.replay_first_after = None;
                    // With an error the first I/O never had: taken for the current I/O, it
                    // would show as an I/O error.
                    done(tag, Err(Status::new(dioxide::spec::Sct::Media, 0x81)));
                    replayed = 1;
                }
            }
            let mut first = None;
            for (tag, st) in self.ready.drain(..n) {
                first.get_or_insert((tag, st));
                done(tag, st);
            }
            if self.duplicate_on_poll == Some(self.polls) {
                if let Some((tag, st)) = first {
                    done(tag, st);
                    return Ok(n as u32 + 1 + replayed);
                }
            }
            if self.reject_on_poll == Some(self.polls) {
                return Err("rejected: an invalid completion entry".into());
            }
            Ok(n as u32 + replayed)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::mock::*;
    use super::*;
    use crate::clock::Source;
    use std::cell::RefCell;
    use std::rc::Rc;

    fn settings(workload: Workload, q: u32, number_ios: u64) -> Settings {
        Settings {
            queue_depth: q,
            workload,
            mix: Mix::new(workload, Some(50)),
            time_ticks: 10_000_000_000,
            warmup_ticks: 0,
            number_ios,
            max_completions: 0,
            doorbell_per_command: false,
            continue_on_error: None,
            track_latency: true,
            drain_timeout_ticks: 1_000_000_000,
            sleep_after_ticks: None,
        }
    }

    fn job(s: &Settings, qps: Vec<MockQueue>, ios: u64) -> Job<MockQueue> {
        let spec = JobSpec {
            name: "MOCK NSID 1".into(),
            nsid: 1,
            core: 0,
            block_size: 512,
            io_blocks: 2,
            first_io: 0,
            ios,
            seed: 1234,
        };
        let qps = qps
            .into_iter()
            .map(|q| SharedQueue::new(q).handle().unwrap())
            .collect();
        Job::new(
            spec,
            qps,
            bufs(s.queue_depth as usize, 1024),
            s,
            1_000_000_000,
        )
    }

    fn go(jobs: &mut [Job<MockQueue>], s: &Settings) -> WorkerResult {
        let clock = Clock::with_hz(Source::MonotonicRaw, 1_000_000_000);
        run(
            jobs,
            s,
            &clock,
            &Progress::default(),
            &AtomicBool::new(false),
        )
    }

    #[test]
    fn number_ios_stops_and_drains() {
        let media = Rc::new(RefCell::new(Media::default()));
        let s = settings(Workload::RandRw, 8, 1000);
        let mut jobs = [job(&s, vec![MockQueue::new(media.clone(), 512)], 1 << 20)];
        go(&mut jobs, &s);
        let j = &jobs[0];
        assert_eq!(j.stats.io_submitted, 1000);
        assert_eq!(j.stats.io_completed, 1000);
        assert_eq!(j.inflight(), 0);
        assert!(j.failure.is_none());
        assert_eq!(j.stats.histogram.as_ref().unwrap().len(), 1000);
        // Batched doorbells: far fewer rings than commands.
        let m = media.borrow();
        assert_eq!(m.commands, 1000);
        assert!(m.rings < 1000 / 4, "{} rings", m.rings);
    }

    #[test]
    fn per_command_doorbell_rings_each_command() {
        let media = Rc::new(RefCell::new(Media::default()));
        let mut s = settings(Workload::Write, 4, 100);
        s.doorbell_per_command = true;
        let mut jobs = [job(&s, vec![MockQueue::new(media.clone(), 512)], 1 << 20)];
        go(&mut jobs, &s);
        assert_eq!(media.borrow().rings, 100);
    }

    #[test]
    fn queue_pairs_share_the_load_and_c_limits_polls() {
        let media = Rc::new(RefCell::new(Media::default()));
        let mut s = settings(Workload::Read, 16, 1600);
        s.max_completions = 3;
        let qps = (0..4).map(|_| MockQueue::new(media.clone(), 512)).collect();
        let mut jobs = [job(&s, qps, 1 << 20)];
        go(&mut jobs, &s);
        assert_eq!(jobs[0].stats.io_completed, 1600);
    }

    #[test]
    fn sequential_offsets_cover_the_range() {
        let media = Rc::new(RefCell::new(Media::default()));
        let s = settings(Workload::Write, 4, 40);
        let mut jobs = [job(&s, vec![MockQueue::new(media.clone(), 512)], 10)];
        go(&mut jobs, &s);
        // 10 I/Os of 2 blocks: LBAs 0..20 all written.
        let m = media.borrow();
        assert_eq!(m.blocks.len(), 20);
        assert!((0..20).all(|l| m.blocks.contains_key(&l)));
    }

    #[test]
    fn time_limit_and_warmup() {
        let media = Rc::new(RefCell::new(Media::default()));
        let mut s = settings(Workload::RandRead, 4, 0);
        s.time_ticks = 20_000_000; // 20 ms
        s.warmup_ticks = 10_000_000;
        let mut jobs = [job(&s, vec![MockQueue::new(media.clone(), 512)], 1 << 20)];
        let r = go(&mut jobs, &s);
        assert!(
            r.elapsed_ticks >= 20_000_000 && r.elapsed_ticks < 2_000_000_000,
            "{r:?}"
        );
        let j = &jobs[0];
        assert!(j.stats.io_completed > 0);
        // The warm-up's I/Os are not in the statistics.
        assert!(j.lifetime_completed > j.stats.io_completed);
    }

    #[test]
    fn verify_passes_on_good_media() {
        let media = Rc::new(RefCell::new(Media::default()));
        let s = settings(Workload::Verify, 8, 2000);
        let mut jobs = [job(&s, vec![MockQueue::new(media.clone(), 512)], 50)];
        go(&mut jobs, &s);
        let j = &jobs[0];
        assert_eq!(j.verify.bad_blocks, 0, "{:?}", j.verify.first);
        assert_eq!(j.verify.blocks_checked, 2000);
        assert!(j.failure.is_none());
    }

    #[test]
    fn verify_catches_a_flipped_bit() {
        let media = Rc::new(RefCell::new(Media::default()));
        let s = settings(Workload::Verify, 4, 400);
        let mut q = MockQueue::new(media.clone(), 512);
        q.corrupt_nth_read = Some(10);
        let mut jobs = [job(&s, vec![q], 50)];
        go(&mut jobs, &s);
        let v = &jobs[0].verify;
        assert_eq!(v.bad_blocks, 1);
        let f = v.first.unwrap();
        assert_eq!(f.offset, 17);
        assert_eq!(f.got, f.expected ^ 0x40);
        assert_eq!(f.lba % 2, 1, "the second block of the I/O");
    }

    #[test]
    fn verify_catches_a_device_that_moves_no_data() {
        let media = Rc::new(RefCell::new(Media::default()));
        let s = settings(Workload::Verify, 4, 100);
        let mut q = MockQueue::new(media.clone(), 512);
        q.null = true;
        let mut jobs = [job(&s, vec![q], 50)];
        go(&mut jobs, &s);
        let v = &jobs[0].verify;
        assert_eq!(v.bad_blocks, v.blocks_checked);
        assert_eq!(v.first.unwrap().got, verify::POISON);
    }

    #[test]
    fn verify_slots_never_overlap() {
        // More slots than the range: only as many slots as I/O-sized offsets are used.
        let media = Rc::new(RefCell::new(Media::default()));
        let s = settings(Workload::Verify, 16, 200);
        let mut jobs = [job(&s, vec![MockQueue::new(media.clone(), 512)], 5)];
        go(&mut jobs, &s);
        assert_eq!(jobs[0].verify.bad_blocks, 0);
        assert_eq!(jobs[0].verify.blocks_checked, 200);
    }

    #[test]
    fn error_stops_without_q_and_continues_with_q() {
        let media = Rc::new(RefCell::new(Media::default()));
        let s = settings(Workload::RandRead, 4, 100);
        let mut q = MockQueue::new(media.clone(), 512);
        q.fail_nth = Some(10);
        let mut jobs = [job(&s, vec![q], 1 << 20)];
        go(&mut jobs, &s);
        let j = &jobs[0];
        assert_eq!(j.stats.io_errors, 1);
        assert!(
            j.failure
                .as_deref()
                .unwrap()
                .contains("Read completed with error"),
            "{:?}",
            j.failure
        );
        assert!(j.stats.io_completed < 100);

        let media = Rc::new(RefCell::new(Media::default()));
        let mut s = settings(Workload::RandRead, 4, 100);
        s.continue_on_error = Some(5);
        let mut q = MockQueue::new(media.clone(), 512);
        q.fail_nth = Some(10);
        let mut jobs = [job(&s, vec![q], 1 << 20)];
        go(&mut jobs, &s);
        let j = &jobs[0];
        assert_eq!((j.stats.io_errors, j.stats.io_completed), (1, 100));
        assert!(j.failure.is_none());
    }

    #[test]
    fn stop_flag_ends_the_run() {
        let media = Rc::new(RefCell::new(Media::default()));
        let s = settings(Workload::RandRead, 4, 0);
        let mut jobs = [job(&s, vec![MockQueue::new(media.clone(), 512)], 1 << 20)];
        let clock = Clock::with_hz(Source::MonotonicRaw, 1_000_000_000);
        let r = run(
            &mut jobs,
            &s,
            &clock,
            &Progress::default(),
            &AtomicBool::new(true),
        );
        assert!(r.elapsed_ticks < 1_000_000_000);
    }

    fn spec(nsid: u32, first_io: u64, ios: u64) -> JobSpec {
        JobSpec {
            name: format!("MOCK NSID {nsid}"),
            nsid,
            core: 0,
            block_size: 512,
            io_blocks: 2,
            first_io,
            ios,
            seed: 99 + nsid as u64,
        }
    }

    /// Three namespaces' jobs on one core share one queue pair: each gets exactly its own
    /// completions, and every block it wrote reads back intact.
    #[test]
    fn jobs_of_several_namespaces_share_one_queue() {
        let media = Rc::new(RefCell::new(Media::default()));
        let s = settings(Workload::Verify, 8, 400);
        let shared = SharedQueue::new(MockQueue::new(media.clone(), 512));
        let mut jobs: Vec<Job<MockQueue>> = (0..3)
            .map(|i| {
                // Disjoint ranges: the mock's media has no namespaces.
                let q = shared.handle().unwrap();
                Job::new(
                    spec(i + 1, i as u64 * 40, 40),
                    vec![q],
                    bufs(8, 1024),
                    &s,
                    1,
                )
            })
            .collect();
        assert_eq!(shared.jobs(), 3);
        go(&mut jobs, &s);
        for j in &jobs {
            assert!(j.failure.is_none(), "{:?}", j.failure);
            assert_eq!(j.stats.io_completed, 400, "{}", j.spec.name);
            assert_eq!(j.inflight(), 0);
            assert_eq!(j.verify.bad_blocks, 0, "{:?}", j.verify.first);
            assert_eq!(j.verify.blocks_checked, 400);
        }
        let m = media.borrow();
        assert_eq!(m.commands, 1200);
        // One doorbell per batch of the queue, not one per job per batch.
        assert!(m.rings < 1200 / 4, "{} rings", m.rings);
    }

    /// A queue that fails fails every job on it, each saying why, and the run ends.
    #[test]
    fn a_failed_shared_queue_fails_every_job_on_it() {
        let media = Rc::new(RefCell::new(Media::default()));
        let s = settings(Workload::RandRead, 4, 0);
        let mut q = MockQueue::new(media.clone(), 512);
        q.fail_poll_after = Some(5);
        let shared = SharedQueue::new(q);
        let mut jobs: Vec<Job<MockQueue>> = (0..2)
            .map(|i| {
                let q = shared.handle().unwrap();
                Job::new(spec(i + 1, 0, 1 << 20), vec![q], bufs(4, 1024), &s, 1)
            })
            .collect();
        let r = go(&mut jobs, &s);
        assert!(r.elapsed_ticks < 10_000_000_000);
        for j in &jobs {
            let f = j.failure.as_deref().unwrap_or_default();
            assert!(f.contains("the mock queue died"), "{}: {f:?}", j.spec.name);
            // The I/Os the queue still held are counted, not hidden.
            assert_eq!(j.inflight(), 0);
            assert_eq!(
                j.stats.io_submitted,
                j.stats.io_completed + j.abandoned,
                "{}",
                j.spec.name
            );
        }
        assert!(jobs.iter().map(|j| j.abandoned).sum::<u64>() > 0);
    }

    /// With several queue pairs per job (`-P 2`), a queue that fails abandons only the I/Os in
    /// flight on it: the completions the healthy queue delivered in the same pass are counted,
    /// and its I/Os in flight are drained, not abandoned.
    #[test]
    fn a_failed_queue_abandons_only_its_own_ios() {
        let media = Rc::new(RefCell::new(Media::default()));
        let s = settings(Workload::RandRead, 8, 0);
        let healthy = SharedQueue::new(MockQueue::new(media.clone(), 512));
        let mut q = MockQueue::new(media.clone(), 512);
        q.fail_poll_after = Some(5);
        let failing = healthy.sibling(q);
        let qps = vec![healthy.handle().unwrap(), failing.handle().unwrap()];
        let mut jobs = [Job::new(spec(1, 0, 1 << 20), qps, bufs(8, 1024), &s, 1)];
        let r = go(&mut jobs, &s);
        assert!(r.elapsed_ticks < 10_000_000_000);
        let j = &jobs[0];
        let f = j.failure.as_deref().unwrap_or_default();
        assert!(f.contains("the mock queue died"), "{f:?}");
        assert_eq!(j.inflight(), 0);
        assert_eq!(j.doubles, 0);
        // Abandoned: exactly the commands the failed queue never completed.
        let unanswered = |q: &MockQueue| (q.ready.len() + q.queued.len()) as u64;
        assert_eq!(healthy.with(unanswered), 0);
        let lost = failing.with(unanswered);
        assert!(lost > 0 && lost < 8, "{lost} on the failed queue");
        assert_eq!(j.abandoned, lost);
        assert_eq!(j.stats.io_submitted, j.stats.io_completed + j.abandoned);
        assert_eq!(j.stats.io_submitted, media.borrow().commands);
    }

    /// A rejected invalid completion entry (the queue still works) stops the job, which drains
    /// every I/O in flight and then fails naming the entries; nothing is abandoned.
    #[test]
    fn a_rejected_completion_entry_stops_and_drains_the_job() {
        let media = Rc::new(RefCell::new(Media::default()));
        let s = settings(Workload::RandRw, 8, 0);
        let mut q = MockQueue::new(media.clone(), 512);
        q.reject_on_poll = Some(5);
        let mut jobs = [job(&s, vec![q], 1 << 20)];
        let r = go(&mut jobs, &s);
        assert!(r.elapsed_ticks < 10_000_000_000);
        let j = &jobs[0];
        let f = j.failure.as_deref().unwrap_or_default();
        assert!(
            f.contains(
                "1 invalid completion entry (rejected by the driver; the job stopped and drained)"
            ) && f.contains("rejected: an invalid completion entry"),
            "{f:?}"
        );
        assert_eq!(j.abandoned, 0);
        assert_eq!(j.inflight(), 0);
        assert!(j.stats.io_submitted > 0);
        assert_eq!(j.stats.io_submitted, j.stats.io_completed);
        assert_eq!(j.stats.io_errors, 0);
    }

    /// A duplicate completion (the device completes one command twice) is counted as a double,
    /// never taken for the slot's next I/O, and fails the job naming it; every real I/O is
    /// still accounted for.
    #[test]
    fn a_duplicate_completion_is_counted_and_fails_the_job() {
        let media = Rc::new(RefCell::new(Media::default()));
        let s = settings(Workload::Verify, 4, 200);
        let mut q = MockQueue::new(media.clone(), 512);
        q.duplicate_on_poll = Some(5);
        let mut jobs = [job(&s, vec![q], 50)];
        let r = go(&mut jobs, &s);
        assert!(r.elapsed_ticks < 10_000_000_000);
        let j = &jobs[0];
        let f = j.failure.as_deref().unwrap_or_default();
        assert!(
            f.contains("double completion") && f.contains("no I/O in flight"),
            "{f:?}"
        );
        assert_eq!(j.doubles, 1);
        assert_eq!(j.inflight(), 0);
        assert_eq!(j.abandoned, 0);
        assert_eq!(j.stats.io_submitted, j.stats.io_completed);
        assert_eq!(j.stats.io_submitted, media.borrow().commands);
        assert_eq!(j.verify.bad_blocks, 0, "{:?}", j.verify.first);
    }

    /// A stale duplicate (the completion of a slot's first I/O, delivered again 65 536 I/Os of
    /// that slot later, when a 16-bit sequence number has wrapped to the same value) is a double
    /// completion, never taken for the slot's current I/O, which completes normally.
    #[test]
    fn a_stale_duplicate_is_not_taken_for_the_slot_current_io() {
        let media = Rc::new(RefCell::new(Media::default()));
        let s = settings(Workload::RandRead, 1, 65_536 + 8);
        let mut q = MockQueue::new(media.clone(), 512);
        q.null = true;
        q.replay_first_after = Some(65_536);
        let mut jobs = [job(&s, vec![q], 1 << 20)];
        let r = go(&mut jobs, &s);
        assert!(r.elapsed_ticks < 100_000_000_000);
        let j = &jobs[0];
        let f = j.failure.as_deref().unwrap_or_default();
        // The first I/O's tag: slot 0, sequence number 1.
        assert!(
            f.contains("double completion: a completion for tag 0x10000 (slot 0)"),
            "{f:?}"
        );
        assert_eq!(j.doubles, 1);
        // The stale entry's error was not taken for the current I/O, which completed normally.
        assert_eq!(j.stats.io_errors, 0);
        assert_eq!(j.inflight(), 0);
        assert_eq!(j.stats.io_submitted, j.stats.io_completed);
        assert_eq!(j.stats.io_submitted, media.borrow().commands);
    }

    /// A completion whose tag names no job on the queue fails the queue instead of being lost
    /// or given to the wrong job.
    #[test]
    fn a_stray_completion_fails_the_queue() {
        let media = Rc::new(RefCell::new(Media::default()));
        let mut q = MockQueue::new(media, 512);
        q.ready.push((7 << 48, Ok(())));
        let shared = SharedQueue::new(q);
        let mut h = shared.handle().unwrap();
        let e = h
            .poll(0, |_, _| panic!("no completion is this job's"))
            .unwrap_err();
        assert!(e.contains("no job on this queue"), "{e}");
        // And it stays failed.
        assert!(h.poll(0, |_, _| ()).is_err());
    }
}
