//! # umm-ucx: UCX's registration cache, invalidated by umm's notifier sources
//!
//! UCX keeps RDMA registrations in its registration cache (`rcache`, in `libucs`) and drops
//! them when its memory hooks (UCM: patched `munmap`, `mmap`, `shmat`, `madvise`, ... in
//! libc) report an unmap. Changes that do not go through those libc functions are not
//! reported: `syscall(SYS_munmap)` + `syscall(SYS_mmap)` (static binaries, Go, some runtimes),
//! `fallocate(PUNCH_HOLE)` on a shared tmpfs mapping. The cache then hands out the old
//! registration and the NIC sends the old pages, with no error.
//!
//! This crate feeds the rcache what umm's notifier sources see, through UCX's
//! **external-event API** (`ucm/api/ucm.h`):
//!
//! 1. [`install`] declares `UCM_EVENT_VM_UNMAPPED` external with
//!    `ucm_set_external_event`, so UCX does not install its own unmap hooks for the
//!    rcache (set `UMM_UCX_KEEP_UCM_HOOKS=1` to keep them as well); it must run before
//!    `ucp_init` (the LD_PRELOAD constructor does).
//! 2. **What the rcache caches is watched where it becomes a registration**: the
//!    `ibv_reg_mr`, `ibv_reg_mr_iova` and `ibv_reg_mr_iova2` calls UCX's `uct_ib` makes
//!    (this library defines them and forwards to libibverbs). The rcache tells no one
//!    which ranges it holds, and it merges and aligns regions, so the range UCX asked
//!    for (`uct_md_mem_reg`) is not what is pinned; the range given to `ibv_reg_mr` is
//!    exactly the memory the NIC translates. Each one is watched with the source before
//!    it is registered and unwatched when `ibv_dereg_mr` releases it.
//! 3. **Events reach the rcache before it is asked again**: the kernel module and the
//!    userfaultfd source record an event and bump a generation counter before the causing
//!    syscall returns; this library also defines `uct_md_mem_reg` (the call through which
//!    UCP asks UCT's memory domain, hence the rcache, for every zero-copy send), compares
//!    the generation there and, when it moved, drains the source into `ucm_vm_munmap` for
//!    every changed range, on the calling thread, before forwarding. No thread is started.
//!
//! ## Source, strictness
//!
//! `UMM_SOURCE` chooses as in `umm-auto`: the kernel module (`kmod`) by default,
//! userfaultfd (`uffd`) where the module is absent. `interpose` and `none` are refused:
//! UCX's own hooks already are an interposition source. A range the source cannot protect
//! (userfaultfd: shared tmpfs/memfd and SysV shm, file mappings) is **refused**: the
//! `ibv_reg_mr` fails with `EFAULT` (nothing is registered, UCX reports a registration
//! error for that buffer, no stale translation can exist). UCX offers no way to bypass its
//! cache for one range, so refusing the registration is the only safe answer; the reason
//! is logged (`tracing`, target `umm_ucx`) and counted in [`Stats::refused`].
//! `UMM_UCX_STRICT=0` registers such ranges anyway, counted in [`Stats::unprotected`].
//!
//! ## Use
//!
//! Unmodified programs: `LD_PRELOAD=libumm_ucx.so` (the constructor installs when the
//! library's name is in `LD_PRELOAD`, unless `UMM_UCX_AUTO=0`). Programs linking it call
//! `umm_ucx_install()` (header `include/umm_ucx.h`) before `ucp_init`, and link it before
//! `-lucp` so its `uct_md_mem_reg` and `ibv_reg_mr*` come first. From Rust:
//!
//! ```no_run
//! let monitor = umm_ucx::install()?;          // before ucp_init
//! println!("umm-ucx: {} source", monitor.source_name());
//! // ... UCP sends; monitor.stats() counts watches and invalidations
//! # Ok::<(), umm_ucx::UcxError>(())
//! ```
//!
//! ## Threads and locks
//!
//! `ucm_vm_munmap` runs UCX's handlers under UCM's event lock (a read lock); the rcache's
//! handler `trywrlock`s its page table and queues the range when it is busy, and every
//! `ucs_rcache_get` checks that queue first, so delivering from any thread is safe. This
//! library never holds its own lock while calling `ucm_vm_munmap`: the rcache may
//! deregister from inside the handler, which re-enters `ibv_dereg_mr` here.
//!
//! ## Fork
//!
//! The sources belong to the process that opened them. In a fork child every watch fails,
//! so in strict mode the child's registrations are refused (the child has no protection to
//! offer); a child that uses UCX should `exec` or call [`install`] in a fresh process.

