#!/usr/bin/env bash
# scripts/test-rdma.sh: umm's RDMA tests on Soft-RoCE, in one guest boot.
#
# Usage: scripts/test-rdma.sh [--numbers]
#
# On the host: builds the test binaries of umm-rdma and stale-dma (and the stale-dma demo),
# boots the guest ONCE through scripts/vm, and inside it sets up rxe0/rxe1
# (scripts/rxe-setup.sh), runs every test binary with --test-threads=1 and the demo, and
# prints a summary line `N passed, N failed`. Exits non-zero if anything failed (a test
# that SKIPs inside the guest counts as failed: rxe was set up, so a skip is a bug).
# It also builds kmod-notifier (as scripts/test-kmod.sh does) and loads it in the guest, so
# the stale-DMA test runs with every notifier source: manual, userfaultfd, kernel module,
# interposition (each must run; the kernel module only if it built).
# --numbers also builds and runs the measurement program (release) in the same boot:
# ibv_reg_mr+ibv_dereg_mr cost vs size, a umm hit, and the RDMA WRITE round trip.
#
# The cargo target directory must be visible in the guest: not under /tmp (tmpfs there).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

if [ "${1:-}" = "--in-guest" ]; then
    # ---- inside the guest ------------------------------------------------------------------
    list="$2"
    out="${UMM_VM_OUT:?not in scripts/vm}"
    passed=0
    failed=0
    t0=$(date +%s)
    if ! scripts/rxe-setup.sh; then
        echo "rxe setup failed"
        echo "0 passed, 1 failed"
        exit 1
    fi
    # The stale-DMA test must run every notifier source available here; the kernel module
    # only when it was built on the host and loads.
    require="manual,userfaultfd,interposition"
    if [ -f kmod-notifier/umm_notify.ko ] && ! grep -q umm_notify /proc/modules; then
        if insmod kmod-notifier/umm_notify.ko; then
            require="$require,kernel module"
        else
            echo "!!! insmod kmod-notifier/umm_notify.ko failed: the kernel-module row is skipped"
        fi
    fi
    export UMM_STALE_DMA_REQUIRE="$require"
    echo "stale-DMA sources required: $require"
    while read -r kind bin; do
        [ -n "$bin" ] || continue
        name="$(basename "$bin")"
        log="$out/$name.log"
        case "$kind" in
            test)
                echo "=== $name"
                set +e
                "$bin" --test-threads=1 >"$log" 2>&1
                rc=$?
                set -e
                cat "$log"
                p=$(sed -n 's/^test result: .* \([0-9]*\) passed; \([0-9]*\) failed.*/\1/p' "$log" | tail -1)
                f=$(sed -n 's/^test result: .* \([0-9]*\) passed; \([0-9]*\) failed.*/\2/p' "$log" | tail -1)
                skips=$(grep -c '^SKIP' "$log" || true)
                if [ -z "$p" ]; then
                    echo "!!! $name exited $rc without a test result"
                    failed=$((failed + 1))
                    continue
                fi
                if [ "$skips" -gt 0 ]; then
                    echo "!!! $name: $skips test(s) skipped although rxe is set up"
                fi
                passed=$((passed + p - skips))
                failed=$((failed + f + skips))
                if [ "$rc" != 0 ] && [ "$f" = 0 ]; then failed=$((failed + 1)); fi
                ;;
            demo)
                echo "=== demo $name"
                if "$bin"; then passed=$((passed + 1)); else failed=$((failed + 1)); fi
                ;;
            numbers)
                echo "=== numbers $name"
                if ! "$bin" | tee "$out/numbers.txt"; then failed=$((failed + 1)); fi
                ;;
        esac
    done <"$list"
    echo "guest time: $(( $(date +%s) - t0 )) s"
    echo "$passed passed, $failed failed"
    [ "$failed" = 0 ]
    exit
fi

# ---- on the host ---------------------------------------------------------------------------
numbers=0
[ "${1:-}" = "--numbers" ] && numbers=1

# shellcheck source=scripts/guest-env.sh
. "$repo/scripts/guest-env.sh"
guest_target_dir
target="$CARGO_TARGET_DIR"

mkdir -p "$target"
out="$(mktemp -d "$target/rdma-vm.XXXXXX")"
trap 'rm -rf "$out"' EXIT
list="$out/binaries"

t0=$(date +%s)
build_kmod_optional "the stale-DMA kernel-module row"
echo "building the RDMA tests (target $target)..."
cargo build -p stale-dma --bins
# Test harnesses only (they live in deps/), not examples or binaries.
cargo test -p umm-rdma -p stale-dma --no-run --message-format=json 2>/dev/null |
    grep -o '"executable":"[^"]*/deps/[^"]*"' | sed 's/"executable":"\(.*\)"/test \1/' | sort -u >"$list"
echo "demo $target/debug/stale-dma" >>"$list"
if [ "$numbers" = 1 ]; then
    cargo build --release -p umm-rdma --example rdma-numbers
    echo "numbers $target/release/examples/rdma-numbers" >>"$list"
fi
[ "$(grep -c '^test ' "$list")" -ge 2 ] || { echo "no test binaries found" >&2; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s; running in the guest:"
sed 's/^/  /' "$list"

set +e
scripts/vm --timeout 900 --out "$out" -- "$repo/scripts/test-rdma.sh" --in-guest "$list" 2>&1 | tee "$out/console.log"
rc=${PIPESTATUS[0]}
set -e
summary="$(grep -E '^[0-9]+ passed, [0-9]+ failed$' "$out/console.log" | tail -1 || true)"
if [ -z "$summary" ]; then
    echo "0 passed, 1 failed (the guest did not finish: scripts/vm exit $rc)"
    exit 1
fi
echo "total: $(( $(date +%s) - t0 )) s"
exit "$rc"
