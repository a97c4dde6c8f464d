//! A kernel that uses a registration from the GPU: `umm_xor_pattern` reads each 32-bit word
//! of a span through the device pointer, XORs it with [`pattern_word`] and writes it back, so
//! one launch proves both directions (the host sees `old ^ pattern`). It is PTX text loaded
//! with `cuModuleLoadData` (the driver JIT-compiles it for the device), so neither nvcc nor
//! NVRTC is needed to build or run.

use std::ffi::c_void;

use cudarc::driver::sys::{self, CUfunction, CUmodule, CUresult};

use crate::backend::{CudaBackend, CudaRegistration};
use crate::error::CudaError;

/// The kernel: `data[i] ^= (i * 0x9E3779B9) ^ seed` for `i < count` (one thread per word,
/// 256 threads per block). Hand-written in the form nvcc emits for the equivalent CUDA C.
pub const PTX: &str = r#"
.version 6.0
.target sm_50
.address_size 64

.visible .entry umm_xor_pattern(
	.param .u64 umm_xor_pattern_param_0,
	.param .u32 umm_xor_pattern_param_1,
	.param .u32 umm_xor_pattern_param_2
)
{
	.reg .pred 	%p<2>;
	.reg .b32 	%r<10>;
	.reg .b64 	%rd<5>;

	ld.param.u64 	%rd1, [umm_xor_pattern_param_0];
	ld.param.u32 	%r2, [umm_xor_pattern_param_1];
	ld.param.u32 	%r3, [umm_xor_pattern_param_2];
	mov.u32 	%r4, %ctaid.x;
	mov.u32 	%r5, %ntid.x;
	mov.u32 	%r6, %tid.x;
	mad.lo.s32 	%r1, %r4, %r5, %r6;
	setp.ge.u32 	%p1, %r1, %r2;
	@%p1 bra 	DONE;
	cvta.to.global.u64 	%rd2, %rd1;
	mul.wide.u32 	%rd3, %r1, 4;
	add.s64 	%rd4, %rd2, %rd3;
	mul.lo.s32 	%r7, %r1, -1640531527;
	xor.b32 	%r8, %r7, %r3;
	ld.global.u32 	%r9, [%rd4];
	xor.b32 	%r9, %r9, %r8;
	st.global.u32 	[%rd4], %r9;
DONE:
	ret;
}
"#;

const THREADS: u32 = 256;
/// Most words one launch handles (keeps the 32-bit thread index from wrapping).
const MAX_WORDS: u64 = 1 << 31;

/// The word XORed into word `i` of a span (same pattern as umm-vulkan's fill kernel).
pub fn pattern_word(seed: u32, i: u32) -> u32 {
    i.wrapping_mul(0x9E37_79B9) ^ seed
}

/// What `initial` (length a multiple of 4) becomes after [`CudaBackend::xor_pattern`].
pub fn xor_pattern_bytes(initial: &[u8], seed: u32) -> Vec<u8> {
    initial
        .chunks_exact(4)
        .enumerate()
        .flat_map(|(i, w)| {
            (u32::from_ne_bytes([w[0], w[1], w[2], w[3]]) ^ pattern_word(seed, i as u32))
                .to_ne_bytes()
        })
        .collect()
}

/// The loaded module and its function (driver handles, valid in the backend's context).
pub(crate) struct Kernel {
    module: CUmodule,
    function: CUfunction,
}

// SAFETY: module and function handles are opaque driver pointers, usable from any thread
// on which their context is current; we never dereference them.
unsafe impl Send for Kernel {}
// SAFETY: as above; cuLaunchKernel may be called concurrently with one function.
unsafe impl Sync for Kernel {}

