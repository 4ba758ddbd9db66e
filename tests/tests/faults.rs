//! Emulator-only tests: injected faults, fatal status, surprise removal, shutdown, reset.
//! Each affected request must complete exactly once with the right status, and the others be
//! unaffected.
//!
//! They need the emulated controller (fault injection, registers read back through it), not
//! hardware: with `NVME_PCI_ADDR` set they still run, on the emulator, and each says so (the
//! device-independent tests in `io.rs` are the ones that run on the real controller, including
//! reset and shutdown on drop).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use dioxide::emulated::{Action, EmulatedController, Fault, Mode, Trigger};
use dioxide::spec::regs::{offset, shst};
use dioxide::spec::sqe::{admin, io};
use dioxide::spec::status::{generic, media};
use dioxide::spec::{Cc, Csts, Sct, Status};
use dioxide::{
    AbortOutcome, Bus, Cid, Controller, DeadReason, DmaBuffer, Error, IoError, IoResult, Lba, Nsid,
    QueueId, QueueOptions, QueuePair,
};
use dioxide_tests::*;

const NS: (u32, u64) = (512, 1 << 20);

fn each_mode(f: impl Fn(Mode)) {
    for m in MODES {
        f(m);
    }
}

/// Every test here starts with this: on hardware, a note that it runs on the emulator.
fn emulator(test: &str) {
    emulator_only(
        &format!("faults::{test}"),
        "fault injection needs the emulated controller",
    );
}

/// The command timeout for tests that inject a fault: short in Inline mode, where the emulator
/// runs only when the test polls, so nothing but the faulted command can be late; 2 s in Threaded
/// mode, where the device thread competes for the (possibly two, busy) CPUs of a CI runner and a
/// healthy command could otherwise time out.
fn timeout(mode: Mode) -> Duration {
    match mode {
        Mode::Inline => Duration::from_millis(100),
        Mode::Threaded => Duration::from_secs(2),
    }
}

fn short_timeout(mode: Mode) -> QueueOptions {
    QueueOptions::default().with_timeout(Some(timeout(mode)))
}

/// Polls until `n` completions arrived (10 s limit), recording each by tag; fails on a tag
/// seen twice. A poll error is tolerated only if it is `QueueDead` for the `dead` reason (the
/// queue died on purpose and the remaining completions are being delivered); any other fails.
fn collect(q: &mut QueuePair<u64>, n: usize, dead: Option<DeadReason>) -> HashMap<u64, IoResult> {
    let mut got = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < n {
        assert!(
            Instant::now() < deadline,
            "only {} of {n} completions",
            got.len()
        );
        match q.poll(usize::MAX, |t, r| {
            assert!(got.insert(t, r).is_none(), "tag {t} completed twice");
        }) {
            Ok(_) => {}
            Err(Error::QueueDead { reason, .. }) if Some(reason) == dead => {}
            Err(e) => panic!("poll (expected queue death: {dead:?}): {e}"),
        }
    }
    got
}

/// Submits reads tagged `tags` of one block each at LBA = tag.
fn reads(
    q: &mut QueuePair<u64>,
    ns: &dioxide::Namespace,
    buf: &DmaBuffer,
    tags: std::ops::Range<u64>,
) {
    for t in tags {
        let s = buf.slice((t as usize % 64) * 512, 512).unwrap();
        // SAFETY: `buf` outlives the queue pair in every test, and no test reads the data.
        unsafe { q.read_raw(ns, Lba(t), s, t) }.unwrap();
    }
    q.ring();
}

