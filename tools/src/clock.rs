//! The tick source for latency: the TSC where it is invariant, else `CLOCK_MONOTONIC_RAW`.
//!
//! On x86-64 with both `constant_tsc` and `nonstop_tsc` in `/proc/cpuinfo` the TSC ticks at a
//! fixed rate on every core and in every power state; reading it costs a few nanoseconds. Its
//! rate is measured once at start against `CLOCK_MONOTONIC_RAW` (not slewed by NTP). Elsewhere
//! ticks are nanoseconds of `CLOCK_MONOTONIC_RAW` (through the vDSO, tens of nanoseconds).

use std::time::Duration;

/// Where ticks come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The x86-64 time-stamp counter.
    Tsc,
    /// `CLOCK_MONOTONIC_RAW`, in nanoseconds.
    MonotonicRaw,
}

/// A calibrated tick source; `Copy`, so each worker holds its own.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    source: Source,
    hz: u64,
}

/// Nanoseconds of `CLOCK_MONOTONIC_RAW`.
pub fn monotonic_raw_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC_RAW exists on every Linux
    // this runs on (2.6.28+), so the call cannot fail.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_RAW, &mut ts) };
    debug_assert_eq!(rc, 0);
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Whether `/proc/cpuinfo` text shows an invariant TSC (`constant_tsc` and `nonstop_tsc`).
pub fn tsc_invariant(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .map(|l| {
            let has = |w: &str| l.split_whitespace().any(|x| x == w);
            has("constant_tsc") && has("nonstop_tsc")
        })
        .unwrap_or(false)
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no memory effects and exists on every x86-64 CPU.
    unsafe { core::arch::x86_64::_rdtsc() }
}

#[cfg(not(target_arch = "x86_64"))]
#[inline(always)]
fn rdtsc() -> u64 {
    monotonic_raw_ns()
}

impl Clock {
    /// The best clock here: a calibrated TSC if invariant, else `CLOCK_MONOTONIC_RAW`.
    /// Calibration sleeps about 50 ms.
    pub fn new() -> Clock {
        if cfg!(target_arch = "x86_64")
            && std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| tsc_invariant(&c))
        {
            Clock::calibrate_tsc(Duration::from_millis(50))
        } else {
            Clock::monotonic()
        }
    }

    /// `CLOCK_MONOTONIC_RAW` in nanoseconds.
    pub const fn monotonic() -> Clock {
        Clock {
            source: Source::MonotonicRaw,
            hz: 1_000_000_000,
        }
    }

    /// A clock with a known rate, for tests and reports built from recorded figures.
    pub const fn with_hz(source: Source, hz: u64) -> Clock {
        Clock { source, hz }
    }

    /// The TSC, its rate measured over `period` against `CLOCK_MONOTONIC_RAW`.
    pub fn calibrate_tsc(period: Duration) -> Clock {
        // Bracket each TSC read by two clock reads and keep the tightest of a few tries, so a
        // preemption between the two reads does not skew the rate.
        fn pair() -> (u64, u64) {
            let mut best = (u64::MAX, 0, 0);
            for _ in 0..5 {
                let a = monotonic_raw_ns();
                let t = rdtsc();
                let b = monotonic_raw_ns();
                if b - a < best.0 {
                    best = (b - a, t, a + (b - a) / 2);
                }
            }
            (best.1, best.2)
        }
        let (t0, n0) = pair();
        std::thread::sleep(period);
        let (t1, n1) = pair();
        let ns = n1.saturating_sub(n0).max(1);
        let hz = ((t1.wrapping_sub(t0)) as u128 * 1_000_000_000 / ns as u128) as u64;
        if hz == 0 {
            return Clock::monotonic();
        }
        Clock {
            source: Source::Tsc,
            hz,
        }
    }

    /// Where the ticks come from.
    pub fn source(&self) -> Source {
        self.source
    }

    /// Ticks per second.
    pub fn hz(&self) -> u64 {
        self.hz
    }

    /// The current tick count.
    #[inline(always)]
    pub fn now(&self) -> u64 {
        match self.source {
            Source::Tsc => rdtsc(),
            Source::MonotonicRaw => monotonic_raw_ns(),
        }
    }

    /// `ticks` in microseconds.
    pub fn ticks_to_us(&self, ticks: u64) -> f64 {
        ticks as f64 * 1e6 / self.hz as f64
    }

    /// `secs` seconds in ticks.
    pub fn secs_to_ticks(&self, secs: f64) -> u64 {
        (secs * self.hz as f64) as u64
    }
}

impl Default for Clock {
    fn default() -> Clock {
        Clock::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_detection() {
        let yes = "processor\t: 0\nflags\t\t: fpu tsc constant_tsc rep_good nonstop_tsc cpuid\n";
        let half = "flags\t\t: fpu tsc constant_tsc\n";
        assert!(tsc_invariant(yes));
        assert!(!tsc_invariant(half));
        assert!(!tsc_invariant(""));
        assert!(!tsc_invariant("flags : nonstop_tsc_x constant_tsc\n"));
    }

    #[test]
    fn clock_is_monotonic_and_calibrated() {
        let c = Clock::new();
        assert!(c.hz() >= 1_000_000, "{c:?}");
        let a = c.now();
        let n0 = monotonic_raw_ns();
        std::thread::sleep(Duration::from_millis(20));
        let b = c.now();
        let n1 = monotonic_raw_ns();
        assert!(b > a);
        let measured = c.ticks_to_us(b - a);
        let real = (n1 - n0) as f64 / 1e3;
        // Within 5 % (the machine is shared; be generous).
        assert!(
            (measured - real).abs() / real < 0.05,
            "clock {measured} µs vs {real} µs"
        );
    }

    #[test]
    fn conversions() {
        let c = Clock::with_hz(Source::Tsc, 2_000_000_000);
        assert_eq!(c.ticks_to_us(2_000), 1.0);
        assert_eq!(c.secs_to_ticks(0.5), 1_000_000_000);
    }
}
