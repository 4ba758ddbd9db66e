//! Shadow doorbells (Doorbell Buffer Config): I/O through them with the data verified, the
//! counters of register writes and shadow updates, the option that turns them off, a
//! controller that does not offer them, and a reset that gives the controller new pages.
//!
//! The first test is device-independent: on a real controller (`NVME_PCI_ADDR`) it checks that
//! the driver uses shadow doorbells exactly when the controller offers them (QEMU's NVMe does
//! unless `dbcs=off`), so the guest shapes with and without cover both. The others need the
//! emulated controller's counters and configuration.

use dioxide::emulated::EmulatedController;
use dioxide::spec::Oacs;
use dioxide::spec::sqe::admin;
use dioxide::{Controller, IoFlags, IoOp, Lba, Namespace, QueueOptions, QueuePair, QueueStats};
use dioxide_tests::*;

const NS: (u32, u64) = (512, 1 << 16); // 32 MiB

/// Writes (when allowed) then reads `rounds × depth` 4 KiB blocks at queue depth `depth`,
/// verifying the data read; returns the queue pair's counters.
fn io_at_depth(
    c: &Controller,
    ns: &Namespace,
    write: bool,
    depth: usize,
    rounds: u64,
) -> QueueStats {
    let entries = queue_entries(c, 64);
    let depth = depth.min(entries as usize - 1);
    let opts = QueueOptions::default().with_entries(entries);
    let mut q: QueuePair<usize> = c.create_qpair(opts).unwrap();
    let blocks = 4096 / ns.block_size() as u64;
    let mut out = c.alloc(depth * 4096).unwrap();
    let back = c.alloc(depth * 4096).unwrap();
    for round in 0..rounds {
        let lba = |i: usize| Lba((round * depth as u64 + i as u64) * blocks);
        let ops: &[IoOp] = if write {
            &[IoOp::Write, IoOp::Read]
        } else {
            &[IoOp::Read]
        };
        if write {
            fill(out.as_mut_slice(), 0x5d0 + round);
        }
        for &op in ops {
            let buf = if op == IoOp::Write { &out } else { &back };
            for i in 0..depth {
                let s = buf.slice(i * 4096, 4096).unwrap();
                // SAFETY: one request per 4 KiB slice; the buffers outlive the polling below
                // and are not touched until every request came back.
                unsafe { q.submit_raw(op, ns, lba(i), s, IoFlags::NONE, i) }.unwrap();
            }
            let mut done = 0;
            while done < depth {
                done += q
                    .poll(usize::MAX, |i, r| {
                        r.unwrap_or_else(|e| panic!("{op:?} {i}: {e}"));
                    })
                    .unwrap();
            }
        }
        if write {
            assert!(
                out.as_slice() == back.as_slice(),
                "round {round}: data read back differs"
            );
        }
    }
    q.stats()
}

/// The counters' invariants: with shadow doorbells every update is a shadow update and the
/// register writes are at most the updates (at least one: the first update of an idle queue
/// always rings); without, no shadow update and one register write per update.
fn check_counters(s: &QueueStats, shadowed: bool) {
    assert!(s.sq_doorbells > 0 && s.cq_doorbells > 0, "{s:?}");
    if shadowed {
        assert_eq!(
            (s.sq_shadow_updates, s.cq_shadow_updates),
            (s.sq_doorbells, s.cq_doorbells),
            "{s:?}"
        );
        assert!(
            (1..=s.sq_doorbells).contains(&s.sq_mmio_writes) && s.cq_mmio_writes <= s.cq_doorbells,
            "{s:?}"
        );
    } else {
        assert_eq!((s.sq_shadow_updates, s.cq_shadow_updates), (0, 0), "{s:?}");
        assert_eq!(
            (s.sq_mmio_writes, s.cq_mmio_writes),
            (s.sq_doorbells, s.cq_doorbells),
            "{s:?}"
        );
    }
}

