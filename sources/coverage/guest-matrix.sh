#!/usr/bin/env bash
# sources/coverage/guest-matrix.sh: the coverage matrix in the qemu guest, kernel-module column
# included (the host has no loadable modules).
#
#   bash sources/coverage/guest-matrix.sh [OUT.md]
#
# 1. builds kmod-notifier/umm_notify.ko for the kernel scripts/vm boots and the scenario
#    binaries (release);
# 2. boots the guest once: insmod, an ext4 filesystem on a loop device (for the ext4 hole-punch
#    row: the guest's root is read-only 9p), `umm-coverage-scenario check` (every column, each cell in a
#    child under a watchdog, asserted against table::EXPECTED), the seed scenario and the
#    deadlock checks through a manager with the kernel module's source, `table` (written to
#    OUT.md, default .vm/coverage/guest-matrix.md), rmmod.
# Exits non-zero on any mismatch, hang (killed by the watchdog or the guest timeout) or failure.
set -euo pipefail
repo="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/../.." && pwd)"
cd "$repo"

if [ "${1:-}" = "--in-guest" ]; then
    bin="$2" out="$3"
    fail=0
    insmod kmod-notifier/umm_notify.ko || { echo "insmod failed"; exit 1; }
    # The guest's root is read-only 9p and /tmp is tmpfs: the ext4 hole-punch row gets a real
    # ext4 filesystem on a loop device over a file in /tmp.
    ext4=/tmp/umm-coverage-ext4
    modprobe loop 2>/dev/null || true
    mkdir -p "$ext4"
    if truncate -s 64M /tmp/umm-coverage-ext4.img && mkfs.ext4 -q -F /tmp/umm-coverage-ext4.img &&
        mount -o loop /tmp/umm-coverage-ext4.img "$ext4"; then
        export UMM_COVERAGE_EXT4_DIR="$ext4"
        echo "ext4 for the hole-punch row: loop device over /tmp/umm-coverage-ext4.img at $ext4"
    else
        echo "FAIL: cannot mount an ext4 loop filesystem"; fail=1
    fi
    echo "== check (every column)"
    "$bin/umm-coverage-scenario" check || fail=1
    for what in seed stress; do
        echo "== $what kmod"
        "$bin/umm-coverage-scenario" "$what" kmod || fail=1
    done
    echo "== table"
    "$bin/umm-coverage-scenario" table > "$out" || fail=1
    rmmod umm_notify || { echo "FAIL: rmmod"; fail=1; }
    umount "$ext4" 2>/dev/null || true
    exit "$fail"
fi

out="${1:-$repo/.vm/coverage/guest-matrix.md}"
mkdir -p "$(dirname "$out")"
out="$(cd "$(dirname "$out")" && pwd)/$(basename "$out")"
echo "== building kmod-notifier"
UMM_VM_KERNEL="$(bash "$repo/scripts/build-kmod.sh")" || { echo "FAIL: module build"; exit 1; }
export UMM_VM_KERNEL
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target}"
echo "== building the scenario binaries (release)"
cargo build -q --release -p umm-coverage --bins
echo "== guest"
"$repo/scripts/vm" --timeout "${UMM_COVERAGE_TIMEOUT:-900}" --keep "$CARGO_TARGET_DIR" --out "$(dirname "$out")" \
    -- bash "$repo/sources/coverage/guest-matrix.sh" --in-guest "$CARGO_TARGET_DIR/release" "$out"
echo "guest matrix: $out"
