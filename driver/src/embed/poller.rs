//! Pollers: the threads that own the queue pairs, and the two ways bios reach a queue pair.
//!
//! **Pooled** ([`Pollers`]): N threads, each pinned to a core (`sched_setaffinity`), each
//! owning one [`QueuePair`] per controller. A client thread hands its bios to its *home*
//! poller (one per thread, chosen round robin at its first request) through that poller's
//! bounded ring (crossbeam's lock-free `ArrayQueue`: many producers, the poller its only
//! consumer, so the poller's I/O path takes no lock). A bio submitted *by* a poller thread (a
//! completion callback or a [`PollerTask`] that issues I/O) goes to a thread-local queue of that
//! poller instead, which never fills. Each round the poller submits what it received (ringing
//! each doorbell once per batch), polls every queue pair, completes each finished bio into
//! dio-core on its own thread (`dio-core/DESIGN.md §3.5`), then runs its tasks. With nothing in
//! flight, nothing queued and no busy task it keeps polling for a bounded time
//! (`Builder::poller_idle`, default 1 ms, yielding the CPU between rounds), then parks on a
//! crossbeam-utils `Parker`. A full ring makes a submitter back off until the poller drains it;
//! a poller that finds the request pool of a queue pair exhausted keeps the bio and retries after
//! its next poll (`dio-core/DESIGN.md §3.10`).
//!
//! *Wake-up protocol (no lost wake-up, no fence per push).* The only word a submitter reads to
//! decide whether to wake its poller is the poller's `sleeping` flag, on a cache line of its own
//! that the poller writes only when it parks and when it wakes up, so while the poller is awake
//! the line stays shared in every submitter's cache. The handshake is Dekker's, with sequentially
//! consistent (SeqCst) operations on both sides. A submitter publishes its bio with the ring's
//! SeqCst compare-exchange of the tail (crossbeam-queue's `ArrayQueue::push`), then loads
//! `sleeping` (SeqCst; a plain load on x86), and unparks the poller only if it is set. The
//! poller, before it parks, stores `sleeping = true` (SeqCst), issues a SeqCst fence, then
//! checks the ring (`ArrayQueue::is_empty`: SeqCst loads of head and tail), its task inbox and
//! the stop flag, and parks only if there is nothing. In the single total order of SeqCst
//! operations either the submitter's load of `sleeping` comes after the poller's store, and it
//! unparks the poller (the `Parker` keeps the token if the unpark comes before `park`), or it
//! comes before it, and then so does the compare-exchange that published the bio (program
//! order), so the poller's `is_empty` sees the bio and it does not park. A push thus costs the
//! ring's own compare-exchange and one load: no fence, and no write beyond the ring's while the
//! poller is awake. The argument relies on `push` and `is_empty` being SeqCst (crossbeam-queue
//! 0.3, pinned by `Cargo.lock`; on x86 every locked instruction is a full barrier anyway). The
//! test `no_wake_up_is_lost` parks the poller and the clients after every request, under a
//! watchdog that fails it instead of hanging.
//!
//! *Shutdown protocol.* A request counts itself, for its submission phase, in one of the
//! engine's striped `active` counters ([`Pollers::enter`], [`Pollers::leave`]): the stripe of
//! its thread's number (the one that also picks its home poller), each stripe on its own cache
//! line, so client threads do not share a counter (up to [`STRIPES`] of them, or one per
//! poller if there are more pollers). `enter` increments the stripe (SeqCst) then reads `stop`
//! (SeqCst); `shutdown` stores `stop` (SeqCst) then unparks every poller; a poller exits once it
//! has read `stop`, then every stripe at 0, then its ring and thread-local queue empty and no
//! command in flight (a request submitted on a poller thread queues to that poller, which is
//! busy running it). Dekker again: a request that read `stop == false` was counted before the
//! poller read its stripe, so the poller waits for it; its bios were pushed before its `leave`
//! (a release decrement), hence are seen by the ring check that follows the poller's read of
//! the decrement. A request that read `stop == true` is refused at once
//! (`EmbedError::ShutDown`), so no request is refused after it was accepted, and none accepted
//! is lost. A `leave` that empties its stripe after `stop` unparks every poller (which also
//! re-check every millisecond while they wait).
//!
//! *Waiting for one's own bios.* A client thread waiting for its own bios (a synchronous call, a
//! page-cache fill, dio-core's throttle) waits in dio-core's `Wait::PollInPlace` loop
//! (`dio-core/DESIGN.md §3.12`) with [`SpinThenPark`]: every bio carries a plain `&'static`
//! reference to the submitting thread's [`Waiter`], taken at the thread's first request from a
//! global pool and given back when the thread exits; waiters are never freed, so a late
//! completion can always touch its waiter (at worst it wakes the waiter's next owner once,
//! spuriously). The poller completes the bio into dio-core, then sets the waiter's flag and
//! unparks the thread only if it parked (the same handshake, on the waiter's own line). The
//! client spins on the flag for `Builder::wait_spin` (default 20 µs; the first 2 µs without
//! yielding), then parks. dio-core re-checks the request under its own lock after each wake-up,
//! so a wake-up for another request of the same thread costs one check; its condition variable
//! is not used.
//!
//! *Tasks.* A [`PollerTask`] (a connection of the NVMe/TCP target, as in SPDK's poll groups)
//! runs on the thread of the poller it was added to, once per round after the I/O. The I/O it
//! submits goes to that poller's own queue and its completions run on that thread. A task that
//! reports itself busy keeps the poller from parking (a task that waits for outside events,
//! such as sockets, either stays busy while it must be polled, or, better, tells the poller what
//! to sleep on: before it sleeps, the poller asks each task for descriptors and a timeout
//! ([`PollerTask::prepare_wait`]) and then sleeps in `poll(2)` on them and on its own eventfd
//! instead of parking; a submitter or a task change that finds the poller asleep rings that
//! eventfd (same handshake, the `sleeping` flag; the `sleep` module). Tasks arrive and leave through a small
//! inbox (a mutex taken only then, and a flag the poller reads each round); a task is dropped on
//! its poller's thread when removed, or at shutdown once the poller's last I/O has completed. A
//! panicking task is dropped and counted ([`PollerStats::task_panics`]); the poller goes on.
//!
//! *Interrupt mode* ([`InterruptMode`], `Builder::interrupt_mode`). The queue pairs are
//! created with an MSI-X vector each; a poller with requests on the device whose round found
//! nothing (at once in interrupt mode, after a quiet time in adaptive mode) announces its sleep
//! as above (`in_poll`, `sleeping`, fence, ring and inbox re-checked), asks its tasks for their
//! descriptors, arms its queue pairs last (`QueuePair::arm_interrupt`: clear the eventfd, look
//! at the CQ again) and sleeps in the same `poll(2)` with their completion eventfds added, at
//! most 10 ms while commands are on the device (timeouts and health checks run in `poll`). A
//! completion posted before the arm cancels the sleep; one posted after makes its eventfd
//! readable; a submitter that finds `sleeping` rings the poller's eventfd. Counted in
//! [`PollerStats::io_sleeps`].
//!
//! Allocation on the I/O path: none here (the ring, the thread-local queue and the failed list
//! keep their capacity; run to completion reuses its list of reaped bios); what dio-core and the
//! file layer allocate per request is theirs.
//!
//! *What a queue pair keeps per command* ([`BioCtx`], two words). A bio is split at
//! submission ([`Bio::split`]: the `Window`'s segment has nothing to unmap): the queue pair
//! gets the command's memory as a slice (`QueuePair::submit_held`, which checks it as the
//! owned-buffer calls do and, like them, hands the context back only once the device has let
//! go of the memory) and keeps only the completion handle, which owns the bio's reference on
//! the request (so the request's buffer stays), and the submitter's waiter. An NVMe/TCP queue
//! also keeps the bio's first block ([`TcpCtx`]), which its error status names. A command the
//! queue pair refuses for want of requests is rejoined with its handle into the bio it was.
//! Measured (`count` profile, 4 KiB reads on the emulated device, instructions per read): QD32
//! asynchronous 2158 -> 2147, QD1 synchronous 2101 -> 2035; the raw queue pair unchanged. Two
//! words rather than three (the first block in the PCIe context too) is worth 28 at QD1, where
//! the context travels in registers, and costs 2 at QD32.
//!
//! **Run to completion** ([`Local`]): the caller's thread owns the queue pairs, kept in a slot of
//! a thread-local table whose index the engine keeps (O(1) access, no search), and polls them
//! itself while it waits: dio-core's `Wait::PollInPlace`.
//!
//! **Transports.** A poller's queues are [`IoQueue`]s: a PCIe queue pair (its arm of
//! each `match` is the queue pair's own inlined call, as before) or an NVMe/TCP connection
//! (`tcp_submit`, `tcp_status`: the same bios, whose data lies in the controller's host
//! memory, sent and received by the host queue without blocking). Poller 0 also drives the
//! Keep Alive of the NVMe/TCP controllers ([`EmbedCtrl::process_admin`], every
//! [`ADMIN_TICK`]; while such a controller is served, an idle poller 0 sleeps, on its tasks'
//! descriptors if it has tasks, for at most that long; after shutdown began, every poller
//! does it until it exits, so the Keep Alive lasts as long as any command on the target). A lost connection, or a failed Keep Alive, fails every bio outstanding or waiting on
//! the connection exactly once, and every later one at submission, with the NVMe "Host
//! Pathing Error" status that the file layer reports as
//! [`EmbedError::ControllerLost`](crate::EmbedError::ControllerLost); the poller logs the
//! reason once. Run to completion drives the Keep Alive from its polls.
//!
//! Errors a queue pair reports at submission (a dead queue, a bad range) complete the bio with
//! an error status on the next poll, never inside `BioSink::submit` (dio-core's rule).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering, fence};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;
use crossbeam_utils::sync::{Parker, Unparker};
use crossbeam_utils::{Backoff, CachePadded};
use dio_core::{Bio, BioHandle, BioOp, BioSink, DeviceStatus, DioError, Poller, Rejected};

