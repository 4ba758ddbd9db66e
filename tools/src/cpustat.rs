//! Whole-system CPU time from `/proc/stat`, for `perf`'s CPU per I/O beside `getrusage`.
//!
//! `getrusage(RUSAGE_SELF)` counts only the time charged to the process: the kernel's work on
//! its behalf that lands elsewhere (the interrupt handler of a completion, softirqs, the idle
//! loop's wake-up, a kworker) is missing, which flatters a process that sleeps on interrupts.
//! The first line of `/proc/stat` sums every CPU's time by state; the difference of two
//! readings gives what the whole machine did in between.
//!
//! **Busy** is the CPUs' wall time minus idle, iowait and steal (time a hypervisor ran
//! something else): everything that was not idle. The kernel measures idle time exactly
//! (`NO_HZ`: from idle entry to the next interrupt's entry), but it only *samples* the busy
//! states (user, nice, system, irq, softirq) with its tick: a hard interrupt that wakes an idle
//! CPU is never under a tick (the tick is itself an interrupt, and stopped while idle), so the
//! sampled states miss exactly the interrupt work of a process that sleeps on interrupts, and
//! every tick a virtual CPU loses while its host runs something else. The sampled sum is
//! reported too ([`CpuDelta::sampled_busy_s`]). Resolution: one clock tick (`USER_HZ`, 10 ms)
//! per reading.
//!
//! On a machine where other programs run this counts them too: it is the honest measure only
//! where nothing else runs (a dedicated guest).

use std::time::Duration;

/// Why `/proc/stat` could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CpuStatError {
    /// The file could not be read.
    #[error("failed to read /proc/stat: {0} (is /proc mounted?)")]
    Read(#[from] std::io::Error),
    /// The aggregate `cpu` line is missing or malformed.
    #[error(
        "/proc/stat has no valid aggregate 'cpu' line (expected 'cpu  user nice system idle ...' with at least four numbers): {0}"
    )]
    Format(String),
    /// The clock tick rate is unknown.
    #[error("sysconf(_SC_CLK_TCK) failed: the unit of /proc/stat is unknown")]
    ClockTick,
}

/// The aggregate CPU times of `/proc/stat` (every CPU summed), in clock ticks (`USER_HZ`).
/// Fields a kernel does not report (older ones have fewer columns) are 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuTimes {
    /// Normal processes in user mode (guest time included).
    pub user: u64,
    /// Niced processes in user mode (niced guest time included).
    pub nice: u64,
    /// Kernel mode.
    pub system: u64,
    /// Idle.
    pub idle: u64,
    /// Idle with I/O outstanding.
    pub iowait: u64,
    /// Hard interrupts.
    pub irq: u64,
    /// Softirqs.
    pub softirq: u64,
    /// Stolen by the hypervisor (another guest or the host ran).
    pub steal: u64,
    /// CPUs: the `cpuN` lines.
    pub cpus: u32,
}

impl CpuTimes {
    /// Parses the text of `/proc/stat`.
    pub fn parse(text: &str) -> Result<CpuTimes, CpuStatError> {
        let bad = |why: &str| CpuStatError::Format(why.to_string());
        let line = text
            .lines()
            .find(|l| l.split_whitespace().next() == Some("cpu"))
            .ok_or_else(|| bad("no line starts with 'cpu '"))?;
        let nums = line
            .split_whitespace()
            .skip(1)
            .map(|f| f.parse::<u64>())
            .collect::<Result<Vec<u64>, _>>()
            .map_err(|e| CpuStatError::Format(format!("{e} in '{line}'")))?;
        if nums.len() < 4 {
            return Err(CpuStatError::Format(format!("too few fields in '{line}'")));
        }
        let f = |i: usize| nums.get(i).copied().unwrap_or(0);
        let cpus = text
            .lines()
            .filter(|l| {
                l.strip_prefix("cpu")
                    .and_then(|r| r.split_whitespace().next())
                    .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                    && !l.starts_with("cpu ")
            })
            .count() as u32;
        Ok(CpuTimes {
            user: f(0),
            nice: f(1),
            system: f(2),
            idle: f(3),
            iowait: f(4),
            irq: f(5),
            softirq: f(6),
            steal: f(7),
            cpus: cpus.max(1),
        })
    }

    /// Reads `/proc/stat` now.
    pub fn read() -> Result<CpuTimes, CpuStatError> {
        CpuTimes::parse(&std::fs::read_to_string("/proc/stat")?)
    }

    /// Busy ticks: user, nice, system, irq, softirq.
    pub fn busy(&self) -> u64 {
        self.user + self.nice + self.system + self.irq + self.softirq
    }

