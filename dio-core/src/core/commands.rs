//! `DioCore::submit_commands`: a request whose device commands the upper layer has already
//! mapped (Flush, Write Zeroes, Deallocate, or writes of a zeroed buffer), with the same
//! request state, reference counting, single decision between `Queued` and waiting, error
//! precedence and exactly-once completion as [`DioCore::submit`].
//!
//! The walk of `submit` maps file offsets to blocks and the request's buffer to DMA segments;
//! here the upper layer gives each command: its [`BioOp`], first block, file offset, length in
//! bytes, and, for a command that carries data (a Write, or a Deallocate's range list), the
//! part of the request's buffer the device reads. A command without data (Flush, Write
//! Zeroes) gets no segment. The request is a write: its result is the sum of the commands'
//! lengths, or the first error by precedence.

use super::DioCore;
use crate::bio::BioOp;
use crate::completion::Completion;
use crate::dio::{Payload, Walk};
use crate::error::DioError;
use crate::hooks::Mapper;
use crate::request::{Dir, IoBuf, Mode, Outcome};

/// One device command of a [`DioCore::submit_commands`] request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Command {
    /// The device operation.
    pub op: BioOp,
    /// First logical block (0 for a Flush or a Deallocate, whose ranges are in its data).
    pub lba: u64,
    /// File offset of the first byte (for the bio and the completion).
    pub file_offset: u64,
    /// Bytes the command covers on the device (counted in the request's result).
    pub len: u64,
    /// `(offset, length)` in the request's buffer of the data the device reads, if any.
    pub data: Option<(u64, u64)>,
}

