//! Unit tests of the queue pair's internals: the slot pool and CIDs, the waiting queue,
//! splitting, and completions a device should never post.

use core::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use super::*;
use crate::bus::emulated::{EmulatedConfig, EmulatedController, NamespaceConfig};
use crate::nvme::controller::Controller;
use crate::types::{Cid, Iova};

fn setup(entries: u16, requests: u16) -> (Controller, Arc<EmulatedController>, QueuePair<u64>) {
    let emu = EmulatedController::new(EmulatedConfig {
        namespaces: vec![NamespaceConfig::memory(512, 1 << 16)],
        ..EmulatedConfig::default()
    })
    .unwrap();
    let c = Controller::new(emu.clone()).unwrap();
    let opts = QueueOptions::default()
        .with_entries(entries)
        .with_requests(requests);
    let q = c.create_qpair::<u64>(opts).unwrap();
    (c, emu, q)
}

fn list(q: &QueuePair<u64>, mut at: u16) -> Vec<u16> {
    let mut v = Vec::new();
    while at != NIL {
        v.push(at);
        at = q.slots[at as usize].next;
    }
    v
}

/// Writes a completion entry into the CQ at the driver's head, as a device would.
fn post(q: &mut QueuePair<u64>, cid: u16, sq_head: u16, sqid: u16) {
    let at = q.ring.cq_cursor();
    let e = at.entry_ptr();
    let phase = at.phase() as u32;
    // SAFETY: the entry at the head is inside our CQ; the device posts nothing meanwhile
    // (inline mode, no command outstanding).
    unsafe {
        e.write_volatile(0);
        e.add(1).write_volatile(0);
        e.add(2)
            .write_volatile(sq_head as u32 | (sqid as u32) << 16);
        AtomicU32::from_ptr(e.add(3)).store(cid as u32 | phase << 16, Ordering::Release);
    }
}

#[test]
fn pool_cids_and_waiting_fifo() {
    let _w = test_watchdog::arm(test_watchdog::UNIT);
    let (c, _emu, mut q) = setup(2, 6);
    let ns = c.namespaces().remove(0);
    let buf = c.alloc(6 * 512).unwrap();
    assert_eq!(list(&q, q.free_head), vec![0, 1, 2, 3, 4, 5]);
    for t in 0..5u64 {
        let s = buf.slice(t as usize * 512, 512).unwrap();
        // SAFETY: `buf` outlives the requests, one slice each.
        unsafe { q.read_raw(&ns, Lba(t), s, t) }.unwrap();
    }
    // One command fits on a 2-entry queue; the rest wait, in submission order.
    assert_eq!(q.in_flight(), 1);
    assert_eq!(q.slot(0).state, IN_FLIGHT);
    assert_eq!(list(&q, q.wait_head), vec![1, 2, 3, 4]);
    assert_eq!(list(&q, q.free_head), vec![5]);
    // The CID in the SQ entry is the slot index.
    // SAFETY: entry 0 of our SQ, written by `issue`.
    let sqe0 = unsafe { q.ring.sq_ptr().read_volatile() };
    assert_eq!((sqe0 >> 16) as u16, 0);
    let mut order = Vec::new();
    while order.len() < 5 {
        q.poll(8, |t, r| {
            r.unwrap();
            order.push(t)
        })
        .unwrap();
    }
    assert_eq!(order, vec![0, 1, 2, 3, 4]);
    assert_eq!(q.outstanding(), 0);
    assert_eq!(q.wait_head, NIL);
    assert_eq!(list(&q, q.free_head).len(), 6);
    assert_eq!(q.stats().waited, 4);
}

