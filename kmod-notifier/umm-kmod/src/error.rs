//! Errors of the binding: each names the device path or the watch, and either keeps the OS
//! error as its source or, where the cause is known, says what to do in its message.

use std::io;
use std::path::PathBuf;

/// How to install and load the module, quoted by [`Error::NotLoaded`].
pub const INSTALL_HINT: &str = "install the kmod-notifier module (from the umm repository: \
     `sudo scripts/install-kmod.sh`, which builds it with DKMS for the running kernel and \
     installs the udev rule), then `sudo modprobe umm_notify`; without DKMS: \
     `make -C kmod-notifier && sudo insmod kmod-notifier/umm_notify.ko`";

/// What went wrong talking to `/dev/umm_notify`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The device node does not exist: the module is not loaded (or not installed).
    #[error("{} does not exist: the kmod-notifier module is not loaded; {INSTALL_HINT}", path.display())]
    NotLoaded {
        /// The device path.
        path: PathBuf,
    },
    /// The device exists but this user may not open it.
    #[error(
        "permission denied opening {}: the device is mode 0660, group `umm` with the shipped \
         udev rule (kmod-notifier/udev/99-umm-notify.rules); add the user to that group \
         (`sudo usermod -aG umm $USER`, then log in again)",
        path.display()
    )]
    PermissionDenied {
        /// The device path.
        path: PathBuf,
    },
    /// The device could not be opened for another reason.
    #[error("cannot open {}", path.display())]
    Open {
        /// The device path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `UMM_NOTIFY_IOC_INFO` failed.
    #[error("UMM_NOTIFY_IOC_INFO on {} failed", path.display())]
    Info {
        /// The device path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The module speaks another ABI version than this crate.
    #[error(
        "{} speaks umm_notify ABI version {found}, this crate speaks {expected}: load the \
         module built from the same umm release (`sudo rmmod umm_notify`, then install it again)",
        path.display()
    )]
    AbiMismatch {
        /// The device path.
        path: PathBuf,
        /// The module's version.
        found: u32,
        /// This crate's version.
        expected: u32,
    },
    /// The generation page could not be mapped.
    #[error("cannot map the generation page of {}", path.display())]
    Map {
        /// The device path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The device was opened by another process: this is a fork child's inherited copy.
    /// The kernel refuses it too (`EPERM`); this crate refuses before asking.
    #[error(
        "{} was opened by process {opener}; process {caller} (a fork child) cannot use it: \
         open the device again in the child",
        path.display()
    )]
    ForkedChild {
        /// The device path.
        path: PathBuf,
        /// The process that opened it.
        opener: u32,
        /// The calling process.
        caller: u32,
    },
    /// The open file holds as many watches as the module allows (`ENOSPC`).
    #[error(
        "cannot watch [{start:#x}, +{len:#x}): this open file already holds the module's \
         limit of {max_watches} watches (module parameter max_watches)"
    )]
    WatchLimit {
        /// The range's first byte.
        start: u64,
        /// The range's length.
        len: u64,
        /// The module's per-file limit.
        max_watches: u32,
    },
    /// `UMM_NOTIFY_IOC_WATCH` failed.
    #[error("watching [{start:#x}, +{len:#x}) failed")]
    Watch {
        /// The range's first byte.
        start: u64,
        /// The range's length.
        len: u64,
        /// The OS error (`EINVAL`, `EOVERFLOW`, `EFAULT`, `EPERM`, `ENOMEM`).
        #[source]
        source: io::Error,
    },
    /// The manager asked to watch a cookie that is already watched.
    #[error("cookie {cookie} is already watched by this source")]
    CookieInUse {
        /// The cookie.
        cookie: u64,
    },
    /// `UMM_NOTIFY_IOC_UNWATCH` failed.
    #[error("unwatching watch id {id} failed")]
    Unwatch {
        /// The module's id of the watch.
        id: u64,
        /// The OS error (`ENOENT`: no such watch).
        #[source]
        source: io::Error,
    },
    /// Reading or polling the event ring failed.
    #[error("reading events from {} failed", path.display())]
    Read {
        /// The device path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The range to watch is not a valid address range.
    #[error("cannot watch {range:?}")]
    Range {
        /// The range as given.
        range: umm::Range,
        /// Why it cannot be aligned out to pages.
        #[source]
        source: umm::Error,
    },
    /// A second manager tried to use a source that serves one manager.
    #[error(
        "the kmod-notifier source already serves {attached}; {requested} needs its own \
         (KmodSource::open() again: each open file has its own watches and ring)"
    )]
    AlreadyAttached {
        /// The manager it serves.
        attached: umm::ManagerId,
        /// The manager that asked.
        requested: umm::ManagerId,
    },
}

impl Error {
    /// The OS errno behind the error, if there is one (`ENOENT` for [`Error::NotLoaded`],
    /// `EACCES` for [`Error::PermissionDenied`], `EPERM` for [`Error::ForkedChild`], `ENOSPC`
    /// for [`Error::WatchLimit`]).
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            Error::Open { source, .. }
            | Error::Info { source, .. }
            | Error::Map { source, .. }
            | Error::Watch { source, .. }
            | Error::Unwatch { source, .. }
            | Error::Read { source, .. } => source.raw_os_error(),
            Error::NotLoaded { .. } => Some(libc::ENOENT),
            Error::PermissionDenied { .. } => Some(libc::EACCES),
            Error::ForkedChild { .. } => Some(libc::EPERM),
            Error::WatchLimit { .. } => Some(libc::ENOSPC),
            Error::CookieInUse { .. } => Some(libc::EEXIST),
            Error::AbiMismatch { .. } | Error::Range { .. } | Error::AlreadyAttached { .. } => None,
        }
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn read(rel: &str) -> String {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel);
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
    }

    /// The messages name files, a group and a script: they must exist and agree.
    #[test]
    fn install_hints_match_the_shipped_files() {
        let rule = read("udev/99-umm-notify.rules");
        assert!(
            rule.lines().any(|l| !l.starts_with('#')
                && l.contains(r#"KERNEL=="umm_notify""#)
                && l.contains(r#"GROUP="umm""#)
                && l.contains(r#"MODE="0660""#)),
            "udev rule: {rule}"
        );
        assert!(read("umm_notify.c").contains(".mode = 0660,"));
        let dkms = read("dkms.conf");
        assert!(dkms.contains(r#"BUILT_MODULE_NAME[0]="umm_notify""#));
        assert!(read("../scripts/install-kmod.sh").contains("dkms install"));
        assert!(read("modprobe.d/umm_notify.conf").contains("options umm_notify"));

        let not_loaded = Error::NotLoaded {
            path: "/dev/umm_notify".into(),
        }
        .to_string();
        assert!(
            not_loaded.contains("scripts/install-kmod.sh"),
            "{not_loaded}"
        );
        assert!(not_loaded.contains("modprobe umm_notify"), "{not_loaded}");
        let denied = Error::PermissionDenied {
            path: "/dev/umm_notify".into(),
        }
        .to_string();
        assert!(
            denied.contains("udev/99-umm-notify.rules") && denied.contains("group `umm`"),
            "{denied}"
        );
    }
}
