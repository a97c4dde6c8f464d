//! Shared helpers of the core's integration tests.
#![allow(dead_code)]

use umm::Range;

/// An anonymous mapping the tests carve ranges out of (page `i` = `base + i * PAGE`).
pub struct Arena {
    pub base: usize,
    pub pages: usize,
}

pub const PAGE: usize = 4096;

impl Arena {
    pub fn new(pages: usize) -> Arena {
        // SAFETY: a fresh private anonymous mapping; we own it until drop.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                pages * PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap arena");
        Arena {
            base: p as usize,
            pages,
        }
    }

    /// Pages `[first, first + n)`.
    pub fn pages(&self, first: usize, n: usize) -> Range {
        assert!(first + n <= self.pages);
        Range::new(self.base + first * PAGE, n * PAGE).unwrap()
    }

    /// Bytes `[off, off + len)` from the base.
    pub fn bytes(&self, off: usize, len: usize) -> Range {
        Range::new(self.base + off, len).unwrap()
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what new() mapped.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.pages * PAGE) };
    }
}
