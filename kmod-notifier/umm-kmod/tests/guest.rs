//! Tests against the real kernel module (`/dev/umm_notify`).
//!
//! Run in the qemu guest by `scripts/test-kmod.sh` after `insmod`. On a machine without the
//! module every case is skipped with a printed reason. Each event test asserts that the
//! generation was already bumped when the causing syscall returned (it is read right after
//! the call, before anything else could drain or wait), then checks the recorded events.
//!
//! Own harness (`harness = false`): cases run in order in one process (some fork), a panic
//! fails only its case, and the last line is `N passed, N failed`. Arguments that do not
//! start with `-` select cases by substring.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use umm::testing::RecordingBackend;
use umm::{InvalidationSink, Manager, NotifierSource, Range};
use umm_kmod::{sys, Error, Event, EventKind, KmodSource, NotifyDevice};

type Outcome = Result<(), String>;
type Case = fn() -> Outcome;

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!("{}:{}: {}", file!(), line!(), format!($($fmt)+)));
        }
    };
}

fn page() -> usize {
    umm::page_size()
}

/// A mapping of ours. Pages unmapped through [`Map::unmap`] (or given up with
/// [`Map::forget`]) are not unmapped again on drop: the address space there may belong to
/// something else by then (a thread stack, a malloc arena).
struct Map {
    addr: usize,
    len: usize,
    live: Vec<bool>,
}

impl Map {
    fn anon(pages: usize) -> Map {
        Map::with(
            pages,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
        )
    }

    fn with(pages: usize, flags: i32, fd: i32) -> Map {
        let len = pages * page();
        // SAFETY: a fresh mapping chosen by the kernel; checked below.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                0,
            )
        };
        assert_ne!(
            p,
            libc::MAP_FAILED,
            "mmap failed: {}",
            std::io::Error::last_os_error()
        );
        Map {
            addr: p as usize,
            len,
            live: vec![true; pages],
        }
    }

    /// munmaps `pages` pages from `first` and remembers they are gone.
    fn unmap(&mut self, first: usize, pages: usize) {
        munmap(self.at(first), pages * page());
        self.forget(first, pages);
    }

    /// Remembers that `pages` pages from `first` are no longer ours (moved, shrunk).
    fn forget(&mut self, first: usize, pages: usize) {
        self.live[first..first + pages]
            .iter_mut()
            .for_each(|l| *l = false);
    }

    fn at(&self, page_index: usize) -> usize {
        self.addr + page_index * page()
    }

    fn touch(&self) {
        for off in (0..self.len).step_by(page()) {
            // SAFETY: inside the live, writable mapping.
            unsafe { ptr::write_volatile((self.addr + off) as *mut u8, 1) };
        }
    }

    /// Watches the whole mapping; returns the watch's id.
    fn watch(&self, dev: &NotifyDevice) -> u64 {
        dev.watch(self.addr as u64, self.len as u64).expect("watch")
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        let mut i = 0;
        while i < self.live.len() {
            if !self.live[i] {
                i += 1;
                continue;
            }
            let first = i;
            while i < self.live.len() && self.live[i] {
                i += 1;
            }
            // SAFETY: pages of our own mapping that are still ours.
            unsafe { libc::munmap(self.at(first) as *mut _, (i - first) * page()) };
        }
    }
}

fn munmap(addr: usize, len: usize) {
    // SAFETY: the tests only unmap ranges of their own `Map`s.
    let rc = unsafe { libc::munmap(addr as *mut _, len) };
    assert_eq!(rc, 0, "munmap: {}", std::io::Error::last_os_error());
}

fn gen(dev: &NotifyDevice) -> u64 {
    dev.generation().load(Ordering::Acquire)
}

fn open() -> NotifyDevice {
    NotifyDevice::open().expect("open /dev/umm_notify")
}

fn errno_of(r: Result<(), Error>) -> Option<i32> {
    r.err().and_then(|e| e.raw_os_error())
}

