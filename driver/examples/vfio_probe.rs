//! vfio_probe: bring up one NVMe controller through `dioxide::vfio::VfioBus` and the spec types,
//! step by step, printing each step. The Rust twin of the reference `hil-probe.c`.
//!
//! ```text
//! vfio_probe [OPTIONS] [PCI_ADDR]          (PCI_ADDR defaults to $NVME_PCI_ADDR)
//!   --no-hugepages          DMA memory from 4 KiB pages
//!   --no-fault-test         skip the IOMMU negative check
//!   --open-only             only open the bus and map one DMA buffer (diagnostics)
//!   --twice                 with --open-only: open a second time while the first is open
//!   --uid N                 drop to user N before opening (diagnostics)
//!   --memlock-kb N          set RLIMIT_MEMLOCK to N KiB before opening (diagnostics)
//!   --expect-error VARIANT  succeed only if opening fails with this VfioError variant
//!   --diag-suite            (root, HIL guest only: needs NVME_HIL_ALLOW_WRITE=1) break the set-up
//!                           one way at a time (unbind the device, empty the hugepage pool, drop
//!                           to an unprivileged user, lower the memlock limit, open twice),
//!                           check the diagnosis of each, and restore
//! ```
//! Writes LBA 0 only with `NVME_HIL_ALLOW_WRITE=1`; otherwise reads it. Exit status 0 on success.
//!
//! Build for the HIL guest (static):
//! `RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --example vfio_probe
//! --target x86_64-unknown-linux-gnu`

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{Ordering, fence};
use std::time::{Duration, Instant};

use dioxide::spec::identify::IDENTIFY_LEN;
use dioxide::spec::regs::{cq_head_doorbell, offset, shn, shst, sq_tail_doorbell};
use dioxide::spec::sqe::{cns, io};
use dioxide::spec::{
    Aqa, CQES, Cap, Cc, Cqe, Csts, IdentifyController, IdentifyNamespace, SQES, Sqe, Vs,
};
use dioxide::vfio::{VfioBus, VfioError, VfioOptions};
use dioxide::{Bus, DmaBuffer, Doorbell, Iova};

/// An IOVA our allocator never hands out in this probe (1 GiB; chunks start at 2 MiB).
const UNMAPPED_IOVA: u64 = 0x4000_0000;
/// Entries per queue.
const QS: u16 = 32;

struct Opts {
    addr: String,
    hugepages: bool,
    fault_test: bool,
    open_only: bool,
    twice: bool,
    uid: Option<u32>,
    memlock_kb: Option<u64>,
    expect_error: Option<String>,
    diag_suite: bool,
}

