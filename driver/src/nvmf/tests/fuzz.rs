//! A property test over the target's connection state machine: after a valid ICReq and
//! Connect, arbitrary sequences of command capsules (any opcode, any fields, with or without
//! data), H2CData PDUs (any tag, offset, length) and raw garbage never panic the target, every
//! poll returns, and nothing lands outside the ranges the valid writes of the sequence name.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;

use proptest::prelude::*;

use super::{HOSTNQN, SUBNQN};
use crate::Nsid;
use crate::nvmf::backend::MemBackend;
use crate::nvmf::fabrics::{self, Sgl};
use crate::nvmf::pdu::{self, DataHdr, Digests, IcReq, Pdu};
use crate::nvmf::target::conn::Connection;
use crate::nvmf::target::{Subsystem, Target, TargetOptions};
use crate::spec::Sqe;

#[derive(Clone, Debug)]
enum Step {
    /// A command capsule: opcode, NSID, CDW10..12, SGL (kind, length), in-capsule data length.
    Cmd(u8, u32, [u32; 3], (bool, u32), u16),
    /// H2CData: CID, TTAG, offset, length, LAST.
    Data(u16, u16, u32, u16, bool),
    /// Raw bytes.
    Garbage(Vec<u8>),
}

fn step() -> impl Strategy<Value = Step> {
    let opcode = prop_oneof![
        Just(0x00u8),
        Just(0x01),
        Just(0x02),
        Just(0x08),
        Just(0x09),
        Just(0x06),
        Just(0x7f),
        Just(0x0c),
        Just(0x18),
        any::<u8>(),
    ];
    prop_oneof![
        4 => (
            opcode,
            prop_oneof![Just(1u32), Just(2), any::<u32>()],
            [0u32..20_000, 0u32..4, 0u32..300],
            (any::<bool>(), prop_oneof![Just(0u32), Just(512), Just(4096), 0u32..200_000]),
            prop_oneof![Just(0u16), Just(512), 0u16..9000],
        )
            .prop_map(|(o, n, c, s, d)| Step::Cmd(o, n, c, s, d)),
        2 => (0u16..8, 0u16..200, 0u32..70_000, 0u16..20_000, any::<bool>())
            .prop_map(|(c, t, o, l, last)| Step::Data(c, t, o, l, last)),
        1 => proptest::collection::vec(any::<u8>(), 0..64).prop_map(Step::Garbage),
    ]
}

fn bytes_of(step: &Step, cid: u16) -> Vec<u8> {
    let d = Digests::default();
    match step {
        Step::Cmd(op, nsid, c, (incap, len), dlen) => {
            let mut s = Sqe::new(*op);
            s.set_cid(cid);
            s.nsid = *nsid;
            s.cdw10 = c[0];
            s.cdw11 = c[1];
            s.cdw12 = c[2];
            if *incap {
                Sgl::incapsule(*len).set(&mut s);
            } else {
                Sgl::transport(*len).set(&mut s);
            }
            let data = vec![0xa5u8; *dlen as usize];
            let mut v = pdu::encode(&Pdu::CapsuleCmd(s, *dlen as u32), *dlen as u32, d, 0)
                .as_bytes()
                .to_vec();
            v.extend_from_slice(&data);
            v
        }
        Step::Data(c, t, o, l, last) => {
            let h = DataHdr {
                cccid: *c,
                ttag: *t,
                offset: *o,
                len: *l as u32,
                last: *last,
                success: false,
            };
            let mut v = pdu::encode(&Pdu::H2cData(h), *l as u32, d, 0)
                .as_bytes()
                .to_vec();
            v.resize(v.len() + *l as usize, 0x5a);
            v
        }
        Step::Garbage(g) => g.clone(),
    }
}

