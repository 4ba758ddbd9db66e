//! The emulated controller's rows of the fault matrix: controller fatal status (CSTS.CFS),
//! garbage completions and surprise removal, each injected mid-run (at the n-th I/O command, by
//! an `emulated::Action::{Fatal, Garbage, SurpriseRemove}` fault) under four ways of doing I/O:
//! blocking calls on a `QueuePair` (`sync`), a batch of queued requests (`async`), requests
//! split over a small MDTS (`split-mdts`) and the embedding API (`blockfile`: asynchronous
//! `BlockFile::submit` writes with a buffered tail, then reads back). The `perf` column is the
//! tools' `tests/fault_matrix.rs` (it needs the perf binary).
//!
//! Every request is counted by how many times it completed (each callback or return counted;
//! a second one is a double completion), after a bounded wait (a blocking call: after it
//! returned, lost if the queue still holds its request, and a completion handed out by the
//! queue afterwards is a second one); then the controller recovers (a
//! reset after CSTS.CFS; after the removal, a new emulated controller on the same backing file,
//! "plugged back") and every block written is read back: a write that succeeded holds its data,
//! one that failed holds its old or its new data, and every read that succeeded returned what
//! was written. Garbage: before the real completion of some commands the device posts an
//! invalid entry (command id 0xFFFF, or the command's own id with another SQ's id); no request
//! may complete with it (its dword 0 is `GARBAGE_DW0`) and none may fail.
//!
//! Each cell prints `MATRIX ROW COLUMN issued=.. once=.. lost=.. double=.. failed=..
//! verified=..` (both emulator modes, inline and threaded, summed) and fails on a loss, a double
//! completion, unverified data, a request failing for another reason than the fault, a hang
//! (the watchdog) or a panic.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dioxide::emulated::{
    Action, EmulatedConfig, EmulatedController, Fault, GARBAGE_DW0, Garbage, Mode, NamespaceConfig,
    Trigger,
};
use dioxide::spec::status::generic;
use dioxide::{
    Controller, DeadReason, Dioxide, DmaBuffer, EmbedError, Error, FileOptions, IoDone, IoError,
    Lba, Namespace, QueueOptions, QueuePair, Request,
};
use dioxide_tests::matrix::Cell;
use dioxide_tests::*;

const BS: usize = 512;
const BLOCKS: u64 = 1 << 14;
/// How long a cell waits for its asynchronous completions.
const LIMIT: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Row {
    Cfs,
    Garbage,
    Remove,
}

impl Row {
    fn name(self) -> &'static str {
        match self {
            Row::Cfs => "csts-cfs:emulated",
            Row::Garbage => "garbage-completion:emulated",
            Row::Remove => "hot-unplug:emulated",
        }
    }
    /// Why the driver fails requests under this fault.
    fn reason(self) -> Option<DeadReason> {
        match self {
            Row::Cfs => Some(DeadReason::ControllerFatal),
            Row::Remove => Some(DeadReason::DeviceGone),
            Row::Garbage => None,
        }
    }
    /// How many requests of a cell may fail.
    fn failed(self) -> std::ops::RangeInclusive<u64> {
        match self {
            Row::Garbage => 0..=0,
            _ => 1..=u64::MAX,
        }
    }
}

/// An emulated controller on a backing file (so a removed device can be "plugged back").
struct Rig {
    row: Row,
    mode: Mode,
    mdts: u8,
    path: PathBuf,
    emu: Arc<EmulatedController>,
    ctrl: Controller,
    ns: Namespace,
    /// Faults fired before the recovery.
    fired: u64,
}

impl Rig {
    fn open(row: Row, column: &str, mode: Mode, mdts: u8) -> Rig {
        let path = std::env::temp_dir().join(format!(
            "dioxide-fault-matrix-{}-{}-{column}-{mode:?}.img",
            std::process::id(),
            row.name().replace(':', "-"),
        ));
        let _ = std::fs::remove_file(&path);
        let (emu, ctrl, ns) = Rig::bring_up(&path, mode, mdts);
        Rig {
            row,
            mode,
            mdts,
            path,
            emu,
            ctrl,
            ns,
            fired: 0,
        }
    }