#[test]
fn status_on_the_nth_command() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    emulator("status_on_the_nth_command");
    each_mode(|mode| {
        let (c, emu) = emulated(config(mode, &[NS]));
        let ns = c.namespaces().remove(0);
        let mut q = c.create_qpair::<u64>(QueueOptions::default()).unwrap();
        let buf = c.alloc(64 * 512).unwrap();
        let st = Status::new(Sct::Media, media::UNRECOVERED_READ_ERROR).with_dnr(true);
        emu.inject(Fault::once(
            Trigger::NthCommand {
                qid: Some(q.qid().0),
                opcode: Some(io::READ),
                n: 3,
            },
            Action::Status(st),
        ));
        reads(&mut q, &ns, &buf, 0..8);
        let got = collect(&mut q, 8, None);
        for (t, r) in &got {
            if *t == 2 {
                match r {
                    Err(IoError::Status {
                        status,
                        nsid,
                        lba,
                        child: None,
                        qid,
                        ..
                    }) => {
                        assert_eq!(*status, st);
                        assert_eq!((*nsid, *lba, *qid), (Nsid(1), Lba(2), q.qid()));
                    }
                    other => panic!("tag 2: {other:?}"),
                }
                let msg = r.unwrap_err().to_string();
                assert!(msg.contains("Unrecovered Read Error"), "{msg}");
            } else {
                assert!(r.is_ok(), "tag {t}: {r:?}");
            }
        }
        drop(q);
        assert_eq!(emu.stats().dma_faults, 0);
    });
}

/// A fault on an LBA range inside the third child of a split request: the parent completes
/// once, with the child's index and LBA.
#[test]
fn status_on_an_lba_range_inside_a_split_request() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    emulator("status_on_an_lba_range_inside_a_split_request");
    each_mode(|mode| {
        let (c, emu) = emulated(config(mode, &[NS]));
        let ns = c.namespaces().remove(0);
        let mut q = c
            .create_qpair::<(DmaBuffer, u64)>(QueueOptions::default())
            .unwrap();
        let per_child = (c.max_transfer() / 512) as u64;
        let bad = 1000 + 2 * per_child + 5;
        let st = Status::new(Sct::Media, media::WRITE_FAULT);
        emu.inject(Fault::always(
            Trigger::LbaRange {
                nsid: 1,
                start: bad,
                end: bad + 1,
                opcode: Some(io::WRITE),
            },
            Action::Status(st),
        ));
        q.write(
            &ns,
            Lba(1000),
            (pattern_buffer(&c, 4 * c.max_transfer(), 3), 1),
        )
        .unwrap();
        q.write(&ns, Lba(0), (pattern_buffer(&c, 4096, 4), 2))
            .unwrap();
        let mut got = HashMap::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while got.len() < 2 && Instant::now() < deadline {
            q.poll(64, |(_, t), r| assert!(got.insert(t, r).is_none(), "twice"))
                .unwrap();
        }
        assert!(got[&2].is_ok());
        match got[&1] {
            Err(IoError::Status {
                status,
                lba,
                child: Some(2),
                ..
            }) => {
                assert_eq!(status, st);
                assert_eq!(lba, Lba(1000 + 2 * per_child));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(q.outstanding(), 0, "every child slot came back");
        drop(q);
        assert_eq!(emu.stats().dma_faults, 0);
    });
}

#[test]
fn delayed_completion_completes_once_and_others_are_unaffected() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    emulator("delayed_completion_completes_once_and_others_are_unaffected");
    each_mode(|mode| {
        let (c, emu) = emulated(config(mode, &[NS]));
        let ns = c.namespaces().remove(0);
        let mut q = c.create_qpair::<u64>(short_timeout(mode)).unwrap();
        let buf = c.alloc(64 * 512).unwrap();
        let action = match mode {
            Mode::Inline => Action::DelayCommands(3),
            Mode::Threaded => Action::Delay(Duration::from_millis(30)),
        };
        emu.inject(Fault::once(
            Trigger::NthCommand {
                qid: Some(q.qid().0),
                opcode: None,
                n: 1,
            },
            action,
        ));
        reads(&mut q, &ns, &buf, 0..1);
        // Some polls find nothing while the first command is held.
        for _ in 0..10 {
            q.poll(8, |t, _| panic!("tag {t} completed early")).unwrap();
        }
        reads(&mut q, &ns, &buf, 1..6);
        let got = collect(&mut q, 6, None);
        assert!(got.values().all(|r| r.is_ok()), "{got:?}");
        assert_eq!(q.stats().timeouts, 0);
        drop(q);
        assert_eq!(emu.stats().dma_faults, 0);
    });
}

