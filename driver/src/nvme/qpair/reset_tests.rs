//! A controller reset (or shutdown) on another thread, caught between starting a new
//! generation and the device stopping (the emulated controller holds its CC.EN = 0, or CC.SHN,
//! write back): a queue pair of the old generation hands nothing back before the device has
//! stopped, and leaks what the device may still use when it never stops.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::*;
use crate::bus::emulated::{
    Action, CcWriteHold, EmulatedConfig, EmulatedController, Fault, NamespaceConfig, Trigger,
};
use crate::nvme::controller::{Controller, ControllerOptions, InitState};

/// A request context that records, when it is dropped (handed back and dropped by the test, or
/// dropped by the queue pair), how many times the device had stopped by then (controller
/// resets and shutdowns it processed).
struct Witness {
    emu: Arc<EmulatedController>,
    log: Arc<Mutex<Vec<u64>>>,
}

fn stops(emu: &EmulatedController) -> u64 {
    let s = emu.stats();
    s.controller_resets + s.shutdowns
}

impl Drop for Witness {
    fn drop(&mut self) {
        let stops = stops(&self.emu);
        self.log.lock().unwrap().push(stops);
    }
}

struct Setup {
    c: Controller,
    emu: Arc<EmulatedController>,
    q: QueuePair<Witness>,
    log: Arc<Mutex<Vec<u64>>>,
    /// Times the device had stopped (see [`stops`]) when the reads were submitted.
    resets: u64,
    _buf: crate::bus::dma::DmaBuffer,
}

/// Eight one-block reads the device holds (never completes), in flight on a queue pair.
/// CAP.TO 500 ms, a 200 ms admin timeout and a 300 ms shutdown timeout keep the driver's
/// bounded waits short.
fn eight_held_reads() -> Setup {
    let emu = EmulatedController::new(EmulatedConfig {
        namespaces: vec![NamespaceConfig::memory(512, 1 << 16)],
        cap_to: 1,
        ..EmulatedConfig::default()
    })
    .unwrap();
    let opts = ControllerOptions {
        admin_timeout: Duration::from_millis(200),
        shutdown_timeout: Duration::from_millis(300),
        ..ControllerOptions::default()
    };
    let c = Controller::with_options(emu.clone(), opts).unwrap();
    let ns = c.namespaces().remove(0);
    let mut q = c.create_qpair::<Witness>(QueueOptions::default()).unwrap();
    emu.inject(Fault::always(
        Trigger::LbaRange {
            nsid: 1,
            start: 0,
            end: 8,
            opcode: None,
        },
        Action::NeverComplete,
    ));
    let buf = c.alloc(8 * 512).unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    for t in 0..8u64 {
        let w = Witness {
            emu: emu.clone(),
            log: log.clone(),
        };
        let s = buf.slice(t as usize * 512, 512).unwrap();
        // SAFETY: `buf` lives in `Setup` as long as the queue pair, and is leaked with the
        // requests if they are (the tests forget it then); the data is not read.
        let r = unsafe { q.read_raw(&ns, Lba(t), s, w) };
        assert!(r.is_ok());
    }
    q.ring();
    assert_eq!(q.in_flight(), 8);
    let resets = stops(&emu);
    Setup {
        c,
        emu,
        q,
        log,
        resets,
        _buf: buf,
    }
}

/// Every one of the 8 contexts was dropped (handed back), each after the device had stopped
/// more often than the `before` times it had when the reads were submitted: never while the
/// device could still write their buffers.
fn all_handed_back_after(log: &Mutex<Vec<u64>>, before: u64) {
    let log = log.lock().unwrap().clone();
    assert_eq!(log.len(), 8, "{log:?}");
    assert!(
        log.iter().all(|&stops| stops > before),
        "handed back before the device stopped: {log:?} (stops before: {before})"
    );
}

