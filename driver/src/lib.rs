//! Dioxide: a polled-mode userspace NVMe driver, in the spirit of SPDK's `lib/nvme` and ixy.rs.
//!
//! # Layers
//! Bottom up; the source tree has one folder per layer, and every module but [`spec`] is private:
//! what an application may use is re-exported here, at the crate root.
//! * `spec/`, the public module [`spec`]: the NVMe specification as values (registers, the
//!   64-byte [`spec::Sqe`] and 16-byte [`spec::Cqe`], identify pages, status codes with their
//!   names). Nothing there touches a device.
//! * `bus/`: **the seam**. A [`Bus`] gives 32/64-bit access to BAR0 registers, [`Doorbell`]
//!   handles, and the [`DmaMemory`] the controller can reach. Two backends, each behind a cargo
//!   feature of the same name (both on by default): [`vfio`] (a real PCI function) and
//!   [`emulated`] (an in-process NVMe controller for tests and for measuring the driver's own
//!   cost). Nothing above the seam knows which one it talks to.
//! * `nvme/`: the NVMe core.
//!   * the controller: bring-up as an explicit state machine with a time limit per state
//!     ([`InitState`]), namespaces ([`Namespace`]), queue-pair creation, shutdown on drop
//!     (CC.SHN), [`Controller::reset`] (CC.EN = 0 deletes every queue; no Delete SQ/CQ first);
//!   * the admin queue (one command at a time behind a `Mutex`, polled with a timeout) and typed
//!     admin commands: identify, features, log pages, abort ([`AbortOutcome`]); Asynchronous
//!     Event Requests kept outstanding, their events decoded and offered ([`AsyncEvent`],
//!     [`Controller::async_events`]) and re-armed;
//!   * [`QueuePair`]: one I/O queue pair, the per-I/O path, and the PRP entries it needs;
//!   * [`Error`] for what a call returns, [`IoError`] for how a request ended.
//! * `embed/`: the embedding layer ([`Dioxide`], pollers, [`BlockFile`], [`PageCache`]), below.
//! * `nvmf/`: NVMe over TCP: the target ([`NvmfTarget`]) and the host transport ([`NvmfHost`]).
//! * `transport/`: the seam above the queue pair, like SPDK's `nvme_transport`:
//!   [`TransportController`] and [`TransportQueue`] over PCIe ([`Controller`], [`QueuePair`])
//!   and NVMe/TCP ([`TcpController`], [`TcpQueue`]), statically dispatched (one `match` per
//!   call), with [`TransportBuf`] data buffers; `perf` runs on it.
//!
//! # What runs where
//! Bring-up, admin commands, queue creation and deletion run on the caller's thread, under the
//! controller's admin lock; they allocate and may sleep. A [`QueuePair`] belongs to one thread
//! (`Send`, not `Sync`) and its per-I/O path takes no lock, allocates nothing and makes no
//! system call: submission pops a slot from a fixed pool, writes the PRP list into the slot's
//! own page and the 64-byte command into the SQ with volatile stores; [`QueuePair::poll`]
//! consumes completions by phase tag and writes each doorbell at most once per call. The clock
//! is read only every few thousand polls (or every 64 empty ones) for timeouts and health
//! checks. With the emulated controller in inline mode, the "device" runs inside the doorbell
//! write on the same thread; in threaded mode it runs on its own thread.
//!
//! # DMA memory ownership
//! Queue memory (SQ, CQ, PRP list pages) is shared with the device for the queue's whole life
//! and accessed only with volatile or atomic operations. Data buffers come from
//! [`DmaMemory::alloc`] ([`Controller::alloc`]); a buffer belongs to the CPU while no command uses
//! it and to the device while one does. The API enforces this four ways:
//! * **blocking** calls ([`QueuePair::read_blocking`], ...) borrow a slice of DMA memory for the
//!   duration of the call, and return only once the device has let go of it (even after a
//!   timeout);
//! * **owned** calls ([`QueuePair::read`], [`QueuePair::write`]) take a context that owns its
//!   buffer ([`DmaOwner`]: a [`DmaBuffer`], or `(DmaBuffer, C)`) and hand it back with the
//!   result;
//! * **raw** calls ([`QueuePair::read_raw`], ...) take a [`DmaSlice`] under an `unsafe`
//!   contract: perf's submit-N / ring-once / poll-all path with a `u64` tag;
//! * **held** calls ([`QueuePair::submit_held`], [`QueuePair::deallocate_list_held`]) take a
//!   [`DmaSlice`] and a small context under an `unsafe` contract (the memory stays allocated
//!   and untouched until the context is handed back, which happens only once the device has let
//!   go of it): the embedding layer's path, whose context is a two-word completion handle.
//!
//! # Trusting nothing
//! Registers that read all ones mean the device is gone; CSTS.CFS means it failed; a completion
//! naming a command that is not in flight, another SQ, or an SQ head outside the queue is
//! counted and reported ([`ProtocolError`]) and never followed. A command that does not complete
//! in time is reported once as [`IoError::Timeout`], aborted, and its command id quarantined until
//! the device gives it back.
//!
//! # Example
//! ```
//! # #[cfg(feature = "emulated")] {
//! use dioxide::emulated::{EmulatedConfig, EmulatedController};
//! use dioxide::{Controller, Lba, QueueOptions};
//!
//! let emu = EmulatedController::new(EmulatedConfig::default())?;
//! let ctrl = Controller::new(emu)?;
//! let ns = ctrl.namespaces().remove(0);
//! let mut q = ctrl.create_qpair::<u64>(QueueOptions::default())?;
//! let mut buf = ctrl.alloc(4096)?;
//! buf.as_mut_slice().fill(0xab);
//! q.write_blocking(&ns, Lba(0), buf.as_slice())?;
//! q.read_blocking(&ns, Lba(0), buf.as_mut_slice())?;
//! # }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Embedding: pollers, files, dio-core
//! An appliance embeds Dioxide through [`Dioxide`] (no `unsafe` on its side):
//! * [`Dioxide::builder`] takes controllers and the cores of the **pollers** ([`PollerStats`]):
//!   threads pinned with `sched_setaffinity` (a core that does not exist is
//!   [`EmbedError::Pin`]), each owning one queue pair per controller. Other threads hand them
//!   bios through a bounded lock-free ring per poller; idle pollers poll on for a bounded time
//!   ([`Builder::poller_idle`]), then park on a crossbeam-utils `Parker` and are unparked by new
//!   work. A client waiting for its completion spins briefly ([`Builder::wait_spin`]), then
//!   parks; the poller wakes it only if it parked. [`Builder::run_to_completion`] instead lets the
//!   building thread own the queue pairs and poll them while it waits (dio-core
//!   `Wait::PollInPlace`).
//! * [`Dioxide::open_file`] gives a [`BlockFile`] on an LBA range of a namespace: a logical
//!   size (`len`) and a capacity. [`BlockFile::read_at`]/[`BlockFile::write_at`] take any slice;
//!   [`BlockFile::read`]/[`BlockFile::write`] and [`BlockFile::submit`] take an [`IoBuffer`]:
//!   a [`DmaBuffer`] (zero copy for the block-aligned part) or a `Vec<u8>` (through the page
//!   cache). `submit` returns `Ok` and its callback runs exactly once, or returns the error and
//!   the callback never runs. Reads stop at `len`; writes past it extend it (synchronously, with
//!   an [`FileOptions::on_extend`] hook to persist it).
//! * The buffered path is a write-through [`PageCache`] in DMA memory (4 KiB pages, CLOCK);
//!   direct writes invalidate the pages they overlap; a per-file range lock serialises
//!   requests touching a common page (see `embed/blockfile.rs` for the exact "latest data" rule).
//! * Callbacks run on the poller by default, or on a thread of the appliance's
//!   ([`Completions::Deferred`], [`CompletionThread`]).
//! * [`BlockFile::flush`], [`BlockFile::write_zeroes`] and [`BlockFile::deallocate`] (and their
//!   asynchronous `submit_*` forms) send NVMe Flush (when the controller has a volatile write
//!   cache), Write Zeroes (split at 65536 blocks and WZSL; writes of a zeroed buffer when ONCS
//!   lacks it) and Dataset Management / Deallocate (up to 256 ranges per command; refused
//!   without ONCS support), each one dio-core request under the file's range lock.
//!
//! ```
//! # #[cfg(feature = "emulated")] {
//! use dioxide::emulated::{EmulatedConfig, EmulatedController, Mode, NamespaceConfig};
//! use dioxide::{Controller, Dioxide, FileOptions, Nsid, Request};
//!
//! let emu = EmulatedController::new(EmulatedConfig {
//!     mode: Mode::Threaded,
//!     namespaces: vec![NamespaceConfig::memory(512, 8192)],
//!     ..EmulatedConfig::default()
//! })?;
//! let dx = Dioxide::builder()
//!     .controller(Controller::new(emu)?)
//!     .pollers([None, None])
//!     .build()?;
//! let file = dx.open_file(0, Nsid(1), FileOptions::new(0, 4096))?;
//! // Any memory, any offset: unaligned parts go through the page cache.
//! assert_eq!(file.write_at(b"hello, dioxide", 100)?, 14);
//! assert_eq!(file.len(), 114);
//! let mut back = [0u8; 14];
//! assert_eq!(file.read_at(&mut back, 100)?, 14);
//! assert_eq!(&back, b"hello, dioxide");
//! // Zero copy and asynchronous: a DMA buffer, block aligned.
//! let mut buf = file.alloc(4096)?;
//! buf.as_mut_slice().fill(7);
//! let (tx, rx) = std::sync::mpsc::channel();
//! file.submit(Request::write(4096, buf), move |done| tx.send(done).unwrap())
//!     .map_err(|r| r.error)?;
//! let done = rx.recv()?;
//! assert_eq!(done.result?, 4096);
//! assert_eq!(file.len(), 8192);
//! // Maintenance: Write Zeroes, Deallocate (Dataset Management) and Flush on the device.
//! file.write_zeroes(0, 4096)?;
//! file.deallocate(&[4096..8192])?;
//! file.flush()?;
//! assert_eq!(file.read_at(&mut back, 100)?, 14);
//! assert_eq!(back, [0u8; 14]);
//! dx.shutdown();
//! # }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![warn(missing_docs)]

