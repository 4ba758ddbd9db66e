//! Every PDU and command path with well-behaved hosts.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::*;
use crate::Nsid;
use crate::nvmf::fabrics::{self, DISCOVERY_NQN, lid as flid};
use crate::nvmf::host::{HostController, HostData, HostError};
use crate::nvmf::target::{Subsystem, Target, TargetOptions};
use crate::spec::sqe::{admin, io as opc};
use crate::spec::{SmartLog, Sqe};

fn small_pdus() -> TargetOptions {
    TargetOptions {
        // Writes above 8 KiB go through R2T, H2CData at most 16 KiB, C2HData at most 4 KiB.
        in_capsule: 8192,
        max_h2c_data: 16 * 1024,
        max_c2h_data: 4096,
        ..TargetOptions::default()
    }
}

#[test]
fn io_with_every_digest_combination() {
    watchdog(
        "io_with_every_digest_combination",
        test_watchdog::INTEGRATION,
        || {
            let mem = mem_backend();
            let t = TestTarget::with_backend(mem.clone(), small_pdus(), 1);
            for (i, d) in ALL_DIGESTS.into_iter().enumerate() {
                let mut c = connect(&t, d);
                let mut q = c.io_queue(32).expect("I/O queue");
                assert_eq!(q.digests(), d);
                assert_eq!(q.max_h2c_data(), 16 * 1024);
                let base = 1000 * i as u64;
                // In-capsule write (4 KiB), R2T write (64 KiB: 4 H2CData PDUs).
                let small = pattern(i as u64, 4096);
                q.write(1, base, small.clone(), 512)
                    .expect("in-capsule write");
                let big = pattern(100 + i as u64, 65536);
                q.write(1, base + 8, big.clone(), 512).expect("R2T write");
                // Reads: 4 KiB (one C2HData), 68 KiB (17 C2HData PDUs).
                assert_eq!(q.read(1, base, 8, 512).expect("read"), small);
                let both = q.read(1, base, 136, 512).expect("read across both");
                assert_eq!(&both[..4096], &small[..]);
                assert_eq!(&both[4096..], &big[..]);
                // And on the backend itself.
                let snap = mem.snapshot(Nsid(1));
                let at = (base * 512) as usize;
                assert_eq!(&snap[at..at + 4096], &small[..]);
                assert_eq!(&snap[at + 4096..at + 4096 + 65536], &big[..]);
                let before = mem.flushes.load(Ordering::Relaxed);
                q.flush(1).expect("flush");
                assert_eq!(mem.flushes.load(Ordering::Relaxed), before + 1);
                c.keep_alive().expect("keep alive");
                c.shutdown().expect("shutdown");
            }
            t.stop();
        },
    )
}

