//! SPDK's text report, line for line: the start-up lines, the performance table, `-L`
//! percentiles, the `-LL` histogram, the warnings and the once-a-second progress line.
//!
//! Everything here is a pure function of recorded figures, so it is tested against golden
//! strings. The format strings follow `spdk_nvme_perf`'s `printf`s (`%10.2f` is `{:10.2}`,
//! `%-43.43s` is `{:<43.43}`).

use crate::stats::NsStats;
use std::fmt::Write as _;

/// SPDK's percentile cut-offs for `-L` (as fractions).
pub const CUTOFFS: [f64; 15] = [
    0.01, 0.10, 0.25, 0.50, 0.75, 0.90, 0.95, 0.98, 0.99, 0.995, 0.999, 0.9999, 0.99999, 0.999999,
    0.9999999,
];

/// A cut-off as a percentage, rounded to the 5 decimals SPDK prints (`0.99999` → `99.999`).
pub fn percent(cutoff: f64) -> f64 {
    (cutoff * 1e7).round() / 1e5
}

/// The separator line of the table.
pub const RULE: &str = "========================================================";

/// One row of the report: a namespace on a core.
#[derive(Debug, Clone, Copy)]
pub struct Row<'a> {
    /// The namespace's name, e.g. `PCIE (0000:00:04.0) NSID 1`.
    pub name: &'a str,
    /// The namespace ID.
    pub nsid: u32,
    /// The core (lcore) its worker ran on.
    pub core: u32,
    /// What it measured.
    pub stats: &'a NsStats,
}

/// The figures of one row (or the total), in report units.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Figures {
    /// I/Os per second.
    pub iops: f64,
    /// MiB per second.
    pub mib_s: f64,
    /// Average latency, µs.
    pub avg_us: f64,
    /// Minimum latency, µs.
    pub min_us: f64,
    /// Maximum latency, µs.
    pub max_us: f64,
}

/// Ticks to microseconds at `hz`.
pub fn us(ticks: f64, hz: u64) -> f64 {
    ticks * 1e6 / hz as f64
}

/// The figures of `s` over `elapsed_us` with `io_size`-byte I/Os, or `None` with no I/O.
pub fn figures(s: &NsStats, elapsed_us: f64, io_size: u64, hz: u64) -> Option<Figures> {
    if s.io_completed == 0 {
        return None;
    }
    let iops = s.io_completed as f64 * 1e6 / elapsed_us.max(1.0);
    Some(Figures {
        iops,
        mib_s: iops * io_size as f64 / (1024.0 * 1024.0),
        avg_us: us(s.avg_ticks(), hz),
        min_us: us(s.min_ticks as f64, hz),
        max_us: us(s.max_ticks as f64, hz),
    })
}

