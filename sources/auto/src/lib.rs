//! # umm-auto: the best notifier source on this machine, in one call
//!
//! umm has three notifier sources, from most to least complete:
//!
//! 1. the **kernel module** (`umm-kmod`, `/dev/umm_notify`): catches every operation that
//!    replaces pages, including `free()`, `shmdt`, raw syscalls and COW breaks after `fork`;
//! 2. **userfaultfd** (`umm-uffd`): no module needed; refuses SysV shm and shared file/shmem
//!    mappings (it cannot see hole punches there), invalidates everything at each `fork`;
//! 3. **interposition** (`umm-interpose`): hooks on libc's `munmap`/`mremap`/`madvise`/...
//!    in this process; cannot see raw system calls, so in strict mode it refuses every pin
//!    until the application declares `UMM_INTERPOSE_LIBC_ONLY=1`.
//!
//! [`probe`] says which of them work here and, for those that do not, why and how to fix it.
//! [`add_best_source`] adds the best working one (or the one `UMM_SOURCE` names) to a
//! manager and returns a [`Choice`]: what was picked, why the better ones were skipped, and
//! the [`Coverage`] the application gets. `umm doctor` prints the same [`probe`], so the
//! tool and the library never disagree.
//!
//! ```no_run
//! use std::sync::Arc;
//! let manager = Arc::new(umm::Manager::new(umm::Config::from_env()?));
//! let choice = umm_auto::add_best_source(&manager)?;
//! eprintln!("{choice}"); // "notifier source: userfaultfd (kernel module: not loaded ...)"
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! ## Environment
//! * `UMM_SOURCE=auto|kmod|uffd|interpose|none`: `auto` (default) takes the best working
//!   source; a named one is required (its failure is an error, not a fallback); `none` adds
//!   no source (the application invalidates by itself with `Manager::invalidate`).
//! * `UMM_INTERPOSE_LIBC_ONLY=1`: the application declares that it makes no raw memory
//!   system calls, so the interposition source accepts pins (strict interposition refuses
//!   every pin without it; see `umm_interpose::Options`).
//! * `UMM_STATS_EXPORT=1`: [`add_best_source`] also starts `Manager::export_stats`, so
//!   `umm stats <pid>` can read the process's counters; the [`Choice`] holds the export.

#![deny(missing_docs)]

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use umm::Manager;

/// The notifier sources, best first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SourceKind {
    /// The kernel module, `/dev/umm_notify` (`umm_kmod::KmodSource`).
    Kmod,
    /// userfaultfd (`umm_uffd::UffdSource`).
    Uffd,
    /// In-process interposition of libc (`umm_interpose::InterposeSource`).
    Interpose,
}

impl SourceKind {
    /// Every source, best first.
    pub const ALL: [SourceKind; 3] = [SourceKind::Kmod, SourceKind::Uffd, SourceKind::Interpose];

    /// The short name `UMM_SOURCE` and `--source` use: `kmod`, `uffd`, `interpose`.
    pub fn name(self) -> &'static str {
        match self {
            SourceKind::Kmod => "kmod",
            SourceKind::Uffd => "uffd",
            SourceKind::Interpose => "interpose",
        }
    }

    /// A longer name for people.
    pub fn title(self) -> &'static str {
        match self {
            SourceKind::Kmod => "kernel module",
            SourceKind::Uffd => "userfaultfd",
            SourceKind::Interpose => "interposition",
        }
    }

    /// What this source catches, refuses and misses (the rows of `docs/coverage-matrix.md`
    /// for it; a test keeps the two equal).
    pub fn coverage(self) -> Coverage {
        Coverage::of(self)
    }
}

impl fmt::Display for SourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.title())
    }
}

/// Which source to use, as `UMM_SOURCE` or a command line says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Preference {
    /// The best working source.
    #[default]
    Auto,
    /// Exactly this source; its failure is an error.
    Only(SourceKind),
    /// No source at all (the application calls `Manager::invalidate` itself).
    None,
}

