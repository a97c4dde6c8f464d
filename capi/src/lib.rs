//! # umm-capi: the C API of umm
//!
//! `libumm.so` / `libumm.a` and the header `include/umm.h` (generated from this file by
//! cbindgen; `tests/header.rs` fails when the checked-in copy differs). One manager caches
//! registrations for every device of a C program: verbs protection domains the program
//! allocated itself (`umm_attach_verbs_pd`), CUDA contexts (`umm_attach_cuda_context`),
//! Vulkan devices it created (`umm_attach_vulkan`) or any device behind a table of
//! register/deregister callbacks (`umm_attach_callbacks`). `umm_pin` returns the
//! translation; `umm_invalidate` is what the program's unmap hooks call.
//!
//! Ownership and threads are documented on each function (and so in the header). Every
//! function catches Rust panics and returns `UMM_ERR_PANIC` instead of unwinding into C.
//!
//! The [README](https://github.com/umm-project/umm/blob/main/docs/c-api.md) has the build,
//! install and link steps.

#![allow(non_camel_case_types)]
// Function bodies document their `unsafe` blocks with SAFETY comments; the extern
// functions themselves carry the contract in their docs (which become the header's).
#![allow(clippy::missing_safety_doc)]

use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, RwLock};

use umm::{
    Backend, BackendError, Capabilities, Config, Device, DeviceId, Manager, OwnedPin, Range,
};

/// Status codes: `UMM_OK` (0) or the reason a call failed. `umm_strerror` names each one;
/// `umm_last_error` gives the full message of the calling thread's last failure.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum umm_status_t {
    /// Success.
    UMM_OK = 0,
    /// A NULL pointer where an object is required, unknown flag bits, or a callback table
    /// without its functions.
    UMM_ERR_INVALID_ARGUMENT = 1,
    /// A zero-length range.
    UMM_ERR_EMPTY_RANGE = 2,
    /// `addr + len` overflows the address space.
    UMM_ERR_RANGE_OVERFLOW = 3,
    /// Part of the range is not mapped.
    UMM_ERR_UNMAPPED = 4,
    /// The device handle is not attached to this manager.
    UMM_ERR_UNKNOWN_DEVICE = 5,
    /// The same device twice in one pin, no device, or more than 8.
    UMM_ERR_BAD_DEVICE_LIST = 6,
    /// More than 64 devices attached.
    UMM_ERR_TOO_MANY_DEVICES = 7,
    /// The range is larger than the device's maximum registration.
    UMM_ERR_TOO_LARGE = 8,
    /// Out of pinnable memory after evicting this device's unused registrations
    /// (RLIMIT_MEMLOCK, a device limit: the message names the limit).
    UMM_ERR_MEMLOCK = 9,
    /// A device that refuses overlapping registrations still has an overlapping one pinned.
    UMM_ERR_DEVICE_BUSY = 10,
    /// Invalidations kept racing with the registration of this range.
    UMM_ERR_UNSTABLE = 11,
    /// The device's registration failed, or the device cannot be used (the message has the
    /// device's own error).
    UMM_ERR_BACKEND = 12,
    /// A notifier source cannot protect this kind of memory, so umm refuses to pin it.
    UMM_ERR_UNCOVERED = 13,
    /// A notifier source refused the manager or could not watch the range.
    UMM_ERR_SOURCE = 14,
    /// The manager was created by the parent process: create a new one after fork.
    UMM_ERR_FORKED_CHILD = 15,
    /// This library was built without the backend asked for (e.g. without verbs).
    UMM_ERR_UNSUPPORTED = 16,
    /// The pin does not include this device.
    UMM_ERR_NOT_PINNED = 17,
    /// A bug in umm (a Rust panic, caught at the API boundary); please report it.
    UMM_ERR_PANIC = 18,
    /// Any other failure (the message says what).
    UMM_ERR_OTHER = 19,
    /// A `UMM_*` environment variable has a malformed value (the message names it and
    /// what it expects; see docs/configuration.md).
    UMM_ERR_CONFIG = 20,
    /// A callback called umm for its own device (a device's callbacks must not call umm).
    UMM_ERR_REENTRANT = 21,
    /// About 2^23 pins of one registration are held at once (leaked pins?); counts never wrap.
    UMM_ERR_TOO_MANY_PINS = 22,
}

/// A manager: one registration cache for every device of the process (normally one per
/// process). Created by `umm_manager_create`, released by `umm_manager_destroy`. All
/// functions taking a manager are thread-safe.
pub struct umm_manager_t {
    inner: Arc<Inner>,
}

/// A pinned range: while it lives, every device named in `umm_pin` keeps a registration
/// covering the range (even after an invalidation: then `umm_pin_is_valid` is false and
/// the registration is released by `umm_unpin`). Released by `umm_unpin`, exactly once,
/// from any thread. A pin keeps its manager alive.
pub struct umm_pin_t {
    pin: OwnedPin,
    inner: Arc<Inner>,
}

/// A device handle: its index in the manager, in attach order (0, 1, 2, ...).
pub type umm_device_t = u32;

/// Which kind of backend a device is, and so which fields of `umm_translation_t` are set.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum umm_device_kind_t {
    /// A table of C callbacks (`umm_attach_callbacks`): `opaque` is set.
    UMM_DEVICE_CALLBACKS = 0,
    /// A verbs protection domain (`umm_attach_verbs_pd`): `lkey` and `rkey` are set.
    UMM_DEVICE_VERBS = 1,
    /// A Vulkan device (`umm_attach_vulkan`): `vk_memory` and `vk_buffer` are set.
    UMM_DEVICE_VULKAN = 2,
    /// A CUDA context (`umm_attach_cuda_context`): `cuda_device_ptr` is set.
    UMM_DEVICE_CUDA = 3,
}