    fn bring_up(
        path: &Path,
        mode: Mode,
        mdts: u8,
    ) -> (Arc<EmulatedController>, Controller, Namespace) {
        let cfg = EmulatedConfig {
            mode,
            mdts,
            namespaces: vec![NamespaceConfig::file(path, BS as u32, BLOCKS)],
            ..EmulatedConfig::default()
        };
        let (ctrl, emu) = emulated(cfg);
        let ns = first_namespace(&ctrl);
        (emu, ctrl, ns)
    }

    /// Arms the row's fault at the `n`-th I/O command from now.
    fn inject(&self, n: u64) {
        let at = |n| Trigger::NthCommand {
            qid: None,
            opcode: None,
            n,
        };
        match self.row {
            Row::Cfs => {
                self.emu.inject(Fault::once(at(n), Action::Fatal));
            }
            Row::Remove => {
                self.emu.inject(Fault::once(at(n), Action::SurpriseRemove));
            }
            Row::Garbage => {
                // Two commands get an entry for an unknown command id, the next two one with
                // their own command id and another SQ's id.
                let twice = |n, g| Fault {
                    trigger: at(n),
                    action: Action::Garbage(g),
                    times: Some(2),
                };
                self.emu.inject(twice(n, Garbage::UnknownCid));
                self.emu.inject(twice(n + 2, Garbage::WrongSqId));
            }
        }
    }

    /// After the run: the controller usable again, the data still there.
    fn recover(&mut self) {
        self.fired = self.emu.stats().faults_fired;
        let want = if self.row == Row::Garbage { 4 } else { 1 };
        assert_eq!(
            self.fired,
            want,
            "{} {:?}: the fault fired",
            self.row.name(),
            self.mode
        );
        match self.row {
            Row::Garbage => {}
            Row::Cfs => {
                // (The driver has already disabled the controller, CC.EN = 0, to stop its DMA:
                // that cleared CSTS.CFS.)
                self.ctrl.reset().expect("reset after CSTS.CFS");
            }
            Row::Remove => {
                // Plugged back: a new device on the same storage.
                let (emu, ctrl, ns) = Rig::bring_up(&self.path, self.mode, self.mdts);
                (self.emu, self.ctrl, self.ns) = (emu, ctrl, ns);
            }
        }
    }