impl std::str::FromStr for Preference {
    type Err = AutoError;

    fn from_str(s: &str) -> Result<Preference, AutoError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Ok(Preference::Auto),
            "kmod" | "module" | "kernel" => Ok(Preference::Only(SourceKind::Kmod)),
            "uffd" | "userfaultfd" => Ok(Preference::Only(SourceKind::Uffd)),
            "interpose" | "interposition" => Ok(Preference::Only(SourceKind::Interpose)),
            "none" | "off" => Ok(Preference::None),
            _ => Err(AutoError::BadPreference(s.to_string())),
        }
    }
}

impl Preference {
    /// `UMM_SOURCE` from the environment (unset: [`Preference::Auto`]).
    pub fn from_env() -> Result<Preference, AutoError> {
        match std::env::var("UMM_SOURCE") {
            Ok(v) => v.parse(),
            Err(std::env::VarError::NotPresent) => Ok(Preference::Auto),
            Err(std::env::VarError::NotUnicode(v)) => {
                Err(AutoError::BadPreference(v.to_string_lossy().into_owned()))
            }
        }
    }
}

/// Whether one source works here and, if not, why and what to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceStatus {
    /// The source.
    pub kind: SourceKind,
    /// `true` when the source could be created in this process.
    pub available: bool,
    /// What was found ("/dev/umm_notify opened, ABI 1" or the reason it is unusable).
    pub detail: String,
    /// How to make it work, when it does not.
    pub fix: Option<String>,
}

impl fmt::Display for SourceStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.available { "yes" } else { "no" };
        write!(f, "{}: {verdict}: {}", self.kind, self.detail)?;
        if let Some(fix) = &self.fix {
            write!(f, "; fix: {fix}")?;
        }
        Ok(())
    }
}

/// The sources, best first, each with whether it works in this process (it is created and
/// dropped: a userfaultfd and its reader thread, an open of `/dev/umm_notify`; the
/// interposition hooks are only looked up, never installed).
pub fn probe() -> Vec<SourceStatus> {
    SourceKind::ALL.iter().map(|&k| probe_one(k)).collect()
}

/// [`probe`] for one source.
pub fn probe_one(kind: SourceKind) -> SourceStatus {
    match kind {
        SourceKind::Kmod => match umm_kmod::KmodSource::open() {
            Ok(src) => {
                let detail = match src.device().info() {
                    Ok(info) => format!(
                        "{} opened (module ABI {}, ring of {} records)",
                        umm_kmod::sys::UMM_NOTIFY_DEVICE,
                        info.abi_version,
                        info.ring_entries
                    ),
                    Err(_) => format!("{} opened", umm_kmod::sys::UMM_NOTIFY_DEVICE),
                };
                ok(kind, detail)
            }
            Err(e) => kmod_unavailable(&e),
        },
        SourceKind::Uffd => match umm_uffd::UffdSource::new(umm_uffd::Options::default()) {
            Ok(_src) => ok(
                kind,
                "userfaultfd opened with UNMAP/REMAP/REMOVE events".into(),
            ),
            Err(e) => uffd_unavailable(&e),
        },
        SourceKind::Interpose => {
            if umm_interpose::hooks_present() && umm_interpose::Options::from_env().libc_only {
                ok(
                    kind,
                    "libc hooks present in this process (UMM_INTERPOSE_LIBC_ONLY=1)".into(),
                )
            } else if umm_interpose::hooks_present() {
                SourceStatus {
                    kind,
                    available: false,
                    detail: "libc hooks present, but they cannot see raw munmap/mremap/madvise/\
                             mmap system calls, so strict interposition refuses every pin"
                        .into(),
                    fix: Some(
                        "set UMM_INTERPOSE_LIBC_ONLY=1 if this program makes no raw memory \
                         system calls (no static or Go code doing them), or load the kernel \
                         module / allow userfaultfd"
                            .into(),
                    ),
                }
            } else {
                SourceStatus {
                    kind,
                    available: false,
                    detail: "no hooks exported in this process".into(),
                    fix: Some(
                        "call umm_interpose::export_hooks!() in the binary, or run it with \
                         LD_PRELOAD=libumm_preload.so"
                            .into(),
                    ),
                }
            }
        }
    }
}

