//! A small RC transport for tests, demos and measurements (not a product feature).
//!
//! Two reliable-connected queue pairs are connected by exchanging an [`Endpoint`] (QP
//! number, PSN, GID) out of band: in memory for two devices of one process
//! ([`connect_pair`]), or through any byte stream ([`Endpoint::to_bytes`], e.g. a pipe or
//! TCP socket) between processes. Work requests are posted one at a time, signaled and
//! never inline (the data is read from the registered pages by the device, which is what
//! the stale-DMA scenario needs), and their completion is polled with a timeout.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sideway::ibverbs::address::{AddressHandleAttribute, Gid};
use sideway::ibverbs::completion::{BasicCompletionQueue, WorkCompletionStatus};
use sideway::ibverbs::device_context::Mtu;
use sideway::ibverbs::queue_pair::{
    BasicQueuePair, PostSendGuard, QueuePair, QueuePairAttribute, QueuePairState,
    SetScatterGatherEntry, WorkRequestFlags,
};
use sideway::ibverbs::AccessFlags;

use crate::device::{RdmaDevice, RdmaError};
use crate::MrTranslation;

/// How long a work request may take before [`RcQp::write`]/[`RcQp::read`] give up.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// What one side tells the other to connect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Queue pair number.
    pub qpn: u32,
    /// Initial packet sequence number of its send queue.
    pub psn: u32,
    /// Its GID (at the GID index both sides use).
    pub gid: [u8; 16],
}

impl Endpoint {
    /// Size of [`Endpoint::to_bytes`].
    pub const WIRE_SIZE: usize = 24;

    /// Fixed little-endian encoding for a side channel.
    pub fn to_bytes(&self) -> [u8; Self::WIRE_SIZE] {
        let mut b = [0u8; Self::WIRE_SIZE];
        b[0..4].copy_from_slice(&self.qpn.to_le_bytes());
        b[4..8].copy_from_slice(&self.psn.to_le_bytes());
        b[8..24].copy_from_slice(&self.gid);
        b
    }

    /// Decodes [`Endpoint::to_bytes`].
    pub fn from_bytes(b: &[u8; Self::WIRE_SIZE]) -> Endpoint {
        let mut gid = [0u8; 16];
        gid.copy_from_slice(&b[8..24]);
        Endpoint {
            qpn: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            psn: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            gid,
        }
    }
}

/// A local buffer for a work request: address, length and the lkey of an MR covering it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Local {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Local key of a memory region covering `[addr, addr + len)`.
    pub lkey: u32,
}

impl Local {
    /// `len` bytes at `addr` through `mr`.
    pub fn new(mr: &MrTranslation, addr: usize, len: u32) -> Local {
        Local {
            addr: addr as u64,
            len,
            lkey: mr.lkey,
        }
    }
}

/// A peer's buffer: address and the rkey of the peer's MR covering it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Remote {
    /// Start address in the peer's address space.
    pub addr: u64,
    /// Remote key of the peer's memory region.
    pub rkey: u32,
}

impl Remote {
    /// The byte at `addr` of the peer's `mr`.
    pub fn new(mr: &MrTranslation, addr: usize) -> Remote {
        Remote {
            addr: addr as u64,
            rkey: mr.rkey,
        }
    }
}

/// One RC queue pair with its own completion queue, on a device's protection domain.
pub struct RcQp {
    device: Arc<RdmaDevice>,
    port: u8,
    gid_index: u8,
    psn: u32,
    next_wr_id: u64,
    timeout: Duration,
    // Field order is drop order: the QP before its completion queue.
    qp: BasicQueuePair,
    cq: Arc<BasicCompletionQueue>,
}

