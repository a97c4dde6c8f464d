//! The C entry points: `umm_ucx_install` and friends, the LD_PRELOAD constructor, and the
//! definitions of `ibv_reg_mr*`, `ibv_dereg_mr` and `uct_md_mem_reg` that forward to the
//! real ones (found with `dlvsym(RTLD_NEXT)`, else in the already loaded library: UCX
//! loads `libuct_ib` and with it libibverbs `RTLD_LOCAL`, out of `RTLD_NEXT`'s reach).

use std::cell::Cell;
use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::{install, installed, Stats, Watch};

thread_local! {
    /// Nesting of the registration hooks on this thread: libibverbs' `ibv_reg_mr` calls
    /// `ibv_reg_mr_iova2` through its PLT, which lands here again; only the outermost
    /// call watches.
    static DEPTH: Cell<u32> = const { Cell::new(0) };
}

/// Resolves `name@version` after this library, else in `lib` if it is loaded.
fn resolve(slot: &AtomicUsize, name: &CStr, version: Option<&CStr>, lib: &CStr) -> usize {
    let cached = slot.load(Ordering::Acquire);
    if cached != 0 {
        return cached;
    }
    // dlvsym/dlsym/dlopen are called with valid NUL-terminated strings; RTLD_NOLOAD only
    // returns a handle to a library that is already loaded (never loads or runs code).
    // The unversioned lookup first: it finds the next preload's definition too (another
    // interposer, e.g. a registration counter, defines these without a version, and
    // dlvsym skips it), and libibverbs' default version otherwise.
    let find = |h: *mut c_void| {
        // SAFETY: as above; `h` is RTLD_NEXT or a handle from dlopen.
        let f = unsafe { libc::dlsym(h, name.as_ptr()) };
        if f.is_null() {
            // SAFETY: as above.
            version.map_or(f, |v| unsafe { libc::dlvsym(h, name.as_ptr(), v.as_ptr()) })
        } else {
            f
        }
    };
    let mut f = find(libc::RTLD_NEXT);
    if f.is_null() {
        // SAFETY: see above.
        let h = unsafe { libc::dlopen(lib.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD) };
        if !h.is_null() {
            f = find(h);
        }
    }
    if f.is_null() {
        // Nothing to forward to: the caller cannot have linked against it either.
        eprintln!("umm-ucx: {name:?} not found");
        std::process::abort();
    }
    slot.store(f as usize, Ordering::Release);
    f as usize
}

const IBVERBS: &CStr = c"libibverbs.so.1";

/// The common path of the three registration calls.
fn register(addr: *mut c_void, len: usize, real: impl FnOnce() -> *mut c_void) -> *mut c_void {
    let outer = DEPTH.with(|d| {
        d.set(d.get() + 1);
        d.get() == 1
    });
    let result = match installed() {
        Some(m) if outer => match m.watch(addr as usize, len) {
            Watch::Cookie(cookie) => {
                let mr = real();
                if mr.is_null() {
                    m.unwatch(cookie, addr as usize, len);
                } else {
                    m.registered(mr as usize, cookie, addr as usize, len);
                }
                mr
            }
            Watch::Unprotected => real(),
            Watch::Refuse => {
                // SAFETY: errno is this thread's.
                unsafe { *libc::__errno_location() = libc::EFAULT };
                std::ptr::null_mut()
            }
        },
        _ => real(),
    };
    DEPTH.with(|d| d.set(d.get() - 1));
    result
}

type RegMr = unsafe extern "C" fn(*mut c_void, *mut c_void, usize, c_int) -> *mut c_void;
type RegMrIova = unsafe extern "C" fn(*mut c_void, *mut c_void, usize, u64, c_int) -> *mut c_void;
type RegMrIova2 = unsafe extern "C" fn(*mut c_void, *mut c_void, usize, u64, c_uint) -> *mut c_void;
type DeregMr = unsafe extern "C" fn(*mut c_void) -> c_int;
type MdMemReg =
    unsafe extern "C" fn(*mut c_void, *mut c_void, usize, c_uint, *mut *mut c_void) -> c_int;

