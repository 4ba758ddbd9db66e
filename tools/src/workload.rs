//! The I/O pattern: which operation, at which offset.
//!
//! The per-I/O choices are made with xorshift64 and no division: a random offset in
//! `[0, n)` is Lemire's multiply-shift (`(x * n) >> 64` on 128 bits), and the read/write mix is
//! one comparison of a random word against a threshold precomputed from `-M`. (SPDK's profile
//! showed the `%` alone at 6 % of its cycles.)

use core::fmt;
use core::str::FromStr;

/// The `-w` workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
    /// Random reads.
    RandRead,
    /// Random writes.
    RandWrite,
    /// Sequential reads and writes, mixed by `-M`.
    Rw,
    /// Random reads and writes, mixed by `-M`.
    RandRw,
    /// Ours: write a pattern to every block of the range, read it back and check every byte.
    Verify,
}

impl Workload {
    /// The name as given to `-w`.
    pub const fn name(self) -> &'static str {
        match self {
            Workload::Read => "read",
            Workload::Write => "write",
            Workload::RandRead => "randread",
            Workload::RandWrite => "randwrite",
            Workload::Rw => "rw",
            Workload::RandRw => "randrw",
            Workload::Verify => "verify",
        }
    }

    /// Whether offsets are random.
    pub const fn is_random(self) -> bool {
        matches!(
            self,
            Workload::RandRead | Workload::RandWrite | Workload::RandRw
        )
    }

    /// Whether `-M` is required.
    pub const fn needs_mix(self) -> bool {
        matches!(self, Workload::Rw | Workload::RandRw)
    }

    /// Whether the workload writes to the device.
    pub const fn writes(self, rwmixread: Option<u8>) -> bool {
        match self {
            Workload::Read | Workload::RandRead => false,
            Workload::Write | Workload::RandWrite | Workload::Verify => true,
            Workload::Rw | Workload::RandRw => !matches!(rwmixread, Some(100)),
        }
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An unknown `-w` value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "-w (--io-pattern) io pattern type must be one of (read, write, randread, randwrite, rw, randrw, verify), not '{0}'"
)]
pub struct UnknownWorkload(pub String);

impl FromStr for Workload {
    type Err = UnknownWorkload;
    fn from_str(s: &str) -> Result<Workload, UnknownWorkload> {
        Ok(match s {
            "read" => Workload::Read,
            "write" => Workload::Write,
            "randread" => Workload::RandRead,
            "randwrite" => Workload::RandWrite,
            "rw" => Workload::Rw,
            "randrw" => Workload::RandRw,
            "verify" => Workload::Verify,
            _ => return Err(UnknownWorkload(s.to_string())),
        })
    }
}

/// xorshift64 (Marsaglia), the generator SPDK's perf uses. Never zero once seeded non-zero.
#[derive(Debug, Clone)]
pub struct XorShift64(u64);

impl XorShift64 {
    /// A generator from `seed`; a zero seed (the one fixed point) is replaced.
    pub const fn new(seed: u64) -> XorShift64 {
        XorShift64(if seed == 0 {
            0x9E37_79B9_7F4A_7C15
        } else {
            seed
        })
    }

    /// The next 64 random bits.
    #[inline(always)]
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A value in `[0, n)` by Lemire's multiply-shift: no division. The bias is at most
    /// `n / 2^64`, far below anything a benchmark can see.
    #[inline(always)]
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
}

/// The read/write choice of one I/O, precomputed from `-M`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mix {
    /// Every I/O reads.
    AllRead,
    /// Every I/O writes.
    AllWrite,
    /// An I/O reads when a random word is below the threshold (`M% of 2^64`).
    Mixed(u64),
}

impl Mix {
    /// The mix of `workload` with read percentage `rwmixread` (used by rw and randrw only).
    pub fn new(workload: Workload, rwmixread: Option<u8>) -> Mix {
        match workload {
            Workload::Read | Workload::RandRead => Mix::AllRead,
            Workload::Write | Workload::RandWrite => Mix::AllWrite,
            // verify decides reads and writes itself.
            Workload::Verify => Mix::AllWrite,
            Workload::Rw | Workload::RandRw => match rwmixread.unwrap_or(100) {
                0 => Mix::AllWrite,
                m if m >= 100 => Mix::AllRead,
                m => Mix::Mixed(((m as u128) << 64).div_ceil(100) as u64),
            },
        }
    }

