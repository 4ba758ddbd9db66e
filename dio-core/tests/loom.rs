//! Loom model checking of scenarios L1–L13 (dio-core/DESIGN.md §5.2), for both reference-counting
//! implementations and, where it applies, both wait strategies.
//!
//! `RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=3 cargo test -p dio-core --release --test loom`
#![cfg(loom)]

mod common;

use std::sync::Arc;

use common::*;
use dio_core::sync::{Mutex, Ordering, thread};
use dio_core::{
    Config, DeviceStatus, DioCore, DioError, DioRequest, DioResult, Dir, IoCtx, Mode,
    QueueFullPolicy, RefCounting, SubmitErrorDelivery, Submitted, Wait,
};

const VARIANTS: [RefCounting; 2] = [RefCounting::Locked, RefCounting::Atomic];

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    if b.preemption_bound.is_none() {
        b.preemption_bound = Some(3);
    }
    b.check(f);
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Dev {
    /// One thread per bio, submitter parks.
    Spawn,
    /// One poller thread; the submitter parks or polls in place.
    Queue {
        max_in_flight: usize,
        poll_in_place: bool,
    },
}

#[derive(Clone)]
struct Scn {
    dir: Dir,
    mode: Mode,
    sync_api: bool,
    offset: u64,
    len: u64,
    i_size: u64,
    layout: Vec<(u64, Kind)>,
    statuses: Vec<Status>,
    qfull_calls: Vec<usize>,
    fault_at: Option<u64>,
    policy: QueueFullPolicy,
    delivery: SubmitErrorDelivery,
    hook_fail: Option<i32>,
    dev: Dev,
    counting: RefCounting,
    align: u64,
}

fn scn(dir: Dir, mode: Mode, len: u64, i_size: u64, layout: Vec<(u64, Kind)>) -> Scn {
    Scn {
        dir,
        mode,
        sync_api: false,
        offset: 0,
        len,
        i_size,
        layout,
        statuses: vec![],
        qfull_calls: vec![],
        fault_at: None,
        policy: QueueFullPolicy::Throttle,
        delivery: SubmitErrorDelivery::Return,
        hook_fail: None,
        dev: Dev::Spawn,
        counting: RefCounting::Locked,
        align: 4,
    }
}

fn m4(n: usize) -> Vec<(u64, Kind)> {
    vec![(4, Kind::Mapped); n]
}

#[derive(Debug)]
struct Report {
    /// `submit_async` (traced) or, for the sync API, `Ok(Completed)`.
    api: Result<Submitted, DioError>,
    /// The sync API's value.
    sync_result: Option<DioResult>,
    /// `(result, file size seen)` per callback run.
    completions: Vec<(DioResult, u64)>,
    buffered: Vec<(u64, u64)>,
    hook_calls: Vec<(u64, u64, Option<DioError>)>,
}

impl Report {
    /// The single result the user saw.
    fn result(&self) -> DioResult {
        if let Some(r) = self.sync_result {
            return r;
        }
        match self.api {
            Err(e) => Err(e),
            Ok(_) => self.completions[0].0,
        }
    }
}