/// libibverbs' `ibv_reg_mr`, watched.
///
/// # Safety
/// As libibverbs' `ibv_reg_mr`.
#[no_mangle]
pub unsafe extern "C" fn ibv_reg_mr(
    pd: *mut c_void,
    addr: *mut c_void,
    len: usize,
    access: c_int,
) -> *mut c_void {
    static REAL: AtomicUsize = AtomicUsize::new(0);
    let f = resolve(&REAL, c"ibv_reg_mr", Some(c"IBVERBS_1.1"), IBVERBS);
    // SAFETY: `f` is libibverbs' ibv_reg_mr, whose signature RegMr mirrors.
    register(addr, len, || unsafe {
        std::mem::transmute::<usize, RegMr>(f)(pd, addr, len, access)
    })
}

/// libibverbs' `ibv_reg_mr_iova`, watched.
///
/// # Safety
/// As libibverbs' `ibv_reg_mr_iova`.
#[no_mangle]
pub unsafe extern "C" fn ibv_reg_mr_iova(
    pd: *mut c_void,
    addr: *mut c_void,
    len: usize,
    iova: u64,
    access: c_int,
) -> *mut c_void {
    static REAL: AtomicUsize = AtomicUsize::new(0);
    let f = resolve(&REAL, c"ibv_reg_mr_iova", Some(c"IBVERBS_1.7"), IBVERBS);
    // SAFETY: `f` is libibverbs' ibv_reg_mr_iova, whose signature RegMrIova mirrors.
    register(addr, len, || unsafe {
        std::mem::transmute::<usize, RegMrIova>(f)(pd, addr, len, iova, access)
    })
}

/// libibverbs' `ibv_reg_mr_iova2` (what UCX 1.13's `uct_ib` calls), watched.
///
/// # Safety
/// As libibverbs' `ibv_reg_mr_iova2`.
#[no_mangle]
pub unsafe extern "C" fn ibv_reg_mr_iova2(
    pd: *mut c_void,
    addr: *mut c_void,
    len: usize,
    iova: u64,
    access: c_uint,
) -> *mut c_void {
    static REAL: AtomicUsize = AtomicUsize::new(0);
    let f = resolve(&REAL, c"ibv_reg_mr_iova2", Some(c"IBVERBS_1.8"), IBVERBS);
    // SAFETY: `f` is libibverbs' ibv_reg_mr_iova2, whose signature RegMrIova2 mirrors.
    register(addr, len, || unsafe {
        std::mem::transmute::<usize, RegMrIova2>(f)(pd, addr, len, iova, access)
    })
}

/// libibverbs' `ibv_dereg_mr`; stops the registration's watch first.
///
/// # Safety
/// As libibverbs' `ibv_dereg_mr`.
#[no_mangle]
pub unsafe extern "C" fn ibv_dereg_mr(mr: *mut c_void) -> c_int {
    static REAL: AtomicUsize = AtomicUsize::new(0);
    let f = resolve(&REAL, c"ibv_dereg_mr", Some(c"IBVERBS_1.1"), IBVERBS);
    if let Some(m) = installed() {
        m.deregistering(mr as usize);
    }
    // SAFETY: `f` is libibverbs' ibv_dereg_mr, whose signature DeregMr mirrors.
    unsafe { std::mem::transmute::<usize, DeregMr>(f)(mr) }
}

/// libuct's `uct_md_mem_reg`: delivers the source's pending events to the rcache first.
///
/// # Safety
/// As libuct's `uct_md_mem_reg`.
#[no_mangle]
pub unsafe extern "C" fn uct_md_mem_reg(
    md: *mut c_void,
    address: *mut c_void,
    length: usize,
    flags: c_uint,
    memh: *mut *mut c_void,
) -> c_int {
    static REAL: AtomicUsize = AtomicUsize::new(0);
    let f = resolve(&REAL, c"uct_md_mem_reg", None, c"libuct.so.0");
    if let Some(m) = installed() {
        m.sync();
    }
    // SAFETY: `f` is libuct's uct_md_mem_reg, whose signature MdMemReg mirrors.
    unsafe { std::mem::transmute::<usize, MdMemReg>(f)(md, address, length, flags, memh) }
}

/// The base address of the object that contains `addr`, and its file name.
fn object_of(addr: usize) -> (usize, String) {
    // SAFETY: dladdr only reads the loader's tables; `info` is a plain out-parameter.
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::dladdr(addr as *const c_void, &mut info) } == 0 || info.dli_fname.is_null() {
        return (0, String::from("?"));
    }
    // SAFETY: dladdr set dli_fname to a NUL-terminated string owned by the loader.
    let name = unsafe { CStr::from_ptr(info.dli_fname) };
    (info.dli_fbase as usize, name.to_string_lossy().into_owned())
}

