//! The lifecycle of queues and associations: commands at the backend drain before a queue's
//! state goes (host gone, Disconnect, controller reset, shutdown), data buffers are taken only
//! when an R2T goes out and wait when memory is short, the connection limits and the Connect
//! timeout.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::*;
use crate::Nsid;
use crate::nvmf::backend::{BackendIo, IoCompletion, NsInfo};
use crate::nvmf::fabrics::{self, prop};
use crate::nvmf::host::{HostData, HostQueue};
use crate::spec::regs::shst;
use crate::spec::sqe::io as opc;
use crate::spec::{Csts, Sqe};

/// Polls `cond` until it holds (the test watchdog bounds the wait).
fn until(mut cond: impl FnMut() -> bool) {
    while !cond() {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A backend whose I/O can be held at the "device": while `hold` is set, a command is kept
/// (nothing of it done) until [`release`](Gate::release) runs it on the memory backend, as a
/// slow device would finish it later.
struct Gate {
    mem: Arc<MemBackend>,
    hold: AtomicBool,
    held: Mutex<Vec<(BackendIo, IoCompletion)>>,
    /// SMART / Health log reads held.
    held_smart: Mutex<Vec<IoCompletion>>,
}

impl Gate {
    fn new() -> Arc<Gate> {
        Arc::new(Gate {
            mem: mem_backend(),
            hold: AtomicBool::new(false),
            held: Mutex::new(Vec::new()),
            held_smart: Mutex::new(Vec::new()),
        })
    }
    fn held(&self) -> usize {
        self.held.lock().expect("held").len()
    }
    /// Runs every held command now.
    fn release(&self) {
        let held = std::mem::take(&mut *self.held.lock().expect("held"));
        for (io, done) in held {
            self.mem.submit(io, done);
        }
        let smart = std::mem::take(&mut *self.held_smart.lock().expect("held"));
        for done in smart {
            self.mem.smart_log(done);
        }
    }
}

impl Backend for Gate {
    fn namespaces(&self) -> Vec<NsInfo> {
        self.mem.namespaces()
    }
    fn alloc(&self, len: usize) -> Option<crate::IoBuffer> {
        self.mem.alloc(len)
    }
    fn submit(&self, io: BackendIo, done: IoCompletion) {
        if self.hold.load(Ordering::SeqCst) {
            self.held.lock().expect("held").push((io, done));
        } else {
            self.mem.submit(io, done);
        }
    }
    fn smart_log(&self, done: IoCompletion) {
        if self.hold.load(Ordering::SeqCst) {
            self.held_smart.lock().expect("held").push(done);
        } else {
            self.mem.smart_log(done);
        }
    }
}

fn write(lba: u64, seed: u64) -> (Sqe, HostData) {
    (
        Sqe::rw(opc::WRITE, 1, lba, 8, false),
        HostData::Out(pattern(seed, 4096)),
    )
}

/// Submits a write that the gate holds, and waits until it is held (later commands are not).
fn held_write(gate: &Gate, q: &mut HostQueue, lba: u64, seed: u64, tag: u64) {
    gate.hold.store(true, Ordering::SeqCst);
    let before = gate.held();
    let (sqe, data) = write(lba, seed);
    q.submit(sqe, data, tag).expect("submit");
    until(|| {
        let _ = q.poll();
        gate.held() > before
    });
    gate.hold.store(false, Ordering::SeqCst);
}

fn property(c: &mut HostController, sqe: Sqe) -> u32 {
    c.admin()
        .run("property", sqe, HostData::None)
        .expect("property")
        .0
        .dw0
}

#[test]
fn a_vanished_hosts_commands_drain_before_its_controller_id_is_reused() {
    watchdog(
        "a_vanished_hosts_commands_drain_before_its_controller_id_is_reused",
        test_watchdog::INTEGRATION,
        || {
            let gate = Gate::new();
            let t = TestTarget::with_backend(gate.clone(), TargetOptions::default(), 2);
            let mut c = connect(&t, Digests::default());
            let old = c.cntlid();
            let mut q = c.io_queue(8).expect("I/O queue");
            q.write(1, 0, pattern(1, 4096), 512).expect("write");
            // A write in flight at the device, then the host is gone (both sockets).
            held_write(&gate, &mut q, 0, 2, 7);
            drop(q);
            drop(c);
            until(|| t.target.controller(old).is_none());
            assert_eq!(t.target.draining_controller_count(), 1);
            // The draining controller takes no new I/O queue (a stale CNTLID).
            let o = host_opts(Digests::default());
            let mut stale = HostQueue::open(t.addr, &o, 8).expect("ICReq");
            match stale.connect(&o, 1, 8, old) {
                Err(crate::nvmf::host::HostError::Status { status, dw0, .. }) => {
                    assert_eq!(
                        (status.sct, status.sc),
                        (
                            crate::spec::Sct::CommandSpecific,
                            fabrics::sc::CONNECT_INVALID_PARAMETERS
                        )
                    );
                    assert_eq!(
                        dw0,
                        fabrics::invalid_param_in_data(fabrics::connect_data::CNTLID)
                    );
                }
                r => panic!("an I/O queue of a draining controller: {r:?}"),
            }
            drop(stale);
            // A new association does not get the CNTLID while the old one drains, and sees
            // the old data.
            t.target.set_next_cntlid(old);
            let mut c2 = connect(&t, Digests::default());
            assert_ne!(c2.cntlid(), old);
            let mut q2 = c2.io_queue(8).expect("I/O queue");
            assert_eq!(q2.read(1, 0, 8, 512).expect("read"), pattern(1, 4096));
            // The device finishes the write; the old association drains and its CNTLID is
            // free again.
            gate.release();
            until(|| t.target.draining_controller_count() == 0);
            let now = q2.read(1, 0, 8, 512).expect("read");
            assert_eq!(now, pattern(2, 4096));
            t.target.set_next_cntlid(old);
            let mut c3 = connect(&t, Digests::default());
            assert_eq!(c3.cntlid(), old);
            let mut q3 = c3.io_queue(8).expect("I/O queue");
            assert_eq!(q3.read(1, 0, 8, 512).expect("read"), now);
            drop((q2, q3));
            c2.keep_alive().expect("the other association is served");
            t.stop();
        },
    )
}

/// A SMART / Health log read at the backend keeps the controller ID taken, as I/O does.
#[test]
fn a_smart_read_drains_before_its_controller_id_is_reused() {
    watchdog(
        "a_smart_read_drains_before_its_controller_id_is_reused",
        test_watchdog::INTEGRATION,
        || {
            let gate = Gate::new();
            let t = TestTarget::with_backend(gate.clone(), TargetOptions::default(), 2);
            let mut c = connect(&t, Digests::default());
            let old = c.cntlid();
            gate.hold.store(true, Ordering::SeqCst);
            let sqe = Sqe::get_log_page(crate::spec::sqe::lid::SMART, 0xffff_ffff, 512, 0, 0);
            let q = c.admin();
            q.submit(sqe, HostData::In(vec![0; 512]), 9)
                .expect("submit");
            until(|| {
                let _ = q.poll();
                !gate.held_smart.lock().expect("held").is_empty()
            });
            gate.hold.store(false, Ordering::SeqCst);
            drop(c);
            until(|| t.target.controller(old).is_none());
            assert_eq!(t.target.draining_controller_count(), 1);
            t.target.set_next_cntlid(old);
            let c2 = connect(&t, Digests::default());
            assert_ne!(c2.cntlid(), old);
            gate.release();
            until(|| t.target.draining_controller_count() == 0);
            t.target.set_next_cntlid(old);
            let c3 = connect(&t, Digests::default());
            assert_eq!(c3.cntlid(), old);
            drop((c2, c3));
            t.stop();
        },
    )
}

#[test]
fn a_reset_or_shutdown_completes_once_the_commands_drained() {
    watchdog(
        "a_reset_or_shutdown_completes_once_the_commands_drained",
        test_watchdog::INTEGRATION,
        || {
            let gate = Gate::new();
            let t = TestTarget::with_backend(gate.clone(), TargetOptions::default(), 2);
            let mut c = connect(&t, Digests::default());
            let mut q = c.io_queue(8).expect("I/O queue");
            let cc = property(&mut c, fabrics::property_get(prop::CC, false));
            // CC.EN 1 -> 0 with a write at the device: CSTS.RDY stays set until it finished.
            held_write(&gate, &mut q, 16, 3, 1);
            property(
                &mut c,
                fabrics::property_set(prop::CC, false, (cc & !1) as u64),
            );
            let csts = Csts(property(&mut c, fabrics::property_get(prop::CSTS, false)));
            assert!(csts.rdy(), "reset completed with a write in flight");
            until(|| q.poll().is_err());
            assert!(c.io_queue(8).is_err(), "I/O queue during a reset");
            gate.release();
            until(|| !Csts(property(&mut c, fabrics::property_get(prop::CSTS, false))).rdy());
            assert_eq!(
                &gate.mem.snapshot(Nsid(1))[16 * 512..24 * 512],
                &pattern(3, 4096)[..]
            );
            // Enabled again; CC.SHN with a write at the device: shutdown is in progress until
            // it finished.
            property(&mut c, fabrics::property_set(prop::CC, false, cc as u64));
            until(|| Csts(property(&mut c, fabrics::property_get(prop::CSTS, false))).rdy());
            let mut q = c.io_queue(8).expect("I/O queue after the reset");
            held_write(&gate, &mut q, 32, 4, 2);
            let shn = crate::spec::Cc(cc).with_shn(crate::spec::regs::shn::NORMAL);
            property(&mut c, fabrics::property_set(prop::CC, false, shn.0 as u64));
            let csts = Csts(property(&mut c, fabrics::property_get(prop::CSTS, false)));
            assert_eq!(csts.shst(), shst::OCCURRING);
            gate.release();
            until(|| {
                Csts(property(&mut c, fabrics::property_get(prop::CSTS, false))).shst()
                    == shst::COMPLETE
            });
            // The write's response still reached the host.
            until(|| {
                q.poll().expect("poll");
                q.pop().is_some()
            });
            t.stop();
        },
    )
}

#[test]
fn disconnect_is_answered_after_the_queues_commands_completed() {
    watchdog(
        "disconnect_is_answered_after_the_queues_commands_completed",
        test_watchdog::INTEGRATION,
        || {
            let gate = Gate::new();
            let t = TestTarget::with_backend(gate.clone(), TargetOptions::default(), 1);
            let mut c = connect(&t, Digests::default());
            let mut q = c.io_queue(8).expect("I/O queue");
            held_write(&gate, &mut q, 40, 5, 1);
            q.submit(fabrics::disconnect(), HostData::None, 2)
                .expect("submit Disconnect");
            // Round trips on the admin queue: the target has seen the Disconnect by now (it
            // sits in the same poll group), and still holds its response.
            for _ in 0..3 {
                c.keep_alive().expect("keep alive");
            }
            q.poll().expect("the queue is still open");
            assert!(q.pop().is_none(), "a response before the write finished");
            gate.release();
            // Both responses, the write's first; then the target closes the queue.
            let mut order = Vec::new();
            loop {
                let r = q.poll();
                while let Some(d) = q.pop() {
                    assert!(d.result.expect("completion").status().is_success());
                    order.push(d.tag);
                }
                if order.len() == 2 {
                    break;
                }
                r.expect("poll");
            }
            assert_eq!(order, vec![1, 2]);
            assert_eq!(
                &gate.mem.snapshot(Nsid(1))[40 * 512..48 * 512],
                &pattern(5, 4096)[..]
            );
            t.stop();
        },
    )
}

/// The built-in emulated controller holds the completion of a write (fault injection) while
/// its host vanishes: the association drains before its CNTLID is given out again, and what a
/// new association reads of the block afterwards is the write's data, the same every time.
#[cfg(feature = "emulated")]
#[test]
fn a_delayed_device_write_drains_before_its_controller_id_returns() {
    use crate::emulated::{
        Action, EmulatedConfig, EmulatedController, Fault, Mode, NamespaceConfig, Trigger,
    };
    use crate::nvmf::backend::FileBackend;
    watchdog(
        "a_delayed_device_write_drains_before_its_controller_id_returns",
        test_watchdog::STRESS,
        || {
            let emu = EmulatedController::new(EmulatedConfig {
                mode: Mode::Threaded,
                namespaces: vec![NamespaceConfig::memory(512, 4096)],
                ..EmulatedConfig::default()
            })
            .expect("emulated controller");
            let dx = crate::Dioxide::builder()
                .controller(crate::Controller::new(emu.clone()).expect("bring-up"))
                .pollers([None])
                .build()
                .expect("dioxide");
            let backend = Arc::new(FileBackend::new(&dx, 0).expect("file backend"));
            let t = TestTarget::with_backend(backend, TargetOptions::default(), 2);
            let mut c = connect(&t, Digests::default());
            let old = c.cntlid();
            let mut q = c.io_queue(8).expect("I/O queue");
            q.write(1, 0, pattern(1, 4096), 512).expect("write");
            emu.inject(Fault::once(
                Trigger::LbaRange {
                    nsid: 1,
                    start: 0,
                    end: 8,
                    opcode: Some(opc::WRITE),
                },
                Action::DelayCommands(1 << 40),
            ));
            let (sqe, data) = write(0, 2);
            q.submit(sqe, data, 1).expect("submit");
            until(|| {
                let _ = q.poll();
                emu.stats().held == 1
            });
            drop(q);
            drop(c);
            until(|| t.target.controller(old).is_none());
            assert_eq!(t.target.draining_controller_count(), 1);
            t.target.set_next_cntlid(old);
            let mut c2 = connect(&t, Digests::default());
            assert_ne!(
                c2.cntlid(),
                old,
                "CNTLID reused while its write was in flight"
            );
            let mut q2 = c2.io_queue(8).expect("I/O queue");
            // Served meanwhile (blocks away from the held write).
            q2.write(1, 64, pattern(3, 4096), 512).expect("write");
            emu.release_delayed();
            until(|| t.target.draining_controller_count() == 0);
            let a = q2.read(1, 0, 8, 512).expect("read");
            assert_eq!(a, pattern(2, 4096));
            t.target.set_next_cntlid(old);
            let mut c3 = connect(&t, Digests::default());
            assert_eq!(c3.cntlid(), old);
            let mut q3 = c3.io_queue(8).expect("I/O queue");
            assert_eq!(q3.read(1, 0, 8, 512).expect("read"), a);
            drop((q2, q3, c2, c3));
            t.stop();
            dx.shutdown();
        },
    )
}

/// A memory backend whose buffers can run out: counts what it hands out, and hands out
/// nothing while `starve` is set.
struct Scarce {
    mem: Arc<MemBackend>,
    allocs: std::sync::atomic::AtomicUsize,
    refused: std::sync::atomic::AtomicUsize,
    starve: AtomicBool,
}

impl Backend for Scarce {
    fn namespaces(&self) -> Vec<NsInfo> {
        self.mem.namespaces()
    }
    fn alloc(&self, len: usize) -> Option<crate::IoBuffer> {
        if self.starve.load(Ordering::SeqCst) {
            self.refused.fetch_add(1, Ordering::SeqCst);
            return None;
        }
        self.allocs.fetch_add(1, Ordering::SeqCst);
        self.mem.alloc(len)
    }
    fn submit(&self, io: BackendIo, done: IoCompletion) {
        self.mem.submit(io, done)
    }
}

mod raw {
    use std::io::{Read, Write};
    use std::net::TcpStream;

    use super::*;
    use crate::nvmf::fabrics::Sgl;
    use crate::nvmf::pdu::{self, DataHdr, Pdu};

    /// An I/O queue's socket past ICReq and Connect, blocking, with a read timeout.
    pub fn queue(t: &TestTarget, c: &HostController, qid: u16) -> TcpStream {
        let opts = host_opts(Digests::default());
        let mut q = HostQueue::open(t.addr, &opts, 32).expect("ICReq");
        q.connect(&opts, qid, 32, c.cntlid()).expect("Connect");
        let s = q.socket().try_clone().expect("clone the socket");
        drop(q);
        s.set_nonblocking(false).expect("blocking");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("read timeout");
        s
    }

    /// Sends a command capsule (with in-capsule data if any).
    pub fn send(s: &mut TcpStream, mut sqe: Sqe, cid: u16, data: &[u8]) {
        sqe.set_cid(cid);
        let len = data.len() as u32;
        if sqe.opcode() == opc::WRITE || sqe.opcode() == opc::READ {
            let blocks = sqe.nlb() as u32 + 1;
            if data.is_empty() {
                Sgl::transport(blocks * 512).set(&mut sqe);
            } else {
                Sgl::incapsule(len).set(&mut sqe);
            }
        }
        let mut v = pdu::encode(&Pdu::CapsuleCmd(sqe, len), len, Digests::default(), 0)
            .as_bytes()
            .to_vec();
        v.extend_from_slice(data);
        s.write_all(&v).expect("send a capsule");
    }

    /// Sends all of a write's data for an R2T.
    pub fn h2c(s: &mut TcpStream, cid: u16, ttag: u16, data: &[u8]) {
        let d = DataHdr {
            cccid: cid,
            ttag,
            offset: 0,
            len: data.len() as u32,
            last: true,
            success: false,
        };
        let mut v = pdu::encode(&Pdu::H2cData(d), d.len, Digests::default(), 0)
            .as_bytes()
            .to_vec();
        v.extend_from_slice(data);
        s.write_all(&v).expect("send H2CData");
    }

    /// What the target sent: an R2T `(cid, ttag)`, a response `(cid, success)`, or data.
    #[derive(Debug, PartialEq, Eq)]
    pub enum In {
        R2t(u16, u16),
        Resp(u16, bool),
        Data,
    }

    pub fn next(s: &mut TcpStream) -> In {
        let mut ch = [0u8; 8];
        s.read_exact(&mut ch).expect("a PDU header");
        let plen = u32::from_le_bytes([ch[4], ch[5], ch[6], ch[7]]) as usize;
        let mut v = ch.to_vec();
        v.resize(plen.max(8), 0);
        s.read_exact(&mut v[8..]).expect("the rest of the PDU");
        match v[0] {
            pdu::pdu_type::R2T => In::R2t(
                u16::from_le_bytes([v[8], v[9]]),
                u16::from_le_bytes([v[10], v[11]]),
            ),
            pdu::pdu_type::CAPSULE_RESP => {
                let cqe = pdu::cqe_from_bytes(&v[8..24]);
                In::Resp(cqe.cid, cqe.status().is_success())
            }
            pdu::pdu_type::C2H_DATA => In::Data,
            t => panic!("unexpected PDU type {t:#x}: {v:02x?}"),
        }
    }

    /// Reads PDUs up to the response of `cid`; returns the ones before it.
    pub fn until_resp(s: &mut TcpStream, cid: u16) -> Vec<In> {
        let mut seen = Vec::new();
        loop {
            match next(s) {
                In::Resp(c, ok) if c == cid => {
                    assert!(ok, "command {cid} failed");
                    return seen;
                }
                p => seen.push(p),
            }
        }
    }
}

#[test]
fn write_buffers_are_taken_at_r2t_time_and_wait_for_memory() {
    watchdog(
        "write_buffers_are_taken_at_r2t_time_and_wait_for_memory",
        test_watchdog::INTEGRATION,
        || {
            use raw::In;
            let b = Arc::new(Scarce {
                mem: mem_backend(),
                allocs: Default::default(),
                refused: Default::default(),
                starve: AtomicBool::new(false),
            });
            let opts = TargetOptions {
                max_r2t_per_conn: 1,
                housekeeping: Duration::from_millis(5),
                ..TargetOptions::default()
            };
            let t = TestTarget::with_backend(b.clone(), opts, 1);
            let c = connect(&t, Digests::default());
            let mut s = raw::queue(&t, &c, 1);
            let before = b.allocs.load(Ordering::SeqCst);
            // Four 32 KiB writes (R2T each), one R2T at a time: one buffer, not four.
            for cid in 1..=4u16 {
                raw::send(
                    &mut s,
                    Sqe::rw(opc::WRITE, 1, 64 * cid as u64, 64, false),
                    cid,
                    &[],
                );
            }
            raw::send(&mut s, Sqe::flush(1), 20, &[]);
            let seen = raw::until_resp(&mut s, 20);
            let ttag = match seen[..] {
                [In::R2t(1, ttag)] => ttag,
                _ => panic!("{seen:?}"),
            };
            assert_eq!(b.allocs.load(Ordering::SeqCst) - before, 1);
            // Memory runs out: the next write and a Read wait instead of failing.
            b.starve.store(true, Ordering::SeqCst);
            raw::h2c(&mut s, 1, ttag, &pattern(1, 32768));
            raw::send(&mut s, Sqe::rw(opc::READ, 1, 64, 8, false), 30, &[]);
            raw::send(&mut s, Sqe::flush(1), 21, &[]);
            let mut seen = raw::until_resp(&mut s, 21);
            if !seen.contains(&In::Resp(1, true)) {
                assert_eq!(raw::until_resp(&mut s, 1), vec![]);
                seen.push(In::Resp(1, true));
            }
            assert_eq!(seen, vec![In::Resp(1, true)], "while memory is short");
            // Memory is back: the Read and the other writes go on.
            b.starve.store(false, Ordering::SeqCst);
            let mut done = Vec::new();
            while done.len() < 4 {
                match raw::next(&mut s) {
                    In::R2t(cid, ttag) => {
                        raw::h2c(&mut s, cid, ttag, &pattern(cid as u64, 32768));
                    }
                    In::Resp(cid, ok) => {
                        assert!(ok, "command {cid}");
                        done.push(cid);
                    }
                    In::Data => {}
                }
            }
            done.sort_unstable();
            assert_eq!(done, vec![2, 3, 4, 30]);
            // In-capsule data waits in the socket for its buffer too.
            b.starve.store(true, Ordering::SeqCst);
            let refused = b.refused.load(Ordering::SeqCst);
            raw::send(
                &mut s,
                Sqe::rw(opc::WRITE, 1, 0, 8, false),
                40,
                &pattern(40, 4096),
            );
            until(|| b.refused.load(Ordering::SeqCst) > refused);
            b.starve.store(false, Ordering::SeqCst);
            assert_eq!(raw::until_resp(&mut s, 40), vec![]);
            let snap = b.mem.snapshot(Nsid(1));
            for cid in 1..=4usize {
                assert_eq!(
                    &snap[cid * 32768..(cid + 1) * 32768],
                    &pattern(cid as u64, 32768)[..]
                );
            }
            assert_eq!(&snap[..4096], &pattern(40, 4096)[..]);
            t.stop();
        },
    )
}

/// True once the target closed `s` (end of stream or reset).
fn closed_by_target(s: &mut std::net::TcpStream) -> bool {
    use std::io::Read;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    let mut b = [0u8; 256];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(e) => panic!("reading: {e}"),
        }
    }
}

