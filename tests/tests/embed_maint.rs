//! The maintenance operations of a `BlockFile` (flush, write zeroes, deallocate) on the emulated
//! controller, in both engines (pooled pollers, run to completion) and both emulator modes:
//!
//! * the data read back: zeroes where zeroed or deallocated, every neighbouring byte untouched,
//!   including in the blocks an unaligned write zeroes shares with its neighbours;
//! * a page cached before the operation is not returned stale after it;
//! * the commands the device received, from its per-opcode counters: Write Zeroes (not
//!   writes) when ONCS has it, split at 65536 blocks and at WZSL; writes of a zeroed buffer
//!   when ONCS lacks it; Dataset Management with up to 256 ranges each; Flush only with a
//!   volatile write cache;
//! * bounds, alignment, read-only files and a controller without Dataset Management refused,
//!   with nothing sent to the device;
//! * the asynchronous forms: the callback runs exactly once, after the data is on the device,
//!   on a poller or on the completion thread.
//!
//! Emulated controllers only (they are configured here: ONCS, VWC, WZSL).

// `deallocate` takes a list of byte ranges: a list of one range is meant.
#![allow(clippy::single_range_in_vec_init)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::channel;
use std::time::Duration;

use dioxide::emulated::{EmulatedConfig, EmulatedController, Mode};
use dioxide::spec::Oncs;
use dioxide::spec::sqe::io;
use dioxide::{BlockFile, CompletionThread, Dioxide, EmbedError, EmbedResult, FileOptions, Nsid};
use dioxide_tests::*;

const LIMIT: Duration = Duration::from_secs(20);

/// Device command counts of the opcodes the tests watch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Counts {
    writes: u64,
    zeroes: u64,
    dsm: u64,
    flushes: u64,
}

fn counts(emu: &EmulatedController) -> Counts {
    let s = emu.stats();
    Counts {
        writes: s.io_commands_with(io::WRITE),
        zeroes: s.io_commands_with(io::WRITE_ZEROES),
        dsm: s.io_commands_with(io::DATASET_MANAGEMENT),
        flushes: s.io_commands_with(io::FLUSH),
    }
}

impl std::ops::Sub for Counts {
    type Output = Counts;
    fn sub(self, o: Counts) -> Counts {
        Counts {
            writes: self.writes - o.writes,
            zeroes: self.zeroes - o.zeroes,
            dsm: self.dsm - o.dsm,
            flushes: self.flushes - o.flushes,
        }
    }
}

/// An instance on one emulated controller: pooled (two pollers) or run to completion.
fn instance(cfg: EmulatedConfig, pooled: bool) -> (Dioxide, Arc<EmulatedController>) {
    let (ctrl, emu) = emulated(cfg);
    let b = Dioxide::builder().controller(ctrl);
    let b = if pooled {
        b.pollers([None, None])
    } else {
        b.run_to_completion()
    };
    (b.build().expect("dioxide"), emu)
}

/// Every combination of emulator mode and engine.
fn each_setup(f: impl Fn(Mode, bool)) {
    for mode in MODES {
        for pooled in [true, false] {
            f(mode, pooled);
        }
    }
}

/// `len` bytes of the file from `offset`, through the page cache.
fn read(file: &BlockFile, offset: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    assert_eq!(file.read_at(&mut v, offset).expect("read"), len);
    v
}

#[test]
fn write_zeroes_sends_write_zeroes_and_zeroes_exactly_the_range() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    each_setup(|mode, pooled| {
        let (dx, emu) = instance(config(mode, &[(512, 1 << 16)]), pooled);
        let cap = 4096 * 512u64;
        let file = dx
            .open_file(0, Nsid(1), FileOptions::new(0, 4096))
            .expect("open");
        assert!(file.supports_write_zeroes());
        let data = pattern(cap as usize, 1);
        file.write_at(&data, 0).expect("prefill");
        // Cache two pages the operation covers (heap reads go through the cache).
        let _ = read(&file, 8192, 100);
        let _ = read(&file, 65536, 4096);
        let mut model = data.clone();
        // Unaligned at both ends (the shared blocks are written through the cache, one write
        // each), aligned, and inside one block: (offset, length, writes, Write Zeroes).
        let cases = [
            (1000u64, 70_000u64, 2, 1),
            (200_000, 512 * 300, 2, 1),
            (409_600, 8192, 0, 1),
            (cap - 5, 5, 1, 0),
            (513, 100, 1, 0),
        ];
        for (off, len, writes, zeroes) in cases {
            let before = counts(&emu);
            file.write_zeroes(off, len).expect("write zeroes");
            let d = counts(&emu) - before;
            model[off as usize..(off + len) as usize].fill(0);
            assert_eq!((d.writes, d.zeroes), (writes, zeroes), "{off}+{len}: {d:?}");
            assert_eq!(read(&file, 0, cap as usize), model, "after {off}+{len}");
        }
        assert_eq!(file.len(), cap, "the length does not change");
        drop(file);
        dx.shutdown();
    });
}

