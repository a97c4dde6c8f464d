//! The driver probe, contexts, and the [`Backend`] implementation.
//!
//! # Contexts
//!
//! A [`CudaBackend`] is one device, by ordinal, through its **primary context**
//! (`cuDevicePrimaryCtxRetain`, released on drop): the context the CUDA runtime uses, so
//! registrations made here are the ones `cudaHostRegister` would have made and are usable
//! from runtime code on that device. Every driver call pushes that context on the calling
//! thread and pops it afterwards, so the backend works from any thread and leaves the
//! caller's current context as it found it. For several GPUs attach one backend per
//! ordinal. With [`HostRegisterFlags::PORTABLE`] (default) a registration counts for every
//! context of the process; the driver keys it by host address, so two CUDA backends cannot
//! both register overlapping host ranges (the second gets `AlreadyRegistered`): give each
//! GPU its own buffers, or register shared buffers on one backend and take the other
//! device's pointer from it (unverified on a multi-GPU machine).
//!
//! # Registration
//!
//! `cuMemHostRegister(ptr, len, flags)` (default `DEVICEMAP | PORTABLE`), then
//! `cuMemHostGetDevicePointer` when `DEVICEMAP` is set; if that fails the registration is
//! undone. Deregistration is `cuMemHostUnregister(base)`, with the exact base pointer the
//! driver requires. Dropping the backend unregisters whatever the manager left registered.
//!
//! CUDA refuses overlapping host registrations (measured on an H100: docs/design.md), so
//! [`Capabilities::allows_overlap`] is `false`: the core merges overlapping requests into
//! one registration (adjacent ones, which CUDA accepts, stay apart), unregisters stale entries before registering a fresh
//! mapping at the same address, and fails with `umm::Error::DeviceRangeBusy` when a stale
//! overlapping entry is still pinned after `Config::busy_timeout`.

use std::collections::HashMap;
use std::ffi::c_void;
use std::fmt;
use std::sync::OnceLock;

use cudarc::driver::sys::{self, CUcontext, CUdevice, CUresult};
use parking_lot::Mutex;
use umm::{Backend, BackendError, Capabilities, Range};

use crate::error::CudaError;
use crate::kernel::Kernel;

/// `cuMemHostRegister` flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HostRegisterFlags(u32);

impl HostRegisterFlags {
    /// Pinned for every CUDA context, not just the current one.
    pub const PORTABLE: Self = HostRegisterFlags(sys::CU_MEMHOSTREGISTER_PORTABLE);
    /// Mapped into the device's address space (needed for a device pointer).
    pub const DEVICEMAP: Self = HostRegisterFlags(sys::CU_MEMHOSTREGISTER_DEVICEMAP);
    /// The pointer is I/O memory (another device's BAR), not RAM.
    pub const IOMEMORY: Self = HostRegisterFlags(sys::CU_MEMHOSTREGISTER_IOMEMORY);
    /// The device only reads the memory.
    pub const READ_ONLY: Self = HostRegisterFlags(sys::CU_MEMHOSTREGISTER_READ_ONLY);

    /// The raw flag bits.
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// Whether every flag of `other` is set.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }
}

impl Default for HostRegisterFlags {
    /// `DEVICEMAP | PORTABLE`.
    fn default() -> Self {
        Self::DEVICEMAP | Self::PORTABLE
    }
}

impl std::ops::BitOr for HostRegisterFlags {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        HostRegisterFlags(self.0 | rhs.0)
    }
}

/// One host registration: what a device needs to use a registered range (the core's
/// `Translation`). It describes the whole registered range; [`umm::Pin::offset`] gives the
/// user's sub-range's position in it.
#[derive(Debug, PartialEq, Eq)]
pub struct CudaRegistration {
    /// Device address of the range's first byte (`cuMemHostGetDevicePointer`); `None` when
    /// the backend registers without [`HostRegisterFlags::DEVICEMAP`].
    pub device_ptr: Option<u64>,
    /// The registered host range (its start is the base pointer `cuMemHostUnregister` needs).
    pub range: Range,
}

/// Whether the CUDA driver library (`libcuda.so`) can be loaded. Cheap enough to call
/// before every constructor; nothing else in this crate touches the driver without it.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the library (and closes it again).
    unsafe { sys::is_culib_present() }
}

