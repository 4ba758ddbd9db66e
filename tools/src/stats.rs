//! Per namespace per core statistics: counters, latency extremes and a latency histogram.
//!
//! Latencies are kept in clock ticks (see [`crate::clock`]) and converted to microseconds only
//! for the report. The histogram is an HdrHistogram with 3 significant digits (0.1 % error)
//! covering one tick to one hour, allocated once, so recording never allocates.

use hdrhistogram::Histogram;

/// Significant decimal digits the latency histogram keeps.
pub const SIGFIG: u8 = 3;

/// The statistics of one namespace on one core.
#[derive(Debug, Clone)]
pub struct NsStats {
    /// I/Os submitted.
    pub io_submitted: u64,
    /// I/Os completed (successfully or not).
    pub io_completed: u64,
    /// I/Os completed with an error status.
    pub io_errors: u64,
    /// Sum of latencies, in ticks.
    pub total_ticks: u64,
    /// Smallest latency, in ticks (`u64::MAX` before the first I/O).
    pub min_ticks: u64,
    /// Largest latency, in ticks.
    pub max_ticks: u64,
    /// Ticks spent in polls that found completions (`-m`).
    pub busy_ticks: u64,
    /// Ticks spent in polls that found none (`-m`).
    pub idle_ticks: u64,
    /// Latency histogram in ticks, when tracked.
    pub histogram: Option<Histogram<u64>>,
}

/// The histogram every [`NsStats`] uses, for a clock of `hz` ticks per second.
pub fn new_histogram(hz: u64) -> Histogram<u64> {
    let max = hz.saturating_mul(3600).max(1_000_000);
    Histogram::new_with_bounds(1, max, SIGFIG).expect("valid histogram bounds")
}

impl NsStats {
    /// Empty statistics; with a histogram if `track_latency`.
    pub fn new(hz: u64, track_latency: bool) -> NsStats {
        NsStats {
            io_submitted: 0,
            io_completed: 0,
            io_errors: 0,
            total_ticks: 0,
            min_ticks: u64::MAX,
            max_ticks: 0,
            busy_ticks: 0,
            idle_ticks: 0,
            histogram: track_latency.then(|| new_histogram(hz)),
        }
    }

    /// Records one completion that took `ticks`.
    #[inline(always)]
    pub fn record(&mut self, ticks: u64) {
        self.io_completed += 1;
        self.total_ticks = self.total_ticks.saturating_add(ticks);
        if ticks < self.min_ticks {
            self.min_ticks = ticks;
        }
        if ticks > self.max_ticks {
            self.max_ticks = ticks;
        }
        if let Some(h) = &mut self.histogram {
            h.saturating_record(ticks.max(1));
        }
    }

    /// Forgets everything (after the warm-up), keeping the histogram's allocation.
    pub fn reset(&mut self) {
        self.io_submitted = 0;
        self.io_completed = 0;
        self.io_errors = 0;
        self.total_ticks = 0;
        self.min_ticks = u64::MAX;
        self.max_ticks = 0;
        self.busy_ticks = 0;
        self.idle_ticks = 0;
        if let Some(h) = &mut self.histogram {
            h.reset();
        }
    }

    /// Adds `other` into `self` (for totals).
    pub fn merge(&mut self, other: &NsStats) {
        self.io_submitted += other.io_submitted;
        self.io_completed += other.io_completed;
        self.io_errors += other.io_errors;
        self.total_ticks += other.total_ticks;
        self.min_ticks = self.min_ticks.min(other.min_ticks);
        self.max_ticks = self.max_ticks.max(other.max_ticks);
        self.busy_ticks += other.busy_ticks;
        self.idle_ticks += other.idle_ticks;
        match (&mut self.histogram, &other.histogram) {
            (Some(a), Some(b)) => a.add(b).expect("histograms share their bounds"),
            (None, Some(b)) => self.histogram = Some(b.clone()),
            _ => {}
        }
    }

    /// Average latency in ticks (0 with no I/O).
    pub fn avg_ticks(&self) -> f64 {
        if self.io_completed == 0 {
            0.0
        } else {
            self.total_ticks as f64 / self.io_completed as f64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_reset_merge() {
        let mut a = NsStats::new(1_000_000_000, true);
        for t in [10, 20, 30] {
            a.record(t);
        }
        assert_eq!(
            (a.io_completed, a.total_ticks, a.min_ticks, a.max_ticks),
            (3, 60, 10, 30)
        );
        assert_eq!(a.avg_ticks(), 20.0);
        let mut b = NsStats::new(1_000_000_000, true);
        b.record(5);
        b.record(100);
        let mut t = NsStats::new(1_000_000_000, true);
        t.merge(&a);
        t.merge(&b);
        assert_eq!(
            (t.io_completed, t.min_ticks, t.max_ticks, t.total_ticks),
            (5, 5, 100, 165)
        );
        assert_eq!(t.histogram.as_ref().unwrap().len(), 5);
        a.reset();
        assert_eq!((a.io_completed, a.min_ticks, a.max_ticks), (0, u64::MAX, 0));
        assert_eq!(a.histogram.as_ref().unwrap().len(), 0);
        assert_eq!(a.avg_ticks(), 0.0);
    }

    #[test]
    fn huge_latency_saturates() {
        let mut a = NsStats::new(1_000, true);
        a.record(u64::MAX / 2);
        assert_eq!(a.histogram.as_ref().unwrap().len(), 1);
    }
}
