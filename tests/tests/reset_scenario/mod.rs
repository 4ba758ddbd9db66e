//! Reset under load, shared by `reset_load.rs` (the emulated controller) and `hil_faults.rs`
//! (QEMU's controller through VFIO, in the HIL fault scenario).
//!
//! Three clients keep reads going on one controller, each its own way: a batch of owned-buffer
//! requests on a queue pair polled by its thread (**async**), blocking calls (**sync**), and the
//! embedding API (`BlockFile` reads through a poller thread, **blockfile**). Once each has done
//! some I/O the controller is reset ([`Controller::reset`]) while they run. The async client
//! holds one batch accepted but not yet rung across the reset, so that at least those eight
//! requests are outstanding when it happens, whatever the device's speed: they must fail with
//! the reset, once each. Every request must
//! end exactly once: with its data (verified against the pattern the region was filled with), or
//! failed by the reset ([`DeadReason::ControllerReset`]; through the embedding API, the status
//! Command Aborted due to SQ Deletion). A client whose queue pair went stale renews it
//! ([`QueuePair::renew`]; the embedding API's pollers do so themselves) and carries on: after
//! the reset each client must complete a run of reads with no error at all.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use dioxide::spec::status::generic;
use dioxide::{
    Controller, DeadReason, Dioxide, DmaBuffer, EmbedError, Error, FileOptions, IoError, Lba,
    Namespace, QueueOptions, QueuePair,
};
use dioxide_tests::pattern;

/// Reads each client does after the reset before it stops.
const AFTER: u32 = 24;
/// Reads each client does before the reset.
const BEFORE: u32 = 8;
/// Blocks of the region the clients read (prefilled by the caller with `pattern(.., seed)`).
pub const REGION_BLOCKS: u64 = 64;
/// How long a client may wait for one batch (far above anything healthy, even under TCG).
const LIMIT: Duration = Duration::from_secs(60);

/// What one client saw.
#[derive(Debug, Default)]
pub struct Tally {
    pub column: &'static str,
    /// Requests issued.
    pub issued: u32,
    /// Completed exactly once / never / more than once.
    pub once: u32,
    pub lost: u32,
    pub double: u32,
    /// Failed by the reset (each once).
    pub failed: u32,
    /// Of those, issued after the reset had returned.
    pub failed_after: u32,
    /// Every read that succeeded returned the region's data, and the client completed its
    /// reads after the reset without an error.
    pub verified: bool,
    /// The first unexpected outcome, if any.
    pub problem: Option<String>,
}

impl Tally {
    fn new(column: &'static str) -> Tally {
        Tally {
            column,
            verified: true,
            ..Tally::default()
        }
    }

    fn counts(&mut self, counts: impl IntoIterator<Item = u32>) {
        for c in counts {
            self.issued += 1;
            match c {
                0 => self.lost += 1,
                1 => self.once += 1,
                _ => self.double += 1,
            }
        }
    }

    /// Requests failed by the reset that were issued after `Controller::reset` had returned,
    /// past this: the client never got a working queue pair. (Those issued while the reset
    /// runs fail for as long as it takes, which depends on the machine's load: not counted.)
    const MAX_FAILED_AFTER: u32 = 256;

    /// A request failed by the reset; `after`: issued after the reset had returned.
    fn fail(&mut self, after: bool) {
        self.failed += 1;
        if after {
            self.failed_after += 1;
            if self.failed_after > Self::MAX_FAILED_AFTER {
                self.problem("still failing long after the reset: no new queue pair".into());
            }
        }
    }

    fn problem(&mut self, what: String) {
        self.verified = false;
        self.problem.get_or_insert(what);
    }
}

/// Shared progress: clients count their reads; the reset waits for `BEFORE` each.
struct Progress {
    done: [AtomicU32; 3],
    /// The async client holds a batch across the reset.
    held: AtomicBool,
    reset: AtomicBool,
}

impl Progress {
    fn tick(&self, i: usize) {
        self.done[i].fetch_add(1, Ordering::AcqRel);
    }
}

fn is_reset(e: &IoError) -> bool {
    matches!(
        e,
        IoError::Aborted {
            reason: DeadReason::ControllerReset,
            ..
        }
    )
}

fn is_reset_error(e: &Error) -> bool {
    match e {
        Error::Io(io) => is_reset(io),
        Error::QueueDead { reason, .. } => *reason == DeadReason::ControllerReset,
        _ => false,
    }
}

