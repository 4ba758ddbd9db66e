//! The I/O semantics of `tests/io.rs` on both transports of the seam: each body runs on the
//! emulated controller over PCIe, then on the same emulated controller served by the driver's
//! NVMe/TCP target over loopback ([`each_transport`]). What is PCIe mechanics (phase wrap,
//! doorbell batching, DMA memory checks, controller reset) stays in `tests/io.rs`.
//!
//! Every test waits with a time limit ([`IO_LIMIT`] per wait, the watchdog around the test).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use dioxide::emulated::{Action, Fault, Mode, Trigger};
use dioxide::spec::identify::Oncs;
use dioxide::spec::sqe::io as io_op;
use dioxide::spec::status::media;
use dioxide::spec::{Sct, Status};
use dioxide::{
    HostBuf, IoFlags, IoOp, Lba, Nsid, NvmfHostError, QueueOptions, TransportBuf, TransportError,
    TransportIoError, TransportQueue,
};
use dioxide_tests::*;

const NS_512: (u32, u64) = (512, 1 << 20); // 512 MiB
const NS_4K: (u32, u64) = (4096, 1 << 16); // 256 MiB

/// Random offsets and lengths from one block to 3 x MDTS, in every namespace; then everything
/// read back through another queue compares equal.
#[test]
fn round_trip_random_offsets_and_lengths() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    each_transport(Mode::Threaded, &[NS_512, NS_4K], |t| {
        let c = &t.ctrl;
        let mdts = c.max_transfer();
        let mut q = c.create_qpair::<u64>(QueueOptions::default()).unwrap();
        let mut q2 = c.create_qpair::<u64>(QueueOptions::default()).unwrap();
        let mut rng = Rng(0x1234_5678);
        let n = 24;
        for ns in c.namespaces() {
            let bs = ns.block_size() as u64;
            let region = ((4 << 20) / bs).min(ns.blocks() / n);
            let max_blocks = ((3 * mdts as u64) / bs).min(region);
            let mut written = Vec::new();
            for i in 0..n {
                let blocks = rng.range(1, max_blocks + 1);
                let lba = Lba(i * region + rng.range(0, region - blocks + 1));
                let len = (blocks * bs) as usize;
                let seed = i + 100 * bs;
                io_ok(&mut q, IoOp::Write, &ns, lba, &t.pattern_buf(len, seed));
                written.push((lba, len, seed));
            }
            for (lba, len, seed) in written {
                let r = t.alloc(len);
                io_ok(&mut q2, IoOp::Read, &ns, lba, &r);
                assert!(
                    r.as_slice() == pattern(len, seed),
                    "{}: data at {lba} of namespace {}",
                    t.name(),
                    ns.nsid()
                );
            }
        }
        drop((q, q2));
        t.finish();
    });
}

/// Several namespaces, several queues, interleaved: each namespace keeps its own data,
/// whichever queue wrote or reads it.
#[test]
fn several_namespaces_and_queues() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    each_transport(Mode::Threaded, &[NS_512, NS_4K, NS_512], |t| {
        let c = &t.ctrl;
        let nq = c.io_queues().min(4) as usize;
        assert!(nq >= 2, "{}: {nq} I/O queues", t.name());
        let mut qs: Vec<TransportQueue<u64>> = (0..nq)
            .map(|_| c.create_qpair(QueueOptions::default()).unwrap())
            .collect();
        let mut qids: Vec<_> = qs.iter().map(|q| q.qid()).collect();
        qids.sort();
        qids.dedup();
        assert_eq!(qids.len(), nq, "{}: distinct queue ids", t.name());
        let nss = c.namespaces();
        assert_eq!(nss.len(), 3);
        let len = 16384;
        for (i, ns) in nss.iter().enumerate() {
            io_ok(
                &mut qs[i % nq],
                IoOp::Write,
                ns,
                Lba(64),
                &t.pattern_buf(len, i as u64),
            );
        }
        for (k, q) in qs.iter_mut().enumerate() {
            for (i, ns) in nss.iter().enumerate() {
                let r = t.alloc(len);
                io_ok(q, IoOp::Read, ns, Lba(64), &r);
                assert!(
                    r.as_slice() == pattern(len, i as u64),
                    "{}: queue {k}, namespace {}",
                    t.name(),
                    ns.nsid()
                );
            }
        }
        drop(qs);
        t.finish();
    });
}