#[test]
fn bogus_completions_are_counted_not_trusted() {
    let _w = test_watchdog::arm(test_watchdog::UNIT);
    let (c, emu, mut q) = setup(8, 8);
    let ns = c.namespaces().remove(0);
    let mut buf = c.alloc(512).unwrap();
    q.read_blocking(&ns, Lba(0), buf.as_mut_slice()).unwrap();
    let qid = q.qid().0;
    // A CID outside the pool.
    post(&mut q, 999, 0, qid);
    let e = q.poll(8, |_, _| panic!("delivered")).unwrap_err();
    assert!(matches!(
        e,
        Error::Protocol {
            error: ProtocolError::UnknownCid(Cid(999)),
            ..
        }
    ));
    // A CID already completed (slot 0 was the blocking read).
    post(&mut q, 0, 1, qid);
    let e = q.poll(8, |_, _| panic!("delivered")).unwrap_err();
    assert!(matches!(
        e,
        Error::Protocol {
            error: ProtocolError::UnknownCid(Cid(0)),
            ..
        }
    ));
    // An SQ head out of range, and a wrong SQ id.
    post(&mut q, 3, 200, qid);
    let e = q.poll(8, |_, _| panic!("delivered")).unwrap_err();
    assert!(matches!(
        e,
        Error::Protocol {
            error: ProtocolError::SqHeadOutOfRange { sq_head: 200, .. },
            ..
        }
    ));
    post(&mut q, 1, 0, qid + 5);
    let e = q.poll(8, |_, _| panic!("delivered")).unwrap_err();
    assert!(matches!(
        e,
        Error::Protocol {
            error: ProtocolError::WrongSqId(_),
            ..
        }
    ));
    assert_eq!(
        q.stats().protocol_errors,
        5,
        "the bad head and the free CID"
    );
    assert_eq!(q.outstanding(), 0, "nothing was freed twice or lost");
    assert_eq!(list(&q, q.free_head).len(), 8);
    drop(q);
    assert_eq!(emu.stats().dma_faults, 0);
}

#[test]
fn split_uses_one_slot_per_child_plus_parent() {
    let _w = test_watchdog::arm(test_watchdog::UNIT);
    let (c, _emu, mut q) = setup(4, 16);
    let ns = c.namespaces().remove(0);
    let mt = q.max_transfer();
    let buf = c.alloc(3 * mt + 512).unwrap();
    // SAFETY: `buf` outlives the request.
    unsafe { q.write_raw(&ns, Lba(0), buf.as_dma_slice(), 7) }.unwrap();
    // Parent + 4 children taken; 3 children on the device, 1 waiting.
    assert_eq!(q.outstanding(), 5);
    assert_eq!(q.slot(0).state, PARENT);
    assert_eq!(q.slot(0).count, 4);
    assert_eq!(list(&q, q.wait_head), vec![4]);
    assert_eq!(q.slot(4).cdw10_11, 3 * mt as u64 / 512);
    assert_eq!(q.slot(4).cdw12 & 0xffff, 0, "the last child is one block");
    let mut calls = 0;
    while calls == 0 {
        calls += q
            .poll(8, |t, r| assert_eq!((t, r), (7, Ok(IoDone { dw0: 0 }))))
            .unwrap();
    }
    assert_eq!(q.outstanding(), 0);
}

#[test]
fn a_dead_queue_rejects_without_copying_the_location() {
    let _w = test_watchdog::arm(test_watchdog::UNIT);
    let (c, _emu, mut q) = setup(4, 4);
    let ns = c.namespaces().remove(0);
    let buf = c.alloc(512).unwrap();
    q.dead = Some(DeadReason::ShutDown);
    let mut locations = Vec::new();
    for tag in 0..2 {
        // SAFETY: rejected before the device sees it.
        let rej = unsafe { q.read_raw(&ns, Lba(0), buf.as_dma_slice(), tag) }.unwrap_err();
        assert_eq!(rej.ctx, tag, "the context comes back");
        match rej.error {
            Error::QueueDead {
                location, reason, ..
            } => {
                assert_eq!(reason, DeadReason::ShutDown);
                assert_eq!(&*location, "emulated");
                locations.push(location);
            }
            e => panic!("{e}"),
        }
    }
    assert!(
        Arc::ptr_eq(&locations[0], &locations[1]),
        "every rejection shares the queue pair's one copy of the location"
    );
}

