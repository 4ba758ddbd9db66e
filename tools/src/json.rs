//! `perf --json`: the same figures as the text report, for machines.
//!
//! # Schema (`"schema": "dioxide-perf/1"`)
//!
//! ```text
//! {
//!   "schema": "dioxide-perf/1",
//!   "target": "EMULATED (inline)" | "PCIE (0000:01:00.0)" ...,   // controllers, comma-separated
//!   "config": {
//!     "queue_depth": 128, "io_size": 4096, "workload": "randread",
//!     "rwmixread": null | 0..100, "time_secs": 10.0, "warmup_secs": 0.0,
//!     "cores": [0], "qpairs_per_ns": 1, "number_ios": 0,
//!     "doorbell": "per-batch" | "per-command", "shadow_doorbells": true, "seed": 123
//!   },
//!   "clock": { "source": "tsc" | "monotonic_raw", "hz": 2999999000 },
//!   "elapsed_us": 10000012.0,
//!   "devices": [                                  // one per namespace per core
//!     { "name": "PCIE (0000:01:00.0) NSID 1", "nsid": 1, "core": 0,
//!       "io_completed": 1234, "io_errors": 0,
//!       "iops": 123.4, "mib_s": 0.48,
//!       "latency_us": { "avg": 1.0, "min": 0.5, "max": 9.0,
//!                       "percentiles": [ { "percentile": 1.0, "us": 0.6 }, ... ] },
//!       "busy_pct": 99.5,                         // null unless measured (-m)
//!       "counters": { ...as the top-level "counters", this device's queue pairs... } }
//!   ],
//!   "total": null | { "io_completed": ..., "io_errors": ..., "iops": ..., "mib_s": ...,
//!                     "latency_us": { ...over all devices, percentiles from the merged
//!                                     histogram... } },
//!   "verify": null | { "blocks_checked": 100, "mismatches": 0,
//!                      "first_mismatch": null | { "name": ..., "nsid": 1, "lba": 7,
//!                                                 "offset": 12, "expected": 3, "got": 0 } },
//!   "warnings": [ "WARNING: ..." ],
//!   "queues": [                                   // the I/O queue pairs each device used
//!     { "name": "... NSID 1", "core": 0, "qid": 1, "entries": 256,
//!       "commands": null | 1234 }                 // commands the emulated controller saw
//!   ],
//!   "emulated": null | { "doorbell_writes": 1000, "io_commands": 4000, "faults_fired": 0 },
//!   "counters": {                                 // the poll loop, whole run (warm-up included)
//!     "ios": 4000, "polls": 9000, "empty_polls": 5000, "housekeeping": 80,
//!     "register_reads": 0, "sq_doorbells": 130, "cq_doorbells": 4000,
//!     "sq_mmio": 130, "cq_mmio": 3990, "sq_shadow": 130, "cq_shadow": 4000, "interrupt_arms": 0,
//!     "per_io": { "polls": 2.25, "empty_polls": 1.25, "housekeeping": 0.02,
//!                 "register_reads": 0.0, "sq_doorbells": 0.0325, "cq_doorbells": 1.0,
//!                 "sq_mmio": 0.0325, "cq_mmio": 0.9975, "sq_shadow": 0.0325,
//!                 "cq_shadow": 1.0, "interrupt_arms": 0.0 } },
//!   "cpu": {                                      // getrusage of the process, set-up excluded
//!     "mode": "polled" | "interrupt" | "adaptive:20", "user_s": 9.8, "sys_s": 0.1,
//!     "ios": 4000, "us_per_io": 2475.0, "sleeps": 0, "sleeps_per_io": 0.0,
//!     "sleep_limit_hits": 0,                      // sleeps that ended at 10 ms, no interrupt
//!     "system": null | {                          // /proc/stat over the same interval: every
//!       "busy_s": 10.2,                           // CPU, every process, the kernel's irqs,
//!       "sampled_busy_s": 10.0, "irq_s": 0.3,     // softirqs and wake-ups (noisy when other
//!       "idle_s": 9.8, "steal_s": 0.0,            // programs run); busy = wall x cpus -
//!       "interval_s": 10.0, "cpus": 2,            // idle - iowait - steal; sampled = the
//!       "busy_fraction": 0.51, "us_per_io": 2550.0 } }   // tick's user..softirq
//! }
//! ```
//!
//! Doorbell updates (`sq_doorbells`, `cq_doorbells`) are register writes without shadow
//! doorbells; with them, stores to the shadow page (`*_shadow`) of which the controller's event
//! index asked for `*_mmio` register writes (see the `counters` module).
//!
//! `percentile` is in percent (SPDK's cut-offs, 1 to 99.99999); latencies are microseconds.
//! Fields are only ever added, never renamed, within one schema version.