/// A request of 4 x MDTS completes exactly once with all its data (split into MDTS children on
/// PCIe; one command on NVMe/TCP, whose data moves in R2T / C2HData pieces).
#[test]
fn four_times_mdts_completes_once_with_all_data() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    each_transport(Mode::Threaded, &[NS_512, NS_4K], |t| {
        let c = &t.ctrl;
        let len = 4 * c.max_transfer();
        for ns in c.namespaces() {
            let mut q = c.create_qpair::<u64>(QueueOptions::default()).unwrap();
            let lba = Lba(1000);
            let w = t.pattern_buf(len, 44 + ns.nsid().0 as u64);
            let r = t.alloc(len);
            // SAFETY: both buffers outlive the polling below and are not touched until
            // both completions are back.
            unsafe {
                q.submit_raw(IoOp::Write, &ns, lba, &w, 1).unwrap();
            }
            q.ring();
            assert_eq!(drain(&mut q, 1), vec![1]);
            // SAFETY: as above.
            unsafe { q.submit_raw(IoOp::Read, &ns, lba, &r, 2).unwrap() };
            q.ring();
            assert_eq!(drain(&mut q, 1), vec![2]);
            // Nothing else arrives: the parent completed exactly once.
            assert_eq!(
                q.poll(usize::MAX, |tag, _| panic!("tag {tag} again"))
                    .unwrap(),
                0
            );
            assert!(
                r.as_slice() == w.as_slice(),
                "{}: namespace {}",
                t.name(),
                ns.nsid()
            );
            if let Some(st) = q.stats() {
                assert_eq!(st.split_children, 8, "4 + 4 children on PCIe");
            }
        }
        t.finish();
    });
}

/// A request split into commands (4 x MDTS) of which one fails completes once, with that
/// command's status; the queue goes on working.
#[test]
fn a_failed_part_fails_its_request_once() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    each_transport(Mode::Threaded, &[NS_512], |t| {
        let c = &t.ctrl;
        let ns = t.first_namespace();
        let len = 4 * c.max_transfer();
        let blocks = (len / ns.block_size() as usize) as u64;
        // One bad block in the third quarter of the request at LBA 0.
        let bad = blocks / 2 + 3;
        t.emu.inject(Fault {
            trigger: Trigger::LbaRange {
                nsid: ns.nsid().0,
                start: bad,
                end: bad + 1,
                opcode: None,
            },
            action: Action::Status(Status::new(Sct::Media, media::UNRECOVERED_READ_ERROR)),
            times: None,
        });
        let mut q = c.create_qpair::<u64>(QueueOptions::default()).unwrap();
        let r = t.alloc(len);
        match io(&mut q, IoOp::Read, &ns, Lba(0), &r) {
            Err(Err(e)) => assert_eq!(
                e.status().map(|s| (s.sct, s.sc)),
                Some((Sct::Media, media::UNRECOVERED_READ_ERROR)),
                "{}: {e}",
                t.name()
            ),
            other => panic!("{}: a read over a bad block: {other:?}", t.name()),
        }
        assert_eq!(q.outstanding(), 0);
        assert_eq!(
            q.poll(usize::MAX, |tag, _| panic!("tag {tag} again"))
                .unwrap(),
            0
        );
        // The same request past the bad block succeeds, with its data.
        let w = t.pattern_buf(len, 77);
        io_ok(&mut q, IoOp::Write, &ns, Lba(blocks), &w);
        io_ok(&mut q, IoOp::Read, &ns, Lba(blocks), &r);
        assert!(r.as_slice() == w.as_slice(), "{}", t.name());
        t.emu.clear_faults();
        drop(q);
        t.finish();
    });
}

