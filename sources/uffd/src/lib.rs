//! # umm-uffd: a userfaultfd notifier source
//!
//! [`UffdSource`] registers every watched range with a userfaultfd in **write-protect
//! mode** and asks for the non-cooperative `UNMAP`, `REMAP` and `REMOVE` events. The kernel
//! blocks the thread that unmaps, remaps or `madvise(MADV_DONTNEED|MADV_FREE|MADV_REMOVE)`s
//! a registered range until a reader has read the event; a dedicated reader thread reads it
//! and records the affected range.
//!
//! ## How an event reaches the manager
//!
//! The kernel releases the blocked thread **inside** the `read(2)` that hands the event
//! out, so a reader that records after reading races with the syscall's return (measured:
//! it loses almost always). The reader therefore works in rounds:
//!
//! ```text
//!  unmapping thread          reader thread                  pin (cache hit)
//!  munmap: event queued,
//!  blocks                    poll: readable
//!                            generation += 1   (announce)
//!                            read(): releases munmap ──┐
//!  munmap returns  <─────────────────────────────────────┘
//!                            push ranges into the ring
//!                            settled = generation          generation moved?
//!                                                         drain: wait until settled
//!                                                         catches up (bounded), then
//!                                                         invalidate every ring range
//! ```
//!
//! The reader does **only** allocation-free, lock-free work per event: it pushes the range
//! into a preallocated ring ([`crossbeam_queue::ArrayQueue`]; overflow sets a flag meaning
//! "invalidate everything"). Every cache hit of the manager compares
//! [`NotifierSource::generation`] and calls [`NotifierSource::drain`], which hands the
//! ranges to [`umm::Manager::invalidate`]; a hit after munmap returned never returns the
//! stale entry. So:
//!
//! * the reader never takes a lock that a thread inside `pin`/`register` can hold, never
//!   allocates and never frees, so it cannot itself unmap a watched range (which would
//!   block it on its own event forever): **no deadlock by construction**;
//! * the generation has always moved when the causing syscall returns (announced before
//!   the read); the ranges follow within microseconds and `drain` waits for them.
//!
//! [`UffdSource::set_eager_sink`] additionally calls an [`InvalidationSink`] from the
//! reader thread (used by the coverage probes to time events). A sink given there must
//! obey the same rules as the reader: no unmapping of watched memory, no waiting for
//! locks held around `munmap` calls.
//!
//! ## Hazards and what this source does about them (measured on the project's kernel)
//!
//! * **Page faults.** Write-protect mode only faults on pages that were write-protected
//!   with `UFFDIO_WRITEPROTECT`, which this source never does, so first touches and faults
//!   after `MADV_DONTNEED` are handled by the kernel as usual. Should a fault event arrive
//!   anyway it is resolved at once (write protection cleared and the thread woken).
//! * **fork.** `UFFD_FEATURE_EVENT_FORK` is **not** requested, so a fork child gets
//!   nothing from this source: its copies of the watched ranges are not registered (its
//!   unmaps never block and are not reported), its copy of the source refuses new watches
//!   and managers ([`UffdError::Forked`]), and dropping, detaching or unwatching there
//!   does nothing at all: no eventfd write, no `UFFDIO_*` call (a userfaultfd acts on the
//!   address space of the process that created it, so a child's `UFFDIO_UNREGISTER`
//!   would remove the parent's registrations). The child's copies of the source's
//!   descriptors are closed right at fork (a `pthread_atfork` child handler): a child
//!   that lived on holding them would keep the registrations alive after the parent
//!   dropped its source, with no reader, and the parent's next munmap of such a range
//!   would block forever. (A child made by a raw `fork`/`clone` syscall skips that
//!   handler; dropping the source unregisters every known range explicitly for that
//!   case.) Use the kernel module source to cover a child.
//!   In the **parent**, a fork makes every private page copy-on-write: the parent's next
//!   write moves that address to a new frame without any unmap, and userfaultfd reports
//!   nothing. A `pthread_atfork` parent handler therefore marks every live source before
//!   `fork()` returns in the parent; the next cache hit drains and invalidates everything
//!   (as the kernel's MMU notifier invalidates the copy-on-write ranges at fork). Memory
//!   pinned for DMA keeps its frames in the parent on kernels that copy pinned pages for
//!   the child (5.8+), but a cached translation never relies on that. `posix_spawn` and
//!   `vfork` share the address space and do not run the handler (nothing becomes
//!   copy-on-write); a raw `fork`/`clone` syscall skips it too (use the kernel module
//!   source for programs that fork that way).
//! * **Shutdown.** Dropping the source unregisters its ranges, stops the reader after it
//!   drained what was queued, then closes the userfaultfd, which drops any registration
//!   left and wakes any thread still waiting on an event. A dropped source never leaves
//!   a thread blocked.
//! * **One manager per source.** Events are drained by whichever manager asks first and
//!   watches are keyed by the manager's cookies, so a source serves one manager at a
//!   time: a second [`NotifierSource::attach`] fails with
//!   [`UffdError::AlreadyAttached`] (the manager's `add_source` with
//!   [`umm::Error::Source`]) until the first manager is dropped (which detaches it and
//!   drops its watches). A range can be registered with one userfaultfd only, so two
//!   managers with two sources cannot watch the same memory either (the second gets
//!   `EBUSY`): keep one manager per process for memory this source covers.
//! * **What cannot be watched (strict mode, the default).** The kernel gives userfaultfd
//!   no event for `fallocate(PUNCH_HOLE)` or `ftruncate` on shmem (tmpfs, memfd,
//!   hugetlbfs) mappings, nor for `shmat(SHM_REMAP)` over or `shmdt` of SysV shm, and it
//!   cannot register regular-file mappings at all. Each watch therefore looks up the
//!   mappings of its range (the miss path only; see *Cost*) and refuses such memory:
//!   shmem and SysV with [`umm::Uncovered`] naming the operation (the manager's `pin`
//!   fails with [`umm::Error::Uncovered`]), file mappings with
//!   [`UffdError::Unsupported`] naming the file and the cause. With [`Options::strict`]
//!   off, shmem is accepted (a hole punch or truncation then leaves a stale registration,
//!   unreported) and unregistrable memory is counted in [`UffdStats::unwatchable`].
//!   Private and shared anonymous memory is watched.
//! * **VMAs.** Registering part of a mapping splits its VMA, and a process may hold only
//!   `vm.max_map_count` VMAs (65530 by default); past that the application's own `mmap`
//!   fails with `ENOMEM`. A watch therefore registers its range rounded out to
//!   [`Options::span`] (2 MiB) and clipped to its VMAs: watches near each other share one
//!   registration, adjacent ones merge, a small VMA is registered whole (measured: 40,956
//!   one-page watches two pages apart add 2 VMAs; registered exactly they would need
//!   81,912). What can still split is bounded: a watch that could split a VMA is refused
//!   with [`UffdError::VmaBudget`] once the source's splits reach a quarter of
//!   `vm.max_map_count`, or the process three quarters of it.
//! * **Side effects.** Every munmap/mremap/madvise inside a registered span is an event,
//!   also in its unwatched part (it blocks the caller until read and invalidates nothing
//!   cached); an in-place `mremap` grow gives no event and silently extends the
//!   registration; after a `REMAP` the registration follows the mapping to its new
//!   address until the source is dropped.
//! * **Cost.** Every event blocks the causing syscall until read: a 64 KiB munmap takes
//!   ~6 us alone and 10–60 us with the reader. A watch (the miss path) looks up its
//!   mappings with the `PROCMAP_QUERY` ioctl where the kernel has it (Linux 6.11+;
//!   measured 0.4 us whatever the VMA count; a whole `try_watch` 0.9 us) and parses
//!   `/proc/self/maps` up to the range otherwise (17 us with 30 VMAs, growing with the
//!   VMAs below the range: 26 ms with 20,000). Run the `watch_cost` example to measure.
//!   Cache hits never classify.
//!
//! ## Example
//!
//! ```
//! use std::sync::Arc;
//! use umm::{InvalidationSink, NotifierSource, Range};
//! use umm_uffd::{Options, UffdSource};
//!
//! # struct Log(parking_lot::Mutex<Vec<Range>>);
//! # impl InvalidationSink for Log {
//! #     fn invalidate(&self, r: Range) { self.0.lock().push(r) }
//! #     fn invalidate_all(&self) {}
//! # }
//! let source = match UffdSource::new(Options::default()) {
//!     Ok(s) => s,
//!     Err(e) => { eprintln!("skipped: {e}"); return; } // no userfaultfd here
//! };
//! let len = 4 * umm::page_size();
//! // SAFETY: a fresh anonymous mapping.
//! let p = unsafe {
//!     libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE,
//!                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
//! };
//! let range = Range::new(p as usize, len).unwrap();
//! source.watch(1, range).unwrap();
//! let before = source.generation().unwrap().load(std::sync::atomic::Ordering::Acquire);
//! // SAFETY: unmaps the mapping made above, which nothing else uses.
//! unsafe { libc::munmap(p, len) };
//! assert_ne!(source.generation().unwrap().load(std::sync::atomic::Ordering::Acquire), before);
//! let log = Log(Default::default());
//! source.drain(&log);
//! assert_eq!(*log.0.lock(), vec![range]);
//! source.unwatch(1, range);
//! ```
//!
//! With a manager: `manager.add_source(UffdSource::new(Options::default())?)`, one
//! source per manager.

