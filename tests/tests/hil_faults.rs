//! Media errors on the real path: a real controller (QEMU's NVMe model through VFIO) whose
//! backing drive fails requests on purpose, injected by the host while the test runs.
//!
//! Runs only in the hardware-in-loop fault scenario (`tests/hil/run --faults`), which gives the
//! guest a way to ask its host to act: the test prints `HIL: HOST blkdebug ns1 read:SECTOR:once`
//! on the console, the host (`tests/hil/host-agent`) puts a QEMU `blkdebug` filter with that rule
//! under the namespace's drive through QMP and answers on the guest's second serial port, and
//! only then does the test issue its I/O: deterministic, nothing timed. Every test here is
//! `#[ignore]`d so that `cargo test` and the other guest runs skip it; the scenario runs them with
//! `--ignored`.
//!
//! For each kind of failing request (read, write, flush) and each way of issuing it (one
//! blocking call, a batch of queued requests, one request split at MDTS, the embedding API's
//! `BlockFile`, `perf -Q`), the request that touches the bad sector ends with the status QEMU
//! reports for EIO (Unrecovered Read Error for reads, Write Fault for writes and flushes),
//! exactly once; its neighbours complete normally and their data is verified. Each case prints
//! one line of the fault matrix, `HIL: MATRIX ROW COLUMN issued=.. once=.. lost=.. double=..
//! failed=.. verified=..`, which the harness collects into the table it prints at the end.
//!
//! The other rows: **stall** (the host holds one read inside QEMU with a blkdebug breakpoint:
//! the per-command timeout fires once, an Abort is sent, the command id stays quarantined until
//! the host releases the read and its late completion arrives, and the queue works meanwhile;
//! `perf --io-timeout-ms` too), **reset** (`Controller::reset` under load from three clients,
//! the scenario shared with `reset_load.rs`; then with two reads split at MDTS outstanding) and
//! **async-event** (the host sets QEMU's SMART critical warning bits; each event is seen once
//! and the request re-armed).

mod reset_scenario;

use std::io::{Read as _, Write as _};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::channel;
use std::time::Duration;

use dioxide::emulated::Mode;
use dioxide::spec::status::{generic, media};
use dioxide::spec::{Sct, Status};
use dioxide::{
    AsyncEvent, AsyncEventType, Controller, Dioxide, DmaBuffer, EmbedError, Error, FileOptions,
    IoError, Lba, MaintOp, Namespace, QueueOptions, QueuePair, Request,
};
use dioxide_tests::*;

/// The guest's second serial port: the host's answers.
const ACK_TTY: &str = "/dev/ttyS1";
/// How long a request may take in the guest (TCG is slow; nothing here should come near it).
const LIMIT: Duration = Duration::from_secs(30);

/// Asks the host to act (see the module documentation) and waits for its answer.
fn host(request: &str) {
    let mut tty = std::fs::File::open(ACK_TTY).unwrap_or_else(|e| {
        panic!(
            "{ACK_TTY}: {e}: this test runs in the HIL fault scenario only (tests/hil/run --faults)"
        )
    });
    {
        // Straight to the console, past libtest's capture: the host reads it there.
        let mut out = std::io::stdout().lock();
        // On a line of its own: libtest may have left "test NAME ... " unterminated.
        writeln!(out, "\nHIL: HOST {request}").unwrap();
        out.flush().unwrap();
    }
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        let n = tty.read(&mut byte).expect("reading the host's answer");
        assert!(
            n == 1,
            "{ACK_TTY} closed before the host answered '{request}'"
        );
        if byte[0] == b'\n' {
            let l = String::from_utf8_lossy(&line).trim().to_string();
            line.clear();
            if l.starts_with("HIL-ACK ok ") {
                return;
            }
            if l.starts_with("HIL-ACK ") {
                panic!("the host could not do '{request}': {l}");
            }
        } else {
            line.push(byte[0]);
        }
    }
}

/// The namespace's drive on the host (`tests/hil/run` names namespace N's format node `nsN`).
fn node(ns: &Namespace) -> String {
    format!("ns{}", ns.nsid().0)
}

/// The 512-byte sector of `lba`, as blkdebug counts.
fn sector(ns: &Namespace, lba: u64) -> u64 {
    lba * ns.block_size() as u64 / 512
}

/// One cell of the fault matrix.
struct Cell {
    row: &'static str,
    column: &'static str,
    issued: u32,
    once: u32,
    lost: u32,
    double: u32,
    failed: u32,
    verified: bool,
}

impl Cell {
    fn new(row: &'static str, column: &'static str) -> Cell {
        Cell {
            row,
            column,
            issued: 0,
            once: 0,
            lost: 0,
            double: 0,
            failed: 0,
            verified: false,
        }
    }

    /// Accounts for requests by how many times each completed.
    fn completions(&mut self, counts: &[u32]) {
        self.issued += counts.len() as u32;
        for &c in counts {
            match c {
                0 => self.lost += 1,
                1 => self.once += 1,
                _ => self.double += 1,
            }
        }
    }

    /// Prints the matrix line and fails the test on a lost or doubly completed request, or a
    /// failure count other than the one injected.
    fn report(self, want_failed: u32) {
        let failed = self.failed;
        self.report_any();
        // (report_any checked the rest.)
        assert_eq!(failed, want_failed, "requests that failed");
    }

    /// Prints the matrix line and fails the test on a lost or doubly completed request or
    /// unverified data, whatever the number of failed requests (a reset fails those that
    /// happen to be in flight).
    fn report_any(self) {
        let mut o = std::io::stdout().lock();
        let _ = writeln!(
            o,
            "\nHIL: MATRIX {} {} issued={} once={} lost={} double={} failed={} verified={}",
            self.row,
            self.column,
            self.issued,
            self.once,
            self.lost,
            self.double,
            self.failed,
            if self.verified { "yes" } else { "NO" }
        );
        let _ = o.flush();
        drop(o);
        assert_eq!(
            (self.lost, self.double),
            (0, 0),
            "{} {}: lost or doubly completed",
            self.row,
            self.column
        );
        assert_eq!(
            self.once, self.issued,
            "{} {}: completed once",
            self.row, self.column
        );
        assert!(self.verified, "{} {}: data verified", self.row, self.column);
    }
}

/// The status QEMU's NVMe model reports when its drive fails a request with EIO.
fn eio_status(write: bool) -> (Sct, u8) {
    if write {
        (Sct::Media, media::WRITE_FAULT)
    } else {
        (Sct::Media, media::UNRECOVERED_READ_ERROR)
    }
}

fn is_eio(s: &Status, write: bool) -> bool {
    (s.sct, s.sc) == eio_status(write)
}

/// The controller under test, which must be the scenario's (writable, through VFIO).
fn device() -> Device {
    let dev = controller_under_test(config(Mode::Inline, &[(512, 1 << 17)]));
    assert!(
        dev.is_hardware() && dev.writable,
        "the fault scenario runs on a real controller with NVME_HIL_ALLOW_WRITE=1"
    );
    dev
}

/// A queue pair with room for a request split four times at MDTS.
fn qpair<T>(c: &Controller) -> QueuePair<T> {
    c.create_qpair::<T>(QueueOptions::default().with_requests(64))
        .expect("queue pair")
}

/// Writes the pattern of `seed` over `blocks` blocks at `lba` (no fault armed).
fn prefill(
    q: &mut QueuePair<()>,
    c: &Controller,
    ns: &Namespace,
    lba: u64,
    blocks: u64,
    seed: u64,
) {
    let bs = ns.block_size() as u64;
    let b = pattern_buffer(c, (blocks * bs) as usize, seed);
    q.write_blocking(ns, Lba(lba), b.as_slice())
        .expect("prefill");
}

/// Reads `blocks` at `lba` and compares them with bytes `[off, off + len)` of the pattern.
fn reads_back(
    q: &mut QueuePair<()>,
    c: &Controller,
    ns: &Namespace,
    lba: u64,
    want: &[u8],
) -> bool {
    let mut r = c.alloc(want.len()).unwrap();
    q.read_blocking(ns, Lba(lba), r.as_mut_slice())
        .expect("read back");
    r.as_slice() == want
}

/// Region of the namespace the tests use: `BASE` and up, the bad block `BAD` inside it.
const BASE: u64 = 256;
const BAD_OFF: u64 = 37;