fn ok(kind: SourceKind, detail: String) -> SourceStatus {
    SourceStatus {
        kind,
        available: true,
        detail,
        fix: None,
    }
}

/// The running kernel's release (`uname -r`).
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// An installed `umm_notify.ko*` for kernel `release`, if any (make install or DKMS).
fn installed_module(release: &str) -> Option<PathBuf> {
    fn find(dir: &Path, depth: usize) -> Option<PathBuf> {
        if depth == 0 {
            return None;
        }
        for entry in std::fs::read_dir(dir).ok()?.flatten() {
            let p = entry.path();
            let name = entry.file_name();
            if name.to_string_lossy().starts_with("umm_notify.ko") {
                return Some(p);
            }
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                if let Some(found) = find(&p, depth - 1) {
                    return Some(found);
                }
            }
        }
        None
    }
    let base = Path::new("/lib/modules").join(release);
    ["updates", "extra", "misc"]
        .iter()
        .find_map(|d| find(&base.join(d), 4))
}

fn kmod_unavailable(e: &umm_kmod::Error) -> SourceStatus {
    let release = kernel_release();
    let dev = umm_kmod::sys::UMM_NOTIFY_DEVICE;
    let (detail, fix) = match e {
        umm_kmod::Error::NotLoaded { .. } => {
            if Path::new("/sys/module/umm_notify").exists() {
                (
                    format!("module umm_notify is loaded but {dev} does not exist"),
                    "check udev (udevadm trigger) or create the node from /sys/class/misc/umm_notify/dev".to_string(),
                )
            } else if let Some(ko) = installed_module(&release) {
                (
                    format!("module not loaded (installed at {})", ko.display()),
                    "sudo modprobe umm_notify".to_string(),
                )
            } else if Path::new("/lib/modules")
                .join(&release)
                .join("build")
                .exists()
            {
                (
                    format!("module not built for this kernel ({release})"),
                    "build and load it: make -C kmod-notifier && sudo insmod kmod-notifier/umm_notify.ko \
                     (or scripts/build-kmod.sh for the qemu guest's kernel)"
                        .to_string(),
                )
            } else {
                (
                    format!(
                        "module not built for this kernel ({release}), and no headers in /lib/modules/{release}/build"
                    ),
                    format!(
                        "install the headers (apt-get install linux-headers-{release}), then \
                         sudo scripts/install-kmod.sh (DKMS) and sudo modprobe umm_notify"
                    ),
                )
            }
        }
        umm_kmod::Error::PermissionDenied { .. } => (
            format!("{dev} exists but this user may not open it"),
            "add the user to the device's group: sudo usermod -aG umm $USER (the shipped udev \
             rule makes it mode 0660, group umm), then log in again"
                .to_string(),
        ),
        umm_kmod::Error::AbiMismatch { .. } => (
            e.to_string(),
            "rebuild and reload the module from this source tree".to_string(),
        ),
        other => (
            error_chain(other),
            "see dmesg; reload the module (sudo rmmod umm_notify; sudo modprobe umm_notify)"
                .to_string(),
        ),
    };
    SourceStatus {
        kind: SourceKind::Kmod,
        available: false,
        detail,
        fix: Some(fix),
    }
}

