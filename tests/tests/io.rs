//! Device-independent tests: only the public driver API, so they run against a real controller
//! too (`NVME_PCI_ADDR`, see `dioxide_tests::controller_under_test`). On the emulator each runs
//! in both emulator modes with the shape it asks for; on a real controller each runs once and
//! adapts to the device: its namespaces, block sizes and MDTS. Write parts run on a real device
//! only with `NVME_HIL_ALLOW_WRITE=1` (otherwise they are skipped with a note); loop counts
//! shrink on hardware ([`Device::scale`]). IOMMU faults on a real device are the HIL harness's
//! to catch (it reads the guest's kernel log after every test program).

use std::cell::RefCell;
use std::collections::HashMap;
use std::time::{Duration, Instant};

use dioxide::emulated::Mode;
use dioxide::spec::Cc;
use dioxide::spec::Csts;
use dioxide::spec::identify::Oncs;
use dioxide::spec::regs::{offset, shst};
use dioxide::{
    DeadReason, DmaBuffer, DoorbellMode, Error, IoError, IoFlags, IoOp, Lba, Namespace, Nsid,
    QueueOptions, QueuePair,
};
use dioxide_tests::*;

const NS_512: (u32, u64) = (512, 1 << 20); // 512 MiB
const NS_4K: (u32, u64) = (4096, 1 << 16); // 256 MiB