/// A device's translation of a pin, as returned by `umm_pin_translation`.
///
/// The registration covers `[registered_addr, registered_addr + registered_len)`, which
/// contains the pinned range; the pinned range starts `offset` bytes into it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct umm_translation_t {
    /// The device's kind (which fields below are meaningful).
    pub kind: c_int,
    /// Start of the registered range (page-aligned, possibly larger than the pin).
    pub registered_addr: u64,
    /// Length of the registered range in bytes.
    pub registered_len: u64,
    /// Offset of the pinned range's first byte inside the registered range.
    pub offset: u64,
    /// Identifies the registration: the same value on a hit, a new one after a fresh
    /// registration (compare it rather than handles, which drivers may reuse).
    pub registration_id: u64,
    /// `UMM_DEVICE_CALLBACKS`: the value the register callback stored.
    pub opaque: u64,
    /// `UMM_DEVICE_VERBS`: the MR's local key.
    pub lkey: u32,
    /// `UMM_DEVICE_VERBS`: the MR's remote key (the MR's address is `registered_addr`).
    pub rkey: u32,
    /// `UMM_DEVICE_VULKAN`: the imported `VkDeviceMemory` (a non-dispatchable handle)
    /// covering the registered range from its offset 0.
    pub vk_memory: u64,
    /// `UMM_DEVICE_VULKAN`: a `VkBuffer` bound over all of `vk_memory` (storage, transfer
    /// source and destination usage); the pinned range starts at `offset` in it.
    pub vk_buffer: u64,
    /// `UMM_DEVICE_CUDA`: the device pointer of `registered_addr`
    /// (`cuMemHostGetDevicePointer`); the pinned range is at `cuda_device_ptr + offset`.
    pub cuda_device_ptr: u64,
}

/// Registers `[addr, addr + len)` with the device: returns 0 and stores the device's
/// translation (any 64-bit value: a key, a handle, a pointer) in `*translation`, or
/// returns a positive errno value (`ENOMEM`/`EAGAIN`: out of pinnable memory, umm evicts
/// unused registrations of this device and retries once; `EFAULT`/`EINVAL`: bad address;
/// `EEXIST`: overlaps a registration; `ENODEV`: device gone; others: generic failure).
pub type umm_register_fn_t = Option<
    unsafe extern "C" fn(
        ctx: *mut c_void,
        addr: *mut c_void,
        len: usize,
        translation: *mut u64,
    ) -> c_int,
>;

/// Undoes one successful register call of exactly `[addr, addr + len)`; `translation` is
/// the value it stored. Returns 0 or a positive errno value (logged and counted in
/// `deregistration_errors`; the registration is forgotten either way).
pub type umm_deregister_fn_t = Option<
    unsafe extern "C" fn(
        ctx: *mut c_void,
        addr: *mut c_void,
        len: usize,
        translation: u64,
    ) -> c_int,
>;

/// A device described by C callbacks, for `umm_attach_callbacks`.
///
/// umm calls the callbacks from the threads that call `umm_pin` (a miss), `umm_unpin`,
/// `umm_flush` and `umm_manager_destroy` (deregistration), never from a notifier thread or
/// a signal handler, and never two at once for the same device. They must not call umm
/// functions on the same manager. `ctx` is passed to them unchanged and must stay valid
/// until the manager is destroyed and its last pin released.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct umm_callbacks_t {
    /// Passed as the first argument of both callbacks.
    pub ctx: *mut c_void,
    /// Required.
    pub register_range: umm_register_fn_t,
    /// Required.
    pub deregister_range: umm_deregister_fn_t,
    /// Whether two registrations of the device may overlap (verbs: yes; CUDA host
    /// registration: no, then umm merges overlapping requests into one registration).
    pub allows_overlap: bool,
    /// Registrations are rounded out to this power of two; 0 means the page size.
    pub alignment: usize,
    /// The largest registration the device accepts in bytes; 0 means no limit.
    pub max_registration: usize,
}

/// Totals over all devices of a manager, from `umm_stats`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct umm_stats_t {
    /// Devices attached.
    pub devices: u32,
    /// Pins served from the cache (per device).
    pub hits: u64,
    /// Pins that needed a registration (per device).
    pub misses: u64,
    /// Successful registrations.
    pub registrations: u64,
    /// Deregistrations (successful or not).
    pub deregistrations: u64,
    /// Invalidations that found something registered.
    pub invalidations: u64,
    /// Invalidations of everything (event ring overflow).
    pub invalidate_all: u64,
    /// Bytes registered now, over all devices.
    pub registered_bytes: u64,
}

/// The counters of one device, from `umm_device_stats`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct umm_device_stats_t {
    /// Pins served from the cache.
    pub hits: u64,
    /// Pins that needed a registration.
    pub misses: u64,
    /// Successful registrations.
    pub registrations: u64,
    /// Deregistrations (successful or not).
    pub deregistrations: u64,
    /// Deregistrations the device reported as failed.
    pub deregistration_errors: u64,
    /// Cache entries marked invalid by invalidations.
    pub invalidated_entries: u64,
    /// Unused registrations released to respect the cache limits or to make room.
    pub evictions: u64,
    /// Bytes registered now (valid and stale-but-pinned).
    pub registered_bytes: u64,
    /// Registrations held now (valid and stale-but-pinned).
    pub registered_entries: u64,
    /// Valid cached registrations.
    pub cached_entries: u64,
}

/// `IBV_ACCESS_LOCAL_WRITE`, as in `<infiniband/verbs.h>`.
pub const UMM_IBV_ACCESS_LOCAL_WRITE: c_int = 1;
/// `IBV_ACCESS_REMOTE_WRITE`, as in `<infiniband/verbs.h>`.
pub const UMM_IBV_ACCESS_REMOTE_WRITE: c_int = 2;
/// `IBV_ACCESS_REMOTE_READ`, as in `<infiniband/verbs.h>`.
pub const UMM_IBV_ACCESS_REMOTE_READ: c_int = 4;

struct Inner {
    manager: Arc<Manager>,
    devices: RwLock<Vec<Dev>>,
}

