//! `ctxsw`: what one switch between two threads of one process costs, against one between two
//! processes, on the machine it runs on (written for the TCG guest, where a switch of address
//! space writes CR3 and QEMU flushes its software TLB on every CR3 write).
//!
//! Two peers ping-pong a counter over a pair of pipes: the first writes `i`, the second reads it,
//! checks it, touches `--pages` pages of its own memory (one byte each: a TLB fill per page after
//! a flush) and writes it back; the first reads it back, checks it and touches its pages too. On
//! one CPU every round trip is two context switches. The peers are two threads of this process
//! (`thread`: no change of address space) or this process and a forked child (`process`). The
//! kinds alternate, `--repeats` times each, and each line reports one run; the last lines are the
//! medians and their ratio. `getppid` calls in a loop give the cost of a bare system call (with
//! page-table isolation on, each one writes CR3 twice).
//!
//! Output lines (`CTXSW ...`) are parsed by nothing: they are for a reader.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::FromRawFd;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;

const PAGE: usize = 4096;

/// `ctxsw` options.
#[derive(Debug, Parser)]
#[command(
    name = "ctxsw",
    about = "Round-trip cost between two threads of one process and between two processes (pipe ping-pong)"
)]
pub struct Args {
    /// Round trips per run
    #[arg(short = 'n', long, default_value_t = 5000)]
    pub round_trips: u64,
    /// Pages each peer touches after every wake-up (0: none)
    #[arg(short = 'p', long, default_value_t = 0)]
    pub pages: usize,
    /// Runs of each kind, alternated
    #[arg(short = 'r', long, default_value_t = 3)]
    pub repeats: u32,
    /// getppid calls per system-call run (0: none)
    #[arg(short = 's', long, default_value_t = 100_000)]
    pub syscalls: u64,
}

/// Who answers the pings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// A second thread of this process (same address space).
    Thread,
    /// A forked child process (its own address space).
    Process,
}

impl Peer {
    fn name(self) -> &'static str {
        match self {
            Peer::Thread => "thread",
            Peer::Process => "process",
        }
    }
}

/// One ping-pong run's figures.
#[derive(Debug, Clone, Copy)]
pub struct PingPong {
    /// Round trips done (each checked).
    pub round_trips: u64,
    /// Wall time of all of them, in nanoseconds.
    pub elapsed_ns: u64,
    /// Context switches of the pinging thread (voluntary + involuntary, getrusage) over the run.
    pub switches: u64,
}

impl PingPong {
    /// Microseconds per round trip.
    pub fn us_per_round_trip(&self) -> f64 {
        self.elapsed_ns as f64 / 1e3 / self.round_trips.max(1) as f64
    }
}

fn pipe() -> io::Result<(File, File)> {
    let mut fds = [0i32; 2];
    // SAFETY: `fds` is a valid array of two ints, which pipe2 fills on success.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded: both descriptors are open and owned by nobody else.
    Ok(unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) })
}

fn thread_switches() -> u64 {
    // SAFETY: an all-zero rusage is a valid value for getrusage to overwrite.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable rusage.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    if rc != 0 {
        return 0;
    }
    (ru.ru_nvcsw + ru.ru_nivcsw) as u64
}

/// Reads one round's counter and checks it: a lost or repeated message is an error.
fn read_counter(rx: &mut File, want: u64) -> io::Result<()> {
    let mut b = [0u8; 8];
    rx.read_exact(&mut b)?;
    let got = u64::from_le_bytes(b);
    if got != want {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("ping-pong out of step: got round {got}, want {want}"),
        ));
    }
    Ok(())
}

fn touch(pages: &[u8]) -> u64 {
    let mut sum = 0u64;
    for p in pages.chunks(PAGE) {
        sum = sum.wrapping_add(std::hint::black_box(p[0]) as u64);
    }
    sum
}

fn echo(mut rx: File, mut tx: File, n: u64, pages: &[u8]) -> io::Result<u64> {
    let mut sum = 0;
    for i in 0..n {
        read_counter(&mut rx, i)?;
        sum += touch(pages);
        tx.write_all(&i.to_le_bytes())?;
    }
    Ok(sum)
}