use crate::counters::PollCounters;
use crate::report::{self, Row};
use crate::stats::NsStats;
use serde::{Deserialize, Serialize};

/// The schema name and version of [`PerfReport`].
pub const PERF_SCHEMA: &str = "dioxide-perf/1";

/// One latency percentile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Percentile {
    /// The cut-off, in percent.
    pub percentile: f64,
    /// Latency at the cut-off, µs.
    pub us: f64,
}

/// Latency figures, µs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    /// Average.
    pub avg: f64,
    /// Minimum.
    pub min: f64,
    /// Maximum.
    pub max: f64,
    /// At SPDK's cut-offs (empty without a histogram).
    pub percentiles: Vec<Percentile>,
}

/// One namespace on one core.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Device {
    /// Name as in the text report.
    pub name: String,
    /// Namespace ID.
    pub nsid: u32,
    /// Core.
    pub core: u32,
    /// I/Os completed.
    pub io_completed: u64,
    /// I/Os completed with an error.
    pub io_errors: u64,
    /// I/Os per second.
    pub iops: f64,
    /// MiB per second.
    pub mib_s: f64,
    /// Latency.
    pub latency_us: Latency,
    /// Busy share of polling time, percent (`-m`).
    pub busy_pct: Option<f64>,
    /// The poll loop's counters of this device's queue pairs.
    #[serde(default)]
    pub counters: Option<PollCounters>,
}

/// The sum over devices.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Total {
    /// I/Os completed.
    pub io_completed: u64,
    /// I/Os completed with an error.
    pub io_errors: u64,
    /// I/Os per second.
    pub iops: f64,
    /// MiB per second.
    pub mib_s: f64,
    /// Latency over all devices (percentiles from the merged histogram).
    pub latency_us: Latency,
}

/// The run's configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// `-q`.
    pub queue_depth: u32,
    /// `-o`.
    pub io_size: u64,
    /// `-w`.
    pub workload: crate::workload::Workload,
    /// `-M`.
    pub rwmixread: Option<u8>,
    /// `-t`.
    pub time_secs: f64,
    /// `-a`.
    pub warmup_secs: f64,
    /// `-c`.
    pub cores: Vec<u32>,
    /// `-P`.
    pub qpairs_per_ns: u32,
    /// `-d`.
    pub number_ios: u64,
    /// `--doorbell`.
    pub doorbell: crate::cli::DoorbellMode,
    /// Shadow doorbells wanted (`false` with `--no-shadow-doorbells`); the counters say whether
    /// the controller took them (`sq_shadow`, `cq_shadow`).
    #[serde(default = "yes")]
    pub shadow_doorbells: bool,
    /// The random seed used.
    pub seed: u64,
}

/// The tick source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClockInfo {
    /// `tsc` or `monotonic_raw`.
    pub source: String,
    /// Ticks per second.
    pub hz: u64,
}

/// The first mismatch `verify` found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mismatch {
    /// Namespace name.
    pub name: String,
    /// Namespace ID.
    pub nsid: u32,
    /// Logical block address of the block.
    pub lba: u64,
    /// Byte offset within the block.
    pub offset: u32,
    /// The byte written.
    pub expected: u8,
    /// The byte read back.
    pub got: u8,
}

/// `verify`'s result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verify {
    /// Blocks read back and compared.
    pub blocks_checked: u64,
    /// Blocks with at least one wrong byte.
    pub mismatches: u64,
    /// The first one.
    pub first_mismatch: Option<Mismatch>,
}

/// The whole `--json` document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PerfReport {
    /// [`PERF_SCHEMA`].
    pub schema: String,
    /// The controllers, as named in the report.
    pub target: String,
    /// The configuration.
    pub config: Config,
    /// The tick source.
    pub clock: ClockInfo,
    /// Measured time, µs.
    pub elapsed_us: f64,
    /// Per namespace per core.
    pub devices: Vec<Device>,
    /// Sum, or `null` when nothing completed.
    pub total: Option<Total>,
    /// `verify` only.
    pub verify: Option<Verify>,
    /// Warnings printed (or that would have been) during the run.
    pub warnings: Vec<String>,
    /// The I/O queue pairs used, per device (`-P` of them each).
    #[serde(default)]
    pub queues: Vec<QueueInfo>,
    /// The emulated controller's counters (`null` on hardware).
    #[serde(default)]
    pub emulated: Option<EmulatedCounters>,
    /// The poll loop's counters summed over all devices.
    #[serde(default)]
    pub counters: Option<PollCounters>,
    /// CPU time of the process and interrupt-mode sleeps, whole run.
    #[serde(default)]
    pub cpu: Option<Cpu>,
}

