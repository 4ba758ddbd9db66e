//! The poll loop's counters, as `perf` reports them: how often the queue pairs polled, how
//! often they found nothing, how often they read the clock (housekeeping) or a device register,
//! and how many doorbells they wrote, in total and per I/O.
//!
//! A doorbell *update* (`sq_doorbells`, `cq_doorbells`: one per batch of submissions; one per
//! half queue of completions consumed, or earlier when the controller needs the room, see
//! `QueueOptions::cq_head_batch`) is a register (MMIO) write without shadow doorbells; with
//! them it is a store to the shadow doorbell page, followed by a register write only when the
//! controller's event index asks for one. `sq_mmio`/`cq_mmio` count the register writes and
//! `sq_shadow`/`cq_shadow` the shadow stores (0 without shadow doorbells).
//!
//! The figures are the driver's own ([`dioxide::QueueStats`], plain per-queue-pair integers),
//! summed over the queue pairs of a namespace on a core and taken over the whole run, warm-up
//! included; the per-I/O ratios divide by the I/Os those same queue pairs completed, so they
//! stay consistent whatever the warm-up.

use dioxide::QueueStats;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;

/// The counters of one device (or of all of them), and the same per I/O.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct PollCounters {
    /// I/Os the queue pairs completed (warm-up included).
    pub ios: u64,
    /// Polls that reached the completion queue.
    pub polls: u64,
    /// Polls that found no completion.
    pub empty_polls: u64,
    /// Housekeeping runs (a clock read each).
    pub housekeeping: u64,
    /// Device register reads (MMIO reads of the BAR, e.g. CSTS).
    pub register_reads: u64,
    /// SQ tail doorbell updates (register or shadow).
    pub sq_doorbells: u64,
    /// CQ head doorbell updates (register or shadow).
    pub cq_doorbells: u64,
    /// SQ tail doorbell register (MMIO) writes.
    #[serde(default)]
    pub sq_mmio: u64,
    /// CQ head doorbell register (MMIO) writes.
    #[serde(default)]
    pub cq_mmio: u64,
    /// SQ tail updates stored in the shadow doorbell page.
    #[serde(default)]
    pub sq_shadow: u64,
    /// CQ head updates stored in the shadow doorbell page.
    #[serde(default)]
    pub cq_shadow: u64,
    /// Interrupt mode: arms that let the worker sleep on a queue's interrupt.
    #[serde(default)]
    pub interrupt_arms: u64,
    /// The counters divided by `ios` (all zero when no I/O completed).
    pub per_io: PerIo,
}

/// [`PollCounters`] per I/O.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct PerIo {
    /// Polls per I/O.
    pub polls: f64,
    /// Empty polls per I/O.
    pub empty_polls: f64,
    /// Housekeeping runs per I/O.
    pub housekeeping: f64,
    /// Register reads per I/O.
    pub register_reads: f64,
    /// SQ doorbell updates per I/O.
    pub sq_doorbells: f64,
    /// CQ doorbell updates per I/O.
    pub cq_doorbells: f64,
    /// SQ doorbell register writes per I/O.
    #[serde(default)]
    pub sq_mmio: f64,
    /// CQ doorbell register writes per I/O.
    #[serde(default)]
    pub cq_mmio: f64,
    /// SQ shadow doorbell updates per I/O.
    #[serde(default)]
    pub sq_shadow: f64,
    /// CQ shadow doorbell updates per I/O.
    #[serde(default)]
    pub cq_shadow: f64,
    /// Interrupt arms (sleeps) per I/O.
    #[serde(default)]
    pub interrupt_arms: f64,
}

impl PollCounters {
    /// The counters of one queue pair.
    pub fn of(s: &QueueStats) -> PollCounters {
        PollCounters {
            ios: s.completed,
            polls: s.polls(),
            empty_polls: s.empty_polls,
            housekeeping: s.housekeeping,
            register_reads: s.register_reads,
            sq_doorbells: s.sq_doorbells,
            cq_doorbells: s.cq_doorbells,
            sq_mmio: s.sq_mmio_writes,
            cq_mmio: s.cq_mmio_writes,
            sq_shadow: s.sq_shadow_updates,
            cq_shadow: s.cq_shadow_updates,
            interrupt_arms: s.interrupt_arms,
            per_io: PerIo::default(),
        }
        .with_ratios()
    }

    /// The sum of `all`, ratios recomputed.
    pub fn sum<'a>(all: impl IntoIterator<Item = &'a PollCounters>) -> PollCounters {
        let mut t = PollCounters::default();
        for c in all {
            t.ios += c.ios;
            t.polls += c.polls;
            t.empty_polls += c.empty_polls;
            t.housekeeping += c.housekeeping;
            t.register_reads += c.register_reads;
            t.sq_doorbells += c.sq_doorbells;
            t.cq_doorbells += c.cq_doorbells;
            t.sq_mmio += c.sq_mmio;
            t.cq_mmio += c.cq_mmio;
            t.sq_shadow += c.sq_shadow;
            t.cq_shadow += c.cq_shadow;
            t.interrupt_arms += c.interrupt_arms;
        }
        t.with_ratios()
    }

    fn with_ratios(mut self) -> PollCounters {
        let per = |n: u64| {
            if self.ios == 0 {
                0.0
            } else {
                n as f64 / self.ios as f64
            }
        };
        self.per_io = PerIo {
            polls: per(self.polls),
            empty_polls: per(self.empty_polls),
            housekeeping: per(self.housekeeping),
            register_reads: per(self.register_reads),
            sq_doorbells: per(self.sq_doorbells),
            cq_doorbells: per(self.cq_doorbells),
            sq_mmio: per(self.sq_mmio),
            cq_mmio: per(self.cq_mmio),
            sq_shadow: per(self.sq_shadow),
            cq_shadow: per(self.cq_shadow),
            interrupt_arms: per(self.interrupt_arms),
        };
        self
    }
}

