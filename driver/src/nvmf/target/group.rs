//! Poll groups (SPDK's model): each owns connections and polls them; one may also own the
//! listener and spread accepted connections over every group round-robin.
//!
//! [`PollGroup::poll`] never blocks: it accepts what the listener has, adopts connections
//! handed to it, polls each connection once, drops the closed ones, and returns the work done.
//! After a round with nothing done, [`PollGroup::wait`] sleeps in `poll(2)` on the group's
//! sockets, its listener and an eventfd that backend completions and new connections ring, so
//! an idle group costs no CPU (the QD1 case on a shared core) and wakes as soon as there is
//! work. Who calls them (a pinned Dioxide poller, or [`PollGroup::run_until`] on a thread of
//! its own) is the caller's choice.
//!
//! System calls per command are what a target on a shared, emulated or small CPU pays for
//! (measured in the QEMU guest: each costs more than the rest of a round), so the group makes
//! few: after a sleep it looks only at what `poll(2)` found ready (it resets the eventfd only
//! if it rang, accepts only if the listener is readable, reads no socket `poll(2)` found
//! empty in the round that follows); a connection reads many PDUs per
//! `recv` and stops at the first short read (no `recv` only to learn the socket is empty), and
//! sends what its round produced in one `writev`. A connection still tries to read once per
//! round while the group is busy: skipping rounds after an empty read was measured to stall a
//! shared core's host, whose next commands then waited behind the rounds the poller yielded.

use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crossbeam_queue::SegQueue;

use super::Target;
use super::conn::{ConnStats, Connection};
use super::wait::Notifier;
use crate::embed::poller::PollerTask;
use crate::embed::sleep::PollerWait;

/// While busy, a group tries its listener once every this many rounds.
const ACCEPT_EVERY: u32 = 64;
/// Up to this many connections, a group learns after a sleep which sockets `poll(2)` found
/// readable and reads only those in the next round (a larger group reads them all).
const QUIET_SCAN_MAX: usize = 32;

/// Where other groups (the listener's) hand this group new connections.
#[derive(Clone, Debug)]
pub struct Inbox {
    queue: Arc<SegQueue<TcpStream>>,
    notifier: Option<Arc<Notifier>>,
}

impl Inbox {
    /// Hands a connection to the group (and wakes it if it sleeps).
    pub fn push(&self, s: TcpStream) {
        self.queue.push(s);
        self.wake();
    }
    /// Wakes the group if it sleeps in [`PollGroup::wait`] (to stop it, say).
    pub fn wake(&self) {
        if let Some(n) = &self.notifier {
            n.notify();
        }
    }
}

/// A set of connections polled together.
#[derive(Debug)]
pub struct PollGroup {
    target: Arc<Target>,
    listener: Option<TcpListener>,
    peers: Vec<Inbox>,
    next_peer: usize,
    inbox: Inbox,
    conns: Vec<Connection>,
    adopted: usize,
    /// Rounds until the listener is tried again while the group is busy (it is tried after
    /// a sleep whose `poll(2)` found it readable): an `accept` per round would cost a system
    /// call per round.
    accept_in: u32,
    closed: ClosedLog,
    notifier: Option<Arc<Notifier>>,
    sleep: PollerWait,
    /// [`stop_serving`](PollGroup::stop_serving) was called: no listener, no new connection.
    stopping: bool,
}

/// Totals of the connections a group closed.
#[derive(Clone, Debug, Default)]
pub struct ClosedLog {
    /// Connections closed.
    pub count: usize,
    /// Summed counters.
    pub stats: ConnStats,
    /// The last few reasons (newest last).
    pub reasons: Vec<String>,
}

impl PollGroup {
    /// An empty group. (If no eventfd can be made, [`wait`](Self::wait) falls back to short
    /// sleeps.)
    pub fn new(target: Arc<Target>) -> PollGroup {
        let notifier = Notifier::new().ok().map(Arc::new);
        PollGroup {
            target,
            listener: None,
            peers: Vec::new(),
            next_peer: 0,
            inbox: Inbox {
                queue: Arc::new(SegQueue::new()),
                notifier: notifier.clone(),
            },
            conns: Vec::new(),
            adopted: 0,
            accept_in: 0,
            closed: ClosedLog::default(),
            notifier,
            sleep: PollerWait::default(),
            stopping: false,
        }
    }

