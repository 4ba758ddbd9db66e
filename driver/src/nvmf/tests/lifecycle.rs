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
}

impl Gate {
    fn new() -> Arc<Gate> {
        Arc::new(Gate {
            mem: mem_backend(),
            hold: AtomicBool::new(false),
            held: Mutex::new(Vec::new()),
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