/// Whether `events` has one of `kind` for the watch `id` over exactly `[start, end)`.
fn find(events: &[Event], id: u64, kind: EventKind, start: usize, end: usize) -> bool {
    events
        .iter()
        .any(|e| e.id == id && e.kind == kind && e.start == start as u64 && e.end == end as u64)
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

// ---- event cases ----------------------------------------------------------------------

fn munmap_whole() -> Outcome {
    let dev = open();
    let mut m = Map::anon(4);
    m.touch();
    let id = m.watch(&dev);
    let g0 = gen(&dev);
    m.unmap(0, 4);
    let g1 = gen(&dev);
    ensure!(
        g1 > g0,
        "generation not bumped when munmap returned ({g0} -> {g1})"
    );
    let ev = dev.read_events().map_err(|e| e.to_string())?;
    ensure!(
        find(&ev, id, EventKind::Unmap, m.addr, m.addr + m.len),
        "no UNMAP of the whole range: {ev:?}"
    );
    ensure!(
        ev.iter().all(|e| e.seq > g0 && e.seq <= g1),
        "seq outside ({g0}, {g1}]: {ev:?}"
    );
    Ok(())
}

fn munmap_part() -> Outcome {
    let dev = open();
    let mut m = Map::anon(4);
    let id = m.watch(&dev);
    let g0 = gen(&dev);
    m.unmap(1, 2);
    ensure!(gen(&dev) > g0, "generation not bumped when munmap returned");
    let ev = dev.read_events().map_err(|e| e.to_string())?;
    ensure!(
        find(&ev, id, EventKind::Unmap, m.at(1), m.at(3)),
        "no UNMAP of pages 1..3: {ev:?}"
    );
    ensure!(
        ev.iter()
            .all(|e| e.start >= m.at(1) as u64 && e.end <= m.at(3) as u64),
        "event outside 1..3: {ev:?}"
    );
    Ok(())
}

fn munmap_straddling_two_watches() -> Outcome {
    let dev = open();
    let mut m = Map::anon(4);
    let id1 = dev
        .watch(m.at(0) as u64, 2 * page() as u64)
        .map_err(|e| e.to_string())?;
    let id2 = dev
        .watch(m.at(2) as u64, 2 * page() as u64)
        .map_err(|e| e.to_string())?;
    let g0 = gen(&dev);
    m.unmap(1, 2);
    ensure!(
        gen(&dev) >= g0 + 2,
        "generation not bumped twice when munmap returned"
    );
    let ev = dev.read_events().map_err(|e| e.to_string())?;
    ensure!(
        find(&ev, id1, EventKind::Unmap, m.at(1), m.at(2)),
        "watch 1 not clipped to page 1: {ev:?}"
    );
    ensure!(
        find(&ev, id2, EventKind::Unmap, m.at(2), m.at(3)),
        "watch 2 not clipped to page 2: {ev:?}"
    );
    Ok(())
}

fn mremap_move() -> Outcome {
    let dev = open();
    let mut m = Map::anon(4);
    m.touch();
    let dst = Map::anon(4);
    let id = m.watch(&dev);
    let g0 = gen(&dev);
    // SAFETY: moves our mapping onto our other mapping (replacing it).
    let p = unsafe {
        libc::mremap(
            m.addr as *mut _,
            m.len,
            m.len,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            dst.addr as *mut libc::c_void,
        )
    };
    ensure!(
        p as usize == dst.addr,
        "mremap move failed: {}",
        std::io::Error::last_os_error()
    );
    m.forget(0, 4);
    ensure!(gen(&dev) > g0, "generation not bumped when mremap returned");
    let ev = dev.read_events().map_err(|e| e.to_string())?;
    ensure!(
        ev.iter()
            .any(|e| e.id == id && e.start == m.addr as u64 && e.end == (m.addr + m.len) as u64),
        "no event over the old range: {ev:?}"
    );
    Ok(())
}

fn mremap_shrink() -> Outcome {
    let dev = open();
    let mut m = Map::anon(4);
    m.touch();
    let id = m.watch(&dev);
    let g0 = gen(&dev);
    // SAFETY: shrinks our own mapping in place.
    let p = unsafe { libc::mremap(m.addr as *mut _, m.len, 2 * page(), 0) };
    ensure!(
        p as usize == m.addr,
        "mremap shrink failed: {}",
        std::io::Error::last_os_error()
    );
    m.forget(2, 2);
    ensure!(gen(&dev) > g0, "generation not bumped when mremap returned");
    let ev = dev.read_events().map_err(|e| e.to_string())?;
    ensure!(
        find(&ev, id, EventKind::Unmap, m.at(2), m.at(4)),
        "no UNMAP of the cut tail: {ev:?}"
    );
    Ok(())
}

fn mmap_fixed_over() -> Outcome {
    let dev = open();
    let m = Map::anon(4);
    m.touch();
    let id = m.watch(&dev);
    let g0 = gen(&dev);
    // SAFETY: replaces the first two pages of our own mapping.
    let p = unsafe {
        libc::mmap(
            m.addr as *mut _,
            2 * page(),
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    ensure!(p as usize == m.addr, "mmap(MAP_FIXED) failed");
    ensure!(
        gen(&dev) > g0,
        "generation not bumped when mmap(MAP_FIXED) returned"
    );
    let ev = dev.read_events().map_err(|e| e.to_string())?;
    ensure!(
        find(&ev, id, EventKind::Unmap, m.at(0), m.at(2)),
        "no UNMAP of the replaced pages: {ev:?}"
    );
    Ok(())
}

fn madvise_dontneed() -> Outcome {
    let dev = open();
    let m = Map::anon(4);
    m.touch();
    let id = m.watch(&dev);
    let g0 = gen(&dev);
    // SAFETY: our own mapping.
    let rc = unsafe { libc::madvise(m.addr as *mut _, m.len, libc::MADV_DONTNEED) };
    ensure!(rc == 0, "madvise failed");
    ensure!(
        gen(&dev) > g0,
        "generation not bumped when madvise returned"
    );
    let ev = dev.read_events().map_err(|e| e.to_string())?;
    ensure!(
        find(&ev, id, EventKind::Clear, m.addr, m.addr + m.len),
        "no CLEAR of the range: {ev:?}"
    );
    Ok(())
}

fn mprotect_is_recorded() -> Outcome {
    let dev = open();
    let m = Map::anon(2);
    m.touch();
    let id = m.watch(&dev);
    let g0 = gen(&dev);
    // SAFETY: our own mapping.
    let rc = unsafe { libc::mprotect(m.addr as *mut _, m.len, libc::PROT_READ) };
    ensure!(rc == 0, "mprotect failed");
    ensure!(
        gen(&dev) > g0,
        "generation not bumped when mprotect returned"
    );
    let ev = dev.read_events().map_err(|e| e.to_string())?;
    ensure!(
        ev.iter()
            .any(|e| e.id == id && e.kind == EventKind::ProtectionVma),
        "no PROTECTION_VMA: {ev:?}"
    );
    Ok(())
}

fn free_of_large_malloc_block() -> Outcome {
    let dev = open();
    let size = 4 << 20;
    // SAFETY: plain allocation, freed below.
    let p = unsafe { libc::malloc(size) } as usize;
    ensure!(p != 0, "malloc failed");
    let start = (p + page() - 1) & !(page() - 1);
    let end = (p + size) & !(page() - 1);
    let id = dev
        .watch(start as u64, (end - start) as u64)
        .map_err(|e| e.to_string())?;
    let g0 = gen(&dev);
    // SAFETY: frees the block allocated above; glibc munmaps it internally (mmapped chunk).
    unsafe { libc::free(p as *mut _) };
    ensure!(gen(&dev) > g0, "generation not bumped when free() returned");
    let ev = dev.read_events().map_err(|e| e.to_string())?;
    ensure!(
        find(&ev, id, EventKind::Unmap, start, end),
        "no UNMAP of the block: {ev:?}"
    );
    Ok(())
}

fn raw_syscall_munmap() -> Outcome {
    let dev = open();
    let mut m = Map::anon(2);
    m.watch(&dev);
    let g0 = gen(&dev);
    // SAFETY: unmaps our own mapping with the raw syscall (what static binaries do).
    let rc = unsafe { libc::syscall(libc::SYS_munmap, m.addr, m.len) };
    ensure!(rc == 0, "syscall(SYS_munmap) failed");
    m.forget(0, 2);
    ensure!(
        gen(&dev) > g0,
        "generation not bumped when the raw syscall returned"
    );
    Ok(())
}

fn cow_break_after_fork() -> Outcome {
    let dev = open();
    let m = Map::anon(1);
    m.touch();
    let id = m.watch(&dev);
    let mut pipe = [0i32; 2];
    // SAFETY: valid array of two fds.
    ensure!(unsafe { libc::pipe(pipe.as_mut_ptr()) } == 0, "pipe failed");
    // SAFETY: the child only calls async-signal-safe functions (read, _exit).
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let mut b = 0u8;
        // SAFETY: reads one byte into `b`; then exits without running destructors.
        unsafe {
            libc::read(pipe[0], (&mut b as *mut u8).cast(), 1);
            libc::_exit(0);
        }
    }
    ensure!(pid > 0, "fork failed");
    // The child holds the page: the parent's write must copy it (COW break).
    let _ = dev.read_events();
    let g0 = gen(&dev);
    // SAFETY: our own writable page.
    unsafe { ptr::write_volatile(m.addr as *mut u8, 2) };
    let g1 = gen(&dev);
    // SAFETY: wakes and reaps the child.
    unsafe {
        libc::write(pipe[1], b"x".as_ptr().cast(), 1);
        libc::waitpid(pid, ptr::null_mut(), 0);
        libc::close(pipe[0]);
        libc::close(pipe[1]);
    }
    ensure!(g1 > g0, "generation not bumped by the COW-breaking write");
    let ev = dev.read_events().map_err(|e| e.to_string())?;
    ensure!(
        find(&ev, id, EventKind::Clear, m.addr, m.addr + page()),
        "no CLEAR for the COW break: {ev:?}"
    );
    Ok(())
}

fn fork_child_inherits_no_watch() -> Outcome {
    let dev = open();
    let m = Map::anon(2);
    m.touch();
    m.watch(&dev);
    // SAFETY: the child only makes raw syscalls and exits.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let req = sys::umm_notify_watch {
            start: m.addr as u64,
            len: m.len as u64,
            id: 0,
            flags: 0,
        };
        // SAFETY: WATCH on the inherited fd, then unmap the child's copy and exit.
        unsafe {
            let rc = libc::ioctl(
                std::os::fd::AsRawFd::as_raw_fd(&dev),
                sys::UMM_NOTIFY_IOC_WATCH as _,
                &req,
            );
            let e = *libc::__errno_location();
            libc::munmap(m.addr as *mut _, m.len);
            libc::_exit(if rc < 0 && e == libc::EPERM { 0 } else { 1 });
        }
    }
    ensure!(pid > 0, "fork failed");
    let mut status = 0;
    // SAFETY: reaps our child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    ensure!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child: WATCH on an inherited fd did not fail with EPERM (status {status:#x})"
    );
    let ev = dev.read_events().map_err(|e| e.to_string())?;
    ensure!(
        !ev.iter().any(|e| e.kind == EventKind::Unmap),
        "the child's munmap reached the parent's watch: {ev:?}"
    );
    ensure!(
        dev.info().map_err(|e| e.to_string())?.watches == 1,
        "watch count changed"
    );
    Ok(())
}

