//! Bad input: each malformed PDU gets the C2HTermReq the specification names, each bad command
//! the status it names; the target keeps serving the other hosts, and nothing is written
//! outside a command's range.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use super::*;
use crate::Nsid;
use crate::nvmf::fabrics::{self, Sgl, sc as fsc};
use crate::nvmf::host::{HostData, HostError, HostQueue};
use crate::nvmf::pdu::{self, DataHdr, Fes, Pdu, field, pdu_type};
use crate::nvmf::target::{Subsystem, Target, TargetOptions};
use crate::spec::sqe::io as opc;
use crate::spec::status::generic;
use crate::spec::{Sct, Sqe};

/// A socket past ICReq/ICResp (and Connect of I/O queue `(cntlid, qid)` if given), blocking,
/// with a read timeout.
fn raw(t: &TestTarget, d: Digests, queue: Option<(u16, u16)>) -> TcpStream {
    let opts = host_opts(d);
    let mut q = HostQueue::open(t.addr, &opts, 8).expect("ICReq");
    if let Some((cntlid, qid)) = queue {
        q.connect(&opts, qid, 8, cntlid).expect("Connect");
    }
    let s = q.socket().try_clone().expect("clone the socket");
    drop(q);
    s.set_nonblocking(false).expect("blocking");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    s
}

/// Reads one whole PDU; `None` at end of stream.
fn read_pdu(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut ch = [0u8; 8];
    let mut got = 0;
    while got < 8 {
        match s.read(&mut ch[got..]) {
            Ok(0) => return None,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
            Err(e) => panic!("reading a PDU: {e}"),
        }
    }
    let plen = u32::from_le_bytes([ch[4], ch[5], ch[6], ch[7]]) as usize;
    let mut v = ch.to_vec();
    v.resize(plen.max(8), 0);
    s.read_exact(&mut v[8..]).expect("rest of the PDU");
    Some(v)
}

/// Reads PDUs until a C2HTermReq: its FES, FEI and data; then the connection must close.
fn expect_term(s: &mut TcpStream) -> (Fes, u32, Vec<u8>) {
    loop {
        let p = read_pdu(s).expect("a C2HTermReq before the close");
        if p[0] == pdu_type::C2H_TERM_REQ {
            assert_eq!(p[2], 24, "TermReq HLEN");
            let fes = Fes::from_u16(u16::from_le_bytes([p[8], p[9]]));
            let fei = u32::from_le_bytes([p[10], p[11], p[12], p[13]]);
            assert!(
                read_pdu(s).is_none(),
                "the target closes after a C2HTermReq"
            );
            return (fes, fei, p[24..].to_vec());
        }
    }
}

/// The response capsule of the next PDU.
fn expect_resp(s: &mut TcpStream) -> crate::spec::Cqe {
    let p = read_pdu(s).expect("a response");
    assert_eq!(p[0], pdu_type::CAPSULE_RESP, "{p:02x?}");
    pdu::cqe_from_bytes(&p[8..24])
}

fn cmd_bytes(sqe: Sqe, data: &[u8], d: Digests) -> Vec<u8> {
    let mut v = pdu::encode(
        &Pdu::CapsuleCmd(sqe, data.len() as u32),
        data.len() as u32,
        d,
        0,
    )
    .as_bytes()
    .to_vec();
    v.extend_from_slice(data);
    if d.data && !data.is_empty() {
        v.extend_from_slice(&pdu::crc32c(data).to_le_bytes());
    }
    v
}

fn write_sqe(lba: u64, blocks: u32, sgl: Sgl, cid: u16) -> Sqe {
    let mut s = Sqe::rw(opc::WRITE, 1, lba, blocks, false);
    s.set_cid(cid);
    sgl.set(&mut s);
    s
}

/// A connected host that must keep working through every bad input.
struct Bystander {
    _c: crate::nvmf::host::HostController,
    q: HostQueue,
    round: u64,
}

