//! End-to-end tests of the `nvmf_tgt` binary on the built-in emulated controller, driven over
//! loopback by the crate's NVMe/TCP host: every child runs under a deadline, every test under
//! the project's watchdog.

use dioxide::spec::{Sct, Sqe};
use dioxide::{NvmfDigests, NvmfHost, NvmfHostData, NvmfHostError, NvmfHostOptions};
use std::process::Command;
use std::time::{Duration, Instant};

const HOST_A: &str = "nqn.2026-12.io.dioxide:test-host-a";
const HOST_B: &str = "nqn.2026-12.io.dioxide:test-host-b";

mod common;
use common::{Tgt, deadline};

/// `nvmf_tgt` on two cores (`-m 0x3`) with `args`.
fn start_tgt(args: &[&str]) -> Tgt {
    let mut all = vec!["-m", "0x3"];
    all.extend_from_slice(args);
    Tgt::start(&all)
}

/// What these tests do with a target.
trait TgtExt {
    fn host_opts(&self, hostnqn: &str, digests: NvmfDigests) -> NvmfHostOptions;
    fn connect(&self, hostnqn: &str, digests: NvmfDigests) -> NvmfHost;
    fn interrupt(self) -> (Option<i32>, Vec<String>);
}

impl TgtExt for Tgt {
    fn host_opts(&self, hostnqn: &str, digests: NvmfDigests) -> NvmfHostOptions {
        let mut o = NvmfHostOptions::new(self.nqn.clone());
        o.hostnqn = hostnqn.into();
        o.digests = digests;
        o.timeout = test_watchdog::scaled(Duration::from_secs(20));
        o
    }

    fn connect(&self, hostnqn: &str, digests: NvmfDigests) -> NvmfHost {
        NvmfHost::connect(self.addr, self.host_opts(hostnqn, digests)).expect("connect")
    }

