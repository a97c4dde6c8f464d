//! # umm-interpose: invalidate before `munmap` and friends run
//!
//! Hooks for `munmap`, `mremap`, `madvise` (`MADV_DONTNEED`, `MADV_FREE`, `MADV_REMOVE`,
//! `MADV_DONTNEED_LOCKED`), `mmap`/`mmap64` with `MAP_FIXED` (an unmap of what was there),
//! `shmdt`, `shmat` with `SHM_REMAP`, shrinking `brk`/`sbrk`, and the heap: `free`,
//! `realloc`, `reallocarray` (the block, see below) and `malloc_trim` (everything). Each
//! hook reports the affected range to the installed sink **before** calling the real
//! function, found with `dlsym(RTLD_NEXT)`, so the invalidation is recorded before the
//! pages go away.
//!
//! ## Two ways to get the hooks in
//!
//! * **LD_PRELOAD**: `libumm_preload.so` (crate `umm-preload`) exports the hooks and sees
//!   every call made through the PLT by the program and its shared libraries.
//! * **In-process**: a binary calls [`export_hooks!`] once; the hooks then override libc's
//!   for all code linked statically into the binary (all Rust code, including `std` and
//!   the `libc` crate). Shared libraries keep calling libc unless the binary is linked with
//!   `-rdynamic`. Both can be stacked: the binary's hook calls `RTLD_NEXT`, which is the
//!   preloaded one, which calls libc.
//!
//! Either way, [`install`] connects the hooks to a manager (or any [`HookSink`]): it sets
//! this copy's sink and, when `libumm_preload.so` is loaded, that copy's too (through its
//! exported `umm_interpose_set_sink`).
//!
//! ## Rules of the hook path
//!
//! * **Callable before any manager exists**: the sink is a process-global
//!   `AtomicPtr`; null means "pass through".
//! * **No allocation, no locks**: the hook path is a thread-local recursion flag (`const`
//!   initialised `Cell<bool>`, no destructor, no lazy allocation), two atomics and the
//!   sink. The sink of a manager is [`umm::Manager::invalidate_deferred`], which is
//!   allocation-free and lock-free, so a hook called from inside an allocator (jemalloc,
//!   tcmalloc call `munmap`/`madvise` through the PLT) cannot re-enter it or deadlock.
//! * **No re-entrance**: a hook entered again on the same thread (the sink unmapping
//!   something) passes the inner call straight through.
//! * **Real functions** are resolved once by a constructor (`.init_array`) at load time,
//!   never in the hook path (`dlsym` may allocate); a hook running before that falls back
//!   to the raw system call (`brk`/`sbrk`, which glibc emulates, fail with `ENOMEM`).
//! * [`Installation`]'s drop clears the sink and waits until no hook of another thread is
//!   still using it before the sink is released (a fork child forgets the hooks that were
//!   running on the parent's other threads).
//!
//! ## The heap
//!
//! glibc's `free()`, `realloc()`, `malloc_trim()` and its automatic heap trimming give
//! memory back with the internal `__munmap`/`__mremap`/`__madvise`/`__brk`, which no
//! interposed symbol sees. So the `free`/`realloc`/`reallocarray` hooks report, before
//! the real call, what the block can give back: a block with its own mapping (above the
//! mmap threshold) whole, a block of an arena its whole pages (a later trim can give those
//! back only after the block was freed, i.e. reported). `malloc_trim` reports the whole
//! address space (it is rare and explicit). glibc routes its own internal frees through
//! the interposable `free` too. Allocation-free: the hook reads glibc's chunk header (or
//! calls `malloc_usable_size` of another allocator, and then reports the block's pages
//! rounded out).
//!
//! The remaining gap: a registration of a heap block that has no whole page of its own
//! (a block of less than two pages) shares its pages with other blocks; the hooks do not
//! report those shared pages (a report on every free of a neighbour would invalidate live
//! registrations all the time), so if all blocks on such a page are freed and glibc trims
//! it later, the registration is stale. Register page-aligned buffers (`mmap`,
//! `posix_memalign` with whole pages), or use the kernel module.
//!
//! ## Strict mode, and what interposition cannot see
//!
//! A hole punch (`fallocate(FALLOC_FL_PUNCH_HOLE)`) or truncation (`ftruncate`) of a
//! mapped file or memfd replaces its pages without any call the hooks could see. In
//! strict mode (the default, [`Options`]) [`InterposeSource`]'s `watch` refuses such
//! memory with [`umm::Uncovered`] (the pin fails with [`umm::Error::Uncovered`], naming
//! the mapping and the operation): file and shmem mappings, `MAP_SHARED` or `MAP_PRIVATE`
//! (a punch also drops a private mapping's not yet copied pages). Anonymous memory,
//! shared anonymous memory and SysV shm (no descriptor to punch or truncate; `shmdt`,
//! `shmat(SHM_REMAP)` and `madvise` are hooked) are accepted once the application
//! declared [`Options::libc_only`] (below). `Options::strict(false)` accepts everything,
//! for applications that accept both risks.
//! Classification reads `/proc/self/maps` on the watch path (a cache miss only).
//!
//! Not seen at all, whatever the memory: raw `syscall(SYS_munmap, ...)` and statically
//! linked code (they bypass every symbol). Since such a call can make any registration
//! stale, strict mode refuses **every** watch until the application declares that it
//! makes none ([`Options::libc_only`], `UMM_INTERPOSE_LIBC_ONLY=1`); the refusal names
//! the raw system call. Also unseen: changes made by the kernel (page migration) and the
//! same operations made by another process sharing the memory. A **fork** makes the
//! parent's private pages copy-on-write, so that the parent's next write moves them
//! without any call: a `pthread_atfork` parent handler reports the whole address space
//! to the sink before `fork()` returns in the parent. Use the kernel module (or
//! userfaultfd for the raw system calls), or call [`umm::Manager::invalidate`] yourself
//! (the **manual source**: an application that knows it is about to unmap or reuse
//! memory tells the manager directly).
//!
//! ## One manager per process
//!
//! The hooks have one sink per process: [`install`] refuses a second one, and an
//! [`InterposeSource`] serves only the manager it was installed for (`add_source` on
//! any other fails with [`AttachError`]). The hooks call the manager without owning it:
//! `Manager::drop` first detaches the source, which uninstalls the hooks and waits for
//! those running on other threads, so the manager is never dropped on a hook's stack.
//!
//! ## Example
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use umm::Range;
//! use umm_interpose::{install, HookSink};
//!
//! struct Log(Mutex<Vec<Range>>);
//! impl HookSink for Log {
//!     fn invalidate_from_hook(&self, range: Range) { self.0.lock().unwrap().push(range) }
//! }
//!
//! let log = Arc::new(Log(Mutex::new(Vec::new())));
//! let installed = install(log.clone()).unwrap();
//! let len = 2 * umm::page_size();
//! // SAFETY: a fresh anonymous mapping, unmapped through the hook right away.
//! unsafe {
//!     let p = libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ,
//!                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0);
//!     umm_interpose::hooks::munmap(p, len); // what the exported `munmap` calls
//!     assert_eq!(log.0.lock().unwrap()[0], Range::new(p as usize, len).unwrap());
//! }
//! drop(installed);
//! ```
//!
//! With a manager: `let _hooks = umm_interpose::install(manager.clone())?;` where
//! `manager: Arc<umm::Manager>`; hooks then call `manager.invalidate_deferred(range)`.