impl Bystander {
    fn new(t: &TestTarget) -> Bystander {
        let mut c = connect(t, Digests::default());
        let q = c.io_queue(8).expect("I/O queue");
        Bystander { _c: c, q, round: 0 }
    }
    fn check(&mut self) {
        self.round += 1;
        let p = pattern(self.round, 4096);
        self.q
            .write(2, 200, p.clone(), 4096)
            .expect("bystander write");
        assert_eq!(self.q.read(2, 200, 1, 4096).expect("bystander read"), p);
    }
}

#[test]
fn malformed_headers_get_the_named_c2h_term_req() {
    watchdog(
        "malformed_headers_get_the_named_c2h_term_req",
        test_watchdog::INTEGRATION,
        || {
            let t = TestTarget::with_backend(mem_backend(), TargetOptions::default(), 2);
            let mut by = Bystander::new(&t);
            let d = Digests::default();
            let good = cmd_bytes(Sqe::flush(1), &[], d);
            let cases: Vec<(&str, Vec<u8>, Fes, u32)> = vec![
                (
                    "unknown type",
                    {
                        let mut b = good.clone();
                        b[0] = 0x0a;
                        b
                    },
                    Fes::InvalidHeaderField,
                    field::TYPE,
                ),
                (
                    "a C2H type from the host",
                    {
                        let mut b = good.clone();
                        b[0] = pdu_type::R2T;
                        b
                    },
                    Fes::InvalidHeaderField,
                    field::TYPE,
                ),
                (
                    "wrong HLEN",
                    {
                        let mut b = good.clone();
                        b[2] = 64;
                        b
                    },
                    Fes::InvalidHeaderField,
                    field::HLEN,
                ),
                (
                    "PDO without data",
                    {
                        let mut b = good.clone();
                        b[3] = 72;
                        b
                    },
                    Fes::InvalidHeaderField,
                    field::PDO,
                ),
                (
                    "PLEN short",
                    {
                        let mut b = good.clone();
                        b[4] = 40;
                        b
                    },
                    Fes::InvalidHeaderField,
                    field::PLEN,
                ),
                (
                    "reserved flag",
                    {
                        let mut b = good.clone();
                        b[1] = 0x10;
                        b
                    },
                    Fes::InvalidHeaderField,
                    field::FLAGS,
                ),
                (
                    "digest flag not negotiated",
                    {
                        let mut b = good.clone();
                        b[1] = 1;
                        b
                    },
                    Fes::InvalidHeaderField,
                    field::FLAGS,
                ),
                (
                    "in-capsule data beyond 8 KiB",
                    cmd_bytes(write_sqe(0, 24, Sgl::incapsule(12288), 1), &[0u8; 12288], d),
                    Fes::DataLimitExceeded,
                    field::PLEN,
                ),
                (
                    "a second ICReq",
                    pdu::encode(
                        &Pdu::IcReq(pdu::IcReq {
                            pfv: 0,
                            hpda: 0,
                            digests: d,
                            maxr2t: 0,
                        }),
                        0,
                        d,
                        0,
                    )
                    .as_bytes()
                    .to_vec(),
                    Fes::SequenceError,
                    0,
                ),
            ];
            for (what, bytes, fes, fei) in cases {
                let mut s = raw(&t, d, None);
                s.write_all(&bytes).expect("send");
                let (got_fes, got_fei, hdr) = expect_term(&mut s);
                assert_eq!((got_fes, got_fei), (fes, fei), "{what}");
                // The TermReq carries the offending header back.
                assert_eq!(&hdr[..], &bytes[..hdr.len()], "{what}");
                assert!(!hdr.is_empty(), "{what}");
                by.check();
            }
            // An H2CTermReq: the target closes without answering.
            let mut s = raw(&t, d, None);
            let term = pdu::encode(
                &Pdu::H2cTermReq(pdu::TermReq {
                    fes: Fes::HeaderDigest,
                    fei: 0,
                }),
                0,
                d,
                0,
            );
            s.write_all(term.as_bytes()).expect("send");
            assert!(read_pdu(&mut s).is_none());
            by.check();
            // A PDU before ICReq.
            let mut s = TcpStream::connect(t.addr).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            s.write_all(&good).expect("send");
            assert_eq!(expect_term(&mut s).0, Fes::SequenceError);
            // ICReq with an unsupported PFV.
            let mut s = TcpStream::connect(t.addr).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            let mut ic = pdu::encode(
                &Pdu::IcReq(pdu::IcReq {
                    pfv: 0,
                    hpda: 0,
                    digests: d,
                    maxr2t: 0,
                }),
                0,
                d,
                0,
            );
            ic.as_mut_bytes()[8] = 1;
            s.write_all(ic.as_bytes()).expect("send");
            assert_eq!(expect_term(&mut s).0, Fes::UnsupportedParameter);
            by.check();
            t.stop();
        },
    )
}

