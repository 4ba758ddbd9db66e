//! `DioCore::submit`: validate, walk the request in extents, submit bios, and decide, in one
//! place, between `Queued` and waiting (§3.4).

use crate::bio::{Bio, BioCmd, BioOp};
use crate::completion::Completion;
use crate::dio::{Deferred, DioShared, Handoff, Payload, RefCounting, Slot, StatePool, Wait, Walk};
use crate::error::{DioError, DioResult};
use crate::hooks::{BioSink, Deferral, EndIo, Extent, Mapper, Rejected};
use crate::pool::Pool;
use crate::request::{DioRequest, Dir, IoBuf, Mode, Outcome};
use crate::sync::{Arc, invariant};

mod commands;

pub use commands::Command;

/// What to do when the device's request pool is exhausted (§3.10).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum QueueFullPolicy {
    /// If this request has bios in flight, wait until one of them completes and retry; with
    /// none in flight, fail with `QueueFull`.
    #[default]
    Throttle,
    /// Fail with `QueueFull` at once (after draining what is in flight).
    Error,
}

/// Configuration of a [`DioCore`].
#[derive(Clone, Debug)]
pub struct Config {
    /// Alignment in bytes (a power of two, normally the logical block size) of offsets, read
    /// lengths and direct write lengths.
    pub align: u64,
    /// Queue-full policy.
    pub queue_full: QueueFullPolicy,
    /// How the submitter waits.
    pub wait: Wait,
    /// Reference-counting implementation.
    pub refcount: RefCounting,
    /// How many idle request states the core keeps for reuse (at least 1). A request takes
    /// one from this pool and allocates only when it is empty, so in the steady state a core
    /// allocates nothing as long as no more than this many requests end between two
    /// submissions.
    pub pool: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            align: 512,
            queue_full: QueueFullPolicy::Throttle,
            wait: Wait::Park,
            refcount: RefCounting::Locked,
            pool: 1024,
        }
    }
}

/// The direct-I/O core for one file (or one device, with an identity mapper).
///
/// `M` is the block map's type: a trait object by default; a concrete mapper lets its `map`
/// be inlined into the walk (one virtual call less per bio).
pub struct DioCore<B: IoBuf, M: Mapper + ?Sized = dyn Mapper> {
    sink: std::sync::Arc<dyn BioSink<B>>,
    mapper: std::sync::Arc<M>,
    end_io: Option<std::sync::Arc<dyn EndIo>>,
    deferral: Option<std::sync::Arc<dyn Deferral>>,
    cfg: Config,
    pool: std::sync::Arc<StatePool<B>>,
}

impl<B: IoBuf, M: Mapper + ?Sized> Drop for DioCore<B, M> {
    /// Idle states point back at the pool: empty it so that they, and it, are freed. A state
    /// whose request is still in flight is freed when that request ends.
    fn drop(&mut self) {
        self.pool.close();
    }
}

impl<B: IoBuf, M: Mapper + ?Sized> DioCore<B, M> {
    /// A core submitting to `sink` with the block map `mapper`.
    ///
    /// # Panics
    /// If `cfg.align` is not a power of two.
    pub fn new(
        sink: std::sync::Arc<dyn BioSink<B>>,
        mapper: std::sync::Arc<M>,
        cfg: Config,
    ) -> Self {
        assert!(
            cfg.align.is_power_of_two(),
            "alignment must be a power of two"
        );
        DioCore {
            sink,
            mapper,
            end_io: None,
            deferral: None,
            pool: std::sync::Arc::new(Pool::new(cfg.pool)),
            cfg,
        }
    }

    /// Install the filesystem end-io hook.
    pub fn with_end_io(mut self, hook: std::sync::Arc<dyn EndIo>) -> Self {
        self.end_io = Some(hook);
        self
    }

