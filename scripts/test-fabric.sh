#!/usr/bin/env bash
# scripts/test-fabric.sh: does libfabric's MR cache send the bytes a buffer holds now?
# Stock monitor vs umm-fabric, on Soft-RoCE, in one guest boot (issue 16, libfabric part).
#
# Usage: scripts/test-fabric.sh [--no-uffd]
#
# On the host: builds libumm_fabric.so (release), demos/stacks/fabric/fabric-bytes.c and the
# registration counter demos/stacks/regcount/regcount.c, and kmod-notifier; boots the guest
# ONCE (scripts/vm); inside it sets up rxe0/rxe1 (scripts/rxe-setup.sh), loads the module
# and, for every way of changing a buffer's mapping, runs one fabric-bytes pair
# (verbs;ofi_rxm, receiver on rxe0 10.99.0.1, sender on rxe1 10.99.0.2, 1 MiB sent twice
# through rxm's rendezvous and the verbs MR cache) per column:
#   stock     libfabric's default monitor (memhooks)
#   umm-kmod  LD_PRELOAD=libumm_fabric.so, UMM_SOURCE=kmod (the kernel module)
#   umm-uffd  LD_PRELOAD=libumm_fabric.so, UMM_SOURCE=uffd (strict userfaultfd; --no-uffd
#             leaves this column out)
# The sender runs under libregcount.so, which counts its ibv_reg_mr calls. Prints the
# table (bytes of the second message: NEW/OLD and the counts; registrations of the sender)
# and exits non-zero when: any umm cell is not all-new bytes, a umm sender did not run on
# the source it was given, the stock monitor does NOT send old bytes in the rows the issue
# measured it failing (raw, punch), the control row (same) is not all-new, or any run failed.
#
# The cargo target directory must be visible in the guest: not under /tmp (tmpfs there).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

modes=(same munmap raw fixed fork punch shmat madv)
# Rows where the issue measured the stock monitor sending old bytes: the test requires it
# (so that it can fail).
stock_fails=(raw punch)

if [ "${1:-}" = "--in-guest" ]; then
    # ---- inside the guest ------------------------------------------------------------------
    bin="$2"
    columns="$3"
    out="${UMM_VM_OUT:?not in scripts/vm}"
    t0=$(date +%s)
    scripts/rxe-setup.sh || { echo "rxe setup failed"; exit 1; }
    if [[ " $columns " == *" umm-kmod "* ]]; then
        grep -q umm_notify /proc/modules || insmod kmod-notifier/umm_notify.ko ||
            { echo "insmod kmod-notifier/umm_notify.ko failed"; exit 1; }
    fi
    export FI_PROVIDER="verbs;ofi_rxm" FI_UNIVERSE_SIZE=8
    unset FI_MR_CACHE_MONITOR UMM_SOURCE
    port=20000
    for col in $columns; do
        for mode in "${modes[@]}"; do
            port=$((port + 1))
            tag="$col.$mode"
            case "$col" in
                stock) pre="$bin/libregcount.so"; src="" ;;
                umm-kmod) pre="$bin/libregcount.so:$bin/libumm_fabric.so"; src=kmod ;;
                umm-uffd) pre="$bin/libregcount.so:$bin/libumm_fabric.so"; src=uffd ;;
            esac
            timeout 150 "$bin/fabric-bytes" recv 10.99.0.1 "$port" "$mode" \
                >"$out/$tag.recv" 2>&1 &
            rpid=$!
            set +e
            # env after timeout: only fabric-bytes gets the preloads (timeout would append
            # its own regcount line at exit).
            timeout 150 env LD_PRELOAD="$pre" REGCOUNT_FILE="$out/$tag.reg" ${src:+UMM_SOURCE=$src} \
                "$bin/fabric-bytes" send 10.99.0.2 "$port" "$mode" \
                >"$out/$tag.send" 2>&1
            src_rc=$?
            wait "$rpid"
            rrc=$?
            set -e
            echo "$tag: sender exit $src_rc, receiver exit $rrc"
            [ "$src_rc" = 0 ] && [ "$rrc" = 0 ] || sed 's/^/    /' "$out/$tag.send" "$out/$tag.recv"
        done
    done
    echo "guest time: $(( $(date +%s) - t0 )) s"
    exit 0
fi

# ---- on the host ---------------------------------------------------------------------------
columns="stock umm-kmod umm-uffd"
[ "${1:-}" = "--no-uffd" ] && columns="stock umm-kmod"

# shellcheck source=scripts/guest-env.sh
. "$repo/scripts/guest-env.sh"
guest_target_dir
target="$CARGO_TARGET_DIR"
mkdir -p "$target"
out="$(mktemp -d "$target/fabric-vm.XXXXXX")"
trap 'rm -rf "$out"' EXIT
bin="$out/bin"
mkdir -p "$bin"

