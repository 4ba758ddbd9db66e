//! Stress of the embedding API: 2 pollers, several client threads, random mixes of sync and
//! async, aligned and unaligned, heap and DMA buffers, overlapping ranges and extending writes,
//! with faults injected (emulator only). A shadow model checks every read.
//!
//! **The model** (the definition of "latest data" in `embed/blockfile.rs`): requests touching
//! a common page are serialised, so for every byte a read returns the value of a write to it
//! that is not *superseded*: a write W is superseded for the read R when another successful
//! write W2 covering that byte started after W ended and ended before R started. A never
//! written byte is 0 until superseded. A failed (or refused) write makes its bytes unknown
//! until superseded. The length a read returns must lie between the end of the last write that
//! succeeded before the read started and the furthest end of any write started before it
//! ended. Each byte's value names the write that wrote it (a hash of write id and offset).
//!
//! `embed_stress_over_tcp` runs the same mix on a remote namespace: the emulated controller
//! (with the same faults injected) behind the driver's NVMe/TCP target on loopback, reached
//! through `Builder::transport_id`.
//!
//! `EMBED_STRESS_SECS` sets the duration (default 2 s); `EMBED_STRESS_THREADS` the client
//! threads (default 4).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dioxide::emulated::{Action, Fault, Mode, Trigger};
use dioxide::spec::status::media;
use dioxide::spec::{Sct, Status};
use dioxide::{BlockFile, Completed, Dioxide, EmbedError, FileOptions, IoBuffer, Op, Request};
use dioxide_tests::*;

const PAGE: u64 = 4096;
/// File capacity (bytes).
const CAP: u64 = 1 << 20;
/// Largest request.
const MAX_LEN: u64 = 24 * 1024;
/// The poisoned file range (emulator): commands touching it may fail while the fault lasts.
const POISON: std::ops::Range<u64> = 40 * 1024..44 * 1024;
/// Written before the faults start, so gaps never reach the poison.
const PREFILL: u64 = 64 * 1024;

fn val(id: u64, x: u64) -> u8 {
    let mut z = id
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(x.wrapping_mul(0xbf58_476d_1ce4_e5b9));
    z ^= z >> 31;
    z = z.wrapping_mul(0x94d0_49bb_1331_11eb);
    (z >> 29) as u8
}

fn fill_for(id: u64, offset: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = val(id, offset + i as u64);
    }
}

const PENDING: u8 = 0;
const OK: u8 = 1;
const FAILED: u8 = 2;

struct WriteRec {
    id: u64,
    start: u64,
    end: u64,
    inv: u64,
    resp: AtomicU64,
    status: AtomicU8,
}

#[derive(Default)]
struct Model {
    clock: AtomicU64,
    next_id: AtomicU64,
    writes: Mutex<Vec<Arc<WriteRec>>>,
    reads_checked: AtomicU64,
    bytes_checked: AtomicU64,
    errors: AtomicU64,
}