#[test]
fn digest_errors() {
    watchdog("digest_errors", test_watchdog::INTEGRATION, || {
        let mem = mem_backend();
        let t = TestTarget::with_backend(mem.clone(), TargetOptions::default(), 1);
        let mut by = Bystander::new(&t);
        let mut c = connect(&t, Digests::default());
        // Header digest mismatch: C2HTermReq Header Digest Error.
        let d = Digests {
            header: true,
            data: true,
        };
        let mut s = raw(&t, d, Some((c.cntlid(), 1)));
        let mut b = cmd_bytes(Sqe::flush(1), &[], d);
        b[30] ^= 4;
        s.write_all(&b).expect("send");
        assert_eq!(expect_term(&mut s).0, Fes::HeaderDigest);
        by.check();
        // Data digest mismatch on in-capsule data: Transient Transport Error, nothing written.
        let mut s = raw(&t, d, Some((c.cntlid(), 2)));
        let data = pattern(5, 512);
        let mut b = cmd_bytes(write_sqe(77, 1, Sgl::incapsule(512), 9), &data, d);
        let last = b.len() - 1;
        b[last] ^= 0x40;
        s.write_all(&b).expect("send");
        let cqe = expect_resp(&mut s);
        assert_eq!(cqe.cid, 9);
        // SQ head: Connect was entry 0, this write entry 1.
        assert_eq!(cqe.sq_head, 2);
        assert_eq!(cqe.status().sc, fsc::TRANSIENT_TRANSPORT_ERROR);
        assert!(
            mem.snapshot(Nsid(1))[77 * 512..78 * 512]
                .iter()
                .all(|&x| x == 0)
        );
        // The connection goes on: the same write with a good digest lands.
        s.write_all(&cmd_bytes(
            write_sqe(77, 1, Sgl::incapsule(512), 10),
            &data,
            d,
        ))
        .expect("send");
        let cqe = expect_resp(&mut s);
        assert!(cqe.status().is_success());
        assert_eq!(cqe.sq_head, 3);
        assert_eq!(&mem.snapshot(Nsid(1))[77 * 512..78 * 512], &data[..]);
        by.check();
        let _ = c.keep_alive();
        t.stop();
    })
}

/// Sends a write needing an R2T on a raw connected queue; returns the R2T's TTAG.
fn write_wanting_r2t(s: &mut TcpStream, lba: u64, bytes: u32, cid: u16) -> u16 {
    let sqe = write_sqe(lba, bytes / 512, Sgl::transport(bytes), cid);
    s.write_all(&cmd_bytes(sqe, &[], Digests::default()))
        .expect("send");
    let p = read_pdu(s).expect("R2T");
    assert_eq!(p[0], pdu_type::R2T, "{p:02x?}");
    assert_eq!(u16::from_le_bytes([p[8], p[9]]), cid);
    assert_eq!(u32::from_le_bytes([p[16], p[17], p[18], p[19]]), bytes);
    u16::from_le_bytes([p[10], p[11]])
}

fn h2c(cid: u16, ttag: u16, offset: u32, data: &[u8], last: bool) -> Vec<u8> {
    let d = DataHdr {
        cccid: cid,
        ttag,
        offset,
        len: data.len() as u32,
        last,
        success: false,
    };
    let mut v = pdu::encode(&Pdu::H2cData(d), data.len() as u32, Digests::default(), 0)
        .as_bytes()
        .to_vec();
    v.extend_from_slice(data);
    v
}