impl Kernel {
    fn load(backend: &CudaBackend) -> Result<Kernel, CudaError> {
        let _current = backend.current()?;
        let image = std::ffi::CString::new(PTX).expect("PTX has no NUL");
        let mut module: CUmodule = std::ptr::null_mut();
        // SAFETY: NUL-terminated PTX text; our context is current.
        let rc = unsafe { sys::cuModuleLoadData(&mut module, image.as_ptr().cast()) };
        if rc != CUresult::CUDA_SUCCESS {
            return Err(backend.driver_error("cuModuleLoadData", rc, None));
        }
        let mut function: CUfunction = std::ptr::null_mut();
        // SAFETY: the module is loaded; the name is NUL-terminated.
        let rc =
            unsafe { sys::cuModuleGetFunction(&mut function, module, c"umm_xor_pattern".as_ptr()) };
        if rc != CUresult::CUDA_SUCCESS {
            // SAFETY: the module was loaded above and is not used elsewhere.
            unsafe { sys::cuModuleUnload(module) };
            return Err(backend.driver_error("cuModuleGetFunction", rc, None));
        }
        Ok(Kernel { module, function })
    }

    /// Unloads the module; the caller has the context current.
    pub(crate) fn unload(self) {
        // SAFETY: loaded by `load`, unloaded once (consumes self).
        unsafe { sys::cuModuleUnload(self.module) };
    }
}

impl CudaBackend {
    /// Launches `umm_xor_pattern` over bytes `[offset, offset + len)` of `registration`
    /// through its device pointer and waits for it: word `i` of the span becomes
    /// `old ^ pattern_word(seed, i)` (see [`xor_pattern_bytes`]).
    ///
    /// # Safety
    /// `registration` must be a live registration of this backend (its entry not yet
    /// deregistered) and no Rust reference may be alive to the bytes the GPU rewrites.
    pub unsafe fn xor_pattern(
        &self,
        registration: &CudaRegistration,
        offset: u64,
        len: u64,
        seed: u32,
    ) -> Result<(), CudaError> {
        let size = registration.range.len() as u64;
        let bad = |reason| CudaError::BadSpan {
            device: self.label.clone(),
            offset,
            len,
            size,
            reason,
        };
        let Some(base) = registration.device_ptr else {
            return Err(bad("registered without DEVICEMAP: no device pointer"));
        };
        if len == 0 || !offset.is_multiple_of(4) || !len.is_multiple_of(4) {
            return Err(bad("offset and length must be non-zero multiples of 4"));
        }
        if !matches!(offset.checked_add(len), Some(end) if end <= size) {
            return Err(bad("span exceeds the registration"));
        }
        if len / 4 > MAX_WORDS {
            return Err(bad("more than 2^31 words in one launch"));
        }
        let kernel = match self.kernel.get_or_init(|| Kernel::load(self)) {
            Ok(k) => k,
            Err(e) => return Err(self.driver_error("kernel load", cuda_result(e), None)),
        };
        let _current = self.current()?;
        let mut data: u64 = base + offset;
        let mut count = (len / 4) as u32;
        let mut seed = seed;
        let mut params: [*mut c_void; 3] = [
            (&mut data as *mut u64).cast(),
            (&mut count as *mut u32).cast(),
            (&mut seed as *mut u32).cast(),
        ];
        let blocks = count.div_ceil(THREADS);
        // SAFETY: the function belongs to our (current) context; `params` points at three
        // live values matching the kernel's (u64, u32, u32) parameters; the device pointer
        // covers the span (checked above) of a live registration (caller's contract).
        let rc = unsafe {
            sys::cuLaunchKernel(
                kernel.function,
                blocks,
                1,
                1,
                THREADS,
                1,
                1,
                0,
                std::ptr::null_mut(),
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        };
        if rc != CUresult::CUDA_SUCCESS {
            return Err(self.driver_error("cuLaunchKernel", rc, Some(registration.range)));
        }
        // SAFETY: our context is current; waits for the launch above.
        let rc = unsafe { sys::cuCtxSynchronize() };
        if rc != CUresult::CUDA_SUCCESS {
            return Err(self.driver_error("cuCtxSynchronize", rc, Some(registration.range)));
        }
        Ok(())
    }
}

/// The driver result inside a cached load failure (the error itself is not `Clone`).
fn cuda_result(e: &CudaError) -> CUresult {
    match e {
        CudaError::Driver { result, .. } => *result,
        _ => CUresult::CUDA_ERROR_UNKNOWN,
    }
}