#![deny(missing_docs)]

pub mod maps;
pub mod sys;

use std::collections::BTreeMap;
use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Once, OnceLock, Weak};
use std::thread::{JoinHandle, ThreadId};

use crossbeam_queue::ArrayQueue;
use parking_lot::Mutex;
use umm::{InvalidationSink, ManagerId, NotifierSource, Range, Uncovered};

use crate::maps::{Mapping, Vma, Vmas};
use crate::sys::*;

/// Errors of the userfaultfd source.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UffdError {
    /// Neither `userfaultfd(2)` nor `/dev/userfaultfd` gave a descriptor.
    #[error("userfaultfd is not available (syscall: {syscall}; /dev/userfaultfd)")]
    Unavailable {
        /// Why the syscall failed.
        syscall: io::Error,
        /// Why `/dev/userfaultfd` failed.
        #[source]
        device: io::Error,
    },
    /// The kernel lacks features this source needs.
    #[error("userfaultfd lacks features {missing:#x} (kernel offers {offered:#x}): {what}")]
    MissingFeatures {
        /// Missing `UFFD_FEATURE_*` bits (or ioctl bits).
        missing: u64,
        /// What the kernel offers.
        offered: u64,
        /// Which part is missing, in words.
        what: &'static str,
    },
    /// A system call during setup failed.
    #[error("userfaultfd setup failed in {step}")]
    Setup {
        /// The failing step.
        step: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `UFFDIO_REGISTER` refused the range.
    #[error("cannot watch {range} ({mapping}): UFFDIO_REGISTER refused it")]
    Register {
        /// The page-rounded range.
        range: Range,
        /// The mapping there, in words, with its name (path, `[heap]`...).
        mapping: String,
        /// The OS error (`ENOMEM`: the process is out of VMAs).
        #[source]
        source: io::Error,
    },
    /// The range lies in memory userfaultfd cannot register at all (a regular file
    /// mapping), so no change of it could be seen (with [`Options::strict`]; without, the
    /// watch is counted in [`UffdStats::unwatchable`] instead).
    #[error("cannot watch {range}: it is {mapping}; {cause}")]
    Unsupported {
        /// The page-rounded range.
        range: Range,
        /// The mapping there, in words, with its path.
        mapping: String,
        /// Why userfaultfd cannot watch it, and what to use instead.
        cause: &'static str,
    },
    /// The range is registrable, but the kernel gives userfaultfd no event for an
    /// operation that can replace its pages ([`Options::strict`]). [`NotifierSource::watch`]
    /// returns the [`Uncovered`] itself, which the manager reports as
    /// [`umm::Error::Uncovered`].
    #[error(transparent)]
    Uncovered(#[from] Uncovered),
    /// Part of the range is not mapped.
    #[error("cannot watch {range}: {hole} is not mapped")]
    NotMapped {
        /// The page-rounded range.
        range: Range,
        /// The first unmapped part.
        hole: Range,
    },
    /// Reading this process's mappings failed.
    #[error("cannot watch {range}: reading /proc/self/maps failed")]
    Maps {
        /// The page-rounded range.
        range: Range,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Registering the range would split VMAs past this source's budget: the process
    /// could run into `vm.max_map_count`, after which the application's own `mmap`s fail
    /// with `ENOMEM`. Evict cached registrations, or pin larger, fewer ranges.
    #[error(
        "cannot watch {range}: its registration would split a VMA, and this source already \
         added about {added} of the {budget} VMAs it may add (the process has about \
         {map_count} VMAs, vm.max_map_count is {max_map_count})"
    )]
    VmaBudget {
        /// The page-rounded range.
        range: Range,
        /// VMAs the source's registrations added so far (an upper bound).
        added: usize,
        /// VMAs the source may add.
        budget: usize,
        /// VMAs of the process at the last count.
        map_count: usize,
        /// `vm.max_map_count`.
        max_map_count: usize,
    },
    /// The source was created in another process (this one is a fork child).
    #[error("userfaultfd source of process {owner} used in forked child {current}: it covers nothing here")]
    Forked {
        /// The creating process.
        owner: u32,
        /// This process.
        current: u32,
    },
    /// The source already serves a manager: its events would reach only whichever manager
    /// drains first, so it serves one at a time.
    #[error("this userfaultfd source serves {attached}; it cannot serve {refused} too (one source per manager)")]
    AlreadyAttached {
        /// The manager it serves.
        attached: ManagerId,
        /// The manager refused.
        refused: ManagerId,
    },
    /// A range rounded out to pages overflows.
    #[error("range {0} cannot be rounded to pages")]
    Range(Range),
}

