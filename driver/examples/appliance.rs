//! A small block service embedding Dioxide: several client threads issue a mix of aligned and
//! unaligned, synchronous and asynchronous reads and writes to a file on namespace 1, then it
//! prints throughput and shuts down cleanly. No `unsafe`.
//!
//! Every client owns a disjoint region of the file and keeps a shadow copy of it: each byte
//! read (during the run, and a full read-back of the region at the end) is compared with what
//! that client wrote, and a mismatch makes the program exit non-zero. A smoke test:
//!
//! ```text
//! cargo run --release -p dioxide --example appliance -- --seconds 1
//! # appliance: controller ... (emulated), 4 client threads, pollers [None, None], read/write
//! # appliance: N requests, ... IOPS, ... MiB/s; file len 33554432 (persisted 33554432); ...
//! # appliance: verified B bytes read back, all match what was written
//! # appliance: shut down cleanly
//! ```
//!
//! `--self-test-mismatch` corrupts one byte of a client's shadow copy: the run must then fail
//! (exit 1, "data mismatch"), which shows that the check is live.
//!
//! ```text
//! cargo run --release --example appliance -- --pci 0000:01:00.0 [--allow-write]
//!     [--seconds 5] [--clients 4] [--pollers 0,1]
//! ```
//! On a real device it only reads (and verifies nothing) unless `--allow-write` or
//! `NVME_HIL_ALLOW_WRITE=1` is given.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::channel;
use std::time::{Duration, Instant};

use dioxide::emulated::{EmulatedConfig, EmulatedController, Mode, NamespaceConfig};
use dioxide::vfio::{VfioBus, VfioOptions};
use dioxide::{Bus, Completed, Controller, Dioxide, FileOptions, Nsid, Request};

