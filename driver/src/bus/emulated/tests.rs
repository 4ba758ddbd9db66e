//! End-to-end tests of the emulated controller, driven through the [`Bus`] with hand-built
//! commands (not through the driver).

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::*;
use crate::bus::dma::DmaBuffer;
use crate::spec::identify::{IDENTIFY_LEN, IdentifyController, IdentifyNamespace, parse_ns_list};
use crate::spec::regs::{cq_head_doorbell, offset, shn, shst, sq_tail_doorbell};
use crate::spec::sqe::{admin, cns, fid, io};
use crate::spec::status::{command_specific as cs, generic as g};
use crate::spec::{Aqa, Cc, Cqe, Csts, Sct, Sqe, Status};

const P: usize = crate::spec::PAGE_SIZE;

/// A host-side queue pair, as a minimal driver would keep it.
struct Queue {
    qid: u16,
    size: u16,
    sq: DmaBuffer,
    cq: DmaBuffer,
    tail: u16,
    head: u16,
    phase: bool,
    sqdb: Doorbell,
    cqdb: Doorbell,
    next_cid: u16,
}

impl Queue {
    fn new(bus: &dyn Bus, qid: u16, size: u16, dstrd: u8) -> Queue {
        Queue {
            qid,
            size,
            sq: bus.dma().alloc(size as usize * 64).unwrap(),
            cq: bus.dma().alloc(size as usize * 16).unwrap(),
            tail: 0,
            head: 0,
            phase: true,
            sqdb: bus.doorbell(sq_tail_doorbell(qid, dstrd)),
            cqdb: bus.doorbell(cq_head_doorbell(qid, dstrd)),
            next_cid: 1,
        }
    }

    /// Writes `sqe` at the tail without ringing; returns its command id.
    fn push(&mut self, mut sqe: Sqe) -> u16 {
        let cid = self.next_cid;
        self.next_cid = self.next_cid.wrapping_add(1).max(1);
        sqe.set_cid(cid);
        // SAFETY: `tail < size`, and the SQ buffer holds `size` 64-byte entries; the device reads
        // this entry only after the doorbell publishes it.
        unsafe {
            self.sq
                .as_ptr()
                .add(self.tail as usize * 64)
                .cast::<Sqe>()
                .write_volatile(sqe)
        };
        self.tail = (self.tail + 1) % self.size;
        cid
    }

    fn ring(&self) {
        self.sqdb.ring(self.tail as u32);
    }

    fn submit(&mut self, sqe: Sqe) -> u16 {
        let cid = self.push(sqe);
        self.ring();
        cid
    }

    fn poll(&mut self) -> Option<Cqe> {
        // SAFETY: `head < size`, inside the CQ buffer; DW3 is read with an acquire load (the
        // device publishes it with a release store), the rest with a volatile read after it.
        let cqe = unsafe {
            let e = self.cq.as_ptr().add(self.head as usize * 16);
            let dw3 = AtomicU32::from_ptr(e.add(12).cast::<u32>()).load(Ordering::Acquire);
            if (dw3 >> 16) & 1 != self.phase as u32 {
                return None;
            }
            e.cast::<Cqe>().read_volatile()
        };
        self.head += 1;
        if self.head == self.size {
            self.head = 0;
            self.phase = !self.phase;
        }
        self.cqdb.ring(self.head as u32);
        Some(cqe)
    }

    fn wait(&mut self) -> Cqe {
        let t = Instant::now();
        loop {
            if let Some(c) = self.poll() {
                return c;
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "no completion on queue {}",
                self.qid
            );
            std::thread::yield_now();
        }
    }

    fn cmd(&mut self, sqe: Sqe) -> Cqe {
        let cid = self.submit(sqe);
        let c = self.wait();
        assert_eq!(c.cid, cid);
        c
    }
}

struct Host {
    ctrl: Arc<EmulatedController>,
    admin: Queue,
    dstrd: u8,
}

fn st(sct: Sct, sc: u8) -> (Sct, u8) {
    (sct, sc)
}
fn code(c: &Cqe) -> (Sct, u8) {
    let s = c.status();
    (s.sct, s.sc)
}
const OK: (Sct, u8) = (Sct::Generic, g::SUCCESS);

fn wait_csts(bus: &dyn Bus, f: impl Fn(Csts) -> bool) -> Csts {
    let t = Instant::now();
    loop {
        let c = Csts(bus.read32(offset::CSTS));
        if f(c) {
            return c;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "CSTS {c:?}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn cc_ok() -> Cc {
    Cc::default().with_iosqes(6).with_iocqes(4).with_en(true)
}

fn start(cfg: EmulatedConfig) -> Host {
    let dstrd = cfg.dstrd;
    let ctrl = EmulatedController::new(cfg).unwrap();
    let bus: &dyn Bus = &*ctrl;
    let admin = Queue::new(bus, 0, 32, dstrd);
    bus.write32(offset::AQA, Aqa::new(32, 32).0);
    bus.write64(offset::ASQ, admin.sq.iova().0);
    bus.write64(offset::ACQ, admin.cq.iova().0);
    bus.write32(offset::CC, cc_ok().0);
    wait_csts(bus, |c| c.rdy());
    Host { ctrl, admin, dstrd }
}

impl Host {
    fn bus(&self) -> &dyn Bus {
        &*self.ctrl
    }
    fn admin(&mut self, sqe: Sqe) -> Cqe {
        self.admin.cmd(sqe)
    }
    fn io_pair(&mut self, qid: u16, size: u16) -> Queue {
        let q = Queue::new(&*self.ctrl, qid, size, self.dstrd);
        let c = self.admin(Sqe::create_io_cq(qid, size, q.cq.iova().0));
        assert_eq!(code(&c), OK, "create cq {qid}");
        let c = self.admin(Sqe::create_io_sq(qid, size, q.sq.iova().0, qid));
        assert_eq!(code(&c), OK, "create sq {qid}");
        q
    }
    fn identify(&mut self, cns: u32, nsid: u32) -> (Cqe, Box<[u8; IDENTIFY_LEN]>) {
        let buf = self.bus().dma().alloc(IDENTIFY_LEN).unwrap();
        let c = self.admin(Sqe::identify(cns, nsid, buf.iova().0));
        let mut b = Box::new([0u8; IDENTIFY_LEN]);
        b.copy_from_slice(buf.as_slice());
        (c, b)
    }
}

fn cfg_with(namespaces: Vec<NamespaceConfig>) -> EmulatedConfig {
    EmulatedConfig {
        namespaces,
        ..EmulatedConfig::default()
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u32)
                .wrapping_mul(2654435761)
                .wrapping_add(seed as u32) as u8
                ^ seed
        })
        .collect()
}

fn put_u64s(buf: &DmaBuffer, at: usize, v: &[u64]) {
    for (i, e) in v.iter().enumerate() {
        assert!(at + 8 * i + 8 <= buf.capacity());
        // SAFETY: checked above to be inside the buffer, which no command is using.
        unsafe {
            buf.as_ptr()
                .add(at + 8 * i)
                .cast::<u64>()
                .write_unaligned(e.to_le())
        };
    }
}

fn rw(op: u8, nsid: u32, slba: u64, blocks: u32, prp1: u64, prp2: u64) -> Sqe {
    let mut s = Sqe::rw(op, nsid, slba, blocks, false);
    s.prp1 = prp1;
    s.prp2 = prp2;
    s
}

// ------------------------------------------------------------------------ registers

