#!/usr/bin/env bash
# Tests of the GPU backends (umm-vulkan, umm-cuda), from a clean clone.
#
# * umm-vulkan runs for real on any Vulkan device with VK_EXT_external_memory_host (Mesa
#   lavapipe from mesa-vulkan-drivers in CI). UMM_REQUIRE_VULKAN=1 (the default here) makes
#   a missing device a failure instead of a skip.
# * umm-cuda: the no-driver path and the core's no-overlap rules run everywhere; its GPU
#   tests print "SKIP <test>: no CUDA driver ..." unless a GPU and driver exist
#   (UMM_REQUIRE_CUDA=1 makes that a failure).
# * UMM_GPU_MEASURE=1 also runs the release-mode cost measurements (import/registration vs
#   cache hit) and prints their tables.
#
# Output keeps the tests' stdout/stderr (--nocapture) so skip reasons show in the log.
set -euo pipefail
cd "$(dirname "$0")/../.."
export UMM_REQUIRE_VULKAN="${UMM_REQUIRE_VULKAN:-1}"
# Headless: the loader only needs the ICD; keep the Mesa layers quiet without a display.
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"

echo "== Vulkan devices"
if command -v vulkaninfo >/dev/null; then
    vulkaninfo --summary 2>/dev/null | sed -n '/^Devices:/,$p' | grep -E 'deviceName|driverName|apiVersion' || true
fi

echo "== cargo test -p umm-vulkan -p umm-cuda"
cargo test -p umm-vulkan -p umm-cuda -- --nocapture

if [ "${UMM_GPU_MEASURE:-0}" = 1 ]; then
    echo "== measurements (release)"
    cargo run --release -p umm-vulkan --example import_cost
    cargo run --release -p umm-cuda --example register_cost
fi
