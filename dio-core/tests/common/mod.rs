//! Test doubles shared by the loom and property tests. They use `dio_core::sync`, so they are
//! loom types under `--cfg loom` and std types otherwise.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::sync::Arc;

use dio_core::sync::{AtomicBool, AtomicUsize, Mutex, Ordering, thread};
use dio_core::{
    Bio, BioSink, DeviceStatus, DioError, DioResult, Dir, DmaSegment, EndIo, Extent, File, IoBuf,
    Mapper, Poller, Rejected,
};

pub type Status = Result<(), DeviceStatus>;

pub fn lock<T>(m: &Mutex<T>) -> dio_core::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Observations shared by the buffer, the device and the file.
pub struct Probe {
    /// The buffer was handed back to the user (completion ran or outcome returned).
    pub returned: AtomicBool,
    /// Direct bios accepted by the device and not yet ended.
    pub in_flight: AtomicUsize,
    /// Bytes zero-filled in the buffer (read holes).
    pub zeroed: Mutex<Vec<(u64, u64)>>,
}

impl Probe {
    pub fn new() -> Arc<Self> {
        Arc::new(Probe {
            returned: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            zeroed: Mutex::new(Vec::new()),
        })
    }
    pub fn hand_back(&self) {
        assert!(
            !self.returned.swap(true, Ordering::SeqCst),
            "buffer handed back twice"
        );
    }
}

/// The user buffer. `Clone` only so that mutants can reintroduce double completions.
#[derive(Clone)]
pub struct TBuf {
    pub len: u64,
    /// Buffer offset whose segment cannot be DMA-mapped.
    pub fault_at: Option<u64>,
    pub probe: Arc<Probe>,
}

pub struct TSeg {
    probe: Arc<Probe>,
}

impl DmaSegment for TSeg {
    fn unmap(self) {
        assert!(
            !self.probe.returned.load(Ordering::SeqCst),
            "per-bio cleanup touched a buffer already handed back (I-LT-4)"
        );
    }
}

impl IoBuf for TBuf {
    type Seg = TSeg;
    fn len(&self) -> u64 {
        self.len
    }
    fn dma_map(&self, off: u64, len: u64, _dir: Dir) -> Result<TSeg, DioError> {
        match self.fault_at {
            Some(f) if (off..off + len).contains(&f) => Err(DioError::Fault),
            _ => Ok(TSeg {
                probe: self.probe.clone(),
            }),
        }
    }
    fn zero_fill(&mut self, off: u64, len: u64) {
        assert!(!self.probe.returned.load(Ordering::SeqCst));
        lock(&self.probe.zeroed).push((off, len));
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Mapped,
    Hole,
    NeedBuffered,
    MapErr(DioError),
}

/// A file layout: consecutive extents starting at `base`.
pub struct LayoutMapper {
    pub base: u64,
    pub exts: Vec<(u64, Kind)>,
}

impl Mapper for LayoutMapper {
    fn map(&self, file_off: u64, len: u64, _dir: Dir, may_alloc: bool) -> Result<Extent, DioError> {
        let mut start = self.base;
        for &(elen, kind) in &self.exts {
            if file_off < start + elen {
                let rest = (start + elen - file_off).min(len);
                return match kind {
                    Kind::Mapped => Ok(Extent::Mapped {
                        lba: file_off,
                        len: rest,
                        fresh: may_alloc,
                    }),
                    Kind::Hole => Ok(Extent::Hole { len: rest }),
                    Kind::NeedBuffered => Ok(Extent::NeedBuffered),
                    Kind::MapErr(e) => Err(e),
                };
            }
            start += elen;
        }
        Ok(Extent::NeedBuffered)
    }
}

/// The file: size, and the buffered writes it received.
pub struct TFile {
    pub size: Mutex<u64>,
    pub buffered: Mutex<Vec<(u64, u64)>>,
    pub fail_buffered: bool,
    pub probe: Arc<Probe>,
}

#[derive(Clone)]
pub struct FileRef(pub Arc<TFile>);

impl TFile {
    pub fn shared(size: u64, probe: Arc<Probe>) -> FileRef {
        FileRef(Arc::new(TFile {
            size: Mutex::new(size),
            buffered: Mutex::new(Vec::new()),
            fail_buffered: false,
            probe,
        }))
    }
    pub fn size(&self) -> u64 {
        *lock(&self.size)
    }
}

impl File<TBuf> for FileRef {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn extend_to(&self, new_size: u64) {
        let mut s = lock(&self.0.size);
        *s = (*s).max(new_size);
    }
    fn write_buffered(&self, file_offset: u64, buf: &TBuf, r: std::ops::Range<u64>) -> DioResult {
        assert_eq!(
            self.0.probe.in_flight.load(Ordering::SeqCst),
            0,
            "direct bios in flight during buffered fallback (I-FB-2)"
        );
        assert!(r.end <= buf.len && r.start <= r.end);
        if self.0.fail_buffered {
            return Err(DioError::Fault);
        }
        lock(&self.0.buffered).push((file_offset, file_offset + (r.end - r.start)));
        Ok(r.end - r.start)
    }
}

/// The end-io hook: records its calls, may fail.
pub struct Hook {
    pub calls: Mutex<Vec<(u64, u64, Option<DioError>)>>,
    pub fail: Option<i32>,
}

impl EndIo for Hook {
    fn end_io(&self, offset: u64, transferred: u64, err: Option<DioError>) -> Result<(), DioError> {
        lock(&self.calls).push((offset, transferred, err));
        match self.fail {
            Some(c) => Err(DioError::EndIo(c)),
            None => Ok(()),
        }
    }
}

/// Device bookkeeping common to the models.
pub struct DevCore {
    /// Submit calls so far (accepted or not).
    pub calls: AtomicUsize,
    /// Accepted bios so far.
    pub accepted: AtomicUsize,
    /// Submit call indexes answered with `QueueFull`.
    pub qfull_calls: Vec<usize>,
    /// Status of the k-th accepted bio (default OK).
    pub statuses: Vec<Status>,
    /// Statuses in completion order.
    pub completed: Mutex<Vec<Status>>,
    pub probe: Arc<Probe>,
}

impl DevCore {
    pub fn new(qfull_calls: Vec<usize>, statuses: Vec<Status>, probe: Arc<Probe>) -> Self {
        DevCore {
            calls: AtomicUsize::new(0),
            accepted: AtomicUsize::new(0),
            qfull_calls,
            statuses,
            completed: Mutex::new(Vec::new()),
            probe,
        }
    }
    /// `Some(status)` if accepted.
    fn accept(&self) -> Option<Status> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        if self.qfull_calls.contains(&call) {
            return None;
        }
        let k = self.accepted.fetch_add(1, Ordering::SeqCst);
        self.probe.in_flight.fetch_add(1, Ordering::SeqCst);
        Some(self.statuses.get(k).copied().unwrap_or(Ok(())))
    }
    /// The device ends a command: bookkeeping first, then the bio's completion.
    fn end(&self, bio: Bio<TBuf>, status: Status) {
        lock(&self.completed).push(status);
        self.probe.in_flight.fetch_sub(1, Ordering::SeqCst);
        bio.complete(status);
    }
}

