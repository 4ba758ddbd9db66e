//! Edges of the split of a request into a cached head, a direct middle and a cached tail.
//!
//! * Reads around the end of a file whose length is not block aligned: every unaligned and
//!   aligned offset near `len`, lengths shorter and longer than a block, buffers exactly the
//!   request's length and larger, synchronous and asynchronous, with DMA buffers. Each read
//!   must succeed, return `min(len, file len − offset)` bytes equal to the file's data, and
//!   never hand back a byte the device holds at or past the file's length. In particular: an
//!   unaligned request whose first block holds the end of the file while the buffer covers that
//!   whole block. Its head is the whole answer; there is no block-aligned middle. (It once
//!   produced a direct read at the unaligned end of file, refused by dio-core as misaligned.)
//! * A write whose direct middle succeeds and whose buffered tail fails (a media error on the
//!   tail's page) ends short: it reports the bytes written (dio-core's rule for a partial
//!   direct write), synchronously and asynchronously, and those bytes read back.
//!
//! Emulated controllers only (they build their own).

use std::sync::mpsc::channel;
use std::time::Duration;

use dioxide::emulated::{Action, Fault, Trigger};
use dioxide::spec::status::media;
use dioxide::spec::{Sct, Status};
use dioxide::{BlockFile, Completed, Dioxide, EmbedError, FileOptions, Nsid, Request};
use dioxide_tests::*;

const PAGE: u64 = 4096;
/// The file's capacity.
const CAP: u64 = 4 * PAGE;
/// The file's length: inside a block for 512 and 4096 byte blocks.
const LEN: u64 = 2 * PAGE + 1000;
/// What the device holds at and past `LEN` (never to be returned).
const PAST: u8 = 0xab;
/// A lost completion fails the test instead of hanging it.
const LIMIT: Duration = Duration::from_secs(20);

/// The file's data: a pattern without `PAST` bytes, then `PAST` up to the capacity.
fn contents() -> Vec<u8> {
    let mut d = pattern(CAP as usize, 31);
    for (i, b) in d.iter_mut().enumerate() {
        if i as u64 >= LEN {
            *b = PAST;
        } else if *b == PAST {
            *b = 0;
        }
    }
    d
}

/// Read `len` bytes at `off` into a zeroed DMA buffer of `buf_len` bytes, synchronously or
/// through `submit`.
fn read(file: &BlockFile, off: u64, len: usize, buf_len: usize, sync: bool) -> Completed {
    let mut b = file.alloc(buf_len).unwrap();
    b.as_mut_slice().fill(0);
    if sync {
        let (result, buf) = file.read(b, off, len);
        return Completed { result, buf };
    }
    let (tx, rx) = channel();
    let req = Request::read(off, b).with_len(len);
    if let Err(r) = file.submit(req, move |c| tx.send(c).unwrap()) {
        panic!(
            "read [{off}, +{len}) (buffer {buf_len}) refused: {}",
            r.error
        );
    }
    rx.recv_timeout(LIMIT)
        .unwrap_or_else(|_| panic!("read [{off}, +{len}) never completed"))
}

#[test]
fn reads_around_an_unaligned_end_of_file() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    let data = contents();
    for mode in MODES {
        for bs in [512u64, 4096] {
            let (ctrl, _emu) = emulated(config(mode, &[(bs as u32, 1 << 14)]));
            let dx = Dioxide::builder()
                .controller(ctrl)
                .pollers([None])
                .build()
                .unwrap();
            let blocks = CAP / bs;
            // The device holds data past the length; the file is opened fresh (nothing cached).
            {
                let f = dx
                    .open_file(0, Nsid(1), FileOptions::new(0, blocks))
                    .unwrap();
                let mut b = f.alloc(CAP as usize).unwrap();
                b.as_mut_slice().copy_from_slice(&data);
                let (r, _) = f.write(b, 0, CAP as usize);
                assert_eq!(r.unwrap(), CAP as usize);
            }
            let file = dx
                .open_file(0, Nsid(1), FileOptions::new(0, blocks).with_len(LEN))
                .unwrap();
            let last = LEN / bs * bs;
            // Every 7th byte of the two blocks before the end, and the edges.
            let mut offsets: Vec<u64> = (LEN - 2 * bs..LEN).step_by(7).collect();
            offsets.extend([last - bs, last - 1, last, last + 1, LEN - 1, LEN, LEN + 5]);
            let lens = [
                1,
                bs as usize / 2,
                bs as usize,
                bs as usize + 300,
                3 * bs as usize,
            ];
            let mut reads = 0;
            for &off in &offsets {
                for &len in &lens {
                    for extra in [0, bs as usize] {
                        for sync in [true, false] {
                            let what = format!(
                                "{mode:?}, block {bs}, {} read [{off}, +{len}), buffer {}",
                                if sync { "sync" } else { "async" },
                                len + extra
                            );
                            let c = read(&file, off, len, len + extra, sync);
                            let n = c.result.unwrap_or_else(|e| panic!("{what}: {e}"));
                            let want = (LEN.saturating_sub(off) as usize).min(len);
                            assert_eq!(n, want, "{what}: byte count");
                            let got = c.buf.as_slice();
                            let at = off.min(LEN) as usize;
                            assert!(got[..n] == data[at..at + n], "{what}: wrong data");
                            assert!(
                                !got[n..].contains(&PAST),
                                "{what}: a byte past the end of file was returned"
                            );
                            reads += 1;
                        }
                    }
                }
            }
            note(format!("{mode:?}, block {bs}: {reads} reads checked"));
            drop(file);
            dx.shutdown();
        }
    }
}

