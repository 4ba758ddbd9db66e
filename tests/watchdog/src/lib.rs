//! A watchdog for tests that can hang: a hang becomes a failure that names the test.
//!
//! A test that waits for a completion (from a poller, a completion thread, an emulated
//! controller, a child process) hangs forever if the completion is lost: `cargo test` then sits
//! until CI's limit and no test is named. Arm a watchdog at the top of such a test:
//!
//! ```
//! # fn main() {
//! let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
//! // ... submit, wait for the completion ...
//! # }
//! ```
//!
//! The guard reads the test's name from the current thread (libtest names each test's thread
//! after the test; [`arm_named`] takes a name instead). If it is not dropped within its bound,
//! a monitor thread (one per process, shared by every guard) prints to stderr
//!
//! ```text
//! watchdog: test io::round_trip did not finish within 120 s (a lost wake-up or a hang); aborting the test binary
//! watchdog: hint: ...
//! ```
//!
//! and ends the process with exit status [`EXIT_CODE`]. A stuck thread cannot be killed, so the
//! whole test binary ends: the tests still running in it are not reported, but the one that
//! hung is named, and `cargo test` fails at once instead of at CI's limit. The message goes
//! straight to the process's stderr, past libtest's output capture (which would be lost).
//! Bind the guard to a named variable (`_w`, not `_`): `let _ = arm(..)` drops it at once.
//!
//! # Bounds
//! Pick the bound by the kind of test; each is many times the test's normal run time, so that
//! a noisy 2-core machine shared with compilers, or a debug build, never trips it:
//!
//! | bound | for | normal run time |
//! |---|---|---|
//! | [`UNIT`] (60 s) | unit tests: in-memory state, one emulated controller, dio-core | < 1 s |
//! | [`INTEGRATION`] (120 s) | integration tests through a controller, pollers, completion threads | < 10 s |
//! | [`STRESS`] (300 s) | stress and property tests: many threads, many thousands of I/Os | < 30 s |
//! | [`PROCESS`] (120 s) | one child process of a test (`perf`, `identify`), see [`output_within`] | < 10 s |
//!
//! Every bound is multiplied by `DIOXIDE_TEST_TIMEOUT_SCALE` ([`SCALE_VAR`], a positive
//! number, default 1): set it for slow machines, e.g. `DIOXIDE_TEST_TIMEOUT_SCALE=20` in a QEMU
//! guest under TCG, where I/O is about 100 times slower, or a large value to keep a test alive
//! under a debugger.
//!
//! Two outer limits back these bounds up: `tests/run` bounds each test step as a whole (and
//! names the step), and the QEMU suite (`tests/hil`) bounds each test binary in the guest,
//! where libtest runs one test at a time and prints its name before it starts.
//!
//! # Child processes
//! [`output_within`] is `Command::output` with a deadline: on overrun it kills the child and
//! fails the test with a panic naming the test and the command line.

use std::collections::BTreeMap;
use std::io::{Read, Write as _};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

/// Bound for unit tests: in-memory state, one emulated controller, dio-core (normally < 1 s).
pub const UNIT: Duration = Duration::from_secs(60);
/// Bound for integration tests through a controller, pollers and completion threads (normally
/// < 10 s).
pub const INTEGRATION: Duration = Duration::from_secs(120);
/// Bound for stress and property tests: many threads, many thousands of I/Os (normally < 30 s).
pub const STRESS: Duration = Duration::from_secs(300);
/// Bound for one child process of a test, e.g. a `perf` run (normally < 10 s).
pub const PROCESS: Duration = Duration::from_secs(120);

/// The environment variable that multiplies every bound (a positive number, default 1).
pub const SCALE_VAR: &str = "DIOXIDE_TEST_TIMEOUT_SCALE";
/// The exit status of a test binary ended by the watchdog (as `timeout(1)`'s).
pub const EXIT_CODE: i32 = 124;

/// An armed watchdog; dropping it disarms it. See the [crate docs](crate).
#[must_use = "the watchdog is disarmed when this guard is dropped: bind it to `_w`, not `_`"]
#[derive(Debug)]
pub struct Watchdog {
    id: u64,
    name: String,
    bound: Duration,
}

impl Watchdog {
    /// The test this watchdog watches.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bound after scaling by [`SCALE_VAR`].
    pub fn bound(&self) -> Duration {
        self.bound
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        // Removing a deadline never makes the monitor's next wake-up earlier: no notify.
        lock().armed.remove(&self.id);
    }
}

