//! Property tests (dio-core/DESIGN.md §5.3): random layouts, statuses, EOF positions, tails and
//! completion orders, against an oracle of the walk. One real poller thread completes the
//! accepted bios in a generated permutation; the submitter waits by polling in place (its
//! `poll_once` only signals the poller), so the poller sees every bio issued so far.
//!
//! `PROPTEST_CASES` overrides the default budget of 2000 cases.
#![cfg(not(loom))]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::*;
use dio_core::sync::Mutex;
use dio_core::{
    Bio, BioSink, Config, DeviceStatus, DioCore, DioError, DioRequest, DioResult, Dir, IoCtx, Mode,
    Poller, QueueFullPolicy, RefCounting, Rejected, Submitted, Wait,
};
use proptest::prelude::*;

/// Completes pending bios in a seeded random order, one per signal, or all once the
/// submitter has returned.
struct PermDev {
    core: Arc<DevCore>,
    pending: Mutex<Vec<(Bio<TBuf>, Status)>>,
    kick: AtomicBool,
    returned: AtomicBool,
    rng: Mutex<u64>,
}

impl PermDev {
    fn next(&self) -> usize {
        let mut s = lock(&self.rng);
        *s ^= *s << 13;
        *s ^= *s >> 7;
        *s ^= *s << 17;
        (*s >> 11) as usize
    }
    fn run(&self) {
        loop {
            let returned = self.returned.load(Ordering::SeqCst);
            if returned || self.kick.swap(false, Ordering::SeqCst) {
                let picked = {
                    let mut p = lock(&self.pending);
                    if p.is_empty() {
                        None
                    } else {
                        let i = self.next() % p.len();
                        Some(p.swap_remove(i))
                    }
                };
                match picked {
                    Some((bio, st)) => self.core_end(bio, st),
                    None if returned => break,
                    None => std::thread::yield_now(),
                }
            } else {
                std::thread::yield_now();
            }
        }
    }
    fn core_end(&self, bio: Bio<TBuf>, st: Status) {
        lock(&self.core.completed).push(st);
        self.core.probe.in_flight.fetch_sub(1, Ordering::SeqCst);
        bio.complete(st);
    }
}

impl BioSink<TBuf> for PermDev {
    fn submit(&self, bio: Bio<TBuf>) -> Result<(), Rejected<TBuf>> {
        let call = self.core.calls.fetch_add(1, Ordering::SeqCst);
        if self.core.qfull_calls.contains(&call) {
            return Err(Rejected {
                bio,
                why: DioError::QueueFull,
            });
        }
        let k = self.core.accepted.fetch_add(1, Ordering::SeqCst);
        self.core.probe.in_flight.fetch_add(1, Ordering::SeqCst);
        let st = self.core.statuses.get(k).copied().unwrap_or(Ok(()));
        lock(&self.pending).push((bio, st));
        Ok(())
    }
}

impl Poller for PermDev {
    fn poll_once(&self) {
        self.kick.store(true, Ordering::SeqCst);
        std::thread::yield_now();
    }
}

/// Block size: EOF and write tails fall inside blocks.
const ALIGN: u64 = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tail {
    None,
    MapFault,
    DmaFault,
    NeedBuffered,
    Hole,
}

#[derive(Clone, Debug)]
struct Case {
    dir: Dir,
    mode: Mode,
    sync_api: bool,
    offset: u64,
    i_size: u64,
    bios: Vec<(u64, Status)>,
    tail: Tail,
    tail_len: u64,
    /// Unaligned bytes at the end of a write (they go through the buffered path).
    odd: u64,
    qfull: Option<usize>,
    policy: QueueFullPolicy,
    counting: RefCounting,
    hook_fail: bool,
    fail_buffered: bool,
    seed: u64,
}

fn status() -> impl Strategy<Value = Status> {
    prop_oneof![3 => Just(Ok(())), 1 => (1u8..4).prop_map(|sc| Err(DeviceStatus::new(0, sc)))]
}

