//! The host's errors: every transport failure is named, every outstanding command ends exactly
//! once.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::mpsc;

use super::*;
use crate::nvmf::host::{HostData, HostError, HostQueue};
use crate::nvmf::pdu::{self, Fes, IcResp, Pdu, pdu_type};
use crate::nvmf::target::TargetOptions;
use crate::spec::Sqe;
use crate::spec::sqe::admin;

/// A fake target: answers the ICReq with `icresp` (with its digests replaced by the request's
/// if `echo`), then sends `then`, then reports the first PDU type the host sends back.
fn fake_target(echo: bool, then: Vec<u8>) -> (SocketAddr, mpsc::Receiver<Option<u8>>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut req = [0u8; 128];
        s.read_exact(&mut req).expect("ICReq");
        let digests = if echo {
            pdu::Digests::from_bits(req[11])
        } else {
            pdu::Digests::default()
        };
        let resp = Pdu::IcResp(IcResp {
            pfv: 0,
            cpda: 0,
            digests,
            maxh2cdata: 65536,
        });
        s.write_all(pdu::encode(&resp, 0, pdu::Digests::default(), 0).as_bytes())
            .expect("ICResp");
        s.write_all(&then).expect("garbage");
        let mut b = [0u8; 1];
        let got = loop {
            match s.read(&mut b) {
                Ok(1) if b[0] == pdu_type::CAPSULE_CMD => {
                    // Skip the rest of the command capsule.
                    let mut rest = [0u8; 71];
                    let _ = s.read_exact(&mut rest);
                }
                Ok(1) => break Some(b[0]),
                _ => break None,
            }
        };
        let _ = tx.send(got);
    });
    (addr, rx)
}

#[test]
fn transport_failures_are_named() {
    watchdog(
        "transport_failures_are_named",
        test_watchdog::INTEGRATION,
        || {
            // Refused connection.
            let addr = {
                let l = TcpListener::bind("127.0.0.1:0").expect("bind");
                l.local_addr().expect("addr")
            };
            let e = HostQueue::open(addr, &host_opts(Digests::default()), 8).unwrap_err();
            assert!(matches!(e, HostError::Refused { .. }), "{e}");
            assert!(e.to_string().contains("no NVMe/TCP target listens there"));

            // ICResp that does not echo the digests asked for.
            let (addr, _) = fake_target(false, Vec::new());
            let d = Digests {
                header: true,
                data: false,
            };
            let e = HostQueue::open(addr, &host_opts(d), 8).unwrap_err();
            assert!(matches!(e, HostError::IcResp(_)), "{e}");

            // A target that answers garbage: the host names it and sends an H2CTermReq.
            let mut garbage = vec![0x0au8, 0, 24, 0];
            garbage.extend_from_slice(&24u32.to_le_bytes());
            garbage.resize(24, 0xee);
            let (addr, seen) = fake_target(true, garbage);
            let mut q = HostQueue::open(addr, &host_opts(Digests::default()), 8).expect("open");
            q.submit(Sqe::flush(1), HostData::None, 1).expect("submit");
            let e = loop {
                match q.poll() {
                    Err(e) => break e,
                    Ok(_) => std::thread::sleep(Duration::from_millis(1)),
                }
            };
            match e {
                HostError::Protocol(f) => assert_eq!(f.fes, Fes::InvalidHeaderField),
                e => panic!("{e}"),
            }
            let lost = q.pop().expect("the outstanding command completes");
            assert_eq!(lost.tag, 1);
            assert!(matches!(lost.result, Err(HostError::Lost(_))));
            assert!(q.pop().is_none(), "exactly once");
            assert!(matches!(
                q.submit(Sqe::flush(1), HostData::None, 2),
                Err(HostError::Lost(_))
            ));
            assert_eq!(
                seen.recv_timeout(Duration::from_secs(10))
                    .expect("fake target"),
                Some(pdu_type::H2C_TERM_REQ)
            );
        },
    )
}