impl Model {
    fn now(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::SeqCst) + 1
    }

    fn begin_write(&self, start: u64, end: u64) -> Arc<WriteRec> {
        let w = Arc::new(WriteRec {
            id: self.next_id.fetch_add(1, Ordering::Relaxed) + 1,
            start,
            end,
            inv: 0,
            resp: AtomicU64::new(u64::MAX),
            status: AtomicU8::new(PENDING),
        });
        let mut ws = self.writes.lock().unwrap();
        // The invocation time is taken under the lock so the list is in invocation order.
        let w = Arc::new(WriteRec {
            inv: self.now(),
            ..Arc::try_unwrap(w).ok().unwrap()
        });
        ws.push(w.clone());
        w
    }

    fn end_write(&self, w: &WriteRec, ok: bool) {
        w.status
            .store(if ok { OK } else { FAILED }, Ordering::SeqCst);
        w.resp.store(self.now(), Ordering::SeqCst);
    }

    /// Check a read of `want` bytes at `off` invoked at `s`, answered at `e` with `data`.
    fn check_read(&self, off: u64, want: u64, s: u64, e: u64, data: &[u8]) {
        let n = data.len() as u64;
        let ws: Vec<Arc<WriteRec>> = {
            let all = self.writes.lock().unwrap();
            all.iter().filter(|w| w.inv < e).cloned().collect()
        };
        let ok_before = |w: &WriteRec| {
            w.status.load(Ordering::SeqCst) == OK && w.resp.load(Ordering::SeqCst) < s
        };
        // Length bounds.
        let lo = ws
            .iter()
            .filter(|w| ok_before(w))
            .map(|w| w.end)
            .max()
            .unwrap_or(0);
        let hi = ws
            .iter()
            .filter(|w| {
                !(w.status.load(Ordering::SeqCst) == FAILED && w.resp.load(Ordering::SeqCst) < s)
            })
            .map(|w| w.end)
            .max()
            .unwrap_or(0);
        assert!(
            off + n <= hi.max(off),
            "read [{off}, +{n}) exposes bytes past any written length {hi}"
        );
        if n < want {
            assert!(
                off + n >= lo.min(off + want),
                "read [{off}, +{want}) stopped at {} before the length {lo} known at its start",
                off + n
            );
        }
        let over: Vec<&Arc<WriteRec>> = ws
            .iter()
            .filter(|w| w.start < off + n && off < w.end)
            .collect();
        for (i, &b) in data.iter().enumerate() {
            let x = off + i as u64;
            let cover: Vec<&&Arc<WriteRec>> =
                over.iter().filter(|w| w.start <= x && x < w.end).collect();
            let superseded =
                |inv_after: u64| cover.iter().any(|w2| ok_before(w2) && w2.inv > inv_after);
            let mut fine = !superseded(0) && b == 0;
            if !fine {
                for w in &cover {
                    let resp = w.resp.load(Ordering::SeqCst);
                    if superseded(resp) {
                        continue;
                    }
                    let st = w.status.load(Ordering::SeqCst);
                    if st != OK && (st == FAILED || resp == u64::MAX) && st != PENDING {
                        fine = true; // failed: unknown bytes
                        break;
                    }
                    if b == val(w.id, x) {
                        fine = true;
                        break;
                    }
                }
            }
            if !fine {
                let cands: Vec<_> = cover
                    .iter()
                    .map(|w| {
                        (
                            w.id,
                            w.start,
                            w.end,
                            w.inv,
                            w.resp.load(Ordering::SeqCst),
                            w.status.load(Ordering::SeqCst),
                            val(w.id, x),
                        )
                    })
                    .collect();
                panic!(
                    "read [{off}, +{want}) (inv {s}, resp {e}) byte {x} = {b:#x}: not the latest \
                     data; writes covering it (id, start, end, inv, resp, status, value): {cands:?}"
                );
            }
        }
        self.reads_checked.fetch_add(1, Ordering::Relaxed);
        self.bytes_checked.fetch_add(n, Ordering::Relaxed);
    }
}

fn overlaps_poison(off: u64, len: u64) -> bool {
    let (a, b) = (off / PAGE * PAGE, (off + len).div_ceil(PAGE) * PAGE);
    a < POISON.end && POISON.start < b
}

struct AsyncOp {
    op: Op,
    off: u64,
    len: u64,
    inv: u64,
    write: Option<Arc<WriteRec>>,
}

struct Client {
    file: BlockFile,
    model: Arc<Model>,
    rng: Rng,
    faults: bool,
    write: bool,
    counts: Arc<Vec<AtomicU32>>,
    next_async: usize,
    pending: HashMap<usize, AsyncOp>,
    tx: std::sync::mpsc::Sender<(usize, u64, Completed)>,
    rx: Receiver<(usize, u64, Completed)>,
    stats: [u64; 8],
}

impl Client {
    fn error_ok(&self, e: &EmbedError, off: u64, len: u64) {
        self.model.errors.fetch_add(1, Ordering::Relaxed);
        assert!(
            self.faults && overlaps_poison(off, len),
            "request [{off}, +{len}) failed but touches no poisoned page: {e}"
        );
        assert!(
            matches!(e, EmbedError::Device { .. }),
            "unexpected error kind for [{off}, +{len}): {e}"
        );
    }

    /// Check a write's result; true when it wrote everything. A write may also end short
    /// (dio-core's rule for a partial direct write whose buffered remainder failed: the bytes
    /// written are reported), only when what it did not write touches a poisoned page; the
    /// model then counts it as failed (its bytes unknown until superseded).
    fn write_done(&self, r: &Result<usize, EmbedError>, off: u64, len: u64) -> bool {
        match *r {
            Ok(n) if n as u64 == len => true,
            Ok(n) => {
                self.model.errors.fetch_add(1, Ordering::Relaxed);
                let n = n as u64;
                assert!(
                    n < len && self.faults && overlaps_poison(off + n, len - n),
                    "write [{off}, +{len}) wrote {n} bytes, but its rest touches no poisoned page"
                );
                false
            }
            Err(ref e) => {
                self.error_ok(e, off, len);
                false
            }
        }
    }