/// Runs `n` round trips against `peer`, each peer touching `pages` pages after every wake-up.
pub fn ping_pong(peer: Peer, n: u64, pages: usize) -> io::Result<PingPong> {
    let (ping_rx, mut ping_tx) = pipe()?;
    let (mut pong_rx, pong_tx) = pipe()?;
    // Both peers' memory is written now, so the run measures TLB fills, not page faults.
    let mine = vec![1u8; pages * PAGE];
    let theirs = vec![1u8; pages * PAGE];
    let run = |ping_tx: &mut File, pong_rx: &mut File| -> io::Result<PingPong> {
        let s0 = thread_switches();
        let t0 = Instant::now();
        let mut sum = 0;
        for i in 0..n {
            ping_tx.write_all(&i.to_le_bytes())?;
            read_counter(pong_rx, i)?;
            sum += touch(&mine);
        }
        let elapsed_ns = t0.elapsed().as_nanos() as u64;
        std::hint::black_box(sum);
        Ok(PingPong {
            round_trips: n,
            elapsed_ns,
            switches: thread_switches().saturating_sub(s0),
        })
    };
    match peer {
        Peer::Thread => {
            let h = std::thread::spawn(move || echo(ping_rx, pong_tx, n, &theirs));
            let r = run(&mut ping_tx, &mut pong_rx);
            // On an error here the peer sees EOF or EPIPE and ends too.
            drop(ping_tx);
            let peer_result = h
                .join()
                .map_err(|_| io::Error::other("the echoing thread panicked"))?;
            let r = r?;
            peer_result?;
            Ok(r)
        }
        Peer::Process => {
            // SAFETY: the child only reads and writes pipes and touches memory allocated before
            // the fork, then leaves with _exit: nothing that needs a lock another thread of the
            // parent could hold (echo allocates only on a failure, and then exits at once).
            let pid = unsafe { libc::fork() };
            if pid < 0 {
                return Err(io::Error::last_os_error());
            }
            if pid == 0 {
                drop(ping_tx);
                drop(pong_rx);
                let ok = echo(ping_rx, pong_tx, n, &theirs).is_ok();
                // SAFETY: _exit ends the child without running the parent's exit handlers.
                unsafe { libc::_exit(if ok { 0 } else { 1 }) };
            }
            drop(ping_rx);
            drop(pong_tx);
            let r = run(&mut ping_tx, &mut pong_rx);
            drop(ping_tx);
            let mut status = 0;
            // SAFETY: `pid` is our child; `status` is a valid int to write.
            let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
            if rc != pid {
                return Err(io::Error::last_os_error());
            }
            let r = r?;
            if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
                return Err(io::Error::other(format!(
                    "the echoing child process failed (wait status {status:#x})"
                )));
            }
            Ok(r)
        }
    }
}

/// Nanoseconds per `getppid` system call over `n` calls.
pub fn syscall_ns(n: u64) -> f64 {
    let t0 = Instant::now();
    for _ in 0..n {
        // SAFETY: getppid has no arguments and cannot fail.
        std::hint::black_box(unsafe { libc::getppid() });
    }
    t0.elapsed().as_nanos() as f64 / n.max(1) as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len().saturating_sub(1) / 2).copied().unwrap_or(0.0)
}

/// Runs the alternated runs and prints them; the exit status fails only on an error.
pub fn run(args: &Args) -> Result<(), String> {
    if args.round_trips == 0 || args.repeats == 0 {
        return Err("ctxsw: --round-trips and --repeats must be at least 1".into());
    }
    let mut us = [Vec::new(), Vec::new()];
    let mut sys = Vec::new();
    for rep in 1..=args.repeats {
        for (k, peer) in [Peer::Thread, Peer::Process].into_iter().enumerate() {
            let r = ping_pong(peer, args.round_trips, args.pages)
                .map_err(|e| format!("ctxsw: {} ping-pong failed: {e}", peer.name()))?;
            println!(
                "CTXSW peer={} pages={} run={rep} round_trips={} us_per_round_trip={:.2} switches_per_round_trip={:.2}",
                peer.name(),
                args.pages,
                r.round_trips,
                r.us_per_round_trip(),
                r.switches as f64 / r.round_trips as f64
            );
            us[k].push(r.us_per_round_trip());
        }
        if args.syscalls > 0 {
            let ns = syscall_ns(args.syscalls);
            println!(
                "CTXSW syscall=getppid run={rep} calls={} ns_per_call={ns:.0}",
                args.syscalls
            );
            sys.push(ns);
        }
    }
    let (t, p) = (median(us[0].clone()), median(us[1].clone()));
    println!(
        "CTXSW-MEDIAN pages={} thread_us={t:.2} process_us={p:.2} process_minus_thread_us={:.2} ratio={:.2}{}",
        args.pages,
        p - t,
        p / t,
        if sys.is_empty() {
            String::new()
        } else {
            format!(" getppid_ns={:.0}", median(sys))
        }
    );
    Ok(())
}

/// The `ctxsw` binary.
pub fn main(args: impl IntoIterator<Item = String>) -> ExitCode {
    let args = match Args::try_parse_from(args) {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_peers_complete_every_round_trip_in_step() {
        for peer in [Peer::Thread, Peer::Process] {
            let r = ping_pong(peer, 200, 2).unwrap();
            assert_eq!(r.round_trips, 200);
            assert!(r.elapsed_ns > 0);
            // The pinging thread blocks in read at least once per round trip on a busy peer;
            // never more than a few times per round trip.
            assert!(r.switches <= 200 * 4, "{peer:?}: {} switches", r.switches);
        }
    }

    #[test]
    fn an_out_of_step_counter_is_an_error() {
        let (mut rx, mut tx) = pipe().unwrap();
        tx.write_all(&5u64.to_le_bytes()).unwrap();
        let e = read_counter(&mut rx, 4).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("got round 5, want 4"));
    }

    #[test]
    fn zero_round_trips_is_refused() {
        let a = Args::try_parse_from(["ctxsw", "-n", "0"]).unwrap();
        assert!(run(&a).unwrap_err().contains("at least 1"));
    }
}
