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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum EventKind {
    /// munmap, mremap move or shrink (`MMU_NOTIFY_UNMAP`).
    Unmap,
    /// Page table entries cleared: madvise, COW break, reclaim, truncate (`MMU_NOTIFY_CLEAR`).
    Clear,
    /// mprotect (`MMU_NOTIFY_PROTECTION_VMA`).
    ProtectionVma,
    /// Write-protection of pages: fork, KSM, uffd-wp (`MMU_NOTIFY_PROTECTION_PAGE`).
    ProtectionPage,
    /// Soft-dirty reset (`MMU_NOTIFY_SOFT_DIRTY`).
    SoftDirty,
    /// The address space is torn down (`MMU_NOTIFY_RELEASE`).
    Release,
    /// Page migration (`MMU_NOTIFY_MIGRATE`).
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
    /// Cookie of the watch it hit (0 for [`EventKind::Overflow`]).
    pub cookie: u64,
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
            cookie: r.cookie,
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
            return Err(Error::Open {
                path,
                source: io::Error::last_os_error(),
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
        })
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

    /// `UMM_NOTIFY_IOC_WATCH`: report every invalidation of `[start, start + len)` under
    /// `cookie`. The range must be page aligned and non-empty (the kernel checks: an
    /// unaligned or empty range is `EINVAL`, a wrapping one `EOVERFLOW`, a cookie already
    /// watched `EEXIST`).
    pub fn watch(&self, cookie: u64, start: u64, len: u64) -> Result<()> {
        self.watch_raw(&sys::umm_notify_watch {
            start,
            len,
            cookie,
            flags: 0,
        })
    }

    /// `UMM_NOTIFY_IOC_WATCH` with every field as given (tests pass bad flags through this).
    pub fn watch_raw(&self, req: &sys::umm_notify_watch) -> Result<()> {
        // SAFETY: WATCH reads exactly one `umm_notify_watch` from the pointer.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), sys::UMM_NOTIFY_IOC_WATCH as _, req) };
        if rc < 0 {
            return Err(Error::Watch {
                cookie: req.cookie,
                start: req.start,
                len: req.len,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// `UMM_NOTIFY_IOC_UNWATCH`: stop reporting the watch `cookie` (`ENOENT` if unknown).
    pub fn unwatch(&self, cookie: u64) -> Result<()> {
        let req = sys::umm_notify_unwatch { cookie, flags: 0 };
        // SAFETY: UNWATCH reads exactly one `umm_notify_unwatch` from the pointer.
        let rc =
            unsafe { libc::ioctl(self.fd.as_raw_fd(), sys::UMM_NOTIFY_IOC_UNWATCH as _, &req) };
        if rc < 0 {
            return Err(Error::Unwatch {
                cookie,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Reads pending records into `buf` without waiting; returns how many were read (0 when
    /// none is pending). An [`EventKind::Overflow`] record comes alone.
    pub fn read_records(&self, buf: &mut [sys::umm_notify_record]) -> Result<usize> {
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
        // The fd closes after this; the kernel then removes every watch of this file.
    }
}