fn case() -> impl Strategy<Value = Case> {
    (
        (
            prop_oneof![Just(Dir::Read), Just(Dir::Write)],
            any::<bool>(),
            any::<bool>(),
        ),
        (0u64..64, 0u64..512, 0u64..ALIGN),
        prop::collection::vec((1u64..16, status()), 1..=5),
        (0usize..5, 1u64..16),
        (
            prop::option::weighted(0.2, 0usize..5),
            any::<bool>(),
            any::<bool>(),
        ),
        (
            prop::bool::weighted(0.1),
            prop::bool::weighted(0.1),
            any::<u64>(),
        ),
    )
        .prop_map(
            |(
                (dir, async_, sync_api),
                (offset, i_size, odd),
                bios,
                (tail, tail_len),
                (qfull, throttle, atomic),
                (hook_fail, fail_buffered, seed),
            )| {
                let tail = match (tail, dir) {
                    (0, _) => Tail::None,
                    (1, _) => Tail::MapFault,
                    (2, _) => Tail::DmaFault,
                    (_, Dir::Write) => Tail::NeedBuffered,
                    (_, Dir::Read) => Tail::Hole,
                };
                let qfull = qfull.map(|q| q % bios.len());
                Case {
                    dir,
                    mode: if async_ { Mode::Async } else { Mode::Sync },
                    sync_api,
                    offset: offset * ALIGN,
                    i_size,
                    bios: bios.into_iter().map(|(l, st)| (l * ALIGN, st)).collect(),
                    tail,
                    tail_len: tail_len * ALIGN,
                    odd: if dir == Dir::Write { odd } else { 0 },
                    qfull,
                    policy: if throttle {
                        QueueFullPolicy::Throttle
                    } else {
                        QueueFullPolicy::Error
                    },
                    counting: if atomic {
                        RefCounting::Atomic
                    } else {
                        RefCounting::Locked
                    },
                    hook_fail,
                    fail_buffered,
                    seed: seed | 1,
                }
            },
        )
}

impl Case {
    fn len(&self) -> u64 {
        let tail = if self.tail == Tail::None {
            0
        } else {
            self.tail_len
        };
        self.bios.iter().map(|b| b.0).sum::<u64>() + tail + self.odd
    }
}

/// What the walk must do, computed independently of dio-core.
#[derive(Debug)]
struct Oracle {
    handled: u64,
    submit_err: Option<DioError>,
    deferred_err: Option<DioError>,
    trivial: bool,
}

fn oracle(c: &Case) -> Oracle {
    let (offset, len) = (c.offset, c.len());
    let end = offset + len;
    if c.dir == Dir::Read && offset >= c.i_size {
        return Oracle {
            handled: 0,
            submit_err: None,
            deferred_err: None,
            trivial: true,
        };
    }
    let walk_end = if c.dir == Dir::Read {
        end.min(c.i_size)
    } else {
        end
    };
    let (mut pos, mut calls, mut accepted, mut handled) = (offset, 0usize, 0usize, 0u64);
    let (mut submit_err, mut deferred_err) = (None, None);
    for &(l, _) in &c.bios {
        if pos >= walk_end {
            break;
        }
        let n = l.min(walk_end - pos);
        if c.qfull == Some(calls) {
            calls += 1;
            if !(c.policy == QueueFullPolicy::Throttle && accepted > 0) {
                submit_err = Some(DioError::QueueFull);
                break;
            }
        }
        calls += 1;
        accepted += 1;
        handled += n;
        pos += n;
    }
    if submit_err.is_none() && pos < walk_end {
        match c.tail {
            Tail::MapFault => submit_err = Some(DioError::Fault),
            Tail::DmaFault if c.dir == Dir::Write && pos >= c.i_size => {
                deferred_err = Some(DioError::Fault)
            }
            Tail::DmaFault => submit_err = Some(DioError::Fault),
            Tail::Hole => handled += c.tail_len.min(walk_end - pos),
            Tail::NeedBuffered | Tail::None => {}
        }
    }
    Oracle {
        handled,
        submit_err,
        deferred_err,
        trivial: false,
    }
}

