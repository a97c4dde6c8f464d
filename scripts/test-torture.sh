#!/usr/bin/env bash
# scripts/test-torture.sh: the bounded torture suite (crate umm-torture), host and guest.
#
# Usage: scripts/test-torture.sh [--host-only | --guest-only] [--soak SECS]
#
# Host (about 2 minutes): a release build of umm-torture runs UMM_TORTURE_OPS operations
# (default 120000; at least 100000 are required) for each host source: manual (the
# control, every operation), userfaultfd, interposition (in-process hooks) and the two
# combined; then the planted-bug runs, which must FAIL: every source with a wrapper that
# drops every 7th invalidation, and a manager with no source at all; then interposition
# through LD_PRELOAD=libumm_preload.so alone (umm-torture-preload has no hooks of its own),
# green and planted.
# Guest (about 5 minutes; qemu TCG through scripts/vm): builds kmod-notifier, loads it and
# runs the kernel-module source for 10^5 operations (every operation, also fork COW breaks,
# hole punching, truncation, shmat(SHM_REMAP)), then for UMM_TORTURE_GUEST_SECS seconds each
# (default 50) the combined sources and the kernel module with pins on Soft-RoCE rxe0 whose
# bytes are RDMA-written to rxe1 and compared, a planted kernel-module run that must fail,
# then checks balance
# in the kernel: no MR left (checked by the RDMA run), module refcount 0, rmmod succeeds,
# the kernel log shows no BUG/WARNING/Oops.
# --soak SECS runs every source for SECS seconds each instead of a fixed operation count.
#
# Prints the operations and invalidations per source and a final `N passed, N failed`;
# exits non-zero when any run failed (a stale pin prints the seed, the operation trace
# and a replay command line). UMM_TORTURE_SEED fixes the seed (default: the time).
set -euo pipefail

repo="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)"
cd "$repo"

seed="${UMM_TORTURE_SEED:-$(date +%s)}"
passed=0
failed=0
# run NAME ARGS...: runs $bin (umm-torture, or $pre "umm-torture-preload"), counts the result.
pre=()
run() {
    local name="$1"
    shift
    echo "=== $name: ${pre[*]} $(basename "$bin") $*"
    if env "${pre[@]}" "$bin" --seed "$seed" "$@"; then
        passed=$((passed + 1))
    else
        echo "!!! $name FAILED"
        failed=$((failed + 1))
    fi
}

budget() {
    if [ -n "$soak" ]; then echo "--duration $soak"; else echo "--ops $1 --min-ops 100000"; fi
}

# ---- inside the guest ------------------------------------------------------------------------
if [ "${1:-}" = "--in-guest" ]; then
    bin="$2" soak="${3:-}"
    secs="${soak:-${UMM_TORTURE_GUEST_SECS:-50}}"
    dmesg -C || true
    if ! insmod kmod-notifier/umm_notify.ko; then
        echo "insmod kmod-notifier/umm_notify.ko failed"
        echo "0 passed, 1 failed"
        exit 1
    fi
    # The kernel module is the source only the guest has: it runs at least 10^5 operations
    # (about 960 a second under TCG on an idle 2-core host: under two minutes). The others
    # are bounded by time (the combined sources pin slowly here: userfaultfd classifies
    # every watch through /proc/self/maps) and print their operation counts.
    if [ -n "$soak" ]; then
        run "kernel module" --source kmod --require --threads 2 --duration "$secs"
    else
        run "kernel module" --source kmod --require --threads 2 --ops 100000 --min-ops 100000
    fi
    run "combined (kernel module, userfaultfd, interposition)" --source combined --require --threads 2 --duration "$secs"
    if scripts/rxe-setup.sh >/dev/null; then
        run "kernel module + RDMA WRITE on Soft-RoCE" --source kmod --rdma --require --threads 2 --duration "$secs"
    else
        echo "!!! Soft-RoCE setup failed: the RDMA run cannot run"
        failed=$((failed + 1))
    fi
    run "planted: kernel-module events dropped" --source kmod --plant drop-every=7 --expect-failure --threads 2 --duration "$secs"
    echo "=== kernel balance"
    refcnt="$(cat /sys/module/umm_notify/refcnt)"
    if [ "$refcnt" = 0 ]; then echo "module refcount 0"; passed=$((passed + 1)); else
        echo "!!! module refcount $refcnt after the runs"; failed=$((failed + 1)); fi
    if rmmod umm_notify; then echo "rmmod ok"; passed=$((passed + 1)); else
        echo "!!! rmmod umm_notify failed"; failed=$((failed + 1)); fi
    if dmesg | grep -E 'BUG|WARNING|Oops|general protection|Call Trace'; then
        echo "!!! kernel log shows the lines above"
        failed=$((failed + 1))
    else
        echo "kernel log clean (no BUG/WARNING/Oops)"
        passed=$((passed + 1))
    fi
    echo "$passed passed, $failed failed"
    [ "$failed" = 0 ]
    exit