    fn pick(&mut self) -> (u64, u64) {
        let r = &mut self.rng;
        let len = if r.range(0, 2) == 0 {
            r.range(1, MAX_LEN / 512 + 1) * 512
        } else {
            r.range(1, MAX_LEN)
        };
        // Mostly inside what is written, sometimes past it (extending, with a gap).
        let known = self.file.len().max(PREFILL);
        let span = (known + 96 * 1024).min(CAP - len);
        let mut off = r.range(0, span + 1);
        if r.range(0, 2) == 0 {
            off = off / 512 * 512;
        }
        // Now and then aim at the poisoned page, so the injected media errors surely fire.
        if self.faults && r.range(0, 16) == 0 {
            return (POISON.start, PAGE);
        }
        (off, len)
    }

    fn finish_async(&mut self, idx: usize, resp: u64, c: Completed) {
        let op = self
            .pending
            .remove(&idx)
            .expect("a completion of a request in flight");
        match (op.op, c.result) {
            (Op::Write, r) => {
                let w = op.write.expect("write record");
                let ok = self.write_done(&r, op.off, op.len);
                // Stamp the response time taken in the callback.
                w.status
                    .store(if ok { OK } else { FAILED }, Ordering::SeqCst);
                w.resp.store(resp, Ordering::SeqCst);
            }
            (Op::Read, Ok(n)) => {
                let data = &c.buf.as_slice()[..n];
                self.model.check_read(op.off, op.len, op.inv, resp, data);
            }
            (Op::Read, Err(e)) => self.error_ok(&e, op.off, op.len),
        }
    }

    fn drain(&mut self, block: bool) {
        loop {
            let got = if block {
                match self.rx.recv_timeout(Duration::from_secs(20)) {
                    Ok(x) => Some(x),
                    Err(_) => panic!("{} async requests never completed", self.pending.len()),
                }
            } else {
                self.rx.try_recv().ok()
            };
            match got {
                Some((idx, resp, c)) => self.finish_async(idx, resp, c),
                None => return,
            }
            if block && self.pending.is_empty() {
                return;
            }
        }
    }

    fn one(&mut self) {
        let (off, len) = self.pick();
        let is_write = self.write && self.rng.range(0, 2) == 0;
        let sync = self.rng.range(0, 2) == 0;
        let dma = self.rng.range(0, 2) == 0;
        let model = self.model.clone();
        let op = if is_write { Op::Write } else { Op::Read };
        self.stats[(is_write as usize) * 4 + (sync as usize) * 2 + dma as usize] += 1;
        let mut buf: IoBuffer = if dma {
            IoBuffer::Dma(self.file.alloc(len as usize).expect("DMA buffer"))
        } else {
            IoBuffer::Heap(vec![0; len as usize])
        };
        let wrec = if is_write {
            let w = model.begin_write(off, off + len);
            fill_for(w.id, off, &mut buf.as_mut_slice()[..len as usize]);
            Some(w)
        } else {
            None
        };
        let inv = wrec.as_ref().map_or_else(|| model.now(), |w| w.inv);
        if sync {
            let r = match (is_write, dma) {
                (true, false) => self.file.write_at(&buf.as_slice()[..len as usize], off),
                (false, false) => self
                    .file
                    .read_at(&mut buf.as_mut_slice()[..len as usize], off),
                (true, true) => {
                    self.file
                        .write(buf.as_slice().to_vec(), off, len as usize)
                        .0
                }
                (false, true) => {
                    let (r, b) = self.file.read(buf, off, len as usize);
                    buf = b;
                    r
                }
            };
            let resp = model.now();
            match (wrec, r) {
                (Some(w), r) => {
                    let ok = self.write_done(&r, off, len);
                    model.end_write(&w, ok);
                }
                (None, Ok(n)) => model.check_read(off, len, inv, resp, &buf.as_slice()[..n]),
                (None, Err(e)) => self.error_ok(&e, off, len),
            }
            return;
        }
        let idx = self.next_async;
        self.next_async += 1;
        let (tx, counts, m2) = (self.tx.clone(), self.counts.clone(), model.clone());
        self.pending.insert(
            idx,
            AsyncOp {
                op,
                off,
                len,
                inv,
                write: wrec.clone(),
            },
        );
        let req = match op {
            Op::Read => Request::read(off, buf),
            Op::Write => Request::write(off, buf),
        };
        let r = self.file.submit(req, move |c| {
            let resp = m2.now();
            let prev = counts[idx].fetch_add(1, Ordering::SeqCst);
            assert_eq!(prev, 0, "async request {idx} completed twice");
            let _ = tx.send((idx, resp, c));
        });
        if let Err(refused) = r {
            self.pending.remove(&idx);
            if let Some(w) = wrec {
                model.end_write(&w, false);
            }
            panic!("request [{off}, +{len}) refused: {}", refused.error);
        }
        if self.pending.len() >= 8 {
            self.drain(true);
        }
        self.drain(false);
    }
}