use crate::bus::dma::DmaSlice;
use crate::embed::ctrl::EmbedCtrl;
use crate::embed::error::{DEVICE_REMOVED, EmbedError, HOST_PATH_ERROR};
use crate::embed::iobuf::{Seg, Window};
use crate::embed::sleep::{InterruptMode, PollerWait, WakeFd, arm_queue};
use crate::nvme::error::{DeadReason, Error, IoError};
use crate::nvme::namespace::Namespace;
use crate::nvme::qpair::{IoFlags, IoOp, IoResult, QueueOptions, QueuePair};
use crate::nvmf::HostError;
use crate::spec::Sqe;
use crate::spec::sqe::{DSM_RANGE_LEN, io};
use crate::spec::status::generic;
use crate::transport::{TcpQueue, TransportError, TransportIoError, TransportQueue};
use crate::types::{Iova, Lba};

/// The context of one bio on a PCIe queue pair: the bio's completion handle (its reference on
/// the request; the command itself was split off at submission, [`Bio::split`]) and the waiter
/// of the thread that submitted it (pooled mode), woken once the bio has been completed into
/// dio-core. Two words, so it travels in registers.
pub(crate) struct BioCtx {
    done: BioHandle<Window>,
    waiter: Option<&'static Waiter>,
}

/// The context of one bio on an NVMe/TCP queue: also its first block, which the status of an
/// error names (a PCIe error carries it itself).
pub(crate) struct TcpCtx {
    ctx: BioCtx,
    lba: u64,
}

/// A queue of a poller (or of a run-to-completion engine), on either transport. Not a
/// [`TransportQueue`], whose two transports share one context type: each keeps its own.
pub(crate) enum IoQueue {
    /// A PCIe queue pair.
    Pcie(QueuePair<BioCtx>),
    /// An NVMe/TCP I/O queue.
    Tcp(TcpQueue<TcpCtx>),
}

/// A new queue on `c`, of its transport.
fn create_queue(c: &EmbedCtrl, opts: &QueueOptions) -> Result<IoQueue, EmbedError> {
    if c.tcp().is_some() {
        if let TransportQueue::Tcp(q) = c.create_queue::<TcpCtx>(opts)? {
            return Ok(IoQueue::Tcp(q));
        }
    } else if let TransportQueue::Pcie(q) = c.create_queue::<BioCtx>(opts)? {
        return Ok(IoQueue::Pcie(q));
    }
    Err(EmbedError::Config(
        "internal: a controller's queue is not of its transport",
    ))
}

impl BioCtx {
    /// Complete the bio into dio-core (its reference drop, and the request's completion if it
    /// was the last), then wake its submitter's waiter. The waiter is a per-thread object that
    /// is never freed, not part of the request, so touching it after the drop is fine.
    #[inline(always)]
    fn complete(self, status: Result<(), DeviceStatus>) {
        let BioCtx { done, waiter } = self;
        done.complete(status);
        if let Some(w) = waiter {
            w.wake();
        }
    }

    /// [`complete`](Self::complete) for a run-to-completion engine, whose bios never carry a
    /// waiter ([`LocalSink`] submits them with none): the waiter is not tested.
    #[inline(always)]
    fn complete_local(self, status: Result<(), DeviceStatus>) {
        debug_assert!(
            self.waiter.is_none(),
            "a run-to-completion bio has a waiter"
        );
        self.done.complete(status);
    }
}

/// What the device needs of a bio, read from it before it is split (measured: reading it
/// from the split-off command instead costs 2 more instructions per I/O, QD1 and QD32).
struct DevCmd {
    op: BioOp,
    lba: u64,
    len: u64,
    data: DmaSlice,
}

impl DevCmd {
    #[inline(always)]
    fn of(bio: &Bio<Window>) -> DevCmd {
        DevCmd {
            op: bio.op(),
            lba: bio.lba(),
            len: bio.len(),
            data: data_of(bio.segment()),
        }
    }
}

/// The DMA memory of a bio's command: its segment, or nothing (an empty slice).
#[inline(always)]
fn data_of(seg: Option<&Seg>) -> DmaSlice {
    match seg {
        Some(s) => s.0,
        None => DmaSlice {
            ptr: core::ptr::NonNull::dangling(),
            iova: Iova(0),
            len: 0,
        },
    }
}

/// One bio addressed to a namespace of the engine (`target` indexes the engine's table).
pub(crate) struct Work {
    target: u32,
    bio: Bio<Window>,
    waiter: Option<&'static Waiter>,
}

/// The namespaces an engine serves: `(controller index, namespace)`.
pub(crate) type Targets = Vec<(usize, Namespace)>;

/// The status reported for a request the driver failed without the device: the queue pair
/// refused it (dead queue, controller reset) or the device never completed it (timeout).
fn driver_status(e: &Error) -> DeviceStatus {
    match e {
        Error::QueueDead {
            reason: DeadReason::DeviceGone,
            ..
        }
        | Error::DeviceGone { .. } => DEVICE_REMOVED,
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
        Err(IoError::Aborted {
            reason: DeadReason::DeviceGone,
            ..
        }) => Err(DEVICE_REMOVED),
        Err(_) => Err(DeviceStatus::new(0, generic::ABORTED_SQ_DELETION)),
    }
}

/// Submit one bio to its queue pair. `Err(work)`: the request pool is exhausted, retry after
/// a poll. Other refusals go to `failed`, completed by the next poll.
#[inline(always)]
fn submit_one(
    qpairs: &mut [IoQueue],
    targets: &Targets,
    w: Work,
    failed: &mut Vec<(BioCtx, DeviceStatus)>,
) -> Result<(), Work> {
    let Work {
        target,
        bio,
        waiter,
    } = w;
    let dev = DevCmd::of(&bio);
    let (cmd, done) = bio.split();
    let ctx = BioCtx { done, waiter };
    submit_cmd(qpairs, targets, target, &dev, ctx, failed).map_err(|ctx| Work {
        target,
        bio: ctx.done.rejoin(cmd),
        waiter: ctx.waiter,
    })
}

/// A queue pair whose controller was reset: a new one once its requests were failed (each once,
/// with the reset) by a poll; until then, and while the controller is not ready again, the old
/// one refuses new requests. Cold: one atomic load per submission decides.
#[cold]
#[inline(never)]
fn renew(q: &mut QueuePair<BioCtx>) {
    if let Err(e) = q.renew() {
        log::debug!(
            "queue pair {} not renewed after a reset yet: {e}",
            q.qid().0
        );
    }
}

