//! Deterministic tests (no threads): the `Queued`/wait decision, result precedence, the EOF
//! clamp, validation, the unaligned write tail, deferral, and delivery options. The device is a
//! `QueueDev` completed by polling in place.
#![cfg(not(loom))]

mod common;

use std::sync::Arc;

use common::*;
use dio_core::result::{Errors, precedence, transferred};
use dio_core::sync::Mutex;
use dio_core::{
    Completion, Config, Deferral, Deferred, DeviceStatus, DioCore, DioError, DioRequest, DioResult,
    Dir, IoCtx, Mode, Outcome, RefCounting, Slot, SubmitErrorDelivery, Submitted, Wait,
};

struct Rig {
    dev: Arc<QueueDev>,
    probe: Arc<Probe>,
    file: FileRef,
    hook: Arc<Hook>,
}

fn rig(
    exts: Vec<(u64, Kind)>,
    i_size: u64,
    align: u64,
    counting: RefCounting,
) -> (Rig, DioCore<TBuf, LayoutMapper>) {
    let probe = Probe::new();
    let core = Arc::new(DevCore::new(vec![], vec![], probe.clone()));
    let dev = Arc::new(QueueDev::new(core, 64));
    let cfg = Config {
        align,
        wait: Wait::PollInPlace(dev.clone()),
        refcount: counting,
        ..Config::default()
    };
    let hook = Arc::new(Hook {
        calls: Mutex::new(vec![]),
        fail: None,
    });
    let dio = DioCore::new(dev.clone(), Arc::new(LayoutMapper { base: 0, exts }), cfg)
        .with_end_io(hook.clone());
    let file = TFile::shared(i_size, probe.clone());
    (
        Rig {
            dev,
            probe,
            file,
            hook,
        },
        dio,
    )
}

fn buf(r: &Rig, len: u64) -> TBuf {
    TBuf {
        len,
        fault_at: None,
        probe: r.probe.clone(),
    }
}

fn drain(r: &Rig) {
    while !lock(&r.dev.queue).is_empty() {
        dio_core::Poller::poll_once(&*r.dev);
    }
}

fn kind<B>(o: &Outcome<B>) -> String {
    format!("{o:?}")
}

fn finish<B>(o: Outcome<B>) -> String {
    let k = kind(&o);
    match o {
        Outcome::Queued => {}
        Outcome::Done { completion, .. } | Outcome::Fallback { completion, .. } => {
            completion.discard()
        }
    }
    k
}

#[test]
fn decision_table() {
    let _w = test_watchdog::arm(test_watchdog::UNIT);
    for counting in [RefCounting::Locked, RefCounting::Atomic] {
        let m = vec![(4, Kind::Mapped); 4];
        let cases: Vec<(Dir, Mode, bool, u64, u64, &str)> = vec![
            // dir, mode, force_wait, len, i_size, expected
            (Dir::Read, Mode::Async, false, 8, 100, "Queued"),
            (
                Dir::Read,
                Mode::Sync,
                false,
                8,
                100,
                "Done { result: Ok(8) }",
            ),
            (
                Dir::Read,
                Mode::Async,
                true,
                8,
                100,
                "Done { result: Ok(8) }",
            ),
            (Dir::Write, Mode::Async, false, 8, 100, "Queued"),
            (
                Dir::Write,
                Mode::Async,
                false,
                8,
                4,
                "Done { result: Ok(8) }",
            ), // extending
            (
                Dir::Write,
                Mode::Async,
                false,
                20,
                100,
                "Fallback { done: 16 }",
            ), // layout ends
            (Dir::Read, Mode::Async, false, 20, 100, "Queued"), // partial read
            (Dir::Read, Mode::Async, false, 8, 6, "Queued"),    // crosses EOF
            (Dir::Read, Mode::Async, false, 8, 8, "Queued"),
            (
                Dir::Read,
                Mode::Async,
                false,
                8,
                0,
                "Done { result: Ok(0) }",
            ), // at EOF
        ];
        for (dir, mode, force_wait, len, i_size, want) in cases {
            let (r, dio) = rig(m.clone(), i_size, 1, counting);
            let (res, cb) = (Arc::new(Mutex::new(None)), Completion::noop());
            let mut req = DioRequest::new(dir, 0, len, buf(&r, len), mode);
            req.force_wait = force_wait;
            let cb = if want == "Queued" {
                cb.discard();
                let res = res.clone();
                Completion::new(move |x: DioResult, _| *lock(&res) = Some(x))
            } else {
                cb
            };
            let got = finish(dio.submit(req, i_size, cb));
            assert_eq!(
                got, want,
                "{dir:?} {mode:?} force_wait={force_wait} len={len} i_size={i_size}"
            );
            drain(&r);
            if want == "Queued" {
                let want_n = if dir == Dir::Read {
                    len.min(16).min(i_size)
                } else {
                    len
                };
                assert_eq!(*lock(&res), Some(Ok(want_n)));
            }
        }
    }
}

