//! The hook bodies: report the affected range, then call the real function.
//!
//! [`crate::export_hooks!`] exports these under the libc names. They can also be called
//! directly by an application that prefers explicit calls to symbol interposition.

use std::ffi::c_void;

use libc::{c_int, intptr_t, off64_t, off_t, size_t};

use crate::real::{self, get};
use crate::report;

/// Rounds `[addr, addr + len)` out to pages and reports it.
fn report_pages(addr: usize, len: usize) {
    if len == 0 {
        return;
    }
    let page = umm::page_size();
    let start = addr & !(page - 1);
    let end = addr.saturating_add(len).saturating_add(page - 1) & !(page - 1);
    report(start, end.saturating_sub(start));
}

fn set_errno(e: c_int) {
    // SAFETY: __errno_location returns this thread's errno.
    unsafe { *libc::__errno_location() = e };
}

/// `munmap`: reports the range, then unmaps it.
///
/// # Safety
/// As `munmap(2)`.
pub unsafe extern "C" fn munmap(addr: *mut c_void, len: size_t) -> c_int {
    report_pages(addr as usize, len);
    match get(&real::MUNMAP) {
        // SAFETY: the resolved symbol is libc's (or the next interposer's) munmap.
        Some(f) => unsafe {
            std::mem::transmute::<*const c_void, unsafe extern "C" fn(*mut c_void, size_t) -> c_int>(
                f,
            )(addr, len)
        },
        // SAFETY: the raw system call with the caller's arguments.
        None => unsafe { libc::syscall(libc::SYS_munmap, addr, len) as c_int },
    }
}

type MmapFn = unsafe extern "C" fn(*mut c_void, size_t, c_int, c_int, c_int, off_t) -> *mut c_void;

/// `mmap`: with `MAP_FIXED` what was mapped at the target is unmapped: reports it first.
///
/// # Safety
/// As `mmap(2)`.
pub unsafe extern "C" fn mmap(
    addr: *mut c_void,
    len: size_t,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: off_t,
) -> *mut c_void {
    if flags & libc::MAP_FIXED != 0 {
        report_pages(addr as usize, len);
    }
    match get(&real::MMAP) {
        // SAFETY: the resolved symbol is the next mmap.
        Some(f) => unsafe {
            std::mem::transmute::<*const c_void, MmapFn>(f)(addr, len, prot, flags, fd, off)
        },
        // SAFETY: the raw system call with the caller's arguments.
        None => unsafe {
            libc::syscall(libc::SYS_mmap, addr, len, prot, flags, fd, off) as *mut c_void
        },
    }
}

/// `mmap64` (the same function on 64-bit Linux).
///
/// # Safety
/// As `mmap(2)`.
pub unsafe extern "C" fn mmap64(
    addr: *mut c_void,
    len: size_t,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: off64_t,
) -> *mut c_void {
    if flags & libc::MAP_FIXED != 0 {
        report_pages(addr as usize, len);
    }
    match get(&real::MMAP64).or(get(&real::MMAP)) {
        // SAFETY: the resolved symbol is the next mmap64/mmap (same ABI on 64-bit).
        Some(f) => unsafe {
            std::mem::transmute::<*const c_void, MmapFn>(f)(addr, len, prot, flags, fd, off)
        },
        // SAFETY: the raw system call with the caller's arguments.
        None => unsafe {
            libc::syscall(libc::SYS_mmap, addr, len, prot, flags, fd, off) as *mut c_void
        },
    }
}

type MremapFn =
    unsafe extern "C" fn(*mut c_void, size_t, size_t, c_int, *mut c_void) -> *mut c_void;