/// [`submit_one`] on a bio split into what the device needs and its context (the completion
/// handle): the queue pair gets the command's memory at submission and keeps only the small
/// context. `Err(ctx)` when the request pool is exhausted: the caller rejoins it with its
/// command.
#[inline(always)]
fn submit_cmd(
    qpairs: &mut [IoQueue],
    targets: &Targets,
    target: u32,
    cmd: &DevCmd,
    ctx: BioCtx,
    failed: &mut Vec<(BioCtx, DeviceStatus)>,
) -> Result<(), BioCtx> {
    let (qi, ns) = &targets[target as usize];
    let q = match &mut qpairs[*qi] {
        IoQueue::Pcie(q) => {
            if q.is_stale() {
                renew(q);
            }
            q
        }
        IoQueue::Tcp(q) => {
            return match tcp_submit(q, ns, cmd, ctx) {
                Ok(()) => Ok(()),
                Err((ctx, None)) => Err(ctx),
                Err((ctx, Some(st))) => {
                    failed.push((ctx, st));
                    Ok(())
                }
            };
        }
    };
    let lba = Lba(cmd.lba);
    // Why the `*_held` calls below are sound: the slice is the DMA segment dio-core mapped from the
    // request's `Window`, i.e. a sub-range of a `DmaBuffer` (`IoBuffer::Dma`) that lies in this
    // controller's DMA memory (the queue pair re-checks it: `check_owned`). The context owns
    // the bio's reference on the request, and the buffer is the request's: dio-core keeps it
    // in the request's payload, which is taken only when the last reference goes, so not
    // before this context has been completed (or, if it never is, never), and its pages never
    // move. While bios are in flight nobody else touches the buffer: the submitter handed it
    // to dio-core by value, dio-core only zero-fills read holes (which the mapper of this
    // crate never reports), and the user gets it back only after the last bio completed. The
    // queue pair hands the context back only once the device has let go of the memory.
    let r = match cmd.op {
        // SAFETY: the segment is the request's memory, owned through `ctx` (see above).
        BioOp::Read => unsafe { q.submit_held(IoOp::Read, ns, lba, cmd.data, IoFlags::NONE, ctx) },
        // SAFETY: as for a read; the device only reads the memory.
        BioOp::Write => unsafe {
            q.submit_held(IoOp::Write, ns, lba, cmd.data, IoFlags::NONE, ctx)
        },
        BioOp::WriteZeroes => {
            let blocks = (cmd.len >> ns.block_shift()) as u32;
            q.write_zeroes(ns, lba, blocks, IoFlags::NONE, ctx)
        }
        // The maintenance commands of `BlockFile` (module `blockfile::maint`).
        BioOp::Flush => q.flush(ns, ctx),
        // SAFETY: the segment is the range list, the request's memory, owned through `ctx`
        // (see above).
        BioOp::Deallocate => unsafe { q.deallocate_list_held(ns, cmd.data, ctx) },
    };
    match r {
        Ok(()) => Ok(()),
        Err(rej) if matches!(rej.error, Error::PoolExhausted { .. }) => Err(rej.ctx),
        Err(rej) => {
            failed.push((rej.ctx, driver_status(&rej.error)));
            Ok(())
        }
    }
}

/// How often poller 0 (or a run-to-completion poll) gives the NVMe/TCP controllers their
/// admin housekeeping (the Keep Alive is sent every half KATO; this only checks the clock).
pub(crate) const ADMIN_TICK: Duration = Duration::from_millis(100);

/// Submit a bio to an NVMe/TCP queue. `Err((ctx, None))`: the queue's request table is full,
/// retry after a poll; `Err((ctx, Some(status)))`: refused, complete it with `status`.
#[inline(never)]
fn tcp_submit(
    q: &mut TcpQueue<TcpCtx>,
    ns: &Namespace,
    cmd: &DevCmd,
    ctx: BioCtx,
) -> Result<(), (BioCtx, Option<DeviceStatus>)> {
    let data = cmd.data;
    let lba = cmd.lba;
    let nsid = ns.nsid().0;
    let range = |blocks: u64| {
        lba.checked_add(blocks)
            .is_some_and(|end| end <= ns.io_blocks())
    };
    let bad = |sc| Some(DeviceStatus::new(0, sc));
    let bs = ns.block_size() as usize;
    let (sqe, len, out) = match cmd.op {
        op @ (BioOp::Read | BioOp::Write) => {
            let blocks = (data.len / bs) as u64;
            if data.len == 0 || data.len % bs != 0 || blocks > 65536 {
                return Err((ctx, bad(generic::INVALID_FIELD)));
            }
            if !range(blocks) {
                return Err((ctx, bad(generic::LBA_OUT_OF_RANGE)));
            }
            let (opc, out) = match op {
                BioOp::Read => (io::READ, false),
                _ => (io::WRITE, true),
            };
            (Sqe::rw(opc, nsid, lba, blocks as u32, false), data.len, out)
        }
        BioOp::WriteZeroes => {
            let blocks = cmd.len >> ns.block_shift();
            if blocks == 0 || blocks > 65536 {
                return Err((ctx, bad(generic::INVALID_FIELD)));
            }
            if !range(blocks) {
                return Err((ctx, bad(generic::LBA_OUT_OF_RANGE)));
            }
            (Sqe::write_zeroes(nsid, lba, blocks as u32, false), 0, false)
        }
        BioOp::Flush => (Sqe::flush(nsid), 0, false),
        BioOp::Deallocate => {
            let n = data.len / DSM_RANGE_LEN;
            if data.len % DSM_RANGE_LEN != 0 || n == 0 || n > 256 {
                return Err((ctx, bad(generic::INVALID_FIELD)));
            }
            for i in 0..n {
                // SAFETY: the bio's segment is the `n * 16`-byte list, owned by the request while
                // the bio is ours, and nothing writes it meanwhile; range `i` lies inside it.
                let r = unsafe {
                    data.ptr
                        .as_ptr()
                        .add(i * DSM_RANGE_LEN)
                        .cast::<[u8; DSM_RANGE_LEN]>()
                        .read_unaligned()
                };
                let nlb = u32::from_le_bytes([r[4], r[5], r[6], r[7]]) as u64;
                let slba =
                    u64::from_le_bytes([r[8], r[9], r[10], r[11], r[12], r[13], r[14], r[15]]);
                if slba.checked_add(nlb).is_none_or(|end| end > ns.io_blocks()) {
                    return Err((ctx, bad(generic::LBA_OUT_OF_RANGE)));
                }
            }
            (Sqe::dsm_deallocate(nsid, n as u32, 0), data.len, true)
        }
    };
    let ctx = TcpCtx { ctx, lba };
    // SAFETY: the memory is the bio's segment (or the range list) in the controller's host
    // memory, owned by the request until this context, which holds the bio's reference, comes
    // back from the queue's poll (as for PCIe, see `submit_cmd`); a context is handed back
    // only once the host queue has let go of the memory (completed, or its connection ended).
    match unsafe { q.submit_sqe(sqe, data.ptr, len, out, ctx) } {
        Ok(()) => Ok(()),
        Err(rej) if rej.error.is_queue_full() => Err((rej.tag.ctx, None)),
        Err(rej) => {
            log::debug!("nvmf host: a bio was refused: {}", rej.error);
            // Only a lost connection is the pathing error (ControllerLost); anything else the
            // host refuses is this command's fault.
            let st = match &rej.error {
                TransportError::Tcp(HostError::Lost(_)) => HOST_PATH_ERROR,
                _ => DeviceStatus::new(0, generic::INVALID_FIELD),
            };
            Err((rej.tag.ctx, Some(st)))
        }
    }
}

/// The dio-core status of an NVMe/TCP completion: the controller's status, or the host
/// pathing error for a connection that ended (or a command that timed out and ended it).
#[inline]
fn tcp_status(lba: u64, r: Result<(), TransportIoError>) -> Result<(), DeviceStatus> {
    match r {
        Ok(()) => Ok(()),
        Err(e) => Err(match e.status() {
            Some(st) => DeviceStatus {
                sct: st.sct.bits(),
                sc: st.sc,
                lba: Some(lba),
            },
            None => HOST_PATH_ERROR,
        }),
    }
}