fn each_mode(f: impl Fn(Mode)) {
    for &m in device_modes() {
        f(m);
    }
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// Polls `q` until `n` completions arrived (30 s limit), all successful.
fn drain<T>(q: &mut QueuePair<T>, n: usize) -> Vec<T> {
    let mut got = Vec::with_capacity(n);
    let deadline = Instant::now() + Duration::from_secs(30);
    while got.len() < n {
        assert!(
            Instant::now() < deadline,
            "only {} of {n} completions",
            got.len()
        );
        q.poll(usize::MAX, |t, r| {
            r.unwrap();
            got.push(t);
        })
        .unwrap();
    }
    got
}

#[test]
fn bring_up_identifies_controller_and_namespaces() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    each_mode(|mode| {
        let dev = controller_under_test(config(mode, &[NS_512, NS_4K, (512, 4096)]));
        let c = &dev.ctrl;
        let id = c.identify();
        assert!(!id.sn.is_empty() && !id.mn.is_empty());
        assert!(c.io_queues() >= 1);
        let ns = c.namespaces();
        let ids = c.active_namespace_ids().unwrap();
        assert!(!ns.is_empty(), "no active namespace");
        assert_eq!(ns.iter().map(|n| n.nsid()).collect::<Vec<_>>(), ids);
        if dev.emu.is_some() {
            assert_eq!(ns.len(), 3);
            assert_eq!(ns[0].nsid(), Nsid(1));
            assert_eq!((ns[0].block_size(), ns[0].blocks()), (512, 1 << 20));
            assert_eq!((ns[1].block_size(), ns[1].blocks()), (4096, 1 << 16));
            assert_eq!(c.namespace(Nsid(3)).unwrap().blocks(), 4096);
            assert_eq!(ids, vec![Nsid(1), Nsid(2), Nsid(3)]);
        }
        for n in &ns {
            assert!(!n.lba_formats().is_empty());
            assert!(n.blocks() > 0);
            assert_eq!(c.namespace(n.nsid()).unwrap().blocks(), n.blocks());
            let again = c.identify_namespace(n.nsid()).unwrap();
            assert_eq!(again.nsze, n.blocks());
            assert_eq!(again.block_size(), n.block_size());
        }
        let mdts = c.max_transfer();
        assert!(
            mdts >= 4096 && mdts.is_power_of_two(),
            "max transfer {mdts}"
        );
        if let Some(addr) = &dev.pci_addr {
            note(format!(
                "{addr}: '{}' serial '{}' fw '{}', MDTS {} KiB, {} I/O queue pairs, ONCS {:#x}, \
                 namespaces: {}",
                id.mn.trim(),
                id.sn.trim(),
                id.fr.trim(),
                mdts / 1024,
                c.io_queues(),
                id.oncs.bits(),
                ns.iter()
                    .map(|n| format!("{}: {} x {} B", n.nsid(), n.blocks(), n.block_size()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        // Log pages and features through the typed admin API.
        let smart = c.smart_log().unwrap();
        assert!(smart.available_spare <= 100);
        let _ = c.error_log(4).unwrap();
        let fw = c.firmware_slot_log().unwrap();
        assert!(!fw.frs[0].is_empty());
        let nq = c
            .get_features(dioxide::spec::sqe::fid::NUMBER_OF_QUEUES, 0)
            .unwrap();
        assert!((nq & 0xffff) as u16 + 1 >= c.io_queues());
        dev.finish();
    });
}

/// A namespace id that is not active: a typed error from the driver, and an error status from
/// the device when the id is sent to it anyway (Identify Namespace).
#[test]
fn namespace_out_of_range_is_a_typed_error() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    let dev = controller_under_test(config(Mode::Inline, &[NS_512]));
    let c = &dev.ctrl;
    let active: Vec<u32> = c.namespaces().iter().map(|n| n.nsid().0).collect();
    let missing = Nsid(active.iter().max().unwrap() + 1);
    match c.namespace(missing) {
        Err(Error::NoSuchNamespace {
            nsid, active: a, ..
        }) => {
            assert_eq!(nsid, missing);
            assert_eq!(a, active);
        }
        other => panic!("expected NoSuchNamespace, got {other:?}"),
    }
    // Past NN (and not the broadcast id): the device must refuse it.
    let invalid = Nsid(0xffff_fffe);
    match c.identify_namespace(invalid) {
        Err(e @ Error::AdminStatus { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("Identify"), "{msg}");
        }
        other => panic!("Identify Namespace {invalid}: expected an error status, got {other:?}"),
    }
    // The controller still works.
    let ns = first_namespace(c);
    let mut q = c.create_qpair::<u64>(QueueOptions::default()).unwrap();
    let mut b = c.alloc(ns.block_size() as usize).unwrap();
    q.read_blocking(&ns, Lba(0), b.as_mut_slice()).unwrap();
    drop(q);
    dev.finish();
}

/// Random offsets and lengths from one block to several MDTS, in every namespace, through
/// the blocking API; then everything read back in one pass compares equal.
#[test]
fn round_trip_random_offsets_and_lengths() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    each_mode(|mode| {
        let dev = controller_under_test(config(mode, &[NS_512, NS_4K]));
        if dev.skip_writes("round_trip_random_offsets_and_lengths") {
            return;
        }
        let c = &dev.ctrl;
        let mdts = c.max_transfer();
        let mut q = c.create_qpair::<u64>(QueueOptions::default()).unwrap();
        let mut rng = Rng(0x1234_5678 + mode as u64);
        let n = dev.scale(40, 16);
        let t = Instant::now();
        let mut bytes = 0u64;
        for ns in c.namespaces() {
            let bs = ns.block_size() as u64;
            // Non-overlapping: each I/O in its own region (4 MiB, less on a small namespace).
            let region = ((4 << 20) / bs).min(ns.blocks() / n);
            let max_blocks = ((3 * mdts as u64) / bs).min(region);
            assert!(max_blocks >= 1, "namespace {} too small", ns.nsid());
            let mut written: Vec<(Lba, usize, u64)> = Vec::new();
            for i in 0..n {
                let blocks = rng.range(1, max_blocks + 1);
                let lba = Lba(i * region + rng.range(0, region - blocks + 1));
                let len = (blocks * bs) as usize;
                // A buffer offset that is a multiple of 4 (dword), sometimes of a page.
                let off = if i % 3 == 0 {
                    0
                } else {
                    rng.range(0, 1024) as usize * 4
                };
                let mut buf = c.alloc(off + len).unwrap();
                fill(&mut buf.as_mut_slice()[off..], i + 100 * bs);
                q.write_blocking(&ns, lba, &buf.as_slice()[off..]).unwrap();
                written.push((lba, len, i + 100 * bs));
                bytes += len as u64;
            }
            for (lba, len, seed) in written {
                let off = rng.range(0, 1024) as usize * 4;
                let mut buf = c.alloc(off + len).unwrap();
                q.read_blocking(&ns, lba, &mut buf.as_mut_slice()[off..])
                    .unwrap();
                assert!(
                    buf.as_slice()[off..] == pattern(len, seed)[..],
                    "data mismatch at {lba} of namespace {}",
                    ns.nsid()
                );
            }
        }
        if dev.is_hardware() {
            note(format!(
                "round trip on {}: {} KiB written and read back in {:.0} ms",
                dev.name(),
                bytes >> 10,
                ms(t)
            ));
        }
        drop(q);
        dev.finish();
    });
}

/// Several namespaces, several queue pairs, interleaved: each namespace keeps its own data,
/// whichever queue pair wrote or read it.
#[test]
fn several_namespaces_and_queue_pairs() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    each_mode(|mode| {
        let dev = controller_under_test(config(mode, &[NS_512, NS_4K, NS_512]));
        let c = &dev.ctrl;
        let nq = c.io_queues().min(4) as usize;
        let mut qs: Vec<QueuePair<u64>> = (0..nq)
            .map(|_| c.create_qpair::<u64>(QueueOptions::default()).unwrap())
            .collect();
        let mut qids: Vec<_> = qs.iter().map(|q| q.qid()).collect();
        qids.sort();
        qids.dedup();
        assert_eq!(qids.len(), nq, "distinct queue ids");
        let nss = c.namespaces();
        let len = 16384;
        if !dev.skip_writes("several_namespaces_and_queue_pairs: writes") {
            for (i, ns) in nss.iter().enumerate() {
                let b = pattern_buffer(c, len, i as u64);
                qs[i % nq]
                    .write_blocking(ns, Lba(64), b.as_slice())
                    .unwrap();
            }
        }
        let mut first: Vec<Vec<u8>> = Vec::new();
        for (i, ns) in nss.iter().enumerate() {
            let mut r = c.alloc(len).unwrap();
            qs[(i + 1) % nq]
                .read_blocking(ns, Lba(64), r.as_mut_slice())
                .unwrap();
            if dev.writable {
                assert!(
                    r.as_slice() == pattern(len, i as u64),
                    "namespace {} data",
                    ns.nsid()
                );
            }
            first.push(r.as_slice().to_vec());
        }
        // Every queue pair reads the same data.
        for (k, q) in qs.iter_mut().enumerate() {
            for (i, ns) in nss.iter().enumerate() {
                let mut r = c.alloc(len).unwrap();
                q.read_blocking(ns, Lba(64), r.as_mut_slice()).unwrap();
                assert!(
                    r.as_slice() == first[i],
                    "queue {k}, namespace {}",
                    ns.nsid()
                );
            }
        }
        drop(qs);
        dev.finish();
    });
}

/// A request of 4 x MDTS is split into children and completes exactly once with all data, via
/// the owned-buffer API.
#[test]
fn four_times_mdts_completes_once_with_all_data() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    each_mode(|mode| {
        let dev = controller_under_test(config(mode, &[NS_512, NS_4K]));
        let c = &dev.ctrl;
        let mdts = c.max_transfer();
        let write = !dev.skip_writes("four_times_mdts: the write half");
        for ns in c.namespaces() {
            let mut q = c
                .create_qpair::<(DmaBuffer, u32)>(QueueOptions::default())
                .unwrap();
            let w = pattern_buffer(c, 4 * mdts, 44 + ns.nsid().0 as u64);
            let lba = Lba(1000.min(ns.blocks() - (4 * mdts as u64) / ns.block_size() as u64));
            let w = if write {
                q.write(&ns, lba, (w, 1)).unwrap();
                let mut done = Vec::new();
                while done.is_empty() {
                    q.poll(64, |(b, tag), r| done.push((b, tag, r))).unwrap();
                }
                let (w, tag, r) = done.pop().unwrap();
                assert_eq!(tag, 1);
                r.unwrap();
                Some(w)
            } else {
                None
            };
            let r_buf = c.alloc(4 * mdts).unwrap();
            q.read(&ns, lba, (r_buf, 2)).unwrap();
            let mut got = None;
            let mut calls = 0;
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                q.poll(64, |(b, tag), r| {
                    calls += 1;
                    r.unwrap();
                    got = Some((b, tag));
                })
                .unwrap();
                if got.is_some() && q.outstanding() == 0 {
                    break;
                }
            }
            assert_eq!(calls, 1, "the parent completes exactly once");
            let (r_buf, tag) = got.unwrap();
            assert_eq!(tag, 2);
            if let Some(w) = w {
                assert!(r_buf.as_slice() == w.as_slice(), "namespace {}", ns.nsid());
            }
            assert_eq!(q.stats().split_children, if write { 8 } else { 4 });
        }
        dev.finish();
    });
}

