//! One active namespace as the driver sees it: id, block size, size, and the Identify Namespace
//! data it came from. Namespaces whose format or size cannot be trusted are skipped at bring-up.
//!
//! A namespace formatted with metadata (LBA format MS != 0, extended or in a separate buffer) is
//! listed, so tools can show its format, but refused for I/O ([`Namespace::check_io`],
//! [`Error::NamespaceHasMetadata`]): Dioxide transfers no metadata, and with an extended format
//! a read of `n` blocks makes the device write `n * (block size + MS)` bytes. The queue pair's
//! range checks use [`Namespace::io_blocks`], which is 0 for such a namespace, so the refusal
//! costs the per-I/O fast path nothing: every command falls to the checked path, whose range
//! error is this one.

use crate::nvme::error::{Error, Result};
use crate::spec::{IdentifyNamespace, LbaFormat};
use crate::types::Nsid;

/// One active namespace: its id, size and format, and the identify data it came from.
#[derive(Clone, Debug)]
pub struct Namespace {
    nsid: Nsid,
    block_size: u32,
    block_shift: u32,
    blocks: u64,
    /// `blocks`, or 0 if the namespace is refused for I/O (formatted with metadata).
    io_blocks: u64,
    identify: IdentifyNamespace,
}

/// A logical block size Dioxide can address: a power of two, at least 512 bytes.
fn usable_block_size(block_size: u32) -> bool {
    block_size.is_power_of_two() && block_size >= 512
}

impl Namespace {
    /// The namespace, or `None` if it cannot be used: an invalid LBA format (block size 0,
    /// LBADS out of range), a zero size (NSZE 0) or a size in bytes beyond 64 bits. A format
    /// with metadata gives a namespace refused for I/O (see [`check_io`](Self::check_io)).
    pub(crate) fn new(nsid: Nsid, identify: IdentifyNamespace) -> Option<Namespace> {
        let block_size = identify.block_size();
        let usable = usable_block_size(block_size)
            && identify.nsze != 0
            && identify.nsze.checked_mul(block_size as u64).is_some();
        usable.then(|| Namespace {
            nsid,
            block_size,
            block_shift: block_size.trailing_zeros(),
            blocks: identify.nsze,
            io_blocks: if identify.lba_format().is_some_and(|f| f.ms != 0) {
                0
            } else {
                identify.nsze
            },
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
    /// Blocks addressable by I/O: [`blocks`](Self::blocks), or 0 if the namespace is refused
    /// for I/O. The queue pair's range checks use this, and report a failed one with
    /// [`check_io`](Self::check_io)'s error first.
    #[inline]
    pub(crate) fn io_blocks(&self) -> u64 {
        self.io_blocks
    }
    /// Metadata bytes per block of the LBA format in use (LBAF.MS); 0 for none.
    pub fn metadata_size(&self) -> u16 {
        self.identify.lba_format().map_or(0, |f| f.ms)
    }
    /// Whether the metadata is at the end of each block (extended LBA, FLBAS bit 4) rather than
    /// in a separate buffer. Meaningful only if [`metadata_size`](Self::metadata_size) is not 0.
    pub fn metadata_extended(&self) -> bool {
        self.identify.metadata_extended()
    }
    /// `Ok` if Dioxide can do I/O on the namespace; [`Error::NamespaceHasMetadata`] if its LBA
    /// format carries metadata, which Dioxide does not transfer. Reads, writes, Write Zeroes and
    /// Deallocate on such a namespace are refused with this error.
    pub fn check_io(&self) -> Result<()> {
        let metadata = self.metadata_size();
        if metadata == 0 {
            return Ok(());
        }
        let lbaf = self.lba_format_index();
        // Suggest only a format `new` would accept: no metadata and a usable block size.
        let usable = |f: &LbaFormat| f.ms == 0 && usable_block_size(f.block_size());
        let formats = &self.identify.lbaf;
        let without = formats
            .iter()
            .position(|f| usable(f) && f.block_size() == self.block_size)
            .or_else(|| formats.iter().position(usable));
        Err(Error::NamespaceHasMetadata {
            nsid: self.nsid,
            lbaf,
            block_size: self.block_size,
            metadata,
            extended: self.metadata_extended(),
            without,
        })
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

    #[test]
    fn a_format_with_metadata_is_listed_but_refused_for_io() {
        let plain = Namespace::new(Nsid(1), ns(8, 9)).expect("usable");
        assert_eq!((plain.metadata_size(), plain.io_blocks()), (0, 8));
        assert!(plain.check_io().is_ok());

        // Format 2 (512+8, extended) in use; format 0 (4096+0) and 1 (512+0) have none.
        let mut id = ns(8, 12);
        id.lbaf.push(LbaFormat {
            ms: 0,
            lbads: 9,
            rp: 0,
        });
        id.lbaf.push(LbaFormat {
            ms: 8,
            lbads: 9,
            rp: 0,
        });
        id.flbas = 0x10 | 2;
        let md = Namespace::new(Nsid(3), id.clone()).expect("listed");
        assert_eq!((md.block_size(), md.blocks(), md.io_blocks()), (512, 8, 0));
        assert_eq!((md.metadata_size(), md.metadata_extended()), (8, true));
        let err = md.check_io().unwrap_err();
        assert!(
            matches!(
                err,
                Error::NamespaceHasMetadata {
                    nsid: Nsid(3),
                    lbaf: 2,
                    block_size: 512,
                    metadata: 8,
                    extended: true,
                    without: Some(1),
                }
            ),
            "{err:?}"
        );
        let msg = err.to_string();
        for part in ["namespace 3", "512+8", "extended LBA", "--lbaf=1"] {
            assert!(msg.contains(part), "{part:?} not in {msg:?}");
        }

        // Separate metadata, and no format without metadata to suggest.
        id.flbas = 2;
        id.lbaf.truncate(0);
        id.lbaf.extend(
            [LbaFormat {
                ms: 8,
                lbads: 9,
                rp: 0,
            }; 3],
        );
        let msg = Namespace::new(Nsid(3), id)
            .expect("listed")
            .check_io()
            .unwrap_err()
            .to_string();
        for part in ["separate metadata buffer", "no LBA format without metadata"] {
            assert!(msg.contains(part), "{part:?} not in {msg:?}");
        }
    }
}