/// Poll one queue, completing each bio with `done`; returns how many. A TCP queue whose
/// connection ends here is logged once.
#[inline(always)]
fn poll_queue(q: &mut IoQueue, mut done: impl FnMut(BioCtx, Result<(), DeviceStatus>)) -> usize {
    match q {
        IoQueue::Pcie(q) => {
            let n = q
                .poll(usize::MAX, |ctx, r| done(ctx, status_of(r)))
                .unwrap_or(0);
            if q.is_stale() {
                renew(q);
            }
            n
        }
        IoQueue::Tcp(q) => poll_tcp(q, &mut done),
    }
}

#[inline(never)]
fn poll_tcp(
    q: &mut TcpQueue<TcpCtx>,
    done: &mut impl FnMut(BioCtx, Result<(), DeviceStatus>),
) -> usize {
    let was_alive = q.lost().is_none();
    let (mut n, mut failed) = (0, 0);
    let r = q.poll(0, |TcpCtx { ctx, lba }, r| {
        let st = tcp_status(lba, r);
        n += 1;
        failed += usize::from(st.is_err());
        done(ctx, st);
    });
    if let Err(e) = r {
        if was_alive {
            log::error!(
                "NVMe/TCP I/O queue {} lost: {e}; {failed} outstanding requests failed (controller lost)",
                q.qid().0
            );
        }
    }
    n
}

/// Admin housekeeping of the NVMe/TCP controllers (the Keep Alive), at most every
/// [`ADMIN_TICK`]; a controller found lost is logged once.
fn process_admin(admin: &[EmbedCtrl], next: &mut Instant) {
    let now = Instant::now();
    if now < *next {
        return;
    }
    *next = now + ADMIN_TICK;
    for c in admin {
        let was_alive = c.tcp().is_some_and(|t| t.lost().is_none());
        if let Err(e) = c.process_admin() {
            if was_alive {
                log::error!("NVMe/TCP controller lost: {e}; its requests fail");
            }
        }
    }
}

/// Whether a queue still has commands to wait for (a dead one completes nothing more).
fn queue_busy(q: &IoQueue) -> bool {
    match q {
        IoQueue::Pcie(q) => q.outstanding() > 0,
        IoQueue::Tcp(q) => q.outstanding() > 0,
    }
}

fn queue_live_and_busy(q: &IoQueue) -> bool {
    match q {
        IoQueue::Pcie(q) => q.outstanding() > 0 && q.dead_reason().is_none(),
        IoQueue::Tcp(q) => q.outstanding() > 0,
    }
}

/// [`arm_queue`] on every queue before a poller sleeps with requests outstanding. An NVMe/TCP
/// queue has no interrupt: one with requests outstanding keeps the poller polling.
fn arm_transport(qpairs: &mut [IoQueue], wait: &mut PollerWait) -> bool {
    qpairs.iter_mut().all(|q| match q {
        IoQueue::Pcie(q) => arm_queue(q, wait),
        IoQueue::Tcp(q) => q.outstanding() == 0,
    })
}

// ---------------------------------------------------------------------------------------------
// Waiting for one's own bios (pooled mode): spin, then park.

/// The waiter of one client thread (see the module docs): its bios carry a `&'static` to it;
/// the poller completes the bio into dio-core, then calls [`wake`](Waiter::wake). The thread
/// waits in dio-core's `Wait::PollInPlace` loop through [`SpinThenPark`]: dio-core re-checks
/// the request's reference count (under its lock) between calls, so a wake-up that was for
/// another request only costs one more check.
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

/// A waiter and the parker it unparks, owned by one thread at a time.
struct WaitSlot {
    parker: Parker,
    waiter: &'static Waiter,
}

/// Waiters of threads that exited, for the next threads (a waiter is never freed: a bio
/// completed late may still hold a reference to it).
static SPARE_WAITERS: Mutex<Vec<WaitSlot>> = Mutex::new(Vec::new());

/// The calling thread's [`WaitSlot`], given back to [`SPARE_WAITERS`] when the thread exits.
struct ThreadWaiter(Option<WaitSlot>);

impl ThreadWaiter {
    fn take() -> ThreadWaiter {
        let spare = SPARE_WAITERS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop();
        ThreadWaiter(Some(spare.unwrap_or_else(|| {
            let parker = Parker::new();
            let waiter = Box::leak(Box::new(CachePadded::new(Waiter {
                woken: AtomicBool::new(false),
                sleeping: AtomicBool::new(false),
                unparker: parker.unparker().clone(),
            })));
            WaitSlot { parker, waiter }
        })))
    }

    fn slot(&self) -> &WaitSlot {
        self.0.as_ref().expect("taken until the thread exits")
    }
}

impl Drop for ThreadWaiter {
    fn drop(&mut self) {
        if let Some(slot) = self.0.take() {
            // A late completion may still set `woken`: the next owner then returns from one
            // wait early, and dio-core re-checks its request.
            slot.waiter.woken.store(false, Ordering::Relaxed);
            slot.waiter.sleeping.store(false, Ordering::Relaxed);
            SPARE_WAITERS
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(slot);
        }
    }
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
        WAIT_SLOT.with(|tw| {
            let slot = tw.slot();
            let w = slot.waiter;
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
            // Dekker with `Waiter::wake`: announce the park, then re-check. The swap consumes
            // the wake-up it reads; one that comes later stays set for the next call.
            w.sleeping.store(true, Ordering::SeqCst);
            while !w.woken.swap(false, Ordering::SeqCst) {
                slot.parker.park();
            }
            w.sleeping.store(false, Ordering::Relaxed);
        });
    }
}

// ---------------------------------------------------------------------------------------------
// Pooled pollers.

/// What a thread is to the engines: a poller of one, and the home poller of its requests.
struct Role {
    /// `(engine id, poller index)` when this thread is a poller.
    on_poller: Cell<Option<(u64, usize)>>,
    /// A per-thread number choosing the poller a client thread hands its bios to.
    home: Cell<usize>,
}

thread_local! {
    static ROLE: Role = const {
        Role {
            on_poller: Cell::new(None),
            home: Cell::new(usize::MAX),
        }
    };
    /// Bios submitted by this poller thread itself (completion callbacks, tasks).
    static OWN_QUEUE: RefCell<VecDeque<Work>> = const { RefCell::new(VecDeque::new()) };
    /// The waiter of this thread (see [`SpinThenPark`]).
    static WAIT_SLOT: ThreadWaiter = ThreadWaiter::take();
}

static NEXT_ENGINE: AtomicU64 = AtomicU64::new(1);
static NEXT_HOME: AtomicUsize = AtomicUsize::new(0);
static NEXT_TASK: AtomicU64 = AtomicU64::new(1);

/// Stripes of the `active` counters of an engine (at least one per poller): client threads
/// beyond this many share stripes.
pub(crate) const STRIPES: usize = 16;

/// Counters of one poller.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PollerStats {
    /// Bios submitted to a queue pair.
    pub submitted: u64,
    /// Bios completed.
    pub completed: u64,
    /// Times the poller parked.
    pub parks: u64,
    /// Times the poller slept with requests on the device (interrupt mode): each sleep ends
    /// with an interrupt, a submission, a task's descriptor or the sleep limit.
    pub io_sleeps: u64,
    /// Of those, the sleeps that ended at their time limit (10 ms while commands are on the
    /// device, or a task's timeout) with nothing ready: no interrupt came.
    pub io_sleep_timeouts: u64,
    /// Times the poller yielded the CPU (`sched_yield`) after an empty round with requests on
    /// the device or a busy task (see [`Builder::poller_io_yield`](crate::Builder::poller_io_yield)).
    pub io_yields: u64,
    /// Times a submitter found the ring full and backed off.
    pub ring_full: u64,
    /// Times a queue pair had no free request for a handed-over bio: the bio was kept and
    /// submitted again after the next poll.
    pub stalls: u64,
    /// Tasks dropped because their `poll` panicked.
    pub task_panics: u64,
}

