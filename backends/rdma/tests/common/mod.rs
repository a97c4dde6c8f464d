//! Helpers shared by the Soft-RoCE tests: device probing with a plain skip reason, anonymous
//! mappings, a tiny PRNG and the device's MR counter.

#![allow(dead_code)]

use std::sync::Arc;

use umm_rdma::{DeviceSelector, RdmaDevice, RdmaError};

/// rxe0 and rxe1 (set up by scripts/rxe-setup.sh in the guest), or `None` after printing
/// why the test is skipped.
pub fn rxe_pair(test: &str) -> Option<(Arc<RdmaDevice>, Arc<RdmaDevice>)> {
    let open = |name: &str| RdmaDevice::open(&DeviceSelector::Name(name.into()));
    match (open("rxe0"), open("rxe1")) {
        (Ok(a), Ok(b)) => Some((a, b)),
        (Err(e @ RdmaError::NoDevice { .. }), _) | (Err(e @ RdmaError::NotFound { .. }), _) => {
            println!("SKIP {test}: needs Soft-RoCE devices rxe0 and rxe1 ({e}); run scripts/test-rdma.sh");
            None
        }
        (_, Err(e @ RdmaError::NotFound { .. })) => {
            println!("SKIP {test}: needs Soft-RoCE devices rxe0 and rxe1 ({e}); run scripts/test-rdma.sh");
            None
        }
        (Err(e), _) | (_, Err(e)) => panic!("opening rxe devices: {e}"),
    }
}

/// A private anonymous mapping, unmapped on drop.
pub struct Anon {
    pub ptr: *mut u8,
    pub len: usize,
}

// SAFETY: the mapping is plain memory owned by this value.
unsafe impl Send for Anon {}

impl Anon {
    pub fn new(len: usize) -> Anon {
        // SAFETY: a fresh anonymous mapping; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap {len}");
        Anon { ptr: p.cast(), len }
    }

    pub fn addr(&self) -> usize {
        self.ptr as usize
    }

    pub fn range(&self) -> umm::Range {
        umm::Range::new(self.addr(), self.len).unwrap()
    }

    pub fn sub(&self, off: usize, len: usize) -> umm::Range {
        assert!(off + len <= self.len);
        umm::Range::new(self.addr() + off, len).unwrap()
    }

    /// The bytes (volatile reads: the device may have written them).
    pub fn read(&self, off: usize, len: usize) -> Vec<u8> {
        assert!(off + len <= self.len);
        (0..len)
            // SAFETY: in bounds of the live mapping.
            .map(|i| unsafe { std::ptr::read_volatile(self.ptr.add(off + i)) })
            .collect()
    }

    pub fn fill(&self, off: usize, bytes: &[u8]) {
        assert!(off + bytes.len() <= self.len);
        // SAFETY: in bounds of the live mapping, no reference to it exists.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.add(off), bytes.len()) };
    }
}

impl Drop for Anon {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping this value created.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// xorshift64*: reproducible test data without a dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

/// The number of MRs the kernel holds on `dev`, from `rdma resource show` (netlink).
pub fn kernel_mr_count(dev: &str) -> u64 {
    let out = std::process::Command::new("rdma")
        .args(["resource", "show"])
        .output()
        .expect("running `rdma resource show`");
    let text = String::from_utf8_lossy(&out.stdout);
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.nth(1).map(|w| w.trim_end_matches(':')) != Some(dev) {
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        if let Some(i) = words.iter().position(|w| *w == "mr") {
            return words[i + 1].parse().expect("mr count");
        }
    }
    panic!("no mr count for {dev} in `rdma resource show`: {text}");
}
