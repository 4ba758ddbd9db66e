//! The target over the embedding API: [`FileBackend`] on a [`Dioxide`] with the built-in
//! emulated controller, driven over loopback by the host.

use std::sync::Arc;

use super::*;
use crate::emulated::{EmulatedConfig, EmulatedController, Mode, NamespaceConfig};
use crate::nvmf::backend::FileBackend;
use crate::nvmf::host::{HostData, HostError};
use crate::nvmf::target::TargetOptions;
use crate::spec::Sqe;
use crate::spec::sqe::io as opc;
use crate::{Controller, Dioxide, FileOptions, Nsid};

fn dioxide() -> Dioxide {
    let emu = EmulatedController::new(EmulatedConfig {
        mode: Mode::Threaded,
        namespaces: vec![NamespaceConfig::memory(512, 16384)],
        ..EmulatedConfig::default()
    })
    .expect("emulated controller");
    Dioxide::builder()
        .controller(Controller::new(emu).expect("bring-up"))
        .pollers([None, None])
        .build()
        .expect("dioxide")
}

#[test]
fn target_on_blockfiles_of_the_emulated_controller() {
    watchdog(
        "target_on_blockfiles_of_the_emulated_controller",
        test_watchdog::STRESS,
        || {
            let dx = dioxide();
            let backend = Arc::new(FileBackend::new(&dx, 0).expect("file backend"));
            let opts = TargetOptions {
                max_h2c_data: 32 * 1024,
                max_c2h_data: 8192,
                ..TargetOptions::default()
            };
            let t = TestTarget::with_backend(backend, opts, 2);
            for d in ALL_DIGESTS {
                let mut c = connect(&t, d);
                assert_eq!(c.namespace(1).expect("identify ns"), (16384, 512));
                let mut qs: Vec<_> = (0..3).map(|_| c.io_queue(32).expect("I/O queue")).collect();
                for (i, q) in qs.iter_mut().enumerate() {
                    let lba = 2048 * i as u64;
                    // In-capsule (4 KiB) and R2T (128 KiB = MDTS, 4 H2CData PDUs) writes, read back
                    // in 8 KiB C2HData PDUs.
                    let a = pattern(i as u64 + 10, 4096);
                    let b = pattern(i as u64 + 20, 128 * 1024);
                    q.write(1, lba, a.clone(), 512).expect("in-capsule write");
                    q.write(1, lba + 8, b.clone(), 512).expect("R2T write");
                    assert_eq!(q.read(1, lba, 8, 512).expect("read"), a);
                    assert_eq!(q.read(1, lba + 8, 256, 512).expect("read"), b);
                    q.flush(1).expect("flush");
                    q.run(
                        "Write Zeroes",
                        Sqe::write_zeroes(1, lba + 8, 8, false),
                        HostData::None,
                    )
                    .expect("write zeroes");
                    let z = q.read(1, lba + 8, 16, 512).expect("read");
                    assert!(z[..4096].iter().all(|&x| x == 0));
                    assert_eq!(&z[4096..], &b[4096..8192]);
                }
                // A Write Zeroes larger than one zeroed buffer (512 KiB: four chained writes).
                let q = &mut qs[1];
                q.write(1, 4096, pattern(77, 16384), 512).expect("write");
                q.run(
                    "large Write Zeroes",
                    Sqe::write_zeroes(1, 4096 - 1000, 1024, false),
                    HostData::None,
                )
                .expect("large write zeroes");
                let z = q.read(1, 4096, 32, 512).expect("read");
                assert!(z[..24 * 512].iter().all(|&x| x == 0));
                assert_eq!(&z[24 * 512..], &pattern(77, 16384)[24 * 512..]);
                // Several commands in flight on one queue.
                let q = &mut qs[0];
                for k in 0..16u64 {
                    let sqe = Sqe::rw(opc::WRITE, 1, 8192 + k * 16, 16, false);
                    q.submit(sqe, HostData::Out(pattern(k, 8192)), k)
                        .expect("submit");
                }
                let mut n = 0;
                while n < 16 {
                    q.poll().expect("poll");
                    while let Some(done) = q.pop() {
                        done.result.expect("write");
                        n += 1;
                    }
                }
                c.shutdown().expect("shutdown");
            }
            t.stop();
            // What the host wrote is on the namespace, read through the embedding API.
            let file = dx
                .open_file(0, Nsid(1), FileOptions::new(8192, 256).with_len(256 * 512))
                .expect("open the written range");
            let mut back = vec![0u8; 8192];
            file.read_at(&mut back, 3 * 16 * 512).expect("read_at");
            assert_eq!(back, pattern(3, 8192));
            drop(file);
            dx.shutdown();
        },
    )
}

