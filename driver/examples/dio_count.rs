//! N 4 KiB reads on the inline emulated controller with a null namespace.
//!
//! * `raw` / `dio`: N reads at QD1 through the raw queue pair (`read_blocking`) or the dio path
//!   (`BlockFile::read`, run to completion), for instruction counts:
//!   `cargo build --profile count -p dioxide --example dio_count`, then
//!   `valgrind --tool=callgrind target/count/examples/dio_count dio 20000` (and 40000); the
//!   difference between two N gives instructions per I/O. The `count` profile is the release
//!   profile with one codegen unit, so that an unrelated edit does not move the counts.
//! * `raw32` / `dio32`: the same at QD32 asynchronous: rounds of 32 `QueuePair::read` (owned
//!   buffers) or 32 `BlockFile::submit`, then poll until the 32 completed. The completions of
//!   both put their buffer back into a slot of a preallocated array and bump a counter.
//! * `pollers`: `BlockFile::read` through one (unpinned) poller thread, timing every request;
//!   prints the median, p90, p99 and mean latency in µs (the hand-over and wake-up cost):
//!   `cargo run --release -p dioxide --example dio_count -- pollers 20000 [think_us]`; with
//!   `think_us` the client computes (spins) that long between requests, as an application
//!   that is not I/O bound does (the poller may have parked meanwhile). Two more optional
//!   arguments set `Builder::poller_idle` and `Builder::wait_spin` in µs.

use std::cell::{Cell, RefCell};
use std::time::{Duration, Instant};

use dioxide::emulated::{EmulatedConfig, EmulatedController, Mode, NamespaceConfig};
use dioxide::{
    Controller, Dioxide, DmaBuffer, FileOptions, IoBuffer, Lba, Nsid, QueueOptions, Request,
};

/// Requests in flight in the `raw32` and `dio32` modes.
const QD: usize = 32;

thread_local! {
    /// Where the asynchronous completions of `raw32` and `dio32` put their buffer back (one
    /// slot per request in flight; they run on the submitting thread) and count themselves.
    static RAW_SLOTS: RefCell<Vec<Option<DmaBuffer>>> = const { RefCell::new(Vec::new()) };
    static DIO_SLOTS: RefCell<Vec<Option<IoBuffer>>> = const { RefCell::new(Vec::new()) };
    static DONE: Cell<usize> = const { Cell::new(0) };
}

fn take<T>(slots: &'static std::thread::LocalKey<RefCell<Vec<Option<T>>>>, i: usize) -> T {
    slots.with(|s| s.borrow_mut()[i].take().expect("slot filled"))
}

fn put<T>(slots: &'static std::thread::LocalKey<RefCell<Vec<Option<T>>>>, i: usize, v: T) {
    slots.with(|s| s.borrow_mut()[i] = Some(v));
    DONE.with(|d| d.set(d.get() + 1));
}

/// Completions counted since the count was last reset.
fn done() -> usize {
    DONE.with(|d| d.get())
}

fn report(label: &str, mut lat: Vec<Duration>) {
    lat.sort_unstable();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let pick = |q: f64| us(lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)]);
    let mean = us(lat.iter().sum::<Duration>()) / lat.len() as f64;
    println!(
        "{label}: n {} median {:.2} us, p90 {:.2} us, p99 {:.2} us, mean {:.2} us",
        lat.len(),
        pick(0.5),
        pick(0.9),
        pick(0.99),
        mean
    );
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut a = std::env::args().skip(1);
    let path = a.next().unwrap_or_else(|| "dio".into());
    let n: u64 = a.next().map_or(Ok(10_000), |s| s.parse())?;
    let think = Duration::from_micros(a.next().map_or(Ok(0), |s| s.parse())?);
    // Optional: the poller's idle spin and the client's completion spin, in µs.
    let idle: Option<u64> = a.next().map(|s| s.parse()).transpose()?;
    let wait_spin: Option<u64> = a.next().map(|s| s.parse()).transpose()?;
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
        "raw32" => {
            let ns = ctrl.namespaces().remove(0);
            let mut q = ctrl.create_qpair::<(DmaBuffer, usize)>(QueueOptions::default())?;
            for _ in 0..QD {
                let b = ctrl.alloc(4096)?;
                RAW_SLOTS.with(|s| s.borrow_mut().push(Some(b)));
            }
            for _ in 0..n / QD as u64 {
                for i in 0..QD {
                    q.read(&ns, Lba(8 * i as u64), (take(&RAW_SLOTS, i), i))?;
                }
                while done() < QD {
                    q.poll(usize::MAX, |(b, i), r| {
                        r.expect("read");
                        put(&RAW_SLOTS, i, b);
                    })?;
                }
                DONE.with(|d| d.set(0));
            }
        }
        "dio32" => {
            let dx = Dioxide::builder()
                .controller(ctrl)
                .run_to_completion()
                .build()?;
            let f = dx.open_file(0, Nsid(1), FileOptions::new(0, 1 << 20).with_len(1 << 29))?;
            for _ in 0..QD {
                let b = IoBuffer::Dma(f.alloc(4096)?);
                DIO_SLOTS.with(|s| s.borrow_mut().push(Some(b)));
            }
            for _ in 0..n / QD as u64 {
                for i in 0..QD {
                    let req = Request::read(4096 * i as u64, take(&DIO_SLOTS, i));
                    f.submit(req, move |d| {
                        assert_eq!(d.result.expect("read"), 4096);
                        put(&DIO_SLOTS, i, d.buf);
                    })?;
                }
                while done() < QD {
                    dx.poll();
                }
                DONE.with(|d| d.set(0));
            }
        }
        "pollers" => {
            let mut b = Dioxide::builder().controller(ctrl).pollers([None]);
            if let Some(us) = idle {
                b = b.poller_idle(Duration::from_micros(us));
            }
            if let Some(us) = wait_spin {
                b = b.wait_spin(Duration::from_micros(us));
            }
            let dx = b.build()?;
            let f = dx.open_file(0, Nsid(1), FileOptions::new(0, 1 << 20).with_len(1 << 29))?;
            let mut buf = IoBuffer::Dma(f.alloc(4096)?);
            let mut lat = Vec::with_capacity(n as usize);
            for i in 0..n + n / 10 {
                let t = Instant::now();
                while t.elapsed() < think {
                    std::hint::spin_loop();
                }
                let t = Instant::now();
                let (r, b) = f.read(buf, 4096, 4096);
                let d = t.elapsed();
                r?;
                buf = b;
                if i >= n / 10 {
                    lat.push(d);
                }
            }
            report(
                &format!("qd1 read 4 KiB via 1 poller, think {think:?}"),
                lat,
            );
            let parks: u64 = dx.poller_stats().iter().map(|s| s.parks).sum();
            println!("poller parks: {parks}");
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