/// Polls `q`, whose device never stopped, until it dies with `reason`: nothing may come back,
/// its 8 requests are leaked, and dropping it drops none of their contexts.
fn leaks_all(mut q: QueuePair<Witness>, log: &Mutex<Vec<u64>>, reason: DeadReason) {
    let mut handed = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    let err = loop {
        assert!(Instant::now() < deadline, "the queue pair never died");
        if let Err(e) = q.poll(usize::MAX, |w, _| {
            drop(w);
            handed += 1;
        }) {
            break e;
        }
    };
    assert!(
        matches!(err, Error::QueueDead { reason: why, .. } if why == reason),
        "{err:?}"
    );
    assert_eq!(
        handed, 0,
        "requests handed back from a device that never stopped"
    );
    assert_eq!(q.stats().leaked, 8, "{:?}", q.stats());
    drop(q);
    assert!(log.lock().unwrap().is_empty(), "contexts dropped");
}

type Spawned = std::thread::JoinHandle<crate::nvme::error::Result<()>>;

/// A reset on another thread, held in its CC.EN = 0 write (the generation already started).
fn held_reset(c: &Controller, emu: &EmulatedController) -> (CcWriteHold, Spawned) {
    let hold = emu.hold_next_disable();
    let c2 = c.clone();
    let resetter = std::thread::spawn(move || c2.reset());
    assert!(
        hold.wait_held(Duration::from_secs(20)),
        "the reset never cleared CC.EN"
    );
    (hold, resetter)
}

/// A shutdown on another thread, held in its CC.SHN write.
fn held_shutdown(c: &Controller, emu: &EmulatedController) -> (CcWriteHold, Spawned) {
    let hold = emu.hold_next_shutdown();
    let c2 = c.clone();
    let shutter = std::thread::spawn(move || c2.shutdown());
    assert!(
        hold.wait_held(Duration::from_secs(20)),
        "the shutdown never set CC.SHN"
    );
    (hold, shutter)
}

/// The reset has started a new generation and is stuck clearing CC.EN: the old queue pair
/// learns of it (renew, as a user would) and polls. It must hand nothing back while the device
/// may still write the buffers; once the device has stopped, every request comes back once,
/// failed by the reset.
#[test]
fn a_reset_hands_nothing_back_before_the_device_has_stopped() {
    let _w = test_watchdog::arm(test_watchdog::UNIT);
    let Setup {
        c,
        emu,
        mut q,
        log,
        resets,
        _buf,
    } = eight_held_reads();
    let (hold, resetter) = held_reset(&c, &emu);
    assert!(q.is_stale());
    assert!(!q.renew().unwrap(), "requests are outstanding");
    let mut early = 0;
    for _ in 0..2000 {
        let _ = q.poll(usize::MAX, |w, _| {
            drop(w);
            early += 1;
        });
    }
    assert_eq!(
        (early, log.lock().unwrap().len()),
        (0, 0),
        "requests were handed back while the device was still enabled (a context dropped \
         before the device processed the reset)"
    );
    assert_eq!(q.outstanding(), 8);
    assert!(q.stats().reset_waits > 0, "{:?}", q.stats());
    // Submissions are refused meanwhile.
    let ns = c.namespaces().remove(0);
    let w = Witness {
        emu: emu.clone(),
        log: log.clone(),
    };
    let extra = c.alloc(512).unwrap();
    // SAFETY: refused before anything reaches the device (the queue is dead); `extra` outlives
    // the call.
    let rej = unsafe { q.read_raw(&ns, Lba(100), extra.as_dma_slice(), w) }.unwrap_err();
    assert!(matches!(
        rej.error,
        Error::QueueDead {
            reason: DeadReason::ControllerReset,
            ..
        }
    ));
    drop(rej);
    log.lock().unwrap().clear();

    hold.release();
    resetter.join().unwrap().expect("the reset");
    collect_aborted(&mut q, 8, DeadReason::ControllerReset);
    all_handed_back_after(&log, resets);
    assert!(q.renew().unwrap());
    assert_eq!(q.stats().leaked, 0);
}

