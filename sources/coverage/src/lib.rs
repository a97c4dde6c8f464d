//! # umm-coverage: what each notifier source catches, measured
//!
//! One table of scenarios (munmap whole/part/from another thread, mremap
//! move/shrink/`MREMAP_DONTUNMAP`, `MAP_FIXED` over, `MADV_DONTNEED`/`MADV_FREE`/
//! `MADV_REMOVE`, `free()` of a large malloc block, `free()` + `malloc_trim`, brk shrink,
//! `shmdt`, `shmat(SHM_REMAP)`, fork + COW break, raw `syscall(SYS_munmap)`,
//! `fallocate(PUNCH_HOLE)` on shmem and on ext4, `ftruncate` shrink) runs through every
//! **column**: a notifier source set up behind the [`Column`] trait. A cell is caught,
//! refused (the source will not watch that memory: a pin fails with a typed error) or
//! not caught (accepted and silent: a stale registration). Each cell runs in its own child process (a scenario can
//! hang the process it runs in, e.g. a userfaultfd event nobody reads), under a watchdog
//! that kills the child and fails the cell instead of hanging ([`harness`]).
//!
//! The expected matrix ([`table::EXPECTED`]) is asserted by `tests/matrix.rs`, and
//! [`table::markdown`] renders the measured one (with the event delay of every caught
//! cell and median/p99 delays per source) into `docs/coverage-matrix.md`:
//!
//! ```text
//! cargo build -p umm-coverage --bins
//! target/debug/umm-coverage-scenario table > docs/coverage-matrix.md
//! ```
//!
//! ## Adding a column (the kernel module)
//!
//! A column is a [`ColumnSpec`]: a name, which scenario binary runs it (plain, or the one
//! that exports the interposition hooks), whether `libumm_preload.so` is preloaded, and a
//! constructor of a [`Column`] trait object. [`NotifierColumn`] turns any
//! [`umm::NotifierSource`] into a column (watch through the trait, events through the
//! generation counter and `drain`), so the kernel module's source becomes a column with
//! one constructor (`make_kmod`). `guest-matrix.sh` builds the module and runs the same
//! scenario binary in the qemu guest, where `/dev/umm_notify` exists and the column runs;
//! on the host it is listed as "not run on the host".
//!
//! ## Example: one cell, in this process
//!
//! ```
//! use umm_coverage::{cell, columns, scenario};
//!
//! let spec = columns().iter().find(|c| c.id == "uffd").unwrap();
//! let munmap = scenario::SCENARIOS.iter().find(|s| s.id == "munmap_whole").unwrap();
//! match cell::run_cell(spec, munmap) {
//!     Ok(verdict) => assert!(verdict.is_caught(), "{verdict:?}"),
//!     Err(skip) => eprintln!("skipped: {skip}"), // no userfaultfd here
//! }
//! ```

#![deny(missing_docs)]

pub mod cell;
pub mod harness;
pub mod probe;
pub mod scenario;
pub mod table;

use std::sync::{Arc, Weak};

use umm::{InvalidationSink, NotifierSource, Range};

pub use probe::Probe;

/// Errors of the coverage machinery (child side and harness side).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CoverageError {
    /// The column cannot run here (no userfaultfd, hooks not loaded...).
    #[error("column {column} unavailable: {reason}")]
    Unavailable {
        /// The column.
        column: &'static str,
        /// Why.
        reason: String,
    },
    /// A scenario's setup failed (mmap, shmget, ...).
    #[error("scenario {scenario}: setup failed: {reason}")]
    Setup {
        /// The scenario.
        scenario: &'static str,
        /// What failed.
        reason: String,
    },
    /// The child did not finish in time and was killed.
    #[error("{what} did not finish within {secs} s: killed (a hang)")]
    Timeout {
        /// The command line.
        what: String,
        /// The limit.
        secs: u64,
    },
    /// The child failed or printed nothing parseable.
    #[error("{what} failed ({status}): {output}")]
    Child {
        /// The command line.
        what: String,
        /// Its exit status.
        status: String,
        /// What it printed.
        output: String,
    },
    /// Spawning or talking to the child failed.
    #[error("cannot run {what}")]
    Io {
        /// The command line.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// A notifier source under test, as the scenarios see it.
pub trait Column {
    /// Starts the source, delivering what it learns to `probe`.
    fn start(&mut self, probe: Arc<Probe>) -> Result<(), CoverageError>;
    /// Watches `range` (what the manager would do before registering it). An error means
    /// this source cannot cover the range.
    fn watch(&self, range: Range) -> Result<(), String>;
    /// Stops watching `range`.
    fn unwatch(&self, range: Range);
    /// Whether the source had recorded something (generation moved, or the probe was
    /// called) since [`Column::mark`] returned `mark`.
    fn recorded_since(&self, mark: u64) -> bool;
    /// A value for [`Column::recorded_since`].
    fn mark(&self) -> u64;
    /// Makes every recorded event visible to the probe (drains a ring source).
    fn settle(&self);
    /// For interposition: whether the application declares `libc_only` (no raw memory
    /// system calls; see `umm_interpose::Options`). The raw-syscall row runs undeclared:
    /// without the declaration strict interposition refuses every watch. Other sources
    /// ignore it.
    fn libc_only(&mut self, declared: bool) {
        let _ = declared;
    }
    /// Connects the source to `manager` instead (for the seed and stress runs).
    fn attach(&mut self, manager: &Arc<umm::Manager>) -> Result<(), CoverageError>;
}

/// Which scenario binary a column runs in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Binary {
    /// `umm-coverage-scenario`: no hooks of its own.
    Plain,
    /// `umm-coverage-scenario-inproc`: exports the interposition hooks itself.
    InProcess,
}

