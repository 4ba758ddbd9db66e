//! A rough throughput check of the per-I/O path on the inline emulated controller with a null
//! namespace (the real measurement is `perf`). Run with
//! `cargo test --release -p dioxide-tests --test throughput -- --ignored --nocapture`.

use std::time::{Duration, Instant};

use dioxide::emulated::{EmulatedConfig, Mode, NamespaceConfig};
use dioxide::{Lba, QueueOptions};
use dioxide_tests::*;

#[test]
#[ignore = "timing; run in release"]
fn inline_null_4k_randread_qd128() {
    let _w = test_watchdog::arm(test_watchdog::STRESS);
    // The driver's own cost on the inline emulator: never a real device (perf measures those).
    emulator_only(
        "inline_null_4k_randread_qd128",
        "it measures the driver on the inline emulator",
    );
    let (ctrl, _emu) = emulated(EmulatedConfig {
        mode: Mode::Inline,
        namespaces: vec![NamespaceConfig::null(4096, 1 << 24)],
        ..EmulatedConfig::default()
    });
    let c = &ctrl;
    let ns = c.namespaces().remove(0);
    let mut q = c.create_qpair::<u64>(QueueOptions::default()).unwrap();
    let qd = 128u64;
    let buf = c.alloc(qd as usize * 4096).unwrap();
    let mut rng = Rng(88172645463325252);
    let submit = |q: &mut dioxide::QueuePair<u64>, tag: u64, rng: &mut Rng| {
        let s = buf.slice(tag as usize * 4096, 4096).unwrap();
        let lba = Lba(rng.next_u64() & ((1 << 24) - 1));
        // SAFETY: one request per slice at a time; `buf` outlives the queue pair's use.
        unsafe { q.read_raw(&ns, lba, s, tag) }.unwrap();
    };
    for t in 0..qd {
        submit(&mut q, t, &mut rng);
    }
    let start = Instant::now();
    let mut done = 0u64;
    let mut tags = Vec::with_capacity(qd as usize);
    while start.elapsed() < Duration::from_secs(2) {
        for _ in 0..1000 {
            q.poll(usize::MAX, |t, r| {
                assert!(r.is_ok(), "tag {t}: {r:?}");
                tags.push(t);
            })
            .unwrap();
            done += tags.len() as u64;
            for t in tags.drain(..) {
                submit(&mut q, t, &mut rng);
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    assert!(done > 0, "no I/O completed in {secs:.1} s");
    println!(
        "inline null 4 KiB randread QD{qd}: {:.0} IOPS ({:.1} ns per I/O, driver + emulator)",
        done as f64 / secs,
        secs * 1e9 / done as f64
    );
}