#[test]
fn connections_beyond_the_limits_are_closed_at_accept() {
    watchdog(
        "connections_beyond_the_limits_are_closed_at_accept",
        test_watchdog::INTEGRATION,
        || {
            let o = host_opts(Digests::default());
            for (total, per_host) in [(100, 2), (2, 100)] {
                let opts = TargetOptions {
                    max_connections: total,
                    max_connections_per_host: per_host,
                    ..TargetOptions::default()
                };
                let t = TestTarget::with_backend(mem_backend(), opts, 2);
                let a = HostQueue::open(t.addr, &o, 8).expect("first connection");
                let _b = HostQueue::open(t.addr, &o, 8).expect("second connection");
                assert_eq!(t.target.connection_count(), 2);
                assert!(
                    HostQueue::open(t.addr, &o, 8).is_err(),
                    "a third connection"
                );
                // A place comes back when a connection goes.
                drop(a);
                until(|| t.target.connection_count() < 2);
                let mut c = connect(&t, Digests::default());
                assert!(c.io_queue(8).is_err(), "beyond the limit");
                drop(c);
                t.stop();
            }
        },
    )
}

#[test]
fn a_socket_without_connect_is_closed_after_the_connect_timeout() {
    watchdog(
        "a_socket_without_connect_is_closed_after_the_connect_timeout",
        test_watchdog::INTEGRATION,
        || {
            let opts = TargetOptions {
                connect_timeout: Duration::from_millis(100),
                housekeeping: Duration::from_millis(10),
                ..TargetOptions::default()
            };
            let t = TestTarget::with_backend(mem_backend(), opts, 1);
            let mut c = connect(&t, Digests::default());
            // Silent from the start, and silent after ICReq.
            let mut silent = std::net::TcpStream::connect(t.addr).expect("connect");
            let q = HostQueue::open(t.addr, &host_opts(Digests::default()), 8).expect("ICReq");
            let mut after_icreq = q.socket().try_clone().expect("clone");
            drop(q);
            after_icreq.set_nonblocking(false).expect("blocking");
            assert!(closed_by_target(&mut silent));
            assert!(closed_by_target(&mut after_icreq));
            // Connected queues stay, past the timeout.
            let mut io = c.io_queue(8).expect("I/O queue");
            std::thread::sleep(Duration::from_millis(300));
            c.keep_alive().expect("keep alive");
            io.write(1, 0, pattern(1, 512), 512).expect("write");
            let reasons = t.stop();
            assert_eq!(
                reasons
                    .iter()
                    .filter(|r| r.contains("connect_timeout"))
                    .count(),
                2,
                "{reasons:?}"
            );
        },
    )
}