/// A queue pair dropped while the reset is stuck clearing CC.EN waits (bounded) for the
/// device to stop; as it does not within the bound, the contexts are leaked, never dropped.
#[test]
fn a_queue_pair_dropped_before_the_device_stopped_leaks_its_requests() {
    let _w = test_watchdog::arm(test_watchdog::UNIT);
    let Setup {
        c,
        emu,
        q,
        log,
        resets,
        _buf,
    } = eight_held_reads();
    let (hold, resetter) = held_reset(&c, &emu);
    drop(q);
    assert_eq!(
        log.lock().unwrap().clone(),
        Vec::<u64>::new(),
        "contexts dropped while the device was still enabled (resets before: {resets})"
    );
    hold.release();
    resetter.join().unwrap().expect("the reset");
    assert!(log.lock().unwrap().is_empty(), "leaked for good");
    // The buffer may have been given to the device: leaked with the requests.
    core::mem::forget(_buf);
}

/// A queue pair dropped once the reset's disable has completed drops its contexts (the
/// device stopped), after the device processed the reset.
#[test]
fn a_queue_pair_dropped_after_the_device_stopped_drops_its_requests() {
    let _w = test_watchdog::arm(test_watchdog::UNIT);
    let Setup {
        c,
        emu: _emu,
        q,
        log,
        resets,
        _buf,
    } = eight_held_reads();
    c.reset().unwrap();
    drop(q);
    all_handed_back_after(&log, resets);
}

