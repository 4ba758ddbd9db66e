//! A namespace formatted with metadata (512+8) on a controller with a plain one, through the
//! embedding API, in both emulator modes: the plain namespace works, and the 512+8 one is
//! refused with the driver's `NamespaceHasMetadata` error (which names the fix) when a file is
//! opened on it, before anything reaches the device.

use dioxide::emulated::NamespaceConfig;
use dioxide::{Dioxide, EmbedError, Error, FileOptions, Nsid};
use dioxide_tests::*;

fn is_refusal(e: &EmbedError) -> bool {
    matches!(
        e,
        EmbedError::Driver(e) if matches!(**e, Error::NamespaceHasMetadata {
            nsid: Nsid(2),
            metadata: 8,
            ..
        })
    )
}

#[test]
fn files_on_a_namespace_with_metadata_fail_clearly() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    for mode in MODES {
        let mut cfg = config(mode, &[(512, 1 << 12)]);
        cfg.namespaces
            .push(NamespaceConfig::memory(512, 1 << 12).with_metadata(8, true));
        let (ctrl, emu) = emulated(cfg);
        let dx = Dioxide::builder()
            .controller(ctrl)
            .pollers([None])
            .build()
            .unwrap();
        let good = dx.open_file(0, Nsid(1), FileOptions::new(0, 64)).unwrap();
        assert_eq!(good.write_at(b"plain", 0).unwrap(), 5);

        let sent = emu.stats().io_commands();
        let e = dx
            .open_file(0, Nsid(2), FileOptions::new(0, 64).with_len(8192))
            .unwrap_err();
        assert!(is_refusal(&e), "{e:?}");
        assert!(e.to_string().contains("nvme format"), "{e}");
        assert_eq!(emu.stats().io_commands(), sent);
        let mut back = [0u8; 5];
        assert_eq!(good.read_at(&mut back, 0).unwrap(), 5);
        assert_eq!(&back, b"plain");
        dx.shutdown();
        // Nothing but namespace 1's commands reached the device.
        assert_eq!(emu.stats().dma_faults, 0);
    }
}