    /// Not busy: idle and iowait.
    pub fn idle_all(&self) -> u64 {
        self.idle + self.iowait
    }

    /// What happened from `earlier` to `self` over `interval` of wall time; `hz` ticks per
    /// second (`USER_HZ`, see [`clock_ticks`]). A counter that went backwards counts 0.
    pub fn since(&self, earlier: &CpuTimes, interval: Duration, hz: u64) -> CpuDelta {
        let s = |a: u64, b: u64| a.saturating_sub(b) as f64 / hz.max(1) as f64;
        let interval_s = interval.as_secs_f64();
        let idle_s = s(self.idle_all(), earlier.idle_all());
        let steal_s = s(self.steal, earlier.steal);
        CpuDelta {
            busy_s: (interval_s * f64::from(self.cpus) - idle_s - steal_s).max(0.0),
            sampled_busy_s: s(self.busy(), earlier.busy()),
            irq_s: s(self.irq + self.softirq, earlier.irq + earlier.softirq),
            idle_s,
            steal_s,
            interval_s,
            cpus: self.cpus,
        }
    }
}

/// `USER_HZ`: the unit of `/proc/stat` (100 on every common Linux).
pub fn clock_ticks() -> Result<u64, CpuStatError> {
    // SAFETY: sysconf has no memory effects; it returns -1 for an unknown name.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz <= 0 {
        return Err(CpuStatError::ClockTick);
    }
    Ok(hz as u64)
}

/// The whole system's CPU time over an interval, seconds (all CPUs summed).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CpuDelta {
    /// Busy: the CPUs' wall time (`interval_s × cpus`) minus idle, iowait and steal.
    pub busy_s: f64,
    /// The states the tick samples: user, nice, system, irq, softirq (below `busy_s` by the
    /// interrupt work on idle CPUs and the ticks a descheduled vCPU lost).
    pub sampled_busy_s: f64,
    /// The irq and softirq part of `sampled_busy_s`.
    pub irq_s: f64,
    /// Idle and iowait.
    pub idle_s: f64,
    /// Stolen by the hypervisor.
    pub steal_s: f64,
    /// Wall time of the interval.
    pub interval_s: f64,
    /// CPUs.
    pub cpus: u32,
}

impl CpuDelta {
    /// Busy time as a fraction of the CPUs' wall time (`busy_s / (interval_s × cpus)`), 0 for
    /// an empty interval.
    pub fn busy_fraction(&self) -> f64 {
        let all = self.interval_s * f64::from(self.cpus);
        if all > 0.0 { self.busy_s / all } else { 0.0 }
    }
}

/// A reading to take at the start of an interval; [`Sampler::finish`] at its end.
#[derive(Debug, Clone, Copy)]
pub struct Sampler {
    start: CpuTimes,
    at: std::time::Instant,
    hz: u64,
}

impl Sampler {
    /// Reads `/proc/stat` and the clock now.
    pub fn start() -> Result<Sampler, CpuStatError> {
        let hz = clock_ticks()?;
        Ok(Sampler {
            start: CpuTimes::read()?,
            at: std::time::Instant::now(),
            hz,
        })
    }

