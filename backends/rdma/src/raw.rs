//! A verbs backend over a protection domain the application already owns (a raw
//! `struct ibv_pd *` from its own `ibv_alloc_pd`), for callers such as the C API that open
//! their devices themselves.

use std::ffi::CStr;
use std::fmt;
use std::io;
use std::ptr::NonNull;

use rdma_mummy_sys::{ibv_mr, ibv_pd};
use umm::{Backend, BackendError, Capabilities, Range};

use crate::backend::{register_error, Access};

/// The translation of one range registered by a [`RawPdBackend`]: what a work request
/// needs. The MR is deregistered exactly once: by the manager, or when the translation is
/// dropped without being handed back.
pub struct RawMrTranslation {
    /// Local key.
    pub lkey: u32,
    /// Remote key.
    pub rkey: u32,
    /// The registered start address (the MR's `addr`).
    pub addr: u64,
    /// The registered length in bytes.
    pub len: usize,
    mr: Option<NonNull<ibv_mr>>,
}

// SAFETY: an ibv_mr is a plain handle; libibverbs allows ibv_dereg_mr from any thread, and
// the handle moves with its one owner.
unsafe impl Send for RawMrTranslation {}
// SAFETY: shared references only read the copied lkey/rkey/addr/len fields.
unsafe impl Sync for RawMrTranslation {}

impl RawMrTranslation {
    fn deregister(&mut self) -> Result<(), io::Error> {
        let Some(mr) = self.mr.take() else {
            return Ok(());
        };
        // SAFETY: `mr` came from a successful ibv_reg_mr and was taken out of the Option,
        // so it is deregistered once; the caller of `RawPdBackend::from_raw` keeps the
        // protection domain alive while registrations exist.
        match unsafe { rdma_mummy_sys::ibv_dereg_mr(mr.as_ptr()) } {
            0 => Ok(()),
            rc => Err(io::Error::from_raw_os_error(rc)),
        }
    }
}

impl Drop for RawMrTranslation {
    fn drop(&mut self) {
        if let Err(e) = self.deregister() {
            tracing::warn!(error = %e, "ibv_dereg_mr of a dropped translation failed");
        }
    }
}

impl fmt::Debug for RawMrTranslation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawMrTranslation")
            .field("lkey", &format_args!("{:#x}", self.lkey))
            .field("rkey", &format_args!("{:#x}", self.rkey))
            .field("addr", &format_args!("{:#x}", self.addr))
            .field("len", &self.len)
            .finish()
    }
}

/// A umm backend registering in a protection domain the caller allocated and owns.
pub struct RawPdBackend {
    pd: NonNull<ibv_pd>,
    access: Access,
    name: String,
}

// SAFETY: libibverbs allows ibv_reg_mr/ibv_dereg_mr on one protection domain from any
// thread; the manager serialises this backend's calls anyway.
unsafe impl Send for RawPdBackend {}
// SAFETY: as above; the backend itself only reads its fields.
unsafe impl Sync for RawPdBackend {}

impl fmt::Debug for RawPdBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawPdBackend")
            .field("name", &self.name)
            .field("access", &self.access)
            .finish()
    }
}

impl RawPdBackend {
    /// A backend registering with `access` in `pd`; `None` when `pd` is null. Its name is
    /// the device's (`ibv_get_device_name`), followed by the access unless it is
    /// [`Access::REMOTE_RW`].
    ///
    /// # Safety
    /// `pd` must be a protection domain returned by `ibv_alloc_pd` of the process's
    /// libibverbs, and it (and its device context) must stay allocated until this backend
    /// and every translation it returned are dropped (for a backend attached to a
    /// `umm::Manager`: until the manager is dropped).
    pub unsafe fn from_raw(pd: *mut ibv_pd, access: Access) -> Option<RawPdBackend> {
        let pd = NonNull::new(pd)?;
        // SAFETY: the caller passes a live ibv_pd; its context and device pointers are set
        // by libibverbs and ibv_get_device_name returns a NUL-terminated static name.
        let device = unsafe {
            let ctx = pd.as_ref().context;
            if ctx.is_null() || (*ctx).device.is_null() {
                "verbs".to_string()
            } else {
                let n = rdma_mummy_sys::ibv_get_device_name((*ctx).device);
                if n.is_null() {
                    "verbs".to_string()
                } else {
                    CStr::from_ptr(n).to_string_lossy().into_owned()
                }
            }
        };
        let name = if access == Access::REMOTE_RW {
            device
        } else {
            format!("{device}[{access}]")
        };
        Some(RawPdBackend { pd, access, name })
    }

    /// The access rights of every registration of this backend.
    pub fn access(&self) -> Access {
        self.access
    }
}

impl Backend for RawPdBackend {
    type Translation = RawMrTranslation;

    fn name(&self) -> &str {
        &self.name
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            // ibv_reg_mr (no on-demand paging) pins every page and fails with EFAULT.
            rejects_unmapped: true,
            ..Capabilities::default()
        }
    }

    fn register(&self, range: Range) -> Result<RawMrTranslation, BackendError> {
        // SAFETY: `pd` is live (contract of `from_raw`); the manager registers only ranges
        // it checked are mapped and deregisters them when they are invalidated.
        let mr = unsafe {
            rdma_mummy_sys::ibv_reg_mr(
                self.pd.as_ptr(),
                range.start() as *mut libc::c_void,
                range.len(),
                self.access.flags().bits(),
            )
        };
        let Some(mr) = NonNull::new(mr) else {
            let cause = io::Error::last_os_error();
            return Err(register_error(
                &self.name,
                self.access,
                "ibv_reg_mr",
                range,
                cause,
            ));
        };
        // SAFETY: `mr` is a valid ibv_mr returned just now; we read its plain fields.
        let (lkey, rkey, addr, len) = unsafe {
            let m = mr.as_ref();
            (m.lkey, m.rkey, m.addr as u64, m.length)
        };
        tracing::trace!(device = %self.name, %range, lkey, rkey, "ibv_reg_mr");
        Ok(RawMrTranslation {
            lkey,
            rkey,
            addr,
            len,
            mr: Some(mr),
        })
    }

    fn deregister(&self, range: Range, mut t: RawMrTranslation) -> Result<(), BackendError> {
        tracing::trace!(device = %self.name, %range, lkey = t.lkey, "ibv_dereg_mr");
        t.deregister()
            .map_err(|e| register_error(&self.name, self.access, "ibv_dereg_mr", range, e))
    }
}