/// Options of [`UffdSource::new`].
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Ranges the ring holds between two drains; more sets the overflow flag, which makes
    /// the next drain invalidate everything (never dropped silently).
    pub ring_capacity: usize,
    /// `true` (default): refuse to watch memory whose pages can be replaced without a
    /// userfaultfd event: shmem files (tmpfs, memfd, hugetlbfs: `fallocate(PUNCH_HOLE)`,
    /// `ftruncate`), SysV shm (`shmat(SHM_REMAP)`, `shmdt`), regular file mappings (not
    /// registrable at all). The watch, and with it the `pin`, fails with
    /// [`umm::Error::Uncovered`] (or [`UffdError::Unsupported`]), naming the operation.
    ///
    /// `false`: accept the risk. Shmem is registered (munmap, mremap, `MADV_REMOVE` are
    /// still seen; a hole punch or truncation leaves the cached registration pointing at
    /// the old pages, and a device keeps reading and writing those); memory the kernel
    /// refuses to register is counted in [`UffdStats::unwatchable`] and left uncovered.
    /// Use it only when nothing punches, truncates or re-attaches that memory while it
    /// is cached, or call [`umm::Manager::invalidate`] yourself when something does.
    pub strict: bool,
    /// Registration granularity in bytes (default 2 MiB; rounded up to a power of two,
    /// at least a page). A watch registers its range rounded out to this alignment and
    /// clipped to the VMAs the range lies in, so watches close to each other share one
    /// registration and split no VMA, and a small VMA is registered whole. The cost: every
    /// munmap/mremap/madvise in the widened part is an event too (blocking the caller
    /// until the reader read it, about 10-60 us), which invalidates nothing cached.
    /// `0` or a page registers each range exactly (each watch may split two VMAs).
    pub span: usize,
    /// Classify mappings with the `PROCMAP_QUERY` ioctl where the kernel has it (Linux
    /// 6.11+; default `true`); `false` always parses `/proc/self/maps`.
    pub procmap_query: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            ring_capacity: 4096,
            strict: true,
            span: 2 << 20,
            procmap_query: true,
        }
    }
}

/// Counters of a [`UffdSource`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UffdStats {
    /// UNMAP events read.
    pub unmap_events: u64,
    /// REMAP events read.
    pub remap_events: u64,
    /// REMOVE events read.
    pub remove_events: u64,
    /// Page-fault events resolved (expected 0: write-protect mode without protection).
    pub faults_resolved: u64,
    /// Times the ring was full (each makes the next drain invalidate everything).
    pub overflows: u64,
    /// Forks seen in this process (each makes the next drain invalidate everything, see
    /// the crate docs on fork).
    pub fork_notices: u64,
    /// Watches the kernel refused while [`Options::strict`] was off.
    pub unwatchable: u64,
    /// Watches refused because the memory is exposed to operations userfaultfd cannot
    /// see ([`Options::strict`]).
    pub uncovered: u64,
    /// Watches refused by the VMA budget ([`UffdError::VmaBudget`]).
    pub vma_refusals: u64,
    /// Live watches.
    pub watches: u64,
    /// Distinct registrations (spans) behind the live watches.
    pub spans: u64,
    /// VMAs the live registrations may have added by splitting (an upper bound).
    pub vmas_added: u64,
    /// VMAs this source may add (see [`UffdError::VmaBudget`]).
    pub vma_budget: u64,
}

/// A raw descriptor that only the process that opened it closes (a fork child's copy
/// of the source never closes the numbers: the atfork handler closed them already, or
/// they may name something else by now).
struct ProcessFd {
    fd: ManuallyDrop<OwnedFd>,
    pid: u32,
}

impl ProcessFd {
    fn new(fd: OwnedFd) -> ProcessFd {
        ProcessFd {
            fd: ManuallyDrop::new(fd),
            pid: getpid(),
        }
    }
    fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Drop for ProcessFd {
    fn drop(&mut self) {
        if getpid() == self.pid {
            // SAFETY: dropped once, here; never used afterwards.
            unsafe { ManuallyDrop::drop(&mut self.fd) };
        }
    }
}

/// Descriptors that a fork child closes at once (see [`close_in_child`]): the parent's
/// userfaultfd and eventfd. -1 = free slot.
static CHILD_CLOSES: [AtomicI32; 64] = [const { AtomicI32::new(-1) }; 64];
static ATFORK: Once = Once::new();

/// `pthread_atfork` child handler: closes the child's copies of every source's
/// descriptors (only `close`, async-signal-safe). Otherwise a child that lives on would
/// keep the parent's userfaultfd open: when the parent drops its source, the kernel would
/// keep the registrations (no release while a descriptor exists) with no reader, and the
/// parent's next munmap of a formerly watched range would block forever.
extern "C" fn close_in_child() {
    for slot in &CHILD_CLOSES {
        let fd = slot.swap(-1, Ordering::Relaxed);
        if fd >= 0 {
            // SAFETY: closes the child's copy of a descriptor the parent's source owns;
            // the child's source never closes it again (ProcessFd).
            unsafe { libc::close(fd) };
        }
    }
}

/// Registers `fd` to be closed in fork children; returns the slot (None: all taken).
fn close_in_children(fd: RawFd) -> Option<usize> {
    ATFORK.call_once(|| {
        // SAFETY: registers a child handler that only calls close(2).
        unsafe { libc::pthread_atfork(None, None, Some(close_in_child)) };
    });
    let slot = CHILD_CLOSES.iter().position(|s| {
        s.compare_exchange(-1, fd, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    });
    if slot.is_none() {
        tracing::warn!(
            fd,
            "too many userfaultfd sources: a fork child keeps this one's descriptor"
        );
    }
    slot
}

/// Live sources of this process, told about every fork by [`note_fork_in_parent`].
static FORK_NOTICES: Mutex<Vec<Weak<Shared>>> = Mutex::new(Vec::new());

/// Registers `shared` for fork notices (and the parent handler, once).
fn notice_forks(shared: &Arc<Shared>) {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: registers a parent handler; it runs in the parent after fork returned
        // there, in ordinary (not async-signal) context.
        unsafe { libc::pthread_atfork(None, Some(note_fork_in_parent), None) };
    });
    let mut live = FORK_NOTICES.lock();
    live.retain(|w| w.strong_count() > 0);
    live.push(Arc::downgrade(shared));
}