#[test]
fn identify_fields_the_linux_host_checks_and_stable_ids() {
    watchdog(
        "identify_fields_the_linux_host_checks_and_stable_ids",
        test_watchdog::INTEGRATION,
        || {
            let t = TestTarget::with_backend(mem_backend(), TargetOptions::default(), 1);
            let mut a = connect(&t, Digests::default());
            let mut b = connect(&t, Digests::default());
            assert_ne!(a.cntlid(), b.cntlid());
            let id = a.identify().clone();
            let f = a.fabrics_identify();
            assert_eq!(id.cntlid, a.cntlid());
            assert_eq!(id.subnqn, SUBNQN);
            assert_eq!(f.cntrltype, 1);
            assert!(f.kas > 0 && f.ioccsz >= 4 && f.iorcsz >= 1 && f.icdoff == 0);
            assert_eq!(f.ioccsz * 16 - 64, 8192);
            assert_eq!(id.maxcmd, 128);
            assert_ne!(id.sgls & 3, 0);
            assert_eq!((id.lpa, id.cmic), (0, 0));
            assert_eq!(id.nn, 2);
            assert_eq!(a.cap().max_queue_entries(), 128);
            assert_eq!(a.namespace(1).expect("ns 1"), (8192, 512));
            assert_eq!(a.namespace(2).expect("ns 2"), (256, 4096));
            // Active namespace list and descriptors: NGUID and UUID the same on both controllers.
            let (_, list) = a
                .admin()
                .run(
                    "Identify active list",
                    Sqe::identify(2, 0, 0),
                    HostData::In(vec![0; 4096]),
                )
                .expect("active ns list");
            assert_eq!(&list[..12], &[1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0]);
            let desc = |c: &mut HostController, nsid| {
                c.admin()
                    .run(
                        "Identify descriptors",
                        Sqe::identify(3, nsid, 0),
                        HostData::In(vec![0; 4096]),
                    )
                    .expect("descriptors")
                    .1
            };
            let (da, db) = (desc(&mut a, 1), desc(&mut b, 1));
            assert_eq!(da, db);
            assert_eq!((da[0], da[1]), (fabrics::nidt::NGUID, 16));
            assert_eq!((da[20], da[21]), (fabrics::nidt::UUID, 16));
            assert_ne!(&da[4..20], &[0u8; 16][..]);
            assert_ne!(desc(&mut a, 2), da);
            // Number of Queues was granted; the SMART log of a backend without a controller
            // is what the target counted (not zeros).
            assert!(a.io_queue_count() >= 1);
            let smart = a.log_page(2, 0xffff_ffff, 512, 0).expect("SMART log");
            let smart = SmartLog::from_bytes(smart[..].try_into().expect("512 bytes"));
            assert_eq!((smart.available_spare, smart.power_cycles), (100, 1));
            // Abort: the command is not aborted (DW0 bit 0), Get Features echoes what was set.
            let (cqe, _) = a
                .admin()
                .run("Abort", Sqe::abort(1, 3), HostData::None)
                .expect("abort");
            assert_eq!(cqe.dw0 & 1, 1);
            a.admin()
                .run(
                    "Set KATO",
                    Sqe::set_features(fabrics::fid::KEEP_ALIVE_TIMER, 30_000),
                    HostData::None,
                )
                .expect("set KATO");
            let (cqe, _) = a
                .admin()
                .run(
                    "Get KATO",
                    Sqe::get_features(fabrics::fid::KEEP_ALIVE_TIMER),
                    HostData::None,
                )
                .expect("get KATO");
            assert_eq!(cqe.dw0, 30_000);
            let (cqe, _) = a
                .admin()
                .run(
                    "Get Number of Queues",
                    Sqe::get_features(crate::spec::sqe::fid::NUMBER_OF_QUEUES),
                    HostData::None,
                )
                .expect("get queues");
            assert_eq!(cqe.dw0 & 0xffff, a.io_queue_count() as u32 - 1);
            let (cqe, _) = a
                .admin()
                .run(
                    "Set VWC",
                    Sqe::set_features(crate::spec::sqe::fid::VOLATILE_WRITE_CACHE, 0),
                    HostData::None,
                )
                .expect("set VWC");
            assert!(cqe.status().is_success());
            // An unknown admin opcode.
            let e = a
                .admin()
                .run("vendor", Sqe::new(0xc1), HostData::None)
                .unwrap_err();
            assert!(is_status(
                &e,
                crate::spec::Sct::Generic,
                crate::spec::status::generic::INVALID_OPCODE
            ));
            t.stop();
        },
    )
}

/// Keep Alive with the Keep Alive Timer disabled (KATO 0) is Keep Alive Timeout Invalid (as
/// Linux's target answers), not a success the host would take for a running timer; once Set
/// Features gives the timer a value, Keep Alive succeeds.
#[test]
fn keep_alive_without_a_keep_alive_timer_is_keep_alive_timeout_invalid() {
    watchdog(
        "keep_alive_without_a_keep_alive_timer_is_keep_alive_timeout_invalid",
        test_watchdog::INTEGRATION,
        || {
            let t = TestTarget::with_backend(mem_backend(), TargetOptions::default(), 1);
            let mut o = host_opts(Digests::default());
            o.kato_ms = 0;
            let mut c = HostController::connect(t.addr, o).expect("connect without KATO");
            let e = c.keep_alive().unwrap_err();
            assert!(is_status(&e, crate::spec::Sct::Generic, 0x1a), "{e}");
            assert!(
                matches!(&e, HostError::Status { status, .. } if status.dnr),
                "{e}"
            );
            c.admin()
                .run(
                    "Set KATO",
                    Sqe::set_features(fabrics::fid::KEEP_ALIVE_TIMER, 60_000),
                    HostData::None,
                )
                .expect("set KATO");
            c.keep_alive().expect("keep alive with a timer");
            // Back to no timer: refused again.
            c.admin()
                .run(
                    "Set KATO 0",
                    Sqe::set_features(fabrics::fid::KEEP_ALIVE_TIMER, 0),
                    HostData::None,
                )
                .expect("set KATO 0");
            let e = c.keep_alive().unwrap_err();
            assert!(is_status(&e, crate::spec::Sct::Generic, 0x1a), "{e}");
            // A host with a timer from Connect.
            let mut k = connect(&t, Digests::default());
            k.keep_alive().expect("keep alive");
            t.stop();
        },
    )
}

