//! A small block service embedding Dioxide: several client threads issue a mix of aligned and
//! unaligned, synchronous and asynchronous reads and writes to a file on namespace 1, then it
//! prints throughput and shuts down cleanly. No `unsafe`.
//!
//! ```text
//! cargo run --release --example appliance                     # emulated controller
//! cargo run --release --example appliance -- --pci 0000:01:00.0 [--allow-write]
//!     [--secs 5] [--clients 4] [--pollers 0,1]
//! ```
//! On a real device it only reads unless `--allow-write` or `NVME_HIL_ALLOW_WRITE=1` is given.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::channel;
use std::time::{Duration, Instant};

use dioxide::emulated::{EmulatedConfig, EmulatedController, Mode, NamespaceConfig};
use dioxide::vfio::{VfioBus, VfioOptions};
use dioxide::{Bus, Controller, Dioxide, FileOptions, Nsid, Request};

struct Args {
    pci: Option<String>,
    allow_write: bool,
    secs: f64,
    clients: usize,
    pollers: Vec<Option<usize>>,
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        pci: None,
        allow_write: std::env::var("NVME_HIL_ALLOW_WRITE").is_ok_and(|v| v == "1"),
        secs: 3.0,
        clients: 4,
        pollers: vec![None, None],
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut val = || it.next().ok_or(format!("{k} needs a value"));
        match k.as_str() {
            "--pci" => a.pci = Some(val()?),
            "--allow-write" => a.allow_write = true,
            "--secs" => a.secs = val()?.parse().map_err(|e| format!("--secs: {e}"))?,
            "--clients" => a.clients = val()?.parse().map_err(|e| format!("--clients: {e}"))?,
            "--pollers" => {
                a.pollers = val()?
                    .split(',')
                    .map(|c| c.parse().map(Some).map_err(|e| format!("--pollers: {e}")))
                    .collect::<Result<_, _>>()?
            }
            _ => {
                return Err(format!(
                    "unknown argument {k}; see the top of examples/appliance.rs"
                ));
            }
        }
    }
    Ok(a)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a = args()?;
    let (bus, writable): (Arc<dyn Bus>, bool) = match &a.pci {
        Some(addr) => (VfioBus::open(addr, VfioOptions::default())?, a.allow_write),
        None => {
            let emu = EmulatedController::new(EmulatedConfig {
                mode: Mode::Threaded,
                namespaces: vec![NamespaceConfig::memory(512, 1 << 17)],
                ..EmulatedConfig::default()
            })?;
            (emu, true)
        }
    };
    let ctrl = Controller::new(bus)?;
    println!(
        "appliance: controller {} ({}), {} client threads, pollers {:?}, {}",
        ctrl.location(),
        if a.pci.is_some() { "VFIO" } else { "emulated" },
        a.clients,
        a.pollers,
        if writable {
            "read/write"
        } else {
            "read-only (give --allow-write to write)"
        }
    );
    let dx = Dioxide::builder()
        .controller(ctrl)
        .pollers(a.pollers.clone())
        .build()?;
    let ns = dx
        .namespaces()
        .into_iter()
        .find(|(_, ns)| ns.nsid() == Nsid(1))
        .ok_or("the controller has no namespace 1")?
        .1;
    // A 32 MiB file at the start of namespace 1 (or the whole namespace if smaller).
    let blocks = ((32u64 << 20) / ns.block_size() as u64).min(ns.blocks() / 8 * 8);
    let persisted_len = Arc::new(AtomicU64::new(0));
    let p = persisted_len.clone();
    let initial = if writable {
        0
    } else {
        blocks * ns.block_size() as u64
    };
    let file = dx.open_file(
        0,
        ns.nsid(),
        FileOptions::new(0, blocks)
            .with_len(initial)
            .writable(writable)
            .on_extend(move |len| p.store(len, Ordering::Relaxed)),
    )?;
    let cap = file.capacity();
    let bytes = Arc::new(AtomicU64::new(0));
    let ops = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(a.secs);
    let clients: Vec<_> = (0..a.clients)
        .map(|c| {
            let (file, bytes, ops) = (file.clone(), bytes.clone(), ops.clone());
            std::thread::spawn(move || -> Result<(), dioxide::EmbedError> {
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (c as u64 + 1);
                let mut rnd = move || {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x
                };
                let mut heap = vec![0u8; 64 * 1024];
                let (tx, rx) = channel();
                let mut in_flight = 0;
                while Instant::now() < deadline {
                    let aligned = rnd() % 4 != 0;
                    let len = if aligned {
                        4096 << (rnd() % 4)
                    } else {
                        1 + rnd() % 20_000
                    } as usize;
                    let mut off = rnd() % (cap - len as u64);
                    if aligned {
                        off &= !4095;
                    }
                    let write = writable && rnd() % 3 == 0;
                    if aligned && rnd() % 2 == 0 {
                        // Zero copy, asynchronous, up to 16 in flight.
                        let buf = file.alloc(len)?;
                        let req = if write {
                            Request::write(off, buf)
                        } else {
                            Request::read(off, buf)
                        };
                        let tx = tx.clone();
                        file.submit(req, move |done| {
                            let _ = tx.send(done.result);
                        })
                        .map_err(|r| r.error)?;
                        in_flight += 1;
                        while in_flight >= 16 {
                            let n = rx.recv().expect("completion")?;
                            bytes.fetch_add(n as u64, Ordering::Relaxed);
                            ops.fetch_add(1, Ordering::Relaxed);
                            in_flight -= 1;
                        }
                    } else {
                        // Any memory, any offset, synchronous (through the page cache).
                        let n = if write {
                            file.write_at(&heap[..len], off)?
                        } else {
                            file.read_at(&mut heap[..len], off)?
                        };
                        bytes.fetch_add(n as u64, Ordering::Relaxed);
                        ops.fetch_add(1, Ordering::Relaxed);
                    }
                }
                for _ in 0..in_flight {
                    let n = rx.recv().expect("completion")?;
                    bytes.fetch_add(n as u64, Ordering::Relaxed);
                    ops.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            })
        })
        .collect();
    for c in clients {
        c.join().expect("client thread")?;
    }
    let secs = start.elapsed().as_secs_f64();
    let (b, o) = (bytes.load(Ordering::Relaxed), ops.load(Ordering::Relaxed));
    println!(
        "appliance: {o} requests, {:.0} IOPS, {:.1} MiB/s; file len {} (persisted {}); pollers {:?}; cache {:?}",
        o as f64 / secs,
        b as f64 / secs / (1 << 20) as f64,
        file.len(),
        persisted_len.load(Ordering::Relaxed),
        dx.poller_stats(),
        dx.cache_stats(0),
    );
    drop(file);
    dx.shutdown();
    println!("appliance: shut down cleanly");
    Ok(())
}