/// Thousands of commands through a 16-entry queue: the phase tag wraps hundreds of times,
/// requests wait for room, and every one completes exactly once.
#[test]
fn phase_wrap_and_queue_depth() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    each_mode(|mode| {
        let dev = controller_under_test(config(mode, &[NS_4K]));
        let c = &dev.ctrl;
        let ns = first_namespace(c);
        let opts = QueueOptions::default()
            .with_entries(queue_entries(c, 16))
            .with_requests(64);
        let mut q = c.create_qpair::<u64>(opts).unwrap();
        let bufs = c.alloc(64 * 4096).unwrap();
        let total = dev.scale(10_000, 4_000);
        let span = 4096.min(ns.blocks() - 4096 / ns.block_size() as u64);
        let mut seen = vec![false; total as usize];
        let mut next = 0u64;
        let mut done = 0u64;
        let t = Instant::now();
        while done < total {
            while next < total && q.outstanding() < 48 {
                let slot = (next % 64) as usize;
                let s = bufs.slice(slot * 4096, 4096).unwrap();
                // SAFETY: each buffer slice is used by at most one request at a time (48 in
                // flight, 64 slices, reused round robin) and outlives the queue pair's use.
                unsafe { q.read_raw(&ns, Lba(next % span), s, next) }.unwrap();
                next += 1;
            }
            q.poll(usize::MAX, |tag, r| {
                r.unwrap();
                assert!(!seen[tag as usize], "tag {tag} completed twice");
                seen[tag as usize] = true;
                done += 1;
            })
            .unwrap();
        }
        assert!(seen.iter().all(|&s| s));
        let st = q.stats();
        assert_eq!(st.completed, total);
        assert!(st.waited > 0, "requests must have waited for room");
        assert!(st.sq_doorbells < total, "doorbells are batched");
        if dev.is_hardware() {
            note(format!(
                "phase wrap on {}: {total} x 4 KiB reads through 16 entries in {:.0} ms \
                 ({:.0} us/IO)",
                dev.name(),
                ms(t),
                ms(t) * 1e3 / total as f64
            ));
        }
        drop(q);
        dev.finish();
    });
}

/// Requests that found no room are issued in submission order: with one slot on the device,
/// writes of different data to one LBA leave the last one.
#[test]
fn waiting_requests_are_issued_in_order() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    each_mode(|mode| {
        let dev = controller_under_test(config(mode, &[NS_512]));
        if dev.skip_writes("waiting_requests_are_issued_in_order") {
            return;
        }
        let c = &dev.ctrl;
        let ns = first_namespace(c);
        let bs = ns.block_size() as usize;
        let opts = QueueOptions::default().with_entries(2).with_requests(32);
        let mut q = c.create_qpair::<(DmaBuffer, u64)>(opts).unwrap();
        for i in 0..20u64 {
            q.write(&ns, Lba(5), (pattern_buffer(c, bs, i), i)).unwrap();
        }
        let mut order = Vec::new();
        while order.len() < 20 {
            q.poll(8, |(_, tag), r| {
                r.unwrap();
                order.push(tag);
            })
            .unwrap();
        }
        assert_eq!(order, (0..20).collect::<Vec<_>>());
        assert!(q.stats().waited >= 19);
        let mut r = c.alloc(bs).unwrap();
        q.read_blocking(&ns, Lba(5), r.as_mut_slice()).unwrap();
        assert!(
            r.as_slice() == pattern(bs, 19),
            "the last write landed last"
        );
        drop(q);
        dev.finish();
    });
}

#[test]
fn pool_exhaustion_and_oversized_requests_are_typed_errors() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    each_mode(|mode| {
        let dev = controller_under_test(config(mode, &[NS_512]));
        let c = &dev.ctrl;
        let ns = first_namespace(c);
        let bs = ns.block_size() as usize;
        let opts = QueueOptions::default()
            .with_entries(queue_entries(c, 16))
            .with_requests(8);
        let mut q = c.create_qpair::<DmaBuffer>(opts).unwrap();
        for i in 0..8 {
            q.read(&ns, Lba(i), c.alloc(bs).unwrap()).unwrap();
        }
        let rej = q.read(&ns, Lba(9), c.alloc(bs).unwrap()).unwrap_err();
        assert!(
            matches!(
                rej.error,
                Error::PoolExhausted {
                    needed: 1,
                    in_use: 8,
                    pool: 8,
                    ..
                }
            ),
            "{:?}",
            rej.error
        );
        assert_eq!(rej.ctx.len(), bs, "the context comes back");
        drain(&mut q, 8);
        // 8 x MDTS needs 9 slots: more than the pool will ever have.
        let big = c.alloc(8 * c.max_transfer()).unwrap();
        let rej = q.read(&ns, Lba(0), big).unwrap_err();
        assert!(
            matches!(
                rej.error,
                Error::RequestTooLarge {
                    children: 8,
                    needed: 9,
                    pool: 8,
                    ..
                }
            ),
            "{:?}",
            rej.error
        );
        assert!(rej.error.to_string().contains("QueueOptions::requests"));
        // 4 x MDTS fits (5 slots) once the pool is free, but not while 4 slots are taken.
        for i in 0..4 {
            q.read(&ns, Lba(i), c.alloc(bs).unwrap()).unwrap();
        }
        let rej = q
            .read(&ns, Lba(0), c.alloc(4 * c.max_transfer()).unwrap())
            .unwrap_err();
        assert!(
            matches!(rej.error, Error::PoolExhausted { needed: 5, .. }),
            "{:?}",
            rej.error
        );
        drain(&mut q, 4);
        q.read(&ns, Lba(0), rej.ctx).unwrap();
        drain(&mut q, 1);
        assert_eq!(q.outstanding(), 0);
        drop(q);
        dev.finish();
    });
}