#[test]
fn h2c_data_for_an_unknown_tag_or_past_the_command() {
    watchdog(
        "h2c_data_for_an_unknown_tag_or_past_the_command",
        test_watchdog::INTEGRATION,
        || {
            let mem = mem_backend();
            let t = TestTarget::with_backend(mem.clone(), TargetOptions::default(), 1);
            let mut by = Bystander::new(&t);
            let c = connect(&t, Digests::default());
            let d = Digests::default();
            // Unknown transfer tag.
            let mut s = raw(&t, d, Some((c.cntlid(), 1)));
            let ttag = write_wanting_r2t(&mut s, 100, 16384, 3);
            s.write_all(&h2c(3, ttag.wrapping_add(1), 0, &[1u8; 4096], false))
                .expect("send");
            assert_eq!(expect_term(&mut s).0, Fes::InvalidHeaderField);
            by.check();
            // A tag that is not a slot at all.
            let mut s = raw(&t, d, Some((c.cntlid(), 2)));
            let _ = write_wanting_r2t(&mut s, 100, 16384, 3);
            s.write_all(&h2c(3, 0xfff0, 0, &[1u8; 4096], false))
                .expect("send");
            assert_eq!(expect_term(&mut s).1, field::TTAG);
            // Out of order: the first PDU must start at offset 0.
            let mut s = raw(&t, d, Some((c.cntlid(), 4)));
            let ttag = write_wanting_r2t(&mut s, 100, 16384, 6);
            let pdu = h2c(6, ttag, 4096, &[3u8; 4096], false);
            s.write_all(&pdu).expect("send");
            let (fes, fei, hdr) = expect_term(&mut s);
            assert_eq!((fes, fei), (Fes::InvalidHeaderField, field::DATAO));
            assert_eq!(&hdr[..], &pdu[..24]);
            // Past the command's length.
            let mut s = raw(&t, d, Some((c.cntlid(), 3)));
            let ttag = write_wanting_r2t(&mut s, 100, 16384, 4);
            s.write_all(&h2c(4, ttag, 0, &[2u8; 12288], false))
                .expect("send");
            s.write_all(&h2c(4, ttag, 12288, &[2u8; 8192], true))
                .expect("send");
            assert_eq!(expect_term(&mut s).0, Fes::DataOutOfRange);
            // Nothing of either write reached the namespace.
            assert!(
                mem.snapshot(Nsid(1))[100 * 512..132 * 512]
                    .iter()
                    .all(|&x| x == 0)
            );
            by.check();
            t.stop();
        },
    )
}

/// A host that takes an R2T and sends none (or only part) of the data does not hold the
/// target's buffers forever: after `h2c_data_timeout` without an H2CData PDU the connection
/// gets a C2HTermReq (PDU Sequence Error, no header: no PDU was wrong, one never came) and
/// ends, its place and buffers freed; nothing of the write lands; other hosts go on.
#[test]
fn an_r2t_whose_data_never_comes_ends_the_connection_after_the_h2c_deadline() {
    watchdog(
        "an_r2t_whose_data_never_comes_ends_the_connection_after_the_h2c_deadline",
        test_watchdog::INTEGRATION,
        || {
            let mem = mem_backend();
            let opts = TargetOptions {
                h2c_data_timeout: Duration::from_millis(300),
                housekeeping: Duration::from_millis(10),
                ..TargetOptions::default()
            };
            let t = TestTarget::with_backend(mem.clone(), opts, 1);
            let mut by = Bystander::new(&t);
            let c = connect(&t, Digests::default());
            let held = t.target.connection_count();
            for (qid, partial) in [(1u16, false), (2, true)] {
                let mut s = raw(&t, Digests::default(), Some((c.cntlid(), qid)));
                let ttag = write_wanting_r2t(&mut s, 400, 65536, 9);
                if partial {
                    // One PDU of four, then half of the next, then silence.
                    s.write_all(&h2c(9, ttag, 0, &[0xdd; 16384], false))
                        .expect("send");
                    let mut half = h2c(9, ttag, 16384, &[0xdd; 16384], false);
                    half.truncate(3000);
                    s.write_all(&half).expect("send");
                }
                let (fes, _, data) = expect_term(&mut s);
                assert_eq!(fes, Fes::SequenceError, "qid {qid}");
                assert!(data.is_empty(), "no header of the host's to blame");
                // The connection is gone: its place under the limits (and its buffers with it;
                // the watchdog fails the test if it stays).
                while t.target.connection_count() != held {
                    std::thread::sleep(Duration::from_millis(5));
                }
                by.check();
            }
            assert!(mem.snapshot(Nsid(1)).iter().all(|&x| x != 0xdd));
            let reasons = t.stop();
            assert_eq!(
                reasons
                    .iter()
                    .filter(|r| r.contains("h2c_data_timeout"))
                    .count(),
                2,
                "{reasons:?}"
            );
        },
    )
}

