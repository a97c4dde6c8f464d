//! The [`umm::Backend`] of a verbs device: `ibv_reg_mr` / `ibv_dereg_mr` in the device's
//! protection domain.

use std::fmt;
use std::io;
use std::ptr::NonNull;
use std::sync::Arc;

use rdma_mummy_sys::ibv_mr;
use sideway::ibverbs::protection_domain::ProtectionDomain;
use sideway::ibverbs::AccessFlags;
use umm::{Backend, BackendError, BackendErrorKind, Capabilities, Range};

use crate::device::{errno_of, RdmaDevice};

/// The access rights of a memory region (local read is always allowed).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Access {
    /// The device may write the memory for local operations (RDMA READ / receive targets).
    pub local_write: bool,
    /// Peers may RDMA READ the memory.
    pub remote_read: bool,
    /// Peers may RDMA WRITE the memory (implies `local_write`, as verbs requires).
    pub remote_write: bool,
}

impl Access {
    /// Local read only: sources of RDMA WRITE and SEND.
    pub const LOCAL_READ: Access = Access {
        local_write: false,
        remote_read: false,
        remote_write: false,
    };
    /// Local read and write: targets of RDMA READ and receive buffers.
    pub const LOCAL_WRITE: Access = Access {
        local_write: true,
        remote_read: false,
        remote_write: false,
    };
    /// Local write plus remote read and write: buffers peers access directly.
    pub const REMOTE_RW: Access = Access {
        local_write: true,
        remote_read: true,
        remote_write: true,
    };

    /// The verbs flags.
    pub fn flags(self) -> AccessFlags {
        let mut f = AccessFlags::none();
        if self.local_write || self.remote_write {
            f |= AccessFlags::LocalWrite;
        }
        if self.remote_read {
            f |= AccessFlags::RemoteRead;
        }
        if self.remote_write {
            f |= AccessFlags::RemoteWrite;
        }
        f
    }
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = vec!["local-read"];
        if self.local_write || self.remote_write {
            parts.push("local-write");
        }
        if self.remote_read {
            parts.push("remote-read");
        }
        if self.remote_write {
            parts.push("remote-write");
        }
        f.write_str(&parts.join("+"))
    }
}

/// An owned `ibv_mr`: deregistered exactly once, by [`RdmaBackend::deregister`] or, on
/// every other path (a translation dropped without being handed back), by `Drop`.
struct MrHandle {
    mr: Option<NonNull<ibv_mr>>,
    /// Keeps the protection domain (and the device context) alive while the MR exists.
    _pd: Arc<ProtectionDomain>,
}

// SAFETY: an ibv_mr is a plain handle; libibverbs allows ibv_dereg_mr from any thread, and
// the handle is used by one owner at a time (it moves with its translation).
unsafe impl Send for MrHandle {}
// SAFETY: shared references only read the immutable lkey/rkey/addr fields of the ibv_mr.
unsafe impl Sync for MrHandle {}

impl MrHandle {
    /// Deregisters now; `Err(errno)` on failure (the handle is forgotten either way).
    fn deregister(&mut self) -> Result<(), i32> {
        let Some(mr) = self.mr.take() else {
            return Ok(());
        };
        // SAFETY: `mr` came from a successful ibv_reg_mr and was taken out of the Option, so
        // it is deregistered exactly once; its protection domain is alive (held by `_pd`).
        let rc = unsafe { rdma_mummy_sys::ibv_dereg_mr(mr.as_ptr()) };
        if rc == 0 {
            Ok(())
        } else {
            Err(rc)
        }
    }
}

impl Drop for MrHandle {
    fn drop(&mut self) {
        if let Err(errno) = self.deregister() {
            tracing::warn!(errno, "ibv_dereg_mr of a dropped translation failed");
        }
    }
}

/// The translation of one registered range: what a work request needs.
pub struct MrTranslation {
    /// Local key (scatter/gather entries of this process's work requests).
    pub lkey: u32,
    /// Remote key (what a peer puts into its RDMA READ/WRITE).
    pub rkey: u32,
    /// The registered start address (the MR's `addr`).
    pub addr: u64,
    /// The registered length in bytes.
    pub len: usize,
    /// The access rights it was registered with.
    pub access: Access,
    mr: MrHandle,
}