// The library logs through the `log` crate and never prints.
#[cfg_attr(not(test), deny(clippy::print_stdout, clippy::print_stderr))]
mod bus;
#[cfg_attr(not(test), deny(clippy::print_stdout, clippy::print_stderr))]
mod embed;
#[cfg_attr(not(test), deny(clippy::print_stdout, clippy::print_stderr))]
mod nvme;
#[cfg_attr(not(test), deny(clippy::print_stdout, clippy::print_stderr))]
pub mod spec;
mod types;

// The transport seam: one controller and one I/O queue type over PCIe and NVMe/TCP.
#[cfg_attr(not(test), deny(clippy::print_stdout, clippy::print_stderr))]
mod transport;

// NVMe over TCP (target and host): a private module, its API re-exported below.
#[cfg_attr(not(test), deny(clippy::print_stdout, clippy::print_stderr))]
mod nvmf;

#[cfg(feature = "emulated")]
pub use bus::emulated;
#[cfg(feature = "vfio")]
pub use bus::vfio;

pub use bus::dma::{ChunkSource, DmaBuffer, DmaChunk, DmaError, DmaMemory, DmaSlice};
pub use bus::interrupt::{EventFd, InterruptError};
pub use bus::{Bus, Doorbell, DoorbellSink, PciId};
pub use embed::blockfile::{BlockFile, Completed, ExtendHook, FileOptions, Refused, Request};
pub use embed::cache::{CacheStats, PageCache};
pub use embed::error::{EmbedError, EmbedResult, MaintOp, Op};
pub use embed::iobuf::IoBuffer;
pub use embed::poller::{PollerStats, PollerTask, PollerTaskId};
pub use embed::sleep::{InterruptMode, PollerWait};
pub use embed::{Builder, CompletionThread, Completions, Dioxide};
pub use nvme::admin::AbortOutcome;
pub use nvme::aer::{AsyncEvent, AsyncEventType};
pub use nvme::controller::{Controller, ControllerOptions, InitState};
pub use nvme::error::{DeadReason, Error, IoError, ProtocolError, Result};
pub use nvme::namespace::Namespace;
pub use nvme::qpair::{
    DmaOwner, DoorbellMode, IoDone, IoFlags, IoOp, IoResult, QueueOptions, QueuePair, QueueStats,
    Rejected, Resubmit,
};
pub use transport::trid;
pub use transport::{
    HostBuf, HostChunks, TcpController, TcpOptions, TcpQueue, TransportBuf, TransportController,
    TransportError, TransportIoError, TransportQueue, TransportRejected,
};
pub use types::{Cid, Iova, Lba, Nsid, QueueId};

pub use nvmf::{
    Backend as NvmfBackend, BackendIo as NvmfIo, BackendOp as NvmfOp, ClosedLog as NvmfClosedLog,
    ConnStats as NvmfConnStats, Digests as NvmfDigests, FileBackend as NvmfFileBackend,
    GroupReport as NvmfGroupReport, HostCompletion as NvmfHostCompletion,
    HostController as NvmfHost, HostData as NvmfHostData, HostError as NvmfHostError,
    HostOptions as NvmfHostOptions, HostQueue as NvmfHostQueue, Inbox as NvmfInbox,
    IoCompletion as NvmfCompletion, MemBackend as NvmfMemBackend, NsInfo as NvmfNamespace,
    PollGroup as NvmfPollGroup, Serving as NvmfServing, Subsystem as NvmfSubsystem,
    Target as NvmfTarget, TargetOptions as NvmfTargetOptions,
};
pub use nvmf::{
    DEFAULT_HOSTNQN as NVMF_DEFAULT_HOSTNQN, DISCOVERY_NQN as NVMF_DISCOVERY_NQN,
    DiscoveryEntry as NvmfDiscoveryEntry,
};