#[test]
fn enable_disable_handshake_with_ready_delay() {
    let _w = test_watchdog::arm(test_watchdog::UNIT);
    let ctrl = EmulatedController::new(EmulatedConfig {
        ready_delay: Duration::from_millis(40),
        dstrd: 2,
        mqes: 255,
        cap_to: 7,
        ..EmulatedConfig::default()
    })
    .unwrap();
    let bus: &dyn Bus = &*ctrl;
    let cap = crate::spec::Cap(bus.read64(offset::CAP));
    assert_eq!(
        (cap.mqes(), cap.cqr(), cap.to(), cap.dstrd()),
        (255, true, 7, 2)
    );
    assert_eq!(cap.css() & 1, 1);
    assert_eq!(bus.read32(offset::VS), 0x0001_0400);
    assert_eq!(bus.location(), "emulated");
    assert_eq!(bus.pci_id().vendor, 0x1b36);
    assert!(!Csts(bus.read32(offset::CSTS)).rdy());
    let q = Queue::new(bus, 0, 8, 2);
    bus.write32(offset::AQA, Aqa::new(8, 8).0);
    bus.write64(offset::ASQ, q.sq.iova().0);
    bus.write64(offset::ACQ, q.cq.iova().0);
    assert_eq!(bus.read64(offset::ASQ), q.sq.iova().0);
    let t = Instant::now();
    bus.write32(offset::CC, cc_ok().0);
    assert!(
        !Csts(bus.read32(offset::CSTS)).rdy(),
        "RDY waits for the delay"
    );
    wait_csts(bus, |c| c.rdy());
    assert!(t.elapsed() >= Duration::from_millis(40));
    // Shutdown notification.
    bus.write32(offset::CC, cc_ok().with_shn(shn::NORMAL).0);
    assert_eq!(Csts(bus.read32(offset::CSTS)).shst(), shst::COMPLETE);
    // Disable: RDY follows after the delay too.
    let t = Instant::now();
    bus.write32(offset::CC, cc_ok().with_en(false).0);
    assert!(Csts(bus.read32(offset::CSTS)).rdy());
    let c = wait_csts(bus, |c| !c.rdy());
    assert!(t.elapsed() >= Duration::from_millis(40));
    assert_eq!(c.shst(), shst::NORMAL);
    assert!(!c.cfs());
}

#[test]
fn bad_configuration_sets_cfs_and_reset_clears_it() {
    let _w = test_watchdog::arm(test_watchdog::UNIT);
    let ctrl = EmulatedController::new(EmulatedConfig::default()).unwrap();
    let bus: &dyn Bus = &*ctrl;
    let q = Queue::new(bus, 0, 8, 0);
    bus.write32(offset::AQA, Aqa::new(8, 8).0);
    bus.write64(offset::ASQ, q.sq.iova().0);
    bus.write64(offset::ACQ, q.cq.iova().0);
    let bad = [
        cc_ok().with_iosqes(7),
        cc_ok().with_iocqes(3),
        cc_ok().with_mps(5),
        cc_ok().with_css(1),
    ];
    for cc in bad {
        bus.write32(offset::CC, cc.0);
        let c = Csts(bus.read32(offset::CSTS));
        assert!(c.cfs() && !c.rdy(), "{cc:?} gave {c:?}");
        assert!(ctrl.fatal_reason().is_some());
        bus.write32(offset::CC, 0);
        assert!(!Csts(bus.read32(offset::CSTS)).cfs());
    }
    // Misaligned or unmapped admin queues.
    bus.write64(offset::ASQ, q.sq.iova().0 + 64);
    bus.write32(offset::CC, cc_ok().0);
    assert!(Csts(bus.read32(offset::CSTS)).cfs());
    bus.write32(offset::CC, 0);
    bus.write64(offset::ASQ, q.sq.as_ptr() as u64 & !0xfff);
    bus.write32(offset::CC, cc_ok().0);
    assert!(Csts(bus.read32(offset::CSTS)).cfs());
    assert_eq!(ctrl.stats().dma_faults, 1);
    bus.write32(offset::CC, 0);
    // And a good one works after all that.
    bus.write64(offset::ASQ, q.sq.iova().0);
    bus.write32(offset::CC, cc_ok().0);
    assert!(wait_csts(bus, |c| c.rdy()).rdy());
}

// ------------------------------------------------------------------------ admin

#[test]
fn identify_pages() {
    let _w = test_watchdog::arm(test_watchdog::UNIT);
    let mut h = start(EmulatedConfig {
        namespaces: vec![
            NamespaceConfig::memory(512, 1 << 20),
            NamespaceConfig::null(4096, 1 << 18),
            NamespaceConfig::memory(4096, 100),
        ],
        mdts: 6,
        ..EmulatedConfig::default()
    });
    let (c, b) = h.identify(cns::CONTROLLER, 0);
    assert_eq!(code(&c), OK);
    let id = IdentifyController::from_bytes(&b);
    assert_eq!((id.vid, id.mdts, id.nn), (0x1b36, 6, 3));
    assert_eq!((id.sqes, id.cqes), (0x66, 0x44));
    assert_eq!(id.sn, "DIOXIDE-EMU-0001");
    assert_eq!(id.ver, 0x0001_0400);
    assert_eq!(id.max_transfer_bytes(4096), Some(256 * 1024));
    let (_, b) = h.identify(cns::NAMESPACE, 1);
    let ns = IdentifyNamespace::from_bytes(&b);
    assert_eq!((ns.nsze, ns.block_size(), ns.nlbaf), (1 << 20, 512, 1));
    assert_eq!(ns.lbaf[1].block_size(), 4096);
    let (_, b) = h.identify(cns::NAMESPACE, 2);
    let ns = IdentifyNamespace::from_bytes(&b);
    assert_eq!((ns.nsze, ns.block_size(), ns.flbas), (1 << 18, 4096, 1));
    let (_, b) = h.identify(cns::ACTIVE_NAMESPACES, 0);
    assert_eq!(parse_ns_list(&b), vec![1, 2, 3]);
    let (_, b) = h.identify(cns::ACTIVE_NAMESPACES, 2);
    assert_eq!(parse_ns_list(&b), vec![3]);
    let (c, _) = h.identify(cns::NAMESPACE, 4);
    assert_eq!(code(&c), st(Sct::Generic, g::INVALID_NAMESPACE));
    assert!(c.status().dnr());
    let (c, _) = h.identify(cns::NAMESPACE, 0);
    assert_eq!(code(&c), st(Sct::Generic, g::INVALID_NAMESPACE));
    let (c, _) = h.identify(0x55, 0);
    assert_eq!(code(&c), st(Sct::Generic, g::INVALID_FIELD));
    // Identify into a buffer with an offset: PRP1 + PRP2.
    let buf = h.bus().dma().alloc(2 * P).unwrap();
    let c = h.admin(Sqe {
        prp2: buf.iova().0 + P as u64,
        ..Sqe::identify(cns::CONTROLLER, 0, buf.iova().0 + 256)
    });
    assert_eq!(code(&c), OK);
    assert_eq!(&buf.as_slice()[256..258], &[0x36, 0x1b]);
    // Unknown admin opcode.
    let c = h.admin(Sqe::new(0x7e));
    assert_eq!(code(&c), st(Sct::Generic, g::INVALID_OPCODE));
    assert_eq!(h.ctrl.stats().dma_faults, 0);
}