/// The read or write row: a blocking call, a batch of queued single-block requests, one
/// request of 4 x MDTS, and the embedding API, each with one request failing once.
fn media_error_row(write: bool) {
    let row = if write {
        "media-error:write"
    } else {
        "media-error:read"
    };
    let op = if write { "write" } else { "read" };
    let dev = device();
    let c = &dev.ctrl;
    let ns = first_namespace(c);
    let bs = ns.block_size() as u64;
    let mdts_blocks = c.max_transfer() as u64 / bs;
    let span = 4 * mdts_blocks + 64;
    assert!(ns.blocks() > BASE + span, "namespace too small");
    let bad = BASE + BAD_OFF;
    let seed = if write { 11 } else { 22 };
    let mut q = qpair::<()>(c);
    prefill(&mut q, c, &ns, BASE, span, seed);
    let old = pattern((span * bs) as usize, seed);
    let at = |lba: u64, n: u64| {
        let o = ((lba - BASE) * bs) as usize;
        &old[o..o + (n * bs) as usize]
    };
    let arm_at = |lba: u64| {
        host(&format!(
            "blkdebug {} {op}:{}:once",
            node(&ns),
            sector(&ns, lba)
        ))
    };
    let arm = || arm_at(bad);
    let clear = || host(&format!("blkdebug-clear {}", node(&ns)));

    // One blocking call on the bad block.
    {
        let mut cell = Cell::new(row, "sync");
        let new = pattern(bs as usize, seed + 100);
        let mut b = c.alloc(bs as usize).unwrap();
        arm();
        let r = if write {
            b.as_mut_slice().copy_from_slice(&new);
            q.write_blocking(&ns, Lba(bad), b.as_slice())
        } else {
            q.read_blocking(&ns, Lba(bad), b.as_mut_slice())
        };
        clear();
        cell.completions(&[1]);
        match r {
            Err(Error::Io(IoError::Status { status, lba, .. }))
                if is_eio(&status, write) && lba == Lba(bad) =>
            {
                cell.failed += 1
            }
            other => panic!("{row} sync: want the EIO status at LBA {bad}, got {other:?}"),
        }
        // With the fault gone the same request goes through: a write lands (what a failed write
        // left is unknown, so it is written again), a read returns the data.
        if write {
            q.write_blocking(&ns, Lba(bad), b.as_slice()).unwrap();
            cell.verified = reads_back(&mut q, c, &ns, bad, &new);
        } else {
            cell.verified = reads_back(&mut q, c, &ns, bad, at(bad, 1));
        }
        cell.report(1);
    }

    // A batch of single-block requests around the bad block, rung once, polled together.
    {
        let mut cell = Cell::new(row, "async");
        let n = 16u64;
        let first = bad - n / 2;
        let mut aq = qpair::<(DmaBuffer, u64)>(c);
        let mut counts = vec![0u32; n as usize];
        let mut failed_lba = None;
        let mut data_ok = true;
        arm();
        for i in 0..n {
            let lba = first + i;
            let b = if write {
                pattern_buffer(c, bs as usize, seed + 200 + i)
            } else {
                c.alloc(bs as usize).unwrap()
            };
            let r = if write {
                aq.write(&ns, Lba(lba), (b, i))
            } else {
                aq.read(&ns, Lba(lba), (b, i))
            };
            if let Err(rej) = r {
                panic!("{row} async: request {i} refused: {}", rej.error);
            }
        }
        aq.ring();
        let deadline = std::time::Instant::now() + LIMIT;
        while counts.iter().sum::<u32>() < n as u32 && std::time::Instant::now() < deadline {
            aq.poll(usize::MAX, |(b, i), r| {
                counts[i as usize] += 1;
                let lba = first + i;
                match r {
                    Ok(_) => {
                        if !write && b.as_slice() != at(lba, 1) {
                            data_ok = false;
                        }
                    }
                    Err(IoError::Status { status, .. }) if is_eio(&status, write) => {
                        failed_lba = Some(lba)
                    }
                    Err(e) => panic!("{row} async: request {i}: {e}"),
                }
            })
            .unwrap();
        }
        clear();
        cell.completions(&counts);
        cell.failed = u32::from(failed_lba.is_some());
        assert_eq!(
            failed_lba,
            Some(bad),
            "{row} async: the request that failed"
        );
        if write {
            // Every block but the bad one holds its new data; the bad one is written again.
            for i in 0..n {
                let lba = first + i;
                let want = pattern(bs as usize, seed + 200 + i);
                if lba == bad {
                    let b = pattern_buffer(c, bs as usize, seed + 200 + i);
                    q.write_blocking(&ns, Lba(lba), b.as_slice()).unwrap();
                }
                data_ok &= reads_back(&mut q, c, &ns, lba, &want);
            }
        }
        cell.verified = data_ok;
        drop(aq);
        cell.report(1);
    }
    // The region again as it was, for the cases below.
    prefill(&mut q, c, &ns, BASE, span, seed);

    // One request of 4 x MDTS, split into 4 commands; a bad block in the third.
    {
        let mut cell = Cell::new(row, "split-mdts");
        let start = BASE;
        let blocks = 4 * mdts_blocks;
        let bad = start + 2 * mdts_blocks + 5;
        let mut b = c.alloc((blocks * bs) as usize).unwrap();
        let new = pattern((blocks * bs) as usize, seed + 300);
        if write {
            b.as_mut_slice().copy_from_slice(&new);
        }
        arm_at(bad);
        let r = if write {
            q.write_blocking(&ns, Lba(start), b.as_slice())
        } else {
            q.read_blocking(&ns, Lba(start), b.as_mut_slice())
        };
        clear();
        cell.completions(&[1]);
        match r {
            Err(Error::Io(IoError::Status { status, child, .. })) if is_eio(&status, write) => {
                assert_eq!(child, Some(2), "{row} split: the failing child");
                cell.failed += 1;
            }
            other => panic!("{row} split: want the EIO status, got {other:?}"),
        }
        // Once the fault is gone the same request goes through and its data is right.
        if write {
            q.write_blocking(&ns, Lba(start), b.as_slice()).unwrap();
            cell.verified = reads_back(&mut q, c, &ns, start, &new);
        } else {
            q.read_blocking(&ns, Lba(start), b.as_mut_slice()).unwrap();
            cell.verified = b.as_slice() == at(start, blocks);
        }
        cell.report(1);
    }
    prefill(&mut q, c, &ns, BASE, span, seed);
    drop(q);

    // The embedding API: a BlockFile over the region.
    {
        let mut cell = Cell::new(row, "blockfile");
        let dx = Dioxide::builder()
            .controller(c.clone())
            .pollers([None])
            .build()
            .expect("Dioxide");
        let file_blocks = (span / (4096 / bs).max(1)) * (4096 / bs).max(1);
        let file = dx
            .open_file(
                0,
                ns.nsid(),
                FileOptions::new(BASE, file_blocks)
                    .writable(true)
                    .with_len(file_blocks * bs),
            )
            .expect("file");
        let bad_off = BAD_OFF * bs;
        if write {
            // A write of whole pages then a tail through the page cache, the tail's first block
            // bad: the direct part lands, the tail fails, and the write reports the bytes done
            // (dio-core's rule for a failing buffered tail).
            let page = 4096u64;
            let tail_page = bad_off / page * page;
            let tail_lba = BASE + tail_page / bs;
            let len = tail_page as usize + 100;
            let data = pattern(len, seed + 400);
            let mut b = file.alloc(len).unwrap();
            b.as_mut_slice().copy_from_slice(&data);
            let (tx, rx) = channel();
            let calls = Arc::new(AtomicU32::new(0));
            let calls2 = calls.clone();
            arm_at(tail_lba);
            if let Err(r) = file.submit(Request::write(0, b), move |done| {
                calls2.fetch_add(1, Ordering::SeqCst);
                let _ = tx.send(done.result);
            }) {
                panic!("{row} blockfile: refused: {}", r.error);
            }
            let res = rx.recv_timeout(LIMIT).expect("the write never completed");
            clear();
            cell.completions(&[calls.load(Ordering::SeqCst)]);
            let n =
                res.unwrap_or_else(|e| panic!("{row} blockfile: the direct bytes were lost: {e}"));
            assert_eq!(n, tail_page as usize, "{row} blockfile: the bytes done");
            cell.failed += 1;
            let mut got = vec![0u8; n];
            assert_eq!(file.read_at(&mut got, 0).unwrap(), n);
            cell.verified = got == data[..n];
        } else {
            // A read across the bad block fails once, with the device's status; then reads.
            let len = (bad_off + 8 * bs) as usize;
            let mut got = vec![0u8; len];
            arm();
            let r = file.read_at(&mut got, 0);
            clear();
            cell.completions(&[1]);
            match r {
                Err(EmbedError::Device { status, .. })
                    if (status.sct, status.sc) == (2, media::UNRECOVERED_READ_ERROR)
                        // The first LBA of the command that failed: the one holding `bad`.
                        && status.lba.is_some_and(|l| l <= bad && bad - l < mdts_blocks) =>
                {
                    cell.failed += 1
                }
                other => {
                    panic!(
                        "{row} blockfile: want the device's error on a command holding LBA {bad}, got {other:?}"
                    )
                }
            }
            assert_eq!(file.read_at(&mut got, 0).unwrap(), len);
            cell.verified = got[..] == old[..len];
        }
        drop(file);
        dx.shutdown();
        cell.report(1);
    }
    let addr = dev.pci_addr.clone().unwrap();
    let (node_name, sec, lbas) = (node(&ns), sector(&ns, bad), ns.blocks());
    let (nsid, bsz) = (ns.nsid().0, bs);
    drop(ns);
    dev.finish();

    // perf -Q: a sequential pass over the region start hits the bad block once (rule "always":
    // perf's own count is what is checked), counts the error and goes on.
    let mut cell = Cell::new(row, "perf");
    host(&format!("blkdebug {node_name} {op}:{sec}"));
    let ios = BASE + BAD_OFF + 20;
    let w = if write { "write" } else { "read" };
    let out = Command::new("perf")
        .args([
            "-r",
            &format!("trtype:PCIe traddr:{addr} ns:{nsid}"),
            "-q",
            "1",
            "-o",
            &bsz.to_string(),
            "-w",
            w,
            "-t",
            "60",
            "-d",
            &ios.to_string(),
            "-Q",
            "1",
        ])
        .output();
    clear_node(&node_name);
    let out = out.expect("perf (the tools are in the guest's PATH)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(lbas > ios);
    assert!(out.status.success(), "perf -Q failed:\n{text}\n{err}");
    let errors = text
        .lines()
        .find_map(|l| l.strip_prefix("I/O errors: "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse::<u32>().ok())
        .unwrap_or_else(|| panic!("perf did not report its I/O errors:\n{text}\n{err}"));
    let logged = err.matches("completed with error").count() as u32;
    cell.issued = ios as u32;
    cell.once = ios as u32; // perf counts each completion once; lost ones fail its drain
    cell.failed = errors;
    cell.verified = logged == errors && text.contains("Total ");
    println!("{text}{err}");
    cell.report(1);
}

fn clear_node(node: &str) {
    host(&format!("blkdebug-clear {node}"));
}

/// The flush row: a blocking Flush fails once with the device's status, the next succeeds. A
/// write comes first: QEMU skips the flush of a drive node nothing was written through since its
/// last flush (the filter is new), and the write is what the flush must make durable.
#[test]
#[ignore = "runs in the HIL fault scenario only: tests/hil/run --faults"]
fn media_error_on_flush() {
    let _w = test_watchdog::arm(test_watchdog::STRESS);
    let dev = device();
    let c = &dev.ctrl;
    let ns = first_namespace(c);
    let mut q = qpair::<()>(c);
    prefill(&mut q, c, &ns, BASE, 8, 33);
    let mut cell = Cell::new("media-error:flush", "sync");
    let bs = ns.block_size() as usize;
    let new = pattern_buffer(c, 8 * bs, 34);
    host(&format!("blkdebug {} flush::once", node(&ns)));
    q.write_blocking(&ns, Lba(BASE), new.as_slice())
        .expect("the write before the flush (only flushes fail)");
    let r = q.flush_blocking(&ns);
    let again = q.flush_blocking(&ns);
    clear_node(&node(&ns));
    cell.completions(&[1, 1, 1]);
    match r {
        Err(Error::Io(IoError::Status { status, .. })) if is_eio(&status, true) => cell.failed += 1,
        other => panic!("flush: want Write Fault, got {other:?}"),
    }
    again.expect("the second flush");
    cell.verified = reads_back(&mut q, c, &ns, BASE, &pattern(8 * bs, 34));
    cell.report(1);

    // Queued: a blocking write makes the drive node dirty, then a batch of 8 writes and 2
    // flushes is rung together. The first flush to reach the drive fails (the rule fires once,
    // and the node is dirty whatever the order the device takes them in); the other one and
    // the writes complete; every block holds its new data.
    {
        let mut cell = Cell::new("media-error:flush", "async");
        let n = 8u64;
        let mut aq = qpair::<u64>(c);
        let buf = pattern_buffer(c, (n as usize) * bs, 35);
        host(&format!("blkdebug {} flush::once", node(&ns)));
        let pre = pattern_buffer(c, bs, 36);
        q.write_blocking(&ns, Lba(BASE + 8), pre.as_slice())
            .expect("the write before the batch (only flushes fail)");
        for i in 0..n {
            let s = buf.slice(i as usize * bs, bs).unwrap();
            // SAFETY: `buf` outlives `aq` (dropped first, below) and is only read until every
            // request came back (no timeout: nothing is quarantined).
            if let Err(r) = unsafe { aq.write_raw(&ns, Lba(BASE + i), s, i) } {
                panic!("flush async: write {i} refused: {}", r.error);
            }
        }
        for i in n..n + 2 {
            if let Err(r) = aq.flush(&ns, i) {
                panic!("flush async: flush {i} refused: {}", r.error);
            }
        }
        aq.ring();
        let mut counts = vec![0u32; n as usize + 2];
        let mut results = vec![None; n as usize + 2];
        poll_all(&mut aq, &mut counts, &mut results);
        clear_node(&node(&ns));
        for (i, r) in results.iter().enumerate() {
            match r {
                Some(Ok(_)) | None => {}
                Some(Err(IoError::Status { status, .. }))
                    if i as u64 >= n && is_eio(status, true) =>
                {
                    cell.failed += 1
                }
                Some(Err(e)) => panic!("flush async: request {i}: {e}"),
            }
        }
        assert_eq!(aq.quarantined(), 0);
        drop(aq);
        cell.completions(&counts);
        cell.verified = reads_back(&mut q, c, &ns, BASE, buf.as_slice())
            && reads_back(&mut q, c, &ns, BASE + 8, &pattern(bs, 36));
        drop(buf);
        cell.report(1);
    }
    drop(q);

    // The embedding API: `BlockFile::submit_flush` after a write fails once (its callback runs
    // once, with the device's Write Fault), then `BlockFile::flush` after another write fails
    // once the same way; a flush of each kind then succeeds and the writes read back.
    {
        let mut cell = Cell::new("media-error:flush", "blockfile");
        let dx = Dioxide::builder()
            .controller(c.clone())
            .pollers([None])
            .build()
            .expect("Dioxide");
        let page = 4096usize.max(bs);
        let file_blocks = (4 * page / bs) as u64;
        let file = dx
            .open_file(
                0,
                ns.nsid(),
                FileOptions::new(BASE, file_blocks)
                    .writable(true)
                    .with_len(file_blocks * bs as u64),
            )
            .expect("file");
        let is_write_fault = |r: &Result<(), EmbedError>| {
            matches!(r, Err(EmbedError::Maint {
                op: MaintOp::Flush,
                source: dio_core::DioError::Io(status),
                ..
            }) if (status.sct, status.sc) == (2, media::WRITE_FAULT))
        };
        let submit_flush = || {
            let (tx, rx) = channel();
            let calls = Arc::new(AtomicU32::new(0));
            let calls2 = calls.clone();
            file.submit_flush(move |r| {
                calls2.fetch_add(1, Ordering::SeqCst);
                let _ = tx.send(r);
            })
            .expect("submit_flush accepted");
            let r = rx.recv_timeout(LIMIT).expect("the flush never completed");
            // A second call would show up by now (the poller runs callbacks one at a time).
            std::thread::sleep(Duration::from_millis(50));
            (r, calls.load(Ordering::SeqCst))
        };
        let first = pattern(page, 37);
        let second = pattern(page, 38);
        let mut counts = Vec::new();

        host(&format!("blkdebug {} flush::once", node(&ns)));
        assert_eq!(file.write_at(&first, 0).expect("write"), page);
        let (r, calls) = submit_flush();
        counts.extend([1, calls]);
        if is_write_fault(&r) {
            cell.failed += 1;
        } else {
            panic!("blockfile submit_flush: want the device's Write Fault, got {r:?}");
        }
        let (r, calls) = submit_flush();
        counts.push(calls);
        r.expect("submit_flush once the fault is gone");

        host(&format!("blkdebug {} flush::once", node(&ns)));
        assert_eq!(file.write_at(&second, page as u64).expect("write"), page);
        let r = file.flush();
        counts.extend([1, 1]);
        if is_write_fault(&r) {
            cell.failed += 1;
        } else {
            panic!("blockfile flush: want the device's Write Fault, got {r:?}");
        }
        let r = file.flush();
        clear_node(&node(&ns));
        counts.push(1);
        r.expect("flush once the fault is gone");

        let mut got = vec![0u8; 2 * page];
        assert_eq!(file.read_at(&mut got, 0).expect("read back"), 2 * page);
        cell.verified = got[..page] == first[..] && got[page..] == second[..];
        cell.completions(&counts);
        drop(file);
        dx.shutdown();
        cell.report(2);
    }
    dev.finish();
}

#[test]
#[ignore = "runs in the HIL fault scenario only: tests/hil/run --faults"]
fn media_error_on_read() {
    let _w = test_watchdog::arm(test_watchdog::STRESS);
    media_error_row(false);
}

#[test]
#[ignore = "runs in the HIL fault scenario only: tests/hil/run --faults"]
fn media_error_on_write() {
    let _w = test_watchdog::arm(test_watchdog::STRESS);
    media_error_row(true);
}

/// The per-command timeout of the stall cases: long enough that no healthy command comes near
/// it under TCG on a busy host, short enough to keep the scenario's boot short.
const STALL_TIMEOUT: Duration = Duration::from_secs(3);

/// Asks the host to hang the next read that reaches the namespace's drive (a blkdebug
/// breakpoint: QEMU suspends the request until `release`).
fn stall(ns: &Namespace, tag: &str) {
    host(&format!("stall {} read {tag}", node(ns)));
}

fn release(ns: &Namespace, tag: &str) {
    host(&format!("release {} {tag}", node(ns)));
}

/// Releases the stall `tag` from another thread once the controller has sent an Abort beyond
/// `aborts`: a request the queue guards (a blocking call, the embedding API) reports its timeout
/// only when the device gives the command back, and QEMU gives it back only when released. The
/// timeout, the quarantine and the Abort all happen before the release: nothing is timed.
fn release_after_abort<'s>(
    scope: &'s std::thread::Scope<'s, '_>,
    c: &'s Controller,
    ns: &'s Namespace,
    tag: &'s str,
    aborts: u64,
) -> std::thread::ScopedJoinHandle<'s, bool> {
    scope.spawn(move || {
        let deadline = std::time::Instant::now() + LIMIT;
        let mut seen = false;
        while std::time::Instant::now() < deadline {
            if c.aborts_sent() > aborts {
                seen = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // Released even when no Abort came: a request left suspended would hang QEMU's
        // teardown. The caller's checks then fail on `seen`.
        release(ns, tag);
        seen
    })
}

/// Polls `q` until `n` requests were delivered (or `LIMIT`), counting deliveries by tag.
fn poll_all(q: &mut QueuePair<u64>, counts: &mut [u32], results: &mut [Option<dioxide::IoResult>]) {
    let n = counts.len() as u32;
    let deadline = std::time::Instant::now() + LIMIT;
    while counts.iter().sum::<u32>() < n && std::time::Instant::now() < deadline {
        q.poll(usize::MAX, |t, r| {
            counts[t as usize] += 1;
            results[t as usize] = Some(r);
        })
        .expect("poll");
    }
}

/// Polls `q` until its quarantine is empty (or `LIMIT`); nothing may be delivered meanwhile.
fn drain_quarantine(q: &mut QueuePair<u64>, delivered_again: &mut u32) {
    let deadline = std::time::Instant::now() + LIMIT;
    while q.quarantined() > 0 && std::time::Instant::now() < deadline {
        q.poll(usize::MAX, |_, _| *delivered_again += 1)
            .expect("poll");
    }
}

/// Stall/timeout on the real device: the host makes one read hang inside QEMU; the queue's
/// per-command timeout fires, the request reports `Timeout` exactly once, an Abort is sent
/// (QEMU's completes at once and aborts nothing), the command id stays quarantined until the
/// device gives the command back (after the host releases it: the late completion is dropped
/// and counted), and the queue keeps working throughout (new I/O, data verified). Columns: a
/// batch of raw requests, one request split at MDTS, a blocking call, the embedding API.
#[test]
#[ignore = "runs in the HIL fault scenario only: tests/hil/run --faults"]
fn stall_times_out_aborts_and_recovers() {
    let _w = test_watchdog::arm(test_watchdog::STRESS);
    let row = "stall:read";
    let dev = device();
    let c = &dev.ctrl;
    let ns = first_namespace(c);
    let bs = ns.block_size() as u64;
    let mdts_blocks = c.max_transfer() as u64 / bs;
    let span = 4 * mdts_blocks + 64;
    assert!(ns.blocks() > BASE + span, "namespace too small");
    let seed = 55;
    let mut q = qpair::<()>(c);
    prefill(&mut q, c, &ns, BASE, span, seed);
    let old = pattern((span * bs) as usize, seed);
    let at = |lba: u64, n: u64| {
        let o = ((lba - BASE) * bs) as usize;
        &old[o..o + (n * bs) as usize]
    };
    let opts = QueueOptions::default()
        .with_requests(64)
        .with_timeout(Some(STALL_TIMEOUT));

    // A batch of single-block raw requests (their contexts hold no memory: the timeout is
    // reported as soon as the command is quarantined), then more I/O while it is.
    {
        let mut cell = Cell::new(row, "async");
        let mut aq = c.create_qpair::<u64>(opts.clone()).expect("queue pair");
        let n = 8u64;
        let buf = c.alloc((2 * n * bs) as usize).unwrap();
        let aborts = c.aborts_sent();
        stall(&ns, "async");
        for i in 0..n {
            let s = buf.slice((i * bs) as usize, bs as usize).unwrap();
            // SAFETY: `buf` outlives `aq` (dropped first, below) and nothing else touches it
            // until the quarantine is empty.
            if let Err(r) = unsafe { aq.read_raw(&ns, Lba(BASE + i), s, i) } {
                panic!("{row} async: request {i} refused: {}", r.error);
            }
        }
        aq.ring();
        let mut counts = vec![0u32; n as usize];
        let mut results = vec![None; n as usize];
        poll_all(&mut aq, &mut counts, &mut results);
        let timed_out: Vec<u64> = (0..n)
            .filter(|&i| matches!(results[i as usize], Some(Err(IoError::Timeout { .. }))))
            .collect();
        for (i, r) in results.iter().enumerate() {
            match r {
                Some(Ok(_)) | None => {}
                Some(Err(IoError::Timeout { lba, .. })) if *lba == Lba(BASE + i as u64) => {}
                Some(Err(e)) => panic!("{row} async: request {i}: {e}"),
            }
        }
        assert_eq!(timed_out.len(), 1, "{row} async: one request times out");
        let stuck = timed_out[0];
        assert_eq!(
            aq.quarantined(),
            1,
            "{row} async: the command id is quarantined"
        );
        assert_eq!(c.aborts_sent(), aborts + 1, "{row} async: one Abort sent");
        // The queue works while the command id is held: new reads, data verified.
        let mut more = vec![0u32; n as usize];
        let mut more_results = vec![None; n as usize];
        for i in 0..n {
            let s = buf.slice(((n + i) * bs) as usize, bs as usize).unwrap();
            // SAFETY: as above.
            if let Err(r) = unsafe { aq.read_raw(&ns, Lba(BASE + n + i), s, i) } {
                panic!("{row} async: request {} refused: {}", n + i, r.error);
            }
        }
        aq.ring();
        poll_all(&mut aq, &mut more, &mut more_results);
        let mut data_ok = more_results.iter().all(|r| matches!(r, Some(Ok(_))))
            && buf.as_slice()[(n * bs) as usize..] == *at(BASE + n, n);
        data_ok &= (0..n).filter(|&i| i != stuck).all(|i| {
            buf.as_slice()[(i * bs) as usize..((i + 1) * bs) as usize] == *at(BASE + i, 1)
        });
        release(&ns, "async");
        let mut again = 0;
        drain_quarantine(&mut aq, &mut again);
        let st = aq.stats();
        assert_eq!(
            aq.quarantined(),
            0,
            "{row} async: the device gave the command back"
        );
        assert_eq!(
            (st.timeouts, st.late_completions),
            (1, 1),
            "{row} async: {st:?}"
        );
        counts.extend(more);
        counts[stuck as usize] += again;
        cell.completions(&counts);
        cell.failed = timed_out.len() as u32;
        // The late completion wrote the stalled block's buffer: it holds the block's data too.
        data_ok &= buf.as_slice()[(stuck * bs) as usize..((stuck + 1) * bs) as usize]
            == *at(BASE + stuck, 1);
        cell.verified = data_ok;
        drop(aq);
        drop(buf);
        cell.report(1);
    }

    // One request of 4 x MDTS: one of its commands hangs; the request reports the timeout
    // once, naming that command, when the others are done.
    {
        let mut cell = Cell::new(row, "split-mdts");
        let mut aq = c.create_qpair::<u64>(opts.clone()).expect("queue pair");
        let blocks = 4 * mdts_blocks;
        let buf = c.alloc((blocks * bs) as usize).unwrap();
        let aborts = c.aborts_sent();
        stall(&ns, "split");
        // SAFETY: `buf` outlives `aq` and nothing else touches it until the quarantine is empty.
        if let Err(r) = unsafe { aq.read_raw(&ns, Lba(BASE), buf.as_dma_slice(), 0) } {
            panic!("{row} split: refused: {}", r.error);
        }
        aq.ring();
        let mut counts = vec![0u32; 1];
        let mut results = vec![None; 1];
        poll_all(&mut aq, &mut counts, &mut results);
        match &results[0] {
            Some(Err(IoError::Timeout {
                child: Some(k),
                lba,
                ..
            })) if *lba == Lba(BASE + *k as u64 * mdts_blocks) => {}
            other => panic!("{row} split: want a timeout naming the stalled child, got {other:?}"),
        }
        assert_eq!(
            aq.quarantined(),
            1,
            "{row} split: the child's command id is quarantined"
        );
        assert_eq!(c.aborts_sent(), aborts + 1, "{row} split: one Abort sent");
        release(&ns, "split");
        let mut again = 0;
        drain_quarantine(&mut aq, &mut again);
        assert_eq!(
            aq.quarantined(),
            0,
            "{row} split: the device gave the command back"
        );
        counts[0] += again;
        // The same request again: whole, and its data right.
        let mut b2 = c.alloc((blocks * bs) as usize).unwrap();
        drop(aq);
        q.read_blocking(&ns, Lba(BASE), b2.as_mut_slice())
            .expect("the request again");
        cell.completions(&[counts[0], 1]);
        cell.failed = 1;
        cell.verified = b2.as_slice() == at(BASE, blocks) && buf.as_slice() == at(BASE, blocks);
        cell.report(1);
    }

    // A blocking call: it keeps the caller's buffer until the device lets go, so it returns the
    // timeout only after the Abort and the release (from another thread, once the Abort is out).
    {
        let mut cell = Cell::new(row, "sync");
        let mut sq = c.create_qpair::<()>(opts.clone()).expect("queue pair");
        let lba = BASE + BAD_OFF;
        let mut b = c.alloc(bs as usize).unwrap();
        let aborts = c.aborts_sent();
        stall(&ns, "sync");
        let (r, abort_seen) = std::thread::scope(|s| {
            let h = release_after_abort(s, c, &ns, "sync", aborts);
            let r = sq.read_blocking(&ns, Lba(lba), b.as_mut_slice());
            (r, h.join().expect("the releasing thread"))
        });
        assert!(abort_seen, "{row} sync: no Abort was sent");
        cell.completions(&[1]);
        match r {
            Err(Error::Io(IoError::Timeout { lba: l, .. })) if l == Lba(lba) => cell.failed += 1,
            other => panic!("{row} sync: want the timeout at LBA {lba}, got {other:?}"),
        }
        let st = sq.stats();
        assert_eq!(
            sq.quarantined(),
            0,
            "{row} sync: returned once the device let go"
        );
        assert_eq!(
            (st.timeouts, st.late_completions),
            (1, 1),
            "{row} sync: {st:?}"
        );
        // The queue goes on: the same read again.
        sq.read_blocking(&ns, Lba(lba), b.as_mut_slice())
            .expect("the read again");
        cell.verified = b.as_slice() == at(lba, 1);
        drop(sq);
        cell.report(1);
    }
    drop(q);

    // The embedding API: a BlockFile read whose first command hangs fails once with the
    // driver's timeout status (Command Abort Requested), after the device gave it back; the
    // next read returns the data.
    {
        let mut cell = Cell::new(row, "blockfile");
        let dx = Dioxide::builder()
            .controller(c.clone())
            .pollers([None])
            .queue(opts.clone())
            .build()
            .expect("Dioxide");
        let page_blocks = (4096 / bs).max(1);
        let file_blocks = span / page_blocks * page_blocks;
        let file = dx
            .open_file(
                0,
                ns.nsid(),
                FileOptions::new(BASE, file_blocks).with_len(file_blocks * bs),
            )
            .expect("file");
        let len = (16 * bs).max(4096) as usize;
        let mut got = vec![0u8; len];
        let aborts = c.aborts_sent();
        stall(&ns, "blockfile");
        let (r, abort_seen) = std::thread::scope(|s| {
            let h = release_after_abort(s, c, &ns, "blockfile", aborts);
            let r = file.read_at(&mut got, 0);
            (r, h.join().expect("the releasing thread"))
        });
        assert!(abort_seen, "{row} blockfile: no Abort was sent");
        cell.completions(&[1]);
        match r {
            Err(EmbedError::Device { status, .. })
                if (status.sct, status.sc) == (0, generic::ABORT_REQUESTED) =>
            {
                cell.failed += 1
            }
            other => panic!("{row} blockfile: want the timeout's status, got {other:?}"),
        }
        assert_eq!(file.read_at(&mut got, 0).expect("the read again"), len);
        cell.completions(&[1]);
        cell.verified = got[..] == old[..len];
        drop(file);
        dx.shutdown();
        cell.report(1);
    }
    let addr = dev.pci_addr.clone().unwrap();
    let (nsid, node_name) = (ns.nsid().0, node(&ns));
    drop(ns);
    dev.finish();
    perf_stalled(&addr, nsid, &node_name);
}

/// The stall row's perf column: `perf -w verify -q 2 -Q 1 --io-timeout-ms 3000` while the host
/// holds the first read it sends. perf logs that read's timeout (an Abort is sent, its buffer
/// retired, the other slot goes on); only then does the host release the read (its late
/// completion is dropped by the driver). perf ends by itself at `-t`, exit 0, with its counts:
/// every I/O submitted completed once, 1 with an error, and no verify mismatch.
fn perf_stalled(addr: &str, nsid: u32, node_name: &str) {
    use std::io::BufRead as _;
    host(&format!("stall {node_name} read perf"));
    let mut child = Command::new("perf")
        .args([
            "-r",
            &format!("trtype:PCIe traddr:{addr} ns:{nsid}"),
            "-q",
            "2",
            "-o",
            "4096",
            "-w",
            "verify",
            "-t",
            "12",
            "-Q",
            "1",
            "--io-timeout-ms",
            &STALL_TIMEOUT.as_millis().to_string(),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("perf (the tools are in the guest's PATH)");
    let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let (tx, rx) = channel();
    let err_thread = std::thread::spawn(move || {
        let mut all = String::new();
        let mut told = false;
        for line in stderr.lines() {
            let Ok(line) = line else { break };
            if !told && line.starts_with("Read ") {
                told = true;
                let _ = tx.send(());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let mut stdout = child.stdout.take().unwrap();
    let out_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    // perf's timeout fires STALL_TIMEOUT after the read; perf logs it at once.
    let timed_out = rx.recv_timeout(LIMIT).is_ok();
    // Released in any case: a read left suspended would hang QEMU's teardown.
    host(&format!("release {node_name} perf"));
    let until = std::time::Instant::now() + LIMIT;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if std::time::Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            panic!("perf still runs {LIMIT:?} after its -t");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = out_thread.join().unwrap();
    let err = err_thread.join().unwrap();
    println!("{text}{err}");
    assert!(timed_out, "perf logged no failed read:\n{text}\n{err}");
    assert!(status.success(), "perf -Q failed:\n{text}\n{err}");
    let read_errors: Vec<&str> = err.lines().filter(|l| l.starts_with("Read ")).collect();
    assert!(
        read_errors.len() == 1 && read_errors[0].contains("timed out"),
        "perf: want one read timed out, got {read_errors:?}"
    );
    let counts: Vec<u64> = err
        .lines()
        .find_map(|l| l.strip_prefix("I/O counts: "))
        .map(|l| {
            l.split(|c: char| !c.is_ascii_digit())
                .filter(|n| !n.is_empty())
                .map(|n| n.parse::<u64>().unwrap())
                .collect()
        })
        .unwrap_or_default();
    let [submitted, completed, errors, never] = counts[..] else {
        panic!("perf did not print its I/O counts:\n{text}\n{err}");
    };
    let mut cell = Cell::new("stall:read", "perf");
    cell.issued = submitted as u32;
    cell.once = completed as u32;
    cell.lost = never as u32;
    cell.failed = errors as u32;
    cell.verified = text
        .lines()
        .find_map(|l| l.strip_prefix("Verify: "))
        .is_some_and(|l| l.contains(" blocks checked, 0 mismatched") && !l.starts_with("0 "));
    cell.report(1);
}

/// Reset under load on the real device: `Controller::reset` while a polled queue pair,
/// blocking calls and a `BlockFile` have reads going (the scenario: `reset_scenario`). Each
/// request ends exactly once (its data verified, or failed by the reset), and each client goes
/// on on new queue pairs.
#[test]
#[ignore = "runs in the HIL fault scenario only: tests/hil/run --faults"]
fn reset_under_load() {
    let _w = test_watchdog::arm(test_watchdog::STRESS);
    let dev = device();
    let c = &dev.ctrl;
    let ns = first_namespace(c);
    let bs = ns.block_size() as usize;
    let mut q = qpair::<()>(c);
    prefill(&mut q, c, &ns, BASE, reset_scenario::REGION_BLOCKS, 66);
    drop(q);
    let tallies = reset_scenario::reset_under_load(c, &ns, BASE, 66);
    for t in tallies {
        if let Some(p) = &t.problem {
            println!("reset {}: {p}", t.column);
        }
        if t.column == "async" {
            assert!(t.failed >= 8, "the batch held across the reset: {t:?}");
        }
        let cell = Cell {
            row: "reset",
            column: t.column,
            issued: t.issued,
            once: t.once,
            lost: t.lost,
            double: t.double,
            failed: t.failed,
            verified: t.verified,
        };
        cell.report_any();
    }
    // The controller after the reset, from a new handle's view: a fresh queue pair reads.
    let mut q = qpair::<()>(c);
    assert!(reads_back(
        &mut q,
        c,
        &ns,
        BASE,
        &pattern(reset_scenario::REGION_BLOCKS as usize * bs, 66)
    ));
    drop(q);
    reset_split(c, &ns);
    let addr = dev.pci_addr.clone().unwrap();
    let nsid = ns.nsid().0;
    drop(ns);
    dev.finish();
    perf_reset(&addr, nsid);
}

/// The reset row's perf column: `perf -w verify -q 8 -Q 1 --reset-after-ios 1000` (SPDK's
/// `examples/nvme/reset`: the controller reset under I/O). The I/Os in flight fail with the
/// reset, once each, the queue pairs renew themselves and perf goes on to its `-t`: exit 0,
/// every I/O submitted completed, no verify mismatch.
fn perf_reset(addr: &str, nsid: u32) {
    let out = Command::new("perf")
        .args([
            "-r",
            &format!("trtype:PCIe traddr:{addr} ns:{nsid}"),
            "-q",
            "8",
            "-o",
            "4096",
            "-w",
            "verify",
            "-t",
            "6",
            "-Q",
            "1",
            "--reset-after-ios",
            "1000",
        ])
        .output()
        .expect("perf (the tools are in the guest's PATH)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    println!("{text}{err}");
    assert!(
        out.status.success(),
        "perf --reset-after-ios failed:\n{text}\n{err}"
    );
    assert!(
        err.contains("perf: the controller was reset once, under I/O"),
        "perf: no reset:\n{err}"
    );
    let counts: Vec<u64> = err
        .lines()
        .find_map(|l| l.strip_prefix("I/O counts: "))
        .map(|l| {
            l.split(|c: char| !c.is_ascii_digit())
                .filter(|n| !n.is_empty())
                .map(|n| n.parse::<u64>().unwrap())
                .collect()
        })
        .unwrap_or_default();
    // No I/O counts line: no I/O was in flight at the reset (none failed).
    let [submitted, completed, errors, never] = counts[..] else {
        panic!("perf did not print its I/O counts (no I/O failed by the reset?):\n{text}\n{err}");
    };
    let logged = err
        .lines()
        .filter(|l| l.contains("the controller was reset; create a new queue pair"))
        .count() as u64;
    assert_eq!(logged, errors, "perf: every error is the reset's:\n{err}");
    let mut cell = Cell::new("reset", "perf");
    cell.issued = submitted as u32;
    cell.once = completed as u32;
    cell.lost = never as u32;
    cell.failed = errors as u32;
    cell.verified = text
        .lines()
        .find_map(|l| l.strip_prefix("Verify: "))
        .is_some_and(|l| l.contains(" blocks checked, 0 mismatched") && !l.starts_with("0 "));
    cell.report_any();
}

/// Whether `e` is the reset's failure of a request.
fn is_reset(e: &IoError) -> bool {
    matches!(
        e,
        IoError::Aborted {
            reason: dioxide::DeadReason::ControllerReset,
            ..
        }
    )
}

/// Reset under load, split over MDTS: two reads of 4 x MDTS (4 commands each) on two queue
/// pairs, one rung just before `Controller::reset` (its commands in the device, or done, when
/// the reset runs) and one accepted but not rung (its commands still in the submission queue:
/// it must fail with the reset). Each ends exactly once, with its data or `ControllerReset`;
/// each queue pair is then renewed and reads the same region again, data verified.
fn reset_split(c: &Controller, ns: &Namespace) {
    let mut cell = Cell::new("reset", "split-mdts");
    let bs = ns.block_size() as u64;
    let mdts_blocks = c.max_transfer() as u64 / bs;
    let blocks = 4 * mdts_blocks;
    assert!(ns.blocks() > BASE + blocks, "namespace too small");
    let len = (blocks * bs) as usize;
    let seed = 68;
    let mut q = qpair::<()>(c);
    prefill(&mut q, c, ns, BASE, blocks, seed);
    drop(q);
    let want = pattern(len, seed);
    let mut qs: Vec<QueuePair<(DmaBuffer, u64)>> = (0..2).map(|_| qpair(c)).collect();
    for (i, q) in qs.iter_mut().enumerate() {
        let b = c.alloc(len).unwrap();
        if let Err(r) = q.read(ns, Lba(BASE), (b, i as u64)) {
            panic!("reset split: request {i} refused: {}", r.error);
        }
    }
    qs[0].ring();
    c.reset()
        .expect("Controller::reset with a split read in flight");
    let mut counts = [0u32; 4];
    let mut data_ok = true;
    let mut reset_failed = [false; 2];
    for (i, q) in qs.iter_mut().enumerate() {
        let deadline = std::time::Instant::now() + LIMIT;
        let mut on = |(b, t): (DmaBuffer, u64), r: dioxide::IoResult| {
            counts[t as usize] += 1;
            match r {
                Ok(_) => data_ok &= b.as_slice() == &want[..],
                Err(e) if is_reset(&e) => {
                    reset_failed[t as usize % 2] = true;
                    cell.failed += 1;
                }
                Err(e) => panic!("reset split: request {t}: {e}"),
            }
        };
        while (q.outstanding() > 0 || q.is_stale()) && std::time::Instant::now() < deadline {
            match q.renew() {
                Ok(_) => {}
                Err(Error::NotReady { .. }) => {}
                Err(e) => panic!("reset split: renewing queue pair {i}: {e}"),
            }
            match q.poll(usize::MAX, &mut on) {
                Ok(_) => {}
                Err(Error::QueueDead {
                    reason: dioxide::DeadReason::ControllerReset,
                    ..
                }) => {}
                Err(e) => panic!("reset split: poll of queue pair {i}: {e}"),
            }
        }
        assert!(
            !q.is_stale() && q.outstanding() == 0,
            "reset split: queue pair {i} not renewed in time ({} outstanding)",
            q.outstanding()
        );
        // The renewed queue pair reads the region again.
        let b = c.alloc(len).unwrap();
        if let Err(r) = q.read(ns, Lba(BASE), (b, 2 + i as u64)) {
            panic!(
                "reset split: the read again on queue pair {i} refused: {}",
                r.error
            );
        }
        q.ring();
        let deadline = std::time::Instant::now() + LIMIT;
        while q.outstanding() > 0 && std::time::Instant::now() < deadline {
            q.poll(usize::MAX, |(b, t), r| {
                counts[t as usize] += 1;
                match r {
                    Ok(_) => data_ok &= b.as_slice() == &want[..],
                    Err(e) => panic!("reset split: the read again ({t}): {e}"),
                }
            })
            .expect("poll after the reset");
        }
    }
    assert!(
        reset_failed[1],
        "reset split: the request held in the submission queue was not failed by the reset"
    );
    drop(qs);
    cell.completions(&counts);
    cell.verified = data_ok;
    cell.report_any();
}

/// Asks the host to set QEMU's SMART critical warning bits (`qom-set` on the controller,
/// `nvme0`): each bit that changes raises a SMART / health asynchronous event.
fn smart_warning(bits: u8) {
    host(&format!(
        r#"qmp {{"execute": "qom-set", "arguments": {{"path": "/machine/peripheral/nvme0", "property": "smart_critical_warning", "value": {bits}}}}}"#
    ));
}

/// Polls `take` until it has returned `n` events or `LIMIT` passed, then once more (a
/// duplicate would show there).
fn events(n: usize, mut take: impl FnMut() -> Vec<AsyncEvent>) -> Vec<AsyncEvent> {
    let mut got = Vec::new();
    let deadline = std::time::Instant::now() + LIMIT;
    while got.len() < n && std::time::Instant::now() < deadline {
        got.extend(take());
        std::thread::sleep(Duration::from_millis(1));
    }
    got.extend(take());
    got
}

/// Asynchronous events on the real device: QEMU raises a SMART critical warning (temperature,
/// then reliability) while Asynchronous Event Requests are outstanding. Each event is decoded
/// and offered exactly once (through `Controller::async_events`, then the embedding API's
/// `Dioxide::async_events`), and the request is re-armed: the second event arrives only
/// because the first one's request was submitted again and its log page read (QEMU masks SMART
/// events until then).
#[test]
#[ignore = "runs in the HIL fault scenario only: tests/hil/run --faults"]
fn smart_warning_raises_an_async_event() {
    let _w = test_watchdog::arm(test_watchdog::STRESS);
    let dev = device();
    let c = &dev.ctrl;
    let outstanding = c.async_event_requests();
    assert!(
        outstanding >= 1,
        "no Asynchronous Event Request outstanding"
    );
    assert_eq!(
        c.async_events().expect("async events"),
        vec![],
        "an event out of nowhere"
    );

    // Temperature (warning bit 1): "temperature threshold crossed".
    let mut cell = Cell::new("async-event", "controller");
    smart_warning(0b010);
    let got = events(1, || c.async_events().expect("async events"));
    println!("events: {got:?}");
    cell.completions(&[got.len() as u32]);
    let want = AsyncEvent {
        kind: AsyncEventType::SmartHealth,
        info: 1,
        log_page: 2,
    };
    assert!(got.iter().all(|e| *e == want), "{got:?}");
    let smart = c.smart_log().expect("SMART log");
    cell.verified = c.async_event_requests() == outstanding && smart.critical_warning == 0b010;
    cell.report(0);

    // Reliability (bit 2, added): through the embedding API, after the re-arm.
    let mut cell = Cell::new("async-event", "embed");
    let dx = Dioxide::builder()
        .controller(c.clone())
        .pollers([None])
        .build()
        .expect("Dioxide");
    smart_warning(0b110);
    let got: Vec<AsyncEvent> = events(1, || {
        dx.async_events().into_iter().map(|(_, e)| e).collect()
    });
    println!("events: {got:?}");
    cell.completions(&[got.len() as u32]);
    let want = AsyncEvent {
        kind: AsyncEventType::SmartHealth,
        info: 0,
        log_page: 2,
    };
    assert!(got.iter().all(|e| *e == want), "{got:?}");
    dx.shutdown();
    let smart = c.smart_log().expect("SMART log");
    cell.verified = c.async_event_requests() == outstanding && smart.critical_warning == 0b110;
    cell.report(0);
    // As it was (the changed bits raise events again; this controller is closed next).
    smart_warning(0);
    dev.finish();
}

// ------------------------------------------------------------------------------ hot-unplug

/// Where the hot-unplug row's clients write (namespace 1, in blocks of 512 bytes; each client
/// has its own region, far from the other rows').
const UNPLUG_SYNC: u64 = 8192;
const UNPLUG_ASYNC: u64 = 16384;
const UNPLUG_SPLIT: u64 = 32768;
const UNPLUG_FILE: u64 = 65536;
/// The `BlockFile`'s extent, in blocks.
const UNPLUG_FILE_BLOCKS: u64 = 16384;
/// The qdev id and root port of the scenario's controller (`tests/hil/run`).
const CTRL_ID: &str = "nvme0";
/// A new controller whose one namespace is the drive `ns1` (the `nvme` device's own `drive=`).
/// `share-rw=on`: QEMU keeps the removed controller's `nvme-ns1` device, and with it its claim
/// on the drive, after the controller is gone.
const PLUG: &str = "plug nvme id=nvme0 bus=rp0 serial=deadbeef drive=ns1 share-rw=on";
/// The guest's copy of the binding script (`tests/hil/guest/init` runs it at boot).
const SETUP_SCRIPT: &str = "/hil/hugepage-setup.sh";

/// Fills `buf` (whole blocks of `bs` bytes starting at `lba`) with the pattern of write `stamp`:
/// each block's bytes depend on the stamp and its LBA, so a block read back names its writer.
fn stamp_blocks(buf: &mut [u8], stamp: u64, lba: u64, bs: usize) {
    for (i, b) in buf.chunks_mut(bs).enumerate() {
        fill(b, stamp.wrapping_mul(0x1_0000_0001) ^ (lba + i as u64));
    }
}

/// One place a client writes again and again: what it must hold after the removal.
#[derive(Clone, Debug, Default)]
struct Slot {
    lba: u64,
    blocks: u64,
    /// The stamp of the last write that completed successfully.
    ok: Option<u64>,
    /// Stamps of writes after it that failed with "device removed": each may or may not have
    /// reached the medium, block by block.
    maybe: Vec<u64>,
}

impl Slot {
    fn done(&mut self, stamp: u64) {
        self.ok = Some(stamp);
        self.maybe.clear();
    }
}

/// What one client of the hot-unplug row saw.
#[derive(Default)]
struct Client {
    /// Completions per request (index: request number).
    counts: Vec<u32>,
    failed: u32,
    /// Reads that completed with data other than what the client had just written.
    bad_reads: u32,
    /// Anything other than success or "device removed".
    unexpected: Vec<String>,
    slots: Vec<Slot>,
}

impl Client {
    /// A request ended: `Ok`, or an error that must say the device was removed.
    fn ended(&mut self, id: usize, r: Result<(), String>) -> bool {
        self.counts[id] += 1;
        self.outcome(r)
    }
    /// Classifies a request's result (its completions are counted elsewhere).
    fn outcome(&mut self, r: Result<(), String>) -> bool {
        match r {
            Ok(()) => true,
            Err(e) if e.contains("removed") => {
                self.failed += 1;
                false
            }
            Err(e) => {
                self.unexpected.push(e);
                false
            }
        }
    }
    fn issue(&mut self) -> usize {
        self.counts.push(0);
        self.counts.len() - 1
    }
    fn cell(&self, column: &'static str, verified: bool) -> Cell {
        let mut c = Cell::new("hot-unplug", column);
        c.completions(&self.counts);
        c.failed = self.failed;
        c.verified = verified && self.bad_reads == 0 && self.slots.iter().any(|s| s.ok.is_some());
        c
    }
}

/// How the clients learn to stop when the test itself fails (never in a passing run: they stop
/// at their first "device removed").
struct Run {
    /// Rounds (a write and its read back) done, per client.
    progress: [AtomicU32; 4],
    abandon: std::sync::atomic::AtomicBool,
    stamps: std::sync::atomic::AtomicU64,
}

impl Run {
    fn stamp(&self) -> u64 {
        self.stamps.fetch_add(1, Ordering::Relaxed)
    }
    fn go_on(&self, c: &mut Client) -> bool {
        if self.abandon.load(Ordering::Relaxed) {
            c.unexpected
                .push("abandoned: the device was not removed in time".into());
            return false;
        }
        true
    }
}

/// Blocking calls of `len` bytes over `slots` places from `base`: write, then read back.
fn blocking_client(
    ctrl: Controller,
    ns: Namespace,
    (base, len, slots): (u64, usize, u64),
    run: &Run,
    who: usize,
) -> Client {
    let bs = ns.block_size() as usize;
    let blocks = (len / bs) as u64;
    let mut c = Client {
        slots: (0..slots)
            .map(|i| Slot {
                lba: base + i * blocks,
                blocks,
                ..Slot::default()
            })
            .collect(),
        ..Client::default()
    };
    let mut q = qpair::<()>(&ctrl);
    let mut w = ctrl.alloc(len).unwrap();
    let mut r = ctrl.alloc(len).unwrap();
    for i in 0.. {
        if !run.go_on(&mut c) {
            break;
        }
        let k = i % slots as usize;
        let (lba, stamp) = (c.slots[k].lba, run.stamp());
        stamp_blocks(w.as_mut_slice(), stamp, lba, bs);
        let id = c.issue();
        let res = q.write_blocking(&ns, Lba(lba), w.as_slice());
        if !c.ended(id, res.map(drop).map_err(|e| e.to_string())) {
            c.slots[k].maybe.push(stamp);
            break;
        }
        c.slots[k].done(stamp);
        let id = c.issue();
        let res = q.read_blocking(&ns, Lba(lba), r.as_mut_slice());
        if !c.ended(id, res.map(drop).map_err(|e| e.to_string())) {
            break;
        }
        c.bad_reads += (r.as_slice() != w.as_slice()) as u32;
        run.progress[who].fetch_add(1, Ordering::Relaxed);
    }
    c
}

/// Batches of 16 single-page requests (writes, then reads of the same pages), rung once and
/// polled together until every one ended; then a few more polls to catch a second delivery.
fn async_client(ctrl: Controller, ns: Namespace, run: &Run, who: usize) -> Client {
    const N: usize = 16;
    let bs = ns.block_size() as usize;
    let page = 4096.max(bs);
    let blocks = (page / bs) as u64;
    let mut c = Client {
        slots: (0..N as u64)
            .map(|i| Slot {
                lba: UNPLUG_ASYNC + i * blocks,
                blocks,
                ..Slot::default()
            })
            .collect(),
        ..Client::default()
    };
    let mut q = qpair::<u64>(&ctrl);
    let mut w = ctrl.alloc(N * page).unwrap();
    let r = ctrl.alloc(N * page).unwrap();
    let mut ended = std::collections::HashMap::new();
    'run: loop {
        for write in [true, false] {
            if !run.go_on(&mut c) {
                break 'run;
            }
            let mut ids = Vec::with_capacity(N);
            let mut stamps = Vec::with_capacity(N);
            for k in 0..N {
                let stamp = run.stamp();
                stamps.push(stamp);
                if write {
                    let lba = c.slots[k].lba;
                    stamp_blocks(&mut w.as_mut_slice()[k * page..][..page], stamp, lba, bs);
                }
            }
            for k in 0..N {
                let id = c.issue();
                ids.push(id);
                let lba = Lba(c.slots[k].lba);
                let buf = if write { &w } else { &r };
                let s = buf.slice(k * page, page).unwrap();
                // SAFETY: the buffers outlive the queue pair (dropped after it, below) and are
                // not touched while a command holds them: the batch is waited for before the
                // next one fills `w` or reads `r`.
                let sub = unsafe {
                    if write {
                        q.write_raw(&ns, lba, s, id as u64)
                    } else {
                        q.read_raw(&ns, lba, s, id as u64)
                    }
                };
                if let Err(rej) = sub {
                    // Refused at the call: it ended there, once.
                    c.counts[id] += 1;
                    ended.insert(id, Err(rej.error.to_string()));
                }
            }
            q.ring();
            let until = std::time::Instant::now() + LIMIT;
            while ids.iter().any(|i| !ended.contains_key(i)) && std::time::Instant::now() < until {
                let counts = &mut c.counts;
                let _ = q.poll(usize::MAX, |t, res| {
                    counts[t as usize] += 1;
                    ended
                        .entry(t as usize)
                        .or_insert(res.map(drop).map_err(|e| e.to_string()));
                });
            }
            let mut stop = false;
            for (k, &id) in ids.iter().enumerate() {
                let Some(res) = ended.remove(&id) else {
                    stop = true; // lost: 0 completions
                    continue;
                };
                let ok = c.outcome(res);
                if write {
                    if ok {
                        c.slots[k].done(stamps[k]);
                    } else {
                        c.slots[k].maybe.push(stamps[k]);
                    }
                } else if ok {
                    let got = &r.as_slice()[k * page..][..page];
                    c.bad_reads += (got != &w.as_slice()[k * page..][..page]) as u32;
                }
                stop |= !ok;
            }
            if stop {
                break 'run;
            }
            if !write {
                run.progress[who].fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    // Late or second deliveries: the queue is dead, nothing may come any more.
    for _ in 0..4 {
        let counts = &mut c.counts;
        let _ = q.poll(usize::MAX, |t, _| counts[t as usize] += 1);
    }
    drop(q);
    c
}

/// The embedding API: page writes then reads through `BlockFile::submit` (DMA buffers, the
/// direct path), each callback counted; a request refused at submission ends there, once.
fn file_client(
    file: dioxide::BlockFile,
    bs: usize,
    run: &Run,
    who: usize,
) -> (Client, std::sync::mpsc::Receiver<Callback>) {
    const SLOTS: u64 = 32;
    let page = 4096usize;
    let blocks = (page / bs) as u64;
    let mut c = Client {
        slots: (0..SLOTS)
            .map(|i| Slot {
                lba: UNPLUG_FILE + i * blocks,
                blocks,
                ..Slot::default()
            })
            .collect(),
        ..Client::default()
    };
    let (tx, rx) = channel::<Callback>();
    'run: for i in 0.. {
        let k = i % SLOTS as usize;
        let off = k as u64 * page as u64;
        let stamp = run.stamp();
        let mut want = vec![0u8; page];
        stamp_blocks(&mut want, stamp, c.slots[k].lba, bs);
        for write in [true, false] {
            if !run.go_on(&mut c) {
                break 'run;
            }
            let mut buf = file.alloc(page).unwrap();
            if write {
                buf.as_mut_slice().copy_from_slice(&want);
            }
            let id = c.issue();
            let req = if write {
                Request::write(off, buf)
            } else {
                Request::read(off, buf)
            };
            let t = tx.clone();
            let sub = file.submit(req, move |done| {
                let data = (!write).then(|| done.buf.as_slice().to_vec());
                let _ = t.send((id, done.result.map(drop).map_err(|e| e.to_string()), data));
            });
            let (res, data) = match sub {
                Err(refused) => (Err(refused.error.to_string()), None),
                Ok(()) => loop {
                    match rx.recv_timeout(LIMIT) {
                        Ok((got, res, data)) if got == id => break (res, data),
                        // A second callback of an earlier request.
                        Ok((got, _, _)) => c.counts[got] += 1,
                        Err(_) => break 'run, // lost: 0 completions
                    }
                },
            };
            let ok = c.ended(id, res);
            if write {
                if ok {
                    c.slots[k].done(stamp);
                } else {
                    c.slots[k].maybe.push(stamp);
                }
            } else if ok {
                c.bad_reads += (data.as_deref() != Some(&want[..])) as u32;
            }
            if !ok {
                break 'run;
            }
        }
        run.progress[who].fetch_add(1, Ordering::Relaxed);
    }
    // Callbacks that come later (a second one for a request) are counted by the caller once
    // the Dioxide instance is gone.
    (c, rx)
}

/// What a `BlockFile` callback reports: request number, result, the data of a read.
type Callback = (usize, Result<(), String>, Option<Vec<u8>>);

/// Reads every slot a client wrote on the (new) controller: each block holds the last
/// successful write's data, or that of a later write that failed with "device removed".
fn slots_verified(
    q: &mut QueuePair<()>,
    ctrl: &Controller,
    ns: &Namespace,
    slots: &[Slot],
) -> bool {
    let bs = ns.block_size() as usize;
    let mut good = true;
    for s in slots {
        let Some(ok) = s.ok else { continue };
        let len = s.blocks as usize * bs;
        let mut r = ctrl.alloc(len).unwrap();
        q.read_blocking(ns, Lba(s.lba), r.as_mut_slice())
            .expect("read back on the new controller");
        for (i, got) in r.as_slice().chunks(bs).enumerate() {
            let lba = s.lba + i as u64;
            let matches = |stamp: u64| {
                let mut want = vec![0u8; bs];
                stamp_blocks(&mut want, stamp, lba, bs);
                want == got
            };
            if !matches(ok) && !s.maybe.iter().any(|&m| matches(m)) {
                eprintln!(
                    "hot-unplug: LBA {lba} holds neither write {ok} (completed) nor any of {:?} \
                     (failed with the removal)",
                    s.maybe
                );
                good = false;
            }
        }
    }
    good
}

/// After `plug`: waits for the new controller at `addr` and binds it to vfio-pci with
/// hugepage-setup.sh, as the guest does at boot (the hugepage reservation kept as it is).
fn rebind(addr: &str) {
    let dev = format!("/sys/bus/pci/devices/{addr}");
    let until = std::time::Instant::now() + Duration::from_secs(60);
    while std::fs::read_to_string(format!("{dev}/class"))
        .ok()
        .as_deref()
        .map(str::trim)
        != Some("0x010802")
    {
        assert!(
            std::time::Instant::now() < until,
            "{addr}: no NVMe controller 60 s after the host plugged one (pciehp?)"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let field = |name: &str| -> u64 {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let mb = field("HugePages_Total:") * field("Hugepagesize:") / 1024;
    let out = Command::new("sh")
        .arg(SETUP_SCRIPT)
        .arg("config")
        .env("HUGEMEM", mb.max(2).to_string())
        .env("PCI_ALLOWED", addr)
        .output()
        .unwrap_or_else(|e| panic!("{SETUP_SCRIPT}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(
        out.status.success(),
        "hugepage-setup.sh config failed:\n{text}"
    );
    let driver = std::fs::read_link(format!("{dev}/driver")).unwrap_or_default();
    assert!(
        driver.ends_with("vfio-pci"),
        "{addr} is on {driver:?} after hugepage-setup.sh config:\n{text}"
    );
}

/// Waits (bounded) for every client thread; a client that does not end is a hang.
fn join_all<T>(handles: Vec<(&'static str, std::thread::ScopedJoinHandle<'_, T>)>) -> Vec<T> {
    let until = std::time::Instant::now() + LIMIT;
    while handles.iter().any(|(_, h)| !h.is_finished()) {
        let hung: Vec<_> = handles
            .iter()
            .filter(|(_, h)| !h.is_finished())
            .map(|(n, _)| *n)
            .collect();
        assert!(
            std::time::Instant::now() < until,
            "clients still running {LIMIT:?} after the device was removed: {hung:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    handles
        .into_iter()
        .map(|(n, h)| h.join().unwrap_or_else(|_| panic!("client {n} panicked")))
        .collect()
}

/// The hot-unplug row: sync, async, split-over-MDTS and `BlockFile` clients run at once; the
/// host removes the controller (`device_del` on its PCIe root port) in the middle. The guest
/// kernel asks for the device back (vfio-pci's request), Dioxide fails every request once with
/// "device removed" and lets the device go, so the removal completes (the host's ack is QEMU's
/// DEVICE_DELETED). The host plugs a new controller on the same drive; hugepage-setup.sh binds
/// it; a new `Controller` reads back what the clients wrote. Then `perf -Q` runs while the
/// device is removed again; on the controller plugged next, idle, once more (its removal watch
/// lets the device go with no I/O running); and the controller is plugged again for what
/// follows.
#[test]
#[ignore = "runs in the HIL fault scenario only: tests/hil/run --faults"]
fn unplug_during_io_then_plug_a_new_controller() {
    let dev = device();
    let addr = dev.pci_addr.clone().unwrap();
    let ctrl = dev.ctrl.clone();
    let ns = ctrl.namespace(dioxide::Nsid(1)).unwrap();
    let bs = ns.block_size() as usize;
    let mt = ctrl.max_transfer();
    assert!(
        ns.blocks() >= UNPLUG_FILE + UNPLUG_FILE_BLOCKS,
        "the namespace is too small for the hot-unplug regions"
    );
    assert!(UNPLUG_SYNC + 16 * (4096 / bs as u64) <= UNPLUG_ASYNC);
    assert!(UNPLUG_SPLIT + 4 * (4 * mt / bs) as u64 <= UNPLUG_FILE);
    let dx = Dioxide::builder()
        .controller(ctrl.clone())
        .pollers([None])
        .build()
        .unwrap();
    let file = dx
        .open_file(
            0,
            dioxide::Nsid(1),
            FileOptions::new(UNPLUG_FILE, UNPLUG_FILE_BLOCKS)
                .writable(true)
                .with_len(UNPLUG_FILE_BLOCKS * bs as u64),
        )
        .unwrap();
    let run = Run {
        progress: Default::default(),
        abandon: false.into(),
        stamps: (1u64 << 32).into(),
    };
    let (mut clients, late) = std::thread::scope(|s| {
        let (c1, n1, c2, n2, c3) = (
            ctrl.clone(),
            ns.clone(),
            ctrl.clone(),
            ns.clone(),
            ctrl.clone(),
        );
        let (n3, f, r) = (ns.clone(), file.clone(), &run);
        let handles = vec![
            (
                "sync",
                s.spawn(move || {
                    let region = (UNPLUG_SYNC, 4096.max(bs), 16);
                    (blocking_client(c1, n1, region, r, 0), None)
                }),
            ),
            ("async", s.spawn(move || (async_client(c2, n2, r, 1), None))),
            (
                "split-mdts",
                s.spawn(move || {
                    let region = (UNPLUG_SPLIT, 4 * mt, 4);
                    (blocking_client(c3, n3, region, r, 2), None)
                }),
            ),
            (
                "blockfile",
                s.spawn(move || {
                    let (c, late) = file_client(f, bs, r, 3);
                    (c, Some(late))
                }),
            ),
        ];
        // Every client has written and read back a few times before the host is asked (the
        // removal then lands in the middle of whatever each is doing).
        let rounds = || run.progress.each_ref().map(|p| p.load(Ordering::Relaxed));
        let until = std::time::Instant::now() + Duration::from_secs(60);
        while rounds().iter().any(|&n| n < 3) && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        println!(
            "hot-unplug: rounds done by sync, async, split-mdts, blockfile: {:?}; asking the \
             host to remove {CTRL_ID}",
            rounds()
        );
        let unplugged = std::panic::catch_unwind(|| host(&format!("unplug {CTRL_ID}")));
        if unplugged.is_err() {
            run.abandon.store(true, Ordering::Relaxed);
        }
        let out = join_all(handles);
        if let Err(p) = unplugged {
            std::panic::resume_unwind(p);
        }
        let mut late = None;
        let clients: Vec<Client> = out
            .into_iter()
            .map(|(c, l)| {
                if l.is_some() {
                    late = l;
                }
                c
            })
            .collect();
        (clients, late.unwrap())
    });
    // The appliance API reports the removal too, and nothing hangs on a removed device.
    let mut b = vec![0u8; 4096];
    let e = file.read_at(&mut b, 0).unwrap_err();
    assert!(matches!(e, EmbedError::DeviceRemoved { .. }), "{e}");
    assert!(matches!(ctrl.csts(), Err(Error::DeviceGone { .. })));
    drop(file);
    drop(dx);
    drop(ctrl);
    drop(ns);
    drop(dev); // the VFIO files: released at the removal, closed now
    for (id, _, _) in late.try_iter() {
        clients[3].counts[id] += 1;
    }
    println!(
        "hot-unplug: the process lives on; SIGBUS faults turned into all-ones reads: {}",
        dioxide::vfio::VfioBus::sigbus_caught()
    );

    // A new controller on the same drive, bound as at boot; the data of every completed write.
    host(PLUG);
    rebind(&addr);
    let dev = device();
    let ns = dev.ctrl.namespace(dioxide::Nsid(1)).unwrap();
    let mut q = qpair::<()>(&dev.ctrl);
    let columns = ["sync", "async", "split-mdts", "blockfile"];
    let mut unexpected = Vec::new();
    let mut cells = Vec::new();
    for (c, column) in clients.iter().zip(columns) {
        let verified = slots_verified(&mut q, &dev.ctrl, &ns, &c.slots);
        unexpected.extend(c.unexpected.iter().map(|e| format!("{column}: {e}")));
        cells.push((c.cell(column, verified), c.failed));
    }
    drop(q);
    drop(ns);
    dev.finish();

    // perf -Q on the new controller, removed under it.
    let perf = perf_unplugged(&addr);
    host(PLUG);
    rebind(&addr);
    let dev = device();
    let ns = dev.ctrl.namespace(dioxide::Nsid(1)).unwrap();
    let mut q = qpair::<()>(&dev.ctrl);
    let mut w = dev.ctrl.alloc(4096).unwrap();
    stamp_blocks(w.as_mut_slice(), 7, UNPLUG_SYNC, bs);
    q.write_blocking(&ns, Lba(UNPLUG_SYNC), w.as_slice())
        .unwrap();
    let works = reads_back(&mut q, &dev.ctrl, &ns, UNPLUG_SYNC, w.as_slice());
    drop(q);
    drop(ns);

    // The idle case: the controller open, a queue pair, nobody polling. The host's ack comes
    // only once the kernel completed the removal, which it can only do when this process lets
    // the device go: the controller's removal watch does it with no I/O at all.
    let idle_q = qpair::<()>(&dev.ctrl);
    let t0 = std::time::Instant::now();
    host(&format!("unplug {CTRL_ID}"));
    println!(
        "hot-unplug: an idle controller let its device go; the removal completed in {:?}",
        t0.elapsed()
    );
    assert!(
        matches!(dev.ctrl.csts(), Err(Error::DeviceGone { .. })),
        "the idle controller does not report its removal"
    );
    drop(idle_q);
    drop(dev);
    // Plugged again for what runs after this test.
    host(PLUG);
    rebind(&addr);

    for (cell, failed) in cells {
        assert!(failed >= 1, "{}: no request saw the removal", cell.column);
        cell.report_any();
    }
    let (mut cell, ok) = perf;
    cell.verified &= works;
    cell.report_any();
    assert!(
        ok,
        "perf did not report the removal as it should (output above)"
    );
    assert!(
        unexpected.is_empty(),
        "errors other than \"device removed\": {unexpected:#?}"
    );
}

/// The perf column: `perf -w verify -Q` on the controller; once it runs, the host removes the
/// controller. perf must end by itself, saying "device removed", with its counts: every I/O it
/// submitted completed (with an error after the removal), no verify mismatch before it.
fn perf_unplugged(addr: &str) -> (Cell, bool) {
    use std::io::BufRead as _;
    let mut child = Command::new("perf")
        .args([
            "-r",
            &format!("trtype:PCIe traddr:{addr} ns:1"),
            "-q",
            "8",
            "-o",
            "4096",
            "-w",
            "verify",
            "-t",
            "600",
            "-Q",
            "1000",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("perf (the tools are in the guest's PATH)");
    // Until the workers are launched (the controller open, its queues created): a removal
    // during the open is another case (the open fails), not this one.
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    while !first.contains("Launching workers") {
        let n = stdout.read_line(&mut first).expect("perf's output");
        assert!(n > 0, "perf ended before it launched its workers:\n{first}");
    }
    // perf says nothing while it runs: its workers create their queue pairs and start within
    // milliseconds of that line, so two seconds later it is in the middle of its I/O (the
    // counts it prints show it: issued > 0 is checked).
    std::thread::sleep(Duration::from_secs(2));
    let mut stderr = child.stderr.take().unwrap();
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let out_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    host(&format!("unplug {CTRL_ID}"));
    let until = std::time::Instant::now() + LIMIT;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if std::time::Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            panic!("perf still runs {LIMIT:?} after its device was removed");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = out_thread.join().unwrap();
    let err = err_thread.join().unwrap();
    println!("{first}{text}{err}");
    let counts = err
        .lines()
        .find_map(|l| l.strip_prefix("I/O counts: "))
        .map(|l| {
            l.split(|c: char| !c.is_ascii_digit())
                .filter(|n| !n.is_empty())
                .map(|n| n.parse::<u64>().unwrap())
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    let mut cell = Cell::new("hot-unplug", "perf");
    let ok = !status.success()
        && counts.first().is_some_and(|&n| n > 0)
        && err.contains("device removed")
        && counts.len() == 4
        && !err.contains("panicked");
    if let [submitted, completed, errors, never] = counts[..] {
        cell.issued = submitted as u32;
        cell.once = completed as u32;
        cell.lost = never as u32;
        cell.failed = errors as u32;
    }
    let checked = text
        .lines()
        .find_map(|l| l.strip_prefix("Verify: "))
        .map(|l| l.contains(" blocks checked, 0 mismatched") && !l.starts_with("0 "));
    cell.verified = checked == Some(true);
    (cell, ok)
}