impl MrTranslation {
    /// Whether `range` lies inside this MR (so its keys can carry an operation on it).
    pub fn covers(&self, range: Range) -> bool {
        range.start() as u64 >= self.addr && range.end() as u64 <= self.addr + self.len as u64
    }
}

impl fmt::Debug for MrTranslation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MrTranslation")
            .field("lkey", &format_args!("{:#x}", self.lkey))
            .field("rkey", &format_args!("{:#x}", self.rkey))
            .field("addr", &format_args!("{:#x}", self.addr))
            .field("len", &self.len)
            .field("access", &self.access)
            .field("live", &self.mr.mr.is_some())
            .finish()
    }
}

/// Why `ibv_reg_mr` or `ibv_dereg_mr` failed: the source of the manager's `BackendError`.
#[derive(Debug, thiserror::Error)]
#[error(
    "{device}: {op} of {range} ({access}) failed: {cause}{}",
    memlock_text(*memlock_limit, *cap_ipc_lock)
)]
pub struct RegisterError {
    /// The device name.
    pub device: String,
    /// `ibv_reg_mr` or `ibv_dereg_mr`.
    pub op: &'static str,
    /// The range.
    pub range: Range,
    /// The requested access.
    pub access: Access,
    /// The OS error.
    #[source]
    pub cause: io::Error,
    /// For `ENOMEM`/`EPERM`: the RLIMIT_MEMLOCK soft limit (`Some(None)` = unlimited);
    /// `None` for other errors.
    pub memlock_limit: Option<Option<u64>>,
    /// For `ENOMEM`/`EPERM`: whether the thread holds `CAP_IPC_LOCK` (which lifts the limit).
    pub cap_ipc_lock: Option<bool>,
}

fn memlock_text(limit: Option<Option<u64>>, cap: Option<bool>) -> String {
    let Some(limit) = limit else {
        return String::new();
    };
    let limit = match limit {
        Some(bytes) => format!("{bytes} bytes"),
        None => "unlimited".into(),
    };
    let cap = match cap {
        Some(true) => "with CAP_IPC_LOCK",
        Some(false) => "without CAP_IPC_LOCK",
        None => "CAP_IPC_LOCK unknown",
    };
    format!(" (pinned memory is limited by RLIMIT_MEMLOCK: {limit}, {cap})")
}

/// Classifies a failed `ibv_reg_mr`/`ibv_dereg_mr` of `range` on `device` (shared by
/// [`RdmaBackend`] and [`crate::RawPdBackend`]).
pub(crate) fn register_error(
    device: &str,
    access: Access,
    op: &'static str,
    range: Range,
    cause: io::Error,
) -> BackendError {
    let errno = errno_of(&cause);
    let (kind, memlock) = match errno {
        libc::ENOMEM | libc::EPERM | libc::EAGAIN => {
            (BackendErrorKind::OutOfMemory, Some(umm::memlock_limit()))
        }
        libc::EFAULT | libc::EINVAL => (BackendErrorKind::BadAddress, None),
        libc::ENODEV | libc::EIO | libc::ENOSYS | libc::ENXIO => {
            (BackendErrorKind::DeviceUnavailable, None)
        }
        _ => (BackendErrorKind::Other, None),
    };
    let err = RegisterError {
        device: device.to_string(),
        op,
        range,
        access,
        cause,
        cap_ipc_lock: memlock.and(has_cap_ipc_lock()),
        memlock_limit: memlock,
    };
    tracing::debug!(error = %err, "RDMA registration error");
    BackendError::new(kind, err)
}

/// Whether the calling thread's effective capabilities include CAP_IPC_LOCK.
fn has_cap_ipc_lock() -> Option<bool> {
    const CAP_IPC_LOCK: u32 = 14;
    let status = std::fs::read_to_string("/proc/thread-self/status").ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    let caps = u64::from_str_radix(hex.trim(), 16).ok()?;
    Some(caps & (1 << CAP_IPC_LOCK) != 0)
}

