//! The shared workload and baselines of umm's benchmarks.
//!
//! The method is the one used for the UCX measurement in docs/design.md: `n`
//! cached entries, each one page long and two pages apart, hit in a random order, each
//! hit a get followed by a put (`Manager::pin` + drop). Baselines:
//!
//! * [`LinearCache`]: the seed's linear list of pinned buffers (walk the list for a
//!   containing buffer, bump its count), single-threaded like the seed;
//! * [`LockedBTreeCache`]: a `Mutex<BTreeMap>` keyed by start address, the obvious
//!   thread-safe cache;
//! * [`UcxCache`]: UCX's `ucs_rcache` through a small C shim (cache overhead only: its
//!   registration callback does nothing but store a key after the region, like umm's
//!   [`NullBackend`]).
//!
//! ```
//! let w = umm_benches::Workload::new(16);
//! let (m, dev) = w.umm_manager();
//! let p = m.pin(w.range(3), &[dev.id()]).unwrap();
//! assert_eq!(*p.translation(dev).unwrap(), w.range(3).start() as u64 ^ 0x5a);
//! ```

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use umm::{Backend, BackendError, Capabilities, Config, Device, Manager, Range};

/// Page size of the workload.
pub const PAGE: usize = 4096;

/// `n` one-page ranges two pages apart inside a reserved (`PROT_NONE`) region, and a
/// random order to visit them in.
pub struct Workload {
    base: usize,
    map_len: usize,
    n: usize,
    order: Vec<u32>,
}

impl Workload {
    /// Reserves address space for `n` entries and shuffles a visiting order.
    pub fn new(n: usize) -> Workload {
        let len = (2 * n + 2) * PAGE;
        // SAFETY: reserves fresh address space (no memory is committed: PROT_NONE,
        // MAP_NORESERVE); unmapped in Drop.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED, "reserving {len} bytes");
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        let order = (0..4096.max(n))
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                (seed % n as u64) as u32
            })
            .collect();
        Workload {
            base: base as usize,
            map_len: len,
            n,
            order,
        }
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.n
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Entry `i`: one page at page `2 i + 1`.
    pub fn range(&self, i: usize) -> Range {
        Range::new(self.base + (2 * i + 1) * PAGE, PAGE).expect("inside the reservation")
    }

    /// A page that is not an entry (for misses).
    pub fn gap(&self, i: usize) -> Range {
        Range::new(self.base + (2 * i + 2) * PAGE, PAGE).expect("inside the reservation")
    }

    /// The `k`-th index of the random visiting order.
    #[inline]
    pub fn pick(&self, k: usize) -> usize {
        self.order[k % self.order.len()] as usize
    }

    /// A manager with one do-nothing device ([`NullBackend`]) holding every entry of the
    /// workload.
    pub fn umm_manager(&self) -> (Manager, Device<NullBackend>) {
        self.umm_manager_with(NullBackend)
    }

    /// [`Workload::umm_manager`] with another device.
    pub fn umm_manager_with<B: Backend>(&self, backend: B) -> (Manager, Device<B>) {
        let m = Manager::new(Config {
            max_cached_entries: 4 * self.n + 16,
            ..Config::default()
        });
        let dev = m.attach(backend).expect("attach");
        for i in 0..self.n {
            drop(m.pin(self.range(i), &[dev.id()]).expect("populate"));
        }
        (m, dev)
    }
}

/// A device whose registration does nothing and whose translation is a key derived from
/// the address (as UCX's shim stores one after its region): the harness measures cache
/// overhead only, and reads the translation on every hit as a user does.
///
/// It declares what an RDMA device declares ([`Capabilities::rejects_unmapped`]: verbs
/// fails on unmapped memory itself), so umm does not check the mapping before each
/// registration, and UCX, which never checks, is compared like for like. The workload's
/// ranges are always mapped. [`MappingCheckedNullBackend`] is the same device for which
/// umm checks (one `msync` per miss, as for a Vulkan import).
pub struct NullBackend;

impl Backend for NullBackend {
    type Translation = u64;

