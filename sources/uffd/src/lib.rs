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
//! * **fork.** `UFFD_FEATURE_EVENT_FORK` is **not** requested: the child loses the
//!   registrations (its unmaps never block), and a source used in a child refuses new
//!   watches with [`UffdError::Forked`]. The child's memory is not covered.
//! * **Shutdown.** Dropping the source stops the reader after it drained what was queued,
//!   then closes the userfaultfd, which drops every registration and wakes any thread
//!   still waiting on an event. A dropped source never leaves a thread blocked.
//! * **What cannot be watched.** Regular-file `MAP_SHARED` mappings and SysV shm refuse
//!   registration (`EINVAL`); [`Options::strict`] decides whether such a watch fails (and
//!   with it the `pin`) or is counted in [`UffdStats::unwatchable`] and left uncovered.
//! * **One per process.** A range can be registered with one userfaultfd only: a second
//!   source (say, of a second manager) watching the same memory gets `EBUSY`. Share one
//!   `Arc<UffdSource>` between managers.
//! * **Side effects.** Registering part of a mapping splits its VMA (glibc's `realloc` then
//!   cannot `mremap` it and copies instead); an in-place `mremap` grow gives no event and
//!   silently extends the registration; after a `REMAP` the registration follows the
//!   mapping to its new address until the source is dropped.
//! * **Cost.** Every event blocks the causing syscall until read: a 64 KiB munmap takes
//!   ~6 us alone and 10–60 us with the reader (DESIGN section 5).
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
//! With a manager: `manager.add_source(UffdSource::new(Options::default())?)`.

#![deny(missing_docs)]

pub mod sys;

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::thread::{JoinHandle, ThreadId};

use crossbeam_queue::ArrayQueue;
use parking_lot::Mutex;
use umm::{InvalidationSink, NotifierSource, Range};

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
    /// `UFFDIO_REGISTER` refused the range (file-backed shared mapping, SysV shm, a hole).
    #[error("cannot watch {range}: UFFDIO_REGISTER failed")]
    Register {
        /// The page-rounded range.
        range: Range,
        /// The OS error (`EINVAL` for unsupported mappings).
        #[source]
        source: io::Error,
    },
    /// The source was created in another process (this one is a fork child).
    #[error("userfaultfd source of process {owner} used in forked child {current}: it covers nothing here")]
    Forked {
        /// The creating process.
        owner: u32,
        /// This process.
        current: u32,
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
    /// `true` (default): a range the kernel refuses to register fails the watch (and the
    /// `pin`). `false`: it is counted in [`UffdStats::unwatchable`] and left uncovered.
    pub strict: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            ring_capacity: 4096,
            strict: true,
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
    /// Watches the kernel refused while [`Options::strict`] was off.
    pub unwatchable: u64,
    /// Live watches.
    pub watches: u64,
}

/// State shared by the source and its reader thread.
struct Shared {
    /// The userfaultfd; closed when the last of source and reader lets go, i.e. after the
    /// reader exited, so the descriptor number is never reused under the reader.
    uffd: OwnedFd,
    /// eventfd that tells the reader to stop.
    stop: OwnedFd,
    /// Ranges recorded by the reader, not yet drained.
    ring: ArrayQueue<Range>,
    /// Set by the reader when `ring` was full; the next drain invalidates everything.
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
}