/// Run one scenario inside a loom execution and check the invariants every scenario shares.
fn run(s: &Scn) -> Report {
    let probe = Probe::new();
    let file = TFile::shared(s.i_size, probe.clone());
    let core = Arc::new(DevCore::new(
        s.qfull_calls.clone(),
        s.statuses.clone(),
        probe.clone(),
    ));
    let mapper = Arc::new(LayoutMapper {
        base: s.offset,
        exts: s.layout.clone(),
    });
    let hook = Arc::new(Hook {
        calls: Mutex::new(vec![]),
        fail: s.hook_fail,
    });
    let mut cfg = Config {
        align: s.align,
        queue_full: s.policy,
        refcount: s.counting,
        ..Config::default()
    };
    let (spawn, queue) = match s.dev {
        Dev::Spawn => (
            Some(Arc::new(SpawnDev {
                core: core.clone(),
                handles: Mutex::new(vec![]),
            })),
            None,
        ),
        Dev::Queue { max_in_flight, .. } => (
            None,
            Some(Arc::new(QueueDev::new(core.clone(), max_in_flight))),
        ),
    };
    let sink: Arc<dyn dio_core::BioSink<TBuf>> = match (&spawn, &queue) {
        (Some(d), _) => d.clone(),
        (_, Some(q)) => q.clone(),
        _ => unreachable!(),
    };
    if let (
        Dev::Queue {
            poll_in_place: true,
            ..
        },
        Some(q),
    ) = (s.dev, &queue)
    {
        cfg.wait = Wait::PollInPlace(q.clone());
    }
    let poller = queue.as_ref().map(|q| {
        let q = q.clone();
        thread::spawn(move || q.run())
    });
    let dio = DioCore::new(sink, mapper, cfg).with_end_io(hook.clone());
    let ctx = IoCtx::new(dio, file.clone()).with_delivery(s.delivery);
    let buf = TBuf {
        len: s.len,
        fault_at: s.fault_at,
        probe: probe.clone(),
    };
    let req = DioRequest::new(s.dir, s.offset, s.len, buf, s.mode);
    let completions: Arc<Mutex<Vec<(DioResult, u64)>>> = Arc::new(Mutex::new(vec![]));

    let (api, sync_result) = if s.sync_api {
        let (r, _buf) = ctx.submit_sync(req);
        probe.hand_back();
        (Ok(Submitted::Completed), Some(r))
    } else {
        let (c, f, p) = (completions.clone(), file.clone(), probe.clone());
        let api = ctx.submit_async_traced(req, move |res, _buf| {
            p.hand_back();
            lock(&c).push((res, f.0.size()));
        });
        if api.is_err() {
            probe.hand_back();
        }
        (api.map_err(|(e, _)| e), None)
    };
    if let Some(q) = &queue {
        q.stop.store(true, Ordering::SeqCst);
    }
    if let Some(d) = &spawn {
        d.join_all();
    }
    if let Some(p) = poller {
        p.join().unwrap();
    }
    let completions = std::mem::take(&mut *lock(&completions));
    let report = Report {
        api,
        sync_result,
        completions,
        buffered: std::mem::take(&mut *lock(&file.0.buffered)),
        hook_calls: std::mem::take(&mut *lock(&hook.calls)),
    };

    // I-CB-1/3: exactly one callback iff Ok, none for the sync API.
    let expected = usize::from(!s.sync_api && report.api.is_ok());
    assert_eq!(
        report.completions.len(),
        expected,
        "callback count: {report:?}"
    );
    // I-CB-4 / I-SZ-3: Queued only for async, non-extending requests.
    let extending = s.dir == Dir::Write && s.offset + s.len > s.i_size;
    if report.api == Ok(Submitted::Queued) {
        assert!(
            s.mode == Mode::Async && !extending,
            "Queued for a sync or extending request"
        );
    }
    // I-SZ-1: the size seen by a write's completion covers it.
    if s.dir == Dir::Write {
        for &(res, size) in &report.completions {
            if let Ok(n) = res {
                assert!(
                    size >= s.offset + n,
                    "completion saw size {size} < {}",
                    s.offset + n
                );
            }
        }
    }
    // I-EI-1: the hook runs at most once.
    assert!(report.hook_calls.len() <= 1, "end-io hook ran twice");
    // Nothing left in flight.
    assert_eq!(probe.in_flight.load(Ordering::SeqCst), 0);
    report
}

fn each(base: Scn, check: impl Fn(&Report) + Sync + Send + Clone + 'static) {
    for counting in VARIANTS {
        let mut s = base.clone();
        s.counting = counting;
        let c = check.clone();
        model(move || c(&run(&s)));
    }
}

fn st(sc: u8) -> Status {
    Err(DeviceStatus::new(0, sc))
}

