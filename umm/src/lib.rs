//! # umm: one memory-registration manager per process
//!
//! Zero-copy I/O needs device translations of user memory (`ibv_reg_mr`,
//! `cuMemHostRegister`, `VK_EXT_external_memory_host`). Registering costs microseconds to
//! milliseconds, so libraries cache registrations, and the cache goes stale when the
//! application unmaps or remaps the memory. `umm` keeps **one** cache for every device of
//! the process, deduplicates registrations with reference counts, and turns **one**
//! invalidation event into the deregistration of every device's translation of that range.
//!
//! * Devices implement [`Backend`] (in their own crates: `umm-rdma`, `umm-cuda`,
//!   `umm-vulkan`); the core knows no device.
//! * Invalidation sources implement [`NotifierSource`] (the kernel module, userfaultfd,
//!   interposition) or call [`Manager::invalidate`] directly.
//! * [`Manager::pin`] returns an RAII [`Pin`]; a cache hit takes no lock and allocates
//!   nothing (see [`manager`] for the algorithm and its costs).
//!
//! ```
//! use umm::{Manager, Range, testing::RecordingBackend};
//!
//! let manager = Manager::default();
//! let nic = manager.attach(RecordingBackend::new("nic")).unwrap();
//! let gpu = manager.attach(RecordingBackend::new("gpu").refusing_overlap()).unwrap();
//!
//! let buf = vec![0u8; 1 << 16];
//! let range = Range::of_slice(&buf).unwrap();
//! {
//!     let pin = manager.pin(range, &[nic.id(), gpu.id()]).unwrap(); // miss: registers twice
//!     let t = pin.translation(nic).unwrap();
//!     assert!(t.range.contains(&range) && pin.is_valid());
//! }
//! let again = manager.pin(range, &[nic.id(), gpu.id()]).unwrap(); // hit: no backend call
//! manager.invalidate(range); // e.g. from a notifier: buf's pages are going away
//! assert!(!again.is_valid());
//! drop(again); // the last pin of a stale entry drops: both devices deregister once
//! manager.flush();
//! let stats = manager.stats();
//! assert_eq!((stats.hits(), stats.misses()), (2, 2));
//! assert_eq!(stats.registrations(), stats.deregistrations());
//! ```

#![deny(missing_docs)]

pub mod backend;
pub mod device;
mod entry;
pub mod error;
pub mod export;
mod fork;
mod index;
pub mod manager;
pub mod range;
pub mod source;
pub mod stats;
pub mod testing;

/// The README's example, compiled and run as a doc test so it cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;

pub use backend::{Backend, BackendError, BackendErrorKind, Capabilities};
pub use device::{Device, DeviceId};
pub use error::{memlock_limit, Error, Result};
pub use export::StatsExport;
pub use manager::{
    Config, Manager, OwnedPin, Pin, Pinned, Reaper, MAX_DEVICES, MAX_PIN_DEVICES, MAX_SOURCES,
};
pub use range::{page_size, Range};
pub use source::{IntoSource, InvalidationSink, ManagerId, NotifierSource, Uncovered};
pub use stats::{DeviceStats, Stats};