fn parse_args() -> Result<Opts, String> {
    let mut o = Opts {
        addr: std::env::var("NVME_PCI_ADDR").unwrap_or_default(),
        hugepages: true,
        fault_test: true,
        open_only: false,
        twice: false,
        uid: None,
        memlock_kb: None,
        expect_error: None,
        diag_suite: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match a.as_str() {
            "--no-hugepages" => o.hugepages = false,
            "--no-fault-test" => o.fault_test = false,
            "--open-only" => o.open_only = true,
            "--twice" => o.twice = true,
            "--diag-suite" => o.diag_suite = true,
            "--uid" => o.uid = Some(val("--uid")?.parse().map_err(|e| format!("--uid: {e}"))?),
            "--memlock-kb" => {
                o.memlock_kb = Some(
                    val("--memlock-kb")?
                        .parse()
                        .map_err(|e| format!("--memlock-kb: {e}"))?,
                )
            }
            "--expect-error" => o.expect_error = Some(val("--expect-error")?),
            s if s.starts_with('-') => return Err(format!("unknown option {s}")),
            s => o.addr = s.to_string(),
        }
    }
    if o.addr.is_empty() {
        return Err("no PCI address (argument or NVME_PCI_ADDR)".into());
    }
    Ok(o)
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// One queue pair in DMA memory, driven by hand (the controller module does this for real).
struct Queue {
    sq: DmaBuffer,
    cq: DmaBuffer,
    sq_db: Doorbell,
    cq_db: Doorbell,
    tail: u16,
    head: u16,
    phase: bool,
    cid: u16,
    /// Entries (at most `QS`, and for an I/O queue at most CAP.MQES + 1).
    qs: u16,
}

impl Queue {
    fn new(bus: &dyn Bus, qid: u16, dstrd: u8, qs: u16) -> Result<Queue, String> {
        let sq = bus
            .dma()
            .alloc(qs as usize * 64)
            .map_err(|e| e.to_string())?;
        let cq = bus
            .dma()
            .alloc(qs as usize * 16)
            .map_err(|e| e.to_string())?;
        Ok(Queue {
            qs,
            sq,
            cq,
            sq_db: bus.doorbell(sq_tail_doorbell(qid, dstrd)),
            cq_db: bus.doorbell(cq_head_doorbell(qid, dstrd)),
            tail: 0,
            head: 0,
            phase: true,
            cid: 0,
        })
    }

    /// Submits `cmd` and polls for its completion.
    fn run(&mut self, bus: &dyn Bus, mut cmd: Sqe, what: &str) -> Result<Cqe, String> {
        self.cid = self.cid.wrapping_add(1);
        cmd.set_cid(self.cid);
        let slot = self.sq.as_ptr().cast::<Sqe>();
        // SAFETY: `tail < qs`, so the entry lies inside the SQ buffer (64-byte aligned entries
        // in a 4 KiB aligned buffer); queue memory is only written with volatile stores.
        unsafe { slot.add(self.tail as usize).write_volatile(cmd) };
        self.tail = (self.tail + 1) % self.qs;
        self.sq_db.ring(self.tail as u32); // release fence inside
        let t = Instant::now();
        let entry = self.cq.as_ptr().cast::<Cqe>();
        loop {
            // SAFETY: `head < qs`, inside the CQ buffer; the device writes it, so volatile reads.
            let e = unsafe { entry.add(self.head as usize).read_volatile() };
            if e.phase() == self.phase {
                fence(Ordering::Acquire);
                // SAFETY: as above; re-read after the fence so every field is the device's.
                let e = unsafe { entry.add(self.head as usize).read_volatile() };
                self.head = (self.head + 1) % self.qs;
                if self.head == 0 {
                    self.phase = !self.phase;
                }
                self.cq_db.ring(self.head as u32);
                let st = e.status();
                println!("  {what:<24} cid={} status={st} {:.3} ms", e.cid, ms(t));
                if e.cid != self.cid {
                    return Err(format!(
                        "{what}: completion for cid {}, expected {}",
                        e.cid, self.cid
                    ));
                }
                return if st.is_success() {
                    Ok(e)
                } else {
                    Err(format!("{what} failed: {st}"))
                };
            }
            if Csts(bus.read32(offset::CSTS)).is_all_ones() {
                return Err(format!("{what}: registers read all ones (device removed?)"));
            }
            if t.elapsed() > Duration::from_secs(5) {
                return Err(format!(
                    "{what}: no completion in 5 s, CSTS={:#x}",
                    bus.read32(offset::CSTS)
                ));
            }
        }
    }
}

fn wait_rdy(bus: &dyn Bus, want: bool, cap: Cap) -> Result<f64, String> {
    let t = Instant::now();
    let limit = Duration::from_millis(cap.timeout_ms().max(500));
    loop {
        let csts = Csts(bus.read32(offset::CSTS));
        if csts.is_all_ones() {
            return Err("CSTS reads all ones (device removed?)".into());
        }
        if csts.rdy() == want {
            return Ok(ms(t));
        }
        if csts.cfs() {
            return Err(format!("controller fatal status, CSTS={:#x}", csts.0));
        }
        if t.elapsed() > limit {
            return Err(format!(
                "CSTS.RDY did not become {want} within CAP.TO ({limit:?})"
            ));
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}

fn klog_count(needle: &str) -> usize {
    let mut buf = vec![0u8; 1 << 20];
    // SAFETY: SYSLOG_ACTION_READ_ALL (3) writes at most `len` bytes into `buf`.
    let n = unsafe { libc::klogctl(3, buf.as_mut_ptr().cast(), buf.len() as i32) };
    if n <= 0 {
        return 0;
    }
    String::from_utf8_lossy(&buf[..n as usize])
        .matches(needle)
        .count()
}

fn probe(o: &Opts) -> Result<(), String> {
    let t0 = Instant::now();
    let opts = VfioOptions::default().with_hugepages(o.hugepages);
    let t = Instant::now();
    let bus: Arc<VfioBus> = VfioBus::open(&o.addr, opts).map_err(|e| e.to_string())?;
    let id = bus.pci_id();
    let (bar_size, areas) = bus.bar0_layout();
    println!(
        "open {}: group {} id {:04x}:{:04x} (subsystem {:04x}:{:04x}) command {:#06x} in {:.1} ms",
        bus.location(),
        bus.group(),
        id.vendor,
        id.device,
        id.subsystem_vendor,
        id.subsystem_device,
        bus.pci_command(),
        ms(t)
    );
    let ranges: Vec<String> = bus
        .iommu()
        .ranges
        .iter()
        .flatten()
        .map(ToString::to_string)
        .collect();
    println!(
        "iommu: page sizes {:#x}, iova ranges [{}], dma mappings available {:?}",
        bus.iommu().page_sizes,
        ranges.join(", "),
        bus.iommu().dma_avail
    );
    println!("BAR0: {bar_size:#x} bytes, mmapped areas {areas:x?}");

    let cap = Cap(bus.read64(offset::CAP));
    let vs = Vs(bus.read32(offset::VS));
    println!(
        "CAP={:#018x} (MQES+1={} DSTRD={} TO={} ms MPSMIN={}) VS={vs}",
        cap.0,
        cap.max_queue_entries(),
        cap.dstrd(),
        cap.timeout_ms(),
        cap.min_page_size()
    );
    if cap.0 == u64::MAX {
        return Err("CAP reads all ones (device removed?)".into());
    }

    // Reset: CC.EN = 0, wait for CSTS.RDY = 0.
    let cc = Cc(bus.read32(offset::CC));
    bus.write32(offset::CC, cc.with_en(false).0);
    let took = wait_rdy(&*bus, false, cap)?;
    println!("controller disabled (CC.EN=0, CSTS.RDY=0) in {took:.3} ms");

    // Admin queue in DMA memory, then enable.
    let dstrd = cap.dstrd();
    let mut aq = Queue::new(&*bus, 0, dstrd, QS)?;
    println!(
        "admin queue: SQ iova {} CQ iova {} ({} memory)",
        aq.sq.iova(),
        aq.cq.iova(),
        if bus.hugepages() {
            "2 MiB hugepage"
        } else {
            "4 KiB page"
        }
    );
    bus.write32(offset::AQA, Aqa::new(QS, QS).0);
    bus.write64(offset::ASQ, aq.sq.iova().0);
    bus.write64(offset::ACQ, aq.cq.iova().0);
    let cc = Cc::default()
        .with_iosqes(SQES)
        .with_iocqes(CQES)
        .with_mps(0)
        .with_css(0)
        .with_en(true);
    bus.write32(offset::CC, cc.0);
    let took = wait_rdy(&*bus, true, cap)?;
    println!("controller enabled (CSTS.RDY=1) in {took:.3} ms");

    // Identify controller and namespace 1.
    let idbuf = bus.dma().alloc(IDENTIFY_LEN).map_err(|e| e.to_string())?;
    aq.run(
        &*bus,
        Sqe::identify(cns::CONTROLLER, 0, idbuf.iova().0),
        "IDENTIFY controller",
    )?;
    let page: &[u8; IDENTIFY_LEN] = idbuf.as_slice().try_into().map_err(|_| "identify size")?;
    let ctrl = IdentifyController::from_bytes(page);
    println!(
        "  model '{}' serial '{}' firmware '{}' NN={} MDTS={}",
        ctrl.mn.trim(),
        ctrl.sn.trim(),
        ctrl.fr.trim(),
        ctrl.nn,
        ctrl.mdts
    );
    let mut nsbuf = bus.dma().alloc(IDENTIFY_LEN).map_err(|e| e.to_string())?;
    aq.run(
        &*bus,
        Sqe::identify(cns::NAMESPACE, 1, nsbuf.iova().0),
        "IDENTIFY namespace 1",
    )?;
    let page: &[u8; IDENTIFY_LEN] = nsbuf.as_slice().try_into().map_err(|_| "identify size")?;
    let ns = IdentifyNamespace::from_bytes(page);
    let bs = ns.block_size();
    println!("  ns1: {} blocks of {bs} bytes", ns.nsze);
    if bs == 0 || bs > 4096 {
        return Err(format!("unexpected block size {bs}"));
    }

    // One I/O queue pair, no larger than the controller allows (CAP.MQES).
    let ioqs = QS.min(cap.max_queue_entries().min(u16::MAX as u32) as u16);
    let mut ioq = Queue::new(&*bus, 1, dstrd, ioqs)?;
    aq.run(
        &*bus,
        Sqe::create_io_cq(1, ioqs, ioq.cq.iova().0),
        "CREATE IO CQ 1",
    )?;
    aq.run(
        &*bus,
        Sqe::create_io_sq(1, ioqs, ioq.sq.iova().0, 1),
        "CREATE IO SQ 1",
    )?;

    // Write LBA 0 (only when allowed), read it back, compare.
    let blocks = 4096 / bs;
    let allow_write = std::env::var("NVME_HIL_ALLOW_WRITE").as_deref() == Ok("1");
    let mut wbuf = bus.dma().alloc(4096).map_err(|e| e.to_string())?;
    for (i, b) in wbuf.as_mut_slice().iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(7).wrapping_add(0x5a);
    }
    if allow_write {
        let mut w = Sqe::rw(io::WRITE, 1, 0, blocks, false);
        w.prp1 = wbuf.iova().0;
        ioq.run(&*bus, w, "WRITE lba 0, 4 KiB")?;
    } else {
        println!("  (NVME_HIL_ALLOW_WRITE is not 1: not writing; reading only)");
    }
    let rbuf = bus.dma().alloc(4096).map_err(|e| e.to_string())?;
    let mut r = Sqe::rw(io::READ, 1, 0, blocks, false);
    r.prp1 = rbuf.iova().0;
    ioq.run(&*bus, r, "READ lba 0, 4 KiB")?;
    let same = rbuf.as_slice() == wbuf.as_slice();
    if allow_write {
        println!(
            "  read-back {}",
            if same {
                "MATCHES written data"
            } else {
                "MISMATCH"
            }
        );
    }

    // IOMMU negative check: a DMA to an IOVA that is not mapped must not reach memory.
    let mut fault_ok = true;
    if o.fault_test {
        if bus.dma().ptr_of(Iova(UNMAPPED_IOVA), 4096).is_some() {
            return Err(format!("{UNMAPPED_IOVA:#x} is mapped: pick another IOVA"));
        }
        nsbuf.as_mut_slice().fill(0xee);
        let needle = format!("fault addr {UNMAPPED_IOVA:#x}");
        let before = klog_count(&needle);
        println!("HIL: EXPECT-DMAR-FAULTS 1 addr={UNMAPPED_IOVA:#x}");
        // QEMU's model completes this with success; the IOMMU blocks the write and logs a fault.
        let res = aq.run(
            &*bus,
            Sqe::identify(cns::CONTROLLER, 0, UNMAPPED_IOVA),
            "IDENTIFY -> unmapped iova",
        );
        let mut after = before;
        for _ in 0..50 {
            after = klog_count(&needle);
            if after > before {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Our own buffers must be untouched by the stray DMA.
        let untouched = nsbuf.as_slice().iter().all(|&b| b == 0xee)
            && (!allow_write || rbuf.as_slice() == wbuf.as_slice());
        fault_ok = after > before && untouched;
        println!(
            "  unmapped-IOVA DMA: completion {}, new IOMMU fault lines {} -> {}",
            match &res {
                Ok(_) => "success".to_string(),
                Err(e) => e.clone(),
            },
            after - before,
            if fault_ok {
                "IOMMU ENFORCING"
            } else {
                "NO FAULT SEEN"
            }
        );
    }

    // QD1 read timing.
    let t = Instant::now();
    let n = 64u32;
    for i in 0..n {
        let mut r = Sqe::rw(io::READ, 1, (i * blocks) as u64, blocks, false);
        r.prp1 = rbuf.iova().0;
        ioq.run_quiet(r)?;
    }
    println!(
        "  {n} x 4 KiB QD1 reads: {:.1} ms ({:.1} us/IO)",
        ms(t),
        ms(t) * 1e3 / n as f64
    );

    // Shutdown: CC.SHN normal, wait for SHST complete.
    let t = Instant::now();
    let cc = Cc(bus.read32(offset::CC));
    bus.write32(offset::CC, cc.with_shn(shn::NORMAL).0);
    let shst = loop {
        let s = Csts(bus.read32(offset::CSTS)).shst();
        if s == shst::COMPLETE || t.elapsed() > Duration::from_secs(2) {
            break s;
        }
        std::thread::sleep(Duration::from_micros(100));
    };
    println!("shutdown: CSTS.SHST={shst} in {:.3} ms", ms(t));
    if bus.register_io_errors() != 0 {
        println!("register access errors: {}", bus.register_io_errors());
    }

    let t = Instant::now();
    drop((aq, ioq, idbuf, nsbuf, wbuf, rbuf));
    let chunks = bus.dma().chunk_count();
    drop(bus);
    println!(
        "teardown ({chunks} DMA chunk(s) unmapped, BAR unmapped, device closed) in {:.3} ms",
        ms(t)
    );
    let data_ok = same || !allow_write;
    println!(
        "VFIO_PROBE {} {} total {:.1} ms",
        if data_ok && fault_ok && shst == shst::COMPLETE {
            "OK"
        } else {
            "FAIL"
        },
        if !allow_write {
            "READ-ONLY"
        } else if same {
            "DATA-OK"
        } else {
            "DATA-MISMATCH"
        },
        ms(t0)
    );
    if !data_ok {
        return Err("read-back mismatch".into());
    }
    if !fault_ok {
        return Err("the IOMMU negative check failed".into());
    }
    if shst != shst::COMPLETE {
        return Err(format!("shutdown did not complete (SHST={shst})"));
    }
    Ok(())
}

impl Queue {
    /// Like `run`, without printing and without per-command checks beyond the status.
    fn run_quiet(&mut self, mut cmd: Sqe) -> Result<(), String> {
        self.cid = self.cid.wrapping_add(1);
        cmd.set_cid(self.cid);
        // SAFETY: as in `run`.
        unsafe {
            self.sq
                .as_ptr()
                .cast::<Sqe>()
                .add(self.tail as usize)
                .write_volatile(cmd)
        };
        self.tail = (self.tail + 1) % self.qs;
        self.sq_db.ring(self.tail as u32);
        let entry = self.cq.as_ptr().cast::<Cqe>();
        let t = Instant::now();
        loop {
            // SAFETY: as in `run`.
            let e = unsafe { entry.add(self.head as usize).read_volatile() };
            if e.phase() == self.phase {
                fence(Ordering::Acquire);
                self.head = (self.head + 1) % self.qs;
                if self.head == 0 {
                    self.phase = !self.phase;
                }
                self.cq_db.ring(self.head as u32);
                return if e.status().is_success() {
                    Ok(())
                } else {
                    Err(format!("read failed: {}", e.status()))
                };
            }
            if t.elapsed() > Duration::from_secs(5) {
                return Err("read: no completion in 5 s".into());
            }
        }
    }
}

/// `--open-only`: open, map one DMA buffer, report. Used to show the diagnostics.
fn open_only(o: &Opts) -> Result<(), VfioError> {
    let opts = VfioOptions::default().with_hugepages(o.hugepages);
    let t = Instant::now();
    let bus = VfioBus::open(&o.addr, opts.clone())?;
    let buf = bus.dma().alloc(4096).map_err(|e| VfioError::Io {
        addr: o.addr.clone(),
        step: "allocate a DMA buffer".into(),
        source: std::io::Error::other(e.to_string()),
    })?;
    println!(
        "open {}: OK in {:.1} ms (group {}, CAP {:#x}, DMA buffer at iova {} from {:?})",
        bus.location(),
        ms(t),
        bus.group(),
        bus.read64(offset::CAP),
        buf.iova(),
        bus.dma()
    );
    if o.twice {
        println!("opening {} again while it is open:", o.addr);
        VfioBus::open(&o.addr, opts)?;
    }
    Ok(())
}

fn variant(e: &VfioError) -> String {
    let d = format!("{e:?}");
    d.split([' ', '{', '(']).next().unwrap_or("").to_string()
}

fn main() -> ExitCode {
    let o = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("vfio_probe: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(kb) = o.memlock_kb {
        let r = libc::rlimit {
            rlim_cur: kb * 1024,
            rlim_max: kb * 1024,
        };
        // SAFETY: `r` is a valid rlimit.
        if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &r) } != 0 {
            eprintln!("setrlimit: {}", std::io::Error::last_os_error());
            return ExitCode::from(2);
        }
        println!("RLIMIT_MEMLOCK set to {kb} KiB");
    }
    if let Some(uid) = o.uid {
        // SAFETY: plain system calls; the process is single-threaded here.
        if unsafe { libc::setgid(uid) } != 0 || unsafe { libc::setuid(uid) } != 0 {
            eprintln!("setuid({uid}): {}", std::io::Error::last_os_error());
            return ExitCode::from(2);
        }
        println!("running as uid {uid}");
    }
    if o.diag_suite {
        return match diag_suite(&o.addr) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                println!("DIAG-SUITE FAIL: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if o.open_only || o.expect_error.is_some() {
        let r = open_only(&o);
        return match (&r, &o.expect_error) {
            (Ok(()), None) => ExitCode::SUCCESS,
            (Err(e), None) => {
                println!("open: ERROR: {e}");
                ExitCode::FAILURE
            }
            (Ok(()), Some(want)) => {
                println!("open: succeeded, but expected error {want}");
                ExitCode::FAILURE
            }
            (Err(e), Some(want)) => {
                let got = variant(e);
                println!("open: ERROR [{got}]: {e}");
                if &got == want {
                    println!("DIAG-OK {want}");
                    ExitCode::SUCCESS
                } else {
                    println!("DIAG-FAIL expected {want}, got {got}");
                    ExitCode::FAILURE
                }
            }
        };
    }
    match probe(&o) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!("VFIO_PROBE FAIL: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs this program again with `args`; true if it exits 0.
fn child(title: &str, args: &[&str]) -> Result<bool, String> {
    println!("--- {title}: vfio_probe {}", args.join(" "));
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let st = std::process::Command::new(exe)
        .args(args)
        .status()
        .map_err(|e| format!("spawn: {e}"))?;
    Ok(st.success())
}

fn write_sys(path: &str, v: &str) -> Result<(), String> {
    std::fs::write(path, v).map_err(|e| format!("write {v:?} to {path}: {e}"))
}

fn chown(path: &str, uid: u32) -> Result<(), String> {
    std::os::unix::fs::chown(path, Some(uid), Some(uid)).map_err(|e| format!("chown {path}: {e}"))
}

/// The diagnostics that can be shown on a live system, each set up, checked, and undone.
fn diag_suite(addr: &str) -> Result<(), String> {
    if std::env::var("NVME_HIL_ALLOW_WRITE").as_deref() != Ok("1") {
        return Err(
            "--diag-suite rebinds drivers and changes hugepages: NVME_HIL_ALLOW_WRITE=1 \
                    (the HIL guest) only"
                .into(),
        );
    }
    let dev = format!("/sys/bus/pci/devices/{addr}");
    let group = std::fs::read_link(format!("{dev}/iommu_group"))
        .map_err(|e| format!("{dev}/iommu_group: {e}"))?
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .ok_or("no group")?;
    let gfile = format!("/dev/vfio/{group}");
    let mut results: Vec<(&str, bool)> = Vec::new();

    results.push((
        "malformed address",
        child(
            "malformed address",
            &["--expect-error", "BadAddress", "0000:01:00"],
        )?,
    ));
    results.push((
        "no such device",
        child(
            "no such device",
            &["--expect-error", "NoDevice", "0000:7f:1f.7"],
        )?,
    ));

    write_sys("/sys/bus/pci/drivers/vfio-pci/unbind", addr)?;
    let r = child("device not bound", &["--expect-error", "NotBound", addr]);
    write_sys(&format!("{dev}/driver_override"), "vfio-pci")?;
    write_sys("/sys/bus/pci/drivers/vfio-pci/bind", addr)?;
    results.push(("not bound to vfio-pci", r?));
    for _ in 0..100 {
        if std::path::Path::new(&gfile).exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }

    let nr = std::fs::read_to_string("/proc/sys/vm/nr_hugepages")
        .map_err(|e| format!("nr_hugepages: {e}"))?;
    write_sys("/proc/sys/vm/nr_hugepages", "0")?;
    let r1 = child(
        "hugepage pool empty",
        &["--expect-error", "HugepagesShort", addr],
    );
    let r2 = child(
        "4 KiB fallback with the pool empty",
        &["--open-only", "--no-hugepages", addr],
    );
    write_sys("/proc/sys/vm/nr_hugepages", nr.trim())?;
    results.push(("hugepage pool empty", r1?));
    results.push(("4 KiB pages fallback", r2?));

    results.push((
        "group file not accessible",
        child(
            "unprivileged user",
            &["--uid", "1000", "--expect-error", "Permission", addr],
        )?,
    ));
    chown(&gfile, 1000)?;
    let r1 = child(
        "memlock limit too low",
        &[
            "--uid",
            "1000",
            "--memlock-kb",
            "64",
            "--expect-error",
            "MemlockTooLow",
            addr,
        ],
    );
    let r2 = child(
        "unprivileged user with the group file and enough memlock",
        &[
            "--uid",
            "1000",
            "--memlock-kb",
            "16384",
            "--open-only",
            addr,
        ],
    );
    chown(&gfile, 0)?;
    results.push(("memlock too low", r1?));
    results.push(("non-root open", r2?));

    results.push((
        "device in use",
        child(
            "open twice",
            &["--open-only", "--twice", "--expect-error", "Busy", addr],
        )?,
    ));

    let passed = results.iter().filter(|r| r.1).count();
    for (name, ok) in &results {
        println!("  {} {name}", if *ok { "ok  " } else { "FAIL" });
    }
    println!("DIAG-SUITE {passed}/{} passed", results.len());
    if passed == results.len() {
        Ok(())
    } else {
        Err(format!("{} case(s) failed", results.len() - passed))
    }
}