#[test]
fn c2h_term_req_and_a_vanished_target_fail_outstanding_commands_once() {
    watchdog(
        "c2h_term_req_and_a_vanished_target_fail_outstanding_commands_once",
        test_watchdog::INTEGRATION,
        || {
            let t = TestTarget::with_backend(mem_backend(), TargetOptions::default(), 1);
            // C2HTermReq: an AER is outstanding when the host sends a malformed PDU.
            let mut c = connect(&t, Digests::default());
            let q = c.admin();
            q.submit(Sqe::new(admin::ASYNC_EVENT_REQUEST), HostData::None, 5)
                .expect("AER");
            q.poll().expect("send the AER");
            let mut bad = pdu::encode(&Pdu::CapsuleCmd(Sqe::flush(1), 0), 0, Digests::default(), 0);
            bad.as_mut_bytes()[2] = 99;
            q.socket().write_all(bad.as_bytes()).expect("send");
            let e = loop {
                match q.poll() {
                    Err(e) => break e,
                    Ok(_) => std::thread::sleep(Duration::from_millis(1)),
                }
            };
            match e {
                HostError::Terminated { fes, fei } => {
                    assert_eq!((fes, fei), (Fes::InvalidHeaderField, pdu::field::HLEN))
                }
                e => panic!("{e}"),
            }
            let lost = q.pop().expect("the AER completes");
            assert_eq!(lost.tag, 5);
            assert!(matches!(lost.result, Err(HostError::Lost(_))));
            assert!(q.pop().is_none());
            // The target goes away with an AER outstanding.
            let mut c = connect(&t, Digests::default());
            let q = c.admin();
            q.submit(Sqe::new(admin::ASYNC_EVENT_REQUEST), HostData::None, 6)
                .expect("AER");
            q.poll().expect("send the AER");
            drop(t);
            let e = loop {
                match q.poll() {
                    Err(e) => break e,
                    Ok(_) => std::thread::sleep(Duration::from_millis(1)),
                }
            };
            assert!(matches!(e, HostError::Closed | HostError::Io(_)), "{e}");
            let lost = q.pop().expect("the AER completes");
            assert!(matches!(lost.result, Err(HostError::Lost(_))));
            assert!(q.pop().is_none());
        },
    )
}

#[test]
fn a_header_digest_mismatch_is_named_and_ends_the_queue() {
    watchdog(
        "a_header_digest_mismatch_is_named_and_ends_the_queue",
        test_watchdog::INTEGRATION,
        || {
            let d = Digests {
                header: true,
                data: false,
            };
            let cqe = crate::spec::Cqe::default();
            let mut resp = pdu::encode(&Pdu::CapsuleResp(cqe), 0, d, 0);
            let n = resp.as_bytes().len();
            resp.as_mut_bytes()[n - 1] ^= 0xff;
            let (addr, _seen) = fake_target(true, resp.as_bytes().to_vec());
            let mut q = HostQueue::open(addr, &host_opts(d), 8).expect("open");
            q.submit(Sqe::flush(1), HostData::None, 1).expect("submit");
            let e = loop {
                match q.poll() {
                    Err(e) => break e,
                    Ok(_) => std::thread::sleep(Duration::from_millis(1)),
                }
            };
            assert!(matches!(e, HostError::HeaderDigest), "{e}");
            assert!(e.to_string().contains("header digest mismatch"));
            let lost = q.pop().expect("the outstanding command completes");
            assert_eq!(lost.tag, 1);
            match lost.result {
                Err(HostError::Lost(why)) => assert!(why.contains("header digest"), "{why}"),
                r => panic!("{r:?}"),
            }
            assert!(q.pop().is_none(), "exactly once");
        },
    )
}

/// A fake target: answers the ICReq (no digests, MAXH2CDATA 4096), waits for the host's
/// first command capsule header, sends `then`, and reports every byte the host sent (after its
/// ICReq) until it closes the connection.
fn scripted_target(then: Vec<u8>) -> (SocketAddr, mpsc::Receiver<Vec<u8>>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut req = [0u8; 128];
        s.read_exact(&mut req).expect("ICReq");
        let resp = Pdu::IcResp(IcResp {
            pfv: 0,
            cpda: 0,
            digests: pdu::Digests::default(),
            maxh2cdata: 4096,
        });
        s.write_all(pdu::encode(&resp, 0, pdu::Digests::default(), 0).as_bytes())
            .expect("ICResp");
        let mut got = vec![0u8; pdu::CMD_HLEN];
        s.read_exact(&mut got).expect("command capsule");
        s.write_all(&then).expect("script");
        let _ = s.read_to_end(&mut got);
        let _ = tx.send(got);
    });
    (addr, rx)
}