/// Checks the driver rejects before the device sees anything: past the end of the namespace,
/// memory that is not DMA memory, lengths that are not block multiples, zero length,
/// misalignment, bad range counts, bad queue options.
#[test]
fn bad_inputs_are_typed_errors() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    each_mode(|mode| {
        let dev = controller_under_test(config(mode, &[NS_512, NS_4K]));
        let c = &dev.ctrl;
        let mut q = c.create_qpair::<u64>(QueueOptions::default()).unwrap();
        let mut buf = c.alloc(16384).unwrap();
        // Writes that would be rejected are still only tried where writing is allowed: a driver
        // bug must not turn them into real writes.
        let writes = !dev.skip_writes("bad_inputs_are_typed_errors: rejected writes");
        for ns in c.namespaces() {
            let bs = ns.block_size() as usize;
            // Past the end of the namespace.
            let e = q.read_blocking(&ns, Lba(ns.blocks() - 1), &mut buf.as_mut_slice()[..2 * bs]);
            assert!(
                matches!(e, Err(Error::LbaOutOfRange { blocks: 2, .. })),
                "{e:?}"
            );
            let e = q.read_blocking(&ns, Lba(u64::MAX), &mut buf.as_mut_slice()[..bs]);
            assert!(matches!(e, Err(Error::LbaOutOfRange { .. })), "{e:?}");
            let e = q.read_blocking(&ns, Lba(ns.blocks()), &mut buf.as_mut_slice()[..bs]);
            assert!(matches!(e, Err(Error::LbaOutOfRange { .. })), "{e:?}");
            // Heap memory given to a zero-copy call: not DMA memory.
            let mut heap = vec![0u8; 4096];
            let e = q.read_blocking(&ns, Lba(0), &mut heap);
            assert!(
                matches!(e, Err(Error::NotDmaMemory { len: 4096, .. })),
                "{e:?}"
            );
            // Not a multiple of the block size.
            let e = q.read_blocking(&ns, Lba(0), &mut buf.as_mut_slice()[..bs + bs / 2]);
            assert!(
                matches!(e, Err(Error::NotBlockMultiple { block_size, .. }) if block_size as usize == bs),
                "{e:?}"
            );
            // Zero length.
            let e = q.read_blocking(&ns, Lba(0), &mut buf.as_mut_slice()[..0]);
            assert!(matches!(e, Err(Error::ZeroLength { .. })), "{e:?}");
            // Not dword aligned.
            let e = q.read_blocking(&ns, Lba(0), &mut buf.as_mut_slice()[2..2 + bs]);
            assert!(matches!(e, Err(Error::Unaligned { .. })), "{e:?}");
            // The raw API validates the same way and hands the context back.
            let s = buf.slice(1, bs).unwrap();
            // SAFETY: the request is rejected before the device sees it.
            let rej = unsafe { q.read_raw(&ns, Lba(0), s, 77) }.unwrap_err();
            assert!(matches!(rej.error, Error::Unaligned { .. }));
            assert_eq!(rej.ctx, 77);
            if writes {
                let e = q.write_blocking(&ns, Lba(0), &buf.as_slice()[..bs + bs / 2]);
                assert!(
                    matches!(e, Err(Error::NotBlockMultiple { block_size, .. }) if block_size as usize == bs),
                    "{e:?}"
                );
                let e = q.write_blocking(&ns, Lba(ns.blocks()), &buf.as_slice()[..bs]);
                assert!(matches!(e, Err(Error::LbaOutOfRange { .. })), "{e:?}");
                // Write Zeroes and Deallocate ranges are checked too.
                let e = q.write_zeroes_blocking(&ns, Lba(ns.blocks()), 1, IoFlags::NONE);
                assert!(matches!(e, Err(Error::LbaOutOfRange { .. })), "{e:?}");
                let e = q.deallocate_blocking(&ns, &[]);
                assert!(matches!(e, Err(Error::BadRangeCount(0))), "{e:?}");
                let e = q.deallocate_blocking(&ns, &vec![(Lba(0), 1); 257]);
                assert!(matches!(e, Err(Error::BadRangeCount(257))), "{e:?}");
            }
            // Nothing reached the device, and the queue still works.
            assert_eq!(q.outstanding(), 0);
            assert_eq!(q.stats().submitted, 0, "nothing was submitted");
        }
        let ns = first_namespace(c);
        let bs = ns.block_size() as usize;
        q.read_blocking(&ns, Lba(0), &mut buf.as_mut_slice()[..bs])
            .unwrap();
        // Bad options.
        let e = c.create_qpair::<u64>(QueueOptions::default().with_entries(1));
        assert!(matches!(e, Err(Error::InvalidOption { .. })), "{e:?}");
        let e = c.create_qpair::<u64>(QueueOptions::default().with_entries(u16::MAX));
        assert!(matches!(e, Err(Error::InvalidOption { .. })), "{e:?}");
        drop(q);
        dev.finish();
    });
}

