//! [`FabricError`]: everything umm-fabric can fail with.

use umm::Range;

/// Why installing or running the monitor failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FabricError {
    /// An environment variable has a value umm-fabric does not understand.
    #[error("{var}={value:?}: {expected}")]
    BadEnv {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
        /// What it accepts.
        expected: &'static str,
    },
    /// `FI_MR_CACHE_MONITOR` is set: libfabric would replace the imported monitor with the
    /// one it names when it initialises, so the import would be silently ignored.
    #[error("FI_MR_CACHE_MONITOR={0:?} overrides an imported monitor; unset it to use umm-fabric")]
    MonitorOverridden(String),
    /// No usable notifier source.
    #[error("no notifier source works here (kernel module: {kmod}; userfaultfd: {uffd})")]
    NoSource {
        /// Why the kernel module cannot be used.
        kmod: String,
        /// Why userfaultfd cannot be used.
        uffd: String,
    },
    /// The kernel module source was asked for and cannot be opened.
    #[error("kernel module source (UMM_SOURCE=kmod)")]
    Kmod(#[source] umm_kmod::Error),
    /// The userfaultfd source was asked for and cannot be started.
    #[error("userfaultfd source (UMM_SOURCE=uffd)")]
    Uffd(#[source] umm_uffd::UffdError),
    /// The source cannot protect this memory (strict mode); libfabric leaves the
    /// registration out of its cache.
    #[error(transparent)]
    Uncovered(umm::Uncovered),
    /// The source failed to watch a range.
    #[error("watching {range} failed")]
    Watch {
        /// The range.
        range: Range,
        /// The source's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// libfabric asked about an empty or wrapping range.
    #[error("range {addr:#x}+{len} is empty or wraps")]
    BadRange {
        /// Start address.
        addr: usize,
        /// Length.
        len: usize,
    },
    /// The monitor thread could not be started.
    #[error("starting the monitor thread")]
    Thread(#[source] std::io::Error),
    /// libfabric is not loaded and `libfabric.so.1` cannot be loaded.
    #[error("libfabric is not available: {0}")]
    NoLibfabric(String),
    /// A libfabric call failed.
    #[error("{step} returned {code} ({text})")]
    Libfabric {
        /// The call.
        step: &'static str,
        /// Its (negative) return value.
        code: i32,
        /// `fi_strerror` of it.
        text: String,
    },
}

impl FabricError {
    /// The negative errno-style code handed to C callers and to libfabric.
    pub fn code(&self) -> i32 {
        match self {
            FabricError::BadEnv { .. } | FabricError::BadRange { .. } => -libc::EINVAL,
            FabricError::MonitorOverridden(_) => -libc::EBUSY,
            FabricError::NoSource { .. } | FabricError::NoLibfabric(_) => -libc::ENOSYS,
            FabricError::Kmod(_) | FabricError::Uffd(_) => -libc::ENODEV,
            // libfabric only checks for non-zero; EINVAL names "refused".
            FabricError::Uncovered(_) => -libc::EINVAL,
            FabricError::Watch { .. } => -libc::EIO,
            FabricError::Thread(_) => -libc::EAGAIN,
            FabricError::Libfabric { code, .. } => {
                if *code < 0 {
                    *code
                } else {
                    -libc::EIO
                }
            }
        }
    }
}