#[test]
fn owned_buffers_from_several_chunks_are_translated_right() {
    let _w = test_watchdog::arm(test_watchdog::UNIT);
    use crate::bus::emulated::GRANULE;
    let (c, emu, mut q) = setup(8, 8);
    let ns = c.namespaces().remove(0);
    let mut owned = c
        .create_qpair::<DmaBuffer>(QueueOptions::default())
        .unwrap();
    // Each buffer fills a chunk of its own, so consecutive submissions change chunks.
    let before = c.dma().chunk_count();
    let mut bufs: Vec<_> = (0..3).map(|_| c.alloc(GRANULE).unwrap()).collect();
    assert_eq!(c.dma().chunk_count(), before + 3);
    for (i, b) in bufs.iter_mut().enumerate() {
        b.as_mut_slice().fill(i as u8 + 1);
    }
    let blocks = (GRANULE / 512) as u64;
    let mut written = Vec::new();
    for round in 0..2u64 {
        for (i, b) in bufs.drain(..).enumerate() {
            let lba = (round * 3 + i as u64) * blocks;
            written.push((lba, b.as_slice()[0]));
            owned.write(&ns, Lba(lba), b).map_err(|r| r.error).unwrap();
        }
        assert_ne!(owned.chunk_cache, ChunkCache::default());
        while bufs.len() < 3 {
            owned
                .poll(8, |b, r| {
                    r.unwrap();
                    bufs.push(b)
                })
                .unwrap();
        }
    }
    // Each write put its own buffer's bytes on the device.
    let mut back = c.alloc(512).unwrap();
    for (lba, byte) in written {
        for at in [lba, lba + blocks - 1] {
            q.read_blocking(&ns, Lba(at), back.as_mut_slice()).unwrap();
            assert!(back.as_slice().iter().all(|&x| x == byte), "lba {at}");
        }
    }
    drop((owned, q));
    assert_eq!(emu.stats().dma_faults, 0);
}

#[test]
fn poll_counters_and_the_health_check() {
    let _w = test_watchdog::arm(test_watchdog::UNIT);
    let (_c, _emu, mut q) = setup(8, 8);
    let empty = |q: &mut QueuePair<u64>, n: u32| {
        for _ in 0..n {
            assert_eq!(q.poll(usize::MAX, |_, _| {}).unwrap(), 0);
        }
    };
    // Idle with nothing outstanding: an empty poll counts 16 of the 4096 between clock reads,
    // and housekeeping reads no register.
    empty(&mut q, 600);
    let s = q.stats();
    assert_eq!((s.empty_polls, s.polls(), s.busy_polls), (600, 600, 0));
    assert_eq!((s.housekeeping, s.register_reads), (2, 0));
    // A request outstanding (a slot taken, nothing on the device) and no completion since the
    // health check was due: CSTS is read once, then not again before the interval is over.
    let idx = q.pop_free().unwrap();
    q.countdown = 0;
    empty(&mut q, 1);
    assert_eq!((q.stats().housekeeping, q.stats().register_reads), (3, 1));
    q.next_health = Instant::now() + Duration::from_secs(3600);
    empty(&mut q, 256);
    assert_eq!((q.stats().housekeeping, q.stats().register_reads), (4, 1));
    // Overdue, but a poll consumed completions since the last look: still no read.
    q.next_health = q.tick_start;
    q.stats.busy_polls += 1;
    empty(&mut q, 256);
    assert_eq!((q.stats().housekeeping, q.stats().register_reads), (5, 1));
    assert!(q.next_health > q.tick_start);
    // Overdue without progress: read again.
    q.next_health = q.tick_start;
    empty(&mut q, 256);
    assert_eq!((q.stats().housekeeping, q.stats().register_reads), (6, 2));
    q.push_free(idx);
}

/// A QD32 read loop that resubmits from inside the poll's closure until `n` reads completed;
/// returns the tags' completion counts.
fn resubmit_loop(c: &Controller, q: &mut QueuePair<u64>, n: u64) -> Vec<u64> {
    let ns = c.namespaces().remove(0);
    let bufs: Vec<_> = (0..32).map(|_| c.alloc(4096).unwrap()).collect();
    for (tag, b) in bufs.iter().enumerate() {
        // SAFETY: the buffers outlive the loop, which drains every request.
        unsafe { q.read_raw(&ns, Lba(tag as u64 * 8), b.as_dma_slice(), tag as u64) }.unwrap();
    }
    q.ring();
    let (mut done, mut issued) = (0u64, 32u64);
    let mut per_tag = vec![0u64; 32];
    while done < n {
        q.poll_resubmit(usize::MAX, |r, tag, res| {
            res.unwrap();
            done += 1;
            per_tag[tag as usize] += 1;
            if issued < n {
                issued += 1;
                let b = bufs[tag as usize].as_dma_slice();
                let lba = Lba((issued % 64) * 8);
                // SAFETY: as above; the buffer's previous read has completed.
                unsafe { r.read_raw(&ns, lba, b, tag) }.unwrap();
            }
        })
        .unwrap();
    }
    assert_eq!((q.in_flight(), q.outstanding()), (0, 0));
    per_tag
}

