//! The `verify` workload's data pattern.
//!
//! Every block written carries its own identity: bytes 0..8 are its LBA and bytes 8..16 the
//! generation of the write (both little-endian), and every following 8-byte word is a hash of
//! (LBA, generation, word index). A block read back from the wrong place, a stale write, a torn
//! transfer or a buffer the device never filled all show up as a byte that differs. Before a
//! read the buffer is poisoned, so a device that returns without writing the buffer (a null
//! namespace) is caught too.

/// The byte a buffer is filled with before a read.
pub const POISON: u8 = 0xA5;

#[inline]
fn mix(mut z: u64) -> u64 {
    // splitmix64's finaliser.
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[inline]
fn word(lba: u64, generation: u64, i: usize) -> u64 {
    match i {
        0 => lba,
        1 => generation,
        _ => mix(lba.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ generation.rotate_left(32) ^ i as u64),
    }
}

/// Fills `buf` (whole blocks of `block_size` bytes, the first at `lba`) with the pattern of
/// `generation`.
pub fn fill(buf: &mut [u8], lba: u64, block_size: usize, generation: u64) {
    for (b, block) in buf.chunks_exact_mut(block_size).enumerate() {
        let l = lba + b as u64;
        for (i, w) in block.chunks_exact_mut(8).enumerate() {
            w.copy_from_slice(&word(l, generation, i).to_le_bytes());
        }
    }
}

/// A wrong byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadByte {
    /// The block's LBA.
    pub lba: u64,
    /// Offset in the block.
    pub offset: u32,
    /// What was written.
    pub expected: u8,
    /// What was read.
    pub got: u8,
}

/// Checks every byte of `buf` against the pattern. Returns the number of blocks with a wrong
/// byte and the first wrong byte.
pub fn check(buf: &[u8], lba: u64, block_size: usize, generation: u64) -> (u64, Option<BadByte>) {
    let mut bad_blocks = 0;
    let mut first = None;
    for (b, block) in buf.chunks_exact(block_size).enumerate() {
        let l = lba + b as u64;
        for (i, w) in block.chunks_exact(8).enumerate() {
            let want = word(l, generation, i).to_le_bytes();
            if w != want {
                bad_blocks += 1;
                if first.is_none() {
                    let k = (0..8).find(|&k| w[k] != want[k]).expect("words differ");
                    first = Some(BadByte {
                        lba: l,
                        offset: (i * 8 + k) as u32,
                        expected: want[k],
                        got: w[k],
                    });
                }
                break;
            }
        }
    }
    (bad_blocks, first)
}

/// Fills `buf` with [`POISON`].
pub fn poison(buf: &mut [u8]) {
    buf.fill(POISON);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_then_check() {
        let mut buf = vec![0u8; 4096];
        fill(&mut buf, 100, 512, 7);
        assert_eq!(check(&buf, 100, 512, 7), (0, None));
        assert_eq!(&buf[0..8], &100u64.to_le_bytes());
        assert_eq!(&buf[8..16], &7u64.to_le_bytes());
        assert_eq!(&buf[512..520], &101u64.to_le_bytes());
        // Wrong generation, wrong LBA: every block differs.
        assert_eq!(check(&buf, 100, 512, 8).0, 8);
        assert_eq!(check(&buf, 101, 512, 7).0, 8);
        // One flipped byte in the third block.
        buf[2 * 512 + 300] ^= 1;
        let (n, first) = check(&buf, 100, 512, 7);
        assert_eq!(n, 1);
        let f = first.unwrap();
        assert_eq!((f.lba, f.offset), (102, 300));
        assert_eq!(f.got, f.expected ^ 1);
        // A poisoned buffer (a read that never happened) fails.
        poison(&mut buf);
        assert_eq!(check(&buf, 100, 512, 7).0, 8);
    }

    #[test]
    fn pattern_differs_between_blocks_and_generations() {
        let mut a = vec![0u8; 512];
        let mut b = vec![0u8; 512];
        fill(&mut a, 5, 512, 1);
        fill(&mut b, 5, 512, 2);
        let same = a.iter().zip(&b).filter(|(x, y)| x == y).count();
        assert!(same < 40, "{same} equal bytes");
    }
}