/// Polls the connection and drains the client side until neither makes progress.
fn pump(conn: &mut Connection, client: &mut TcpStream) {
    let mut buf = vec![0u8; 65536];
    let mut idle = 0;
    for _ in 0..20_000 {
        let mut w = conn.poll();
        match client.read(&mut buf) {
            Ok(n) if n > 0 => w += 1,
            _ => {}
        }
        if w == 0 {
            idle += 1;
            if idle > 50 {
                return;
            }
            std::thread::sleep(std::time::Duration::from_micros(100));
        } else {
            idle = 0;
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn target_survives_arbitrary_pdu_sequences(
        steps in proptest::collection::vec(step(), 1..24),
        queue in 0u8..3,
    ) {
        let _w = test_watchdog::arm(test_watchdog::STRESS);
        let mem = Arc::new(MemBackend::new(&[(512, 1024), (4096, 64)]));
        let target = Target::new(TargetOptions {
            max_queue_depth: 8,
            ..TargetOptions::default()
        });
        target.add_subsystem(Subsystem::new(SUBNQN, mem.clone()));
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut client = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (server, _) = l.accept().expect("accept");
        let mut conn = Connection::new(target.clone(), server, None).expect("connection");
        client.set_nonblocking(true).expect("non-blocking");
        let d = Digests::default();
        let ic = Pdu::IcReq(IcReq { pfv: 0, hpda: 0, digests: d, maxr2t: 0 });
        client.write_all(pdu::encode(&ic, 0, d, 0).as_bytes()).expect("ICReq");
        // Leave the queue unconnected (0), connect it as an admin queue (1), or as I/O queue 1
        // of an enabled controller (2).
        let (qid, cntlid) = if queue == 2 {
            let sub = target.subsystem(SUBNQN).expect("subsystem");
            let ctrl = target
                .new_ctrl(sub, HOSTNQN.into(), [2; 16], 0)
                .expect("controller");
            let cc = crate::spec::Cc(0).with_en(true).with_iosqes(6).with_iocqes(4);
            ctrl.property_set(fabrics::prop::CC, false, cc.0 as u64).expect("CC.EN");
            (1, ctrl.cntlid)
        } else {
            (0, fabrics::CNTLID_DYNAMIC)
        };
        let mut sqe = fabrics::Connect { recfmt: 0, qid, sqsize: 7, cattr: 0, kato: 0 }.to_sqe();
        sqe.set_cid(100);
        Sgl::incapsule(1024).set(&mut sqe);
        let data = fabrics::ConnectData {
            hostid: [2; 16],
            cntlid,
            subnqn: SUBNQN.into(),
            hostnqn: HOSTNQN.into(),
        }
        .to_bytes();
        let mut v = pdu::encode(&Pdu::CapsuleCmd(sqe, 1024), 1024, d, 0).as_bytes().to_vec();
        v.extend_from_slice(&data);
        if queue > 0 {
            client.write_all(&v).expect("Connect");
        }
        pump(&mut conn, &mut client);
        let want = [None, Some(0), Some(1)][queue as usize];
        prop_assert_eq!(conn.qid(), want);
        for (i, s) in steps.iter().enumerate() {
            let b = bytes_of(s, i as u16 % 8);
            // The peer may have closed on us: a failed write ends the sequence.
            if client.write_all(&b).is_err() {
                break;
            }
            pump(&mut conn, &mut client);
            if conn.is_closed() {
                break;
            }
        }
        drop(client);
        for _ in 0..1000 {
            if conn.is_closed() {
                break;
            }
            conn.poll();
            std::thread::sleep(std::time::Duration::from_micros(100));
        }
        prop_assert!(conn.is_closed(), "the connection outlived its peer");
        // Only an I/O queue can write, and only the bytes this test sends (0xa5 in capsules,
        // 0x5a in H2CData); elsewhere the namespaces stay untouched.
        for nsid in [1, 2] {
            let snap = mem.snapshot(Nsid(nsid));
            if queue == 2 {
                prop_assert!(snap.iter().all(|&x| x == 0 || x == 0xa5 || x == 0x5a));
            } else {
                prop_assert!(snap.iter().all(|&x| x == 0));
            }
        }
    }
}