fn check(c: &Case) -> Result<(), TestCaseError> {
    let len = c.len();
    let probe = Probe::new();
    let file = FileRef(Arc::new(TFile {
        size: Mutex::new(c.i_size),
        buffered: Mutex::new(vec![]),
        fail_buffered: c.fail_buffered,
        probe: probe.clone(),
    }));
    let statuses = c.bios.iter().map(|b| b.1).collect();
    let core = Arc::new(DevCore::new(
        c.qfull.into_iter().collect(),
        statuses,
        probe.clone(),
    ));
    let dev = Arc::new(PermDev {
        core: core.clone(),
        pending: Mutex::new(vec![]),
        kick: AtomicBool::new(false),
        returned: AtomicBool::new(false),
        rng: Mutex::new(c.seed),
    });
    let mut exts: Vec<(u64, Kind)> = c.bios.iter().map(|b| (b.0, Kind::Mapped)).collect();
    let mut fault_at = None;
    match c.tail {
        Tail::None => {}
        Tail::MapFault => exts.push((c.tail_len, Kind::MapErr(DioError::Fault))),
        Tail::DmaFault => {
            fault_at = Some(len - c.odd - c.tail_len);
            exts.push((c.tail_len, Kind::Mapped));
        }
        Tail::NeedBuffered => exts.push((c.tail_len, Kind::NeedBuffered)),
        Tail::Hole => exts.push((c.tail_len, Kind::Hole)),
    }
    let mapper = Arc::new(LayoutMapper {
        base: c.offset,
        exts,
    });
    let hook = Arc::new(Hook {
        calls: Mutex::new(vec![]),
        fail: c.hook_fail.then_some(9),
    });
    let cfg = Config {
        align: ALIGN,
        queue_full: c.policy,
        wait: Wait::PollInPlace(dev.clone()),
        refcount: c.counting,
        ..Config::default()
    };
    let ctx = IoCtx::new(
        DioCore::new(dev.clone(), mapper, cfg).with_end_io(hook.clone()),
        file.clone(),
    );
    let poller = {
        let d = dev.clone();
        std::thread::spawn(move || d.run())
    };
    let buf = TBuf {
        len,
        fault_at,
        probe: probe.clone(),
    };
    let req = DioRequest::new(c.dir, c.offset, len, buf, c.mode);
    let seen: Arc<Mutex<Vec<(DioResult, u64)>>> = Arc::new(Mutex::new(vec![]));
    let (api, sync_res) = if c.sync_api {
        let (r, _) = ctx.submit_sync(req);
        (Ok(Submitted::Completed), Some(r))
    } else {
        let (s, f) = (seen.clone(), file.clone());
        let api = ctx.submit_async_traced(req, move |r, _| lock(&s).push((r, f.0.size())));
        (api.map_err(|(e, _)| e), None)
    };
    dev.returned.store(true, Ordering::SeqCst);
    poller.join().unwrap();

    let seen = lock(&seen).clone();
    let completed = lock(&core.completed).clone();
    let buffered = lock(&file.0.buffered).clone();
    let hook_calls = lock(&hook.calls).clone();
    let o = oracle(c);

    // P-ONCE
    prop_assert_eq!(
        seen.len(),
        usize::from(!c.sync_api && api.is_ok()),
        "callbacks {:?} api {:?}",
        seen,
        api
    );
    // P-Q
    let extending = c.dir == Dir::Write && c.offset + len > c.i_size;
    if api == Ok(Submitted::Queued) {
        prop_assert!(c.mode == Mode::Async && !c.sync_api && !extending);
    }
    let got = match (sync_res, api) {
        (Some(r), _) => r,
        (None, Err(e)) => Err(e),
        (None, Ok(_)) => seen[0].0,
    };
    // Expected result by precedence (P-SUB, P-ERR, P-EOF, P-FB).
    let io = completed.iter().find_map(|s| s.err()).map(DioError::Io);
    let pre = o.submit_err.or(o.deferred_err);
    let clamp = |h: u64| {
        if c.dir == Dir::Read {
            h.min(c.i_size.saturating_sub(c.offset))
        } else {
            h
        }
    };
    let mut want_buffered = vec![];
    let want: DioResult = if o.trivial {
        Ok(0)
    } else if let Some(e) = pre {
        if !c.sync_api {
            prop_assert_eq!(
                api,
                Err(e),
                "submission error must be returned, not called back"
            );
        }
        Err(e)
    } else if let Some(e) = io {
        Err(e)
    } else if c.hook_fail && o.handled > 0 {
        Err(DioError::EndIo(9))
    } else if c.dir == Dir::Write && o.handled < len {
        want_buffered.push((c.offset + o.handled, c.offset + len));
        if c.fail_buffered {
            want_buffered.clear();
            if o.handled > 0 {
                Ok(o.handled)
            } else {
                Err(DioError::Fault)
            }
        } else {
            Ok(len)
        }
    } else {
        Ok(clamp(o.handled))
    };
    prop_assert_eq!(got, want, "oracle {:?} completions {:?}", o, completed);
    prop_assert_eq!(&buffered, &want_buffered, "buffered ranges");
    // I-EI-1: the hook runs once iff bytes were handled, with the clamped count.
    if o.handled > 0 {
        prop_assert_eq!(hook_calls, vec![(c.offset, clamp(o.handled), pre.or(io))]);
    } else {
        prop_assert!(hook_calls.is_empty());
    }
    // P-SZ
    if c.dir == Dir::Write {
        if let Ok(n) = got {
            let size = seen.first().map(|s| s.1).unwrap_or_else(|| file.0.size());
            prop_assert!(
                size >= c.offset + n,
                "size {} at completion < {}",
                size,
                c.offset + n
            );
        }
    }
    prop_assert_eq!(probe.in_flight.load(Ordering::SeqCst), 0);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2000),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_requests(c in case()) {
        // One guard per case: a case that loses a completion fails within the bound.
        let _w = test_watchdog::arm(test_watchdog::UNIT);
        check(&c)?;
    }
}
