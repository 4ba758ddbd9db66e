//! Emulator-only tests of device removal announced by the platform (vfio-pci's device request
//! notification, modelled by `EmulatedController::request_removal`): every request in flight
//! fails exactly once with "device removed", new submissions are refused with it, the bus is
//! told to release the device, and a new controller on a fresh device works afterwards.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use dioxide::emulated::{Action, Fault, Trigger};
use dioxide::{DeadReason, Error, IoError, IoResult, Lba, QueueOptions};
use dioxide_tests::*;

const NS: (u32, u64) = (512, 1 << 20);

#[test]
fn announced_removal_fails_in_flight_requests_once_and_releases_the_device() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    emulator_only(
        "unplug::announced_removal_fails_in_flight_requests_once_and_releases_the_device",
        "removal is injected into the emulated controller",
    );
    for mode in MODES {
        let (c, emu) = emulated(config(mode, &[NS]));
        let ns = c.namespaces().remove(0);
        let buf = c.alloc(8 * 512).unwrap();
        // Held by the device: in flight when the removal is announced.
        let mut q = c.create_qpair::<u64>(QueueOptions::default()).unwrap();
        held_reads(&mut q, &emu, &ns, &buf);
        emu.request_removal();
        let mut got: HashMap<u64, IoResult> = HashMap::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while got.len() < 8 {
            assert!(
                Instant::now() < deadline,
                "only {} of 8 completions",
                got.len()
            );
            match q.poll(usize::MAX, |t, r| {
                assert!(got.insert(t, r).is_none(), "tag {t} completed twice");
            }) {
                Ok(_) => {}
                Err(Error::QueueDead {
                    reason: DeadReason::DeviceGone,
                    ..
                }) => {}
                Err(e) => panic!("poll: {e}"),
            }
        }
        for (t, r) in &got {
            assert!(
                matches!(
                    r,
                    Err(IoError::Aborted {
                        reason: DeadReason::DeviceGone,
                        ..
                    })
                ),
                "tag {t}: {r:?}"
            );
            let msg = r.as_ref().unwrap_err().to_string();
            assert!(msg.contains("device removed"), "{msg}");
        }
        assert_eq!(
            emu.releases(),
            1,
            "the bus is told to let the device go once"
        );
        // Nothing more is delivered, new requests are refused with the same reason.
        let e = q
            .poll(8, |t, _| panic!("tag {t} delivered again"))
            .unwrap_err();
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
        let s = buf.slice(0, 512).unwrap();
        // SAFETY: refused before the device sees it.
        let rej = unsafe { q.read_raw(&ns, Lba(9), s, 99) }.unwrap_err();
        assert!(rej.error.to_string().contains("removed"), "{}", rej.error);
        assert!(matches!(c.csts(), Err(Error::DeviceGone { .. })));
        assert!(matches!(
            c.create_qpair::<u64>(QueueOptions::default()),
            Err(Error::DeviceGone { .. })
        ));
        drop(q);
        drop(c); // no shutdown handshake on a removed device, and no hang

        // "Plugged back": a new controller on a fresh device works, data verified.
        let (c, _emu) = emulated(config(mode, &[NS]));
        let ns = c.namespaces().remove(0);
        let mut q = c.create_qpair::<u64>(QueueOptions::default()).unwrap();
        let mut b = c.alloc(512).unwrap();
        b.as_mut_slice().fill(0x5a);
        q.write_blocking(&ns, Lba(3), b.as_slice()).unwrap();
        let mut r = c.alloc(512).unwrap();
        q.read_blocking(&ns, Lba(3), r.as_mut_slice()).unwrap();
        assert!(r.as_slice().iter().all(|&x| x == 0x5a));
    }
}