/// Thousands of reads through a 16-entry queue with up to 48 outstanding: requests wait for
/// room, every one completes exactly once.
#[test]
fn queue_depth_beyond_the_entries() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    each_transport(Mode::Threaded, &[NS_4K], |t| {
        let c = &t.ctrl;
        let ns = t.first_namespace();
        let opts = QueueOptions::default().with_entries(16).with_requests(64);
        let mut q = c.create_qpair::<u64>(opts).unwrap();
        let bufs: Vec<TransportBuf> = (0..64).map(|_| t.alloc(4096)).collect();
        let total = 4000u64;
        let mut seen = vec![false; total as usize];
        let (mut next, mut done, mut outstanding) = (0u64, 0u64, 0u64);
        let deadline = Instant::now() + IO_LIMIT;
        while done < total {
            assert!(Instant::now() < deadline, "{done} of {total}");
            while next < total && outstanding < 48 {
                let b = &bufs[(next % 64) as usize];
                // SAFETY: a buffer is used by one request at a time (at most 48 in
                // flight over 64 buffers, round robin) and outlives the queue's use.
                unsafe { q.submit_raw(IoOp::Read, &ns, Lba(next % 4096), b, next) }.unwrap();
                next += 1;
                outstanding += 1;
            }
            q.ring();
            q.poll(usize::MAX, |tag, r| {
                r.unwrap();
                assert!(!seen[tag as usize], "tag {tag} completed twice");
                seen[tag as usize] = true;
                done += 1;
                outstanding -= 1;
            })
            .unwrap();
        }
        assert!(seen.iter().all(|&s| s));
        if let Some(st) = q.stats() {
            assert_eq!(st.completed, total);
            assert!(st.waited > 0, "requests must have waited for room");
        }
        drop(q);
        t.finish();
    });
}

/// Requests that found no room are issued in submission order: with one command slot,
/// writes of different data to one LBA complete in order and leave the last one.
#[test]
fn waiting_requests_are_issued_in_order() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    each_transport(Mode::Threaded, &[NS_512], |t| {
        let c = &t.ctrl;
        let ns = t.first_namespace();
        let bs = ns.block_size() as usize;
        let opts = QueueOptions::default().with_entries(2).with_requests(32);
        let mut q = c.create_qpair::<u64>(opts).unwrap();
        let bufs: Vec<TransportBuf> = (0..20).map(|i| t.pattern_buf(bs, i)).collect();
        for (i, b) in bufs.iter().enumerate() {
            // SAFETY: each buffer is used by one request and outlives the polling below.
            unsafe { q.submit_raw(IoOp::Write, &ns, Lba(5), b, i as u64) }.unwrap();
        }
        q.ring();
        assert_eq!(
            drain(&mut q, 20),
            (0..20).collect::<Vec<_>>(),
            "{}",
            t.name()
        );
        let r = t.alloc(bs);
        io_ok(&mut q, IoOp::Read, &ns, Lba(5), &r);
        assert!(
            r.as_slice() == pattern(bs, 19),
            "{}: the last write landed last",
            t.name()
        );
        drop(q);
        t.finish();
    });
}

/// Why a request was refused (the PCIe queue pair's typed errors, the TCP queue's messages).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refusal {
    /// Outside the namespace.
    Range,
    /// Not whole blocks (or none).
    Size,
    /// A buffer of the other transport.
    Foreign,
}

fn refusal(e: &TransportError) -> Refusal {
    use dioxide::Error;
    match e {
        TransportError::Pcie(Error::LbaOutOfRange { .. }) => Refusal::Range,
        TransportError::Pcie(Error::NotBlockMultiple { .. } | Error::ZeroLength { .. }) => {
            Refusal::Size
        }
        TransportError::Invalid(m) if m.contains("beyond namespace") => Refusal::Range,
        TransportError::Invalid(m) if m.contains("is not whole") => Refusal::Size,
        TransportError::Invalid(m) if m.contains("another transport") => Refusal::Foreign,
        other => panic!("an unexpected refusal: {other:?}"),
    }
}

