//! Test support shared by the GPU backends' tests (umm-vulkan and umm-cuda include this
//! file): memfd-backed mappings for the seed scenario, hardware probes that print a skip
//! reason, and a conformance check that any backend runs through the core.
#![allow(dead_code)]

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use umm::{Backend, Device, DeviceId, Manager, Range};

/// Whether the environment demands the hardware (CI sets e.g. `UMM_REQUIRE_VULKAN=1`):
/// then a missing device fails the test instead of skipping it.
pub fn required(var: &str) -> bool {
    std::env::var(var).is_ok_and(|v| v == "1")
}

/// Prints a skip line that `cargo test -- --nocapture` and the test log both show.
pub fn skip(test: &str, reason: &dyn std::fmt::Display) {
    eprintln!("SKIP {test}: {reason}");
}

/// A `MAP_SHARED` mapping of a memfd: "file F" of the seed scenario. The file outlives the
/// mapping, so after F is unmapped (or mapped over) its bytes stay readable through the fd.
pub struct FileMapping {
    fd: OwnedFd,
    addr: usize,
    len: usize,
    mapped: bool,
}

fn check(rc: libc::c_long, what: &str) {
    assert!(rc >= 0, "{what}: {}", std::io::Error::last_os_error());
}

impl FileMapping {
    /// A new memfd of `len` bytes, every byte `fill`, mapped shared read-write anywhere.
    pub fn new(name: &str, len: usize, fill: u8) -> FileMapping {
        Self::create(name, len, fill, None)
    }

    fn create(name: &str, len: usize, fill: u8, at: Option<usize>) -> FileMapping {
        let cname = CString::new(name).unwrap();
        // SAFETY: valid NUL-terminated name; the returned fd is owned below.
        let raw = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
        check(raw as libc::c_long, "memfd_create");
        // SAFETY: `raw` is a fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: plain syscalls on our fd with a buffer we own.
        unsafe {
            check(
                libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) as _,
                "ftruncate",
            );
            let bytes = vec![fill; len];
            let n = libc::pwrite(fd.as_raw_fd(), bytes.as_ptr().cast(), len, 0);
            assert_eq!(n as usize, len, "pwrite");
        }
        let (hint, flags) = match at {
            Some(a) => (a as *mut libc::c_void, libc::MAP_SHARED | libc::MAP_FIXED),
            None => (std::ptr::null_mut(), libc::MAP_SHARED),
        };
        // SAFETY: mapping our memfd; with MAP_FIXED the caller replaces a mapping it owns.
        let p = unsafe {
            libc::mmap(
                hint,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd.as_raw_fd(),
                0,
            )
        };
        assert_ne!(
            p,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        FileMapping {
            fd,
            addr: p as usize,
            len,
            mapped: true,
        }
    }

    /// Maps a new file F2 (`len` bytes of `fill`) over this one at the same address with
    /// `MAP_FIXED`, atomically (no other thread's mmap can take the address in between).
    /// `self` (F1) stays readable through [`FileMapping::file_bytes`].
    pub fn map_over(&mut self, name: &str, fill: u8) -> FileMapping {
        assert!(self.mapped);
        let f2 = Self::create(name, self.len, fill, Some(self.addr));
        assert_eq!(f2.addr, self.addr);
        self.mapped = false;
        f2
    }

    /// The mapped range.
    pub fn range(&self) -> Range {
        Range::new(self.addr, self.len).unwrap()
    }

