//! Transport IDs: the `-r` argument, in SPDK's syntax.
//!
//! SPDK writes a transport ID as whitespace- (or comma-) separated `key:value` pairs, and
//! also takes `key=value`: `'trtype:PCIe traddr:0000:01:00.0 ns:1'`. Keys are case-insensitive.
//! Dioxide drives local PCIe controllers, so it knows the keys `trtype` (`PCIe`, or our
//! `emulated` for the built-in emulated controller), `traddr` (a PCI address) and `ns` (one
//! namespace instead of every active one). As a shorthand, a bare PCI address (`0000:01:00.0`,
//! `01:00.0`, ...) is read as `trtype:PCIe traddr:<it>`.
//!
//! Where SPDK only logs an unknown key and goes on, we refuse it: a misspelt `traddr` would
//! otherwise silently test some other device.

use core::fmt;
use core::str::FromStr;

/// Why a transport ID or PCI address did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TridError {
    /// The string was empty.
    #[error("empty transport ID; expected e.g. 'trtype:PCIe traddr:0000:01:00.0'")]
    Empty,
    /// A token had no `:` or `=` between key and value.
    #[error("'{0}' has no ':' or '=' between key and value")]
    NoSeparator(String),
    /// A key had no value.
    #[error("key '{0}' has no value")]
    NoValue(String),
    /// A key we do not know.
    #[error("unknown transport ID key '{0}' (known keys: trtype, traddr, ns)")]
    UnknownKey(String),
    /// A key SPDK knows for fabrics, which Dioxide does not drive.
    #[error("key '{0}' is for NVMe over Fabrics; Dioxide drives local PCIe controllers only")]
    FabricsKey(String),
    /// The same key twice.
    #[error("key '{0}' given twice")]
    Duplicate(String),
    /// A transport type other than PCIe or emulated.
    #[error("transport type '{0}' is not supported (use trtype:PCIe, or trtype:emulated)")]
    TrType(String),
    /// A `traddr` that is not a PCI address.
    #[error("'{0}' is not a PCI address (expected domain:bus:device.function, e.g. 0000:01:00.0)")]
    PciAddr(String),
    /// An `ns` that is not a namespace ID.
    #[error("'{0}' is not a namespace ID (expected 1 to 4294967294)")]
    Nsid(String),
    /// `trtype:PCIe` without `traddr`.
    #[error("trtype:PCIe needs traddr:<PCI address>, e.g. 'trtype:PCIe traddr:0000:01:00.0'")]
    NoTraddr,
    /// `traddr` given with `trtype:emulated`.
    #[error("trtype:emulated takes no traddr")]
    EmulatedTraddr,
}

/// A PCI address: domain, bus, device, function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciAddr {
    /// PCI domain (segment).
    pub domain: u32,
    /// Bus number.
    pub bus: u8,
    /// Device number (0..=31).
    pub dev: u8,
    /// Function number (0..=7).
    pub func: u8,
}

impl fmt::Display for PciAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.dev, self.func
        )
    }
}

fn hex(s: &str) -> Option<u32> {
    if s.is_empty() || s.len() > 8 {
        return None;
    }
    u32::from_str_radix(s, 16).ok()
}

impl FromStr for PciAddr {
    type Err = TridError;

