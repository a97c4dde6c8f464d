#!/usr/bin/env bash
# scripts/build-kmod.sh: builds kmod-notifier/umm_notify.ko for the kernel scripts/vm boots
# (the newest installed kernel with an image in /boot and headers in /lib/modules/<v>/build,
# or $UMM_VM_KERNEL), checks its vermagic, and prints that kernel version on stdout (build
# output goes to stderr). Exits non-zero when no such kernel exists or the build fails.
#
#   export UMM_VM_KERNEL="$(bash scripts/build-kmod.sh)"
set -euo pipefail
repo="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)"
kver="${UMM_VM_KERNEL:-$(for d in /lib/modules/*/; do
    v="$(basename "$d")"
    [ -f "/boot/vmlinuz-$v" ] && [ -d "$d/build" ] && echo "$v"
done | sort -V | tail -n 1)}"
[ -n "$kver" ] || { echo "build-kmod: no kernel with both /boot/vmlinuz-<v> and /lib/modules/<v>/build" >&2; exit 1; }
echo "build-kmod: building kmod-notifier for $kver" >&2
{ make -s -C "$repo/kmod-notifier" KVER="$kver" 2>&1 | grep -v "Skipping BTF generation" || true; } >&2
ko="$repo/kmod-notifier/umm_notify.ko"
[ -f "$ko" ] || { echo "build-kmod: FAIL: module build" >&2; exit 1; }
modinfo -F vermagic "$ko" | grep -q "^$kver " || { echo "build-kmod: FAIL: module not built for $kver" >&2; exit 1; }
echo "$kver"
