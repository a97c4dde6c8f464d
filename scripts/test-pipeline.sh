#!/usr/bin/env bash
# scripts/test-pipeline.sh: the `umm` command line and the pipeline demo in the qemu guest,
# one boot, exits non-zero on any failure.
#
#   bash scripts/test-pipeline.sh
#
# On the host: builds kmod-notifier for the guest kernel (scripts/build-kmod.sh; required),
# the `umm` binary and umm-cli's test binaries, and the pipeline demo when its crate exists.
# In the guest (scripts/vm): sets up rxe0/rxe1 (scripts/rxe-setup.sh), loads the module, prints
# `umm doctor`, runs umm-cli's tests with UMM_EXPECT_GUEST=1 (guest_verdict asserts: kernel
# module yes, RDMA yes), and, when demos/pipeline exists, a short pipeline run in the three
# modes (exit status non-zero on a mismatch in umm mode) and `umm stats` of a live one.
#
# Environment: CARGO_TARGET_DIR (default <repo>/target; must be visible in the guest),
# UMM_PIPELINE_TIMEOUT (guest timeout, default 420 s).
set -euo pipefail

repo="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)"
cd "$repo"

if [ "${1:-}" = "--in-guest" ]; then
    list="$2"
    fail=0
    scripts/rxe-setup.sh >/dev/null || { echo "FAIL: rxe setup"; exit 1; }
    insmod kmod-notifier/umm_notify.ko || { echo "FAIL: insmod"; exit 1; }
    umm="$(sed -n 's/^umm //p' "$list")"
    echo "== umm doctor (guest)"
    "$umm" doctor || { echo "FAIL: umm doctor exited $?"; fail=1; }
    while read -r kind bin; do
        case "$kind" in
            test)
                echo "== $(basename "$bin")"
                out="$(UMM_EXPECT_GUEST=1 "$bin" --test-threads=1 2>&1)" || fail=1
                echo "$out"
                if echo "$out" | grep -q '^SKIP: UMM_EXPECT_GUEST'; then echo "FAIL: guest test skipped"; fail=1; fi
                ;;
            pipeline)
                echo "== pipeline (short run, three modes)"
                "$bin" --short --plain || { echo "FAIL: pipeline (exit $?)"; fail=1; }
                echo "== umm stats of a live pipeline (UMM_STATS_EXPORT=1)"
                UMM_STATS_EXPORT=1 "$bin" --mode umm --buffers 200 --plain >"$UMM_VM_OUT/live.log" 2>&1 &
                pid=$!
                snap=""
                # Wait (bounded) until the process exports its counters with both devices
                # attached (the export starts with the source, before the devices).
                ok=0
                for _ in $(seq 600); do
                    snap="$("$umm" stats "$pid" --json 2>/dev/null)" || snap=""
                    if echo "$snap" | grep -q '"name":"vulkan:.*"name":"rxe1'; then ok=1; break; fi
                    kill -0 "$pid" 2>/dev/null || break
                    sleep 0.1
                done
                if [ "$ok" = 1 ]; then
                    echo "$snap"
                    "$umm" stats "$pid" || true
                else
                    echo "FAIL: no snapshot from the live pipeline: $snap"; fail=1
                fi
                wait "$pid" || { echo "FAIL: live pipeline run"; cat "$UMM_VM_OUT/live.log"; fail=1; }
                ;;
        esac
    done <"$list"
    if dmesg | grep -E 'BUG|WARNING|Oops|general protection'; then echo "FAIL: kernel log"; fail=1; fi
    if [ "$fail" = 0 ]; then echo "test-pipeline: PASS"; else echo "test-pipeline: FAIL"; fi
    exit "$fail"
fi

# shellcheck source=scripts/guest-env.sh
. "$repo/scripts/guest-env.sh"
guest_target_dir
target="$CARGO_TARGET_DIR"
UMM_VM_KERNEL="$(bash scripts/build-kmod.sh)"
export UMM_VM_KERNEL
out="$(mktemp -d "$target/pipeline-vm.XXXXXX")"
trap 'rm -rf "$out"' EXIT
list="$out/binaries"
cargo build -p umm-cli
echo "umm $target/debug/umm" >"$list"
cargo test -p umm-cli --no-run --message-format=json 2>/dev/null |
    grep -o '"executable":"[^"]*/deps/[^"]*"' | sed 's/"executable":"\(.*\)"/test \1/' | sort -u >>"$list"
if [ -f demos/pipeline/Cargo.toml ]; then
    cargo build --release -p pipeline
    echo "pipeline $target/release/pipeline" >>"$list"
fi
cat "$list"
scripts/vm --timeout "${UMM_PIPELINE_TIMEOUT:-420}" --out "$out" -- "$repo/scripts/test-pipeline.sh" --in-guest "$list"