#![deny(missing_docs)]

pub mod hooks;
mod maps;
#[doc(hidden)]
pub use libc as __libc;
pub mod real;

use std::cell::Cell;
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;

use umm::Range;

/// What the hooks report to: [`umm::Manager`] implements it with
/// [`umm::Manager::invalidate_deferred`].
///
/// Implementations run inside `munmap` & co. of any thread, possibly inside an allocator:
/// they must not allocate, lock, or unmap.
pub trait HookSink: Send + Sync + 'static {
    /// `range` is about to be unmapped, remapped or emptied.
    fn invalidate_from_hook(&self, range: Range);
}

impl HookSink for umm::Manager {
    fn invalidate_from_hook(&self, range: Range) {
        self.invalidate_deferred(range);
    }
}

/// The sink of an [`InterposeSource`]: calls the manager without owning it.
///
/// A hook must never own the manager: if it held the last strong reference,
/// `Manager::drop` would run on the hook's stack (and its uninstall would wait for the
/// hook it runs in). So the sink keeps a `Weak` (the allocation only, never upgraded) and
/// a `live` flag: set by [`umm::NotifierSource::attach`], cleared by
/// [`umm::NotifierSource::detach`], which `Manager::drop` calls first, while the manager is
/// whole; detach then uninstalls and waits for the hooks in flight on other threads, so no
/// hook reaches the manager once its drop goes on.
struct ManagerSink {
    manager: std::sync::Weak<umm::Manager>,
    live: AtomicBool,
}

