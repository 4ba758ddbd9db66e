//! Serving a target from the pinned pollers of a [`Dioxide`] (SPDK's poll-group model): one
//! [`PollGroup`] per poller, run as a [`PollerTask`] on that poller's thread; the first group
//! owns the listener and spreads accepted connections round-robin over all groups. A
//! connection is polled by its poller together with that poller's NVMe queue pairs, and the
//! I/O it submits to a [`FileBackend`](crate::nvmf::FileBackend) goes to those queue pairs and
//! completes on that thread: no thread per connection, no blocking call on a poller, and an
//! idle poller sleeps in `poll(2)` on its sockets and its own wake-up together.
//!
//! [`Serving::stop`] ends every association before it lets a group go: each group closes its
//! listener and every connection (the hosts see their sockets close), then keeps polling on
//! its poller until the commands its connections had at the backend completed (each ends
//! once, into the connection that issued it, as Linux's `nvmet_sq_destroy` waits), and only
//! then reports and leaves its poller. A group that does not drain within the caller's
//! timeout (a device that stopped answering) is removed anyway and reports the commands it
//! abandoned; their completions then go nowhere, and the [`Dioxide`] shutdown that follows
//! waits for them.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::{Duration, Instant};

use super::group::{Inbox, PollGroup};
use super::{ConnStats, Target};
use crate::embed::poller::{PollerTask, PollerTaskId};
use crate::embed::sleep::PollerWait;
use crate::{Dioxide, EmbedError, EmbedResult};

/// What one poll group did, reported when it leaves its poller.
#[derive(Clone, Debug, Default)]
pub struct GroupReport {
    /// The poller (index into `Builder::pollers`) that ran the group.
    pub poller: usize,
    /// Connections it served (one per NVMe queue).
    pub connections: usize,
    /// Summed counters of those connections.
    pub stats: ConnStats,
    /// Commands still at the backend when the group left its poller: 0 unless
    /// [`Serving::stop`]'s timeout passed before they completed.
    pub abandoned: usize,
}

/// A target served by the pollers of a [`Dioxide`]; see the module docs.
#[derive(Debug)]
pub struct Serving {
    addr: SocketAddr,
    ids: Vec<PollerTaskId>,
    inboxes: Vec<Inbox>,
    reports: Receiver<GroupReport>,
    stop: Arc<AtomicBool>,
}

/// A poll group on its poller; reports once it drained after [`Serving::stop`] asked it to
/// end, or when dropped (on the poller thread) if it had not.
struct ServedGroup {
    group: PollGroup,
    poller: usize,
    tx: Sender<GroupReport>,
    stop: Arc<AtomicBool>,
    reported: bool,
}

impl ServedGroup {
    fn report(&mut self) {
        if std::mem::replace(&mut self.reported, true) {
            return;
        }
        let _ = self.tx.send(GroupReport {
            poller: self.poller,
            connections: self.group.adopted(),
            stats: self.group.totals(),
            abandoned: self.group.in_flight(),
        });
    }
}

impl PollerTask for ServedGroup {
    fn poll(&mut self) -> usize {
        if !self.stop.load(Ordering::Acquire) {
            return self.group.poll();
        }
        self.group.stop_serving();
        let work = self.group.poll();
        if self.group.is_empty() {
            self.report();
        }
        work
    }
    fn prepare_wait(&mut self, wait: &mut PollerWait) -> bool {
        PollerTask::prepare_wait(&mut self.group, wait)
    }
    fn end_wait(&mut self, wait: &PollerWait) {
        PollerTask::end_wait(&mut self.group, wait);
    }
}

impl Drop for ServedGroup {
    fn drop(&mut self) {
        let n = self.group.in_flight();
        if !self.reported && n > 0 {
            log::warn!(
                "nvmf: poller {}: its poll group leaves with {n} command(s) still at the \
                 backend: their completions are dropped",
                self.poller
            );
        }
        self.report();
    }
}

impl Serving {
    /// Serves `target` on `listener` from every poller of `dx` (one poll group each).
    /// Errors: `dx` runs to completion (no poller), or is shutting down.
    pub fn start(
        target: &Arc<Target>,
        dx: &Dioxide,
        listener: TcpListener,
    ) -> EmbedResult<Serving> {
        let pollers = dx.poller_stats().len();
        if pollers == 0 {
            return Err(EmbedError::Config(
                "an NVMe/TCP target needs pollers; build the Dioxide with Builder::pollers",
            ));
        }
        let addr = listener.local_addr().map_err(EmbedError::Spawn)?;
        let mut groups: Vec<PollGroup> = (0..pollers)
            .map(|_| PollGroup::new(target.clone()))
            .collect();
        let inboxes: Vec<Inbox> = groups.iter().map(|g| g.inbox()).collect();
        groups[0]
            .listen(listener, inboxes[1..].to_vec())
            .map_err(EmbedError::Spawn)?;
        let (tx, reports) = channel();
        let stop = Arc::new(AtomicBool::new(false));
        let mut ids = Vec::new();
        for (poller, group) in groups.into_iter().enumerate() {
            let task = ServedGroup {
                group,
                poller,
                tx: tx.clone(),
                stop: stop.clone(),
                reported: false,
            };
            match dx.add_poller_task(poller, task) {
                Ok(id) => ids.push(id),
                Err(e) => {
                    for id in ids {
                        dx.remove_poller_task(id);
                    }
                    return Err(e);
                }
            }
        }
        log::info!("nvmf: serving {addr} from {pollers} poller(s)");
        Ok(Serving {
            addr,
            ids,
            inboxes,
            reports,
            stop,
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes the listener and every connection, waits up to `timeout` for the commands
    /// they had at the backend to complete (each group reports once its own did), then
    /// removes the groups from their pollers; returns the reports, by poller (one whose
    /// group had not drained by then counts what it [`abandoned`](GroupReport::abandoned)).
    pub fn stop(self, dx: &Dioxide, timeout: Duration) -> Vec<GroupReport> {
        self.stop.store(true, Ordering::Release);
        for i in &self.inboxes {
            i.wake();
        }
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        while out.len() < self.ids.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.reports.recv_timeout(left) {
                Ok(r) => out.push(r),
                Err(_) => break,
            }
        }
        for id in &self.ids {
            dx.remove_poller_task(*id);
        }
        // The groups that had not drained report as they are dropped, on their pollers.
        let grace = Instant::now() + Duration::from_secs(1);
        while out.len() < self.ids.len() {
            let left = grace.saturating_duration_since(Instant::now());
            match self.reports.recv_timeout(left) {
                Ok(r) => out.push(r),
                Err(_) => break,
            }
        }
        out.sort_by_key(|r| r.poller);
        out
    }
}
