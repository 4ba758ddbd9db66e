//! Fabrics commands of a connection: Connect (admin and I/O queues), Property Get/Set,
//! Disconnect.

use std::sync::Arc;

use super::{ADMIN_QUEUE_DEPTH, Binding, Connection, cs_dnr, dnr};
use crate::nvmf::fabrics::{
    self, CNTLID_DYNAMIC, CONNECT_DATA_LEN, Connect, ConnectData, connect_data, fctype, sc as fsc,
};
use crate::nvmf::target::ctrl::{AttachRefused, Ctrl};
use crate::spec::status::generic;
use crate::spec::{Sqe, Status};

impl Connection {
    pub(super) fn fabrics(&mut self, slot: u16, sqe: &Sqe) {
        match fabrics::fctype_of(sqe) {
            fctype::CONNECT => self.connect(slot, sqe),
            fctype::PROPERTY_GET | fctype::PROPERTY_SET => {
                let Some(b) = self.queue.as_ref().filter(|b| b.qid == 0) else {
                    return self.respond(slot, dnr(generic::COMMAND_SEQUENCE_ERROR), 0);
                };
                let (ofs, eight) = (sqe.cdw11, sqe.cdw10 & 1 != 0);
                if fabrics::fctype_of(sqe) == fctype::PROPERTY_GET {
                    match b.ctrl.property_get(ofs, eight) {
                        Ok(v) => self.respond2(slot, Status::SUCCESS, v as u32, (v >> 32) as u32),
                        Err(e) => self.respond(slot, e, 0),
                    }
                } else {
                    let v = sqe.cdw12 as u64 | (sqe.cdw13 as u64) << 32;
                    match b.ctrl.property_set(ofs, eight, v) {
                        Ok(()) => self.respond(slot, Status::SUCCESS, 0),
                        Err(e) => self.respond(slot, e, 0),
                    }
                }
            }
            fctype::DISCONNECT => {
                let Some(b) = &self.queue else {
                    return self.respond(slot, dnr(generic::COMMAND_SEQUENCE_ERROR), 0);
                };
                // The queue takes no more commands; the response waits until the commands it
                // has at the backend completed (on the admin queue: every command of the
                // association, which ends now).
                if b.qid == 0 {
                    self.target.end_ctrl(&b.ctrl);
                }
                self.disconnect = Some(slot);
                self.finish_disconnect();
            }
            _ => self.respond(slot, dnr(generic::INVALID_OPCODE), 0),
        }
    }

    pub(super) fn connect(&mut self, slot: u16, sqe: &Sqe) {
        let c = Connect::from_sqe(sqe);
        let invalid = |dw0: u32| (cs_dnr(fsc::CONNECT_INVALID_PARAMETERS), dw0);
        let r: Result<(Arc<Ctrl>, u16, u32), (Status, u32)> = (|| {
            if self.queue.is_some() {
                return Err((dnr(generic::COMMAND_SEQUENCE_ERROR), 0));
            }
            if c.recfmt != 0 {
                return Err((cs_dnr(fsc::INCOMPATIBLE_FORMAT), 0));
            }
            let data = self.slots[slot as usize]
                .buf
                .as_ref()
                .map(|b| b.as_slice())
                .filter(|d| d.len() >= CONNECT_DATA_LEN)
                .ok_or((dnr(fsc::DATA_SGL_LENGTH_INVALID), 0))?;
            let cd = ConnectData::from_bytes(data)
                .map_err(|ofs| invalid(fabrics::invalid_param_in_data(ofs)))?;
            let Some(subsys) = self.target.subsystem(&cd.subnqn) else {
                return Err(invalid(fabrics::invalid_param_in_data(
                    connect_data::SUBNQN,
                )));
            };
            if !subsys.allows(&cd.hostnqn) {
                return Err((
                    cs_dnr(fsc::CONNECT_INVALID_HOST),
                    fabrics::invalid_param_in_data(connect_data::HOSTNQN),
                ));
            }
            let max_depth = match c.qid {
                0 => self.target.options().max_queue_depth.max(ADMIN_QUEUE_DEPTH),
                _ => self.target.options().max_queue_depth,
            };
            if c.sqsize == 0 || c.sqsize >= max_depth {
                return Err(invalid(fabrics::invalid_param_in_cmd(44)));
            }
            if c.qid == 0 {
                if cd.cntlid != CNTLID_DYNAMIC {
                    return Err(invalid(fabrics::invalid_param_in_data(
                        connect_data::CNTLID,
                    )));
                }
                let ctrl = self
                    .target
                    .new_ctrl(subsys, cd.hostnqn, cd.hostid, c.kato)
                    .ok_or((cs_dnr(fsc::CONTROLLER_BUSY), 0))?;
                let generation = ctrl.reset_generation();
                return Ok((ctrl, 0, generation));
            }
            if subsys.is_discovery() {
                return Err(invalid(fabrics::invalid_param_in_cmd(42)));
            }
            let ctrl = self
                .target
                .controller(cd.cntlid)
                .filter(|c| {
                    !c.is_dead() && c.subsys.nqn() == subsys.nqn() && c.hostnqn == cd.hostnqn
                })
                .ok_or(invalid(fabrics::invalid_param_in_data(
                    connect_data::CNTLID,
                )))?;
            // An I/O queue belongs to the host of the admin queue: same Host Identifier.
            if ctrl.hostid != cd.hostid {
                return Err((
                    cs_dnr(fsc::CONNECT_INVALID_HOST),
                    fabrics::invalid_param_in_data(connect_data::HOSTID),
                ));
            }
            match ctrl.attach_io_queue(c.qid) {
                Ok(generation) => Ok((ctrl, c.qid, generation)),
                Err(AttachRefused::NotReady) => Err((dnr(generic::COMMAND_SEQUENCE_ERROR), 0)),
                Err(AttachRefused::QueueId) => Err(invalid(fabrics::invalid_param_in_cmd(42))),
            }
        })();
        match r {
            Ok((ctrl, qid, generation)) => {
                let cntlid = ctrl.cntlid;
                if qid != 0 {
                    self.reader.cfg.max_incapsule = self.target.options().in_capsule;
                    self.nss = ctrl
                        .subsys
                        .backend()
                        .map(|b| b.namespaces())
                        .unwrap_or_default();
                }
                self.sq_head = 1 % (c.sqsize + 1);
                self.queue = Some(Binding {
                    generation,
                    ctrl,
                    qid,
                    sqsize: c.sqsize,
                });
                self.respond(slot, Status::SUCCESS, cntlid as u32);
            }
            Err((status, dw0)) => self.respond(slot, status, dw0),
        }
    }
}
