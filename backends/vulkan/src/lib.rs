//! # umm-vulkan: Vulkan devices as `umm` backends
//!
//! [`VulkanBackend`] makes a host range visible to a Vulkan device by importing it with
//! `VK_EXT_external_memory_host` and binding a [`ash::vk::Buffer`] over it; the
//! [`VulkanImport`] (memory, buffer, offset) is the translation a [`umm::Pin`] hands out.
//!
//! * The Vulkan loader is loaded at run time (`ash::Entry::load`): no link-time dependency;
//!   without a loader or a driver the constructor returns [`VulkanError::NoLoader`] or
//!   [`VulkanError::NoDevice`].
//! * Devices are chosen by [`DeviceSelector`] (first capable, index, name, UUID).
//! * Imports must start and end on `minImportedHostPointerAlignment`; the backend reports it
//!   as its [`umm::Capabilities::alignment`] and rejects anything else itself, because
//!   lavapipe accepts misaligned pointers that real drivers reject.
//! * Repeated and overlapping imports are allowed by the extension (see [`backend`]), so
//!   `allows_overlap = true`; [`VulkanBackend::allow_overlap`] turns it off for a driver
//!   that refuses them.
//! * Two compute kernels ([`VulkanBackend::fill_pattern`], [`VulkanBackend::checksum`],
//!   WGSL compiled to SPIR-V at build time) use an import from the device.
//!
//! What an import means depends on the driver: a real GPU pins the pages (a stale import
//! keeps writing the old pages after `munmap` + `mmap(MAP_FIXED)`, the seed's bug), while
//! lavapipe uses the host pointer directly (a stale import reaches whatever is mapped there
//! now). Either way umm must deregister on invalidation; tests on lavapipe prove the
//! plumbing, not pinning.
//!
//! ```
//! use umm::{Manager, Range};
//! use umm_vulkan::{Checksum, DeviceSelector, VulkanBackend, VulkanError};
//!
//! let backend = match VulkanBackend::new(DeviceSelector::First) {
//!     Ok(b) => b,
//!     // No loader or no driver here: a typed error, not a panic.
//!     Err(e @ (VulkanError::NoLoader(_) | VulkanError::NoDevice { .. })) => {
//!         eprintln!("no Vulkan here: {e}");
//!         return Ok(());
//!     }
//!     Err(e) => return Err(e.into()),
//! };
//! let manager = Manager::default();
//! let gpu = manager.attach(backend)?;
//! let buf = vec![7u8; 1 << 20];
//! let range = Range::of_slice(&buf)?;
//! let pin = manager.pin(range, &[gpu.id()])?;
//! let import = pin.translation(gpu).expect("pinned on gpu");
//! let offset = pin.offset(gpu).expect("pinned on gpu") as u64;
//! // SAFETY: `buf` stays mapped and is only read by the device here.
//! let sum = unsafe { manager.backend(gpu)?.checksum(import, offset, buf.len() as u64)? };
//! assert_eq!(sum, Checksum::of_bytes(&buf));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![deny(missing_docs)]

pub mod backend;
pub mod compute;
pub mod error;

pub use backend::{DeviceInfo, DeviceSelector, VulkanBackend, VulkanImport};
pub use compute::{pattern_bytes, pattern_word, Checksum};
pub use error::VulkanError;