t0=$(date +%s)
if [[ " $columns " == *" umm-kmod "* ]]; then
    kver="$(bash scripts/build-kmod.sh)" || { echo "kmod-notifier did not build" >&2; exit 1; }
    export UMM_VM_KERNEL="$kver"
fi
echo "building libumm_fabric.so (release, target $target)..."
cargo build --release -p umm-fabric
cp "$target/release/libumm_fabric.so" "$bin/"
cc -O2 -Wall -Wextra -Werror -o "$bin/fabric-bytes" demos/stacks/fabric/fabric-bytes.c -lfabric -ldl
cc -shared -fPIC -O2 -Wall -Wextra -o "$bin/libregcount.so" demos/stacks/regcount/regcount.c -ldl
echo "build: $(( $(date +%s) - t0 )) s"

set +e
scripts/vm --timeout 600 --out "$out" -- "$repo/scripts/test-fabric.sh" --in-guest "$bin" "$columns" \
    2>&1 | tee "$out/console.log"
rc=${PIPESTATUS[0]}
set -e
if [ "$rc" != 0 ]; then
    echo "FAIL: the guest run failed (scripts/vm exit $rc)"
    exit 1
fi

# ---- the table -----------------------------------------------------------------------------
fails=()
cell() { # <column> <mode>: prints the cell, records failures
    local col="$1" mode="$2" recv send reg verdict newb oldb other regs mon
    recv="$(grep -h '^fabric-bytes mode=' "$out/$col.$mode.recv" 2>/dev/null || true)"
    send="$(grep -h '^fabric-bytes sender' "$out/$col.$mode.send" 2>/dev/null || true)"
    reg="$(grep -h '^regcount' "$out/$col.$mode.reg" 2>/dev/null || true)"
    if [ "$(wc -l <<<"$reg")" != 1 ]; then
        fails+=("$col/$mode: expected one regcount line, got: ${reg:-none}")
        reg=""
    fi
    if [ -z "$recv" ] || [ -z "$send" ]; then
        printf '%s' "run failed"
        fails+=("$col/$mode: the run failed")
        return
    fi
    verdict="$(sed -n 's/.*verdict=\([A-Z]*\).*/\1/p' <<<"$recv")"
    newb="$(sed -n 's/.* new=\([0-9]*\).*/\1/p' <<<"$recv")"
    oldb="$(sed -n 's/.* old=\([0-9]*\).*/\1/p' <<<"$recv")"
    other="$(sed -n 's/.* other=\([0-9]*\).*/\1/p' <<<"$recv")"
    regs="$(sed -n 's/.* reg=\([0-9]*\).*/\1/p' <<<"$reg")"
    mon="$(sed -n 's/.* monitor=\([^ ]*\).*/\1/p' <<<"$send")"
    printf '%-5s %7s/%-7s %4s' "$verdict" "$newb" "$oldb" "${regs:-?}"
    [ "$other" = 0 ] || printf ' other=%s' "$other"
    case "$col" in
        stock)
            [ "$mon" = stock ] || fails+=("$col/$mode: monitor=$mon")
            if [[ " ${stock_fails[*]} " == *" $mode "* ]]; then
                [ "$verdict" = OLD ] || fails+=("$col/$mode: stock monitor did not send old bytes ($verdict): the test cannot fail")
            fi
            [ "$mode" != same ] || [ "$verdict" = NEW ] || fails+=("$col/$mode: control row not new ($verdict)")
            ;;
        umm-*)
            [ "$mon" = "umm:${col#umm-}" ] || fails+=("$col/$mode: sender ran on monitor=$mon")
            [ "$verdict" = NEW ] || fails+=("$col/$mode: umm sent $verdict bytes")
            ;;
    esac
    [ -n "$regs" ] || fails+=("$col/$mode: no registration count")
}

{
    echo
    echo "Bytes of the second 1 MiB message (NEW/OLD: all bytes new/old; counts new/old) and"
    echo "ibv_reg_mr calls of the sender (libregcount), verbs;ofi_rxm rxe1 -> rxe0:"
    echo
    printf '| %-7s |' "change"
    for col in $columns; do printf ' %-28s |' "$col: bytes new/old, regs"; done
    echo
    printf '|---------|'
    for col in $columns; do printf '%s|' "------------------------------"; done
    echo
    for mode in "${modes[@]}"; do
        printf '| %-7s |' "$mode"
        for col in $columns; do
            c="$(cell "$col" "$mode")"
            printf ' %-28s |' "$c"
        done
        echo
    done
} | tee "$out/table.txt"
# cell runs in a subshell above (for the padding); collect the failures in this shell.
for col in $columns; do for mode in "${modes[@]}"; do cell "$col" "$mode" >/dev/null; done; done

echo
echo "total: $(( $(date +%s) - t0 )) s"
if [ "${#fails[@]}" -gt 0 ]; then
    printf 'FAIL: %s\n' "${fails[@]}"
    exit 1
fi
echo "PASS: umm-fabric sent new bytes in every row; the stock monitor sent old bytes in: ${stock_fails[*]}"