/// `mremap`. In C it is variadic (`new_address` only with `MREMAP_FIXED`); on the
/// x86_64 and aarch64 Linux ABIs a variadic pointer argument travels like a fifth fixed
/// one, so the hook reads it as one and uses it only when `MREMAP_FIXED` says it exists.
///
/// Reports the old range when the mapping may move (`MREMAP_MAYMOVE` growing,
/// `MREMAP_FIXED`, `MREMAP_DONTUNMAP`), the cut tail when it shrinks, and the target
/// with `MREMAP_FIXED`. An in-place grow is not reported (nothing goes away).
///
/// # Safety
/// As `mremap(2)`.
pub unsafe extern "C" fn mremap(
    old: *mut c_void,
    old_size: size_t,
    new_size: size_t,
    flags: c_int,
    new_address: *mut c_void,
) -> *mut c_void {
    let fixed = flags & libc::MREMAP_FIXED != 0;
    let moves = fixed
        || flags & libc::MREMAP_DONTUNMAP != 0
        || (flags & libc::MREMAP_MAYMOVE != 0 && new_size > old_size);
    if moves {
        report_pages(old as usize, old_size);
    } else if new_size < old_size {
        report_pages(old as usize + new_size, old_size - new_size);
    }
    if fixed {
        report_pages(new_address as usize, new_size);
    }
    let new_address = if fixed {
        new_address
    } else {
        std::ptr::null_mut()
    };
    match get(&real::MREMAP) {
        // SAFETY: the resolved symbol is the next mremap; passing the fifth argument as a
        // fixed one is what a variadic call does on this ABI (see above).
        Some(f) => unsafe {
            std::mem::transmute::<*const c_void, MremapFn>(f)(
                old,
                old_size,
                new_size,
                flags,
                new_address,
            )
        },
        // SAFETY: the raw system call with the caller's arguments.
        None => unsafe {
            libc::syscall(
                libc::SYS_mremap,
                old,
                old_size,
                new_size,
                flags,
                new_address,
            ) as *mut c_void
        },
    }
}

/// `MADV_DONTNEED_LOCKED` (Linux 5.18), not in every libc crate version.
const MADV_DONTNEED_LOCKED: c_int = 24;

/// `madvise`: `MADV_DONTNEED`, `MADV_FREE`, `MADV_REMOVE` and `MADV_DONTNEED_LOCKED`
/// empty the range (new pages on the next touch): reported first.
///
/// # Safety
/// As `madvise(2)`.
pub unsafe extern "C" fn madvise(addr: *mut c_void, len: size_t, advice: c_int) -> c_int {
    if matches!(
        advice,
        libc::MADV_DONTNEED | libc::MADV_FREE | libc::MADV_REMOVE | MADV_DONTNEED_LOCKED
    ) {
        report_pages(addr as usize, len);
    }
    match get(&real::MADVISE) {
        // SAFETY: the resolved symbol is the next madvise.
        Some(f) => unsafe {
            std::mem::transmute::<
                *const c_void,
                unsafe extern "C" fn(*mut c_void, size_t, c_int) -> c_int,
            >(f)(addr, len, advice)
        },
        // SAFETY: the raw system call with the caller's arguments.
        None => unsafe { libc::syscall(libc::SYS_madvise, addr, len, advice) as c_int },
    }
}

/// `shmdt`: looks the segment's extent up in `/proc/self/maps` (allocation-free) and
/// reports it.
///
/// # Safety
/// As `shmdt(2)`.
pub unsafe extern "C" fn shmdt(addr: *const c_void) -> c_int {
    if let Some(end) = crate::maps::extent_of(addr as usize) {
        report_pages(addr as usize, end - addr as usize);
    }
    match get(&real::SHMDT) {
        // SAFETY: the resolved symbol is the next shmdt.
        Some(f) => unsafe {
            std::mem::transmute::<*const c_void, unsafe extern "C" fn(*const c_void) -> c_int>(f)(
                addr,
            )
        },
        // SAFETY: the raw system call with the caller's argument.
        None => unsafe { libc::syscall(libc::SYS_shmdt, addr) as c_int },
    }
}

type SbrkFn = unsafe extern "C" fn(intptr_t) -> *mut c_void;

fn current_break() -> Option<usize> {
    let f = get(&real::SBRK)?;
    // SAFETY: the resolved sbrk; an increment of 0 only reads the break.
    let cur = unsafe { std::mem::transmute::<*const c_void, SbrkFn>(f)(0) };
    (cur as isize != -1).then_some(cur as usize)
}

/// `brk`: a lower break releases `[addr, old break)`: reported first.
///
/// # Safety
/// As `brk(2)`.
pub unsafe extern "C" fn brk(addr: *mut c_void) -> c_int {
    if let Some(cur) = current_break() {
        if (addr as usize) < cur {
            report_pages(addr as usize, cur - addr as usize);
        }
    }
    match get(&real::BRK) {
        // SAFETY: the resolved symbol is the next brk.
        Some(f) => unsafe {
            std::mem::transmute::<*const c_void, unsafe extern "C" fn(*mut c_void) -> c_int>(f)(
                addr,
            )
        },
        None => {
            set_errno(libc::ENOMEM);
            -1
        }
    }
}