#[test]
fn resubmitting_inside_the_poll_rings_once_per_poll() {
    let _w = test_watchdog::arm(test_watchdog::UNIT);
    // Inline: each doorbell completes the whole batch, so every poll sees 32 completions.
    let (c, _emu, mut q) = setup(64, 64);
    let per_tag = resubmit_loop(&c, &mut q, 3200);
    assert!(per_tag.iter().all(|&k| k == 100), "{per_tag:?}");
    let s = q.stats();
    assert_eq!((s.submitted, s.completed), (3200, 3200));
    assert_eq!((s.sq_doorbells, s.cq_doorbells), (100, 100), "{s:?}");
    // 32 entries consumed per poll is the default batch of a 64-entry queue (half of it); with
    // a batch of 128 on a 256-entry queue the CQ head is written once every 4 polls.
    let (c, _emu, mut q) = setup(256, 256);
    resubmit_loop(&c, &mut q, 3200);
    let s = q.stats();
    assert_eq!(
        (s.sq_doorbells, s.busy_polls, s.cq_doorbells),
        (100, 100, 25),
        "{s:?}"
    );
    // Threaded: completions trickle in, but never more than one SQ and one CQ doorbell per
    // poll that consumed entries (plus the first ring).
    let emu = EmulatedController::new(EmulatedConfig {
        mode: crate::bus::emulated::Mode::Threaded,
        namespaces: vec![NamespaceConfig::memory(512, 1 << 16)],
        ..EmulatedConfig::default()
    })
    .unwrap();
    let c = Controller::new(emu.clone()).unwrap();
    let mut q = c
        .create_qpair::<u64>(QueueOptions::default().with_entries(64))
        .unwrap();
    let per_tag = resubmit_loop(&c, &mut q, 3200);
    assert_eq!(per_tag.iter().sum::<u64>(), 3200);
    let s = q.stats();
    assert!(s.sq_doorbells <= s.busy_polls + 1, "{s:?}");
    // Each CQ head doorbell hands back at least half the queue (32 entries), however many
    // polls found nothing in between (the housekeeping of a busy queue writes none).
    assert!(s.cq_doorbells <= 3200 / 32 + 1, "{s:?}");
    assert_eq!(s.completed, 3200);
}

/// Waits for the completion fd with no timeout: a lost wake-up hangs and the watchdog fails
/// the test, instead of being hidden by a timed sleep.
pub(super) fn sleep_on(fd: std::os::fd::RawFd) {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one initialised pollfd, alive for the call.
    let n = unsafe { libc::poll(&mut p, 1, -1) };
    assert_eq!(n, 1, "poll(2): {}", std::io::Error::last_os_error());
    assert_ne!(p.revents & libc::POLLIN, 0);
}

/// Keeps a 16-entry queue pair full (15 commands on the device, 5 more waiting for room) for
/// `n` completions, resubmitting from inside the poll; returns the queue's counters. Every
/// tag must come back exactly as often as it was submitted, and the device must never have
/// found the CQ full (it would stall waiting for a CQ head doorbell that a lazy driver might
/// never write: the watchdog then fails the test).
fn full_small_queue(
    mode: crate::bus::emulated::Mode,
    shadow: bool,
    opts: QueueOptions,
    n: u64,
) -> QueueStats {
    const TAGS: usize = 20;
    let emu = EmulatedController::new(EmulatedConfig {
        mode,
        namespaces: vec![NamespaceConfig::memory(512, 1 << 16)],
        ..EmulatedConfig::default()
    })
    .unwrap();
    let copts = crate::nvme::controller::ControllerOptions::default().with_shadow_doorbells(shadow);
    let c = Controller::with_options(emu.clone(), copts).unwrap();
    assert_eq!(c.shadow_doorbells(), shadow);
    let ns = c.namespaces().remove(0);
    let interrupts = opts.interrupts;
    let mut q = c
        .create_qpair::<u64>(opts.with_entries(16).with_requests(TAGS as u16))
        .unwrap();
    let what = format!("{mode:?}, shadow {shadow}, {:?}", q.stats());
    let bufs: Vec<_> = (0..TAGS).map(|_| c.alloc(512).unwrap()).collect();
    let mut submitted = [0u64; TAGS];
    let mut completed = [0u64; TAGS];
    for (tag, b) in bufs.iter().enumerate() {
        // SAFETY: the buffers outlive the loop, which drains every request.
        unsafe { q.read_raw(&ns, Lba(tag as u64), b.as_dma_slice(), tag as u64) }.unwrap();
        submitted[tag] += 1;
    }
    assert_eq!((q.in_flight(), q.outstanding()), (15, TAGS), "{what}");
    let (mut done, mut issued) = (0u64, TAGS as u64);
    while done < n {
        let got = q
            .poll_resubmit(usize::MAX, |r, tag, res| {
                res.unwrap();
                done += 1;
                completed[tag as usize] += 1;
                if issued < n {
                    issued += 1;
                    let b = bufs[tag as usize].as_dma_slice();
                    // SAFETY: as above; the buffer's previous read has completed.
                    unsafe { r.read_raw(&ns, Lba(issued % 1024), b, tag) }.unwrap();
                    submitted[tag as usize] += 1;
                }
            })
            .unwrap();
        // On the device at all times: as many as the queue allows while requests remain.
        assert!(q.in_flight() <= 15, "{what}");
        if got == 0 && interrupts && q.arm_interrupt() {
            sleep_on(q.completion_fd().unwrap());
        }
    }
    assert_eq!(submitted, completed, "each request exactly once ({what})");
    assert_eq!((q.in_flight(), q.outstanding()), (0, 0), "{what}");
    let e = emu.stats();
    assert_eq!(e.io_cq_full, 0, "the device found the CQ full ({what})");
    assert_eq!(e.dma_faults + e.invalid_doorbell_writes, 0, "{what}");
    q.stats()
}