impl HookSink for ManagerSink {
    fn invalidate_from_hook(&self, range: Range) {
        if self.live.load(Ordering::Acquire) {
            // SAFETY: `live` is set only between attach and detach of this manager, and
            // `Manager::drop` calls detach (which clears `live` and waits for every hook
            // in flight, this one included, see `InterposeSource::detach`) before it
            // drops anything: the manager is whole here. The `Weak` keeps the allocation.
            let manager = unsafe { &*self.manager.as_ptr() };
            manager.invalidate_deferred(range);
        }
    }
}

/// The C-ABI form of a sink: called with the `ctx` given at installation and the range.
pub type RawSink = unsafe extern "C" fn(ctx: *const c_void, start: usize, len: usize);

/// One installed sink. Immutable once published; freed only after the hooks quiesced.
struct Slot {
    sink: RawSink,
    ctx: *const c_void,
}

/// The published sink of this copy of the crate (null: pass through).
static SLOT: AtomicPtr<Slot> = AtomicPtr::new(std::ptr::null_mut());
/// Hooks between "about to load `SLOT`" and "done calling its sink". SeqCst with `SLOT`:
/// a hook that loaded a slot has incremented this before the load, so [`set_raw_sink`]'s
/// swap-then-wait sees it and does not free the slot under it.
static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Set while this thread is inside a hook: a nested hook passes straight through.
    static IN_HOOK: Cell<bool> = const { Cell::new(false) };
}

/// Reports `[start, start + len)` to the installed sink, unless none is installed or this
/// thread is already inside a hook. Allocation-free and lock-free.
pub fn report(start: usize, len: usize) {
    if len == 0 {
        return;
    }
    let Ok(range) = Range::new(start, len) else {
        return;
    };
    // `try_with`: during thread teardown the flag may be gone; then skip the report
    // rather than abort (the hook still calls the real function).
    let entered = IN_HOOK.try_with(|f| !f.replace(true)).unwrap_or(false);
    if !entered {
        return;
    }
    IN_FLIGHT.fetch_add(1, Ordering::SeqCst);
    let slot = SLOT.load(Ordering::SeqCst);
    if !slot.is_null() {
        // SAFETY: a published slot stays allocated until `set_raw_sink` saw IN_FLIGHT
        // drop to 0 after unpublishing it, and we are counted in IN_FLIGHT.
        let slot = unsafe { &*slot };
        // SAFETY: the installer promised that `sink` may be called with `ctx` until it
        // unpublishes the slot (see `set_raw_sink`).
        unsafe { (slot.sink)(slot.ctx, range.start(), range.len()) };
    }
    IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
    let _ = IN_HOOK.try_with(|f| f.set(false));
}

/// Publishes `sink` (or none) for this copy's hooks, then waits until no hook uses the
/// previous one, and frees it. Returns whether a sink was installed before.
///
/// # Safety
/// `sink` must be callable with `ctx` from any thread, inside any `munmap` call, until a
/// later `set_raw_sink` returns. Must not be called from inside a hook or a sink (it would
/// wait for itself).
pub unsafe fn set_raw_sink(sink: Option<(RawSink, *const c_void)>) -> bool {
    let new = match sink {
        Some((sink, ctx)) => Box::into_raw(Box::new(Slot { sink, ctx })),
        None => std::ptr::null_mut(),
    };
    register_atfork();
    let old = SLOT.swap(new, Ordering::SeqCst);
    // A hook of this very thread (a sink that uninstalls) is counted too: wait only for
    // the hooks of the other threads.
    let own = usize::from(IN_HOOK.try_with(Cell::get).unwrap_or(false));
    while IN_FLIGHT.load(Ordering::SeqCst) > own {
        std::thread::yield_now();
    }
    if old.is_null() {
        return false;
    }
    // SAFETY: `old` came from Box::into_raw above (in an earlier call) and no hook can
    // still hold it: it is unpublished and IN_FLIGHT was 0 after the swap.
    drop(unsafe { Box::from_raw(old) });
    true
}