    /// Accepts on `listener` (made non-blocking); accepted connections go to this group and
    /// the `peers` round-robin.
    pub fn listen(&mut self, listener: TcpListener, peers: Vec<Inbox>) -> io::Result<()> {
        listener.set_nonblocking(true)?;
        self.listener = Some(listener);
        self.peers = peers;
        Ok(())
    }

    /// The inbox other groups hand connections to.
    pub fn inbox(&self) -> Inbox {
        self.inbox.clone()
    }

    /// Adds an accepted connection.
    pub fn add(&mut self, sock: TcpStream) -> io::Result<()> {
        let c = Connection::new(self.target.clone(), sock, self.notifier.clone())?;
        self.conns.push(c);
        self.adopted += 1;
        Ok(())
    }

    /// Live connections.
    pub fn len(&self) -> usize {
        self.conns.len()
    }
    /// True with no connection.
    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }
    /// Connections adopted since the group was made (open and closed).
    pub fn adopted(&self) -> usize {
        self.adopted
    }
    /// Summed counters of every connection, open and closed.
    pub fn totals(&self) -> ConnStats {
        let mut t = self.closed.stats;
        for c in &self.conns {
            t.add(&c.stats());
        }
        t
    }
    /// What the closed connections did and why they closed.
    pub fn closed(&self) -> &ClosedLog {
        &self.closed
    }

    /// Commands of the group's connections at the backend now.
    pub fn in_flight(&self) -> usize {
        self.conns.iter().map(Connection::at_backend).sum()
    }

    /// Starts the group's end: the listener closes, connections handed to the group from now
    /// on are closed unread, and every connection is closed (the hosts see their sockets
    /// close). A closed connection's commands still at the backend drain in the next
    /// [`poll`](Self::poll)s, which drop it once they did: the group is done when it
    /// [`is_empty`](Self::is_empty). Idempotent.
    pub fn stop_serving(&mut self) {
        self.stopping = true;
        self.listener = None;
        for c in &mut self.conns {
            c.end("the target is stopping");
        }
    }

    /// Polls on the calling thread until `stop`; after an idle round it [`wait`](Self::wait)s
    /// at most `idle_wait` (which bounds how late `stop`, keep-alive expiry and events from
    /// other threads are seen). A pinned Dioxide poller calls [`poll`](Self::poll) and
    /// [`wait`](Self::wait) in its own loop instead.
    pub fn run_until(&mut self, stop: &AtomicBool, idle_wait: Duration) {
        while !stop.load(Ordering::Relaxed) {
            if self.poll() == 0 {
                self.wait(idle_wait);
            }
        }
    }

    /// Sleeps until a socket of the group is readable (or writable with PDUs waiting), a
    /// connection arrives, a backend completion is posted, or `timeout` passes. Call it after
    /// a [`poll`](Self::poll) that did nothing: the group then costs no CPU while idle.
    pub fn wait(&mut self, timeout: Duration) {
        let mut w = std::mem::take(&mut self.sleep);
        w.clear();
        if self.prepare_sleep(&mut w) {
            w.timeout(timeout);
            w.sleep();
            self.end_sleep(&w);
        }
        self.sleep = w;
    }

    /// The first half of a sleep, shared by [`wait`](Self::wait) and a Dioxide poller that
    /// runs the group as a task: raises the notifier's flag, then looks for work once more (a
    /// completion posted after this look rings the eventfd, so none is missed) and returns
    /// false if there is some; else adds the eventfd, the listener and every open socket to
    /// `w`, and the housekeeping timeout ([`TargetOptions::housekeeping`]) while connections
    /// are open.
    ///
    /// [`TargetOptions::housekeeping`]: super::TargetOptions::housekeeping
    fn prepare_sleep(&mut self, w: &mut PollerWait) -> bool {
        let Some(n) = self.notifier.clone() else {
            // No eventfd: nap, completions from other threads are seen at the next round.
            w.timeout(Duration::from_millis(1));
            return true;
        };
        n.sleeping(true);
        if !self.inbox.queue.is_empty()
            || self.conns.iter().any(|c| c.has_completions())
            || crate::nvmf::backend::has_pending()
        {
            n.sleeping(false);
            return false;
        }
        w.fd(n.raw_fd(), false);
        if let Some(l) = &self.listener {
            w.fd(l.as_raw_fd(), false);
        }
        for i in self.conns.iter().filter_map(|c| c.interest()) {
            w.fd_events(i.fd, i.read, i.write);
        }
        if !self.conns.is_empty() {
            w.timeout(self.target.options().housekeeping);
        }
        true
    }

    /// The second half: lowers the flag, and looks only at what woke the sleep (each look is a
    /// system call, which an emulated CPU makes expensive): resets the eventfd if it rang and
    /// accepts next round if the listener is readable.
    fn end_sleep(&mut self, w: &PollerWait) {
        if let Some(n) = &self.notifier {
            n.sleeping(false);
            if w.ready(n.raw_fd()) {
                n.drain();
            }
        }
        if self
            .listener
            .as_ref()
            .is_some_and(|l| w.ready(l.as_raw_fd()))
        {
            self.accept_in = 0;
        }
        // A socket watched for input that `poll(2)` found empty is not read next round (at
        // QD1 the admin queue's socket, every command), one it found readable is read even if
        // the connection was skipping it. `ready` scans the descriptors, so a large group
        // reads every socket instead of paying connections × descriptors.
        let scan = self.conns.len() <= QUIET_SCAN_MAX;
        for c in &mut self.conns {
            if let Some(i) = c.interest().filter(|i| i.read) {
                c.woke(!scan || w.ready(i.fd));
            }
        }
    }

    /// One round: accept, adopt, poll every connection, reap the closed ones.
    pub fn poll(&mut self) -> usize {
        // Requests a poller could not start (they overlapped one in flight) go first.
        let mut work = crate::nvmf::backend::retry_pending();
        let accept = self.accept_in == 0;
        self.accept_in = if accept {
            ACCEPT_EVERY
        } else {
            self.accept_in - 1
        };
        if let Some(l) = self.listener.as_ref().filter(|_| accept) {
            for _ in 0..16 {
                match l.accept() {
                    Ok((s, _)) => {
                        work += 1;
                        let n = self.peers.len() + 1;
                        let i = self.next_peer % n;
                        self.next_peer = self.next_peer.wrapping_add(1);
                        if i == 0 {
                            self.inbox.push(s);
                        } else {
                            self.peers[i - 1].push(s);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => break,
                }
            }
        }
        while let Some(s) = self.inbox.queue.pop() {
            work += 1;
            if self.stopping {
                // Accepted before the listener closed: closed unread.
                drop(s);
                continue;
            }
            // A socket that cannot be configured is dropped (the host sees the close).
            let _ = self.add(s);
        }
        for c in &mut self.conns {
            work += c.poll();
        }
        let closed = &mut self.closed;
        self.conns.retain(|c| {
            if !c.is_closed() {
                return true;
            }
            closed.count += 1;
            closed.stats.add(&c.stats());
            log::debug!(
                "nvmf: {} closed ({})",
                c.peer(),
                c.close_reason().unwrap_or("the host left")
            );
            if let Some(r) = c.close_reason() {
                if closed.reasons.len() >= 32 {
                    closed.reasons.remove(0);
                }
                let q = c.qid().map_or("-".into(), |q| q.to_string());
                closed.reasons.push(format!("{} qid {q}: {r}", c.peer()));
            }
            false
        });
        work
    }
}

/// A group runs inside a pinned Dioxide poller (SPDK's poll-group model): each round of the
/// poller polls the group's sockets after the poller's own queue pairs, and what the
/// connections submit to a [`FileBackend`](crate::nvmf::FileBackend) goes to that poller's
/// queue pairs and completes on its thread. An idle poller sleeps in `poll(2)` on the group's
/// sockets, listener and eventfd together with its own wake-up eventfd.
impl PollerTask for PollGroup {
    fn poll(&mut self) -> usize {
        PollGroup::poll(self)
    }
    fn prepare_wait(&mut self, wait: &mut PollerWait) -> bool {
        self.prepare_sleep(wait)
    }
    fn end_wait(&mut self, wait: &PollerWait) {
        self.end_sleep(wait);
    }
}