    /// The forms SPDK's `spdk_pci_addr_parse` takes: `DDDD:BB:DD.F`, `DDDD.BB.DD.F`,
    /// `DDDD:BB:DD` (function 0), `BB:DD.F` and `BB.DD.F` (domain 0), `BB:DD` and `BB.DD`.
    /// Every field is hexadecimal; the whole string must match.
    fn from_str(s: &str) -> Result<PciAddr, TridError> {
        let err = || TridError::PciAddr(s.to_string());
        let (domain, bus, dev, func) = if let Some((head, func)) = s.rsplit_once('.') {
            // ...DD.F or DDDD.BB.DD.F / BB.DD.F / BB.DD
            let parts: Vec<&str> = head.split([':', '.']).collect();
            let colon = head.contains(':');
            let dotted = head.contains('.');
            if colon && dotted {
                return Err(err());
            }
            match parts.as_slice() {
                [d, b, v] => (hex(d), hex(b), hex(v), hex(func)),
                [b, v] => (Some(0), hex(b), hex(v), hex(func)),
                [b] if !colon => (Some(0), hex(b), hex(func), Some(0)),
                _ => return Err(err()),
            }
        } else {
            let parts: Vec<&str> = s.split(':').collect();
            match parts.as_slice() {
                [d, b, v] => (hex(d), hex(b), hex(v), Some(0)),
                [b, v] => (Some(0), hex(b), hex(v), Some(0)),
                _ => return Err(err()),
            }
        };
        let (Some(domain), Some(bus), Some(dev), Some(func)) = (domain, bus, dev, func) else {
            return Err(err());
        };
        if bus > 0xff || dev > 0x1f || func > 7 {
            return Err(err());
        }
        Ok(PciAddr {
            domain,
            bus: bus as u8,
            dev: dev as u8,
            func: func as u8,
        })
    }
}

/// Which controller a transport ID names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// A local PCIe controller bound to vfio-pci.
    Pcie(PciAddr),
    /// The built-in emulated controller.
    Emulated,
}

/// A parsed `-r` argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransportId {
    /// The controller.
    pub target: Target,
    /// One namespace, or `None` for every active namespace.
    pub nsid: Option<u32>,
}

impl FromStr for TransportId {
    type Err = TridError;