fn truncate_by_another_process() -> Outcome {
    let dev = open();
    // SAFETY: creates a memfd; name is NUL-terminated.
    let fd = unsafe { libc::memfd_create(c"umm-kmod-test".as_ptr(), 0) };
    ensure!(fd >= 0, "memfd_create failed");
    // SAFETY: sizes our memfd.
    let rc = unsafe { libc::ftruncate(fd, 4 * page() as i64) };
    ensure!(rc == 0, "ftruncate failed");
    let m = Map::with(4, libc::MAP_SHARED, fd);
    m.touch();
    let id = m.watch(&dev);
    let g0 = gen(&dev);
    // SAFETY: the child truncates the shared file and exits.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: raw syscalls only.
        unsafe { libc::_exit(if libc::ftruncate(fd, 0) == 0 { 0 } else { 1 }) };
    }
    let mut status = 0;
    // SAFETY: reaps our child; closes our fd.
    unsafe {
        libc::waitpid(pid, &mut status, 0);
        libc::close(fd);
    }
    ensure!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child ftruncate failed"
    );
    ensure!(
        gen(&dev) > g0,
        "truncation by another process was not recorded"
    );
    let ev = dev.read_events().map_err(|e| e.to_string())?;
    ensure!(
        ev.iter().any(|e| e.id == id && e.kind == EventKind::Clear),
        "no CLEAR event: {ev:?}"
    );
    Ok(())
}

fn unwatch_stops_events_and_overlaps_are_independent() -> Outcome {
    let dev = open();
    let mut m = Map::anon(4);
    let id1 = m.watch(&dev);
    let id2 = m.watch(&dev); // the same range, another watch
    let id3 = dev
        .watch(m.at(1) as u64, page() as u64)
        .map_err(|e| e.to_string())?;
    ensure!(
        id1 != id2 && id2 != id3 && id1 != id3,
        "ids not unique: {id1} {id2} {id3}"
    );
    dev.unwatch(id1).map_err(|e| e.to_string())?;
    let g0 = gen(&dev);
    m.unmap(0, 2);
    ensure!(
        gen(&dev) == g0 + 2,
        "expected exactly two events (watches 2 and 3), generation {g0} -> {}",
        gen(&dev)
    );
    let ev = dev.read_events().map_err(|e| e.to_string())?;
    ensure!(
        !ev.iter().any(|e| e.id == id1),
        "unwatched watch reported: {ev:?}"
    );
    ensure!(
        find(&ev, id2, EventKind::Unmap, m.at(0), m.at(2))
            && find(&ev, id3, EventKind::Unmap, m.at(1), m.at(2)),
        "{ev:?}"
    );
    Ok(())
}

fn poll_and_read() -> Outcome {
    let dev = open();
    let mut m = Map::anon(1);
    m.watch(&dev);
    let _ = dev.read_events();
    ensure!(
        !dev.wait_readable(Duration::ZERO)
            .map_err(|e| e.to_string())?,
        "readable with nothing pending"
    );
    m.unmap(0, 1);
    ensure!(
        dev.wait_readable(Duration::ZERO)
            .map_err(|e| e.to_string())?,
        "not readable after an event"
    );
    ensure!(
        dev.read_events().map_err(|e| e.to_string())?.len() == 1,
        "expected one record"
    );
    ensure!(
        !dev.wait_readable(Duration::ZERO)
            .map_err(|e| e.to_string())?,
        "still readable after reading"
    );
    // Blocking read from another thread is woken by the event.
    let dev = Arc::new(dev);
    let mut m2 = Map::anon(1);
    m2.watch(&dev);
    let d2 = dev.clone();
    let waiter = std::thread::spawn(move || d2.wait_readable(Duration::from_secs(20)));
    std::thread::sleep(Duration::from_millis(50));
    m2.unmap(0, 1);
    ensure!(
        waiter.join().unwrap().map_err(|e| e.to_string())?,
        "poll not woken by the event"
    );
    Ok(())
}