/// `pthread_atfork` parent handler. After a fork the parent's private pages are shared
/// copy-on-write with the child; the parent's next write to one moves that address to a
/// new frame with no unmap, which no userfaultfd event reports (the kernel's MMU
/// notifier does report it, as an invalidation at the fork). So every live source sets
/// its `overflow` flag ("invalidate everything") and moves its generation before `fork()` returns in the parent: the
/// next cache hit drains and invalidates everything. The generation is settled at once
/// (there is nothing for the reader to record); a reader announcement it overtakes is
/// covered by the invalidation of everything. Registrations that pin pages for DMA are
/// not at risk on kernels that copy pinned pages for the child (5.8+), but a cached
/// translation must not depend on that.
extern "C" fn note_fork_in_parent() {
    let live = FORK_NOTICES.lock();
    for s in live.iter().filter_map(Weak::upgrade) {
        s.overflow.store(true, Ordering::Release);
        let g = s.generation.fetch_add(1, Ordering::AcqRel) + 1;
        s.settled.fetch_max(g, Ordering::AcqRel);
        s.fork_notices.fetch_add(1, Ordering::Relaxed);
    }
}

fn getpid() -> u32 {
    // SAFETY: getpid has no preconditions.
    unsafe { libc::getpid() as u32 }
}

/// State shared by the source and its reader thread.
struct Shared {
    /// The userfaultfd; closed when the last of source and reader lets go, i.e. after the
    /// reader exited, so the descriptor number is never reused under the reader.
    uffd: ProcessFd,
    /// eventfd that tells the reader to stop.
    stop: ProcessFd,
    /// Ranges recorded by the reader, not yet drained.
    ring: ArrayQueue<Range>,
    /// Set by the reader when `ring` was full, or by the fork handler
    /// ([`note_fork_in_parent`]); the next drain invalidates everything.
    overflow: AtomicBool,
    /// Bumped by the reader when `poll` reports pending events, **before** the `read(2)`
    /// that hands them out and thereby releases the threads blocked in munmap/mremap/
    /// madvise. So once such a syscall returned, `generation` has moved.
    generation: AtomicU64,
    /// The last `generation` value whose events are all recorded in `ring`/`overflow`
    /// (stored with Release after recording; [`NotifierSource::drain`] waits, bounded, until
    /// it catches up with the `generation` it loaded).
    settled: AtomicU64,
    /// Set when the reader thread exited; drain then stops waiting for `settled`.
    reader_gone: AtomicBool,
    /// Optional sink the reader calls after recording (see [`UffdSource::set_eager_sink`]).
    eager: OnceLock<Weak<dyn InvalidationSink>>,
    unmap_events: AtomicU64,
    remap_events: AtomicU64,
    remove_events: AtomicU64,
    faults_resolved: AtomicU64,
    overflows: AtomicU64,
    fork_notices: AtomicU64,
}

/// One watch: the range asked for and the span registered for it.
#[derive(Clone, Copy, Debug)]
struct Watch {
    span: Range,
}

/// One registered span, shared by the watches whose ranges widen to it.
#[derive(Clone, Copy, Debug)]
struct Span {
    /// Watches using it.
    refs: u32,
    /// VMA splits its registration may have caused (0-2: span ends inside a VMA).
    splits: usize,
}

/// Watches, registrations and the VMA budget (one lock: the miss path only).
#[derive(Default)]
struct State {
    /// Live watches by cookie.
    watches: BTreeMap<u64, Watch>,
    /// Registered spans by (start, end); a span is unregistered (where no other span
    /// covers it) when its last watch goes.
    spans: BTreeMap<(usize, usize), Span>,
    /// Sum of `splits` over `spans`.
    added: usize,
    /// The process's VMA count when the source was made.
    baseline: usize,
    /// The process's VMA count at the last count, and `added` then.
    counted: usize,
    added_at_count: usize,
}

/// The userfaultfd notifier source; see the [crate docs](crate).
pub struct UffdSource {
    shared: Arc<Shared>,
    options: Options,
    state: Mutex<State>,
    vmas: Vmas,
    /// `vm.max_map_count` when the source was made.
    max_map_count: usize,
    /// The manager served (see [`NotifierSource::attach`]).
    attached: Mutex<Option<ManagerId>>,
    unwatchable: AtomicU64,
    uncovered: AtomicU64,
    vma_refusals: AtomicU64,
    /// Serialises drains: a second drainer must not return (and let its cache hit proceed)
    /// while the first still holds popped ranges it has not delivered yet.
    drain_lock: Mutex<()>,
    reader: Mutex<Option<JoinHandle<()>>>,
    reader_id: ThreadId,
    /// [`CHILD_CLOSES`] slots of our descriptors.
    child_slots: Vec<usize>,
    pid: u32,
}

fn last_os_error() -> io::Error {
    io::Error::last_os_error()
}

/// Opens a userfaultfd (syscall first, `/dev/userfaultfd` second), non-blocking, close-on-exec.
fn open_uffd() -> Result<OwnedFd, UffdError> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    // SAFETY: userfaultfd(2) takes only flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags | UFFD_USER_MODE_ONLY) };
    if fd >= 0 {
        // SAFETY: `fd` is a fresh descriptor we own.
        return Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) });
    }
    let syscall = last_os_error();
    let path = c"/dev/userfaultfd";
    // SAFETY: `path` is a NUL-terminated string; open returns a new descriptor or -1.
    let dev = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if dev < 0 {
        return Err(UffdError::Unavailable {
            syscall,
            device: last_os_error(),
        });
    }
    // SAFETY: `dev` is a fresh descriptor we own.
    let dev = unsafe { OwnedFd::from_raw_fd(dev) };
    // SAFETY: USERFAULTFD_IOC_NEW takes the flags by value and returns a new descriptor.
    let fd = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as _, flags) };
    if fd < 0 {
        return Err(UffdError::Unavailable {
            syscall,
            device: last_os_error(),
        });
    }
    // SAFETY: `fd` is a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The `UFFDIO_API` handshake; returns what the kernel granted.
