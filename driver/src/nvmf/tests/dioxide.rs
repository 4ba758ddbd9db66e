//! The target over the embedding API: [`FileBackend`] on a [`Dioxide`] with the built-in
//! emulated controller, driven over loopback by the host.

use std::sync::Arc;

use super::*;
use crate::emulated::{EmulatedConfig, EmulatedController, Mode, NamespaceConfig};
use crate::nvmf::backend::FileBackend;
use crate::nvmf::host::HostData;
use crate::nvmf::target::TargetOptions;
use crate::spec::Sqe;
use crate::spec::sqe::io as opc;
use crate::{Controller, Dioxide, FileOptions, Nsid};

fn dioxide() -> Dioxide {
    let emu = EmulatedController::new(EmulatedConfig {
        mode: Mode::Threaded,
        namespaces: vec![NamespaceConfig::memory(512, 16384)],
        ..EmulatedConfig::default()
    })
    .expect("emulated controller");
    Dioxide::builder()
        .controller(Controller::new(emu).expect("bring-up"))
        .pollers([None, None])
        .build()
        .expect("dioxide")
}

#[test]
fn target_on_blockfiles_of_the_emulated_controller() {
    watchdog(
        "target_on_blockfiles_of_the_emulated_controller",
        test_watchdog::STRESS,
        || {
            let dx = dioxide();
            let backend = Arc::new(FileBackend::new(&dx, 0).expect("file backend"));
            let opts = TargetOptions {
                max_h2c_data: 32 * 1024,
                max_c2h_data: 8192,
                ..TargetOptions::default()
            };
            let t = TestTarget::with_backend(backend, opts, 2);
            for d in ALL_DIGESTS {
                let mut c = connect(&t, d);
                assert_eq!(c.namespace(1).expect("identify ns"), (16384, 512));
                let mut qs: Vec<_> = (0..3).map(|_| c.io_queue(32).expect("I/O queue")).collect();
                for (i, q) in qs.iter_mut().enumerate() {
                    let lba = 2048 * i as u64;
                    // In-capsule (4 KiB) and R2T (128 KiB = MDTS, 4 H2CData PDUs) writes, read back
                    // in 8 KiB C2HData PDUs.
                    let a = pattern(i as u64 + 10, 4096);
                    let b = pattern(i as u64 + 20, 128 * 1024);
                    q.write(1, lba, a.clone(), 512).expect("in-capsule write");
                    q.write(1, lba + 8, b.clone(), 512).expect("R2T write");
                    assert_eq!(q.read(1, lba, 8, 512).expect("read"), a);
                    assert_eq!(q.read(1, lba + 8, 256, 512).expect("read"), b);
                    q.flush(1).expect("flush");
                    q.run(
                        "Write Zeroes",
                        Sqe::write_zeroes(1, lba + 8, 8, false),
                        HostData::None,
                    )
                    .expect("write zeroes");
                    let z = q.read(1, lba + 8, 16, 512).expect("read");
                    assert!(z[..4096].iter().all(|&x| x == 0));
                    assert_eq!(&z[4096..], &b[4096..8192]);
                }
                // A Write Zeroes larger than one zeroed buffer (512 KiB: four chained writes).
                let q = &mut qs[1];
                q.write(1, 4096, pattern(77, 16384), 512).expect("write");
                q.run(
                    "large Write Zeroes",
                    Sqe::write_zeroes(1, 4096 - 1000, 1024, false),
                    HostData::None,
                )
                .expect("large write zeroes");
                let z = q.read(1, 4096, 32, 512).expect("read");
                assert!(z[..24 * 512].iter().all(|&x| x == 0));
                assert_eq!(&z[24 * 512..], &pattern(77, 16384)[24 * 512..]);
                // Several commands in flight on one queue.
                let q = &mut qs[0];
                for k in 0..16u64 {
                    let sqe = Sqe::rw(opc::WRITE, 1, 8192 + k * 16, 16, false);
                    q.submit(sqe, HostData::Out(pattern(k, 8192)), k)
                        .expect("submit");
                }
                let mut n = 0;
                while n < 16 {
                    q.poll().expect("poll");
                    while let Some(done) = q.pop() {
                        done.result.expect("write");
                        n += 1;
                    }
                }
                c.shutdown().expect("shutdown");
            }
            t.stop();
            // What the host wrote is on the namespace, read through the embedding API.
            let file = dx
                .open_file(0, Nsid(1), FileOptions::new(8192, 256).with_len(256 * 512))
                .expect("open the written range");
            let mut back = vec![0u8; 8192];
            file.read_at(&mut back, 3 * 16 * 512).expect("read_at");
            assert_eq!(back, pattern(3, 8192));
            drop(file);
            dx.shutdown();
        },
    )
}