/// A reset whose disable never completes (the device keeps CC.EN and RDY at 1): the reset
/// times out waiting for RDY = 0, and the old queue pair leaks its requests rather than hand
/// back buffers the device may still write.
#[test]
fn a_reset_whose_disable_times_out_leaks_the_requests() {
    let _w = test_watchdog::arm(test_watchdog::UNIT);
    let Setup {
        c,
        emu,
        mut q,
        log,
        resets,
        _buf,
    } = eight_held_reads();
    let (hold, resetter) = held_reset(&c, &emu);
    hold.discard();
    let e = resetter.join().unwrap().unwrap_err();
    assert!(
        matches!(
            e,
            Error::InitTimeout {
                state: InitState::WaitForNotReady,
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(
        emu.stats().controller_resets,
        resets,
        "the device never reset"
    );
    assert!(!q.renew().unwrap());
    leaks_all(q, &log, DeadReason::ControllerReset);
    // The buffer may have been given to the device: leaked with the requests.
    core::mem::forget(_buf);
}

/// The same for the disable a queue pair makes when it cannot reclaim a command otherwise
/// (`Shared::disable`, on another thread): it starts a new generation before clearing CC.EN,
/// and the other queue pairs hand back only once CSTS.RDY has read 0.
#[test]
fn a_disable_on_another_thread_hands_nothing_back_before_the_device_has_stopped() {
    let _w = test_watchdog::arm(test_watchdog::UNIT);
    let Setup {
        c,
        emu,
        mut q,
        log,
        resets,
        _buf,
    } = eight_held_reads();
    let hold = emu.hold_next_disable();
    let disabler = {
        let shared = c.shared.clone();
        std::thread::spawn(move || shared.disable())
    };
    assert!(
        hold.wait_held(Duration::from_secs(20)),
        "the disable never cleared CC.EN"
    );
    assert!(q.is_stale());
    assert!(!q.renew().unwrap());
    for _ in 0..2000 {
        let _ = q.poll(usize::MAX, drop_both);
    }
    assert!(
        log.lock().unwrap().is_empty(),
        "requests were handed back while the device was still enabled"
    );
    assert_eq!(q.outstanding(), 8);
    hold.release();
    disabler.join().unwrap().expect("the disable");
    collect_aborted(&mut q, 8, DeadReason::ControllerReset);
    all_handed_back_after(&log, resets);
    assert_eq!(q.stats().leaked, 0);
}

fn drop_both(w: Witness, r: IoResult) {
    assert!(
        matches!(
            r,
            Err(IoError::Aborted {
                reason: DeadReason::ControllerReset,
                ..
            })
        ),
        "{r:?}"
    );
    drop(w);
}

/// Polls `q` until `n` requests came back (20 s at most), each failed with `reason`; their
/// contexts are dropped as they come.
fn collect_aborted(q: &mut QueuePair<Witness>, n: usize, reason: DeadReason) {
    let mut got = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while got < n {
        assert!(
            Instant::now() < deadline,
            "the requests never came back ({got} of {n})"
        );
        let _ = q.poll(usize::MAX, |w, r| {
            drop(w);
            assert!(
                matches!(r, Err(IoError::Aborted { reason: why, .. }) if why == reason),
                "{r:?}"
            );
            got += 1;
        });
    }
}

/// Polls `q` until it has looked at the controller's state and found the device not yet
/// stopped (a reset wait), handing back whatever comes; returns how many came back.
fn poll_until_it_waits(q: &mut QueuePair<Witness>) -> usize {
    let mut handed = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while q.stats().reset_waits == 0 {
        assert!(
            Instant::now() < deadline,
            "the queue pair never waited for the device to stop: {:?}",
            q.stats()
        );
        let _ = q.poll(usize::MAX, |w, _| {
            drop(w);
            handed += 1;
        });
    }
    handed
}

/// A shutdown on another thread, held in its CC.SHN write (the device has not started its
/// shutdown processing): the queue pair learns that the controller is shut down but hands
/// nothing back; once CSTS.SHST reads complete every request comes back once, failed by the
/// shutdown.
#[test]
fn a_shutdown_hands_nothing_back_before_the_device_has_shut_down() {
    let _w = test_watchdog::arm(test_watchdog::UNIT);
    let Setup {
        c,
        emu,
        mut q,
        log,
        resets: stopped_before,
        _buf,
    } = eight_held_reads();
    let (hold, shutter) = held_shutdown(&c, &emu);
    let early = poll_until_it_waits(&mut q);
    assert_eq!(
        (early, log.lock().unwrap().len()),
        (0, 0),
        "requests were handed back before the device processed the shutdown"
    );
    assert_eq!(q.dead_reason(), Some(DeadReason::ShutDown));
    assert_eq!(q.outstanding(), 8);

    hold.release();
    shutter.join().unwrap().expect("the shutdown");
    collect_aborted(&mut q, 8, DeadReason::ShutDown);
    all_handed_back_after(&log, stopped_before);
    assert_eq!(q.stats().leaked, 0);
}

/// A shutdown the device never completes (the CC.SHN write is dropped: CSTS.SHST never reads
/// complete): the shutdown times out, and the queue pair leaks its requests rather than hand
/// back buffers the device may still write; a queue pair dropped meanwhile leaks too.
#[test]
fn a_shutdown_that_never_completes_leaks_the_requests() {
    let _w = test_watchdog::arm(test_watchdog::UNIT);
    let Setup {
        c,
        emu,
        q,
        log,
        resets: _,
        _buf,
    } = eight_held_reads();
    let (hold, shutter) = held_shutdown(&c, &emu);
    hold.discard();
    let e = shutter.join().unwrap().unwrap_err();
    assert!(matches!(e, Error::ShutdownTimeout { .. }), "{e:?}");
    assert_eq!(emu.stats().shutdowns, 0, "the device never shut down");
    leaks_all(q, &log, DeadReason::ShutDown);
    // The buffer may have been given to the device: leaked with the requests.
    core::mem::forget(_buf);
}

/// A queue pair dropped while the shutdown is held in its CC.SHN write waits (bounded) for the
/// shutdown to complete; it does once the write goes through, and the contexts are dropped
/// only after the device processed the shutdown.
#[test]
fn a_queue_pair_dropped_during_a_shutdown_waits_for_it() {
    let _w = test_watchdog::arm(test_watchdog::UNIT);
    let Setup {
        c,
        emu,
        q,
        log,
        resets: stopped_before,
        _buf,
    } = eight_held_reads();
    let (hold, shutter) = held_shutdown(&c, &emu);
    let dropper = std::thread::spawn(move || drop(q));
    // The drop waits for the shutdown (its bound is over a second): until it has looked.
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.shared.drop_waits.load(Ordering::Acquire) == 0 {
        assert!(
            !dropper.is_finished(),
            "the drop returned without waiting for the shutdown"
        );
        assert!(Instant::now() < deadline, "the drop never waited");
        std::thread::yield_now();
    }
    assert!(
        log.lock().unwrap().is_empty(),
        "contexts dropped before the device processed the shutdown"
    );
    hold.release();
    shutter.join().unwrap().expect("the shutdown");
    dropper.join().unwrap();
    all_handed_back_after(&log, stopped_before);
}

/// A queue pair made stale by a reset whose CC.EN write is held, on a controller in fatal
/// status: its health check must not disable the controller itself (that would start another
/// generation in the middle of the reset, and the reset would end NotReady with nothing
/// bringing the controller up). It waits for the reset's disable, and the reset succeeds.
#[test]
fn a_stale_queue_pair_never_disables_the_controller_during_a_reset() {
    let _w = test_watchdog::arm(test_watchdog::UNIT);
    let Setup {
        c,
        emu,
        mut q,
        log: _,
        resets: _,
        _buf,
    } = eight_held_reads();
    let before = c.shared.generation.load(Ordering::Acquire);
    emu.set_fatal();
    let (hold, resetter) = held_reset(&c, &emu);
    assert!(q.is_stale());
    // Poll until the queue pair has run its health check and acted on it: it waits for the
    // reset's disable (a reset wait), or (the bug) disabled the controller and failed its
    // requests at once.
    let deadline = Instant::now() + Duration::from_secs(20);
    while q.stats().reset_waits == 0 && q.outstanding() > 0 {
        assert!(Instant::now() < deadline, "the queue pair never looked");
        let _ = q.poll(usize::MAX, |w, _| drop(w));
    }
    assert_eq!(
        c.shared.generation.load(Ordering::Acquire),
        before + 1,
        "the stale queue pair started a generation of its own (a disable) during the reset"
    );
    hold.release();
    resetter.join().unwrap().expect("the reset");
    assert_eq!(c.shared.generation.load(Ordering::Acquire), before + 1);
    collect_aborted(&mut q, 8, DeadReason::ControllerReset);
    assert!(q.renew().unwrap(), "the controller is live again");
    assert_eq!(q.stats().leaked, 0);
}

/// After a shutdown, an idle queue pair that submits and rings learns that it is stale from
/// the doorbell: the request fails with the controller's reason, ShutDown, not ControllerReset.
#[test]
fn a_request_after_a_shutdown_fails_with_shut_down() {
    let _w = test_watchdog::arm(test_watchdog::UNIT);
    let emu = EmulatedController::new(EmulatedConfig {
        namespaces: vec![NamespaceConfig::memory(512, 1 << 16)],
        ..EmulatedConfig::default()
    })
    .unwrap();
    let c = Controller::new(emu.clone()).unwrap();
    let ns = c.namespaces().remove(0);
    let mut q = c.create_qpair::<u32>(QueueOptions::default()).unwrap();
    let buf = c.alloc(512).unwrap();
    c.shutdown().unwrap();
    // SAFETY: `buf` outlives the queue pair's use of it (the request comes back below, and
    // the device has shut down).
    let r = unsafe { q.read_raw(&ns, Lba(0), buf.as_dma_slice(), 7) };
    assert!(r.is_ok());
    q.ring();
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.is_empty() {
        assert!(Instant::now() < deadline, "the request never came back");
        let _ = q.poll(usize::MAX, |c, r| got.push((c, r)));
    }
    assert!(
        matches!(
            got[0],
            (
                7,
                Err(IoError::Aborted {
                    reason: DeadReason::ShutDown,
                    ..
                })
            )
        ),
        "{got:?}"
    );
    assert_eq!(q.dead_reason(), Some(DeadReason::ShutDown));
}

/// An idle queue pair made stale by a reset whose disable is held is dropped at once: it gave
/// the device nothing, so it has nothing to wait for (it used to wait the whole settle limit).
#[test]
fn an_idle_stale_queue_pair_is_dropped_without_waiting() {
    let _w = test_watchdog::arm(test_watchdog::UNIT);
    let Setup {
        c,
        emu,
        q: busy,
        log: _,
        resets: _,
        _buf,
    } = eight_held_reads();
    let idle = c.create_qpair::<Witness>(QueueOptions::default()).unwrap();
    let (hold, resetter) = held_reset(&c, &emu);
    assert!(idle.is_stale());
    let start = Instant::now();
    drop(idle);
    let took = start.elapsed();
    assert_eq!(
        c.shared.drop_waits.load(Ordering::Acquire),
        0,
        "the idle queue pair waited for the reset (for {took:?})"
    );
    assert!(
        took < c.shared.settle_limit() / 2,
        "dropping an idle queue pair took {took:?}"
    );
    hold.release();
    resetter.join().unwrap().expect("the reset");
    drop(busy);
}

/// Requests waiting for room on a queue pair made stale by a reset: completions arriving
/// meanwhile (from a device not yet stopped) must not move them into the stale SQ. They stay
/// waiting, never reach the device, and come back failed even when the reset's disable never
/// completes (where requests on the device are leaked).
#[test]
fn waiting_requests_stay_off_a_stale_queue() {
    let _w = test_watchdog::arm(test_watchdog::UNIT);
    let emu = EmulatedController::new(EmulatedConfig {
        namespaces: vec![NamespaceConfig::memory(512, 1 << 16)],
        cap_to: 1,
        ..EmulatedConfig::default()
    })
    .unwrap();
    let opts = ControllerOptions {
        admin_timeout: Duration::from_millis(200),
        ..ControllerOptions::default()
    };
    let c = Controller::with_options(emu.clone(), opts).unwrap();
    let ns = c.namespaces().remove(0);
    let mut q = c
        .create_qpair::<u64>(QueueOptions {
            entries: 4,
            requests: 16,
            ..QueueOptions::default()
        })
        .unwrap();
    // The three reads that fit complete only when released, after the reset below started.
    emu.inject(Fault::always(
        Trigger::LbaRange {
            nsid: 1,
            start: 0,
            end: 3,
            opcode: None,
        },
        Action::Delay(Duration::from_secs(3600)),
    ));
    let buf = c.alloc(5 * 512).unwrap();
    for t in 0..5u64 {
        let s = buf.slice(t as usize * 512, 512).unwrap();
        // SAFETY: `buf` outlives the queue pair (forgotten below if anything leaked).
        let r = unsafe { q.read_raw(&ns, Lba(t), s, t) };
        assert!(r.is_ok());
    }
    q.ring();
    assert_eq!((q.in_flight(), q.outstanding()), (3, 5));
    let (hold, resetter) = held_reset(&c, &emu);
    assert!(!q.renew().unwrap(), "requests are outstanding");
    emu.release_delayed();
    let mut done = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while done.len() < 3 {
        assert!(
            Instant::now() < deadline,
            "the delayed reads never completed"
        );
        let _ = q.poll(usize::MAX, |t, r| done.push((t, r)));
    }
    assert!(done.iter().all(|(t, r)| *t < 3 && r.is_ok()), "{done:?}");
    assert_eq!(
        q.in_flight(),
        0,
        "waiting requests were moved into the stale submission queue"
    );
    // The reset's disable never completes: the device may still use what it was given.
    hold.discard();
    assert!(resetter.join().unwrap().is_err());
    let deadline = Instant::now() + Duration::from_secs(20);
    while q.outstanding() > 0 {
        assert!(
            Instant::now() < deadline,
            "the waiting requests never came back"
        );
        let _ = q.poll(usize::MAX, |t, r| done.push((t, r)));
    }
    assert_eq!(done.len(), 5, "{done:?}");
    for (t, r) in &done[3..] {
        assert!(
            *t >= 3
                && matches!(
                    r,
                    Err(IoError::Aborted {
                        reason: DeadReason::ControllerReset,
                        ..
                    })
                ),
            "{t}: {r:?}"
        );
    }
    assert_eq!(q.stats().leaked, 0, "{:?}", q.stats());
}