/// In a fork child only the forking thread exists: hooks that were in flight on the
/// parent's other threads never finish there, so the child's count starts again at 0
/// (else a child that uninstalls, e.g. by dropping its copy of a manager, would wait
/// forever).
///
/// In the parent, a fork makes every private page copy-on-write: the parent's next write
/// moves that address to a new frame without any call a hook could see (the kernel's MMU
/// notifier reports it as an invalidation at fork). So the parent handler reports the
/// whole address space to the sink before `fork()` returns in the parent.
/// `posix_spawn` and `vfork` share the address space and do not run the handlers; a raw
/// `fork`/`clone` syscall skips them, as it skips every hook (see
/// [`Options::libc_only`](Options#structfield.libc_only)).
fn register_atfork() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    extern "C" fn child() {
        IN_FLIGHT.store(0, Ordering::SeqCst);
    }
    extern "C" fn parent() {
        report(0, usize::MAX);
    }
    ONCE.call_once(|| {
        // SAFETY: registers a child handler that only stores to an atomic
        // (async-signal-safe) and a parent handler that reports like a hook.
        unsafe { libc::pthread_atfork(None, Some(parent), Some(child)) };
    });
}

/// Whether this copy of the crate has a sink installed (hooks with a costly lookup, e.g.
/// `free`'s usable size, skip it when not).
pub(crate) fn sink_installed() -> bool {
    !SLOT.load(Ordering::Relaxed).is_null()
}

/// The C entry point [`export_hooks!`] exports as `umm_interpose_set_sink`, so an
/// application's copy of this crate can set the sink of the preloaded library's copy.
///
/// # Safety
/// As [`set_raw_sink`]; a null `sink` uninstalls.
pub unsafe extern "C" fn set_sink_c(sink: Option<RawSink>, ctx: *const c_void) -> libc::c_int {
    // SAFETY: forwarded contract.
    unsafe { set_raw_sink(sink.map(|s| (s, ctx))) as libc::c_int }
}

/// Errors of [`install`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InstallError {
    /// A sink is already installed in this process (one [`Installation`] at a time).
    #[error("an interposition sink is already installed; drop the first Installation")]
    AlreadyInstalled,
    /// No hooks exist in this process: neither [`export_hooks!`] in the binary nor
    /// `libumm_preload.so` preloaded. Installing would cover nothing.
    #[error("no interposition hooks in this process (export_hooks!() in the binary, or LD_PRELOAD=libumm_preload.so)")]
    NoHooks,
}

/// Set by the constructor [`export_hooks!`] emits into a binary or library that links
/// this copy of the crate.
static HOOKS_HERE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Called by the constructor of [`export_hooks!`]; not for direct use.
#[doc(hidden)]
pub fn note_hooks_exported() {
    HOOKS_HERE.store(true, Ordering::Release);
    real::resolve();
}

/// Whether hooks exist in this process: exported by the artifact that links this copy
/// ([`export_hooks!`]), or by a preloaded `libumm_preload.so`.
pub fn hooks_present() -> bool {
    HOOKS_HERE.load(Ordering::Acquire) || preload_setter().is_some()
}

/// An installed sink; dropping it uninstalls (waiting for running hooks) and releases the
/// sink.
#[must_use = "dropping the Installation uninstalls the hooks' sink"]
pub struct Installation {
    /// Keeps the sink alive while hooks may call it.
    _keep: Arc<dyn std::any::Any + Send + Sync>,
    preload: Option<PreloadSetter>,
}

type PreloadSetter = unsafe extern "C" fn(Option<RawSink>, *const c_void) -> libc::c_int;

static INSTALLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

unsafe extern "C" fn deliver_to<T: HookSink>(ctx: *const c_void, start: usize, len: usize) {
    if let Ok(range) = Range::new(start, len) {
        // SAFETY: `ctx` is `Arc::as_ptr` of an `Arc<T>` the Installation keeps alive
        // until the slot is unpublished and quiescent.
        unsafe { &*(ctx as *const T) }.invalidate_from_hook(range);
    }
}

/// The preloaded library's `umm_interpose_set_sink`, if one is loaded (and is not this
/// copy's own export).
fn preload_setter() -> Option<PreloadSetter> {
    // SAFETY: dlsym with a NUL-terminated name; RTLD_DEFAULT searches the global scope.
    let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"umm_interpose_set_sink".as_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: the symbol is exported by `export_hooks!` with exactly this signature.
    Some(unsafe { std::mem::transmute::<*mut c_void, PreloadSetter>(p) })
}

