//! Asynchronous events on the emulated controller: from bring-up on, Asynchronous Event
//! Requests are outstanding; an event the controller raises (here an Error event: a doorbell
//! write to a queue that does not exist) is decoded, offered once through
//! `Controller::async_events` and the embedding API's `Dioxide::async_events`, and the request
//! is submitted again (a second event arrives too). The same on QEMU's controller with a SMART
//! critical warning: the HIL fault scenario (`hil_faults.rs`).

use std::time::{Duration, Instant};

use dioxide::emulated::{EmulatedController, Mode};
use dioxide::spec::regs::sq_tail_doorbell;
use dioxide::{AsyncEvent, AsyncEventType, Controller, ControllerOptions, Dioxide};
use dioxide_tests::*;

/// Polls `take` until it returns an event (10 s limit).
fn wait_event(mut take: impl FnMut() -> Vec<AsyncEvent>) -> Vec<AsyncEvent> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let evs = take();
        if !evs.is_empty() || Instant::now() > deadline {
            return evs;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A doorbell write to the SQ of an I/O queue the controller granted but nobody created: the
/// controller reports "write to an invalid doorbell register" (Error type, Error log page).
fn bad_doorbell(c: &Controller) {
    let qid = c.io_queues();
    c.bus().write32(sq_tail_doorbell(qid, c.cap().dstrd()), 1);
}

#[test]
fn error_event_is_offered_once_and_the_request_rearmed() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    emulator_only(
        "async_events::error_event_is_offered_once_and_the_request_rearmed",
        "the emulator raises the event; QEMU's run is the HIL fault scenario's",
    );
    for &mode in device_modes() {
        let (c, emu) = emulated(config(mode, &[(512, 1 << 12)]));
        let outstanding = c.async_event_requests();
        assert!(
            outstanding >= 1,
            "no Asynchronous Event Request outstanding"
        );
        assert!(
            c.async_events().unwrap().is_empty(),
            "an event out of nowhere"
        );
        bad_doorbell(&c);
        let evs = wait_event(|| c.async_events().unwrap());
        assert_eq!(evs.len(), 1, "{mode:?}: {evs:?}");
        let e = evs[0];
        assert_eq!(e.kind, AsyncEventType::Error);
        assert_eq!((e.info, e.log_page), (0, 1), "{e}");
        assert_eq!(e.description(), "write to an invalid doorbell register");
        // Offered once; the request was submitted again.
        assert!(c.async_events().unwrap().is_empty());
        assert_eq!(c.async_event_requests(), outstanding, "re-armed");

        // The embedding API sees the next one.
        let dx = Dioxide::builder()
            .controller(c.clone())
            .pollers([None])
            .build()
            .expect("Dioxide");
        bad_doorbell(&c);
        let evs = wait_event(|| dx.async_events().into_iter().map(|(_, e)| e).collect());
        assert_eq!(evs, vec![e], "{mode:?}");
        assert!(dx.async_events().is_empty());
        dx.shutdown();
        assert_eq!(c.async_event_requests(), outstanding, "re-armed again");

        // A reset drops the outstanding requests on the device; bring-up submits new ones.
        c.reset().unwrap();
        assert_eq!(c.async_event_requests(), outstanding);
        bad_doorbell(&c);
        assert_eq!(wait_event(|| c.async_events().unwrap()), vec![e]);
        assert_eq!(emu.stats().dma_faults, 0);
    }
}

/// A small admin queue keeps room for its commands: no AER in a 2-entry queue (one command at a
/// time), one in a 4-entry queue; admin commands and the events still work.
#[test]
fn a_small_admin_queue_keeps_room_for_commands() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    emulator_only(
        "async_events::a_small_admin_queue_keeps_room_for_commands",
        "admin queue sizes are set on the emulated controller",
    );
    for (entries, want) in [(2u16, 0usize), (4, 1), (32, 4)] {
        let emu = EmulatedController::new(config(Mode::Inline, &[(512, 1 << 12)])).unwrap();
        let opts = ControllerOptions {
            admin_entries: entries,
            ..test_options()
        };
        let c = Controller::with_options(emu.clone(), opts).expect("bring-up");
        assert_eq!(c.async_event_requests(), want, "{entries} entries");
        // Many more admin commands than entries: the queue never fills up.
        for _ in 0..3 * entries {
            c.smart_log().expect("SMART log");
        }
        if want > 0 {
            bad_doorbell(&c);
            let evs = wait_event(|| c.async_events().unwrap());
            assert_eq!(evs.len(), 1, "{entries} entries: {evs:?}");
            assert_eq!(c.async_event_requests(), want);
        }
        let mut q = c.create_qpair::<()>(Default::default()).unwrap();
        let ns = c.namespaces().remove(0);
        let mut b = c.alloc(512).unwrap();
        q.read_blocking(&ns, dioxide::Lba(0), b.as_mut_slice())
            .unwrap();
    }
}