struct Args {
    pci: Option<String>,
    allow_write: bool,
    secs: f64,
    clients: usize,
    pollers: Vec<Option<usize>>,
    corrupt: bool,
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        pci: None,
        allow_write: std::env::var("NVME_HIL_ALLOW_WRITE").is_ok_and(|v| v == "1"),
        secs: 3.0,
        clients: 4,
        pollers: vec![None, None],
        corrupt: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut val = || it.next().ok_or(format!("{k} needs a value"));
        match k.as_str() {
            "--pci" => a.pci = Some(val()?),
            "--allow-write" => a.allow_write = true,
            "--self-test-mismatch" => a.corrupt = true,
            "--secs" | "--seconds" => {
                a.secs = val()?.parse().map_err(|e| format!("--secs: {e}"))?
            }
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

type Failure = Box<dyn std::error::Error + Send + Sync>;

/// The content the prefill gives byte `off` of the file.
fn fill_initial(off: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        let x = (off + i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        *b = (x >> 56) as u8;
    }
}

fn main() -> Result<(), Failure> {
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
    // Each client owns a disjoint region of the file and keeps a shadow copy of it: every byte
    // read back is checked against what that client wrote (writable runs only).
    let clients_n = a.clients.max(1) as u64;
    let region = cap / clients_n / 4096 * 4096;
    if region < 64 * 1024 {
        return Err(format!("the file ({cap} bytes) is too small for {clients_n} clients").into());
    }
    if writable {
        // Prefill (through the page cache, extending `len` to the capacity): the shadow starts
        // as this pattern.
        let mut chunk = vec![0u8; 1 << 20];
        let mut off = 0;
        while off < cap {
            let n = chunk.len().min((cap - off) as usize);
            fill_initial(off, &mut chunk[..n]);
            file.write_at(&chunk[..n], off)?;
            off += n as u64;
        }
    }
    let bytes = Arc::new(AtomicU64::new(0));
    let ops = Arc::new(AtomicU64::new(0));
    let verified = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(a.secs);
    let corrupt = a.corrupt;
    let clients: Vec<_> = (0..clients_n)
        .map(|c| {
            let (file, bytes, ops, verified) =
                (file.clone(), bytes.clone(), ops.clone(), verified.clone());
            std::thread::spawn(move || -> Result<(), Failure> {
                let base = c * region;
                let mut shadow = vec![0u8; region as usize];
                if writable {
                    fill_initial(base, &mut shadow);
                    if corrupt && c == 0 {
                        // --self-test-mismatch: pretend we wrote something else.
                        shadow[12345] ^= 0x5a;
                    }
                }
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (c + 1);
                let mut rnd = move || {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x
                };
                let mut heap = vec![0u8; 64 * 1024];
                let (tx, rx) = channel::<(Completed, Option<(u64, Vec<u8>)>)>();
                let mut in_flight = 0;
                let check = |got: &[u8], want: &[u8], off: u64| -> Result<(), Failure> {
                    if got != want {
                        let i = got.iter().zip(want).position(|(g, w)| g != w).unwrap_or(0);
                        return Err(format!(
                            "client {c}: data mismatch at file offset {} (read {:#04x}, wrote {:#04x})",
                            off + i as u64,
                            got[i],
                            want[i]
                        )
                        .into());
                    }
                    verified.fetch_add(got.len() as u64, Ordering::Relaxed);
                    Ok(())
                };
                let reap = |rx: &std::sync::mpsc::Receiver<_>| -> Result<(), Failure> {
                    let (done, want): (Completed, Option<(u64, Vec<u8>)>) =
                        rx.recv().expect("completion");
                    let n = done.result?;
                    if let Some((off, want)) = want {
                        check(&done.buf.as_slice()[..n], &want[..n], off)?;
                    }
                    bytes.fetch_add(n as u64, Ordering::Relaxed);
                    ops.fetch_add(1, Ordering::Relaxed);
                    Ok(())
                };
                while Instant::now() < deadline {
                    let aligned = rnd() % 4 != 0;
                    let len = if aligned {
                        4096 << (rnd() % 4)
                    } else {
                        1 + rnd() % 20_000
                    } as usize;
                    let mut rel = rnd() % (region - len as u64);
                    if aligned {
                        rel &= !4095;
                    }
                    let off = base + rel;
                    let r = rel as usize..rel as usize + len;
                    let write = writable && rnd() % 3 == 0;
                    if aligned && rnd() % 2 == 0 {
                        // Zero copy, asynchronous, up to 16 in flight. The range lock orders
                        // overlapping requests as submitted, so the shadow is updated (writes)
                        // or sampled (reads) at submission.
                        let mut buf = file.alloc(len)?;
                        let (req, want) = if write {
                            for b in buf.as_mut_slice() {
                                *b = rnd() as u8;
                            }
                            shadow[r].copy_from_slice(buf.as_slice());
                            (Request::write(off, buf), None)
                        } else {
                            let want = writable.then(|| (off, shadow[r].to_vec()));
                            (Request::read(off, buf), want)
                        };
                        let tx = tx.clone();
                        file.submit(req, move |done| {
                            let _ = tx.send((done, want));
                        })
                        .map_err(|r| r.error)?;
                        in_flight += 1;
                        while in_flight >= 16 {
                            reap(&rx)?;
                            in_flight -= 1;
                        }
                    } else {
                        // Any memory, any offset, synchronous (through the page cache).
                        let n = if write {
                            for b in &mut heap[..len] {
                                *b = rnd() as u8;
                            }
                            shadow[r].copy_from_slice(&heap[..len]);
                            file.write_at(&heap[..len], off)?
                        } else {
                            let n = file.read_at(&mut heap[..len], off)?;
                            if writable {
                                check(&heap[..n], &shadow[r][..n], off)?;
                            }
                            n
                        };
                        bytes.fetch_add(n as u64, Ordering::Relaxed);
                        ops.fetch_add(1, Ordering::Relaxed);
                    }
                }
                for _ in 0..in_flight {
                    reap(&rx)?;
                }
                if writable {
                    // Read the whole region back, zero copy, and compare.
                    let (r, buf) = file.read(file.alloc(region as usize)?, base, region as usize);
                    let n = r?;
                    if n != region as usize {
                        return Err(format!("client {c}: short read back ({n} bytes)").into());
                    }
                    check(buf.as_slice(), &shadow, base)?;
                }
                Ok(())
            })
        })
        .collect();
    let mut failure = None;
    for c in clients {
        if let Err(e) = c.join().expect("client thread") {
            failure.get_or_insert(e);
        }
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
        dx.cache_stats(0).unwrap_or_default(),
    );
    if let Some(e) = failure {
        return Err(e);
    }
    if writable {
        println!(
            "appliance: verified {} bytes read back, all match what was written",
            verified.load(Ordering::Relaxed)
        );
    } else {
        println!("appliance: read-only run, data not verified");
    }
    drop(file);
    dx.shutdown();
    println!("appliance: shut down cleanly");
    Ok(())
}