impl<B: IoBuf, M: Mapper + ?Sized> DioCore<B, M> {
    /// Submit one request made of `commands` (at least one). `offset` is the file offset the
    /// request is known by. In [`Mode::Async`] the request is `Queued` once every command was
    /// accepted; otherwise (sync, or a command refused or not mappable) the submitter waits
    /// for the accepted ones and the outcome is `Done` with the completion handed back, as
    /// for [`submit`](Self::submit). Never `Fallback`.
    pub fn submit_commands(
        &self,
        offset: u64,
        commands: impl IntoIterator<Item = Command>,
        buf: B,
        mode: Mode,
        completion: Completion<B>,
    ) -> Outcome<B> {
        let mut dio = self.state(Dir::Write, offset, u64::MAX);
        let mut w = Walk {
            first_ref: true,
            ..Walk::default()
        };
        let mut issued = 0u64;
        for c in commands {
            let seg = match c.data {
                Some((off, len)) => match buf.dma_map(off, len, Dir::Write) {
                    Ok(s) => Some(s),
                    Err(e) => {
                        w.submit_err = Some(e);
                        break;
                    }
                },
                None => None,
            };
            if !self.issue(&mut dio, (c.op, c.lba, c.file_offset, c.len, seg), &mut w) {
                break;
            }
            w.handled += c.len;
            issued += 1;
        }
        Self::unused_first_ref(&dio, &mut w);
        if issued == 0 && w.submit_err.is_none() {
            w.submit_err = Some(DioError::Invalid);
        }
        let queued = mode == Mode::Async && w.submit_err.is_none() && issued > 0;
        match self.drain(dio, &w, queued, Payload { buf, completion }) {
            None => Outcome::Queued,
            Some((result, buf, completion)) => Outcome::Done {
                result,
                buf,
                completion,
            },
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::bio::Bio;
    use crate::core::Config;
    use crate::hooks::{BioSink, Extent, Mapper, Rejected};
    use crate::request::DmaSegment;

    /// A buffer of `len` bytes whose segments remember where they start; mapping fails at
    /// offset `fault` if set.
    struct Buf {
        len: u64,
        fault: Option<u64>,
    }
    struct Seg(u64);
    impl DmaSegment for Seg {
        fn unmap(self) {}
    }
    impl IoBuf for Buf {
        type Seg = Seg;
        fn len(&self) -> u64 {
            self.len
        }
        fn dma_map(&self, off: u64, _len: u64, _dir: Dir) -> Result<Seg, DioError> {
            match self.fault {
                Some(f) if f == off => Err(DioError::Fault),
                _ => Ok(Seg(off)),
            }
        }
        fn zero_fill(&mut self, _off: u64, _len: u64) {}
    }

    /// Keeps the bios (completed by the test), or completes each on a thread of its own.
    struct Dev {
        held: Mutex<Vec<Bio<Buf>>>,
        spawn: bool,
    }
    impl BioSink<Buf> for Dev {
        fn submit(&self, bio: Bio<Buf>) -> Result<(), Rejected<Buf>> {
            if self.spawn {
                std::thread::spawn(move || bio.complete(Ok(())));
            } else {
                self.held.lock().unwrap().push(bio);
            }
            Ok(())
        }
    }
    struct NoMap;
    impl Mapper for NoMap {
        fn map(&self, _: u64, _: u64, _: Dir, _: bool) -> Result<Extent, DioError> {
            Err(DioError::Invalid)
        }
    }

    fn core(spawn: bool) -> (DioCore<Buf>, Arc<Dev>) {
        let dev = Arc::new(Dev {
            held: Mutex::new(Vec::new()),
            spawn,
        });
        (
            DioCore::new(dev.clone(), Arc::new(NoMap), Config::default()),
            dev,
        )
    }

    fn cmd(op: BioOp, lba: u64, len: u64, data: Option<(u64, u64)>) -> Command {
        Command {
            op,
            lba,
            file_offset: lba * 512,
            len,
            data,
        }
    }

    #[test]
    fn an_async_request_of_commands_completes_once_after_its_last_command() {
        let (core, dev) = core(false);
        let runs = Arc::new(AtomicUsize::new(0));
        let r2 = runs.clone();
        let cmds = [
            cmd(BioOp::WriteZeroes, 8, 4096, None),
            cmd(BioOp::Deallocate, 0, 1024, Some((4096, 32))),
            cmd(BioOp::Flush, 0, 0, None),
        ];
        let done = Completion::new(move |r, _b: Buf| {
            assert_eq!(r, Ok(5120));
            r2.fetch_add(1, Ordering::SeqCst);
        });
        let buf = Buf {
            len: 8192,
            fault: None,
        };
        let o = core.submit_commands(4096, cmds, buf, Mode::Async, done);
        assert!(o.is_queued());
        let bios: Vec<_> = std::mem::take(&mut *dev.held.lock().unwrap());
        let shape: Vec<_> = bios
            .iter()
            .map(|b| (b.op(), b.lba(), b.len(), b.segment().map(|s| s.0)))
            .collect();
        assert_eq!(
            shape,
            [
                (BioOp::WriteZeroes, 8, 4096, None),
                (BioOp::Deallocate, 0, 1024, Some(4096)),
                (BioOp::Flush, 0, 0, None),
            ]
        );
        for b in bios {
            assert_eq!(runs.load(Ordering::SeqCst), 0, "completed early");
            b.complete(Ok(()));
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_sync_request_waits_and_a_mapping_fault_stops_it_after_the_accepted_commands() {
        let (core, _dev) = core(true);
        let cmds = [
            cmd(BioOp::Write, 0, 512, Some((0, 512))),
            cmd(BioOp::Write, 1, 512, Some((0, 512))),
        ];
        let buf = || Buf {
            len: 512,
            fault: None,
        };
        match core.submit_commands(0, cmds, buf(), Mode::Sync, Completion::noop()) {
            Outcome::Done {
                result, completion, ..
            } => {
                completion.discard();
                assert_eq!(result, Ok(1024));
            }
            o => panic!("{o:?}"),
        }
        // The second command's data cannot be mapped: the first ran, the request failed with
        // a submission error, handed back (never through the completion).
        let cmds = [
            cmd(BioOp::Write, 0, 512, Some((0, 512))),
            cmd(BioOp::Write, 1, 512, Some((512, 512))),
        ];
        let faulty = Buf {
            len: 1024,
            fault: Some(512),
        };
        let never = Completion::new(|_, _: Buf| panic!("a refused request completed"));
        match core.submit_commands(0, cmds, faulty, Mode::Async, never) {
            Outcome::Done {
                result, completion, ..
            } => {
                completion.discard();
                assert_eq!(result, Err(DioError::Fault));
            }
            o => panic!("{o:?}"),
        }
        // No command at all: invalid.
        match core.submit_commands(0, [], buf(), Mode::Sync, Completion::noop()) {
            Outcome::Done {
                result, completion, ..
            } => {
                completion.discard();
                assert_eq!(result, Err(DioError::Invalid));
            }
            o => panic!("{o:?}"),
        }
    }
}