/// CPU time per I/O and interrupt-mode sleeps over the whole run (warm-up and drain included):
/// `getrusage(RUSAGE_SELF)` from the end of the workers' set-up (queue pairs and buffers made)
/// to their end, so every thread of the process counts (an emulated controller's thread too),
/// divided by every I/O completed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cpu {
    /// `--interrupt-mode`: `polled`, `interrupt` or `adaptive:US`.
    pub mode: String,
    /// User CPU time, seconds.
    pub user_s: f64,
    /// System CPU time, seconds.
    pub sys_s: f64,
    /// I/Os completed.
    pub ios: u64,
    /// (user + system) ÷ I/Os, µs.
    pub us_per_io: f64,
    /// Sleeps on the queues' interrupts (each ends with one wake-up).
    pub sleeps: u64,
    /// Sleeps ÷ I/Os.
    pub sleeps_per_io: f64,
    /// Sleeps that ended at the 10 ms limit with no interrupt.
    #[serde(default)]
    pub sleep_limit_hits: u64,
    /// The whole system's CPU time over the same interval (`/proc/stat`, every CPU, every
    /// process and the kernel's interrupts, softirqs and idle-loop wake-ups): the honest
    /// measure on a machine where nothing else runs, inflated by any other load. `null` when
    /// `/proc/stat` cannot be read.
    #[serde(default)]
    pub system: Option<SystemCpu>,
}

/// The whole system's CPU time over perf's measured interval (`/proc/stat` read at its start
/// and end; see the `cpustat` module).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SystemCpu {
    /// Busy time of all CPUs: wall time × CPUs minus idle, iowait and steal, seconds.
    pub busy_s: f64,
    /// The busy states the kernel's tick samples (user, nice, system, irq, softirq), seconds:
    /// below `busy_s` by the interrupt work that wakes an idle CPU (no tick ever lands in it)
    /// and the ticks a descheduled vCPU lost.
    #[serde(default)]
    pub sampled_busy_s: f64,
    /// The irq and softirq part of `sampled_busy_s`, seconds.
    pub irq_s: f64,
    /// Idle and iowait time of all CPUs, seconds.
    pub idle_s: f64,
    /// Time stolen by a hypervisor, seconds (not busy).
    pub steal_s: f64,
    /// Wall time of the interval, seconds.
    pub interval_s: f64,
    /// CPUs counted.
    pub cpus: u32,
    /// `busy_s ÷ (interval_s × cpus)`.
    pub busy_fraction: f64,
    /// `busy_s` ÷ I/Os, µs: the whole system's CPU per I/O.
    pub us_per_io: f64,
}

impl SystemCpu {
    /// The figures of an interval in which `ios` I/Os completed.
    pub fn new(d: &crate::cpustat::CpuDelta, ios: u64) -> SystemCpu {
        SystemCpu {
            busy_s: d.busy_s,
            sampled_busy_s: d.sampled_busy_s,
            irq_s: d.irq_s,
            idle_s: d.idle_s,
            steal_s: d.steal_s,
            interval_s: d.interval_s,
            cpus: d.cpus,
            busy_fraction: d.busy_fraction(),
            us_per_io: if ios == 0 {
                0.0
            } else {
                d.busy_s * 1e6 / ios as f64
            },
        }
    }

    /// The text report's line: `CPU time (whole system): ...`.
    pub fn line(&self) -> String {
        format!(
            "CPU time (whole system): {:.2} s busy (not idle; {:.2} s in the tick's samples, {:.2} s irq+softirq), {:.2} s idle, {:.2} s steal, {} CPU{} x {:.2} s ({:.0}% busy), {:.2} us per I/O",
            self.busy_s,
            self.sampled_busy_s,
            self.irq_s,
            self.idle_s,
            self.steal_s,
            self.cpus,
            if self.cpus == 1 { "" } else { "s" },
            self.interval_s,
            self.busy_fraction * 100.0,
            self.us_per_io
        )
    }
}