#[test]
fn number_of_queues_and_queue_errors() {
    let _w = test_watchdog::arm(test_watchdog::UNIT);
    let mut h = start(EmulatedConfig {
        max_io_queues: 8,
        mqes: 63,
        ..EmulatedConfig::default()
    });
    let c = h.admin(Sqe::get_features(fid::NUMBER_OF_QUEUES));
    assert_eq!(c.dw0, 7 | 7 << 16);
    let c = h.admin(Sqe::set_number_of_queues(100, 2));
    assert_eq!(code(&c), OK);
    assert_eq!(c.dw0, 7 | 1 << 16, "min(requested, max) of each");
    let c = h.admin(Sqe::set_features(fid::NUMBER_OF_QUEUES, 0xffff));
    assert_eq!(code(&c), st(Sct::Generic, g::INVALID_FIELD));
    let mem = h.bus().dma().alloc(64 * 64).unwrap();
    let iova = mem.iova().0;
    let bad = |c: &Cqe, sc| assert_eq!(code(c), st(Sct::CommandSpecific, sc));
    // Queue size beyond MQES + 1, and a one-entry queue.
    bad(
        &h.admin(Sqe::create_io_cq(1, 65, iova)),
        cs::INVALID_QUEUE_SIZE,
    );
    bad(
        &h.admin(Sqe::create_io_cq(1, 1, iova)),
        cs::INVALID_QUEUE_SIZE,
    );
    // Queue ids: 0, and beyond the 2 CQs allocated.
    bad(
        &h.admin(Sqe::create_io_cq(0, 64, iova)),
        cs::INVALID_QUEUE_ID,
    );
    bad(
        &h.admin(Sqe::create_io_cq(3, 64, iova)),
        cs::INVALID_QUEUE_ID,
    );
    // A misaligned base, and one outside DMA memory.
    let c = h.admin(Sqe::create_io_cq(1, 64, iova + 64));
    assert_eq!(code(&c), st(Sct::Generic, g::PRP_OFFSET_INVALID));
    let c = h.admin(Sqe::create_io_cq(1, 64, 0x1000));
    assert_eq!(code(&c), st(Sct::Generic, g::DATA_TRANSFER_ERROR));
    assert_eq!(h.ctrl.stats().dma_faults, 1);
    // SQ on a CQ that does not exist.
    bad(&h.admin(Sqe::create_io_sq(1, 64, iova, 1)), cs::CQ_INVALID);
    let q = h.io_pair(1, 64);
    // Creating it twice.
    bad(
        &h.admin(Sqe::create_io_cq(1, 64, iova)),
        cs::INVALID_QUEUE_ID,
    );
    bad(
        &h.admin(Sqe::create_io_sq(1, 64, iova, 1)),
        cs::INVALID_QUEUE_ID,
    );
    // The allocation cannot change once queues exist.
    let c = h.admin(Sqe::set_number_of_queues(4, 4));
    assert_eq!(code(&c), st(Sct::Generic, g::COMMAND_SEQUENCE_ERROR));
    // Deleting a CQ with an SQ on it; deleting queues that do not exist.
    bad(&h.admin(Sqe::delete_io_cq(1)), cs::INVALID_QUEUE_DELETION);
    bad(&h.admin(Sqe::delete_io_sq(2)), cs::INVALID_QUEUE_ID);
    bad(&h.admin(Sqe::delete_io_sq(0)), cs::INVALID_QUEUE_ID);
    bad(&h.admin(Sqe::delete_io_cq(2)), cs::INVALID_QUEUE_ID);
    assert_eq!(code(&h.admin(Sqe::delete_io_sq(1))), OK);
    assert_eq!(code(&h.admin(Sqe::delete_io_cq(1))), OK);
    drop(q);
    // A new pair with the same id works.
    let _q = h.io_pair(1, 2);
    // A controller reset deletes every I/O queue.
    h.bus().write32(offset::CC, 0);
    wait_csts(h.bus(), |c| !c.rdy());
    assert_eq!(h.ctrl.stats().invalid_doorbell_writes, 0);
}

#[test]
fn features() {
    let _w = test_watchdog::arm(test_watchdog::UNIT);
    let mut h = start(EmulatedConfig::default());
    let c = h.admin(Sqe::set_features(fid::VOLATILE_WRITE_CACHE, 0));
    assert_eq!(code(&c), OK);
    assert_eq!(h.admin(Sqe::get_features(fid::VOLATILE_WRITE_CACHE)).dw0, 0);
    assert_eq!(
        code(&h.admin(Sqe::set_features(fid::ARBITRATION, 0x0303))),
        OK
    );
    assert_eq!(h.admin(Sqe::get_features(fid::ARBITRATION)).dw0, 0x0303);
    let c = h.admin(Sqe::set_features(0x7d, 0));
    assert_eq!(code(&c), st(Sct::Generic, g::INVALID_FIELD));
    let c = h.admin(Sqe::get_features(0x7d));
    assert_eq!(code(&c), st(Sct::Generic, g::INVALID_FIELD));
    let mut keep = Sqe::new(admin::KEEP_ALIVE);
    keep.cdw10 = 0;
    assert_eq!(code(&h.admin(keep)), OK);
}

// ------------------------------------------------------------------------ I/O and PRPs

/// Writes then reads back through each PRP alignment class, on namespace `nsid`.
fn prp_round_trips(h: &mut Host, q: &mut Queue, nsid: u32, bs: usize) {
    let dma = h.bus().dma().clone();
    let data = dma.alloc(64 * P).unwrap();
    let back = dma.alloc(64 * P).unwrap();
    let list = dma.alloc(2 * P).unwrap();
    let lba_per_page = (P / bs) as u64;
    // (offset into the buffer, bytes)
    let cases: [(usize, usize); 6] = [
        (0, bs),          // one block at a page start
        (P - bs, bs),     // one block at the end of a page
        (0, P),           // one page
        (P - bs, 2 * bs), // two pages (PRP2 a page pointer)
        (bs, 2 * P - bs), // two pages, offset
        (0, 2 * P),       // two full pages
    ];
    let mut lba = 8;
    for (off, len) in cases {
        if off % bs != 0 && bs == P {
            continue;
        }
        let w = pattern(len, lba as u8);
        // SAFETY: `off + len` is inside `data`, which no command is using.
        unsafe { core::ptr::copy_nonoverlapping(w.as_ptr(), data.as_ptr().add(off), len) };
        let first = P - off % P;
        let prp2 = |b: &DmaBuffer| {
            if len > first {
                b.iova().0 + (off - off % P + P) as u64
            } else {
                0
            }
        };
        let blocks = (len / bs) as u32;
        let c = q.cmd(rw(
            io::WRITE,
            nsid,
            lba,
            blocks,
            data.iova().0 + off as u64,
            prp2(&data),
        ));
        assert_eq!(code(&c), OK, "write off {off} len {len}");
        let c = q.cmd(rw(
            io::READ,
            nsid,
            lba,
            blocks,
            back.iova().0 + off as u64,
            prp2(&back),
        ));
        assert_eq!(code(&c), OK, "read off {off} len {len}");
        assert!(
            back.as_slice()[off..off + len] == w[..],
            "data differs: off {off} len {len}"
        );
        lba += 2 * lba_per_page;
    }
    // A PRP list of 7 entries (8 pages, PRP1 with an offset of one block: 9 pages touched).
    let len = 8 * P;
    let off = bs;
    let w = pattern(len, 3);
    // SAFETY: inside `data`.
    unsafe { core::ptr::copy_nonoverlapping(w.as_ptr(), data.as_ptr().add(off), len) };
    let entries = |b: &DmaBuffer| {
        (1..9)
            .map(|i| b.iova().0 + (i * P) as u64)
            .collect::<Vec<_>>()
    };
    put_u64s(&list, 0, &entries(&data));
    let c = q.cmd(rw(
        io::WRITE,
        nsid,
        1000,
        (len / bs) as u32,
        data.iova().0 + off as u64,
        list.iova().0,
    ));
    assert_eq!(code(&c), OK);
    // Read it back scattered: out of order pages, list with an offset, chained from a list that
    // starts two entries before the end of its page.
    let order = [5usize, 2, 7, 1, 8, 3, 6, 4];
    let mut pages: Vec<u64> = order
        .iter()
        .map(|&i| back.iova().0 + (i * 4 * P) as u64 % (60 * P) as u64)
        .collect();
    pages.dedup();
    assert_eq!(pages.len(), 8);
    let read_list_at = P - 16;
    put_u64s(&list, read_list_at, &[pages[0], list.iova().0 + P as u64]);
    put_u64s(&list, P, &pages[1..]);
    let prp1_off = 512;
    let c = q.cmd(rw(
        io::READ,
        nsid,
        1000,
        (len / bs) as u32,
        back.iova().0 + prp1_off as u64 + (60 * P) as u64,
        list.iova().0 + read_list_at as u64,
    ));
    assert_eq!(code(&c), OK);
    let mut got = Vec::new();
    got.extend_from_slice(&back.as_slice()[60 * P + prp1_off..61 * P]);
    for p in &pages {
        let o = (p - back.iova().0) as usize;
        got.extend_from_slice(&back.as_slice()[o..o + P]);
    }
    assert!(got[..len] == w[..], "chained list read back differs");
}

