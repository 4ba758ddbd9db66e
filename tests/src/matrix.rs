//! One cell of the emulated controller's fault matrix (`tests/fault_matrix.rs`, and the `perf`
//! column in the tools' `tests/fault_matrix.rs`): requests issued, completed exactly once,
//! lost, doubly completed, failed, data verified. [`Cell::report`] prints the cell's line,
//! `MATRIX ROW COLUMN issued=.. once=.. lost=.. double=.. failed=.. verified=..` (the format of
//! the QEMU guest's fault scenario, without its `HIL:` prefix), and fails the test on a loss,
//! a double completion or unverified data.

use std::io::Write as _;

/// Counts of one (fault, API) pair.
#[derive(Debug)]
pub struct Cell {
    /// The fault (`csts-cfs:emulated`, ...).
    pub row: &'static str,
    /// The API (`sync`, `async`, `split-mdts`, `blockfile`, `perf`).
    pub column: &'static str,
    /// Requests issued.
    pub issued: u64,
    /// Requests whose completion was seen exactly once.
    pub once: u64,
    /// Requests never completed.
    pub lost: u64,
    /// Requests completed more than once.
    pub double: u64,
    /// Requests that completed with an error.
    pub failed: u64,
    /// Completed reads returned the data written (after the recovery, where there is one).
    pub verified: bool,
}

impl Cell {
    /// An empty cell.
    pub fn new(row: &'static str, column: &'static str) -> Cell {
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

    /// Accounts for requests by how many times each completed (0: lost, 1: once, more:
    /// doubly completed).
    pub fn completions(&mut self, counts: &[u32]) {
        self.issued += counts.len() as u64;
        for &c in counts {
            match c {
                0 => self.lost += 1,
                1 => self.once += 1,
                _ => self.double += 1,
            }
        }
    }

    /// The cell's line.
    pub fn line(&self) -> String {
        format!(
            "MATRIX {} {} issued={} once={} lost={} double={} failed={} verified={}",
            self.row,
            self.column,
            self.issued,
            self.once,
            self.lost,
            self.double,
            self.failed,
            if self.verified { "yes" } else { "NO" }
        )
    }

    /// Prints the line (to the process's stdout, past libtest's capture, so every run shows
    /// it) and fails the test on a lost or doubly completed request, a request not completed
    /// exactly once, unverified data, or a number of failed requests outside `failed`.
    pub fn report(self, failed: std::ops::RangeInclusive<u64>) {
        let mut o = std::io::stdout().lock();
        let _ = writeln!(o, "{}", self.line());
        let _ = o.flush();
        drop(o);
        let what = format!("{} {}", self.row, self.column);
        assert_eq!(self.lost, 0, "{what}: requests lost");
        assert_eq!(self.double, 0, "{what}: requests completed twice");
        assert!(self.issued > 0, "{what}: no request issued");
        assert_eq!(self.once, self.issued, "{what}: requests completed once");
        assert!(self.verified, "{what}: data not verified");
        assert!(
            failed.contains(&self.failed),
            "{what}: {} requests failed, want {failed:?}",
            self.failed
        );
    }
}