impl Cpu {
    /// The figures of a run.
    pub fn new(
        mode: dioxide::InterruptMode,
        user_s: f64,
        sys_s: f64,
        ios: u64,
        sleeps: u64,
    ) -> Cpu {
        let per = |x: f64| if ios == 0 { 0.0 } else { x / ios as f64 };
        Cpu {
            mode: match mode {
                dioxide::InterruptMode::Polled => "polled".into(),
                dioxide::InterruptMode::Interrupt => "interrupt".into(),
                dioxide::InterruptMode::Adaptive(d) => format!("adaptive:{}", d.as_micros()),
            },
            user_s,
            sys_s,
            ios,
            us_per_io: per((user_s + sys_s) * 1e6),
            sleeps,
            sleeps_per_io: per(sleeps as f64),
            sleep_limit_hits: 0,
            system: None,
        }
    }
}

/// One I/O queue pair a device used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueInfo {
    /// Device name, as in `devices`.
    pub name: String,
    /// Core.
    pub core: u32,
    /// Queue ID.
    pub qid: u16,
    /// Entries of the submission queue (`--io-queue-size`, at most the controller's).
    pub entries: u16,
    /// Commands the emulated controller received on this queue (`null` on hardware).
    pub commands: Option<u64>,
}

/// Counters of the built-in emulated controller over the whole run (warm-up included).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmulatedCounters {
    /// SQ and CQ doorbell writes.
    pub doorbell_writes: u64,
    /// I/O commands received.
    pub io_commands: u64,
    /// Injected faults that fired.
    pub faults_fired: u64,
}

/// Serde's default of fields that default to true.
fn yes() -> bool {
    true
}

fn latency(s: &NsStats, hz: u64) -> Latency {
    let empty = s.io_completed == 0;
    Latency {
        avg: report::us(s.avg_ticks(), hz),
        min: if empty {
            0.0
        } else {
            report::us(s.min_ticks as f64, hz)
        },
        max: report::us(s.max_ticks as f64, hz),
        percentiles: report::percentiles(s, hz)
            .into_iter()
            .map(|(c, us)| Percentile {
                percentile: report::percent(c),
                us,
            })
            .collect(),
    }
}

