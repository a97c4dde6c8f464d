#!/usr/bin/env bash
# Installs everything the project needs on a fresh Debian 12 machine (idempotent).
# Used by the README's demo and test commands and by .ci/run.
set -euo pipefail

packages=(
    # build
    build-essential pkg-config cmake clang libclang-dev
    # guest rig: Debian's kernel booted under qemu TCG with the host root over 9p
    qemu-system-x86 linux-image-amd64 linux-headers-amd64 busybox-static cpio xz-utils kmod
    # kernel style checks (checkpatch.pl comes from the kernel source tarball)
    linux-source
    # kmod-notifier's DKMS installation (scripts/install-kmod.sh, tested by scripts/test-kmod.sh)
    dkms
    # RDMA (Soft-RoCE runs in the guest; the host only needs the user-space libraries)
    rdma-core ibverbs-utils libibverbs-dev librdmacm-dev rdmacm-utils perftest iproute2
    # Vulkan on the CPU (Mesa lavapipe) and the loader
    mesa-vulkan-drivers vulkan-tools libvulkan1 libvulkan-dev
    # UCX's registration cache, the peer of the comparison benchmark
    libucx-dev
    # libfabric: umm-fabric's byte table (scripts/test-fabric.sh builds against it, runs
    # verbs;ofi_rxm in the guest)
    libfabric-dev libfabric-bin
    # Open MPI over libfabric (scripts/test-fabric.sh --mpi)
    openmpi-bin libopenmpi-dev
    # NetPIPE over Open MPI (scripts/test-fabric.sh --netpipe)
    netpipe-openmpi
    # scripts/check-package.sh reads cargo's JSON and TOML with python3
    python3
)

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    # A mirror hiccup should not fail a CI run: three tries, a pause between them.
    for try in 1 2 3; do
        if apt-get update -q && apt-get install -y -q "${missing[@]}"; then
            break
        fi
        [ "$try" = 3 ] && { echo "setup: apt-get failed 3 times" >&2; exit 1; }
        sleep 10
    done
fi

if ! command -v cargo >/dev/null; then
    echo "setup: cargo not found; install Rust (rustup) first" >&2
    exit 1
fi
