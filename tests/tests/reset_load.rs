//! Reset under load on the emulated controller: [`Controller::reset`] while a polled queue
//! pair, blocking calls and the embedding API's poller all have reads going. Every request ends
//! exactly once (with its data, or failed by the reset), the clients carry on on new queue
//! pairs, and their data is verified (the scenario: `reset_scenario`). The same scenario runs on
//! QEMU's controller through VFIO in the HIL fault scenario (`hil_faults.rs`).

mod reset_scenario;

use dioxide::{Lba, QueueOptions};
use dioxide_tests::*;

#[test]
fn reset_under_load_ends_every_request_once_and_clients_go_on() {
    let _w = test_watchdog::arm(test_watchdog::STRESS);
    emulator_only(
        "reset_load::reset_under_load_ends_every_request_once_and_clients_go_on",
        "the real controller's run is the HIL fault scenario's",
    );
    for &mode in device_modes() {
        let (c, emu) = emulated(config(mode, &[(512, 1 << 16), (4096, 1 << 14)]));
        // Every namespace shape: a 512-byte and a 4 KiB block size.
        for ns in c.namespaces() {
            let bs = ns.block_size() as usize;
            let base = 16;
            let mut q = c
                .create_qpair::<()>(QueueOptions::default())
                .expect("queue pair");
            let b = pattern_buffer(&c, reset_scenario::REGION_BLOCKS as usize * bs, 7);
            q.write_blocking(&ns, Lba(base), b.as_slice())
                .expect("prefill");
            drop(q);
            for t in reset_scenario::reset_under_load(&c, &ns, base, 7) {
                eprintln!("{mode:?} {} B: {t:?}", ns.block_size());
                assert_eq!((t.lost, t.double), (0, 0), "{}: lost or doubled", t.column);
                assert_eq!(t.once, t.issued, "{}", t.column);
                assert!(t.problem.is_none(), "{}: {:?}", t.column, t.problem);
                assert!(t.verified, "{}", t.column);
                if t.column == "async" {
                    assert!(t.failed >= 8, "the batch held across the reset: {t:?}");
                }
            }
        }
        assert_eq!(emu.stats().dma_faults, 0);
    }
}

/// With every granted queue id in use, renewing after a reset reuses the stale pairs' ids
/// (and vectors): the stale pair hands its id back before the new one is created.
#[test]
fn renew_reuses_queue_ids_when_every_id_is_in_use() {
    let _w = test_watchdog::arm(test_watchdog::STRESS);
    emulator_only(
        "reset_load::renew_reuses_queue_ids_when_every_id_is_in_use",
        "the emulated controller's queue count is configured",
    );
    let mode = device_modes()[0];
    let mut cfg = config(mode, &[(512, 1 << 12)]);
    cfg.max_io_queues = 2;
    let (c, emu) = emulated(cfg);
    let ns = c.namespaces().into_iter().next().expect("a namespace");
    let bs = ns.block_size() as usize;
    let mut qs: Vec<_> = (0..2)
        .map(|_| {
            c.create_qpair::<()>(QueueOptions::default())
                .expect("queue pair")
        })
        .collect();
    c.reset().expect("reset");
    for (i, q) in qs.iter_mut().enumerate() {
        assert!(q.is_stale());
        assert!(
            q.renew().expect("renew with every id in use"),
            "queue pair {i}"
        );
        assert!(!q.is_stale());
        let b = pattern_buffer(&c, 8 * bs, i as u64 + 1);
        q.write_blocking(&ns, Lba(8 * i as u64), b.as_slice())
            .expect("write after renew");
        let mut r = c.alloc(8 * bs).expect("buffer");
        q.read_blocking(&ns, Lba(8 * i as u64), r.as_mut_slice())
            .expect("read after renew");
        assert_eq!(r.as_slice(), b.as_slice());
    }
    assert_eq!(emu.stats().dma_faults, 0);
}