mod hooks;
mod ucm;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use umm::{InvalidationSink, NotifierSource, Range};
use umm_auto::{Preference, SourceKind};

pub use ucm::UCM_EVENT_VM_UNMAPPED;

/// Why [`install`] failed.
#[derive(Debug, thiserror::Error)]
pub enum UcxError {
    /// `UMM_SOURCE` does not parse.
    #[error("UMM_SOURCE: {0}")]
    Preference(#[from] umm_auto::AutoError),
    /// `UMM_SOURCE` names a source this monitor does not use.
    #[error("UMM_SOURCE={0}: umm-ucx uses the kernel module or userfaultfd (UCX's own hooks already interpose libc)")]
    UnusableSource(&'static str),
    /// The kernel module could not be opened (and userfaultfd was not allowed or failed).
    #[error("kernel module: {0}")]
    Kmod(Box<umm_kmod::Error>),
    /// userfaultfd could not be set up.
    #[error("userfaultfd: {0}")]
    Uffd(Box<umm_uffd::UffdError>),
    /// UCX's calls would not reach this library's hooks: another object defines them
    /// first in the process's lookup order. UCX's own hooks are left in place.
    #[error("{symbol} resolves to {object}, not to umm-ucx: preload libumm_ucx.so first, or link -lumm_ucx before -lucp and -libverbs (and do not preload libibverbs)")]
    Bypassed {
        /// The hooked function.
        symbol: &'static str,
        /// Where the process finds it first.
        object: String,
    },
    /// Neither source is available.
    #[error("no notifier source: kernel module: {kmod}; userfaultfd: {uffd}")]
    NoSource {
        /// Why the kernel module failed.
        kmod: Box<umm_kmod::Error>,
        /// Why userfaultfd failed.
        uffd: Box<umm_uffd::UffdError>,
    },
}

/// Counters of one installed monitor ([`Monitor::stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Stats {
    /// Registrations watched so far.
    pub watched: u64,
    /// Registrations watched now (registered, not yet deregistered).
    pub live: u64,
    /// Registrations refused because the source cannot protect their range (strict mode).
    pub refused: u64,
    /// Registrations made without protection (`UMM_UCX_STRICT=0`).
    pub unprotected: u64,
    /// Times the source was drained (its generation had moved).
    pub drains: u64,
    /// Ranges handed to `ucm_vm_munmap`.
    pub invalidations: u64,
    /// Overflows of the source (each invalidated every watched range).
    pub invalidate_all: u64,
}

/// The installed monitor: the source, the watched registrations, the counters.
pub struct Monitor {
    source: Arc<dyn NotifierSource>,
    kind: SourceKind,
    strict: bool,
    external: bool,
    /// The source generation at the last drain.
    seen: AtomicU64,
    next_cookie: AtomicU64,
    /// `struct ibv_mr *` -> (cookie, range).
    mrs: Mutex<HashMap<usize, (u64, Range)>>,
    watched: AtomicU64,
    refused: AtomicU64,
    unprotected: AtomicU64,
    drains: AtomicU64,
    invalidations: AtomicU64,
    invalidate_all: AtomicU64,
}

impl std::fmt::Debug for Monitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Monitor")
            .field("source", &self.kind.name())
            .field("strict", &self.strict)
            .field("external", &self.external)
            .field("stats", &self.stats())
            .finish()
    }
}

static MONITOR: OnceLock<Monitor> = OnceLock::new();
static INSTALL: Mutex<()> = Mutex::new(());

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn env_flag(name: &str, default: bool) -> bool {
    match std::env::var(name) {
        Ok(v) => !matches!(v.as_str(), "0" | "n" | "no" | "off" | "false"),
        Err(_) => default,
    }
}