/// The userfaultfd notifier source; see the [crate docs](crate).
pub struct UffdSource {
    shared: Arc<Shared>,
    options: Options,
    /// Live watches by cookie (page-rounded ranges). A kernel registration is dropped only
    /// for the pages no other watch covers.
    watches: Mutex<BTreeMap<u64, Range>>,
    unwatchable: AtomicU64,
    /// Serialises drains: a second drainer must not return (and let its cache hit proceed)
    /// while the first still holds popped ranges it has not delivered yet.
    drain_lock: Mutex<()>,
    reader: Mutex<Option<JoinHandle<()>>>,
    reader_id: ThreadId,
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
        let shared = Arc::new(Shared {
            uffd,
            // SAFETY: `stop` is a fresh descriptor we own.
            stop: unsafe { OwnedFd::from_raw_fd(stop) },
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
        });
        let reader_shared = shared.clone();
        let reader = std::thread::Builder::new()
            .name("umm-uffd".into())
            .spawn(move || reader_loop(&reader_shared))
            .map_err(|source| UffdError::Setup {
                step: "spawning the reader thread",
                source,
            })?;
        tracing::debug!(features = granted.features, "userfaultfd source started");
        Ok(Arc::new(UffdSource {
            shared,
            options,
            watches: Mutex::new(BTreeMap::new()),
            unwatchable: AtomicU64::new(0),
            drain_lock: Mutex::new(()),
            reader_id: reader.thread().id(),
            reader: Mutex::new(Some(reader)),
            // SAFETY: getpid has no preconditions.
            pid: unsafe { libc::getpid() } as u32,
        }))
    }

    /// Also call `sink` from the reader thread for every event, right after recording it
    /// (once; later calls are ignored and return `false`). The sink must not unmap watched
    /// memory nor wait for a lock that a thread calling `munmap` can hold.
    pub fn set_eager_sink(&self, sink: Weak<dyn InvalidationSink>) -> bool {
        self.shared.eager.set(sink).is_ok()
    }

    /// Counters so far.
    pub fn stats(&self) -> UffdStats {
        let s = &self.shared;
        UffdStats {
            unmap_events: s.unmap_events.load(Ordering::Relaxed),
            remap_events: s.remap_events.load(Ordering::Relaxed),
            remove_events: s.remove_events.load(Ordering::Relaxed),
            faults_resolved: s.faults_resolved.load(Ordering::Relaxed),
            overflows: s.overflows.load(Ordering::Relaxed),
            unwatchable: self.unwatchable.load(Ordering::Relaxed),
            watches: self.watches.lock().len() as u64,
        }
    }

    /// Watches `range` (rounded out to pages) under `cookie`; the typed form of
    /// [`NotifierSource::watch`].
    pub fn try_watch(&self, cookie: u64, range: Range) -> Result<(), UffdError> {
        // SAFETY: getpid has no preconditions.
        let current = unsafe { libc::getpid() } as u32;
        if current != self.pid {
            return Err(UffdError::Forked {
                owner: self.pid,
                current,
            });
        }
        let range = range
            .align_out(umm::page_size())
            .map_err(|_| UffdError::Range(range))?;
        let mut watches = self.watches.lock();
        let mut reg = UffdioRegister {
            range: UffdioRange {
                start: range.start() as u64,
                len: range.len() as u64,
            },
            mode: UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes one `uffdio_register` (layout tested).
        // Registering pages that are already registered with this descriptor is allowed.
        let rc =
            unsafe { libc::ioctl(self.shared.uffd.as_raw_fd(), UFFDIO_REGISTER as _, &mut reg) };
        if rc < 0 {
            let source = last_os_error();
            if self.options.strict {
                return Err(UffdError::Register { range, source });
            }
            self.unwatchable.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%range, error = %source, "range not covered by userfaultfd");
            return Ok(());
        }
        watches.insert(cookie, range);
        Ok(())
    }

    fn unregister(&self, range: Range) {
        let r = UffdioRange {
            start: range.start() as u64,
            len: range.len() as u64,
        };
        // SAFETY: UFFDIO_UNREGISTER reads one `uffdio_range` (layout tested).
        let rc = unsafe { libc::ioctl(self.shared.uffd.as_raw_fd(), UFFDIO_UNREGISTER as _, &r) };
        if rc < 0 {
            // Typically the range is no longer mapped (the kernel already dropped it).
            tracing::trace!(%range, error = %last_os_error(), "UFFDIO_UNREGISTER");
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

    fn watch(
        &self,
        cookie: u64,
        range: Range,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        self.try_watch(cookie, range).map_err(Into::into)
    }

    fn unwatch(&self, cookie: u64, _range: Range) {
        let mut watches = self.watches.lock();
        let Some(range) = watches.remove(&cookie) else {
            return;
        };
        for part in uncovered(range, watches.values().copied()) {
            self.unregister(part);
        }
    }

    fn generation(&self) -> Option<&AtomicU64> {
        Some(&self.shared.generation)
    }

    fn drain(&self, sink: &dyn InvalidationSink) {
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
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from `one` to our eventfd.
        unsafe { libc::write(self.shared.stop.as_raw_fd(), (&one as *const u64).cast(), 8) };
        // SAFETY: getpid has no preconditions.
        let same_process = unsafe { libc::getpid() } as u32 == self.pid;
        let on_reader = std::thread::current().id() == self.reader_id;
        if let Some(handle) = self.reader.lock().take() {
            // In a fork child the reader thread does not exist; on the reader itself (the
            // eager sink dropped the last reference) joining would wait for ourselves.
            if same_process && !on_reader && handle.join().is_err() {
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
                fd: s.uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: s.stop.as_raw_fd(),
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
                    s.uffd.as_raw_fd(),
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
        s.settled.store(announced, Ordering::Release);
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
            let rc = unsafe { libc::ioctl(s.uffd.as_raw_fd(), UFFDIO_WRITEPROTECT as _, &wp) };
            if rc < 0 {
                // SAFETY: UFFDIO_WAKE reads one `uffdio_range`.
                unsafe { libc::ioctl(s.uffd.as_raw_fd(), UFFDIO_WAKE as _, &wp.range) };
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