#[test]
fn l1_async_read_two_bios() {
    each(scn(Dir::Read, Mode::Async, 8, 100, m4(2)), |r| {
        assert_eq!(r.result(), Ok(8));
        assert_eq!(r.hook_calls, vec![(0, 8, None)]);
    });
}

#[test]
fn l2_async_read_three_bios() {
    each(scn(Dir::Read, Mode::Async, 12, 100, m4(3)), |r| {
        assert_eq!(r.result(), Ok(12))
    });
}

#[test]
fn l3_async_read_both_fail() {
    let mut s = scn(Dir::Read, Mode::Async, 8, 100, m4(2));
    s.statuses = vec![st(5), st(7)];
    each(s, |r| {
        let res = r.result();
        assert!(
            res == Err(DioError::Io(DeviceStatus::new(0, 5)))
                || res == Err(DioError::Io(DeviceStatus::new(0, 7))),
            "{res:?}"
        );
    });
}

#[test]
fn l4_sync_write_two_bios() {
    let mut s = scn(Dir::Write, Mode::Sync, 8, 100, m4(2));
    s.sync_api = true;
    each(s, |r| {
        assert_eq!(r.result(), Ok(8));
        assert!(r.completions.is_empty());
    });
}

#[test]
fn l5_async_read_then_dma_fault() {
    let mut s = scn(Dir::Read, Mode::Async, 12, 100, m4(3));
    s.fault_at = Some(8);
    each(s, |r| {
        assert_eq!(r.api, Err(DioError::Fault));
        assert!(r.completions.is_empty());
    });
}

#[test]
fn l6_queue_full_nothing_in_flight() {
    let mut s = scn(Dir::Write, Mode::Async, 8, 100, m4(2));
    s.qfull_calls = vec![0];
    each(s, |r| {
        assert_eq!(r.api, Err(DioError::QueueFull));
        assert!(r.completions.is_empty());
    });
}

#[test]
fn l6b_queue_full_policy_error_on_second() {
    let mut s = scn(Dir::Write, Mode::Async, 8, 100, m4(2));
    s.qfull_calls = vec![1];
    s.policy = QueueFullPolicy::Error;
    each(s, |r| {
        assert_eq!(r.api, Err(DioError::QueueFull));
        assert!(r.completions.is_empty());
    });
}

#[test]
fn l7_async_extending_write_then_fault() {
    // [0,4) inside the file, [4,8) allocated by this write but not DMA-able: zeroes are
    // written there and the request fails with the deferred error.
    let mut s = scn(Dir::Write, Mode::Async, 8, 4, m4(2));
    s.fault_at = Some(4);
    each(s.clone(), |r| {
        assert_eq!(r.api, Err(DioError::Fault));
        assert!(r.completions.is_empty());
    });
    s.delivery = SubmitErrorDelivery::Callback;
    each(s, |r| {
        assert_eq!(r.api, Ok(Submitted::Completed));
        assert_eq!(r.completions.len(), 1);
        assert_eq!(r.result(), Err(DioError::Fault));
    });
}

#[test]
fn l8_async_extending_write() {
    each(scn(Dir::Write, Mode::Async, 8, 0, m4(2)), |r| {
        assert_eq!(
            r.api,
            Ok(Submitted::Completed),
            "an extending write was queued"
        );
        assert_eq!(r.completions, vec![(Ok(8), 8)]);
    });
}

#[test]
fn l9_async_write_fallback() {
    let mut layout = m4(2);
    layout.push((4, Kind::NeedBuffered));
    each(scn(Dir::Write, Mode::Async, 12, 100, layout), |r| {
        assert_eq!(r.result(), Ok(12));
        assert_eq!(r.buffered, vec![(8, 12)]);
        assert_eq!(r.hook_calls, vec![(0, 8, None)]);
    });
}

