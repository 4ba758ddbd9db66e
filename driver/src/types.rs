//! Newtypes for quantities that must not mix.

use core::fmt;

macro_rules! newtype {
    ($(#[$m:meta])* $name:ident($t:ty), $fmt:literal) => {
        $(#[$m])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(pub $t);
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "(", $fmt, ")"), self.0)
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, $fmt, self.0)
            }
        }
    };
}

newtype!(
    /// An I/O virtual address: what the device puts on the bus for DMA.
    Iova(u64), "{:#x}"
);
newtype!(
    /// A logical block address within a namespace.
    Lba(u64), "{}"
);
newtype!(
    /// A namespace identifier (1-based).
    Nsid(u32), "{}"
);
newtype!(
    /// A command identifier, unique among the outstanding commands of one submission queue.
    Cid(u16), "{}"
);
newtype!(
    /// A queue identifier (0 is the admin queue pair).
    QueueId(u16), "{}"
);

impl Iova {
    /// `self + off`, or `None` on overflow.
    #[inline]
    pub const fn checked_add(self, off: u64) -> Option<Iova> {
        match self.0.checked_add(off) {
            Some(v) => Some(Iova(v)),
            None => None,
        }
    }
    /// Offset within a memory page of `page_size` bytes (a power of two).
    #[inline]
    pub const fn page_offset(self, page_size: u64) -> u64 {
        self.0 & (page_size - 1)
    }
}