#[test]
fn host_vanishing_mid_transfer_writes_nothing() {
    watchdog(
        "host_vanishing_mid_transfer_writes_nothing",
        test_watchdog::INTEGRATION,
        || {
            let mem = mem_backend();
            let t = TestTarget::with_backend(mem.clone(), TargetOptions::default(), 2);
            let mut by = Bystander::new(&t);
            let mut c = connect(&t, Digests::default());
            let mut s = raw(&t, Digests::default(), Some((c.cntlid(), 1)));
            let ttag = write_wanting_r2t(&mut s, 300, 65536, 5);
            s.write_all(&h2c(5, ttag, 0, &[0xee; 16384], false))
                .expect("send");
            // Half a PDU, then gone.
            let mut half = h2c(5, ttag, 16384, &[0xee; 16384], false);
            half.truncate(5000);
            s.write_all(&half).expect("send");
            drop(s);
            by.check();
            // The association goes on on its other queues; nothing of the write landed.
            let mut q = c.io_queue(8).expect("another I/O queue");
            assert!(
                q.read(1, 300, 128, 512)
                    .expect("read")
                    .iter()
                    .all(|&x| x == 0)
            );
            assert!(mem.snapshot(Nsid(1)).iter().all(|&x| x == 0));
            c.keep_alive().expect("keep alive");
            t.stop();
        },
    )
}

#[test]
fn more_commands_than_sqsize_get_a_c2h_term_req() {
    watchdog(
        "more_commands_than_sqsize_get_a_c2h_term_req",
        test_watchdog::INTEGRATION,
        || {
            let t = TestTarget::with_backend(mem_backend(), TargetOptions::default(), 1);
            let mut by = Bystander::new(&t);
            let c = connect(&t, Digests::default());
            // An 8-entry queue (SQSIZE 7): eight writes wait for their data, the ninth is one too
            // many.
            let mut s = raw(&t, Digests::default(), Some((c.cntlid(), 1)));
            for cid in 0..9u16 {
                let sqe = write_sqe(cid as u64 * 32, 32, Sgl::transport(16384), cid);
                s.write_all(&cmd_bytes(sqe, &[], Digests::default()))
                    .expect("send");
            }
            assert_eq!(expect_term(&mut s).0, Fes::SequenceError);
            by.check();
            t.stop();
        },
    )
}