/// A 16-entry queue pair kept full for a thousand wraps with the lazy CQ head doorbell, in
/// every mode: inline and threaded device, shadow doorbells on and off, per-batch and
/// per-command SQ doorbells, polled and interrupt mode, and the smallest and largest batch.
#[test]
fn a_full_small_queue_never_overflows_its_cq() {
    use crate::bus::emulated::Mode;
    let _w = test_watchdog::arm(test_watchdog::STRESS);
    for mode in [Mode::Inline, Mode::Threaded] {
        for shadow in [true, false] {
            for (doorbell, interrupts, batch) in [
                (DoorbellMode::PerBatch, false, 0),
                (DoorbellMode::PerCommand, false, 0),
                (DoorbellMode::PerBatch, true, 0),
                (DoorbellMode::PerBatch, false, 15),
                (DoorbellMode::PerCommand, false, 15),
                (DoorbellMode::PerBatch, false, 1),
            ] {
                let opts = QueueOptions::default()
                    .with_doorbell(doorbell)
                    .with_interrupts(interrupts)
                    .with_cq_head_batch(batch);
                let s = full_small_queue(mode, shadow, opts, 16_000);
                let what = format!("{mode:?} shadow {shadow} {doorbell:?} {batch}: {s:?}");
                assert_eq!(s.completed, 16_000, "{what}");
                // Each write hands back entries of at least one poll (at full depth nearly
                // every poll must: the device needs the room for the resubmitted commands).
                assert!(
                    s.cq_doorbells <= s.busy_polls && s.cq_doorbells > 0,
                    "{what}"
                );
                if batch == 1 {
                    assert_eq!(s.cq_doorbells, s.busy_polls, "{what}");
                }
            }
        }
    }
}