/// Get Features honours its Select field (ONCS bit 4 says so): current, default (what the
/// association started with), saved (nothing is saveable: the default), Supported
/// Capabilities (changeable only); a reserved Select is Invalid Field. Set Features with Save
/// is Feature Identifier Not Saveable.
#[test]
fn get_features_honours_select_and_set_features_refuses_save() {
    watchdog(
        "get_features_honours_select_and_set_features_refuses_save",
        test_watchdog::INTEGRATION,
        || {
            use crate::spec::sqe::fid;
            use crate::spec::status::{command_specific, generic};
            let t = TestTarget::with_backend(mem_backend(), TargetOptions::default(), 1);
            let mut c = connect(&t, Digests::default());
            assert_ne!(c.identify().oncs.bits() & 1 << 4, 0, "ONCS Save and Select");
            let get = |c: &mut HostController, f: u8, select: u32| {
                let mut sqe = Sqe::get_features(f);
                sqe.cdw10 |= select << 8;
                c.admin()
                    .run("Get Features", sqe, HostData::None)
                    .map(|(cqe, _)| cqe.dw0)
            };
            c.admin()
                .run(
                    "Set KATO",
                    Sqe::set_features(fabrics::fid::KEEP_ALIVE_TIMER, 7_000),
                    HostData::None,
                )
                .expect("set KATO");
            let kato = fabrics::fid::KEEP_ALIVE_TIMER;
            assert_eq!(get(&mut c, kato, 0).expect("current"), 7_000);
            assert_eq!(get(&mut c, kato, 1).expect("default"), 120_000);
            assert_eq!(get(&mut c, kato, 2).expect("saved"), 120_000);
            assert_eq!(get(&mut c, kato, 3).expect("capabilities"), 0b100);
            c.admin()
                .run(
                    "Set Number of Queues",
                    Sqe::set_features(fid::NUMBER_OF_QUEUES, 1 | 1 << 16),
                    HostData::None,
                )
                .expect("set queues");
            let nq = fid::NUMBER_OF_QUEUES;
            assert_eq!(get(&mut c, nq, 0).expect("current"), 1 | 1 << 16);
            let max = TargetOptions::default().max_io_queues as u32 - 1;
            assert_eq!(get(&mut c, nq, 1).expect("default"), max | max << 16);
            // The memory backend has a volatile write cache, enabled by default.
            let vwc = fid::VOLATILE_WRITE_CACHE;
            c.admin()
                .run("Set VWC", Sqe::set_features(vwc, 0), HostData::None)
                .expect("disable the write cache");
            assert_eq!(get(&mut c, vwc, 0).expect("current"), 0);
            assert_eq!(get(&mut c, vwc, 1).expect("default"), 1);
            assert_eq!(get(&mut c, vwc, 3).expect("capabilities"), 0b100);
            for reserved in 4..8 {
                let e = get(&mut c, kato, reserved).unwrap_err();
                assert!(
                    is_status(&e, crate::spec::Sct::Generic, generic::INVALID_FIELD),
                    "{e}"
                );
            }
            let mut save = Sqe::set_features(kato, 9_000);
            save.cdw10 |= 1 << 31;
            let e = c
                .admin()
                .run("Set Features SV", save, HostData::None)
                .unwrap_err();
            assert!(
                is_status(
                    &e,
                    crate::spec::Sct::CommandSpecific,
                    command_specific::FEATURE_NOT_SAVEABLE
                ),
                "{e}"
            );
            assert_eq!(
                get(&mut c, kato, 0).expect("current"),
                7_000,
                "nothing changed"
            );
            t.stop();
        },
    )
}