/// `vm.unprivileged_userfaultfd`, if the kernel has it.
pub fn unprivileged_userfaultfd() -> Option<u32> {
    std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd")
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn uffd_unavailable(e: &umm_uffd::UffdError) -> SourceStatus {
    let (detail, fix) = match e {
        umm_uffd::UffdError::Unavailable { syscall, device } => {
            let sysctl = match unprivileged_userfaultfd() {
                Some(v) => format!("vm.unprivileged_userfaultfd={v}"),
                None => "no vm.unprivileged_userfaultfd".into(),
            };
            let dev = if Path::new("/dev/userfaultfd").exists() {
                format!("/dev/userfaultfd: {device}")
            } else {
                "/dev/userfaultfd missing".into()
            };
            (
                format!("userfaultfd(2): {syscall}; {dev}; {sysctl}"),
                "sudo sysctl vm.unprivileged_userfaultfd=1, or give this user read/write on \
                 /dev/userfaultfd (Linux >= 6.1), or run with CAP_SYS_PTRACE; a kernel without \
                 CONFIG_USERFAULTFD cannot"
                    .to_string(),
            )
        }
        umm_uffd::UffdError::MissingFeatures { .. } => (
            e.to_string(),
            "a kernel with UFFD_FEATURE_EVENT_UNMAP/REMAP/REMOVE (Linux >= 4.11)".to_string(),
        ),
        other => (error_chain(other), "see the error".to_string()),
    };
    SourceStatus {
        kind: SourceKind::Uffd,
        available: false,
        detail,
        fix: Some(fix),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s += ": ";
            s += &t;
        }
        cur = c.source();
    }
    s
}

/// One operation of the coverage matrix (a row of `docs/coverage-matrix.md`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scenario {
    /// The row's name in `docs/coverage-matrix.md`.
    pub name: &'static str,
    /// What the source does about it.
    pub verdict: Verdict,
}

/// What a source does about one operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Reported before the call returned: the cache never returns a stale translation.
    Caught,
    /// The source refuses to watch such memory, so `pin` fails (typed) instead of caching
    /// a registration it cannot protect.
    Refused,
    /// Not seen: the application must call `Manager::invalidate` itself.
    NotCaught,
}

/// What a source covers: the rows of `docs/coverage-matrix.md` (the qemu guest's table,
/// where every source ran) for its column.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Coverage {
    /// Every row, in the matrix's order.
    pub scenarios: Vec<Scenario>,
}

/// The matrix's rows and the verdict of (kmod, uffd, interposition in-process).
const MATRIX: &[(&str, [Verdict; 3])] = {
    use Verdict::*;
    &[
        ("munmap of the whole range", [Caught, Caught, Caught]),
        ("munmap of a part", [Caught, Caught, Caught]),
        ("mremap move (MREMAP_FIXED)", [Caught, Caught, Caught]),
        ("mremap shrink in place", [Caught, Caught, Caught]),
        ("mmap(MAP_FIXED) over the range", [Caught, Caught, Caught]),
        ("madvise(MADV_DONTNEED)", [Caught, Caught, Caught]),
        ("free() of a 4 MiB malloc block", [Caught, Caught, Caught]),
        ("sbrk shrink of the heap top", [Caught, Caught, Caught]),
        ("shmdt of a SysV segment", [Caught, Refused, Caught]),
        ("fork + parent write (COW break)", [Caught, Caught, Caught]),
        (
            "syscall(SYS_munmap) (raw, as in a static binary)",
            [Caught, Caught, Refused],
        ),
        ("munmap from another thread", [Caught, Caught, Caught]),
        ("mremap(MREMAP_DONTUNMAP)", [Refused, Refused, Caught]),
        ("madvise(MADV_FREE)", [Caught, Caught, Caught]),
        (
            "madvise(MADV_REMOVE) of shared anonymous memory",
            [Caught, Caught, Caught],
        ),
        (
            "free() + malloc_trim(0) of a 100 KiB heap block",
            [Caught, Caught, Caught],
        ),
        (
            "shmat(SHM_REMAP) over a SysV segment",
            [Caught, Refused, Caught],
        ),
        (
            "fallocate(PUNCH_HOLE) of a memfd (shmem) mapping",
            [Caught, Refused, Refused],
        ),
        (
            "fallocate(PUNCH_HOLE) of an ext4 file mapping",
            [Caught, Refused, Refused],
        ),
        (
            "ftruncate shrink of a memfd (shmem) mapping",
            [Caught, Refused, Refused],
        ),
    ]
};

