//! # umm-fabric: umm's notifier sources as libfabric's memory monitor
//!
//! libfabric's providers (verbs, and rxm over it) keep a registration cache that trusts a
//! *memory monitor* to say when a cached buffer's pages change. The stock monitors miss
//! changes: memhooks (the default) sees only libc calls, so raw `syscall(SYS_munmap)` +
//! `syscall(SYS_mmap)` and `fallocate(PUNCH_HOLE)` on a shared tmpfs mapping leave the
//! cache sending the **old** bytes; userfaultfd misses `shmat(SHM_REMAP)` and hangs after a
//! hole punch. This crate plugs umm's sources in instead, through libfabric's import
//! extension (`rdma/fi_ext.h`): `fi_open("mr_cache")` + `fi_import_fid` of a
//! `struct fid_mem_monitor` whose start/stop/subscribe/unsubscribe/valid are [`Monitor`]'s.
//!
//! * **Source**: the kernel module (`/dev/umm_notify`) where it is loaded, else userfaultfd
//!   in strict mode; `UMM_SOURCE=kmod|uffd|auto` chooses (see [`Config`]). A range the
//!   source cannot protect (userfaultfd: shared memory files, SysV shm) is refused at
//!   subscribe, so libfabric leaves that registration out of its cache and registers it
//!   for each use: correct bytes, no caching.
//! * **Hits**: libfabric's `valid` drains the source when its generation moved (bumped
//!   before the unmapping syscall returns), so a cache hit never returns a registration of
//!   pages that were replaced.
//! * **notify**: a thread of the monitor hands invalidated ranges to libfabric's `notify`
//!   with no lock held (libfabric's notify takes the lock it holds around subscribe and
//!   valid, and calls back into unsubscribe), releasing stale registrations early.
//!
//! ## Use
//!
//! Unmodified programs: `LD_PRELOAD=libumm_fabric.so program` (the constructor installs
//! the monitor; `UMM_FABRIC_AUTO=0` disables that). Programs: call
//! `umm_fabric_install()` (C, `include/umm_fabric.h`) or [`install`] (Rust) before the
//! first `fi_domain`. Leave `FI_MR_CACHE_MONITOR` unset: libfabric's initialisation would
//! replace the imported monitor with the one it names ([`install`] refuses then).
//!
//! ## Example
//!
//! The monitor on a source of your own (the library builds it on the kernel module or
//! userfaultfd); `notify` receives what libfabric would:
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use std::time::Duration;
//! use umm_fabric::testing::ManualSource;
//! use umm_fabric::{Monitor, MonitorOptions, Source};
//!
//! let src = Arc::new(ManualSource::new());
//! let seen = Arc::new(Mutex::new(Vec::new()));
//! let record = seen.clone();
//! let monitor = Monitor::new(
//!     Source::Other(src.clone()),
//!     Arc::new(move |r| record.lock().unwrap().push(r)),
//!     MonitorOptions { interval: Duration::from_millis(5), ..Default::default() },
//! )?;
//! monitor.subscribe(0x10000, 0x4000)?;
//! assert!(monitor.valid(0x10000, 0x4000));
//! src.fire(umm::Range::new(0x11000, 0x1000)?);
//! assert!(!monitor.valid(0x10000, 0x4000)); // the hit is refused at once
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod config;
mod error;
mod ffi;
mod monitor;
pub mod testing;

pub use config::{Config, SourceChoice};
pub use error::FabricError;
pub use ffi::{
    install, installed, monitor, umm_fabric_install, umm_fabric_installed, umm_fabric_source,
};
pub use monitor::{Monitor, MonitorOptions, MonitorStats, NotifyFn, Source};
