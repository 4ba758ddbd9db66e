//! One queue pair shared by the jobs of one core on one controller.
//!
//! An NVMe I/O queue is not tied to a namespace: every command names its own. `perf` therefore
//! opens `-P` queue pairs per controller per core (as the kernel opens one per controller per
//! CPU), not per namespace, and the jobs of that core's namespaces on the controller share them.
//! A controller granting fewer I/O queues than namespaces still runs them all.
//!
//! A [`SharedQueue`] owns the queue; each job gets a [`QueueHandle`] with its own index. A
//! command's tag carries the job's index in its top 16 bits; whoever polls the queue sorts the
//! completions into per-job mailboxes, and each job takes its own from its mailbox. A mailbox
//! holds at most the job's in-flight commands, so it is sized once ([`QueueHandle::reserve`])
//! and nothing is allocated while I/O runs. All jobs of a core run on one thread, so the
//! sharing is a plain `Rc<RefCell<..>>`.
//!
//! Buffers outlive the queues: a job that is dropped gives its buffers to the shared queue
//! ([`QueueHandle::keep_buffers`]), which frees them only after the queue itself (and with it the
//! device's queues) is gone, even when other jobs still hold the queue. A job may have commands
//! in flight on every queue pair of its controller on its core (`-P`), so those queue pairs
//! ([`SharedQueue::sibling`]) keep the buffers together: they are freed after the last of them
//! is gone, not with the first.

use super::IoQueue;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;

/// Bits of a tag left to the job (its slot index).
const JOB_SHIFT: u32 = 48;
const SLOT_MASK: u64 = (1 << JOB_SHIFT) - 1;
/// Jobs a queue can serve (the index must fit the tag's top 16 bits).
pub const MAX_JOBS: usize = 1 << (64 - JOB_SHIFT);

type Completion<Q> = (u64, Result<(), <Q as IoQueue>::IoErr>);

/// Buffers kept for a group of sibling queues, freed when the last of them is dropped.
type Kept<Q> = Rc<RefCell<Vec<<Q as IoQueue>::Buf>>>;

struct Inner<Q: IoQueue> {
    // Declared before the buffers: the queue is dropped (its device queues deleted) first.
    q: Q,
    mailboxes: Vec<VecDeque<Completion<Q>>>,
    /// Commands queued since the last doorbell.
    unrung: bool,
    /// Why the queue failed: every job on it sees the same error from then on.
    failed: Option<String>,
    /// Invalid completion entries rejected (the queue still works), and the first one's
    /// error.
    rejected: Option<(u64, String)>,
    /// Shared with the sibling queues; dropped after `q` (declared after it).
    kept: Kept<Q>,
}

/// A queue pair shared by several jobs (see the module documentation).
pub struct SharedQueue<Q: IoQueue> {
    inner: Rc<RefCell<Inner<Q>>>,
}

impl<Q: IoQueue> SharedQueue<Q> {
    /// Shares `q`.
    pub fn new(q: Q) -> SharedQueue<Q> {
        Self::with_kept(q, Rc::new(RefCell::new(Vec::new())))
    }

    /// Shares `q`, another queue pair of the same jobs: buffers kept by either are freed only
    /// after both (and every other sibling) are dropped.
    pub fn sibling(&self, q: Q) -> SharedQueue<Q> {
        let kept = self.inner.borrow().kept.clone();
        Self::with_kept(q, kept)
    }

    fn with_kept(q: Q, kept: Kept<Q>) -> SharedQueue<Q> {
        SharedQueue {
            inner: Rc::new(RefCell::new(Inner {
                q,
                mailboxes: Vec::new(),
                unrung: false,
                failed: None,
                rejected: None,
                kept,
            })),
        }
    }

    /// A handle for one more job, or `None` when [`MAX_JOBS`] already use the queue.
    pub fn handle(&self) -> Option<QueueHandle<Q>> {
        let mut i = self.inner.borrow_mut();
        if i.mailboxes.len() >= MAX_JOBS {
            return None;
        }
        i.mailboxes.push(VecDeque::new());
        Some(QueueHandle {
            inner: self.inner.clone(),
            job: i.mailboxes.len() - 1,
        })
    }

    /// How many jobs use the queue.
    pub fn jobs(&self) -> usize {
        self.inner.borrow().mailboxes.len()
    }

    /// Runs `f` on the queue itself (e.g. to read its queue id).
    pub fn with<R>(&self, f: impl FnOnce(&Q) -> R) -> R {
        f(&self.inner.borrow().q)
    }
}

/// One job's view of a [`SharedQueue`].
pub struct QueueHandle<Q: IoQueue> {
    inner: Rc<RefCell<Inner<Q>>>,
    job: usize,
}

impl<Q: IoQueue> QueueHandle<Q> {
    /// Makes room in this job's mailbox for `n` completions (its queue depth), up front.
    pub fn reserve(&mut self, n: usize) {
        let mut i = self.inner.borrow_mut();
        let job = self.job;
        i.mailboxes[job].reserve(n);
    }

