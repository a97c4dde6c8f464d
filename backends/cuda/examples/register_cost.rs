//! `cuMemHostRegister` cost vs cache-hit cost of the CUDA backend. Run with
//! `cargo run --release -p umm-cuda --example register_cost [ordinal]`; prints a markdown
//! table. Exits 0 with a message when there is no CUDA driver or device.

#[path = "../../vulkan/examples/support/measure.rs"]
mod measure;

use umm_cuda::CudaBackend;

fn main() {
    let ordinal = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    if let Err(e) = CudaBackend::new(ordinal) {
        println!("no CUDA device, nothing measured: {e}");
        return;
    }
    let make = || CudaBackend::new(ordinal).expect("device opened a moment ago");
    measure::run(
        "CUDA cuMemHostRegister (DEVICEMAP|PORTABLE)",
        make,
        &[4 << 10, 64 << 10, 1 << 20, 16 << 20, 256 << 20],
    );
}