    /// Sends SIGINT, waits for the exit (under a deadline); returns the exit code and all the
    /// lines it printed.
    fn interrupt(mut self) -> (Option<i32>, Vec<String>) {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: kill(2) with our own child's pid (not yet reaped: we hold its Child) and a
        // valid signal number; no memory is involved.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
        let until = deadline();
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait for nvmf_tgt") {
                break s;
            }
            assert!(
                Instant::now() < until,
                "nvmf_tgt did not exit after SIGINT; it printed: {:#?}",
                self.out
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut out = std::mem::take(&mut self.out);
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(5)) {
            out.push(l);
        }
        (status.code(), out)
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

const DIGESTS: [NvmfDigests; 4] = [
    NvmfDigests {
        header: false,
        data: false,
    },
    NvmfDigests {
        header: true,
        data: false,
    },
    NvmfDigests {
        header: false,
        data: true,
    },
    NvmfDigests {
        header: true,
        data: true,
    },
];

/// The per-poller lines of the exit report: (connections, PDUs out).
fn poller_report(out: &[String]) -> Vec<(u64, u64)> {
    out.iter()
        .filter(|l| l.starts_with("nvmf_tgt: poller "))
        .map(|l| {
            let n = |what: &str| -> u64 {
                let i = l.find(what).unwrap_or_else(|| panic!("{what} in {l}"));
                let head = l[..i].trim_end();
                head[head.rfind([' ', ','].as_ref()).unwrap() + 1..]
                    .parse()
                    .unwrap()
            };
            (n(" connection(s)"), n(" PDUs out"))
        })
        .collect()
}

#[test]
fn serves_the_emulated_controller_end_to_end() {
    let _w = test_watchdog::arm(test_watchdog::STRESS);
    let t = start_tgt(&[
        "--in-capsule",
        "4096",
        "--max-io-size",
        "128k",
        "--max-c2h-data",
        "8k",
        "--emulated-size",
        "16m",
    ]);
    assert!(
        t.out.iter().any(|l| l.contains(&format!(
            "nvme connect -t tcp -a 127.0.0.1 -s {} -n {}",
            t.addr.port(),
            t.nqn
        ))),
        "{:#?}",
        t.out
    );
    assert!(t.out.iter().any(|l| l.contains("> /dev/nvme-fabrics")));
    // Discovery names the subsystem and the port.
    let mut d = NvmfHost::connect(
        t.addr,
        NvmfHostOptions {
            subnqn: "nqn.2014-08.org.nvmexpress.discovery".into(),
            ..t.host_opts(HOST_A, DIGESTS[0])
        },
    )
    .expect("connect to discovery");
    let entries = d.discover().expect("discovery log page");
    assert!(
        entries
            .iter()
            .any(|e| e.subnqn == t.nqn && e.trsvcid == t.addr.port().to_string()),
        "{entries:?}"
    );
    d.shutdown().expect("leave discovery");
    let mut pdus_needed = 0u64;
    for (round, dg) in DIGESTS.into_iter().enumerate() {
        let mut c = t.connect(HOST_A, dg);
        assert_eq!(c.namespace(1).expect("identify namespace 1"), (32768, 512));
        assert_eq!(c.identify().cntlid, c.cntlid());
        // Three I/O queues: with the admin queue, four connections over two pollers.
        let mut qs: Vec<_> = (0..3).map(|_| c.io_queue(64).expect("I/O queue")).collect();
        for (i, q) in qs.iter_mut().enumerate() {
            let lba = (round * 4 + i) as u64 * 1024;
            let small = pattern(lba + 1, 4096);
            let large = pattern(lba + 2, 128 * 1024);
            q.write(1, lba, small.clone(), 512)
                .expect("in-capsule write");
            q.write(1, lba + 8, large.clone(), 512).expect("R2T write");
            assert_eq!(q.read(1, lba, 8, 512).expect("read"), small);
            // 128 KiB in 8 KiB C2HData PDUs.
            assert_eq!(q.read(1, lba + 8, 256, 512).expect("read"), large);
            pdus_needed += 16;
            q.flush(1).expect("flush");
            q.run(
                "Write Zeroes",
                Sqe::write_zeroes(1, lba + 8, 8, false),
                NvmfHostData::None,
            )
            .expect("write zeroes");
            let z = q.read(1, lba + 8, 16, 512).expect("read");
            assert!(z[..4096].iter().all(|&b| b == 0));
            assert_eq!(&z[4096..], &large[4096..8192]);
        }
        // Many commands in flight on each queue at once, then verified.
        for (i, q) in qs.iter_mut().enumerate() {
            let base = 16384 + (round * 4 + i) as u64 * 512;
            for k in 0..32u64 {
                let sqe = Sqe::rw(dioxide::spec::sqe::io::WRITE, 1, base + k * 16, 16, false);
                q.submit(sqe, NvmfHostData::Out(pattern(base + k, 8192)), k)
                    .expect("submit");
            }
            let mut n = 0;
            while n < 32 {
                q.poll().expect("poll");
                while let Some(done) = q.pop() {
                    done.result.expect("write");
                    n += 1;
                }
            }
            for k in (0..32u64).step_by(7) {
                assert_eq!(
                    q.read(1, base + k * 16, 16, 512).expect("read back"),
                    pattern(base + k, 8192)
                );
            }
        }
        drop(qs);
        c.shutdown().expect("disconnect");
    }
    let (code, out) = t.interrupt();
    assert_eq!(code, Some(0), "{out:#?}");
    let report = poller_report(&out);
    assert_eq!(report.len(), 2, "{out:#?}");
    // The queues landed on both pollers (round robin: 1 discovery + 16 connections).
    assert!(report.iter().all(|&(conns, _)| conns >= 8), "{out:#?}");
    assert!(
        report.iter().map(|&(_, p)| p).sum::<u64>() >= pdus_needed,
        "{out:#?}"
    );
    assert!(out.iter().any(|l| l == "nvmf_tgt: controllers shut down"));
}

#[test]
fn a_host_not_allowed_is_refused_at_connect() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    let t = start_tgt(&["--allow-host", HOST_A, "--emulated-size", "1m"]);
    match NvmfHost::connect(t.addr, t.host_opts(HOST_B, DIGESTS[0])) {
        Err(NvmfHostError::Status { status, .. }) => {
            // Connect Invalid Host (NVMe-oF, Connect command specific status 0x84).
            assert_eq!((status.sct, status.sc), (Sct::CommandSpecific, 0x84));
        }
        Err(e) => panic!("expected Connect Invalid Host, got {e}"),
        Ok(_) => panic!("a host not allowed was let in"),
    }
    // The allowed host still gets in, and the line printed for it names it.
    let mut c = t.connect(HOST_A, DIGESTS[3]);
    let mut q = c.io_queue(16).expect("I/O queue");
    q.write(1, 0, pattern(9, 4096), 512).expect("write");
    assert_eq!(q.read(1, 0, 8, 512).expect("read"), pattern(9, 4096));
    assert!(
        t.out
            .iter()
            .any(|l| l.contains("nvme connect") && l.contains(&format!("--hostnqn={HOST_A}")))
    );
    drop(q);
    c.shutdown().expect("disconnect");
    let (code, out) = t.interrupt();
    assert_eq!(code, Some(0), "{out:#?}");
}

