//! Device-independent tests: only the public driver API, so they can run against a real
//! controller too. Each runs in both emulator modes.

use std::cell::RefCell;
use std::collections::HashMap;

use dioxide::emulated::Mode;
use dioxide::{DmaBuffer, DoorbellMode, Error, IoFlags, IoOp, Lba, Nsid, QueueOptions, QueuePair};
use dioxide_tests::*;

const NS_512: (u32, u64) = (512, 1 << 20); // 512 MiB
const NS_4K: (u32, u64) = (4096, 1 << 16); // 256 MiB

fn each_mode(f: impl Fn(Mode)) {
    for m in MODES {
        f(m);
    }
}

#[test]
fn bring_up_identifies_controller_and_namespaces() {
    each_mode(|mode| {
        let dev = controller_under_test(config(mode, &[NS_512, NS_4K, (512, 4096)]));
        let c = &dev.ctrl;
        let id = c.identify();
        assert!(!id.sn.is_empty() && !id.mn.is_empty());
        assert!(c.io_queues() >= 1);
        let ns = c.namespaces();
        assert_eq!(ns.len(), 3);
        assert_eq!(ns[0].nsid(), Nsid(1));
        assert_eq!((ns[0].block_size(), ns[0].blocks()), (512, 1 << 20));
        assert_eq!((ns[1].block_size(), ns[1].blocks()), (4096, 1 << 16));
        assert!(!ns[1].lba_formats().is_empty());
        assert_eq!(c.namespace(Nsid(3)).unwrap().blocks(), 4096);
        let again = c.identify_namespace(Nsid(2)).unwrap();
        assert_eq!(again.nsze, 1 << 16);
        assert_eq!(
            c.active_namespace_ids().unwrap(),
            vec![Nsid(1), Nsid(2), Nsid(3)]
        );
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

#[test]
fn unknown_namespace_is_a_typed_error() {
    let dev = controller_under_test(config(Mode::Inline, &[NS_512]));
    match dev.ctrl.namespace(Nsid(7)) {
        Err(Error::NoSuchNamespace { nsid, active, .. }) => {
            assert_eq!(nsid, Nsid(7));
            assert_eq!(active, vec![1]);
        }
        other => panic!("expected NoSuchNamespace, got {other:?}"),
    }
    dev.finish();
}

/// Random offsets and lengths from one block to several MDTS, in both block sizes, through
/// the blocking API; then everything read back in one pass compares equal.
#[test]
fn round_trip_random_offsets_and_lengths() {
    each_mode(|mode| {
        let dev = controller_under_test(config(mode, &[NS_512, NS_4K]));
        if !dev.writable {
            return;
        }
        let c = &dev.ctrl;
        let mdts = c.max_transfer();
        let mut q = c.create_qpair::<u64>(QueueOptions::default()).unwrap();
        let mut rng = Rng(0x1234_5678 + mode as u64);
        for ns in c.namespaces() {
            let bs = ns.block_size() as u64;
            let max_blocks = (3 * mdts as u64) / bs;
            let mut written: Vec<(Lba, usize, u64)> = Vec::new();
            for i in 0..40u64 {
                let blocks = rng.range(1, max_blocks + 1);
                // Non-overlapping: each I/O in its own 4 MiB region.
                let region = (4 << 20) / bs;
                let lba = Lba(i * region + rng.range(0, region - blocks));
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
            }
            for (lba, len, seed) in written {
                let off = rng.range(0, 1024) as usize * 4;
                let mut buf = c.alloc(off + len).unwrap();
                q.read_blocking(&ns, lba, &mut buf.as_mut_slice()[off..])
                    .unwrap();
                let mut want = vec![0u8; len];
                fill(&mut want, seed);
                assert!(buf.as_slice()[off..] == want[..], "data mismatch at {lba}");
            }
        }
        drop(q);
        dev.finish();
    });
}

/// Several namespaces, several queue pairs, interleaved: each namespace keeps its own data.
#[test]
fn several_namespaces_and_queue_pairs() {
    each_mode(|mode| {
        let dev = controller_under_test(config(mode, &[NS_512, NS_4K, NS_512]));
        let c = &dev.ctrl;
        let mut q1 = c.create_qpair::<u64>(QueueOptions::default()).unwrap();
        let mut q2 = c.create_qpair::<u64>(QueueOptions::default()).unwrap();
        assert_ne!(q1.qid(), q2.qid());
        let nss = c.namespaces();
        for (i, ns) in nss.iter().enumerate() {
            let b = pattern_buffer(c, 16384, i as u64);
            let q = if i % 2 == 0 { &mut q1 } else { &mut q2 };
            q.write_blocking(ns, Lba(64), b.as_slice()).unwrap();
        }
        for (i, ns) in nss.iter().enumerate() {
            let mut r = c.alloc(16384).unwrap();
            let q = if i % 2 == 0 { &mut q2 } else { &mut q1 };
            q.read_blocking(ns, Lba(64), r.as_mut_slice()).unwrap();
            let mut want = vec![0u8; 16384];
            fill(&mut want, i as u64);
            assert!(r.as_slice() == want, "namespace {} data", ns.nsid());
        }
        dev.finish();
    });
}

/// A request of 4 x MDTS is split into children and completes exactly once with all data, via
/// the owned-buffer API.
#[test]
fn four_times_mdts_completes_once_with_all_data() {
    each_mode(|mode| {
        let dev = controller_under_test(config(mode, &[NS_512, NS_4K]));
        let c = &dev.ctrl;
        let mdts = c.max_transfer();
        for ns in c.namespaces() {
            let mut q = c
                .create_qpair::<(DmaBuffer, u32)>(QueueOptions::default())
                .unwrap();
            let w = pattern_buffer(c, 4 * mdts, 44);
            q.write(&ns, Lba(1000), (w, 1)).unwrap();
            let mut done = Vec::new();
            while done.is_empty() {
                q.poll(64, |(b, tag), r| done.push((b, tag, r))).unwrap();
            }
            let (w, tag, r) = done.pop().unwrap();
            assert_eq!(tag, 1);
            r.unwrap();
            let r_buf = c.alloc(4 * mdts).unwrap();
            q.read(&ns, Lba(1000), (r_buf, 2)).unwrap();
            let mut got = None;
            let mut calls = 0;
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while std::time::Instant::now() < deadline {
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
            assert!(r_buf.as_slice() == w.as_slice());
            assert_eq!(q.stats().split_children, 8);
        }
        dev.finish();
    });
}

/// 10 000 commands through a 16-entry queue: the phase tag wraps hundreds of times, requests
/// wait for room, and every one completes exactly once.
#[test]
fn phase_wrap_and_queue_depth() {
    each_mode(|mode| {
        let dev = controller_under_test(config(mode, &[NS_4K]));
        let c = &dev.ctrl;
        let ns = c.namespaces().remove(0);
        let opts = QueueOptions::default().with_entries(16).with_requests(64);
        let mut q = c.create_qpair::<u64>(opts).unwrap();
        let bufs = c.alloc(64 * 4096).unwrap();
        let total = 10_000u64;
        let mut seen = vec![false; total as usize];
        let mut next = 0u64;
        let mut done = 0u64;
        while done < total {
            while next < total && q.outstanding() < 48 {
                let slot = (next % 64) as usize;
                let s = bufs.slice(slot * 4096, 4096).unwrap();
                // SAFETY: each buffer slice is used by at most one request at a time (48 in
                // flight, 64 slices, reused round robin) and outlives the queue pair's use.
                unsafe { q.read_raw(&ns, Lba(next % 4096), s, next) }.unwrap();
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
        dev.finish();
    });
}

/// Requests that found no room are issued in submission order: with one slot on the device,
/// writes of different data to one LBA leave the last one.
#[test]
fn waiting_requests_are_issued_in_order() {
    each_mode(|mode| {
        let dev = controller_under_test(config(mode, &[NS_512]));
        let c = &dev.ctrl;
        let ns = c.namespaces().remove(0);
        let opts = QueueOptions::default().with_entries(2).with_requests(32);
        let mut q = c.create_qpair::<(DmaBuffer, u64)>(opts).unwrap();
        for i in 0..20u64 {
            q.write(&ns, Lba(5), (pattern_buffer(c, 512, i), i))
                .unwrap();
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
        let mut r = c.alloc(512).unwrap();
        q.read_blocking(&ns, Lba(5), r.as_mut_slice()).unwrap();
        let mut want = vec![0u8; 512];
        fill(&mut want, 19);
        assert!(r.as_slice() == want, "the last write landed last");
        dev.finish();
    });
}

#[test]
fn pool_exhaustion_and_oversized_requests_are_typed_errors() {
    each_mode(|mode| {
        let dev = controller_under_test(config(mode, &[NS_512]));
        let c = &dev.ctrl;
        let ns = c.namespaces().remove(0);
        let opts = QueueOptions::default().with_entries(16).with_requests(8);
        let mut q = c.create_qpair::<DmaBuffer>(opts).unwrap();
        for i in 0..8 {
            q.read(&ns, Lba(i), c.alloc(512).unwrap()).unwrap();
        }
        let rej = q.read(&ns, Lba(9), c.alloc(512).unwrap()).unwrap_err();
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
        assert_eq!(rej.ctx.len(), 512, "the context comes back");
        let mut n = 0;
        while n < 8 {
            n += q
                .poll(16, |_, r| {
                    r.unwrap();
                })
                .unwrap();
        }
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
            q.read(&ns, Lba(i), c.alloc(512).unwrap()).unwrap();
        }
        let rej = q
            .read(&ns, Lba(0), c.alloc(4 * c.max_transfer()).unwrap())
            .unwrap_err();
        assert!(
            matches!(rej.error, Error::PoolExhausted { needed: 5, .. }),
            "{:?}",
            rej.error
        );
        let mut n = 0;
        while n < 4 {
            n += q
                .poll(16, |_, r| {
                    r.unwrap();
                })
                .unwrap();
        }
        q.read(&ns, Lba(0), rej.ctx).unwrap();
        while q.outstanding() > 0 {
            q.poll(16, |_, r| {
                r.unwrap();
            })
            .unwrap();
        }
        dev.finish();
    });
}

#[test]
fn bad_inputs_are_typed_errors() {
    each_mode(|mode| {
        let dev = controller_under_test(config(mode, &[NS_512, NS_4K]));
        let c = &dev.ctrl;
        let ns = c.namespace(Nsid(1)).unwrap();
        let ns4k = c.namespace(Nsid(2)).unwrap();
        let mut q = c.create_qpair::<u64>(QueueOptions::default()).unwrap();
        let mut buf = c.alloc(8192).unwrap();
        // Past the end of the namespace.
        let e = q.read_blocking(&ns, Lba(ns.blocks() - 1), &mut buf.as_mut_slice()[..1024]);
        assert!(
            matches!(e, Err(Error::LbaOutOfRange { blocks: 2, .. })),
            "{e:?}"
        );
        let e = q.read_blocking(&ns, Lba(u64::MAX), &mut buf.as_mut_slice()[..512]);
        assert!(matches!(e, Err(Error::LbaOutOfRange { .. })), "{e:?}");
        // Heap memory given to a zero-copy call.
        let mut heap = vec![0u8; 4096];
        let e = q.read_blocking(&ns, Lba(0), &mut heap);
        assert!(
            matches!(e, Err(Error::NotDmaMemory { len: 4096, .. })),
            "{e:?}"
        );
        // Not a multiple of the block size, in either format.
        let e = q.write_blocking(&ns, Lba(0), &buf.as_slice()[..1000]);
        assert!(matches!(
            e,
            Err(Error::NotBlockMultiple {
                len: 1000,
                block_size: 512,
                ..
            })
        ));
        let e = q.write_blocking(&ns4k, Lba(0), &buf.as_slice()[..512]);
        assert!(matches!(
            e,
            Err(Error::NotBlockMultiple {
                block_size: 4096,
                ..
            })
        ));
        // Zero length.
        let e = q.read_blocking(&ns, Lba(0), &mut buf.as_mut_slice()[..0]);
        assert!(matches!(e, Err(Error::ZeroLength { .. })), "{e:?}");
        // Not dword aligned.
        let e = q.read_blocking(&ns, Lba(0), &mut buf.as_mut_slice()[2..514]);
        assert!(matches!(e, Err(Error::Unaligned { .. })), "{e:?}");
        // The raw API validates the same way and hands the context back.
        let s = buf.slice(1, 512).unwrap();
        // SAFETY: the request is rejected before the device sees it.
        let rej = unsafe { q.read_raw(&ns, Lba(0), s, 77) }.unwrap_err();
        assert!(matches!(rej.error, Error::Unaligned { .. }));
        assert_eq!(rej.ctx, 77);
        // Write Zeroes and Deallocate ranges are checked too.
        let e = q.write_zeroes_blocking(&ns, Lba(ns.blocks()), 1, IoFlags::NONE);
        assert!(matches!(e, Err(Error::LbaOutOfRange { .. })), "{e:?}");
        let e = q.deallocate_blocking(&ns, &[]);
        assert!(matches!(e, Err(Error::BadRangeCount(0))), "{e:?}");
        let e = q.deallocate_blocking(&ns, &vec![(Lba(0), 1); 257]);
        assert!(matches!(e, Err(Error::BadRangeCount(257))), "{e:?}");
        // Nothing reached the device, and the queue still works.
        assert_eq!(q.outstanding(), 0);
        q.read_blocking(&ns, Lba(0), &mut buf.as_mut_slice()[..512])
            .unwrap();
        // Bad options.
        let e = c.create_qpair::<u64>(QueueOptions::default().with_entries(1));
        assert!(matches!(e, Err(Error::InvalidOption { .. })), "{e:?}");
        let e = c.create_qpair::<u64>(QueueOptions::default().with_entries(u16::MAX));
        assert!(matches!(e, Err(Error::InvalidOption { .. })), "{e:?}");
        dev.finish();
    });
}

/// Flush, FUA writes, Write Zeroes and Deallocate.
#[test]
fn flush_fua_write_zeroes_deallocate() {
    each_mode(|mode| {
        let dev = controller_under_test(config(mode, &[NS_4K]));
        let c = &dev.ctrl;
        let ns = c.namespaces().remove(0);
        let mut q = c.create_qpair::<u64>(QueueOptions::default()).unwrap();
        let w = pattern_buffer(c, 16384, 9);
        q.write_blocking_with(&ns, Lba(10), w.as_slice(), IoFlags::FUA)
            .unwrap();
        q.flush_blocking(&ns).unwrap();
        q.write_zeroes_blocking(&ns, Lba(11), 2, IoFlags::NONE)
            .unwrap();
        let mut r = c.alloc(16384).unwrap();
        q.read_blocking(&ns, Lba(10), r.as_mut_slice()).unwrap();
        assert_eq!(r.as_slice()[..4096], w.as_slice()[..4096]);
        assert!(r.as_slice()[4096..12288].iter().all(|&b| b == 0));
        assert_eq!(r.as_slice()[12288..], w.as_slice()[12288..]);
        q.deallocate_blocking(&ns, &[(Lba(10), 1), (Lba(13), 1)])
            .unwrap();
        q.read_blocking(&ns, Lba(10), r.as_mut_slice()).unwrap();
        assert!(
            r.as_slice().iter().all(|&b| b == 0),
            "deallocated blocks read zeroes"
        );
        // The asynchronous forms, batched and rung once.
        q.flush(&ns, 1).unwrap();
        q.write_zeroes(&ns, Lba(0), 8, IoFlags::FUA, 2).unwrap();
        q.deallocate(&ns, &[(Lba(0), 4)], 3).unwrap();
        q.ring();
        let mut tags = Vec::new();
        while tags.len() < 3 {
            q.poll(8, |t, r| {
                r.unwrap();
                tags.push(t)
            })
            .unwrap();
        }
        tags.sort();
        assert_eq!(tags, [1, 2, 3]);
        dev.finish();
    });
}

/// perf's path: submit N with a u64 tag, ring once, poll all; both doorbell modes.
#[test]
fn batch_submit_ring_once_poll_all() {
    each_mode(|mode| {
        for db in [DoorbellMode::PerBatch, DoorbellMode::PerCommand] {
            let dev = controller_under_test(config(mode, &[NS_512]));
            let c = &dev.ctrl;
            let ns = c.namespaces().remove(0);
            let opts = QueueOptions::default().with_entries(64).with_doorbell(db);
            let mut q: QueuePair<u64> = c.create_qpair(opts).unwrap();
            let buf = c.alloc(32 * 4096).unwrap();
            let before = q.stats().sq_doorbells;
            for i in 0..32u64 {
                let s = buf.slice(i as usize * 4096, 4096).unwrap();
                // SAFETY: one request per slice; `buf` outlives the polling below.
                unsafe { q.submit_raw(IoOp::Write, &ns, Lba(i * 8), s, IoFlags::NONE, i) }.unwrap();
            }
            q.ring();
            let rung = q.stats().sq_doorbells - before;
            match db {
                DoorbellMode::PerBatch => assert_eq!(rung, 1),
                DoorbellMode::PerCommand => assert_eq!(rung, 32),
            }
            let done = RefCell::new(HashMap::new());
            while done.borrow().len() < 32 {
                q.poll(usize::MAX, |t, r| {
                    done.borrow_mut().insert(t, r.is_ok());
                })
                .unwrap();
            }
            assert!(done.borrow().values().all(|&ok| ok));
            dev.finish();
        }
    });
}

/// Dropping a queue pair frees its queue id for the next one (and deletes its queues).
#[test]
fn queue_ids_are_reused_after_drop() {
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

#[test]
fn owned_api_rejects_foreign_memory() {
    let dev = controller_under_test(config(Mode::Inline, &[NS_512]));
    let other = controller_under_test(config(Mode::Inline, &[NS_512]));
    let ns = dev.ctrl.namespaces().remove(0);
    let mut q = dev
        .ctrl
        .create_qpair::<DmaBuffer>(QueueOptions::default())
        .unwrap();
    // A buffer from another controller's DMA memory is not this device's to use.
    let foreign = other.ctrl.alloc(4096).unwrap();
    let rej = q
        .submit(IoOp::Read, &ns, Lba(0), IoFlags::NONE, foreign)
        .unwrap_err();
    assert!(
        matches!(rej.error, Error::NotDmaMemory { .. }),
        "{:?}",
        rej.error
    );
    drop(q);
    dev.finish();
    other.finish();
}
