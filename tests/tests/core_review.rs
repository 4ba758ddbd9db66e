//! Emulator-only tests of the driver core's review fixes: timeout scans that cannot stall
//! `poll` on a hung admin queue, and queue ids that stay reserved across a reset.

use std::time::{Duration, Instant};

use dioxide::emulated::{Action, Fault, Trigger};
use dioxide::spec::sqe::{admin, io};
use dioxide::{Controller, ControllerOptions, DmaBuffer, Lba, QueueOptions, QueuePair};
use dioxide_tests::*;

const NS: (u32, u64) = (512, 1 << 20);

fn emulator(test: &str) {
    emulator_only(
        &format!("core_review::{test}"),
        "fault injection needs the emulated controller",
    );
}

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
fn a_hung_admin_queue_does_not_stall_poll_with_one_abort_per_timeout() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    emulator("a_hung_admin_queue_does_not_stall_poll_with_one_abort_per_timeout");
    for mode in MODES {
        let admin_timeout = Duration::from_millis(200);
        let emu = dioxide::emulated::EmulatedController::new(config(mode, &[NS])).unwrap();
        let c = Controller::with_options(
            emu.clone(),
            ControllerOptions {
                admin_timeout,
                ..test_options()
            },
        )
        .unwrap();
        let ns = c.namespaces().remove(0);
        let mut q = c
            .create_qpair::<u64>(
                QueueOptions::default().with_timeout(Some(Duration::from_millis(100))),
            )
            .unwrap();
        let buf = c.alloc(64 * 512).unwrap();
        emu.inject(Fault::always(
            Trigger::NthCommand {
                qid: Some(q.qid().0),
                opcode: Some(io::READ),
                n: 1,
            },
            Action::NeverComplete,
        ));
        emu.inject(Fault::always(
            Trigger::NthCommand {
                qid: Some(0),
                opcode: Some(admin::ABORT),
                n: 1,
            },
            Action::NeverComplete,
        ));
        // One synchronous Abort per timed-out command would stall one poll for 24 × 200 ms.
        const N: u64 = 24;
        reads(&mut q, &ns, &buf, 0..N);
        let mut got = 0;
        let mut longest = Duration::ZERO;
        let deadline = Instant::now() + Duration::from_secs(20);
        while got < N && q.dead_reason().is_none() {
            assert!(Instant::now() < deadline, "{mode:?}: only {got} of {N}");
            let t = Instant::now();
            let _ = q.poll(usize::MAX, |_, r| {
                assert!(r.is_err());
                got += 1;
            });
            longest = longest.max(t.elapsed());
        }
        assert!(
            longest < 8 * admin_timeout,
            "{mode:?}: a poll took {longest:?}"
        );
        let st = q.stats();
        assert!(st.aborts_failed >= 1, "{st:?}");
        assert!(st.aborts_skipped >= 1, "{st:?}");
        drop(q);
        drop(c);
    }
}

#[test]
fn a_stale_queue_pair_cannot_touch_a_new_queue_pair_after_reset() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    emulator("a_stale_queue_pair_cannot_touch_a_new_queue_pair_after_reset");
    for mode in MODES {
        let (c, emu) = emulated(config(mode, &[NS]));
        let ns = c.namespaces().remove(0);
        let buf = c.alloc(64 * 512).unwrap();
        let mut old = c.create_qpair::<u64>(QueueOptions::default()).unwrap();
        let old_qid = old.qid();
        // Completions posted to the old CQ and not consumed before the reset.
        reads(&mut old, &ns, &buf, 0..8);
        let deadline = Instant::now() + Duration::from_secs(5);
        while emu.stats().queue_commands(old_qid.0) < 8 {
            assert!(Instant::now() < deadline, "{mode:?}: old reads not fetched");
            std::thread::yield_now();
        }
        std::thread::sleep(Duration::from_millis(50)); // and completed
        c.reset().unwrap();
        let mut new = c.create_qpair::<u64>(QueueOptions::default()).unwrap();
        assert_ne!(
            new.qid(),
            old_qid,
            "{mode:?}: the stale pair's id was handed out"
        );
        reads(&mut new, &ns, &buf, 100..108);
        // The stale pair consumes its entries (and may ring its CQ head doorbell) while the new
        // pair has completions outstanding.
        for _ in 0..4 {
            let _ = old.poll(usize::MAX, |_, _| {});
        }
        let mut got = std::collections::HashMap::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while got.len() < 8 {
            assert!(Instant::now() < deadline, "{mode:?}: only {}", got.len());
            let _ = new.poll(usize::MAX, |t, r| {
                assert!(got.insert(t, r).is_none(), "tag {t} twice");
            });
        }
        assert!(got.values().all(|r| r.is_ok()), "{mode:?}: {got:?}");
        // Dropping the stale pair frees its id for the next queue pair.
        drop(old);
        let again = c.create_qpair::<u64>(QueueOptions::default()).unwrap();
        assert_eq!(again.qid(), old_qid, "{mode:?}");
        drop((again, new));
        assert_eq!(emu.stats().dma_faults, 0);
    }
}
