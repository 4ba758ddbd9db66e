//! The driver's own per-I/O cost: N 4 KiB random reads at queue depth 32 through the raw queue
//! pair (u64 tags, doorbell rung once per batch, completions polled in batches) on the inline
//! emulated controller with a null namespace. For instruction counts:
//!
//! ```text
//! valgrind --tool=callgrind target/release/examples/qpair_count 200000
//! valgrind --tool=callgrind target/release/examples/qpair_count 400000
//! ```
//!
//! The difference between the two runs, less what callgrind attributes to `dioxide::emulated`
//! (the device model), is the driver's instructions per I/O (plus this loop's few).
//!
//! With a further argument `resubmit`, each completion is resubmitted from inside the poll's
//! closure ([`dioxide::QueuePair::poll_resubmit`]) instead of after the poll. With `shadow`, the
//! queue pair uses shadow doorbells (the emulated controller offers them, as QEMU does); without
//! it every doorbell goes to its register, the driver's cost as it was before shadow doorbells.

use dioxide::emulated::{EmulatedConfig, EmulatedController, Mode, NamespaceConfig};
use dioxide::{Controller, ControllerOptions, Lba, QueueOptions};

const QD: usize = 32;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: u64 = std::env::args().nth(1).map_or(Ok(100_000), |s| s.parse())?;
    let resubmit = std::env::args().skip(2).any(|a| a == "resubmit");
    let shadow = std::env::args().skip(2).any(|a| a == "shadow");
    let emu = EmulatedController::new(EmulatedConfig {
        mode: Mode::Inline,
        namespaces: vec![NamespaceConfig::null(512, 1 << 31)],
        ..EmulatedConfig::default()
    })?;
    let opts = ControllerOptions::default().with_shadow_doorbells(shadow);
    let ctrl = Controller::with_options(emu, opts)?;
    assert_eq!(ctrl.shadow_doorbells(), shadow);
    let ns = ctrl.namespace(dioxide::Nsid(1))?;
    let mut q = ctrl.create_qpair::<u64>(QueueOptions::default())?;
    let bufs = (0..QD)
        .map(|_| ctrl.alloc(4096))
        .collect::<Result<Vec<_>, _>>()?;
    // 4 KiB-aligned random LBAs from xorshift64, masked to the namespace (a power of two).
    let mask = (ns.blocks() / 8 - 1) * 8;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next_lba = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        Lba((x * 8) & mask)
    };
    for (tag, b) in bufs.iter().enumerate() {
        // SAFETY: every buffer outlives the queue pair's use of it (they are dropped after the
        // loop has drained all completions) and is not touched by the CPU meanwhile.
        unsafe { q.read_raw(&ns, next_lba(), b.as_dma_slice(), tag as u64) }?;
    }
    q.ring();
    let (mut done, mut issued) = (0u64, QD as u64);
    let mut finished = [0u64; QD];
    if resubmit {
        while done < n {
            q.poll_resubmit(QD, |r, tag, res| {
                if res.is_ok() {
                    done += 1;
                }
                if issued < n {
                    let b = bufs[tag as usize].as_dma_slice();
                    // SAFETY: as above; the buffer's previous command has completed.
                    if unsafe { r.read_raw(&ns, next_lba(), b, tag) }.is_ok() {
                        issued += 1;
                    }
                }
            })?;
        }
    }
    while done < n {
        let mut k = 0;
        q.poll(QD, |tag, r| {
            if r.is_ok() {
                finished[k] = tag;
                k += 1;
            }
        })?;
        done += k as u64;
        for &tag in &finished[..k] {
            if issued < n {
                // SAFETY: as above; the buffer's previous command has completed.
                unsafe { q.read_raw(&ns, next_lba(), bufs[tag as usize].as_dma_slice(), tag) }?;
                issued += 1;
            }
        }
        q.ring();
    }
    let s = q.stats();
    println!(
        "{done} reads at QD{QD} completed; doorbell register writes SQ {} CQ {}, shadow updates \
         SQ {} CQ {}",
        s.sq_mmio_writes, s.cq_mmio_writes, s.sq_shadow_updates, s.cq_shadow_updates
    );
    Ok(())
}
