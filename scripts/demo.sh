#!/usr/bin/env bash
# scripts/demo.sh: the README's main demo. Builds demos/stale-dma, boots the guest once
# (scripts/vm), sets up Soft-RoCE (scripts/rxe-setup.sh) and runs the seed's stale-DMA
# scenario: a naive registration cache sends the unmapped file's bytes, umm (one row per
# available notifier source) sends the new ones. Prints the side-by-side verdict; exits
# with the demo's status (0: bug reproduced by the naive cache and fixed by umm).
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
echo "building demos/stale-dma..." >&2
cargo build -q -p stale-dma --bin stale-dma
echo "booting the guest (qemu TCG) and setting up rxe0/rxe1..." >&2
exec scripts/vm --timeout 300 -- sh -c \
    "scripts/rxe-setup.sh >/dev/null && { [ ! -f kmod-notifier/umm_notify.ko ] || insmod kmod-notifier/umm_notify.ko; } && exec $(printf '%q' "$target/debug/stale-dma")"