struct Dev {
    id: DeviceId,
    kind: DevKind,
    name: CString,
}

enum DevKind {
    Callbacks(Device<CallbackBackend>),
    #[cfg(feature = "verbs")]
    Verbs(Device<umm_rdma::RawPdBackend>),
    #[cfg(feature = "vulkan")]
    Vulkan(Device<umm_vulkan::VulkanBackend>),
    #[cfg(feature = "cuda")]
    Cuda(Device<umm_cuda::CudaBackend>),
}

impl Inner {
    fn device(&self, dev: umm_device_t) -> Result<(DeviceId, DevKindCopy), Failure> {
        let devices = self.devices.read().unwrap_or_else(|e| e.into_inner());
        let d = devices.get(dev as usize).ok_or_else(|| {
            Failure::new(
                umm_status_t::UMM_ERR_UNKNOWN_DEVICE,
                format!(
                    "device {dev} is not attached to this manager ({} are)",
                    devices.len()
                ),
            )
        })?;
        let kind = match &d.kind {
            DevKind::Callbacks(t) => DevKindCopy::Callbacks(*t),
            #[cfg(feature = "verbs")]
            DevKind::Verbs(t) => DevKindCopy::Verbs(*t),
            #[cfg(feature = "vulkan")]
            DevKind::Vulkan(t) => DevKindCopy::Vulkan(*t),
            #[cfg(feature = "cuda")]
            DevKind::Cuda(t) => DevKindCopy::Cuda(*t),
        };
        Ok((d.id, kind))
    }

    fn attach<B: Backend>(
        &self,
        backend: B,
        wrap: fn(Device<B>) -> DevKind,
    ) -> Result<umm_device_t, Failure> {
        let mut devices = self.devices.write().unwrap_or_else(|e| e.into_inner());
        let name = CString::new(backend.name().replace('\0', "?")).unwrap_or_default();
        let device = self.manager.attach(backend)?;
        let index = devices.len() as umm_device_t;
        devices.push(Dev {
            id: device.id(),
            kind: wrap(device),
            name,
        });
        Ok(index)
    }
}

#[derive(Clone, Copy)]
enum DevKindCopy {
    Callbacks(Device<CallbackBackend>),
    #[cfg(feature = "verbs")]
    Verbs(Device<umm_rdma::RawPdBackend>),
    #[cfg(feature = "vulkan")]
    Vulkan(Device<umm_vulkan::VulkanBackend>),
    #[cfg(feature = "cuda")]
    Cuda(Device<umm_cuda::CudaBackend>),
}

/// A failure on its way to C: the status and the full message.
struct Failure {
    status: umm_status_t,
    message: String,
}

impl Failure {
    fn new(status: umm_status_t, message: impl Into<String>) -> Failure {
        Failure {
            status,
            message: message.into(),
        }
    }

    fn null(what: &str) -> Failure {
        Failure::new(
            umm_status_t::UMM_ERR_INVALID_ARGUMENT,
            format!("{what} is NULL"),
        )
    }
}

/// The error and its chain of sources, joined with ": ".
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

impl From<umm::Error> for Failure {
    fn from(e: umm::Error) -> Failure {
        use umm::Error as E;
        use umm_status_t as S;
        let status = match &e {
            E::EmptyRange { .. } => S::UMM_ERR_EMPTY_RANGE,
            E::RangeOverflow { .. } => S::UMM_ERR_RANGE_OVERFLOW,
            E::Unmapped { .. } => S::UMM_ERR_UNMAPPED,
            E::UnknownDevice(_) => S::UMM_ERR_UNKNOWN_DEVICE,
            E::BadDeviceList { .. } => S::UMM_ERR_BAD_DEVICE_LIST,
            E::TooManyDevices { .. } => S::UMM_ERR_TOO_MANY_DEVICES,
            E::TooLarge { .. } => S::UMM_ERR_TOO_LARGE,
            E::MemlockLimit { .. } => S::UMM_ERR_MEMLOCK,
            E::DeviceRangeBusy { .. } => S::UMM_ERR_DEVICE_BUSY,
            E::Unstable { .. } => S::UMM_ERR_UNSTABLE,
            E::Backend { .. } => S::UMM_ERR_BACKEND,
            E::Uncovered { .. } => S::UMM_ERR_UNCOVERED,
            E::Source { .. } | E::Watch { .. } => S::UMM_ERR_SOURCE,
            E::ForkedChild { .. } => S::UMM_ERR_FORKED_CHILD,
            E::Config { .. } => S::UMM_ERR_CONFIG,
            E::Reentrant { .. } => S::UMM_ERR_REENTRANT,
            E::TooManyPins { .. } => S::UMM_ERR_TOO_MANY_PINS,
            _ => S::UMM_ERR_OTHER,
        };
        Failure::new(status, chain(&e))
    }
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(message: &str) {
    let text = CString::new(message.replace('\0', "?")).unwrap_or_default();
    LAST_ERROR.with(|l| *l.borrow_mut() = text);
}

/// Runs `f`, turning its failure or panic into a status and the thread's last error.
fn guard(f: impl FnOnce() -> Result<(), Failure>) -> umm_status_t {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => umm_status_t::UMM_OK,
        Ok(Err(failure)) => {
            tracing::debug!(status = ?failure.status, message = %failure.message, "umm C API call failed");
            set_last_error(&failure.message);
            failure.status
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_string());
            set_last_error(&format!("internal error (panic): {what}"));
            umm_status_t::UMM_ERR_PANIC
        }
    }
}

/// The manager's configuration: the defaults with the `UMM_*` environment variables
/// applied (docs/configuration.md).
fn config() -> Result<Config, Failure> {
    Ok(Config::from_env()?)
}

// ---------------------------------------------------------------------------------------
// The callback backend.

/// A device behind a `umm_callbacks_t` table.
struct CallbackBackend {
    name: String,
    table: umm_callbacks_t,
    register: unsafe extern "C" fn(*mut c_void, *mut c_void, usize, *mut u64) -> c_int,
    deregister: unsafe extern "C" fn(*mut c_void, *mut c_void, usize, u64) -> c_int,
}