/// The per-device entries and the total for `rows`; `busy` gives a row's busy percentage.
pub fn devices(
    rows: &[Row<'_>],
    elapsed_us: f64,
    io_size: u64,
    hz: u64,
    with_busy: bool,
) -> (Vec<Device>, Option<Total>) {
    let devices = rows
        .iter()
        .map(|r| {
            let f = report::figures(r.stats, elapsed_us, io_size, hz);
            Device {
                name: r.name.to_string(),
                nsid: r.nsid,
                core: r.core,
                io_completed: r.stats.io_completed,
                io_errors: r.stats.io_errors,
                iops: f.map_or(0.0, |f| f.iops),
                mib_s: f.map_or(0.0, |f| f.mib_s),
                latency_us: latency(r.stats, hz),
                busy_pct: with_busy
                    .then(|| report::busy_pct(r.stats.busy_ticks, r.stats.idle_ticks)),
                counters: None,
            }
        })
        .collect();
    let total = report::total(rows, elapsed_us, io_size, hz).map(|t| {
        let mut merged = NsStats::new(hz, false);
        for r in rows {
            merged.merge(r.stats);
        }
        let mut lat = latency(&merged, hz);
        lat.avg = t.avg_us;
        Total {
            io_completed: merged.io_completed,
            io_errors: merged.io_errors,
            iops: t.iops,
            mib_s: t.mib_s,
            latency_us: lat,
        }
    });
    (devices, total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::DoorbellMode;
    use crate::workload::Workload;

    fn sample() -> PerfReport {
        let hz = 1_000_000_000;
        let mut a = NsStats::new(hz, true);
        for i in 1..=100 {
            a.record(i * 1000);
        }
        a.busy_ticks = 3;
        a.idle_ticks = 1;
        let rows = [Row {
            name: "EMULATED (inline) NSID 1",
            nsid: 1,
            core: 0,
            stats: &a,
        }];
        let (devices, total) = devices(&rows, 1e6, 4096, hz, true);
        PerfReport {
            schema: PERF_SCHEMA.to_string(),
            target: "EMULATED (inline)".to_string(),
            config: Config {
                queue_depth: 4,
                io_size: 4096,
                workload: Workload::RandRw,
                rwmixread: Some(70),
                time_secs: 1.0,
                warmup_secs: 0.0,
                cores: vec![0],
                qpairs_per_ns: 1,
                number_ios: 0,
                doorbell: DoorbellMode::PerBatch,
                shadow_doorbells: true,
                seed: 42,
            },
            clock: ClockInfo {
                source: "tsc".to_string(),
                hz,
            },
            elapsed_us: 1e6,
            devices,
            total,
            verify: Some(Verify {
                blocks_checked: 10,
                mismatches: 1,
                first_mismatch: Some(Mismatch {
                    name: "EMULATED (inline) NSID 1".to_string(),
                    nsid: 1,
                    lba: 7,
                    offset: 12,
                    expected: 3,
                    got: 0,
                }),
            }),
            warnings: vec![],
            queues: vec![QueueInfo {
                name: "EMULATED (inline) NSID 1".to_string(),
                core: 0,
                qid: 1,
                entries: 256,
                commands: Some(100),
            }],
            emulated: Some(EmulatedCounters {
                doorbell_writes: 200,
                io_commands: 100,
                faults_fired: 0,
            }),
            counters: Some(PollCounters::of(&dioxide::QueueStats {
                completed: 100,
                sq_doorbells: 4,
                cq_doorbells: 4,
                busy_polls: 4,
                empty_polls: 96,
                ..Default::default()
            })),
            cpu: Some(Cpu {
                system: Some(SystemCpu::new(
                    &crate::cpustat::CpuDelta {
                        busy_s: 1.5,
                        sampled_busy_s: 1.25,
                        irq_s: 0.25,
                        idle_s: 0.5,
                        steal_s: 0.0,
                        interval_s: 1.0,
                        cpus: 2,
                    },
                    100,
                )),
                ..Cpu::new(dioxide::InterruptMode::ADAPTIVE, 0.5, 0.25, 100, 40)
            }),
        }
    }

    #[test]
    fn round_trip() {
        let r = sample();
        let text = serde_json::to_string_pretty(&r).unwrap();
        let back: PerfReport = serde_json::from_str(&text).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn schema_fields() {
        let v: serde_json::Value = serde_json::to_value(sample()).unwrap();
        assert_eq!(v["schema"], "dioxide-perf/1");
        assert_eq!(v["counters"]["polls"], 100);
        assert_eq!(v["counters"]["per_io"]["sq_doorbells"], 0.04);
        assert_eq!(v["counters"]["per_io"]["register_reads"], 0.0);
        assert_eq!(v["config"]["workload"], "randrw");
        assert_eq!(v["config"]["doorbell"], "per-batch");
        let d = &v["devices"][0];
        assert_eq!(d["io_completed"], 100);
        assert_eq!(d["iops"], 100.0);
        assert_eq!(d["busy_pct"], 75.0);
        assert_eq!(d["latency_us"]["min"], 1.0);
        assert_eq!(d["latency_us"]["max"], 100.0);
        assert_eq!(d["latency_us"]["avg"], 50.5);
        let p = d["latency_us"]["percentiles"].as_array().unwrap();
        assert_eq!(p.len(), 15);
        assert_eq!(p[3]["percentile"], 50.0);
        assert_eq!(v["total"]["io_completed"], 100);
        assert_eq!(v["verify"]["first_mismatch"]["lba"], 7);
        assert_eq!(v["cpu"]["us_per_io"], 7500.0);
        assert_eq!(v["cpu"]["system"]["us_per_io"], 15000.0);
        assert_eq!(v["cpu"]["system"]["busy_fraction"], 0.75);
        assert_eq!(v["cpu"]["system"]["cpus"], 2);
    }

    #[test]
    fn system_cpu_line() {
        let s = sample().cpu.unwrap().system.unwrap();
        assert_eq!(
            s.line(),
            "CPU time (whole system): 1.50 s busy (not idle; 1.25 s in the tick's samples, 0.25 s irq+softirq), 0.50 s idle, 0.00 s steal, 2 CPUs x 1.00 s (75% busy), 15000.00 us per I/O"
        );
    }

    #[test]
    fn a_report_without_system_cpu_still_parses() {
        let mut v: serde_json::Value = serde_json::to_value(sample()).unwrap();
        v["cpu"].as_object_mut().unwrap().remove("system");
        let r: PerfReport = serde_json::from_value(v).unwrap();
        assert_eq!(r.cpu.unwrap().system, None);
    }
}