    /// Reads `/proc/stat` again: the whole system's CPU time since [`Sampler::start`].
    pub fn finish(&self) -> Result<CpuDelta, CpuStatError> {
        let end = CpuTimes::read()?;
        Ok(end.since(&self.start, self.at.elapsed(), self.hz))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Captured in the HIL guest (Linux 6.1, -smp 1) and on a 2-core host (6.x).
    const GUEST_A: &str = "cpu  120 0 310 5210 3 0 41 0 0 0
cpu0 120 0 310 5210 3 0 41 0 0 0
intr 123456 0 9 0 0 0 0 0 0 0 0
ctxt 654321
btime 1764637200
processes 312
procs_running 2
procs_blocked 0
softirq 98765 0 4321 0 0 0 0 5 0 0 1234
";
    const GUEST_B: &str = "cpu  170 0 655 5450 3 12 61 0 0 0
cpu0 170 0 655 5450 3 12 61 0 0 0
intr 323456 0 9 0 0 0 0 0 0 0 0
ctxt 954321
btime 1764637200
processes 313
procs_running 1
procs_blocked 0
softirq 198765 0 4321 0 0 0 0 5 0 0 1234
";
    const HOST: &str = "cpu  4705 356 584 3699176 23 23 1 7 0 0
cpu0 1393 280 294 1848946 11 11 0 3 0 0
cpu1 3312 76 290 1850230 12 12 1 4 0 0
intr 1462898 0 0 0
ctxt 1990473
";

    #[test]
    fn parses_the_aggregate_line_and_counts_cpus() {
        let t = CpuTimes::parse(HOST).unwrap();
        assert_eq!(
            t,
            CpuTimes {
                user: 4705,
                nice: 356,
                system: 584,
                idle: 3_699_176,
                iowait: 23,
                irq: 23,
                softirq: 1,
                steal: 7,
                cpus: 2,
            }
        );
        assert_eq!(t.busy(), 4705 + 356 + 584 + 23 + 1);
        assert_eq!(t.idle_all(), 3_699_176 + 23);
        assert_eq!(CpuTimes::parse(GUEST_A).unwrap().cpus, 1);
    }

    #[test]
    fn delta_is_busy_idle_and_steal_in_seconds() {
        let a = CpuTimes::parse(GUEST_A).unwrap();
        let b = CpuTimes::parse(GUEST_B).unwrap();
        let d = b.since(&a, Duration::from_secs(7), 100);
        // Sampled: user +50, system +345, irq +12, softirq +20: 427 ticks.
        assert!((d.sampled_busy_s - 4.27).abs() < 1e-9, "{d:?}");
        assert!((d.irq_s - 0.32).abs() < 1e-9, "{d:?}");
        assert!((d.idle_s - 2.40).abs() < 1e-9, "{d:?}");
        // Busy: 7 s of one CPU, 2.40 s idle: 4.60 s, of which the tick saw 4.27 s.
        assert!((d.busy_s - 4.60).abs() < 1e-9, "{d:?}");
        assert_eq!(d.steal_s, 0.0);
        assert_eq!(d.cpus, 1);
        assert!((d.busy_fraction() - 4.60 / 7.0).abs() < 1e-9);
        // Steal is not busy; guest time is inside user already.
        let mut c = b;
        c.steal += 250;
        let d2 = c.since(&a, Duration::from_secs(7), 100);
        assert_eq!(d2.sampled_busy_s, d.sampled_busy_s);
        assert!((d2.steal_s - 2.5).abs() < 1e-9);
        assert!((d2.busy_s - 2.10).abs() < 1e-9, "{d2:?}");
        // Two CPUs: twice the wall time.
        let h = CpuTimes::parse(HOST).unwrap();
        let mut h2 = h;
        h2.idle += 150;
        h2.user += 40;
        let dh = h2.since(&h, Duration::from_secs(2), 100);
        assert!((dh.busy_s - 2.5).abs() < 1e-9, "{dh:?}");
        assert!((dh.busy_fraction() - 0.625).abs() < 1e-9, "{dh:?}");
        // Backwards counters (a CPU taken offline) count 0, not a wrapped huge number; more
        // idle than wall time (rounding) is no busy time, not a negative one.
        let back = a.since(&b, Duration::from_secs(1), 100);
        assert_eq!(back.sampled_busy_s, 0.0);
        assert_eq!(back.idle_s, 0.0);
        let over = b.since(&a, Duration::from_secs(2), 100);
        assert_eq!(over.busy_s, 0.0);
        assert_eq!(
            CpuDelta {
                interval_s: 0.0,
                ..back
            }
            .busy_fraction(),
            0.0
        );
    }

    #[test]
    fn short_old_lines_default_missing_fields() {
        let t = CpuTimes::parse("cpu 1 2 3 4\ncpu0 1 2 3 4\n").unwrap();
        assert_eq!((t.user, t.idle, t.iowait, t.steal, t.cpus), (1, 4, 0, 0, 1));
    }

    #[test]
    fn malformed_text_is_a_clear_error() {
        for bad in [
            "",
            "intr 1 2 3\n",
            "cpu 1 2 3\n",
            "cpu 1 two 3 4\n",
            "cpu0 1 2 3 4\n",
        ] {
            let e = CpuTimes::parse(bad).unwrap_err();
            assert!(matches!(e, CpuStatError::Format(_)), "{bad:?}: {e}");
            assert!(e.to_string().contains("'cpu' line"), "{e}");
        }
    }

    #[test]
    fn reads_this_machine() {
        let s = Sampler::start().unwrap();
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = std::hint::black_box(x.wrapping_add(i));
        }
        let d = s.finish().unwrap();
        assert!(d.cpus >= 1);
        assert!(
            d.busy_s >= 0.0 && d.idle_s >= 0.0 && d.interval_s > 0.0,
            "{d:?}"
        );
        assert!(clock_ticks().unwrap() > 0);
    }
}