#[test]
fn bad_commands_get_the_named_status() {
    watchdog(
        "bad_commands_get_the_named_status",
        test_watchdog::INTEGRATION,
        || {
            let mem = mem_backend();
            let target = Target::new(TargetOptions::default());
            target.add_subsystem(Subsystem::new(SUBNQN, mem.clone()));
            target.add_subsystem(
                Subsystem::new("nqn.2026-12.io.dioxide:locked", mem_backend())
                    .allow_host("nqn.2026-12.io.dioxide:the-one"),
            );
            let t = TestTarget::start(target, 1);
            let mut by = Bystander::new(&t);
            let opts = host_opts(Digests::default());
            // I/O before Connect: Command Sequence Error.
            let mut q = HostQueue::open(t.addr, &opts, 8).expect("ICReq");
            let e = q.read(1, 0, 1, 512).unwrap_err();
            assert!(
                is_status(&e, Sct::Generic, generic::COMMAND_SEQUENCE_ERROR),
                "{e}"
            );
            // Connect to a subsystem that does not exist: Invalid Parameters, SUBNQN in the data.
            let mut o = opts.clone();
            o.subnqn = "nqn.2026-12.io.dioxide:nope".into();
            let mut q = HostQueue::open(t.addr, &o, 8).expect("ICReq");
            match q.connect(&o, 0, 8, fabrics::CNTLID_DYNAMIC).unwrap_err() {
                HostError::Status { status, dw0, .. } => {
                    assert_eq!(
                        (status.sct, status.sc),
                        (Sct::CommandSpecific, fsc::CONNECT_INVALID_PARAMETERS)
                    );
                    assert_eq!(
                        dw0,
                        fabrics::invalid_param_in_data(fabrics::connect_data::SUBNQN)
                    );
                }
                e => panic!("{e}"),
            }
            // A host not allowed: Connect Invalid Host.
            let mut o = opts.clone();
            o.subnqn = "nqn.2026-12.io.dioxide:locked".into();
            let mut q = HostQueue::open(t.addr, &o, 8).expect("ICReq");
            let e = q.connect(&o, 0, 8, fabrics::CNTLID_DYNAMIC).unwrap_err();
            assert!(
                is_status(&e, Sct::CommandSpecific, fsc::CONNECT_INVALID_HOST),
                "{e}"
            );
            // ... and the allowed one gets in.
            o.hostnqn = "nqn.2026-12.io.dioxide:the-one".into();
            let mut ok =
                crate::nvmf::host::HostController::connect(t.addr, o).expect("allowed host");
            // A stale controller ID: the association is gone.
            let c = connect(&t, Digests::default());
            let stale = c.cntlid();
            c.shutdown().expect("shutdown");
            let mut q = HostQueue::open(t.addr, &opts, 8).expect("ICReq");
            match q.connect(&opts, 1, 8, stale).unwrap_err() {
                HostError::Status { status, dw0, .. } => {
                    assert_eq!(status.sc, fsc::CONNECT_INVALID_PARAMETERS);
                    assert_eq!(
                        dw0,
                        fabrics::invalid_param_in_data(fabrics::connect_data::CNTLID)
                    );
                }
                e => panic!("{e}"),
            }
            // SQSIZE 0, and SQSIZE beyond MAXCMD: Invalid Parameters, SQSIZE in the command.
            for entries in [1u16, 1024] {
                let mut q = HostQueue::open(t.addr, &opts, 8).expect("ICReq");
                match q
                    .connect(&opts, 0, entries, fabrics::CNTLID_DYNAMIC)
                    .unwrap_err()
                {
                    HostError::Status { status, dw0, .. } => {
                        assert_eq!(status.sc, fsc::CONNECT_INVALID_PARAMETERS);
                        assert_eq!(dw0, fabrics::invalid_param_in_cmd(44));
                    }
                    e => panic!("{e}"),
                }
            }
            // An I/O queue ID beyond the queues granted.
            let c = connect(&t, Digests::default());
            let mut q = HostQueue::open(t.addr, &opts, 8).expect("ICReq");
            let e = q.connect(&opts, 1000, 8, c.cntlid()).unwrap_err();
            assert!(
                is_status(&e, Sct::CommandSpecific, fsc::CONNECT_INVALID_PARAMETERS),
                "{e}"
            );
            // LBA past the namespace, an unknown namespace, a transfer above MDTS.
            let mut c = connect(&t, Digests::default());
            let mut q = c.io_queue(8).expect("I/O queue");
            let e = q.write(1, 8190, vec![0xaa; 2048], 512).unwrap_err();
            assert!(
                is_status(&e, Sct::Generic, generic::LBA_OUT_OF_RANGE),
                "{e}"
            );
            let e = q.write(1, 8100, vec![0xaa; 65536], 512).unwrap_err();
            assert!(
                is_status(&e, Sct::Generic, generic::LBA_OUT_OF_RANGE),
                "{e}"
            );
            let e = q.read(1, 8191, 2, 512).unwrap_err();
            assert!(
                is_status(&e, Sct::Generic, generic::LBA_OUT_OF_RANGE),
                "{e}"
            );
            let e = q.read(9, 0, 1, 512).unwrap_err();
            assert!(
                is_status(&e, Sct::Generic, generic::INVALID_NAMESPACE),
                "{e}"
            );
            let e = q.read(1, 0, 512, 512).unwrap_err();
            assert!(is_status(&e, Sct::Generic, generic::INVALID_FIELD), "{e}");
            // A write whose SGL length disagrees with its block count.
            let sqe = Sqe::rw(opc::WRITE, 1, 0, 2, false);
            let e = q
                .run("short SGL", sqe, HostData::Out(vec![1; 512]))
                .unwrap_err();
            assert!(
                is_status(&e, Sct::Generic, fsc::DATA_SGL_LENGTH_INVALID),
                "{e}"
            );
            // Nothing was written anywhere.
            assert!(mem.snapshot(Nsid(1)).iter().all(|&x| x == 0));
            by.check();
            ok.keep_alive().expect("the allowed host still works");
            t.stop();
        },
    )
}