/// The text report's counters table (with `-L`): one line per device, then the total.
pub fn table(rows: &[(&str, u32, PollCounters)]) -> String {
    let mut o = String::new();
    if rows.is_empty() {
        return o;
    }
    let w = rows
        .iter()
        .map(|r| r.0.len() + 10)
        .max()
        .unwrap_or(0)
        .max(12);
    let _ = writeln!(
        o,
        "Poll loop counters (whole run, warm-up included; per I/O):"
    );
    let _ = writeln!(
        o,
        "{:<w$} {:>12} {:>15} {:>15} {:>11} {:>11} {:>11} {:>11} {:>11} {:>11} {:>11} {:>11}",
        "Device",
        "I/Os",
        "polls",
        "empty polls",
        "clock rd",
        "reg reads",
        "SQ dbells",
        "CQ dbells",
        "SQ mmio",
        "CQ mmio",
        "SQ shadow",
        "CQ shadow"
    );
    let line = |o: &mut String, name: &str, c: &PollCounters| {
        let p = &c.per_io;
        let _ = writeln!(
            o,
            "{name:<w$} {:>12} {:>15.3} {:>15.3} {:>11.5} {:>11.5} {:>11.5} {:>11.5} {:>11.5} \
             {:>11.5} {:>11.5} {:>11.5}",
            c.ios,
            p.polls,
            p.empty_polls,
            p.housekeeping,
            p.register_reads,
            p.sq_doorbells,
            p.cq_doorbells,
            p.sq_mmio,
            p.cq_mmio,
            p.sq_shadow,
            p.cq_shadow
        );
    };
    for (name, core, c) in rows {
        line(&mut o, &format!("{name} core {core}"), c);
    }
    if rows.len() > 1 {
        let total = PollCounters::sum(rows.iter().map(|r| &r.2));
        line(&mut o, "Total", &total);
    }
    let _ = writeln!(o);
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(completed: u64, sq: u64, cq: u64, empty: u64, hk: u64, rr: u64) -> QueueStats {
        QueueStats {
            completed,
            sq_doorbells: sq,
            cq_doorbells: cq,
            // One CQ head doorbell per poll that found completions (`--cq-head-batch 1`).
            busy_polls: cq,
            // Shadow doorbells on: every update a shadow store, register writes when asked.
            sq_shadow_updates: sq,
            cq_shadow_updates: cq,
            sq_mmio_writes: sq / 2,
            cq_mmio_writes: cq / 5,
            empty_polls: empty,
            housekeeping: hk,
            register_reads: rr,
            ..QueueStats::default()
        }
    }

    #[test]
    fn ratios_and_sums() {
        let a = PollCounters::of(&stats(100, 10, 5, 95, 2, 1));
        assert_eq!(a.polls, 100);
        assert_eq!(a.per_io.sq_doorbells, 0.1);
        assert_eq!(a.per_io.cq_doorbells, 0.05);
        assert_eq!(
            (a.sq_mmio, a.cq_mmio, a.sq_shadow, a.cq_shadow),
            (5, 1, 10, 5)
        );
        assert_eq!((a.per_io.sq_mmio, a.per_io.cq_shadow), (0.05, 0.05));
        assert_eq!(a.per_io.empty_polls, 0.95);
        assert_eq!(a.per_io.register_reads, 0.01);
        let b = PollCounters::of(&stats(300, 10, 15, 5, 2, 0));
        let t = PollCounters::sum([&a, &b]);
        assert_eq!(
            (t.ios, t.polls, t.sq_doorbells, t.cq_doorbells),
            (400, 120, 20, 20)
        );
        assert_eq!(t.per_io.sq_doorbells, 0.05);
        assert_eq!(
            (t.sq_mmio, t.cq_mmio, t.sq_shadow, t.cq_shadow),
            (10, 4, 20, 20)
        );
        assert_eq!(t.per_io.cq_mmio, 0.01);
        assert_eq!(t.per_io.housekeeping, 0.01);
        // No I/O: ratios are zero, not NaN.
        let z = PollCounters::of(&stats(0, 0, 0, 7, 1, 1));
        assert_eq!(z.per_io, PerIo::default());
        assert_eq!(z.empty_polls, 7);
    }

    #[test]
    fn table_golden() {
        let a = PollCounters::of(&stats(100, 10, 5, 95, 2, 1));
        let b = PollCounters::of(&stats(300, 10, 15, 5, 2, 0));
        let t = table(&[("EMU NSID 1", 0, a), ("EMU NSID 2", 1, b)]);
        let want = "\
Poll loop counters (whole run, warm-up included; per I/O):
Device                       I/Os           polls     empty polls    clock rd   reg reads   SQ dbells   CQ dbells     SQ mmio     CQ mmio   SQ shadow   CQ shadow
EMU NSID 1 core 0             100           1.000           0.950     0.02000     0.01000     0.10000     0.05000     0.05000     0.01000     0.10000     0.05000
EMU NSID 2 core 1             300           0.067           0.017     0.00667     0.00000     0.03333     0.05000     0.01667     0.01000     0.03333     0.05000
Total                         400           0.300           0.250     0.01000     0.00250     0.05000     0.05000     0.02500     0.01000     0.05000     0.05000

";
        assert_eq!(t, want);
        assert_eq!(table(&[]), "");
    }
}