fn api(fd: &OwnedFd, features: u64) -> io::Result<UffdioApi> {
    let mut api = UffdioApi {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes one `uffdio_api`, which `api` is (layout tested).
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API as _, &mut api) };
    if rc < 0 {
        return Err(last_os_error());
    }
    Ok(api)
}

const REQUIRED: u64 =
    UFFD_FEATURE_EVENT_UNMAP | UFFD_FEATURE_EVENT_REMAP | UFFD_FEATURE_EVENT_REMOVE;

/// A VMA, described for errors: the kind and its name.
fn describe(v: &Vma, m: Mapping) -> String {
    if v.name.is_empty() {
        m.describe().to_string()
    } else {
        format!("{} ({})", m.describe(), v.name)
    }
}

/// The [`Uncovered`] operation for a mapping the source can register but not protect.
fn blind_spot(m: Mapping) -> Option<(&'static str, &'static str)> {
    match m {
        Mapping::Shmem => Some((
            "a shmem (tmpfs, memfd, hugetlbfs) file mapping",
            "fallocate(PUNCH_HOLE) or ftruncate of the file",
        )),
        Mapping::SysV => Some((
            "a SysV shared memory segment",
            "shmat(SHM_REMAP) over it or shmdt",
        )),
        _ => None,
    }
}

impl UffdSource {
    /// Opens a userfaultfd, negotiates the UNMAP/REMAP/REMOVE events (and write-protect
    /// mode on shmem where offered) and starts the reader thread.
    pub fn new(options: Options) -> Result<Arc<UffdSource>, UffdError> {
        // A first descriptor only to learn the offered features: the API handshake can be
        // done once per descriptor.
        let offered = api(&open_uffd()?, 0)
            .map_err(|source| UffdError::Setup {
                step: "UFFDIO_API (probe)",
                source,
            })?
            .features;
        if offered & REQUIRED != REQUIRED {
            return Err(UffdError::MissingFeatures {
                missing: REQUIRED & !offered,
                offered,
                what: "UNMAP/REMAP/REMOVE events",
            });
        }
        // EVENT_FORK is deliberately not requested: see the crate docs.
        let wanted = REQUIRED | (offered & UFFD_FEATURE_WP_HUGETLBFS_SHMEM);
        let uffd = open_uffd()?;
        let granted = api(&uffd, wanted).map_err(|source| UffdError::Setup {
            step: "UFFDIO_API",
            source,
        })?;
        if granted.ioctls & (1 << 0x00) == 0 {
            return Err(UffdError::MissingFeatures {
                missing: 1,
                offered: granted.ioctls,
                what: "UFFDIO_REGISTER",
            });
        }
        // SAFETY: eventfd takes an initial value and flags, returns a new descriptor or -1.
        let stop = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if stop < 0 {
            return Err(UffdError::Setup {
                step: "eventfd",
                source: last_os_error(),
            });
        }
        // SAFETY: `stop` is a fresh descriptor we own.
        let stop = unsafe { OwnedFd::from_raw_fd(stop) };
        let mut child_slots = Vec::new();
        child_slots.extend(close_in_children(uffd.as_raw_fd()));
        child_slots.extend(close_in_children(stop.as_raw_fd()));
        let shared = Arc::new(Shared {
            uffd: ProcessFd::new(uffd),
            stop: ProcessFd::new(stop),
            ring: ArrayQueue::new(options.ring_capacity.max(1)),
            overflow: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            settled: AtomicU64::new(0),
            reader_gone: AtomicBool::new(false),
            eager: OnceLock::new(),
            unmap_events: AtomicU64::new(0),
            remap_events: AtomicU64::new(0),
            remove_events: AtomicU64::new(0),
            faults_resolved: AtomicU64::new(0),
            overflows: AtomicU64::new(0),
            fork_notices: AtomicU64::new(0),
        });
        notice_forks(&shared);
        let reader_shared = shared.clone();
        let reader = std::thread::Builder::new()
            .name("umm-uffd".into())
            .spawn(move || reader_loop(&reader_shared))
            .map_err(|source| {
                for &slot in &child_slots {
                    CHILD_CLOSES[slot].store(-1, Ordering::Release);
                }
                UffdError::Setup {
                    step: "spawning the reader thread",
                    source,
                }
            })?;
        let vmas = Vmas::new(options.procmap_query);
        let counted = maps::map_count().unwrap_or(0);
        let state = State {
            baseline: counted,
            counted,
            ..State::default()
        };
        tracing::debug!(
            features = granted.features,
            procmap_query = vmas.uses_procmap_query(),
            "userfaultfd source started"
        );
        Ok(Arc::new(UffdSource {
            shared,
            options,
            state: Mutex::new(state),
            vmas,
            max_map_count: maps::max_map_count(),
            attached: Mutex::new(None),
            unwatchable: AtomicU64::new(0),
            uncovered: AtomicU64::new(0),
            vma_refusals: AtomicU64::new(0),
            drain_lock: Mutex::new(()),
            reader_id: reader.thread().id(),
            reader: Mutex::new(Some(reader)),
            child_slots,
            pid: getpid(),
        }))
    }

    /// Also call `sink` from the reader thread for every event, right after recording it
    /// (once; later calls are ignored and return `false`). The sink must not unmap watched
    /// memory nor wait for a lock that a thread calling `munmap` can hold.
    pub fn set_eager_sink(&self, sink: Weak<dyn InvalidationSink>) -> bool {
        self.shared.eager.set(sink).is_ok()
    }

    /// Whether mappings are classified with the `PROCMAP_QUERY` ioctl (else by parsing
    /// `/proc/self/maps`).
    pub fn uses_procmap_query(&self) -> bool {
        self.vmas.uses_procmap_query()
    }

