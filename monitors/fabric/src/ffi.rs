//! The libfabric side: `struct fid_mem_monitor` (rdma/fi_ext.h), its export ops, the
//! import through `fi_open("mr_cache")` + `fi_import_fid`, the C entry points and the
//! `LD_PRELOAD` constructor.
//!
//! libfabric is found at run time (`dlsym(RTLD_DEFAULT, "fi_open")`, else
//! `dlopen("libfabric.so.1")`), so the library links nothing of libfabric and builds
//! where it is not installed.

use std::cell::UnsafeCell;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use umm::Range;

use crate::config::{parse_bool, Config};
use crate::error::FabricError;
use crate::monitor::{Monitor, MonitorOptions, NotifyFn};

/// `FI_CLASS_MEM_MONITOR` in `enum fi_class` (rdma/fabric.h, libfabric 1.13+).
pub(crate) const FI_CLASS_MEM_MONITOR: usize = 23;
/// The API version asked of `fi_open`: the import extension exists since 1.13.
const FI_VERSION_1_13: u32 = (1 << 16) | 13;

/// `struct fi_ops`.
#[repr(C)]
struct FiOps {
    size: usize,
    close: Option<unsafe extern "C" fn(*mut Fid) -> c_int>,
    bind: Option<unsafe extern "C" fn(*mut Fid, *mut Fid, u64) -> c_int>,
    control: Option<unsafe extern "C" fn(*mut Fid, c_int, *mut c_void) -> c_int>,
    ops_open: *const c_void,
    tostr: *const c_void,
    ops_set: *const c_void,
}

/// `struct fid`.
#[repr(C)]
struct Fid {
    fclass: usize,
    context: *mut c_void,
    ops: *mut FiOps,
}

/// `struct fi_ops_mem_monitor`.
#[repr(C)]
struct MonitorOps {
    size: usize,
    start: unsafe extern "C" fn(*mut FidMemMonitor) -> c_int,
    stop: unsafe extern "C" fn(*mut FidMemMonitor),
    subscribe: unsafe extern "C" fn(*mut FidMemMonitor, *const c_void, usize) -> c_int,
    unsubscribe: unsafe extern "C" fn(*mut FidMemMonitor, *const c_void, usize),
    valid: unsafe extern "C" fn(*mut FidMemMonitor, *const c_void, usize) -> bool,
}

/// `struct fi_ops_mem_notify`.
#[repr(C)]
struct NotifyOps {
    size: usize,
    notify: Option<unsafe extern "C" fn(*mut FidMemMonitor, *const c_void, usize)>,
}

/// `struct fid_mem_monitor`.
#[repr(C)]
struct FidMemMonitor {
    fid: Fid,
    export_ops: *const MonitorOps,
    import_ops: *const NotifyOps,
}

/// The one monitor object libfabric gets: it writes `fid.context`, `fid.ops` and
/// `import_ops` into it while importing, so it lives in a static cell.
struct Slot(UnsafeCell<FidMemMonitor>);

// SAFETY: the cell is written by libfabric once, inside `fi_import_fid`, which `install`
// serialises with INSTALL; afterwards it is only read (import_ops, with a volatile load).
unsafe impl Sync for Slot {}

static EXPORT_OPS: MonitorOps = MonitorOps {
    size: std::mem::size_of::<MonitorOps>(),
    start: mon_start,
    stop: mon_stop,
    subscribe: mon_subscribe,
    unsubscribe: mon_unsubscribe,
    valid: mon_valid,
};

/// `fid.ops` before libfabric replaces it with its own (it never calls these).
struct OpsCell(UnsafeCell<FiOps>);
// SAFETY: never written by this crate; libfabric only replaces the pointer to it.
unsafe impl Sync for OpsCell {}

static INITIAL_OPS: OpsCell = OpsCell(UnsafeCell::new(FiOps {
    size: std::mem::size_of::<FiOps>(),
    close: None,
    bind: None,
    control: None,
    ops_open: std::ptr::null(),
    tostr: std::ptr::null(),
    ops_set: std::ptr::null(),
}));

static SLOT: Slot = Slot(UnsafeCell::new(FidMemMonitor {
    fid: Fid {
        fclass: FI_CLASS_MEM_MONITOR,
        context: std::ptr::null_mut(),
        ops: INITIAL_OPS.0.get(),
    },
    export_ops: &EXPORT_OPS,
    import_ops: std::ptr::null(),
}));

