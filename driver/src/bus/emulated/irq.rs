//! The emulated controller's interrupt vectors: one eventfd per MSI-X vector, made when the
//! driver asks for the vector ([`Bus::interrupt`](crate::bus::Bus::interrupt)) and written by
//! the controller each time it posts a completion to a completion queue created with IEN set
//! and that vector (see `Cq::try_post`). A completion queue may name a vector nobody asked for
//! yet: its eventfd is made then, and handed out when the driver asks.

use std::sync::{Arc, Mutex};

use super::queue::lock;
use crate::bus::interrupt::{EventFd, InterruptError};

/// The vector table: as many vectors as queue ids (admin queue included).
pub(crate) struct Vectors {
    table: Mutex<Vec<Option<Arc<EventFd>>>>,
}

impl Vectors {
    pub(crate) fn new(count: usize) -> Vectors {
        Vectors {
            table: Mutex::new(vec![None; count]),
        }
    }

    /// Vectors the controller has.
    pub(crate) fn count(&self) -> usize {
        lock(&self.table).len()
    }

    /// The eventfd of `vector` (made on the first call); vector 0, the admin queue's, is polled
    /// and not handed out.
    pub(crate) fn get(&self, vector: u16) -> Result<Arc<EventFd>, InterruptError> {
        let available = self.count().min(u16::MAX as usize) as u16;
        if vector == 0 || vector >= available {
            return Err(InterruptError::NoVector {
                location: "emulated".into(),
                vector,
                available,
            });
        }
        self.target(vector)
    }

    /// The eventfd a completion queue with IEN set and vector `vector` signals, made if nobody
    /// asked for the vector yet (as an MSI-X table entry exists before the host unmasks it).
    pub(crate) fn target(&self, vector: u16) -> Result<Arc<EventFd>, InterruptError> {
        let mut t = lock(&self.table);
        let slot = &mut t[vector as usize];
        if let Some(fd) = slot {
            return Ok(fd.clone());
        }
        let fd = Arc::new(EventFd::new().map_err(|source| InterruptError::Io {
            location: "emulated".into(),
            step: "create an eventfd for an interrupt vector",
            source,
        })?);
        *slot = Some(fd.clone());
        Ok(fd)
    }
}