/// A command the device never completes: it times out once, an Abort is sent, the CID is
/// quarantined until the aborted completion arrives (dropped and counted), and the other
/// commands are unaffected.
#[test]
fn never_completed_command_times_out_and_is_aborted() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    emulator("never_completed_command_times_out_and_is_aborted");
    each_mode(|mode| {
        let (c, emu) = emulated(config(mode, &[NS]));
        let ns = c.namespaces().remove(0);
        let mut q = c.create_qpair::<u64>(short_timeout(mode)).unwrap();
        let buf = c.alloc(64 * 512).unwrap();
        emu.inject(Fault::once(
            Trigger::NthCommand {
                qid: Some(q.qid().0),
                opcode: Some(io::READ),
                n: 2,
            },
            Action::NeverComplete,
        ));
        let start = Instant::now();
        reads(&mut q, &ns, &buf, 0..5);
        let got = collect(&mut q, 5, None);
        let waited = start.elapsed();
        assert!(waited >= timeout(mode), "timed out too early: {waited:?}");
        for (t, r) in &got {
            if *t == 1 {
                assert!(
                    matches!(
                        r,
                        Err(IoError::Timeout {
                            lba: Lba(1),
                            child: None,
                            ..
                        })
                    ),
                    "{r:?}"
                );
            } else {
                assert!(r.is_ok(), "tag {t}: {r:?}");
            }
        }
        // The abort released the command: its late completion is dropped, the CID freed.
        let deadline = Instant::now() + Duration::from_secs(5);
        while q.quarantined() > 0 && Instant::now() < deadline {
            q.poll(8, |t, r| panic!("tag {t} delivered again: {r:?}"))
                .unwrap();
        }
        let st = q.stats();
        assert_eq!(
            (st.timeouts, st.aborts, st.late_completions),
            (1, 1, 1),
            "{st:?}"
        );
        assert_eq!(q.outstanding(), 0);
        // The queue goes on working.
        reads(&mut q, &ns, &buf, 10..20);
        assert!(collect(&mut q, 10, None).values().all(|r| r.is_ok()));
        drop(q);
        assert_eq!(emu.stats().dma_faults, 0);
    });
}

/// The blocking API keeps the buffer borrowed until the device has let go of it: the call
/// returns the timeout only after the aborted completion arrived.
#[test]
fn blocking_call_times_out_after_the_device_lets_go() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    emulator("blocking_call_times_out_after_the_device_lets_go");
    each_mode(|mode| {
        let (c, emu) = emulated(config(mode, &[NS]));
        let ns = c.namespaces().remove(0);
        let mut q = c.create_qpair::<u64>(short_timeout(mode)).unwrap();
        emu.inject(Fault::once(
            Trigger::NthCommand {
                qid: Some(q.qid().0),
                opcode: Some(io::READ),
                n: 1,
            },
            Action::NeverComplete,
        ));
        let mut buf = c.alloc(4096).unwrap();
        let e = q
            .read_blocking(&ns, Lba(0), buf.as_mut_slice())
            .unwrap_err();
        assert!(matches!(e, Error::Io(IoError::Timeout { .. })), "{e}");
        assert_eq!(
            q.quarantined(),
            0,
            "returned only once the command was released"
        );
        assert_eq!(q.stats().late_completions, 1);
        q.read_blocking(&ns, Lba(0), buf.as_mut_slice()).unwrap();
        drop(q);
        assert_eq!(emu.stats().dma_faults, 0);
    });
}