/// The configuration `install` read; the monitor is built from it at libfabric's `start`.
static CONFIG: OnceLock<Config> = OnceLock::new();
/// The monitor, built at the first `start` and kept for the process's life.
static MONITOR: OnceLock<Monitor> = OnceLock::new();
/// `fi_version()` of the libfabric imported into (0: unknown).
static FI_RUNTIME_VERSION: AtomicU32 = AtomicU32::new(0);
/// libfabric 2.1 unsubscribes every entry it uncaches; older versions never unsubscribe.
const FI_VERSION_2_1: u32 = (2 << 16) | 1;
/// Serialises `install` and the monitor's construction.
static INSTALL: Mutex<bool> = Mutex::new(false);

/// The monitor, once libfabric started it (for statistics and tests).
pub fn monitor() -> Option<&'static Monitor> {
    MONITOR.get()
}

/// Calls libfabric's `import_ops->notify`. Called from the monitor thread with no lock held.
fn notify_libfabric(range: Range) {
    let slot = SLOT.0.get();
    // SAFETY: `slot` points to the static monitor; libfabric wrote `import_ops` during the
    // import, before it could start the monitor (and so before this thread existed); the
    // read is volatile because the write happened in C.
    let ops = unsafe { std::ptr::read_volatile(std::ptr::addr_of!((*slot).import_ops)) };
    if ops.is_null() {
        return;
    }
    // SAFETY: `ops` is libfabric's static `import_ops` table, valid for the process.
    if let Some(notify) = unsafe { (*ops).notify } {
        // SAFETY: libfabric's notify takes the monitor it gave `import_ops` to and any
        // range; it takes its own locks, none of which this thread holds.
        unsafe { notify(slot, range.start() as *const c_void, range.len()) };
    }
}

fn start() -> Result<(), FabricError> {
    let _guard = INSTALL.lock().unwrap_or_else(|p| p.into_inner());
    if MONITOR.get().is_some() {
        return Ok(());
    }
    let config = match CONFIG.get() {
        Some(c) => *c,
        None => Config::from_env()?,
    };
    let source = config.open_source()?;
    let notify: NotifyFn = Arc::new(notify_libfabric);
    let version = FI_RUNTIME_VERSION.load(Ordering::Acquire);
    let options = MonitorOptions {
        interval: config.interval,
        // Unknown version: keep watches (a leak at worst) rather than risk dropping one
        // that libfabric would also unsubscribe.
        release_after_notify: version != 0 && version < FI_VERSION_2_1,
    };
    let monitor = Monitor::new(source, notify, options)?;
    if config.verbose {
        eprintln!(
            "umm-fabric: libfabric memory monitor started on the {} source",
            monitor.source().name()
        );
    }
    tracing::info!(
        source = monitor.source().name(),
        "umm-fabric: libfabric memory monitor started"
    );
    let _ = MONITOR.set(monitor);
    Ok(())
}

/// Runs `f`, turning a panic into `fallback` (a panic must not cross into C).
fn guarded<T>(fallback: T, f: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|_| {
        tracing::error!("umm-fabric: panic in a monitor callback");
        fallback
    })
}

unsafe extern "C" fn mon_start(_m: *mut FidMemMonitor) -> c_int {
    guarded(-libc::EIO, || match start() {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!(error = %e, "umm-fabric: cannot start the monitor");
            if CONFIG.get().is_some_and(|c| c.verbose) {
                eprintln!("umm-fabric: cannot start the monitor: {e}");
            }
            e.code()
        }
    })
}

unsafe extern "C" fn mon_stop(_m: *mut FidMemMonitor) {
    // The source and thread stay for the next start; libfabric unsubscribed every range.
}

unsafe extern "C" fn mon_subscribe(
    _m: *mut FidMemMonitor,
    addr: *const c_void,
    len: usize,
) -> c_int {
    guarded(-libc::EIO, || {
        let Some(m) = MONITOR.get() else {
            return -libc::ENOSYS;
        };
        match m.subscribe(addr as usize, len) {
            Ok(()) => 0,
            Err(e) => {
                tracing::debug!(error = %e, "umm-fabric: subscription refused");
                e.code()
            }
        }
    })
}

unsafe extern "C" fn mon_unsubscribe(_m: *mut FidMemMonitor, addr: *const c_void, len: usize) {
    guarded((), || {
        if let Some(m) = MONITOR.get() {
            m.unsubscribe(addr as usize, len);
        }
    })
}

unsafe extern "C" fn mon_valid(_m: *mut FidMemMonitor, addr: *const c_void, len: usize) -> bool {
    guarded(false, || {
        MONITOR.get().is_some_and(|m| m.valid(addr as usize, len))
    })
}

type FiOpenFn = unsafe extern "C" fn(
    u32,
    *const c_char,
    *mut c_void,
    usize,
    u64,
    *mut *mut Fid,
    *mut c_void,
) -> c_int;
type FiStrerrorFn = unsafe extern "C" fn(c_int) -> *const c_char;