#[test]
fn read_write_round_trip_memory_both_block_sizes() {
    let _w = test_watchdog::arm(test_watchdog::UNIT);
    let mut h = start(cfg_with(vec![
        NamespaceConfig::memory(512, 1 << 16),
        NamespaceConfig::memory(4096, 1 << 13),
    ]));
    let mut q = h.io_pair(1, 16);
    prp_round_trips(&mut h, &mut q, 1, 512);
    prp_round_trips(&mut h, &mut q, 2, 4096);
    let s = h.ctrl.stats();
    assert_eq!(s.dma_faults, 0);
    assert!(s.commands_with(1, io::WRITE) >= 14);
}

#[test]
fn a_namespace_with_metadata_reports_its_format_and_moves_no_data() {
    let mut h = start(cfg_with(vec![
        NamespaceConfig::memory(512, 64).with_metadata(8, true),
        NamespaceConfig::null(4096, 64).with_metadata(16, false),
    ]));
    let (_, b) = h.identify(cns::NAMESPACE, 1);
    let ns = IdentifyNamespace::from_bytes(&b);
    assert_eq!((ns.nlbaf, ns.flbas_index(), ns.mc), (2, 2, 1));
    assert!(ns.metadata_extended());
    let f = ns.lba_format().unwrap();
    assert_eq!((f.block_size(), f.ms), (512, 8));
    assert_eq!((ns.lbaf[0].ms, ns.lbaf[1].ms), (0, 0));
    let (_, b) = h.identify(cns::NAMESPACE, 2);
    let ns = IdentifyNamespace::from_bytes(&b);
    assert_eq!((ns.flbas, ns.mc, ns.block_size()), (2, 2, 4096));
    assert_eq!(ns.lba_format().unwrap().ms, 16);
    let mut q = h.io_pair(1, 8);
    let buf = h.bus().dma().alloc(2 * P).unwrap();
    for (nsid, op) in [(1, io::READ), (1, io::WRITE), (2, io::READ)] {
        let c = q.cmd(rw(op, nsid, 0, 1, buf.iova().0, 0));
        assert_eq!(code(&c), st(Sct::Generic, g::INVALID_FIELD), "{nsid} {op}");
    }
    assert!(buf.as_slice().iter().all(|&b| b == 0));
}

#[test]
fn io_status_rules() {
    let _w = test_watchdog::arm(test_watchdog::UNIT);
    let mut h = start(EmulatedConfig {
        namespaces: vec![NamespaceConfig::memory(512, 1000)],
        mdts: 2, // 16 KiB
        ..EmulatedConfig::default()
    });
    let mut q = h.io_pair(1, 8);
    let buf = h.bus().dma().alloc(8 * P).unwrap();
    let list = h.bus().dma().alloc(P).unwrap();
    let b = buf.iova().0;
    let expect = |q: &mut Queue, s: Sqe, want: (Sct, u8)| {
        let c = q.cmd(s);
        assert_eq!(code(&c), want, "{s:?}");
    };
    // LBA range: the last block is fine, one past is not; so is an overflowing range.
    expect(&mut q, rw(io::WRITE, 1, 999, 1, b, 0), OK);
    expect(
        &mut q,
        rw(io::READ, 1, 999, 2, b, 0),
        st(Sct::Generic, g::LBA_OUT_OF_RANGE),
    );
    expect(
        &mut q,
        rw(io::READ, 1, u64::MAX, 1, b, 0),
        st(Sct::Generic, g::LBA_OUT_OF_RANGE),
    );
    // MDTS: 32 blocks (16 KiB) pass, 33 do not.
    put_u64s(
        &list,
        0,
        &[b + P as u64, b + 2 * P as u64, b + 3 * P as u64],
    );
    expect(&mut q, rw(io::READ, 1, 0, 32, b, list.iova().0), OK);
    expect(
        &mut q,
        rw(io::READ, 1, 0, 33, b, list.iova().0),
        st(Sct::Generic, g::INVALID_FIELD),
    );
    // Namespaces.
    expect(
        &mut q,
        rw(io::READ, 0, 0, 1, b, 0),
        st(Sct::Generic, g::INVALID_NAMESPACE),
    );
    expect(
        &mut q,
        rw(io::READ, 2, 0, 1, b, 0),
        st(Sct::Generic, g::INVALID_NAMESPACE),
    );
    // Opcodes.
    let mut s = Sqe::new(0x7f);
    s.nsid = 1;
    expect(&mut q, s, st(Sct::Generic, g::INVALID_OPCODE));
    // PRPs: misaligned PRP1, PRP2 with an offset, a list entry with an offset, SGL requested.
    expect(
        &mut q,
        rw(io::READ, 1, 0, 1, b + 2, 0),
        st(Sct::Generic, g::INVALID_FIELD),
    );
    expect(
        &mut q,
        rw(io::READ, 1, 0, 2, b + P as u64 - 512, b + 8),
        st(Sct::Generic, g::PRP_OFFSET_INVALID),
    );
    put_u64s(&list, 0, &[b + P as u64, b + 2 * P as u64 + 512]);
    expect(
        &mut q,
        rw(io::READ, 1, 0, 24, b, list.iova().0),
        st(Sct::Generic, g::PRP_OFFSET_INVALID),
    );
    expect(
        &mut q,
        rw(io::READ, 1, 0, 24, b, list.iova().0 + 4),
        st(Sct::Generic, g::PRP_OFFSET_INVALID),
    );
    let mut sgl = rw(io::READ, 1, 0, 1, b, 0);
    sgl.cdw0 |= 1 << 14;
    expect(&mut q, sgl, st(Sct::Generic, g::INVALID_FIELD));
    assert_eq!(h.ctrl.stats().dma_faults, 0);
    // Unmapped memory: a virtual address, IOVA 0, a list pointing outside, and the guard gap
    // just past the chunk.
    let dte = st(Sct::Generic, g::DATA_TRANSFER_ERROR);
    expect(&mut q, rw(io::READ, 1, 0, 1, buf.as_ptr() as u64, 0), dte);
    expect(&mut q, rw(io::WRITE, 1, 0, 1, 0, 0), dte);
    put_u64s(&list, 0, &[b + P as u64, 0x4000]);
    expect(&mut q, rw(io::READ, 1, 0, 24, b, list.iova().0), dte);
    let chunk_end = IOVA_BASE + GRANULE as u64;
    expect(
        &mut q,
        rw(io::READ, 1, 0, 2, chunk_end - 512, chunk_end),
        dte,
    );
    assert_eq!(h.ctrl.stats().dma_faults, 4);
    // Flush, Write Zeroes and FUA writes.
    let mut f = Sqe::flush(1);
    expect(&mut q, f, OK);
    f.nsid = 0xffff_ffff;
    expect(&mut q, f, OK);
    let mut fua = Sqe::rw(io::WRITE, 1, 5, 1, true);
    fua.prp1 = b;
    expect(&mut q, fua, OK);
    expect(
        &mut q,
        Sqe::write_zeroes(1, 999, 2, false),
        st(Sct::Generic, g::LBA_OUT_OF_RANGE),
    );
}