/// The total the way SPDK computes it: IOPS and MiB/s summed over rows, the average weighted
/// by I/O count, the extremes over rows. `None` when nothing completed.
pub fn total(rows: &[Row<'_>], elapsed_us: f64, io_size: u64, hz: u64) -> Option<Figures> {
    let mut t = Figures {
        iops: 0.0,
        mib_s: 0.0,
        avg_us: 0.0,
        min_us: f64::MAX,
        max_us: 0.0,
    };
    let (mut ios, mut ticks) = (0u64, 0u64);
    for r in rows {
        if let Some(f) = figures(r.stats, elapsed_us, io_size, hz) {
            t.iops += f.iops;
            t.mib_s += f.mib_s;
            t.min_us = t.min_us.min(f.min_us);
            t.max_us = t.max_us.max(f.max_us);
            ios += r.stats.io_completed;
            ticks = ticks.saturating_add(r.stats.total_ticks);
        }
    }
    if ios == 0 {
        return None;
    }
    t.avg_us = us(ticks as f64 / ios as f64, hz);
    Some(t)
}

fn name_width(rows: &[Row<'_>]) -> usize {
    rows.iter().map(|r| r.name.len()).max().unwrap_or(0)
}

/// The performance table (SPDK's `print_performance` without the latency parts).
pub fn table(rows: &[Row<'_>], elapsed_us: f64, io_size: u64, hz: u64) -> String {
    let w = name_width(rows);
    let mut o = String::new();
    let _ = writeln!(o, "{RULE}");
    let _ = writeln!(o, "{:>1$}", "Latency(us)", w + 60);
    let _ = writeln!(
        o,
        "{:<w$}: {:>10} {:>10} {:>10} {:>10} {:>10}",
        "Device Information",
        "IOPS",
        "MiB/s",
        "Average",
        "min",
        "max",
        w = w + 13
    );
    for r in rows {
        if let Some(f) = figures(r.stats, elapsed_us, io_size, hz) {
            let _ = writeln!(
                o,
                "{:<w$.w$} from core {:2}: {:10.2} {:10.2} {:10.2} {:10.2} {:10.2}",
                r.name,
                r.core,
                f.iops,
                f.mib_s,
                f.avg_us,
                f.min_us,
                f.max_us,
                w = w
            );
        }
    }
    if let Some(t) = total(rows, elapsed_us, io_size, hz) {
        let _ = writeln!(o, "{RULE}");
        let _ = writeln!(
            o,
            "{:<w$}: {:10.2} {:10.2} {:10.2} {:10.2} {:10.2}",
            "Total",
            t.iops,
            t.mib_s,
            t.avg_us,
            t.min_us,
            t.max_us,
            w = w + 13
        );
        let _ = writeln!(o);
    }
    o
}

/// The latency at each of SPDK's cut-offs, in µs: `(cut-off as a fraction, µs)`. Empty
/// without a histogram or with no I/O. The value at a cut-off is the upper end of the
/// histogram bucket holding that quantile, as SPDK prints the end of its bucket.
pub fn percentiles(s: &NsStats, hz: u64) -> Vec<(f64, f64)> {
    let Some(h) = &s.histogram else {
        return Vec::new();
    };
    if h.is_empty() {
        return Vec::new();
    }
    CUTOFFS
        .iter()
        .map(|&c| (c, us(h.value_at_quantile(c) as f64, hz)))
        .collect()
}

/// The `-L` section for every row.
pub fn latency_summary(rows: &[Row<'_>], hz: u64) -> String {
    let mut o = String::new();
    for r in rows {
        let _ = writeln!(
            o,
            "Summary latency data for {:<43.43} from core {}:",
            r.name, r.core
        );
        let _ = writeln!(
            o,
            "================================================================================="
        );
        for (c, v) in percentiles(r.stats, hz) {
            let _ = writeln!(o, "{:9.5}% : {:9.3}us", c * 100.0, v);
        }
        let _ = writeln!(o);
    }
    o
}

/// One `-LL` histogram row: `(start µs, end µs, cumulative %, count)`.
pub type Bucket = (f64, f64, f64, u64);

/// The non-empty buckets of `s`'s histogram.
pub fn buckets(s: &NsStats, hz: u64) -> Vec<Bucket> {
    let Some(h) = &s.histogram else {
        return Vec::new();
    };
    let total = h.len();
    let mut so_far = 0u64;
    let mut out = Vec::new();
    for v in h.iter_recorded() {
        let n = v.count_at_value();
        so_far += n;
        let end = v.value_iterated_to();
        let start = h.lowest_equivalent(end);
        out.push((
            us(start as f64, hz),
            us(end as f64, hz),
            so_far as f64 * 100.0 / total as f64,
            n,
        ));
    }
    out
}

/// The `-LL` section for every row.
pub fn latency_histogram(rows: &[Row<'_>], hz: u64) -> String {
    let mut o = String::new();
    for r in rows {
        let _ = writeln!(
            o,
            "Latency histogram for {:<43.43} from core {}:",
            r.name, r.core
        );
        let _ = writeln!(
            o,
            "=============================================================================="
        );
        let _ = writeln!(o, "       Range in us     Cumulative    IO count");
        for (a, b, pct, n) in buckets(r.stats, hz) {
            let _ = writeln!(o, "{a:9.3} - {b:9.3}: {pct:9.4}%  ({n:9})");
        }
        let _ = writeln!(o);
    }
    o
}

/// The whole end-of-run report: the table, then `-L` percentiles at level 1 and also the
/// `-LL` histogram at level 2.
pub fn full(rows: &[Row<'_>], elapsed_us: f64, io_size: u64, hz: u64, latency_level: u8) -> String {
    let mut o = table(rows, elapsed_us, io_size, hz);
    let any = rows.iter().any(|r| r.stats.io_completed > 0);
    if latency_level >= 1 && any {
        o += &latency_summary(rows, hz);
        if latency_level >= 2 {
            o += &latency_histogram(rows, hz);
        }
    }
    o
}

/// SPDK's warning when `q` I/Os of `io_size` bytes may not fit the I/O queue: each I/O may
/// take `(io_size - 1) / max_transfer + 2` entries. `None` when they fit.
pub fn queue_size_warning(
    q: u32,
    io_size: u64,
    max_transfer: u64,
    queue_size: u32,
) -> Option<String> {
    let entries = (io_size.max(1) - 1) / max_transfer.max(1) + 2;
    (q as u64 * entries > queue_size as u64).then(|| {
        format!(
            "Controller IO queue size {queue_size}, less than required.\n\
             Consider using lower queue depth or smaller IO size, because IO requests may be queued at the NVMe driver.\n"
        )
    })
}

/// SPDK's warning for a namespace dropped because `-o` is not a multiple of its block size.
pub fn io_size_warning(io_size: u64, nsid: u32, block_size: u32) -> String {
    format!(
        "WARNING: IO size {io_size} (-o) is not a multiple of nsid {nsid} sector size {block_size}. Removing this ns from test\n"
    )
}

/// The warning for a namespace the driver refuses for I/O (formatted with metadata).
pub fn ns_refused_warning(why: &dioxide::Error) -> String {
    format!("WARNING: {why}. Removing this ns from test\n")
}

/// SPDK's warning for a namespace smaller than one I/O or with blocks larger than the I/O.
pub fn ns_size_warning(
    model: &str,
    serial: &str,
    nsid: u32,
    ns_size: u64,
    block_size: u32,
    io_size: u64,
) -> String {
    format!(
        "WARNING: controller {model:<20.20} ({serial:<20.20}) ns {nsid} has invalid ns size {ns_size} / block size {block_size} for I/O size {io_size}\n"
    )
}

/// SPDK's line after warnings of skipped namespaces.
pub const SKIPPED: &str = "WARNING: Some requested NVMe devices were skipped\n";

/// SPDK's `Attached to NVMe Controller at ...` line.
pub fn attached(addr: &str, vid: u16, did: u16) -> String {
    format!("Attached to NVMe Controller at {addr} [{vid:04x}:{did:04x}]\n")
}

/// SPDK's `Associating ... with lcore N` line.
pub fn associating(name: &str, core: u32) -> String {
    format!("Associating {name} with lcore {core}\n")
}

/// The once-a-second progress line (without the trailing `\r`): I/Os and MiB in the last
/// second, and with `-m` the busy share of the workers' polling time.
pub fn progress(warmup: bool, ios: u64, io_size: u64, busy: Option<(usize, f64)>) -> String {
    let mib = ios as f64 * io_size as f64 / (1024.0 * 1024.0);
    let mut s = format!(
        "{}{ios:9} IOPS, {mib:8.2} MiB/s",
        if warmup { "[warmup] " } else { "" }
    );
    if let Some((cores, pct)) = busy {
        let _ = write!(s, "{cores:3} Core(s): {pct:6.2}% Busy");
    }
    s
}

/// Busy percentage from busy and idle ticks.
pub fn busy_pct(busy: u64, idle: u64) -> f64 {
    if busy + idle == 0 {
        0.0
    } else {
        busy as f64 * 100.0 / (busy + idle) as f64
    }
}

/// Whether standard output is a terminal (the progress line is printed only then).
pub fn stdout_is_tty() -> bool {
    // SAFETY: isatty only inspects the descriptor number; any value is allowed.
    unsafe { libc::isatty(libc::STDOUT_FILENO) == 1 }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HZ: u64 = 1_000_000_000; // ticks are nanoseconds

    fn stats(lat_ns: &[u64]) -> NsStats {
        let mut s = NsStats::new(HZ, true);
        for &l in lat_ns {
            s.record(l);
        }
        s
    }

    #[test]
    fn table_golden() {
        // 1000 I/Os of 1..=1000 µs on core 0; 3000 I/Os of 2 µs on core 1; one second.
        let a = stats(&(1..=1000).map(|i| i * 1000).collect::<Vec<_>>());
        let b = stats(&[2000; 3000]);
        let idle = NsStats::new(HZ, true);
        let rows = [
            Row {
                name: "PCIE (0000:00:04.0) NSID 1",
                nsid: 1,
                core: 0,
                stats: &a,
            },
            Row {
                name: "PCIE (0000:00:04.0) NSID 1",
                nsid: 1,
                core: 1,
                stats: &b,
            },
            Row {
                name: "PCIE (0000:00:04.0) NSID 2",
                nsid: 2,
                core: 1,
                stats: &idle,
            },
        ];
        let got = table(&rows, 1_000_000.0, 4096, HZ);
        let want = "\
========================================================
                                                                           Latency(us)
Device Information                     :       IOPS      MiB/s    Average        min        max
PCIE (0000:00:04.0) NSID 1 from core  0:    1000.00       3.91     500.50       1.00    1000.00
PCIE (0000:00:04.0) NSID 1 from core  1:    3000.00      11.72       2.00       2.00       2.00
========================================================
Total                                  :    4000.00      15.62     126.62       1.00    1000.00

";
        assert_eq!(got, want, "\n{got}");
    }

    #[test]
    fn empty_table_has_no_total() {
        let idle = NsStats::new(HZ, false);
        let rows = [Row {
            name: "EMULATED (inline) NSID 1",
            nsid: 1,
            core: 0,
            stats: &idle,
        }];
        let got = full(&rows, 1e6, 512, HZ, 2);
        assert!(!got.contains("Total"));
        assert!(!got.contains("Summary"));
    }

    #[test]
    fn percentiles_golden() {
        let a = stats(&(1..=1000).map(|i| i * 1000).collect::<Vec<_>>());
        let rows = [Row {
            name: "EMULATED (inline) NSID 1",
            nsid: 1,
            core: 0,
            stats: &a,
        }];
        let got = latency_summary(&rows, HZ);
        let want = "\
Summary latency data for EMULATED (inline) NSID 1                    from core 0:
=================================================================================
  1.00000% :    10.007us
 10.00000% :   100.031us
 25.00000% :   250.111us
 50.00000% :   500.223us
 75.00000% :   750.079us
 90.00000% :   900.095us
 95.00000% :   950.271us
 98.00000% :   980.479us
 99.00000% :   990.207us
 99.50000% :   995.327us
 99.90000% :   999.423us
 99.99000% :  1000.447us
 99.99900% :  1000.447us
 99.99990% :  1000.447us
 99.99999% :  1000.447us

";
        assert_eq!(got, want, "\n{got}");
        // Monotonic, and within the histogram's 0.1 % of the exact quantile.
        let p = percentiles(&a, HZ);
        assert_eq!(p.len(), CUTOFFS.len());
        for w in p.windows(2) {
            assert!(w[0].1 <= w[1].1);
        }
        for (c, v) in &p {
            let exact = (c * 1000.0).ceil().max(1.0);
            assert!((v - exact).abs() / exact < 0.002, "{c}: {v} vs {exact}");
        }
    }

    #[test]
    fn histogram_golden() {
        let a = stats(&[1000, 1000, 1000, 2000, 4_000_000]);
        let rows = [Row {
            name: "EMULATED (inline) NSID 1",
            nsid: 1,
            core: 0,
            stats: &a,
        }];
        let got = latency_histogram(&rows, HZ);
        let want = "\
Latency histogram for EMULATED (inline) NSID 1                    from core 0:
==============================================================================
       Range in us     Cumulative    IO count
    1.000 -     1.000:   60.0000%  (        3)
    2.000 -     2.000:   80.0000%  (        1)
 3999.744 -  4001.791:  100.0000%  (        1)
";
        assert_eq!(got, format!("{want}\n"), "\n{got}");
    }

    #[test]
    fn warnings_golden() {
        assert_eq!(queue_size_warning(128, 4096, 131072, 1024), None);
        assert_eq!(queue_size_warning(512, 4096, 131072, 1024), None);
        assert_eq!(
            queue_size_warning(513, 4096, 131072, 1024).unwrap(),
            "Controller IO queue size 1024, less than required.\n\
             Consider using lower queue depth or smaller IO size, because IO requests may be queued at the NVMe driver.\n"
        );
        // A 1 MiB I/O over 128 KiB MDTS takes 9 entries.
        assert!(queue_size_warning(114, 1 << 20, 131072, 1024).is_some());
        assert!(queue_size_warning(113, 1 << 20, 131072, 1024).is_none());
        assert_eq!(
            io_size_warning(1000, 1, 512),
            "WARNING: IO size 1000 (-o) is not a multiple of nsid 1 sector size 512. Removing this ns from test\n"
        );
        assert_eq!(
            ns_size_warning(
                "Dioxide emulated NVMe controller",
                "DIOXIDE0001",
                2,
                2048,
                4096,
                4096
            ),
            "WARNING: controller Dioxide emulated NVM (DIOXIDE0001         ) ns 2 has invalid ns size 2048 / block size 4096 for I/O size 4096\n"
        );
        assert_eq!(
            attached("0000:00:04.0", 0x1b36, 0x10),
            "Attached to NVMe Controller at 0000:00:04.0 [1b36:0010]\n"
        );
        assert_eq!(
            associating("PCIE (0000:00:04.0) NSID 1", 0),
            "Associating PCIE (0000:00:04.0) NSID 1 with lcore 0\n"
        );
    }

    #[test]
    fn progress_golden() {
        assert_eq!(
            progress(false, 123456, 4096, None),
            "   123456 IOPS,   482.25 MiB/s"
        );
        assert_eq!(
            progress(true, 1, 4096, Some((2, 99.5))),
            "[warmup]         1 IOPS,     0.00 MiB/s  2 Core(s):  99.50% Busy"
        );
        assert_eq!(busy_pct(1, 3), 25.0);
        assert_eq!(busy_pct(0, 0), 0.0);
    }
}