/// The check above can fail: a driver that forgets consumed entries (never hands them back)
/// makes the emulated controller find the CQ full; it counts each completion that had to
/// wait, and posts them once the head doorbell is written.
#[test]
fn the_emulated_controller_flags_a_full_cq() {
    let _w = test_watchdog::arm(test_watchdog::UNIT);
    let emu = EmulatedController::new(EmulatedConfig {
        namespaces: vec![NamespaceConfig::memory(512, 1 << 16)],
        ..EmulatedConfig::default()
    })
    .unwrap();
    let c = Controller::new(emu.clone()).unwrap();
    let ns = c.namespaces().remove(0);
    let opts = QueueOptions::default()
        .with_entries(16)
        .with_cq_head_batch(15);
    let mut q = c.create_qpair::<u64>(opts).unwrap();
    let buf = c.alloc(512).unwrap();
    let round = |q: &mut QueuePair<u64>, k: u64| {
        for t in 0..k {
            // SAFETY: `buf` outlives the reads, whose data is never looked at.
            unsafe { q.read_raw(&ns, Lba(t), buf.as_dma_slice(), t) }.unwrap();
        }
        q.ring();
    };
    let drain = |q: &mut QueuePair<u64>| {
        q.poll(usize::MAX, |_, r| {
            r.unwrap();
        })
        .unwrap()
    };
    round(&mut q, 10);
    assert_eq!(drain(&mut q), 10);
    // 10 consumed, not handed back (fewer than the batch of 15): the device still counts them.
    assert_eq!((q.cq_unrung(), q.stats().cq_doorbells), (10, 0));
    // An honest driver writes the head before the next 10 reach the device.
    round(&mut q, 10);
    assert_eq!((q.cq_unrung(), q.stats().cq_doorbells), (0, 1));
    assert_eq!(drain(&mut q), 10);
    assert_eq!(emu.stats().io_cq_full, 0);
    // A driver that forgets them: 5 of the next 10 completions do not fit.
    q.cq_room = q.max_inflight as i32;
    round(&mut q, 10);
    assert_eq!(emu.stats().io_cq_full, 5);
    assert_eq!(drain(&mut q), 5);
    // Writing the head lets the device post the rest.
    q.ring_cq();
    assert_eq!(drain(&mut q), 5);
    assert_eq!(q.in_flight(), 0);
}

/// The owned-buffer calls for a context that does not name its memory (`submit_held`,
/// `deallocate_list_held`): memory outside this controller's DMA memory, or at another IOVA
/// than the one claimed, is refused with the context handed back, as the owned calls refuse
/// it; memory that is the controller's is written and read back.
#[test]
fn held_submissions_check_the_memory_they_are_given() {
    let _w = test_watchdog::arm(test_watchdog::UNIT);
    let (c, _emu, mut q) = setup(4, 4);
    let ns = c.namespaces().remove(0);
    let mut out = c.alloc(4096).unwrap();
    out.as_mut_slice()
        .iter_mut()
        .enumerate()
        .for_each(|(i, b)| *b = (i % 251) as u8);
    let back = c.alloc(4096).unwrap();
    let mut heap = vec![0u8; 4096];
    let not_dma = DmaSlice {
        ptr: core::ptr::NonNull::new(heap.as_mut_ptr()).unwrap(),
        iova: out.as_dma_slice().iova,
        len: 4096,
    };
    let wrong_iova = DmaSlice {
        iova: Iova(back.as_dma_slice().iova.0 + 4096),
        ..back.as_dma_slice()
    };
    for (what, s) in [("heap memory", not_dma), ("another IOVA", wrong_iova)] {
        for op in [IoOp::Read, IoOp::Write] {
            // SAFETY: refused before the device sees it (the point of the test).
            let rej = unsafe { q.submit_held(op, &ns, Lba(0), s, IoFlags::NONE, 9) }.unwrap_err();
            assert_eq!(rej.ctx, 9, "{what}: the context comes back");
            assert!(
                matches!(rej.error, Error::NotDmaMemory { .. }),
                "{what} {op:?}: {}",
                rej.error
            );
        }
        let list = DmaSlice { len: 16, ..s };
        // SAFETY: as above.
        let rej = unsafe { q.deallocate_list_held(&ns, list, 10) }.unwrap_err();
        assert_eq!(rej.ctx, 10);
        assert!(
            matches!(rej.error, Error::NotDmaMemory { .. }),
            "{what} (range list): {}",
            rej.error
        );
    }
    assert_eq!(q.outstanding(), 0, "nothing refused was queued");
    let wait = |q: &mut QueuePair<u64>, tag: u64| {
        let mut got = None;
        while got.is_none() {
            q.poll(8, |t, r| got = Some((t, r.is_ok()))).unwrap();
        }
        assert_eq!(got, Some((tag, true)));
    };
    // SAFETY: `out` and `back` outlive their commands, each waited for below.
    unsafe {
        q.submit_held(
            IoOp::Write,
            &ns,
            Lba(8),
            out.as_dma_slice(),
            IoFlags::NONE,
            1,
        )
    }
    .unwrap();
    wait(&mut q, 1);
    // SAFETY: as above.
    unsafe {
        q.submit_held(
            IoOp::Read,
            &ns,
            Lba(8),
            back.as_dma_slice(),
            IoFlags::NONE,
            2,
        )
    }
    .unwrap();
    wait(&mut q, 2);
    assert_eq!(back.as_slice(), out.as_slice());
    drop(heap);
}