// SAFETY: the header requires the callbacks and `ctx` to be usable from any thread (umm
// calls them from the threads that call it, one call at a time per device).
unsafe impl Send for CallbackBackend {}
// SAFETY: as above; the backend itself only reads its fields.
unsafe impl Sync for CallbackBackend {}

/// A callback's non-zero return value.
#[derive(Debug)]
struct CallbackError {
    device: String,
    op: &'static str,
    range: Range,
    rc: c_int,
}

impl std::fmt::Display for CallbackError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let os = if self.rc > 0 {
            std::io::Error::from_raw_os_error(self.rc).to_string()
        } else {
            "not an errno value".to_string()
        };
        write!(
            f,
            "{}: {} callback of {} returned {} ({os})",
            self.device, self.op, self.range, self.rc
        )
    }
}

impl std::error::Error for CallbackError {}

impl CallbackBackend {
    fn error(&self, op: &'static str, range: Range, rc: c_int) -> BackendError {
        let kind = BackendError::from_errno(rc).kind;
        BackendError::new(
            kind,
            CallbackError {
                device: self.name.clone(),
                op,
                range,
                rc,
            },
        )
    }
}

impl Backend for CallbackBackend {
    type Translation = u64;

    fn name(&self) -> &str {
        &self.name
    }

    fn capabilities(&self) -> Capabilities {
        let default = Capabilities::default();
        Capabilities {
            allows_overlap: self.table.allows_overlap,
            alignment: match self.table.alignment {
                0 => default.alignment,
                a => a.max(default.alignment),
            },
            max_registration: match self.table.max_registration {
                0 => usize::MAX,
                m => m,
            },
            rejects_unmapped: false,
        }
    }

    fn register(&self, range: Range) -> Result<u64, BackendError> {
        let mut t = 0u64;
        // SAFETY: the application supplied the callback for exactly this call (see
        // `umm_callbacks_t`); `t` outlives the call.
        let rc = unsafe {
            (self.register)(
                self.table.ctx,
                range.start() as *mut c_void,
                range.len(),
                &mut t,
            )
        };
        match rc {
            0 => Ok(t),
            rc => Err(self.error("register", range, rc)),
        }
    }