/// Work a poller runs on its own thread, once per round after its I/O (see the module docs):
/// for instance the connections of an NVMe/TCP target (SPDK's poll groups), which poll their
/// sockets and submit asynchronous [`BlockFile`](crate::BlockFile) requests from the poller.
/// Such requests go to this poller's own queue and complete on this thread; what would block
/// is refused with [`EmbedError::WouldBlockOnPoller`](crate::EmbedError::WouldBlockOnPoller).
/// Added with [`Dioxide::add_poller_task`](crate::Dioxide::add_poller_task); dropped on the
/// poller thread when removed or at shutdown.
pub trait PollerTask: Send + 'static {
    /// Do what is ready, without blocking; returns how much work was done (0: none). A poller
    /// that did no work in a round counts towards parking.
    fn poll(&mut self) -> usize;
    /// True while the task must keep being polled even when it does no work (it waits for
    /// events from outside it cannot name in [`prepare_wait`](Self::prepare_wait)): the
    /// poller does not sleep meanwhile.
    fn is_busy(&self) -> bool {
        false
    }
    /// Called when the poller is about to sleep (nothing queued, no task busy, and nothing in
    /// flight unless in interrupt mode, see [`InterruptMode`]): add the descriptors whose readiness means this task has work, and a timeout for
    /// its timers, to `wait`; return false if work arrived meanwhile (the poller then polls
    /// again instead of sleeping). With descriptors or a timeout from its tasks the poller
    /// sleeps in `poll(2)` on them and on its own eventfd (rung by submitters and task
    /// changes) instead of parking, so a task that waits on sockets costs no CPU while idle.
    /// Default: nothing to wait on. A task that posts work to itself from other threads must
    /// make one of its descriptors readable when it does (an eventfd), after this call.
    fn prepare_wait(&mut self, wait: &mut PollerWait) -> bool {
        let _ = wait;
        true
    }
    /// The sleep that followed a [`prepare_wait`](Self::prepare_wait) returning true ended;
    /// [`PollerWait::ready`] tells which descriptors woke it (none if another task's work
    /// cancelled the sleep), so the task can skip looking at the others.
    fn end_wait(&mut self, wait: &PollerWait) {
        let _ = wait;
    }
}

/// The handle of a task added to a poller, to remove it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PollerTaskId {
    poller: usize,
    id: u64,
}

impl PollerTaskId {
    /// The index of the poller that runs the task.
    pub fn poller(&self) -> usize {
        self.poller
    }
}

/// A change to a poller's tasks.
enum TaskOp {
    Add(u64, Box<dyn PollerTask>),
    Remove(u64),
}

/// Counters of a poller, written by the poller only (single writer: plain load and store).
#[derive(Default)]
struct Counters {
    submitted: AtomicU64,
    completed: AtomicU64,
    parks: AtomicU64,
    io_sleeps: AtomicU64,
    io_sleep_timeouts: AtomicU64,
    io_yields: AtomicU64,
    task_panics: AtomicU64,
    stalls: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.store(c.load(Ordering::Relaxed) + n, Ordering::Relaxed);
}

/// What a poller shares with the other threads. Each group its own cache line(s): what the
/// submitters read on every push (`sleeping`) is written by the poller only when it parks,
/// away from the counters it writes every round.
pub(crate) struct PollerShared {
    /// The hand-over ring (head and tail on their own lines, inside crossbeam).
    ring: ArrayQueue<Work>,
    /// The poller is parked or about to park (see the wake-up protocol).
    sleeping: CachePadded<AtomicBool>,
    unparker: Unparker,
    /// The poller sleeps in `poll(2)` on `wake_fd` (set before `sleeping`, see [`wake`]).
    ///
    /// [`wake`]: PollerShared::wake
    in_poll: AtomicBool,
    /// Rung instead of the unparker while the poller sleeps in `poll(2)` for its tasks.
    wake_fd: Option<WakeFd>,
    /// Times a submitter found the ring full (written by submitters, rarely).
    ring_full: CachePadded<AtomicU64>,
    counters: CachePadded<Counters>,
    /// Task changes for the poller; `inbox_pending` says there are some.
    inbox: Mutex<Vec<TaskOp>>,
    inbox_pending: AtomicBool,
}

impl PollerShared {
    /// Unpark the poller if it is parked or about to park (after a SeqCst publication).
    fn kick(&self) {
        if self.sleeping.load(Ordering::SeqCst) {
            self.wake();
        }
    }

    /// Unpark the poller, or ring its eventfd if it sleeps in `poll(2)` for its tasks. The
    /// poller stores `in_poll` before its SeqCst store of `sleeping`, so a waker that read that
    /// `sleeping` also reads `in_poll`.
    fn wake(&self) {
        self.unparker.unpark();
        if self.in_poll.load(Ordering::Relaxed) {
            if let Some(w) = &self.wake_fd {
                w.ring();
            }
        }
    }
}

/// Options of the pooled pollers.
#[derive(Clone, Debug)]
pub(crate) struct PollerConfig {
    pub cores: Vec<Option<usize>>,
    pub ring: usize,
    pub spin: u32,
    /// Minimum time an idle poller keeps polling before it parks.
    pub idle: Duration,
    /// Empty polls with requests on the device after which each further one yields the CPU.
    pub io_yield: u32,
    /// How long a client thread spins for its completion before it parks.
    pub wait_spin: Duration,
    pub queue: QueueOptions,
    /// Whether a poller with requests on the device sleeps (the queues are then created in
    /// interrupt mode).
    pub interrupts: InterruptMode,
}

/// The running pollers of an engine.
pub(crate) struct Pollers {
    id: u64,
    shared: Box<[CachePadded<PollerShared>]>,
    /// Requests in their submission phase, striped by thread (see the shutdown protocol).
    active: Box<[CachePadded<AtomicUsize>]>,
    stop: CachePadded<AtomicBool>,
    wait_spin: Duration,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// Why a poller could not start.
#[derive(Debug)]
pub(crate) enum StartError {
    /// Poller index, core, error.
    Pin(usize, usize, std::io::Error),
    Spawn(std::io::Error),
    Queue(EmbedError),
}

/// Why a task could not be added.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum TaskError {
    /// No poller with that index.
    NoSuchPoller,
    /// The pollers are shutting down.
    Stopped,
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

/// A poller's tasks, on its thread.
struct Tasks {
    list: Vec<(u64, Box<dyn PollerTask>)>,
    /// What the tasks wait for while the poller sleeps (kept for its capacity).
    wait: PollerWait,
}

impl Tasks {
    /// Apply the changes waiting in the inbox.
    fn take_inbox(&mut self, s: &PollerShared) {
        // A plain load each round (the line stays shared with the submitters that read the
        // ring's fields next to it); then swap before taking the changes: a change pushed
        // after the swap leaves the flag set for the next round.
        if !s.inbox_pending.load(Ordering::Relaxed)
            || !s.inbox_pending.swap(false, Ordering::AcqRel)
        {
            return;
        }
        let ops: Vec<TaskOp> =
            std::mem::take(&mut *s.inbox.lock().unwrap_or_else(|p| p.into_inner()));
        for op in ops {
            match op {
                TaskOp::Add(id, t) => self.list.push((id, t)),
                TaskOp::Remove(id) => {
                    if let Some(i) = self.list.iter().position(|(x, _)| *x == id) {
                        drop_task(self.list.remove(i).1);
                    }
                }
            }
        }
    }

    /// Poll every task once: (work done, some task is busy).
    fn poll(&mut self, s: &PollerShared) -> (usize, bool) {
        let (mut work, mut busy) = (0usize, false);
        let mut i = 0;
        while i < self.list.len() {
            let t = &mut self.list[i].1;
            match catch_unwind(AssertUnwindSafe(|| (t.poll(), t.is_busy()))) {
                Ok((n, b)) => {
                    work = work.saturating_add(n);
                    busy |= b;
                    i += 1;
                }
                Err(_) => {
                    // Dropped before it is counted: whoever sees the count sees the drop.
                    drop_task(self.list.remove(i).1);
                    bump(&s.counters.task_panics, 1);
                }
            }
        }
        (work, busy)
    }

