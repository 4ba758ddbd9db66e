//! The SMART / Health Information log page: the backing controller's, read through its admin
//! queue off the poller; what the target counted itself for a backend without a controller.

use super::*;
use crate::spec::SmartLog;
use crate::spec::identify::SMART_LOG_LEN;

fn smart(c: &mut HostController) -> SmartLog {
    let page = c.log_page(2, 0xffff_ffff, 512, 0).expect("SMART log");
    SmartLog::from_bytes(page[..SMART_LOG_LEN].try_into().expect("512 bytes"))
}

#[test]
fn smart_log_counts_the_hosts_io_without_a_controller() {
    watchdog(
        "smart_log_counts_the_hosts_io_without_a_controller",
        test_watchdog::INTEGRATION,
        || {
            let t = TestTarget::with_backend(mem_backend(), TargetOptions::default(), 1);
            let mut c = connect(&t, Digests::default());
            assert_eq!(smart(&mut c).host_write_commands, 0);
            let mut q = c.io_queue(8).expect("I/O queue");
            for k in 0..3u64 {
                q.write(1, 8 * k, pattern(k, 4096), 512).expect("write");
            }
            q.read(1, 0, 8, 512).expect("read");
            // A failed command is not counted.
            assert!(q.read(1, 1 << 40, 1, 512).is_err());
            let s = smart(&mut c);
            assert_eq!((s.host_write_commands, s.host_read_commands), (3, 1));
            // 24 and 8 units of 512 bytes: one thousand-unit each, rounded up.
            assert_eq!((s.data_units_written, s.data_units_read), (1, 1));
            assert_eq!(
                (s.available_spare, s.power_cycles, s.critical_warning),
                (100, 1, 0)
            );
            t.stop();
        },
    )
}

#[cfg(feature = "emulated")]
#[test]
fn smart_log_is_the_backing_controllers() {
    use crate::emulated::{EmulatedConfig, EmulatedController, Mode, NamespaceConfig};
    use crate::nvmf::backend::FileBackend;
    watchdog(
        "smart_log_is_the_backing_controllers",
        test_watchdog::STRESS,
        || {
            let emu = EmulatedController::new(EmulatedConfig {
                mode: Mode::Threaded,
                namespaces: vec![NamespaceConfig::memory(512, 4096)],
                ..EmulatedConfig::default()
            })
            .expect("emulated controller");
            let dx = crate::Dioxide::builder()
                .controller(crate::Controller::new(emu).expect("bring-up"))
                .pollers([None])
                .build()
                .expect("dioxide");
            let backend = Arc::new(FileBackend::new(&dx, 0).expect("file backend"));
            let t = TestTarget::with_backend(backend, TargetOptions::default(), 1);
            let mut c = connect(&t, Digests::default());
            let mut q = c.io_queue(8).expect("I/O queue");
            for k in 0..5u64 {
                q.write(1, 8 * k, pattern(k, 4096), 512).expect("write");
            }
            let served = smart(&mut c);
            let device = dx
                .controller(0)
                .expect("controller 0")
                .smart_log()
                .expect("the device's SMART log");
            assert_eq!(served, device);
            assert!(served.host_write_commands >= 5, "{served:?}");
            assert_ne!(served.temperature, 0, "{served:?}");
            // Several at once (the host may keep many in flight): each is answered.
            let mut sqes = Vec::new();
            for k in 0..12u64 {
                let mut sqe = crate::spec::Sqe::get_log_page(2, 0xffff_ffff, 512, 0, 0);
                crate::nvmf::fabrics::Sgl::transport(512).set(&mut sqe);
                sqes.push(sqe);
                c.admin()
                    .submit(sqe, crate::nvmf::host::HostData::In(vec![0; 512]), k)
                    .expect("submit");
            }
            let mut n = 0;
            while n < sqes.len() {
                c.admin().poll().expect("poll");
                while let Some(d) = c.admin().pop() {
                    let cqe = d.result.expect("completion");
                    // Success, or Command Interrupted (retry) beyond the reads at once.
                    assert!(
                        cqe.status().is_success() || cqe.status().sc == 0x21,
                        "{cqe:?}"
                    );
                    n += 1;
                }
            }
            drop(q);
            c.shutdown().expect("shutdown");
            t.stop();
            dx.shutdown();
        },
    )
}