    fn from_str(s: &str) -> Result<TransportId, TridError> {
        let t = s.trim();
        if t.is_empty() {
            return Err(TridError::Empty);
        }
        if let Ok(addr) = t.parse::<PciAddr>() {
            return Ok(TransportId {
                target: Target::Pcie(addr),
                nsid: None,
            });
        }
        let mut trtype: Option<String> = None;
        let mut traddr: Option<PciAddr> = None;
        let mut nsid: Option<u32> = None;
        for tok in t.split([' ', '\t', '\n', ',']).filter(|x| !x.is_empty()) {
            let Some(i) = tok.find([':', '=']) else {
                return Err(TridError::NoSeparator(tok.to_string()));
            };
            let (key, val) = (&tok[..i], &tok[i + 1..]);
            let lkey = key.to_ascii_lowercase();
            if val.is_empty() {
                return Err(TridError::NoValue(key.to_string()));
            }
            let dup = || TridError::Duplicate(key.to_string());
            match lkey.as_str() {
                "trtype" => {
                    if trtype.is_some() {
                        return Err(dup());
                    }
                    trtype = Some(val.to_string());
                }
                "traddr" => {
                    if traddr.is_some() {
                        return Err(dup());
                    }
                    traddr = Some(val.parse()?);
                }
                "ns" => {
                    if nsid.is_some() {
                        return Err(dup());
                    }
                    let n: u32 = val.parse().map_err(|_| TridError::Nsid(val.to_string()))?;
                    if n == 0 || n == u32::MAX {
                        return Err(TridError::Nsid(val.to_string()));
                    }
                    nsid = Some(n);
                }
                "adrfam" | "trsvcid" | "subnqn" | "hostnqn" | "hostaddr" | "hostsvcid"
                | "alt_traddr" | "priority" => return Err(TridError::FabricsKey(key.to_string())),
                _ => return Err(TridError::UnknownKey(key.to_string())),
            }
        }
        let target = match trtype.as_deref().map(str::to_ascii_lowercase).as_deref() {
            None | Some("pcie") => Target::Pcie(traddr.ok_or(TridError::NoTraddr)?),
            Some("emulated") => {
                if traddr.is_some() {
                    return Err(TridError::EmulatedTraddr);
                }
                Target::Emulated
            }
            Some(_) => return Err(TridError::TrType(trtype.unwrap_or_default())),
        };
        Ok(TransportId { target, nsid })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pci(d: u32, b: u8, v: u8, f: u8) -> PciAddr {
        PciAddr {
            domain: d,
            bus: b,
            dev: v,
            func: f,
        }
    }

    #[test]
    fn pci_address_forms() {
        assert_eq!("0000:01:00.0".parse(), Ok(pci(0, 1, 0, 0)));
        assert_eq!("0000.d8.1f.7".parse(), Ok(pci(0, 0xd8, 0x1f, 7)));
        assert_eq!("0001:04:00".parse(), Ok(pci(1, 4, 0, 0)));
        assert_eq!("04:00.1".parse(), Ok(pci(0, 4, 0, 1)));
        assert_eq!("04.00.1".parse(), Ok(pci(0, 4, 0, 1)));
        assert_eq!("04:03".parse(), Ok(pci(0, 4, 3, 0)));
        assert_eq!("04.03".parse(), Ok(pci(0, 4, 3, 0)));
        assert_eq!(pci(0, 4, 0, 1).to_string(), "0000:04:00.1");
        for bad in [
            "",
            "zz:00.0",
            "0000:100:00.0",
            "0000:01:20.0",
            "0000:01:00.8",
            "1:2:3:4",
            "0000:01.00:0",
            "0000:01:00.0x",
        ] {
            assert!(bad.parse::<PciAddr>().is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn spdk_forms() {
        let want = TransportId {
            target: Target::Pcie(pci(0, 1, 0, 0)),
            nsid: Some(1),
        };
        assert_eq!("trtype:PCIe traddr:0000:01:00.0 ns:1".parse(), Ok(want));
        assert_eq!("TRTYPE=pcie,traddr=0000:01:00.0,NS=1".parse(), Ok(want));
        assert_eq!("  trtype:PCIe\ttraddr:01:00.0  ns=1 ".parse(), Ok(want));
        assert_eq!(
            "0000:01:00.0".parse(),
            Ok(TransportId {
                target: Target::Pcie(pci(0, 1, 0, 0)),
                nsid: None
            })
        );
        // trtype defaults to PCIe, as in SPDK.
        assert_eq!(
            "traddr:0000:01:00.0".parse(),
            Ok(TransportId {
                target: Target::Pcie(pci(0, 1, 0, 0)),
                nsid: None
            })
        );
        assert_eq!(
            "trtype:emulated ns:2".parse(),
            Ok(TransportId {
                target: Target::Emulated,
                nsid: Some(2)
            })
        );
    }

    #[test]
    fn errors() {
        let e = |s: &str| s.parse::<TransportId>().unwrap_err();
        assert_eq!(e(""), TridError::Empty);
        assert_eq!(e("trtype"), TridError::NoSeparator("trtype".into()));
        assert_eq!(
            e("trtype: traddr:0000:01:00.0"),
            TridError::NoValue("trtype".into())
        );
        assert_eq!(
            e("tradr:0000:01:00.0"),
            TridError::UnknownKey("tradr".into())
        );
        assert_eq!(
            e("trtype:TCP traddr:0000:01:00.0"),
            TridError::TrType("TCP".into())
        );
        assert_eq!(
            e("trtype:PCIe adrfam:IPv4"),
            TridError::FabricsKey("adrfam".into())
        );
        assert_eq!(
            e("trtype:PCIe traddr:0000:01:00.9"),
            TridError::PciAddr("0000:01:00.9".into())
        );
        assert_eq!(e("trtype:PCIe"), TridError::NoTraddr);
        assert_eq!(
            e("trtype:PCIe traddr:01:00.0 ns:0"),
            TridError::Nsid("0".into())
        );
        assert_eq!(
            e("trtype:PCIe traddr:01:00.0 ns:x"),
            TridError::Nsid("x".into())
        );
        assert_eq!(
            e("ns:1 ns:2 traddr:01:00.0"),
            TridError::Duplicate("ns".into())
        );
        assert_eq!(
            e("trtype:emulated traddr:01:00.0"),
            TridError::EmulatedTraddr
        );
        // Every message is one line.
        assert!(!e("tradr:1").to_string().contains('\n'));
    }
}