/// A verbs device as a umm backend. See the [crate docs](crate).
pub struct RdmaBackend {
    device: Arc<RdmaDevice>,
    access: Access,
    name: String,
    max_registration: usize,
}

impl fmt::Debug for RdmaBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RdmaBackend")
            .field("name", &self.name)
            .field("access", &self.access)
            .finish()
    }
}

impl RdmaBackend {
    /// A backend registering with `access` in `device`'s protection domain.
    ///
    /// Access flags are fixed per backend because the manager caches one translation per
    /// (range, device); to pin some buffers with remote access and others local-only,
    /// attach two backends built from the same [`RdmaDevice`] (same protection domain,
    /// two manager devices) and name the right one in each `pin`.
    pub fn new(device: Arc<RdmaDevice>, access: Access) -> RdmaBackend {
        let max_registration = device
            .context()
            .query_device()
            .map(|a| a.max_mr_size())
            .ok()
            .and_then(|m| usize::try_from(m).ok())
            .filter(|m| *m > 0)
            .unwrap_or(usize::MAX);
        let name = if access == Access::REMOTE_RW {
            device.name().to_string()
        } else {
            format!("{}[{access}]", device.name())
        };
        RdmaBackend {
            device,
            access,
            name,
            max_registration,
        }
    }

    /// The device (for queue pairs in the same protection domain).
    pub fn device(&self) -> &Arc<RdmaDevice> {
        &self.device
    }

    /// The access rights of every registration of this backend.
    pub fn access(&self) -> Access {
        self.access
    }

    fn error(&self, op: &'static str, range: Range, cause: io::Error) -> BackendError {
        register_error(self.device.name(), self.access, op, range, cause)
    }

    /// Registers `range` outside any manager (a naive cache, a benchmark baseline).
    ///
    /// # Safety
    /// `range` must stay mapped while the returned translation is used by the device; the
    /// device reads and writes whatever pages were mapped at registration time.
    pub unsafe fn register_raw(&self, range: Range) -> Result<MrTranslation, BackendError> {
        let pd = self.device.pd();
        // SAFETY: the caller guarantees the range is mapped; ibv_reg_mr only pins and maps
        // the pages (it fails with EFAULT otherwise) and `pd` is a live protection domain.
        let mr = unsafe {
            rdma_mummy_sys::ibv_reg_mr(
                pd.pd().as_ptr(),
                range.start() as *mut libc::c_void,
                range.len(),
                self.access.flags().bits(),
            )
        };
        let Some(mr) = NonNull::new(mr) else {
            return Err(self.error("ibv_reg_mr", range, io::Error::last_os_error()));
        };
        // SAFETY: `mr` is a valid ibv_mr returned just now; we read its plain fields.
        let (lkey, rkey, addr, len) = unsafe {
            let m = mr.as_ref();
            (m.lkey, m.rkey, m.addr as u64, m.length)
        };
        tracing::trace!(device = %self.name, %range, lkey, rkey, "ibv_reg_mr");
        Ok(MrTranslation {
            lkey,
            rkey,
            addr,
            len,
            access: self.access,
            mr: MrHandle {
                mr: Some(mr),
                _pd: pd.clone(),
            },
        })
    }
}

impl Backend for RdmaBackend {
    type Translation = MrTranslation;

    fn name(&self) -> &str {
        &self.name
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            allows_overlap: true,
            alignment: umm::page_size(),
            max_registration: self.max_registration,
            // ibv_reg_mr (no on-demand paging) pins every page and fails with EFAULT.
            rejects_unmapped: true,
        }
    }

    fn register(&self, range: Range) -> Result<MrTranslation, BackendError> {
        // SAFETY: the manager registers only ranges it checked are mapped and watches them
        // with its notifier sources; it deregisters them when they are invalidated.
        unsafe { self.register_raw(range) }
    }

    fn deregister(&self, range: Range, mut translation: MrTranslation) -> Result<(), BackendError> {
        tracing::trace!(device = %self.name, %range, lkey = translation.lkey, "ibv_dereg_mr");
        translation
            .mr
            .deregister()
            .map_err(|errno| self.error("ibv_dereg_mr", range, io::Error::from_raw_os_error(errno)))
    }
}
