//! The `perf` column of the emulated controller's fault matrix (the other columns are
//! `tests/tests/fault_matrix.rs`): the perf binary, end to end, on the built-in emulated
//! controller with `--emulated-fault KIND:100` (CSTS.CFS, invalid completion entries, surprise
//! removal after 100 I/O commands) and `-w verify` (each block written is read back and
//! checked), in both emulator modes. perf must exit with an error naming the fault, print its
//! counts (`perf: emulated fault ...: fired ...; I/Os submitted=.. completed=.. failed=..
//! never-completed=.. double=..`), verify what completed, and neither hang (the watchdog) nor
//! panic.
//!
//! Each row prints `MATRIX ROW perf issued=.. once=.. lost=.. double=.. failed=.. verified=..`
//! (both modes summed), from perf's own counts: each command's tag names its slot and the
//! slot's I/O, so perf counts a completion for an I/O not in flight as a double (and fails on
//! it) instead of taking it for another I/O; I/Os never completed are losses.

use std::process::Command;

use dioxide_tests::matrix::Cell;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The number after `key=` in `line`.
fn field(line: &str, key: &str) -> u64 {
    let at = line
        .find(&format!(" {key}="))
        .unwrap_or_else(|| panic!("no {key}= in: {line}"));
    line[at + key.len() + 2..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{key}= is not a number in: {line}"))
}

/// Runs perf with the fault in both modes; `names`: what its error must say.
fn row(row: &'static str, fault: &str, names: &str, failed: std::ops::RangeInclusive<u64>) {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    let mut cell = Cell::new(row, "perf");
    let mut verified = true;
    for mode in ["inline", "threaded"] {
        let args = format!(
            "-q 8 -o 4096 -w verify -t 10 --emulated-mode {mode} --emulated-size 16m \
             --emulated-fault {fault}:100"
        );
        let out = test_watchdog::output_within(
            Command::new(env!("CARGO_BIN_EXE_perf")).args(args.split_whitespace()),
            test_watchdog::PROCESS,
        )
        .expect("run perf");
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        let all = format!("{args}\n--- stdout\n{stdout}\n--- stderr\n{stderr}");
        assert!(!stderr.contains("panicked"), "perf panicked: {all}");
        assert_eq!(
            out.status.code(),
            Some(1),
            "perf must fail, not crash: {all}"
        );
        assert!(stderr.contains(names), "the error names the fault: {all}");
        let summary = stderr
            .lines()
            .find(|l| l.starts_with("perf: emulated fault "))
            .unwrap_or_else(|| panic!("no fault summary: {all}"));
        assert!(summary.contains(": fired "), "the fault fired: {all}");
        let (submitted, completed) = (field(summary, "submitted"), field(summary, "completed"));
        let (never, double) = (field(summary, "never-completed"), field(summary, "double"));
        assert_eq!(submitted, completed + never, "perf's counts agree: {all}");
        cell.issued += submitted;
        cell.once += completed;
        cell.lost += never;
        cell.double += double;
        cell.failed += field(summary, "failed");
        // -w verify: every block read back was checked; none may mismatch.
        let v = stdout
            .lines()
            .find(|l| l.starts_with("Verify: "))
            .unwrap_or_else(|| panic!("no verify line: {all}"));
        let checked: u64 = v["Verify: ".len()..]
            .split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("bad verify line: {v}"));
        verified &= checked > 0 && v.ends_with(", 0 mismatched");
    }
    cell.verified = verified;
    cell.report(failed);
}

#[test]
fn perf_ends_clearly_on_csts_cfs() {
    row(
        "csts-cfs:emulated",
        "cfs",
        "controller fatal status (CSTS.CFS)",
        1..=u64::MAX,
    );
}

#[test]
fn perf_ends_clearly_on_garbage_completions() {
    row(
        "garbage-completion:emulated",
        "garbage",
        "invalid completion entries (rejected by the driver",
        0..=0,
    );
}

#[test]
fn perf_ends_clearly_on_surprise_removal() {
    row(
        "hot-unplug:emulated",
        "remove",
        "device removed",
        1..=u64::MAX,
    );
}
