//! NVM command set I/O commands: the per-I/O path of the device.
//!
//! For the memory and null backings this path makes no allocation and no system call: the PRP
//! segments go to the queue's reused scratch list, data moves with raw copies (memory) or not at
//! all (null). The null backing still walks and translates the PRPs, so a driver that builds a
//! bad PRP is caught there too; walking costs no copies.

use std::sync::atomic::Ordering;

use super::device::{Device, Outcome, generic};
use super::prp::Seg;
use crate::spec::sqe::{DSM_AD, RW_FUA, io};
use crate::spec::status::{generic as g, media};
use crate::spec::{Oncs, Sct, Sqe, Status};

/// Broadcast NSID (Flush of every namespace).
const NSID_ALL: u32 = 0xffff_ffff;

const fn done(s: Status) -> Outcome {
    Outcome::Done(s, 0)
}

impl Device {
    pub(crate) fn io(&self, qid: u16, sqe: &Sqe, segs: &mut Vec<Seg>) -> Outcome {
        if sqe.fuse() != 0 || sqe.psdt() != 0 {
            return done(generic(g::INVALID_FIELD));
        }
        let op = sqe.opcode();
        if !matches!(
            op,
            io::READ | io::WRITE | io::FLUSH | io::WRITE_ZEROES | io::DATASET_MANAGEMENT
        ) {
            return done(generic(g::INVALID_OPCODE));
        }
        // The optional commands exist only as Identify Controller's ONCS says.
        let oncs = self.props.oncs;
        if (op == io::WRITE_ZEROES && !oncs.contains(Oncs::WRITE_ZEROES))
            || (op == io::DATASET_MANAGEMENT && !oncs.contains(Oncs::DSM))
        {
            return done(generic(g::INVALID_OPCODE));
        }
        if op == io::FLUSH && sqe.nsid == NSID_ALL {
            for ns in &self.namespaces {
                if ns.flush().is_err() {
                    return done(Status::new(Sct::Media, media::WRITE_FAULT));
                }
            }
            return done(Status::SUCCESS);
        }
        let nsid = sqe.nsid;
        if nsid == 0 || nsid as usize > self.namespaces.len() {
            return done(generic(g::INVALID_NAMESPACE));
        }
        let ns = &self.namespaces[nsid as usize - 1];
        match op {
            io::READ | io::WRITE => {
                if ns.metadata != 0 {
                    // The format is modelled, not the metadata transfer (see NamespaceConfig).
                    return done(generic(g::INVALID_FIELD));
                }
                let blocks = sqe.nlb() as u64 + 1;
                let bytes = blocks << ns.shift;
                if self.max_transfer().is_some_and(|m| bytes > m) {
                    return done(generic(g::INVALID_FIELD));
                }
                let slba = sqe.slba();
                if slba.checked_add(blocks).is_none_or(|e| e > ns.blocks) {
                    return done(generic(g::LBA_OUT_OF_RANGE));
                }
                if let Err(s) = self.map_data(sqe, bytes as usize, segs) {
                    return done(s);
                }
                let slot = &self.sqs[qid as usize];
                if op == io::READ {
                    if ns.read(slba, blocks, segs).is_err() {
                        return done(Status::new(Sct::Media, media::UNRECOVERED_READ_ERROR));
                    }
                    slot.read_cmds.fetch_add(1, Ordering::Relaxed);
                    slot.read_bytes.fetch_add(bytes, Ordering::Relaxed);
                } else {
                    let fua = sqe.cdw12 & RW_FUA != 0;
                    if ns.write(slba, blocks, segs, fua).is_err() {
                        return done(Status::new(Sct::Media, media::WRITE_FAULT));
                    }
                    slot.write_cmds.fetch_add(1, Ordering::Relaxed);
                    slot.write_bytes.fetch_add(bytes, Ordering::Relaxed);
                }
                done(Status::SUCCESS)
            }
            io::FLUSH => match ns.flush() {
                Ok(()) => done(Status::SUCCESS),
                Err(_) => done(Status::new(Sct::Media, media::WRITE_FAULT)),
            },
            io::WRITE_ZEROES => {
                let blocks = sqe.nlb() as u64 + 1;
                let slba = sqe.slba();
                // WZSL, in units of the minimum memory page size (4 KiB here).
                let wzsl = self.props.wzsl;
                if wzsl != 0 && blocks << ns.shift > 4096u64 << wzsl.min(40) {
                    return done(generic(g::INVALID_FIELD));
                }
                if slba.checked_add(blocks).is_none_or(|e| e > ns.blocks) {
                    return done(generic(g::LBA_OUT_OF_RANGE));
                }
                match ns.zero(slba, blocks) {
                    Ok(()) => done(Status::SUCCESS),
                    Err(_) => done(Status::new(Sct::Media, media::WRITE_FAULT)),
                }
            }
            io::DATASET_MANAGEMENT => self.dsm(ns, sqe, segs),
            _ => unreachable!("opcode checked above"),
        }
    }

    fn dsm(&self, ns: &super::namespace::Namespace, sqe: &Sqe, segs: &mut Vec<Seg>) -> Outcome {
        let nr = (sqe.cdw10 & 0xff) as usize + 1;
        let mut buf = [0u8; 256 * 16];
        let len = nr * 16;
        if let Err(s) = self.map_data(sqe, len, segs) {
            return done(s);
        }
        super::prp::Cursor::new(segs).read_in(&mut buf[..len]);
        if sqe.cdw11 & DSM_AD == 0 {
            // Only deallocation has an effect; the other attributes are hints.
            return done(Status::SUCCESS);
        }
        let range = |i: usize| {
            let r = &buf[i * 16..(i + 1) * 16];
            let nlb = u32::from_le_bytes(r[4..8].try_into().expect("4 bytes")) as u64;
            let slba = u64::from_le_bytes(r[8..16].try_into().expect("8 bytes"));
            (slba, nlb)
        };
        for i in 0..nr {
            let (slba, nlb) = range(i);
            if slba.checked_add(nlb).is_none_or(|e| e > ns.blocks) {
                return done(generic(g::LBA_OUT_OF_RANGE));
            }
        }
        for i in 0..nr {
            let (slba, nlb) = range(i);
            if nlb > 0 && ns.zero(slba, nlb).is_err() {
                return done(Status::new(Sct::Media, media::WRITE_FAULT));
            }
        }
        done(Status::SUCCESS)
    }
}
