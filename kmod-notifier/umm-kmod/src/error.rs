//! Errors of the binding: each names the device path or the watch and keeps the OS error.

use std::io;
use std::path::PathBuf;

/// What went wrong talking to `/dev/umm_notify`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The device could not be opened (module not loaded: `ENOENT`).
    #[error("cannot open {}: {source}", path.display())]
    Open {
        /// The device path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `UMM_NOTIFY_IOC_INFO` failed.
    #[error("UMM_NOTIFY_IOC_INFO on {} failed: {source}", path.display())]
    Info {
        /// The device path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The module speaks another ABI version than this crate.
    #[error("{} speaks umm_notify ABI version {found}, this crate speaks {expected}", path.display())]
    AbiMismatch {
        /// The device path.
        path: PathBuf,
        /// The module's version.
        found: u32,
        /// This crate's version.
        expected: u32,
    },
    /// The generation page could not be mapped.
    #[error("cannot map the generation page of {}: {source}", path.display())]
    Map {
        /// The device path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `UMM_NOTIFY_IOC_WATCH` failed.
    #[error("watching [{start:#x}, +{len:#x}) as cookie {cookie} failed: {source}")]
    Watch {
        /// The cookie.
        cookie: u64,
        /// The range's first byte.
        start: u64,
        /// The range's length.
        len: u64,
        /// The OS error (`EINVAL`, `EOVERFLOW`, `EFAULT`, `EEXIST`, `ENOSPC`, `EPERM`).
        #[source]
        source: io::Error,
    },
    /// `UMM_NOTIFY_IOC_UNWATCH` failed.
    #[error("unwatching cookie {cookie} failed: {source}")]
    Unwatch {
        /// The cookie.
        cookie: u64,
        /// The OS error (`ENOENT`: no such watch).
        #[source]
        source: io::Error,
    },
    /// Reading or polling the event ring failed.
    #[error("reading events from {} failed: {source}", path.display())]
    Read {
        /// The device path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The range to watch is not a valid address range.
    #[error("cannot watch {range:?}: {source}")]
    Range {
        /// The range as given.
        range: umm::Range,
        /// Why it cannot be aligned out to pages.
        #[source]
        source: umm::Error,
    },
}

impl Error {
    /// The OS errno behind the error, if there is one.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            Error::Open { source, .. }
            | Error::Info { source, .. }
            | Error::Map { source, .. }
            | Error::Watch { source, .. }
            | Error::Unwatch { source, .. }
            | Error::Read { source, .. } => source.raw_os_error(),
            Error::AbiMismatch { .. } | Error::Range { .. } => None,
        }
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