#[test]
fn many_queues_on_several_poll_groups() {
    watchdog(
        "many_queues_on_several_poll_groups",
        test_watchdog::STRESS,
        || {
            let mem = mem_backend();
            let t = TestTarget::with_backend(mem.clone(), small_pdus(), 3);
            let mut c = connect(&t, Digests::default());
            let queues: Vec<_> = (0..8).map(|_| c.io_queue(16).expect("I/O queue")).collect();
            let handles: Vec<_> = queues
                .into_iter()
                .enumerate()
                .map(|(qi, mut q)| {
                    std::thread::spawn(move || {
                        // 16 commands in flight per queue, each queue on its own 256-block region.
                        let region = 1024 * qi as u64 / 2;
                        let mut expect = std::collections::HashMap::new();
                        for round in 0..4u64 {
                            for k in 0..16u64 {
                                let lba = region + k * 32;
                                let data = pattern(qi as u64 * 1000 + round * 100 + k, 16384);
                                let sqe = Sqe::rw(opc::WRITE, 1, lba, 32, false);
                                q.submit(sqe, HostData::Out(data.clone()), k)
                                    .expect("submit");
                                expect.insert(lba, data);
                            }
                            let mut n = 0;
                            while n < 16 {
                                q.poll().expect("poll");
                                while let Some(d) = q.pop() {
                                    d.result.expect("write");
                                    n += 1;
                                }
                            }
                            for (k, (&lba, _)) in expect.iter().enumerate() {
                                let sqe = Sqe::rw(opc::READ, 1, lba, 32, false);
                                q.submit(sqe, HostData::In(vec![0; 16384]), lba)
                                    .unwrap_or_else(|e| panic!("submit read {k}: {e}"));
                            }
                            let mut n = 0;
                            while n < expect.len() {
                                q.poll().expect("poll");
                                while let Some(d) = q.pop() {
                                    d.result.expect("read");
                                    assert_eq!(d.buf, expect[&d.tag], "queue {qi} lba {}", d.tag);
                                    n += 1;
                                }
                            }
                        }
                        q.outstanding()
                    })
                })
                .collect();
            for h in handles {
                assert_eq!(h.join().expect("queue thread"), 0);
            }
            // More queues than Number of Queues granted are refused.
            t.stop();
        },
    )
}

#[test]
fn write_zeroes_deallocate_and_bounds() {
    watchdog(
        "write_zeroes_deallocate_and_bounds",
        test_watchdog::INTEGRATION,
        || {
            let mem = mem_backend();
            let t = TestTarget::with_backend(mem.clone(), TargetOptions::default(), 1);
            let mut c = connect(&t, Digests::default());
            let mut q = c.io_queue(8).expect("I/O queue");
            q.write(2, 10, pattern(1, 4 * 4096), 4096).expect("write");
            q.run(
                "Write Zeroes",
                Sqe::write_zeroes(2, 11, 1, false),
                HostData::None,
            )
            .expect("write zeroes");
            // One range in a whole page, as Linux sends it from its discard page: only NR
            // ranges count (the page's second "range", block 12, must stay).
            let mut ranges = vec![0u8; 4096];
            ranges[4..8].copy_from_slice(&1u32.to_le_bytes());
            ranges[8..16].copy_from_slice(&13u64.to_le_bytes());
            ranges[20..24].copy_from_slice(&1u32.to_le_bytes());
            ranges[24..32].copy_from_slice(&12u64.to_le_bytes());
            q.run(
                "Deallocate",
                Sqe::dsm_deallocate(2, 1, 0),
                HostData::Out(ranges),
            )
            .expect("deallocate");
            // Data shorter than NR ranges, or longer than a page: Data SGL Length Invalid,
            // nothing done.
            for (nr, len) in [(2, 16), (1, 4112)] {
                let e = q
                    .run(
                        "Deallocate",
                        Sqe::dsm_deallocate(2, nr, 0),
                        HostData::Out(vec![0; len]),
                    )
                    .expect_err("SGL length below NR * 16 or above 4096");
                let HostError::Status { status, .. } = e else {
                    panic!("{e}")
                };
                assert_eq!(
                    status.sc,
                    fabrics::sc::DATA_SGL_LENGTH_INVALID,
                    "NR {nr}, {len} bytes"
                );
            }
            let back = q.read(2, 10, 4, 4096).expect("read");
            let p = pattern(1, 4 * 4096);
            assert_eq!(&back[..4096], &p[..4096]);
            assert!(back[4096..8192].iter().all(|&b| b == 0));
            assert_eq!(&back[8192..12288], &p[8192..12288]);
            assert!(back[12288..].iter().all(|&b| b == 0));
            t.stop();
        },
    )
}

