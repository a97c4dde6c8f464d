//! # umm-torture: randomized address-space churn against umm's notifier sources
//!
//! Worker threads pick operations from a seeded stream: pin a run of pages of a *slot*
//! (a fixed 16-page window of a reserved address range) and check it, or change what is
//! mapped there (munmap, `mmap(MAP_FIXED)` of anonymous memory or a memfd, mremap grow /
//! shrink / move / `MREMAP_DONTUNMAP`, madvise `DONTNEED`/`FREE`/`REMOVE`, hole punching
//! and truncation of the memfd, `shmat`/`shmdt`, fork children, raw syscalls), plus
//! `malloc`/`free` of large blocks and `malloc_trim` with pins inside live blocks.
//!
//! Every page the driver maps gets a [`frames::Tag`] (a globally unique generation and
//! its address) whenever an operation replaces it. Each pin's translation carries what the
//! registration saw when it was made ([`frames::PfnBackend`]: tags and page frames from
//! `/proc/self/pagemap`); after each pin the checker requires, for every pinned page, the
//! registration's tag to be the page's current tag and its frame to be the frame mapped
//! now. A pin that succeeds and is stale is a failure; a source may instead refuse the
//! memory (`umm::Error::Uncovered` / `Watch`), which is counted.
//!
//! A slot is changed and checked under its own lock, so a check is well defined; the
//! invalidation still comes only from the source under test (or, for
//! [`SourceKind::Manual`], from the driver calling `Manager::invalidate` before each
//! change: the control, which proves the checker has no false positives).
//!
//! Any failure carries the seed and the operation trace of the slot and of the whole run;
//! `--seed S --threads 1` replays the same operation stream exactly.
//!
//! At the end the run checks balance: every registration deregistered exactly once per
//! device, nothing left registered, the descriptor count back where it started.

#![deny(missing_docs)]

pub mod cli;
pub mod frames;
pub mod ops;
pub mod rng;

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use umm::testing::RecordingBackend;
use umm::{Config, Device, InvalidationSink, Manager, ManagerId, NotifierSource, Pin, Range};

use frames::{PfnBackend, Tag};
pub use ops::{default_ops, OpKind, SourceKind};
use rng::Rng;

/// Pages per slot.
pub const SLOT_PAGES: usize = 16;
/// Longest run one operation touches.
const MAX_RUN: usize = 8;
/// Size of every memfd the driver maps, in pages (room for in-place growth).
const FILE_PAGES: usize = 32;
/// Lines of trace kept per slot and for the whole run.
const SLOT_TRACE: usize = 40;
const RUN_TRACE: usize = 80;
/// Most the resident set may grow over a run (index nodes, entries, allocator caches).
const RSS_BOUND_KIB: i64 = 256 << 10;

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    /// The notifier source(s) under test.
    pub source: SourceKind,
    /// Seed of every worker's operation stream.
    pub seed: u64,
    /// Worker threads (1: exactly replayable).
    pub threads: usize,
    /// Stop after this many operations (all workers together).
    pub ops: u64,
    /// Stop after this long (soak mode), whichever comes first.
    pub duration: Option<Duration>,
    /// Slots of the address pool.
    pub slots: usize,
    /// malloc blocks the heap operations juggle.
    pub heap_slots: usize,
    /// The operations to run (None: [`default_ops`] of the source).
    pub op_set: Option<Vec<OpKind>>,
    /// Also pin on Soft-RoCE `rxe0` (one pin in four) and RDMA WRITE the pinned pages to a
    /// buffer registered on `rxe1`: the bytes that arrive must be the pages' current tags.
    /// Needs both devices (scripts/rxe-setup.sh in the guest); without them the run is a
    /// setup error.
    pub rdma: bool,
    /// A planted bug: drop every Nth invalidation between the source and the manager (for
    /// the manual source: skip every Nth `Manager::invalidate` call).
    pub drop_every: Option<u64>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            source: SourceKind::Manual,
            seed: 1,
            threads: 4,
            ops: 100_000,
            duration: None,
            slots: 48,
            heap_slots: 16,
            op_set: None,
            rdma: false,
            drop_every: None,
        }
    }
}

/// A stale pin (or a broken balance): what, where, and how to replay it.
#[derive(Debug)]
pub struct Failure {
    /// The source under test.
    pub source: SourceKind,
    /// The run's seed.
    pub seed: u64,
    /// What went wrong.
    pub message: String,
    /// The last operations on the failing slot (oldest first).
    pub slot_trace: Vec<String>,
    /// The last operations of the whole run (oldest first).
    pub run_trace: Vec<String>,
    /// A command line that replays the run's operation stream.
    pub replay: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "TORTURE FAILURE: source {}, seed {}: {}",
            self.source, self.seed, self.message
        )?;
        writeln!(f, "replay: {}", self.replay)?;
        if !self.slot_trace.is_empty() {
            writeln!(f, "operations on the slot (oldest first):")?;
            for l in &self.slot_trace {
                writeln!(f, "  {l}")?;
            }
        }
        writeln!(f, "last operations of the run (oldest first):")?;
        for l in &self.run_trace {
            writeln!(f, "  {l}")?;
        }
        Ok(())
    }
}

/// Why a run did not produce a [`Report`].
#[derive(Debug)]
pub enum RunError {
    /// The source is not available here (no userfaultfd, no hooks, no module).
    Setup(String),
    /// The run found a stale pin or an imbalance.
    Failed(Box<Failure>),
}

impl fmt::Display for RunError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunError::Setup(s) => write!(f, "cannot set up: {s}"),
            RunError::Failed(x) => x.fmt(f),
        }
    }
}

impl std::error::Error for RunError {}

/// What a green run did.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Operations attempted (including those that found nothing to do).
    pub ops: u64,
    /// Per operation: (done, failed syscall, nothing to do).
    pub per_op: BTreeMap<OpKind, (u64, u64, u64)>,
    /// Pins that succeeded and were checked.
    pub pins_checked: u64,
    /// Pages compared.
    pub pages_checked: u64,
    /// Whether page frames were compared (root) or only tags.
    pub frames_checked: bool,
    /// Pins refused by a source (`Uncovered` / `Watch`).
    pub refused: u64,
    /// Other pin errors, by kind.
    pub pin_errors: BTreeMap<&'static str, u64>,
    /// `Stats::invalidations` of the manager.
    pub invalidations: u64,
    /// `Stats::invalidate_all` of the manager.
    pub invalidate_all: u64,
    /// Entries invalidated, summed over devices.
    pub invalidated_entries: u64,
    /// Registrations, summed over devices.
    pub registrations: u64,
    /// Cache hits, summed over devices.
    pub hits: u64,
    /// Invalidations the planted bug dropped.
    pub dropped: u64,
    /// `Manager::invalidate` calls made by the driver (manual source).
    pub manual_invalidations: u64,
    /// RDMA WRITEs whose bytes were compared with the pages' tags (0 without `rdma`).
    pub rdma_writes: u64,
    /// Time spent per operation kind, in microseconds (all workers together).
    pub micros: BTreeMap<OpKind, u64>,
    /// Frames replaced by a COW break after a fork, not invalidated, excused (see
    /// `Ctx::cow_excused`; never excused with the kernel module).
    pub cow_frames: u64,
    /// The operations the run used.
    pub op_set: Vec<OpKind>,
    /// Source-specific counters, in words.
    pub source_stats: String,
    /// Resident set growth over the run, in KiB.
    pub rss_growth_kib: i64,
    /// Wall time.
    pub elapsed: Duration,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "ops {} in {:.1?}; pins checked {} ({} pages, frames {}), refused {}, other pin errors {:?}",
            self.ops,
            self.elapsed,
            self.pins_checked,
            self.pages_checked,
            if self.frames_checked { "compared" } else { "not readable (not root): tags only" },
            self.refused,
            self.pin_errors
        )?;
        writeln!(
            f,
            "invalidations {} (entries {}, invalidate_all {}), registrations {}, hits {}, manual invalidate calls {}, dropped by plant {}, COW frames after fork excused {}; {}; RSS growth {} KiB",
            self.invalidations,
            self.invalidated_entries,
            self.invalidate_all,
            self.registrations,
            self.hits,
            self.manual_invalidations,
            self.dropped,
            self.cow_frames,
            self.source_stats,
            self.rss_growth_kib
        )?;
        if self.rdma_writes > 0 {
            writeln!(f, "RDMA WRITEs checked on the wire: {}", self.rdma_writes)?;
        }
        let ops: Vec<String> = self
            .per_op
            .iter()
            .map(|(k, (d, e, s))| {
                let mut t = format!("{k} {d}");
                if *e > 0 {
                    t += &format!(" (failed {e})");
                }
                if *s > 0 {
                    t += &format!(" (nothing to do {s})");
                }
                if let Some(us) = self.micros.get(k) {
                    t += &format!(" [{} ms]", us / 1000);
                }
                t
            })
            .collect();
        write!(f, "per operation: {}", ops.join(", "))
    }
}