#[test]
fn pooled_pollers_report_device_removed_and_do_not_hang() {
    use dioxide::{Dioxide, EmbedError, FileOptions, Nsid};
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    emulator_only(
        "unplug::pooled_pollers_report_device_removed_and_do_not_hang",
        "removal is injected into the emulated controller",
    );
    for mode in MODES {
        let (ctrl, emu) = emulated(config(mode, &[(512, 1 << 14)]));
        let dx = Dioxide::builder()
            .controller(ctrl)
            .pollers([None, None])
            .build()
            .unwrap();
        let file = dx
            .open_file(0, Nsid(1), FileOptions::new(0, 2048).writable(true))
            .unwrap();
        let page = vec![0x33u8; 4096];
        assert_eq!(file.write_at(&page, 0).unwrap(), page.len());
        emu.surprise_remove();
        let clients: Vec<_> = (0..4u64)
            .map(|t| {
                let f = file.clone();
                std::thread::spawn(move || {
                    let data = vec![t as u8; 4096];
                    let until = Instant::now() + Duration::from_secs(3);
                    let mut errors = Vec::new();
                    let mut i = 0u64;
                    while Instant::now() < until && errors.len() < 4 {
                        let off = (t + 4 * (i % 64)) * 4096;
                        i += 1;
                        if let Err(e) = f.write_at(&data, off).and_then(|_| f.flush()) {
                            errors.push(e);
                        }
                    }
                    errors
                })
            })
            .collect();
        let mut seen = 0;
        for c in clients {
            for e in c.join().expect("client thread") {
                assert!(matches!(e, EmbedError::DeviceRemoved { .. }), "{e}");
                assert!(e.to_string().contains("device removed"), "{e}");
                seen += 1;
            }
        }
        assert!(seen > 0, "no request reported the removal");
        drop(file);
        drop(dx); // shuts the pollers down without hanging
    }
}

/// Eight one-block reads (LBAs 0-7, tags 0-7) into `buf`, rung on `q`, which the emulated
/// controller holds for ever: in flight when the removal comes.
fn held_reads(
    q: &mut dioxide::QueuePair<u64>,
    emu: &dioxide::emulated::EmulatedController,
    ns: &dioxide::Namespace,
    buf: &dioxide::DmaBuffer,
) {
    emu.inject(Fault::always(
        Trigger::LbaRange {
            nsid: ns.nsid().0,
            start: 0,
            end: 8,
            opcode: None,
        },
        Action::NeverComplete,
    ));
    for t in 0..8u64 {
        let s = buf.slice(t as usize * 512, 512).unwrap();
        // SAFETY: the callers keep `buf` alive until the queue pair is gone; the data is not read.
        unsafe { q.read_raw(ns, Lba(t), s, t) }.unwrap();
    }
    q.ring();
}