fn dlerror_text() -> String {
    // SAFETY: dlerror returns NULL or a NUL-terminated string valid until the next dl call.
    let e = unsafe { libc::dlerror() };
    if e.is_null() {
        "unknown dl error".into()
    } else {
        // SAFETY: non-null, NUL-terminated (above).
        unsafe { CStr::from_ptr(e) }.to_string_lossy().into_owned()
    }
}

/// `fi_open` and `fi_strerror` of the libfabric in the process, loading `libfabric.so.1`
/// if none is.
fn libfabric() -> Result<(FiOpenFn, Option<FiStrerrorFn>, u32), FabricError> {
    // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name.
    let mut open = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"fi_open".as_ptr()) };
    // SAFETY: as above.
    let mut strerror = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"fi_strerror".as_ptr()) };
    if open.is_null() {
        // SAFETY: dlopen of a library name; the handle is kept for the process's life.
        let h = unsafe {
            libc::dlopen(
                c"libfabric.so.1".as_ptr(),
                libc::RTLD_NOW | libc::RTLD_GLOBAL,
            )
        };
        if h.is_null() {
            return Err(FabricError::NoLibfabric(dlerror_text()));
        }
        // SAFETY: a valid handle and NUL-terminated names.
        open = unsafe { libc::dlsym(h, c"fi_open".as_ptr()) };
        // SAFETY: as above.
        strerror = unsafe { libc::dlsym(h, c"fi_strerror".as_ptr()) };
        if open.is_null() {
            return Err(FabricError::NoLibfabric(format!(
                "libfabric.so.1 has no fi_open: {}",
                dlerror_text()
            )));
        }
    }
    // SAFETY: dlsym with RTLD_DEFAULT (libfabric is loaded now) and a NUL-terminated name.
    let version = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"fi_version".as_ptr()) };
    let version = if version.is_null() {
        0
    } else {
        // SAFETY: `uint32_t fi_version(void)` (rdma/fabric.h), no arguments, no state.
        unsafe { std::mem::transmute::<*mut c_void, unsafe extern "C" fn() -> u32>(version)() }
    };
    // SAFETY: `fi_open` and `fi_strerror` have these C signatures (rdma/fabric.h).
    let open = unsafe { std::mem::transmute::<*mut c_void, FiOpenFn>(open) };
    let strerror = (!strerror.is_null())
        // SAFETY: as above.
        .then(|| unsafe { std::mem::transmute::<*mut c_void, FiStrerrorFn>(strerror) });
    Ok((open, strerror, version))
}

fn fi_error(step: &'static str, code: c_int, strerror: Option<FiStrerrorFn>) -> FabricError {
    let text = strerror
        .map(|f| {
            // SAFETY: fi_strerror returns a static NUL-terminated string for any value.
            let p = unsafe { f(-code) };
            if p.is_null() {
                String::new()
            } else {
                // SAFETY: non-null, NUL-terminated.
                unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
            }
        })
        .unwrap_or_default();
    FabricError::Libfabric { step, code, text }
}

/// Makes umm-fabric libfabric's memory monitor for every MR cache in the process.
///
/// Call it before the first domain is opened (libfabric refuses to replace a monitor that
/// a cache uses, `-FI_EBUSY`) and leave `FI_MR_CACHE_MONITOR` unset (libfabric's
/// initialisation would replace the imported monitor with the one it names). Reads the
/// configuration from the environment ([`Config::from_env`]); the source is opened when
/// libfabric starts the monitor (at the first domain with an MR cache). Calling it again
/// after it succeeded does nothing.
pub fn install() -> Result<(), FabricError> {
    let mut installed = INSTALL.lock().unwrap_or_else(|p| p.into_inner());
    if *installed {
        return Ok(());
    }
    if let Some(v) = std::env::var_os("FI_MR_CACHE_MONITOR") {
        return Err(FabricError::MonitorOverridden(
            v.to_string_lossy().into_owned(),
        ));
    }
    let config = Config::from_env()?;
    let _ = CONFIG.set(config);
    let (fi_open, strerror, version) = libfabric()?;
    FI_RUNTIME_VERSION.store(version, Ordering::Release);
    let mut cache: *mut Fid = std::ptr::null_mut();
    // SAFETY: fi_open("mr_cache") with no attributes, no flags and a valid out pointer.
    let rc = unsafe {
        fi_open(
            FI_VERSION_1_13,
            c"mr_cache".as_ptr(),
            std::ptr::null_mut(),
            0,
            0,
            &mut cache,
            std::ptr::null_mut(),
        )
    };
    if rc != 0 || cache.is_null() {
        return Err(fi_error("fi_open(\"mr_cache\")", rc, strerror));
    }
    // SAFETY: `cache` is the fid libfabric just returned; its ops table has bind (=
    // fi_import_fid) and close. SLOT is the static monitor, which outlives the import.
    let (rc, close_rc) = unsafe {
        let ops = (*cache).ops;
        let rc = match (*ops).bind {
            Some(bind) => bind(cache, SLOT.0.get().cast::<Fid>(), 0),
            None => -libc::ENOSYS,
        };
        let close_rc = match (*ops).close {
            Some(close) => close(cache),
            None => 0,
        };
        (rc, close_rc)
    };
    if rc != 0 {
        return Err(fi_error("fi_import_fid(mr_cache, monitor)", rc, strerror));
    }
    if close_rc != 0 {
        tracing::warn!(rc = close_rc, "umm-fabric: closing the mr_cache fid failed");
    }
    *installed = true;
    tracing::info!("umm-fabric: imported as libfabric's memory monitor");
    Ok(())
}