    /// Counters so far.
    pub fn stats(&self) -> UffdStats {
        let s = &self.shared;
        let st = self.state.lock();
        UffdStats {
            unmap_events: s.unmap_events.load(Ordering::Relaxed),
            remap_events: s.remap_events.load(Ordering::Relaxed),
            remove_events: s.remove_events.load(Ordering::Relaxed),
            faults_resolved: s.faults_resolved.load(Ordering::Relaxed),
            overflows: s.overflows.load(Ordering::Relaxed),
            fork_notices: s.fork_notices.load(Ordering::Relaxed),
            unwatchable: self.unwatchable.load(Ordering::Relaxed),
            uncovered: self.uncovered.load(Ordering::Relaxed),
            vma_refusals: self.vma_refusals.load(Ordering::Relaxed),
            watches: st.watches.len() as u64,
            spans: st.spans.len() as u64,
            vmas_added: st.added as u64,
            vma_budget: self.own_budget() as u64,
        }
    }

    /// VMAs this source may add: a quarter of `vm.max_map_count`.
    fn own_budget(&self) -> usize {
        self.max_map_count / 4
    }

    fn forked(&self) -> Option<UffdError> {
        let current = getpid();
        (current != self.pid).then_some(UffdError::Forked {
            owner: self.pid,
            current,
        })
    }

    /// Watches `range` (rounded out to pages) under `cookie`; the typed form of
    /// [`NotifierSource::watch`].
    pub fn try_watch(&self, cookie: u64, range: Range) -> Result<(), UffdError> {
        if let Some(e) = self.forked() {
            return Err(e);
        }
        let page = umm::page_size();
        let range = range.align_out(page).map_err(|_| UffdError::Range(range))?;
        let vmas = self
            .vmas
            .covering(range)
            .map_err(|source| UffdError::Maps { range, source })?;
        let mut at = range.start();
        for v in &vmas {
            if v.start > at {
                let hole = Range::from_bounds(at, v.start).map_err(|_| UffdError::Range(range))?;
                return Err(UffdError::NotMapped { range, hole });
            }
            at = v.end;
        }
        if at < range.end() {
            let hole = Range::from_bounds(at, range.end()).map_err(|_| UffdError::Range(range))?;
            return Err(UffdError::NotMapped { range, hole });
        }
        let mut widen = true;
        let mut lax_unregistrable = None;
        for v in &vmas {
            let m = v.mapping();
            match m {
                Mapping::PrivateAnonymous | Mapping::SharedAnonymous => {}
                Mapping::Shmem | Mapping::SysV => {
                    if self.options.strict {
                        self.uncovered.fetch_add(1, Ordering::Relaxed);
                        let (mapping, operation) = blind_spot(m).expect("shmem and SysV have one");
                        return Err(UffdError::Uncovered(Uncovered {
                            range,
                            mapping,
                            operation,
                        }));
                    }
                    widen &= m == Mapping::Shmem;
                }
                Mapping::SharedFile | Mapping::PrivateFile => {
                    let cause = if m == Mapping::SharedFile {
                        "userfaultfd cannot register shared mappings of regular files (the \
                         kernel refuses them with EINVAL), so it would see no munmap there; \
                         use the kernel module source"
                    } else {
                        "userfaultfd cannot register private file mappings in write-protect \
                         mode (EINVAL), and would not see an ftruncate of the file; copy the \
                         data to anonymous memory or use the kernel module source"
                    };
                    if self.options.strict {
                        self.uncovered.fetch_add(1, Ordering::Relaxed);
                        return Err(UffdError::Unsupported {
                            range,
                            mapping: describe(v, m),
                            cause,
                        });
                    }
                    lax_unregistrable = Some(describe(v, m));
                }
                Mapping::Special => widen = false,
            }
        }
        if let Some(mapping) = lax_unregistrable {
            self.unwatchable.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%range, mapping, "not covered by userfaultfd (Options::strict is off)");
            return Ok(());
        }
        let (first, last) = match (vmas.first(), vmas.last()) {
            (Some(f), Some(l)) => (f, l),
            _ => unreachable!("a mapped range has a VMA"),
        };
        let span_align = self.options.span.max(page).next_power_of_two();
        let span = if widen && span_align > page {
            let start = (range.start() & !(span_align - 1)).max(first.start);
            let end = range
                .end()
                .checked_next_multiple_of(span_align)
                .unwrap_or(usize::MAX & !(page - 1))
                .min(last.end);
            Range::from_bounds(start, end).map_err(|_| UffdError::Range(range))?
        } else {
            range
        };
        let splits = usize::from(span.start() > first.start) + usize::from(span.end() < last.end);
        let mut st = self.state.lock();
        let key = (span.start(), span.end());
        if splits > 0 && !st.spans.contains_key(&key) {
            self.check_budget(&mut st, range, splits)?;
        }
        let mut reg = UffdioRegister {
            range: UffdioRange {
                start: span.start() as u64,
                len: span.len() as u64,
            },
            mode: UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes one `uffdio_register` (layout tested).
        // Registering pages that are already registered with this descriptor is allowed
        // (done every time: a span we registered before may have been unmapped and
        // mapped afresh since, unregistered).
        let rc = unsafe { libc::ioctl(self.shared.uffd.raw(), UFFDIO_REGISTER as _, &mut reg) };
        if rc < 0 {
            let source = last_os_error();
            let mapping = describe(first, first.mapping());
            if self.options.strict {
                return Err(UffdError::Register {
                    range,
                    mapping,
                    source,
                });
            }
            self.unwatchable.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%range, mapping, error = %source, "range not covered by userfaultfd");
            return Ok(());
        }
        if let Some(old) = st.watches.insert(cookie, Watch { span }) {
            // A cookie watched twice (not done by a manager): drop the old registration.
            self.release(&mut st, old.span);
        }
        let s = st.spans.entry(key).or_insert(Span { refs: 0, splits });
        s.refs += 1;
        if s.refs == 1 {
            st.added += splits;
        }
        Ok(())
    }

    /// Refuses a registration that may add `splits` VMAs past the budget: the source's
    /// own quarter of `vm.max_map_count`, and three quarters of it for the whole process.
    /// The source's share is the smaller of the splits its live spans may have caused
    /// (adjacent spans merge, so this overestimates) and the process's growth since the
    /// source was made; the process is counted again every 512 splits and before refusing.
    fn check_budget(&self, st: &mut State, range: Range, splits: usize) -> Result<(), UffdError> {
        let max = self.max_map_count;
        let total_cap = max - max / 4;
        let estimate = |st: &State| (st.counted + st.added).saturating_sub(st.added_at_count);
        let own = |st: &State| st.added.min(estimate(st).saturating_sub(st.baseline));
        let over =
            |st: &State| own(st) + splits > self.own_budget() || estimate(st) + splits > total_cap;
        if (over(st) && st.added != st.added_at_count) || st.added >= st.added_at_count + 512 {
            if let Ok(n) = maps::map_count() {
                st.counted = n;
                st.added_at_count = st.added;
            }
        }
        if over(st) {
            self.vma_refusals.fetch_add(1, Ordering::Relaxed);
            return Err(UffdError::VmaBudget {
                range,
                added: own(st),
                budget: self.own_budget(),
                map_count: estimate(st),
                max_map_count: max,
            });
        }
        Ok(())
    }

    /// Drops one watch's reference to `span`; unregisters the parts of it no other live
    /// span covers when it was the last.
    fn release(&self, st: &mut State, span: Range) {
        let key = (span.start(), span.end());
        let Some(s) = st.spans.get_mut(&key) else {
            return;
        };
        s.refs -= 1;
        if s.refs > 0 {
            return;
        }
        let splits = s.splits;
        st.spans.remove(&key);
        st.added -= splits;
        let others = st
            .spans
            .keys()
            .filter_map(|&(a, b)| Range::from_bounds(a, b).ok());
        for part in uncovered(span, others) {
            self.unregister(part);
        }
    }

    /// Drops every watch and registration (the manager served went away).
    fn unwatch_all(&self) {
        let mut st = self.state.lock();
        let spans: Vec<Range> = st
            .spans
            .keys()
            .filter_map(|&(a, b)| Range::from_bounds(a, b).ok())
            .collect();
        st.watches.clear();
        st.spans.clear();
        st.added = 0;
        for span in spans {
            self.unregister(span);
        }
    }

    fn unregister_exact(&self, range: Range) -> io::Result<()> {
        let r = UffdioRange {
            start: range.start() as u64,
            len: range.len() as u64,
        };
        // SAFETY: UFFDIO_UNREGISTER reads one `uffdio_range` (layout tested).
        let rc = unsafe { libc::ioctl(self.shared.uffd.raw(), UFFDIO_UNREGISTER as _, &r) };
        if rc < 0 {
            Err(last_os_error())
        } else {
            Ok(())
        }
    }

    /// Unregisters what is still registered of `range`. The kernel refuses (`EINVAL`) a
    /// range with no VMA left (it was unmapped: the usual case after an UNMAP event) or one
    /// that now holds a mapping userfaultfd cannot register; then each registrable VMA
    /// left in it is unregistered on its own.
    fn unregister(&self, range: Range) {
        let Err(error) = self.unregister_exact(range) else {
            return;
        };
        let vmas = self.vmas.covering(range).unwrap_or_default();
        let mut left = 0;
        for v in vmas {
            let m = v.mapping();
            if !matches!(
                m,
                Mapping::PrivateAnonymous | Mapping::SharedAnonymous | Mapping::Shmem
            ) {
                continue;
            }
            let Ok(vr) = Range::from_bounds(v.start, v.end) else {
                continue;
            };
            if let Some(part) = vr.intersection(&range) {
                left += 1;
                if let Err(e) = self.unregister_exact(part) {
                    tracing::warn!(range = %part, mapping = describe(&v, m), error = %e, "UFFDIO_UNREGISTER failed; the range stays registered until the source is dropped");
                }
            }
        }
        if left == 0 {
            tracing::trace!(%range, %error, "UFFDIO_UNREGISTER: nothing registrable is mapped there any more (unmapped since)");
        }
    }
}