/// Requests the transport must refuse are refused before the controller sees them, with the
/// tag handed back: past the end of the namespace, not whole blocks, zero length, a buffer of
/// the other transport; an inactive namespace is an error of the controller handle.
#[test]
fn bad_inputs_are_refused_before_the_controller_sees_them() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    each_transport(Mode::Inline, &[NS_512, NS_4K], |t| {
        let c = &t.ctrl;
        let active: Vec<u32> = c.namespaces().iter().map(|n| n.nsid().0).collect();
        let missing = Nsid(active.iter().max().unwrap() + 1);
        match c.namespace(missing) {
            Err(TransportError::Pcie(dioxide::Error::NoSuchNamespace { nsid, .. })) => {
                assert_eq!(nsid, missing)
            }
            Err(TransportError::Invalid(msg)) if t.transport == Transport::Tcp => {
                assert!(msg.contains(&format!("namespace {missing}")), "{msg}")
            }
            other => panic!("{}: namespace {missing}: {other:?}", t.name()),
        }
        let mut q = c.create_qpair::<u64>(QueueOptions::default()).unwrap();
        let before = t.emu.stats();
        let foreign = match t.transport {
            Transport::Pcie => TransportBuf::Host(HostBuf::new(4096)),
            Transport::Tcp => {
                let (other, _emu) = emulated(config(Mode::Inline, &[NS_512]));
                TransportBuf::Dma(other.alloc(4096).unwrap())
            }
        };
        for ns in c.namespaces() {
            let bs = ns.block_size() as usize;
            let end = ns.blocks();
            use Refusal::{Foreign, Range, Size};
            let cases: [(&str, IoOp, u64, usize, Refusal); 7] = [
                (
                    "two blocks over the end",
                    IoOp::Read,
                    end - 1,
                    2 * bs,
                    Range,
                ),
                ("at the end", IoOp::Read, end, bs, Range),
                ("at LBA u64::MAX", IoOp::Read, u64::MAX, bs, Range),
                ("a write at the end", IoOp::Write, end, bs, Range),
                ("a block and a half", IoOp::Read, 0, bs + bs / 2, Size),
                (
                    "a write of a block and a half",
                    IoOp::Write,
                    0,
                    bs + bs / 2,
                    Size,
                ),
                ("zero length", IoOp::Read, 0, 0, Size),
            ];
            for (what, op, lba, len, want) in cases {
                // A zero-length DMA buffer does not exist: an empty host buffer stands in,
                // which the PCIe queue refuses as a buffer of the other transport.
                let (b, want) = match len {
                    0 if t.transport == Transport::Pcie => {
                        (TransportBuf::Host(HostBuf::new(0)), Foreign)
                    }
                    0 => (TransportBuf::Host(HostBuf::new(0)), want),
                    _ => (t.alloc(len), want),
                };
                match io(&mut q, op, &ns, Lba(lba), &b) {
                    Err(Ok(e)) => assert_eq!(refusal(&e), want, "{}: {what}: {e}", t.name()),
                    other => panic!("{}: {what}: {other:?}", t.name()),
                }
            }
            match io(&mut q, IoOp::Read, &ns, Lba(0), &foreign) {
                Err(Ok(e)) => assert_eq!(refusal(&e), Foreign, "{}: {e}", t.name()),
                other => panic!("{}: a foreign buffer: {other:?}", t.name()),
            }
        }
        // Nothing reached the controller, and the queue still works.
        let after = t.emu.stats();
        assert_eq!(
            after.io_commands(),
            before.io_commands(),
            "{}: refused requests reached the controller",
            t.name()
        );
        let ns = t.first_namespace();
        io_ok(&mut q, IoOp::Read, &ns, Lba(0), &t.alloc(4096));
        drop(q);
        t.finish();
    });
}