    fn deregister(&self, range: Range, translation: u64) -> Result<(), BackendError> {
        // SAFETY: as in `register`; called once per successful registration.
        let rc = unsafe {
            (self.deregister)(
                self.table.ctx,
                range.start() as *mut c_void,
                range.len(),
                translation,
            )
        };
        match rc {
            0 => Ok(()),
            rc => Err(self.error("deregister", range, rc)),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Helpers for pointer arguments.

/// # Safety
/// `p` is NULL or points to a live `umm_manager_t`.
unsafe fn manager_ref<'a>(p: *const umm_manager_t) -> Result<&'a umm_manager_t, Failure> {
    // SAFETY: the caller's contract.
    unsafe { p.as_ref() }.ok_or_else(|| Failure::null("manager"))
}

/// # Safety
/// `p` is NULL or points to a live `umm_pin_t`.
unsafe fn pin_ref<'a>(p: *const umm_pin_t) -> Result<&'a umm_pin_t, Failure> {
    // SAFETY: the caller's contract.
    unsafe { p.as_ref() }.ok_or_else(|| Failure::null("pin"))
}

/// # Safety
/// `out` is NULL or writable for one `T`.
unsafe fn write_out<T>(out: *mut T, value: T, what: &str) -> Result<(), Failure> {
    if out.is_null() {
        return Err(Failure::null(what));
    }
    // SAFETY: non-null and writable by the caller's contract.
    unsafe { out.write(value) };
    Ok(())
}

/// # Safety
/// `name` is NULL or a NUL-terminated string.
unsafe fn name_arg(name: *const c_char, default: &str) -> String {
    if name.is_null() {
        return default.to_string();
    }
    // SAFETY: the caller's contract.
    unsafe { CStr::from_ptr(name) }
        .to_string_lossy()
        .into_owned()
}

// ---------------------------------------------------------------------------------------
// The API.

/// The status's name and meaning, e.g. "UMM_ERR_UNMAPPED: part of the range is not
/// mapped". A static string: never free it. Any thread.
#[no_mangle]
pub extern "C" fn umm_strerror(status: umm_status_t) -> *const c_char {
    use umm_status_t as S;
    let text: &'static CStr = match status {
        S::UMM_OK => c"UMM_OK: success",
        S::UMM_ERR_INVALID_ARGUMENT => c"UMM_ERR_INVALID_ARGUMENT: NULL pointer, unknown flags or incomplete callback table",
        S::UMM_ERR_EMPTY_RANGE => c"UMM_ERR_EMPTY_RANGE: zero-length range",
        S::UMM_ERR_RANGE_OVERFLOW => c"UMM_ERR_RANGE_OVERFLOW: range overflows the address space",
        S::UMM_ERR_UNMAPPED => c"UMM_ERR_UNMAPPED: part of the range is not mapped",
        S::UMM_ERR_UNKNOWN_DEVICE => c"UMM_ERR_UNKNOWN_DEVICE: device not attached to this manager",
        S::UMM_ERR_BAD_DEVICE_LIST => c"UMM_ERR_BAD_DEVICE_LIST: no device, a device named twice, or more than 8",
        S::UMM_ERR_TOO_MANY_DEVICES => c"UMM_ERR_TOO_MANY_DEVICES: more than 64 devices attached",
        S::UMM_ERR_TOO_LARGE => c"UMM_ERR_TOO_LARGE: larger than the device's maximum registration",
        S::UMM_ERR_MEMLOCK => c"UMM_ERR_MEMLOCK: out of pinnable memory (RLIMIT_MEMLOCK or a device limit)",
        S::UMM_ERR_DEVICE_BUSY => c"UMM_ERR_DEVICE_BUSY: an overlapping registration is still pinned on a device that refuses overlaps",
        S::UMM_ERR_UNSTABLE => c"UMM_ERR_UNSTABLE: invalidations kept racing with the registration",
        S::UMM_ERR_BACKEND => c"UMM_ERR_BACKEND: the device failed (registration) or cannot be used (attach)",
        S::UMM_ERR_UNCOVERED => c"UMM_ERR_UNCOVERED: a notifier source cannot protect this memory",
        S::UMM_ERR_SOURCE => c"UMM_ERR_SOURCE: a notifier source refused the manager or the range",
        S::UMM_ERR_FORKED_CHILD => c"UMM_ERR_FORKED_CHILD: manager of the parent process; create a new one after fork",
        S::UMM_ERR_UNSUPPORTED => c"UMM_ERR_UNSUPPORTED: this library was built without that backend",
        S::UMM_ERR_NOT_PINNED => c"UMM_ERR_NOT_PINNED: the pin does not include this device",
        S::UMM_ERR_PANIC => c"UMM_ERR_PANIC: internal error in umm (please report it)",
        S::UMM_ERR_OTHER => c"UMM_ERR_OTHER: other failure (see umm_last_error)",
        S::UMM_ERR_CONFIG => c"UMM_ERR_CONFIG: a UMM_* environment variable has a malformed value",
        S::UMM_ERR_REENTRANT => c"UMM_ERR_REENTRANT: a device callback called umm for its own device",
        S::UMM_ERR_TOO_MANY_PINS => c"UMM_ERR_TOO_MANY_PINS: too many pins of one registration held at once",
    };
    text.as_ptr()
}

/// The full message of the calling thread's last failed umm call (device, range and the
/// device's own error), or "" if none failed yet. Thread-local: valid until the next
/// failing umm call on the same thread; copy it to keep it. Never free it.
#[no_mangle]
pub extern "C" fn umm_last_error() -> *const c_char {
    // The CString's buffer lives until the next set_last_error on this thread.
    LAST_ERROR.with(|l| l.borrow().as_ptr())
}

/// The library version ("0.1.0"). A static string.
#[no_mangle]
pub extern "C" fn umm_version() -> *const c_char {
    static VERSION: &CStr =
        match CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
            Ok(v) => v,
            Err(_) => c"unknown",
        };
    VERSION.as_ptr()
}

/// Creates a manager and stores it in `*out`, configured by the `UMM_*` environment
/// variables (cache limits, cache off, stats at exit: docs/configuration.md; a malformed
/// value fails with `UMM_ERR_CONFIG` naming it). It has no notifier source: the application reports
/// unmaps with `umm_invalidate` (from its munmap/free hooks, as MPI libraries do).
/// Thread-safe; release it with `umm_manager_destroy`.
#[no_mangle]
pub unsafe extern "C" fn umm_manager_create(out: *mut *mut umm_manager_t) -> umm_status_t {
    guard(|| {
        if out.is_null() {
            return Err(Failure::null("out"));
        }
        let m = Box::new(umm_manager_t {
            inner: Arc::new(Inner {
                manager: Arc::new(Manager::new(config()?)),
                devices: RwLock::new(Vec::new()),
            }),
        });
        // SAFETY: `out` is non-null and writable by the caller's contract.
        unsafe { write_out(out, Box::into_raw(m), "out") }
    })
}

/// Releases the caller's reference to the manager. Cached registrations are deregistered
/// now (through the devices' callbacks) unless pins are still held: each pin keeps the
/// manager alive, and the last `umm_unpin` finishes the release. NULL is ignored. The
/// manager must not be used after this call (pins still may, until unpinned).
#[no_mangle]
pub unsafe extern "C" fn umm_manager_destroy(manager: *mut umm_manager_t) {
    if manager.is_null() {
        return;
    }
    guard(|| {
        // SAFETY: the caller hands back a pointer from umm_manager_create, once.
        drop(unsafe { Box::from_raw(manager) });
        Ok(())
    });
}

/// Attaches a device described by the callback table `callbacks` (copied; `ctx` must stay
/// valid, see `umm_callbacks_t`) and stores its handle in `*out`. `name` (may be NULL)
/// appears in error messages and stats. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn umm_attach_callbacks(
    manager: *mut umm_manager_t,
    name: *const c_char,
    callbacks: *const umm_callbacks_t,
    out: *mut umm_device_t,
) -> umm_status_t {
    guard(|| {
        // SAFETY: the caller passes a live manager (or NULL).
        let m = unsafe { manager_ref(manager) }?;
        // SAFETY: the caller passes a readable table (or NULL).
        let table = *unsafe { callbacks.as_ref() }.ok_or_else(|| Failure::null("callbacks"))?;
        let (Some(register), Some(deregister)) = (table.register_range, table.deregister_range)
        else {
            return Err(Failure::new(
                umm_status_t::UMM_ERR_INVALID_ARGUMENT,
                "callbacks: register_range and deregister_range are both required",
            ));
        };
        if table.alignment != 0 && !table.alignment.is_power_of_two() {
            return Err(Failure::new(
                umm_status_t::UMM_ERR_INVALID_ARGUMENT,
                format!(
                    "callbacks: alignment {} is not a power of two",
                    table.alignment
                ),
            ));
        }
        if out.is_null() {
            return Err(Failure::null("out"));
        }
        // SAFETY: NULL or a NUL-terminated string, by the caller's contract.
        let name = unsafe { name_arg(name, "callbacks") };
        let backend = CallbackBackend {
            name,
            table,
            register,
            deregister,
        };
        let dev = m.inner.attach(backend, DevKind::Callbacks)?;
        // SAFETY: checked non-null above; writable by the caller's contract.
        unsafe { write_out(out, dev, "out") }
    })
}