    /// Sleep in `poll(2)` on the tasks' descriptors and the poller's eventfd (called with
    /// `in_poll` and `sleeping` raised and the ring found empty), and on what `io` adds (the
    /// queue pairs' completion eventfds, interrupt mode; it returns false if a queue pair has
    /// work already). False: no task and no `io`, the caller parks instead. True: slept, or a
    /// task or queue pair had work (no sleep).
    fn sleep(
        &mut self,
        s: &PollerShared,
        io: Option<&mut dyn FnMut(&mut PollerWait) -> bool>,
    ) -> bool {
        if self.list.is_empty() && io.is_none() {
            return false;
        }
        self.wait.clear();
        let mut prepared = 0;
        let mut ready = false;
        while prepared < self.list.len() {
            let (t, w) = (&mut self.list[prepared].1, &mut self.wait);
            match catch_unwind(AssertUnwindSafe(|| t.prepare_wait(w))) {
                Ok(true) => prepared += 1,
                Ok(false) => {
                    ready = true;
                    break;
                }
                Err(_) => {
                    drop_task(self.list.remove(prepared).1);
                    bump(&s.counters.task_panics, 1);
                    ready = true;
                    break;
                }
            }
        }
        if !ready {
            if let Some(arm) = io {
                ready = !arm(&mut self.wait);
            }
        }
        if !ready {
            match &s.wake_fd {
                Some(w) => self.wait.fd(w.raw_fd(), false),
                None => self.wait.timeout(Duration::from_millis(1)),
            }
            self.wait.sleep();
            if let Some(w) = s.wake_fd.as_ref().filter(|w| self.wait.ready(w.raw_fd())) {
                w.drain();
            }
        }
        let mut i = 0;
        while i < prepared.min(self.list.len()) {
            let (t, w) = (&mut self.list[i].1, &self.wait);
            if catch_unwind(AssertUnwindSafe(|| t.end_wait(w))).is_err() {
                drop_task(self.list.remove(i).1);
                bump(&s.counters.task_panics, 1);
                prepared -= 1;
                continue;
            }
            i += 1;
        }
        true
    }