/// Connects the hooks (in-process and, when loaded, `libumm_preload.so`) to `sink`, e.g.
/// an `Arc<umm::Manager>`. Resolves the real functions if no constructor did yet.
pub fn install<T: HookSink>(sink: Arc<T>) -> Result<Installation, InstallError> {
    if INSTALLED.swap(true, Ordering::AcqRel) {
        return Err(InstallError::AlreadyInstalled);
    }
    real::resolve();
    let ctx = Arc::as_ptr(&sink) as *const c_void;
    let raw: RawSink = deliver_to::<T>;
    // SAFETY: `deliver_to::<T>` may be called with `ctx` as long as `sink` lives; the
    // Installation keeps it until it has unpublished the slot.
    unsafe { set_raw_sink(Some((raw, ctx))) };
    let preload = preload_setter();
    if let Some(set) = preload {
        // SAFETY: as above, for the preloaded copy.
        unsafe { set(Some(raw), ctx) };
        tracing::debug!("interposition sink installed (in-process and LD_PRELOAD)");
    } else {
        tracing::debug!("interposition sink installed (in-process only)");
    }
    Ok(Installation {
        _keep: sink,
        preload,
    })
}

impl Drop for Installation {
    fn drop(&mut self) {
        if let Some(set) = self.preload {
            // SAFETY: uninstalling; waits for the preloaded copy's hooks to quiesce.
            unsafe { set(None, std::ptr::null()) };
        }
        // SAFETY: uninstalling; waits for this copy's hooks to quiesce.
        unsafe { set_raw_sink(None) };
        INSTALLED.store(false, Ordering::Release);
    }
}

/// Options of an [`InterposeSource`].
///
/// ```
/// let o = umm_interpose::Options::default();
/// assert!(o.strict && !o.libc_only); // refuses every pin until libc_only is declared
/// let o = umm_interpose::Options::libc_only();
/// assert!(o.strict && o.libc_only);
/// ```
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub struct Options {
    /// Refuse ([`umm::Uncovered`]) to watch memory that operations invisible to the hooks
    /// can change. Default: on. Off, everything is watched and the caller accepts every
    /// risk listed here.
    ///
    /// Two kinds of operations are invisible: a hole punch (`fallocate(PUNCH_HOLE)`) or
    /// `ftruncate` of a file or shmem object replaces the pages of its mappings (file,
    /// memfd and `/dev/shm` mappings, `MAP_SHARED` or `MAP_PRIVATE`), so such memory is
    /// always refused in strict mode; and a `munmap`, `mremap`, `madvise` or `mmap` made
    /// as a raw system call (`syscall(SYS_munmap, ...)`, a statically linked library, the
    /// Go runtime, inline assembly) bypasses every hook and can make **any** memory stale,
    /// so every watch is refused in strict mode unless the application declares
    /// [`libc_only`](Options::libc_only).
    pub strict: bool,
    /// The application declares that every `munmap`, `mremap`, `madvise`, `mmap`,
    /// `shmat`, `shmdt`, `brk` and `sbrk` in the process goes through the C library's
    /// symbols (no raw system calls, no statically linked code making them). Default:
    /// off, and then strict mode refuses every watch (naming the raw system call), since
    /// no hook would see such a call. Environment: `UMM_INTERPOSE_LIBC_ONLY=1`
    /// ([`Options::from_env`]).
    pub libc_only: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            strict: true,
            libc_only: false,
        }
    }
}

impl Options {
    /// The default options with `strict` set to `strict`.
    pub fn strict(strict: bool) -> Options {
        Options {
            strict,
            ..Options::default()
        }
    }

    /// Strict mode for an application that declares it makes no raw memory system calls
    /// (see [`Options::libc_only`](Options#structfield.libc_only)).
    pub fn libc_only() -> Options {
        Options {
            libc_only: true,
            ..Options::default()
        }
    }

    /// What [`InterposeSource`]'s `watch` decides for `range` under these options: `Err`
    /// names the operation no hook would see. Reads `/proc/self/maps` when strict and
    /// `libc_only` (see [`coverage`]).
    pub fn check(&self, range: Range) -> Result<(), umm::Uncovered> {
        if !self.strict {
            return Ok(());
        }
        if !self.libc_only {
            return Err(umm::Uncovered {
                range,
                mapping: "any mapping (libc_only not declared)",
                operation: RAW_SYSCALLS,
            });
        }
        coverage(range)
    }

    /// The default options, with `libc_only` set when `UMM_INTERPOSE_LIBC_ONLY` is `1`
    /// (any other value, or unset: not declared).
    pub fn from_env() -> Options {
        Options {
            libc_only: std::env::var("UMM_INTERPOSE_LIBC_ONLY").is_ok_and(|v| v == "1"),
            ..Options::default()
        }
    }
}