    fn name(&self) -> &str {
        "null"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            rejects_unmapped: true,
            ..Capabilities::default()
        }
    }

    fn register(&self, range: Range) -> Result<u64, BackendError> {
        Ok(range.start() as u64 ^ 0x5a)
    }

    fn deregister(&self, _range: Range, _t: u64) -> Result<(), BackendError> {
        Ok(())
    }
}

/// [`NullBackend`] declaring that it would accept unmapped memory, so umm checks the
/// mapping before each registration.
pub struct MappingCheckedNullBackend;

impl Backend for MappingCheckedNullBackend {
    type Translation = u64;

    fn name(&self) -> &str {
        "null-checked"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }

    fn register(&self, range: Range) -> Result<u64, BackendError> {
        NullBackend.register(range)
    }

    fn deregister(&self, range: Range, t: u64) -> Result<(), BackendError> {
        NullBackend.deregister(range, t)
    }
}

/// Mean nanoseconds per step of one round of misses on `manager`'s device `device`: for
/// each `k`, pin the gap page `w.gap(w.pick(k))` (a miss), drop the pin, invalidate it and
/// flush (deregistration). What the harness's miss and invalidate rows time, and what
/// `examples/missloop.rs` runs under a profiler.
pub fn miss_round(
    manager: &Manager,
    device: umm::DeviceId,
    w: &Workload,
    ks: std::ops::Range<usize>,
) -> MissRound {
    let (mut miss, mut invalidate, mut flush) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    let count = ks.len() as f64;
    for k in ks {
        let range = w.gap(w.pick(k));
        let t = Instant::now();
        let p = manager.pin(range, &[device]).expect("a miss registers");
        miss += t.elapsed();
        drop(p);
        let t = Instant::now();
        manager.invalidate(range);
        invalidate += t.elapsed();
        let t = Instant::now();
        manager.flush();
        flush += t.elapsed();
    }
    let per = |d: Duration| d.as_nanos() as f64 / count;
    MissRound {
        miss: per(miss),
        invalidate: per(invalidate),
        flush: per(flush),
    }
}

/// What [`miss_round`] measured, in nanoseconds per step.
#[derive(Clone, Copy, Debug)]
pub struct MissRound {
    /// `pin` of a page that is not cached (register + publish).
    pub miss: f64,
    /// `invalidate` of the page just registered (its pin dropped).
    pub invalidate: f64,
    /// `flush` (the deregistration).
    pub flush: f64,
}

/// This process's resident set size in bytes.
pub fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * PAGE as u64
}

impl Drop for Workload {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the reservation made in new().
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.map_len) };
    }
}

/// The seed's cache: a linear list of pinned buffers with reference counts.
#[derive(Default)]
pub struct LinearCache {
    entries: RefCell<Vec<(usize, usize, u64)>>,
}

impl LinearCache {
    /// A list holding every entry of `w`.
    pub fn new(w: &Workload) -> Self {
        let c = LinearCache::default();
        for i in 0..w.len() {
            let r = w.range(i);
            c.entries.borrow_mut().push((r.start(), r.end(), 0));
        }
        c
    }

    /// Finds the buffer containing `r` (the seed's `msg_send` loop) and takes a
    /// reference; returns its index.
    #[inline]
    pub fn get(&self, r: Range) -> Option<usize> {
        let mut entries = self.entries.borrow_mut();
        let i = entries
            .iter()
            .position(|&(s, e, _)| s <= r.start() && r.end() <= e)?;
        entries[i].2 += 1;
        Some(i)
    }

    /// Drops the reference taken by [`LinearCache::get`].
    #[inline]
    pub fn put(&self, i: usize) {
        self.entries.borrow_mut()[i].2 -= 1;
    }
}

/// A `Mutex<BTreeMap>` cache keyed by start address.
#[derive(Default)]
pub struct LockedBTreeCache {
    map: Mutex<BTreeMap<usize, (usize, u64)>>,
}

impl LockedBTreeCache {
    /// A map holding every entry of `w`.
    pub fn new(w: &Workload) -> Self {
        let c = LockedBTreeCache::default();
        for i in 0..w.len() {
            let r = w.range(i);
            c.map.lock().insert(r.start(), (r.end(), 0));
        }
        c
    }

