//! The RDMA end-to-end check on Soft-RoCE: `rxe0` attached to the manager, a peer buffer
//! registered on `rxe1`.

use super::*;

/// The RDMA end-to-end check: `rxe0` attached to the manager, a peer buffer on `rxe1`.
pub(crate) struct Wire {
    pub(crate) dev: Device<umm_rdma::RdmaBackend>,
    pub(crate) link: Mutex<Link>,
}

pub(crate) struct Link {
    pub(crate) qp: umm_rdma::transport::RcQp,
    pub(crate) _peer_qp: umm_rdma::transport::RcQp,
    pub(crate) peer_backend: umm_rdma::RdmaBackend,
    pub(crate) peer_mr: Option<umm_rdma::MrTranslation>,
    pub(crate) peer_buf: usize,
    pub(crate) peer_len: usize,
}

impl Link {
    pub(crate) fn open(
        manager: &Manager,
    ) -> Result<(Device<umm_rdma::RdmaBackend>, Link), Box<dyn std::error::Error>> {
        use umm::Backend;
        use umm_rdma::{Access, DeviceSelector, RdmaBackend, RdmaDevice};
        let rxe0 = RdmaDevice::open(&DeviceSelector::Name("rxe0".into()))?;
        let rxe1 = RdmaDevice::open(&DeviceSelector::Name("rxe1".into()))?;
        let dev = manager.attach(RdmaBackend::new(rxe0.clone(), Access::LOCAL_READ))?;
        let (qp, peer_qp) = umm_rdma::transport::connect_pair(&rxe0, &rxe1, 0)?;
        let peer_len = MAX_RUN * umm::page_size();
        // SAFETY: a fresh private mapping for the peer's buffer, unmapped in Drop.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                peer_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error().into());
        }
        let peer_backend = RdmaBackend::new(rxe1, Access::REMOTE_RW);
        let range = Range::new(p as usize, peer_len)?;
        let peer_mr = match peer_backend.register(range) {
            Ok(mr) => mr,
            Err(e) => {
                // SAFETY: our mapping from above.
                unsafe { libc::munmap(p, peer_len) };
                return Err(e.into());
            }
        };
        Ok((
            dev,
            Link {
                qp,
                _peer_qp: peer_qp,
                peer_backend,
                peer_mr: Some(peer_mr),
                peer_buf: p as usize,
                peer_len,
            },
        ))
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        use umm::Backend;
        if let Some(mr) = self.peer_mr.take() {
            let range = Range::new(self.peer_buf, self.peer_len).expect("valid");
            let _ = self.peer_backend.deregister(range, mr);
        }
        // SAFETY: the peer buffer mapped in `open`; its MR is gone.
        unsafe { libc::munmap(self.peer_buf as *mut libc::c_void, self.peer_len) };
    }
}

/// The number of MRs the kernel holds on `dev` (`rdma resource show`).
pub(crate) fn kernel_mr_count(dev: &str) -> Option<u64> {
    let out = std::process::Command::new("rdma")
        .args(["resource", "show"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().find_map(|line| {
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.get(1).map(|w| w.trim_end_matches(':')) != Some(dev) {
            return None;
        }
        let i = words.iter().position(|w| *w == "mr")?;
        words.get(i + 1)?.parse().ok()
    })
}
