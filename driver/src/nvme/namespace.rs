//! One active namespace as the driver sees it: id, block size, size, and the Identify Namespace
//! data it came from. Namespaces the driver cannot use safely are skipped at bring-up.

use crate::spec::{IdentifyNamespace, LbaFormat};
use crate::types::Nsid;

/// One active namespace: its id, size and format, and the identify data it came from.
#[derive(Clone, Debug)]
pub struct Namespace {
    nsid: Nsid,
    block_size: u32,
    block_shift: u32,
    blocks: u64,
    identify: IdentifyNamespace,
}

impl Namespace {
    /// The namespace, or `None` if it cannot be used: an invalid LBA format (block size 0,
    /// LBADS out of range), a zero size (NSZE 0) or a size in bytes beyond 64 bits.
    pub(crate) fn new(nsid: Nsid, identify: IdentifyNamespace) -> Option<Namespace> {
        let block_size = identify.block_size();
        let usable = block_size.is_power_of_two()
            && block_size >= 512
            && identify.nsze != 0
            && identify.nsze.checked_mul(block_size as u64).is_some();
        usable.then(|| Namespace {
            nsid,
            block_size,
            block_shift: block_size.trailing_zeros(),
            blocks: identify.nsze,
            identify,
        })
    }
    /// The namespace id.
    #[inline]
    pub fn nsid(&self) -> Nsid {
        self.nsid
    }
    /// Logical block size in bytes.
    #[inline]
    pub fn block_size(&self) -> u32 {
        self.block_size
    }
    /// log2 of the block size.
    #[inline]
    pub fn block_shift(&self) -> u32 {
        self.block_shift
    }
    /// Size in logical blocks (NSZE).
    #[inline]
    pub fn blocks(&self) -> u64 {
        self.blocks
    }
    /// Size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.blocks << self.block_shift
    }
    /// The LBA formats the namespace supports.
    pub fn lba_formats(&self) -> &[LbaFormat] {
        &self.identify.lbaf
    }
    /// Index of the LBA format in use.
    pub fn lba_format_index(&self) -> usize {
        self.identify.flbas_index()
    }
    /// The Identify Namespace data.
    pub fn identify(&self) -> &IdentifyNamespace {
        &self.identify
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(nsze: u64, lbads: u8) -> IdentifyNamespace {
        IdentifyNamespace {
            nsze,
            ncap: nsze,
            lbaf: vec![LbaFormat {
                ms: 0,
                lbads,
                rp: 0,
            }],
            ..Default::default()
        }
    }

    #[test]
    fn hostile_namespaces_are_skipped() {
        let ok = Namespace::new(Nsid(1), ns(8, 12)).expect("usable");
        assert_eq!(
            (ok.block_size(), ok.blocks(), ok.size_bytes()),
            (4096, 8, 32768)
        );
        // NSZE 0.
        assert!(Namespace::new(Nsid(1), ns(0, 12)).is_none());
        // LBADS out of range (a shift of 255 would panic in `1 << lbads`).
        for lbads in [0, 8, 17, 32, 255] {
            assert!(
                Namespace::new(Nsid(1), ns(8, lbads)).is_none(),
                "lbads {lbads}"
            );
        }
        // A size in bytes beyond 64 bits.
        assert!(Namespace::new(Nsid(1), ns(u64::MAX, 9)).is_none());
        assert!(Namespace::new(Nsid(1), ns(u64::MAX >> 9, 9)).is_some());
    }
}