    /// Whether the next I/O reads.
    #[inline(always)]
    pub fn is_read(self, rng: &mut XorShift64) -> bool {
        match self {
            Mix::AllRead => true,
            Mix::AllWrite => false,
            Mix::Mixed(t) => rng.next_u64() < t,
        }
    }
}

/// Offsets (in units of whole I/Os) within one namespace.
#[derive(Debug, Clone)]
pub struct Offsets {
    size_in_ios: u64,
    random: bool,
    next: u64,
}

impl Offsets {
    /// Offsets over `size_in_ios` I/O-sized slots (at least 1), random or sequential from
    /// `start` (wrapped into range).
    pub fn new(size_in_ios: u64, random: bool, start: u64) -> Offsets {
        let size_in_ios = size_in_ios.max(1);
        let next = if start < size_in_ios { start } else { 0 };
        Offsets {
            size_in_ios,
            random,
            next,
        }
    }

    /// The number of slots.
    pub fn size_in_ios(&self) -> u64 {
        self.size_in_ios
    }

    /// The next offset, in I/Os.
    #[inline(always)]
    pub fn next(&mut self, rng: &mut XorShift64) -> u64 {
        if self.random {
            rng.below(self.size_in_ios)
        } else {
            let o = self.next;
            self.next += 1;
            if self.next == self.size_in_ios {
                self.next = 0;
            }
            o
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for w in [
            Workload::Read,
            Workload::Write,
            Workload::RandRead,
            Workload::RandWrite,
            Workload::Rw,
            Workload::RandRw,
            Workload::Verify,
        ] {
            assert_eq!(w.name().parse::<Workload>(), Ok(w));
        }
        let e = "randomread".parse::<Workload>().unwrap_err();
        assert!(e.to_string().contains("'randomread'"));
    }

    #[test]
    fn below_is_in_range_and_uniform() {
        let mut r = XorShift64::new(42);
        for n in [1u64, 2, 3, 7, 1000, (1 << 40) + 12345, u64::MAX] {
            for _ in 0..10_000 {
                assert!(r.below(n) < n);
            }
        }
        // Chi-square over 10 buckets of an odd range: 100 000 draws.
        let n = 1_000_003u64;
        let mut buckets = [0u64; 10];
        let draws = 100_000;
        for _ in 0..draws {
            let v = r.below(n);
            buckets[(v * 10 / n) as usize] += 1;
        }
        let expect = draws as f64 / 10.0;
        let chi2: f64 = buckets
            .iter()
            .map(|&b| (b as f64 - expect).powi(2) / expect)
            .sum();
        // 9 degrees of freedom: p = 0.001 at 27.88.
        assert!(chi2 < 27.88, "chi2 {chi2} buckets {buckets:?}");
        // Small range: every value is hit about equally.
        let mut counts = [0u32; 3];
        for _ in 0..30_000 {
            counts[r.below(3) as usize] += 1;
        }
        for c in counts {
            assert!((9_500..10_500).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn mix_follows_m() {
        assert_eq!(Mix::new(Workload::Rw, Some(100)), Mix::AllRead);
        assert_eq!(Mix::new(Workload::RandRw, Some(0)), Mix::AllWrite);
        assert_eq!(Mix::new(Workload::RandRead, None), Mix::AllRead);
        let mut r = XorShift64::new(7);
        for m in [1u8, 30, 50, 70, 99] {
            let mix = Mix::new(Workload::RandRw, Some(m));
            let reads = (0..100_000).filter(|_| mix.is_read(&mut r)).count();
            let pct = reads as f64 / 1000.0;
            assert!((pct - m as f64).abs() < 1.0, "M={m} got {pct}%");
        }
    }

    #[test]
    fn sequential_offsets_wrap() {
        let mut r = XorShift64::new(1);
        let mut o = Offsets::new(3, false, 1);
        let v: Vec<u64> = (0..5).map(|_| o.next(&mut r)).collect();
        assert_eq!(v, [1, 2, 0, 1, 2]);
        let mut o = Offsets::new(0, true, 0);
        assert_eq!(o.next(&mut r), 0);
    }
}