/// `sbrk`: a negative increment releases the top of the heap: reported first.
///
/// # Safety
/// As `sbrk(2)`.
pub unsafe extern "C" fn sbrk(increment: intptr_t) -> *mut c_void {
    if increment < 0 {
        if let Some(cur) = current_break() {
            let gone = increment.unsigned_abs();
            report_pages(cur.saturating_sub(gone), gone);
        }
    }
    match get(&real::SBRK) {
        // SAFETY: the resolved symbol is the next sbrk.
        Some(f) => unsafe { std::mem::transmute::<*const c_void, SbrkFn>(f)(increment) },
        None => {
            set_errno(libc::ENOMEM);
            usize::MAX as *mut c_void
        }
    }
}

/// `shmat`: with `SHM_REMAP` the segment replaces whatever is mapped at `addr` (an unmap
/// of it): reports the segment's extent there first (its size from `IPC_STAT`, a system
/// call on a stack buffer).
///
/// # Safety
/// As `shmat(2)`.
pub unsafe extern "C" fn shmat(shmid: c_int, addr: *const c_void, flags: c_int) -> *mut c_void {
    if flags & libc::SHM_REMAP != 0 && !addr.is_null() {
        // SAFETY: an all-zero shmid_ds is a valid value of this plain C struct.
        let mut ds: libc::shmid_ds = unsafe { std::mem::zeroed() };
        // SAFETY: IPC_STAT writes one shmid_ds into our stack buffer.
        if unsafe { libc::syscall(libc::SYS_shmctl, shmid, libc::IPC_STAT, &mut ds) } == 0 {
            let mut at = addr as usize;
            if flags & libc::SHM_RND != 0 {
                at &= !(umm::page_size() - 1); // SHMLBA is the page size on Linux/x86_64
            }
            report_pages(at, ds.shm_segsz);
        }
    }
    match get(&real::SHMAT) {
        // SAFETY: the resolved symbol is the next shmat.
        Some(f) => unsafe {
            std::mem::transmute::<
                *const c_void,
                unsafe extern "C" fn(c_int, *const c_void, c_int) -> *mut c_void,
            >(f)(shmid, addr, flags)
        },
        // SAFETY: the raw system call with the caller's arguments.
        None => unsafe { libc::syscall(libc::SYS_shmat, shmid, addr, flags) as *mut c_void },
    }
}

unsafe extern "C" {
    // glibc's own entry points, used before the real functions are resolved (`dlsym`
    // itself may free): there is no system call to fall back to.
    fn __libc_free(ptr: *mut c_void);
    fn __libc_realloc(ptr: *mut c_void, size: size_t) -> *mut c_void;
}

/// Reports what freeing or reallocating the heap block at `ptr` can give back to the
/// kernel, before the real call: glibc gives memory back with its internal
/// `__munmap`/`__mremap`/`__madvise`/`__brk`, which no symbol hook sees.
///
/// * A block with a mapping of its own (glibc's `IS_MMAPPED` chunk, above the mmap
///   threshold) is unmapped or remapped whole: its whole mapping is reported.
/// * A block of an arena: the whole pages inside it. Those are the only pages of the block
///   that a later trim (`free` joining the top of an arena, `malloc_trim`) can give back
///   without another block on them being freed first; reporting the pages it shares with
///   its neighbours too would invalidate registrations of live neighbours on every free of
///   a small block (a registration in flight would be invalidated by the allocator's own
///   temporaries, again and again). The gap: a registration of a block with no whole page
///   of its own (see the crate docs) is not invalidated if that shared page is trimmed
///   later; `malloc_trim` itself reports everything.
/// * Another allocator behind the hooks (its layout unknown): the block's pages, rounded
///   out.
///
/// Allocation-free: reads the chunk header or calls `malloc_usable_size`.
fn report_block(ptr: *mut c_void) {
    if ptr.is_null() || !crate::sink_installed() {
        return;
    }
    if real::GLIBC_HEAP.load(std::sync::atomic::Ordering::Acquire) {
        const SIZE: usize = std::mem::size_of::<usize>();
        // SAFETY: glibc puts a chunk header before every block it hands out: the size
        // (with flag bits) in the word before the block, the previous size before that.
        let (prev_size, size_word) = unsafe {
            let p = ptr as *const usize;
            (p.sub(2).read(), p.sub(1).read())
        };
        const IS_MMAPPED: usize = 2;
        let size = size_word & !7;
        if size_word & IS_MMAPPED != 0 {
            // The mapping starts `prev_size` bytes before the chunk (memalign'd blocks).
            let chunk = ptr as usize - 2 * SIZE;
            report_pages(chunk.saturating_sub(prev_size), size + prev_size);
            return;
        }
        let page = umm::page_size();
        let start = (ptr as usize).div_ceil(page) * page;
        let end = (ptr as usize + size.saturating_sub(2 * SIZE)) & !(page - 1);
        if end > start {
            report(start, end - start);
        }
        return;
    }
    type UsableFn = unsafe extern "C" fn(*mut c_void) -> size_t;
    let usable = match get(&real::MALLOC_USABLE_SIZE) {
        // SAFETY: the next allocator's malloc_usable_size, on a block it allocated.
        Some(f) => unsafe { std::mem::transmute::<*const c_void, UsableFn>(f)(ptr) },
        None => 0,
    };
    report_pages(ptr as usize, usable.max(1));
}