#[test]
fn sigint_with_hosts_connected_disconnects_them_and_exits_0() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    let t = start_tgt(&["--emulated-size", "1m"]);
    let mut c = t.connect(HOST_A, DIGESTS[0]);
    let mut qs: Vec<_> = (0..2).map(|_| c.io_queue(16).expect("I/O queue")).collect();
    for (i, q) in qs.iter_mut().enumerate() {
        q.write(1, i as u64 * 8, pattern(i as u64, 4096), 512)
            .expect("write");
    }
    let (code, out) = t.interrupt();
    assert_eq!(code, Some(0), "{out:#?}");
    assert!(
        out.iter()
            .any(|l| l == "nvmf_tgt: SIGINT: disconnecting the hosts"),
        "{out:#?}"
    );
    // The hosts see their connections closed.
    for q in qs.iter_mut() {
        assert!(q.read(1, 0, 8, 512).is_err());
    }
}

#[test]
fn bad_options_are_refused_with_one_line() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    let o = test_watchdog::output_within(
        Command::new(env!("CARGO_BIN_EXE_nvmf_tgt")).args(["--listen", "0.0.0.0:4420"]),
        test_watchdog::PROCESS,
    )
    .expect("run nvmf_tgt");
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(e.contains("--allow-remote"), "{e}");
}

#[test]
fn connection_limits_and_the_connect_timeout_apply() {
    use std::io::Read;
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    let t = start_tgt(&[
        "--max-connections-per-host",
        "2",
        "--connect-timeout-ms",
        "300",
        "--emulated-size",
        "1m",
    ]);
    // A socket that never sends ICReq is closed after the Connect timeout.
    let mut silent = std::net::TcpStream::connect(t.addr).expect("connect");
    silent
        .set_read_timeout(Some(test_watchdog::scaled(Duration::from_secs(30))))
        .expect("read timeout");
    let mut b = [0u8; 64];
    match silent.read(&mut b) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        r => panic!("the silent socket was not closed: {r:?}"),
    }
    drop(silent);
    // Two connections from this address (admin queue and one I/O queue), not a third.
    let mut c = t.connect(HOST_A, DIGESTS[0]);
    let mut q = c.io_queue(16).expect("I/O queue");
    assert!(c.io_queue(16).is_err(), "a third connection from one host");
    q.write(1, 0, pattern(5, 4096), 512).expect("write");
    assert_eq!(q.read(1, 0, 8, 512).expect("read"), pattern(5, 4096));
    drop(q);
    c.shutdown().expect("disconnect");
    let (code, out) = t.interrupt();
    assert_eq!(code, Some(0), "{out:#?}");
}