fn bad_ioctls_return_clear_errnos() -> Outcome {
    let dev = open();
    let m = Map::anon(2);
    let p = page() as u64;
    let a = m.addr as u64;
    let cases: [(&str, sys::umm_notify_watch, i32); 7] = [
        (
            "unaligned start",
            sys::umm_notify_watch {
                start: a + 1,
                len: p,
                id: 0,
                flags: 0,
            },
            libc::EINVAL,
        ),
        (
            "unaligned length",
            sys::umm_notify_watch {
                start: a,
                len: p + 1,
                id: 0,
                flags: 0,
            },
            libc::EINVAL,
        ),
        (
            "zero length",
            sys::umm_notify_watch {
                start: a,
                len: 0,
                id: 0,
                flags: 0,
            },
            libc::EINVAL,
        ),
        (
            "flags set",
            sys::umm_notify_watch {
                start: a,
                len: p,
                id: 0,
                flags: 1,
            },
            libc::EINVAL,
        ),
        (
            "wrapping range",
            sys::umm_notify_watch {
                start: !(p - 1),
                len: 2 * p,
                id: 0,
                flags: 0,
            },
            libc::EOVERFLOW,
        ),
        (
            "kernel half",
            sys::umm_notify_watch {
                start: 0xffff_8000_0000_0000,
                len: p,
                id: 0,
                flags: 0,
            },
            libc::EFAULT,
        ),
        (
            "beyond user space",
            sys::umm_notify_watch {
                start: (1 << 56) - p,
                len: 2 * p,
                id: 0,
                flags: 0,
            },
            libc::EFAULT,
        ),
    ];
    for (what, mut req, want) in cases {
        let got = errno_of(dev.watch_raw(&mut req).map(drop));
        ensure!(got == Some(want), "{what}: errno {got:?}, want {want}");
    }
    ensure!(
        dev.info().map_err(|e| e.to_string())?.watches == 0,
        "a bad WATCH left a watch"
    );
    let id = dev.watch(a, p).map_err(|e| e.to_string())?;
    ensure!(id == 1, "first id of a fresh file is {id}, want 1");
    let mut with_id = sys::umm_notify_watch {
        start: a,
        len: p,
        id: 5,
        flags: 0,
    };
    let got = errno_of(dev.watch_raw(&mut with_id).map(drop));
    ensure!(
        got == Some(libc::EINVAL),
        "WATCH with a caller-chosen id: errno {got:?}, want EINVAL"
    );
    for unknown in [0, id + 1, 1 << 32, u64::MAX] {
        let got = errno_of(dev.unwatch(unknown));
        ensure!(
            got == Some(libc::ENOENT),
            "unwatch of unknown id {unknown:#x}: errno {got:?}, want ENOENT"
        );
    }
    let fd = std::os::fd::AsRawFd::as_raw_fd(&dev);
    let bad_unwatch = sys::umm_notify_unwatch { id, flags: 2 };
    // SAFETY: UNWATCH reads one umm_notify_unwatch.
    let rc = unsafe { libc::ioctl(fd, sys::UMM_NOTIFY_IOC_UNWATCH as _, &bad_unwatch) };
    ensure!(
        rc < 0 && errno() == libc::EINVAL,
        "UNWATCH with flags: rc {rc}, errno {}",
        errno()
    );
    // SAFETY: an unknown command with no argument.
    let rc = unsafe { libc::ioctl(fd, sys::ioc(0, sys::UMM_NOTIFY_IOC_MAGIC, 99, 0) as _, 0) };
    ensure!(
        rc < 0 && errno() == libc::ENOTTY,
        "unknown ioctl: rc {rc}, errno {}",
        errno()
    );
    // SAFETY: WATCH with an invalid argument pointer.
    let rc = unsafe { libc::ioctl(fd, sys::UMM_NOTIFY_IOC_WATCH as _, 8usize) };
    ensure!(
        rc < 0 && errno() == libc::EFAULT,
        "WATCH with a bad pointer: rc {rc}, errno {}",
        errno()
    );
    let mut small = [0u8; 8];
    // SAFETY: reads at most 8 bytes into `small`.
    let rc = unsafe { libc::read(fd, small.as_mut_ptr().cast(), small.len()) };
    ensure!(
        rc < 0 && errno() == libc::EINVAL,
        "read with a short buffer: rc {rc}, errno {}",
        errno()
    );
    for (what, prot, len, want) in [
        (
            "writable",
            libc::PROT_READ | libc::PROT_WRITE,
            page(),
            libc::EPERM,
        ),
        ("two pages", libc::PROT_READ, 2 * page(), libc::EINVAL),
    ] {
        // SAFETY: a mapping the kernel must refuse; unmapped if it did not.
        let p = unsafe { libc::mmap(ptr::null_mut(), len, prot, libc::MAP_SHARED, fd, 0) };
        let e = errno();
        if p != libc::MAP_FAILED {
            // SAFETY: the mapping just made.
            unsafe { libc::munmap(p, len) };
        }
        ensure!(
            p == libc::MAP_FAILED && e == want,
            "mmap {what}: errno {e}, want {want}"
        );
    }
    // The generation page cannot be made writable.
    // SAFETY: one read-only page of the device, unmapped below.
    let p = unsafe {
        libc::mmap(
            ptr::null_mut(),
            page(),
            libc::PROT_READ,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    ensure!(p != libc::MAP_FAILED, "read-only mmap failed");
    // SAFETY: our mapping.
    let rc = unsafe { libc::mprotect(p, page(), libc::PROT_READ | libc::PROT_WRITE) };
    let e = errno();
    // SAFETY: our mapping.
    unsafe { libc::munmap(p, page()) };
    ensure!(
        rc < 0 && e == libc::EACCES,
        "mprotect(PROT_WRITE) of the generation page: rc {rc}, errno {e}"
    );
    ensure!(
        dev.info().map_err(|e| e.to_string())?.watches == 1,
        "watch count wrong after the bad calls"
    );
    Ok(())
}

/// Counts what a source delivers.
#[derive(Default)]
struct CountingSink {
    ranges: Mutex<Vec<Range>>,
    all: AtomicU64,
}

impl InvalidationSink for CountingSink {
    fn invalidate(&self, range: Range) {
        self.ranges.lock().unwrap().push(range);
    }
    fn invalidate_all(&self) {
        self.all.fetch_add(1, Ordering::SeqCst);
    }
}

fn ring_overflow_becomes_invalidate_all() -> Outcome {
    const BURST: usize = 100_000;
    let source = KmodSource::open().map_err(|e| e.to_string())?;
    let dev = source.device();
    let ring = dev.info().map_err(|e| e.to_string())?.ring_entries as u64;
    let mut m = Map::anon(BURST + 1);
    m.watch(dev);
    let g0 = gen(dev);
    let o0 = dev.overflows();
    for i in 0..BURST {
        m.unmap(i, 1);
    }
    let events = gen(dev) - g0;
    let overflows = dev.overflows() - o0;
    ensure!(
        events >= BURST as u64,
        "{events} events for {BURST} munmaps"
    );
    ensure!(
        overflows == events - ring,
        "nothing may be lost: {events} events = {ring} recorded + {overflows} counted as overflow"
    );
    let sink = CountingSink::default();
    source.drain(&sink);
    ensure!(
        sink.all.load(Ordering::SeqCst) == 1,
        "overflow did not become exactly one invalidate_all"
    );
    ensure!(
        sink.ranges.lock().unwrap().is_empty(),
        "records delivered besides the overflow"
    );
    // Recording resumes.
    m.unmap(BURST, 1);
    source.drain(&sink);
    let r = sink.ranges.lock().unwrap().clone();
    ensure!(
        r.len() == 1 && r[0].start() == m.at(BURST) && r[0].len() == page(),
        "after the overflow: {r:?}"
    );
    ensure!(sink.all.load(Ordering::SeqCst) == 1, "second overflow");
    Ok(())
}

fn refcount() -> Option<u64> {
    std::fs::read_to_string("/sys/module/umm_notify/refcnt")
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn process_exit_releases_everything() -> Outcome {
    let before = refcount();
    // SAFETY: the child opens the device, watches, unmaps one range and exits without
    // closing anything; it calls only async-signal-safe functions and raw syscalls.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: see above.
        unsafe {
            let fd = libc::open(c"/dev/umm_notify".as_ptr(), libc::O_RDWR);
            let len = 64 * page();
            let p = libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            let g = libc::mmap(
                ptr::null_mut(),
                page(),
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd,
                0,
            );
            let mut ok = fd >= 0 && p != libc::MAP_FAILED && g != libc::MAP_FAILED;
            for i in 0..64u64 {
                let req = sys::umm_notify_watch {
                    start: p as u64 + i * page() as u64,
                    len: page() as u64,
                    id: 0,
                    flags: 0,
                };
                ok &= libc::ioctl(fd, sys::UMM_NOTIFY_IOC_WATCH as _, &req) == 0;
            }
            libc::munmap(p, page());
            libc::_exit(if ok { 0 } else { 1 });
        }
    }
    let mut status = 0;
    // SAFETY: reaps our child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    ensure!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child failed (status {status:#x})"
    );
    let after = refcount();
    ensure!(
        after == before,
        "module refcount {before:?} before the child, {after:?} after its exit"
    );
    Ok(())
}

fn concurrent_watch_unwatch_munmap() -> Outcome {
    let run_for = Duration::from_secs(
        std::env::var("UMM_KMOD_STRESS_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(3),
    );
    let dev = Arc::new(open());
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut threads = Vec::new();
    for t in 0..4u64 {
        let (dev, stop, failures) = (dev.clone(), stop.clone(), failures.clone());
        threads.push(std::thread::spawn(move || {
            let mut k = 0u64;
            let mut own: Option<NotifyDevice> = None;
            while !stop.load(Ordering::Relaxed) {
                k += 1;
                let m = Map::anon(8);
                m.touch();
                let d: &NotifyDevice = if t == 3 && k.is_multiple_of(2) {
                    own.get_or_insert_with(open)
                } else {
                    &dev
                };
                let id = match d.watch(m.addr as u64, m.len as u64) {
                    Ok(id) => id,
                    Err(e) => {
                        failures.lock().unwrap().push(format!("thread {t}: {e}"));
                        break;
                    }
                };
                let inner = d.watch(m.at(2) as u64, 4 * page() as u64).ok();
                let g0 = gen(d);
                // Replace two pages (an unmap for the notifier) so the range stays ours:
                // a plain hole could be reused by another thread's mapping before `m` drops.
                // SAFETY: two pages inside our own mapping.
                let p = unsafe {
                    libc::mmap(
                        m.at((k % 6) as usize) as *mut _,
                        2 * page(),
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                        -1,
                        0,
                    )
                };
                assert_ne!(p, libc::MAP_FAILED);
                if gen(d) <= g0 {
                    failures.lock().unwrap().push(format!(
                        "thread {t}: munmap returned before the generation moved"
                    ));
                }
                // Ids are reused after UNWATCH: unwatch each exactly once (a second UNWATCH
                // could remove another thread's watch that got the same id meanwhile).
                if k.is_multiple_of(3) {
                    d.unwatch(id).ok();
                    drop(m);
                } else {
                    drop(m);
                    d.unwatch(id).ok();
                }
                if let Some(inner) = inner {
                    d.unwatch(inner).ok();
                }
                if t == 3 && k.is_multiple_of(16) {
                    own = None; // close with watches possibly left: release cleans up
                }
            }
        }));
    }
    let reader = {
        let (dev, stop) = (dev.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0usize;
            let mut last = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let g = gen(&dev);
                assert!(g >= last, "generation went backwards");
                last = g;
                if dev.wait_readable(Duration::from_millis(5)).unwrap_or(false) {
                    n += dev.read_events().map(|v| v.len()).unwrap_or(0);
                }
            }
            n
        })
    };
    std::thread::sleep(run_for);
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join()
            .map_err(|_| "a worker thread panicked".to_string())?;
    }
    let read = reader
        .join()
        .map_err(|_| "the reader thread panicked".to_string())?;
    let f = failures.lock().unwrap();
    ensure!(f.is_empty(), "{}", f.join("; "));
    ensure!(read > 0, "the reader saw no event");
    println!("    ({read} events read concurrently in {run_for:?})");
    Ok(())
}

