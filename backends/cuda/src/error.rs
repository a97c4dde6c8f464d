//! The crate's error type and its mapping to the core's [`BackendError`].

use cudarc::driver::sys::CUresult;
use umm::{BackendError, BackendErrorKind, Range};

/// Everything the CUDA backend can fail at; each variant names the device (ordinal) and,
/// where one is involved, the range.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CudaError {
    /// `libcuda.so` cannot be loaded: no NVIDIA driver on this machine. Checked before any
    /// driver call (cudarc panics on a call without the library).
    #[error("no CUDA driver: {reason}")]
    NoDriver {
        /// What was tried.
        reason: String,
    },
    /// The driver is there but the ordinal names no device (or the driver sees none).
    #[error("no CUDA device {ordinal} ({count} device(s) present)")]
    NoDevice {
        /// The ordinal asked for.
        ordinal: usize,
        /// How many devices the driver reports (0 when `cuInit` itself found none).
        count: usize,
    },
    /// A driver call failed.
    #[error("{device}: {call} failed: {result:?}{}", range.map(|r| format!(" for {r}")).unwrap_or_default())]
    Driver {
        /// The device's label ("cuda:0 NVIDIA H100 ...").
        device: String,
        /// The driver entry point.
        call: &'static str,
        /// Its result code.
        result: CUresult,
        /// The range involved, if any.
        range: Option<Range>,
    },
    /// A deregistration of a range this backend does not hold (double free).
    #[error("{device}: unregister of {range}, which is not registered here")]
    NotRegistered {
        /// The device's label.
        device: String,
        /// The range.
        range: Range,
    },
    /// A kernel was asked to work outside its registration or on a non-word-aligned span.
    #[error("{device}: bad kernel span {offset:#x}+{len:#x} of a registration of {size:#x} bytes: {reason}")]
    BadSpan {
        /// The device's label.
        device: String,
        /// Byte offset asked for.
        offset: u64,
        /// Byte length asked for.
        len: u64,
        /// Size of the registration.
        size: u64,
        /// What is wrong.
        reason: &'static str,
    },
}

/// The core's class of a driver result (what the manager reacts to).
pub fn kind_of(result: CUresult) -> BackendErrorKind {
    use CUresult::*;
    match result {
        CUDA_ERROR_OUT_OF_MEMORY => BackendErrorKind::OutOfMemory,
        CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED => BackendErrorKind::AlreadyRegistered,
        CUDA_ERROR_INVALID_VALUE
        | CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED
        | CUDA_ERROR_NOT_PERMITTED => BackendErrorKind::BadAddress,
        CUDA_ERROR_NO_DEVICE
        | CUDA_ERROR_INVALID_DEVICE
        | CUDA_ERROR_NOT_INITIALIZED
        | CUDA_ERROR_DEINITIALIZED
        | CUDA_ERROR_NOT_SUPPORTED
        | CUDA_ERROR_SYSTEM_DRIVER_MISMATCH
        | CUDA_ERROR_STUB_LIBRARY => BackendErrorKind::DeviceUnavailable,
        _ => BackendErrorKind::Other,
    }
}

impl CudaError {
    /// The core's class of this failure.
    pub fn kind(&self) -> BackendErrorKind {
        match self {
            CudaError::NoDriver { .. } | CudaError::NoDevice { .. } => {
                BackendErrorKind::DeviceUnavailable
            }
            CudaError::Driver { result, .. } => kind_of(*result),
            CudaError::NotRegistered { .. } | CudaError::BadSpan { .. } => BackendErrorKind::Other,
        }
    }
}

impl From<CudaError> for BackendError {
    fn from(e: CudaError) -> Self {
        BackendError::new(e.kind(), e)
    }
}