/// Whether [`install`] succeeded in this process.
pub fn installed() -> bool {
    *INSTALL.lock().unwrap_or_else(|p| p.into_inner())
}

/// C: `int umm_fabric_install(void)`: [`install`]; 0 or a negative errno-style code
/// (`-EBUSY`: a monitor is in use already, or `FI_MR_CACHE_MONITOR` is set; `-ENOSYS`:
/// no libfabric; `-EINVAL`: a malformed variable).
#[no_mangle]
pub extern "C" fn umm_fabric_install() -> c_int {
    guarded(-libc::EIO, || match install() {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!(error = %e, "umm-fabric: install failed");
            e.code()
        }
    })
}

/// C: `int umm_fabric_installed(void)`: 1 once [`install`] succeeded, else 0.
#[no_mangle]
pub extern "C" fn umm_fabric_installed() -> c_int {
    guarded(0, || c_int::from(installed()))
}

/// C: `const char *umm_fabric_source(void)`: the name of the source the monitor runs on
/// (a static string), or NULL before libfabric started it.
#[no_mangle]
pub extern "C" fn umm_fabric_source() -> *const c_char {
    guarded(std::ptr::null(), || {
        match MONITOR.get().map(|m| m.source()) {
            Some(crate::monitor::Source::Kmod(_)) => c"kmod".as_ptr(),
            Some(crate::monitor::Source::Uffd(_)) => c"uffd".as_ptr(),
            Some(crate::monitor::Source::Other(_)) => c"other".as_ptr(),
            None => std::ptr::null(),
        }
    })
}

/// The `LD_PRELOAD` constructor: when `LD_PRELOAD` names `libumm_fabric`, installs unless
/// `UMM_FABRIC_AUTO` is false (a program that links the library calls
/// `umm_fabric_install` itself; Rust programs and tests linking the rlib get nothing
/// automatic). In a process without libfabric it does nothing. A failure is printed to standard error (there is no
/// caller to return it to, and running with libfabric's own monitor unannounced would hide
/// the gap this library exists to close).
extern "C" fn preload_constructor() {
    guarded((), || {
        let preloaded = std::env::var_os("LD_PRELOAD")
            .is_some_and(|v| v.to_string_lossy().contains("libumm_fabric"));
        if !preloaded {
            return;
        }
        if let Ok(v) = std::env::var("UMM_FABRIC_AUTO") {
            match parse_bool("UMM_FABRIC_AUTO", &v) {
                Ok(false) => return,
                Ok(true) => {}
                Err(e) => {
                    eprintln!("umm-fabric: {e}; not installing");
                    return;
                }
            }
        }
        match install() {
            Ok(()) => {}
            Err(FabricError::NoLibfabric(_)) => {}
            Err(e) => eprintln!("umm-fabric: not installed as libfabric's memory monitor: {e}"),
        }
    })
}

#[used]
#[link_section = ".init_array"]
static PRELOAD_CONSTRUCTOR: extern "C" fn() = preload_constructor;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_match_the_c_header() {
        // rdma/fi_ext.h on LP64: fid is 3 words, the monitor 5, the ops tables 6 and 2.
        assert_eq!(std::mem::size_of::<Fid>(), 24);
        assert_eq!(std::mem::size_of::<FidMemMonitor>(), 40);
        assert_eq!(std::mem::size_of::<MonitorOps>(), 48);
        assert_eq!(std::mem::size_of::<NotifyOps>(), 16);
        assert_eq!(std::mem::size_of::<FiOps>(), 56);
    }
}