#[test]
fn write_zeroes_and_deallocate_read_back_zeroes() {
    let _w = test_watchdog::arm(test_watchdog::UNIT);
    let mut h = start(cfg_with(vec![NamespaceConfig::memory(4096, 256)]));
    let mut q = h.io_pair(1, 8);
    let mut buf = h.bus().dma().alloc(4 * P).unwrap();
    buf.as_mut_slice().fill(0x5a);
    let list = h.bus().dma().alloc(P).unwrap();
    put_u64s(
        &list,
        0,
        &[
            buf.iova().0 + P as u64,
            buf.iova().0 + 2 * P as u64,
            buf.iova().0 + 3 * P as u64,
        ],
    );
    assert_eq!(
        code(&q.cmd(rw(io::WRITE, 1, 10, 4, buf.iova().0, list.iova().0))),
        OK
    );
    assert_eq!(code(&q.cmd(Sqe::write_zeroes(1, 11, 1, false))), OK);
    // DSM deallocate of block 13 (and a zero-length range).
    let ranges = h.bus().dma().alloc(P).unwrap();
    // SAFETY: two 16-byte ranges inside `ranges`, which no command is using.
    unsafe {
        let r = ranges.as_ptr();
        r.add(4).cast::<u32>().write_unaligned(1u32.to_le());
        r.add(8).cast::<u64>().write_unaligned(13u64.to_le());
        r.add(24).cast::<u64>().write_unaligned(0u64.to_le());
    }
    let c = q.cmd(Sqe::dsm_deallocate(1, 2, ranges.iova().0));
    assert_eq!(code(&c), OK);
    let c = q.cmd(rw(io::READ, 1, 10, 4, buf.iova().0, list.iova().0));
    assert_eq!(code(&c), OK);
    let s = buf.as_slice();
    assert!(s[..P].iter().all(|&b| b == 0x5a));
    assert!(s[P..2 * P].iter().all(|&b| b == 0));
    assert!(s[2 * P..3 * P].iter().all(|&b| b == 0x5a));
    assert!(s[3 * P..].iter().all(|&b| b == 0));
    // A range past the end fails the whole command.
    // SAFETY: inside `ranges`.
    unsafe {
        ranges
            .as_ptr()
            .add(8)
            .cast::<u64>()
            .write_unaligned(255u64.to_le())
    };
    // SAFETY: inside `ranges`.
    unsafe {
        ranges
            .as_ptr()
            .add(4)
            .cast::<u32>()
            .write_unaligned(2u32.to_le())
    };
    let c = q.cmd(Sqe::dsm_deallocate(1, 1, ranges.iova().0));
    assert_eq!(code(&c), st(Sct::Generic, g::LBA_OUT_OF_RANGE));
}