#[test]
fn write_zeroes_is_split_at_65536_blocks_and_at_wzsl() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    for (wzsl, per_cmd) in [(0u8, 65536u64 * 512), (3, 32 * 1024)] {
        let cfg = EmulatedConfig {
            wzsl,
            ..config(Mode::Threaded, &[(512, 1 << 18)])
        };
        let (dx, emu) = instance(cfg, true);
        let blocks = 1u64 << 18;
        let file = dx
            .open_file(
                0,
                Nsid(1),
                FileOptions::new(0, blocks).with_len(blocks * 512),
            )
            .expect("open");
        let len = if wzsl == 0 { 100 << 20 } else { 1 << 20 };
        let last = pattern(4096, 9);
        file.write_at(&last, len).expect("write past the range");
        let before = counts(&emu);
        file.write_zeroes(0, len).expect("write zeroes");
        let d = counts(&emu) - before;
        // The emulator refuses a command larger than WZSL: all of them passed.
        assert_eq!(d.zeroes, len.div_ceil(per_cmd), "wzsl {wzsl}: {d:?}");
        assert_eq!(d.writes, 0);
        assert!(read(&file, len - 4096, 4096).iter().all(|&b| b == 0));
        assert_eq!(read(&file, len, 4096), last);
        drop(file);
        dx.shutdown();
    }
}

#[test]
fn without_oncs_write_zeroes_writes_a_zeroed_buffer_and_deallocate_is_refused() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    each_setup(|mode, pooled| {
        let cfg = EmulatedConfig {
            oncs: Oncs::empty(),
            vwc: false,
            ..config(mode, &[(4096, 1 << 12)])
        };
        let (dx, emu) = instance(cfg, pooled);
        let file = dx
            .open_file(0, Nsid(1), FileOptions::new(0, 1024))
            .expect("open");
        assert!(!file.supports_write_zeroes() && !file.supports_deallocate());
        assert!(!file.has_volatile_write_cache());
        let data = pattern(1024 * 4096, 2);
        file.write_at(&data, 0).expect("prefill");
        let before = counts(&emu);
        // 600 KiB: five writes of at most the 128 KiB zeroed buffer.
        file.write_zeroes(4096, 600 * 1024).expect("write zeroes");
        let d = counts(&emu) - before;
        assert_eq!((d.zeroes, d.writes), (0, 5), "{d:?}");
        let mut model = data.clone();
        model[4096..4096 + 600 * 1024].fill(0);
        assert_eq!(read(&file, 0, model.len()), model);
        // Deallocate: refused, nothing sent, nothing changed.
        let e = file.deallocate(&[0..4096]).unwrap_err();
        assert!(matches!(e, EmbedError::Unsupported { .. }), "{e}");
        // Flush without a volatile write cache: nothing to send.
        file.flush().expect("flush");
        assert_eq!(counts(&emu) - before, d, "nothing more was sent");
        assert_eq!(read(&file, 0, 4096), &model[..4096]);
        drop(file);
        dx.shutdown();
    });
}