/// How to run one column.
pub struct ColumnSpec {
    /// Short id used on command lines.
    pub id: &'static str,
    /// Column heading.
    pub title: &'static str,
    /// The binary that runs it.
    pub binary: Binary,
    /// Whether `libumm_preload.so` is preloaded into the child.
    pub preload: bool,
    /// Whether it can run on this machine (the kernel module's device exists only in the
    /// qemu guest); checked in the parent before spawning a child.
    pub available: fn() -> bool,
    /// Whether it is a column of the matrix (else only used by the stress runs).
    pub in_matrix: bool,
    /// Builds the column (child side).
    pub make: fn() -> Box<dyn Column>,
}

/// Every column, in table order.
pub fn columns() -> &'static [ColumnSpec] {
    &[
        ColumnSpec {
            id: "uffd",
            title: "userfaultfd",
            binary: Binary::Plain,
            preload: false,
            available: || true,
            in_matrix: true,
            make: || Box::new(NotifierColumn::new("uffd", make_uffd)),
        },
        ColumnSpec {
            id: "interpose",
            title: "interposition, in-process",
            binary: Binary::InProcess,
            preload: false,
            available: || true,
            in_matrix: true,
            make: || Box::new(InterposeColumn::default()),
        },
        ColumnSpec {
            id: "preload",
            title: "interposition, LD_PRELOAD",
            binary: Binary::Plain,
            preload: true,
            available: || true,
            in_matrix: true,
            make: || Box::new(InterposeColumn::default()),
        },
        ColumnSpec {
            id: "stacked",
            title: "interposition, in-process + LD_PRELOAD stacked",
            binary: Binary::InProcess,
            preload: true,
            available: || true,
            in_matrix: false,
            make: || Box::new(InterposeColumn::default()),
        },
        ColumnSpec {
            id: "kmod",
            title: "kernel module",
            binary: Binary::Plain,
            preload: false,
            available: umm_kmod::NotifyDevice::is_available,
            in_matrix: true,
            make: || Box::new(NotifierColumn::new("kmod", make_kmod)),
        },
    ]
}

fn make_uffd(eager: Option<Weak<dyn InvalidationSink>>) -> Result<Arc<dyn NotifierSource>, String> {
    let s = umm_uffd::UffdSource::new(umm_uffd::Options::default()).map_err(|e| e.to_string())?;
    if let Some(sink) = eager {
        s.set_eager_sink(sink);
    }
    Ok(s)
}

/// The kernel module's source (`/dev/umm_notify`; the module is loaded only in the qemu
/// guest). It delivers through its generation counter and `drain`, so it has no use for
/// an eager sink.
fn make_kmod(
    _eager: Option<Weak<dyn InvalidationSink>>,
) -> Result<Arc<dyn NotifierSource>, String> {
    let s = umm_kmod::KmodSource::open().map_err(|e| e.to_string())?;
    Ok(Arc::new(s))
}

/// Builds a source; the optional sink is for sources that can call one from their event
/// thread (to timestamp events when they are read rather than when drained).
pub type MakeSource =
    fn(Option<Weak<dyn InvalidationSink>>) -> Result<Arc<dyn NotifierSource>, String>;

/// Any [`NotifierSource`] as a column: watches through the trait, learns events through
/// its generation counter and `drain` (and, for the userfaultfd source, an eager sink
/// that timestamps events when the reader sees them). The kernel module's source plugs in
/// here.
pub struct NotifierColumn {
    id: &'static str,
    make: MakeSource,
    source: Option<Arc<dyn NotifierSource>>,
    probe: Option<Arc<Probe>>,
    next_cookie: std::sync::atomic::AtomicU64,
    cookies: parking_lot::Mutex<Vec<(Range, u64)>>,
}

impl NotifierColumn {
    /// A column around the source `make` builds.
    pub fn new(id: &'static str, make: MakeSource) -> Self {
        NotifierColumn {
            id,
            make,
            source: None,
            probe: None,
            next_cookie: std::sync::atomic::AtomicU64::new(1),
            cookies: parking_lot::Mutex::new(Vec::new()),
        }
    }

    fn source(&self) -> &Arc<dyn NotifierSource> {
        self.source.as_ref().expect("column started")
    }
}

