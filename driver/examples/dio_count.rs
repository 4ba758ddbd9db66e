//! N 4 KiB reads at QD1 on the inline emulated controller with a null namespace, through the
//! raw queue pair (`raw`) or the dio path (`dio`, run to completion), for instruction counts:
//! `valgrind --tool=callgrind target/release/examples/dio_count dio 100000`; the difference
//! between two N gives instructions per I/O.

use dioxide::emulated::{EmulatedConfig, EmulatedController, Mode, NamespaceConfig};
use dioxide::{Controller, Dioxide, FileOptions, IoBuffer, Lba, Nsid, QueueOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut a = std::env::args().skip(1);
    let path = a.next().unwrap_or_else(|| "dio".into());
    let n: u64 = a.next().map_or(Ok(10_000), |s| s.parse())?;
    let emu = EmulatedController::new(EmulatedConfig {
        mode: Mode::Inline,
        namespaces: vec![NamespaceConfig::null(512, 1 << 21)],
        ..EmulatedConfig::default()
    })?;
    let ctrl = Controller::new(emu)?;
    match path.as_str() {
        "raw" => {
            let ns = ctrl.namespaces().remove(0);
            let mut q = ctrl.create_qpair::<u64>(QueueOptions::default())?;
            let mut b = ctrl.alloc(4096)?;
            for _ in 0..n {
                q.read_blocking(&ns, Lba(8), b.as_mut_slice())?;
            }
        }
        _ => {
            let dx = Dioxide::builder()
                .controller(ctrl)
                .run_to_completion()
                .build()?;
            let f = dx.open_file(0, Nsid(1), FileOptions::new(0, 1 << 20).with_len(1 << 29))?;
            let mut buf = IoBuffer::Dma(f.alloc(4096)?);
            for _ in 0..n {
                let (r, b) = f.read(buf, 4096, 4096);
                r?;
                buf = b;
            }
        }
    }
    Ok(())
}