/// `free`: reports the block (see `report_block`), then frees it.
///
/// # Safety
/// As `free(3)`.
pub unsafe extern "C" fn free(ptr: *mut c_void) {
    report_block(ptr);
    match get(&real::FREE) {
        // SAFETY: the resolved symbol is the next free.
        Some(f) => unsafe {
            std::mem::transmute::<*const c_void, unsafe extern "C" fn(*mut c_void)>(f)(ptr)
        },
        // SAFETY: glibc's free of a block glibc allocated.
        None => unsafe { __libc_free(ptr) },
    }
}

/// `realloc`: reports the old block (it may move, shrink or be freed), then reallocates.
///
/// # Safety
/// As `realloc(3)`.
pub unsafe extern "C" fn realloc(ptr: *mut c_void, size: size_t) -> *mut c_void {
    report_block(ptr);
    match get(&real::REALLOC) {
        // SAFETY: the resolved symbol is the next realloc.
        Some(f) => unsafe {
            std::mem::transmute::<
                *const c_void,
                unsafe extern "C" fn(*mut c_void, size_t) -> *mut c_void,
            >(f)(ptr, size)
        },
        // SAFETY: glibc's realloc of a block glibc allocated.
        None => unsafe { __libc_realloc(ptr, size) },
    }
}

/// `reallocarray`: as `realloc` (glibc's calls its internal realloc, unseen by the
/// `realloc` hook).
///
/// # Safety
/// As `reallocarray(3)`.
pub unsafe extern "C" fn reallocarray(
    ptr: *mut c_void,
    nmemb: size_t,
    size: size_t,
) -> *mut c_void {
    report_block(ptr);
    match get(&real::REALLOCARRAY) {
        // SAFETY: the resolved symbol is the next reallocarray.
        Some(f) => unsafe {
            std::mem::transmute::<
                *const c_void,
                unsafe extern "C" fn(*mut c_void, size_t, size_t) -> *mut c_void,
            >(f)(ptr, nmemb, size)
        },
        None => match nmemb.checked_mul(size) {
            // SAFETY: glibc's realloc of a block glibc allocated.
            Some(n) => unsafe { __libc_realloc(ptr, n) },
            None => {
                set_errno(libc::ENOMEM);
                std::ptr::null_mut()
            }
        },
    }
}

/// `malloc_trim`: gives free memory of every arena back to the kernel with glibc's
/// internal `__madvise`/`__brk`. Free blocks were reported when freed; to be safe also
/// against blocks freed before the sink was installed, it reports the whole address
/// space (every registration is invalidated: `malloc_trim` is rare and explicit).
///
/// # Safety
/// As `malloc_trim(3)`.
pub unsafe extern "C" fn malloc_trim(pad: size_t) -> c_int {
    if crate::sink_installed() {
        let page = umm::page_size();
        report(page, (usize::MAX & !(page - 1)) - page);
    }
    match get(&real::MALLOC_TRIM) {
        // SAFETY: the resolved symbol is the next malloc_trim.
        Some(f) => unsafe {
            std::mem::transmute::<*const c_void, unsafe extern "C" fn(size_t) -> c_int>(f)(pad)
        },
        None => 0, // "no memory was released"
    }
}