    /// Queues a command of this job (tag: the job's slot index, below 2^48); see
    /// [`IoQueue::submit`].
    ///
    /// # Safety
    /// As [`IoQueue::submit`]: `buf` stays alive and untouched by the CPU until this handle's
    /// [`QueueHandle::poll`] returns `tag`.
    pub unsafe fn submit(
        &mut self,
        read: bool,
        nsid: u32,
        lba: u64,
        blocks: u32,
        buf: &Q::Buf,
        tag: u64,
    ) -> Result<(), String> {
        debug_assert!(tag <= SLOT_MASK);
        let mut i = self.inner.borrow_mut();
        if let Some(why) = &i.failed {
            return Err(why.clone());
        }
        let full = ((self.job as u64) << JOB_SHIFT) | (tag & SLOT_MASK);
        // SAFETY: the caller's contract is the queue's contract; the completion carrying
        // `full` is handed back to this job only (its mailbox), as `tag`.
        let r = unsafe { i.q.submit(read, nsid, lba, blocks, buf, full) };
        match r {
            Ok(()) => {
                i.unrung = true;
                Ok(())
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// Rings the doorbell if any job queued a command since the last ring.
    pub fn ring(&mut self) {
        let mut i = self.inner.borrow_mut();
        if i.unrung {
            i.unrung = false;
            i.q.ring();
        }
    }

    /// Reaps up to `max` completions from the queue (0: all available) into the jobs'
    /// mailboxes, then hands this job's to `done` (with the job's own tags); returns how many
    /// this job got.
    pub fn poll<F: FnMut(u64, Result<(), Q::IoErr>)>(
        &mut self,
        max: u32,
        mut done: F,
    ) -> Result<u32, String> {
        let mut guard = self.inner.borrow_mut();
        let i = &mut *guard;
        if let Some(why) = &i.failed {
            return Err(why.clone());
        }
        let mut stray = None;
        let mailboxes = &mut i.mailboxes;
        let r = i.q.poll(max, |tag, st| {
            let job = (tag >> JOB_SHIFT) as usize;
            match mailboxes.get_mut(job) {
                Some(m) => m.push_back((tag & SLOT_MASK, st)),
                None => stray = Some(tag),
            }
        });
        if let Err(e) = r {
            if Q::survives(&e) {
                let counted = i.q.rejected_entries();
                let r = i.rejected.get_or_insert_with(|| (0, e.to_string()));
                r.0 = counted.unwrap_or(r.0 + 1);
            } else {
                i.failed = Some(e.to_string());
            }
        } else if let Some(tag) = stray {
            i.failed = Some(format!(
                "completion with tag {tag:#x}, which no job on this queue submitted"
            ));
        }
        let mut n = 0;
        while let Some((tag, st)) = i.mailboxes[self.job].pop_front() {
            done(tag, st);
            n += 1;
        }
        match (&i.failed, n) {
            (Some(why), 0) => Err(why.clone()),
            _ => Ok(n),
        }
    }

    /// Invalid completion entries the queue rejected so far (see [`IoQueue::survives`]), with
    /// the first one's error.
    pub fn rejected(&self) -> Option<(u64, String)> {
        self.inner.borrow().rejected.clone()
    }

    /// Interrupt mode: arms the queue for a sleep (see [`IoQueue::arm`]); `None` if a job's
    /// mailbox holds completions, the queue failed, or it cannot sleep. Commands not yet rung
    /// are rung first.
    pub fn arm(&mut self) -> Option<std::os::fd::RawFd> {
        let mut i = self.inner.borrow_mut();
        if i.failed.is_some() || i.mailboxes.iter().any(|m| !m.is_empty()) {
            return None;
        }
        if i.unrung {
            i.unrung = false;
            i.q.ring();
        }
        i.q.arm()
    }

    /// Gives `bufs` to the shared queue, to be freed only after it and its siblings are
    /// dropped.
    pub fn keep_buffers(&mut self, bufs: Vec<Q::Buf>) {
        self.inner.borrow().kept.borrow_mut().extend(bufs);
    }

    /// The queue's own error classification, see [`IoQueue::status`].
    pub fn status(e: &Q::IoErr) -> Option<dioxide::spec::Status> {
        Q::status(e)
    }

    /// See [`IoQueue::retire`].
    pub fn retire(e: &Q::IoErr) -> bool {
        Q::retire(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::IoBuf;
    use dioxide::spec::Status;

    type Log = Rc<RefCell<Vec<String>>>;

    struct LogBuf(Log);
    impl IoBuf for LogBuf {
        fn bytes(&mut self) -> &mut [u8] {
            &mut []
        }
    }
    impl Drop for LogBuf {
        fn drop(&mut self) {
            self.0.borrow_mut().push("buffer".into());
        }
    }

    struct LogQueue(&'static str, Log);
    impl Drop for LogQueue {
        fn drop(&mut self) {
            self.1.borrow_mut().push(self.0.into());
        }
    }
    impl IoQueue for LogQueue {
        type Buf = LogBuf;
        type Error = String;
        type IoErr = String;
        unsafe fn submit(
            &mut self,
            _: bool,
            _: u32,
            _: u64,
            _: u32,
            _: &LogBuf,
            _: u64,
        ) -> Result<(), String> {
            Ok(())
        }
        fn ring(&mut self) {}
        fn poll<F: FnMut(u64, Result<(), String>)>(&mut self, _: u32, _: F) -> Result<u32, String> {
            Ok(0)
        }
        fn status(_: &String) -> Option<Status> {
            None
        }
        fn retire(_: &String) -> bool {
            false
        }
    }

    /// A job's buffers given to its first queue pair are freed after its second one is gone
    /// too (that one may still have had the job's commands in flight).
    #[test]
    fn kept_buffers_outlive_every_sibling_queue() {
        let log: Log = Rc::default();
        let q0 = SharedQueue::new(LogQueue("queue 0", log.clone()));
        let q1 = q0.sibling(LogQueue("queue 1", log.clone()));
        let mut h0 = q0.handle().unwrap();
        let h1 = q1.handle().unwrap();
        h0.keep_buffers(vec![LogBuf(log.clone())]);
        drop((h0, q0));
        drop((h1, q1));
        assert_eq!(*log.borrow(), vec!["queue 0", "queue 1", "buffer"]);
    }
}