/// Renews `q` after the reset: polls (delivering what the old queue still holds, counted by
/// `f`) until the new queue pair exists.
fn renew<T>(q: &mut QueuePair<T>, mut f: impl FnMut(T, dioxide::IoResult)) -> Result<(), String> {
    let deadline = Instant::now() + LIMIT;
    loop {
        match q.renew() {
            Ok(true) => return Ok(()),
            Ok(false) if !q.is_stale() => return Ok(()),
            Ok(false) => {
                let _ = q.poll(usize::MAX, &mut f);
            }
            // The controller is being re-initialised by the other thread.
            Err(Error::NotReady { .. }) => std::thread::sleep(Duration::from_millis(1)),
            Err(e) => return Err(format!("renewing the queue pair: {e}")),
        }
        if Instant::now() > deadline {
            return Err("the queue pair was not renewed in time".into());
        }
    }
}

/// The async client: batches of 8 owned-buffer reads, rung together, polled to the end.
fn async_client(c: &Controller, ns: &Namespace, base: u64, want: &[u8], p: &Progress) -> Tally {
    let mut t = Tally::new("async");
    let bs = ns.block_size() as u64;
    let mut q = match c.create_qpair::<(DmaBuffer, u64)>(QueueOptions::default().with_requests(16))
    {
        Ok(q) => q,
        Err(e) => {
            t.problem(format!("queue pair: {e}"));
            return t;
        }
    };
    let mut counts: HashMap<u64, u32> = HashMap::new();
    let mut tag = 0u64;
    let mut clean_after = 0u32;
    while clean_after < AFTER {
        let after = p.reset.load(Ordering::Acquire);
        let mut batch_failed = false;
        for _ in 0..8 {
            let lba = base + tag % REGION_BLOCKS;
            counts.insert(tag, 0);
            let b = match c.alloc(bs as usize) {
                Ok(b) => b,
                Err(e) => {
                    t.problem(format!("alloc: {e}"));
                    return t;
                }
            };
            if let Err(rej) = q.read(ns, Lba(lba), (b, tag)) {
                // Refused: the request ends here, once.
                *counts.get_mut(&tag).unwrap() += 1;
                if is_reset_error(&rej.error) {
                    t.fail(after);
                    batch_failed = true;
                } else {
                    t.problem(format!("request {tag} refused: {}", rej.error));
                }
            }
            tag += 1;
        }
        if !after && !p.held.load(Ordering::Acquire) && p.done[0].load(Ordering::Acquire) >= BEFORE
        {
            // This batch stays accepted and unrung until the reset is over: the next poll
            // finds the queue stale and fails all eight.
            p.held.store(true, Ordering::Release);
            let deadline = Instant::now() + LIMIT;
            while !p.reset.load(Ordering::Acquire) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
        } else {
            q.ring();
        }
        let deadline = Instant::now() + LIMIT;
        let mut on_result = |(b, tg): (DmaBuffer, u64), r: dioxide::IoResult, t: &mut Tally| {
            *counts.entry(tg).or_insert(0) += 1;
            let lba = base + tg % REGION_BLOCKS;
            let o = ((lba - base) * bs) as usize;
            match r {
                Ok(_) if b.as_slice() == &want[o..o + bs as usize] => {}
                Ok(_) => t.problem(format!("request {tg}: wrong data at LBA {lba}")),
                Err(e) if is_reset(&e) => {
                    t.fail(after);
                    batch_failed = true;
                }
                Err(e) => t.problem(format!("request {tg}: {e}")),
            }
        };
        while q.outstanding() > 0 && Instant::now() < deadline {
            match q.poll(usize::MAX, |ctx, r| on_result(ctx, r, &mut t)) {
                Ok(_) => {}
                Err(e) if is_reset_error(&e) => {}
                Err(e) => {
                    t.problem(format!("poll: {e}"));
                    break;
                }
            }
        }
        if q.outstanding() > 0 {
            t.problem(format!("{} requests never completed", q.outstanding()));
            break;
        }
        if q.is_stale() {
            if let Err(e) = renew(&mut q, |ctx, r| on_result(ctx, r, &mut t)) {
                t.problem(e);
                break;
            }
        }
        if after && batch_failed && clean_after > 0 {
            t.problem("a read failed after the reset and a clean batch".into());
        }
        if after && !batch_failed {
            clean_after += 8;
        }
        for _ in 0..8 {
            p.tick(0);
        }
        if t.problem.is_some() {
            break;
        }
    }
    t.counts(counts.into_values());
    t
}

