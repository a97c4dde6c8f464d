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
mod model;
mod mutate;
pub mod ops;
mod plant;
pub mod rng;
mod wire;

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
use model::{Kind, Page, Slot};
pub use ops::{default_ops, OpKind, SourceKind};
use plant::{Dropper, DroppingHook, PlantedSource};
use rng::Rng;
use wire::{kernel_mr_count, Link, Wire};

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
    /// Also pin on a Vulkan device (the first with `VK_EXT_external_memory_host`, lavapipe
    /// here; one pin in four) and read the pinned pages through the import with a compute
    /// kernel: its checksum must equal the host's over the pages' current bytes. On a GPU
    /// the import pins frames, so a stale import reads the old bytes; lavapipe reads through
    /// the host pointer (it proves the plumbing, not the pinning). Without a Vulkan device
    /// the run is a setup error.
    pub vulkan: bool,
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
            vulkan: false,
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
    /// Compute reads through a Vulkan import compared with the host's bytes (0 without
    /// `vulkan`).
    pub vulkan_reads: u64,
    /// Time spent per operation kind, in microseconds (all workers together).
    pub micros: BTreeMap<OpKind, u64>,
    /// Frames the kernel moved under an unchanged tag, excused (see
    /// `Ctx::frame_move_excused`; never with the kernel module and fork in the mix).
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
            "invalidations {} (entries {}, invalidate_all {}), registrations {}, hits {}, manual invalidate calls {}, dropped by plant {}, frames moved by the kernel (fork COW, THP, migration) excused {}; {}; RSS growth {} KiB",
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
        if self.vulkan_reads > 0 {
            writeln!(f, "Vulkan compute reads checked: {}", self.vulkan_reads)?;
        }
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
    vulkan: Option<Device<umm_vulkan::VulkanBackend>>,
    vulkan_reads: AtomicU64,
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
        if o.vulkan {
            s += " --vulkan";
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

    /// A frame changed under an unchanged tag: the kernel moved a private page without the
    /// application doing anything a user-space source could see (a COW copy on a write
    /// after a fork, a transparent-huge-page collapse, migration, compaction). A pinning
    /// backend keeps its frames (the kernel neither moves pinned pages nor leaves them to
    /// the other side of a COW); the recorder pins nothing, so this is counted, not failed,
    /// unless the source sees such moves (the kernel module with fork in the mix).
    fn frame_move_excused(&self) -> bool {
        if self.cow_caught {
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
        if let Some(vk) = self.vulkan {
            if rng.one_in(4) {
                return if rng.one_in(2) {
                    (vec![vk.id()], "vulkan")
                } else {
                    (
                        vec![vk.id(), self.nic.id(), self.gpu.id()],
                        "vulkan+nic+gpu",
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

    /// A compute read of the pinned pages through the pin's Vulkan import: its checksum
    /// must equal the host's over the bytes mapped there now.
    fn check_vulkan(&self, s: &Slot, pin: &Pin<'_>, a: usize, b: usize) -> Result<(), String> {
        let Some(vk) = self.vulkan else {
            return Ok(());
        };
        let (Some(import), Some(offset)) = (pin.translation(vk), pin.offset(vk)) else {
            return Ok(());
        };
        let backend = self.manager.backend(vk).map_err(|e| e.to_string())?;
        let len = (b - a) * self.page();
        // SAFETY: the pin keeps the import live, and this thread holds the slot, so its
        // pages stay mapped until the read returns.
        let device = unsafe { backend.checksum(import, offset as u64, len as u64) }
            .map_err(|e| format!("Vulkan checksum kernel failed: {e}"))?;
        // SAFETY: the slot's pages [a, b) are mapped (just pinned) and only read here.
        let bytes = unsafe { std::slice::from_raw_parts(s.addr(a) as *const u8, len) };
        let host = umm_vulkan::Checksum::of_bytes(bytes);
        if device != host {
            return Err(format!(
                "STALE on vulkan: the compute read through import {:?} of {} saw checksum {:#x} \
                 over {} words, the host's pages hold {:#x}: the import reads frames that are \
                 no longer mapped there",
                import.memory, import.range, device.sum, device.words, host.sum
            ));
        }
        self.vulkan_reads.fetch_add(1, Ordering::Relaxed);
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
            .and_then(|_| self.check_vulkan(s, &pin, a, b))
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
                        if self.frame_move_excused() {
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
}

fn done(ok: bool, d: String) -> Outcome {
    if ok {
        Outcome::Done(d)
    } else {
        Outcome::Failed(d)
    }
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
    // No transparent huge pages: khugepaged would replace frames under the recorder (which
    // pins nothing) at any time, and only the kernel module can see that.
    // SAFETY: a process-wide flag; no memory is touched.
    unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };

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
            // The driver makes raw memory syscalls only in op sets that name them (the
            // interposition default excludes them): it declares libc_only.
            let options = umm_interpose::Options::libc_only();
            let s = umm_interpose::InterposeSource::install_with(&manager, options)
                .map_err(|e| setup(&e))?;
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
    let vulkan = if opts.vulkan {
        let backend = umm_vulkan::VulkanBackend::new(umm_vulkan::DeviceSelector::First)
            .map_err(|e| RunError::Setup(format!("Vulkan: {e}")))?;
        Some(
            manager
                .attach(backend)
                .map_err(|e| RunError::Setup(format!("Vulkan: {e}")))?,
        )
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
        vulkan,
        vulkan_reads: AtomicU64::new(0),
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
    // Every slot is unmapped: every import must be gone once the manager settled.
    let vulkan_left = ctx
        .vulkan
        .and_then(|vk| manager.backend(vk).ok())
        .map_or(0, |b| b.live_imports());
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
        vulkan_reads: ctx.vulkan_reads.load(Ordering::Relaxed),
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
    if vulkan_left != 0 {
        problems.push(format!(
            "vulkan: {vulkan_left} imports still live after every slot was unmapped"
        ));
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
    // The recorders keep every call (two of 56 bytes per registration, in a Vec that may
    // have doubled): allowed on top.
    let bound = RSS_BOUND_KIB + (report.registrations as i64 * 384) / 1024;
    if report.rss_growth_kib > bound {
        problems.push(format!(
            "resident set grew by {} KiB over the run (bound {bound} KiB)",
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