/// Flush, FUA writes, Write Zeroes and Deallocate (the emulated controller has both, and
/// deallocated blocks read zeroes), with the data read back; the asynchronous forms batched
/// and rung once; ranges outside the namespace refused before the controller sees them.
#[test]
fn flush_fua_write_zeroes_deallocate() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    each_transport(Mode::Threaded, &[NS_4K, NS_512], |t| {
        let c = &t.ctrl;
        let oncs = c.identify().oncs;
        assert!(
            oncs.contains(Oncs::WRITE_ZEROES) && oncs.contains(Oncs::DSM),
            "{}: ONCS {:#x} lacks Write Zeroes or Dataset Management",
            t.name(),
            oncs.bits()
        );
        for ns in c.namespaces() {
            let bs = ns.block_size() as usize;
            let mut q = c.create_qpair::<u64>(QueueOptions::default()).unwrap();
            let w = t.pattern_buf(4 * bs, 9);
            let fua_before = t.emu.stats().io_commands_with(io_op::WRITE);
            // SAFETY: `w` outlives the wait below and is not written meanwhile.
            unsafe { q.submit_raw_with(IoOp::Write, &ns, Lba(10), &w, IoFlags::FUA, 1) }.unwrap();
            q.flush(&ns, 2).unwrap();
            q.ring();
            let mut tags = drain(&mut q, 2);
            tags.sort();
            assert_eq!(tags, vec![1, 2]);
            assert_eq!(t.emu.stats().io_commands_with(io_op::WRITE), fua_before + 1);
            let r = t.alloc(4 * bs);
            io_ok(&mut q, IoOp::Read, &ns, Lba(10), &r);
            assert!(r.as_slice() == w.as_slice(), "{}: FUA write", t.name());
            // Write Zeroes of LBAs 11-12: the blocks around keep their data.
            q.write_zeroes(&ns, Lba(11), 2, IoFlags::NONE, 3).unwrap();
            q.ring();
            assert_eq!(drain(&mut q, 1), vec![3]);
            io_ok(&mut q, IoOp::Read, &ns, Lba(10), &r);
            let (rb, wb) = (r.as_slice(), w.as_slice());
            assert_eq!(rb[..bs], wb[..bs], "{}", t.name());
            assert!(
                rb[bs..3 * bs].iter().all(|&b| b == 0),
                "{}: zeroed",
                t.name()
            );
            assert_eq!(rb[3 * bs..], wb[3 * bs..], "{}", t.name());
            // Deallocate LBAs 10 and 13: all four read zeroes now.
            assert_eq!(
                ns.identify().dlfeat & 7,
                1,
                "deallocated blocks read zeroes"
            );
            q.deallocate(&ns, &[(Lba(10), 1), (Lba(13), 1)], 4).unwrap();
            q.ring();
            assert_eq!(drain(&mut q, 1), vec![4]);
            io_ok(&mut q, IoOp::Read, &ns, Lba(10), &r);
            assert!(
                r.as_slice().iter().all(|&b| b == 0),
                "{}: deallocated",
                t.name()
            );
            // The asynchronous forms batched, rung once; Write Zeroes with FUA.
            io_ok(&mut q, IoOp::Write, &ns, Lba(0), &t.pattern_buf(8 * bs, 5));
            q.flush(&ns, 5).unwrap();
            q.write_zeroes(&ns, Lba(0), 4, IoFlags::FUA, 6).unwrap();
            q.deallocate(&ns, &[(Lba(4), 4)], 7).unwrap();
            q.ring();
            let mut tags = drain(&mut q, 3);
            tags.sort();
            assert_eq!(tags, vec![5, 6, 7]);
            let z = t.alloc(8 * bs);
            io_ok(&mut q, IoOp::Read, &ns, Lba(0), &z);
            assert!(z.as_slice().iter().all(|&b| b == 0), "{}: zeroes", t.name());
            // Ranges past the end or empty are refused, with the tag, and nothing is sent.
            let before = t.emu.stats().io_commands();
            let end = Lba(ns.blocks());
            let refused = [
                q.write_zeroes(&ns, end, 1, IoFlags::NONE, 8)
                    .unwrap_err()
                    .tag,
                q.write_zeroes(&ns, Lba(0), 0, IoFlags::NONE, 9)
                    .unwrap_err()
                    .tag,
                q.deallocate(&ns, &[(end, 1)], 10).unwrap_err().tag,
                q.deallocate(&ns, &[], 11).unwrap_err().tag,
                q.deallocate(&ns, &vec![(Lba(0), 1); 257], 12)
                    .unwrap_err()
                    .tag,
            ];
            assert_eq!(refused, [8, 9, 10, 11, 12], "{}", t.name());
            assert_eq!(q.outstanding(), 0);
            assert_eq!(t.emu.stats().io_commands(), before, "{}", t.name());
            drop(q);
        }
        t.finish();
    });
}