/// The sync client: blocking reads of one block.
fn sync_client(c: &Controller, ns: &Namespace, base: u64, want: &[u8], p: &Progress) -> Tally {
    let mut t = Tally::new("sync");
    let bs = ns.block_size() as u64;
    let mut q = match c.create_qpair::<()>(QueueOptions::default()) {
        Ok(q) => q,
        Err(e) => {
            t.problem(format!("queue pair: {e}"));
            return t;
        }
    };
    let mut b = match c.alloc(bs as usize) {
        Ok(b) => b,
        Err(e) => {
            t.problem(format!("alloc: {e}"));
            return t;
        }
    };
    let mut clean_after = 0u32;
    let mut i = 0u64;
    while clean_after < AFTER && t.problem.is_none() {
        let after = p.reset.load(Ordering::Acquire);
        let lba = base + i % REGION_BLOCKS;
        let o = ((lba - base) * bs) as usize;
        t.counts([1]); // a blocking call returns once
        match q.read_blocking(ns, Lba(lba), b.as_mut_slice()) {
            Ok(_) if b.as_slice() == &want[o..o + bs as usize] => {
                if after {
                    clean_after += 1;
                }
            }
            Ok(_) => t.problem(format!("wrong data at LBA {lba}")),
            Err(e) if is_reset_error(&e) && clean_after == 0 => t.fail(after),
            Err(e) => t.problem(format!("read at LBA {lba}: {e}")),
        }
        if q.is_stale() {
            if let Err(e) = renew(&mut q, |_, _| {}) {
                t.problem(e);
            }
        }
        p.tick(1);
        i += 1;
    }
    t
}

/// The embedding API's client: one-page reads through a `BlockFile`.
fn blockfile_client(dx: &Dioxide, ns: &Namespace, base: u64, want: &[u8], p: &Progress) -> Tally {
    let mut t = Tally::new("blockfile");
    let bs = ns.block_size() as u64;
    let blocks = REGION_BLOCKS / (4096 / bs).max(1) * (4096 / bs).max(1);
    let file = match dx.open_file(
        0,
        ns.nsid(),
        FileOptions::new(base, blocks).with_len(blocks * bs),
    ) {
        Ok(f) => f,
        Err(e) => {
            t.problem(format!("open_file: {e}"));
            return t;
        }
    };
    let pages = (blocks * bs / 4096).max(1);
    let mut got = vec![0u8; 4096];
    let mut clean_after = 0u32;
    let mut i = 0u64;
    while clean_after < AFTER && t.problem.is_none() {
        let after = p.reset.load(Ordering::Acquire);
        let off = (i % pages) * 4096;
        t.counts([1]);
        match file.read_at(&mut got, off) {
            Ok(4096) if got[..] == want[off as usize..off as usize + 4096] => {
                if after {
                    clean_after += 1;
                }
            }
            Ok(n) => t.problem(format!("read at {off}: {n} bytes or wrong data")),
            Err(EmbedError::Device { status, .. })
                if (status.sct, status.sc) == (0, generic::ABORTED_SQ_DELETION)
                    && clean_after == 0 =>
            {
                t.fail(after)
            }
            Err(e) => t.problem(format!("read at {off}: {e}")),
        }
        p.tick(2);
        i += 1;
    }
    t
}

/// Runs the three clients over `REGION_BLOCKS` blocks at `base` (holding `pattern(.., seed)`),
/// resets the controller once each has done `BEFORE` reads, and returns their tallies.
pub fn reset_under_load(c: &Controller, ns: &Namespace, base: u64, seed: u64) -> Vec<Tally> {
    let bs = ns.block_size() as u64;
    let want = pattern((REGION_BLOCKS * bs) as usize, seed);
    let dx = Dioxide::builder()
        .controller(c.clone())
        .pollers([None])
        .build()
        .expect("Dioxide");
    let p = Progress {
        done: [AtomicU32::new(0), AtomicU32::new(0), AtomicU32::new(0)],
        held: AtomicBool::new(false),
        reset: AtomicBool::new(false),
    };
    let tallies = std::thread::scope(|s| {
        let a = s.spawn(|| async_client(c, ns, base, &want, &p));
        let b = s.spawn(|| sync_client(c, ns, base, &want, &p));
        let f = s.spawn(|| blockfile_client(&dx, ns, base, &want, &p));
        let deadline = Instant::now() + LIMIT;
        while (p.done.iter().any(|d| d.load(Ordering::Acquire) < BEFORE)
            || !p.held.load(Ordering::Acquire))
            && Instant::now() < deadline
            && !(a.is_finished() || b.is_finished() || f.is_finished())
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        let reset = c.reset();
        p.reset.store(true, Ordering::Release);
        reset.expect("Controller::reset under load");
        [a, b, f].map(|h| h.join().expect("client thread"))
    });
    dx.shutdown();
    tallies.into()
}