/// Opens the source `pref` asks for: the kernel module, else userfaultfd.
fn open_source(pref: Preference) -> Result<(Arc<dyn NotifierSource>, SourceKind), UcxError> {
    let kmod = || -> Result<Arc<dyn NotifierSource>, umm_kmod::Error> {
        Ok(Arc::new(umm_kmod::KmodSource::open()?))
    };
    let uffd = || -> Result<Arc<dyn NotifierSource>, umm_uffd::UffdError> {
        let s: Arc<dyn NotifierSource> = umm_uffd::UffdSource::new(umm_uffd::Options::default())?;
        Ok(s)
    };
    match pref {
        Preference::Only(SourceKind::Kmod) => kmod()
            .map(|s| (s, SourceKind::Kmod))
            .map_err(|e| UcxError::Kmod(Box::new(e))),
        Preference::Only(SourceKind::Uffd) => uffd()
            .map(|s| (s, SourceKind::Uffd))
            .map_err(|e| UcxError::Uffd(Box::new(e))),
        Preference::Only(SourceKind::Interpose) => Err(UcxError::UnusableSource("interpose")),
        Preference::None => Err(UcxError::UnusableSource("none")),
        Preference::Auto => match kmod() {
            Ok(s) => Ok((s, SourceKind::Kmod)),
            Err(k) => match uffd() {
                Ok(s) => {
                    tracing::info!(target: "umm_ucx", kmod = %k, "kernel module unavailable, using userfaultfd");
                    Ok((s, SourceKind::Uffd))
                }
                Err(u) => Err(UcxError::NoSource {
                    kmod: Box::new(k),
                    uffd: Box::new(u),
                }),
            },
        },
    }
}

/// Installs the monitor (once per process; later calls return the installed one): opens
/// the source `UMM_SOURCE` asks for and declares `UCM_EVENT_VM_UNMAPPED` external. Call it
/// before `ucp_init`.
pub fn install() -> Result<&'static Monitor, UcxError> {
    let _one = lock(&INSTALL);
    if let Some(m) = MONITOR.get() {
        return Ok(m);
    }
    // Without the hooks, declaring the event external would leave the rcache with no
    // unmap events at all: check first.
    hooks::hooks_reachable().map_err(|(symbol, object)| UcxError::Bypassed { symbol, object })?;
    let (source, kind) = open_source(Preference::from_env()?)?;
    let external = !env_flag("UMM_UCX_KEEP_UCM_HOOKS", false);
    if external {
        ucm::set_external_vm_unmapped();
    }
    let monitor = Monitor::new(source, kind, env_flag("UMM_UCX_STRICT", true), external);
    tracing::info!(target: "umm_ucx", source = kind.name(), external, strict = monitor.strict, "umm-ucx installed");
    Ok(MONITOR.get_or_init(|| monitor))
}

/// The installed monitor, if [`install`] succeeded.
pub fn installed() -> Option<&'static Monitor> {
    MONITOR.get()
}

/// What a registration hook should do after [`Monitor::watch`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Watch {
    /// Watched under this cookie: register, then [`Monitor::registered`] or
    /// [`Monitor::unwatch`].
    Cookie(u64),
    /// Register without a watch (non-strict mode, counted).
    Unprotected,
    /// Refuse the registration.
    Refuse,
}

impl Monitor {
    fn new(
        source: Arc<dyn NotifierSource>,
        kind: SourceKind,
        strict: bool,
        external: bool,
    ) -> Monitor {
        let seen = source.generation().map_or(0, |g| g.load(Ordering::Acquire));
        Monitor {
            source,
            kind,
            strict,
            external,
            seen: AtomicU64::new(seen),
            next_cookie: AtomicU64::new(1),
            mrs: Mutex::new(HashMap::new()),
            watched: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            unprotected: AtomicU64::new(0),
            drains: AtomicU64::new(0),
            invalidations: AtomicU64::new(0),
            invalidate_all: AtomicU64::new(0),
        }
    }