/// Where the stress runs: the controller under test, or the emulator behind an NVMe/TCP
/// target on loopback.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Over {
    Local,
    Tcp,
}

fn stress(secs: f64, threads: usize, over: Over) {
    let cfg = config(Mode::Threaded, &[(512, 1 << 16)]);
    let (dev, tgt) = match over {
        Over::Local => (Some(controller_under_test(cfg)), None),
        Over::Tcp => (None, Some(TcpTarget::start(cfg, 1))),
    };
    let emu = match (&dev, &tgt) {
        (Some(d), _) => d.emu.clone(),
        (None, Some(t)) => Some(t.emu.clone()),
        (None, None) => unreachable!("one of the two"),
    };
    let faults = emu.is_some();
    let writable = dev.as_ref().is_none_or(|d| d.writable);
    if !writable {
        eprintln!(
            "embed stress: the controller may not be written (NVME_HIL_ALLOW_WRITE unset); reads only"
        );
    }
    let b = Dioxide::builder().pollers([None, None]).cache_pages(64);
    let b = match (&dev, &tgt) {
        (Some(d), _) => b.controller(d.ctrl.clone()),
        (None, Some(t)) => b.transport_id(&t.trid()).expect("transport ID"),
        (None, None) => unreachable!("one of the two"),
    };
    let dx = b.build().expect("Dioxide");
    let ns = dx.namespaces().remove(0).1;
    let blocks = CAP / ns.block_size() as u64;
    let file = dx
        .open_file(0, ns.nsid(), FileOptions::new(0, blocks).writable(writable))
        .expect("file");
    let model = Arc::new(Model::default());
    if writable {
        // Prefill, recorded in the model.
        let w = model.begin_write(0, PREFILL);
        let mut b = vec![0; PREFILL as usize];
        fill_for(w.id, 0, &mut b);
        assert_eq!(file.write_at(&b, 0).unwrap(), PREFILL as usize);
        model.end_write(&w, true);
    }
    if let Some(emu) = &emu {
        let bs = ns.block_size() as u64;
        emu.inject(Fault {
            trigger: Trigger::LbaRange {
                nsid: ns.nsid().0,
                start: POISON.start / bs,
                end: POISON.end / bs,
                opcode: None,
            },
            action: Action::Status(Status::new(Sct::Media, media::UNRECOVERED_READ_ERROR)),
            times: Some(40),
        });
        emu.inject(Fault {
            trigger: Trigger::NthCommand {
                qid: None,
                opcode: None,
                n: 50,
            },
            action: Action::Delay(Duration::from_millis(2)),
            times: Some(300),
        });
    }
    let counts: Arc<Vec<AtomicU32>> = Arc::new((0..1 << 20).map(|_| AtomicU32::new(0)).collect());
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (file, model, counts) = (file.clone(), model.clone(), counts.clone());
            let write = writable;
            std::thread::spawn(move || {
                let (tx, rx) = channel();
                let mut c = Client {
                    file,
                    model,
                    rng: Rng(0x1234_5678 + t as u64 * 7919),
                    faults,
                    write,
                    counts,
                    next_async: t << 16,
                    pending: HashMap::new(),
                    tx,
                    rx,
                    stats: [0; 8],
                };
                let mut n = 0u64;
                while Instant::now() < deadline && c.next_async < (t << 16) + 60_000 {
                    c.one();
                    n += 1;
                }
                if !c.pending.is_empty() {
                    c.drain(true);
                }
                (n, c.stats, (t << 16)..c.next_async)
            })
        })
        .collect();
    let mut total = 0;
    let mut mix = [0u64; 8];
    for h in handles {
        let (n, s, ids) = h.join().expect("client thread");
        total += n;
        for i in 0..8 {
            mix[i] += s[i];
        }
        for i in ids {
            assert_eq!(
                counts[i].load(Ordering::SeqCst),
                1,
                "async request {i}: completions"
            );
        }
    }
    eprintln!(
        "embed stress: {total} requests in {secs} s on {threads} threads; mix (r/w × async/sync × heap/dma) {mix:?}; \
         {} reads checked ({} bytes), {} errors (injected), file len {}; pollers {:?}; cache {:?}; over {over:?}",
        model.reads_checked.load(Ordering::Relaxed),
        model.bytes_checked.load(Ordering::Relaxed),
        model.errors.load(Ordering::Relaxed),
        file.len(),
        dx.poller_stats(),
        dx.cache_stats(0).unwrap_or_default(),
    );
    assert!(model.reads_checked.load(Ordering::Relaxed) > 0);
    if faults {
        // The faults were really injected, and requests really saw them.
        let st = emu.as_ref().unwrap().stats();
        assert!(st.faults_fired > 0, "no injected fault fired: {st:?}");
        assert!(
            model.errors.load(Ordering::Relaxed) > 0,
            "no request saw an injected error: {st:?}"
        );
    }
    drop(file);
    dx.shutdown();
    if let Some(dev) = dev {
        dev.finish();
    }
    drop(tgt);
}