/// perf's path: 32 writes with a u64 tag, rung once, all polled; then read back.
#[test]
fn batch_submit_ring_once_poll_all() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    each_transport(Mode::Threaded, &[NS_512], |t| {
        let c = &t.ctrl;
        let ns = t.first_namespace();
        let n = 32;
        let opts = QueueOptions::default().with_entries(64);
        let mut q = c.create_qpair::<u64>(opts).unwrap();
        let bufs: Vec<TransportBuf> = (0..n).map(|i| t.pattern_buf(4096, 32 + i)).collect();
        let before = q.stats().map(|s| s.sq_doorbells);
        for (i, b) in bufs.iter().enumerate() {
            // SAFETY: one request per buffer; the buffers outlive the polling below.
            unsafe { q.submit_raw(IoOp::Write, &ns, Lba(i as u64 * 8), b, i as u64) }.unwrap();
        }
        q.ring();
        if let (Some(b), Some(st)) = (before, q.stats()) {
            assert_eq!(st.sq_doorbells - b, 1, "one doorbell for the batch");
        }
        let mut done = HashMap::new();
        drain_with(&mut q, n as usize, |tag, r| {
            assert!(done.insert(tag, r.is_ok()).is_none(), "tag {tag} twice");
        });
        assert!(done.values().all(|&ok| ok), "{}: {done:?}", t.name());
        for (i, b) in bufs.iter().enumerate() {
            let r = t.alloc(4096);
            io_ok(&mut q, IoOp::Read, &ns, Lba(i as u64 * 8), &r);
            assert!(r.as_slice() == b.as_slice(), "{}: write {i}", t.name());
        }
        drop(q);
        t.finish();
    });
}

/// The SMART log's Host Write Commands counts this test's writes, on either transport (over
/// NVMe/TCP the target answers with the backing controller's page).
#[test]
fn smart_log_counts_host_writes() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    each_transport(Mode::Inline, &[NS_512], |t| {
        let c = &t.ctrl;
        let ns = t.first_namespace();
        let before = c.smart_log().unwrap().host_write_commands;
        let mut q = c.create_qpair::<u64>(QueueOptions::default()).unwrap();
        let b = t.pattern_buf(ns.block_size() as usize, 7);
        for i in 0..4 {
            io_ok(&mut q, IoOp::Write, &ns, Lba(500 + i), &b);
        }
        let after = c.smart_log().unwrap().host_write_commands;
        assert_eq!(after, before + 4, "{}", t.name());
        c.error_log(4).unwrap();
        // The target does not answer the firmware slot log (Invalid Field): PCIe only.
        if t.transport == Transport::Pcie {
            assert!(!c.firmware_slot_log().unwrap().frs[0].is_empty());
        }
        drop(q);
        t.finish();
    });
}

/// Dropping a queue frees its queue id for the next one; as many queues as the controller
/// grants (up to 16) each do I/O on their own LBAs, then all are dropped and created again.
#[test]
fn queue_ids_are_reused_and_many_queues() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    each_transport(Mode::Threaded, &[NS_512], |t| {
        let c = &t.ctrl;
        let q1 = c.create_qpair::<u64>(QueueOptions::default()).unwrap();
        let qid = q1.qid();
        drop(q1);
        let q2 = c.create_qpair::<u64>(QueueOptions::default()).unwrap();
        assert_eq!(q2.qid(), qid, "{}", t.name());
        drop(q2);
        let ns = t.first_namespace();
        let bs = ns.block_size() as usize;
        let n = c.io_queues().min(16) as usize;
        for round in 0..2u64 {
            let mut qs: Vec<TransportQueue<u64>> = (0..n)
                .map(|i| {
                    c.create_qpair(QueueOptions::default().with_entries(8))
                        .unwrap_or_else(|e| panic!("{}: round {round}, queue {i}: {e}", t.name()))
                })
                .collect();
            let bufs: Vec<TransportBuf> = (0..n)
                .map(|i| t.pattern_buf(bs, round * 100 + i as u64))
                .collect();
            for (i, q) in qs.iter_mut().enumerate() {
                // SAFETY: one request per buffer; the buffers outlive the polling below.
                unsafe { q.submit_raw(IoOp::Write, &ns, Lba(400 + i as u64), &bufs[i], i as u64) }
                    .unwrap();
                q.ring();
            }
            for (i, q) in qs.iter_mut().enumerate() {
                assert_eq!(drain(q, 1), vec![i as u64]);
            }
            for (i, q) in qs.iter_mut().enumerate() {
                let j = (i + 1) % n;
                let r = t.alloc(bs);
                io_ok(q, IoOp::Read, &ns, Lba(400 + j as u64), &r);
                assert!(
                    r.as_slice() == bufs[j].as_slice(),
                    "{}: queue {i} reads queue {j}'s block",
                    t.name()
                );
            }
            drop(qs);
        }
        t.finish();
    });
}