impl Coverage {
    fn of(kind: SourceKind) -> Coverage {
        let col = match kind {
            SourceKind::Kmod => 0,
            SourceKind::Uffd => 1,
            SourceKind::Interpose => 2,
        };
        Coverage {
            scenarios: MATRIX
                .iter()
                .map(|(name, v)| Scenario {
                    name,
                    verdict: v[col],
                })
                .collect(),
        }
    }

    /// The operations with verdict `v`.
    pub fn with(&self, v: Verdict) -> Vec<&'static str> {
        self.scenarios
            .iter()
            .filter(|s| s.verdict == v)
            .map(|s| s.name)
            .collect()
    }
}

impl fmt::Display for Coverage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (v, label) in [
            (Verdict::Caught, "caught"),
            (Verdict::Refused, "refused (pin fails)"),
            (Verdict::NotCaught, "not caught (call Manager::invalidate)"),
        ] {
            let rows = self.with(v);
            if !rows.is_empty() {
                writeln!(f, "  {label}: {}", rows.join(", "))?;
            }
        }
        Ok(())
    }
}

/// Errors of [`add_best_source`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AutoError {
    /// `UMM_SOURCE` (or a `--source`) names no source.
    #[error("UMM_SOURCE={0:?} names no source (auto, kmod, uffd, interpose or none)")]
    BadPreference(String),
    /// The source asked for does not work here.
    #[error("the {} source was asked for but is unavailable: {}{}", .0.kind, .0.detail,
        .0.fix.as_ref().map(|f| format!("; fix: {f}")).unwrap_or_default())]
    Unavailable(SourceStatus),
    /// No source works here.
    #[error("no notifier source works here: {}", .0.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(" | "))]
    NoneAvailable(Vec<SourceStatus>),
    /// The manager refused the source.
    #[error("adding the {kind} source failed")]
    Add {
        /// The source.
        kind: SourceKind,
        /// The manager's error.
        #[source]
        source: umm::Error,
    },
    /// `UMM_STATS_EXPORT=1` but the export could not start.
    #[error("UMM_STATS_EXPORT=1: the stats export could not start")]
    Export(#[source] std::io::Error),
}

/// What [`add_best_source`] did.
#[derive(Debug)]
pub struct Choice {
    /// The source added, or `None` under `UMM_SOURCE=none`.
    pub picked: Option<SourceKind>,
    /// The better sources that were not available, with why and the fix.
    pub skipped: Vec<SourceStatus>,
    /// What the picked source covers (everything is "not caught" without a source).
    pub coverage: Coverage,
    /// The stats export started under `UMM_STATS_EXPORT=1` (stops when dropped).
    pub export: Option<umm::StatsExport>,
}

impl fmt::Display for Choice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.picked {
            Some(k) => writeln!(f, "notifier source: {k}")?,
            None => writeln!(f, "notifier source: none (UMM_SOURCE=none)")?,
        }
        for s in &self.skipped {
            writeln!(f, "  not {}: {}", s.kind, s.detail)?;
            if let Some(fix) = &s.fix {
                writeln!(f, "    fix: {fix}")?;
            }
        }
        write!(f, "{}", self.coverage)
    }
}

/// Adds the source `UMM_SOURCE` asks for (default: the best available) to `manager`; also
/// starts the stats export when `UMM_STATS_EXPORT=1`.
pub fn add_best_source(manager: &Arc<Manager>) -> Result<Choice, AutoError> {
    add_source_with(manager, Preference::from_env()?)
}