fi

# ---- on the host -----------------------------------------------------------------------------
host=1 guest=1 soak=""
while [ $# -gt 0 ]; do
    case "$1" in
        --host-only) guest=0 ;;
        --guest-only) host=0 ;;
        --soak) soak="$2"; shift ;;
        *) echo "usage: $0 [--host-only | --guest-only] [--soak SECS]" >&2; exit 2 ;;
    esac
    shift
done

# shellcheck source=scripts/guest-env.sh
. "$repo/scripts/guest-env.sh"
guest_target_dir
target="$CARGO_TARGET_DIR"
t0=$(date +%s)
if [ "$guest" = 1 ]; then
    build_kmod_optional "the guest torture runs"
fi
cargo build --release -p umm-torture -p umm-preload
bin="$target/release/umm-torture"

if [ "$host" = 1 ]; then
    ops="${UMM_TORTURE_OPS:-120000}"
    for s in manual uffd interpose combined; do
        # shellcheck disable=SC2046
        run "host $s" --source "$s" --require $(budget "$ops")
    done
    for s in manual uffd interpose; do
        run "host planted: $s drops every 7th invalidation" --source "$s" --plant drop-every=7 --expect-failure --ops 200000
    done
    run "host planted: no source" --source none --expect-failure --ops 200000
    # The LD_PRELOAD hooks alone: umm-torture-preload exports none of its own.
    bin="$target/release/umm-torture-preload"
    pre=("LD_PRELOAD=$target/release/libumm_preload.so")
    # shellcheck disable=SC2046
    run "host LD_PRELOAD interposition" --source interpose --require $(budget "$ops")
    run "host planted: LD_PRELOAD hooks drop every 7th invalidation" --source interpose --plant drop-every=7 --expect-failure --ops 200000
    bin="$target/release/umm-torture"
    pre=()
    echo "host: $(( $(date +%s) - t0 )) s"
fi

if [ "$guest" = 1 ]; then
    if [ ! -f kmod-notifier/umm_notify.ko ]; then
        echo "!!! no kernel module: the guest runs cannot run"
        failed=$((failed + 1))
    else
        out="$(mktemp -d "$target/torture-vm.XXXXXX")"
        trap 'rm -rf "$out"' EXIT
        t1=$(date +%s)
        # The 10^5-operation kernel-module run takes about 2 minutes on an idle host; allow
        # a loaded one three times that.
        timeout=$(( ${soak:-${UMM_TORTURE_GUEST_SECS:-50}} * 4 + 800 ))
        set +e
        scripts/vm --timeout "$timeout" --out "$out" -- "$repo/scripts/test-torture.sh" --in-guest "$bin" "$soak" 2>&1 | tee "$out/console.log"
        set -e
        summary="$(grep -E '^[0-9]+ passed, [0-9]+ failed$' "$out/console.log" | tail -1 || true)"
        if [ -z "$summary" ]; then
            echo "!!! the guest did not finish"
            failed=$((failed + 1))
        else
            passed=$((passed + $(echo "$summary" | cut -d' ' -f1)))
            failed=$((failed + $(echo "$summary" | cut -d' ' -f3)))
        fi
        echo "guest: $(( $(date +%s) - t1 )) s"
    fi
fi
echo "total: $(( $(date +%s) - t0 )) s"
echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