// ---- fork and kernel memory (issue 11) ------------------------------------------------------

/// A forked child holding the inherited fd must not touch the parent's watches or records:
/// UNWATCH, INFO, read(), poll() and mmap() fail with EPERM (poll: POLLERR), and the parent
/// still gets the record of a later unmap of its watched range.
fn fork_child_cannot_unwatch_or_read_parents_records() -> Outcome {
    let dev = open();
    let mut m = Map::anon(2);
    m.touch();
    let id = watch_id(&dev, m.addr, page());
    // One record pending, so that a read() in the child would have something to steal.
    let other = Map::anon(1);
    let other_id = watch_id(&dev, other.addr, page());
    drop(other);
    let fd = std::os::fd::AsRawFd::as_raw_fd(&dev);
    // SAFETY: the child makes raw syscalls only and exits with _exit.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: see above; every pointer is to the child's own stack.
        unsafe {
            let mut bad = 0;
            let req = sys::umm_notify_unwatch { id, flags: 0 };
            let rc = libc::ioctl(fd, sys::UMM_NOTIFY_IOC_UNWATCH as _, &req);
            if !(rc < 0 && *libc::__errno_location() == libc::EPERM) {
                bad |= 1;
            }
            let mut rec = [0u8; 40 * 4];
            let rc = libc::read(fd, rec.as_mut_ptr().cast(), rec.len());
            if !(rc < 0 && *libc::__errno_location() == libc::EPERM) {
                bad |= 2;
            }
            let _ = other_id;
            let mut info = sys::umm_notify_info::default();
            let rc = libc::ioctl(fd, sys::UMM_NOTIFY_IOC_INFO as _, &mut info);
            if !(rc < 0 && *libc::__errno_location() == libc::EPERM) {
                bad |= 4;
            }
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            let rc = libc::poll(&mut pfd, 1, 0);
            if !(rc == 1 && pfd.revents & libc::POLLERR != 0 && pfd.revents & libc::POLLIN == 0) {
                bad |= 8;
            }
            let p = libc::mmap(
                ptr::null_mut(),
                page(),
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd,
                0,
            );
            if !(p == libc::MAP_FAILED && *libc::__errno_location() == libc::EPERM) {
                bad |= 16;
            }
            libc::_exit(bad);
        }
    }
    ensure!(pid > 0, "fork failed");
    let mut status = 0;
    // SAFETY: reaps our child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -1
    };
    let g0 = gen(&dev);
    m.unmap(0, 1);
    ensure!(
        gen(&dev) > g0,
        "the parent's unmap after the child's UNWATCH was not recorded"
    );
    let ev = dev.read_events().map_err(|e| e.to_string())?;
    ensure!(
        find(&ev, id, EventKind::Unmap, m.at(0), m.at(1)),
        "no UNMAP record for the parent's watch: {ev:?}"
    );
    ensure!(
        ev.iter().any(|e| e.id == other_id),
        "the record pending at fork was stolen by the child's read(): {ev:?}"
    );
    ensure!(
        code == 0,
        "child status {status:#x}: what the child could do with the inherited fd (bits: 1 UNWATCH, \
         2 read, 4 INFO, 8 poll without POLLERR, 16 mmap) = {code:#x}"
    );
    Ok(())
}

/// Slab memory now, in bytes (/proc/meminfo `Slab`).
fn slab_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/meminfo").expect("read /proc/meminfo");
    let kb: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("Slab:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("Slab: line in /proc/meminfo");
    kb * 1024
}

/// The next value of a xorshift64 generator (test-local, seeded).
fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// Random 64-bit manager cookies must not make the kernel's index sparse: measured with
/// /proc/meminfo's Slab around 16384 watches (the old module, which keyed its xarray by the
/// cookie, cost about 4.4 KB per watch here; kernel-allocated dense ids cost about 140 B).
fn random_cookies_cost_little_kernel_memory() -> Outcome {
    const N: u64 = 16384;
    let source = KmodSource::open().map_err(|e| e.to_string())?;
    let m = Map::anon(1);
    let range = Range::new(m.addr, page()).map_err(|e| e.to_string())?;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let before = slab_bytes();
    for _ in 0..N {
        let cookie = xorshift(&mut x);
        source.watch(cookie, range).map_err(|e| e.to_string())?;
    }
    let after = slab_bytes();
    let per = after.saturating_sub(before) / N;
    println!("    ({N} watches under random 64-bit cookies: {per} bytes of slab per watch)");
    ensure!(
        per < 1024,
        "{per} bytes of kernel memory per watch (want < 1024)"
    );
    Ok(())
}

