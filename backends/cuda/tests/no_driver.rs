//! What runs on every machine: the no-driver / no-device path (typed errors, no panic),
//! the error classification the manager reacts to, flags, and the host side of the kernel.

use cudarc::driver::sys::CUresult;
use umm::{BackendError, BackendErrorKind, Range};
use umm_cuda::{
    driver_present, kind_of, xor_pattern_bytes, CudaBackend, CudaError, HostRegisterFlags, PTX,
};

#[test]
fn constructor_without_driver_or_device_is_a_typed_error() {
    match CudaBackend::new(0) {
        Ok(b) => eprintln!(
            "SKIP constructor_without_driver_or_device_is_a_typed_error: a CUDA device is \
             present ({b:?}); the no-driver path is not exercised on this machine"
        ),
        Err(e) => {
            assert!(
                matches!(e, CudaError::NoDriver { .. } | CudaError::NoDevice { .. }),
                "{e:?}"
            );
            assert_eq!(e.kind(), BackendErrorKind::DeviceUnavailable);
            let be = BackendError::from(e);
            assert_eq!(be.kind, BackendErrorKind::DeviceUnavailable);
            let text = std::error::Error::source(&be).unwrap().to_string();
            assert!(text.starts_with("no CUDA"), "{text}");
            eprintln!("no CUDA on this machine (expected here): {text}");
            if !driver_present() {
                assert!(matches!(
                    CudaBackend::new(3),
                    Err(CudaError::NoDriver { .. })
                ));
                assert!(matches!(
                    umm_cuda::device_count(),
                    Err(CudaError::NoDriver { .. })
                ));
            }
        }
    }
}

#[test]
fn an_ordinal_past_the_last_device_is_no_device() {
    if !driver_present() {
        eprintln!("SKIP an_ordinal_past_the_last_device_is_no_device: no CUDA driver");
        return;
    }
    let err = CudaBackend::new(1 << 20).unwrap_err();
    assert!(
        matches!(err, CudaError::NoDevice { ordinal, .. } if ordinal == 1 << 20),
        "{err}"
    );
}

#[test]
fn driver_results_map_to_the_kinds_the_manager_reacts_to() {
    use CUresult::*;
    for (rc, kind) in [
        (CUDA_ERROR_OUT_OF_MEMORY, BackendErrorKind::OutOfMemory),
        (
            CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED,
            BackendErrorKind::AlreadyRegistered,
        ),
        (CUDA_ERROR_INVALID_VALUE, BackendErrorKind::BadAddress),
        (
            CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED,
            BackendErrorKind::BadAddress,
        ),
        (CUDA_ERROR_NO_DEVICE, BackendErrorKind::DeviceUnavailable),
        (CUDA_ERROR_LAUNCH_FAILED, BackendErrorKind::Other),
    ] {
        assert_eq!(kind_of(rc), kind, "{rc:?}");
    }
    let range = Range::new(0x10000, 0x2000).unwrap();
    let e = CudaError::Driver {
        device: "cuda:0 test".into(),
        call: "cuMemHostRegister",
        result: CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED,
        range: Some(range),
    };
    let text = e.to_string();
    assert!(
        text.contains("cuda:0 test") && text.contains("cuMemHostRegister"),
        "{text}"
    );
    assert!(text.contains(&range.to_string()), "names the range: {text}");
    assert_eq!(
        BackendError::from(e).kind,
        BackendErrorKind::AlreadyRegistered
    );
}

#[test]
fn flags_default_to_devicemap_portable() {
    let f = HostRegisterFlags::default();
    assert!(f.contains(HostRegisterFlags::DEVICEMAP) && f.contains(HostRegisterFlags::PORTABLE));
    assert!(!f.contains(HostRegisterFlags::READ_ONLY));
    assert_eq!(f.bits(), 0x3);
    assert_eq!((f | HostRegisterFlags::READ_ONLY).bits(), 0xB);
}

#[test]
fn host_twin_of_the_kernel_is_an_involution_and_the_ptx_names_it() {
    let bytes: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
    let once = xor_pattern_bytes(&bytes, 42);
    assert_ne!(once, bytes);
    assert_eq!(xor_pattern_bytes(&once, 42), bytes);
    // Word 1 with seed 0 is XORed with 0x9E3779B9 (the PTX's -1640531527).
    let zeros = xor_pattern_bytes(&[0u8; 8], 0);
    assert_eq!(
        u32::from_ne_bytes(zeros[4..8].try_into().unwrap()),
        0x9E37_79B9
    );
    assert_eq!(0x9E37_79B9u32 as i32, -1_640_531_527);
    assert!(PTX.contains(".visible .entry umm_xor_pattern("));
    assert!(!PTX.contains('\0'));
}