/// When the abort fails to release the command, the queue is deleted on the device one
/// timeout later, and the owned buffer comes back with the timeout.
#[test]
fn owned_buffer_comes_back_once_when_abort_fails() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    emulator("owned_buffer_comes_back_once_when_abort_fails");
    each_mode(|mode| {
        let (c, emu) = emulated(config(mode, &[NS]));
        let ns = c.namespaces().remove(0);
        let mut q = c
            .create_qpair::<(DmaBuffer, u64)>(short_timeout(mode))
            .unwrap();
        // The Abort itself fails, so only deleting the queue releases the command.
        emu.inject(Fault::always(
            Trigger::NthCommand {
                qid: Some(0),
                opcode: Some(admin::ABORT),
                n: 1,
            },
            Action::Status(Status::new(Sct::Generic, generic::INTERNAL_ERROR)),
        ));
        emu.inject(Fault::once(
            Trigger::NthCommand {
                qid: Some(q.qid().0),
                opcode: Some(io::WRITE),
                n: 1,
            },
            Action::NeverComplete,
        ));
        q.write(&ns, Lba(0), (pattern_buffer(&c, 4096, 1), 1))
            .unwrap();
        q.write(&ns, Lba(8), (pattern_buffer(&c, 4096, 2), 2))
            .unwrap();
        let mut got = HashMap::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            match q.poll(8, |(_, t), r| assert!(got.insert(t, r).is_none(), "twice")) {
                Ok(_) => {}
                Err(Error::QueueDead {
                    reason: DeadReason::Unrecoverable,
                    ..
                }) => break,
                Err(e) => panic!("{e}"),
            }
        }
        assert!(got[&2].is_ok());
        assert!(
            matches!(got[&1], Err(IoError::Timeout { .. })),
            "{:?}",
            got[&1]
        );
        assert_eq!(q.stats().aborts_failed, 1);
        assert_eq!(q.dead_reason(), Some(DeadReason::Unrecoverable));
        let rej = q
            .write(&ns, Lba(0), (c.alloc(512).unwrap(), 3))
            .unwrap_err();
        assert!(matches!(rej.error, Error::QueueDead { .. }));
        drop(q);
        // The controller itself still works.
        let mut q2 = c.create_qpair::<u64>(QueueOptions::default()).unwrap();
        let mut b = c.alloc(512).unwrap();
        q2.read_blocking(&ns, Lba(8), b.as_mut_slice()).unwrap();
        drop(q2);
        assert_eq!(emu.stats().dma_faults, 0);
    });
}

#[test]
fn controller_fatal_status_fails_requests_once_and_reset_recovers() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    emulator("controller_fatal_status_fails_requests_once_and_reset_recovers");
    each_mode(|mode| {
        let (c, emu) = emulated(config(mode, &[NS]));
        let ns = c.namespaces().remove(0);
        let mut q = c.create_qpair::<u64>(short_timeout(mode)).unwrap();
        let buf = c.alloc(64 * 512).unwrap();
        reads(&mut q, &ns, &buf, 0..4);
        assert!(collect(&mut q, 4, None).values().all(|r| r.is_ok()));
        emu.set_fatal();
        reads(&mut q, &ns, &buf, 4..8);
        let got = collect(&mut q, 4, Some(DeadReason::ControllerFatal));
        for r in got.values() {
            assert!(
                matches!(
                    r,
                    Err(IoError::Aborted {
                        reason: DeadReason::ControllerFatal,
                        ..
                    })
                ),
                "{r:?}"
            );
        }
        let s = buf.slice(0, 512).unwrap();
        // SAFETY: rejected before the device sees it.
        let rej = unsafe { q.read_raw(&ns, Lba(0), s, 9) }.unwrap_err();
        assert!(matches!(
            rej.error,
            Error::QueueDead {
                reason: DeadReason::ControllerFatal,
                ..
            }
        ));
        assert!(rej.error.to_string().contains("reset"), "{}", rej.error);
        assert!(c.identify_controller().is_err());
        drop(q);
        c.reset().unwrap();
        let mut q = c.create_qpair::<u64>(QueueOptions::default()).unwrap();
        reads(&mut q, &ns, &buf, 0..4);
        assert!(collect(&mut q, 4, None).values().all(|r| r.is_ok()));
        drop(q);
        assert_eq!(emu.stats().dma_faults, 0);
    });
}

