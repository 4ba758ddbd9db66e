//! End-to-end tests of the `perf` binary on the built-in emulated controller.

use dioxide_tools::cli::DoorbellMode;
use dioxide_tools::json::PerfReport;
use std::process::{Command, Output};

fn perf(args: &str) -> Output {
    // A hung run is killed and fails the test, naming it and the command line.
    test_watchdog::output_within(
        Command::new(env!("CARGO_BIN_EXE_perf")).args(args.split_whitespace()),
        test_watchdog::PROCESS,
    )
    .expect("run perf")
}

/// The JSON report of a run that must succeed.
fn perf_json(args: &str) -> PerfReport {
    let o = perf(&format!("{args} --json"));
    assert!(o.status.success(), "{args}: {}", text(&o.stderr));
    serde_json::from_slice(&o.stdout).expect("stdout is the JSON document")
}

/// This project's CI machines have 2 cores: a multi-core test must not pass by skipping.
fn require_two_cores() {
    let cores = dioxide_tools::perf::allowed_cores();
    assert!(
        cores.len() >= 2 && cores[..2] == [0, 1],
        "this test needs cores 0 and 1 (the CI machines have 2); available: {cores:?}"
    );
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The numbers of a table row: IOPS, MiB/s, average, min, max.
fn numbers(line: &str) -> [f64; 5] {
    let tail = &line[line.rfind(':').unwrap() + 1..];
    let v: Vec<f64> = tail
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect();
    v.try_into().unwrap()
}

/// (rows, total) of the report.
fn table(out: &str) -> (Vec<[f64; 5]>, [f64; 5]) {
    let rows = out
        .lines()
        .filter(|l| {
            l.contains(" from core ")
                && !l.starts_with("Summary")
                && !l.starts_with("Latency histogram")
        })
        .map(numbers)
        .collect();
    let total = out
        .lines()
        .find(|l| l.starts_with("Total "))
        .map(numbers)
        .expect("Total row");
    (rows, total)
}

fn check_total(rows: &[[f64; 5]], total: &[f64; 5]) {
    let iops: f64 = rows.iter().map(|r| r[0]).sum();
    let mib: f64 = rows.iter().map(|r| r[1]).sum();
    assert!(
        (iops - total[0]).abs() <= 0.01 * rows.len() as f64 + 1e-9,
        "{iops} vs {}",
        total[0]
    );
    assert!(
        (mib - total[1]).abs() <= 0.01 * rows.len() as f64 + 1e-9,
        "{mib} vs {}",
        total[1]
    );
    let min = rows.iter().map(|r| r[3]).fold(f64::MAX, f64::min);
    let max = rows.iter().map(|r| r[4]).fold(0.0, f64::max);
    assert_eq!((min, max), (total[3], total[4]));
}

#[test]
fn every_workload_runs() {
    let _w = test_watchdog::arm(test_watchdog::STRESS);
    for w in [
        "read",
        "write",
        "randread",
        "randwrite",
        "rw -M 50",
        "randrw -M 30",
        "verify",
    ] {
        let o = perf(&format!("-q 8 -o 4096 -w {w} -t 10 -d 2000"));
        let out = text(&o.stdout);
        assert!(o.status.success(), "{w}: {}\n{out}", text(&o.stderr));
        assert!(
            out.starts_with("Using the built-in emulated NVMe controller (inline, "),
            "{w}: first line: {out}"
        );
        assert!(out.contains(
            "Initializing NVMe Controllers\nAttached to NVMe Controller at emulated (inline) ["
        ));
        assert!(out.contains("Associating EMULATED (inline) NSID 1 with lcore 0\nInitialization complete. Launching workers.\n"));
        assert!(out.contains("Device Information"));
        let (rows, total) = table(&out);
        assert_eq!(rows.len(), 1, "{out}");
        assert!(rows[0][0] > 0.0, "IOPS: {out}");
        assert!(
            rows[0][3] <= rows[0][2] && rows[0][2] <= rows[0][4],
            "min <= avg <= max: {out}"
        );
        check_total(&rows, &total);
        if w == "verify" {
            assert!(
                out.contains("Verify: 8000 blocks checked, 0 mismatched"),
                "{out}"
            );
        }
    }
}

#[test]
fn two_cores_two_namespaces_total_is_the_sum() {
    let _w = test_watchdog::arm(test_watchdog::STRESS);
    require_two_cores();
    let o = perf("-q 4 -o 512 -w randread -t 10 -d 3000 -c 0x3 --emulated-namespaces 2 -m");
    let out = text(&o.stdout);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(
        out.contains("EMULATED (inline) NSID 1 from core  0:"),
        "{out}"
    );
    assert!(
        out.contains("EMULATED (inline) NSID 2 from core  1:"),
        "{out}"
    );
    let (rows, total) = table(&out);
    assert_eq!(rows.len(), 2);
    check_total(&rows, &total);
    assert!(out.contains("Core  0:") && out.contains("% Busy"), "{out}");
}

#[test]
fn latency_summary_and_histogram() {
    let _w = test_watchdog::arm(test_watchdog::STRESS);
    let o = perf("-q 16 -o 4096 -w randread -t 10 -d 5000 -LL");
    let out = text(&o.stdout);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(out.contains("Summary latency data for EMULATED (inline) NSID 1"));
    let pct: Vec<(f64, f64)> = out
        .lines()
        .filter(|l| l.contains("% : ") && l.ends_with("us"))
        .map(|l| {
            let (p, v) = l.split_once("% : ").unwrap();
            (
                p.trim().parse().unwrap(),
                v.trim_end_matches("us").trim().parse().unwrap(),
            )
        })
        .collect();
    assert_eq!(pct.len(), 15, "{out}");
    assert_eq!(pct[0].0, 1.0);
    assert_eq!(pct[14].0, 99.99999);
    assert!(
        pct.windows(2).all(|w| w[0].1 <= w[1].1),
        "monotonic: {pct:?}"
    );
    assert!(out.contains("Latency histogram for EMULATED (inline) NSID 1"));
    assert!(out.contains("       Range in us     Cumulative    IO count\n"));
    let last = out
        .lines()
        .rfind(|l| l.contains("%  ("))
        .expect("histogram rows");
    assert!(last.contains("100.0000%"), "{last}");
    let count: u64 = out
        .lines()
        .filter(|l| l.contains("%  ("))
        .map(|l| {
            l[l.rfind('(').unwrap() + 1..l.rfind(')').unwrap()]
                .trim()
                .parse::<u64>()
                .unwrap()
        })
        .sum();
    assert_eq!(count, 5000);
}

#[test]
fn json_report() {
    let _w = test_watchdog::arm(test_watchdog::STRESS);
    let o = perf("-q 8 -o 4096 -w randrw -M 70 -t 10 -d 4000 --json --seed 7");
    assert!(o.status.success(), "{}", text(&o.stderr));
    let r: PerfReport = serde_json::from_slice(&o.stdout).expect("stdout is the JSON document");
    assert_eq!(r.schema, "dioxide-perf/1");
    assert_eq!(r.target, "EMULATED (inline)");
    assert_eq!(
        (r.config.queue_depth, r.config.io_size, r.config.rwmixread),
        (8, 4096, Some(70))
    );
    assert_eq!(r.config.seed, 7);
    assert_eq!(r.devices.len(), 1);
    let d = &r.devices[0];
    assert_eq!(d.io_completed, 4000);
    assert!(d.iops > 0.0);
    assert_eq!(d.latency_us.percentiles.len(), 15);
    let t = r.total.unwrap();
    assert_eq!(t.io_completed, 4000);
    assert!((t.iops - d.iops).abs() < 1e-6);
    // The narrative goes to stderr.
    assert!(text(&o.stderr).contains("Using the built-in emulated NVMe controller"));
}

#[test]
fn plot_is_written() {
    let _w = test_watchdog::arm(test_watchdog::STRESS);
    let path = std::env::temp_dir().join(format!("dioxide-perf-plot-{}.svg", std::process::id()));
    let o = perf(&format!(
        "-q 8 -o 4096 -w randread -t 10 -d 2000 --plot {}",
        path.display()
    ));
    assert!(o.status.success(), "{}", text(&o.stderr));
    let svg = std::fs::read_to_string(&path).unwrap();
    std::fs::remove_file(&path).ok();
    assert!(svg.starts_with("<?xml"));
    assert!(svg.trim_end().ends_with("</svg>"));
    assert!(svg.contains("EMULATED (inline) NSID 1, core 0"));
    assert!(svg.contains("99.999%"));
}

#[test]
fn verify_passes_on_memory_and_fails_on_a_null_device() {
    let _w = test_watchdog::arm(test_watchdog::STRESS);
    let o = perf("-q 4 -o 8192 -w verify -t 10 -d 1000 --emulated-block-size 4096");
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(text(&o.stdout).contains("Verify: 1000 blocks checked, 0 mismatched"));

    let o = perf("-q 4 -o 4096 -w verify -t 10 -d 100 --emulated-backing null");
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(err.contains("every block will mismatch"), "{err}");
    let line = err
        .lines()
        .find(|l| l.starts_with("verify FAILED: "))
        .expect("verify line");
    let (n, rest) = line["verify FAILED: ".len()..].split_once(" of ").unwrap();
    assert!(
        rest.starts_with(&format!("{n} blocks mismatched; ")),
        "every block: {line}"
    );
    assert!(
        line.ends_with("first: EMULATED (inline) NSID 1 LBA 0 offset 0: expected 0x00, got 0xa5"),
        "{line}"
    );
}

#[test]
fn threaded_emulator() {
    let _w = test_watchdog::arm(test_watchdog::STRESS);
    let o = perf("-q 8 -o 4096 -w randwrite -t 10 -d 2000 --emulated-mode threaded");
    let out = text(&o.stdout);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(
        out.starts_with("Using the built-in emulated NVMe controller (threaded, "),
        "{out}"
    );
    assert!(out.contains("EMULATED (threaded) NSID 1 from core  0:"));
}

#[test]
fn per_command_doorbell_and_queue_pairs() {
    let _w = test_watchdog::arm(test_watchdog::STRESS);
    let r = perf_json("-q 16 -o 4096 -w randread -t 10 -d 2000 -P 4 -C 2 --doorbell per-command");
    assert_eq!(r.config.qpairs_per_ns, 4);
    assert_eq!(r.config.doorbell, DoorbellMode::PerCommand);
    // Four distinct queue pairs for the one namespace, and the I/O spread over all of them.
    assert_eq!(r.queues.len(), 4, "{:?}", r.queues);
    let mut qids: Vec<u16> = r.queues.iter().map(|q| q.qid).collect();
    qids.sort();
    qids.dedup();
    assert_eq!(qids.len(), 4, "{:?}", r.queues);
    for q in &r.queues {
        assert_eq!((q.name.as_str(), q.core), ("EMULATED (inline) NSID 1", 0));
        assert!(q.commands.unwrap() > 0, "unused queue pair: {q:?}");
    }
    let sent: u64 = r.queues.iter().map(|q| q.commands.unwrap()).sum();
    assert_eq!(sent, 2000);
    assert_eq!(r.total.unwrap().io_completed, 2000);
    // One SQ doorbell per command, versus one per batch.
    let emu = r.emulated.unwrap();
    assert!(emu.doorbell_writes > 2000, "{emu:?}");
    let batch = perf_json("-q 16 -o 4096 -w randread -t 10 -d 2000 -P 4 -C 2 --doorbell per-batch");
    assert_eq!(batch.config.doorbell, DoorbellMode::PerBatch);
    assert!(
        batch.emulated.unwrap().doorbell_writes < emu.doorbell_writes,
        "per-batch should ring fewer doorbells than per-command"
    );
}

#[test]
fn small_queue_warns_like_spdk() {
    let _w = test_watchdog::arm(test_watchdog::STRESS);
    let o = perf("-q 64 -o 4096 -w randread -t 10 -d 1000 --io-queue-size 64");
    let out = text(&o.stdout);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(out.contains(
        "Controller IO queue size 64, less than required.\nConsider using lower queue depth or smaller IO size, because IO requests may be queued at the NVMe driver.\n"
    ), "{out}");
}

#[test]
fn io_queue_size_sets_the_queue_entries() {
    let _w = test_watchdog::arm(test_watchdog::STRESS);
    let r = perf_json("-q 32 -o 4096 -w randread -t 10 -d 1000 --io-queue-size 16");
    assert_eq!(r.queues.len(), 1);
    assert_eq!(r.queues[0].entries, 16, "{:?}", r.queues);
    assert!(
        r.warnings
            .iter()
            .any(|w| w.starts_with("Controller IO queue size 16, less than required.")),
        "{:?}",
        r.warnings
    );
    // More in flight than the queue holds: still every I/O completes.
    assert_eq!(r.total.unwrap().io_completed, 1000);
    // Without the option: the controller's maximum, and no warning.
    let r = perf_json("-q 32 -o 4096 -w randread -t 10 -d 1000");
    assert!(r.queues[0].entries > 32, "{:?}", r.queues);
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
}

#[test]
fn warmup_is_excluded_from_the_measurement() {
    let _w = test_watchdog::arm(test_watchdog::STRESS);
    // A warm-up five times the measurement, so the two are told apart with a wide margin even
    // on a loaded machine.
    let r = perf_json("-q 4 -o 4096 -w randread -t 0.4 -a 2");
    assert_eq!(r.config.warmup_secs, 2.0);
    // The measured time is -t (0.4 s), not -t plus the warm-up (2.4 s).
    let secs = r.elapsed_us / 1e6;
    assert!((0.38..2.0).contains(&secs), "elapsed {secs} s");
    // The device saw the warm-up I/O too; the report counts only the measured ones.
    let measured = r.total.unwrap().io_completed;
    let sent = r.emulated.unwrap().io_commands;
    assert!(measured > 0);
    assert!(
        sent > 2 * measured,
        "warm-up I/O counted: {measured} measured of {sent} sent"
    );
}

#[test]
fn use_every_core_runs_each_namespace_on_each_core() {
    let _w = test_watchdog::arm(test_watchdog::STRESS);
    require_two_cores();
    let r = perf_json("-q 4 -o 512 -w randread -t 10 -d 1000 -c 0x3 --use-every-core");
    assert_eq!(r.config.cores, [0, 1]);
    let mut rows: Vec<(u32, u32, u64)> = r
        .devices
        .iter()
        .map(|d| (d.nsid, d.core, d.io_completed))
        .collect();
    rows.sort();
    assert_eq!(rows, [(1, 0, 1000), (1, 1, 1000)]);
    assert_eq!(r.total.unwrap().io_completed, 2000);
    // Each core has its own queue pair.
    assert_eq!(r.queues.len(), 2);
    assert_ne!(r.queues[0].qid, r.queues[1].qid);
}

#[test]
fn media_errors_fail_the_run_unless_continue_on_error() {
    let _w = test_watchdog::arm(test_watchdog::STRESS);
    let args = "-q 4 -o 4096 -w randread -t 10 -d 400 --emulated-size 1m --emulated-fail-lba 0:64";
    let o = perf(args);
    assert!(!o.status.success(), "an I/O error must fail the run");
    let err = text(&o.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.lines().any(
            |l| l.starts_with("EMULATED (inline) NSID 1: Read completed with error: ")
                && l.ends_with("failed: Unrecovered Read Error (sct 0x2, sc 0x81)")
        ),
        "{err}"
    );

    let o = perf(&format!("{args} -Q 1 --json"));
    assert!(o.status.success(), "{}", text(&o.stderr));
    let r: PerfReport = serde_json::from_slice(&o.stdout).expect("JSON");
    let t = r.total.unwrap();
    let d = &r.devices[0];
    assert!(d.io_errors > 0 && t.io_errors == d.io_errors, "{d:?}");
    assert!(t.io_errors < t.io_completed, "only LBAs 0..64 fail: {t:?}");
    assert_eq!(r.emulated.unwrap().faults_fired, t.io_errors);
    let err = text(&o.stderr);
    assert!(
        err.contains("Read completed with error (sct=2, sc=129)"),
        "{err}"
    );
    assert!(!err.contains(": Read completed with error: "), "{err}");

    // The text report counts them too: one line, matching the errors logged (-Q 1 logs each).
    let o = perf(&format!("{args} -Q 1"));
    assert!(o.status.success(), "{}", text(&o.stderr));
    let out = text(&o.stdout);
    let n: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("I/O errors: "))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no I/O errors line:\n{out}"));
    let logged = text(&o.stderr).matches("Read completed with error").count() as u64;
    assert!(n > 0 && n == logged, "{n} counted, {logged} logged:\n{out}");
    assert!(
        out.contains(&format!("(EMULATED (inline) NSID 1 from core 0: {n})")),
        "{out}"
    );
}