/// `--interrupt-mode interrupt`: the pollers sleep on the (threaded) emulated controller's
/// completion signals and the sockets while commands are on the device; every command still
/// completes, with its data, at queue depth 1 and 32.
#[test]
fn serves_in_interrupt_mode() {
    let _w = test_watchdog::arm(test_watchdog::STRESS);
    let t = Tgt::start(&[
        "--interrupt-mode",
        "interrupt",
        "--emulated-mode",
        "threaded",
        "--emulated-size",
        "16m",
    ]);
    let mut c = t.connect(HOST_A, DIGESTS[0]);
    let mut q = c.io_queue(64).expect("I/O queue");
    for k in 0..64u64 {
        let d = pattern(k + 500, 4096);
        q.write(1, k * 8, d.clone(), 512).expect("write");
        assert_eq!(q.read(1, k * 8, 8, 512).expect("read"), d);
    }
    for k in 0..32u64 {
        let sqe = Sqe::rw(dioxide::spec::sqe::io::WRITE, 1, 4096 + k * 16, 16, false);
        q.submit(sqe, NvmfHostData::Out(pattern(k + 900, 8192)), k)
            .expect("submit");
    }
    let mut n = 0;
    while n < 32 {
        q.poll().expect("poll");
        while let Some(done) = q.pop() {
            done.result.expect("write");
            n += 1;
        }
    }
    for k in 0..32u64 {
        assert_eq!(
            q.read(1, 4096 + k * 16, 16, 512).expect("read back"),
            pattern(k + 900, 8192)
        );
    }
    drop(q);
    c.shutdown().expect("disconnect");
    let (code, out) = t.interrupt();
    assert_eq!(code, Some(0), "{out:#?}");
    assert!(out.iter().any(|l| l == "nvmf_tgt: controllers shut down"));
    // The poller of the I/O queue slept with commands on the device.
    let io_sleeps: u64 = out
        .iter()
        .filter(|l| l.starts_with("nvmf_tgt: poller "))
        .map(|l| {
            let head = l
                .rsplit_once(" with I/O on the device")
                .expect("sleep counts")
                .0;
            head.rsplit_once(", ")
                .expect("a count")
                .1
                .parse::<u64>()
                .expect("a number")
        })
        .sum();
    assert!(io_sleeps > 0, "{out:#?}");
}

/// The scheduling policy (field 41 of `/proc/PID/task/TID/stat`) of each of `pid`'s threads
/// whose name starts with `prefix`.
fn thread_policies(pid: u32, prefix: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/task")).expect("task list") {
        let Ok(stat) = std::fs::read_to_string(e.expect("task").path().join("stat")) else {
            continue; // the thread exited meanwhile
        };
        let (open, close) = (stat.find('(').unwrap(), stat.rfind(')').unwrap());
        if !stat[open + 1..close].starts_with(prefix) {
            continue;
        }
        // Fields after the name start at field 3.
        let f: Vec<&str> = stat[close + 2..].split(' ').collect();
        out.push(f[41 - 3].parse().expect("policy"));
    }
    out
}

/// `--sched idle --poller-io-yield 0` (the options for a target sharing one CPU with its
/// hosts): the pollers run under SCHED_IDLE, yield after every empty round with commands on
/// the (threaded, so slow) emulated device, and every command still completes with its data.
#[test]
fn serves_with_sched_idle_and_yielding_pollers() {
    let _w = test_watchdog::arm(test_watchdog::STRESS);
    let t = Tgt::start(&[
        "-m",
        "0x3",
        "--sched",
        "idle",
        "--poller-io-yield",
        "0",
        "--emulated-mode",
        "threaded",
        "--emulated-size",
        "16m",
    ]);
    let policies = thread_policies(t.child.id(), "dioxide-poller");
    assert_eq!(policies, [libc::SCHED_IDLE as u32; 2], "{policies:?}");
    let mut c = t.connect(HOST_A, DIGESTS[0]);
    let mut q = c.io_queue(64).expect("I/O queue");
    for k in 0..64u64 {
        let d = pattern(k + 700, 4096);
        q.write(1, k * 8, d.clone(), 512).expect("write");
        assert_eq!(q.read(1, k * 8, 8, 512).expect("read"), d);
    }
    drop(q);
    c.shutdown().expect("disconnect");
    let (code, out) = t.interrupt();
    assert_eq!(code, Some(0), "{out:#?}");
    let yields: u64 = out
        .iter()
        .filter(|l| l.starts_with("nvmf_tgt: poller "))
        .map(|l| {
            let head = l.strip_suffix(" yields").expect("yield count");
            head.rsplit_once(", ")
                .expect("a count")
                .1
                .parse::<u64>()
                .expect("a number")
        })
        .sum();
    assert!(yields > 0, "{out:#?}");
}