// ---- the model -------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Anon,
    Memfd { file: u32, off: u32 },
    Shm { base: u8 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Page {
    Unmapped,
    Mapped { kind: Kind, gen: u64 },
}

struct Slot {
    index: usize,
    base: usize,
    pages: [Page; SLOT_PAGES],
    files: Vec<(u32, OwnedFd)>,
    next_file: u32,
    trace: VecDeque<String>,
}

impl Slot {
    fn addr(&self, i: usize) -> usize {
        self.base + i * umm::page_size()
    }

    fn range(&self, a: usize, b: usize) -> Range {
        Range::new(self.addr(a), (b - a) * umm::page_size()).expect("slot ranges are valid")
    }

    fn kind(&self, i: usize) -> Option<Kind> {
        match self.pages[i] {
            Page::Mapped { kind, .. } => Some(kind),
            Page::Unmapped => None,
        }
    }

    fn set_unmapped(&mut self, a: usize, b: usize) {
        for p in &mut self.pages[a..b] {
            *p = Page::Unmapped;
        }
    }

    /// Closes the memfds no page maps any more (the mappings keep their files alive).
    fn forget_files(&mut self) {
        let pages = self.pages;
        self.files.retain(|(id, _)| {
            pages.iter().any(
                |p| matches!(p, Page::Mapped { kind: Kind::Memfd { file, .. }, .. } if file == id),
            )
        });
    }

    fn fd(&self, file: u32) -> Option<i32> {
        self.files
            .iter()
            .find(|(id, _)| *id == file)
            .map(|(_, fd)| fd.as_raw_fd())
    }

    /// A random span `[a, b)` of 1..=MAX_RUN pages.
    fn span(&self, rng: &mut Rng) -> (usize, usize) {
        let a = rng.below(SLOT_PAGES);
        let n = 1 + rng.below(MAX_RUN.min(SLOT_PAGES - a));
        (a, a + n)
    }

    /// A random run of consecutive pages accepted by `ok` (which sees the page before it
    /// too, to require continuity), at most `max` long.
    fn run(
        &self,
        rng: &mut Rng,
        max: usize,
        first: impl Fn(&Kind) -> bool,
        next: impl Fn(&Kind, &Kind) -> bool,
    ) -> Option<(usize, usize)> {
        let starts: Vec<usize> = (0..SLOT_PAGES)
            .filter(|&i| self.kind(i).is_some_and(|k| first(&k)))
            .collect();
        if starts.is_empty() {
            return None;
        }
        let a = starts[rng.below(starts.len())];
        let want = 1 + rng.below(max);
        let mut b = a + 1;
        while b < SLOT_PAGES && b - a < want {
            match (self.kind(b - 1), self.kind(b)) {
                (Some(p), Some(k)) if next(&p, &k) => b += 1,
                _ => break,
            }
        }
        Some((a, b))
    }

    /// A run of pages that `mremap` can move as one piece of one file/anonymous memory.
    fn movable_run(&self, rng: &mut Rng, anon_only: bool) -> Option<(usize, usize)> {
        self.run(
            rng,
            MAX_RUN,
            |k| matches!(k, Kind::Anon) || (!anon_only && matches!(k, Kind::Memfd { .. })),
            |p, k| match (p, k) {
                (Kind::Anon, Kind::Anon) => true,
                (Kind::Memfd { file: f, off: o }, Kind::Memfd { file: g, off: q }) => {
                    f == g && o + 1 == *q
                }
                _ => false,
            },
        )
    }

    /// A target for moving `n` pages from `a` that does not overlap the source.
    fn target(&self, rng: &mut Rng, a: usize, n: usize) -> Option<usize> {
        let c: Vec<usize> = (0..=SLOT_PAGES - n)
            .filter(|&t| t + n <= a || t >= a + n)
            .collect();
        (!c.is_empty()).then(|| c[rng.below(c.len())])
    }
}

// ---- planted bugs ----------------------------------------------------------------------

/// Counts invalidations and drops every Nth (the planted bug).
struct Dropper {
    every: Option<u64>,
    seen: AtomicU64,
    dropped: AtomicU64,
}

impl Dropper {
    /// True when this invalidation must be dropped.
    fn drop_this(&self) -> bool {
        let Some(every) = self.every else {
            return false;
        };
        let n = self.seen.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_multiple_of(every) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            true
        } else {
            false
        }
    }
}

/// A source wrapper whose drain loses every Nth range.
struct PlantedSource {
    inner: Arc<dyn NotifierSource>,
    dropper: Arc<Dropper>,
}

struct DroppingSink<'a> {
    sink: &'a dyn InvalidationSink,
    dropper: &'a Dropper,
}

impl InvalidationSink for DroppingSink<'_> {
    fn invalidate(&self, range: Range) {
        if !self.dropper.drop_this() {
            self.sink.invalidate(range);
        }
    }
    fn invalidate_all(&self) {
        self.sink.invalidate_all();
    }
}

impl NotifierSource for PlantedSource {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn attach(&self, m: ManagerId) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        self.inner.attach(m)
    }
    fn detach(&self, m: ManagerId) {
        self.inner.detach(m)
    }
    fn watch(
        &self,
        cookie: u64,
        range: Range,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        self.inner.watch(cookie, range)
    }
    fn unwatch(&self, cookie: u64, range: Range) {
        self.inner.unwatch(cookie, range)
    }
    fn generation(&self) -> Option<&AtomicU64> {
        self.inner.generation()
    }
    fn drain(&self, sink: &dyn InvalidationSink) {
        self.inner.drain(&DroppingSink {
            sink,
            dropper: &self.dropper,
        })
    }
}

/// The interposition hooks' sink with the planted bug: the manager, reached weakly.
struct DroppingHook {
    manager: std::sync::Weak<Manager>,
    dropper: Arc<Dropper>,
}

impl umm_interpose::HookSink for DroppingHook {
    fn invalidate_from_hook(&self, range: Range) {
        if self.dropper.drop_this() {
            return;
        }
        if let Some(m) = self.manager.upgrade() {
            m.invalidate_deferred(range);
        }
    }
}

// ---- the run ---------------------------------------------------------------------------

struct Counters {
    done: Vec<AtomicU64>,
    failed: Vec<AtomicU64>,
    idle: Vec<AtomicU64>,
}

/// Shared by the workers of one run.
struct Ctx<'m> {
    opts: &'m Options,
    manager: &'m Manager,
    nic: Device<PfnBackend>,
    gpu: Device<PfnBackend>,
    pagemap: Option<Arc<File>>,
    slots: Vec<Mutex<Slot>>,
    heap: Vec<Mutex<Option<(usize, usize)>>>,
    table: Vec<(OpKind, u32)>,
    total_weight: u32,
    manual: bool,
    dropper: Arc<Dropper>,
    gen: AtomicU64,
    seq: AtomicU64,
    ops_done: AtomicU64,
    stop: AtomicBool,
    deadline: Option<Instant>,
    fork_lock: RwLock<()>,
    failure: Mutex<Option<Failure>>,
    recent: Mutex<VecDeque<String>>,
    counters: Counters,
    pins_checked: AtomicU64,
    pages_checked: AtomicU64,
    refused: AtomicU64,
    pin_errors: Mutex<BTreeMap<&'static str, u64>>,
    manual_calls: AtomicU64,
    forks: Arc<AtomicU64>,
    /// Whether a frame replaced by a COW break after a fork must have been invalidated
    /// (the source sees COW breaks: the kernel module).
    cow_caught: bool,
    cow_frames: AtomicU64,
    micros: Vec<AtomicU64>,
    rdma: Option<Wire>,
    rdma_writes: AtomicU64,
}

/// The RDMA end-to-end check: `rxe0` attached to the manager, a peer buffer on `rxe1`.
struct Wire {
    dev: Device<umm_rdma::RdmaBackend>,
    link: Mutex<Link>,
}

struct Link {
    qp: umm_rdma::transport::RcQp,
    _peer_qp: umm_rdma::transport::RcQp,
    peer_backend: umm_rdma::RdmaBackend,
    peer_mr: Option<umm_rdma::MrTranslation>,
    peer_buf: usize,
    peer_len: usize,
}