    /// Reads `len` bytes at block `lba` on a fresh queue pair.
    fn read_back(&self, lba: u64, len: usize) -> Vec<u8> {
        let mut q = self
            .ctrl
            .create_qpair::<()>(QueueOptions::default())
            .expect("queue pair after the recovery");
        let mut b = self.ctrl.alloc(len).unwrap();
        let done = q
            .read_blocking(&self.ns, Lba(lba), b.as_mut_slice())
            .expect("read back after the recovery");
        assert_ne!(done.dw0, GARBAGE_DW0);
        b.as_slice().to_vec()
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// How an asynchronous request ended: not yet, bytes done, or the error's message.
type Outcome = Option<Result<usize, String>>;

/// The data of write `i` of a cell (old data is zeroes: a fresh backing file).
fn new_data(i: u64, len: usize) -> Vec<u8> {
    pattern(len, 1000 + i)
}

/// `got` after a write of `new` over `old` that succeeded for its first `done` bytes: those hold
/// the new data, each byte after them the old or the new.
fn after_write(got: &[u8], old: &[u8], new: &[u8], done: usize) -> bool {
    got.len() == new.len()
        && got[..done] == new[..done]
        && got[done..]
            .iter()
            .zip(&old[done..])
            .zip(&new[done..])
            .all(|((g, o), n)| g == o || g == n)
}

/// A driver error is the row's fault, named.
fn expect_fault(row: Row, what: &str, e: &Error) {
    let reason = match e {
        Error::QueueDead { reason, .. } | Error::Io(IoError::Aborted { reason, .. }) => {
            Some(*reason)
        }
        Error::DeviceGone { .. } => Some(DeadReason::DeviceGone),
        _ => None,
    };
    assert!(
        reason.is_some() && reason == row.reason(),
        "{} {what}: want the fault ({:?}), got: {e}",
        row.name(),
        row.reason()
    );
}

fn expect_io_fault(row: Row, what: &str, e: &IoError) {
    match e {
        IoError::Aborted { reason, .. } if Some(*reason) == row.reason() => {}
        _ => panic!(
            "{} {what}: want the fault ({:?}), got: {e}",
            row.name(),
            row.reason()
        ),
    }
}

fn check_done(row: Row, what: &str, d: IoDone) {
    assert_ne!(
        d.dw0,
        GARBAGE_DW0,
        "{} {what}: a request completed with the invalid entry",
        row.name()
    );
}

/// Runs one blocking call on `q`, which holds no other request, and counts in `cell` what
/// became of its request once the call has returned: not completed (0: lost) if the queue still
/// holds it, else once, plus every completion `q` hands out afterwards (the queue holds no other
/// request: each would be a second completion of this one).
fn blocking(
    cell: &mut Cell,
    q: &mut QueuePair<()>,
    call: impl FnOnce(&mut QueuePair<()>) -> dioxide::Result<IoDone>,
) -> dioxide::Result<IoDone> {
    assert_eq!(q.outstanding(), 0, "a blocking call on an idle queue");
    let r = call(q);
    let mut times = u32::from(q.outstanding() == 0);
    // A dead queue's error here is the fault, already seen by the call.
    let _ = q.poll(usize::MAX, |(), _| times += 1);
    cell.completions(&[times]);
    r
}

/// Blocking calls: write a block, read it back, 24 times; the fault at the 19th command (the
/// 10th write).
fn sync(row: Row, mode: Mode, cell: &mut Cell) -> bool {
    write_read_back(row, mode, cell, "sync", 5, BS, 24, 19)
}

/// One batch of 32 queued requests (16 writes, then 16 reads of blocks written before), rung
/// once and polled together; the fault at the 10th command.
fn batch(row: Row, mode: Mode, cell: &mut Cell) -> bool {
    let mut rig = Rig::open(row, "async", mode, 5);
    let n = 32u64;
    let (first_write, first_read) = (64u64, 0u64);
    {
        let mut q = rig
            .ctrl
            .create_qpair::<()>(QueueOptions::default())
            .unwrap();
        for i in 0..16 {
            let b = rig.ctrl.alloc(BS).unwrap();
            let mut b = b;
            b.as_mut_slice().copy_from_slice(&pattern(BS, 500 + i));
            q.write_blocking(&rig.ns, Lba(first_read + i), b.as_slice())
                .expect("prefill");
        }
    }
    let mut q = rig
        .ctrl
        .create_qpair::<(DmaBuffer, u64)>(QueueOptions::default().with_requests(64))
        .unwrap();
    rig.inject(10);
    for t in 0..n {
        let mut b = rig.ctrl.alloc(BS).unwrap();
        let r = if t < 16 {
            b.as_mut_slice().copy_from_slice(&new_data(t, BS));
            q.write(&rig.ns, Lba(first_write + t), (b, t))
        } else {
            q.read(&rig.ns, Lba(first_read + t - 16), (b, t))
        };
        if let Err(rej) = r {
            panic!("{} async: request {t} refused: {}", row.name(), rej.error);
        }
    }
    q.ring();
    let mut counts = vec![0u32; n as usize];
    let mut written = [false; 16];
    let mut ok = true;
    let mut failed = 0;
    let mut protocol = 0;
    let deadline = Instant::now() + LIMIT;
    while counts.contains(&0) && Instant::now() < deadline {
        let r = q.poll(usize::MAX, |(b, t), r| {
            counts[t as usize] += 1;
            match r {
                Ok(d) => {
                    check_done(row, "async", d);
                    if t < 16 {
                        written[t as usize] = true;
                    } else {
                        ok &= b.as_slice() == pattern(BS, 500 + t - 16);
                    }
                }
                Err(e) => {
                    expect_io_fault(row, "async", &e);
                    failed += 1;
                }
            }
        });
        match r {
            Ok(_) => {}
            Err(Error::QueueDead { reason, .. }) if Some(reason) == row.reason() => {}
            Err(Error::Protocol { .. }) if row == Row::Garbage => protocol += 1,
            Err(e) => panic!("{} async: poll: {e}", row.name()),
        }
    }
    // Anything more would be a second completion.
    let _ = q.poll(usize::MAX, |(_, t), _| counts[t as usize] += 1);
    if row == Row::Garbage {
        assert_eq!(
            q.stats().protocol_errors,
            4,
            "each invalid entry rejected once"
        );
        assert!(protocol >= 1, "the invalid entries were reported");
    }
    cell.completions(&counts);
    cell.failed += failed;
    drop(q);
    rig.recover();
    for t in 0..16u64 {
        let got = rig.read_back(first_write + t, BS);
        let done = if written[t as usize] { BS } else { 0 };
        ok &= after_write(&got, &vec![0; BS], &new_data(t, BS), done);
    }
    ok
}

/// Blocking calls of 64 KiB on a controller whose MDTS is 8 KiB (each split into 8 commands):
/// write then read back, 6 times; the fault at the 36th command (the 4th command of the third
/// write).
fn split(row: Row, mode: Mode, cell: &mut Cell) -> bool {
    write_read_back(row, mode, cell, "split-mdts", 1, 64 << 10, 6, 36)
}

/// The blocking columns: `rounds` times, write `len` bytes and read them back, each call
/// counted by [`blocking`]; the fault at command `fault_at`; then recovery, and every block
/// written read back.
#[allow(clippy::too_many_arguments)]
fn write_read_back(
    row: Row,
    mode: Mode,
    cell: &mut Cell,
    column: &str,
    mdts: u8,
    len: usize,
    rounds: u64,
    fault_at: u64,
) -> bool {
    let mut rig = Rig::open(row, column, mode, mdts);
    assert_eq!(
        rig.ctrl.max_transfer(),
        4096 << mdts,
        "MDTS of the {column} column"
    );
    let blocks = (len / BS) as u64;
    let mut q = rig
        .ctrl
        .create_qpair::<()>(QueueOptions::default())
        .unwrap();
    let mut writes = Vec::new();
    let mut ok = true;
    rig.inject(fault_at);
    for i in 0..rounds {
        let new = new_data(i, len);
        let mut b = rig.ctrl.alloc(len).unwrap();
        b.as_mut_slice().copy_from_slice(&new);
        let w = |q: &mut QueuePair<()>| q.write_blocking(&rig.ns, Lba(i * blocks), b.as_slice());
        match blocking(cell, &mut q, w) {
            Ok(d) => {
                check_done(row, &format!("{column} write"), d);
                writes.push((i, len));
            }
            Err(e) => {
                expect_fault(row, &format!("{column} write"), &e);
                cell.failed += 1;
                writes.push((i, 0));
                break;
            }
        }
        let mut r = rig.ctrl.alloc(len).unwrap();
        let rd =
            |q: &mut QueuePair<()>| q.read_blocking(&rig.ns, Lba(i * blocks), r.as_mut_slice());
        match blocking(cell, &mut q, rd) {
            Ok(d) => {
                check_done(row, &format!("{column} read"), d);
                ok &= r.as_slice() == new;
            }
            Err(e) => {
                expect_fault(row, &format!("{column} read"), &e);
                cell.failed += 1;
                break;
            }
        }
    }
    if row == Row::Garbage {
        assert_eq!(
            q.stats().protocol_errors,
            4,
            "each invalid entry rejected once"
        );
    }
    drop(q);
    rig.recover();
    for (i, done) in writes {
        let got = rig.read_back(i * blocks, len);
        ok &= after_write(&got, &vec![0; len], &new_data(i, len), done);
    }
    ok
}

/// The embedding API: 8 asynchronous writes of 3 pages and 100 bytes (the tail through the
/// page cache), each callback counted; the fault at the 12th command; then every region read
/// back through a `BlockFile` (after the recovery: the same one after a reset, a new one on
/// the device plugged back).
fn blockfile(row: Row, mode: Mode, cell: &mut Cell) -> bool {
    let mut rig = Rig::open(row, "blockfile", mode, 5);
    let len = 3 * 4096 + 100;
    let stride = 4 * 4096u64;
    let n = 8u64;
    let dx = Dioxide::builder()
        .controller(rig.ctrl.clone())
        .pollers([None])
        .build()
        .expect("Dioxide");
    let opts = || {
        FileOptions::new(0, BLOCKS)
            .writable(true)
            .with_len(BLOCKS * BS as u64)
    };
    let file = dx.open_file(0, rig.ns.nsid(), opts()).expect("file");
    let calls: Arc<Vec<AtomicU32>> = Arc::new((0..n).map(|_| AtomicU32::new(0)).collect());
    let results: Arc<Mutex<Vec<Outcome>>> = Arc::new(Mutex::new(vec![None; n as usize]));
    // An error is the fault's when it says so: CSTS.CFS fails the requests in flight as
    // aborted (the queue's deletion), the removal as "device removed".
    let outcome = move |r: Result<usize, EmbedError>| match r {
        Ok(b) => Ok(b),
        Err(e) => {
            let ours = match (&e, row) {
                (EmbedError::Device { status, .. }, Row::Cfs) => {
                    (status.sct, status.sc) == (0, generic::ABORTED_SQ_DELETION)
                }
                (EmbedError::DeviceRemoved { .. }, Row::Remove) => true,
                _ => false,
            };
            assert!(ours, "{} blockfile: {e}", row.name());
            Err(e.to_string())
        }
    };
    rig.inject(12);
    for i in 0..n {
        let mut b = file.alloc(len).unwrap();
        b.as_mut_slice().copy_from_slice(&new_data(i, len));
        let (c, r) = (calls.clone(), results.clone());
        let sub = file.submit(Request::write(i * stride, b), move |done| {
            c[i as usize].fetch_add(1, Ordering::SeqCst);
            r.lock().unwrap()[i as usize] = Some(outcome(done.result));
        });
        if let Err(refused) = sub {
            // Refused at submission (the device already gone): answered once, here.
            calls[i as usize].fetch_add(1, Ordering::SeqCst);
            results.lock().unwrap()[i as usize] = Some(outcome(Err(refused.error)));
        }
    }
    let deadline = Instant::now() + LIMIT;
    while calls.iter().any(|c| c.load(Ordering::SeqCst) == 0) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    // Anything more would be a second completion.
    std::thread::sleep(Duration::from_millis(20));
    let counts: Vec<u32> = calls.iter().map(|c| c.load(Ordering::SeqCst)).collect();
    cell.completions(&counts);
    let results: Vec<_> = results.lock().unwrap().clone();
    let mut done = Vec::new();
    for (i, r) in results.iter().enumerate() {
        match r {
            Some(Ok(b)) if *b == len => done.push(len),
            Some(Ok(b)) => {
                // A buffered tail that failed: the direct bytes are reported done.
                assert!(
                    row != Row::Garbage,
                    "{} blockfile: write {i}: {b} bytes",
                    row.name()
                );
                cell.failed += 1;
                done.push(*b);
            }
            Some(Err(_)) => {
                cell.failed += 1;
                done.push(0);
            }
            None => done.push(0),
        }
    }
    let (dx, file) = if row == Row::Remove {
        drop(file);
        dx.shutdown();
        rig.recover();
        let dx = Dioxide::builder()
            .controller(rig.ctrl.clone())
            .pollers([None])
            .build()
            .expect("Dioxide on the device plugged back");
        let file = dx.open_file(0, rig.ns.nsid(), opts()).expect("file");
        (dx, file)
    } else {
        rig.recover();
        (dx, file)
    };
    let mut ok = true;
    for (i, d) in done.iter().enumerate() {
        let mut got = vec![0u8; len];
        let n = file
            .read_at(&mut got, i as u64 * stride)
            .expect("read back after the recovery");
        ok &= n == len && after_write(&got, &vec![0; len], &new_data(i as u64, len), *d);
    }
    drop(file);
    dx.shutdown();
    // The device itself holds what the file said.
    for (i, d) in done.iter().enumerate() {
        let got = rig.read_back(i as u64 * stride / BS as u64, len.div_ceil(BS) * BS);
        ok &= after_write(&got[..len], &vec![0; len], &new_data(i as u64, len), *d);
    }
    ok
}

fn row(row: Row) {
    type Column = fn(Row, Mode, &mut Cell) -> bool;
    let columns: [(&'static str, Column); 4] = [
        ("sync", sync),
        ("async", batch),
        ("split-mdts", split),
        ("blockfile", blockfile),
    ];
    for (name, f) in columns {
        let mut cell = Cell::new(row.name(), name);
        let mut verified = true;
        for mode in MODES {
            verified &= f(row, mode, &mut cell);
        }
        cell.verified = verified;
        cell.report(row.failed());
    }
}

#[test]
fn csts_cfs_mid_run() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    emulator_only(
        "fault_matrix::csts_cfs_mid_run",
        "CSTS.CFS is injected into the emulated controller",
    );
    row(Row::Cfs);
}

#[test]
fn garbage_completions_mid_run() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    emulator_only(
        "fault_matrix::garbage_completions_mid_run",
        "invalid completion entries are injected by the emulated controller",
    );
    row(Row::Garbage);
}

#[test]
fn surprise_removal_mid_run() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    emulator_only(
        "fault_matrix::surprise_removal_mid_run",
        "the removal is injected into the emulated controller",
    );
    row(Row::Remove);
}