/// Attaches the verbs protection domain `pd` (a `struct ibv_pd *` the application
/// allocated with `ibv_alloc_pd`; umm never frees it) and stores the device handle in
/// `*out`. Every registration of this device has the access `access`: a combination of
/// `IBV_ACCESS_LOCAL_WRITE`, `IBV_ACCESS_REMOTE_WRITE` and `IBV_ACCESS_REMOTE_READ`
/// (attach the same pd twice for two access classes). The pd must stay allocated until
/// the manager is destroyed and its last pin released. Fails with `UMM_ERR_UNSUPPORTED`
/// when the library was built without verbs. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn umm_attach_verbs_pd(
    manager: *mut umm_manager_t,
    pd: *mut c_void,
    access: c_int,
    out: *mut umm_device_t,
) -> umm_status_t {
    guard(|| {
        // SAFETY: the caller passes a live manager (or NULL).
        let m = unsafe { manager_ref(manager) }?;
        if pd.is_null() {
            return Err(Failure::null("pd"));
        }
        if out.is_null() {
            return Err(Failure::null("out"));
        }
        let known =
            UMM_IBV_ACCESS_LOCAL_WRITE | UMM_IBV_ACCESS_REMOTE_WRITE | UMM_IBV_ACCESS_REMOTE_READ;
        if access & !known != 0 {
            return Err(Failure::new(
                umm_status_t::UMM_ERR_INVALID_ARGUMENT,
                format!("access {access:#x}: only IBV_ACCESS_LOCAL_WRITE, _REMOTE_WRITE and _REMOTE_READ are supported"),
            ));
        }
        attach_verbs(m, pd, access, out)
    })
}

#[cfg(feature = "verbs")]
fn attach_verbs(
    m: &umm_manager_t,
    pd: *mut c_void,
    access: c_int,
    out: *mut umm_device_t,
) -> Result<(), Failure> {
    let access = umm_rdma::Access {
        local_write: access & UMM_IBV_ACCESS_LOCAL_WRITE != 0,
        remote_read: access & UMM_IBV_ACCESS_REMOTE_READ != 0,
        remote_write: access & UMM_IBV_ACCESS_REMOTE_WRITE != 0,
    };
    // SAFETY: the header's contract: `pd` is a live ibv_pd that outlives the manager and
    // its pins (the manager is kept alive by pins and dropped after them).
    let backend = unsafe { umm_rdma::RawPdBackend::from_raw(pd.cast(), access) }
        .ok_or_else(|| Failure::null("pd"))?;
    let dev = m.inner.attach(backend, DevKind::Verbs)?;
    // SAFETY: checked non-null by the caller of this function.
    unsafe { write_out(out, dev, "out") }
}

#[cfg(not(feature = "verbs"))]
fn attach_verbs(
    _: &umm_manager_t,
    _: *mut c_void,
    _: c_int,
    _: *mut umm_device_t,
) -> Result<(), Failure> {
    Err(Failure::new(
        umm_status_t::UMM_ERR_UNSUPPORTED,
        "this libumm was built without the `verbs` feature",
    ))
}

/// Attaches the CUDA context `ctx` (a `CUcontext` the application created or retained;
/// umm never destroys it) and stores the device handle in `*out`. Registrations use
/// `cuMemHostRegister` with `CU_MEMHOSTREGISTER_DEVICEMAP | CU_MEMHOSTREGISTER_PORTABLE`
/// and the translation's `cuda_device_ptr` is the device pointer of the registered range.
/// CUDA refuses overlapping host registrations, so umm merges overlapping pins of this
/// device into one registration (adjacent ones stay apart). The context must stay alive until the
/// manager is destroyed and its last pin released. Fails with `UMM_ERR_BACKEND` without a
/// CUDA driver (the message says so) and `UMM_ERR_UNSUPPORTED` when the library was built
/// without CUDA. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn umm_attach_cuda_context(
    manager: *mut umm_manager_t,
    ctx: *mut c_void,
    out: *mut umm_device_t,
) -> umm_status_t {
    guard(|| {
        // SAFETY: the caller passes a live manager (or NULL).
        let m = unsafe { manager_ref(manager) }?;
        if ctx.is_null() {
            return Err(Failure::null("ctx"));
        }
        if out.is_null() {
            return Err(Failure::null("out"));
        }
        attach_cuda(m, ctx, out)
    })
}

#[cfg(feature = "cuda")]
fn attach_cuda(m: &umm_manager_t, ctx: *mut c_void, out: *mut umm_device_t) -> Result<(), Failure> {
    // SAFETY: the header's contract: a live CUcontext of this process that outlives the
    // manager and its pins.
    let backend = unsafe {
        umm_cuda::CudaBackend::from_context(ctx.cast(), umm_cuda::HostRegisterFlags::default())
    }
    .map_err(|e| Failure::new(umm_status_t::UMM_ERR_BACKEND, chain(&e)))?;
    let dev = m.inner.attach(backend, DevKind::Cuda)?;
    // SAFETY: checked non-null by the caller of this function.
    unsafe { write_out(out, dev, "out") }
}

#[cfg(not(feature = "cuda"))]
fn attach_cuda(_: &umm_manager_t, _: *mut c_void, _: *mut umm_device_t) -> Result<(), Failure> {
    Err(Failure::new(
        umm_status_t::UMM_ERR_UNSUPPORTED,
        "this libumm was built without the `cuda` feature",
    ))
}

