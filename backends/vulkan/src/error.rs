//! The crate's error type and its mapping to the core's [`BackendError`].

use ash::vk;
use umm::{BackendError, BackendErrorKind, Range};

/// Everything the Vulkan backend can fail at. Each variant names the device (or the
/// selector that found none), the range where one is involved, and the cause.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VulkanError {
    /// The Vulkan loader (`libvulkan.so.1`) could not be loaded at run time.
    #[error("no Vulkan loader: {0}")]
    NoLoader(#[source] ash::LoadingError),
    /// The loader works but no physical device matches (no ICD installed, or the selector
    /// matched nothing, or the matching device lacks `VK_EXT_external_memory_host`).
    #[error("no Vulkan device matching {selector}: {reason}")]
    NoDevice {
        /// The selector that was asked for, as text.
        selector: String,
        /// Why nothing matched.
        reason: String,
    },
    /// A Vulkan call failed.
    #[error("{device}: {call} failed: {result}")]
    Vk {
        /// The device's name (or "instance" before one is chosen).
        device: String,
        /// The Vulkan entry point.
        call: &'static str,
        /// Its result code.
        result: vk::Result,
    },
    /// The range is not aligned to `minImportedHostPointerAlignment` (start or length).
    /// Real drivers reject such imports; lavapipe would accept them, so the backend checks.
    #[error("{device}: {range} is not aligned to the import alignment {alignment:#x}")]
    Misaligned {
        /// The device's name.
        device: String,
        /// The range asked for.
        range: Range,
        /// The required alignment.
        alignment: u64,
    },
    /// No memory type can both hold the buffer and import this host pointer.
    #[error("{device}: no memory type can import {range} (host pointer type bits {host_bits:#x}, buffer type bits {buffer_bits:#x})")]
    NoMemoryType {
        /// The device's name.
        device: String,
        /// The range.
        range: Range,
        /// `memoryTypeBits` from `vkGetMemoryHostPointerPropertiesEXT`.
        host_bits: u32,
        /// `memoryTypeBits` from the buffer's memory requirements.
        buffer_bits: u32,
    },
    /// A deregistration of an import this backend does not hold (double free).
    #[error("{device}: release of {range}, which is not a live import")]
    UnknownImport {
        /// The device's name.
        device: String,
        /// The import's range.
        range: Range,
    },
    /// A kernel was asked to work outside its import or on a non-word-aligned span.
    #[error(
        "{device}: bad kernel span {offset:#x}+{len:#x} of an import of {size:#x} bytes: {reason}"
    )]
    BadSpan {
        /// The device's name.
        device: String,
        /// Byte offset asked for.
        offset: u64,
        /// Byte length asked for.
        len: u64,
        /// Size of the import.
        size: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// The compute kernels were asked for on a device the application owns
    /// ([`crate::VulkanBackend::from_raw`]), whose queues umm does not use.
    #[error("{device}: no compute kernels on an application's device (umm does not submit to its queues)")]
    NoKernels {
        /// The device's name.
        device: String,
    },
}

impl VulkanError {
    pub(crate) fn vk(device: &str, call: &'static str, result: vk::Result) -> Self {
        VulkanError::Vk {
            device: device.to_string(),
            call,
            result,
        }
    }

    /// The core's class of this failure (what the manager reacts to).
    pub fn kind(&self) -> BackendErrorKind {
        match self {
            VulkanError::NoLoader(_) | VulkanError::NoDevice { .. } => {
                BackendErrorKind::DeviceUnavailable
            }
            VulkanError::Vk { result, .. } => match *result {
                vk::Result::ERROR_OUT_OF_HOST_MEMORY
                | vk::Result::ERROR_OUT_OF_DEVICE_MEMORY
                | vk::Result::ERROR_TOO_MANY_OBJECTS => BackendErrorKind::OutOfMemory,
                vk::Result::ERROR_INVALID_EXTERNAL_HANDLE => BackendErrorKind::BadAddress,
                vk::Result::ERROR_DEVICE_LOST
                | vk::Result::ERROR_INITIALIZATION_FAILED
                | vk::Result::ERROR_INCOMPATIBLE_DRIVER => BackendErrorKind::DeviceUnavailable,
                _ => BackendErrorKind::Other,
            },
            VulkanError::Misaligned { .. } | VulkanError::NoMemoryType { .. } => {
                BackendErrorKind::BadAddress
            }
            VulkanError::BadSpan { .. }
            | VulkanError::UnknownImport { .. }
            | VulkanError::NoKernels { .. } => BackendErrorKind::Other,
        }
    }
}

impl From<VulkanError> for BackendError {
    fn from(e: VulkanError) -> Self {
        BackendError::new(e.kind(), e)
    }
}
