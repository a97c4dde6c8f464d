//! # umm-kmod: the `kmod-notifier` kernel module from Rust
//!
//! `kmod-notifier` (C, in this crate's parent directory) provides `/dev/umm_notify`: an
//! open file binds the process's address space; each watch is an `mmu_interval_notifier`
//! whose callback records `{cookie, start, end, kind, seq}` in a ring and bumps a 64-bit
//! generation in a read-only mmap'd page **before the causing syscall returns**, whatever
//! caused it (munmap, mremap, `mmap(MAP_FIXED)`, madvise, glibc's internal unmaps, COW
//! breaks, truncation by another process, migration, exit).
//!
//! * [`sys`]: the `#[repr(C)]` mirror of the uapi header, tested against the header.
//! * [`NotifyDevice`]: a safe wrapper of one open file (watch, unwatch, read, poll, the
//!   generation counter).
//! * [`KmodSource`]: the module as a [`umm::NotifierSource`] (poll-driven drain; see
//!   [`source`]).
//!
//! ```no_run
//! use std::sync::Arc;
//! use umm::{testing::RecordingBackend, Manager, Range};
//! use umm_kmod::KmodSource;
//!
//! let manager = Manager::default();
//! let nic = manager.attach(RecordingBackend::new("nic")).unwrap();
//! manager.add_source(Arc::new(KmodSource::open()?)).unwrap();
//!
//! let buf = vec![0u8; 1 << 20];
//! let pin = manager.pin(Range::of_slice(&buf).unwrap(), &[nic.id()]).unwrap();
//! drop(pin);
//! drop(buf); // glibc munmaps the block: the kernel bumps the generation right here,
//!            // so the next pin of these addresses cannot hit the old registration.
//! # Ok::<(), umm_kmod::Error>(())
//! ```
//!
//! Without the module, [`NotifyDevice::is_available`] is false and [`KmodSource::open`]
//! fails with [`Error::NotLoaded`], whose message says how to install the module (DKMS:
//! `scripts/install-kmod.sh`, see `kmod-notifier/README.md`):
//!
//! ```
//! use umm_kmod::{Error, KmodSource, NotifyDevice};
//!
//! match KmodSource::open() {
//!     Ok(source) => assert!(NotifyDevice::is_available() && source.device().info().is_ok()),
//!     Err(e @ Error::NotLoaded { .. }) => {
//!         assert!(!NotifyDevice::is_available());
//!         assert!(e.to_string().contains("install-kmod.sh"));
//!     }
//!     // Installed, but this user is not in the device's group.
//!     Err(Error::PermissionDenied { .. }) => {}
//!     Err(e) => panic!("unexpected: {e}"),
//! }
//! ```
//!
//! # What a fork child gets
//!
//! Nothing from the parent's source: the open file belongs to the process that opened it.
//! In the child, [`NotifyDevice`] methods fail with [`Error::ForkedChild`] and a
//! [`KmodSource`] ignores `unwatch`/`drain`/`detach` (no system call), so the child can neither
//! remove the parent's watches nor consume its records, and the module refuses every use of
//! the inherited file from another address space with `EPERM` besides. The parent keeps
//! receiving every event of its watches. The child's copy of the manager refuses to pin
//! (`umm::Error::ForkedChild`); a child that needs a cache opens its own source.

pub mod device;
pub mod error;
pub mod source;
pub mod sys;

pub use device::{Event, EventKind, Info, NotifyDevice};
pub use error::{Error, Result};
pub use source::KmodSource;
