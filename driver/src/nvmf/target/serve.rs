//! Serving a target from the pinned pollers of a [`Dioxide`] (SPDK's poll-group model): one
//! [`PollGroup`] per poller, run as a [`PollerTask`] on that poller's thread; the first group
//! owns the listener and spreads accepted connections round-robin over all groups. A
//! connection is polled by its poller together with that poller's NVMe queue pairs, and the
//! I/O it submits to a [`FileBackend`](crate::nvmf::FileBackend) goes to those queue pairs and
//! completes on that thread: no thread per connection, no blocking call on a poller, and an
//! idle poller sleeps in `poll(2)` on its sockets and its own wake-up together.
//!
//! [`Serving::stop`] removes the groups from their pollers: every connection is closed (the
//! hosts see their sockets close), the listener too, and each group reports what it did.
//! I/O still in flight completes into connections that no longer exist and is freed; the
//! caller then shuts the [`Dioxide`] down, which waits for it.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
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
}

/// A target served by the pollers of a [`Dioxide`]; see the module docs.
#[derive(Debug)]
pub struct Serving {
    addr: SocketAddr,
    ids: Vec<PollerTaskId>,
    inboxes: Vec<Inbox>,
    reports: Receiver<GroupReport>,
}

/// A poll group on its poller; reports when dropped (on the poller thread).
struct ServedGroup {
    group: PollGroup,
    poller: usize,
    tx: Sender<GroupReport>,
}

impl PollerTask for ServedGroup {
    fn poll(&mut self) -> usize {
        self.group.poll()
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
        let _ = self.tx.send(GroupReport {
            poller: self.poller,
            connections: self.group.adopted(),
            stats: self.group.totals(),
        });
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
        let mut ids = Vec::new();
        for (poller, group) in groups.into_iter().enumerate() {
            let task = ServedGroup {
                group,
                poller,
                tx: tx.clone(),
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
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Removes the groups from their pollers (closing every connection and the listener) and
    /// waits up to `timeout` for each to report; returns the reports received, by poller.
    pub fn stop(self, dx: &Dioxide, timeout: Duration) -> Vec<GroupReport> {
        for id in &self.ids {
            dx.remove_poller_task(*id);
        }
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
        out.sort_by_key(|r| r.poller);
        out
    }
}