#[test]
fn discovery_log_page_lists_the_subsystems_a_host_may_see() {
    watchdog(
        "discovery_log_page_lists_the_subsystems_a_host_may_see",
        test_watchdog::INTEGRATION,
        || {
            let target = Target::new(TargetOptions::default());
            target.add_subsystem(Subsystem::new(SUBNQN, mem_backend()));
            target.add_subsystem(
                Subsystem::new("nqn.2026-12.io.dioxide:private", mem_backend())
                    .allow_host("nqn.2026-12.io.dioxide:someone-else"),
            );
            let t = TestTarget::start(target, 1);
            let mut o = host_opts(Digests::default());
            o.subnqn = DISCOVERY_NQN.into();
            let mut d = HostController::connect(t.addr, o).expect("discovery controller");
            assert_eq!(d.fabrics_identify().cntrltype, 2);
            let recs = d.discover().expect("discovery log");
            assert_eq!(recs.len(), 1, "{recs:?}");
            let r = &recs[0];
            assert_eq!(r.subnqn, SUBNQN);
            assert_eq!(r.trtype, fabrics::TRTYPE_TCP);
            assert_eq!(r.adrfam, fabrics::ADRFAM_IPV4);
            assert_eq!(r.traddr, "127.0.0.1");
            assert_eq!(r.trsvcid, t.addr.port().to_string());
            // A partial read at an offset: the record alone.
            let rec = d
                .log_page(flid::DISCOVERY, 0, 1024, 1024)
                .expect("record at offset");
            assert_eq!(&rec[256..256 + SUBNQN.len()], SUBNQN.as_bytes());
            // The discovery controller has no I/O queues.
            assert!(d.io_queue(8).is_err());
            t.stop();
        },
    )
}

#[test]
fn aer_is_held_until_a_namespace_change() {
    watchdog(
        "aer_is_held_until_a_namespace_change",
        test_watchdog::INTEGRATION,
        || {
            let t = TestTarget::with_backend(mem_backend(), TargetOptions::default(), 1);
            let mut c = connect(&t, Digests::default());
            c.admin()
                .run(
                    "Set Features AEC",
                    Sqe::set_features(fabrics::fid::ASYNC_EVENT_CONFIG, 1 << 8),
                    HostData::None,
                )
                .expect("AEC");
            let q = c.admin();
            q.submit(Sqe::new(admin::ASYNC_EVENT_REQUEST), HostData::None, 7)
                .expect("AER");
            // Other admin commands complete while the AER is held.
            for _ in 0..3 {
                q.run("Keep Alive", Sqe::new(admin::KEEP_ALIVE), HostData::None)
                    .expect("keep alive");
            }
            assert!(q.pop().is_none(), "the AER completed without an event");
            t.target.namespaces_changed(SUBNQN, &[2]);
            let deadline = Instant::now() + Duration::from_secs(10);
            let done = loop {
                q.poll().expect("poll");
                if let Some(d) = q.pop() {
                    break d;
                }
                assert!(
                    Instant::now() < deadline,
                    "AER not completed after the event"
                );
                std::thread::sleep(Duration::from_millis(1));
            };
            assert_eq!(done.tag, 7);
            let cqe = done.result.expect("AER completion");
            assert_eq!(cqe.dw0 & 7, 2, "Notice");
            assert_eq!((cqe.dw0 >> 16) & 0xff, flid::CHANGED_NS_LIST as u32);
            let log = c
                .log_page(flid::CHANGED_NS_LIST, 0xffff_ffff, 4096, 0)
                .expect("changed ns list");
            assert_eq!(&log[..8], &[2, 0, 0, 0, 0, 0, 0, 0]);
            // Reading it cleared it.
            let log = c
                .log_page(flid::CHANGED_NS_LIST, 0xffff_ffff, 4096, 0)
                .expect("changed ns list");
            assert_eq!(&log[..4], &[0, 0, 0, 0]);
            // Five AERs: the fifth is over the limit (AERL 3: four outstanding).
            let q = c.admin();
            for tag in 0..4 {
                q.submit(
                    Sqe::new(admin::ASYNC_EVENT_REQUEST),
                    HostData::None,
                    100 + tag,
                )
                .expect("AER");
            }
            let e = q
                .run(
                    "fifth AER",
                    Sqe::new(admin::ASYNC_EVENT_REQUEST),
                    HostData::None,
                )
                .unwrap_err();
            assert!(matches!(e, HostError::Status { status, .. } if status.sc == 0x05));
            t.stop();
        },
    )
}