/// I/O at depths 1 and 32 through shadow doorbells when the controller offers them, data
/// verified; on the emulator the register writes the device counted are the ones the driver
/// says it made.
#[test]
fn io_through_shadow_doorbells_is_verified_and_counted() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    for &mode in device_modes() {
        let dev = controller_under_test(config(mode, &[NS]));
        let c = &dev.ctrl;
        let offered = c.identify().oacs.contains(Oacs::DOORBELL_BUFFER_CONFIG);
        assert_eq!(c.shadow_doorbells(), offered, "{}", dev.name());
        note(format!(
            "{}: Doorbell Buffer Config {}; shadow doorbells {}",
            dev.name(),
            if offered { "offered" } else { "not offered" },
            if c.shadow_doorbells() { "on" } else { "off" }
        ));
        let ns = first_namespace(c);
        let write = !dev.skip_writes("io_through_shadow_doorbells_is_verified_and_counted");
        for (depth, rounds) in [(1, dev.scale(64, 16)), (32, dev.scale(16, 4))] {
            let before = dev.emu.as_ref().map(|e| e.stats().io_doorbell_writes);
            let s = io_at_depth(c, &ns, write, depth, rounds);
            check_counters(&s, offered);
            if let (Some(emu), Some(before)) = (&dev.emu, before) {
                let seen = emu.stats().io_doorbell_writes - before;
                assert_eq!(seen, s.sq_mmio_writes + s.cq_mmio_writes, "{mode:?} {s:?}");
            }
            note(format!(
                "{}: QD{depth}: {} I/Os, register writes SQ {} CQ {}, shadow updates SQ {} CQ {}",
                dev.name(),
                s.completed,
                s.sq_mmio_writes,
                s.cq_mmio_writes,
                s.sq_shadow_updates,
                s.cq_shadow_updates
            ));
        }
    }
}

/// Doorbell Buffer Config commands the emulated controller received.
fn dbbuf_commands(emu: &EmulatedController) -> u64 {
    emu.stats().commands_with(0, admin::DOORBELL_BUFFER_CONFIG)
}

/// The option turns them off (no Doorbell Buffer Config is sent, every update a register
/// write), a controller without OACS bit 8 gets none, and both still do verified I/O.
#[test]
fn shadow_doorbells_off_or_not_offered() {
    if emulator_only(
        "shadow_doorbells_off_or_not_offered",
        "it configures the emulated controller and counts its commands",
    ) {
        return;
    }
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    for mode in MODES {
        // Offered and wanted, with the doorbell stride of CAP.DSTRD 2 (16 bytes): the shadow
        // slots follow the registers' layout.
        let mut cfg = config(mode, &[NS]);
        cfg.dstrd = 2;
        let (c, emu) = emulated(cfg);
        assert!(c.shadow_doorbells());
        assert_eq!(dbbuf_commands(&emu), 1);
        let s = io_at_depth(&c, &first_namespace(&c), true, 8, 4);
        check_counters(&s, true);
        drop(c);
        // Offered, turned off.
        let emu = EmulatedController::new(config(mode, &[NS])).unwrap();
        let c = Controller::with_options(emu.clone(), test_options().with_shadow_doorbells(false))
            .unwrap();
        assert!(!c.shadow_doorbells());
        assert_eq!(dbbuf_commands(&emu), 0);
        let before = emu.stats().io_doorbell_writes;
        let s = io_at_depth(&c, &first_namespace(&c), true, 32, 4);
        check_counters(&s, false);
        assert_eq!(
            emu.stats().io_doorbell_writes - before,
            s.sq_doorbells + s.cq_doorbells
        );
        drop(c);
        // Not offered.
        let mut cfg = config(mode, &[NS]);
        cfg.doorbell_buffer_config = false;
        let (c, emu) = emulated(cfg);
        assert!(!c.identify().oacs.contains(Oacs::DOORBELL_BUFFER_CONFIG));
        assert!(!c.shadow_doorbells());
        assert_eq!(dbbuf_commands(&emu), 0);
        let s = io_at_depth(&c, &first_namespace(&c), true, 8, 4);
        check_counters(&s, false);
    }
}

/// A reset makes the controller forget the pages: the bring-up gives it new ones, queue pairs
/// created afterwards use them, and one created before fails as after any reset.
#[test]
fn a_reset_gives_the_controller_new_shadow_pages() {
    if emulator_only(
        "a_reset_gives_the_controller_new_shadow_pages",
        "it counts the emulated controller's admin commands",
    ) {
        return;
    }
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    for mode in MODES {
        let (c, emu) = emulated(config(mode, &[NS]));
        let ns = first_namespace(&c);
        let mut old: QueuePair<usize> = c.create_qpair(QueueOptions::default()).unwrap();
        assert!(old.shadow_doorbells());
        let mut buf = c.alloc(4096).unwrap();
        old.read_blocking(&ns, Lba(0), buf.as_mut_slice()).unwrap();
        c.reset().unwrap();
        assert_eq!(dbbuf_commands(&emu), 2);
        assert!(c.shadow_doorbells());
        assert!(old.read_blocking(&ns, Lba(0), buf.as_mut_slice()).is_err());
        let s = io_at_depth(&c, &ns, true, 16, 4);
        check_counters(&s, true);
    }
}