/// Arms a watchdog for the current test: `bound` (scaled by [`SCALE_VAR`]) from now.
///
/// The test's name is the current thread's name (libtest's test threads carry the test's
/// path, e.g. `emulated::tests::reads_split_over_mdts`).
///
/// # Panics
/// If [`SCALE_VAR`] is set to something other than a positive number.
pub fn arm(bound: Duration) -> Watchdog {
    let name = thread::current()
        .name()
        .unwrap_or("<a test on an unnamed thread>")
        .to_string();
    arm_named(name, bound)
}

/// Arms a watchdog under the given name (for a thread that is not the test's own).
///
/// # Panics
/// If [`SCALE_VAR`] is set to something other than a positive number.
pub fn arm_named(name: impl Into<String>, bound: Duration) -> Watchdog {
    let name = name.into();
    let bound = scaled(bound);
    let deadline = Instant::now() + bound;
    let mut st = lock();
    let id = st.next_id;
    st.next_id += 1;
    st.armed.insert(
        id,
        Armed {
            name: name.clone(),
            bound,
            deadline,
        },
    );
    if !st.monitor_started {
        st.monitor_started = true;
        thread::Builder::new()
            .name("test-watchdog".into())
            .spawn(monitor)
            .expect("spawn the test-watchdog monitor thread");
    }
    drop(st);
    shared().cv.notify_one();
    Watchdog { id, name, bound }
}

/// `bound` multiplied by [`SCALE_VAR`].
///
/// # Panics
/// If [`SCALE_VAR`] is set to something other than a positive number.
pub fn scaled(bound: Duration) -> Duration {
    let var = std::env::var(SCALE_VAR).ok();
    match scale_from(var.as_deref()) {
        Ok(s) => bound.mul_f64(s),
        Err(msg) => panic!("{msg}"),
    }
}

/// Parses the value of [`SCALE_VAR`] (`None`: unset).
fn scale_from(var: Option<&str>) -> Result<f64, String> {
    let Some(v) = var.map(str::trim).filter(|v| !v.is_empty()) else {
        return Ok(1.0);
    };
    match v.parse::<f64>() {
        // Capped so that `Duration::mul_f64` cannot overflow (a million times an hour).
        Ok(s) if s.is_finite() && s > 0.0 => Ok(s.min(1e6)),
        _ => Err(format!(
            "{SCALE_VAR}={v:?} is not a positive number; set it to e.g. 1 (the default) or 20 \
             (for a QEMU guest under TCG)"
        )),
    }
}

/// Runs `cmd` like [`Command::output`] (stdin from /dev/null, stdout and stderr captured), but
/// kills it if it runs longer than `bound` (scaled by [`SCALE_VAR`]).
///
/// # Errors
/// The command could not be started, or waiting on it failed.
///
/// # Panics
/// If the command overran: the panic names the current test and the command line, and shows
/// the end of what the command wrote to stderr.
pub fn output_within(cmd: &mut Command, bound: Duration) -> std::io::Result<Output> {
    let bound = scaled(bound);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let deadline = Instant::now() + bound;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        let now = Instant::now();
        if now >= deadline {
            break None;
        }
        thread::sleep((deadline - now).min(Duration::from_millis(10)));
    };
    let Some(status) = status else {
        kill(&mut child);
        let stderr = String::from_utf8_lossy(&err.join().unwrap_or_default()).into_owned();
        let tail: String = {
            let lines: Vec<&str> = stderr.lines().collect();
            lines[lines.len().saturating_sub(20)..].join("\n")
        };
        panic!(
            "watchdog: test {} : the command {cmd:?} did not finish within {} (a hang); killed \
             it. The end of its stderr:\n{tail}",
            thread::current().name().unwrap_or("<unnamed thread>"),
            secs(bound),
        );
    };
    Ok(Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// Reads a child's pipe to its end on a thread (so that a chatty child never blocks on a full
/// pipe while we wait for it).
fn drain(pipe: Option<impl Read + Send + 'static>) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_end(&mut buf);
        }
        buf
    })
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// A duration for a message: `60 s`, `0.3 s`.
fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if d.subsec_nanos() == 0 {
        format!("{} s", d.as_secs())
    } else if s >= 10.0 {
        format!("{s:.0} s")
    } else {
        format!("{s:.1} s")
    }
}