    /// Drop every task, and those still in the inbox (shutdown).
    fn clear(&mut self, s: &PollerShared) {
        for (_, t) in self.list.drain(..) {
            drop_task(t);
        }
        let ops = std::mem::take(&mut *s.inbox.lock().unwrap_or_else(|p| p.into_inner()));
        for op in ops {
            if let TaskOp::Add(_, t) = op {
                drop_task(t);
            }
        }
    }
}

/// Drop a task; a panic in its `Drop` must not kill the poller either.
fn drop_task(t: Box<dyn PollerTask>) {
    let _ = catch_unwind(AssertUnwindSafe(move || drop(t)));
}

impl Pollers {
    /// Start one poller per entry of `cfg.cores`, each with a queue pair on every controller.
    pub(crate) fn start(
        ctrls: &[EmbedCtrl],
        targets: &Targets,
        cfg: &PollerConfig,
    ) -> Result<Arc<Pollers>, StartError> {
        let id = NEXT_ENGINE.fetch_add(1, Ordering::Relaxed);
        let mut shared = Vec::new();
        let mut parts = Vec::new();
        for i in 0..cfg.cores.len() {
            let parker = Parker::new();
            let mut qpairs = Vec::new();
            for c in ctrls {
                qpairs.push(create_queue(c, &cfg.queue).map_err(StartError::Queue)?);
            }
            shared.push(CachePadded::new(PollerShared {
                ring: ArrayQueue::new(cfg.ring.max(1)),
                sleeping: CachePadded::new(AtomicBool::new(false)),
                unparker: parker.unparker().clone(),
                in_poll: AtomicBool::new(false),
                // Without an eventfd, tasks that wait on descriptors make the poller nap.
                wake_fd: WakeFd::new()
                    .inspect_err(|e| log::warn!("poller {i}: no eventfd ({e}); idle tasks nap"))
                    .ok(),
                ring_full: CachePadded::new(AtomicU64::new(0)),
                counters: CachePadded::new(Counters::default()),
                inbox: Mutex::new(Vec::new()),
                inbox_pending: AtomicBool::new(false),
            }));
            parts.push((parker, qpairs));
        }
        let stripes = STRIPES.max(shared.len());
        let pollers = Arc::new(Pollers {
            id,
            shared: shared.into_boxed_slice(),
            active: (0..stripes)
                .map(|_| CachePadded::new(AtomicUsize::new(0)))
                .collect(),
            stop: CachePadded::new(AtomicBool::new(false)),
            wait_spin: cfg.wait_spin,
            threads: Mutex::new(Vec::new()),
        });
        let (tx, rx) = std::sync::mpsc::channel();
        for (i, (parker, qpairs)) in parts.into_iter().enumerate() {
            let core = cfg.cores[i];
            // Poller 0 drives the Keep Alive of the NVMe/TCP controllers; after `stop`, every
            // poller does until it exits (poller 0 may exit while another still waits for
            // commands on the target).
            let admin: Vec<EmbedCtrl> = ctrls
                .iter()
                .filter(|c| c.tcp().is_some())
                .cloned()
                .collect();
            let p = Arc::clone(&pollers);
            let (tx, targets, spin) = (tx.clone(), targets.clone(), (cfg.spin, cfg.idle));
            let io_yield = cfg.io_yield;
            let mode = cfg.interrupts;
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
                    p.run(
                        i,
                        qpairs,
                        targets,
                        admin,
                        parker,
                        (spin.0, spin.1, io_yield, mode),
                    );
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
        ROLE.with(|r| r.on_poller.get().is_some_and(|(id, _)| id == self.id))
    }

    /// Counters of poller `i`.
    pub(crate) fn stats(&self, i: usize) -> PollerStats {
        let s = &self.shared[i];
        PollerStats {
            submitted: s.counters.submitted.load(Ordering::Relaxed),
            completed: s.counters.completed.load(Ordering::Relaxed),
            parks: s.counters.parks.load(Ordering::Relaxed),
            io_sleeps: s.counters.io_sleeps.load(Ordering::Relaxed),
            io_sleep_timeouts: s.counters.io_sleep_timeouts.load(Ordering::Relaxed),
            io_yields: s.counters.io_yields.load(Ordering::Relaxed),
            ring_full: s.ring_full.load(Ordering::Relaxed),
            stalls: s.counters.stalls.load(Ordering::Relaxed),
            task_panics: s.counters.task_panics.load(Ordering::Relaxed),
        }
    }

    /// The number of the calling thread for this engine: its poller index on a poller thread
    /// of this engine, else the thread's home number (drawn round robin at its first request).
    /// It picks the thread's home poller and its `active` stripe.
    fn thread_home(&self) -> usize {
        ROLE.with(|r| match r.on_poller.get() {
            Some((id, i)) if id == self.id => i,
            _ => {
                let mut h = r.home.get();
                if h == usize::MAX {
                    h = NEXT_HOME.fetch_add(1, Ordering::Relaxed);
                    r.home.set(h);
                }
                h
            }
        })
    }

    /// The poller the calling thread's requests go to.
    fn home(&self) -> &PollerShared {
        &self.shared[self.thread_home() % self.shared.len()]
    }

    /// The `active` stripe of the calling thread.
    fn stripe(&self) -> &AtomicUsize {
        &self.active[self.thread_home() % self.active.len()]
    }

    /// A request starts: false once shutdown has begun (the request must be refused). Counts
    /// on the thread's stripe (see the shutdown protocol in the module docs).
    pub(crate) fn enter(&self) -> bool {
        self.stripe().fetch_add(1, Ordering::SeqCst);
        if self.stop.load(Ordering::SeqCst) {
            self.leave();
            return false;
        }
        true
    }

    /// A request's submission phase ended.
    pub(crate) fn leave(&self) {
        if self.stripe().fetch_sub(1, Ordering::SeqCst) == 1 && self.stop.load(Ordering::SeqCst) {
            self.wake_all();
        }
    }

    /// No request is in its submission phase (read after `stop`: see the shutdown protocol).
    fn quiescent(&self) -> bool {
        self.active.iter().all(|a| a.load(Ordering::SeqCst) == 0)
    }

    fn wake_all(&self) {
        for s in self.shared.iter() {
            s.wake();
        }
    }

    /// Stop accepting requests, let the pollers finish everything in flight, drop their tasks,
    /// join them.
    pub(crate) fn shutdown(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.wake_all();
        let threads: Vec<_> = self.lock_threads().drain(..).collect();
        for t in threads {
            // A task or a callback that drops the last handle of the engine runs this on a
            // poller thread: that thread cannot join itself (it ends after this round).
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }

    /// Run `task` on poller `poller` from its next round on.
    pub(crate) fn add_task(
        &self,
        poller: usize,
        task: Box<dyn PollerTask>,
    ) -> Result<PollerTaskId, TaskError> {
        let s = self.shared.get(poller).ok_or(TaskError::NoSuchPoller)?;
        if self.stop.load(Ordering::SeqCst) {
            return Err(TaskError::Stopped);
        }
        let id = NEXT_TASK.fetch_add(1, Ordering::Relaxed);
        self.send_task_op(s, TaskOp::Add(id, task));
        Ok(PollerTaskId { poller, id })
    }

    /// Drop task `id` on its poller's thread, at the start of that poller's next round (a
    /// task already removed, or dropped at shutdown: nothing happens).
    pub(crate) fn remove_task(&self, id: PollerTaskId) {
        if let Some(s) = self.shared.get(id.poller) {
            self.send_task_op(s, TaskOp::Remove(id.id));
        }
    }

    fn send_task_op(&self, s: &PollerShared, op: TaskOp) {
        s.inbox.lock().unwrap_or_else(|p| p.into_inner()).push(op);
        s.inbox_pending.store(true, Ordering::SeqCst);
        s.kick();
    }

    /// Hand a bio to a poller (see the module docs).
    fn push(&self, target: u32, bio: Bio<Window>) {
        let role = ROLE.with(|r| r.on_poller.get());
        if let Some((id, _)) = role {
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
        let mut w = Work {
            target,
            bio,
            waiter: Some(WAIT_SLOT.with(|tw| tw.slot().waiter)),
        };
        let s = self.home();
        let backoff = Backoff::new();
        loop {
            // The SeqCst compare-exchange of the ring's tail publishes the bio (wake-up
            // protocol, first half).
            match s.ring.push(w) {
                Ok(()) => break,
                Err(back) => {
                    w = back;
                    s.ring_full.fetch_add(1, Ordering::Relaxed);
                    s.wake();
                    backoff.snooze();
                    if backoff.is_completed() {
                        std::thread::yield_now();
                    }
                }
            }
        }
        // Second half: a SeqCst load, no fence (see the module docs).
        s.kick();
    }

    fn run(
        &self,
        index: usize,
        mut qpairs: Vec<IoQueue>,
        targets: Targets,
        admin: Vec<EmbedCtrl>,
        parker: Parker,
        (spin, idle_time, io_yield, mode): (u32, Duration, u32, InterruptMode),
    ) {
        ROLE.with(|r| r.on_poller.set(Some((self.id, index))));
        let s = &*self.shared[index];
        let mut tasks = Tasks {
            list: Vec::new(),
            wait: PollerWait::default(),
        };
        let mut stalled: Option<Work> = None;
        let mut failed: Vec<(BioCtx, DeviceStatus)> = Vec::new();
        let mut idle = 0u32;
        let mut idle_since = Instant::now();
        let mut next_admin = Instant::now();
        loop {
            tasks.take_inbox(s);
            if !admin.is_empty() && (index == 0 || self.stop.load(Ordering::Relaxed)) {
                process_admin(&admin, &mut next_admin);
            }
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
                        bump(&s.counters.stalls, 1);
                        stalled = Some(w);
                        break;
                    }
                }
            }
            if progress > 0 {
                bump(&s.counters.submitted, progress);
            }
            // 2. Poll every queue pair; complete into dio-core here, on this thread.
            let mut done = 0u64;
            for (ctx, st) in failed.drain(..) {
                ctx.complete(Err(st));
                done += 1;
            }
            for q in qpairs.iter_mut() {
                done += poll_queue(q, |ctx, st| ctx.complete(st)) as u64;
            }
            if done > 0 {
                bump(&s.counters.completed, done);
            }
            // 3. The tasks.
            let (task_work, task_busy) = if tasks.list.is_empty() {
                (0, false)
            } else {
                tasks.poll(s)
            };
            if progress + done > 0 || task_work > 0 {
                idle = 0;
                continue;
            }
            idle = idle.saturating_add(1);
            if idle == 1 {
                idle_since = Instant::now();
            }
            let io_busy = stalled.is_some()
                || !OWN_QUEUE.with(|q| q.borrow().is_empty())
                || qpairs.iter().any(queue_busy);
            if io_busy
                && !task_busy
                && io_sleep_due(mode, idle, idle_since)
                && stalled.is_none()
                && OWN_QUEUE.with(|q| q.borrow().is_empty())
            {
                self.sleep_on_io(s, &mut tasks, &mut qpairs);
                idle = 0;
                continue;
            }
            if io_busy || task_busy {
                // Commands on the device or a busy task: keep polling, but let other threads
                // (an emulated device, the clients) run on a small machine.
                if idle > io_yield {
                    std::thread::yield_now();
                    bump(&s.counters.io_yields, 1);
                }
                if io_busy {
                    continue;
                }
            }
            // Shutdown: `stop`, then the `active` stripes, then the ring (in this
            // order: see the shutdown protocol in the module docs).
            if self.stop.load(Ordering::SeqCst) && self.quiescent() && s.ring.is_empty() {
                break;
            }
            if task_busy {
                continue;
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
            // 4. Nothing in flight, nothing queued: park until a submitter unparks us (the
            // wake-up protocol: announce, fence, re-check everything a submitter publishes).
            s.in_poll.store(!tasks.list.is_empty(), Ordering::Relaxed);
            s.sleeping.store(true, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            let stop = self.stop.load(Ordering::SeqCst);
            if stop {
                // Waiting for the last requests to leave: a short sleep, woken by `leave`.
                parker.park_timeout(Duration::from_millis(1));
            } else if s.ring.is_empty() && !s.inbox_pending.load(Ordering::SeqCst) {
                bump(&s.counters.parks, 1);
                if index == 0 && !admin.is_empty() {
                    // The Keep Alive must go out while idle too: sleep at most one admin tick,
                    // on the tasks' descriptors if there are tasks.
                    if tasks.list.is_empty() {
                        parker.park_timeout(ADMIN_TICK);
                    } else {
                        tasks.sleep(
                            s,
                            Some(&mut |w: &mut PollerWait| {
                                w.timeout(ADMIN_TICK);
                                true
                            }),
                        );
                    }
                } else if !tasks.sleep(s, None) {
                    parker.park();
                }
            }
            s.sleeping.store(false, Ordering::Relaxed);
            s.in_poll.store(false, Ordering::Relaxed);
            idle = 0;
        }
        tasks.clear(s);
        ROLE.with(|r| r.on_poller.set(None));
        // Dropping the queue pairs deletes them on the device.
    }
}

/// Interrupt mode: true if a poller whose last round found nothing, with requests on the
/// device, should sleep now (`idle` empty rounds since `idle_since`). Adaptive mode reads the
/// clock every 8 empty rounds only.
#[inline]
fn io_sleep_due(mode: InterruptMode, idle: u32, idle_since: Instant) -> bool {
    match mode {
        InterruptMode::Polled => false,
        InterruptMode::Interrupt => true,
        InterruptMode::Adaptive(after) => idle % 8 == 0 && idle_since.elapsed() >= after,
    }
}

impl Pollers {
    /// Interrupt mode: sleep until a queue pair's device posts a completion, a submitter or a
    /// task change rings the poller's eventfd, or a task's descriptor is ready. The wake-up
    /// protocol is the idle park's (announce with `in_poll` and `sleeping`, fence, re-check the
    /// ring and the inbox); the queue pairs are armed last (`arm_transport`), so a completion
    /// posted before the sleep cancels it and one posted after makes its eventfd readable.
    fn sleep_on_io(&self, s: &PollerShared, tasks: &mut Tasks, qpairs: &mut [IoQueue]) {
        s.in_poll.store(true, Ordering::Relaxed);
        s.sleeping.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if s.ring.is_empty() && !s.inbox_pending.load(Ordering::SeqCst) {
            bump(&s.counters.io_sleeps, 1);
            tasks.sleep(s, Some(&mut |w: &mut PollerWait| arm_transport(qpairs, w)));
            if tasks.wait.timed_out() {
                bump(&s.counters.io_sleep_timeouts, 1);
            }
        }
        s.sleeping.store(false, Ordering::Relaxed);
        s.in_poll.store(false, Ordering::Relaxed);
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
    qpairs: Vec<IoQueue>,
    /// The NVMe/TCP controllers, for their Keep Alive, and when it is next checked.
    admin: Vec<EmbedCtrl>,
    next_admin: Instant,
    targets: Targets,
    failed: Vec<(BioCtx, DeviceStatus)>,
    /// What one poll reaped, completed after the state is released (kept for its capacity:
    /// a poll allocates nothing once it has grown to the queue depth).
    reaped: Vec<(BioCtx, Result<(), DeviceStatus>)>,
}

thread_local! {
    /// The run-to-completion engines of this thread, by slot (a closed engine leaves `None`).
    static LOCAL: RefCell<Vec<Option<LocalState>>> = const { RefCell::new(Vec::new()) };
    /// A number of this thread, unique for the process (0: not drawn yet).
    static THREAD_NO: Cell<u64> = const { Cell::new(0) };
}

static NEXT_THREAD_NO: AtomicU64 = AtomicU64::new(1);

/// The calling thread's number (cheaper than `std::thread::current().id()`).
fn thread_no() -> u64 {
    THREAD_NO.with(|c| {
        if c.get() == 0 {
            c.set(NEXT_THREAD_NO.fetch_add(1, Ordering::Relaxed));
        }
        c.get()
    })
}

/// A run-to-completion engine: its queue pairs live in slot `slot` of a thread-local table of
/// the thread that created it, which submits and polls them itself.
pub(crate) struct Local {
    id: u64,
    slot: usize,
    owner: u64,
}

impl Local {
    /// Create queue pairs on every controller, owned by the calling thread.
    pub(crate) fn new(
        ctrls: &[EmbedCtrl],
        targets: &Targets,
        queue: &QueueOptions,
    ) -> Result<Local, EmbedError> {
        let id = NEXT_ENGINE.fetch_add(1, Ordering::Relaxed);
        let mut qpairs = Vec::new();
        for c in ctrls {
            qpairs.push(create_queue(c, queue)?);
        }
        let st = LocalState {
            id,
            qpairs,
            admin: ctrls
                .iter()
                .filter(|c| c.tcp().is_some())
                .cloned()
                .collect(),
            next_admin: Instant::now(),
            targets: targets.clone(),
            failed: Vec::new(),
            reaped: Vec::new(),
        };
        let slot = LOCAL.with(|l| {
            let mut l = l.borrow_mut();
            match l.iter().position(Option::is_none) {
                Some(i) => {
                    l[i] = Some(st);
                    i
                }
                None => {
                    l.push(Some(st));
                    l.len() - 1
                }
            }
        });
        Ok(Local {
            id,
            slot,
            owner: thread_no(),
        })
    }

    /// True on the thread that owns the queue pairs.
    pub(crate) fn on_owner(&self) -> bool {
        thread_no() == self.owner
    }

    /// The engine's state, on its owner thread, unless it is already borrowed there.
    #[inline(always)]
    fn with<R>(&self, f: impl FnOnce(&mut LocalState) -> R) -> Option<R> {
        LOCAL.with(|l| {
            let mut l = l.try_borrow_mut().ok()?;
            let st = l.get_mut(self.slot)?.as_mut()?;
            (st.id == self.id).then(|| f(st))
        })
    }

    /// Poll every queue pair once, then complete what finished (outside the borrow, so the
    /// completions may submit again, and even poll: a nested poll reaps into a fresh list).
    ///
    /// A poll that reaped one completion (every poll at queue depth 1) pops it while it holds
    /// the state and leaves the list there: it takes the state once. A poll that reaped more
    /// takes the list out of the state, drains it and gives it back.
    pub(crate) fn poll_once(&self) -> usize {
        let Some(reaped) = self.with(|st| {
            let done = &mut st.reaped;
            if !st.failed.is_empty() {
                for (ctx, s) in st.failed.drain(..) {
                    done.push((ctx, Err(s)));
                }
            }
            for q in st.qpairs.iter_mut() {
                poll_queue(q, |ctx, st| done.push((ctx, st)));
            }
            if !st.admin.is_empty() {
                process_admin(&st.admin, &mut st.next_admin);
            }
            match done.len() {
                0 => Reaped::None,
                1 => done.pop().map_or(Reaped::None, Reaped::One),
                _ => Reaped::Many(std::mem::take(done)),
            }
        }) else {
            return 0;
        };
        match reaped {
            Reaped::None => 0,
            Reaped::One((ctx, s)) => {
                ctx.complete_local(s);
                1
            }
            Reaped::Many(mut done) => {
                let n = done.len();
                for (ctx, s) in done.drain(..) {
                    ctx.complete_local(s);
                }
                // Give the (empty) list back for the next poll, unless a nested poll already
                // did.
                self.with(|st| {
                    if st.reaped.capacity() < done.capacity() {
                        st.reaped = done;
                    }
                });
                n
            }
        }
    }

    /// True while a request is on a live queue pair or waits in the failed list: shutdown polls
    /// until this is false, so every accepted request completes (a dead queue completes nothing
    /// more and does not hold shutdown up).
    pub(crate) fn in_flight(&self) -> bool {
        self.with(|st| !st.failed.is_empty() || st.qpairs.iter().any(queue_live_and_busy))
            .unwrap_or(false)
    }

    /// Drop the queue pairs (on the owner thread; elsewhere they go with the thread).
    pub(crate) fn close(&self) {
        let st = LOCAL.with(|l| {
            let mut l = l.try_borrow_mut().ok()?;
            let slot = l.get_mut(self.slot)?;
            if slot.as_ref().is_some_and(|s| s.id == self.id) {
                slot.take()
            } else {
                None
            }
        });
        drop(st);
    }
}

/// What one poll of a [`Local`] engine reaped.
enum Reaped {
    None,
    One((BioCtx, Result<(), DeviceStatus>)),
    /// Two or more: the state's list, taken out while it is drained.
    Many(Vec<(BioCtx, Result<(), DeviceStatus>)>),
}

/// dio-core's view of a [`Local`] engine: the sink and the in-place poller.
pub(crate) struct LocalSink {
    pub local: Arc<Local>,
    pub target: u32,
}

impl BioSink<Window> for LocalSink {
    fn submit(&self, bio: Bio<Window>) -> Result<(), Rejected<Window>> {
        // Split first: only the completion handle moves into the look-up's closure (the context
        // is built there: one instruction per I/O less than moving it in, QD1 and QD32), what
        // the device needs is borrowed, and a refused context is rejoined with its command
        // afterwards.
        let dev = DevCmd::of(&bio);
        let (cmd, done) = bio.split();
        // Only the owner thread's table holds this engine's id: elsewhere (or while the state
        // is borrowed) the bio is refused.
        let (local, target, cmd_ref) = (&*self.local, self.target, &dev);
        let r = LOCAL.with(move |l| {
            let ctx = BioCtx { done, waiter: None };
            let mut l = match l.try_borrow_mut() {
                Ok(l) => l,
                Err(_) => return Err((ctx, DioError::Fault)),
            };
            match l.get_mut(local.slot).and_then(Option::as_mut) {
                Some(st) if st.id == local.id => {
                    let LocalState {
                        qpairs,
                        targets,
                        failed,
                        ..
                    } = st;
                    submit_cmd(qpairs, targets, target, cmd_ref, ctx, failed)
                        .map_err(|ctx| (ctx, DioError::QueueFull))
                }
                _ => Err((ctx, DioError::Fault)),
            }
        });
        r.map_err(|(ctx, why)| refused(ctx.done.rejoin(cmd), why))
    }
}

/// A bio the engine refused: its pool is exhausted (`QueueFull`), or it was submitted off the
/// engine's owner thread or while its state was borrowed (`Fault`).
#[cold]
fn refused(bio: Bio<Window>, why: DioError) -> Rejected<Window> {
    Rejected { bio, why }
}

/// The in-place poller handed to dio-core (`Wait::PollInPlace`).
pub(crate) struct LocalPoller(pub Arc<Local>);

impl Poller for LocalPoller {
    fn poll_once(&self) {
        self.0.poll_once();
    }
}

#[cfg(all(test, feature = "emulated"))]
#[path = "poller_tests.rs"]
mod tests;