/// Attaches a Vulkan device the application created and owns and stores its handle in
/// `*out`: `instance` (a `VkInstance`), `physical` (the `VkPhysicalDevice` the device was
/// created from) and `device` (a `VkDevice` created with the `VK_EXT_external_memory_host`
/// extension enabled; Vulkan 1.1). Each registration imports the range as host memory and
/// binds a `VkBuffer` over it (`vk_memory`, `vk_buffer` in the translation); umm frees
/// them on deregistration and never destroys the three handles, which must stay alive
/// until the manager is destroyed and its last pin released. umm submits nothing to the
/// device's queues. Fails with `UMM_ERR_BACKEND` (message says why) when the device lacks
/// the extension, and `UMM_ERR_UNSUPPORTED` when the library was built without Vulkan.
/// Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn umm_attach_vulkan(
    manager: *mut umm_manager_t,
    instance: *mut c_void,
    physical: *mut c_void,
    device: *mut c_void,
    out: *mut umm_device_t,
) -> umm_status_t {
    guard(|| {
        // SAFETY: the caller passes a live manager (or NULL).
        let m = unsafe { manager_ref(manager) }?;
        for (p, what) in [
            (instance, "instance"),
            (physical, "physical"),
            (device, "device"),
        ] {
            if p.is_null() {
                return Err(Failure::null(what));
            }
        }
        if out.is_null() {
            return Err(Failure::null("out"));
        }
        attach_vulkan(m, instance, physical, device, out)
    })
}

#[cfg(feature = "vulkan")]
fn attach_vulkan(
    m: &umm_manager_t,
    instance: *mut c_void,
    physical: *mut c_void,
    device: *mut c_void,
    out: *mut umm_device_t,
) -> Result<(), Failure> {
    use ash::vk::{self, Handle};
    // SAFETY: the header's contract: live handles of this process's loader that belong
    // together and outlive the manager and its pins (dispatchable handles are pointers).
    let backend = unsafe {
        umm_vulkan::VulkanBackend::from_raw(
            vk::Instance::from_raw(instance as u64),
            vk::PhysicalDevice::from_raw(physical as u64),
            vk::Device::from_raw(device as u64),
        )
    }
    .map_err(|e| Failure::new(umm_status_t::UMM_ERR_BACKEND, chain(&e)))?;
    let dev = m.inner.attach(backend, DevKind::Vulkan)?;
    // SAFETY: checked non-null by the caller of this function.
    unsafe { write_out(out, dev, "out") }
}

#[cfg(not(feature = "vulkan"))]
fn attach_vulkan(
    _: &umm_manager_t,
    _: *mut c_void,
    _: *mut c_void,
    _: *mut c_void,
    _: *mut umm_device_t,
) -> Result<(), Failure> {
    Err(Failure::new(
        umm_status_t::UMM_ERR_UNSUPPORTED,
        "this libumm was built without the `vulkan` feature",
    ))
}

/// The device's name ("rxe0", the name given to `umm_attach_callbacks`), or NULL for an
/// unknown device. Owned by the manager: valid while the manager is. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn umm_device_name(
    manager: *const umm_manager_t,
    device: umm_device_t,
) -> *const c_char {
    // SAFETY: the caller passes a live manager (or NULL).
    let Ok(m) = (unsafe { manager_ref(manager) }) else {
        return std::ptr::null();
    };
    let devices = m.inner.devices.read().unwrap_or_else(|e| e.into_inner());
    // The CString's heap buffer does not move when the vector grows.
    devices
        .get(device as usize)
        .map(|d| d.name.as_ptr())
        .unwrap_or(std::ptr::null())
}

/// Pins `[addr, addr + len)` on the `ndevices` devices in `devices` (1 to 8, each once)
/// and stores the pin in `*out`: a cache hit takes no lock; a miss registers with each
/// device that has no valid registration covering the range. Read translations with
/// `umm_pin_translation`; release with `umm_unpin`. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn umm_pin(
    manager: *mut umm_manager_t,
    addr: *const c_void,
    len: usize,
    devices: *const umm_device_t,
    ndevices: usize,
    out: *mut *mut umm_pin_t,
) -> umm_status_t {
    guard(|| {
        // SAFETY: the caller passes a live manager (or NULL).
        let m = unsafe { manager_ref(manager) }?;
        if out.is_null() {
            return Err(Failure::null("out"));
        }
        if devices.is_null() && ndevices > 0 {
            return Err(Failure::null("devices"));
        }
        let list: &[umm_device_t] = if ndevices == 0 {
            &[]
        } else {
            // SAFETY: `devices` points to `ndevices` handles by the caller's contract.
            unsafe { std::slice::from_raw_parts(devices, ndevices) }
        };
        let mut ids = Vec::with_capacity(list.len());
        for &d in list {
            ids.push(m.inner.device(d)?.0);
        }
        let range = Range::new(addr as usize, len)?;
        let pin = m.inner.manager.pin_owned(range, &ids)?;
        let p = Box::new(umm_pin_t {
            pin,
            inner: m.inner.clone(),
        });
        // SAFETY: checked non-null above; writable by the caller's contract.
        unsafe { write_out(out, Box::into_raw(p), "out") }
    })
}

/// Releases a pin (from any thread, exactly once). A registration stays cached for the
/// next pin unless it was invalidated: then the device deregisters it now, if this was its
/// last pin. NULL is ignored.
#[no_mangle]
pub unsafe extern "C" fn umm_unpin(pin: *mut umm_pin_t) {
    if pin.is_null() {
        return;
    }
    guard(|| {
        // SAFETY: the caller hands back a pointer from umm_pin_t, once.
        drop(unsafe { Box::from_raw(pin) });
        Ok(())
    });
}

/// Whether every device's registration of the pin still describes what is mapped: false
/// once an invalidation overlapping it was reported. NULL gives false. Any thread.
#[no_mangle]
pub unsafe extern "C" fn umm_pin_is_valid(pin: *const umm_pin_t) -> bool {
    // SAFETY: the caller passes a live pin (or NULL).
    match unsafe { pin.as_ref() } {
        Some(p) => catch_unwind(AssertUnwindSafe(|| p.pin.is_valid())).unwrap_or(false),
        None => false,
    }
}