#[test]
fn deallocate_sends_up_to_256_ranges_per_command_and_leaves_neighbours() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    each_setup(|mode, pooled| {
        let (dx, emu) = instance(config(mode, &[(512, 1 << 16)]), pooled);
        // The file starts at LBA 1000: ranges are translated to the namespace. Files before
        // and after it hold data that must not change.
        let file = dx
            .open_file(0, Nsid(1), FileOptions::new(1000, 8192))
            .expect("open");
        let (before_it, after_it) = (
            dx.open_file(0, Nsid(1), FileOptions::new(0, 1000))
                .expect("open"),
            dx.open_file(0, Nsid(1), FileOptions::new(9192, 1000))
                .expect("open"),
        );
        let side = pattern(1000 * 512, 33);
        before_it.write_at(&side, 0).expect("write before");
        after_it.write_at(&side, 0).expect("write after");
        let cap = file.capacity();
        let data = pattern(cap as usize, 3);
        file.write_at(&data, 0).expect("prefill");
        let _ = read(&file, 512 * 20, 10); // cache a page a range covers
        // 300 ranges of one block every other 8 blocks, plus one large one: two commands.
        let mut ranges: Vec<_> = (0..300u64)
            .map(|i| i * 4096 + 512..i * 4096 + 1024)
            .collect();
        ranges.push(3907 * 512..5859 * 512);
        ranges.push(100..100); // empty: skipped, alignment not required
        let before = counts(&emu);
        file.deallocate(&ranges).expect("deallocate");
        let d = counts(&emu) - before;
        assert_eq!((d.dsm, d.writes, d.zeroes), (2, 0, 0), "{d:?}");
        let mut model = data.clone();
        for r in &ranges {
            model[r.start as usize..r.end as usize].fill(0);
        }
        assert_eq!(read(&file, 0, cap as usize), model);
        // The whole file: one more command; the neighbouring files are intact.
        file.deallocate(&[0..cap]).expect("deallocate all");
        assert_eq!((counts(&emu) - before).dsm, 3);
        assert!(read(&file, 0, cap as usize).iter().all(|&b| b == 0));
        assert_eq!(read(&before_it, 0, side.len()), side);
        assert_eq!(read(&after_it, 0, side.len()), side);
        drop((file, before_it, after_it));
        dx.shutdown();
    });
}

#[test]
fn out_of_bounds_unaligned_and_read_only_are_refused_without_device_commands() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    each_setup(|mode, pooled| {
        let (dx, emu) = instance(config(mode, &[(512, 1 << 14)]), pooled);
        let file = dx
            .open_file(0, Nsid(1), FileOptions::new(2048, 2048))
            .expect("open");
        let cap = file.capacity();
        let before = counts(&emu);
        let range_err = |r: EmbedResult<()>| {
            let e = r.unwrap_err();
            assert!(matches!(e, EmbedError::MaintRange { .. }), "{e}");
        };
        range_err(file.write_zeroes(cap - 512, 1024));
        range_err(file.write_zeroes(u64::MAX - 10, 100));
        range_err(file.deallocate(&[0..512, cap..cap + 512]));
        range_err(file.deallocate(&[0..100]));
        #[allow(clippy::reversed_empty_ranges)]
        range_err(file.deallocate(&[1024..512]));
        let (tx, _rx) = channel::<()>();
        let e = file
            .submit_write_zeroes(cap, 512, move |_| drop(tx))
            .unwrap_err();
        assert!(matches!(e, EmbedError::MaintRange { .. }), "{e}");
        let ro = dx
            .open_file(0, Nsid(1), FileOptions::new(0, 2048).writable(false))
            .expect("open read-only");
        assert!(matches!(
            ro.write_zeroes(0, 512).unwrap_err(),
            EmbedError::ReadOnly { .. }
        ));
        assert!(matches!(
            ro.deallocate(&[0..512]).unwrap_err(),
            EmbedError::ReadOnly { .. }
        ));
        // Zero bytes and empty range lists: nothing to do.
        file.write_zeroes(100, 0).expect("empty write zeroes");
        file.deallocate(&[]).expect("no ranges");
        assert_eq!(counts(&emu) - before, Counts::default());
        drop((file, ro));
        dx.shutdown();
    });
}