/// Flush, FUA writes, and (where ONCS says the controller has them) Write Zeroes and
/// Deallocate, blocking and asynchronous.
#[test]
fn flush_fua_write_zeroes_deallocate() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    each_mode(|mode| {
        let dev = controller_under_test(config(mode, &[NS_4K]));
        if dev.skip_writes("flush_fua_write_zeroes_deallocate") {
            return;
        }
        let c = &dev.ctrl;
        let oncs = c.identify().oncs;
        let wz = oncs.contains(Oncs::WRITE_ZEROES);
        let dsm = oncs.contains(Oncs::DSM);
        // The emulator and QEMU's controller (the HIL guest's) have both: there, a missing bit is
        // a bug (of ONCS decoding or of the harness), not a device that lacks them.
        let qemu = c.identify().mn.contains("QEMU");
        if dev.emu.is_some() || qemu {
            assert!(
                wz && dsm,
                "{}: ONCS {:#x} lacks Write Zeroes or Dataset Management",
                dev.name(),
                oncs.bits()
            );
        }
        for (what, have) in [("Write Zeroes", wz), ("Dataset Management", dsm)] {
            if !have {
                note(format!(
                    "{}: ONCS {:#x} lacks {what}: not tested",
                    dev.name(),
                    oncs.bits()
                ));
            }
        }
        for ns in c.namespaces() {
            let bs = ns.block_size() as usize;
            // DLFEAT bits 2:0 = 001b: deallocated blocks read zeroes.
            let dealloc_reads_zero = ns.identify().dlfeat & 7 == 1;
            let mut q = c.create_qpair::<u64>(QueueOptions::default()).unwrap();
            let w = pattern_buffer(c, 4 * bs, 9);
            q.write_blocking_with(&ns, Lba(10), w.as_slice(), IoFlags::FUA)
                .unwrap();
            q.flush_blocking(&ns).unwrap();
            let mut r = c.alloc(4 * bs).unwrap();
            q.read_blocking(&ns, Lba(10), r.as_mut_slice()).unwrap();
            assert!(r.as_slice() == w.as_slice(), "FUA write read back");
            if wz {
                q.write_zeroes_blocking(&ns, Lba(11), 2, IoFlags::NONE)
                    .unwrap();
                q.read_blocking(&ns, Lba(10), r.as_mut_slice()).unwrap();
                assert_eq!(r.as_slice()[..bs], w.as_slice()[..bs]);
                assert!(r.as_slice()[bs..3 * bs].iter().all(|&b| b == 0));
                assert_eq!(r.as_slice()[3 * bs..], w.as_slice()[3 * bs..]);
            }
            if dsm {
                q.deallocate_blocking(&ns, &[(Lba(10), 1), (Lba(13), 1)])
                    .unwrap();
                if wz {
                    // Deallocate is a hint ("the controller may deallocate"): a block read back
                    // is zeroes if it was deallocated (DLFEAT 001b) or still its old data.
                    // The emulator always deallocates, so there it must read zeroes.
                    q.read_blocking(&ns, Lba(10), r.as_mut_slice()).unwrap();
                    let mut zeroed = 0;
                    for (i, blk) in r.as_slice().chunks(bs).enumerate() {
                        let old = if i == 0 || i == 3 {
                            &w.as_slice()[i * bs..(i + 1) * bs]
                        } else {
                            &blk[..0] // blocks 11 and 12 were zeroed by Write Zeroes
                        };
                        let zero = blk.iter().all(|&b| b == 0);
                        zeroed += usize::from(zero && (i == 0 || i == 3));
                        assert!(
                            zero || (dev.is_hardware() && blk == old),
                            "LBA {} after Deallocate: neither zeroes nor its old data \
                             (DLFEAT {:#x})",
                            10 + i,
                            ns.identify().dlfeat
                        );
                    }
                    if dev.emu.is_some() {
                        assert!(dealloc_reads_zero && zeroed == 2);
                    } else if qemu && dealloc_reads_zero {
                        // The HIL harness attaches QEMU's images with discard=unmap: when QEMU
                        // advertises that deallocated blocks read zeroes, they must.
                        assert_eq!(
                            zeroed,
                            2,
                            "{} namespace {}: QEMU, DLFEAT {:#x}, deallocated blocks must read \
                             zeroes",
                            dev.name(),
                            ns.nsid(),
                            ns.identify().dlfeat
                        );
                    } else {
                        note(format!(
                            "{} namespace {}: {zeroed} of 2 deallocated blocks read zeroes \
                             (DLFEAT {:#x}; Deallocate is advisory)",
                            dev.name(),
                            ns.nsid(),
                            ns.identify().dlfeat
                        ));
                    }
                }
            }
            // The asynchronous forms, batched and rung once.
            let mut want = vec![1];
            q.flush(&ns, 1).unwrap();
            if wz {
                q.write_zeroes(&ns, Lba(0), 8, IoFlags::FUA, 2).unwrap();
                want.push(2);
            }
            if dsm {
                q.deallocate(&ns, &[(Lba(0), 4)], 3).unwrap();
                want.push(3);
            }
            q.ring();
            let mut tags = drain(&mut q, want.len());
            tags.sort();
            assert_eq!(tags, want);
            if wz {
                let mut z = c.alloc(8 * bs).unwrap();
                z.as_mut_slice().fill(0xa5);
                q.read_blocking(&ns, Lba(0), z.as_mut_slice()).unwrap();
                assert!(z.as_slice().iter().all(|&b| b == 0), "write zeroes FUA");
            }
            drop(q);
        }
        dev.finish();
    });
}

