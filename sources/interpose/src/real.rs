//! The real functions behind the hooks, found with `dlsym(RTLD_NEXT)` once.
//!
//! [`resolve`] runs from the load-time constructor that [`crate::export_hooks!`] emits and
//! again from [`crate::install`]; the hook path only loads the resolved pointers. A hook
//! that runs before resolution (another library's constructor unmapping something) falls
//! back to the raw system call.

use std::ffi::{c_void, CStr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// `munmap` behind the hooks (0 = not resolved).
pub static MUNMAP: AtomicUsize = AtomicUsize::new(0);
/// `mmap`.
pub static MMAP: AtomicUsize = AtomicUsize::new(0);
/// `mmap64`.
pub static MMAP64: AtomicUsize = AtomicUsize::new(0);
/// `mremap`.
pub static MREMAP: AtomicUsize = AtomicUsize::new(0);
/// `madvise`.
pub static MADVISE: AtomicUsize = AtomicUsize::new(0);
/// `shmdt`.
pub static SHMDT: AtomicUsize = AtomicUsize::new(0);
/// `shmat`.
pub static SHMAT: AtomicUsize = AtomicUsize::new(0);
/// `free`.
pub static FREE: AtomicUsize = AtomicUsize::new(0);
/// `realloc`.
pub static REALLOC: AtomicUsize = AtomicUsize::new(0);
/// `reallocarray`.
pub static REALLOCARRAY: AtomicUsize = AtomicUsize::new(0);
/// `malloc_trim`.
pub static MALLOC_TRIM: AtomicUsize = AtomicUsize::new(0);
/// `malloc_usable_size` of the allocator behind the hooks (to size a block being freed).
pub static MALLOC_USABLE_SIZE: AtomicUsize = AtomicUsize::new(0);
/// `brk`.
pub static BRK: AtomicUsize = AtomicUsize::new(0);
/// `sbrk`.
pub static SBRK: AtomicUsize = AtomicUsize::new(0);

/// Whether the process's `malloc` is glibc's (its chunk layout can be read by the `free`
/// hook). Set by [`resolve`]; assumed until then (the hooks then call glibc's functions).
pub static GLIBC_HEAP: AtomicBool = AtomicBool::new(true);

unsafe extern "C" {
    fn __libc_malloc(size: libc::size_t) -> *mut c_void;
}

fn next(name: &CStr) -> usize {
    // SAFETY: dlsym with a NUL-terminated name; RTLD_NEXT searches the objects loaded
    // after the one containing this code (libc, or a later interposer).
    unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) as usize }
}

/// Resolves every real function not resolved yet. Not for the hook path (`dlsym` may
/// allocate).
pub fn resolve() {
    // SAFETY: dlsym with a NUL-terminated name; RTLD_DEFAULT searches the global scope
    // (the hooks define no malloc: this is the allocator's).
    let malloc = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"malloc".as_ptr()) } as usize;
    GLIBC_HEAP.store(
        malloc == __libc_malloc as *const () as usize,
        Ordering::Release,
    );
    for (slot, name) in [
        (&MUNMAP, c"munmap"),
        (&MMAP, c"mmap"),
        (&MMAP64, c"mmap64"),
        (&MREMAP, c"mremap"),
        (&MADVISE, c"madvise"),
        (&SHMDT, c"shmdt"),
        (&SHMAT, c"shmat"),
        (&FREE, c"free"),
        (&REALLOC, c"realloc"),
        (&REALLOCARRAY, c"reallocarray"),
        (&MALLOC_TRIM, c"malloc_trim"),
        (&MALLOC_USABLE_SIZE, c"malloc_usable_size"),
        (&BRK, c"brk"),
        (&SBRK, c"sbrk"),
    ] {
        if slot.load(Ordering::Acquire) == 0 {
            slot.store(next(name), Ordering::Release);
        }
    }
}

/// The resolved function at `slot`, if any, as a raw pointer for a typed transmute.
#[inline]
pub(crate) fn get(slot: &AtomicUsize) -> Option<*const c_void> {
    match slot.load(Ordering::Acquire) {
        0 => None,
        p => Some(p as *const c_void),
    }
}
