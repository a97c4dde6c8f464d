#!/usr/bin/env bash
# scripts/test-kmod.sh: the whole kmod-notifier suite, one command, exits non-zero on any failure.
#
#   bash scripts/test-kmod.sh
#
# 1. installs missing packages (scripts/setup.sh) and builds kmod-notifier/umm_notify.ko against
#    the guest kernel's headers (the newest kernel installed in /boot + /lib/modules);
# 2. runs checkpatch.pl --strict (taken from Debian's linux-source tarball, cached in .vm/) on
#    the module sources;
# 3. runs the host tests: cargo test -p umm-kmod (ABI layout vs the C header, doc tests; the
#    guest cases print a skip reason there);
# 4. boots the guest ONCE (scripts/vm) and, inside it: insmod, the guest test binary
#    (umm-kmod's tests/guest.rs), the latency measurement (examples/kmod_latency.rs),
#    refcount 0 + rmmod, and a kernel log check for BUG/WARNING/Oops.
#
# Environment: CARGO_TARGET_DIR (default <repo>/target), UMM_KMOD_TIMEOUT (guest timeout,
# default 480 s), UMM_KMOD_LATENCY_N (latency iterations, default 2000),
# UMM_KMOD_STRESS_SECS (concurrency case, default 3).
set -euo pipefail

repo="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)"
cd "$repo"

# ---- inside the guest ---------------------------------------------------------------------
if [ "${1:-}" = "--in-guest" ]; then
    tests="$2" latency="$3"
    read -r up0 _ </proc/uptime
    echo "guest: command started ${up0}s after kernel start"
    fail=0
    insmod kmod-notifier/umm_notify.ko || { echo "insmod failed"; exit 1; }
    echo "== guest tests"
    "$tests" || fail=1
    echo "== latency (release build, TCG)"
    "$latency" "${UMM_KMOD_LATENCY_N:-2000}" || fail=1
    echo "== unload"
    refcnt="$(cat /sys/module/umm_notify/refcnt)"
    if [ "$refcnt" != 0 ]; then echo "FAIL: module refcount $refcnt after the suite"; fail=1; fi
    if rmmod umm_notify; then echo "rmmod ok"; else echo "FAIL: rmmod umm_notify"; fail=1; fi
    if dmesg | grep -E 'BUG|WARNING|Oops|general protection|Call Trace'; then
        echo "FAIL: kernel log shows the lines above"
        fail=1
    else
        echo "kernel log clean (no BUG/WARNING/Oops)"
    fi
    read -r up1 _ </proc/uptime
    echo "guest: suite took $(awk -v a="$up0" -v b="$up1" 'BEGIN { printf "%.1f", b - a }')s"
    exit "$fail"
fi

t_start=$(date +%s)
step() { echo "== $* ($(( $(date +%s) - t_start ))s)"; }

# ---- packages -----------------------------------------------------------------------------
missing=0
for p in linux-headers-amd64 linux-source qemu-system-x86 busybox-static cpio build-essential; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing=1
done
if [ "$missing" = 1 ]; then
    step "installing packages (scripts/setup.sh)"
    bash scripts/setup.sh
fi

# ---- module (for the kernel scripts/vm boots) ---------------------------------------------
step "building kmod-notifier"
kver="$(bash scripts/build-kmod.sh)" || { echo "FAIL: module build"; exit 1; }
export UMM_VM_KERNEL="$kver"

# ---- checkpatch ---------------------------------------------------------------------------
step "checkpatch --strict"
cp_dir="$repo/.vm/checkpatch"
tarball="$(ls /usr/src/linux-source-*.tar.xz 2>/dev/null | sort -V | tail -n 1)"
[ -n "$tarball" ] || { echo "FAIL: no /usr/src/linux-source-*.tar.xz (apt-get install linux-source)"; exit 1; }
if [ ! -f "$cp_dir/scripts/checkpatch.pl" ] || [ "$cp_dir/scripts/checkpatch.pl" -ot "$tarball" ]; then
    rm -rf "$cp_dir" && mkdir -p "$cp_dir"
    tar -xJf "$tarball" -C "$cp_dir" --strip-components=1 --wildcards \
        '*/scripts/checkpatch.pl' '*/scripts/spelling.txt' '*/scripts/const_structs.checkpatch'
fi
cp_out="$(perl "$cp_dir/scripts/checkpatch.pl" --strict --no-tree --no-summary --terse --showfile -f \
    kmod-notifier/umm_notify.c kmod-notifier/include/uapi/linux/umm_notify.h kmod-notifier/Kbuild kmod-notifier/Makefile 2>&1 || true)"
if [ -n "$cp_out" ]; then
    echo "$cp_out"
    echo "FAIL: checkpatch --strict"
    exit 1
fi
echo "checkpatch: clean"

# ---- host tests and guest binaries ----------------------------------------------------------
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target}"
step "host tests: cargo test -p umm-kmod"
cargo test -q -p umm-kmod

step "building the guest binaries"
# The executables cargo built for a target name (from its JSON messages; no python needed).
executable_of() { # target-name < cargo JSON
    grep -F "\"name\":\"$1\"" | grep -o '"executable":"[^"]*"' | sed 's/^"executable":"//; s/"$//' | tail -n 1
}
tests_bin="$(cargo test -q -p umm-kmod --test guest --no-run --message-format=json | executable_of guest)"
latency_bin="$(cargo build -q --release -p umm-kmod --example kmod_latency --message-format=json | executable_of kmod_latency)"
[ -x "$tests_bin" ] && [ -x "$latency_bin" ] || { echo "FAIL: guest binaries not built"; exit 1; }

# ---- one guest boot -----------------------------------------------------------------------
step "guest: kernel $kver, one boot"
mkdir -p "$repo/.vm"
t0=$(date +%s.%N)
set +e
"$repo/scripts/vm" --timeout "${UMM_KMOD_TIMEOUT:-480}" --mem 2048 --keep "$CARGO_TARGET_DIR" \
    -- bash "$repo/scripts/test-kmod.sh" --in-guest "$tests_bin" "$latency_bin" | tee "$repo/.vm/test-kmod.log"
rc=${PIPESTATUS[0]}
set -e
t1=$(date +%s.%N)
suite="$(sed -n 's/^guest: suite took \([0-9.]*\)s$/\1/p' "$repo/.vm/test-kmod.log")"
awk -v a="$t0" -v b="$t1" -v s="${suite:-0}" 'BEGIN {
    printf "guest run: %.1fs wall on the host, of which %.1fs boot + shutdown\n", b - a, b - a - s }'
step "done"
if [ "$rc" != 0 ]; then
    echo "FAIL: guest suite exit status $rc"
    exit "$rc"
fi
echo "kmod suite: PASS"