/// Checks that the process's global symbol lookup finds this library's definitions of
/// the hooked functions first (else UCX's calls would bypass them): `Err((symbol, object
/// that defines it first))`.
pub(crate) fn hooks_reachable() -> Result<(), (&'static str, String)> {
    let (ours, _) = object_of(hooks_reachable as *const () as usize);
    for name in [
        c"ibv_reg_mr",
        c"ibv_reg_mr_iova2",
        c"ibv_dereg_mr",
        c"uct_md_mem_reg",
    ] {
        // SAFETY: dlsym with a valid NUL-terminated name.
        let f = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
        let (base, object) = object_of(f as usize);
        if f.is_null() || base != ours {
            let symbol = name.to_str().unwrap_or("?");
            return Err((
                symbol,
                if f.is_null() {
                    String::from("nothing")
                } else {
                    object
                },
            ));
        }
    }
    Ok(())
}

static LAST_ERROR: Mutex<Option<std::ffi::CString>> = Mutex::new(None);

/// Installs the monitor (see [`crate::install`]); 0 on success, -1 on failure
/// ([`umm_ucx_last_error`] says why). Call before `ucp_init`.
#[no_mangle]
pub extern "C" fn umm_ucx_install() -> c_int {
    match install() {
        Ok(_) => 0,
        Err(e) => {
            let msg = std::ffi::CString::new(e.to_string().replace('\0', " ")).unwrap_or_default();
            *crate::lock(&LAST_ERROR) = Some(msg);
            -1
        }
    }
}

/// Why the last failed `umm_ucx_install` failed (NULL if none did); valid until the next
/// failing call.
#[no_mangle]
pub extern "C" fn umm_ucx_last_error() -> *const c_char {
    crate::lock(&LAST_ERROR)
        .as_ref()
        .map_or(std::ptr::null(), |s| s.as_ptr())
}

/// The installed source's name (`"kmod"`, `"uffd"`), or NULL when not installed.
#[no_mangle]
pub extern "C" fn umm_ucx_source() -> *const c_char {
    match installed().map(|m| m.source_name()) {
        Some("kmod") => c"kmod".as_ptr(),
        Some(_) => c"uffd".as_ptr(),
        None => std::ptr::null(),
    }
}

/// Copies the counters into `*out`; -1 when not installed or `out` is NULL.
///
/// # Safety
/// `out` must be NULL or point to writable memory for one `struct umm_ucx_stats`.
#[no_mangle]
pub unsafe extern "C" fn umm_ucx_stats(out: *mut Stats) -> c_int {
    match installed() {
        Some(m) if !out.is_null() => {
            // SAFETY: the caller provides a valid, writable umm_ucx_stats.
            unsafe { out.write(m.stats()) };
            0
        }
        _ => -1,
    }
}

/// The LD_PRELOAD constructor: installs when this library is named in `LD_PRELOAD` and
/// `UMM_UCX_AUTO` is not `0`; prints the stats at exit when `UMM_UCX_STATS=1`.
extern "C" fn constructor() {
    let preload = std::env::var("LD_PRELOAD").ok();
    let auto = std::env::var("UMM_UCX_AUTO").ok();
    if !crate::auto_install_wanted(preload.as_deref(), auto.as_deref()) {
        return;
    }
    if let Err(e) = install() {
        // The program runs on with UCX's own hooks; say so where the user looks.
        eprintln!("umm-ucx: not installed: {e}");
        return;
    }
    if std::env::var("UMM_UCX_STATS").is_ok_and(|v| v == "1") {
        // SAFETY: registering a plain extern "C" fn with atexit.
        unsafe { libc::atexit(print_stats) };
    }
}

extern "C" fn print_stats() {
    if let Some(m) = installed() {
        let s = m.stats();
        eprintln!(
            "umm-ucx pid={} source={} external={} watched={} live={} refused={} unprotected={} drains={} invalidations={} invalidate_all={}",
            std::process::id(),
            m.source_name(),
            m.external(),
            s.watched,
            s.live,
            s.refused,
            s.unprotected,
            s.drains,
            s.invalidations,
            s.invalidate_all
        );
    }
}

#[used]
#[link_section = ".init_array"]
static CONSTRUCTOR: extern "C" fn() = constructor;