/// perf's path: submit N with a u64 tag, ring once, poll all; both doorbell modes. N is 32, or
/// fewer when the controller's queues are smaller (CAP.MQES).
#[test]
fn batch_submit_ring_once_poll_all() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    each_mode(|mode| {
        for db in [DoorbellMode::PerBatch, DoorbellMode::PerCommand] {
            let dev = controller_under_test(config(mode, &[NS_512]));
            let c = &dev.ctrl;
            let ns = first_namespace(c);
            // Writes where allowed; reads otherwise (the doorbell batching is the same).
            let op = if dev.skip_writes("batch_submit_ring_once_poll_all: writes") {
                IoOp::Read
            } else {
                IoOp::Write
            };
            let entries = (c.cap().max_queue_entries()).min(64) as u16;
            let n = (entries as usize - 1).min(32);
            let opts = QueueOptions::default()
                .with_entries(entries)
                .with_doorbell(db);
            let mut q: QueuePair<u64> = c.create_qpair(opts).unwrap();
            let mut buf = c.alloc(n * 4096).unwrap();
            fill(buf.as_mut_slice(), 32);
            let before = q.stats().sq_doorbells;
            for i in 0..n as u64 {
                let s = buf.slice(i as usize * 4096, 4096).unwrap();
                // SAFETY: one request per slice; `buf` outlives the polling below.
                unsafe { q.submit_raw(op, &ns, Lba(i * 8), s, IoFlags::NONE, i) }.unwrap();
            }
            q.ring();
            let rung = q.stats().sq_doorbells - before;
            match db {
                DoorbellMode::PerBatch => assert_eq!(rung, 1),
                DoorbellMode::PerCommand => assert_eq!(rung, n as u64),
            }
            let done = RefCell::new(HashMap::new());
            while done.borrow().len() < n {
                q.poll(usize::MAX, |t, r| {
                    done.borrow_mut().insert(t, r.is_ok());
                })
                .unwrap();
            }
            assert!(done.borrow().values().all(|&ok| ok));
            if op == IoOp::Write {
                let mut r = c.alloc(n * 4096).unwrap();
                for i in 0..n {
                    q.read_blocking(
                        &ns,
                        Lba(i as u64 * 8),
                        &mut r.as_mut_slice()[i * 4096..(i + 1) * 4096],
                    )
                    .unwrap();
                }
                assert!(r.as_slice() == buf.as_slice(), "batched writes read back");
            }
            drop(q);
            dev.finish();
        }
    });
}

/// The SMART log counts this test's writes (Host Write Commands): the read-only runs rely on
/// that count to prove they wrote nothing. Asserted on QEMU's controller, reported elsewhere.
#[test]
fn smart_log_counts_host_writes() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    let dev = controller_under_test(config(Mode::Inline, &[NS_512]));
    if !dev.is_hardware() {
        dev.finish();
        return; // the emulator's SMART log has no counters to check
    }
    if dev.skip_writes("smart_log_counts_host_writes") {
        return;
    }
    let c = &dev.ctrl;
    let ns = first_namespace(c);
    let before = c.smart_log().unwrap().host_write_commands;
    let mut q = c.create_qpair::<u64>(QueueOptions::default()).unwrap();
    let b = pattern_buffer(c, ns.block_size() as usize, 7);
    for i in 0..4 {
        q.write_blocking(&ns, Lba(500 + i), b.as_slice()).unwrap();
    }
    drop(q);
    let after = c.smart_log().unwrap().host_write_commands;
    let model = c.identify().mn;
    note(format!(
        "{}: SMART Host Write Commands {before} -> {after} after 4 writes",
        dev.name()
    ));
    if model.contains("QEMU") {
        assert!(after >= before + 4, "QEMU counts host writes");
    } else if after == before {
        note(format!(
            "{}: the SMART log did not count 4 writes: the read-only runs' no-write check is \
             weak on this device",
            dev.name()
        ));
    }
    dev.finish();
}

/// Dropping a queue pair frees its queue id for the next one (and deletes its queues).
#[test]
fn queue_ids_are_reused_after_drop() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    let dev = controller_under_test(config(Mode::Inline, &[NS_512]));
    let c = &dev.ctrl;
    let q1 = c.create_qpair::<u64>(QueueOptions::default()).unwrap();
    let qid = q1.qid();
    drop(q1);
    let q2 = c.create_qpair::<u64>(QueueOptions::default()).unwrap();
    assert_eq!(q2.qid(), qid);
    drop(q2);
    dev.finish();
}

/// A buffer that is not this controller's DMA memory is refused before the device sees it:
/// another controller's DMA memory (always an emulated one: a real device can be opened only
/// once) and plain heap memory.
#[test]
fn owned_api_rejects_foreign_memory() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    let dev = controller_under_test(config(Mode::Inline, &[NS_512]));
    let (other, _other_emu) = emulated(config(Mode::Inline, &[NS_512]));
    let ns = first_namespace(&dev.ctrl);
    let mut q = dev
        .ctrl
        .create_qpair::<DmaBuffer>(QueueOptions::default())
        .unwrap();
    // A buffer from another controller's DMA memory is not this device's to use.
    let foreign = other.alloc(4096).unwrap();
    let rej = q
        .submit(IoOp::Read, &ns, Lba(0), IoFlags::NONE, foreign)
        .unwrap_err();
    assert!(
        matches!(rej.error, Error::NotDmaMemory { .. }),
        "{:?}",
        rej.error
    );
    let mut q2 = dev
        .ctrl
        .create_qpair::<u64>(QueueOptions::default())
        .unwrap();
    let mut foreign = other.alloc(4096).unwrap();
    let e = q2.read_blocking(&ns, Lba(0), foreign.as_mut_slice());
    assert!(matches!(e, Err(Error::NotDmaMemory { .. })), "{e:?}");
    let mut heap = vec![0u8; 8192];
    let e = q2.read_blocking(&ns, Lba(0), &mut heap[4096..]);
    assert!(matches!(e, Err(Error::NotDmaMemory { .. })), "{e:?}");
    assert_eq!(q2.stats().submitted, 0);
    drop((q, q2));
    dev.finish();
}

fn is_reset_error(e: &Error) -> bool {
    matches!(
        e,
        Error::QueueDead {
            reason: DeadReason::ControllerReset,
            ..
        } | Error::Io(IoError::Aborted {
            reason: DeadReason::ControllerReset,
            ..
        })
    )
}