/// What strict mode refuses without [`Options::libc_only`](Options#structfield.libc_only).
pub const RAW_SYSCALLS: &str =
    "munmap/mremap/madvise/mmap as a raw system call (static code, Go, inline syscalls)";

/// Why an [`InterposeSource`] refused a manager in [`umm::NotifierSource::attach`] (the
/// manager fails `add_source` with [`umm::Error::Source`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttachError {
    /// The source was installed for another manager: the hooks of a process have one
    /// sink, so one manager per process uses interposition.
    #[error("this interposition source was installed for {installed_for}, not {attaching}; the hooks serve one manager per process")]
    OtherManager {
        /// The manager given to [`InterposeSource::install`].
        installed_for: umm::ManagerId,
        /// The manager that tried to add it.
        attaching: umm::ManagerId,
    },
    /// The source was already added to its manager (or detached from it: a detached
    /// source has uninstalled its hooks for good).
    #[error("this interposition source was already added to {manager} (sources are added once)")]
    AlreadyAttached {
        /// Its manager.
        manager: umm::ManagerId,
    },
}

const IDLE: u8 = 0;
const ATTACHED: u8 = 1;
const DETACHED: u8 = 2;

/// The interposition source as a [`umm::NotifierSource`], for the manager's list of
/// sources. Delivery goes from the hooks straight to the manager (without owning it);
/// `watch` classifies the memory (strict mode) and counts.
///
/// One manager per process: the hooks have one sink, [`install`] refuses a second
/// installation ([`InstallError::AlreadyInstalled`]) and `attach` refuses any manager but
/// the one the source was installed for ([`AttachError`]). Dropping the manager detaches
/// the source: the hooks are uninstalled before the manager is torn down.
pub struct InterposeSource {
    installation: std::sync::Mutex<Option<Installation>>,
    sink: Arc<ManagerSink>,
    target: umm::ManagerId,
    state: AtomicU8,
    options: Options,
    watches: AtomicUsize,
}

impl InterposeSource {
    /// Installs the hooks for `manager` and returns the source to add to it (strict mode,
    /// see [`Options`]): `manager.add_source(InterposeSource::install(&manager)?)`. The
    /// hooks reach the manager only once it has added the source. Fails with
    /// [`InstallError::NoHooks`] when no hooks exist in this process (see
    /// [`hooks_present`]) and [`InstallError::AlreadyInstalled`] when another sink is
    /// installed (another manager's source, or an [`Installation`]).
    pub fn install(manager: &Arc<umm::Manager>) -> Result<Arc<InterposeSource>, InstallError> {
        InterposeSource::install_with(manager, Options::default())
    }

    /// [`InterposeSource::install`] with `options`.
    pub fn install_with(
        manager: &Arc<umm::Manager>,
        options: Options,
    ) -> Result<Arc<InterposeSource>, InstallError> {
        if !hooks_present() {
            return Err(InstallError::NoHooks);
        }
        let sink = Arc::new(ManagerSink {
            // Weak: the manager owns this source once added; a strong reference here would
            // be a cycle. Never upgraded (see `ManagerSink`).
            manager: Arc::downgrade(manager),
            live: AtomicBool::new(false),
        });
        let installation = install(sink.clone())?;
        Ok(Arc::new(InterposeSource {
            installation: std::sync::Mutex::new(Some(installation)),
            sink,
            target: manager.id(),
            state: AtomicU8::new(IDLE),
            options,
            watches: AtomicUsize::new(0),
        }))
    }

    /// Watches currently counted.
    pub fn watches(&self) -> usize {
        self.watches.load(Ordering::Relaxed)
    }

    /// The options it was installed with.
    pub fn options(&self) -> Options {
        self.options
    }
}

/// Whether the hooks can cover `range`: `Err` names a mapping in it whose pages can be
/// replaced by an operation no hook sees (see [`Options::strict`]). Reads
/// `/proc/self/maps` (allocates: not for the hook path). Ranges that are not mapped
/// (partly or at all) are not refused here; registering them fails in the backend.
pub fn coverage(range: Range) -> Result<(), umm::Uncovered> {
    match maps::classify(range.start(), range.end()) {
        Some(mapping) => Err(umm::Uncovered {
            range,
            mapping,
            operation: "fallocate(PUNCH_HOLE) or ftruncate of the file",
        }),
        None => Ok(()),
    }
}

impl umm::NotifierSource for InterposeSource {
    fn name(&self) -> &str {
        "interpose"
    }