/// After a request completed: waits until each poller that submitted I/O since `before` (a
/// snapshot from before the request) went to sleep since (a poller sleeps only when idle:
/// nothing in flight, its sockets quiet), and returns the counters to pass next time.
fn until_asleep(dx: &Dioxide, before: &[crate::PollerStats]) -> Vec<crate::PollerStats> {
    loop {
        let now = dx.poller_stats();
        let asleep = (0..now.len())
            .all(|i| now[i].submitted == before[i].submitted || now[i].parks > before[i].parks);
        if asleep {
            return now;
        }
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
}

#[test]
fn poll_groups_run_inside_the_pollers_and_sleep_without_losing_a_wake_up() {
    watchdog(
        "poll_groups_run_inside_the_pollers_and_sleep_without_losing_a_wake_up",
        test_watchdog::STRESS,
        || {
            let emu = || {
                let e = EmulatedController::new(EmulatedConfig {
                    mode: Mode::Threaded,
                    namespaces: vec![NamespaceConfig::memory(512, 16384)],
                    ..EmulatedConfig::default()
                })
                .expect("emulated controller");
                Controller::new(e).expect("bring-up")
            };
            // Controller 0 is served; controller 1 is for a client thread of the process.
            let dx = Dioxide::builder()
                .controller(emu())
                .controller(emu())
                .pollers([None, None])
                .poller_idle(std::time::Duration::ZERO)
                .build()
                .expect("dioxide");
            let backend = Arc::new(FileBackend::new(&dx, 0).expect("file backend"));
            // An hour between housekeeping rounds: no timer hides a lost wake-up.
            let t = crate::nvmf::target::Target::new(TargetOptions {
                housekeeping: std::time::Duration::from_secs(3600),
                ..TargetOptions::default()
            });
            t.add_subsystem(crate::nvmf::target::Subsystem::new(SUBNQN, backend));
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            let serving = crate::nvmf::target::Serving::start(&t, &dx, listener).expect("serve");
            // Round robin: the admin queue lands on poller 0, the I/O queue on poller 1.
            let mut c = crate::nvmf::host::HostController::connect(
                serving.local_addr(),
                host_opts(ALL_DIGESTS[3]),
            )
            .expect("connect");
            let mut q = c.io_queue(32).expect("I/O queue");
            let before = dx.poller_stats();
            for k in 0..8u64 {
                let d = pattern(k, 4096);
                q.write(1, k * 8, d.clone(), 512).expect("write");
                assert_eq!(q.read(1, k * 8, 8, 512).expect("read"), d);
            }
            let after = dx.poller_stats();
            // The I/O of a connection goes to its own poller's queue pairs.
            assert_eq!(after[0].submitted, before[0].submitted, "{after:?}");
            assert!(after[1].submitted >= before[1].submitted + 16, "{after:?}");
            assert!(after[1].completed >= before[1].completed + 16, "{after:?}");
            // The pollers asleep before every request: woken by the host's socket, and by a
            // client thread's bio (each new thread's home poller is the next one round robin).
            let file = dx
                .open_file(1, Nsid(1), FileOptions::new(0, 256).with_len(256 * 512))
                .expect("open a file on the other controller");
            let mut seen = until_asleep(&dx, &before);
            for i in 0..40u64 {
                let d = pattern(100 + i, 4096);
                q.write(1, 1024 + (i % 16) * 8, d.clone(), 512)
                    .expect("write to a sleeping poller");
                seen = until_asleep(&dx, &seen);
                assert_eq!(q.read(1, 1024 + (i % 16) * 8, 8, 512).expect("read"), d);
                seen = until_asleep(&dx, &seen);
                let d = pattern(200 + i, 4096);
                std::thread::scope(|s| {
                    s.spawn(|| {
                        file.write_at(&d, (i % 16) * 4096).expect("client write");
                        let mut back = vec![0u8; 4096];
                        file.read_at(&mut back, (i % 16) * 4096)
                            .expect("client read");
                        assert_eq!(back, d);
                    });
                });
                seen = until_asleep(&dx, &seen);
            }
            drop(file);
            drop(q);
            c.shutdown().expect("shutdown");
            let reports = serving.stop(&dx, std::time::Duration::from_secs(30));
            assert_eq!(reports.len(), 2, "{reports:?}");
            assert_eq!(
                reports.iter().map(|r| r.connections).collect::<Vec<_>>(),
                [1, 1]
            );
            assert!(reports[1].stats.commands >= 16 + 80, "{reports:?}");
            dx.shutdown();
        },
    )
}

#[test]
fn overlapping_commands_in_flight_on_a_poller_wait_their_turn() {
    watchdog(
        "overlapping_commands_in_flight_on_a_poller_wait_their_turn",
        test_watchdog::STRESS,
        || {
            let dx = dioxide();
            let backend = Arc::new(FileBackend::new(&dx, 0).expect("file backend"));
            let t = crate::nvmf::target::Target::new(TargetOptions::default());
            t.add_subsystem(crate::nvmf::target::Subsystem::new(SUBNQN, backend));
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            let serving = crate::nvmf::target::Serving::start(&t, &dx, listener).expect("serve");
            let mut c = crate::nvmf::host::HostController::connect(
                serving.local_addr(),
                host_opts(ALL_DIGESTS[0]),
            )
            .expect("connect");
            let mut q = c.io_queue(64).expect("I/O queue");
            // Writes of the same page (and its 512-byte sectors), Write Zeroes and reads, all in
            // flight together: the file's range lock refuses to wait on a poller, so the
            // backend starts each one once the overlapping one finished; none fails.
            for round in 0..4u64 {
                let mut n = 0u64;
                for k in 0..48u64 {
                    let (sqe, data) = match k % 4 {
                        0 => (
                            Sqe::rw(opc::WRITE, 1, 64, 8, false),
                            HostData::Out(pattern(round * 100 + k, 4096)),
                        ),
                        1 => (
                            Sqe::rw(opc::WRITE, 1, 64 + k % 8, 1, false),
                            HostData::Out(pattern(round * 100 + k, 512)),
                        ),
                        2 => (
                            Sqe::rw(opc::READ, 1, 64, 8, false),
                            HostData::In(vec![0; 4096]),
                        ),
                        // Unaligned Write Zeroes sharing pages with the others (as mkfs sends).
                        _ => (Sqe::write_zeroes(1, 60 + k % 8, 3, false), HostData::None),
                    };
                    q.submit(sqe, data, k).expect("submit");
                    n += 1;
                }
                let mut done = 0;
                while done < n {
                    q.poll().expect("poll");
                    while let Some(d) = q.pop() {
                        d.result.expect("an overlapping command");
                        done += 1;
                    }
                }
            }
            // The page holds whole writes: read it twice, the same both times.
            let a = q.read(1, 64, 8, 512).expect("read");
            q.write(1, 64, pattern(7, 4096), 512).expect("write");
            assert_eq!(q.read(1, 64, 8, 512).expect("read"), pattern(7, 4096));
            assert_eq!(a.len(), 4096);
            drop(q);
            c.shutdown().expect("shutdown");
            let reports = serving.stop(&dx, std::time::Duration::from_secs(30));
            assert_eq!(reports.iter().map(|r| r.stats.errors).sum::<u64>(), 0);
            dx.shutdown();
        },
    )
}

/// A Dataset Management range list: `(first LBA, blocks)` as the host sends it.
fn dsm_ranges(ranges: &[(u64, u32)]) -> Vec<u8> {
    let mut v = vec![0u8; ranges.len() * 16];
    for (i, &(slba, n)) in ranges.iter().enumerate() {
        v[i * 16 + 4..i * 16 + 8].copy_from_slice(&n.to_le_bytes());
        v[i * 16 + 8..i * 16 + 16].copy_from_slice(&slba.to_le_bytes());
    }
    v
}

#[test]
fn flush_write_zeroes_and_deallocate_reach_the_backing_controller() {
    watchdog(
        "flush_write_zeroes_and_deallocate_reach_the_backing_controller",
        test_watchdog::STRESS,
        || {
            use crate::spec::Oncs;
            // (ONCS, VWC) of the backing controller: everything, then nothing.
            for (oncs, vwc) in [
                (Oncs::DSM | Oncs::WRITE_ZEROES, true),
                (Oncs::empty(), false),
            ] {
                let emu = EmulatedController::new(EmulatedConfig {
                    mode: Mode::Threaded,
                    namespaces: vec![NamespaceConfig::memory(512, 16384)],
                    oncs,
                    vwc,
                    ..EmulatedConfig::default()
                })
                .expect("emulated controller");
                let dx = Dioxide::builder()
                    .controller(Controller::new(emu.clone()).expect("bring-up"))
                    .pollers([None, None])
                    .build()
                    .expect("dioxide");
                let backend = Arc::new(FileBackend::new(&dx, 0).expect("file backend"));
                let t = TestTarget::with_backend(backend, TargetOptions::default(), 2);
                let mut c = connect(&t, ALL_DIGESTS[0]);
                // Identify Controller follows the backing controller (Write Zeroes is always
                // offered: the target zeroes on its side when the device cannot).
                let id = c.identify().clone();
                assert_eq!(id.oncs.contains(Oncs::DSM), oncs.contains(Oncs::DSM));
                assert!(id.oncs.contains(Oncs::WRITE_ZEROES));
                assert_eq!(id.vwc & 1 != 0, vwc);
                let mut q = c.io_queue(32).expect("I/O queue");
                let data = pattern(5, 64 * 512);
                q.write(1, 100, data.clone(), 512).expect("write");
                let count = |op| emu.stats().io_commands_with(op);
                let (w0, z0, d0, f0) = (
                    count(opc::WRITE),
                    count(opc::WRITE_ZEROES),
                    count(opc::DATASET_MANAGEMENT),
                    count(opc::FLUSH),
                );
                // Flush: to the device only when it has a volatile write cache.
                q.flush(1).expect("flush");
                assert_eq!(count(opc::FLUSH) - f0, u64::from(vwc));
                // Write Zeroes of 16 blocks: one device Write Zeroes, or one zeroed write.
                q.run(
                    "Write Zeroes",
                    Sqe::write_zeroes(1, 108, 16, false),
                    HostData::None,
                )
                .expect("write zeroes");
                let native = oncs.contains(Oncs::WRITE_ZEROES);
                assert_eq!(count(opc::WRITE_ZEROES) - z0, u64::from(native));
                assert_eq!(count(opc::WRITE) - w0, u64::from(!native));
                let mut model = data.clone();
                model[8 * 512..24 * 512].fill(0);
                // Deallocate two ranges in one command, or Invalid Opcode.
                let r = q.run(
                    "Deallocate",
                    Sqe::dsm_deallocate(1, 2, 0),
                    HostData::Out(dsm_ranges(&[(130, 4), (150, 10)])),
                );
                if oncs.contains(Oncs::DSM) {
                    r.expect("deallocate");
                    assert_eq!(count(opc::DATASET_MANAGEMENT) - d0, 1);
                    model[30 * 512..34 * 512].fill(0);
                    model[50 * 512..60 * 512].fill(0);
                    // A range past the namespace: LBA Out of Range, nothing deallocated.
                    let e = q
                        .run(
                            "Deallocate past the end",
                            Sqe::dsm_deallocate(1, 2, 0),
                            HostData::Out(dsm_ranges(&[(100, 1), (16383, 2)])),
                        )
                        .expect_err("past the namespace");
                    let HostError::Status { status, .. } = e else {
                        panic!("{e}")
                    };
                    assert_eq!(status.sc, crate::spec::status::generic::LBA_OUT_OF_RANGE);
                    assert_eq!(count(opc::DATASET_MANAGEMENT) - d0, 1);
                } else {
                    let e = r.expect_err("no Dataset Management");
                    let HostError::Status { status, .. } = e else {
                        panic!("{e}")
                    };
                    assert_eq!(status.sc, crate::spec::status::generic::INVALID_OPCODE);
                    assert_eq!(count(opc::DATASET_MANAGEMENT) - d0, 0);
                }
                assert_eq!(q.read(1, 100, 64, 512).expect("read back"), model);
                c.shutdown().expect("shutdown");
                t.stop();
                dx.shutdown();
            }
        },
    )
}
