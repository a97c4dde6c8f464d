#!/usr/bin/env bash
# scripts/demo.sh: the README's main demo. Builds demos/stale-dma, demos/pipeline and the
# `umm` command line, boots the guest once (scripts/vm), sets up Soft-RoCE
# (scripts/rxe-setup.sh), loads the kernel module, and runs:
#  1. the stale-DMA scenario: a naive registration cache sends the unmapped file's bytes,
#     umm (one row per available notifier source) sends the new ones;
#  2. `umm doctor`: what works in the guest;
#  3. the GPU->NIC pipeline (demos/pipeline): a Vulkan kernel writes tagged buffers that
#     rxe1 RDMA-WRITEs to a consumer process on rxe0, in three modes side by side (umm,
#     register every time, a cache without invalidation).
# Exits non-zero if the stale-DMA verdict or the pipeline's umm mode fails.
#
# The cargo target directory must be visible in the guest: inside the repository (scripts/vm
# keeps it visible), or anywhere but /tmp, /var/tmp and /run (tmpfs there).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
# shellcheck source=scripts/guest-env.sh
. scripts/guest-env.sh
guest_target_dir
target="$CARGO_TARGET_DIR"

bash scripts/setup.sh
build_kmod_optional "the demo's kernel-module row"
echo "building demos/stale-dma, demos/pipeline and the umm command line..." >&2
cargo build -q -p stale-dma --bin stale-dma
cargo build -q --release -p pipeline -p umm-cli
echo "booting the guest (qemu TCG) and setting up rxe0/rxe1..." >&2
stale=$(printf '%q' "$target/debug/stale-dma")
pipeline=$(printf '%q' "$target/release/pipeline")
umm=$(printf '%q' "$target/release/umm")
exec scripts/vm --timeout 900 -- sh -c \
    "scripts/rxe-setup.sh >/dev/null && { [ ! -f kmod-notifier/umm_notify.ko ] || insmod kmod-notifier/umm_notify.ko; } \
     && $stale && echo && echo '== umm doctor' && { $umm doctor || true; } \
     && echo && echo '== the GPU->NIC pipeline' && $pipeline --plain"