#[test]
fn reset_after_ios_resets_once_and_goes_on() {
    let _w = test_watchdog::arm(test_watchdog::STRESS);
    let o = perf(
        "-q 8 -o 4096 -w verify -t 10 -d 4000 --emulated-backing memory --emulated-size 16m \
         -Q 1 --reset-after-ios 1000",
    );
    let (out, err) = (text(&o.stdout), text(&o.stderr));
    assert!(o.status.success(), "{out}\n{err}");
    assert!(
        err.contains("perf: the controller was reset once, under I/O"),
        "{err}"
    );
    // The I/Os in flight at the reset failed, once each; the run went on to its 4000.
    let (counts, failed) = reset_failures(&err, 8);
    assert!(
        counts.contains(&format!("({failed} with an error)")),
        "{counts}"
    );
    assert!(out.contains(" blocks checked, 0 mismatched"), "{out}");

    // Without -Q the first failed I/O stops the run, naming the reset.
    let o = perf("-q 8 -o 4096 -w read -t 10 -d 4000 --reset-after-ios 1000");
    let err = text(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("the controller was reset"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// The reset with two worker cores: it runs in one worker's poll while the other core's queue
/// pair has I/Os in flight and keeps submitting. Every I/O ends once (none lost, none doubled),
/// those the reset failed are the only errors, both jobs go on to their count on renewed queue
/// pairs, and the data verifies.
#[test]
fn reset_after_ios_with_two_worker_cores() {
    let _w = test_watchdog::arm(test_watchdog::STRESS);
    for mode in ["inline", "threaded"] {
        let o = perf(&format!(
            "-q 8 -o 4096 -w verify -t 20 -d 4000 -c 0x3 --emulated-mode {mode} \
             --emulated-backing memory --emulated-size 16m -Q 1 --reset-after-ios 1000"
        ));
        let (out, err) = (text(&o.stdout), text(&o.stderr));
        let err = format!("{mode}: {err}");
        assert!(o.status.success(), "{out}\n{err}");
        assert!(
            err.contains("perf: the controller was reset once, under I/O"),
            "{err}"
        );
        assert!(!err.contains("double completion"), "{err}");
        assert!(!err.contains("process completion error"), "{err}");
        // At most the two queue depths were in flight at the reset; submissions refused while
        // it ran are retried (-Q), not counted as completions.
        reset_failures(&err, 16);
        assert!(out.contains(" blocks checked, 0 mismatched"), "{out}");
        // Both cores' jobs ran (a result line each).
        for core in [0, 1] {
            let ran = out.lines().any(|l| {
                l.split(':').next().is_some_and(|d| {
                    d.contains("from core") && d.trim_end().ends_with(&format!(" {core}"))
                })
            });
            assert!(ran, "{mode}: core {core}:\n{out}");
        }
    }
}

/// From a `--reset-after-ios` run's stderr: its `I/O counts:` line, which must show nothing
/// lost, and the I/Os the reset failed (one line each), at least one and at most `max` (the
/// I/Os that can be in flight).
fn reset_failures(err: &str, max: usize) -> (&str, usize) {
    let counts = err
        .lines()
        .find_map(|l| l.strip_prefix("I/O counts: "))
        .unwrap_or_else(|| panic!("no I/O counts:\n{err}"));
    assert!(counts.ends_with(", 0 never completed"), "{counts}");
    let failed = err
        .lines()
        .filter(|l| l.contains("the controller was reset; create a new queue pair"))
        .count();
    assert!(
        (1..=max).contains(&failed),
        "{failed} failed by the reset:\n{err}"
    );
    (counts, failed)
}

#[test]
fn continue_on_error_rate_limits_the_log() {
    let _w = test_watchdog::arm(test_watchdog::STRESS);
    let o = perf(
        "-q 4 -o 4096 -w randread -t 10 -d 400 --emulated-size 1m --emulated-fail-lba 0:64 -Q 1000",
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let logged = text(&o.stderr)
        .lines()
        .filter(|l| l.contains("completed with error"))
        .count();
    assert_eq!(logged, 1, "-Q 1000 logs the first error only");
}

#[test]
fn io_size_not_a_block_multiple_skips_the_namespace() {
    let _w = test_watchdog::arm(test_watchdog::STRESS);
    let o = perf("-q 4 -o 1000 -w read -t 1");
    assert!(!o.status.success());
    let out = text(&o.stdout);
    assert!(out.contains("WARNING: IO size 1000 (-o) is not a multiple of nsid 1 sector size 512. Removing this ns from test\n"), "{out}");
    assert!(out.contains("WARNING: Some requested NVMe devices were skipped"));
    assert_eq!(
        text(&o.stderr).trim(),
        "No valid namespaces to test (see the warnings above)"
    );
}

#[test]
fn bad_input_is_one_line_and_fails() {
    let _w = test_watchdog::arm(test_watchdog::STRESS);
    let cases = [
        ("-o 4096 -w read -t 1", "missing -q (--io-depth) operand"),
        ("-q 1 -w read -t 1", "missing -o (--io-size) operand"),
        ("-q 1 -o 4096 -t 1", "missing -w (--io-pattern) operand"),
        ("-q 1 -o 4096 -w read", "missing -t (--time) operand"),
        (
            "-q 0 -o 4096 -w read -t 1",
            "-q (--io-depth) must be greater than 0",
        ),
        (
            "-q 1 -o 4096 -w bogus -t 1",
            "io pattern type must be one of",
        ),
        (
            "-q 1 -o 4096 -w rw -t 1",
            "-M (--rwmixread) must be specified to value from 0 to 100 for rw or randrw.",
        ),
        (
            "-q 1 -o 4096 -w randrw -t 1",
            "-M (--rwmixread) must be specified",
        ),
        ("-q 1 -o 4096 -w read -t 1 -r trtype:PCIe", "needs traddr"),
        (
            "-q 1 -o 4096 -w read -t 1 -r traddr:0000:01:00.9",
            "is not a PCI address",
        ),
        (
            "-q 1 -o 4096 -w read -t 1 -r trtype:RDMA",
            "transport type 'RDMA' is not supported",
        ),
        (
            "-q 1 -o 4096 -w read -t 1 -r trtype:emulated,ns:3",
            "namespace 3 does not exist",
        ),
        ("-q 1 -o 4096 -w read -t 1 -r 0000:ff:1f.7", "0000:ff:1f.7"),
        ("-q 1 -o 4096 -w read -t 1 -c 0x0", "selects no core"),
        (
            "-q 1 -o 4096 -w read -t 1 -c 0x8000",
            "is not available to this process",
        ),
        (
            "-q 1 -o 4096 -w read -t 1 --emulated-fail-lba 5",
            "--emulated-fail-lba must be START:COUNT",
        ),
        (
            "-q 1 -o 4096 -w read -t 1 --emulated-fault stall:3",
            "--emulated-fault must be cfs:N, garbage:N or remove:N",
        ),
        (
            "-q 1 -o 4096 -w read -t 1 --bogus",
            "unexpected argument '--bogus'",
        ),
    ];
    for (args, want) in cases {
        let o = perf(args);
        let err = text(&o.stderr);
        assert!(!o.status.success(), "{args}: succeeded");
        assert!(!err.contains("panicked"), "{args}: {err}");
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "{args}: not one line:\n{err}"
        );
        assert!(err.contains(want), "{args}: {err}");
    }
}

#[test]
fn help_exits_zero() {
    let _w = test_watchdog::arm(test_watchdog::STRESS);
    let o = perf("--help");
    assert!(o.status.success());
    let out = text(&o.stdout);
    assert!(out.contains("--io-depth"));
    assert!(out.contains("--emulated-fail-lba <START:COUNT>"), "{out}");
}

#[test]
fn a_namespace_with_metadata_is_skipped_with_the_reason() {
    // Namespace 2 is 512+8: perf runs on namespace 1 and says why namespace 2 is left out.
    let o =
        perf("-q 4 -o 4096 -w randread -t 10 -d 200 --emulated-namespaces 2 --emulated-metadata 2");
    let out = text(&o.stdout);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(
        out.contains("WARNING: namespace 2 is formatted with metadata (LBA format 2: 512+8 bytes, extended LBA)"),
        "{out}"
    );
    assert!(out.contains("--lbaf=0"), "{out}");
    assert!(out.contains("NSID 1"), "{out}");
    // The only namespace is 512+8: a clear error, no panic.
    let o = perf("-q 4 -o 4096 -w randread -t 10 -d 200 --emulated-metadata 1");
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
    let all = text(&o.stdout) + &text(&o.stderr);
    assert!(all.contains("No valid namespaces to test"), "{all}");
    assert!(
        all.contains("namespace 1 is formatted with metadata"),
        "{all}"
    );
    assert!(!all.contains("panicked"), "{all}");
}

/// An I/O queue serves every namespace: four namespaces on one core share one queue pair (as
/// the kernel shares one per controller per CPU), so a controller granting three I/O queues
/// runs them all, each namespace getting its own I/O and data verified.
#[test]
fn namespaces_of_a_core_share_its_queue_pairs() {
    let _w = test_watchdog::arm(test_watchdog::STRESS);
    let shape = "--emulated-namespaces 4 --emulated-io-queues 3 --emulated-size 4m";
    let r = perf_json(&format!("-q 8 -o 4096 -w verify -t 10 -d 400 {shape}"));
    let mut rows: Vec<(u32, u64)> = r.devices.iter().map(|d| (d.nsid, d.io_completed)).collect();
    rows.sort();
    assert_eq!(rows, [(1, 400), (2, 400), (3, 400), (4, 400)]);
    let v = r.verify.unwrap();
    assert_eq!(v.mismatches, 0);
    assert!(v.blocks_checked > 0);
    // One queue pair, listed under each namespace that uses it, carrying all of their I/O.
    assert_eq!(r.queues.len(), 4, "{:?}", r.queues);
    assert!(
        r.queues.iter().all(|q| q.qid == r.queues[0].qid),
        "{:?}",
        r.queues
    );
    assert_eq!(r.queues[0].commands, Some(1600));
    // -P 3: three queue pairs shared by the four namespaces, all of them used.
    let r = perf_json(&format!(
        "-q 8 -o 4096 -w randread -t 10 -d 600 -P 3 {shape}"
    ));
    assert_eq!(r.total.unwrap().io_completed, 2400);
    let mut qids: Vec<u16> = r.queues.iter().map(|q| q.qid).collect();
    qids.sort();
    qids.dedup();
    assert_eq!(qids.len(), 3, "{:?}", r.queues);
    assert!(
        r.queues.iter().all(|q| q.commands.unwrap() > 0),
        "{:?}",
        r.queues
    );
}

/// Only asking for more queues than the controller granted fails, before any I/O, saying what
/// was asked, what was granted and what to change.
#[test]
fn more_queues_than_granted_is_a_clear_error() {
    let _w = test_watchdog::arm(test_watchdog::STRESS);
    let shape = "--emulated-namespaces 4 --emulated-io-queues 3";
    let o = perf(&format!("-q 4 -o 4096 -w randread -t 1 -P 4 {shape}"));
    assert!(!o.status.success());
    let e = text(&o.stderr);
    assert!(
        e.contains("-P 4 queue pair(s) per core on 1 core(s) (-c) need 4 I/O queues, but the controller granted 3;")
            && e.contains("granted 3")
            && e.contains("lower -P"),
        "{e}"
    );
    assert!(!text(&o.stdout).contains("Total "), "no I/O ran");
    require_two_cores();
    let o = perf(&format!(
        "-q 4 -o 4096 -w randread -t 1 -P 2 -c 0x3 {shape}"
    ));
    assert!(!o.status.success());
    let e = text(&o.stderr);
    assert!(
        e.contains("on 2 core(s) (-c) need 4 I/O queues") && e.contains("granted 3"),
        "{e}"
    );
    // Two cores with one queue pair each fit.
    let r = perf_json(&format!(
        "-q 4 -o 4096 -w randread -t 10 -d 200 -c 0x3 {shape}"
    ));
    assert_eq!(r.devices.len(), 4);
    assert!(
        r.devices.iter().all(|d| d.io_completed == 200),
        "{:?}",
        r.devices
    );
}

#[test]
fn emulated_io_queues_is_checked() {
    let o = perf("-q 4 -o 4096 -w randread -t 1 --emulated-io-queues 0");
    assert!(!o.status.success());
    assert!(text(&o.stderr).contains("--emulated-io-queues must be 1 to 4096, not '0'"));
}

#[test]
fn poll_counters_at_depth() {
    let _w = test_watchdog::arm(test_watchdog::STRESS);
    // The inline emulated controller completes a batch as its doorbell is written, so each poll
    // finds the whole batch: one SQ doorbell per 32 I/Os, and no register read. The CQ head
    // doorbell is written once per half queue of completions (the emulated controller's queues
    // have 1024 entries: once per 512 I/Os).
    let r = perf_json("-q 32 -o 4096 -w randread -t 10 -d 3200");
    let c = r.counters.expect("counters");
    assert_eq!(c.ios, 3200, "{c:?}");
    assert_eq!((c.sq_doorbells, c.cq_doorbells), (100, 6), "{c:?}");
    assert_eq!(c.per_io.sq_doorbells, 1.0 / 32.0);
    assert_eq!(
        (c.register_reads, c.per_io.register_reads),
        (0, 0.0),
        "{c:?}"
    );
    // Each of the 100 polls that found completions found a whole batch.
    assert_eq!(c.polls - c.empty_polls, 100, "{c:?}");
    assert_eq!(r.devices[0].counters, Some(c));
    // The driver's count of doorbell writes is the device's (admin queue aside).
    let emu = r.emulated.unwrap();
    assert!(emu.doorbell_writes >= c.sq_mmio + c.cq_mmio, "{emu:?}");
    // Shadow doorbells (the emulated controller offers them, as QEMU does): every update is a
    // shadow store, and the controller, idle at each update, asks for every register write.
    assert_eq!((c.sq_shadow, c.cq_shadow), (100, 6), "{c:?}");
    assert_eq!((c.sq_mmio, c.cq_mmio), (100, 6), "{c:?}");
    // Without them: no shadow store, every update a register write.
    let r = perf_json("-q 32 -o 4096 -w randread -t 10 -d 3200 --no-shadow-doorbells");
    assert!(!r.config.shadow_doorbells);
    let c = r.counters.unwrap();
    assert_eq!((c.sq_shadow, c.cq_shadow), (0, 0), "{c:?}");
    assert_eq!((c.sq_mmio, c.cq_mmio), (100, 6), "{c:?}");
    assert_eq!(c.per_io.sq_mmio, 1.0 / 32.0);
    // Per command: one SQ doorbell per I/O.
    let r = perf_json("-q 32 -o 4096 -w randread -t 10 -d 3200 --doorbell per-command");
    let c = r.counters.unwrap();
    assert_eq!(
        (c.sq_doorbells, c.per_io.sq_doorbells),
        (3200, 1.0),
        "{c:?}"
    );
    // The text report shows them with -L.
    let o = perf("-q 32 -o 4096 -w randread -t 10 -d 3200 -L");
    let out = text(&o.stdout);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let line = out
        .lines()
        .find(|l| l.starts_with("EMULATED (inline) NSID 1 core 0 "))
        .unwrap_or_else(|| panic!("no counters line: {out}"));
    let cols: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(
        cols[cols.len() - 11..],
        [
            "3200", "0.031", "0.000", "0.00000", "0.00000", "0.03125", "0.00187", "0.03125",
            "0.00187", "0.03125", "0.00187"
        ],
        "{line}"
    );
}

#[test]
fn interrupt_modes_sleep_on_the_queues_and_report_cpu_per_io() {
    let _w = test_watchdog::arm(test_watchdog::STRESS);
    let base = "-q 1 -o 4096 -w randread -t 20 -d 400 --emulated-mode threaded";
    for (flag, mode) in [
        ("", "polled"),
        ("--interrupt-mode", "interrupt"),
        ("--interrupt-mode=adaptive:0", "adaptive:0"),
        ("--interrupt-mode adaptive", "adaptive:20"),
    ] {
        let r = perf_json(&format!("{base} {flag}"));
        assert_eq!(r.total.as_ref().unwrap().io_completed, 400, "{flag}");
        let cpu = r.cpu.expect("cpu figures");
        assert_eq!(cpu.mode, mode);
        assert_eq!(cpu.ios, 400);
        assert!(cpu.user_s + cpu.sys_s > 0.0);
        assert!((cpu.us_per_io - (cpu.user_s + cpu.sys_s) * 1e6 / 400.0).abs() < 1e-6);
        // The whole system's CPU time over the same interval, from /proc/stat.
        let sys = cpu.system.as_ref().expect("whole-system cpu figures");
        assert!(sys.cpus >= 1 && sys.interval_s > 0.0, "{sys:?}");
        assert!(
            sys.sampled_busy_s >= sys.irq_s && sys.idle_s >= 0.0 && sys.busy_s >= 0.0,
            "{sys:?}"
        );
        assert!(
            (sys.us_per_io - sys.busy_s * 1e6 / 400.0).abs() < 1e-6,
            "{sys:?}"
        );
        let wall = sys.interval_s * f64::from(sys.cpus);
        assert!(
            (sys.busy_fraction - sys.busy_s / wall).abs() < 1e-9,
            "{sys:?}"
        );
        if mode == "polled" {
            assert_eq!(cpu.sleeps, 0);
        } else if mode != "adaptive:20" {
            // At QD1 on the device thread every poll right after a submission finds nothing.
            assert!(cpu.sleeps > 0, "{flag}: {cpu:?}");
        }
        // The queue pairs armed once per sleep (one queue pair here).
        let arms = r.counters.unwrap().interrupt_arms;
        assert_eq!(arms, cpu.sleeps, "{flag}");
    }
    // The text report prints both CPU lines.
    let o = perf(&format!("{base} --interrupt-mode"));
    let out = text(&o.stdout);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(
        out.lines().any(|l| l.starts_with("CPU time (interrupt): ")),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("CPU time (whole system): ") && l.ends_with(" us per I/O")),
        "{out}"
    );
    let o = perf(&format!("{base} --interrupt-mode sometimes"));
    assert!(!o.status.success());
    assert!(text(&o.stderr).contains("--interrupt-mode must be polled, interrupt, adaptive"));
}

#[test]
fn cq_head_batch_sets_when_the_cq_head_doorbell_is_written() {
    let _w = test_watchdog::arm(test_watchdog::STRESS);
    // After every poll that found completions (the driver before the lazy CQ head doorbell):
    // one per batch of 32 on the inline controller.
    let r = perf_json("-q 32 -o 4096 -w randread -t 10 -d 3200 --cq-head-batch 1");
    let c = r.counters.unwrap();
    assert_eq!((c.sq_doorbells, c.cq_doorbells), (100, 100), "{c:?}");
    // Every 64 consumed entries: every second poll.
    let r = perf_json("-q 32 -o 4096 -w randread -t 10 -d 3200 --cq-head-batch 64");
    let c = r.counters.unwrap();
    assert_eq!((c.sq_doorbells, c.cq_doorbells), (100, 50), "{c:?}");
    for bad in ["0", "x", "70000"] {
        let o = perf(&format!(
            "-q 1 -o 4096 -w randread -t 1 --cq-head-batch {bad}"
        ));
        assert!(!o.status.success(), "{bad}");
        assert!(
            text(&o.stderr).contains(&format!(
                "--cq-head-batch must be 1 to 65535 (less than the I/O queue size), not '{bad}'"
            )),
            "{}",
            text(&o.stderr)
        );
    }
    // Not less than the queue: the driver refuses the queue pair and says why.
    let o = perf("-q 1 -o 4096 -w randread -t 1 --io-queue-size 16 --cq-head-batch 16");
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("cq_head_batch"),
        "{}",
        text(&o.stderr)
    );
}