fn watch_id(dev: &NotifyDevice, start: usize, len: usize) -> u64 {
    dev.watch(start as u64, len as u64).expect("watch")
}

// ---- through umm::Manager ---------------------------------------------------------------

/// A manager with one recording device and the kernel source.
type Rig = (
    Manager,
    umm::Device<RecordingBackend>,
    Arc<umm::testing::Ledger>,
    Arc<KmodSource>,
);

fn manager_with_source() -> Result<Rig, String> {
    let manager = Manager::default();
    let backend = RecordingBackend::new("nic");
    let ledger = backend.ledger();
    let nic = manager.attach(backend).map_err(|e| e.to_string())?;
    let source = Arc::new(KmodSource::open().map_err(|e| e.to_string())?);
    manager
        .add_source(source.clone())
        .map_err(|e| e.to_string())?;
    Ok((manager, nic, ledger, source))
}

fn manager_munmap_then_pin_misses() -> Outcome {
    let (manager, nic, ledger, source) = manager_with_source()?;
    let m = Map::anon(16);
    m.touch();
    let range = Range::new(m.addr, m.len).map_err(|e| e.to_string())?;
    let first = manager
        .pin(range, &[nic.id()])
        .map_err(|e| e.to_string())?
        .translation(nic)
        .copied();
    let first = first.ok_or("no translation")?;
    drop(manager.pin(range, &[nic.id()]).map_err(|e| e.to_string())?); // hit
    ensure!(
        manager.stats().hits() == 1 && ledger.registrations() == 1,
        "second pin was not a hit"
    );
    ensure!(
        source.device().info().map_err(|e| e.to_string())?.watches == 1,
        "the registration is not watched"
    );
    let held = manager.pin(range, &[nic.id()]).map_err(|e| e.to_string())?;
    munmap(m.addr, m.len);
    // SAFETY: maps fresh memory at the same, just freed addresses (right away: nothing else
    // may have been mapped there in between).
    let p = unsafe {
        libc::mmap(
            m.addr as *mut _,
            m.len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    ensure!(p as usize == m.addr, "remap failed");
    ensure!(
        !held.is_valid(),
        "a pin held across munmap still reports valid"
    );
    drop(held);
    let pin = manager.pin(range, &[nic.id()]).map_err(|e| e.to_string())?;
    let second = *pin.translation(nic).ok_or("no translation")?;
    ensure!(
        second.id != first.id,
        "pin after munmap returned the old registration"
    );
    ensure!(
        manager.stats().misses() == 2,
        "expected 2 misses, stats {:?}",
        manager.stats()
    );
    drop(pin);
    manager.flush();
    let live = ledger.live();
    ensure!(
        ledger.deregistrations() == 1 && live.len() == 1 && live.contains_key(&second.id),
        "old registration not deregistered exactly once: live {live:?}"
    );
    ensure!(ledger.bad_deregistrations() == 0, "bad deregistration");
    drop(manager);
    ensure!(
        source.device().info().map_err(|e| e.to_string())?.watches == 0,
        "watches left after the manager was dropped"
    );
    Ok(())
}

fn manager_seed_scenario_file_remapped() -> Outcome {
    let (manager, nic, ledger, _source) = manager_with_source()?;
    let len = 8 * page();
    let file = |byte: u8| -> i32 {
        // SAFETY: creates and fills a memfd of `len` bytes.
        unsafe {
            let fd = libc::memfd_create(c"umm-seed".as_ptr(), 0);
            assert!(fd >= 0 && libc::ftruncate(fd, len as i64) == 0);
            let buf = vec![byte; len];
            assert_eq!(libc::write(fd, buf.as_ptr().cast(), len), len as isize);
            fd
        }
    };
    let (f1, f2) = (file(1), file(2));
    let b = Map::with(8, libc::MAP_SHARED, f1); // F1 at B
    let range = Range::new(b.addr, len).map_err(|e| e.to_string())?;
    let old = *manager
        .pin(range, &[nic.id()])
        .map_err(|e| e.to_string())?
        .translation(nic)
        .ok_or("no translation")?;
    munmap(b.addr, len); // unmap
                         // SAFETY: F2 at the same address B.
    let p = unsafe {
        libc::mmap(
            b.addr as *mut _,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_FIXED,
            f2,
            0,
        )
    };
    ensure!(p as usize == b.addr, "mmap F2 at B failed");
    // SAFETY: reads the first byte of the new mapping.
    let first = unsafe { ptr::read_volatile(b.addr as *const u8) };
    ensure!(first == 2, "F2 not mapped at B");
    let pin = manager.pin(range, &[nic.id()]).map_err(|e| e.to_string())?;
    let new = *pin.translation(nic).ok_or("no translation")?;
    ensure!(
        new.id != old.id,
        "pin of F2 at B returned F1's registration"
    );
    drop(pin);
    manager.flush();
    ensure!(
        !ledger.live().contains_key(&old.id) && ledger.deregistrations() == 1,
        "F1's registration not deregistered"
    );
    // SAFETY: our fds.
    unsafe {
        libc::close(f1);
        libc::close(f2);
    }
    Ok(())
}

fn manager_free_of_vec_then_pin_misses() -> Outcome {
    let (manager, nic, ledger, _source) = manager_with_source()?;
    // Pin glibc's mmap threshold (free() of an mmapped chunk raises it, after which large
    // blocks come from the heap and are reused in place: same pages, nothing to catch).
    // SAFETY: plain malloc tuning.
    unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 10) };
    let size = 2 << 20;
    let buf = vec![1u8; size];
    let range = Range::of_slice(&buf).map_err(|e| e.to_string())?;
    let old = *manager
        .pin(range, &[nic.id()])
        .map_err(|e| e.to_string())?
        .translation(nic)
        .ok_or("no translation")?;
    drop(buf); // glibc munmaps the block internally
    let buf2 = vec![2u8; size];
    let range2 = Range::of_slice(&buf2).map_err(|e| e.to_string())?;
    let pin = manager
        .pin(range2, &[nic.id()])
        .map_err(|e| e.to_string())?;
    ensure!(
        pin.translation(nic).ok_or("no translation")?.id != old.id,
        "new Vec got the freed Vec's registration (same address: {})",
        range == range2
    );
    drop(pin);
    manager.flush();
    ensure!(
        !ledger.live().contains_key(&old.id),
        "freed Vec's registration still live"
    );
    drop(buf2);
    Ok(())
}