/// Controller::reset on a healthy controller: disable (which deletes every I/O queue), admin
/// queue, enable, identify. Queue pairs from before fail with ControllerReset and are dropped
/// without Delete SQ/CQ; new ones work, the namespaces are the same, and data survives.
#[test]
fn reset_reinitialises_and_old_queue_pairs_fail() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    each_mode(|mode| {
        let dev = controller_under_test(config(mode, &[NS_512, NS_4K]));
        let c = &dev.ctrl;
        let ns = first_namespace(c);
        let bs = ns.block_size() as usize;
        let before: Vec<(Nsid, u64, u32)> = c
            .namespaces()
            .iter()
            .map(|n| (n.nsid(), n.blocks(), n.block_size()))
            .collect();
        let mut old = c.create_qpair::<u64>(QueueOptions::default()).unwrap();
        let mut buf = c.alloc(4 * bs).unwrap();
        let writes = !dev.skip_writes("reset_reinitialises_and_old_queue_pairs_fail: writes");
        if writes {
            fill(buf.as_mut_slice(), 0x5e5e);
            old.write_blocking(&ns, Lba(200), buf.as_slice()).unwrap();
        }
        old.read_blocking(&ns, Lba(200), buf.as_mut_slice())
            .unwrap();
        let t = Instant::now();
        c.reset().unwrap();
        let reset_ms = ms(t);
        assert!(c.csts().unwrap().rdy(), "ready after the reset");
        let e = old
            .read_blocking(&ns, Lba(0), &mut buf.as_mut_slice()[..bs])
            .unwrap_err();
        assert!(is_reset_error(&e), "old queue pair after reset: {e}");
        assert!(old.dead_reason() == Some(DeadReason::ControllerReset));
        drop(old);
        if let Some(emu) = &dev.emu {
            use dioxide::spec::sqe::admin;
            assert_eq!(emu.stats().commands_with(0, admin::DELETE_IO_SQ), 0);
        }
        let after: Vec<(Nsid, u64, u32)> = c
            .namespaces()
            .iter()
            .map(|n| (n.nsid(), n.blocks(), n.block_size()))
            .collect();
        assert_eq!(before, after, "namespaces after the reset");
        c.identify_controller().unwrap();
        let mut new = c.create_qpair::<u64>(QueueOptions::default()).unwrap();
        let mut r = c.alloc(4 * bs).unwrap();
        new.read_blocking(&ns, Lba(200), r.as_mut_slice()).unwrap();
        if writes {
            assert!(
                r.as_slice() == pattern(4 * bs, 0x5e5e),
                "data survives a reset"
            );
            let w = pattern_buffer(c, 4 * bs, 0x5e5f);
            new.write_blocking(&ns, Lba(200), w.as_slice()).unwrap();
            new.read_blocking(&ns, Lba(200), r.as_mut_slice()).unwrap();
            assert!(r.as_slice() == w.as_slice());
        }
        // A second reset in a row, and queue ids are handed out again from the start.
        c.reset().unwrap();
        drop(new);
        let q = c.create_qpair::<u64>(QueueOptions::default()).unwrap();
        assert_eq!(q.qid().0, 1);
        drop(q);
        if dev.is_hardware() {
            note(format!("reset of {}: {reset_ms:.1} ms", dev.name()));
        }
        dev.finish();
    });
}

/// Dropping the last handle shuts the controller down (CC.SHN normal, CSTS.SHST complete,
/// read through a bus handle kept past the controller); the controller then opens again
/// (on VFIO: the device is closed and re-opened) and the data written before is there.
#[test]
fn shutdown_on_drop_then_reopen() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    let _exclusive = device_lock();
    for &mode in device_modes() {
        let dev = controller_under_test(config(mode, &[NS_512]));
        let ns = first_namespace(&dev.ctrl);
        let bs = ns.block_size() as usize;
        let writes = !dev.skip_writes("shutdown_on_drop_then_reopen: writes");
        let w = pattern(8 * bs, 0xd0d0 + mode as u64);
        {
            let c = &dev.ctrl;
            let mut q = c.create_qpair::<u64>(QueueOptions::default()).unwrap();
            if writes {
                let mut b = c.alloc(8 * bs).unwrap();
                b.as_mut_slice().copy_from_slice(&w);
                q.write_blocking(&ns, Lba(300), b.as_slice()).unwrap();
            }
            let c2 = c.clone();
            drop(q);
            drop(c2);
        }
        // A buffer of the first controller's DMA memory, kept past its close and re-open.
        let mut stale = dev.ctrl.alloc(8 * bs).unwrap();
        stale.as_mut_slice().fill(0x3c);
        let bus = dev.ctrl.bus().clone();
        assert_eq!(Cc(bus.read32(offset::CC)).shn(), 0, "not shut down yet");
        let emu = dev.emu.clone();
        let name = dev.name().to_string();
        let t = Instant::now();
        drop(dev);
        let shutdown_ms = ms(t);
        let cc = Cc(bus.read32(offset::CC));
        let csts = Csts(bus.read32(offset::CSTS));
        assert_eq!(
            cc.shn(),
            1,
            "CC.SHN = normal after the last handle went ({name})"
        );
        assert_eq!(csts.shst(), shst::COMPLETE, "CSTS.SHST = complete ({name})");
        drop(bus); // on VFIO: BAR0 unmapped, device closed
        let t = Instant::now();
        let dev = reopen(emu);
        let reopen_ms = ms(t);
        let c = &dev.ctrl;
        assert!(c.csts().unwrap().rdy());
        assert_eq!(
            Cc(c.bus().read32(offset::CC)).shn(),
            0,
            "SHN cleared by bring-up"
        );
        let mut q = c.create_qpair::<u64>(QueueOptions::default()).unwrap();
        let mut r = c.alloc(8 * bs).unwrap();
        q.read_blocking(&ns, Lba(300), r.as_mut_slice()).unwrap();
        if writes {
            assert!(
                r.as_slice() == w,
                "data written before the shutdown ({name})"
            );
        }
        // On VFIO the old bus's buffer is not the new bus's DMA memory (its IOMMU mapping went
        // with the old container): refused, and still usable as plain memory. The emulator
        // re-opened is the same bus, whose memory it still is.
        let e = q.read_blocking(&ns, Lba(300), stale.as_mut_slice());
        if dev.is_hardware() {
            assert!(matches!(e, Err(Error::NotDmaMemory { .. })), "{e:?}");
            assert!(stale.as_slice().iter().all(|&b| b == 0x3c));
        } else {
            e.unwrap();
        }
        drop(stale);
        q.read_blocking(&ns, Lba(300), r.as_mut_slice()).unwrap();
        drop(q);
        if dev.is_hardware() {
            note(format!(
                "{name}: shutdown on drop {shutdown_ms:.1} ms, close + re-open + bring-up \
                 {reopen_ms:.1} ms"
            ));
        }
        dev.finish();
    }
}