    fn attach(
        &self,
        manager: umm::ManagerId,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        if manager != self.target {
            return Err(Box::new(AttachError::OtherManager {
                installed_for: self.target,
                attaching: manager,
            }));
        }
        if self
            .state
            .compare_exchange(IDLE, ATTACHED, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return Err(Box::new(AttachError::AlreadyAttached { manager }));
        }
        self.sink.live.store(true, Ordering::Release);
        Ok(())
    }

    fn detach(&self, manager: umm::ManagerId) {
        if manager != self.target {
            return;
        }
        self.state.store(DETACHED, Ordering::Release);
        self.sink.live.store(false, Ordering::Release);
        // Uninstall: waits until no hook of another thread still runs the sink (one that
        // loaded `live` before the store above may still be calling the manager).
        let installation = self
            .installation
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        drop(installation);
        tracing::debug!(%manager, "interposition source detached, hooks uninstalled");
    }

    fn watch(
        &self,
        _cookie: u64,
        range: Range,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        self.options.check(range)?;
        self.watches.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn unwatch(&self, _cookie: u64, _range: Range) {
        self.watches.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Defines the hook symbols (`munmap`, `mmap`, `mmap64`, `mremap`, `madvise`, `shmdt`,
/// `shmat`, `brk`, `sbrk`, `free`, `realloc`, `reallocarray`, `malloc_trim`), the `umm_interpose_set_sink` entry point and a load-time constructor
/// that resolves the real functions, in the crate that invokes it: once in a binary for
/// the in-process mode, or in a `cdylib` (that is `umm-preload`).
///
/// Invoke it at most once per linked artifact.
#[macro_export]
macro_rules! export_hooks {
    () => {
        /// Hook: see `umm_interpose::hooks::munmap`.
        ///
        /// # Safety
        /// As `munmap(2)`.
        #[no_mangle]
        pub unsafe extern "C" fn munmap(
            addr: *mut $crate::__libc::c_void,
            len: $crate::__libc::size_t,
        ) -> $crate::__libc::c_int {
            // SAFETY: forwarded contract.
            unsafe { $crate::hooks::munmap(addr, len) }
        }

        /// Hook: see `umm_interpose::hooks::mmap`.
        ///
        /// # Safety
        /// As `mmap(2)`.
        #[no_mangle]
        pub unsafe extern "C" fn mmap(
            addr: *mut $crate::__libc::c_void,
            len: $crate::__libc::size_t,
            prot: $crate::__libc::c_int,
            flags: $crate::__libc::c_int,
            fd: $crate::__libc::c_int,
            off: $crate::__libc::off_t,
        ) -> *mut $crate::__libc::c_void {
            // SAFETY: forwarded contract.
            unsafe { $crate::hooks::mmap(addr, len, prot, flags, fd, off) }
        }

        /// Hook: see `umm_interpose::hooks::mmap64`.
        ///
        /// # Safety
        /// As `mmap(2)`.
        #[no_mangle]
        pub unsafe extern "C" fn mmap64(
            addr: *mut $crate::__libc::c_void,
            len: $crate::__libc::size_t,
            prot: $crate::__libc::c_int,
            flags: $crate::__libc::c_int,
            fd: $crate::__libc::c_int,
            off: $crate::__libc::off64_t,
        ) -> *mut $crate::__libc::c_void {
            // SAFETY: forwarded contract.
            unsafe { $crate::hooks::mmap64(addr, len, prot, flags, fd, off) }
        }

        /// Hook: see `umm_interpose::hooks::mremap` (variadic in C; see there).
        ///
        /// # Safety
        /// As `mremap(2)`.
        #[no_mangle]
        pub unsafe extern "C" fn mremap(
            old: *mut $crate::__libc::c_void,
            old_size: $crate::__libc::size_t,
            new_size: $crate::__libc::size_t,
            flags: $crate::__libc::c_int,
            new_address: *mut $crate::__libc::c_void,
        ) -> *mut $crate::__libc::c_void {
            // SAFETY: forwarded contract.
            unsafe { $crate::hooks::mremap(old, old_size, new_size, flags, new_address) }
        }

        /// Hook: see `umm_interpose::hooks::madvise`.
        ///
        /// # Safety
        /// As `madvise(2)`.
        #[no_mangle]
        pub unsafe extern "C" fn madvise(
            addr: *mut $crate::__libc::c_void,
            len: $crate::__libc::size_t,
            advice: $crate::__libc::c_int,
        ) -> $crate::__libc::c_int {
            // SAFETY: forwarded contract.
            unsafe { $crate::hooks::madvise(addr, len, advice) }
        }

        /// Hook: see `umm_interpose::hooks::shmdt`.
        ///
        /// # Safety
        /// As `shmdt(2)`.
        #[no_mangle]
        pub unsafe extern "C" fn shmdt(
            addr: *const $crate::__libc::c_void,
        ) -> $crate::__libc::c_int {
            // SAFETY: forwarded contract.
            unsafe { $crate::hooks::shmdt(addr) }
        }

        /// Hook: see `umm_interpose::hooks::shmat`.
        ///
        /// # Safety
        /// As `shmat(2)`.
        #[no_mangle]
        pub unsafe extern "C" fn shmat(
            shmid: $crate::__libc::c_int,
            addr: *const $crate::__libc::c_void,
            flags: $crate::__libc::c_int,
        ) -> *mut $crate::__libc::c_void {
            // SAFETY: forwarded contract.
            unsafe { $crate::hooks::shmat(shmid, addr, flags) }
        }

        /// Hook: see `umm_interpose::hooks::free`.
        ///
        /// # Safety
        /// As `free(3)`.
        #[no_mangle]
        pub unsafe extern "C" fn free(ptr: *mut $crate::__libc::c_void) {
            // SAFETY: forwarded contract.
            unsafe { $crate::hooks::free(ptr) }
        }

        /// Hook: see `umm_interpose::hooks::realloc`.
        ///
        /// # Safety
        /// As `realloc(3)`.
        #[no_mangle]
        pub unsafe extern "C" fn realloc(
            ptr: *mut $crate::__libc::c_void,
            size: $crate::__libc::size_t,
        ) -> *mut $crate::__libc::c_void {
            // SAFETY: forwarded contract.
            unsafe { $crate::hooks::realloc(ptr, size) }
        }

        /// Hook: see `umm_interpose::hooks::reallocarray`.
        ///
        /// # Safety
        /// As `reallocarray(3)`.
        #[no_mangle]
        pub unsafe extern "C" fn reallocarray(
            ptr: *mut $crate::__libc::c_void,
            nmemb: $crate::__libc::size_t,
            size: $crate::__libc::size_t,
        ) -> *mut $crate::__libc::c_void {
            // SAFETY: forwarded contract.
            unsafe { $crate::hooks::reallocarray(ptr, nmemb, size) }
        }

        /// Hook: see `umm_interpose::hooks::malloc_trim`.
        ///
        /// # Safety
        /// As `malloc_trim(3)`.
        #[no_mangle]
        pub unsafe extern "C" fn malloc_trim(pad: $crate::__libc::size_t) -> $crate::__libc::c_int {
            // SAFETY: forwarded contract.
            unsafe { $crate::hooks::malloc_trim(pad) }
        }

        /// Hook: see `umm_interpose::hooks::brk`.
        ///
        /// # Safety
        /// As `brk(2)`.
        #[no_mangle]
        pub unsafe extern "C" fn brk(addr: *mut $crate::__libc::c_void) -> $crate::__libc::c_int {
            // SAFETY: forwarded contract.
            unsafe { $crate::hooks::brk(addr) }
        }

        /// Hook: see `umm_interpose::hooks::sbrk`.
        ///
        /// # Safety
        /// As `sbrk(2)`.
        #[no_mangle]
        pub unsafe extern "C" fn sbrk(
            increment: $crate::__libc::intptr_t,
        ) -> *mut $crate::__libc::c_void {
            // SAFETY: forwarded contract.
            unsafe { $crate::hooks::sbrk(increment) }
        }

        /// Sets (or, with a null `sink`, clears) this artifact's hook sink; called by
        /// `umm_interpose::install` of another copy of the crate.
        ///
        /// # Safety
        /// As `umm_interpose::set_raw_sink`.
        #[no_mangle]
        pub unsafe extern "C" fn umm_interpose_set_sink(
            sink: ::std::option::Option<$crate::RawSink>,
            ctx: *const $crate::__libc::c_void,
        ) -> $crate::__libc::c_int {
            // SAFETY: forwarded contract.
            unsafe { $crate::set_sink_c(sink, ctx) }
        }

        #[used]
        #[link_section = ".init_array"]
        static UMM_INTERPOSE_RESOLVE: extern "C" fn() = {
            extern "C" fn umm_interpose_resolve() {
                $crate::note_hooks_exported();
            }
            umm_interpose_resolve
        };
    };
}