/// A fork child's copy of a `KmodSource` (and of the manager holding it) touches nothing of
/// the parent's: dropping the manager (detach + unwatch), draining and unwatching in the
/// child make no system call, the device refuses with `ForkedChild`, and the parent still
/// gets the invalidation of its pinned range afterwards.
fn kmod_source_fork_child_touches_nothing() -> Outcome {
    let (manager, nic, ledger, source) = manager_with_source()?;
    let m = Map::anon(4);
    m.touch();
    let range = Range::new(m.addr, m.len).map_err(|e| e.to_string())?;
    drop(manager.pin(range, &[nic.id()]).map_err(|e| e.to_string())?);
    ensure!(source.watches() == 1, "the pin is not watched");
    // A record pending at fork time: the child must not consume it.
    let other = Map::anon(1);
    let other_range = Range::new(other.addr, page()).map_err(|e| e.to_string())?;
    drop(
        manager
            .pin(other_range, &[nic.id()])
            .map_err(|e| e.to_string())?,
    );
    drop(other);
    // SAFETY: the child runs Rust code of this single-threaded harness (no other thread is
    // alive here) and leaves with _exit.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let mut bad = 0;
        let sink = CountingSink::default();
        source.drain(&sink);
        if !sink.ranges.lock().unwrap().is_empty() || sink.all.load(Ordering::SeqCst) != 0 {
            bad |= 1;
        }
        source.unwatch(1, range);
        if !matches!(source.device().info(), Err(Error::ForkedChild { .. })) {
            bad |= 2;
        }
        if !matches!(
            source.device().watch(m.addr as u64, page() as u64),
            Err(Error::ForkedChild { .. })
        ) {
            bad |= 4;
        }
        if !matches!(
            manager.pin(range, &[nic.id()]),
            Err(umm::Error::ForkedChild { .. })
        ) {
            bad |= 8;
        }
        drop(manager); // detach + deregistration skipped in a child
        drop(source);
        // SAFETY: leaves the child without running the parent's destructors.
        unsafe { libc::_exit(bad) };
    }
    ensure!(pid > 0, "fork failed");
    let mut status = 0;
    // SAFETY: reaps our child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    ensure!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child status {status:#x} (bits: 1 drain delivered, 2 info worked, 4 watch worked, \
         8 pin worked)"
    );
    ensure!(source.watches() == 2, "the parent's watches changed");
    ensure!(
        source.device().info().map_err(|e| e.to_string())?.watches == 2,
        "the kernel's watch count changed"
    );
    let sink = CountingSink::default();
    source.drain(&sink);
    ensure!(
        sink.ranges
            .lock()
            .unwrap()
            .iter()
            .any(|r| r.start() == other_range.start()),
        "the record pending at fork was lost"
    );
    let g0 = gen(source.device());
    munmap(m.addr, m.len);
    ensure!(
        gen(source.device()) > g0,
        "the parent's munmap after the child's drop was not recorded"
    );
    let pin = manager.pin(range, &[nic.id()]);
    // Nothing is mapped there now: the manager refuses the range or registers it anew.
    if let Ok(pin) = pin {
        ensure!(
            ledger.registrations() == 3,
            "the pin after the munmap hit the old registration"
        );
        drop(pin);
    }
    std::mem::forget(m); // already unmapped
    Ok(())
}

/// One `KmodSource` serves one manager (its cookies name the kernel watches): a second
/// manager's `add_source` fails with `AlreadyAttached`; once the first manager is dropped
/// (detach removes the watches it left) the source serves a new one.
fn kmod_source_serves_one_manager() -> Outcome {
    let (first, nic, _ledger, source) = manager_with_source()?;
    let m = Map::anon(2);
    m.touch();
    let range = Range::new(m.addr, m.len).map_err(|e| e.to_string())?;
    drop(first.pin(range, &[nic.id()]).map_err(|e| e.to_string())?);
    ensure!(source.watches() == 1, "the pin is not watched");
    let second = Manager::default();
    match second.add_source(source.clone()) {
        Err(umm::Error::Source { source: e, .. }) => ensure!(
            matches!(
                e.downcast_ref::<Error>(),
                Some(Error::AlreadyAttached { .. })
            ),
            "second manager refused with {e}, want AlreadyAttached"
        ),
        other => return Err(format!("second manager's add_source: {other:?}")),
    }
    drop(first);
    ensure!(
        source.watches() == 0 && source.device().info().map_err(|e| e.to_string())?.watches == 0,
        "watches left after the first manager was dropped"
    );
    second
        .add_source(source.clone())
        .map_err(|e| format!("after the first manager was dropped: {e}"))?;
    Ok(())
}

/// One open file holds at most `max_watches` watches: the next WATCH fails with the typed
/// `WatchLimit` (ENOSPC), through the device and through the source, and an UNWATCH makes
/// room again. Run with a small limit (scripts/test-kmod.sh reloads the module with
/// max_watches=256 for this).
fn watch_limit_is_a_typed_error() -> Outcome {
    let source = KmodSource::open().map_err(|e| e.to_string())?;
    let dev = source.device();
    let max = dev.info().map_err(|e| e.to_string())?.max_watches;
    if max > 4096 {
        println!(
            "    SKIP: max_watches is {max}; this case runs after reloading the module with a \
             small limit (scripts/test-kmod.sh does)"
        );
        return Ok(());
    }
    let m = Map::anon(1);
    let (a, p) = (m.addr as u64, page() as u64);
    let mut ids = Vec::new();
    for _ in 0..max {
        ids.push(dev.watch(a, p).map_err(|e| e.to_string())?);
    }
    ensure!(
        ids.iter().all(|&id| id >= 1 && id <= max as u64),
        "ids outside 1..={max}"
    );
    match dev.watch(a, p) {
        Err(Error::WatchLimit { max_watches, .. }) if max_watches == max => {}
        other => return Err(format!("watch past the limit: {other:?}")),
    }
    let range = Range::new(m.addr, page()).map_err(|e| e.to_string())?;
    match source.watch(12345, range) {
        Err(e) => ensure!(
            matches!(e.downcast_ref::<Error>(), Some(Error::WatchLimit { .. })),
            "source error is not WatchLimit: {e}"
        ),
        Ok(()) => return Err("the source watched past the limit".into()),
    }
    dev.unwatch(ids[7]).map_err(|e| e.to_string())?;
    let again = dev.watch(a, p).map_err(|e| e.to_string())?;
    ensure!(
        again == ids[7],
        "freed id {} not reused: got {again}",
        ids[7]
    );
    Ok(())
}