/// One thread per accepted bio (the most general completion order).
pub struct SpawnDev {
    pub core: Arc<DevCore>,
    pub handles: Mutex<Vec<thread::JoinHandle<()>>>,
}

impl SpawnDev {
    pub fn join_all(&self) {
        let hs: Vec<_> = std::mem::take(&mut *lock(&self.handles));
        for h in hs {
            h.join().unwrap();
        }
    }
}

impl BioSink<TBuf> for SpawnDev {
    fn submit(&self, bio: Bio<TBuf>) -> Result<(), Rejected<TBuf>> {
        let Some(status) = self.core.accept() else {
            return Err(Rejected {
                bio,
                why: DioError::QueueFull,
            });
        };
        let core = self.core.clone();
        let h = thread::spawn(move || core.end(bio, status));
        lock(&self.handles).push(h);
        Ok(())
    }
}

/// A queue of accepted bios, completed by `poll_once` (a poller thread and/or the submitter
/// polling in place). At most `max_in_flight` bios outstanding (the request pool).
pub struct QueueDev {
    pub core: Arc<DevCore>,
    pub queue: Mutex<VecDeque<(Bio<TBuf>, Status)>>,
    pub outstanding: AtomicUsize,
    pub max_in_flight: usize,
    pub stop: AtomicBool,
}

impl QueueDev {
    pub fn new(core: Arc<DevCore>, max_in_flight: usize) -> Self {
        QueueDev {
            core,
            queue: Mutex::new(VecDeque::new()),
            outstanding: AtomicUsize::new(0),
            max_in_flight,
            stop: AtomicBool::new(false),
        }
    }
    /// The poller thread's loop: until stopped and empty.
    pub fn run(&self) {
        loop {
            if self.stop.load(Ordering::SeqCst) && lock(&self.queue).is_empty() {
                break;
            }
            self.poll_once();
        }
    }
}

impl BioSink<TBuf> for QueueDev {
    fn submit(&self, bio: Bio<TBuf>) -> Result<(), Rejected<TBuf>> {
        if self.outstanding.load(Ordering::SeqCst) >= self.max_in_flight {
            self.core.calls.fetch_add(1, Ordering::SeqCst);
            return Err(Rejected {
                bio,
                why: DioError::QueueFull,
            });
        }
        let Some(status) = self.core.accept() else {
            return Err(Rejected {
                bio,
                why: DioError::QueueFull,
            });
        };
        self.outstanding.fetch_add(1, Ordering::SeqCst);
        lock(&self.queue).push_back((bio, status));
        Ok(())
    }
}

impl Poller for QueueDev {
    fn poll_once(&self) {
        let next = lock(&self.queue).pop_front();
        match next {
            Some((bio, status)) => {
                self.outstanding.fetch_sub(1, Ordering::SeqCst);
                self.core.end(bio, status);
            }
            None => thread::yield_now(),
        }
    }
}