#[test]
fn file_and_null_backings_both_block_sizes() {
    let _w = test_watchdog::arm(test_watchdog::UNIT);
    let dir = std::env::temp_dir().join(format!("dioxide-emu-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f512 = dir.join("ns512.img");
    let f4k = dir.join("ns4k.img");
    let mut h = start(cfg_with(vec![
        NamespaceConfig::file(&f512, 512, 1 << 14),
        NamespaceConfig::file(&f4k, 4096, 1 << 11),
        NamespaceConfig::null(512, 1 << 30),
        NamespaceConfig::null(4096, 1 << 20),
    ]));
    assert_eq!(std::fs::metadata(&f512).unwrap().len(), 512 << 14);
    let mut q = h.io_pair(1, 16);
    prp_round_trips(&mut h, &mut q, 1, 512);
    prp_round_trips(&mut h, &mut q, 2, 4096);
    // The data is in the files, at block offsets.
    let mut buf = h.bus().dma().alloc(P).unwrap();
    buf.as_mut_slice().fill(0xc3);
    assert_eq!(code(&q.cmd(rw(io::WRITE, 2, 7, 1, buf.iova().0, 0))), OK);
    let img = std::fs::read(&f4k).unwrap();
    assert!(img[7 * P..8 * P].iter().all(|&b| b == 0xc3));
    assert_eq!(code(&q.cmd(Sqe::flush(2))), OK);
    // Null: reads leave the buffer untouched, writes are discarded, ranges are still checked,
    // and PRPs are still validated.
    for (nsid, bs) in [(3u32, 512usize), (4, 4096)] {
        buf.as_mut_slice().fill(0x11);
        assert_eq!(
            code(&q.cmd(rw(io::WRITE, nsid, 0, (P / bs) as u32, buf.iova().0, 0))),
            OK
        );
        buf.as_mut_slice().fill(0x22);
        assert_eq!(
            code(&q.cmd(rw(io::READ, nsid, 0, (P / bs) as u32, buf.iova().0, 0))),
            OK
        );
        assert!(buf.as_slice().iter().all(|&b| b == 0x22));
        let blocks = if bs == 512 { 1u64 << 30 } else { 1 << 20 };
        let c = q.cmd(rw(io::READ, nsid, blocks, 1, buf.iova().0, 0));
        assert_eq!(code(&c), st(Sct::Generic, g::LBA_OUT_OF_RANGE));
        let c = q.cmd(rw(io::READ, nsid, 0, 1, 0x1000, 0));
        assert_eq!(code(&c), st(Sct::Generic, g::DATA_TRANSFER_ERROR));
    }
    drop(q);
    drop(h);
    // A file namespace keeps its data across controllers.
    let mut h = start(cfg_with(vec![NamespaceConfig::file(&f4k, 4096, 1 << 11)]));
    let mut q = h.io_pair(1, 4);
    let buf = h.bus().dma().alloc(P).unwrap();
    assert_eq!(code(&q.cmd(rw(io::READ, 1, 7, 1, buf.iova().0, 0))), OK);
    assert!(buf.as_slice().iter().all(|&b| b == 0xc3));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn sparse_one_tib_namespace_stays_small() {
    let _w = test_watchdog::arm(test_watchdog::UNIT);
    let blocks = (1u64 << 40) / 512;
    let mut h = start(cfg_with(vec![NamespaceConfig::memory(512, blocks)]));
    let before = h.ctrl.resident_bytes(1).unwrap();
    assert!(before <= 512 << 10, "{before}");
    let mut q = h.io_pair(1, 4);
    let mut buf = h.bus().dma().alloc(P).unwrap();
    buf.as_mut_slice().copy_from_slice(&pattern(P, 9));
    assert_eq!(
        code(&q.cmd(rw(io::WRITE, 1, blocks - 8, 8, buf.iova().0, 0))),
        OK
    );
    buf.as_mut_slice().fill(0);
    assert_eq!(
        code(&q.cmd(rw(io::READ, 1, blocks - 8, 8, buf.iova().0, 0))),
        OK
    );
    assert!(buf.as_slice() == &pattern(P, 9)[..]);
    assert_eq!(
        code(&q.cmd(rw(io::READ, 1, blocks / 2, 8, buf.iova().0, 0))),
        OK
    );
    assert!(buf.as_slice().iter().all(|&b| b == 0));
    let after = h.ctrl.resident_bytes(1).unwrap();
    assert!(
        after - before <= 128 << 10,
        "one write costs one piece: {before} -> {after}"
    );
}

#[test]
fn cq_phase_wraps_and_full_cq_holds_completions() {
    let _w = test_watchdog::arm(test_watchdog::UNIT);
    let mut h = start(EmulatedConfig::default());
    // A 4-entry CQ under an 16-entry SQ: the CQ fills, completions wait in the controller.
    let q0 = Queue::new(h.bus(), 1, 16, 0);
    let cq = h.bus().dma().alloc(4 * 16).unwrap();
    assert_eq!(code(&h.admin(Sqe::create_io_cq(1, 4, cq.iova().0))), OK);
    assert_eq!(
        code(&h.admin(Sqe::create_io_sq(1, 16, q0.sq.iova().0, 1))),
        OK
    );
    let mut q = Queue { size: 16, cq, ..q0 };
    // Keep our CQ view consistent: the CQ has 4 entries.
    let cq_size = 4u16;
    let buf = h.bus().dma().alloc(P).unwrap();
    let mut seen = Vec::new();
    let mut head = 0u16;
    let mut phase = true;
    for round in 0..5 {
        let cids: Vec<u16> = (0..10)
            .map(|_| q.push(rw(io::READ, 1, round, 1, buf.iova().0, 0)))
            .collect();
        q.ring();
        let mut got = Vec::new();
        let t = Instant::now();
        while got.len() < cids.len() {
            // SAFETY: `head < 4`, inside the 4-entry CQ buffer.
            let cqe = unsafe {
                let e = q.cq.as_ptr().add(head as usize * 16);
                let dw3 = AtomicU32::from_ptr(e.add(12).cast::<u32>()).load(Ordering::Acquire);
                if (dw3 >> 16) & 1 != phase as u32 {
                    assert!(t.elapsed() < Duration::from_secs(5));
                    continue;
                }
                e.cast::<Cqe>().read_volatile()
            };
            head += 1;
            if head == cq_size {
                head = 0;
                phase = !phase;
            }
            q.cqdb.ring(head as u32);
            assert_eq!(code(&cqe), OK);
            got.push(cqe.cid);
        }
        assert_eq!(got, cids, "completions in order after the CQ filled");
        seen.extend(got);
    }
    assert_eq!(seen.len(), 50);
    assert_eq!(h.ctrl.stats().invalid_doorbell_writes, 0);
}

#[test]
fn invalid_doorbells_are_ignored_and_reported() {
    let _w = test_watchdog::arm(test_watchdog::UNIT);
    let mut h = start(EmulatedConfig {
        dstrd: 1,
        ..EmulatedConfig::default()
    });
    let aer = h.admin.submit(Sqe::new(admin::ASYNC_EVENT_REQUEST));
    assert!(h.admin.poll().is_none(), "an AER is held");
    let mut q = h.io_pair(1, 8);
    // A tail beyond the queue.
    h.bus().write32(sq_tail_doorbell(1, 1), 8);
    let c = h.admin.wait();
    assert_eq!(c.cid, aer);
    assert_eq!(c.dw0 & 0x7, 0, "error event");
    assert_eq!((c.dw0 >> 8) & 0xff, 1, "invalid doorbell write value");
    assert_eq!((c.dw0 >> 16) & 0xff, 1, "error log page");
    // Doorbells of queues that do not exist, and an offset between doorbells.
    h.bus().write32(sq_tail_doorbell(2, 1), 1);
    h.bus().write32(cq_head_doorbell(3, 1), 0);
    h.bus().write32(sq_tail_doorbell(1, 1) + 4, 0);
    h.bus().write32(sq_tail_doorbell(100, 1), 0);
    let s = h.ctrl.stats();
    assert_eq!(s.invalid_doorbell_writes, 5);
    // Queued events are delivered to the next AER.
    let c = h.admin(Sqe::new(admin::ASYNC_EVENT_REQUEST));
    assert_eq!((c.dw0 >> 8) & 0xff, 0, "write to invalid doorbell register");
    // The queue still works.
    let buf = h.bus().dma().alloc(P).unwrap();
    assert_eq!(code(&q.cmd(rw(io::READ, 1, 0, 1, buf.iova().0, 0))), OK);
    // The AER limit is 4.
    for _ in 0..4 {
        h.admin.submit(Sqe::new(admin::ASYNC_EVENT_REQUEST));
    }
    // 3 events are still queued: each of these 4 AERs takes one and completes, the 4th is held.
    for _ in 0..3 {
        assert_eq!(code(&h.admin.wait()), OK);
    }
    for _ in 0..3 {
        h.admin.submit(Sqe::new(admin::ASYNC_EVENT_REQUEST));
    }
    let c = h.admin(Sqe::new(admin::ASYNC_EVENT_REQUEST));
    assert_eq!(code(&c), st(Sct::CommandSpecific, 0x05));
}

// ------------------------------------------------------------------------ logs

#[test]
fn log_pages() {
    let _w = test_watchdog::arm(test_watchdog::UNIT);
    let mut h = start(cfg_with(vec![NamespaceConfig::memory(512, 1 << 20)]));
    let mut q = h.io_pair(1, 8);
    let buf = h.bus().dma().alloc(32 * 1024).unwrap();
    let list = h.bus().dma().alloc(P).unwrap();
    let entries: Vec<u64> = (1..8).map(|i| buf.iova().0 + (i * P) as u64).collect();
    put_u64s(&list, 0, &entries);
    for _ in 0..3 {
        assert_eq!(
            code(&q.cmd(rw(io::WRITE, 1, 0, 64, buf.iova().0, list.iova().0))),
            OK
        );
    }
    assert_eq!(code(&q.cmd(rw(io::READ, 1, 0, 8, buf.iova().0, 0))), OK);
    assert_eq!(
        code(&q.cmd(rw(io::READ, 1, 1 << 20, 1, buf.iova().0, 0))),
        st(Sct::Generic, g::LBA_OUT_OF_RANGE)
    );
    let page = h.bus().dma().alloc(P).unwrap();
    let c = h.admin(Sqe::get_log_page(
        crate::spec::sqe::lid::SMART,
        u32::MAX,
        512,
        page.iova().0,
        0,
    ));
    assert_eq!(code(&c), OK);
    let smart = crate::spec::SmartLog::from_bytes(page.as_slice()[..512].try_into().unwrap());
    assert_eq!(smart.host_write_commands, 3);
    assert_eq!(smart.host_read_commands, 1);
    assert_eq!(
        smart.data_units_written, 1,
        "192 units of 512 bytes round up to 1"
    );
    assert_eq!(smart.data_units_read, 1);
    assert_eq!(smart.num_err_log_entries, 1);
    let c = h.admin(Sqe::get_log_page(
        crate::spec::sqe::lid::ERROR,
        0,
        64,
        page.iova().0,
        0,
    ));
    assert_eq!(code(&c), OK);
    let e = crate::spec::identify::ErrorLogEntry::from_bytes(&page.as_slice()[..64]);
    assert_eq!((e.error_count, e.sqid, e.lba, e.nsid), (1, 1, 1 << 20, 1));
    assert_eq!(
        crate::spec::Status::from_field(e.status).sc,
        g::LBA_OUT_OF_RANGE
    );
    let c = h.admin(Sqe::get_log_page(
        crate::spec::sqe::lid::FIRMWARE_SLOT,
        0,
        512,
        page.iova().0,
        0,
    ));
    assert_eq!(code(&c), OK);
    let fw = crate::spec::identify::FirmwareSlotLog::from_bytes(
        page.as_slice()[..512].try_into().unwrap(),
    );
    assert_eq!((fw.afi, fw.frs[0].as_str()), (1, "1.0"));
    let c = h.admin(Sqe::get_log_page(0x7f, 0, 512, page.iova().0, 0));
    assert_eq!(code(&c), st(Sct::CommandSpecific, cs::INVALID_LOG_PAGE));
    // An offset past the page.
    let mut s = Sqe::get_log_page(crate::spec::sqe::lid::SMART, 0, 512, page.iova().0, 0);
    s.cdw12 = 512;
    assert_eq!(code(&h.admin(s)), st(Sct::Generic, g::INVALID_FIELD));
}

// ------------------------------------------------------------------------ faults

fn read1(nsid: u32, lba: u64, buf: &DmaBuffer) -> Sqe {
    rw(io::READ, nsid, lba, 1, buf.iova().0, 0)
}

#[test]
fn fault_status_on_nth_command_and_lba_range() {
    let _w = test_watchdog::arm(test_watchdog::UNIT);
    use crate::spec::status::media;
    let mut h = start(cfg_with(vec![NamespaceConfig::memory(512, 1 << 16)]));
    let mut q = h.io_pair(1, 8);
    let mut buf = h.bus().dma().alloc(P).unwrap();
    let ure = Status::new(Sct::Media, media::UNRECOVERED_READ_ERROR);
    h.ctrl.inject(Fault::once(
        Trigger::NthCommand {
            qid: Some(1),
            opcode: Some(io::READ),
            n: 2,
        },
        Action::Status(ure),
    ));
    let mut w = rw(io::WRITE, 1, 0, 1, buf.iova().0, 0);
    assert_eq!(code(&q.cmd(w)), OK, "writes do not count");
    assert_eq!(code(&q.cmd(read1(1, 0, &buf))), OK);
    assert_eq!(q.cmd(read1(1, 0, &buf)).status(), ure);
    assert_eq!(code(&q.cmd(read1(1, 0, &buf))), OK, "fired once");
    // An LBA range, writes only, always.
    let wf = Status::new(Sct::Media, media::WRITE_FAULT);
    let id = h.ctrl.inject(Fault::always(
        Trigger::LbaRange {
            nsid: 1,
            start: 100,
            end: 200,
            opcode: Some(io::WRITE),
        },
        Action::Status(wf),
    ));
    w.cdw10 = 99;
    assert_eq!(code(&q.cmd(w)), OK);
    buf.as_mut_slice().fill(0xee);
    w.cdw12 = 1; // two blocks: 99..=100
    assert_eq!(q.cmd(w).status(), wf);
    w.cdw10 = 199;
    w.cdw12 = 0;
    assert_eq!(q.cmd(w).status(), wf);
    w.cdw10 = 200;
    assert_eq!(code(&q.cmd(w)), OK);
    assert_eq!(code(&q.cmd(read1(1, 150, &buf))), OK);
    assert!(
        buf.as_slice()[..512].iter().all(|&b| b == 0),
        "the failed write wrote nothing"
    );
    assert!(h.ctrl.remove_fault(id));
    w.cdw10 = 150;
    assert_eq!(code(&q.cmd(w)), OK);
    // An admin command.
    h.ctrl.inject(Fault::once(
        Trigger::NthCommand {
            qid: Some(0),
            opcode: Some(admin::CREATE_IO_SQ),
            n: 1,
        },
        Action::Status(Status::new(Sct::Generic, g::INTERNAL_ERROR)),
    ));
    let q2 = Queue::new(h.bus(), 2, 4, 0);
    assert_eq!(code(&h.admin(Sqe::create_io_cq(2, 4, q2.cq.iova().0))), OK);
    let c = h.admin(Sqe::create_io_sq(2, 4, q2.sq.iova().0, 2));
    assert_eq!(code(&c), st(Sct::Generic, g::INTERNAL_ERROR));
    let s = h.ctrl.stats();
    assert_eq!(s.faults_fired, 4);
    assert_eq!(s.commands_with(1, io::READ), 4);
    let page = h.bus().dma().alloc(P).unwrap();
    h.admin(Sqe::get_log_page(
        crate::spec::sqe::lid::SMART,
        0,
        512,
        page.iova().0,
        0,
    ));
    let smart = crate::spec::SmartLog::from_bytes(page.as_slice()[..512].try_into().unwrap());
    assert_eq!(smart.media_errors, 3);
    h.ctrl.clear_faults();
}

#[test]
fn inline_delays_by_command_count_time_and_release() {
    let _w = test_watchdog::arm(test_watchdog::UNIT);
    let mut h = start(EmulatedConfig::default());
    let mut q = h.io_pair(1, 8);
    let buf = h.bus().dma().alloc(P).unwrap();
    let any_read = Trigger::NthCommand {
        qid: None,
        opcode: Some(io::READ),
        n: 1,
    };
    h.ctrl
        .inject(Fault::once(any_read, Action::DelayCommands(2)));
    let a = q.submit(read1(1, 0, &buf));
    assert!(q.poll().is_none());
    assert_eq!(h.ctrl.stats().held, 1);
    let b = q.submit(Sqe::flush(1));
    assert_eq!(q.wait().cid, b);
    assert!(q.poll().is_none());
    let c = q.submit(Sqe::flush(1));
    assert_eq!(q.wait().cid, a, "released at the second further command");
    assert_eq!(q.wait().cid, c);
    // Released explicitly.
    h.ctrl
        .inject(Fault::once(any_read, Action::DelayCommands(1000)));
    let a = q.submit(read1(1, 0, &buf));
    assert!(q.poll().is_none());
    h.ctrl.release_delayed();
    let cqe = q.wait();
    assert_eq!((cqe.cid, code(&cqe)), (a, OK));
    // By wall time: checked at the next doorbell write.
    h.ctrl.inject(Fault::once(
        any_read,
        Action::Delay(Duration::from_millis(20)),
    ));
    let a = q.submit(read1(1, 0, &buf));
    q.cqdb.ring(q.head as u32);
    assert!(q.poll().is_none());
    std::thread::sleep(Duration::from_millis(25));
    q.cqdb.ring(q.head as u32);
    assert_eq!(q.wait().cid, a);
    assert_eq!(h.ctrl.stats().held, 0);
}

#[test]
fn never_complete_abort_deletion_and_reset() {
    let _w = test_watchdog::arm(test_watchdog::UNIT);
    let mut h = start(EmulatedConfig::default());
    let mut q = h.io_pair(1, 8);
    let buf = h.bus().dma().alloc(P).unwrap();
    let hold = Fault::once(
        Trigger::NthCommand {
            qid: Some(1),
            opcode: None,
            n: 1,
        },
        Action::NeverComplete,
    );
    h.ctrl.inject(hold);
    let a = q.submit(read1(1, 0, &buf));
    let b = q.submit(read1(1, 0, &buf));
    assert_eq!(q.wait().cid, b);
    assert!(q.poll().is_none());
    assert_eq!(h.ctrl.stats().held, 1);
    // Abort of a completed command: not aborted.
    assert_eq!(h.admin(Sqe::abort(1, b)).dw0 & 1, 1);
    // Abort of the held one.
    let c = h.admin(Sqe::abort(1, a));
    assert_eq!((code(&c), c.dw0 & 1), (OK, 0));
    let cqe = q.wait();
    assert_eq!(cqe.cid, a);
    assert_eq!(code(&cqe), st(Sct::Generic, g::ABORT_REQUESTED));
    // Held until the SQ is deleted.
    h.ctrl.inject(hold);
    let a = q.submit(read1(1, 0, &buf));
    assert!(q.poll().is_none());
    assert_eq!(code(&h.admin(Sqe::delete_io_sq(1))), OK);
    let cqe = q.wait();
    assert_eq!(cqe.cid, a);
    assert_eq!(code(&cqe), st(Sct::Generic, g::ABORTED_SQ_DELETION));
    assert_eq!(code(&h.admin(Sqe::delete_io_cq(1))), OK);
    // Held until a reset, which drops it.
    let mut q = h.io_pair(1, 8);
    h.ctrl.inject(hold);
    q.submit(read1(1, 0, &buf));
    assert_eq!(h.ctrl.stats().held, 1);
    h.bus().write32(offset::CC, 0);
    assert_eq!(h.ctrl.stats().held, 0);
    assert!(q.poll().is_none());
}

#[test]
fn fatal_status_stops_processing_until_reset() {
    let _w = test_watchdog::arm(test_watchdog::UNIT);
    let mut h = start(EmulatedConfig::default());
    let mut q = h.io_pair(1, 8);
    let buf = h.bus().dma().alloc(P).unwrap();
    h.ctrl.set_fatal();
    assert!(Csts(h.bus().read32(offset::CSTS)).cfs());
    q.submit(read1(1, 0, &buf));
    assert!(q.poll().is_none());
    assert_eq!(h.ctrl.stats().commands_with(1, io::READ), 0);
    // Reset and bring up again.
    h.bus().write32(offset::CC, 0);
    let c = wait_csts(h.bus(), |c| !c.rdy());
    assert!(!c.cfs());
    let admin = Queue::new(h.bus(), 0, 8, 0);
    h.bus().write32(offset::AQA, Aqa::new(8, 8).0);
    h.bus().write64(offset::ASQ, admin.sq.iova().0);
    h.bus().write64(offset::ACQ, admin.cq.iova().0);
    h.bus().write32(offset::CC, cc_ok().0);
    wait_csts(h.bus(), |c| c.rdy());
    h.admin = admin;
    let mut q = h.io_pair(1, 8);
    assert_eq!(code(&q.cmd(read1(1, 0, &buf))), OK);
}

#[test]
fn surprise_removal() {
    let _w = test_watchdog::arm(test_watchdog::UNIT);
    let mut h = start(EmulatedConfig::default());
    let mut q = h.io_pair(1, 8);
    let buf = h.bus().dma().alloc(P).unwrap();
    h.ctrl.surprise_remove();
    for off in [offset::CAP, offset::VS, offset::CC, offset::CSTS, 0x1000] {
        assert_eq!(h.bus().read32(off), u32::MAX);
    }
    assert!(Csts(h.bus().read32(offset::CSTS)).is_all_ones());
    let before = h.ctrl.stats();
    q.submit(read1(1, 0, &buf));
    h.bus().write32(offset::CC, 0);
    assert!(q.poll().is_none());
    assert_eq!(h.bus().read32(offset::CSTS), u32::MAX);
    assert_eq!(h.ctrl.stats(), before, "nothing processed, nothing counted");
}

// ------------------------------------------------------------------------ threaded

fn threaded(namespaces: Vec<NamespaceConfig>) -> EmulatedConfig {
    EmulatedConfig {
        mode: Mode::Threaded,
        namespaces,
        ready_delay: Duration::from_millis(5),
        ..EmulatedConfig::default()
    }
}

#[test]
fn threaded_concurrent_submitters_with_faults_added_while_running() {
    let _w = test_watchdog::arm(test_watchdog::UNIT);
    let mut h = start(threaded(vec![NamespaceConfig::memory(512, 1 << 16)]));
    let queues: Vec<Queue> = (1..=3).map(|i| h.io_pair(i, 32)).collect();
    let bus: Arc<dyn Bus> = h.ctrl.clone();
    // Every worker finishes round 0 fault-free, then waits at the barrier while the fault is
    // added (the device thread is running); the fault is removed once it has fired, while the
    // workers go on submitting.
    let barrier = Arc::new(std::sync::Barrier::new(4));
    let workers: Vec<_> = queues
        .into_iter()
        .map(|mut q| {
            let bus = bus.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let depth = 8;
                let base = q.qid as u64 * 4096;
                let mut bufs: Vec<DmaBuffer> =
                    (0..depth).map(|_| bus.dma().alloc(P).unwrap()).collect();
                let mut errors = 0;
                for round in 0..30u64 {
                    if round == 1 {
                        barrier.wait(); // round 0 done
                        barrier.wait(); // the fault is in
                    }
                    for (i, b) in bufs.iter_mut().enumerate() {
                        b.as_mut_slice()
                            .copy_from_slice(&pattern(P, (round + i as u64) as u8));
                        q.push(rw(io::WRITE, 1, base + 8 * i as u64, 8, b.iova().0, 0));
                    }
                    q.push(Sqe::flush(1));
                    q.ring();
                    for _ in 0..=depth {
                        let c = q.wait();
                        if code(&c) != OK {
                            errors += 1;
                        }
                    }
                    for b in bufs.iter_mut() {
                        b.as_mut_slice().fill(0);
                    }
                    for (i, b) in bufs.iter().enumerate() {
                        q.push(rw(io::READ, 1, base + 8 * i as u64, 8, b.iova().0, 0));
                    }
                    q.ring();
                    for _ in 0..depth {
                        assert_eq!(code(&q.wait()), OK);
                    }
                    for (i, b) in bufs.iter().enumerate() {
                        assert!(b.as_slice() == &pattern(P, (round + i as u64) as u8)[..]);
                    }
                }
                errors
            })
        })
        .collect();
    barrier.wait();
    assert_eq!(
        h.ctrl.stats().faults_fired,
        0,
        "round 0 ran without the fault"
    );
    let injected = h.ctrl.inject(Fault {
        trigger: Trigger::NthCommand {
            qid: None,
            opcode: Some(io::FLUSH),
            n: 1,
        },
        action: Action::Status(Status::new(Sct::Generic, g::INTERNAL_ERROR)),
        times: None,
    });
    barrier.wait();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while h.ctrl.stats().faults_fired == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the fault never fired"
        );
        std::thread::sleep(Duration::from_micros(100));
    }
    h.ctrl.remove_fault(injected);
    let errors: u32 = workers.into_iter().map(|w| w.join().unwrap()).sum();
    let s = h.ctrl.stats();
    assert!(s.faults_fired > 0, "{s:?}");
    assert_eq!(
        errors as u64, s.faults_fired,
        "only the injected flushes failed"
    );
    assert_eq!(s.dma_faults, 0);
    assert_eq!(s.io_commands(), 3 * 30 * 17);
    for qid in 1..=3 {
        assert_eq!(s.commands_with(qid, io::WRITE), 240);
    }
}