/// Keep Alive is traffic based (CTRATT.TBKAS): a host whose I/O flows keeps its association
/// without a Keep Alive command, for many times its timeout.
#[test]
fn io_traffic_keeps_the_association_alive() {
    watchdog(
        "io_traffic_keeps_the_association_alive",
        test_watchdog::INTEGRATION,
        || {
            let opts = TargetOptions {
                housekeeping: Duration::from_millis(10),
                ..TargetOptions::default()
            };
            let t = TestTarget::with_backend(mem_backend(), opts, 2);
            let mut o = host_opts(Digests::default());
            o.kato_ms = 200;
            let mut c = HostController::connect(t.addr, o).expect("connect");
            assert_eq!(c.identify().ctratt & 1 << 6, 1 << 6, "CTRATT.TBKAS");
            let mut q = c.io_queue(8).expect("I/O queue");
            let start = std::time::Instant::now();
            let mut k = 0;
            while start.elapsed() < Duration::from_millis(1500) {
                q.write(1, k % 64, pattern(k, 512), 512).expect("write");
                k += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            assert!(t.target.controller(c.cntlid()).is_some());
            c.keep_alive().expect("the association is alive");
            t.stop();
        },
    )
}

/// `Serving::stop` ends each association before it lets a group go: the hosts see their
/// connections close at once, but the group stays on its poller until the command its
/// connection had at the backend completed (into that connection, once), and only then
/// reports; a device that never answers is given up after the timeout, and the report says
/// how many commands were abandoned.
#[cfg(feature = "emulated")]
#[test]
fn stopping_a_served_target_drains_each_association_first() {
    watchdog(
        "stopping_a_served_target_drains_each_association_first",
        test_watchdog::STRESS,
        || {
            use crate::emulated::{EmulatedConfig, EmulatedController, Mode, NamespaceConfig};
            use crate::nvmf::target::Serving;
            let emu = EmulatedController::new(EmulatedConfig {
                mode: Mode::Threaded,
                namespaces: vec![NamespaceConfig::memory(512, 1024)],
                ..EmulatedConfig::default()
            })
            .expect("emulated controller");
            let dx = crate::Dioxide::builder()
                .controller(crate::Controller::new(emu).expect("bring-up"))
                .pollers([None])
                .build()
                .expect("dioxide");
            let gate = Gate::new();
            let t = Target::new(TargetOptions::default());
            t.add_subsystem(Subsystem::new(SUBNQN, gate.clone()));
            let serve = || {
                let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
                let s = Serving::start(&t, &dx, l).expect("serve");
                let mut c = HostController::connect(s.local_addr(), host_opts(Digests::default()))
                    .expect("connect");
                let q = c.io_queue(8).expect("I/O queue");
                (s, c, q)
            };

            let (serving, _c, mut q) = serve();
            held_write(&gate, &mut q, 64, 9, 1);
            let reports = std::thread::scope(|s| {
                let stopping = s.spawn(|| serving.stop(&dx, Duration::from_secs(120)));
                // The host sees its connections close while the write is still at the device.
                until(|| q.poll().is_err());
                assert_eq!(gate.held(), 1);
                gate.release();
                stopping.join().expect("stop")
            });
            assert_eq!(reports.len(), 1, "{reports:?}");
            assert_eq!(reports[0].abandoned, 0, "{reports:?}");
            assert_eq!(reports[0].connections, 2, "{reports:?}");
            // The write finished before stop returned, and the association is gone.
            assert_eq!(
                &gate.mem.snapshot(Nsid(1))[64 * 512..72 * 512],
                &pattern(9, 4096)[..]
            );
            assert_eq!(t.controller_count(), 0);
            assert_eq!(t.draining_controller_count(), 0);
            assert_eq!(t.connection_count(), 0);

            // A device that never answers: stop gives up after its timeout, and says so.
            let (serving, _c, mut q) = serve();
            held_write(&gate, &mut q, 80, 10, 1);
            let reports = serving.stop(&dx, Duration::from_millis(200));
            assert_eq!(reports.len(), 1, "{reports:?}");
            assert_eq!(reports[0].abandoned, 1, "{reports:?}");
            // Its completion, later, goes nowhere and harms nothing.
            gate.release();
            dx.shutdown();
        },
    )
}