#[test]
fn precedence_every_subset() {
    let s = DioError::QueueFull;
    let d = DioError::Fault;
    let io = DioError::Io(DeviceStatus::new(0, 4));
    let h = DioError::EndIo(3);
    for mask in 0u8..16 {
        let errs = Errors {
            submit: (mask & 1 != 0).then_some(s),
            deferred: (mask & 2 != 0).then_some(d),
            io: (mask & 4 != 0).then_some(io),
        };
        let hook = (mask & 8 != 0).then_some(h);
        let want = if mask & 1 != 0 {
            Err(s)
        } else if mask & 2 != 0 {
            Err(d)
        } else if mask & 4 != 0 {
            Err(io)
        } else if mask & 8 != 0 {
            Err(h)
        } else {
            Ok(7)
        };
        assert_eq!(precedence(errs, hook, 7), want, "mask {mask:04b}");
    }
}

#[test]
fn eof_clamp_arithmetic() {
    assert_eq!(transferred(Dir::Read, 0, 6, 8), 6);
    assert_eq!(transferred(Dir::Read, 4, 6, 8), 2);
    assert_eq!(transferred(Dir::Read, 0, 100, 8), 8);
    assert_eq!(transferred(Dir::Read, 10, 6, 8), 0); // offset beyond EOF: saturates
    assert_eq!(transferred(Dir::Read, 10, 6, 0), 0);
    assert_eq!(transferred(Dir::Read, u64::MAX - 1, 6, 8), 0);
    assert_eq!(transferred(Dir::Write, 0, 6, 8), 8); // writes are never clamped
}