/// Stores `device`'s translation of the pin in `*out`: the registered range, the pin's
/// offset in it, and the kind's own fields (see `umm_translation_t`). Valid while the pin
/// is held. Any thread.
#[no_mangle]
pub unsafe extern "C" fn umm_pin_translation(
    pin: *const umm_pin_t,
    device: umm_device_t,
    out: *mut umm_translation_t,
) -> umm_status_t {
    guard(|| {
        // SAFETY: the caller passes a live pin (or NULL).
        let p = unsafe { pin_ref(pin) }?;
        if out.is_null() {
            return Err(Failure::null("out"));
        }
        let (id, kind) = p.inner.device(device)?;
        let not_pinned = || {
            Failure::new(
                umm_status_t::UMM_ERR_NOT_PINNED,
                format!(
                    "the pin of {} does not include device {device}",
                    p.pin.range()
                ),
            )
        };
        let registered = p.pin.registered_range(id).ok_or_else(not_pinned)?;
        let mut t = umm_translation_t {
            registered_addr: registered.start() as u64,
            registered_len: registered.len() as u64,
            offset: p.pin.offset(id).ok_or_else(not_pinned)? as u64,
            registration_id: p.pin.registration_id(id).ok_or_else(not_pinned)?,
            ..Default::default()
        };
        match kind {
            DevKindCopy::Callbacks(d) => {
                t.kind = umm_device_kind_t::UMM_DEVICE_CALLBACKS as c_int;
                t.opaque = *p.pin.translation(d).ok_or_else(not_pinned)?;
            }
            #[cfg(feature = "verbs")]
            DevKindCopy::Verbs(d) => {
                let mr = p.pin.translation(d).ok_or_else(not_pinned)?;
                t.kind = umm_device_kind_t::UMM_DEVICE_VERBS as c_int;
                t.lkey = mr.lkey;
                t.rkey = mr.rkey;
                t.registered_addr = mr.addr;
                t.registered_len = mr.len as u64;
            }
            #[cfg(feature = "vulkan")]
            DevKindCopy::Vulkan(d) => {
                use ash::vk::Handle;
                let import = p.pin.translation(d).ok_or_else(not_pinned)?;
                t.kind = umm_device_kind_t::UMM_DEVICE_VULKAN as c_int;
                t.vk_memory = import.memory.as_raw();
                t.vk_buffer = import.buffer.as_raw();
                t.offset += import.offset;
            }
            #[cfg(feature = "cuda")]
            DevKindCopy::Cuda(d) => {
                let reg = p.pin.translation(d).ok_or_else(not_pinned)?;
                t.kind = umm_device_kind_t::UMM_DEVICE_CUDA as c_int;
                t.cuda_device_ptr = reg.device_ptr.unwrap_or(0);
            }
        }
        // SAFETY: checked non-null above; writable by the caller's contract.
        unsafe { write_out(out, t, "out") }
    })
}

/// Reports that `[addr, addr + len)` is being unmapped or remapped: every overlapping
/// registration of every device is marked invalid before this returns (no later pin
/// returns it). The deregistrations it causes run later, on a thread calling umm: the
/// last `umm_unpin` of a pinned registration, the next miss, or `umm_flush`. Call it
/// before the memory goes away (e.g. in a munmap hook). It never calls a device callback,
/// so it is safe on a thread that holds locks the callbacks take.
/// Thread-safe; not async-signal-safe.
#[no_mangle]
pub unsafe extern "C" fn umm_invalidate(
    manager: *mut umm_manager_t,
    addr: *const c_void,
    len: usize,
) -> umm_status_t {
    guard(|| {
        // SAFETY: the caller passes a live manager (or NULL).
        let m = unsafe { manager_ref(manager) }?;
        let range = Range::new(addr as usize, len)?;
        m.inner.manager.invalidate(range);
        Ok(())
    })
}

/// Deregisters now every invalidated registration that no pin holds (otherwise done at
/// the next miss or unpin). Calls the devices' callbacks. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn umm_flush(manager: *mut umm_manager_t) -> umm_status_t {
    guard(|| {
        // SAFETY: the caller passes a live manager (or NULL).
        let m = unsafe { manager_ref(manager) }?;
        m.inner.manager.flush();
        Ok(())
    })
}

/// Stores the manager's totals in `*out` (a snapshot; counters of concurrent calls may
/// be mid-update). Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn umm_stats(
    manager: *const umm_manager_t,
    out: *mut umm_stats_t,
) -> umm_status_t {
    guard(|| {
        // SAFETY: the caller passes a live manager (or NULL).
        let m = unsafe { manager_ref(manager) }?;
        let s = m.inner.manager.stats();
        let totals = umm_stats_t {
            devices: s.devices.len() as u32,
            hits: s.hits(),
            misses: s.misses(),
            registrations: s.registrations(),
            deregistrations: s.deregistrations(),
            invalidations: s.invalidations,
            invalidate_all: s.invalidate_all,
            registered_bytes: s.devices.iter().map(|d| d.registered_bytes).sum(),
        };
        // SAFETY: writable by the caller's contract (NULL is refused).
        unsafe { write_out(out, totals, "out") }
    })
}

/// Stores one device's counters in `*out`. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn umm_device_stats(
    manager: *const umm_manager_t,
    device: umm_device_t,
    out: *mut umm_device_stats_t,
) -> umm_status_t {
    guard(|| {
        // SAFETY: the caller passes a live manager (or NULL).
        let m = unsafe { manager_ref(manager) }?;
        let (id, _) = m.inner.device(device)?;
        let s = m.inner.manager.stats();
        let d = s.device(id).ok_or_else(|| {
            Failure::new(
                umm_status_t::UMM_ERR_UNKNOWN_DEVICE,
                format!("device {device} has no counters"),
            )
        })?;
        let c = umm_device_stats_t {
            hits: d.hits,
            misses: d.misses,
            registrations: d.registrations,
            deregistrations: d.deregistrations,
            deregistration_errors: d.deregistration_errors,
            invalidated_entries: d.invalidated_entries,
            evictions: d.evictions,
            registered_bytes: d.registered_bytes,
            registered_entries: d.registered_entries,
            cached_entries: d.cached_entries,
        };
        // SAFETY: writable by the caller's contract (NULL is refused).
        unsafe { write_out(out, c, "out") }
    })
}