/// `cuInit(0)` once per process, after the library probe.
fn init() -> Result<(), CudaError> {
    static INIT: OnceLock<Result<(), CUresult>> = OnceLock::new();
    if !driver_present() {
        return Err(CudaError::NoDriver {
            reason: "libcuda.so cannot be loaded (no NVIDIA driver installed)".to_string(),
        });
    }
    // SAFETY: the library is present (checked above); cuInit has no preconditions.
    match INIT.get_or_init(|| check(unsafe { sys::cuInit(0) })) {
        Ok(()) => Ok(()),
        Err(CUresult::CUDA_ERROR_NO_DEVICE) => Err(CudaError::NoDevice {
            ordinal: 0,
            count: 0,
        }),
        Err(e) => Err(CudaError::Driver {
            device: "driver".to_string(),
            call: "cuInit",
            result: *e,
            range: None,
        }),
    }
}

fn check(rc: CUresult) -> Result<(), CUresult> {
    match rc {
        CUresult::CUDA_SUCCESS => Ok(()),
        e => Err(e),
    }
}

/// The number of CUDA devices, or why there are none usable.
pub fn device_count() -> Result<usize, CudaError> {
    init()?;
    let mut n = 0;
    // SAFETY: driver initialised; `n` outlives the call.
    check(unsafe { sys::cuDeviceGetCount(&mut n) }).map_err(|result| CudaError::Driver {
        device: "driver".to_string(),
        call: "cuDeviceGetCount",
        result,
        range: None,
    })?;
    Ok(n.max(0) as usize)
}

/// The primary context, pushed on the calling thread for the guard's lifetime.
pub(crate) struct Current<'a>(&'a CudaBackend);

impl Drop for Current<'_> {
    fn drop(&mut self) {
        let mut popped: CUcontext = std::ptr::null_mut();
        // SAFETY: pairs with the push in `CudaBackend::current`.
        let rc = unsafe { sys::cuCtxPopCurrent_v2(&mut popped) };
        if rc != CUresult::CUDA_SUCCESS {
            tracing::warn!(device = %self.0.label, ?rc, "cuCtxPopCurrent failed");
        }
    }
}

/// The primary context handle (a raw pointer owned by the driver).
pub(crate) struct Ctx(pub(crate) CUcontext);

// SAFETY: a CUDA context may be made current on any thread (cuCtxPushCurrent); the handle
// itself is an opaque driver pointer that we never dereference.
unsafe impl Send for Ctx {}
// SAFETY: as above; concurrent pushes of one context on several threads are allowed.
unsafe impl Sync for Ctx {}

/// One CUDA device as a `umm` backend; see the [module docs](self) for contexts,
/// registration and the overlap rule.
pub struct CudaBackend {
    ordinal: usize,
    device: CUdevice,
    pub(crate) ctx: Ctx,
    flags: HostRegisterFlags,
    pub(crate) label: String,
    /// Whether `ctx` is the device's primary context retained by us (released on drop);
    /// false for a context the application owns ([`CudaBackend::from_context`]).
    retained_primary: bool,
    /// Live registrations: base address → length.
    live: Mutex<HashMap<usize, usize>>,
    pub(crate) kernel: OnceLock<Result<Kernel, CudaError>>,
}

impl CudaBackend {
    /// Opens device `ordinal` through its primary context, registering with the default
    /// flags (`DEVICEMAP | PORTABLE`).
    ///
    /// Fails with [`CudaError::NoDriver`] when `libcuda.so` is absent (checked first: no
    /// driver call is made) and [`CudaError::NoDevice`] when the ordinal names no device.
    pub fn new(ordinal: usize) -> Result<Self, CudaError> {
        Self::with_flags(ordinal, HostRegisterFlags::default())
    }

