//! Transport IDs in SPDK's syntax ([`TransportId`]), as the command-line tools take them (their
//! `-r` argument) and as the embedding API's `Builder::transport_id` does.
//!
//! SPDK writes a transport ID as whitespace- (or comma-) separated `key:value` pairs, and
//! also takes `key=value`: `'trtype:PCIe traddr:0000:01:00.0 ns:1'`. Keys are case-insensitive.
//! Dioxide knows the keys `trtype` (`PCIe`, `TCP`, or our `emulated` for the built-in emulated
//! controller), `traddr` (a PCI address, or for TCP an IP address), `ns` (one namespace instead
//! of every active one, for the tools: the embedding API refuses it, it serves every namespace
//! and the caller opens files on the ones it wants), and for TCP `adrfam` (`IPv4` or `IPv6`), `trsvcid` (the port, 4420 if
//! not given), `subnqn` (the subsystem; the discovery subsystem if not given, as in SPDK) and
//! `hostnqn`. As a shorthand, a bare PCI address (`0000:01:00.0`, `01:00.0`, ...) is read as
//! `trtype:PCIe traddr:<it>`.
//!
//! Where SPDK only logs an unknown key and goes on, we refuse it: a misspelt `traddr` would
//! otherwise silently test some other device.

use core::fmt;
use core::str::FromStr;
use std::net::{IpAddr, SocketAddr};

/// The NVMe/TCP port (IANA) used when `trsvcid` is not given.
pub const NVME_TCP_PORT: u16 = 4420;
/// The NQN of the discovery subsystem, used when `subnqn` is not given.
pub const DISCOVERY_NQN: &str = "nqn.2014-08.org.nvmexpress.discovery";

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
    #[error(
        "unknown transport ID key '{0}' (known keys: trtype, traddr, ns; for TCP also adrfam, trsvcid, subnqn, hostnqn)"
    )]
    UnknownKey(String),
    /// A key SPDK knows for fabrics, which Dioxide does not use.
    #[error(
        "key '{0}' is not supported (Dioxide's NVMe/TCP host takes adrfam, traddr, trsvcid, subnqn, hostnqn)"
    )]
    FabricsKey(String),
    /// A fabrics key on a PCIe or emulated transport ID.
    #[error("key '{0}' is for NVMe over Fabrics; add trtype:TCP for a remote controller")]
    NotFabrics(String),
    /// A `traddr` for TCP that is not an IP address.
    #[error(
        "'{0}' is not an IP address (trtype:TCP takes e.g. traddr:192.168.1.10; no host names)"
    )]
    IpAddr(String),
    /// An `adrfam` other than IPv4/IPv6, or one that does not match `traddr`.
    #[error("adrfam '{0}' does not fit (use adrfam:IPv4 or adrfam:IPv6, matching traddr)")]
    AdrFam(String),
    /// A `trsvcid` that is not a port.
    #[error("trsvcid '{0}' is not a TCP port (1 to 65535)")]
    Port(String),
    /// An NQN that is too long or not printable ASCII.
    #[error("'{0}' is not a valid NQN (at most 223 bytes of printable ASCII)")]
    Nqn(String),
    /// `trtype:TCP` without `traddr`.
    #[error(
        "trtype:TCP needs traddr:<IP address>, e.g. 'trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:4420 subnqn:NQN'"
    )]
    NoIpAddr,
    /// The same key twice.
    #[error("key '{0}' given twice")]
    Duplicate(String),
    /// A transport type other than PCIe, TCP or emulated.
    #[error(
        "transport type '{0}' is not supported (use trtype:PCIe, trtype:TCP or trtype:emulated)"
    )]
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
    /// An NVMe/TCP target (the subsystem is [`TransportId::subnqn`]).
    Tcp(SocketAddr),
}

/// A parsed `-r` argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportId {
    /// The controller.
    pub target: Target,
    /// One namespace, or `None` for every active namespace.
    pub nsid: Option<u32>,
    /// For TCP: the subsystem NQN (the discovery NQN if not given).
    pub subnqn: Option<String>,
    /// For TCP: the host NQN, if given.
    pub hostnqn: Option<String>,
}

