//! Poll groups (SPDK's model): each owns connections and polls them; one may also own the
//! listener and spread accepted connections over every group round-robin.
//!
//! [`PollGroup::poll`] never blocks: it accepts what the listener has, adopts connections
//! handed to it, polls each connection once, drops the closed ones, and returns the work done
//! (0: idle, the caller may back off). Who calls it (a pinned Dioxide poller, or
//! [`PollGroup::run_until`] on a thread of its own) is the caller's choice.

use std::io;
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crossbeam_queue::SegQueue;

use super::Target;
use super::conn::{ConnStats, Connection};

/// Where other groups (the listener's) hand this group new connections.
#[derive(Clone, Debug, Default)]
pub struct Inbox(Arc<SegQueue<TcpStream>>);

impl Inbox {
    /// Hands a connection to the group.
    pub fn push(&self, s: TcpStream) {
        self.0.push(s);
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
    closed: ClosedLog,
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
    /// An empty group.
    pub fn new(target: Arc<Target>) -> PollGroup {
        PollGroup {
            target,
            listener: None,
            peers: Vec::new(),
            next_peer: 0,
            inbox: Inbox::default(),
            conns: Vec::new(),
            closed: ClosedLog::default(),
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
        let c = Connection::new(self.target.clone(), sock)?;
        self.conns.push(c);
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
    /// What the closed connections did and why they closed.
    pub fn closed(&self) -> &ClosedLog {
        &self.closed
    }

    /// Polls on the calling thread until `stop`; an idle round sleeps `idle_sleep`, a busy one
    /// goes straight on. (A pinned Dioxide poller calls [`poll`](Self::poll) in its own loop
    /// instead.)
    pub fn run_until(&mut self, stop: &AtomicBool, idle_sleep: Duration) {
        while !stop.load(Ordering::Relaxed) {
            if self.poll() == 0 {
                std::thread::sleep(idle_sleep);
            }
        }
    }

    /// One round: accept, adopt, poll every connection, reap the closed ones.
    pub fn poll(&mut self) -> usize {
        let mut work = 0;
        if let Some(l) = &self.listener {
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
        while let Some(s) = self.inbox.0.pop() {
            work += 1;
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
            let s = c.stats();
            closed.stats.pdus_in += s.pdus_in;
            closed.stats.pdus_out += s.pdus_out;
            closed.stats.commands += s.commands;
            closed.stats.errors += s.errors;
            closed.stats.term_sent += s.term_sent;
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
