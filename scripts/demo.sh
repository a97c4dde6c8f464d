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
target="${CARGO_TARGET_DIR:-$repo/target}"
case "$target" in
    "$repo"/*) ;; # scripts/vm keeps the repository visible in the guest, even under /tmp
    /tmp/* | /var/tmp/* | /run/*)
        echo "scripts/demo.sh: CARGO_TARGET_DIR=$target is invisible in the guest (tmpfs there)" >&2
        exit 2
        ;;
esac
export CARGO_TARGET_DIR="$target"

bash scripts/setup.sh
# The kernel-module row needs the module built for the kernel the guest boots.
if kver="$(bash scripts/build-kmod.sh)"; then
    export UMM_VM_KERNEL="$kver"
else
    rm -f kmod-notifier/umm_notify.ko
    echo "warning: kmod-notifier not built: the demo's kernel-module row will be skipped" >&2
fi
echo "building demos/stale-dma..." >&2
cargo build -q -p stale-dma --bin stale-dma
echo "booting the guest (qemu TCG) and setting up rxe0/rxe1..." >&2
exec scripts/vm --timeout 300 -- sh -c \
    "scripts/rxe-setup.sh >/dev/null && { [ ! -f kmod-notifier/umm_notify.ko ] || insmod kmod-notifier/umm_notify.ko; } && exec $(printf '%q' "$target/debug/stale-dma")"
