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
# 4. installs the module with DKMS for the guest kernel on the host (scripts/install-kmod.sh
#    --no-system-config: dkms add/build/install against the installed Debian headers; the
#    guest's root is the host's), removed again (dkms remove) when this script exits;
# 5. boots the guest ONCE (scripts/vm) and, inside it:
#    a. insmod, the guest test binary (umm-kmod's tests/guest.rs), the latency measurement
#       (examples/kmod_latency.rs), refcount 0 + rmmod;
#    b. insmod with small limits (max_watches=256 ring_entries=16): the watch-limit case and
#       the ioctl fuzzer (examples/kmod_fuzz.rs, UMM_KMOD_FUZZ_CALLS calls, seed printed),
#       refcount 0 + rmmod;
#    c. modprobe umm_notify (the DKMS-installed module), two guest cases on it, rmmod;
#    d. a kernel log check for BUG/WARNING/Oops.
#
# Environment: CARGO_TARGET_DIR (default <repo>/target), UMM_KMOD_TIMEOUT (guest timeout,
# default 600 s), UMM_KMOD_LATENCY_N (latency iterations, default 2000),
# UMM_KMOD_STRESS_SECS (concurrency case, default 3), UMM_KMOD_FUZZ_CALLS (default 1000000),
# UMM_KMOD_FUZZ_SEED (default: from the clock; printed), UMM_KMOD_DKMS=0 (skip step 4 and c).
set -euo pipefail

repo="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)"
cd "$repo"

# ---- inside the guest ---------------------------------------------------------------------
if [ "${1:-}" = "--in-guest" ]; then
    tests="$2" latency="$3" fuzz="$4" dkms="$5"
    read -r up0 _ </proc/uptime
    echo "guest: command started ${up0}s after kernel start"
    fail=0
    unload() {
        refcnt="$(cat /sys/module/umm_notify/refcnt)"
        if [ "$refcnt" != 0 ]; then echo "FAIL: module refcount $refcnt after $1"; fail=1; fi
        if rmmod umm_notify; then echo "rmmod ok"; else echo "FAIL: rmmod umm_notify"; fail=1; fi
    }
    insmod kmod-notifier/umm_notify.ko || { echo "insmod failed"; exit 1; }
    echo "== guest tests"
    "$tests" || fail=1
    echo "== latency (release build, TCG)"
    "$latency" "${UMM_KMOD_LATENCY_N:-2000}" || fail=1
    echo "== unload"
    unload "the suite"
    echo "== small limits (max_watches=256 ring_entries=16): watch limit, ioctl fuzzer"
    if insmod kmod-notifier/umm_notify.ko max_watches=256 ring_entries=16; then
        "$tests" watch_limit || fail=1
        seed=()
        [ -n "${UMM_KMOD_FUZZ_SEED:-}" ] && seed=(--seed "$UMM_KMOD_FUZZ_SEED")
        "$fuzz" --calls "${UMM_KMOD_FUZZ_CALLS:-1000000}" "${seed[@]}" || fail=1
        unload "the fuzzer"
    else
        echo "FAIL: insmod with parameters"; fail=1
    fi
    if [ "$dkms" = 1 ]; then
        echo "== the DKMS-installed module: modprobe umm_notify"
        if modprobe umm_notify; then
            path="$(modinfo -n umm_notify)"
            case "$path" in
                */updates/dkms/umm_notify.ko) echo "modprobe loaded $path" ;;
                *) echo "FAIL: modprobe loaded $path, not the DKMS build"; fail=1 ;;
            esac
            "$tests" munmap_whole bad_ioctls || fail=1
            unload "the DKMS module's cases"
        else
            echo "FAIL: modprobe umm_notify"; fail=1
        fi
    fi
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
for p in linux-headers-amd64 linux-source qemu-system-x86 busybox-static cpio build-essential dkms; do
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
fuzz_bin="$(cargo build -q --release -p umm-kmod --example kmod_fuzz --message-format=json | executable_of kmod_fuzz)"
[ -x "$tests_bin" ] && [ -x "$latency_bin" ] && [ -x "$fuzz_bin" ] || { echo "FAIL: guest binaries not built"; exit 1; }

# ---- DKMS on the host, for the guest kernel ---------------------------------------------------
dkms=0
if [ "${UMM_KMOD_DKMS:-1}" = 1 ]; then
    step "DKMS: build and install umm_notify for $kver (host; the guest sees the host's root)"
    [ "$(id -u)" = 0 ] || { echo "FAIL: the DKMS step needs root (or UMM_KMOD_DKMS=0)"; exit 1; }
    trap 'bash "$repo/scripts/install-kmod.sh" --kernel "$kver" --no-system-config --uninstall >/dev/null 2>&1 || true' EXIT
    bash scripts/install-kmod.sh --kernel "$kver" --no-system-config >/dev/null \
        || { echo "FAIL: DKMS build/install"; exit 1; }
    dkms status -m umm_notify
    dkms=1
fi

# ---- one guest boot -----------------------------------------------------------------------
step "guest: kernel $kver, one boot"
mkdir -p "$repo/.vm"
t0=$(date +%s.%N)
set +e
"$repo/scripts/vm" --timeout "${UMM_KMOD_TIMEOUT:-600}" --mem 2048 --keep "$CARGO_TARGET_DIR" \
    -- bash "$repo/scripts/test-kmod.sh" --in-guest "$tests_bin" "$latency_bin" "$fuzz_bin" "$dkms" | tee "$repo/.vm/test-kmod.log"
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