#[test]
fn a_write_whose_buffered_tail_fails_ends_short() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    // The tail's page: 4 KiB at 8 KiB. The write: the two pages before it directly, then 100
    // bytes into it through the cache.
    const BAD: u64 = 2 * PAGE;
    const LEN: usize = BAD as usize + 100;
    for mode in MODES {
        for sync in [true, false] {
            let (ctrl, emu) = emulated(config(mode, &[(512, 1 << 14)]));
            let dx = Dioxide::builder()
                .controller(ctrl)
                .pollers([None])
                .build()
                .unwrap();
            let file = dx
                .open_file(0, Nsid(1), FileOptions::new(0, CAP / 512))
                .unwrap();
            // The whole capacity written first: the write below does not extend the file.
            let old = pattern(CAP as usize, 5);
            assert_eq!(file.write_at(&old, 0).unwrap(), CAP as usize);
            emu.inject(Fault {
                trigger: Trigger::LbaRange {
                    nsid: 1,
                    start: BAD / 512,
                    end: (BAD + PAGE) / 512,
                    opcode: None,
                },
                action: Action::Status(Status::new(Sct::Media, media::UNRECOVERED_READ_ERROR)),
                times: None,
            });
            let data = pattern(LEN, 6);
            let mut b = file.alloc(LEN).unwrap();
            b.as_mut_slice().copy_from_slice(&data);
            let what = format!("{mode:?}, {}", if sync { "sync" } else { "async" });
            let r = if sync {
                file.write(b, 0, LEN).0
            } else {
                let (tx, rx) = channel();
                if let Err(r) = file.submit(Request::write(0, b), move |c| tx.send(c).unwrap()) {
                    panic!("{what}: refused: {}", r.error);
                }
                rx.recv_timeout(LIMIT)
                    .expect("the write never completed")
                    .result
            };
            let n = r.unwrap_or_else(|e| panic!("{what}: the direct bytes were lost: {e}"));
            assert_eq!(
                n, BAD as usize,
                "{what}: the bytes written before the bad page"
            );
            emu.clear_faults();
            let mut got = vec![0; BAD as usize];
            assert_eq!(file.read_at(&mut got, 0).unwrap(), got.len());
            assert!(
                got == data[..BAD as usize],
                "{what}: the direct part reads back"
            );
            drop(file);
            dx.shutdown();
        }
    }
}

/// Reads at offsets past the capacity, up to `u64::MAX`, end at once with 0 bytes (no page
/// rounding overflow, no panic; an end past `u64::MAX` is `BeyondCapacity`), and a read that starts inside the file and runs past the
/// capacity stops at `len`.
#[test]
fn reads_far_past_the_capacity_return_nothing() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    for mode in MODES {
        let (ctrl, _emu) = emulated(config(mode, &[(512, 1 << 12)]));
        let dx = Dioxide::builder()
            .controller(ctrl)
            .pollers([None])
            .build()
            .unwrap();
        let file = dx
            .open_file(0, Nsid(1), FileOptions::new(0, 16).with_len(8192))
            .unwrap();
        assert_eq!(file.write_at(&[7u8; 8192], 0).unwrap(), 8192);
        let mut small = [0u8; 5];
        for off in [8192, 1 << 40, u64::MAX - 10, u64::MAX - 5] {
            assert_eq!(file.read_at(&mut small, off).unwrap(), 0, "offset {off}");
        }
        // An end past `u64::MAX` is a clear error, not a wrap.
        for off in [u64::MAX - 4, u64::MAX] {
            let e = file.read_at(&mut small, off).unwrap_err();
            assert!(matches!(e, EmbedError::BeyondCapacity { .. }), "{e:?}");
        }
        let (r, _) = file.read(file.alloc(4096).unwrap(), u64::MAX - 8191, 4096);
        assert_eq!(r.unwrap(), 0);
        let mut big = vec![0u8; 1 << 20];
        assert_eq!(file.read_at(&mut big, 8000).unwrap(), 192);
        assert!(big[..192].iter().all(|&b| b == 7));
        dx.shutdown();
    }
}
