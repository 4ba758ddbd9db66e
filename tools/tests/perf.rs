//! End-to-end tests of the `perf` binary on the built-in emulated controller.

use dioxide_tools::json::PerfReport;
use std::process::{Command, Output};

fn perf(args: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_perf"))
        .args(args.split_whitespace())
        .output()
        .expect("run perf")
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
    let o = perf("-q 4 -o 512 -w randread -t 10 -d 3000 -c 0x3 --emulated-namespaces 2 -m");
    let out = text(&o.stdout);
    if !o.status.success() && text(&o.stderr).contains("is not available to this process") {
        eprintln!("skipped: fewer than 2 cores");
        return;
    }
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
    let o = perf("-q 16 -o 4096 -w randread -t 10 -d 2000 -P 4 -C 2 --doorbell per-command");
    assert!(o.status.success(), "{}", text(&o.stderr));
}

#[test]
fn small_queue_warns_like_spdk() {
    let o = perf("-q 64 -o 4096 -w randread -t 10 -d 1000 --io-queue-size 64");
    let out = text(&o.stdout);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(out.contains(
        "Controller IO queue size 64, less than required.\nConsider using lower queue depth or smaller IO size, because IO requests may be queued at the NVMe driver.\n"
    ), "{out}");
}

#[test]
fn io_size_not_a_block_multiple_skips_the_namespace() {
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
    let o = perf("--help");
    assert!(o.status.success());
    assert!(text(&o.stdout).contains("--io-depth"));
}
