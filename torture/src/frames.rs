//! Page frames and tags: what a registration saw when it was made, and what is mapped now.
//!
//! [`PfnBackend`] wraps [`RecordingBackend`] (which pins nothing) and records, for every page
//! of each registration, the page frame number mapped at register time (from
//! `/proc/self/pagemap`, readable as root; 0 otherwise) and the page's [`Tag`]. A cache hit
//! returns that record, so the checker compares it with what is mapped now: a registration
//! that a missed invalidation left in the cache shows an old tag or an old frame.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use umm::testing::{Ledger, RecordedTranslation, RecordingBackend};
use umm::{Backend, BackendError, Capabilities, Range};

/// The first 16 bytes of every page the driver owns: which mapping generation wrote it, at
/// which address. A page gets a fresh generation each time an operation replaces it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tag {
    /// Globally unique generation of the write (0: none, unreadable).
    pub gen: u64,
    /// The virtual address the page was tagged at.
    pub addr: u64,
}

/// What a registration saw of one page.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageRecord {
    /// Page frame number at register time (0: unknown, not root or not present).
    pub pfn: u64,
    /// The page's tag at register time.
    pub tag: Tag,
}

/// The translation of a [`PfnBackend`]: the recorder's plus one record per page.
#[derive(Debug)]
pub struct PfnTranslation {
    /// The recording backend's translation (id, range, stamp).
    pub recorded: RecordedTranslation,
    /// One record per page of `recorded.range`, in address order.
    pub pages: Box<[PageRecord]>,
    /// The process's fork count (see [`PfnBackend::new`]) when it was registered.
    pub forks: u64,
}

/// A [`RecordingBackend`] that also records page frames and tags (see the module docs).
pub struct PfnBackend {
    inner: RecordingBackend,
    pagemap: Option<Arc<File>>,
    forks: Arc<AtomicU64>,
}

impl PfnBackend {
    /// Wraps `inner`; `pagemap` is `/proc/self/pagemap` (None: frames are not recorded);
    /// `forks` counts the driver's forks (recorded per registration: after a fork the
    /// kernel may copy a private page on its next write, which a pinning backend prevents
    /// and this one cannot).
    pub fn new(
        inner: RecordingBackend,
        pagemap: Option<Arc<File>>,
        forks: Arc<AtomicU64>,
    ) -> PfnBackend {
        PfnBackend {
            inner,
            pagemap,
            forks,
        }
    }

    /// The recorder's ledger.
    pub fn ledger(&self) -> Arc<Ledger> {
        self.inner.ledger()
    }
}

impl Backend for PfnBackend {
    type Translation = PfnTranslation;

    fn name(&self) -> &str {
        self.inner.name()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    fn register(&self, range: Range) -> Result<PfnTranslation, BackendError> {
        // Fault every page in for writing first, as a real pin (FOLL_WRITE) does; a page that
        // is not mapped any more simply records nothing (the checker never compares those).
        populate_write(range.start(), range.len());
        let page = umm::page_size();
        let pages = (0..range.len() / page)
            .map(|i| {
                let addr = range.start() + i * page;
                PageRecord {
                    pfn: self.pagemap.as_deref().map_or(0, |f| pfn(f, addr)),
                    tag: read_tag(addr).unwrap_or_default(),
                }
            })
            .collect();
        let forks = self.forks.load(Ordering::SeqCst);
        let recorded = self.inner.register(range)?;
        Ok(PfnTranslation {
            recorded,
            pages,
            forks,
        })
    }

    fn deregister(&self, range: Range, t: PfnTranslation) -> Result<(), BackendError> {
        self.inner.deregister(range, t.recorded)
    }
}

/// Opens `/proc/self/pagemap` when it reports frame numbers (root), else `None`.
pub fn open_pagemap() -> Option<Arc<File>> {
    let f = File::open("/proc/self/pagemap").ok()?;
    // Probe with a page we own and have written: a non-root reader gets PFN 0.
    let probe = Box::new([1u8; 1]);
    let addr = probe.as_ptr() as usize & !(umm::page_size() - 1);
    (pfn(&f, addr) != 0).then(|| Arc::new(f))
}

/// The frame number mapped at `addr` now (0: not present or not readable).
pub fn pfn(pagemap: &File, addr: usize) -> u64 {
    let mut buf = [0u8; 8];
    let off = (addr / umm::page_size()) as u64 * 8;
    if pagemap.read_exact_at(&mut buf, off).is_err() {
        return 0;
    }
    let e = u64::from_ne_bytes(buf);
    if e >> 63 == 0 {
        return 0;
    }
    e & ((1u64 << 55) - 1)
}

/// `MADV_POPULATE_WRITE` (Linux 5.14): faults pages in writable, fails on holes.
const MADV_POPULATE_WRITE: libc::c_int = 23;

/// Faults `[addr, addr + len)` in for writing; false when part of it is not mapped. Raw
/// system call, so interposition hooks never see it.
pub fn populate_write(addr: usize, len: usize) -> bool {
    // SAFETY: MADV_POPULATE_WRITE only faults pages in (as a write would, without changing
    // their contents) and fails with EFAULT/ENOMEM on unmapped parts.
    unsafe { libc::syscall(libc::SYS_madvise, addr, len, MADV_POPULATE_WRITE) == 0 }
}

/// Reads the tag of the page at `addr` without faulting on a hole (`process_vm_readv` on
/// this process); `None` when it is not mapped.
pub fn read_tag(addr: usize) -> Option<Tag> {
    let mut buf = [0u64; 2];
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: 16,
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: 16,
    };
    // SAFETY: reads 16 bytes of this process at `addr` into `buf`, which we own; the kernel
    // checks the remote address and fails with EFAULT instead of faulting.
    let n = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
    (n == 16).then_some(Tag {
        gen: buf[0],
        addr: buf[1],
    })
}