/// As many queue pairs as the controller grants (up to 16), each doing I/O on its own LBAs,
/// then all dropped and created again.
#[test]
fn many_queue_pairs() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    each_mode(|mode| {
        let dev = controller_under_test(config(mode, &[NS_512]));
        let c = &dev.ctrl;
        let ns: Namespace = first_namespace(c);
        let bs = ns.block_size() as usize;
        let n = c.io_queues().min(16) as usize;
        let writes = !dev.skip_writes("many_queue_pairs: writes");
        for round in 0..2u64 {
            let mut qs: Vec<QueuePair<u64>> = (0..n)
                .map(|_| {
                    c.create_qpair::<u64>(QueueOptions::default().with_entries(queue_entries(c, 8)))
                        .unwrap()
                })
                .collect();
            let bufs: Vec<DmaBuffer> = (0..n)
                .map(|i| pattern_buffer(c, bs, round * 100 + i as u64))
                .collect();
            for (i, q) in qs.iter_mut().enumerate() {
                let op = if writes { IoOp::Write } else { IoOp::Read };
                // SAFETY: one request per buffer; the buffers outlive the polling below.
                unsafe {
                    q.submit_raw(
                        op,
                        &ns,
                        Lba(400 + i as u64),
                        bufs[i].as_dma_slice(),
                        IoFlags::NONE,
                        i as u64,
                    )
                }
                .unwrap();
                q.ring();
            }
            for (i, q) in qs.iter_mut().enumerate() {
                assert_eq!(drain(q, 1), vec![i as u64]);
            }
            if writes {
                for (i, q) in qs.iter_mut().enumerate() {
                    let j = (i + 1) % n;
                    let mut r = c.alloc(bs).unwrap();
                    q.read_blocking(&ns, Lba(400 + j as u64), r.as_mut_slice())
                        .unwrap();
                    assert!(
                        r.as_slice() == bufs[j].as_slice(),
                        "queue {i} reads queue {j}'s block"
                    );
                }
            }
            drop(qs);
        }
        dev.finish();
    });
}

/// A reset with commands in flight on the device: every request completes exactly once, either
/// done before the reset (successfully) or failed with ControllerReset, and its buffer comes
/// back; new queue pairs work afterwards. On VFIO the harness also checks that no DMA went
/// astray (the IOMMU logs a fault for any transfer to memory that was unmapped).
#[test]
fn reset_with_commands_in_flight() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    each_mode(|mode| {
        let dev = controller_under_test(config(mode, &[NS_512]));
        let c = &dev.ctrl;
        let ns = first_namespace(c);
        let entries = c.cap().max_queue_entries().min(64) as u16;
        let n = (entries - 1).min(32) as u64;
        let mut q = c
            .create_qpair::<(DmaBuffer, u64)>(QueueOptions::default().with_entries(entries))
            .unwrap();
        let len = c.max_transfer().min(64 << 10);
        // The first half is rung (the device may have done it by the time of the reset); the
        // second half is queued but not rung, so the device never sees it: the driver must not
        // ring that doorbell after the reset, and must fail those requests.
        for i in 0..n {
            let lba = Lba(i * (len / ns.block_size() as usize) as u64);
            q.read(&ns, lba, (c.alloc(len).unwrap(), i)).unwrap();
            if i == n / 2 - 1 {
                q.ring();
            }
        }
        c.reset().unwrap();
        let mut seen = vec![0u32; n as usize];
        let (mut ok, mut aborted) = (0, 0);
        let deadline = Instant::now() + Duration::from_secs(10);
        while ok + aborted < n && Instant::now() < deadline {
            let polled = q.poll(usize::MAX, |(b, i), r| {
                assert_eq!(b.len(), len, "the buffer comes back");
                seen[i as usize] += 1;
                match r {
                    Ok(_) => ok += 1,
                    Err(IoError::Aborted {
                        reason: DeadReason::ControllerReset,
                        ..
                    }) => aborted += 1,
                    Err(e) => panic!("request {i}: {e}"),
                }
            });
            // The reset killed the queue: only that death is expected.
            match polled {
                Ok(_)
                | Err(Error::QueueDead {
                    reason: DeadReason::ControllerReset,
                    ..
                }) => {}
                Err(e) => panic!("poll after reset: {e}"),
            }
        }
        assert!(seen.iter().all(|&s| s == 1), "each exactly once: {seen:?}");
        assert!(
            aborted >= n / 2,
            "the unrung half fails: {ok} ok, {aborted} aborted"
        );
        assert_eq!(q.outstanding(), 0);
        drop(q);
        let mut q = c.create_qpair::<u64>(QueueOptions::default()).unwrap();
        let mut b = c.alloc(len).unwrap();
        q.read_blocking(&ns, Lba(0), b.as_mut_slice()).unwrap();
        drop(q);
        if dev.is_hardware() {
            note(format!(
                "reset with {n} reads queued on {} ({} rung): {ok} completed before, {aborted} \
                 failed with ControllerReset",
                dev.name(),
                n / 2
            ));
        }
        dev.finish();
    });
}