/// [`add_best_source`] with an explicit preference instead of `UMM_SOURCE`.
pub fn add_source_with(manager: &Arc<Manager>, pref: Preference) -> Result<Choice, AutoError> {
    let export = if std::env::var("UMM_STATS_EXPORT").is_ok_and(|v| v == "1") {
        Some(manager.export_stats().map_err(AutoError::Export)?)
    } else {
        None
    };
    let candidates: Vec<SourceKind> = match pref {
        Preference::Auto => SourceKind::ALL.to_vec(),
        Preference::Only(k) => vec![k],
        Preference::None => {
            tracing::info!("UMM_SOURCE=none: no notifier source");
            return Ok(Choice {
                picked: None,
                skipped: Vec::new(),
                coverage: Coverage {
                    scenarios: MATRIX
                        .iter()
                        .map(|(name, _)| Scenario {
                            name,
                            verdict: Verdict::NotCaught,
                        })
                        .collect(),
                },
                export,
            });
        }
    };
    let mut skipped = Vec::new();
    for kind in candidates {
        let added = match kind {
            SourceKind::Kmod => umm_kmod::KmodSource::open()
                .map_err(|e| kmod_unavailable(&e))
                .map(|s| manager.add_source(s)),
            SourceKind::Uffd => umm_uffd::UffdSource::new(umm_uffd::Options::default())
                .map_err(|e| uffd_unavailable(&e))
                .map(|s| manager.add_source(s)),
            SourceKind::Interpose => {
                // Without the libc_only declaration every pin would be refused: the
                // source counts as unavailable (the status says how to declare it).
                let status = probe_one(SourceKind::Interpose);
                if status.available {
                    umm_interpose::InterposeSource::install_with(
                        manager,
                        umm_interpose::Options::from_env(),
                    )
                    .map_err(|_| probe_one(SourceKind::Interpose))
                    .map(|s| manager.add_source(s))
                } else {
                    Err(status)
                }
            }
        };
        match added {
            Ok(Ok(())) => {
                tracing::info!(
                    source = kind.name(),
                    skipped = skipped.len(),
                    "notifier source chosen"
                );
                return Ok(Choice {
                    picked: Some(kind),
                    skipped,
                    coverage: kind.coverage(),
                    export,
                });
            }
            Ok(Err(source)) => return Err(AutoError::Add { kind, source }),
            Err(status) => {
                tracing::debug!(%status, "notifier source unavailable");
                if pref != Preference::Auto {
                    return Err(AutoError::Unavailable(status));
                }
                skipped.push(status);
            }
        }
    }
    Err(AutoError::NoneAvailable(skipped))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hard-coded matrix is the one in docs/coverage-matrix.md (the guest table).
    #[test]
    fn coverage_matches_the_documented_matrix() {
        let doc = include_str!("../../../docs/coverage-matrix.md");
        let guest = doc
            .split("## In the qemu guest")
            .nth(1)
            .expect("the guest section");
        let rows: Vec<Vec<&str>> = guest
            .lines()
            .skip_while(|l| !l.starts_with("| scenario |"))
            .skip(2)
            .take_while(|l| l.starts_with('|'))
            .map(|l| l.trim_matches('|').split('|').map(str::trim).collect())
            .collect();
        assert_eq!(rows.len(), MATRIX.len(), "row count differs from the doc");
        let cell = |c: &str| {
            if c.starts_with("caught") {
                Verdict::Caught
            } else if c.starts_with("refused") {
                Verdict::Refused
            } else {
                assert!(c.contains("not caught"), "unknown cell {c:?}");
                Verdict::NotCaught
            }
        };
        for (row, (name, v)) in rows.iter().zip(MATRIX) {
            assert_eq!(row[0], *name);
            // Columns: userfaultfd, interposition in-process, LD_PRELOAD, kernel module.
            assert_eq!(cell(row[4]), v[0], "kmod: {name}");
            assert_eq!(cell(row[1]), v[1], "uffd: {name}");
            assert_eq!(cell(row[2]), v[2], "interpose: {name}");
        }
    }

    #[test]
    fn preference_parses() {
        assert_eq!("auto".parse::<Preference>().unwrap(), Preference::Auto);
        assert_eq!(
            "UFFD".parse::<Preference>().unwrap(),
            Preference::Only(SourceKind::Uffd)
        );
        assert_eq!("none".parse::<Preference>().unwrap(), Preference::None);
        let e = "ebpf".parse::<Preference>().unwrap_err();
        assert!(e.to_string().contains("ebpf"), "{e}");
    }
}