impl Link {
    fn open(
        manager: &Manager,
    ) -> Result<(Device<umm_rdma::RdmaBackend>, Link), Box<dyn std::error::Error>> {
        use umm::Backend;
        use umm_rdma::{Access, DeviceSelector, RdmaBackend, RdmaDevice};
        let rxe0 = RdmaDevice::open(&DeviceSelector::Name("rxe0".into()))?;
        let rxe1 = RdmaDevice::open(&DeviceSelector::Name("rxe1".into()))?;
        let dev = manager.attach(RdmaBackend::new(rxe0.clone(), Access::LOCAL_READ))?;
        let (qp, peer_qp) = umm_rdma::transport::connect_pair(&rxe0, &rxe1, 0)?;
        let peer_len = MAX_RUN * umm::page_size();
        // SAFETY: a fresh private mapping for the peer's buffer, unmapped in Drop.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                peer_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error().into());
        }
        let peer_backend = RdmaBackend::new(rxe1, Access::REMOTE_RW);
        let range = Range::new(p as usize, peer_len)?;
        let peer_mr = match peer_backend.register(range) {
            Ok(mr) => mr,
            Err(e) => {
                // SAFETY: our mapping from above.
                unsafe { libc::munmap(p, peer_len) };
                return Err(e.into());
            }
        };
        Ok((
            dev,
            Link {
                qp,
                _peer_qp: peer_qp,
                peer_backend,
                peer_mr: Some(peer_mr),
                peer_buf: p as usize,
                peer_len,
            },
        ))
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        use umm::Backend;
        if let Some(mr) = self.peer_mr.take() {
            let range = Range::new(self.peer_buf, self.peer_len).expect("valid");
            let _ = self.peer_backend.deregister(range, mr);
        }
        // SAFETY: the peer buffer mapped in `open`; its MR is gone.
        unsafe { libc::munmap(self.peer_buf as *mut libc::c_void, self.peer_len) };
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Result of one mutation: done, the syscall failed (model updated to what the kernel
/// did), or nothing suitable in the slot.
enum Outcome {
    Done(String),
    Failed(String),
    Idle,
}

impl<'m> Ctx<'m> {
    fn page(&self) -> usize {
        umm::page_size()
    }

    fn replay(&self) -> String {
        let o = self.opts;
        let mut s = format!(
            "umm-torture --source {} --seed {} --threads 1 --ops {} --slots {}",
            o.source, o.seed, o.ops, o.slots
        );
        if o.rdma {
            s += " --rdma";
        }
        if let Some(n) = o.drop_every {
            s += &format!(" --plant drop-every={n}");
        }
        if let Some(set) = &o.op_set {
            let names: Vec<&str> = set.iter().map(|k| k.name()).collect();
            s += &format!(" --op-set {}", names.join(","));
        }
        s
    }

    fn trace(&self, slot: Option<&mut Slot>, line: String) {
        if let Some(s) = slot {
            if s.trace.len() == SLOT_TRACE {
                s.trace.pop_front();
            }
            s.trace.push_back(line.clone());
        }
        let mut r = lock(&self.recent);
        if r.len() == RUN_TRACE {
            r.pop_front();
        }
        r.push_back(line);
    }

    fn fail(&self, slot: Option<&Slot>, message: String) {
        self.stop.store(true, Ordering::SeqCst);
        let mut f = lock(&self.failure);
        if f.is_none() {
            *f = Some(Failure {
                source: self.opts.source,
                seed: self.opts.seed,
                message,
                slot_trace: slot
                    .map(|s| s.trace.iter().cloned().collect())
                    .unwrap_or_default(),
                run_trace: lock(&self.recent).iter().cloned().collect(),
                replay: self.replay(),
            });
        }
    }

    /// The manual source: tell the manager before changing `ranges`.
    fn before(&self, ranges: &[Range]) {
        if !self.manual {
            return;
        }
        for &r in ranges {
            if !self.dropper.drop_this() {
                self.manual_calls.fetch_add(1, Ordering::Relaxed);
                self.manager.invalidate(r);
            }
        }
    }

    /// A frame changed under an unchanged tag after a fork made since the registration:
    /// the kernel copied a private page on a write (COW). A pinning backend keeps its
    /// frames (the kernel copies pinned pages for the child at fork time); the recorder
    /// cannot, so this is counted, not failed, unless the source claims to see COW breaks.
    fn cow_excused(&self, forks_at_register: u64) -> bool {
        if self.cow_caught || forks_at_register == self.forks.load(Ordering::SeqCst) {
            return false;
        }
        self.cow_frames.fetch_add(1, Ordering::Relaxed);
        true
    }

    fn next_gen(&self) -> u64 {
        self.gen.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Writes a fresh tag into page `i` (mapped read-write) and records `kind` for it.
    fn retag(&self, s: &mut Slot, i: usize, kind: Kind) {
        let gen = self.next_gen();
        let addr = s.addr(i);
        // SAFETY: the model says page `i` of this slot is mapped read-write by us, and we
        // hold the slot's lock, so nothing else changes or reads it concurrently.
        unsafe { std::ptr::write_volatile(addr as *mut [u64; 2], [gen, addr as u64]) };
        s.pages[i] = Page::Mapped { kind, gen };
    }

    fn retag_run(&self, s: &mut Slot, a: usize, b: usize) {
        for i in a..b {
            if let Some(k) = s.kind(i) {
                self.retag(s, i, k);
            }
        }
    }

    fn pick(&self, rng: &mut Rng) -> OpKind {
        let mut x = rng.below(self.total_weight as usize) as u32;
        for &(k, w) in &self.table {
            if x < w {
                return k;
            }
            x -= w;
        }
        OpKind::Pin
    }

    fn worker(&self, tid: usize) {
        let mut rng = Rng::new(self.opts.seed, tid as u64);
        let mut held: Vec<Pin<'_>> = Vec::new();
        loop {
            if self.stop.load(Ordering::Relaxed)
                || self.ops_done.fetch_add(1, Ordering::Relaxed) >= self.opts.ops
                || self.deadline.is_some_and(|d| Instant::now() >= d)
            {
                break;
            }
            let op = self.pick(&mut rng);
            let _fork_guard;
            let _shared_guard;
            if matches!(op, OpKind::Fork | OpKind::ForkCow) {
                // Nothing else runs while a child shares our pages: a write elsewhere
                // would break COW (new frames) with no mapping change to report, which a
                // real (pinning) backend prevents and the recorder cannot.
                _fork_guard = self.fork_lock.write().unwrap_or_else(|e| e.into_inner());
            } else {
                _shared_guard = self.fork_lock.read().unwrap_or_else(|e| e.into_inner());
            }
            self.step(tid, op, &mut rng, &mut held);
            if !held.is_empty() && rng.one_in(3) {
                let i = rng.below(held.len());
                held.swap_remove(i);
            }
        }
        drop(held);
    }

    fn count(&self, op: OpKind, o: &Outcome) {
        let c = match o {
            Outcome::Done(_) => &self.counters.done,
            Outcome::Failed(_) => &self.counters.failed,
            Outcome::Idle => &self.counters.idle,
        };
        c[op.index()].fetch_add(1, Ordering::Relaxed);
    }

    fn step(&self, tid: usize, op: OpKind, rng: &mut Rng, held: &mut Vec<Pin<'m>>) {
        let t0 = Instant::now();
        self.step_inner(tid, op, rng, held);
        self.micros[op.index()].fetch_add(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
    }

    fn step_inner(&self, tid: usize, op: OpKind, rng: &mut Rng, held: &mut Vec<Pin<'m>>) {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        match op {
            OpKind::HeapMalloc | OpKind::HeapFree | OpKind::HeapPin => {
                let h = rng.below(self.heap.len());
                let mut block = lock(&self.heap[h]);
                let o = self.heap_op(op, &mut block, rng);
                self.count(op, &o);
                if let Outcome::Done(d) | Outcome::Failed(d) = o {
                    self.trace(None, format!("#{seq} t{tid} heap{h} {op} {d}"));
                }
            }
            OpKind::MallocTrim => {
                // SAFETY: malloc_trim only returns free heap memory to the kernel.
                let r = unsafe { libc::malloc_trim(0) };
                self.count(op, &Outcome::Done(String::new()));
                self.trace(None, format!("#{seq} t{tid} {op} -> {r}"));
            }
            _ => {
                let si = rng.below(self.slots.len());
                let mut slot = lock(&self.slots[si]);
                let o = if op == OpKind::Pin {
                    self.pin_op(&mut slot, rng, held, seq, tid)
                } else {
                    let o = self.mutate(op, &mut slot, rng);
                    slot.forget_files();
                    o
                };
                self.count(op, &o);
                if let Outcome::Done(d) | Outcome::Failed(d) = &o {
                    if op != OpKind::Pin {
                        self.trace(Some(&mut slot), format!("#{seq} t{tid} s{si} {op} {d}"));
                    }
                }
            }
        }
    }

    fn devices(&self, rng: &mut Rng) -> (Vec<umm::DeviceId>, &'static str) {
        if let Some(w) = &self.rdma {
            if rng.one_in(4) {
                return if rng.one_in(2) {
                    (vec![w.dev.id()], "rxe0")
                } else {
                    (
                        vec![w.dev.id(), self.nic.id(), self.gpu.id()],
                        "rxe0+nic+gpu",
                    )
                };
            }
        }
        match rng.below(4) {
            0 => (vec![self.nic.id()], "nic"),
            1 => (vec![self.gpu.id()], "gpu"),
            _ => (vec![self.nic.id(), self.gpu.id()], "nic+gpu"),
        }
    }

    /// RDMA WRITE of the pinned pages through the pin's `rxe0` translation to the peer;
    /// the bytes that arrive must be the pages' current tags.
    fn check_wire(&self, s: &Slot, pin: &Pin<'_>, a: usize, b: usize) -> Result<(), String> {
        let Some(w) = &self.rdma else {
            return Ok(());
        };
        let Some(mr) = pin.translation(w.dev) else {
            return Ok(());
        };
        let page = self.page();
        let mut link = lock(&w.link);
        let link = &mut *link;
        let Some(peer_mr) = &link.peer_mr else {
            return Ok(());
        };
        // SAFETY: the peer buffer is ours and no reference to it is alive; clearing it
        // makes bytes that did not arrive show as zeros.
        unsafe { std::ptr::write_bytes(link.peer_buf as *mut u8, 0, link.peer_len) };
        let len = ((b - a) * page) as u32;
        let local = umm_rdma::transport::Local::new(mr, s.addr(a), len);
        let remote = umm_rdma::transport::Remote::new(peer_mr, link.peer_buf);
        link.qp
            .write(local, remote)
            .map_err(|e| format!("RDMA WRITE through rxe0 failed: {e}"))?;
        for i in a..b {
            let Page::Mapped { gen, .. } = s.pages[i] else {
                continue;
            };
            let at = link.peer_buf + (i - a) * page;
            // SAFETY: inside the peer buffer, which the completed WRITE filled.
            let got = unsafe { std::ptr::read_volatile(at as *const [u64; 2]) };
            if got != [gen, s.addr(i) as u64] {
                return Err(format!(
                    "STALE on rxe0: RDMA WRITE through MR {:#x}+{} (lkey {:#x}) delivered gen {} addr {:#x} for page {i}, \
                     the page holds gen {gen}: the MR pins frames that are no longer mapped there",
                    mr.addr, mr.len, mr.lkey, got[0], got[1]
                ));
            }
        }
        self.rdma_writes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn pin_error(&self, e: &umm::Error) {
        let name = match e {
            umm::Error::Uncovered { .. } | umm::Error::Watch { .. } => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                return;
            }
            umm::Error::Unmapped { .. } => "Unmapped",
            umm::Error::DeviceRangeBusy { .. } => "DeviceRangeBusy",
            umm::Error::Unstable { .. } => "Unstable",
            umm::Error::Backend { .. } => "Backend",
            umm::Error::MemlockLimit { .. } => "MemlockLimit",
            umm::Error::TooLarge { .. } => "TooLarge",
            _ => "other",
        };
        *lock(&self.pin_errors).entry(name).or_default() += 1;
    }

    fn pin_op(
        &self,
        s: &mut Slot,
        rng: &mut Rng,
        held: &mut Vec<Pin<'m>>,
        seq: u64,
        tid: usize,
    ) -> Outcome {
        let Some((a, b)) = s.run(rng, MAX_RUN, |_| true, |_, _| true) else {
            return Outcome::Idle;
        };
        let range = s.range(a, b);
        let (devs, names) = self.devices(rng);
        let pin = match self.manager.pin(range, &devs) {
            Ok(p) => p,
            Err(e) => {
                self.pin_error(&e);
                let line = format!(
                    "#{seq} t{tid} s{} pin [{a},{b}) {names} -> refused: {e}",
                    s.index
                );
                self.trace(Some(s), line);
                return Outcome::Failed(String::new());
            }
        };
        let mut line = format!("#{seq} t{tid} s{} pin [{a},{b}) {names} ->", s.index);
        if let Some(t) = self.rdma.as_ref().and_then(|w| pin.translation(w.dev)) {
            line += &format!(" rxe0 lkey {:#x}", t.lkey);
        }
        for (dev, name) in [(self.nic, "nic"), (self.gpu, "gpu")] {
            if let Some(t) = pin.translation(dev) {
                line += &format!(" {name}#{}", t.recorded.id);
            }
        }
        self.trace(Some(s), line);
        if let Err(msg) = self
            .check(s, &pin, a, b)
            .and_then(|_| self.check_wire(s, &pin, a, b))
        {
            self.fail(
                Some(s),
                format!("pin of slot {} pages [{a},{b}) ({range}): {msg}", s.index),
            );
            return Outcome::Done(String::new());
        }
        self.pins_checked.fetch_add(1, Ordering::Relaxed);
        if devs.len() == 1 && devs[0] == self.nic.id() && held.len() < 3 && rng.one_in(3) {
            held.push(pin);
        }
        Outcome::Done(String::new())
    }

    /// Every pinned page: the registration's tag is the page's tag now, its frame the frame
    /// mapped now, and the memory holds what the model says.
    fn check(&self, s: &Slot, pin: &Pin<'_>, a: usize, b: usize) -> Result<(), String> {
        let page = self.page();
        for (dev, name) in [(self.nic, "nic"), (self.gpu, "gpu")] {
            let Some(t) = pin.translation(dev) else {
                continue;
            };
            let reg = t.recorded.range;
            for i in a..b {
                let addr = s.addr(i);
                let Page::Mapped { gen, .. } = s.pages[i] else {
                    return Err(format!("page {i} is not mapped in the model"));
                };
                let want = Tag {
                    gen,
                    addr: addr as u64,
                };
                // SAFETY: page `i` is mapped (model) and the slot lock is held.
                let now = unsafe { std::ptr::read_volatile(addr as *const [u64; 2]) };
                if now != [want.gen, want.addr] {
                    return Err(format!(
                        "driver model out of sync: page {i} holds gen {} addr {:#x}, model says gen {gen}",
                        now[0], now[1]
                    ));
                }
                if addr < reg.start() || addr + page > reg.end() {
                    return Err(format!("{name} registration {reg} does not cover page {i}"));
                }
                let rec = t.pages[(addr - reg.start()) / page];
                if rec.tag != want {
                    return Err(format!(
                        "STALE on {name}: registration #{} of {reg} saw gen {} at page {i} ({addr:#x}), \
                         the page now holds gen {gen}: a mapping change since it was registered was not invalidated",
                        t.recorded.id, rec.tag.gen
                    ));
                }
                if let Some(pm) = &self.pagemap {
                    let cur = frames::pfn(pm, addr);
                    if rec.pfn != 0 && cur != 0 && rec.pfn != cur {
                        if self.cow_excused(t.forks) {
                            continue;
                        }
                        return Err(format!(
                            "STALE on {name}: registration #{} of {reg} recorded frame {:#x} at page {i} ({addr:#x}), \
                             frame {cur:#x} is mapped now (same tag: the kernel replaced the frame)",
                            t.recorded.id, rec.pfn
                        ));
                    }
                }
                self.pages_checked.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    fn heap_op(&self, op: OpKind, block: &mut Option<(usize, usize)>, rng: &mut Rng) -> Outcome {
        let page = self.page();
        let interior = |p: usize, len: usize| {
            let a = (p + page - 1) & !(page - 1);
            let b = (p + len) & !(page - 1);
            (a, b)
        };
        match (op, *block) {
            (OpKind::HeapMalloc, None) => {
                let len = if rng.one_in(2) { 64 << 10 } else { 512 << 10 } + rng.below(3) * page;
                // SAFETY: plain malloc; the block is freed by HeapFree or at the end.
                let p = unsafe { libc::malloc(len) } as usize;
                if p == 0 {
                    return Outcome::Failed(format!("malloc({len}) failed"));
                }
                let (a, b) = interior(p, len);
                let mut q = a;
                while q < b {
                    let gen = self.next_gen();
                    // SAFETY: inside the block we just allocated and own.
                    unsafe { std::ptr::write_volatile(q as *mut [u64; 2], [gen, q as u64]) };
                    q += page;
                }
                *block = Some((p, len));
                Outcome::Done(format!("{len} B at {p:#x}"))
            }
            (OpKind::HeapFree, Some((p, len))) => {
                let (a, b) = interior(p, len);
                if let Ok(r) = Range::from_bounds(a, b) {
                    self.before(&[r]);
                }
                // SAFETY: `p` came from malloc and is freed once (the slot is cleared).
                unsafe { libc::free(p as *mut libc::c_void) };
                *block = None;
                Outcome::Done(format!("{len} B at {p:#x}"))
            }
            (OpKind::HeapPin, Some((p, len))) => {
                let (a, b) = interior(p, len);
                let n = (b - a) / page;
                let first = rng.below(n);
                let k = 1 + rng.below(MAX_RUN.min(n - first));
                let Ok(range) = Range::new(a + first * page, k * page) else {
                    return Outcome::Idle;
                };
                match self.manager.pin(range, &[self.nic.id()]) {
                    Ok(pin) => {
                        if let (Some(t), Some(pm)) = (pin.translation(self.nic), &self.pagemap) {
                            let reg = t.recorded.range;
                            for i in 0..k {
                                let addr = range.start() + i * page;
                                let rec = t.pages[(addr - reg.start()) / page];
                                let cur = frames::pfn(pm, addr);
                                if rec.pfn != 0 && cur != 0 && rec.pfn != cur {
                                    if self.cow_excused(t.forks) {
                                        continue;
                                    }
                                    self.fail(
                                        None,
                                        format!(
                                            "STALE heap pin {range} (block {p:#x}+{len}): registration #{} of {reg} \
                                             recorded frame {:#x} at {addr:#x}, frame {cur:#x} is mapped now",
                                            t.recorded.id, rec.pfn
                                        ),
                                    );
                                    return Outcome::Done(String::new());
                                }
                                self.pages_checked.fetch_add(1, Ordering::Relaxed);
                            }
                            self.pins_checked.fetch_add(1, Ordering::Relaxed);
                        }
                        Outcome::Done(format!("{range} in block {p:#x}"))
                    }
                    Err(e) => {
                        self.pin_error(&e);
                        Outcome::Failed(format!("{range}: {e}"))
                    }
                }
            }
            _ => Outcome::Idle,
        }
    }

    fn map_fixed(&self, addr: usize, len: usize, flags: i32, fd: i32) -> bool {
        // SAFETY: MAP_FIXED inside the driver's reserved pool, whose pages only the holder
        // of the slot lock touches; the model is updated by the caller.
        let p = unsafe {
            libc::mmap(
                addr as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags | libc::MAP_FIXED,
                fd,
                0,
            )
        };
        p as usize == addr
    }

    fn munmap(&self, s: &mut Slot, a: usize, b: usize) -> bool {
        // SAFETY: unmaps pages of the driver's pool (slot lock held).
        let rc = unsafe { libc::munmap(s.addr(a) as *mut libc::c_void, (b - a) * self.page()) };
        s.set_unmapped(a, b);
        rc == 0
    }

    fn new_memfd(&self, s: &mut Slot) -> Option<(u32, i32)> {
        // SAFETY: creates a new descriptor (owned below).
        let fd = unsafe { libc::memfd_create(c"umm-torture".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return None;
        }
        // SAFETY: `fd` is a fresh descriptor we own.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sizes the memfd we own.
        if unsafe { libc::ftruncate(fd, (FILE_PAGES * self.page()) as libc::off_t) } != 0 {
            return None;
        }
        let id = s.next_file;
        s.next_file += 1;
        s.files.push((id, owned));
        Some((id, fd))
    }

    fn new_shm(&self, len: usize) -> Option<i32> {
        // SAFETY: creates a private SysV segment; removed right after attaching.
        let id = unsafe { libc::shmget(libc::IPC_PRIVATE, len, libc::IPC_CREAT | 0o600) };
        (id >= 0).then_some(id)
    }

    fn attach_shm(&self, s: &mut Slot, a: usize, b: usize, remap: bool) -> Outcome {
        let Some(id) = self.new_shm((b - a) * self.page()) else {
            return Outcome::Failed(format!("shmget errno {}", errno()));
        };
        let flags = if remap { libc::SHM_REMAP } else { 0 };
        // SAFETY: attaches the new segment at a page of the pool (slot lock held);
        // SHM_REMAP replaces what the model says is mapped there.
        let p = unsafe { libc::shmat(id, s.addr(a) as *const libc::c_void, flags) };
        let e = errno();
        // SAFETY: marks the segment for removal; it lives until its last detach.
        unsafe { libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut()) };
        if p as usize != s.addr(a) {
            return Outcome::Failed(format!("[{a},{b}) shmat errno {e}"));
        }
        for i in a..b {
            self.retag(s, i, Kind::Shm { base: a as u8 });
        }
        Outcome::Done(format!("[{a},{b}) segment {id}"))
    }

    /// After a failed `mremap` the kernel may have done part of the work (since Linux 6.17
    /// a move spanning several VMAs moves them one by one and stops at the first error):
    /// probe each page of `[a, b)` and make the model match what is there.
    fn reconcile(&self, s: &mut Slot, a: usize, b: usize) -> Vec<usize> {
        let mut changed = Vec::new();
        for i in a..b {
            let Page::Mapped { kind, gen } = s.pages[i] else {
                continue;
            };
            let addr = s.addr(i);
            match frames::read_tag(addr) {
                None => {
                    s.pages[i] = Page::Unmapped;
                    changed.push(i);
                }
                Some(t) if t.gen == gen && t.addr == addr as u64 => {}
                Some(_) => {
                    self.retag(s, i, kind);
                    changed.push(i);
                }
            }
        }
        changed
    }

    fn mutate(&self, op: OpKind, s: &mut Slot, rng: &mut Rng) -> Outcome {
        let page = self.page();
        match op {
            OpKind::Munmap => {
                let (a, b) = s.span(rng);
                self.before(&[s.range(a, b)]);
                let ok = self.munmap(s, a, b);
                done(ok, format!("[{a},{b})"))
            }
            OpKind::MapAnon => {
                let (a, b) = s.span(rng);
                self.before(&[s.range(a, b)]);
                let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
                if !self.map_fixed(s.addr(a), (b - a) * page, flags, -1) {
                    let e = errno();
                    self.munmap(s, a, b);
                    return Outcome::Failed(format!("[{a},{b}) errno {e}"));
                }
                for i in a..b {
                    self.retag(s, i, Kind::Anon);
                }
                Outcome::Done(format!("[{a},{b})"))
            }
            OpKind::MapMemfd => {
                let (a, b) = s.span(rng);
                let Some((file, fd)) = self.new_memfd(s) else {
                    return Outcome::Failed(format!("memfd errno {}", errno()));
                };
                self.before(&[s.range(a, b)]);
                if !self.map_fixed(s.addr(a), (b - a) * page, libc::MAP_SHARED, fd) {
                    let e = errno();
                    self.munmap(s, a, b);
                    return Outcome::Failed(format!("[{a},{b}) errno {e}"));
                }
                for i in a..b {
                    let off = (i - a) as u32;
                    self.retag(s, i, Kind::Memfd { file, off });
                }
                Outcome::Done(format!("[{a},{b}) file {file}"))
            }
            OpKind::MremapMove | OpKind::MremapDontunmap => {
                let dontunmap = op == OpKind::MremapDontunmap;
                let Some((a, b)) = s.movable_run(rng, dontunmap) else {
                    return Outcome::Idle;
                };
                let n = b - a;
                let Some(t) = s.target(rng, a, n) else {
                    return Outcome::Idle;
                };
                self.before(&[s.range(a, b), s.range(t, t + n)]);
                let mut flags = libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED;
                if dontunmap {
                    flags |= libc::MREMAP_DONTUNMAP;
                }
                // SAFETY: moves pool pages to other pool pages (slot lock held); the model
                // follows below whatever the outcome.
                let p = unsafe {
                    libc::mremap(
                        s.addr(a) as *mut libc::c_void,
                        n * page,
                        n * page,
                        flags,
                        s.addr(t) as *mut libc::c_void,
                    )
                };
                if p as usize != s.addr(t) {
                    // MREMAP_FIXED may have unmapped the target before failing.
                    let e = errno();
                    self.munmap(s, t, t + n);
                    let changed = self.reconcile(s, a, b);
                    return Outcome::Failed(format!(
                        "[{a},{b}) -> {t} errno {e} (target unmapped; source pages changed anyway: {changed:?})"
                    ));
                }
                let kinds: Vec<Kind> = (a..b).filter_map(|i| s.kind(i)).collect();
                if dontunmap {
                    // The source keeps its mapping, emptied: new pages on the next touch.
                    for i in a..b {
                        self.retag(s, i, Kind::Anon);
                    }
                } else {
                    s.set_unmapped(a, b);
                }
                for (j, k) in kinds.into_iter().enumerate() {
                    self.retag(s, t + j, k);
                }
                Outcome::Done(format!("[{a},{b}) -> {t}"))
            }
            OpKind::MremapGrow => {
                let Some((a, b)) = s.movable_run(rng, false) else {
                    return Outcome::Idle;
                };
                if b >= SLOT_PAGES {
                    return Outcome::Idle;
                }
                let mut k = 1 + rng.below(MAX_RUN.min(SLOT_PAGES - b));
                let last = s.kind(b - 1);
                if let Some(Kind::Memfd { file, off }) = last {
                    // Stay inside the file and never map one file page at two addresses.
                    let aliased = |o: u32| {
                        (0..SLOT_PAGES).any(|i| {
                            (i < a || i >= b) && s.kind(i) == Some(Kind::Memfd { file, off: o })
                        })
                    };
                    let mut ok = 0;
                    while ok < k
                        && (off as usize + 1 + ok) < FILE_PAGES
                        && !aliased(off + 1 + ok as u32)
                    {
                        ok += 1;
                    }
                    k = ok;
                }
                if k == 0 {
                    return Outcome::Idle;
                }
                self.before(&[s.range(b, b + k)]);
                self.munmap(s, b, b + k);
                // SAFETY: grows a pool mapping in place into pool pages just unmapped.
                let p = unsafe {
                    libc::mremap(
                        s.addr(a) as *mut libc::c_void,
                        (b - a) * page,
                        (b - a + k) * page,
                        0,
                        std::ptr::null_mut::<libc::c_void>(),
                    )
                };
                if p as usize != s.addr(a) {
                    let e = errno();
                    let changed = self.reconcile(s, a, b);
                    return Outcome::Failed(format!(
                        "[{a},{b}) +{k} errno {e} (changed anyway: {changed:?})"
                    ));
                }
                for j in 0..k {
                    let kind = match last {
                        Some(Kind::Memfd { file, off }) => Kind::Memfd {
                            file,
                            off: off + 1 + j as u32,
                        },
                        _ => Kind::Anon,
                    };
                    self.retag(s, b + j, kind);
                }
                Outcome::Done(format!("[{a},{b}) +{k}"))
            }
            OpKind::MremapShrink => {
                let Some((a, b)) = s.movable_run(rng, false) else {
                    return Outcome::Idle;
                };
                if b - a < 2 {
                    return Outcome::Idle;
                }
                let m = a + 1 + rng.below(b - a - 1);
                self.before(&[s.range(m, b)]);
                // SAFETY: shrinks a pool mapping in place (slot lock held).
                let p = unsafe {
                    libc::mremap(
                        s.addr(a) as *mut libc::c_void,
                        (b - a) * page,
                        (m - a) * page,
                        0,
                        std::ptr::null_mut::<libc::c_void>(),
                    )
                };
                if p as usize != s.addr(a) {
                    let e = errno();
                    self.munmap(s, m, b);
                    let changed = self.reconcile(s, a, m);
                    return Outcome::Failed(format!(
                        "[{a},{b}) -> [{a},{m}) errno {e} (tail unmapped; changed anyway: {changed:?})"
                    ));
                }
                s.set_unmapped(m, b);
                Outcome::Done(format!("[{a},{b}) -> [{a},{m})"))
            }
            OpKind::MadvDontneed | OpKind::MadvFree | OpKind::MadvRemove => {
                let (advice, run) = match op {
                    OpKind::MadvDontneed => (
                        libc::MADV_DONTNEED,
                        s.run(rng, MAX_RUN, |_| true, |_, _| true),
                    ),
                    OpKind::MadvFree => (
                        libc::MADV_FREE,
                        s.run(rng, MAX_RUN, |k| *k == Kind::Anon, |_, k| *k == Kind::Anon),
                    ),
                    _ => {
                        let shared = |k: &Kind| !matches!(k, Kind::Anon);
                        (
                            libc::MADV_REMOVE,
                            s.run(rng, MAX_RUN, shared, |_, k| shared(k)),
                        )
                    }
                };
                let Some((a, b)) = run else {
                    return Outcome::Idle;
                };
                self.before(&[s.range(a, b)]);
                // SAFETY: madvise on mapped pool pages (slot lock held).
                let rc = unsafe {
                    libc::madvise(s.addr(a) as *mut libc::c_void, (b - a) * page, advice)
                };
                let e = errno();
                self.retag_run(s, a, b);
                done(rc == 0, format!("[{a},{b}) rc {rc} errno {e}"))
            }
            OpKind::PunchHole | OpKind::Ftruncate => {
                let files: Vec<(usize, u32, u32)> = (0..SLOT_PAGES)
                    .filter_map(|i| match s.kind(i) {
                        Some(Kind::Memfd { file, off }) => Some((i, file, off)),
                        _ => None,
                    })
                    .collect();
                if files.is_empty() {
                    return Outcome::Idle;
                }
                let (_, file, off) = files[rng.below(files.len())];
                let Some(fd) = s.fd(file) else {
                    return Outcome::Idle;
                };
                let (lo, hi) = if op == OpKind::PunchHole {
                    let lo = off.saturating_sub(rng.below(2) as u32);
                    (lo, (lo + 1 + rng.below(4) as u32).min(FILE_PAGES as u32))
                } else {
                    (off.saturating_sub(rng.below(3) as u32), FILE_PAGES as u32)
                };
                let hit: Vec<usize> = files
                    .iter()
                    .filter(|(_, f, o)| *f == file && (lo..hi).contains(o))
                    .map(|(i, _, _)| *i)
                    .collect();
                let ranges: Vec<Range> = hit.iter().map(|&i| s.range(i, i + 1)).collect();
                self.before(&ranges);
                let rc = if op == OpKind::PunchHole {
                    // SAFETY: punches a hole in a memfd we own.
                    unsafe {
                        libc::fallocate(
                            fd,
                            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                            (lo as usize * page) as libc::off_t,
                            ((hi - lo) as usize * page) as libc::off_t,
                        )
                    }
                } else {
                    // SAFETY: truncates a memfd we own down and back up; its mapped pages
                    // beyond `lo` are zapped and come back empty (no access in between).
                    unsafe {
                        libc::ftruncate(fd, (lo as usize * page) as libc::off_t)
                            | libc::ftruncate(fd, (FILE_PAGES * page) as libc::off_t)
                    }
                };
                let e = errno();
                for i in hit.iter().copied() {
                    if let Some(k) = s.kind(i) {
                        self.retag(s, i, k);
                    }
                }
                done(
                    rc == 0,
                    format!("file {file} pages [{lo},{hi}) -> slot pages {hit:?} errno {e}"),
                )
            }
            OpKind::ShmatHole => {
                let (a, b) = s.span(rng);
                self.before(&[s.range(a, b)]);
                self.munmap(s, a, b);
                self.attach_shm(s, a, b, false)
            }
            OpKind::ShmatRemap => {
                let Some((a, b)) = s.run(rng, MAX_RUN, |_| true, |_, _| true) else {
                    return Outcome::Idle;
                };
                self.before(&[s.range(a, b)]);
                self.attach_shm(s, a, b, true)
            }
            OpKind::Shmdt => {
                let bases: Vec<usize> = (0..SLOT_PAGES)
                    .filter(|&i| s.kind(i) == Some(Kind::Shm { base: i as u8 }))
                    .collect();
                if bases.is_empty() {
                    return Outcome::Idle;
                }
                let base = bases[rng.below(bases.len())];
                let hit: Vec<usize> = (0..SLOT_PAGES)
                    .filter(|&i| s.kind(i) == Some(Kind::Shm { base: base as u8 }))
                    .collect();
                let ranges: Vec<Range> = hit.iter().map(|&i| s.range(i, i + 1)).collect();
                self.before(&ranges);
                // SAFETY: detaches a segment the driver attached in the pool.
                let rc = unsafe { libc::shmdt(s.addr(base) as *const libc::c_void) };
                let e = errno();
                for &i in &hit {
                    s.set_unmapped(i, i + 1);
                }
                done(rc == 0, format!("at {base}: pages {hit:?} errno {e}"))
            }
            OpKind::Fork => self.fork(s, false),
            OpKind::ForkCow => self.fork(s, true),
            OpKind::RawSyscall => self.raw(s, rng),
            _ => Outcome::Idle,
        }
    }

    fn raw(&self, s: &mut Slot, rng: &mut Rng) -> Outcome {
        let page = self.page();
        match rng.below(3) {
            0 => {
                let (a, b) = s.span(rng);
                self.before(&[s.range(a, b)]);
                // SAFETY: raw munmap of pool pages (slot lock held).
                let rc = unsafe { libc::syscall(libc::SYS_munmap, s.addr(a), (b - a) * page) };
                s.set_unmapped(a, b);
                done(rc == 0, format!("munmap [{a},{b})"))
            }
            1 => {
                let (a, b) = s.span(rng);
                self.before(&[s.range(a, b)]);
                // SAFETY: raw MAP_FIXED anonymous mapping over pool pages (slot lock held).
                let p = unsafe {
                    libc::syscall(
                        libc::SYS_mmap,
                        s.addr(a),
                        (b - a) * page,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                        -1,
                        0,
                    )
                };
                if p as usize != s.addr(a) {
                    let e = errno();
                    self.munmap(s, a, b);
                    return Outcome::Failed(format!("mmap [{a},{b}) errno {e}"));
                }
                for i in a..b {
                    self.retag(s, i, Kind::Anon);
                }
                Outcome::Done(format!("mmap [{a},{b})"))
            }
            _ => {
                let Some((a, b)) = s.run(rng, MAX_RUN, |_| true, |_, _| true) else {
                    return Outcome::Idle;
                };
                self.before(&[s.range(a, b)]);
                // SAFETY: raw madvise(DONTNEED) of mapped pool pages (slot lock held).
                let rc = unsafe {
                    libc::syscall(
                        libc::SYS_madvise,
                        s.addr(a),
                        (b - a) * page,
                        libc::MADV_DONTNEED,
                    )
                };
                self.retag_run(s, a, b);
                done(rc == 0, format!("madvise(DONTNEED) [{a},{b})"))
            }
        }
    }

    /// Runs with every other worker stopped (the caller holds the fork lock for writing).
    fn fork(&self, s: &mut Slot, cow: bool) -> Outcome {
        let anon: Vec<usize> = (0..SLOT_PAGES)
            .filter(|&i| s.kind(i) == Some(Kind::Anon))
            .collect();
        let addrs: Vec<usize> = anon.iter().map(|&i| s.addr(i)).collect();
        let probe = s.range(0, 1);
        self.forks.fetch_add(1, Ordering::SeqCst);
        let nic = self.nic.id();
        let mut pipe = [-1; 2];
        // SAFETY: creates a pipe whose two descriptors we close below.
        if cow && unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Outcome::Failed(format!("pipe errno {}", errno()));
        }
        // SAFETY: fork; the child only writes its copy of private pages, makes one call
        // that must fail fast (its copy of the manager refuses), reads a pipe and _exits:
        // nothing that allocates or takes a lock another thread could have held.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            for &a in &addrs {
                // SAFETY: the child's private copy of a mapped anonymous pool page.
                unsafe { std::ptr::write_volatile((a + 64) as *mut u64, !0) };
            }
            let code = match self.manager.pin(probe, &[nic]) {
                Err(umm::Error::ForkedChild { .. }) => 0,
                _ => 3,
            };
            if cow {
                let mut b = [0u8; 1];
                // SAFETY: closes our copy of the write end, then waits for the parent's.
                unsafe {
                    libc::close(pipe[1]);
                    libc::read(pipe[0], b.as_mut_ptr().cast(), 1);
                }
            }
            // SAFETY: leaves the child without running anything of the parent's.
            unsafe { libc::_exit(code) };
        }
        if pid < 0 {
            let e = errno();
            if cow {
                // SAFETY: our pipe descriptors.
                unsafe {
                    libc::close(pipe[0]);
                    libc::close(pipe[1]);
                }
            }
            return Outcome::Failed(format!("fork errno {e}"));
        }
        if cow {
            // The parent writes while the child shares the pages: new frames here.
            let ranges: Vec<Range> = anon.iter().map(|&i| s.range(i, i + 1)).collect();
            self.before(&ranges);
            for &i in &anon {
                self.retag(s, i, Kind::Anon);
            }
            // SAFETY: our pipe descriptors; closing the write end lets the child exit.
            unsafe {
                libc::close(pipe[0]);
                libc::close(pipe[1]);
            }
        }
        let mut status = 0;
        // SAFETY: waits for the child we forked.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
            self.fail(
                Some(s),
                format!("fork child exited with status {status:#x}: its copy of the manager did not refuse pin with ForkedChild"),
            );
        }
        Outcome::Done(format!("{} private pages, child {pid}", anon.len()))
    }
}

fn done(ok: bool, d: String) -> Outcome {
    if ok {
        Outcome::Done(d)
    } else {
        Outcome::Failed(d)
    }
}

/// The number of MRs the kernel holds on `dev` (`rdma resource show`).
fn kernel_mr_count(dev: &str) -> Option<u64> {
    let out = std::process::Command::new("rdma")
        .args(["resource", "show"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().find_map(|line| {
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.get(1).map(|w| w.trim_end_matches(':')) != Some(dev) {
            return None;
        }
        let i = words.iter().position(|w| *w == "mr")?;
        words.get(i + 1)?.parse().ok()
    })
}

fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

fn rss_kib() -> i64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// Reserves the pool: `slots` windows of [`SLOT_PAGES`] pages plus one guard page each,
/// far below where the kernel places mappings (so no foreign mapping lands in a hole).
fn reserve(slots: usize) -> Result<usize, RunError> {
    let len = slots * (SLOT_PAGES + 1) * umm::page_size();
    for hint in [0x2000_0000_0000usize, 0x3000_0000_0000, 0x1000_0000_0000] {
        // SAFETY: reserves address space that must be free (MAP_FIXED_NOREPLACE).
        let p = unsafe {
            libc::mmap(
                hint as *mut libc::c_void,
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE
                    | libc::MAP_ANONYMOUS
                    | libc::MAP_NORESERVE
                    | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            )
        };
        if p as usize == hint {
            // SAFETY: releases the reservation; the slots map their own pages in it.
            unsafe { libc::munmap(p, len) };
            return Ok(hint);
        }
    }
    Err(RunError::Setup("no free address range for the pool".into()))
}

/// Runs one torture run; see the [crate docs](crate).
pub fn run(opts: &Options) -> Result<Report, RunError> {
    let t0 = Instant::now();
    let fds0 = fd_count();
    let rss0 = rss_kib();
    // Fixed threshold: blocks above it are mmapped (free unmaps), below it come from the
    // heap (free keeps them; malloc_trim returns them).
    // SAFETY: mallopt only changes the allocator's policy.
    unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10) };

    let manager = Arc::new(Manager::new(Config {
        busy_timeout: Duration::from_millis(20),
        ..Config::default()
    }));
    let pagemap = frames::open_pagemap();
    let forks = Arc::new(AtomicU64::new(0));
    let nic_b = PfnBackend::new(RecordingBackend::new("nic"), pagemap.clone(), forks.clone());
    let gpu_b = PfnBackend::new(
        RecordingBackend::new("gpu").refusing_overlap(),
        pagemap.clone(),
        forks.clone(),
    );
    let ledgers = [nic_b.ledger(), gpu_b.ledger()];
    let setup = |e: &dyn fmt::Display| RunError::Setup(e.to_string());
    let nic = manager.attach(nic_b).map_err(|e| setup(&e))?;
    let gpu = manager.attach(gpu_b).map_err(|e| setup(&e))?;
    let dropper = Arc::new(Dropper {
        every: opts.drop_every,
        seen: AtomicU64::new(0),
        dropped: AtomicU64::new(0),
    });
    let plant = |s: Arc<dyn NotifierSource>| -> Arc<dyn NotifierSource> {
        if opts.drop_every.is_some() {
            Arc::new(PlantedSource {
                inner: s,
                dropper: dropper.clone(),
            })
        } else {
            s
        }
    };
    let mut installation = None;
    let mut uffd = None;
    let mut kmod_loaded = false;
    let source = opts.source;
    if matches!(source, SourceKind::Uffd | SourceKind::Combined) {
        let s = umm_uffd::UffdSource::new(umm_uffd::Options::default()).map_err(|e| setup(&e))?;
        uffd = Some(s.clone());
        manager.add_source(plant(s)).map_err(|e| setup(&e))?;
    }
    if matches!(source, SourceKind::Interpose | SourceKind::Combined) {
        if opts.drop_every.is_some() {
            let hook = Arc::new(DroppingHook {
                manager: Arc::downgrade(&manager),
                dropper: dropper.clone(),
            });
            installation = Some(umm_interpose::install(hook).map_err(|e| setup(&e))?);
        } else {
            let s = umm_interpose::InterposeSource::install(&manager).map_err(|e| setup(&e))?;
            manager.add_source(s).map_err(|e| setup(&e))?;
        }
    }
    if source == SourceKind::Kmod
        || (source == SourceKind::Combined && umm_kmod::NotifyDevice::is_available())
    {
        let s = umm_kmod::KmodSource::open().map_err(|e| setup(&e))?;
        manager
            .add_source(plant(Arc::new(s)))
            .map_err(|e| setup(&e))?;
        kmod_loaded = true;
    }
    let op_set = opts
        .op_set
        .clone()
        .unwrap_or_else(|| default_ops(source, kmod_loaded));
    let mut table: Vec<(OpKind, u32)> = op_set.iter().map(|&k| (k, k.weight())).collect();
    if !op_set.contains(&OpKind::Pin) {
        table.push((OpKind::Pin, OpKind::Pin.weight()));
    }
    let total_weight = table.iter().map(|(_, w)| w).sum();

    let rdma = if opts.rdma {
        let (dev, link) = Link::open(&manager)
            .map_err(|e| RunError::Setup(format!("Soft-RoCE rxe0/rxe1: {e}")))?;
        Some(Wire {
            dev,
            link: Mutex::new(link),
        })
    } else {
        None
    };
    let base = reserve(opts.slots.max(1))?;
    let page = umm::page_size();
    let ctx = Ctx {
        opts,
        manager: &manager,
        nic,
        gpu,
        pagemap: pagemap.clone(),
        slots: (0..opts.slots.max(1))
            .map(|i| {
                Mutex::new(Slot {
                    index: i,
                    base: base + i * (SLOT_PAGES + 1) * page,
                    pages: [Page::Unmapped; SLOT_PAGES],
                    files: Vec::new(),
                    next_file: 0,
                    trace: VecDeque::new(),
                })
            })
            .collect(),
        heap: (0..opts.heap_slots.max(1))
            .map(|_| Mutex::new(None))
            .collect(),
        table,
        total_weight,
        manual: source == SourceKind::Manual,
        dropper: dropper.clone(),
        gen: AtomicU64::new(0),
        seq: AtomicU64::new(0),
        ops_done: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        deadline: opts.duration.map(|d| t0 + d),
        fork_lock: RwLock::new(()),
        failure: Mutex::new(None),
        recent: Mutex::new(VecDeque::new()),
        counters: Counters {
            done: OpKind::ALL.iter().map(|_| AtomicU64::new(0)).collect(),
            failed: OpKind::ALL.iter().map(|_| AtomicU64::new(0)).collect(),
            idle: OpKind::ALL.iter().map(|_| AtomicU64::new(0)).collect(),
        },
        pins_checked: AtomicU64::new(0),
        pages_checked: AtomicU64::new(0),
        refused: AtomicU64::new(0),
        pin_errors: Mutex::new(BTreeMap::new()),
        manual_calls: AtomicU64::new(0),
        forks,
        cow_caught: kmod_loaded && op_set.contains(&OpKind::ForkCow),
        cow_frames: AtomicU64::new(0),
        micros: OpKind::ALL.iter().map(|_| AtomicU64::new(0)).collect(),
        rdma,
        rdma_writes: AtomicU64::new(0),
    };
    // Every slot starts with 8 anonymous pages.
    for m in &ctx.slots {
        let mut s = lock(m);
        let a = s.addr(0);
        if !ctx.map_fixed(
            a,
            MAX_RUN * page,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
        ) {
            return Err(RunError::Setup(format!("cannot map the pool at {a:#x}")));
        }
        for i in 0..MAX_RUN {
            ctx.retag(&mut s, i, Kind::Anon);
        }
    }

    std::thread::scope(|sc| {
        for tid in 0..opts.threads.max(1) {
            let ctx = &ctx;
            sc.spawn(move || ctx.worker(tid));
        }
    });
    let ops = ctx.ops_done.load(Ordering::Relaxed).min(opts.ops);

    // Tear down through the same paths (the source sees these unmaps and frees too).
    for m in &ctx.slots {
        let mut s = lock(m);
        ctx.before(&[s.range(0, SLOT_PAGES)]);
        ctx.munmap(&mut s, 0, SLOT_PAGES);
        s.files.clear();
    }
    for m in &ctx.heap {
        if let Some((p, _)) = lock(m).take() {
            // SAFETY: a block from malloc, freed once.
            unsafe { libc::free(p as *mut libc::c_void) };
        }
    }
    manager.flush();
    let stats = manager.stats();
    let mut report = Report {
        ops,
        per_op: OpKind::ALL
            .iter()
            .map(|&k| {
                let i = k.index();
                let c = |v: &Vec<AtomicU64>| v[i].load(Ordering::Relaxed);
                (
                    k,
                    (
                        c(&ctx.counters.done),
                        c(&ctx.counters.failed),
                        c(&ctx.counters.idle),
                    ),
                )
            })
            .filter(|(_, (d, f, i))| d + f + i > 0)
            .collect(),
        pins_checked: ctx.pins_checked.load(Ordering::Relaxed),
        pages_checked: ctx.pages_checked.load(Ordering::Relaxed),
        frames_checked: pagemap.is_some(),
        refused: ctx.refused.load(Ordering::Relaxed),
        pin_errors: lock(&ctx.pin_errors).clone(),
        invalidations: stats.invalidations,
        invalidate_all: stats.invalidate_all,
        invalidated_entries: stats.devices.iter().map(|d| d.invalidated_entries).sum(),
        registrations: stats.registrations(),
        hits: stats.hits(),
        dropped: dropper.dropped.load(Ordering::Relaxed),
        manual_invalidations: ctx.manual_calls.load(Ordering::Relaxed),
        cow_frames: ctx.cow_frames.load(Ordering::Relaxed),
        rdma_writes: ctx.rdma_writes.load(Ordering::Relaxed),
        micros: OpKind::ALL
            .iter()
            .map(|&k| (k, ctx.micros[k.index()].load(Ordering::Relaxed)))
            .filter(|(_, us)| *us > 0)
            .collect(),
        op_set,
        source_stats: uffd
            .as_ref()
            .map(|u| format!("{:?}", u.stats()))
            .unwrap_or_else(|| "no source counters".into()),
        rss_growth_kib: 0,
        elapsed: Duration::ZERO,
    };
    let failure = lock(&ctx.failure).take();
    let replay = ctx.replay();
    drop(ctx);
    drop(uffd);
    drop(installation);
    drop(manager);
    drop(pagemap);
    if let Some(f) = failure {
        return Err(RunError::Failed(Box::new(f)));
    }

    // Balance: exactly one deregistration per registration, per device; nothing left.
    let mut problems = Vec::new();
    for (name, l) in ["nic", "gpu"].iter().zip(&ledgers) {
        let (r, d, bad, live) = (
            l.registrations(),
            l.deregistrations(),
            l.bad_deregistrations(),
            l.live().len(),
        );
        if r != d || bad != 0 || live != 0 {
            problems.push(format!(
                "{name}: {r} registrations, {d} deregistrations, {bad} bad deregistrations, {live} still registered"
            ));
        }
    }
    if opts.rdma {
        for dev in ["rxe0", "rxe1"] {
            match kernel_mr_count(dev) {
                Some(0) => {}
                Some(n) => problems.push(format!("{dev}: the kernel still holds {n} MRs")),
                None => problems.push(format!("{dev}: no MR count from `rdma resource show`")),
            }
        }
    }
    let fds1 = fd_count();
    if fds1 != fds0 {
        problems.push(format!("descriptors: {fds0} before the run, {fds1} after"));
    }
    report.rss_growth_kib = rss_kib() - rss0;
    // The pool is at most slots x 16 pages and every block is freed: what stays resident is
    // the manager's (index, entries) and the allocator's.
    if report.rss_growth_kib > RSS_BOUND_KIB {
        problems.push(format!(
            "resident set grew by {} KiB over the run (bound {RSS_BOUND_KIB} KiB)",
            report.rss_growth_kib
        ));
    }
    report.elapsed = t0.elapsed();
    if !problems.is_empty() {
        let recent = Vec::new();
        return Err(RunError::Failed(Box::new(Failure {
            source,
            seed: opts.seed,
            message: format!("unbalanced at the end: {}", problems.join("; ")),
            slot_trace: Vec::new(),
            run_trace: recent,
            replay,
        })));
    }
    Ok(report)
}
