use std::io::{self, Read};

use proptest::prelude::*;

use super::*;

/// A non-blocking stream: hands out `chunk` bytes per read and says `WouldBlock` between reads,
/// then end-of-stream.
struct Trickle {
    data: Vec<u8>,
    pos: usize,
    chunk: usize,
    block: bool,
}

impl Trickle {
    fn new(data: Vec<u8>, chunk: usize) -> Trickle {
        Trickle {
            data,
            pos: 0,
            chunk: chunk.max(1),
            block: false,
        }
    }
}

impl Read for Trickle {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.block = !self.block;
        if self.block && self.pos < self.data.len() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = buf.len().min(self.chunk).min(self.data.len() - self.pos);
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

fn target_cfg(d: Digests) -> RecvConfig {
    RecvConfig {
        role: Role::Controller,
        ic_done: true,
        digests: d,
        pda: 0,
        max_incapsule: 8192,
        max_data: 65536,
    }
}

fn host_cfg(d: Digests) -> RecvConfig {
    RecvConfig {
        role: Role::Host,
        ..target_cfg(d)
    }
}

/// A whole PDU on the wire: header, data and data digest.
fn wire(pdu: &Pdu, data: &[u8], d: Digests, pda: u8) -> Vec<u8> {
    let h = encode(pdu, data.len() as u32, d, pda);
    let mut v = h.as_bytes().to_vec();
    v.extend_from_slice(data);
    let digested = !matches!(
        pdu,
        Pdu::IcReq(_) | Pdu::IcResp(_) | Pdu::H2cTermReq(_) | Pdu::C2hTermReq(_)
    );
    if d.data && digested && !data.is_empty() {
        v.extend_from_slice(&crc32c(data).to_le_bytes());
    }
    v
}

/// A decoded PDU, its data, and whether its data digest matched.
type Decoded = (Pdu, Vec<u8>, bool);

/// Decodes every PDU of a stream: (pdu, data, digest_ok) or the first error.
fn decode_all(cfg: RecvConfig, bytes: Vec<u8>, chunk: usize) -> (Vec<Decoded>, Option<RecvError>) {
    let mut r = PduReader::new(cfg);
    let mut rx = RxBuf::new(256);
    let mut src = Trickle::new(bytes, chunk);
    let mut out = Vec::new();
    let mut spins = 0;
    loop {
        spins += 1;
        assert!(spins < 1_000_000, "decoder made no progress");
        let pdu = match r.poll_header(&mut rx, &mut src) {
            Ok(Some(p)) => p,
            Ok(None) => continue,
            Err(e) => return (out, Some(e)),
        };
        let n = r.data_len() as usize;
        let mut data = vec![0u8; n];
        let mut ok = true;
        if n > 0 {
            loop {
                match r.poll_data(&mut rx, &mut src, &mut data) {
                    Ok(Some(k)) => {
                        ok = k;
                        break;
                    }
                    Ok(None) => continue,
                    Err(e) => return (out, Some(e)),
                }
            }
        }
        out.push((pdu, data, ok));
    }
}

fn sample_sqe() -> Sqe {
    let mut s = Sqe::rw(crate::spec::sqe::io::WRITE, 1, 0x1234_5678_9abc, 8, false);
    s.set_cid(0x42);
    s.prp2 = 0x5a << 56 | 4096;
    s
}

fn samples() -> Vec<(RecvConfig, Pdu, Vec<u8>)> {
    let d = Digests::default();
    let data: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
    vec![
        (
            RecvConfig::new(Role::Controller),
            Pdu::IcReq(IcReq {
                pfv: 0,
                hpda: 0,
                digests: Digests {
                    header: true,
                    data: true,
                },
                maxr2t: 0,
            }),
            vec![],
        ),
        (
            RecvConfig::new(Role::Host),
            Pdu::IcResp(IcResp {
                pfv: 0,
                cpda: 0,
                digests: d,
                maxh2cdata: 0x40_0000,
            }),
            vec![],
        ),
        (
            target_cfg(d),
            Pdu::CapsuleCmd(sample_sqe(), 4096),
            data[..4096].to_vec(),
        ),
        (target_cfg(d), Pdu::CapsuleCmd(sample_sqe(), 0), vec![]),
        (
            target_cfg(d),
            Pdu::H2cData(DataHdr {
                cccid: 9,
                ttag: 3,
                offset: 8192,
                len: 5000,
                last: true,
                success: false,
            }),
            data.clone(),
        ),
        (
            host_cfg(d),
            Pdu::C2hData(DataHdr {
                cccid: 9,
                ttag: 0,
                offset: 0,
                len: 100,
                last: true,
                success: true,
            }),
            data[..100].to_vec(),
        ),
        (
            host_cfg(d),
            Pdu::CapsuleResp(Cqe {
                dw0: 1,
                dw1: 2,
                sq_head: 3,
                sq_id: 4,
                cid: 5,
                status: 6,
            }),
            vec![],
        ),
        (
            host_cfg(d),
            Pdu::R2t(R2t {
                cccid: 1,
                ttag: 2,
                offset: 0,
                len: 65536,
            }),
            vec![],
        ),
        (
            host_cfg(d),
            Pdu::C2hTermReq(TermReq {
                fes: Fes::HeaderDigest,
                fei: 0,
            }),
            vec![7u8; 24],
        ),
    ]
}

#[test]
fn crc32c_is_castagnoli() {
    // The CRC-32C check value (RFC 3720 / iSCSI).
    assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    assert_eq!(crc32c_append(crc32c(b"1234"), b"56789"), 0xe306_9283);
    assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
}

#[test]
fn every_pdu_round_trips_with_and_without_digests_over_partial_reads() {
    for (header, data_dg) in [(false, false), (true, false), (false, true), (true, true)] {
        let d = Digests {
            header,
            data: data_dg,
        };
        for (mut cfg, pdu, data) in samples() {
            if cfg.ic_done {
                cfg.digests = d;
            }
            let bytes = wire(&pdu, &data, cfg.digests, 0);
            for chunk in [1, 3, 7, 64, 100_000] {
                let (got, err) = decode_all(cfg, bytes.clone(), chunk);
                assert!(matches!(err, Some(RecvError::Closed)), "{pdu:?}: {err:?}");
                assert_eq!(got.len(), 1, "{pdu:?}");
                assert_eq!(got[0].0, pdu);
                assert_eq!(got[0].1, data);
                assert!(got[0].2);
            }
        }
    }
}

#[test]
fn several_pdus_back_to_back_with_alignment() {
    let d = Digests {
        header: true,
        data: true,
    };
    let mut cfg = host_cfg(d);
    cfg.pda = 7; // 32-byte aligned data
    let mut bytes = Vec::new();
    let mut want = Vec::new();
    for i in 0..20u32 {
        let data = vec![i as u8; 100 + i as usize];
        let pdu = Pdu::C2hData(DataHdr {
            cccid: i as u16,
            ttag: 0,
            offset: 0,
            len: data.len() as u32,
            last: true,
            success: false,
        });
        let w = wire(&pdu, &data, d, 7);
        assert_eq!(w[3], 32, "PDO aligned to 32");
        bytes.extend_from_slice(&w);
        want.push((pdu, data));
    }
    let (got, err) = decode_all(cfg, bytes, 13);
    assert!(matches!(err, Some(RecvError::Closed)));
    assert_eq!(got.len(), 20);
    for (g, w) in got.iter().zip(want) {
        assert_eq!((g.0, g.1.clone()), w);
    }
}

fn first_error(cfg: RecvConfig, bytes: Vec<u8>) -> FatalError {
    match decode_all(cfg, bytes, 1000).1 {
        Some(RecvError::Fatal(e)) => e,
        other => panic!("expected a fatal error, got {other:?}"),
    }
}

#[test]
fn header_violations_get_the_status_the_specification_names() {
    let d = Digests::default();
    let cfg = target_cfg(d);
    let cmd = wire(&Pdu::CapsuleCmd(sample_sqe(), 0), &[], d, 0);
    // Unknown type, and a controller-to-host type sent to the controller.
    for ty in [0x08u8, 0x0a, 0xff, pdu_type::C2H_DATA, pdu_type::R2T] {
        let mut b = cmd.clone();
        b[0] = ty;
        let e = first_error(cfg, b);
        assert_eq!((e.fes, e.fei), (Fes::InvalidHeaderField, field::TYPE));
    }
    // Wrong HLEN.
    let mut b = cmd.clone();
    b[2] = 24;
    assert_eq!(first_error(cfg, b).fei, field::HLEN);
    // PDO on a PDU without data.
    let mut b = cmd.clone();
    b[3] = 72;
    assert_eq!(first_error(cfg, b).fei, field::PDO);
    // PLEN shorter than the header.
    let mut b = cmd.clone();
    b[4] = 10;
    assert_eq!(first_error(cfg, b).fei, field::PLEN);
    // Reserved flag.
    let mut b = cmd.clone();
    b[1] = flags::LAST;
    assert_eq!(first_error(cfg, b).fei, field::FLAGS);
    // Header digest flag without negotiation.
    let mut b = cmd.clone();
    b[1] = flags::HDGST;
    assert_eq!(first_error(cfg, b).fei, field::FLAGS);
    // In-capsule data above the limit.
    let big = wire(&Pdu::CapsuleCmd(sample_sqe(), 9000), &[0; 9000], d, 0);
    assert_eq!(first_error(cfg, big).fes, Fes::DataLimitExceeded);
    // Wrong PDO with data.
    let mut b = wire(&Pdu::CapsuleCmd(sample_sqe(), 16), &[0; 16], d, 0);
    b[3] = 76;
    assert_eq!(first_error(cfg, b).fei, field::PDO);
    // DATAL differing from the PDU length.
    let h2c = Pdu::H2cData(DataHdr {
        cccid: 1,
        ttag: 1,
        offset: 0,
        len: 16,
        last: true,
        success: false,
    });
    let mut b = wire(&h2c, &[1; 16], d, 0);
    b[16] = 17;
    assert_eq!(first_error(cfg, b).fei, field::DATAL);
    // A capsule before ICReq.
    let e = first_error(RecvConfig::new(Role::Controller), cmd.clone());
    assert_eq!(e.fes, Fes::SequenceError);
    // A second ICReq.
    let icreq = Pdu::IcReq(IcReq {
        pfv: 0,
        hpda: 0,
        digests: d,
        maxr2t: 0,
    });
    assert_eq!(
        first_error(cfg, wire(&icreq, &[], d, 0)).fes,
        Fes::SequenceError
    );
    // Unsupported PFV.
    let mut b = wire(&icreq, &[], d, 0);
    b[8] = 1;
    let e = first_error(RecvConfig::new(Role::Controller), b);
    assert_eq!((e.fes, e.fei), (Fes::UnsupportedParameter, field::PFV));
    // ICResp with MAXH2CDATA below 4096, or not a multiple of 4.
    for max in [4092u32, 4098] {
        let resp = Pdu::IcResp(IcResp {
            pfv: 0,
            cpda: 0,
            digests: d,
            maxh2cdata: max,
        });
        let e = first_error(RecvConfig::new(Role::Host), wire(&resp, &[], d, 0));
        assert_eq!(e.fei, field::MAXDATA);
    }
}

#[test]
fn digest_errors() {
    let d = Digests {
        header: true,
        data: true,
    };
    let cfg = target_cfg(d);
    let data = vec![0x5au8; 512];
    let good = wire(&Pdu::CapsuleCmd(sample_sqe(), 512), &data, d, 0);
    // A flipped bit in the command: header digest error.
    let mut b = good.clone();
    b[20] ^= 1;
    assert_eq!(first_error(cfg, b).fes, Fes::HeaderDigest);
    // A flipped bit in the data: delivered, digest reported bad (not fatal).
    let mut b = good.clone();
    let at = b.len() - 10;
    b[at] ^= 0x80;
    let (got, err) = decode_all(cfg, b, 17);
    assert!(matches!(err, Some(RecvError::Closed)));
    assert_eq!(got.len(), 1);
    assert!(!got[0].2);
    // A flipped bit in the data digest itself.
    let mut b = good;
    let last = b.len() - 1;
    b[last] ^= 1;
    assert!(!decode_all(cfg, b, 5).0[0].2);
}

#[test]
fn discard_skips_data_and_checks_digest() {
    let d = Digests {
        header: false,
        data: true,
    };
    let cfg = target_cfg(d);
    let mut bytes = wire(&Pdu::CapsuleCmd(sample_sqe(), 3000), &[9; 3000], d, 0);
    bytes.extend(wire(&Pdu::CapsuleCmd(sample_sqe(), 0), &[], d, 0));
    let mut r = PduReader::new(cfg);
    let mut rx = RxBuf::new(300);
    let mut src = Trickle::new(bytes, 200);
    let mut seen = 0;
    loop {
        match r.poll_header(&mut rx, &mut src) {
            Ok(Some(_)) => {
                seen += 1;
                while r.data_len() > 0 {
                    if let Some(ok) = r.poll_discard(&mut rx, &mut src).unwrap() {
                        assert!(ok);
                        break;
                    }
                }
            }
            Ok(None) => {}
            Err(RecvError::Closed) => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(seen, 2);
}

/// Every error the decoder may give on garbage: a fatal error with a status the specification
/// defines for a receiver to send, or end of stream.
fn error_is_sane(e: &RecvError) -> bool {
    match e {
        RecvError::Fatal(f) => {
            matches!(
                f.fes,
                Fes::InvalidHeaderField
                    | Fes::SequenceError
                    | Fes::HeaderDigest
                    | Fes::DataOutOfRange
                    | Fes::DataLimitExceeded
                    | Fes::UnsupportedParameter
            ) && (f.fes != Fes::InvalidHeaderField || f.fei < IC_HLEN as u32)
        }
        RecvError::Closed => true,
        RecvError::Io(_) => false,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..600),
        chunk in 1usize..64,
        host in any::<bool>(),
        hd in any::<bool>(),
        dd in any::<bool>(),
        ic_done in any::<bool>(),
    ) {
        let d = Digests { header: hd, data: dd };
        let mut cfg = if host { host_cfg(d) } else { target_cfg(d) };
        cfg.ic_done = ic_done;
        let (got, err) = decode_all(cfg, bytes, chunk);
        let err = err.expect("a finite stream ends with an error or end of stream");
        prop_assert!(error_is_sane(&err), "{err:?}");
        for (_, data, _) in got {
            prop_assert!(data.len() <= 65536);
        }
    }

    #[test]
    fn mutated_valid_pdus_never_panic_and_are_caught(
        which in 0usize..9,
        hd in any::<bool>(),
        dd in any::<bool>(),
        pos in any::<prop::sample::Index>(),
        xor in 1u8..=255,
        chunk in 1usize..40,
    ) {
        let d = Digests { header: hd, data: dd };
        let (mut cfg, pdu, data) = samples().swap_remove(which);
        if cfg.ic_done {
            cfg.digests = d;
        }
        let mut bytes = wire(&pdu, &data, cfg.digests, 0);
        let i = pos.index(bytes.len());
        bytes[i] ^= xor;
        let hdr_len = encode(&pdu, data.len() as u32, cfg.digests, 0).as_bytes().len();
        let (got, err) = decode_all(cfg, bytes, chunk);
        let err = err.expect("stream ends");
        prop_assert!(error_is_sane(&err), "{err:?}");
        // With both digests on, no corruption of a digested PDU goes unnoticed.
        let digested = !matches!(pdu, Pdu::IcReq(_) | Pdu::IcResp(_) | Pdu::C2hTermReq(_));
        if hd && dd && digested {
            let caught = !matches!(err, RecvError::Closed)
                || got.iter().any(|(_, _, ok)| !ok)
                || got.len() != 1
                || got[0].0 != pdu;
            prop_assert!(caught, "corruption at byte {i} (header {hdr_len}) passed unnoticed");
        }
    }
}