    /// Run final completions through `deferral` instead of inline.
    pub fn with_deferral(mut self, deferral: std::sync::Arc<dyn Deferral>) -> Self {
        self.deferral = Some(deferral);
        self
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The deferral hook, if any.
    pub fn deferral(&self) -> Option<&std::sync::Arc<dyn Deferral>> {
        self.deferral.as_ref()
    }

    /// Run `completion(result, buf)` through the deferral hook (inline without one), carried
    /// by a pooled request state rather than a boxed closure: the upper layer's way to keep a
    /// synchronously finished request's callback off the submitter's stack (I-CB-6).
    pub fn defer_completion(&self, completion: Completion<B>, result: DioResult, buf: B) {
        match &self.deferral {
            Some(d) => {
                let carrier = self.idle(Some((Dir::Read, 0, 0, false))).0;
                let h = Handoff::Ready(result, Payload { buf, completion });
                d.defer_completion(Deferred::new(carrier, h));
            }
            None => completion.complete(result, buf),
        }
    }

    /// A request state: an idle one from the pool that nobody else holds any more, or a new
    /// one (warm-up, or the pool is empty), with the reference of the request's first bio
    /// already taken (see [`Walk::first_ref`]).
    #[inline(always)]
    fn state(&self, dir: Dir, offset: u64, i_size: u64) -> Arc<DioShared<B>> {
        self.idle(Some((dir, offset, i_size, true))).0
    }

    /// An idle state nobody else holds (from the pool, or new), set up for a request
    /// `(dir, offset, i_size, first_ref)` if given (`first_ref`: with its first bio's
    /// reference taken), else with what its user slot held taken out, through the exclusive
    /// access that proved it idle.
    #[inline(always)]
    fn idle(&self, reuse: Option<(Dir, u64, u64, bool)>) -> (Arc<DioShared<B>>, Slot) {
        // The hot stack's top state first, then (if a completer still held that one) another.
        for _ in 0..2 {
            let Some(mut dio) = self.pool.pop() else {
                break;
            };
            if let Some(d) = Arc::get_mut(&mut dio) {
                let slot = match reuse {
                    Some((dir, offset, i_size, first_ref)) => {
                        d.start_request(dir, offset, i_size, first_ref);
                        None
                    }
                    // A reservation: its request starts here too, with its first bio's
                    // reference; only its parameters wait for the submission.
                    None => {
                        d.start_request(Dir::Read, 0, 0, true);
                        d.take_slot()
                    }
                };
                return (dio, slot);
            }
            // A completer has dropped its count but not yet its `Arc`: keep the state for
            // later rather than wait.
            self.pool.push_cold(dio);
        }
        (self.new_state(reuse), None)
    }

    #[cold]
    #[inline(never)]
    fn new_state(&self, reuse: Option<(Dir, u64, u64, bool)>) -> Arc<DioShared<B>> {
        let mut d = DioShared::new(
            self.end_io.clone(),
            self.deferral.clone(),
            self.pool.clone(),
            self.cfg.refcount,
        );
        // `None`: a reservation (see `idle`).
        let (dir, offset, i_size, first_ref) = reuse.unwrap_or((Dir::Read, 0, 0, true));
        d.start_request(dir, offset, i_size, first_ref);
        Arc::new(d)
    }

    /// Take a request state from the pool before submitting, with what the upper layer left
    /// in its user slot (its previous request's, or `None` for a new state): the upper layer
    /// keeps its per-request context there rather than in a pool of its own (one pool per
    /// request, not two). Submit it with [`submit_reserved`](Self::submit_reserved), or give
    /// it back with [`Reserved::release`].
    #[inline(always)]
    pub fn reserve(&self) -> (Reserved<B>, Slot) {
        let (dio, slot) = self.idle(None);
        (Reserved(dio), slot)
    }

    /// [`submit`](Self::submit) on a state taken by [`reserve`](Self::reserve).
    #[inline(always)]
    pub fn submit_reserved(
        &self,
        reserved: Reserved<B>,
        req: DioRequest<B>,
        i_size: u64,
        completion: Completion<B>,
    ) -> Outcome<B> {
        self.submit_on(Some(reserved.0), req, i_size, completion)
    }

    /// Submit one request. `i_size` is the file size now (snapshot for the EOF clamp and the
    /// extending-write test). `completion` stays inside the request if the outcome is
    /// `Queued` (dio-core then runs it exactly once) and is handed back otherwise.
    #[inline(always)]
    pub fn submit(&self, req: DioRequest<B>, i_size: u64, completion: Completion<B>) -> Outcome<B> {
        self.submit_on(None, req, i_size, completion)
    }

    /// [`submit`](Self::submit), on a reserved state if any.
    #[inline(always)]
    fn submit_on(
        &self,
        reserved: Option<Arc<DioShared<B>>>,
        req: DioRequest<B>,
        i_size: u64,
        completion: Completion<B>,
    ) -> Outcome<B> {
        let DioRequest {
            dir,
            offset,
            len,
            buf,
            mode,
            force_wait,
        } = req;
        // The buffer and the completion travel together from here (one aggregate, not
        // repacked on the way to the state: each repacking is a copy of the buffer).
        let mut p = Payload { buf, completion };
        // 1–5. Validate, take a state, walk.
        let mut w = Walk::default();
        let dio = match self.start(reserved, dir, offset, len, &mut p.buf, i_size, &mut w) {
            Ok(dio) => dio,
            Err(result) => {
                return Outcome::Done {
                    result,
                    buf: p.buf,
                    completion: p.completion,
                };
            }
        };
        // 3. Extending writes are forced synchronous (§3.8). (`start` checked that the end
        // does not overflow.)
        let extending = dir == Dir::Write && offset + len > i_size;
        let async_ok = mode == Mode::Async && !extending && !force_wait;
        // 6. Decide: the only place that can produce `Queued`.
        let queued = async_ok
            && w.submit_err.is_none()
            && w.deferred_err.is_none()
            && w.handled > 0
            && (dir == Dir::Read || w.handled == len);
        // 7–8. Drain unless queued; final drop.
        let Some((result, buf, completion)) = self.drain(dio, &w, queued, p) else {
            return Outcome::Queued;
        };
        if dir == Dir::Write && result.is_ok() && w.handled < len {
            Outcome::Fallback {
                done: w.handled,
                buf,
                completion,
            }
        } else {
            Outcome::Done {
                result,
                buf,
                completion,
            }
        }
    }

    /// Submit one request synchronously on a borrowed buffer: [`submit`](Self::submit) in
    /// [`Mode::Sync`], without moving the buffer in and out (a synchronous request is never
    /// queued, so dio-core never owns its buffer; the bios only borrow segments of it, and
    /// all of them have completed when this returns). The outcome is the result, or
    /// `Fallback` with the bytes written directly (the caller writes the rest buffered).
    #[inline(always)]
    pub fn submit_sync_mut(
        &self,
        dir: Dir,
        offset: u64,
        len: u64,
        buf: &mut B,
        i_size: u64,
    ) -> SyncOutcome {
        let mut w = Walk::default();
        let dio = match self.start(None, dir, offset, len, buf, i_size, &mut w) {
            Ok(dio) => dio,
            Err(result) => return SyncOutcome::Done(result),
        };
        let io_error = dio.submitter_wait(&self.cfg.wait, w.bios);
        let result = self.settle(dio, &w, io_error);
        if dir == Dir::Write && result.is_ok() && w.handled < len {
            SyncOutcome::Fallback { done: w.handled }
        } else {
            SyncOutcome::Done(result)
        }
    }

    /// §3.4 steps 1–5: validate, take a request state with the submitter's reference (a
    /// recycled one if possible), and walk the request in extents, submitting its bios, into
    /// `w` (the caller's `Walk::default()`). `Err`: the request is over before any state
    /// (invalid, empty, at or past EOF), with its result.
    ///
    /// The walk is filled in place rather than returned: returned inside the result, it was
    /// copied on the way out (measured: 21 instructions per asynchronous read at QD32 on the
    /// appliance path, 14 per synchronous one).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn start(
        &self,
        reserved: Option<Arc<DioShared<B>>>,
        dir: Dir,
        offset: u64,
        len: u64,
        buf: &mut B,
        i_size: u64,
        w: &mut Walk,
    ) -> Result<Arc<DioShared<B>>, DioResult> {
        // A reserved state not used (the request ends before any state) goes back to the pool.
        let unused = |r: Option<Arc<DioShared<B>>>| {
            if let Some(d) = r {
                DioShared::recycle(d, &self.pool);
            }
        };
        let align = self.cfg.align;
        // `align` is a power of two (checked in `new`): masks instead of divisions.
        let mask = align - 1;
        // 1. Validate before any state.
        let Some(end) = offset.checked_add(len) else {
            unused(reserved);
            return Err(Err(DioError::Invalid));
        };
        if offset & mask != 0 || len > buf.len() || (dir == Dir::Read && len & mask != 0) {
            unused(reserved);
            return Err(Err(DioError::Invalid));
        }
        // 2. Nothing to do.
        if len == 0 || (dir == Dir::Read && offset >= i_size) {
            unused(reserved);
            return Err(Ok(0));
        }
        // 4. The request, with the submitter's reference and its first bio's (a recycled state
        // if possible).
        let mut dio = match reserved {
            None => self.state(dir, offset, i_size),
            // Reinitialised, with its first bio's reference, when it was reserved, and the only
            // `Arc` since (`Reserved` has no other): only the parameters are set, through
            // `&self`, with no second uniqueness check.
            Some(d) => {
                invariant!(
                    Arc::strong_count(&d) == 1,
                    "a reserved request state is shared"
                );
                d.set_request(dir, offset, i_size);
                d
            }
        };
        // 5. Walk. Reads stop at EOF; a write's unaligned tail is left to the buffered path.
        let walk_end = match dir {
            // The size rounded up to the alignment (saturating: `i_size` may be near `u64::MAX`).
            Dir::Read => end.min(i_size.checked_add(mask).map_or(u64::MAX, |v| v & !mask)),
            Dir::Write => offset + (len & !mask),
        };
        w.first_ref = true;
        let mut pos = offset;
        while pos < walk_end && w.submit_err.is_none() {
            let want = walk_end - pos;
            let may_alloc = dir == Dir::Write && pos >= i_size;
            let extent = match self.mapper.map(pos, want, dir, may_alloc) {
                Ok(e) => e,
                Err(e) => {
                    w.submit_err = Some(e);
                    break;
                }
            };
            match extent {
                Extent::Mapped {
                    lba,
                    len: elen,
                    fresh,
                } => {
                    let n = elen.min(want);
                    if n == 0 {
                        w.submit_err = Some(DioError::Invalid);
                        break;
                    }
                    let seg = match buf.dma_map(pos - offset, n, dir) {
                        Ok(seg) => Some(seg),
                        Err(e) if dir == Dir::Write && fresh => {
                            // Deferred error (§3.6): never expose the stale content of blocks
                            // this request allocated.
                            let zero = (BioOp::WriteZeroes, lba, pos, n, None);
                            if self.issue(&mut dio, zero, w) {
                                w.deferred_err = Some(e);
                            }
                            break;
                        }
                        Err(e) => {
                            w.submit_err = Some(e);
                            break;
                        }
                    };
                    let op = if dir == Dir::Read {
                        BioOp::Read
                    } else {
                        BioOp::Write
                    };
                    if !self.issue(&mut dio, (op, lba, pos, n, seg), w) {
                        break;
                    }
                    w.handled += n;
                    pos += n;
                }
                Extent::Hole { len: elen } if dir == Dir::Read => {
                    let n = elen.min(want);
                    if n == 0 {
                        w.submit_err = Some(DioError::Invalid);
                        break;
                    }
                    buf.zero_fill(pos - offset, n);
                    w.handled += n;
                    pos += n;
                }
                // A write into a hole, or anything the mapper wants buffered: stop here (the
                // buffered path takes the rest of a write; a read ends short).
                Extent::Hole { .. } | Extent::NeedBuffered => break,
            }
        }
        Self::unused_first_ref(&dio, w);
        Ok(dio)
    }