struct Armed {
    name: String,
    bound: Duration,
    deadline: Instant,
}

#[derive(Default)]
struct State {
    next_id: u64,
    armed: BTreeMap<u64, Armed>,
    monitor_started: bool,
}

struct Shared {
    state: Mutex<State>,
    cv: Condvar,
}

fn shared() -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    SHARED.get_or_init(|| Shared {
        state: Mutex::new(State::default()),
        cv: Condvar::new(),
    })
}

/// The state; a panic while it was locked cannot leave it inconsistent (every update is one
/// map operation), so a poisoned lock is used as is.
fn lock() -> MutexGuard<'static, State> {
    shared().state.lock().unwrap_or_else(|e| e.into_inner())
}

/// The monitor thread: sleeps until the earliest deadline, ends the process if a guard is
/// still armed past its deadline.
fn monitor() {
    let sh = shared();
    let mut st = lock();
    loop {
        let now = Instant::now();
        let mut expired: Vec<&Armed> = st.armed.values().filter(|a| a.deadline <= now).collect();
        if !expired.is_empty() {
            expired.sort_by_key(|a| a.deadline);
            expire(&expired);
        }
        let next = st.armed.values().map(|a| a.deadline).min();
        st = match next {
            Some(d) => {
                sh.cv
                    .wait_timeout(st, d - now)
                    .unwrap_or_else(|e| e.into_inner())
                    .0
            }
            None => sh.cv.wait(st).unwrap_or_else(|e| e.into_inner()),
        };
    }
}