/// Waits (bounded) until the driver has told the emulated bus to let the device go.
fn wait_released(emu: &dioxide::emulated::EmulatedController, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while emu.releases() == 0 {
        assert!(
            Instant::now() < deadline,
            "{what}: an announced removal of an idle controller was not noticed in 10 s"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn announced_removal_of_an_idle_controller_is_noticed_without_io() {
    use dioxide::{Dioxide, EmbedError, FileOptions, Nsid};
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    emulator_only(
        "unplug::announced_removal_of_an_idle_controller_is_noticed_without_io",
        "removal is injected into the emulated controller",
    );
    for mode in MODES {
        // The raw layer: a controller and an idle queue pair, nobody polling.
        let (c, emu) = emulated(config(mode, &[NS]));
        let ns = c.namespaces().remove(0);
        let mut q = c.create_qpair::<u64>(QueueOptions::default()).unwrap();
        let mut buf = c.alloc(512).unwrap();
        buf.as_mut_slice().fill(0x11);
        q.write_blocking(&ns, Lba(0), buf.as_slice()).unwrap();
        emu.request_removal();
        wait_released(&emu, "raw controller");
        assert_eq!(emu.releases(), 1, "the device is released once");
        assert!(matches!(c.csts(), Err(Error::DeviceGone { .. })));
        // The idle queue pair learns it at its next poll: a request submitted now (the submit
        // path reads no shared state) ends once, failed with "device removed".
        let s = buf.slice(0, 512).unwrap();
        // SAFETY: `buf` outlives the queue pair; the data is not read.
        match unsafe { q.read_raw(&ns, Lba(0), s, 5) } {
            Err(rej) => {
                assert_eq!(rej.ctx, 5);
                assert!(rej.error.to_string().contains("removed"), "{}", rej.error);
            }
            Ok(()) => {
                q.ring();
                let mut got = Vec::new();
                let deadline = Instant::now() + Duration::from_secs(10);
                while got.is_empty() {
                    assert!(Instant::now() < deadline, "the request never ended");
                    let _ = q.poll(8, |t, r| got.push((t, r)));
                }
                let _ = q.poll(8, |t, r| got.push((t, r)));
                assert_eq!(got.len(), 1, "{got:?}");
                let (t, r) = &got[0];
                assert_eq!(*t, 5);
                let msg = r.as_ref().unwrap_err().to_string();
                assert!(msg.contains("device removed"), "{msg}");
            }
        }
        let e = q
            .read_blocking(&ns, Lba(0), buf.as_mut_slice())
            .unwrap_err();
        assert!(e.to_string().contains("removed"), "{e}");
        drop(q);
        drop(c);
        assert_eq!(
            emu.releases(),
            1,
            "dropping the controller releases nothing more"
        );

        // The embedding API: idle pollers, a file; every later request reports the removal.
        let (ctrl, emu) = emulated(config(mode, &[(512, 1 << 14)]));
        let dx = Dioxide::builder()
            .controller(ctrl)
            .pollers([None])
            .build()
            .unwrap();
        let file = dx
            .open_file(
                0,
                Nsid(1),
                FileOptions::new(0, 2048).writable(true).with_len(1 << 20),
            )
            .unwrap();
        let page = vec![0x44u8; 4096];
        assert_eq!(file.write_at(&page, 0).unwrap(), page.len());
        emu.request_removal();
        wait_released(&emu, "Dioxide");
        let mut back = vec![0u8; 4096];
        let e = file.read_at(&mut back, 8192).unwrap_err();
        assert!(matches!(e, EmbedError::DeviceRemoved { .. }), "{e}");
        assert!(e.to_string().contains("device removed"), "{e}");
        // A write may stay in the page cache until the flush: one of the two reports it.
        let e = file
            .write_at(&page, 16384)
            .and_then(|_| file.flush())
            .unwrap_err();
        assert!(matches!(e, EmbedError::DeviceRemoved { .. }), "{e}");
        drop(file);
        drop(dx);
        assert_eq!(emu.releases(), 1);
    }
}

#[test]
fn the_device_is_released_before_any_request_fails_with_device_removed() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    emulator_only(
        "unplug::the_device_is_released_before_any_request_fails_with_device_removed",
        "removal is injected into the emulated controller",
    );
    for mode in MODES {
        let (c, emu) = emulated(config(mode, &[NS]));
        let ns = c.namespaces().remove(0);
        let buf = c.alloc(8 * 512).unwrap();
        let mut q = c.create_qpair::<u64>(QueueOptions::default()).unwrap();
        held_reads(&mut q, &emu, &ns, &buf);
        let q = Arc::new(Mutex::new(q));
        // Requests handed back failed, and how many of them before the bus let the device go
        // (their buffers would be free while the device can still write to them).
        let failed = Arc::new(AtomicU64::new(0));
        let early = Arc::new(AtomicU64::new(0));
        let poller = {
            let (q, failed, early, emu) = (q.clone(), failed.clone(), early.clone(), emu.clone());
            move || {
                let mut q = q.lock().unwrap();
                // Enough empty polls for the housekeeping (removal and health checks) to run
                // many times.
                for _ in 0..50_000 {
                    let _ = q.poll(usize::MAX, |t, r| {
                        assert!(r.is_err(), "tag {t}: {r:?}");
                        failed.fetch_add(1, Ordering::AcqRel);
                        if emu.releases() == 0 {
                            early.fetch_add(1, Ordering::AcqRel);
                        }
                    });
                }
            }
        };
        let joined = Arc::new(Mutex::new(None));
        let slot = joined.clone();
        emu.on_release(move || {
            // The release is under way (the device still works): another thread polls the
            // queue pair meanwhile. It must hand nothing back now; it may wait for the release
            // in the driver, so it is waited for a bounded time only.
            let t = std::thread::spawn(poller);
            let deadline = Instant::now() + Duration::from_secs(2);
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            *slot.lock().unwrap() = Some(t);
        });
        emu.request_removal();
        wait_released(&emu, "release ordering");
        let t = joined.lock().unwrap().take().expect("the release hook ran");
        t.join().expect("the polling thread");
        assert_eq!(
            early.load(Ordering::Acquire),
            0,
            "{mode:?}: requests were handed back failed before the device was released"
        );
        let mut q = q.lock().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while failed.load(Ordering::Acquire) < 8 {
            assert!(Instant::now() < deadline, "the held requests never ended");
            let _ = q.poll(usize::MAX, |t, r| {
                assert!(r.is_err(), "tag {t}: {r:?}");
                failed.fetch_add(1, Ordering::AcqRel);
            });
        }
        assert_eq!(failed.load(Ordering::Acquire), 8);
        assert_eq!(emu.releases(), 1);
    }
}

#[test]
fn a_removed_controller_stays_removed_through_a_reset() {
    use std::sync::{Arc, Mutex};
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    emulator_only(
        "unplug::a_removed_controller_stays_removed_through_a_reset",
        "removal is injected into the emulated controller",
    );
    for mode in MODES {
        // A reset after the removal is refused, and the device is not released again.
        let (c, emu) = emulated(config(mode, &[NS]));
        let ns = c.namespaces().remove(0);
        let mut q = c.create_qpair::<u64>(QueueOptions::default()).unwrap();
        let mut buf = c.alloc(512).unwrap();
        emu.request_removal();
        wait_released(&emu, "reset after removal");
        let e = c.reset().unwrap_err();
        assert!(matches!(e, Error::DeviceGone { .. }), "{mode:?}: {e}");
        assert_eq!(emu.releases(), 1, "{mode:?}: the device was released again");
        let e = q
            .read_blocking(&ns, Lba(0), buf.as_mut_slice())
            .unwrap_err();
        assert!(e.to_string().contains("device removed"), "{mode:?}: {e}");
        assert!(matches!(
            c.create_qpair::<u64>(QueueOptions::default()),
            Err(Error::DeviceGone { .. })
        ));
        drop(q);
        drop(c);
        assert_eq!(emu.releases(), 1);

        // A reset started while the device is being released: the removal wins (the
        // controller ends up gone, released once), whether the reset finished first or waited
        // for the release.
        let (c, emu) = emulated(config(mode, &[NS]));
        let ns = c.namespaces().remove(0);
        let mut q = c.create_qpair::<u64>(QueueOptions::default()).unwrap();
        let mut buf = c.alloc(512).unwrap();
        let joined = Arc::new(Mutex::new(None));
        let (slot, c2) = (joined.clone(), c.clone());
        emu.on_release(move || {
            let t = std::thread::spawn(move || {
                let _ = c2.reset();
            });
            // The reset may wait for this release in the driver: bounded wait.
            let deadline = Instant::now() + Duration::from_secs(2);
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            *slot.lock().unwrap() = Some(t);
        });
        emu.request_removal();
        wait_released(&emu, "reset during removal");
        let t = joined.lock().unwrap().take().expect("the release hook ran");
        t.join().expect("the resetting thread");
        // The controller is known gone: refused without touching the device, and not
        // released a second time (which a "live" state left by the reset would lead to).
        let e = c.reset().unwrap_err();
        assert!(matches!(e, Error::DeviceGone { .. }), "{mode:?}: {e}");
        assert_eq!(
            emu.releases(),
            1,
            "{mode:?}: the reset overwrote the removal (released again)"
        );
        assert!(matches!(
            c.create_qpair::<u64>(QueueOptions::default()),
            Err(Error::DeviceGone { .. })
        ));
        // A queue pair from before fails its requests (with the removal, or with the reset if
        // the reset finished before the removal was published).
        assert!(q.read_blocking(&ns, Lba(0), buf.as_mut_slice()).is_err());
        drop(q);
        drop(c);
        assert_eq!(emu.releases(), 1);
    }
}

#[test]
fn dropping_the_controller_during_a_release_closes_the_bus_before_returning() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, mpsc};
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    emulator_only(
        "unplug::dropping_the_controller_during_a_release_closes_the_bus_before_returning",
        "removal is injected into the emulated controller",
    );
    for mode in MODES {
        let (c, emu) = emulated(config(mode, &[NS]));
        let releasing = Arc::new(AtomicBool::new(false));
        let (dropped_tx, dropped_rx) = mpsc::channel::<()>();
        let r = releasing.clone();
        emu.on_release(move || {
            // On the removal watch thread: the release is under way while the user drops the
            // controller. The drop may wait for this release: bounded wait for its signal.
            r.store(true, Ordering::Release);
            let _ = dropped_rx.recv_timeout(Duration::from_secs(2));
        });
        emu.request_removal();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !releasing.load(Ordering::Acquire) {
            assert!(
                Instant::now() < deadline,
                "the removal watch never released"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(c);
        // When the last handle's drop returns, nothing of the controller holds the bus any
        // more (a VFIO device file is closed: its PCI address can be opened again).
        let holders = Arc::strong_count(&emu);
        let _ = dropped_tx.send(());
        assert_eq!(
            holders, 1,
            "{mode:?}: the controller still held the bus after its last handle was dropped"
        );
        assert_eq!(emu.releases(), 1);
    }
}