#[test]
fn keep_alive_timeout_tears_the_association_down() {
    watchdog(
        "keep_alive_timeout_tears_the_association_down",
        test_watchdog::INTEGRATION,
        || {
            let t = TestTarget::with_backend(mem_backend(), TargetOptions::default(), 1);
            // A host that keeps the association alive with Keep Alive.
            let mut o = host_opts(Digests::default());
            o.kato_ms = 10_000;
            let mut alive = HostController::connect(t.addr, o.clone()).expect("connect");
            let mut alive_q = alive.io_queue(8).expect("I/O queue");
            // A silent host.
            o.kato_ms = 300;
            let mut silent = HostController::connect(t.addr, o).expect("connect");
            let mut silent_q = silent.io_queue(8).expect("I/O queue");
            let silent_id = silent.cntlid();
            assert!(t.target.controller(silent_id).is_some());
            // Wait (bounded by the watchdog) until the silent host's I/O queue is closed.
            let err = loop {
                match silent_q.poll() {
                    Err(e) => break e,
                    Ok(_) => std::thread::sleep(Duration::from_millis(20)),
                }
                alive.keep_alive().expect("keep alive");
            };
            assert!(
                matches!(err, HostError::Closed | HostError::Io(_)),
                "the silent host's queue: {err}"
            );
            assert!(t.target.controller(silent_id).is_none());
            // The admin queue is gone too.
            assert!(silent.keep_alive().is_err());
            // The other association kept serving.
            alive_q.write(1, 0, pattern(9, 512), 512).expect("write");
            assert_eq!(alive_q.read(1, 0, 1, 512).expect("read"), pattern(9, 512));
            let reasons = t.stop();
            assert!(
                reasons.iter().any(|r| r.contains("keep alive")),
                "{reasons:?}"
            );
        },
    )
}

#[test]
fn writes_wait_their_turn_for_an_r2t() {
    watchdog(
        "writes_wait_their_turn_for_an_r2t",
        test_watchdog::INTEGRATION,
        || {
            let mem = mem_backend();
            let opts = TargetOptions {
                max_r2t_per_conn: 2,
                ..small_pdus()
            };
            let t = TestTarget::with_backend(mem.clone(), opts, 1);
            let mut c = connect(&t, Digests::default());
            let mut q = c.io_queue(32).expect("I/O queue");
            // 24 writes of 32 KiB in flight, two R2Ts at a time.
            for k in 0..24u64 {
                let sqe = Sqe::rw(opc::WRITE, 1, k * 64, 64, false);
                q.submit(sqe, HostData::Out(pattern(500 + k, 32768)), k)
                    .expect("submit");
            }
            let mut n = 0;
            while n < 24 {
                q.poll().expect("poll");
                while let Some(d) = q.pop() {
                    let cqe = d.result.expect("write");
                    assert!(cqe.status().is_success());
                    n += 1;
                }
            }
            let snap = mem.snapshot(Nsid(1));
            for k in 0..24usize {
                assert_eq!(
                    &snap[k * 32768..(k + 1) * 32768],
                    &pattern(500 + k as u64, 32768)[..]
                );
            }
            t.stop();
        },
    )
}