    /// Like [`CudaBackend::new`] with explicit `cuMemHostRegister` flags.
    pub fn with_flags(ordinal: usize, flags: HostRegisterFlags) -> Result<Self, CudaError> {
        let count = match device_count() {
            Err(CudaError::NoDevice { count, .. }) => {
                return Err(CudaError::NoDevice { ordinal, count })
            }
            other => other?,
        };
        if ordinal >= count {
            return Err(CudaError::NoDevice { ordinal, count });
        }
        let driver = |call, result| CudaError::Driver {
            device: format!("cuda:{ordinal}"),
            call,
            result,
            range: None,
        };
        let mut device: CUdevice = 0;
        // SAFETY: driver initialised; ordinal < count.
        check(unsafe { sys::cuDeviceGet(&mut device, ordinal as i32) })
            .map_err(|e| driver("cuDeviceGet", e))?;
        let mut name = [0 as std::ffi::c_char; 256];
        // SAFETY: the buffer is 256 bytes and the driver NUL-terminates within `len`.
        check(unsafe { sys::cuDeviceGetName(name.as_mut_ptr(), name.len() as i32, device) })
            .map_err(|e| driver("cuDeviceGetName", e))?;
        // SAFETY: NUL-terminated by the driver (the buffer was zeroed, too).
        let name = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        let mut ctx: CUcontext = std::ptr::null_mut();
        // SAFETY: valid device; released in Drop (pairs with cuDevicePrimaryCtxRelease).
        check(unsafe { sys::cuDevicePrimaryCtxRetain(&mut ctx, device) })
            .map_err(|e| driver("cuDevicePrimaryCtxRetain", e))?;
        let label = format!("cuda:{ordinal} {name}");
        tracing::debug!(device = %label, flags = flags.bits(), "opened CUDA device");
        Ok(CudaBackend {
            ordinal,
            device,
            ctx: Ctx(ctx),
            flags,
            label,
            retained_primary: true,
            live: Mutex::new(HashMap::new()),
            kernel: OnceLock::new(),
        })
    }

    /// A backend registering in a context the application created and owns (for the C
    /// API: an existing `CUcontext`), with `flags`. umm pushes it on the calling thread
    /// around each driver call and never destroys it.
    ///
    /// Fails like [`CudaBackend::new`] without a driver ([`CudaError::NoDriver`], checked
    /// before any driver call), and with [`CudaError::Driver`] when the context is unusable.
    ///
    /// # Safety
    /// `ctx` must be a live context of this process's CUDA driver and stay alive until this
    /// backend is dropped (for a backend attached to a `umm::Manager`: until the manager
    /// is dropped).
    pub unsafe fn from_context(
        ctx: CUcontext,
        flags: HostRegisterFlags,
    ) -> Result<Self, CudaError> {
        init()?;
        let driver = |call, result| CudaError::Driver {
            device: "application context".to_string(),
            call,
            result,
            range: None,
        };
        // SAFETY: the driver is initialised and `ctx` is live (the caller's contract).
        check(unsafe { sys::cuCtxPushCurrent_v2(ctx) })
            .map_err(|e| driver("cuCtxPushCurrent", e))?;
        let mut device: CUdevice = 0;
        // SAFETY: `ctx` is current on this thread; `device` outlives the call.
        let got = check(unsafe { sys::cuCtxGetDevice(&mut device) });
        let mut popped: CUcontext = std::ptr::null_mut();
        // SAFETY: pairs with the push above.
        unsafe { sys::cuCtxPopCurrent_v2(&mut popped) };
        got.map_err(|e| driver("cuCtxGetDevice", e))?;
        let mut name = [0 as std::ffi::c_char; 256];
        // SAFETY: the buffer is 256 bytes and the driver NUL-terminates within `len`.
        check(unsafe { sys::cuDeviceGetName(name.as_mut_ptr(), name.len() as i32, device) })
            .map_err(|e| driver("cuDeviceGetName", e))?;
        // SAFETY: NUL-terminated by the driver (the buffer was zeroed, too).
        let name = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        let ordinal = device.max(0) as usize;
        let label = format!("cuda:{ordinal} {name}");
        tracing::debug!(device = %label, flags = flags.bits(), "using an application's CUDA context");
        Ok(CudaBackend {
            ordinal,
            device,
            ctx: Ctx(ctx),
            flags,
            label,
            retained_primary: false,
            live: Mutex::new(HashMap::new()),
            kernel: OnceLock::new(),
        })
    }

    /// The device ordinal.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The registration flags.
    pub fn flags(&self) -> HostRegisterFlags {
        self.flags
    }

    /// Host registrations that are live now.
    pub fn live_registrations(&self) -> usize {
        self.live.lock().len()
    }

