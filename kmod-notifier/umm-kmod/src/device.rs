//! [`NotifyDevice`]: one open file of `/dev/umm_notify`, with its generation page mapped.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::sys;

/// What an event record says happened to a watched range.
///
/// The kind is the kernel's hint, not a contract: treat every kind as an invalidation (as
/// [`crate::KmodSource`] does). What Linux 6.1 (Debian 12) actually reports:
///
/// | kind | operations |
/// |---|---|
/// | [`Unmap`](EventKind::Unmap) | munmap, mremap move/shrink, `mmap(MAP_FIXED)` over the range, OOM reaper |
/// | [`Clear`](EventKind::Clear) | madvise DONTNEED/FREE/REMOVE, truncation and hole punching, COW break after fork, reclaim/swap-out, **every ordinary page migration** (NUMA balancing, compaction, `move_pages`, hot-unplug), **KSM merging**, THP split/collapse |
/// | [`ProtectionVma`](EventKind::ProtectionVma) | mprotect |
/// | [`ProtectionPage`](EventKind::ProtectionPage) | fork write-protecting the parent's private pages, writeback cleaning dirty shared file pages |
/// | [`SoftDirty`](EventKind::SoftDirty) | `echo 4 > /proc/<pid>/clear_refs` |
/// | [`Release`](EventKind::Release) | the address space is torn down (exit, execve) |
/// | [`Migrate`](EventKind::Migrate) | only migration to/from device-private memory (HMM drivers) |
/// | [`Exclusive`](EventKind::Exclusive) | device-exclusive access for device atomics |
///
/// So KSM and ordinary migration arrive as `Clear`, not `ProtectionPage` or `Migrate`;
/// other kernels may differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum EventKind {
    /// munmap, mremap move or shrink, `mmap(MAP_FIXED)` over it (`MMU_NOTIFY_UNMAP`).
    Unmap,
    /// Page table entries cleared: madvise, COW break, reclaim, truncate, KSM merging and
    /// ordinary page migration (`MMU_NOTIFY_CLEAR`).
    Clear,
    /// mprotect (`MMU_NOTIFY_PROTECTION_VMA`).
    ProtectionVma,
    /// Write-protection of pages: fork's write-protect of the parent, writeback cleaning
    /// (`MMU_NOTIFY_PROTECTION_PAGE`; on 6.1 not KSM, which arrives as [`Clear`](Self::Clear)).
    ProtectionPage,
    /// Soft-dirty reset (`MMU_NOTIFY_SOFT_DIRTY`).
    SoftDirty,
    /// The address space is torn down (`MMU_NOTIFY_RELEASE`).
    Release,
    /// Migration to or from device-private memory (`MMU_NOTIFY_MIGRATE`; ordinary page
    /// migration arrives as [`Clear`](Self::Clear)).
    Migrate,
    /// Device-exclusive access (`MMU_NOTIFY_EXCLUSIVE`).
    Exclusive,
    /// The ring overflowed: records were dropped, treat everything as changed.
    Overflow,
    /// A kind this crate does not know (raw value).
    Other(u32),
}

impl EventKind {
    /// Decodes a `UMM_NOTIFY_EVENT_*` value.
    pub fn from_raw(kind: u32) -> EventKind {
        match kind {
            sys::UMM_NOTIFY_EVENT_UNMAP => EventKind::Unmap,
            sys::UMM_NOTIFY_EVENT_CLEAR => EventKind::Clear,
            sys::UMM_NOTIFY_EVENT_PROTECTION_VMA => EventKind::ProtectionVma,
            sys::UMM_NOTIFY_EVENT_PROTECTION_PAGE => EventKind::ProtectionPage,
            sys::UMM_NOTIFY_EVENT_SOFT_DIRTY => EventKind::SoftDirty,
            sys::UMM_NOTIFY_EVENT_RELEASE => EventKind::Release,
            sys::UMM_NOTIFY_EVENT_MIGRATE => EventKind::Migrate,
            sys::UMM_NOTIFY_EVENT_EXCLUSIVE => EventKind::Exclusive,
            sys::UMM_NOTIFY_EVENT_OVERFLOW => EventKind::Overflow,
            other => EventKind::Other(other),
        }
    }
}