#[test]
fn c2h_data_honours_the_host_pdu_data_alignment() {
    watchdog(
        "c2h_data_honours_the_host_pdu_data_alignment",
        test_watchdog::INTEGRATION,
        || {
            let t = TestTarget::with_backend(mem_backend(), TargetOptions::default(), 1);
            let d = Digests {
                header: true,
                data: false,
            };
            let mut s = TcpStream::connect(t.addr).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            // HPDA 7: C2HData must start 32-byte aligned.
            let ic = pdu::IcReq {
                pfv: 0,
                hpda: 7,
                digests: d,
                maxr2t: 0,
            };
            s.write_all(pdu::encode(&Pdu::IcReq(ic), 0, d, 0).as_bytes())
                .expect("ICReq");
            let resp = read_pdu(&mut s).expect("ICResp");
            assert_eq!(
                (resp[0], resp[10], resp[11]),
                (pdu_type::IC_RESP, 0, d.bits())
            );
            let mut sqe = fabrics::Connect {
                recfmt: 0,
                qid: 0,
                sqsize: 31,
                cattr: 0,
                kato: 0,
            }
            .to_sqe();
            sqe.set_cid(1);
            Sgl::incapsule(1024).set(&mut sqe);
            let data = fabrics::ConnectData {
                hostid: [1; 16],
                cntlid: fabrics::CNTLID_DYNAMIC,
                subnqn: SUBNQN.into(),
                hostnqn: HOSTNQN.into(),
            }
            .to_bytes();
            s.write_all(&cmd_bytes(sqe, &data, d)).expect("Connect");
            let p = read_pdu(&mut s).expect("Connect response");
            assert_eq!(p[0], pdu_type::CAPSULE_RESP);
            assert!(pdu::cqe_from_bytes(&p[8..24]).status().is_success());
            let mut id = Sqe::identify(1, 0, 0);
            id.set_cid(2);
            Sgl::transport(4096).set(&mut id);
            s.write_all(&cmd_bytes(id, &[], d)).expect("Identify");
            let p = read_pdu(&mut s).expect("C2HData");
            assert_eq!(p[0], pdu_type::C2H_DATA);
            assert_eq!(p[3], 32, "PDO: 24-byte header, 4-byte digest, padded to 32");
            assert_eq!(p.len(), 32 + 4096);
            assert_eq!(&p[32 + 768..32 + 768 + SUBNQN.len()], SUBNQN.as_bytes());
            let r = read_pdu(&mut s).expect("response");
            assert_eq!(r[0], pdu_type::CAPSULE_RESP);
            t.stop();
        },
    )
}

