//! End-to-end tests of `perf` and `identify` with `trtype:TCP` transport IDs against
//! `nvmf_tgt` on the emulated controller over loopback, and the host's fault cases: the target
//! killed mid-run, the connection reset, a target (or a stream) that answers garbage. Each
//! must end with a clear error and nothing may hang: every child runs under a deadline
//! (`test_watchdog::output_within`), every test under the watchdog.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::{Command, Output};
use std::sync::mpsc::channel;

mod common;
use common::Tgt;
use dioxide_tests::{Proxy, ProxyFault as Fault};

/// `nvmf_tgt` on the emulated controller, memory-backed (64 MiB).
fn start_tgt() -> Tgt {
    Tgt::start(&["--emulated-backing", "memory", "--emulated-size", "64m"])
}

fn run(bin: &str, args: &[&str]) -> Output {
    test_watchdog::output_within(Command::new(bin).args(args), test_watchdog::PROCESS)
        .expect("run the tool")
}

fn perf(args: &[&str]) -> Output {
    run(env!("CARGO_BIN_EXE_perf"), args)
}

fn identify(args: &[&str]) -> Output {
    run(env!("CARGO_BIN_EXE_identify"), args)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn perf_verify_and_identify_over_tcp() {
    let _w = test_watchdog::arm(test_watchdog::STRESS);
    let t = start_tgt();
    let trid = t.trid(t.addr);
    // 4 KiB writes go in-capsule, 64 KiB ones after R2Ts; reads come back in C2HData.
    for size in ["4096", "65536"] {
        let o = perf(&[
            "-r", &trid, "-q", "16", "-o", size, "-w", "verify", "-t", "1",
        ]);
        let (out, err) = (text(&o.stdout), text(&o.stderr));
        assert!(o.status.success(), "perf -o {size}: {out}\n{err}");
        assert!(out.contains(&format!(
            "Attached to NVMe over Fabrics controller at 127.0.0.1:{}: {}",
            t.addr.port(),
            t.nqn
        )));
        let name = format!("TCP (addr:127.0.0.1 subnqn:{}) NSID 1", t.nqn);
        assert!(out.contains(&format!("{name} from core")), "{out}");
        let v = out
            .lines()
            .find_map(|l| l.strip_prefix("Verify: "))
            .unwrap_or_else(|| panic!("no verify line: {out}"));
        let checked: u64 = v.split_whitespace().next().unwrap().parse().unwrap();
        assert!(checked > 0 && v.ends_with(" 0 mismatched"), "{v}");
    }

    // More I/Os in flight than the queue has entries (128): the rest wait in software.
    let o = perf(&[
        "-r", &trid, "-q", "200", "-o", "4096", "-w", "verify", "-t", "1",
    ]);
    let out = text(&o.stdout);
    assert!(
        o.status.success(),
        "perf -q 200: {out}\n{}",
        text(&o.stderr)
    );
    assert!(out.contains(" 0 mismatched"), "{out}");

    // identify of the subsystem: the controller and its namespace.
    let o = identify(&["-r", &trid]);
    let out = text(&o.stdout);
    assert!(o.status.success(), "{out}\n{}", text(&o.stderr));
    assert!(
        out.contains("Model Number:                          Dioxide NVMe/TCP target"),
        "{out}"
    );
    assert!(out.contains("Namespace ID:1"), "{out}");
    let o = identify(&["-r", &trid, "--json"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
    assert_eq!(v[0]["schema"], "dioxide-identify/1");
    assert_eq!(v[0]["subnqn"], t.nqn.as_str());
    assert_eq!(v[0]["namespaces"][0]["nsid"], 1);

    // identify of the discovery subsystem (no subnqn): the log page entries.
    let disc = format!("trtype:TCP traddr:127.0.0.1 trsvcid:{}", t.addr.port());
    let o = identify(&["-r", &disc]);
    let out = text(&o.stdout);
    assert!(o.status.success(), "{out}\n{}", text(&o.stderr));
    assert!(out.contains("Discovery Log Entry 0"), "{out}");
    assert!(
        out.contains(&format!("NVM Subsystem Qualified Name:          {}", t.nqn)),
        "{out}"
    );
    let o = identify(&["-r", &disc, "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
    assert_eq!(v[0]["schema"], "dioxide-discovery/1");
    assert_eq!(v[0]["entries"][0]["subnqn"], t.nqn.as_str());
    // perf on the discovery subsystem says which subsystems to name instead.
    let o = perf(&[
        "-r", &disc, "-q", "8", "-o", "4096", "-w", "read", "-t", "1",
    ]);
    let err = text(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("is a discovery controller") && err.contains(&t.nqn),
        "{err}"
    );
    // A subsystem that does not exist: the target's refusal, named.
    let o = identify(&["-r", &format!("{disc} subnqn:nqn.2026-12.io.dioxide:nope")]);
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("Connect failed: Connect Invalid Parameters")
            && text(&o.stderr).contains("the target offers no subsystem of this NQN"),
        "{}",
        text(&o.stderr)
    );
}

#[test]
fn refused_connection_and_a_garbage_target_are_named() {
    let _w = test_watchdog::arm(test_watchdog::STRESS);
    // Nothing listens.
    let free = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let trid = format!(
        "trtype:TCP traddr:127.0.0.1 trsvcid:{} subnqn:nqn.2026-12.io.dioxide:x",
        free.port()
    );
    for o in [
        identify(&["-r", &trid]),
        perf(&[
            "-r", &trid, "-q", "8", "-o", "4096", "-w", "read", "-t", "1",
        ]),
    ] {
        let err = text(&o.stderr);
        assert!(!o.status.success());
        assert!(err.contains("no NVMe/TCP target listens there"), "{err}");
    }
    // A tiny fake target: a good ICResp, then garbage in answer to the Connect.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            let mut req = [0u8; 128];
            if s.read_exact(&mut req).is_err() {
                continue;
            }
            let mut resp = [0u8; 128];
            resp[0] = 0x01; // ICResp
            resp[2] = 128; // HLEN
            resp[4..8].copy_from_slice(&128u32.to_le_bytes());
            resp[12..16].copy_from_slice(&131072u32.to_le_bytes()); // MAXH2CDATA
            let _ = s.write_all(&resp);
            let _ = s.write_all(&[0xee; 64]);
        }
    });
    let trid = format!(
        "trtype:TCP traddr:127.0.0.1 trsvcid:{} subnqn:nqn.2026-12.io.dioxide:x",
        addr.port()
    );
    for o in [
        identify(&["-r", &trid]),
        perf(&[
            "-r", &trid, "-q", "8", "-o", "4096", "-w", "read", "-t", "1",
        ]),
    ] {
        let err = text(&o.stderr);
        assert!(!o.status.success());
        assert!(
            err.contains("the target broke the NVMe/TCP protocol"),
            "{err}"
        );
    }
}

/// Runs `perf -w verify` for up to a minute through a proxy, does `fault` once I/O flows, and
/// checks that perf ends (the watchdog bounds it) with a clear error.
fn perf_through_a_fault(fault: impl FnOnce(&Tgt, &Proxy)) -> String {
    let t = start_tgt();
    let p = Proxy::start(t.addr);
    let trid = t.trid(p.addr);
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        let o = perf(&[
            "-r", &trid, "-q", "32", "-o", "4096", "-w", "verify", "-t", "60",
        ]);
        let _ = tx.send(o);
    });
    p.wait_for(4 << 20);
    fault(&t, &p);
    let o = rx.recv().expect("perf ran");
    let err = text(&o.stderr);
    assert!(
        !o.status.success(),
        "perf succeeded through the fault: {err}"
    );
    assert!(!err.contains("mismatched;"), "a verify mismatch: {err}");
    err
}

#[test]
fn perf_ends_cleanly_when_the_target_is_killed() {
    let _w = test_watchdog::arm(test_watchdog::STRESS);
    let err = perf_through_a_fault(|t, _| {
        let pid = t.child.id() as libc::pid_t;
        // SAFETY: kill(2) of our own child (not yet reaped: Tgt holds its Child).
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    });
    assert!(err.contains("the target closed the connection"), "{err}");
}

#[test]
fn perf_ends_cleanly_on_a_connection_reset() {
    let _w = test_watchdog::arm(test_watchdog::STRESS);
    let err = perf_through_a_fault(|_, p| p.fault(Fault::Reset));
    assert!(
        err.contains("Connection reset by peer")
            || err.contains("the target closed the connection"),
        "{err}"
    );
}

#[test]
fn perf_ends_cleanly_when_the_stream_turns_to_garbage() {
    let _w = test_watchdog::arm(test_watchdog::STRESS);
    let err = perf_through_a_fault(|_, p| p.fault(Fault::Garbage));
    assert!(
        err.contains("the target broke the NVMe/TCP protocol") || err.contains("timed out"),
        "{err}"
    );
}