#[test]
fn controller_reset_closes_io_queues_and_reconnect_works() {
    watchdog(
        "controller_reset_closes_io_queues_and_reconnect_works",
        test_watchdog::INTEGRATION,
        || {
            let t = TestTarget::with_backend(mem_backend(), TargetOptions::default(), 2);
            let mut c = connect(&t, Digests::default());
            let mut q = c.io_queue(8).expect("I/O queue");
            q.write(1, 5, pattern(3, 1024), 512).expect("write");
            let prop = |c: &mut HostController, sqe| {
                c.admin()
                    .run("property", sqe, HostData::None)
                    .expect("property")
                    .0
            };
            let cc = prop(&mut c, fabrics::property_get(fabrics::prop::CC, false)).dw0;
            assert_eq!(cc & 1, 1);
            // CC.EN = 0: CSTS.RDY drops, the I/O queue goes.
            prop(
                &mut c,
                fabrics::property_set(fabrics::prop::CC, false, (cc & !1) as u64),
            );
            let csts = prop(&mut c, fabrics::property_get(fabrics::prop::CSTS, false)).dw0;
            assert_eq!(csts & 1, 0);
            let e = loop {
                match q.poll() {
                    Err(e) => break e,
                    Ok(_) => std::thread::sleep(Duration::from_millis(1)),
                }
            };
            assert!(matches!(e, HostError::Closed | HostError::Io(_)), "{e}");
            // I/O queues cannot connect while the controller is disabled.
            assert!(c.io_queue(8).is_err());
            // CC.EN = 1 again: new I/O queues, the data is still there.
            prop(
                &mut c,
                fabrics::property_set(fabrics::prop::CC, false, cc as u64),
            );
            let csts = prop(&mut c, fabrics::property_get(fabrics::prop::CSTS, false)).dw0;
            assert_eq!(csts & 1, 1);
            let mut q = c.io_queue(8).expect("I/O queue after the reset");
            assert_eq!(q.read(1, 5, 2, 512).expect("read"), pattern(3, 1024));
            c.shutdown().expect("shutdown");
            t.stop();
        },
    )
}

#[test]
fn idle_groups_sleep_and_wake_on_sockets_completions_and_connections() {
    watchdog(
        "idle_groups_sleep_and_wake_on_sockets_completions_and_connections",
        test_watchdog::INTEGRATION,
        || {
            // Groups that wait an hour when idle: every wake-up must come from a socket, a
            // backend completion (the memory backend completes on its own thread) or a
            // connection handed over by the listener's group; a missed one hangs the test.
            let mem = mem_backend();
            let target = Target::new(small_pdus());
            target.add_subsystem(Subsystem::new(SUBNQN, mem.clone()));
            let t = TestTarget::start_waiting(target, 2, Duration::from_secs(3600));
            for round in 0..3u64 {
                let mut c = connect(&t, Digests::default());
                let mut q = c.io_queue(8).expect("I/O queue");
                for k in 0..8u64 {
                    let data = pattern(round * 10 + k, 16384);
                    q.write(1, k * 32, data.clone(), 512).expect("write");
                    assert_eq!(q.read(1, k * 32, 32, 512).expect("read"), data);
                    // Let the groups fall asleep between commands.
                    std::thread::sleep(Duration::from_millis(2));
                }
                c.shutdown().expect("shutdown");
            }
            t.stop();
        },
    )
}

#[test]
fn a_queue_depth_below_32_still_takes_a_32_entry_admin_queue() {
    watchdog(
        "a_queue_depth_below_32_still_takes_a_32_entry_admin_queue",
        Duration::from_secs(60),
        || {
            let opts = TargetOptions {
                max_queue_depth: 8,
                ..TargetOptions::default()
            };
            let t = TestTarget::with_backend(mem_backend(), opts, 1);
            // The host's admin queue has 32 entries, as the Linux host's.
            let mut c = connect(&t, Digests::default());
            assert_eq!(host_opts(Digests::default()).admin_queue_size, 32);
            // I/O queues keep the limit.
            let e = c.io_queue(16).expect_err("an I/O queue deeper than 8");
            assert!(
                matches!(&e, HostError::Status { status, .. }
                    if status.sc == fabrics::sc::CONNECT_INVALID_PARAMETERS),
                "{e}"
            );
            let mut q = c.io_queue(8).expect("an I/O queue of 8");
            q.write(2, 3, pattern(5, 4096), 4096).expect("write");
            assert_eq!(q.read(2, 3, 1, 4096).expect("read"), pattern(5, 4096));
            drop(q);
            drop(c);
            t.stop();
        },
    );
}