fn env_or(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn embed_stress() {
    let secs = env_or("EMBED_STRESS_SECS", 2.0);
    // The bound grows with a longer run asked for (a soak test).
    let _w = test_watchdog::arm(test_watchdog::STRESS + Duration::from_secs_f64(secs));
    let threads = env_or("EMBED_STRESS_THREADS", 4.0) as usize;
    stress(secs, threads, Over::Local);
}

/// The same mix on a remote namespace: the emulator behind the NVMe/TCP target on loopback,
/// with the same faults (the target carries their statuses to the host).
#[test]
fn embed_stress_over_tcp() {
    let secs = env_or("EMBED_STRESS_SECS", 2.0);
    let _w = test_watchdog::arm(test_watchdog::STRESS + Duration::from_secs_f64(secs));
    let threads = env_or("EMBED_STRESS_THREADS", 4.0) as usize;
    stress(secs, threads, Over::Tcp);
}

#[test]
fn pinning_to_a_missing_core_is_a_typed_error() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    let dev = controller_under_test(config(Mode::Inline, &[(512, 4096)]));
    let e = Dioxide::builder()
        .controller(dev.ctrl.clone())
        .pollers([Some(100_000)])
        .build()
        .unwrap_err();
    assert!(matches!(e, EmbedError::Pin { core: 100_000, .. }), "{e}");
    assert!(e.to_string().contains("core 100000"), "{e}");
    // The error names the poller that failed, by its index.
    let e = Dioxide::builder()
        .controller(dev.ctrl.clone())
        .pollers([None, Some(100_000)])
        .build()
        .unwrap_err();
    assert!(
        matches!(
            e,
            EmbedError::Pin {
                poller: 1,
                core: 100_000,
                ..
            }
        ),
        "{e}"
    );
    // A core given twice: whichever of the two failed first, named by its own index.
    let e = Dioxide::builder()
        .controller(dev.ctrl.clone())
        .pollers([None, Some(100_000), Some(100_000)])
        .build()
        .unwrap_err();
    assert!(
        matches!(
            e,
            EmbedError::Pin {
                poller: 1 | 2,
                core: 100_000,
                ..
            }
        ),
        "{e}"
    );
}

/// A request the file refuses (here: one ending past the file's capacity) never calls back.
/// On the emulator with 512 B and 4 KiB blocks on namespace 1; on hardware once, with the first
/// namespace's geometry, whatever its block size.
#[test]
fn refused_requests_never_call_back() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    let shapes: &[(u32, u64)] = if on_hardware() {
        &[(512, 4096)]
    } else {
        &[(512, 4096), (4096, 512)]
    };
    for &shape in shapes {
        let dev = controller_under_test(config(Mode::Threaded, &[shape]));
        let dx = Dioxide::builder()
            .controller(dev.ctrl.clone())
            .build()
            .unwrap();
        let ns = first_namespace(&dev.ctrl);
        let bs = ns.block_size() as u64;
        let file = dx.open_file(0, ns.nsid(), FileOptions::new(0, 64)).unwrap();
        // Starts in the file's last block and ends one block past its capacity (64 blocks).
        let buf = file.alloc(2 * bs as usize).unwrap();
        let r = file.submit(Request::write(64 * bs - bs, buf), |_| {
            panic!("a refused request called back")
        });
        let e = r.unwrap_err();
        assert!(
            matches!(e.error, EmbedError::BeyondCapacity { .. }),
            "{} blocks: {}",
            bs,
            e.error
        );
        assert!(e.buf.is_dma());
        assert!(matches!(
            dx.open_file(0, ns.nsid(), FileOptions::new(32, 64))
                .unwrap_err(),
            EmbedError::ExtentInUse { .. }
        ));
        drop(file);
        dx.shutdown();
        dev.finish();
    }
}