#[test]
fn l10_async_read_crossing_eof() {
    each(scn(Dir::Read, Mode::Async, 8, 6, m4(2)), |r| {
        assert_eq!(r.result(), Ok(6));
        assert_eq!(r.hook_calls, vec![(0, 6, None)]);
    });
}

#[test]
fn l11_poll_in_place_sync_write() {
    let mut s = scn(Dir::Write, Mode::Sync, 8, 100, m4(2));
    s.sync_api = true;
    s.dev = Dev::Queue {
        max_in_flight: 8,
        poll_in_place: true,
    };
    each(s, |r| assert_eq!(r.result(), Ok(8)));
}

#[test]
fn l11b_poll_in_place_async_read() {
    let mut s = scn(Dir::Read, Mode::Async, 8, 100, m4(2));
    s.dev = Dev::Queue {
        max_in_flight: 8,
        poll_in_place: true,
    };
    each(s, |r| assert_eq!(r.result(), Ok(8)));
}

#[test]
fn l12_throttle_park() {
    let mut s = scn(Dir::Write, Mode::Async, 12, 100, m4(3));
    s.dev = Dev::Queue {
        max_in_flight: 1,
        poll_in_place: false,
    };
    each(s, |r| assert_eq!(r.result(), Ok(12)));
}

#[test]
fn l12b_throttle_poll_in_place() {
    let mut s = scn(Dir::Write, Mode::Async, 12, 100, m4(3));
    s.dev = Dev::Queue {
        max_in_flight: 1,
        poll_in_place: true,
    };
    each(s, |r| assert_eq!(r.result(), Ok(12)));
}

#[test]
fn l13_end_io_error_on_queued_read() {
    let mut s = scn(Dir::Read, Mode::Async, 8, 100, m4(2));
    s.hook_fail = Some(9);
    each(s, |r| {
        assert_eq!(r.result(), Err(DioError::EndIo(9)));
        assert_eq!(r.hook_calls, vec![(0, 8, None)]);
    });
}

/// L14: a core reuses request states. An async read whose bio fails, then a sync read on the
/// same core while the first request's completer may still be running: the second request
/// gets a recycled state only once nobody else holds it, and nothing of the first request
/// (its error, its references, its poison flag) leaks into it.
#[test]
fn l14_pooled_state_reuse() {
    for counting in VARIANTS {
        model(move || {
            let (p1, p2) = (Probe::new(), Probe::new());
            let dev = Arc::new(DevCore::new(vec![], vec![st(5)], p1.clone()));
            let spawn = Arc::new(SpawnDev {
                core: dev,
                handles: Mutex::new(vec![]),
            });
            let cfg = Config {
                align: 4,
                refcount: counting,
                ..Config::default()
            };
            let mapper = Arc::new(LayoutMapper {
                base: 0,
                exts: m4(2),
            });
            let file = TFile::shared(100, p1.clone());
            let ctx = IoCtx::new(DioCore::new(spawn.clone(), mapper, cfg), file);
            let tbuf = |probe: &Arc<Probe>| TBuf {
                len: 4,
                fault_at: None,
                probe: probe.clone(),
            };
            let first: Arc<Mutex<Vec<DioResult>>> = Arc::new(Mutex::new(vec![]));
            let (f, p) = (first.clone(), p1.clone());
            let req = DioRequest::new(Dir::Read, 0, 4, tbuf(&p1), Mode::Async);
            let api = ctx.submit_async(req, move |res, _buf| {
                p.hand_back();
                lock(&f).push(res);
            });
            assert!(api.is_ok());
            let req = DioRequest::new(Dir::Read, 4, 4, tbuf(&p2), Mode::Sync);
            let (res, _buf) = ctx.submit_sync(req);
            p2.hand_back();
            assert_eq!(
                res,
                Ok(4),
                "the second request inherited the first one's state"
            );
            spawn.join_all();
            assert_eq!(
                *lock(&first),
                vec![Err(DioError::Io(DeviceStatus::new(0, 5)))]
            );
        });
    }
}
