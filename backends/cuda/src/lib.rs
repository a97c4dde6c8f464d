//! # umm-cuda: CUDA GPUs as `umm` backends
//!
//! [`CudaBackend`] makes a host range visible to one CUDA device with
//! `cuMemHostRegister` (flags [`HostRegisterFlags`], default `DEVICEMAP | PORTABLE`); the
//! translation ([`CudaRegistration`]) holds the device pointer from
//! `cuMemHostGetDevicePointer`. Deregistration is `cuMemHostUnregister`.
//!
//! * The driver is loaded at run time through cudarc's dynamic loading: the crate builds
//!   and runs on machines without CUDA. [`driver_present`] is checked before any driver
//!   call, so a machine without the driver gets [`CudaError::NoDriver`] (and one without a
//!   device [`CudaError::NoDevice`]) instead of cudarc's panic.
//! * Contexts: the device's primary context, pushed around every call (see [`backend`]).
//! * CUDA refuses overlapping host registrations, so `allows_overlap = false` and the core
//!   merges, orders "deregister stale, then register fresh", and reports
//!   `umm::Error::DeviceRangeBusy` when a stale overlapping entry is still pinned.
//! * [`CudaBackend::xor_pattern`] launches a PTX kernel (loaded with `cuModuleLoadData`)
//!   that reads and writes through the device pointer, so a registration can be proven.
//!
//! ```
//! use umm::Manager;
//! use umm_cuda::{CudaBackend, CudaError};
//!
//! let manager = Manager::default();
//! match CudaBackend::new(0) {
//!     Ok(gpu) => {
//!         let gpu = manager.attach(gpu)?;
//!         let buf = vec![0u8; 1 << 16];
//!         let pin = manager.pin(umm::Range::of_slice(&buf)?, &[gpu.id()])?;
//!         assert!(pin.translation(gpu).unwrap().device_ptr.is_some());
//!     }
//!     // No driver or no GPU on this machine: a typed error, not a panic.
//!     Err(e @ (CudaError::NoDriver { .. } | CudaError::NoDevice { .. })) => {
//!         eprintln!("no CUDA here: {e}");
//!     }
//!     Err(e) => return Err(e.into()),
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![deny(missing_docs)]

pub mod backend;
pub mod error;
pub mod kernel;

pub use backend::{device_count, driver_present, CudaBackend, CudaRegistration, HostRegisterFlags};
pub use error::{kind_of, CudaError};
pub use kernel::{pattern_word, xor_pattern_bytes, PTX};