#[test]
fn get_log_page_length_is_checked_against_the_sgl_and_the_transfer_limit() {
    watchdog(
        "get_log_page_length_is_checked_against_the_sgl_and_the_transfer_limit",
        Duration::from_secs(60),
        || {
            let t = TestTarget::with_backend(mem_backend(), TargetOptions::default(), 1);
            let mut c = connect(&t, Digests::default());
            // NUMD of 4 KiB, a data SGL of 512 bytes.
            let e = c
                .admin()
                .run(
                    "Get Log Page",
                    fabrics::get_log_page(2, 0xffff_ffff, 4096, 0),
                    HostData::In(vec![0u8; 512]),
                )
                .expect_err("SGL length != NUMD");
            assert!(
                is_status(&e, Sct::Generic, fsc::DATA_SGL_LENGTH_INVALID),
                "{e}"
            );
            // Above the maximum transfer size.
            let max = TargetOptions::default().max_transfer;
            let e = c
                .log_page(2, 0xffff_ffff, max + 4096, 0)
                .expect_err("above the transfer limit");
            assert!(is_status(&e, Sct::Generic, generic::INVALID_FIELD), "{e}");
            // The requested length, zero-filled past the page.
            let l = c.log_page(2, 0xffff_ffff, 1024, 0).expect("SMART log");
            assert_eq!(l.len(), 1024);
            assert_eq!(&l[512..], &[0u8; 512][..]);
            t.stop();
        },
    );
}

/// A backend whose Reads complete with Success and a buffer shorter than the Read.
struct ShortReads(std::sync::Arc<MemBackend>);

impl Backend for ShortReads {
    fn namespaces(&self) -> Vec<crate::nvmf::backend::NsInfo> {
        self.0.namespaces()
    }
    fn alloc(&self, len: usize) -> Option<crate::IoBuffer> {
        self.0.alloc(len)
    }
    fn submit(
        &self,
        io: crate::nvmf::backend::BackendIo,
        done: crate::nvmf::backend::IoCompletion,
    ) {
        if matches!(io.op, crate::nvmf::backend::BackendOp::Read) {
            done.complete(
                crate::spec::Status::SUCCESS,
                Some(crate::IoBuffer::Heap(vec![0u8; 100])),
            );
        } else {
            self.0.submit(io, done);
        }
    }
}

#[test]
fn a_read_completed_without_its_data_fails_with_data_transfer_error() {
    watchdog(
        "a_read_completed_without_its_data_fails_with_data_transfer_error",
        Duration::from_secs(60),
        || {
            let t = TestTarget::with_backend(
                std::sync::Arc::new(ShortReads(mem_backend())),
                TargetOptions::default(),
                1,
            );
            let mut c = connect(&t, Digests::default());
            let mut q = c.io_queue(8).expect("I/O queue");
            let e = q.read(1, 0, 8, 512).expect_err("a short Read buffer");
            assert!(
                is_status(&e, Sct::Generic, generic::DATA_TRANSFER_ERROR),
                "{e}"
            );
            // The queue goes on.
            q.write(1, 0, pattern(3, 4096), 512).expect("write");
            drop(q);
            t.stop();
        },
    );
}

#[test]
fn an_io_queue_of_another_host_id_is_connect_invalid_host() {
    watchdog(
        "an_io_queue_of_another_host_id_is_connect_invalid_host",
        Duration::from_secs(60),
        || {
            let t = TestTarget::with_backend(mem_backend(), TargetOptions::default(), 1);
            let mut c = connect(&t, Digests::default());
            let mut o = host_opts(Digests::default());
            o.hostid[0] ^= 0xff;
            let mut q = HostQueue::open(t.addr, &o, 8).expect("ICReq");
            match q.connect(&o, 1, 8, c.cntlid()).unwrap_err() {
                HostError::Status { status, dw0, .. } => {
                    assert_eq!(
                        (status.sct, status.sc),
                        (Sct::CommandSpecific, fsc::CONNECT_INVALID_HOST)
                    );
                    assert_eq!(
                        dw0,
                        fabrics::invalid_param_in_data(fabrics::connect_data::HOSTID)
                    );
                }
                e => panic!("{e}"),
            }
            drop(q);
            // The host's own Host Identifier gets its queue.
            let mut q = c.io_queue(8).expect("I/O queue of the same host");
            q.write(2, 0, pattern(4, 4096), 4096).expect("write");
            drop(q);
            drop(c);
            t.stop();
        },
    );
}
