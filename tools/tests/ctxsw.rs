//! End-to-end test of the `ctxsw` binary: both kinds of peer run, every line is well formed,
//! and the medians agree with the runs.

use std::process::Command;

fn field(line: &str, key: &str) -> f64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        .unwrap_or_else(|| panic!("no {key}= in '{line}'"))
        .parse()
        .unwrap_or_else(|e| panic!("{key} in '{line}': {e}"))
}

#[test]
fn thread_and_process_round_trips_are_reported() {
    let _w = test_watchdog::arm(test_watchdog::STRESS);
    let o = test_watchdog::output_within(
        Command::new(env!("CARGO_BIN_EXE_ctxsw")).args(["-n", "300", "-r", "2", "-s", "1000"]),
        test_watchdog::PROCESS,
    )
    .expect("run ctxsw");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let runs: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("CTXSW peer="))
        .collect();
    assert_eq!(runs.len(), 4, "two runs of each peer kind:\n{out}");
    for peer in ["thread", "process"] {
        let mine: Vec<&&str> = runs
            .iter()
            .filter(|l| l.contains(&format!("peer={peer} ")))
            .collect();
        assert_eq!(mine.len(), 2, "{peer}:\n{out}");
        for l in mine {
            assert_eq!(field(l, "round_trips"), 300.0, "{l}");
            assert!(field(l, "us_per_round_trip") > 0.0, "{l}");
            // The calling side's context switches per round trip: at most a few (one per
            // blocking read, fewer when the answer is already there on another core).
            let sw = field(l, "switches_per_round_trip");
            assert!((0.0..=4.0).contains(&sw), "{l}");
        }
    }
    let median = out
        .lines()
        .find(|l| l.starts_with("CTXSW-MEDIAN"))
        .unwrap_or_else(|| panic!("no median line:\n{out}"));
    let (t, p) = (field(median, "thread_us"), field(median, "process_us"));
    let diff = field(median, "process_minus_thread_us");
    assert!((p - t - diff).abs() < 0.02, "{median}");
}
