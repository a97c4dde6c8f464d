//! Import cost vs cache-hit cost of the Vulkan backend (lavapipe in CI, any Vulkan device
//! with `VK_EXT_external_memory_host`). Run with
//! `cargo run --release -p umm-vulkan --example import_cost`; prints a markdown table.
//! Exits 0 with a message when there is no Vulkan device.

#[path = "support/measure.rs"]
mod measure;

use umm_vulkan::{DeviceSelector, VulkanBackend};

fn main() {
    let selector = match std::env::args().nth(1) {
        Some(name) => DeviceSelector::Name(name),
        None => DeviceSelector::First,
    };
    if let Err(e) = VulkanBackend::new(selector.clone()) {
        println!("no Vulkan device, nothing measured: {e}");
        return;
    }
    let make = || VulkanBackend::new(selector.clone()).expect("device opened a moment ago");
    measure::run(
        "Vulkan VK_EXT_external_memory_host import",
        make,
        &[4 << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20],
    );
}