impl TransportId {
    /// A transport ID of `target` alone.
    pub fn of(target: Target, nsid: Option<u32>) -> TransportId {
        TransportId {
            target,
            nsid,
            subnqn: None,
            hostnqn: None,
        }
    }
    /// The subsystem NQN of a TCP transport ID (the discovery NQN when not given).
    pub fn subnqn(&self) -> &str {
        self.subnqn.as_deref().unwrap_or(DISCOVERY_NQN)
    }
    /// The controller's name in reports, as SPDK writes it: `TCP (addr:127.0.0.1
    /// subnqn:nqn...)` for TCP; `None` for the others (named after they are opened).
    pub fn tcp_label(&self) -> Option<String> {
        match self.target {
            Target::Tcp(a) => Some(format!("TCP (addr:{} subnqn:{})", a.ip(), self.subnqn())),
            _ => None,
        }
    }
}

fn nqn(v: &str) -> Result<String, TridError> {
    if v.is_empty() || v.len() > 223 || !v.bytes().all(|b| (0x21..0x7f).contains(&b)) {
        return Err(TridError::Nqn(v.to_string()));
    }
    Ok(v.to_string())
}

impl FromStr for TransportId {
    type Err = TridError;

    fn from_str(s: &str) -> Result<TransportId, TridError> {
        let t = s.trim();
        if t.is_empty() {
            return Err(TridError::Empty);
        }
        if let Ok(addr) = t.parse::<PciAddr>() {
            return Ok(TransportId::of(Target::Pcie(addr), None));
        }
        let mut trtype: Option<String> = None;
        let mut traddr: Option<String> = None;
        let mut nsid: Option<u32> = None;
        let mut adrfam: Option<String> = None;
        let mut trsvcid: Option<String> = None;
        let mut subnqn: Option<String> = None;
        let mut hostnqn: Option<String> = None;
        for tok in t.split([' ', '\t', '\n', ',']).filter(|x| !x.is_empty()) {
            let Some(i) = tok.find([':', '=']) else {
                return Err(TridError::NoSeparator(tok.to_string()));
            };
            let (key, val) = (&tok[..i], &tok[i + 1..]);
            let lkey = key.to_ascii_lowercase();
            if val.is_empty() {
                return Err(TridError::NoValue(key.to_string()));
            }
            let slot = match lkey.as_str() {
                "trtype" => &mut trtype,
                "traddr" => &mut traddr,
                "adrfam" => &mut adrfam,
                "trsvcid" => &mut trsvcid,
                "subnqn" => &mut subnqn,
                "hostnqn" => &mut hostnqn,
                "ns" => {
                    if nsid.is_some() {
                        return Err(TridError::Duplicate(key.to_string()));
                    }
                    let n: u32 = val.parse().map_err(|_| TridError::Nsid(val.to_string()))?;
                    if n == 0 || n == u32::MAX {
                        return Err(TridError::Nsid(val.to_string()));
                    }
                    nsid = Some(n);
                    continue;
                }
                "hostaddr" | "hostsvcid" | "alt_traddr" | "priority" => {
                    return Err(TridError::FabricsKey(key.to_string()));
                }
                _ => return Err(TridError::UnknownKey(key.to_string())),
            };
            if slot.is_some() {
                return Err(TridError::Duplicate(key.to_string()));
            }
            *slot = Some(val.to_string());
        }
        let lower = trtype.as_deref().map(str::to_ascii_lowercase);
        if lower.as_deref() != Some("tcp") {
            let fabrics = [
                ("adrfam", &adrfam),
                ("trsvcid", &trsvcid),
                ("subnqn", &subnqn),
                ("hostnqn", &hostnqn),
            ];
            if let Some((k, _)) = fabrics.iter().find(|(_, v)| v.is_some()) {
                return Err(TridError::NotFabrics(k.to_string()));
            }
        }
        let target = match lower.as_deref() {
            None | Some("pcie") => {
                Target::Pcie(traddr.ok_or(TridError::NoTraddr)?.parse::<PciAddr>()?)
            }
            Some("emulated") => {
                if traddr.is_some() {
                    return Err(TridError::EmulatedTraddr);
                }
                Target::Emulated
            }
            Some("tcp") => {
                let a = traddr.ok_or(TridError::NoIpAddr)?;
                let ip: IpAddr = a.parse().map_err(|_| TridError::IpAddr(a.clone()))?;
                if let Some(f) = &adrfam {
                    let ok = match f.to_ascii_lowercase().as_str() {
                        "ipv4" => ip.is_ipv4(),
                        "ipv6" => ip.is_ipv6(),
                        _ => false,
                    };
                    if !ok {
                        return Err(TridError::AdrFam(f.clone()));
                    }
                }
                let port = match &trsvcid {
                    None => NVME_TCP_PORT,
                    Some(p) => match p.parse::<u16>() {
                        Ok(n) if n != 0 => n,
                        _ => return Err(TridError::Port(p.clone())),
                    },
                };
                Target::Tcp(SocketAddr::new(ip, port))
            }
            Some(_) => return Err(TridError::TrType(trtype.unwrap_or_default())),
        };
        Ok(TransportId {
            target,
            nsid,
            subnqn: subnqn.as_deref().map(nqn).transpose()?,
            hostnqn: hostnqn.as_deref().map(nqn).transpose()?,
        })
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
        let want = TransportId::of(Target::Pcie(pci(0, 1, 0, 0)), Some(1));
        assert_eq!(
            "trtype:PCIe traddr:0000:01:00.0 ns:1".parse(),
            Ok(want.clone())
        );
        assert_eq!(
            "TRTYPE=pcie,traddr=0000:01:00.0,NS=1".parse(),
            Ok(want.clone())
        );
        assert_eq!("  trtype:PCIe\ttraddr:01:00.0  ns=1 ".parse(), Ok(want));
        assert_eq!(
            "0000:01:00.0".parse(),
            Ok(TransportId::of(Target::Pcie(pci(0, 1, 0, 0)), None))
        );
        // trtype defaults to PCIe, as in SPDK.
        assert_eq!(
            "traddr:0000:01:00.0".parse(),
            Ok(TransportId::of(Target::Pcie(pci(0, 1, 0, 0)), None))
        );
        assert_eq!(
            "trtype:emulated ns:2".parse(),
            Ok(TransportId::of(Target::Emulated, Some(2)))
        );
    }

