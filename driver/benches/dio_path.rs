//! The cost dio-core and the embedding layer add per request: the dio path
//! (`BlockFile`, run-to-completion) against the raw queue-pair path, on the inline emulated
//! controller with a null namespace (no data moved), 4 KiB reads.
//!
//! * `qd1_sync`: `BlockFile::read` (DMA buffer, zero copy) vs `QueuePair::read_blocking`.
//! * `qd32_async`: 32 × `BlockFile::submit` then `Dioxide::poll` until all complete, vs 32 ×
//!   `QueuePair::read` (owned buffers) then `poll`.
//! * `qd1_sync_pollers`: `BlockFile::read` through one poller thread (the hand-over cost).

use std::sync::{Arc, Mutex};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use dioxide::emulated::{EmulatedConfig, EmulatedController, Mode, NamespaceConfig};
use dioxide::{
    Controller, Dioxide, DmaBuffer, FileOptions, IoBuffer, Lba, Nsid, QueueOptions, Request,
};

fn ctrl() -> Controller {
    let emu = EmulatedController::new(EmulatedConfig {
        mode: Mode::Inline,
        namespaces: vec![NamespaceConfig::null(512, 1 << 21)],
        ..EmulatedConfig::default()
    })
    .expect("emulated controller");
    Controller::new(emu).expect("bring-up")
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("dio_path");
    g.throughput(Throughput::Elements(1));

    // Raw queue pair.
    let raw = ctrl();
    let ns = raw.namespaces().remove(0);
    let mut q = raw
        .create_qpair::<DmaBuffer>(QueueOptions::default())
        .unwrap();
    let mut one = raw.alloc(4096).unwrap();
    g.bench_function("qd1_sync/raw_qpair", |b| {
        b.iter(|| q.read_blocking(&ns, Lba(8), one.as_mut_slice()).unwrap())
    });

    // dio path, run to completion.
    let dx = Dioxide::builder()
        .controller(ctrl())
        .run_to_completion()
        .build()
        .unwrap();
    let file = dx
        .open_file(0, Nsid(1), FileOptions::new(0, 1 << 20).with_len(1 << 29))
        .unwrap();
    let mut buf = Some(IoBuffer::Dma(file.alloc(4096).unwrap()));
    g.bench_function("qd1_sync/dio_file", |b| {
        b.iter(|| {
            let (r, back) = file.read(buf.take().unwrap(), 4096, 4096);
            assert_eq!(r.unwrap(), 4096);
            buf = Some(back);
        })
    });

    g.throughput(Throughput::Elements(32));
    let mut bufs: Vec<DmaBuffer> = (0..32).map(|_| raw.alloc(4096).unwrap()).collect();
    g.bench_function("qd32_async/raw_qpair", |b| {
        b.iter(|| {
            for (i, bf) in bufs.drain(..).enumerate() {
                q.read(&ns, Lba(8 * i as u64), bf).unwrap();
            }
            while bufs.len() < 32 {
                q.poll(usize::MAX, |bf, r| {
                    r.unwrap();
                    bufs.push(bf);
                })
                .unwrap();
            }
        })
    });
    let pool: Arc<Mutex<Vec<IoBuffer>>> = Arc::new(Mutex::new(
        (0..32)
            .map(|_| IoBuffer::Dma(file.alloc(4096).unwrap()))
            .collect(),
    ));
    g.bench_function("qd32_async/dio_file", |b| {
        b.iter(|| {
            let batch: Vec<IoBuffer> = pool.lock().unwrap().drain(..).collect();
            for (i, bf) in batch.into_iter().enumerate() {
                let p = pool.clone();
                file.submit(Request::read(4096 * i as u64, bf), move |d| {
                    assert_eq!(d.result.unwrap(), 4096);
                    p.lock().unwrap().push(d.buf);
                })
                .unwrap();
            }
            while pool.lock().unwrap().len() < 32 {
                dx.poll();
            }
        })
    });
    drop(file);
    drop(dx);

    // dio path through a poller thread.
    g.throughput(Throughput::Elements(1));
    let dxp = Dioxide::builder()
        .controller(ctrl())
        .pollers([None])
        .build()
        .unwrap();
    let filep = dxp
        .open_file(0, Nsid(1), FileOptions::new(0, 1 << 20).with_len(1 << 29))
        .unwrap();
    let mut bufp = Some(IoBuffer::Dma(filep.alloc(4096).unwrap()));
    g.bench_function("qd1_sync_pollers/dio_file", |b| {
        b.iter(|| {
            let (r, back) = filep.read(bufp.take().unwrap(), 4096, 4096);
            assert_eq!(r.unwrap(), 4096);
            bufp = Some(back);
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).warm_up_time(std::time::Duration::from_millis(500)).measurement_time(std::time::Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
