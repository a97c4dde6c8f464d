//! The one error type of the core crate.

use std::time::Duration;

use crate::backend::BackendError;
use crate::device::DeviceId;
use crate::range::Range;

/// Everything `umm` can refuse or fail at. Each variant names the range and, where one is
/// involved, the device; backend failures keep the backend's error as their source.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A zero-length range.
    #[error("empty range at {start:#x}")]
    EmptyRange {
        /// Start address of the empty request.
        start: usize,
    },
    /// `start + len` does not fit in the address space (also after rounding out to pages).
    #[error("range {start:#x} + {len:#x} overflows the address space")]
    RangeOverflow {
        /// Start address of the request.
        start: usize,
        /// Length of the request.
        len: usize,
    },
    /// Part of the range is not mapped in this process.
    #[error("range {range} is not (entirely) mapped")]
    Unmapped {
        /// The (page-rounded) range that was checked.
        range: Range,
    },
    /// The device id is not attached to this manager (or belongs to another one).
    #[error(
        "device {0} is not attached to this manager (it was attached to {m}; use the \
         DeviceId returned by this manager's attach)",
        m = .0.manager()
    )]
    UnknownDevice(DeviceId),
    /// The same device was named twice in one `pin`, or more than [`crate::MAX_PIN_DEVICES`].
    #[error("bad device list: {reason}")]
    BadDeviceList {
        /// What is wrong with the list.
        reason: &'static str,
    },
    /// More devices attached than the manager supports.
    #[error("too many devices (at most {max})")]
    TooManyDevices {
        /// The limit.
        max: usize,
    },
    /// More notifier sources added than the manager supports.
    #[error("too many notifier sources (at most {max})")]
    TooManySources {
        /// The limit.
        max: usize,
    },
    /// The registration would exceed the backend's maximum registration size.
    #[error("{range} is larger than device {device}'s maximum registration of {max} bytes")]
    TooLarge {
        /// The device.
        device: DeviceId,
        /// The (rounded) range.
        range: Range,
        /// The backend's maximum.
        max: usize,
    },
    /// The backend ran out of pinnable memory even after every unreferenced entry of the
    /// device was evicted and the registration retried once.
    #[error(
        "device {device}: cannot register {range}: out of pinnable memory \
         ({registered_bytes} bytes registered on this device, RLIMIT_MEMLOCK {})",
        memlock_text(*memlock_limit)
    )]
    MemlockLimit {
        /// The device.
        device: DeviceId,
        /// The range that could not be registered.
        range: Range,
        /// Bytes this manager had registered on the device when it gave up.
        registered_bytes: u64,
        /// The process's RLIMIT_MEMLOCK soft limit in bytes (`None` = unlimited).
        memlock_limit: Option<u64>,
        /// The backend's last error.
        #[source]
        source: BackendError,
    },
    /// The device cannot hold overlapping registrations, and an overlapping one is still
    /// held by a [`crate::Pin`] (valid or already invalidated) after waiting `waited`.
    #[error(
        "device {device}: {range} overlaps {holder}, still pinned after {waited:?} \
         (the device refuses overlapping registrations)"
    )]
    DeviceRangeBusy {
        /// The device.
        device: DeviceId,
        /// The range that was asked for.
        range: Range,
        /// The registered range that is still held.
        holder: Range,
        /// How long the pin waited for the holder to be released.
        waited: Duration,
    },
    /// An invalidation kept racing with the registration of this range.
    #[error("device {device}: {range} was invalidated {attempts} times while being registered")]
    Unstable {
        /// The device.
        device: DeviceId,
        /// The range.
        range: Range,
        /// How many registrations were thrown away.
        attempts: u32,
    },
    /// The backend failed to register the range.
    #[error("device {device}: registering {range} failed")]
    Backend {
        /// The device.
        device: DeviceId,
        /// The (rounded) range.
        range: Range,
        /// The backend's error.
        #[source]
        source: BackendError,
    },
    /// One entry's reference count on this thread's stripe is saturated (about 2^23 pins
    /// of one registration held at once, e.g. leaked with `mem::forget`). The count never
    /// wraps: this pin is refused instead.
    #[error("device {device}: too many pins of the registration covering {range} are held")]
    TooManyPins {
        /// The device.
        device: DeviceId,
        /// The range that was asked for.
        range: Range,
    },
    /// Called from inside a backend call of the same device (e.g. `pin` inside
    /// [`crate::Backend::deregister`]), which holds the device's lock: waiting for it would
    /// deadlock.
    #[error("device {device}: re-entered from inside one of its own backend calls")]
    Reentrant {
        /// The device.
        device: DeviceId,
    },
    /// An environment variable read by [`crate::Config::from_env`] is malformed.
    #[error("{variable}={value:?} is not valid: expected {expected}")]
    Config {
        /// The variable.
        variable: &'static str,
        /// Its value.
        value: String,
        /// What it should look like.
        expected: &'static str,
    },
    /// A notifier source cannot see an operation that could make this range stale (for
    /// example userfaultfd and a hole punched in a shared memory file), so umm refuses to
    /// pin it rather than risk a stale translation. Pin such memory with a source that sees
    /// the operation (the kernel module), or turn the source's strict mode off to accept
    /// the risk.
    #[error(
        "refusing to pin {range}: it is {mapping}, and notifier source {source_name} cannot \
         see {operation} there (a registration could go stale unnoticed)"
    )]
    Uncovered {
        /// The source's name.
        source_name: String,
        /// The range that was to be registered.
        range: Range,
        /// What kind of mapping it is.
        mapping: &'static str,
        /// The operation the source cannot see.
        operation: &'static str,
    },
    /// A notifier source refused to be added to this manager (for example because it
    /// already serves another manager and cannot deliver its events to both).
    #[error("notifier source {source_name} cannot be added to this manager")]
    Source {
        /// The source's name.
        source_name: String,
        /// Why the source refused.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The manager was created by the parent of this forked process. Its registrations
    /// and notifier sources belong to the parent (a child calling them would act on the
    /// parent's devices and watches), so a child gets nothing from it: create a new
    /// manager in the child.
    #[error(
        "this manager belongs to the parent process (pid {parent}); create a new one after fork"
    )]
    ForkedChild {
        /// The pid of the process that created the manager.
        parent: u32,
    },
    /// A notifier source could not watch the range, so the registration would go stale
    /// unnoticed; the registration was undone.
    #[error("notifier source {source_name} cannot watch {range}")]
    Watch {
        /// The source's name.
        source_name: String,
        /// The range.
        range: Range,
        /// The source's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

fn memlock_text(limit: Option<u64>) -> String {
    match limit {
        Some(l) => format!("{l} bytes"),
        None => "unlimited".to_string(),
    }
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The process's RLIMIT_MEMLOCK soft limit in bytes, `None` when unlimited.
pub fn memlock_limit() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we own.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) };
    if rc != 0 || lim.rlim_cur == libc::RLIM_INFINITY {
        None
    } else {
        Some(lim.rlim_cur)
    }
}