impl Column for NotifierColumn {
    fn start(&mut self, probe: Arc<Probe>) -> Result<(), CoverageError> {
        let eager: std::sync::Weak<dyn umm::InvalidationSink> = Arc::downgrade(&probe) as _;
        let source = (self.make)(Some(eager)).map_err(|reason| CoverageError::Unavailable {
            column: self.id,
            reason,
        })?;
        self.source = Some(source);
        self.probe = Some(probe);
        Ok(())
    }

    fn watch(&self, range: Range) -> Result<(), String> {
        let cookie = self
            .next_cookie
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.source().watch(cookie, range).map_err(|e| {
            let mut s = e.to_string();
            let mut src = e.source();
            while let Some(c) = src {
                s += &format!(": {c}");
                src = c.source();
            }
            s
        })?;
        self.cookies.lock().push((range, cookie));
        Ok(())
    }

    fn unwatch(&self, range: Range) {
        let mut cookies = self.cookies.lock();
        if let Some(i) = cookies.iter().position(|(r, _)| *r == range) {
            let (_, cookie) = cookies.swap_remove(i);
            self.source().unwatch(cookie, range);
        }
    }

    fn recorded_since(&self, mark: u64) -> bool {
        self.mark() != mark
    }

    fn mark(&self) -> u64 {
        self.source()
            .generation()
            .map(|g| g.load(std::sync::atomic::Ordering::Acquire))
            .unwrap_or_else(|| self.probe.as_ref().map_or(0, |p| p.count()))
    }

    fn settle(&self) {
        if let (Some(s), Some(p)) = (&self.source, &self.probe) {
            s.drain(p.as_ref());
        }
    }

    fn attach(&mut self, manager: &Arc<umm::Manager>) -> Result<(), CoverageError> {
        let source = (self.make)(None).map_err(|reason| CoverageError::Unavailable {
            column: self.id,
            reason,
        })?;
        manager
            .add_source(source.clone())
            .map_err(|e| CoverageError::Unavailable {
                column: self.id,
                reason: e.to_string(),
            })?;
        self.source = Some(source);
        Ok(())
    }
}

/// The interposition hooks as a column (in-process or preloaded: the same code, the
/// binary and `LD_PRELOAD` decide which hooks exist).
pub struct InterposeColumn {
    installation: Option<umm_interpose::Installation>,
    source: Option<Arc<umm_interpose::InterposeSource>>,
    probe: Option<Arc<Probe>>,
    options: umm_interpose::Options,
}

impl Default for InterposeColumn {
    /// Strict, with `libc_only` declared (without it every watch is refused; the
    /// raw-syscall row shows that, see [`Column::libc_only`]).
    fn default() -> Self {
        InterposeColumn {
            installation: None,
            source: None,
            probe: None,
            options: umm_interpose::Options::libc_only(),
        }
    }
}

/// Checks that some hook reports a fresh mapping's munmap to `probe`.
fn hooks_active(probe: &Probe) -> bool {
    let before = probe.count();
    let len = umm::page_size();
    // SAFETY: a fresh anonymous mapping, unmapped right away.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        libc::munmap(p, len);
    }
    probe.count() != before
}

impl Column for InterposeColumn {
    fn start(&mut self, probe: Arc<Probe>) -> Result<(), CoverageError> {
        let installation =
            umm_interpose::install(probe.clone()).map_err(|e| CoverageError::Unavailable {
                column: "interpose",
                reason: e.to_string(),
            })?;
        if !hooks_active(&probe) {
            return Err(CoverageError::Unavailable {
                column: "interpose",
                reason: "no hook saw a munmap: neither in-process hooks nor libumm_preload.so"
                    .into(),
            });
        }
        probe.clear();
        self.installation = Some(installation);
        self.probe = Some(probe);
        Ok(())
    }

    fn watch(&self, range: Range) -> Result<(), String> {
        // What `InterposeSource::watch` does with these options.
        self.options.check(range).map_err(|e| e.to_string())
    }

    fn unwatch(&self, _range: Range) {}

    fn recorded_since(&self, mark: u64) -> bool {
        self.mark() != mark
    }

    fn mark(&self) -> u64 {
        self.probe.as_ref().map_or(0, |p| p.count())
    }

    fn settle(&self) {}

    fn libc_only(&mut self, declared: bool) {
        self.options = if declared {
            umm_interpose::Options::libc_only()
        } else {
            umm_interpose::Options::default()
        };
    }

    fn attach(&mut self, manager: &Arc<umm::Manager>) -> Result<(), CoverageError> {
        let source =
            umm_interpose::InterposeSource::install_with(manager, self.options).map_err(|e| {
                CoverageError::Unavailable {
                    column: "interpose",
                    reason: e.to_string(),
                }
            })?;
        manager
            .add_source(source.clone())
            .map_err(|e| CoverageError::Unavailable {
                column: "interpose",
                reason: e.to_string(),
            })?;
        self.source = Some(source);
        Ok(())
    }
}