    pub(crate) fn current(&self) -> Result<Current<'_>, CudaError> {
        // SAFETY: the primary context is retained for our lifetime.
        check(unsafe { sys::cuCtxPushCurrent_v2(self.ctx.0) })
            .map_err(|e| self.driver_error("cuCtxPushCurrent", e, None))?;
        Ok(Current(self))
    }

    pub(crate) fn driver_error(
        &self,
        call: &'static str,
        result: CUresult,
        range: Option<Range>,
    ) -> CudaError {
        CudaError::Driver {
            device: self.label.clone(),
            call,
            result,
            range,
        }
    }

    /// Registers `range` (see the [module docs](self)); what [`Backend::register`] calls.
    pub fn host_register(&self, range: Range) -> Result<CudaRegistration, CudaError> {
        let _current = self.current()?;
        let ptr = range.start() as *mut c_void;
        // SAFETY: the driver pins the pages of a range the caller (the manager) keeps
        // mapped until it deregisters; it validates the pointer itself (INVALID_VALUE).
        check(unsafe { sys::cuMemHostRegister_v2(ptr, range.len(), self.flags.bits()) })
            .map_err(|e| self.driver_error("cuMemHostRegister", e, Some(range)))?;
        let device_ptr = if self.flags.contains(HostRegisterFlags::DEVICEMAP) {
            let mut dptr = 0;
            // SAFETY: `ptr` was just registered with DEVICEMAP in this context.
            match check(unsafe { sys::cuMemHostGetDevicePointer_v2(&mut dptr, ptr, 0) }) {
                Ok(()) => Some(dptr),
                Err(e) => {
                    // SAFETY: undo the registration made above (exact base pointer).
                    unsafe { sys::cuMemHostUnregister(ptr) };
                    return Err(self.driver_error("cuMemHostGetDevicePointer", e, Some(range)));
                }
            }
        } else {
            None
        };
        self.live.lock().insert(range.start(), range.len());
        tracing::trace!(device = %self.label, %range, ?device_ptr, "host range registered");
        Ok(CudaRegistration { device_ptr, range })
    }

    /// Unregisters a registration made by [`CudaBackend::host_register`].
    pub fn host_unregister(&self, registration: CudaRegistration) -> Result<(), CudaError> {
        let range = registration.range;
        if self.live.lock().remove(&range.start()).is_none() {
            return Err(CudaError::NotRegistered {
                device: self.label.clone(),
                range,
            });
        }
        let _current = self.current()?;
        // SAFETY: exact base pointer of a live registration (removed from `live` above, so
        // unregistered once).
        check(unsafe { sys::cuMemHostUnregister(range.start() as *mut c_void) })
            .map_err(|e| self.driver_error("cuMemHostUnregister", e, Some(range)))?;
        tracing::trace!(device = %self.label, %range, "host range unregistered");
        Ok(())
    }
}

impl Backend for CudaBackend {
    type Translation = CudaRegistration;

    fn name(&self) -> &str {
        &self.label
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            allows_overlap: false,
            alignment: umm::page_size(),
            max_registration: usize::MAX,
            // Not claimed (never checked on a GPU here); the msync is cheap next to a
            // cuMemHostRegister.
            rejects_unmapped: false,
        }
    }

    fn register(&self, range: Range) -> Result<CudaRegistration, BackendError> {
        self.host_register(range).map_err(Into::into)
    }

    fn deregister(&self, range: Range, translation: CudaRegistration) -> Result<(), BackendError> {
        debug_assert_eq!(range, translation.range);
        self.host_unregister(translation).map_err(Into::into)
    }
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        let live = std::mem::take(&mut *self.live.lock());
        if !live.is_empty() {
            tracing::warn!(device = %self.label, count = live.len(), "unregistering host ranges never deregistered");
        }
        let kernel = self.kernel.take();
        if let Ok(_current) = self.current() {
            for base in live.keys() {
                // SAFETY: exact base pointers of live registrations, each unregistered once.
                unsafe { sys::cuMemHostUnregister(*base as *mut c_void) };
            }
            if let Some(Ok(k)) = kernel {
                k.unload();
            }
        }
        if self.retained_primary {
            // SAFETY: pairs with the retain in `with_flags`.
            unsafe { sys::cuDevicePrimaryCtxRelease_v2(self.device) };
        }
    }
}

impl fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CudaBackend")
            .field("device", &self.label)
            .field("flags", &self.flags)
            .field("live_registrations", &self.live_registrations())
            .finish()
    }
}