#[test]
fn threaded_delay_and_idle_backoff() {
    let _w = test_watchdog::arm(test_watchdog::UNIT);
    let mut h = start(threaded(vec![NamespaceConfig::null(4096, 1 << 20)]));
    let mut q = h.io_pair(1, 8);
    let buf = h.bus().dma().alloc(P).unwrap();
    h.ctrl.inject(Fault::once(
        Trigger::NthCommand {
            qid: Some(1),
            opcode: None,
            n: 1,
        },
        Action::Delay(Duration::from_millis(30)),
    ));
    let t = Instant::now();
    assert_eq!(code(&q.cmd(read1(1, 0, &buf))), OK);
    assert!(t.elapsed() >= Duration::from_millis(30));
    let t = Instant::now();
    assert_eq!(code(&q.cmd(read1(1, 0, &buf))), OK);
    assert!(t.elapsed() < Duration::from_secs(1));
    // Idle: the device thread sleeps instead of spinning.
    let before = h.ctrl.stats().idle_sleeps;
    let t = Instant::now();
    while h.ctrl.stats().idle_sleeps - before < 5 {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the idle device thread does not sleep"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // And stops when the controller is dropped (the join in Drop would hang otherwise).
    drop(q);
    drop(h);
}

#[test]
fn interrupt_vectors_signal_ien_queues_only() {
    let _w = test_watchdog::arm(test_watchdog::UNIT);
    let mut h = start(EmulatedConfig {
        max_io_queues: 4,
        ..EmulatedConfig::default()
    });
    let bus = h.bus();
    // Vector 0 is the admin queue's; vectors stop at the queue count.
    assert!(bus.interrupt(0).is_err());
    assert!(bus.interrupt(5).is_err());
    let fd1 = bus.interrupt(1).unwrap();
    assert_eq!(
        bus.interrupt(1).unwrap().raw_fd(),
        fd1.raw_fd(),
        "same eventfd"
    );
    assert!(!fd1.clear(), "nothing signalled yet");
    // IEN with a vector the controller does not have.
    let mem = h.bus().dma().alloc(64 * 16).unwrap();
    let c = h.admin(Sqe::create_io_cq_irq(1, 64, mem.iova().0, 5));
    assert_eq!(
        code(&c),
        st(Sct::CommandSpecific, cs::INVALID_INTERRUPT_VECTOR)
    );
    // Queue 1 with IEN on vector 1, queue 2 polled, queue 3 on vector 3 nobody asked for yet.
    let mut qs = Vec::new();
    for (qid, vector) in [(1u16, Some(1u16)), (2, None), (3, Some(3))] {
        let q = Queue::new(&*h.ctrl, qid, 16, h.dstrd);
        let sqe = match vector {
            Some(v) => Sqe::create_io_cq_irq(qid, 16, q.cq.iova().0, v),
            None => Sqe::create_io_cq(qid, 16, q.cq.iova().0),
        };
        assert_eq!(code(&h.admin(sqe)), OK);
        let c = h.admin(Sqe::create_io_sq(qid, 16, q.sq.iova().0, qid));
        assert_eq!(code(&c), OK);
        qs.push(q);
    }
    let buf = h.bus().dma().alloc(512).unwrap();
    for round in 0..3 {
        let c = qs[0].cmd(read1(1, round, &buf));
        assert_eq!(code(&c), OK);
        assert!(
            fd1.clear(),
            "a completion on the IEN queue signals its vector"
        );
        assert!(!fd1.clear(), "cleared");
        let c = qs[1].cmd(read1(1, round, &buf));
        assert_eq!(code(&c), OK);
        let c = qs[2].cmd(read1(1, round, &buf));
        assert_eq!(code(&c), OK);
        assert!(!fd1.clear(), "other queues do not signal vector 1");
    }
    // Vector 3, asked for after queue 3 was created on it, is the one queue 3 signalled.
    let fd3 = h.bus().interrupt(3).unwrap();
    assert!(fd3.clear(), "queue 3's earlier completions");
    let c = qs[2].cmd(read1(1, 9, &buf));
    assert_eq!(code(&c), OK);
    assert!(fd3.clear());
    assert!(!fd1.clear());
}