/// The parts of `range` that no range of `others` covers (all page-aligned).
fn uncovered(range: Range, others: impl Iterator<Item = Range>) -> Vec<Range> {
    let mut covered: Vec<Range> = others.filter_map(|o| o.intersection(&range)).collect();
    covered.sort();
    let mut out = Vec::new();
    let mut at = range.start();
    for c in covered {
        if c.start() > at {
            out.extend(Range::from_bounds(at, c.start()).ok());
        }
        at = at.max(c.end());
    }
    if at < range.end() {
        out.extend(Range::from_bounds(at, range.end()).ok());
    }
    out
}

impl NotifierSource for UffdSource {
    fn name(&self) -> &str {
        "userfaultfd"
    }

    /// Refuses a second manager ([`UffdError::AlreadyAttached`]) until the first detached,
    /// and any manager in a fork child ([`UffdError::Forked`]).
    fn attach(&self, manager: ManagerId) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        if let Some(e) = self.forked() {
            return Err(e.into());
        }
        let mut attached = self.attached.lock();
        match *attached {
            Some(a) => Err(UffdError::AlreadyAttached {
                attached: a,
                refused: manager,
            }
            .into()),
            None => {
                *attached = Some(manager);
                Ok(())
            }
        }
    }

    /// The manager's watches end with it: every registration is dropped and the events
    /// not drained yet are discarded, so the next manager starts clean. In a fork child
    /// nothing is touched.
    fn detach(&self, manager: ManagerId) {
        if self.forked().is_some() {
            return;
        }
        {
            let mut attached = self.attached.lock();
            if *attached != Some(manager) {
                return;
            }
            *attached = None;
        }
        self.unwatch_all();
        let _one_at_a_time = self.drain_lock.lock();
        while self.shared.ring.pop().is_some() {}
        self.shared.overflow.store(false, Ordering::Release);
    }

    fn watch(
        &self,
        cookie: u64,
        range: Range,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        match self.try_watch(cookie, range) {
            Ok(()) => Ok(()),
            // The manager recognises the bare `Uncovered` (umm::Error::Uncovered).
            Err(UffdError::Uncovered(u)) => Err(Box::new(u)),
            Err(e) => Err(e.into()),
        }
    }

    /// In a fork child this does nothing: the registration is the parent's (the
    /// userfaultfd acts on the mm of the process that created it).
    fn unwatch(&self, cookie: u64, _range: Range) {
        if self.forked().is_some() {
            return;
        }
        let mut st = self.state.lock();
        if let Some(w) = st.watches.remove(&cookie) {
            self.release(&mut st, w.span);
        }
    }

    fn generation(&self) -> Option<&AtomicU64> {
        Some(&self.shared.generation)
    }

    fn drain(&self, sink: &dyn InvalidationSink) {
        if self.forked().is_some() {
            // No reader here, and nothing of the parent's is ours to report.
            return;
        }
        let _one_at_a_time = self.drain_lock.lock();
        // Wait (bounded) until the reader recorded every event announced so far: the
        // causing syscall may have returned already, its range must be in the ring now.
        let target = self.shared.generation.load(Ordering::Acquire);
        let deadline = std::time::Instant::now() + SETTLE_LIMIT;
        let mut spins = 0u32;
        while self.shared.settled.load(Ordering::Acquire) < target
            && !self.shared.reader_gone.load(Ordering::Acquire)
        {
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
            } else if std::time::Instant::now() < deadline {
                std::thread::yield_now();
            } else {
                tracing::error!("userfaultfd reader did not settle in {SETTLE_LIMIT:?}; invalidating everything");
                sink.invalidate_all();
                break;
            }
        }
        if self.shared.overflow.swap(false, Ordering::AcqRel) {
            // Ranges still in the ring are covered by this too; drop them.
            while self.shared.ring.pop().is_some() {}
            sink.invalidate_all();
            return;
        }
        while let Some(range) = self.shared.ring.pop() {
            sink.invalidate(range);
        }
    }
}