/// Reports the expired guards and ends the process.
fn expire(expired: &[&Armed]) -> ! {
    let exe = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "<this test binary>".into());
    let scale = std::env::var(SCALE_VAR).unwrap_or_else(|_| "1".into());
    let mut msg = String::new();
    for a in expired {
        msg += &format!(
            "watchdog: test {} did not finish within {} (a lost wake-up or a hang); aborting the \
             test binary\n",
            a.name,
            secs(a.bound)
        );
    }
    let first = &expired[0].name;
    msg += &format!(
        "watchdog: hint: the test binary {exe} is ended with exit status {EXIT_CODE} (the stuck \
         thread cannot be stopped) and its captured output is lost; run the test alone with \
         `cargo test ... -- --exact {first} --nocapture` to see what it printed, attach a \
         debugger to see where it waits, or raise {SCALE_VAR} (now {scale}) if the machine is \
         only slow\n"
    );
    // Straight to the process's stderr: libtest's capture of `eprintln!` would be lost.
    let mut e = std::io::stderr().lock();
    let _ = e.write_all(msg.as_bytes());
    let _ = e.flush();
    std::process::exit(EXIT_CODE);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Set (to the test's name) in a child run of this test binary: that test then plays the
    /// child side of its self-test.
    const CHILD_VAR: &str = "TEST_WATCHDOG_SELFTEST_CHILD";

    /// True in the child run of `test`.
    fn is_child(test: &str) -> bool {
        std::env::var(CHILD_VAR).as_deref() == Ok(test)
    }

    /// Runs this test binary on `test` alone, as its child side.
    fn run_child(test: &str) -> Output {
        let exe = std::env::current_exe().unwrap();
        output_within(
            Command::new(exe)
                .args(["--exact", test, "--nocapture", "--test-threads=1"])
                .env(CHILD_VAR, test)
                .env_remove(SCALE_VAR),
            PROCESS,
        )
        .unwrap()
    }

    fn text(b: &[u8]) -> String {
        String::from_utf8_lossy(b).into_owned()
    }

    #[test]
    fn an_expired_guard_ends_the_binary_naming_the_test() {
        const ME: &str = "tests::an_expired_guard_ends_the_binary_naming_the_test";
        if is_child(ME) {
            let _w = arm(Duration::from_millis(300));
            eprintln!("child: hanging now");
            // A completion that never comes.
            let (_tx, rx) = std::sync::mpsc::channel::<()>();
            let _ = rx.recv_timeout(Duration::from_secs(600));
            eprintln!("child: woke up");
            return;
        }
        let t0 = Instant::now();
        let o = run_child(ME);
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(EXIT_CODE), "stderr:\n{err}");
        assert!(
            err.contains(&format!(
                "watchdog: test {ME} did not finish within 0.3 s (a lost wake-up or a hang); \
                 aborting the test binary\n"
            )),
            "stderr:\n{err}"
        );
        assert!(err.contains("watchdog: hint: "), "stderr:\n{err}");
        assert!(
            err.contains(&format!("--exact {ME} --nocapture")),
            "stderr:\n{err}"
        );
        // The child reached its hang (so the watchdog, not something else, ended it).
        assert!(err.contains("child: hanging now"), "stderr:\n{err}");
        assert!(!err.contains("child: woke up"), "stderr:\n{err}");
        assert!(t0.elapsed() < PROCESS);
    }

    #[test]
    fn a_guard_dropped_in_time_does_nothing() {
        const ME: &str = "tests::a_guard_dropped_in_time_does_nothing";
        if is_child(ME) {
            for _ in 0..3 {
                let w = arm(Duration::from_millis(300));
                drop(w);
            }
            {
                let _w = arm(Duration::from_millis(300));
                thread::sleep(Duration::from_millis(50));
            }
            // Well past every bound: no guard is armed, nothing happens.
            thread::sleep(Duration::from_millis(900));
            eprintln!("child: done");
            return;
        }
        let o = run_child(ME);
        let err = text(&o.stderr);
        assert!(o.status.success(), "stderr:\n{err}");
        assert!(!err.contains("watchdog:"), "stderr:\n{err}");
        assert!(err.contains("child: done"), "stderr:\n{err}");
    }

    #[test]
    fn a_named_guard_on_another_thread_is_reported_by_that_name() {
        const ME: &str = "tests::a_named_guard_on_another_thread_is_reported_by_that_name";
        if is_child(ME) {
            let _w = arm(Duration::from_secs(30));
            thread::spawn(|| {
                let _w = arm_named("helper-of-the-test", Duration::from_millis(200));
                thread::sleep(Duration::from_secs(600));
            })
            .join()
            .unwrap();
            return;
        }
        let o = run_child(ME);
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(EXIT_CODE), "stderr:\n{err}");
        assert!(
            err.contains("watchdog: test helper-of-the-test did not finish within 0.2 s"),
            "stderr:\n{err}"
        );
        // The test's own, longer guard had not expired.
        assert!(
            !err.contains(&format!("watchdog: test {ME}")),
            "stderr:\n{err}"
        );
    }

    #[test]
    fn the_scale_multiplies_and_rejects_nonsense() {
        assert_eq!(scale_from(None), Ok(1.0));
        assert_eq!(scale_from(Some("")), Ok(1.0));
        assert_eq!(scale_from(Some(" 20 ")), Ok(20.0));
        assert_eq!(scale_from(Some("0.5")), Ok(0.5));
        for bad in ["0", "-1", "x", "inf", "NaN"] {
            let e = scale_from(Some(bad)).unwrap_err();
            assert!(e.contains(SCALE_VAR) && e.contains("positive"), "{e}");
        }
        assert_eq!(secs(Duration::from_secs(60)), "60 s");
        assert_eq!(secs(Duration::from_millis(300)), "0.3 s");
        assert_eq!(secs(Duration::from_millis(120_500)), "120 s");
    }

    #[test]
    fn output_within_returns_the_output_of_a_quick_command() {
        let o = output_within(
            Command::new("sh").args(["-c", "echo out; echo err >&2"]),
            UNIT,
        )
        .unwrap();
        assert!(o.status.success());
        assert_eq!(text(&o.stdout), "out\n");
        assert_eq!(text(&o.stderr), "err\n");
    }

    #[test]
    fn output_within_kills_an_overrunning_command_and_names_test_and_command() {
        let t0 = Instant::now();
        let r = thread::Builder::new()
            .name("some::test_name".into())
            .spawn(|| {
                output_within(
                    Command::new("sh").args(["-c", "echo started >&2; exec sleep 600"]),
                    Duration::from_millis(200),
                )
            })
            .unwrap()
            .join();
        let msg = *r
            .expect_err("the overrun panics")
            .downcast::<String>()
            .unwrap();
        assert!(
            msg.starts_with(
                "watchdog: test some::test_name : the command \"sh\" \"-c\" \"echo started >&2; \
                 exec sleep 600\" did not finish within 0.2 s (a hang); killed it"
            ),
            "{msg}"
        );
        assert!(msg.ends_with("\nstarted"), "{msg}");
        // Killed, not waited for: far less than the 600 s it would have slept.
        assert!(t0.elapsed() < Duration::from_secs(60));
    }
}