    /// §3.4 steps 7–8, shared by [`submit`](Self::submit) and
    /// [`submit_commands`](Self::submit_commands): a `queued` request publishes its walk and
    /// payload and drops the submitter's reference (`None`: `Queued`, the completion path owns
    /// the request now); otherwise, or when every bio completed before that drop, the submitter
    /// waits for its bios, resolves the request, recycles its state, and has the result, the
    /// buffer and the completion back.
    #[inline(always)]
    fn drain(
        &self,
        dio: Arc<DioShared<B>>,
        w: &Walk,
        queued: bool,
        p: Payload<B>,
    ) -> Option<(DioResult, B, Completion<B>)> {
        let (dio, io_error, buf, completion) = if queued {
            let (dio, fin) = DioShared::submitter_queue(dio, w.handled, p)?;
            // Every bio completed before the drop: the submitter owns the request again.
            (dio, fin.io_error, fin.payload.buf, fin.payload.completion)
        } else {
            let io_error = dio.submitter_wait(&self.cfg.wait, w.bios);
            (dio, io_error, p.buf, p.completion)
        };
        Some((self.settle(dio, w, io_error), buf, completion))
    }

    /// The submitter's end of a request it owns again (every bio completed, its reference the
    /// last): resolve the result, give the state back to the pool.
    #[inline(always)]
    fn settle(&self, dio: Arc<DioShared<B>>, w: &Walk, io_error: Option<DioError>) -> DioResult {
        let result = dio.resolve(w, io_error);
        DioShared::recycle(dio, &self.pool);
        result
    }
    /// Give back the first bio's reference if the walk submitted no bio (nothing mapped, an
    /// error before the first one): the submitter's reference is then the only one. Once per
    /// request, after its walk; the lock only on that rare path.
    #[inline(always)]
    fn unused_first_ref(dio: &Arc<DioShared<B>>, w: &mut Walk) {
        if w.first_ref {
            w.first_ref = false;
            dio.undo_ref();
        }
    }

