//! Run to completion: a request waiting for its I/O polls the thread's queue pair, which runs
//! the callbacks of other requests on the same stack. A request such a callback starts that
//! overlaps the waiting one's range can never get it (the holder is below it on the stack and
//! cannot go on until the callback returns): it is refused with `WouldDeadlock`, not left
//! to wait forever. One that does not overlap runs normally, and so does an overlapping one
//! started from a poll no request of this thread is waiting in.

use std::sync::{Arc, Mutex};

use dioxide::{BlockFile, Dioxide, EmbedError, EmbedResult, FileOptions, IoBuffer, Nsid, Request};
use dioxide_tests::*;

/// What the callback did, and its result.
type Outcome = Arc<Mutex<Vec<(&'static str, EmbedResult<usize>)>>>;

/// Submit an asynchronous direct read of page 8 whose callback runs `nested` on the file.
fn arm(
    file: &Arc<BlockFile>,
    out: &Outcome,
    what: &'static str,
    nested: impl FnOnce(&BlockFile) -> EmbedResult<usize> + Send + 'static,
) {
    let (f, o) = (file.clone(), out.clone());
    let buf = IoBuffer::Dma(file.alloc(4096).expect("buffer"));
    file.submit(Request::read(8 * 4096, buf), move |c| {
        c.result.expect("the direct read");
        let r = nested(&f);
        o.lock().unwrap().push((what, r));
    })
    .expect("submit");
}

#[test]
fn a_callback_overlapping_the_request_it_runs_under_is_refused_not_deadlocked() {
    let _w = test_watchdog::arm(test_watchdog::INTEGRATION);
    for mode in MODES {
        let (ctrl, _emu) = emulated(config(mode, &[(512, 1 << 14)]));
        let dx = Dioxide::builder()
            .controller(ctrl)
            .run_to_completion()
            .cache_pages(4)
            .build()
            .expect("dioxide");
        let opts = FileOptions::new(0, 2048).with_len(2048 * 512);
        let file = Arc::new(dx.open_file(0, Nsid(1), opts).expect("open"));
        let out: Outcome = Arc::default();
        let refused = |r: &EmbedResult<usize>| matches!(r, Err(EmbedError::WouldDeadlock { .. }));
        // 1. A partial write of page 0 (cache: fill, then write-through) polls; the callback
        //    reads page 0: refused.
        arm(&file, &out, "read under a write", |f| {
            f.read_at(&mut [0u8; 100], 10)
        });
        file.write_at(&[1u8; 100], 20).expect("outer write");
        // 2. A read of page 1 (a miss: fill) polls; the callback writes page 1: refused.
        arm(&file, &out, "write under a read", |f| {
            f.write_at(&[2u8; 10], 4096 + 30)
        });
        file.read_at(&mut [0u8; 100], 4096 + 20)
            .expect("outer read");
        // 3. A read of page 2 polls; the callback reads page 2 (shared) and writes page 5
        //    (disjoint): both run.
        arm(&file, &out, "read and disjoint write", |f| {
            f.read_at(&mut [0u8; 10], 2 * 4096 + 1)?;
            f.write_at(&[3u8; 10], 5 * 4096)
        });
        file.read_at(&mut [0u8; 100], 2 * 4096 + 20)
            .expect("outer read");
        // 4. From a plain poll (nothing of this thread waiting): an overlapping write runs.
        let f2 = file.clone();
        let o2 = out.clone();
        let buf = IoBuffer::Dma(file.alloc(4096).expect("buffer"));
        file.submit(Request::read(0, buf), move |_c| {
            let r = f2.write_at(&[4u8; 10], 0);
            o2.lock().unwrap().push(("write from a plain poll", r));
        })
        .expect("submit");
        while out.lock().unwrap().len() < 4 {
            dx.poll();
        }
        let got = std::mem::take(&mut *out.lock().unwrap());
        assert_eq!(got.len(), 4, "{got:?}");
        assert!(refused(&got[0].1), "{got:?}");
        assert!(refused(&got[1].1), "{got:?}");
        assert_eq!(got[2].1.as_ref().ok(), Some(&10), "{got:?}");
        assert_eq!(got[3].1.as_ref().ok(), Some(&10), "{got:?}");
        // The data: the outer requests whole, the refused ones absent.
        let mut b = vec![0u8; 6 * 4096];
        file.read_at(&mut b, 0).expect("read back");
        assert_eq!(&b[..10], &[4; 10]);
        assert_eq!(&b[20..120], &[1; 100]);
        assert!(b[4096 + 30..4096 + 40].iter().all(|&x| x == 0));
        assert_eq!(&b[5 * 4096..5 * 4096 + 10], &[3; 10]);
        drop(file);
        dx.shutdown();
    }
}