#[test]
fn flush_reaches_the_device_when_it_has_a_volatile_write_cache() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    each_setup(|mode, pooled| {
        let (dx, emu) = instance(config(mode, &[(512, 1 << 14)]), pooled);
        let file = dx
            .open_file(0, Nsid(1), FileOptions::new(0, 2048).writable(false))
            .expect("open read-only: a flush is allowed");
        assert!(file.has_volatile_write_cache());
        let before = counts(&emu);
        file.flush().expect("flush");
        let (tx, rx) = channel::<EmbedResult<()>>();
        file.submit_flush(move |r| tx.send(r).expect("send"))
            .expect("submit flush");
        // Run to completion: this thread polls its queue pair (the watchdog bounds the wait).
        let r = loop {
            dx.poll();
            if let Ok(r) = rx.try_recv() {
                break r;
            }
        };
        r.expect("flush");
        assert_eq!((counts(&emu) - before).flushes, 2);
        drop(file);
        dx.shutdown();
    });
}

#[test]
fn asynchronous_forms_complete_once_after_the_device_on_either_thread() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    for deferred in [false, true] {
        let (ctrl, emu) = emulated(config(Mode::Threaded, &[(512, 1 << 14)]));
        let ct = CompletionThread::spawn("maint-completions").expect("thread");
        let mut b = Dioxide::builder().controller(ctrl).pollers([None]);
        if deferred {
            b = b.deferred_completions(ct.clone());
        }
        let dx = b.build().expect("dioxide");
        let file = dx
            .open_file(0, Nsid(1), FileOptions::new(0, 4096))
            .expect("open");
        let cap = file.capacity() as usize;
        let data = pattern(cap, 4);
        file.write_at(&data, 0).expect("prefill");
        let runs = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = channel::<(usize, String, EmbedResult<()>)>();
        let before = counts(&emu);
        let mut model = data.clone();
        for i in 0..32usize {
            let tx = tx.clone();
            let runs = runs.clone();
            let cb = move |r: EmbedResult<()>| {
                runs.fetch_add(1, Ordering::SeqCst);
                let name = std::thread::current().name().unwrap_or("").to_string();
                tx.send((i, name, r)).expect("send");
            };
            let off = (i * 16 * 4096) as u64;
            if i % 2 == 0 {
                file.submit_write_zeroes(off, 8192, cb).expect("submit");
                model[off as usize..off as usize + 8192].fill(0);
            } else {
                let r = off + 4096..off + 4096 + 2048;
                file.submit_deallocate(std::slice::from_ref(&r), cb)
                    .expect("submit");
                model[r.start as usize..r.end as usize].fill(0);
            }
        }
        let mut seen = [false; 32];
        for _ in 0..32 {
            let (i, name, r) = rx.recv_timeout(LIMIT).expect("a callback");
            r.expect("completed");
            assert!(
                !std::mem::replace(&mut seen[i], true),
                "callback {i} ran twice"
            );
            if deferred {
                assert_eq!(name, "maint-completions");
            }
        }
        let d = counts(&emu) - before;
        assert_eq!((d.zeroes, d.dsm, d.writes), (16, 16, 0), "{d:?}");
        assert_eq!(read(&file, 0, cap), model);
        drop(file);
        // Everything has run once shut down: any second run of a callback is in the channel.
        dx.shutdown();
        ct.stop();
        drop(tx);
        let extra: Vec<usize> = rx.try_iter().map(|(i, ..)| i).collect();
        assert!(extra.is_empty(), "callbacks ran again: {extra:?}");
        assert_eq!(runs.load(Ordering::SeqCst), 32);
    }
}

#[test]
fn a_read_overlapping_a_write_zeroes_sees_all_or_nothing_of_it() {
    // Readers race a stream of write zeroes / rewrites of the same 64 KiB: every read sees
    // the range wholly zeroed or wholly the pattern (the range lock orders them).
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    let (dx, _emu) = instance(config(Mode::Threaded, &[(512, 1 << 14)]), true);
    let file = dx
        .open_file(0, Nsid(1), FileOptions::new(0, 2048))
        .expect("open");
    let data = pattern(65536, 5);
    file.write_at(&data, 0).expect("prefill");
    std::thread::scope(|s| {
        let f = &file;
        let d = &data;
        s.spawn(move || {
            for _ in 0..100 {
                f.write_zeroes(0, 65536).expect("write zeroes");
                f.write_at(d, 0).expect("write");
            }
        });
        for _ in 0..2 {
            s.spawn(move || {
                for _ in 0..100 {
                    let got = read(f, 0, 65536);
                    assert!(got == *d || got.iter().all(|&b| b == 0), "a torn read");
                }
            });
        }
    });
    drop(file);
    dx.shutdown();
}