    /// Submit one bio, taking its reference first; throttle on `QueueFull` if allowed.
    /// Returns false (with `submit_err` set) if the device refused it for good.
    #[inline(always)]
    fn issue(&self, dio: &mut Arc<DioShared<B>>, bio: BioParts<B>, w: &mut Walk) -> bool {
        // The reference before the bio's `Arc` clone. A request's first one was taken with the
        // state's exclusive access when the request started (the state is not shared until
        // this bio is handed over).
        let before = if w.first_ref {
            w.first_ref = false;
            0
        } else {
            DioShared::get_ref(dio)
        };
        let (op, lba, file_offset, len, seg) = bio;
        let bio = Bio {
            dio: Arc::clone(dio),
            cmd: BioCmd {
                op,
                lba,
                file_offset,
                len,
                seg,
            },
        };
        match self.sink.submit(bio) {
            Ok(()) => {
                w.bios += 1;
                true
            }
            Err(rejected) => self.rejected(dio, rejected, before, w),
        }
    }

    /// The device refused a bio: give its reference back, then retry after one of this
    /// request's own bios completed (`QueueFull` under `Throttle` with bios in flight), or
    /// stop with `submit_err`. Out of line: the device's pool is rarely exhausted.
    #[cold]
    #[inline(never)]
    fn rejected(
        &self,
        dio: &mut Arc<DioShared<B>>,
        rejected: Rejected<B>,
        mut before: u32,
        w: &mut Walk,
    ) -> bool {
        let Rejected {
            bio: mut back,
            mut why,
        } = rejected;
        loop {
            let in_flight = dio.undo_ref();
            if why == DioError::QueueFull
                && self.cfg.queue_full == QueueFullPolicy::Throttle
                && before > 0
            {
                // Some of our own bios were in flight when the pool was found empty: once one
                // of them has completed (possibly already), a slot was freed: retry.
                if in_flight >= before {
                    dio.wait_in_flight(before - 1, &self.cfg.wait);
                }
                before = DioShared::get_ref(dio);
                match self.sink.submit(back) {
                    Ok(()) => {
                        w.bios += 1;
                        return true;
                    }
                    Err(again) => {
                        back = again.bio;
                        why = again.why;
                        continue;
                    }
                }
            }
            back.abandon();
            w.submit_err = Some(why);
            return false;
        }
    }
}