/// The NVMe/TCP target killed with commands in flight on two queues (and more waiting for a
/// command slot): every request ends exactly once with "controller lost", the other queue
/// learns it on its next poll, and a new queue is refused with the same error. (On PCIe the
/// controller going away is a reset: `tests/io.rs`, `reset_with_commands_in_flight`.)
#[test]
fn target_killed_ends_every_request_once_with_controller_lost() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    let mut t = TransportUnderTest::open(Transport::Tcp, config(Mode::Threaded, &[NS_512]));
    let ns = t.first_namespace();
    let opts = QueueOptions::default().with_entries(8).with_requests(64);
    let mut qs: Vec<TransportQueue<u64>> = (0..2)
        .map(|_| t.ctrl.create_qpair(opts.clone()).unwrap())
        .collect();
    // Two commands per request (2 x MDTS): the parts in flight and those still waiting for a
    // command slot end together, once per request.
    let len = 2 * t.ctrl.max_transfer();
    let bufs: Vec<TransportBuf> = (0..64).map(|_| t.alloc(len)).collect();
    // Hold every completion a little, so the commands are still in flight when the target dies.
    hold_completions(&t.emu, Duration::from_millis(20));
    let per_queue = 32u64;
    for (k, q) in qs.iter_mut().enumerate() {
        for i in 0..per_queue {
            let tag = k as u64 * per_queue + i;
            let op = if i % 2 == 0 { IoOp::Read } else { IoOp::Write };
            let lba = Lba(tag * (len / ns.block_size() as usize) as u64);
            // SAFETY: one request per buffer; the buffers outlive the polling below.
            unsafe { q.submit_raw(op, &ns, lba, &bufs[tag as usize], tag) }.unwrap();
        }
        q.ring();
    }
    t.target.as_mut().unwrap().kill();
    let mut seen = vec![0u32; 2 * per_queue as usize];
    let (mut ok, mut lost) = (0u64, 0u64);
    for q in &mut qs {
        let deadline = Instant::now() + IO_LIMIT;
        let mut failed = None;
        while failed.is_none() {
            assert!(Instant::now() < deadline, "the queue never failed");
            let r = q.poll(usize::MAX, |tag, r| {
                seen[tag as usize] += 1;
                match r {
                    Ok(()) => ok += 1,
                    Err(TransportIoError::Tcp(e)) => {
                        assert!(e.to_string().contains("controller lost"), "{e}");
                        lost += 1;
                    }
                    Err(e) => panic!("request {tag}: {e}"),
                }
            });
            if let Err(e) = r {
                failed = Some(e);
            }
        }
        let e = failed.unwrap();
        assert!(matches!(e, TransportError::Tcp(_)), "{e:?}");
        // Later polls and submissions say so, and hand nothing back again.
        assert!(
            q.poll(usize::MAX, |tag, _| panic!("tag {tag} again"))
                .is_err()
        );
        // SAFETY: refused (the connection is gone), the buffer is not used.
        let rej = unsafe { q.submit_raw(IoOp::Read, &ns, Lba(0), &bufs[0], 999) }.unwrap_err();
        assert_eq!(rej.tag, 999);
        assert!(
            matches!(rej.error, TransportError::Tcp(NvmfHostError::Lost(_))),
            "{:?}",
            rej.error
        );
    }
    assert!(
        seen.iter().all(|&s| s == 1),
        "each request exactly once: {seen:?}"
    );
    assert!(lost > 0, "{ok} completed, {lost} lost");
    match t.ctrl.create_qpair::<u64>(QueueOptions::default()) {
        Err(TransportError::Tcp(NvmfHostError::Lost(_))) => {}
        other => panic!("a new queue after the target died: {other:?}"),
    }
    drop(qs);
    t.emu.clear_faults();
    t.finish();
}
