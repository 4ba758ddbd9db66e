//! End-to-end tests of the `identify` binary on the built-in emulated controller.

use dioxide_tools::identify::ControllerInfo;
use std::process::{Command, Output};

fn identify(args: &str) -> Output {
    // A hung run is killed and fails the test, naming it and the command line.
    test_watchdog::output_within(
        Command::new(env!("CARGO_BIN_EXE_identify")).args(args.split_whitespace()),
        test_watchdog::PROCESS,
    )
    .expect("run identify")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn text_report_has_the_fields() {
    let _w = test_watchdog::arm(test_watchdog::STRESS);
    let o = identify("--emulated-namespaces 2 --emulated-block-size 4096 --emulated-size 1g");
    let out = text(&o.stdout);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(out.starts_with("Using the built-in emulated NVMe controller (inline, 2 null-backed 1 GiB namespaces, 4096 B blocks)"));
    for key in [
        "NVMe Controller at emulated (inline) [",
        "Vendor ID:",
        "Subsystem Vendor ID:",
        "Serial Number:                         DIOXIDE-EMU-0001",
        "Model Number:",
        "Firmware Version:",
        "Max Data Transfer Size:                131072",
        "Maximum Queue Entries:",
        "Reset Timeout:",
        "Doorbell Stride:                       4 bytes",
        "NVMe Specification Version (VS):",
        "Format NVM:",
        "Namespace Management:",
        "Dataset Management Command:",
        "Write Zeroes Command:",
        "Compare Command:",
        "Reservations:",
        "Copy:",
        "Volatile Write Cache:",
        "SGL Support:",
        "Controller Memory Buffer Support",
        "Persistent Memory Region Support",
        "Current Temperature:",
        "Available Spare:",
        "Life Percentage Used:",
        "Data Units Read:",
        "Data Units Written:",
        "Power On Hours:",
        "Unsafe Shutdowns:",
        "Unrecoverable Media Errors:",
        "Slot 1 Firmware Revision:",
        "Namespace ID:1\n",
        "Namespace ID:2\n",
        "Size (in LBAs):                        262144 (1GiB)",
        "NGUID:",
        "EUI64:",
        "LBA Format #01: Data Size:  4096  Metadata Size:     0  (in use)",
    ] {
        assert!(out.contains(key), "missing {key:?}:\n{out}");
    }
}

#[test]
fn json_report() {
    let _w = test_watchdog::arm(test_watchdog::STRESS);
    let o = identify("--json -r trtype:emulated,ns:1");
    assert!(o.status.success(), "{}", text(&o.stderr));
    let v: Vec<ControllerInfo> = serde_json::from_slice(&o.stdout).expect("JSON on stdout");
    assert_eq!(v.len(), 1);
    let c = &v[0];
    assert_eq!(c.schema, "dioxide-identify/1");
    assert_eq!(c.serial, "DIOXIDE-EMU-0001");
    assert_eq!(c.namespaces.len(), 1);
    assert_eq!(c.namespaces[0].nsid, 1);
    assert!(c.health.is_some());
    assert_eq!(c.mdts_bytes, Some(131072));
}

#[test]
fn bad_input_is_one_line_and_fails() {
    let _w = test_watchdog::arm(test_watchdog::STRESS);
    for (args, want) in [
        ("-r trtype:emulated,ns:5", "namespace 5 does not exist"),
        ("-r tradr:0000:01:00.0", "unknown transport ID key 'tradr'"),
        ("-r 0000:ff:1f.7", "0000:ff:1f.7"),
        ("--emulated-block-size 1000", "512 or 4096"),
        ("--bogus", "unexpected argument"),
    ] {
        let o = identify(args);
        let err = text(&o.stderr);
        assert!(!o.status.success(), "{args}");
        assert!(!err.contains("panicked"), "{args}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args}:\n{err}");
        assert!(err.contains(want), "{args}: {err}");
    }
}

#[test]
fn a_namespace_with_metadata_shows_its_format() {
    let o = identify("--emulated-namespaces 2 --emulated-metadata 2");
    let out = text(&o.stdout);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let ns2 = &out[out.find("Namespace ID:2").expect("namespace 2 is listed")..];
    for key in [
        "Metadata Transferred as:               Extended Data LBA",
        "Current LBA Format:                    LBA Format #02",
        "LBA Format #02: Data Size:   512  Metadata Size:     8  (in use)",
    ] {
        assert!(ns2.contains(key), "missing {key}:\n{out}");
    }
    let ns1 = &out[out.find("Namespace ID:1").unwrap()..out.find("Namespace ID:2").unwrap()];
    assert!(ns1.contains("Metadata Size:     0  (in use)"), "{out}");
}