/// A request state taken from a core's pool ahead of its submission
/// ([`DioCore::reserve`]), for its user slot. Give it back unsubmitted with
/// [`release`](Self::release); merely dropped, it is freed rather than pooled (no `Drop`: a
/// submitted reservation is moved into the request without a drop check).
pub struct Reserved<B: IoBuf>(Arc<DioShared<B>>);

impl<B: IoBuf> Reserved<B> {
    /// Give the state back to the pool unsubmitted, `slot` in its user slot.
    pub fn release(mut self, slot: Slot) {
        if let Some(d) = Arc::get_mut(&mut self.0) {
            d.put_slot(slot);
        }
        let pool = std::sync::Arc::clone(&self.0.pool);
        DioShared::recycle(self.0, &pool);
    }
}

impl<B: IoBuf> std::fmt::Debug for Reserved<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reserved")
    }
}

/// A bio before it has its reference: operation, LBA, file offset, length, segment.
type BioParts<B> = (BioOp, u64, u64, u64, Option<<B as IoBuf>::Seg>);

/// The end of [`DioCore::submit_sync_mut`]: the buffer stayed with the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum SyncOutcome {
    /// Finished: the result.
    Done(DioResult),
    /// A direct write that stopped early without an error (see [`Outcome::Fallback`]): `done`
    /// bytes were written directly; the caller writes the rest through its buffered path.
    Fallback {
        /// Bytes written directly.
        done: u64,
    },
}