#[test]
fn surprise_removal_fails_requests_once_and_calls_fail_clearly() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    emulator("surprise_removal_fails_requests_once_and_calls_fail_clearly");
    each_mode(|mode| {
        let (c, emu) = emulated(config(mode, &[NS]));
        let ns = c.namespaces().remove(0);
        let mut q = c.create_qpair::<u64>(short_timeout(mode)).unwrap();
        let buf = c.alloc(64 * 512).unwrap();
        reads(&mut q, &ns, &buf, 0..4);
        assert!(collect(&mut q, 4, None).values().all(|r| r.is_ok()));
        emu.surprise_remove();
        reads(&mut q, &ns, &buf, 4..10);
        let got = collect(&mut q, 6, Some(DeadReason::DeviceGone));
        for r in got.values() {
            assert!(
                matches!(
                    r,
                    Err(IoError::Aborted {
                        reason: DeadReason::DeviceGone,
                        ..
                    })
                ),
                "{r:?}"
            );
        }
        let e = q.poll(8, |_, _| panic!("nothing left")).unwrap_err();
        assert!(
            matches!(
                e,
                Error::QueueDead {
                    reason: DeadReason::DeviceGone,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("removed"), "{e}");
        let mut b = c.alloc(512).unwrap();
        let e = q.read_blocking(&ns, Lba(0), b.as_mut_slice()).unwrap_err();
        assert!(matches!(e, Error::QueueDead { .. }), "{e}");
        let e = c.identify_controller().unwrap_err();
        assert!(
            matches!(e, Error::NotReady { .. } | Error::DeviceGone { .. }),
            "{e}"
        );
        assert!(matches!(c.csts(), Err(Error::DeviceGone { .. })));
        assert!(c.create_qpair::<u64>(QueueOptions::default()).is_err());
        drop(q);
        drop(c); // no shutdown handshake on a removed device, and no hang
        assert_eq!(emu.stats().dma_faults, 0);
    });
}

#[test]
fn shutdown_on_drop_sets_shn_and_waits_for_shst() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    emulator("shutdown_on_drop_sets_shn_and_waits_for_shst");
    each_mode(|mode| {
        let (c, emu) = emulated(config(mode, &[NS]));
        let q = c.create_qpair::<u64>(QueueOptions::default()).unwrap();
        let c2 = c.clone();
        drop(c);
        // A handle and a queue pair still live: no shutdown yet.
        assert_eq!(Cc(emu.read32(offset::CC)).shn(), 0);
        drop(c2);
        assert_eq!(
            Cc(emu.read32(offset::CC)).shn(),
            0,
            "the queue pair keeps it alive"
        );
        drop(q);
        assert_eq!(Cc(emu.read32(offset::CC)).shn(), 1, "CC.SHN = normal");
        assert_eq!(Csts(emu.read32(offset::CSTS)).shst(), shst::COMPLETE);
        // Delete SQ and CQ were sent before the shutdown.
        let st = emu.stats();
        assert_eq!(st.commands_with(0, admin::DELETE_IO_SQ), 1);
        assert_eq!(st.commands_with(0, admin::DELETE_IO_CQ), 1);
        assert_eq!(st.dma_faults, 0);
    });
}