/// The PDU types in `bytes` (whole PDUs, as the host framed them).
fn pdu_types(bytes: &[u8]) -> Vec<u8> {
    let mut at = 0;
    let mut types = Vec::new();
    while at + 8 <= bytes.len() {
        types.push(bytes[at]);
        let plen = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().expect("4 bytes"));
        at += plen.max(8) as usize;
    }
    assert_eq!(at, bytes.len(), "the host sent whole PDUs");
    types
}

fn r2t(offset: u32, len: u32) -> Vec<u8> {
    let r = Pdu::R2t(pdu::R2t {
        cccid: 0,
        ttag: 7,
        offset,
        len,
    });
    pdu::encode(&r, 0, Digests::default(), 0)
        .as_bytes()
        .to_vec()
}

#[test]
fn an_r2t_the_host_did_not_invite_ends_the_connection() {
    watchdog(
        "an_r2t_the_host_did_not_invite_ends_the_connection",
        test_watchdog::INTEGRATION,
        || {
            // Each script ends with a success response for the write: a host that accepted
            // the R2Ts would complete the write successfully.
            let ok = pdu::encode(
                &Pdu::CapsuleResp(crate::spec::Cqe::default()),
                0,
                Digests::default(),
                0,
            )
            .as_bytes()
            .to_vec();
            let cases: [(&str, Vec<Vec<u8>>, u32, Fes); 4] = [
                // The write's data went in-capsule.
                ("in-capsule", vec![r2t(0, 512)], 8192, Fes::SequenceError),
                // The same bytes asked for twice.
                (
                    "overlap",
                    vec![r2t(0, 4096), r2t(0, 4096)],
                    0,
                    Fes::InvalidHeaderField,
                ),
                // A gap.
                ("gap", vec![r2t(4096, 4096)], 0, Fes::InvalidHeaderField),
                // A second R2T while the first one's data is still queued (MAXR2T is 1);
                // before the host checked, a target could make it queue copies without end.
                (
                    "over MAXR2T",
                    vec![r2t(0, 4096), r2t(4096, 4096)],
                    0,
                    Fes::DataLimitExceeded,
                ),
            ];
            for (name, r2ts, in_capsule, fes) in cases {
                let mut script: Vec<u8> = r2ts.concat();
                script.extend_from_slice(&ok);
                let (addr, seen) = scripted_target(script);
                let mut q = HostQueue::open(addr, &host_opts(Digests::default()), 8).expect("open");
                q.set_in_capsule(in_capsule);
                let sqe = Sqe::rw(crate::spec::sqe::io::WRITE, 1, 0, 16, false);
                q.submit(sqe, HostData::Out(vec![0x5a; 8192]), 1)
                    .expect("submit");
                let e = loop {
                    match q.poll() {
                        Err(e) => break e,
                        Ok(_) => std::thread::sleep(Duration::from_millis(1)),
                    }
                };
                match e {
                    HostError::Protocol(f) => assert_eq!(f.fes, fes, "{name}: {f:?}"),
                    e => panic!("{name}: {e}"),
                }
                let lost = q.pop().expect("the write completes");
                assert_eq!(lost.tag, 1);
                assert!(matches!(lost.result, Err(HostError::Lost(_))), "{name}");
                assert!(q.pop().is_none(), "{name}: exactly once");
                let sent = seen.recv_timeout(Duration::from_secs(10)).expect("target");
                let types = pdu_types(&sent);
                assert_eq!(types.first(), Some(&pdu_type::CAPSULE_CMD), "{name}");
                assert_eq!(types.last(), Some(&pdu_type::H2C_TERM_REQ), "{name}");
                let h2c = types.iter().filter(|&&t| t == pdu_type::H2C_DATA).count();
                assert!(h2c <= 1, "{name}: {types:?}");
            }
        },
    )
}