    /// Start address.
    pub fn addr(&self) -> usize {
        self.addr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// The bytes seen through the mapping now.
    pub fn read(&self) -> Vec<u8> {
        assert!(self.mapped);
        let mut out = vec![0u8; self.len];
        // SAFETY: the mapping is live and `len` long; devices write it only inside calls
        // that have returned.
        unsafe {
            std::ptr::copy_nonoverlapping(self.addr as *const u8, out.as_mut_ptr(), self.len)
        };
        out
    }

    /// Writes `bytes` at `offset` through the mapping.
    pub fn write(&self, offset: usize, bytes: &[u8]) {
        assert!(self.mapped && offset + bytes.len() <= self.len);
        // SAFETY: in bounds of the live mapping.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                (self.addr + offset) as *mut u8,
                bytes.len(),
            )
        };
    }

    /// The file's bytes, read through the fd (works after the mapping is gone).
    pub fn file_bytes(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.len];
        // SAFETY: reading into our buffer from our fd.
        let n = unsafe { libc::pread(self.fd.as_raw_fd(), out.as_mut_ptr().cast(), self.len, 0) };
        assert_eq!(n as usize, self.len, "pread");
        out
    }
}

impl Drop for FileMapping {
    fn drop(&mut self) {
        if self.mapped {
            // SAFETY: our own live mapping.
            unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
        }
    }
}

/// Conformance through the core, for any backend: pin (miss), hit, partial hit, invalidate
/// (held pins report invalid, deregistration when they drop), re-pin (miss), and every
/// registration deregistered exactly once. `recording` is another device (a
/// `RecordingBackend`) for the partial hit; `live` counts the backend's own live
/// registrations (imports, host registrations).
pub fn conformance<B: Backend>(
    manager: &Manager,
    dev: Device<B>,
    recording: DeviceId,
    live: &dyn Fn() -> usize,
) {
    let align = 1usize << 16;
    let map = FileMapping::new("conformance", 4 * align, 0x11);
    let whole = map.range();
    let sub = Range::new(map.addr() + align + 100, 2 * align).unwrap();
    let d = dev.id();
    let stat = |f: fn(&umm::DeviceStats) -> u64| f(manager.stats().device(d).unwrap());

    let p1 = manager.pin(whole, &[d]).expect("first pin (miss)");
    assert!(p1.is_valid());
    assert!(p1.translation(dev).is_some());
    assert!(p1.registered_range(d).unwrap().contains(&whole));
    assert_eq!((stat(|s| s.misses), stat(|s| s.registrations)), (1, 1));
    assert_eq!(live(), 1);

    let p2 = manager.pin(sub, &[d]).expect("sub-range pin (hit)");
    assert_eq!(stat(|s| s.hits), 1);
    assert_eq!(p2.registered_range(d), p1.registered_range(d));
    let reg = p2.registered_range(d).unwrap();
    assert_eq!(p2.offset(d), Some(sub.start() - reg.start()));

    let before = manager.stats().partial_hits;
    let p3 = manager.pin(sub, &[d, recording]).expect("partial hit");
    assert_eq!(manager.stats().partial_hits, before + 1);
    assert_eq!(stat(|s| s.hits), 2);
    assert_eq!(stat(|s| s.registrations), 1);
    assert_eq!(live(), 1);

    manager.invalidate(sub);
    assert!(!p1.is_valid() && !p2.is_valid() && !p3.is_valid());
    // Still pinned: the registration holds until the last pin drops.
    manager.flush();
    assert_eq!(stat(|s| s.deregistrations), 0);
    assert_eq!(live(), 1);
    drop((p1, p2, p3));
    manager.flush();
    assert_eq!(stat(|s| s.deregistrations), 1);
    assert_eq!(live(), 0);

    let p4 = manager
        .pin(sub, &[d])
        .expect("re-pin after invalidation (miss)");
    assert!(p4.is_valid());
    assert_eq!((stat(|s| s.misses), stat(|s| s.registrations)), (2, 2));
    assert_eq!(live(), 1);
    drop(p4);
    manager.invalidate(whole);
    manager.flush();
    let s = manager.stats();
    let ds = s.device(d).unwrap();
    assert_eq!(ds.registrations, ds.deregistrations);
    assert_eq!(ds.deregistration_errors, 0);
    assert_eq!(live(), 0);
}