#[test]
fn reset_makes_old_queue_pairs_fail_and_new_ones_work() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    emulator("reset_makes_old_queue_pairs_fail_and_new_ones_work");
    each_mode(|mode| {
        let (c, emu) = emulated(config(mode, &[NS]));
        let ns = c.namespaces().remove(0);
        let mut old = c.create_qpair::<u64>(short_timeout(mode)).unwrap();
        let buf = c.alloc(64 * 512).unwrap();
        emu.inject(Fault::once(
            Trigger::NthCommand {
                qid: Some(old.qid().0),
                opcode: None,
                n: 1,
            },
            Action::NeverComplete,
        ));
        reads(&mut old, &ns, &buf, 0..1);
        let deadline = Instant::now() + Duration::from_secs(5);
        while emu.stats().held == 0 && Instant::now() < deadline {
            old.poll(8, |_, _| panic!("held")).unwrap();
        }
        c.reset().unwrap();
        let got = collect(&mut old, 1, Some(DeadReason::ControllerReset));
        assert!(
            matches!(
                got[&0],
                Err(IoError::Aborted {
                    reason: DeadReason::ControllerReset,
                    ..
                })
            ),
            "{:?}",
            got[&0]
        );
        let mut new = c.create_qpair::<u64>(QueueOptions::default()).unwrap();
        reads(&mut new, &ns, &buf, 0..8);
        assert!(collect(&mut new, 8, None).values().all(|r| r.is_ok()));
        // No Delete SQ/CQ was sent for the old queue: the reset deleted it.
        drop(old);
        assert_eq!(emu.stats().commands_with(0, admin::DELETE_IO_SQ), 0);
        drop(new);
        assert_eq!(emu.stats().dma_faults, 0);
    });
}

#[test]
fn admin_errors_are_typed() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    emulator("admin_errors_are_typed");
    let (c, emu) = emulated(config(Mode::Inline, &[NS]));
    emu.inject(Fault::once(
        Trigger::NthCommand {
            qid: Some(0),
            opcode: Some(admin::IDENTIFY),
            n: 1,
        },
        Action::Status(Status::new(Sct::Generic, generic::INVALID_FIELD)),
    ));
    let e = c.identify_controller().unwrap_err();
    match &e {
        Error::AdminStatus { name, status, .. } => {
            assert_eq!(*name, "Identify Controller");
            assert_eq!(status.sc, generic::INVALID_FIELD);
        }
        other => panic!("{other}"),
    }
    assert!(e.to_string().contains("Invalid Field in Command"), "{e}");
    // Abort of a command that is not outstanding: "not aborted".
    assert_eq!(
        c.abort(QueueId(1), Cid(3)).unwrap(),
        AbortOutcome::NotAborted
    );
    // An admin command that never completes times out with its name.
    let opts = dioxide::ControllerOptions {
        admin_timeout: Duration::from_millis(100),
        ..test_options()
    };
    let c2 = Controller::with_options(emu.clone(), opts).unwrap();
    drop(c);
    emu.inject(Fault::once(
        Trigger::NthCommand {
            qid: Some(0),
            opcode: Some(admin::GET_LOG_PAGE),
            n: 1,
        },
        Action::NeverComplete,
    ));
    let e = c2.smart_log().unwrap_err();
    assert!(
        matches!(
            e,
            Error::AdminTimeout {
                name: "Get Log Page",
                ..
            }
        ),
        "{e}"
    );
    // The next admin command skips the stale completion slot and works.
    c2.identify_controller().unwrap();
    assert_eq!(emu.stats().dma_faults, 0);
}

#[test]
fn bring_up_handles_an_enabled_controller_and_a_missing_one() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    emulator("bring_up_handles_an_enabled_controller_and_a_missing_one");
    let emu = EmulatedController::new(config(Mode::Inline, &[NS])).unwrap();
    let c = Controller::new(emu.clone()).unwrap();
    // Bring-up again over an enabled controller: it is disabled first.
    let c2 = Controller::new(emu.clone()).unwrap();
    assert_eq!(c2.namespaces().len(), 1);
    drop((c, c2));
    let gone = EmulatedController::new(config(Mode::Inline, &[NS])).unwrap();
    gone.surprise_remove();
    let e = Controller::new(gone).unwrap_err();
    assert!(matches!(e, Error::DeviceGone { .. }), "{e}");
}