#[test]
fn zero_length_and_read_at_eof_issue_nothing() {
    let _w = test_watchdog::arm(test_watchdog::UNIT);
    let (r, dio) = rig(vec![(4, Kind::Mapped); 2], 100, 1, RefCounting::Locked);
    assert_eq!(
        finish(dio.submit(
            DioRequest::new(Dir::Write, 0, 0, buf(&r, 8), Mode::Async),
            100,
            Completion::noop()
        )),
        "Done { result: Ok(0) }"
    );
    assert_eq!(
        finish(dio.submit(
            DioRequest::new(Dir::Read, 100, 8, buf(&r, 8), Mode::Async),
            100,
            Completion::noop()
        )),
        "Done { result: Ok(0) }"
    );
    assert_eq!(
        r.dev.core.calls.load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    assert!(lock(&r.hook.calls).is_empty());
}

/// A reserved state's user slot: the slotted completion of a queued request is lent the slot
/// of its own state, and what it leaves there is found by the next reservation (the pool's hot
/// slot gives the same state back); a reservation dropped unsubmitted goes back to the pool
/// with its slot; a request that finishes on the submitter's stack is lent no slot.
#[test]
fn the_user_slot_stays_with_its_pooled_state() {
    let _w = test_watchdog::arm(test_watchdog::UNIT);
    fn queued(r: DioResult, _b: TBuf, slot: Option<&mut Slot>) {
        assert_eq!(r, Ok(8));
        let s = slot.expect("a queued request's completion is lent its state's slot");
        assert!(s.is_none(), "the reservation took the slot");
        *s = Some(Box::new(41u32));
    }
    fn at_eof(r: DioResult, _b: TBuf, slot: Option<&mut Slot>) {
        assert_eq!(r, Ok(0));
        assert!(
            slot.is_none(),
            "finished on the submitter's stack: no state to lend"
        );
    }
    let kept = |s: Slot| s.and_then(|b| b.downcast::<u32>().ok()).map(|b| *b);
    for counting in [RefCounting::Locked, RefCounting::Atomic] {
        let (r, dio) = rig(vec![(4, Kind::Mapped); 4], 100, 4, counting);
        let ctx = IoCtx::new(dio, r.file.clone());
        let (res, slot) = ctx.core().reserve();
        assert_eq!(kept(slot), None, "a new state's slot is empty");
        let req = DioRequest::new(Dir::Read, 0, 8, buf(&r, 8), Mode::Async);
        let sub = ctx.submit_async_reserved(res, req, queued);
        assert_eq!(sub.map_err(|e| e.0), Ok(Submitted::Queued));
        drain(&r);
        let (res, slot) = ctx.core().reserve();
        assert_eq!(kept(slot), Some(41), "{counting:?}");
        res.release(Some(Box::new(42u32)));
        let (res, slot) = ctx.core().reserve();
        assert_eq!(kept(slot), Some(42), "{counting:?}");
        let req = DioRequest::new(Dir::Read, 100, 8, buf(&r, 8), Mode::Async);
        let sub = ctx.submit_async_reserved(res, req, at_eof);
        assert_eq!(sub.map_err(|e| e.0), Ok(Submitted::Completed));
    }
}

#[test]
fn invalid_requests_are_submission_errors() {
    let _w = test_watchdog::arm(test_watchdog::UNIT);
    let (r, dio) = rig(vec![(512, Kind::Mapped); 4], 4096, 512, RefCounting::Locked);
    let ctx = IoCtx::new(dio, r.file.clone());
    let called = Arc::new(Mutex::new(0));
    for (dir, off, len, blen) in [
        (Dir::Read, 100, 512, 512),               // misaligned offset
        (Dir::Read, 0, 100, 512),                 // misaligned read length
        (Dir::Write, 0, 1024, 512),               // longer than the buffer
        (Dir::Write, u64::MAX - 511, 1024, 1024), // overflow
    ] {
        let c = called.clone();
        let res = ctx.submit_async(
            DioRequest::new(dir, off, len, buf(&r, blen), Mode::Async),
            move |_, _| *lock(&c) += 1,
        );
        assert_eq!(res.err().map(|e| e.0), Some(DioError::Invalid));
    }
    assert_eq!(*lock(&called), 0);
    assert_eq!(
        r.dev.core.calls.load(std::sync::atomic::Ordering::SeqCst),
        0
    );
}

#[test]
fn unaligned_write_tail_goes_buffered() {
    let _w = test_watchdog::arm(test_watchdog::UNIT);
    for counting in [RefCounting::Locked, RefCounting::Atomic] {
        let (r, dio) = rig(vec![(4, Kind::Mapped); 4], 100, 4, counting);
        let ctx = IoCtx::new(dio, r.file.clone());
        let (res, _) = ctx.submit_sync(DioRequest::new(Dir::Write, 0, 10, buf(&r, 10), Mode::Sync));
        assert_eq!(res, Ok(10));
        assert_eq!(*lock(&r.file.0.buffered), vec![(8, 10)]);
        assert_eq!(
            r.dev
                .core
                .accepted
                .load(std::sync::atomic::Ordering::SeqCst),
            2
        );
    }
}

#[test]
fn extending_write_updates_size_before_callback() {
    let _w = test_watchdog::arm(test_watchdog::UNIT);
    let (r, dio) = rig(vec![(4, Kind::Mapped); 4], 2, 1, RefCounting::Locked);
    let ctx = IoCtx::new(dio, r.file.clone());
    let seen = Arc::new(Mutex::new(None));
    let (s, f) = (seen.clone(), r.file.clone());
    let res = ctx.submit_async_traced(
        DioRequest::new(Dir::Write, 0, 8, buf(&r, 8), Mode::Async),
        move |x, _| *lock(&s) = Some((x, f.0.size())),
    );
    assert_eq!(res.ok(), Some(Submitted::Completed));
    assert_eq!(*lock(&seen), Some((Ok(8), 8)));
}

struct Later(Mutex<Vec<Box<dyn FnOnce() + Send>>>);
impl Deferral for Later {
    fn defer(&self, job: Box<dyn FnOnce() + Send>) {
        lock(&self.0).push(job);
    }
}

#[test]
fn deferral_keeps_callbacks_off_the_submitter_stack() {
    let _w = test_watchdog::arm(test_watchdog::UNIT);
    for (dir, i_size) in [(Dir::Read, 100), (Dir::Write, 0)] {
        let (r, dio) = rig(vec![(4, Kind::Mapped); 2], i_size, 1, RefCounting::Locked);
        let later = Arc::new(Later(Mutex::new(vec![])));
        let ctx = IoCtx::new(dio.with_deferral(later.clone()), r.file.clone());
        let got: Arc<Mutex<Vec<DioResult>>> = Arc::new(Mutex::new(vec![]));
        let g = got.clone();
        ctx.submit_async(
            DioRequest::new(dir, 0, 8, buf(&r, 8), Mode::Async),
            move |x, _| lock(&g).push(x),
        )
        .map_err(|e| e.0)
        .unwrap();
        drain(&r);
        assert!(
            lock(&got).is_empty(),
            "a callback ran before the deferred job"
        );
        let jobs: Vec<_> = std::mem::take(&mut *lock(&later.0));
        assert_eq!(jobs.len(), 1);
        for j in jobs {
            j();
        }
        assert_eq!(*lock(&got), vec![Ok(8)]);
    }
}

/// A deferral hook that queues the typed handles (no box per completion).
struct Typed(Mutex<Vec<Deferred>>);
impl Deferral for Typed {
    fn defer(&self, _job: Box<dyn FnOnce() + Send>) {
        panic!("dio-core boxed a completion although defer_completion is implemented");
    }
    fn defer_completion(&self, job: Deferred) {
        lock(&self.0).push(job);
    }
}

#[test]
fn typed_deferral_runs_each_completion_once() {
    // A queued read (the last bio resolves it: end-io hook, then callback, both deferred) and
    // an extending write (finished synchronously; the upper layer defers the callback), three
    // rounds on one core so that deferred states are recycled and reused.
    let (r, dio) = rig(vec![(4, Kind::Mapped); 64], 100, 1, RefCounting::Locked);
    let typed = Arc::new(Typed(Mutex::new(vec![])));
    let ctx = IoCtx::new(dio.with_deferral(typed.clone()), r.file.clone());
    for round in 0..3u64 {
        for (dir, offset) in [(Dir::Read, 0), (Dir::Write, 96 + 8 * round)] {
            let got: Arc<Mutex<Vec<DioResult>>> = Arc::new(Mutex::new(vec![]));
            let g = got.clone();
            let probe = Probe::new();
            let b = TBuf {
                len: 8,
                fault_at: None,
                probe: probe.clone(),
            };
            ctx.submit_async(
                DioRequest::new(dir, offset, 8, b, Mode::Async),
                move |x, _| {
                    probe.hand_back();
                    lock(&g).push(x)
                },
            )
            .map_err(|e| e.0)
            .unwrap();
            drain(&r);
            assert!(
                lock(&got).is_empty(),
                "a callback ran before its deferred job"
            );
            let jobs: Vec<_> = std::mem::take(&mut *lock(&typed.0));
            assert_eq!(jobs.len(), 1);
            for j in jobs {
                j.run();
            }
            assert_eq!(*lock(&got), vec![Ok(8)], "{dir:?} in round {round}");
        }
    }
    assert_eq!(lock(&r.hook.calls).len(), 6);
    assert_eq!(r.file.0.size(), 96 + 8 * 3);
}

#[test]
fn recycled_state_starts_clean() {
    // One core, requests one after another: the second and third reuse the first one's state
    // (polling in place, nobody else holds it). The first one's device error must not leak.
    for counting in [RefCounting::Locked, RefCounting::Atomic] {
        let probe = Probe::new();
        let fail = Err(DeviceStatus::new(0, 5));
        let core = Arc::new(DevCore::new(vec![], vec![fail], probe.clone()));
        let dev = Arc::new(QueueDev::new(core, 64));
        let cfg = Config {
            align: 4,
            wait: Wait::PollInPlace(dev.clone()),
            refcount: counting,
            pool: 1,
            ..Config::default()
        };
        let exts = vec![(4, Kind::Mapped); 4];
        let dio = DioCore::new(dev.clone(), Arc::new(LayoutMapper { base: 0, exts }), cfg);
        let ctx = IoCtx::new(dio, TFile::shared(100, probe.clone()));
        let mut results = vec![];
        for _ in 0..3 {
            let b = TBuf {
                len: 8,
                fault_at: None,
                probe: Probe::new(),
            };
            results.push(
                ctx.submit_sync(DioRequest::new(Dir::Read, 0, 8, b, Mode::Sync))
                    .0,
            );
        }
        let io5 = Err(DioError::Io(DeviceStatus::new(0, 5)));
        assert_eq!(results, vec![io5, Ok(8), Ok(8)], "{counting:?}");
    }
}

#[test]
fn submission_error_through_callback_option() {
    let _w = test_watchdog::arm(test_watchdog::UNIT);
    let (r, dio) = rig(
        vec![(4, Kind::Mapped), (4, Kind::MapErr(DioError::Fault))],
        100,
        1,
        RefCounting::Locked,
    );
    let ctx = IoCtx::new(dio, r.file.clone()).with_delivery(SubmitErrorDelivery::Callback);
    let got = Arc::new(Mutex::new(vec![]));
    let g = got.clone();
    let res = ctx.submit_async(
        DioRequest::new(Dir::Read, 0, 8, buf(&r, 8), Mode::Async),
        move |x, _| lock(&g).push(x),
    );
    assert!(res.is_ok());
    assert_eq!(*lock(&got), vec![Err(DioError::Fault)]);
}

#[test]
fn buffered_failure_keeps_direct_bytes() {
    let _w = test_watchdog::arm(test_watchdog::UNIT);
    let probe = Probe::new();
    let core = Arc::new(DevCore::new(vec![], vec![], probe.clone()));
    let dev = Arc::new(QueueDev::new(core, 64));
    let cfg = Config {
        align: 1,
        wait: Wait::PollInPlace(dev.clone()),
        ..Config::default()
    };
    let exts = vec![(4, Kind::Mapped), (4, Kind::NeedBuffered)];
    let file = FileRef(Arc::new(TFile {
        size: Mutex::new(100),
        buffered: Mutex::new(vec![]),
        fail_buffered: true,
        probe: probe.clone(),
    }));
    let ctx = IoCtx::new(
        DioCore::new(dev, Arc::new(LayoutMapper { base: 0, exts }), cfg),
        file,
    );
    let b = TBuf {
        len: 8,
        fault_at: None,
        probe: probe.clone(),
    };
    assert_eq!(
        ctx.submit_sync(DioRequest::new(Dir::Write, 0, 8, b, Mode::Sync))
            .0,
        Ok(4)
    );
    let exts = vec![(4, Kind::NeedBuffered)];
    let core = Arc::new(DevCore::new(vec![], vec![], probe.clone()));
    let dev = Arc::new(QueueDev::new(core, 64));
    let cfg = Config {
        align: 1,
        wait: Wait::PollInPlace(dev.clone()),
        ..Config::default()
    };
    let file = FileRef(Arc::new(TFile {
        size: Mutex::new(100),
        buffered: Mutex::new(vec![]),
        fail_buffered: true,
        probe: probe.clone(),
    }));
    let ctx = IoCtx::new(
        DioCore::new(dev, Arc::new(LayoutMapper { base: 0, exts }), cfg),
        file,
    );
    let b = TBuf {
        len: 8,
        fault_at: None,
        probe,
    };
    assert_eq!(
        ctx.submit_sync(DioRequest::new(Dir::Write, 0, 8, b, Mode::Sync))
            .0,
        Err(DioError::Fault)
    );
}

#[test]
#[cfg(debug_assertions)]
#[should_panic(expected = "dropped without being run or discarded")]
fn lost_completion_is_caught() {
    let c: Completion<u8> = Completion::new(|_, _| {});
    drop(c);
}

#[test]
fn error_messages() {
    assert_eq!(
        DioError::Fault.to_string(),
        "buffer segment cannot be mapped for DMA"
    );
    assert_eq!(
        DioError::Io(DeviceStatus {
            sct: 0,
            sc: 0x81,
            lba: Some(42)
        })
        .to_string(),
        "device error: status code type 0x0, status code 0x81, first failing LBA 42"
    );
    assert!(DioError::QueueFull.is_submission_class());
    assert!(!DioError::EndIo(1).is_submission_class());
}