impl Drop for UffdSource {
    fn drop(&mut self) {
        if getpid() != self.pid {
            // A fork child's copy: the descriptors, the reader and the registrations are
            // the parent's. Write nothing, unregister nothing, join nothing (the
            // descriptors were closed at fork, see `close_in_child`).
            return;
        }
        // Unregister explicitly (not only by closing): a descriptor copy that survives
        // elsewhere (a child forked by a raw syscall, which skips the atfork handler)
        // would keep the registrations alive with no reader.
        self.unwatch_all();
        for &slot in &self.child_slots {
            CHILD_CLOSES[slot].store(-1, Ordering::Release);
        }
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from `one` to our eventfd.
        unsafe { libc::write(self.shared.stop.raw(), (&one as *const u64).cast(), 8) };
        let on_reader = std::thread::current().id() == self.reader_id;
        if let Some(handle) = self.reader.lock().take() {
            // On the reader itself (the eager sink dropped the last reference) joining
            // would wait for ourselves.
            if !on_reader && handle.join().is_err() {
                tracing::error!("userfaultfd reader thread panicked");
            }
        }
        // The descriptor closes when `shared` drops (here, or when the reader exits):
        // closing drops every registration and wakes any thread still waiting on an event.
    }
}

/// How long [`NotifierSource::drain`] waits for the reader to record announced events
/// (the reader never blocks between announcing and settling; this only bounds scheduling).
const SETTLE_LIMIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Events read per `read(2)`.
const BATCH: usize = 16;

fn reader_loop(s: &Shared) {
    reader_rounds(s);
    s.reader_gone.store(true, Ordering::Release);
}

fn reader_rounds(s: &Shared) {
    let mut msgs = [UffdMsg::default(); BATCH];
    loop {
        let mut fds = [
            libc::pollfd {
                fd: s.uffd.raw(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: s.stop.raw(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is an array of two valid pollfd structs.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if rc < 0 {
            if io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            tracing::error!(error = %last_os_error(), "poll on userfaultfd failed; reader stops");
            return;
        }
        let stopping = fds[1].revents != 0;
        // Announce before reading: the read releases the blocked syscalls.
        let announced = s.generation.fetch_add(1, Ordering::AcqRel) + 1;
        // Read until EAGAIN (also when stopping: release everyone queued so far).
        loop {
            // SAFETY: reads at most size_of_val(&msgs) bytes into `msgs`, an array of
            // plain-old-data `uffd_msg` mirrors.
            let n = unsafe {
                libc::read(
                    s.uffd.raw(),
                    msgs.as_mut_ptr().cast(),
                    std::mem::size_of_val(&msgs),
                )
            };
            if n <= 0 {
                break;
            }
            let count = n as usize / std::mem::size_of::<UffdMsg>();
            for msg in &msgs[..count] {
                handle(s, msg);
            }
        }
        // Release: a drain that sees `settled >= announced` sees every ring entry above.
        // fetch_max: a fork notice may have settled a later generation meanwhile.
        s.settled.fetch_max(announced, Ordering::AcqRel);
        if stopping {
            return;
        }
    }
}

fn record(s: &Shared, start: u64, end: u64) {
    let Ok(range) = Range::from_bounds(start as usize, end as usize) else {
        return;
    };
    if s.ring.push(range).is_err() {
        s.overflow.store(true, Ordering::Release);
        s.overflows.fetch_add(1, Ordering::Relaxed);
    }
    if let Some(sink) = s.eager.get().and_then(Weak::upgrade) {
        sink.invalidate(range);
    }
}

fn handle(s: &Shared, msg: &UffdMsg) {
    let [a, b, c] = msg.arg;
    match msg.event {
        UFFD_EVENT_UNMAP => {
            s.unmap_events.fetch_add(1, Ordering::Relaxed);
            record(s, a, b);
        }
        UFFD_EVENT_REMOVE => {
            s.remove_events.fetch_add(1, Ordering::Relaxed);
            record(s, a, b);
        }
        UFFD_EVENT_REMAP => {
            s.remap_events.fetch_add(1, Ordering::Relaxed);
            // The old place is gone; the new place had whatever was there unmapped.
            record(s, a, a.saturating_add(c));
            record(s, b, b.saturating_add(c));
        }
        UFFD_EVENT_PAGEFAULT => {
            let page = umm::page_size() as u64;
            let wp = UffdioWriteprotect {
                range: UffdioRange {
                    start: b & !(page - 1),
                    len: page,
                },
                mode: 0,
            };
            // SAFETY: UFFDIO_WRITEPROTECT reads one `uffdio_writeprotect`; mode 0 clears
            // the protection and wakes the faulting thread.
            let rc = unsafe { libc::ioctl(s.uffd.raw(), UFFDIO_WRITEPROTECT as _, &wp) };
            if rc < 0 {
                // SAFETY: UFFDIO_WAKE reads one `uffdio_range`.
                unsafe { libc::ioctl(s.uffd.raw(), UFFDIO_WAKE as _, &wp.range) };
            }
            s.faults_resolved.fetch_add(1, Ordering::Relaxed);
        }
        _ => {
            // Unknown (or an unrequested fork): be safe, invalidate everything.
            s.overflow.store(true, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(a: usize, b: usize) -> Range {
        Range::from_bounds(a, b).unwrap()
    }

    #[test]
    fn uncovered_subtracts_other_watches() {
        let all = r(0x1000, 0x9000);
        assert_eq!(uncovered(all, std::iter::empty()), vec![all]);
        assert_eq!(
            uncovered(
                all,
                [r(0x2000, 0x3000), r(0x2800, 0x4000), r(0x8000, 0xa000)].into_iter()
            ),
            vec![r(0x1000, 0x2000), r(0x4000, 0x8000)]
        );
        assert!(uncovered(all, [r(0, 0x10000)].into_iter()).is_empty());
    }
}