/// A WATCH issued while an invalidation of its range is already running must not return
/// before that invalidation is over (the new notifier is not called for it: returning
/// earlier lets the caller register pages that are being torn down, unseen).
///
/// Deterministic set-up: another thread runs MADV_DONTNEED over a large populated mapping;
/// a watch on its FIRST page (another open file) is called at the invalidation's start, so
/// its generation moving proves the invalidation is running; the zap then walks the pages
/// upwards. Right then, WATCH the LAST page and read it. If WATCH returned early, the last
/// page still holds its old bytes (the zap has not reached it) and no record ever comes for
/// the new watch. With the fix, WATCH waits for the invalidation's end: the page reads as
/// zero (fresh), or a record is there.
fn watch_waits_for_running_invalidation() -> Outcome {
    const PAGES: usize = 16384; // 64 MiB: the zap takes milliseconds under TCG
    let mut conclusive = 0;
    for attempt in 0..5 {
        let starter = open();
        let dev = open();
        let m = Map::anon(PAGES);
        m.touch();
        let last = m.at(PAGES - 1);
        // SAFETY: the last page of our mapping.
        unsafe { ptr::write_volatile(last as *mut u8, 0xab) };
        starter
            .watch(m.addr as u64, page() as u64)
            .map_err(|e| e.to_string())?;
        let g0 = gen(&starter);
        let done = Arc::new(AtomicBool::new(false));
        let (addr, len, d) = (m.addr, m.len, done.clone());
        let zapper = std::thread::spawn(move || {
            // SAFETY: discards the pages of our own mapping (it stays mapped).
            let rc = unsafe { libc::madvise(addr as *mut _, len, libc::MADV_DONTNEED) };
            d.store(true, Ordering::SeqCst);
            rc
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        while gen(&starter) == g0 {
            ensure!(
                Instant::now() < deadline,
                "MADV_DONTNEED did not start within 30 s"
            );
            std::hint::spin_loop();
        }
        let done_before = done.load(Ordering::SeqCst);
        let id = dev
            .watch(last as u64, page() as u64)
            .map_err(|e| e.to_string())?;
        // Whether the page table still maps the old page. Not a CPU read: x86 flushes the
        // TLBs of a zap (tlb_finish_mmu) after the invalidation has ended, so another CPU
        // may still read the old page through its TLB although the page table no longer
        // maps it; a device registration walks the page table, which is what matters.
        let mut resident = 0u8;
        // SAFETY: mincore of one page of our own mapping into one byte we own.
        let rc = unsafe { libc::mincore(last as *mut _, page(), &mut resident) };
        ensure!(rc == 0, "mincore: {}", std::io::Error::last_os_error());
        let byte = if resident & 1 != 0 { 0xabu8 } else { 0 };
        ensure!(zapper.join().unwrap() == 0, "madvise failed");
        let ev = dev.read_events().map_err(|e| e.to_string())?;
        let recorded = ev.iter().any(|e| e.id == id);
        if done_before {
            println!("    (attempt {attempt}: the invalidation ended before WATCH; retrying)");
            continue;
        }
        conclusive += 1;
        ensure!(
            byte == 0 || recorded,
            "WATCH returned while MADV_DONTNEED was still tearing its page down (the page \
             table still mapped the old page, byte {byte:#x}) and no record came for it: a \
             registration made then would pin a page the application no longer has"
        );
        if conclusive >= 2 {
            break;
        }
    }
    ensure!(
        conclusive > 0,
        "the invalidation always ended before WATCH; nothing proven"
    );
    Ok(())
}

// ---- last: the kernel log ---------------------------------------------------------------

fn kernel_log_has_no_bug_warning_or_oops() -> Outcome {
    let mut buf = vec![0u8; 1 << 20];
    // SAFETY: SYSLOG_ACTION_READ_ALL (3) writes at most `buf.len()` bytes.
    let n = unsafe { libc::klogctl(3, buf.as_mut_ptr().cast(), buf.len() as i32) };
    ensure!(
        n >= 0,
        "klogctl failed: {}",
        std::io::Error::last_os_error()
    );
    let log = String::from_utf8_lossy(&buf[..n as usize]);
    let bad: Vec<&str> = log
        .lines()
        .filter(|l| {
            [
                "BUG",
                "WARNING",
                "Oops",
                "general protection",
                "Call Trace",
                "lockdep",
                "refcount_t",
            ]
            .iter()
            .any(|w| l.contains(w))
        })
        .collect();
    ensure!(bad.is_empty(), "kernel log:\n{}", bad.join("\n"));
    Ok(())
}

fn module_refcount_back_to_zero() -> Outcome {
    // Every NotifyDevice of the earlier cases is dropped by now.
    let rc = refcount();
    ensure!(rc == Some(0), "module refcount {rc:?} with no device open");
    Ok(())
}

fn main() {
    let cases: &[(&str, Case)] = &[
        ("munmap_whole", munmap_whole),
        ("munmap_part", munmap_part),
        (
            "munmap_straddling_two_watches",
            munmap_straddling_two_watches,
        ),
        ("mremap_move", mremap_move),
        ("mremap_shrink", mremap_shrink),
        ("mmap_fixed_over", mmap_fixed_over),
        ("madvise_dontneed", madvise_dontneed),
        ("mprotect_is_recorded", mprotect_is_recorded),
        ("free_of_large_malloc_block", free_of_large_malloc_block),
        ("raw_syscall_munmap", raw_syscall_munmap),
        ("cow_break_after_fork", cow_break_after_fork),
        ("fork_child_inherits_no_watch", fork_child_inherits_no_watch),
        ("truncate_by_another_process", truncate_by_another_process),
        (
            "unwatch_stops_events_and_overlaps_are_independent",
            unwatch_stops_events_and_overlaps_are_independent,
        ),
        ("poll_and_read", poll_and_read),
        (
            "bad_ioctls_return_clear_errnos",
            bad_ioctls_return_clear_errnos,
        ),
        (
            "ring_overflow_becomes_invalidate_all",
            ring_overflow_becomes_invalidate_all,
        ),
        (
            "process_exit_releases_everything",
            process_exit_releases_everything,
        ),
        (
            "concurrent_watch_unwatch_munmap",
            concurrent_watch_unwatch_munmap,
        ),
        (
            "manager_munmap_then_pin_misses",
            manager_munmap_then_pin_misses,
        ),
        (
            "manager_seed_scenario_file_remapped",
            manager_seed_scenario_file_remapped,
        ),
        (
            "manager_free_of_vec_then_pin_misses",
            manager_free_of_vec_then_pin_misses,
        ),
        (
            "fork_child_cannot_unwatch_or_read_parents_records",
            fork_child_cannot_unwatch_or_read_parents_records,
        ),
        (
            "random_cookies_cost_little_kernel_memory",
            random_cookies_cost_little_kernel_memory,
        ),
        (
            "kmod_source_fork_child_touches_nothing",
            kmod_source_fork_child_touches_nothing,
        ),
        (
            "kmod_source_serves_one_manager",
            kmod_source_serves_one_manager,
        ),
        ("watch_limit_is_a_typed_error", watch_limit_is_a_typed_error),
        (
            "watch_waits_for_running_invalidation",
            watch_waits_for_running_invalidation,
        ),
        ("module_refcount_back_to_zero", module_refcount_back_to_zero),
        (
            "kernel_log_has_no_bug_warning_or_oops",
            kernel_log_has_no_bug_warning_or_oops,
        ),
    ];
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let selected: Vec<_> = cases
        .iter()
        .filter(|(n, _)| filters.is_empty() || filters.iter().any(|f| n.contains(f.as_str())))
        .collect();

    if !NotifyDevice::is_available() {
        println!(
            "SKIP: {} absent: the kmod-notifier module is not loaded here ({} guest cases not run; \
             scripts/test-kmod.sh runs them in a qemu guest)",
            sys::UMM_NOTIFY_DEVICE,
            selected.len()
        );
        return;
    }
    let (mut passed, mut failed) = (0, 0);
    let mut timings = BTreeMap::new();
    for (name, case) in selected {
        let t = Instant::now();
        let outcome = catch_unwind(AssertUnwindSafe(case)).unwrap_or_else(|p| {
            Err(p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panicked".into()))
        });
        timings.insert(*name, t.elapsed());
        match outcome {
            Ok(()) => {
                passed += 1;
                println!("test {name} ... ok ({:.2?})", t.elapsed());
            }
            Err(e) => {
                failed += 1;
                println!("test {name} ... FAILED: {e}");
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    if failed > 0 {
        std::process::exit(1);
    }
}