impl RcQp {
    /// A queue pair in INIT on `port` (usually 1) of `device`, using GID `gid_index` (0,
    /// the IPv6 link-local GID, connects on Soft-RoCE without extra sysctls).
    pub fn new(device: &Arc<RdmaDevice>, port: u8, gid_index: u8) -> Result<RcQp, RdmaError> {
        let name = device.name();
        device.check_port_active(port)?;
        let cq = device
            .context()
            .create_cq_builder()
            .setup_cqe(16)
            .build()
            .map_err(|e| RdmaError::verbs(name, "ibv_create_cq", e))?;
        let mut qp = device
            .pd()
            .create_qp_builder()
            .setup_send_cq(cq.clone())
            .setup_recv_cq(cq.clone())
            .setup_max_send_wr(16)
            .setup_max_recv_wr(1)
            .setup_max_inline_data(0)
            .build()
            .map_err(|e| RdmaError::verbs(name, "ibv_create_qp", e))?;
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::Init)
            .setup_pkey_index(0)
            .setup_port(port)
            .setup_access_flags(
                AccessFlags::LocalWrite | AccessFlags::RemoteWrite | AccessFlags::RemoteRead,
            );
        qp.modify(&attr)
            .map_err(|e| RdmaError::verbs(name, "ibv_modify_qp(INIT)", e))?;
        // Any 24-bit value works; derive it from the QPN so runs are reproducible.
        let psn = qp.qp_number().wrapping_mul(2_654_435_761) & 0x00ff_ffff;
        Ok(RcQp {
            device: device.clone(),
            port,
            gid_index,
            psn,
            next_wr_id: 1,
            timeout: DEFAULT_TIMEOUT,
            qp,
            cq,
        })
    }

    /// Changes how long a work request may take (default [`DEFAULT_TIMEOUT`]).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// The device of this queue pair.
    pub fn device(&self) -> &Arc<RdmaDevice> {
        &self.device
    }

    /// What the peer needs to connect to this queue pair.
    pub fn endpoint(&self) -> Result<Endpoint, RdmaError> {
        let gid = self
            .device
            .context()
            .query_gid(self.port, self.gid_index.into())
            .map_err(|e| RdmaError::verbs(self.device.name(), "ibv_query_gid", e))?;
        Ok(Endpoint {
            qpn: self.qp.qp_number(),
            psn: self.psn,
            gid: gid.raw,
        })
    }

    /// Moves the queue pair to RTR and RTS towards `remote`.
    pub fn connect(&mut self, remote: &Endpoint) -> Result<(), RdmaError> {
        let name = self.device.name().to_string();
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::ReadyToReceive)
            .setup_path_mtu(Mtu::Mtu1024)
            .setup_dest_qp_num(remote.qpn)
            .setup_rq_psn(remote.psn)
            .setup_max_dest_read_atomic(4)
            .setup_min_rnr_timer(12);
        let mut ah = AddressHandleAttribute::new();
        ah.setup_dest_lid(0)
            .setup_port(self.port)
            .setup_service_level(0)
            .setup_grh_src_gid_index(self.gid_index)
            .setup_grh_dest_gid(&Gid { raw: remote.gid })
            .setup_grh_hop_limit(64);
        attr.setup_address_vector(&ah);
        self.qp
            .modify(&attr)
            .map_err(|e| RdmaError::verbs(&name, "ibv_modify_qp(RTR)", e))?;
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::ReadyToSend)
            .setup_sq_psn(self.psn)
            .setup_timeout(14)
            .setup_retry_cnt(7)
            .setup_rnr_retry(7)
            .setup_max_read_atomic(4);
        self.qp
            .modify(&attr)
            .map_err(|e| RdmaError::verbs(&name, "ibv_modify_qp(RTS)", e))?;
        tracing::debug!(device = %name, qpn = self.qp.qp_number(), remote_qpn = remote.qpn, "RC QP connected");
        Ok(())
    }

    /// RDMA WRITE of `local` (read by the device from the pages its MR pinned) into the
    /// peer's `remote`, waiting for the completion.
    pub fn write(&mut self, local: Local, remote: Remote) -> Result<(), RdmaError> {
        self.post(local, remote, false)
    }

    /// RDMA READ of the peer's `remote` into `local`, waiting for the completion.
    ///
    /// # Safety
    /// The device writes `local.len` bytes at `local.addr` behind the compiler's back: no
    /// Rust reference to those bytes may be alive during the call.
    pub unsafe fn read(&mut self, local: Local, remote: Remote) -> Result<(), RdmaError> {
        self.post(local, remote, true)
    }

    fn post(&mut self, local: Local, remote: Remote, read: bool) -> Result<(), RdmaError> {
        let op = if read { "RDMA READ" } else { "RDMA WRITE" };
        let wr_id = self.next_wr_id;
        self.next_wr_id += 1;
        let mut guard = self.qp.start_post_send();
        let wr = guard.construct_wr(wr_id, WorkRequestFlags::Signaled);
        let handle = if read {
            wr.setup_read(remote.rkey, remote.addr)
        } else {
            wr.setup_write(remote.rkey, remote.addr)
        };
        // SAFETY: the device accesses the buffer only through the MR named by `lkey`, which
        // bounds the access to pages that MR pinned; for READ the caller vouched that no
        // reference aliases the target. The sge is consumed by `post` below.
        unsafe { handle.setup_sge(local.lkey, local.addr, local.len) };
        guard
            .post()
            .map_err(|e| RdmaError::verbs(self.device.name(), "ibv_post_send", e))?;
        self.wait(wr_id, op)
    }

    fn wait(&self, wr_id: u64, op: &'static str) -> Result<(), RdmaError> {
        let deadline = Instant::now() + self.timeout;
        let mut spins = 0u32;
        loop {
            // One work request is outstanding at a time, so the first completion is ours.
            if let Some(wc) = self.cq.start_poll().ok().and_then(|mut p| p.next()) {
                let status = wc.status();
                if status != WorkCompletionStatus::Success as u32 || wc.wr_id() != wr_id {
                    return Err(RdmaError::WorkCompletion {
                        device: self.device.name().to_string(),
                        op,
                        wr_id: wc.wr_id(),
                        status: format!(
                            "completed with {:?} (vendor error {:#x})",
                            WorkCompletionStatus::from(status),
                            wc.vendor_err()
                        ),
                    });
                }
                return Ok(());
            }
            spins += 1;
            if spins.is_multiple_of(1024) {
                if Instant::now() > deadline {
                    return Err(RdmaError::WorkCompletion {
                        device: self.device.name().to_string(),
                        op,
                        wr_id,
                        status: format!("timed out after {:?}", self.timeout),
                    });
                }
                std::thread::yield_now();
            }
        }
    }
}

/// Two connected queue pairs, one on each device (rxe0 and rxe1 on the two ends of a veth
/// pair), exchanging endpoints in memory.
pub fn connect_pair(
    a: &Arc<RdmaDevice>,
    b: &Arc<RdmaDevice>,
    gid_index: u8,
) -> Result<(RcQp, RcQp), RdmaError> {
    let mut qa = RcQp::new(a, 1, gid_index)?;
    let mut qb = RcQp::new(b, 1, gid_index)?;
    let (ea, eb) = (qa.endpoint()?, qb.endpoint()?);
    qa.connect(&eb)?;
    qb.connect(&ea)?;
    Ok((qa, qb))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_round_trip() {
        let e = Endpoint {
            qpn: 0x11,
            psn: 0xabcdef,
            gid: [7; 16],
        };
        assert_eq!(Endpoint::from_bytes(&e.to_bytes()), e);
    }
}