    /// The source's name: `kmod` or `uffd`.
    pub fn source_name(&self) -> &'static str {
        self.kind.name()
    }

    /// Whether UCX's own unmap hooks were left out (`UCM_EVENT_VM_UNMAPPED` external).
    pub fn external(&self) -> bool {
        self.external
    }

    /// The counters so far.
    pub fn stats(&self) -> Stats {
        Stats {
            watched: self.watched.load(Ordering::Relaxed),
            live: lock(&self.mrs).len() as u64,
            refused: self.refused.load(Ordering::Relaxed),
            unprotected: self.unprotected.load(Ordering::Relaxed),
            drains: self.drains.load(Ordering::Relaxed),
            invalidations: self.invalidations.load(Ordering::Relaxed),
            invalidate_all: self.invalidate_all.load(Ordering::Relaxed),
        }
    }

    /// Delivers every event the source recorded since the last call to `ucm_vm_munmap`,
    /// on this thread; one atomic load when nothing happened.
    pub fn sync(&self) {
        let Some(generation) = self.source.generation() else {
            return;
        };
        let now = generation.load(Ordering::Acquire);
        if now == self.seen.load(Ordering::Acquire) {
            return;
        }
        self.drains.fetch_add(1, Ordering::Relaxed);
        self.source.drain(&Sink(self));
        self.seen.fetch_max(now, Ordering::AcqRel);
    }

    /// Starts watching `[addr, addr + len)` before it is registered.
    pub(crate) fn watch(&self, addr: usize, len: usize) -> Watch {
        let range = match Range::new(addr, len) {
            Ok(r) => r,
            // Empty or wrapping: nothing a NIC can translate; let libibverbs answer.
            Err(_) => return Watch::Unprotected,
        };
        let cookie = self.next_cookie.fetch_add(1, Ordering::Relaxed);
        match self.source.watch(cookie, range) {
            Ok(()) => {
                self.watched.fetch_add(1, Ordering::Relaxed);
                Watch::Cookie(cookie)
            }
            Err(e) if self.strict => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(target: "umm_ucx", %range, source = self.kind.name(), error = %e,
                    "registration refused: the source cannot protect this range");
                Watch::Refuse
            }
            Err(e) => {
                self.unprotected.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(target: "umm_ucx", %range, error = %e,
                    "registering without protection (UMM_UCX_STRICT=0)");
                Watch::Unprotected
            }
        }
    }

    /// The registration watched under `cookie` succeeded as `mr`.
    pub(crate) fn registered(&self, mr: usize, cookie: u64, addr: usize, len: usize) {
        if let Ok(range) = Range::new(addr, len) {
            lock(&self.mrs).insert(mr, (cookie, range));
        }
    }

    /// Stops the watch of a failed registration.
    pub(crate) fn unwatch(&self, cookie: u64, addr: usize, len: usize) {
        if let Ok(range) = Range::new(addr, len) {
            self.source.unwatch(cookie, range);
        }
    }

    /// `mr` is about to be deregistered: forget it and stop its watch.
    pub(crate) fn deregistering(&self, mr: usize) {
        let entry = lock(&self.mrs).remove(&mr);
        if let Some((cookie, range)) = entry {
            self.source.unwatch(cookie, range);
        }
    }

    fn forward(&self, range: Range) {
        self.invalidations.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(target: "umm_ucx", %range, "ucm_vm_munmap");
        ucm::vm_munmap(range.start(), range.len());
    }
}

/// Hands a source's events to UCX.
struct Sink<'a>(&'a Monitor);

impl InvalidationSink for Sink<'_> {
    fn invalidate(&self, range: Range) {
        self.0.forward(range);
    }

    fn invalidate_all(&self) {
        self.0.invalidate_all.fetch_add(1, Ordering::Relaxed);
        // Collected first: the rcache may deregister (re-entering ibv_dereg_mr here).
        let ranges: Vec<Range> = lock(&self.0.mrs).values().map(|&(_, r)| r).collect();
        for r in ranges {
            self.0.forward(r);
        }
    }
}

/// The constructor's decision: install when this library was preloaded and
/// `UMM_UCX_AUTO` is not `0`.
fn auto_install_wanted(ld_preload: Option<&str>, auto: Option<&str>) -> bool {
    let preloaded = ld_preload.is_some_and(|p| {
        p.split([' ', ':']).any(|lib| {
            lib.rsplit('/')
                .next()
                .is_some_and(|n| n.starts_with("libumm_ucx"))
        })
    });
    preloaded && !matches!(auto, Some("0" | "n" | "no" | "off"))
}

#[cfg(test)]
mod tests;