/// One invalidation delivered by `read()`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// Id of the watch it hit, as [`NotifyDevice::watch`] returned it (0 for
    /// [`EventKind::Overflow`]).
    pub id: u64,
    /// First byte invalidated, clipped to the watch.
    pub start: u64,
    /// One past the last byte invalidated, clipped to the watch (`u64::MAX` for an overflow).
    pub end: u64,
    /// What happened.
    pub kind: EventKind,
    /// The generation right after the event was recorded.
    pub seq: u64,
}

impl From<sys::umm_notify_record> for Event {
    fn from(r: sys::umm_notify_record) -> Event {
        Event {
            id: r.id,
            start: r.start,
            end: r.end,
            kind: EventKind::from_raw(r.kind),
            seq: r.seq,
        }
    }
}

/// What `UMM_NOTIFY_IOC_INFO` reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Info {
    /// The module's ABI version.
    pub abi_version: u32,
    /// Capacity of this file's ring, in records.
    pub ring_entries: u32,
    /// Most watches one file may hold.
    pub max_watches: u32,
    /// Watches this file holds now.
    pub watches: u64,
}

/// One open file of `/dev/umm_notify`: binds the opening process's address space.
///
/// # Fork
///
/// The file belongs to the process that opened it. In a fork child, every method that would
/// talk to the kernel ([`watch`](Self::watch), [`unwatch`](Self::unwatch), the reads, polls
/// and [`info`](Self::info)) fails with [`Error::ForkedChild`] without a system call (the
/// module would refuse with `EPERM` anyway), so the child can neither remove the parent's
/// watches nor consume its records. Dropping the child's copy only closes the child's
/// descriptor and unmaps its copy of the page; the parent's watches stay. A child that wants
/// notifications opens the device itself.
///
/// Opened non-blocking: [`read_events`](NotifyDevice::read_events) never waits; use
/// [`wait_readable`](NotifyDevice::wait_readable) to sleep until an event arrives. The
/// generation page is mapped read-only for the lifetime of the value. Dropping it closes
/// the file, which removes every watch in the kernel.
#[derive(Debug)]
pub struct NotifyDevice {
    fd: OwnedFd,
    /// The read-only generation page (`struct umm_notify_shared`), mapped for `self`'s life.
    shared: NonNull<sys::umm_notify_shared>,
    page_len: usize,
    path: PathBuf,
    /// The process that opened the file; the only one that may use it.
    opener: u32,
}

// SAFETY: the fd is a plain kernel object usable from any thread, and the mapped page is
// only ever read through atomics (`generation`, `overflows`) or plain loads of fields that
// never change after open (`abi_version`).
unsafe impl Send for NotifyDevice {}
// SAFETY: as above; every method takes `&self` and the kernel serializes concurrent calls.
unsafe impl Sync for NotifyDevice {}

impl NotifyDevice {
    /// Whether the device node exists (the module is loaded).
    pub fn is_available() -> bool {
        Path::new(sys::UMM_NOTIFY_DEVICE).exists()
    }

    /// Opens [`sys::UMM_NOTIFY_DEVICE`].
    pub fn open() -> Result<NotifyDevice> {
        NotifyDevice::open_path(sys::UMM_NOTIFY_DEVICE)
    }

    /// Opens the device at `path`, checks its ABI version and maps the generation page.
    ///
    /// A missing node is [`Error::NotLoaded`] (its message says how to install the module),
    /// a node this user may not open [`Error::PermissionDenied`].
    pub fn open_path(path: impl AsRef<Path>) -> Result<NotifyDevice> {
        let path = path.as_ref().to_path_buf();
        let c_path =
            CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| Error::Open {
                path: path.clone(),
                source: io::ErrorKind::InvalidInput.into(),
            })?;
        // SAFETY: `c_path` is a valid NUL-terminated string; open has no memory effects.
        let raw = unsafe {
            libc::open(
                c_path.as_ptr(),
                libc::O_RDWR | libc::O_CLOEXEC | libc::O_NONBLOCK,
            )
        };
        if raw < 0 {
            let source = io::Error::last_os_error();
            return Err(match source.raw_os_error() {
                Some(libc::ENOENT) | Some(libc::ENXIO) | Some(libc::ENODEV) => {
                    Error::NotLoaded { path }
                }
                Some(libc::EACCES) => Error::PermissionDenied { path },
                _ => Error::Open { path, source },
            });
        }
        // SAFETY: `raw` is a freshly opened descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };

        let mut info = sys::umm_notify_info::default();
        // SAFETY: INFO writes exactly one `umm_notify_info` to the pointer.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), sys::UMM_NOTIFY_IOC_INFO as _, &mut info) };
        if rc < 0 {
            return Err(Error::Info {
                path,
                source: io::Error::last_os_error(),
            });
        }
        if info.abi_version != sys::UMM_NOTIFY_ABI_VERSION
            || info.record_size as usize != std::mem::size_of::<sys::umm_notify_record>()
        {
            return Err(Error::AbiMismatch {
                path,
                found: info.abi_version,
                expected: sys::UMM_NOTIFY_ABI_VERSION,
            });
        }

        let page_len = info.shared_size as usize;
        // SAFETY: maps one read-only shared page of the device at offset 0; the kernel
        // inserts its page there. The result is checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                page_len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::Map {
                path,
                source: io::Error::last_os_error(),
            });
        }
        let shared = NonNull::new(p.cast()).expect("mmap does not return NULL on success");
        tracing::debug!(path = %path.display(), ring = info.ring_entries, "opened umm_notify");
        Ok(NotifyDevice {
            fd,
            shared,
            page_len,
            path,
            opener: std::process::id(),
        })
    }

    /// The process that opened the file.
    pub fn opener(&self) -> u32 {
        self.opener
    }

    /// Whether the caller is not the process that opened the file (a fork child's copy).
    pub fn is_forked_copy(&self) -> bool {
        std::process::id() != self.opener
    }

    /// `Err(`[`Error::ForkedChild`]`)` in a fork child.
    fn check_owner(&self) -> Result<()> {
        let caller = std::process::id();
        if caller != self.opener {
            return Err(Error::ForkedChild {
                path: self.path.clone(),
                opener: self.opener,
                caller,
            });
        }
        Ok(())
    }

    /// The device path this file was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The generation counter: bumped by the kernel, with release order, for every recorded
    /// event before the causing syscall returns. Load it with `Ordering::Acquire`.
    pub fn generation(&self) -> &AtomicU64 {
        // SAFETY: `generation` is the first, 8-byte aligned field of the mapped page, which
        // stays mapped while `self` lives. The kernel writes it with a single aligned store
        // (smp_store_release); user space only loads it. The page is read-only: a relaxed
        // load of a u64 is valid there per the std atomic docs, and an acquire load is a plain
        // `mov` (x86_64) or `ldar` (aarch64), the only targets this crate builds for (see
        // `sys`), so no load ever writes or faults.
        unsafe { &*std::ptr::addr_of!((*self.shared.as_ptr()).generation).cast::<AtomicU64>() }
    }

    /// How many events found the ring full so far (cumulative).
    pub fn overflows(&self) -> u64 {
        // SAFETY: as in `generation`: an aligned u64 of the mapped page, written by the
        // kernel with WRITE_ONCE.
        let a =
            unsafe { &*std::ptr::addr_of!((*self.shared.as_ptr()).overflows).cast::<AtomicU64>() };
        a.load(Ordering::Acquire)
    }

    /// `UMM_NOTIFY_IOC_INFO`.
    pub fn info(&self) -> Result<Info> {
        self.check_owner()?;
        let mut info = sys::umm_notify_info::default();
        // SAFETY: INFO writes exactly one `umm_notify_info` to the pointer.
        let rc = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                sys::UMM_NOTIFY_IOC_INFO as _,
                &mut info,
            )
        };
        if rc < 0 {
            return Err(Error::Info {
                path: self.path.clone(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(Info {
            abi_version: info.abi_version,
            ring_entries: info.ring_entries,
            max_watches: info.max_watches,
            watches: info.watches,
        })
    }

    /// `UMM_NOTIFY_IOC_WATCH`: report every invalidation of `[start, start + len)`; returns
    /// the id the module allocated for the watch (records carry it; [`unwatch`](Self::unwatch)
    /// takes it). The range must be page aligned and non-empty (the kernel checks: an
    /// unaligned or empty range is `EINVAL`, a wrapping one `EOVERFLOW`). When the file
    /// already holds the module's `max_watches` watches this is [`Error::WatchLimit`].
    ///
    /// Returns only after any invalidation of the address space that was already running has
    /// finished, so pages read (registered) after it returns are not being torn down unseen.
    pub fn watch(&self, start: u64, len: u64) -> Result<u64> {
        let mut req = sys::umm_notify_watch {
            start,
            len,
            id: 0,
            flags: 0,
        };
        self.watch_raw(&mut req)
    }

    /// `UMM_NOTIFY_IOC_WATCH` with every field as given (tests pass bad flags through this);
    /// the kernel writes the id to `req.id`, which is also returned.
    pub fn watch_raw(&self, req: &mut sys::umm_notify_watch) -> Result<u64> {
        self.check_owner()?;
        // SAFETY: WATCH reads one `umm_notify_watch` from the pointer and writes it back.
        let rc = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                sys::UMM_NOTIFY_IOC_WATCH as _,
                req as *mut sys::umm_notify_watch,
            )
        };
        if rc < 0 {
            let source = io::Error::last_os_error();
            if source.raw_os_error() == Some(libc::ENOSPC) {
                return Err(Error::WatchLimit {
                    start: req.start,
                    len: req.len,
                    max_watches: self.info().map(|i| i.max_watches).unwrap_or(0),
                });
            }
            return Err(Error::Watch {
                start: req.start,
                len: req.len,
                source,
            });
        }
        Ok(req.id)
    }

    /// `UMM_NOTIFY_IOC_UNWATCH`: stop reporting the watch `id` (`ENOENT` if unknown).
    pub fn unwatch(&self, id: u64) -> Result<()> {
        self.check_owner()?;
        let req = sys::umm_notify_unwatch { id, flags: 0 };
        // SAFETY: UNWATCH reads exactly one `umm_notify_unwatch` from the pointer.
        let rc =
            unsafe { libc::ioctl(self.fd.as_raw_fd(), sys::UMM_NOTIFY_IOC_UNWATCH as _, &req) };
        if rc < 0 {
            return Err(Error::Unwatch {
                id,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Reads pending records into `buf` without waiting; returns how many were read (0 when
    /// none is pending). An [`EventKind::Overflow`] record comes alone.
    pub fn read_records(&self, buf: &mut [sys::umm_notify_record]) -> Result<usize> {
        self.check_owner()?;
        if buf.is_empty() {
            return Ok(0);
        }
        let bytes = std::mem::size_of_val(buf);
        loop {
            // SAFETY: `buf` is valid for `bytes` bytes of writes, and any bit pattern is a
            // valid `umm_notify_record` (plain integers).
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), bytes) };
            if n >= 0 {
                return Ok(n as usize / std::mem::size_of::<sys::umm_notify_record>());
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EAGAIN) => return Ok(0),
                Some(libc::EINTR) => continue,
                _ => {
                    return Err(Error::Read {
                        path: self.path.clone(),
                        source: e,
                    })
                }
            }
        }
    }

    /// Reads every pending record (without waiting) as [`Event`]s.
    pub fn read_events(&self) -> Result<Vec<Event>> {
        let mut out = Vec::new();
        let mut buf = [sys::umm_notify_record::default(); 64];
        loop {
            let n = self.read_records(&mut buf)?;
            out.extend(buf[..n].iter().map(|r| Event::from(*r)));
            if n < buf.len() {
                return Ok(out);
            }
        }
    }

    /// Waits until a record is pending or `timeout` passes; returns whether one is pending.
    pub fn wait_readable(&self, timeout: Duration) -> Result<bool> {
        self.check_owner()?;
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        loop {
            // SAFETY: one valid pollfd.
            let n = unsafe { libc::poll(&mut pfd, 1, ms) };
            if n >= 0 {
                return Ok(n > 0 && pfd.revents & libc::POLLIN != 0);
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINTR) {
                return Err(Error::Read {
                    path: self.path.clone(),
                    source: e,
                });
            }
        }
    }
}

impl AsFd for NotifyDevice {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for NotifyDevice {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

impl Drop for NotifyDevice {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the page mapped in `open_path`; no reference into it
        // outlives `self` (`generation()` borrows `self`).
        unsafe { libc::munmap(self.shared.as_ptr().cast(), self.page_len) };
        // The fd closes after this; the kernel removes every watch of this file when its
        // last descriptor closes (in a fork child this closes only the child's descriptor).
    }
}
