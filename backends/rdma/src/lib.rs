//! # umm-rdma: the verbs backend of umm
//!
//! An [`RdmaDevice`] is one opened verbs device with **one protection domain**; an
//! [`RdmaBackend`] registers ranges in that protection domain with fixed access flags
//! (`ibv_reg_mr` through [`sideway`]) and hands the manager an [`MrTranslation`]
//! (`lkey`, `rkey`, address, length). Access flags are chosen per pin by attaching one
//! backend per access class to the manager, all sharing the device's protection domain
//! (see [`RdmaBackend::new`]). [`transport`] is a small RC queue-pair pair for tests and
//! demos (RDMA WRITE and READ with the translations umm returns), not a product feature.
//! [`RawPdBackend`] registers in a protection domain the application allocated itself
//! (a raw `struct ibv_pd *`, as the C API receives it).
//!
//! Errors are typed: no verbs stack (`ibv_get_device_list` fails with `ENOSYS`, as on a
//! host without RDMA) or no device is [`RdmaError::NoDevice`]; a failed registration keeps
//! its errno and, for `ENOMEM`/`EPERM`, names the process's RLIMIT_MEMLOCK and whether the
//! caller holds `CAP_IPC_LOCK` (the manager then evicts and retries once).
//!
//! ```
//! use umm::Manager;
//! use umm_rdma::{Access, DeviceSelector, RdmaBackend, RdmaDevice, RdmaError};
//!
//! match RdmaDevice::open(&DeviceSelector::First) {
//!     Ok(device) => {
//!         let manager = Manager::default();
//!         let nic = manager.attach(RdmaBackend::new(device, Access::REMOTE_RW)).unwrap();
//!         let buf = vec![7u8; 1 << 16];
//!         let pin = manager.pin(umm::Range::of_slice(&buf).unwrap(), &[nic.id()]).unwrap();
//!         let mr = pin.translation(nic).unwrap();
//!         assert!(mr.addr <= buf.as_ptr() as u64);
//!     }
//!     // A machine without an RDMA stack or device: a typed error, not a panic.
//!     Err(RdmaError::NoDevice { .. }) => {}
//!     Err(e) => panic!("{e}"),
//! }
//! ```

#![deny(missing_docs)]

mod backend;
mod device;
mod raw;
pub mod transport;

pub use backend::{Access, MrTranslation, RdmaBackend, RegisterError};
pub use device::{list_devices, DeviceInfo, DeviceSelector, RdmaDevice, RdmaError};
pub use raw::{RawMrTranslation, RawPdBackend};
pub use sideway;

/// Whether libibverbs' fork support is initialised, unneeded (the kernel copes with fork
/// of pinned memory itself, Linux ≥ 5.13) or disabled: `ibv_is_fork_initialized()`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForkSupport {
    /// `IBV_FORK_DISABLED`: registrations may break in a forked parent.
    Disabled,
    /// `IBV_FORK_ENABLED`: `ibv_fork_init()` ran (MADV_DONTFORK on every MR).
    Enabled,
    /// `IBV_FORK_UNNEEDED`: the kernel keeps pinned pages with the parent on fork.
    Unneeded,
}

/// What rdma-core reports about fork support (see [`ForkSupport`]).
pub fn fork_support() -> ForkSupport {
    use rdma_mummy_sys::{IBV_FORK_ENABLED, IBV_FORK_UNNEEDED};
    // SAFETY: ibv_is_fork_initialized takes no arguments and only reads libibverbs state.
    match unsafe { rdma_mummy_sys::ibv_is_fork_initialized() } {
        IBV_FORK_ENABLED => ForkSupport::Enabled,
        IBV_FORK_UNNEEDED => ForkSupport::Unneeded,
        _ => ForkSupport::Disabled,
    }
}