    /// Finds the entry containing `r` and takes a reference; returns its key.
    #[inline]
    pub fn get(&self, r: Range) -> Option<usize> {
        let mut map = self.map.lock();
        let (&start, v) = map.range_mut(..=r.start()).next_back()?;
        if r.end() > v.0 {
            return None;
        }
        v.1 += 1;
        Some(start)
    }

    /// Drops the reference taken by [`LockedBTreeCache::get`].
    #[inline]
    pub fn put(&self, key: usize) {
        if let Some(v) = self.map.lock().get_mut(&key) {
            v.1 -= 1;
        }
    }
}

#[cfg(umm_has_ucx)]
mod ucx {
    use std::ffi::c_void;

    extern "C" {
        fn umm_ucx_create(max_regions: std::ffi::c_ulong) -> *mut c_void;
        fn umm_ucx_get(rc: *mut c_void, addr: *mut c_void, len: usize) -> *mut c_void;
        fn umm_ucx_put(rc: *mut c_void, region: *mut c_void);
        fn umm_ucx_destroy(rc: *mut c_void);
        fn umm_ucx_region_key(region: *mut c_void) -> u64;
        fn umm_ucx_invalidate(rc: *mut c_void, region: *mut c_void);
    }

    /// A region held from [`UcxCache::get`] until [`UcxCache::put`].
    pub struct UcxRegion(*mut c_void);

    /// UCX's `ucs_rcache` with a do-nothing registration (cache overhead only).
    pub struct UcxCache {
        rc: *mut c_void,
    }

    // SAFETY: ucs_rcache is thread-safe (its page table is protected by its own lock).
    unsafe impl Send for UcxCache {}
    // SAFETY: as above.
    unsafe impl Sync for UcxCache {}

    impl UcxCache {
        /// An empty cache, or `None` if UCX refused to create one.
        pub fn empty() -> Option<UcxCache> {
            // SAFETY: plain constructor call of the shim.
            let rc = unsafe { umm_ucx_create(u32::MAX as _) };
            (!rc.is_null()).then_some(UcxCache { rc })
        }

        /// A cache holding every entry of `w`, or `None` if UCX refused to create one.
        pub fn new(w: &super::Workload) -> Option<UcxCache> {
            let c = UcxCache::empty()?;
            for i in 0..w.len() {
                let region = c.get(w.range(i))?;
                c.put(region);
            }
            Some(c)
        }

        /// `ucs_rcache_get`: finds or registers the region containing `r`.
        #[inline]
        pub fn get(&self, r: umm::Range) -> Option<UcxRegion> {
            // SAFETY: rc is a live cache; the shim only records the address range.
            let region = unsafe { umm_ucx_get(self.rc, r.start() as *mut c_void, r.len()) };
            (!region.is_null()).then_some(UcxRegion(region))
        }

        /// The key the (no-op) registration stored after UCX's region: what a user reads
        /// on every hit (an lkey, a device pointer).
        #[inline]
        pub fn key(&self, region: &UcxRegion) -> u64 {
            // SAFETY: a region held from get() on this cache.
            unsafe { umm_ucx_region_key(region.0) }
        }

        /// `ucs_rcache_region_invalidate` of a held region (the cache's unmap path).
        pub fn invalidate(&self, region: &UcxRegion) {
            // SAFETY: a region held from get() on this cache; it stays valid until put.
            unsafe { umm_ucx_invalidate(self.rc, region.0) }
        }

        /// `ucs_rcache_region_put`.
        #[inline]
        pub fn put(&self, region: UcxRegion) {
            // SAFETY: region came from get() on this cache and is consumed here, so it is
            // put once.
            unsafe { umm_ucx_put(self.rc, region.0) }
        }
    }

    impl Drop for UcxCache {
        fn drop(&mut self) {
            // SAFETY: destroys the cache created in new(); no region is held.
            unsafe { umm_ucx_destroy(self.rc) }
        }
    }
}

#[cfg(umm_has_ucx)]
pub use ucx::UcxCache;

/// Whether the UCX comparison was built (UCX headers were found).
pub const HAS_UCX: bool = cfg!(umm_has_ucx);