    #[test]
    fn tcp_forms() {
        let t: TransportId = "trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:4421 subnqn:nqn.2026-12.io.dioxide:a hostnqn:nqn.2026-12.io.dioxide:h ns:1"
            .parse()
            .unwrap();
        assert_eq!(t.target, Target::Tcp("127.0.0.1:4421".parse().unwrap()));
        assert_eq!(t.subnqn(), "nqn.2026-12.io.dioxide:a");
        assert_eq!(t.hostnqn.as_deref(), Some("nqn.2026-12.io.dioxide:h"));
        assert_eq!(t.nsid, Some(1));
        assert_eq!(
            t.tcp_label().unwrap(),
            "TCP (addr:127.0.0.1 subnqn:nqn.2026-12.io.dioxide:a)"
        );
        // Port 4420 and the discovery subsystem by default; IPv6.
        let t: TransportId = "trtype=tcp traddr=::1".parse().unwrap();
        assert_eq!(t.target, Target::Tcp("[::1]:4420".parse().unwrap()));
        assert_eq!(t.subnqn(), DISCOVERY_NQN);
        let e = |s: &str| s.parse::<TransportId>().unwrap_err();
        assert_eq!(e("trtype:TCP"), TridError::NoIpAddr);
        assert_eq!(
            e("trtype:TCP traddr:host.example"),
            TridError::IpAddr("host.example".into())
        );
        assert_eq!(
            e("trtype:TCP adrfam:IPv6 traddr:10.0.0.1"),
            TridError::AdrFam("IPv6".into())
        );
        assert_eq!(
            e("trtype:TCP traddr:10.0.0.1 trsvcid:0"),
            TridError::Port("0".into())
        );
        assert_eq!(
            e("trtype:TCP traddr:10.0.0.1 subnqn:a\u{7f}"),
            TridError::Nqn("a\u{7f}".into())
        );
        assert_eq!(
            e("trtype:TCP traddr:10.0.0.1 hostaddr:10.0.0.2"),
            TridError::FabricsKey("hostaddr".into())
        );
        assert_eq!(
            e("trtype:TCP traddr:1.2.3.4 trsvcid:1 trsvcid:2"),
            TridError::Duplicate("trsvcid".into())
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
            e("trtype:RDMA traddr:10.0.0.1"),
            TridError::TrType("RDMA".into())
        );
        assert_eq!(
            e("trtype:TCP traddr:0000:01:00.0"),
            TridError::IpAddr("0000:01:00.0".into())
        );
        assert_eq!(
            e("trtype:PCIe adrfam:IPv4"),
            TridError::NotFabrics("adrfam".into())
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
