#!/usr/bin/env bash
# scripts/test-fabric.sh: does libfabric's MR cache send the bytes a buffer holds now?
# Stock monitor vs umm-fabric, on Soft-RoCE, in one guest boot (issue 16, libfabric part).
#
# Usage: scripts/test-fabric.sh [--no-uffd] [--mpi | --mpi-only] [--netpipe]
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
# With --mpi (same boot; guest time about 600 s) or --mpi-only (no table): an Open MPI job (demos/stacks/fabric/mpi-remap.c; pml cm + mtl ofi
# over verbs;ofi_rxm, rank 0 on rxe1 sends to rank 1 on rxe0): 1 MiB messages from a buffer
# remapped by raw syscalls between iterations, stock (Open MPI imports its own monitor) vs
# umm-fabric preloaded into the ranks, plus latency/bandwidth of both (the overhead ratio);
# --netpipe also runs Debian's NetPIPE (NPopenmpi, 8 B .. 1 MiB) with both.
# The sender runs under libregcount.so, which counts its ibv_reg_mr calls. Prints the
# table (bytes of the second message: NEW/OLD and the counts; registrations of the sender)
# and exits non-zero when: any umm cell is not all-new bytes, a umm sender did not run on
# the source it was given, the stock monitor does NOT send old bytes in the rows the issue
# measured it failing (raw, punch), the control row (same) is not all-new, the MPI job with
# the stock monitor has no corrupted message or with umm-fabric any, or any run failed.
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
    if [[ " $columns " == *" umm-kmod "* ]] || [ -x "$bin/mpi-remap" ]; then
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
    if [ -x "$bin/mpi-remap" ]; then
        # Open MPI 4.1, pml cm + mtl ofi over verbs;ofi_rxm; rank 0 (sender) on rxe1, rank 1
        # on rxe0. rank-env sets each rank's device (and the preload only in the ranks).
        for col in mpi-stock mpi-umm; do
            case "$col" in
                mpi-stock) pre="" ;;
                mpi-umm) pre="$bin/libumm_fabric.so" ;;
            esac
            set +e
            UMM_RANK_PRELOAD="$pre" UMM_SOURCE=kmod timeout 240 mpirun --allow-run-as-root -np 2 \
                --mca pml cm --mca mtl ofi --mca btl self --mca mtl_ofi_provider_include "verbs;ofi_rxm" \
                -x FI_PROVIDER -x FI_UNIVERSE_SIZE -x UMM_RANK_PRELOAD -x UMM_SOURCE \
                "$bin/rank-env" "$bin/mpi-remap" >"$out/$col.out" 2>&1
            mrc=$?
            set -e
            echo "$col: mpirun exit $mrc"
            [ "$mrc" = 0 ] || sed 's/^/    /' "$out/$col.out" | tail -30
        done
    fi
    if [ -f "$bin/netpipe" ]; then
        # NetPIPE (Debian's netpipe-openmpi), the same two ranks, 8 B .. 1 MiB, 3 repeats.
        for col in np-stock np-umm; do
            case "$col" in
                np-stock) pre="" ;;
                np-umm) pre="$bin/libumm_fabric.so" ;;
            esac
            set +e
            UMM_RANK_PRELOAD="$pre" UMM_SOURCE=kmod timeout 300 mpirun --allow-run-as-root -np 2 \
                --mca pml cm --mca mtl ofi --mca btl self --mca mtl_ofi_provider_include "verbs;ofi_rxm" \
                -x FI_PROVIDER -x FI_UNIVERSE_SIZE -x UMM_RANK_PRELOAD -x UMM_SOURCE \
                "$bin/rank-env" NPopenmpi -l 8 -u 1048576 -n 3 -p 0 -o "$out/$col.np" \
                >"$out/$col.out" 2>&1
            nrc=$?
            set -e
            echo "$col: NetPIPE exit $nrc"
            [ "$nrc" = 0 ] || sed 's/^/    /' "$out/$col.out" | tail -30
        done
    fi
    echo "guest time: $(( $(date +%s) - t0 )) s"
    exit 0
fi

# ---- on the host ---------------------------------------------------------------------------
columns="stock umm-kmod umm-uffd"
mpi=0
netpipe=0
for arg in "$@"; do
    case "$arg" in
        --no-uffd) columns="stock umm-kmod" ;;
        --mpi) mpi=1 ;;
        --mpi-only) mpi=1; columns="" ;;
        --netpipe) netpipe=1 ;;
        *) echo "usage: $0 [--no-uffd] [--mpi | --mpi-only] [--netpipe]" >&2; exit 2 ;;
    esac
done
# Guest time (TCG): the table about 320 s (3 columns), each mpirun about 130 s.
vm_timeout=600
[ "$mpi" = 1 ] && [ -n "$columns" ] && vm_timeout=1000
if [ "$netpipe" = 1 ]; then
    [ "$mpi" = 1 ] || { echo "--netpipe needs --mpi or --mpi-only" >&2; exit 2; }
    command -v NPopenmpi >/dev/null || { echo "NPopenmpi missing (netpipe-openmpi: scripts/setup.sh)" >&2; exit 1; }
    vm_timeout=$((vm_timeout + 600))
fi
if [ "$mpi" = 1 ] && ! command -v mpicc >/dev/null; then
    echo "mpicc missing (openmpi-bin, libopenmpi-dev: scripts/setup.sh)" >&2
    exit 1
fi

# shellcheck source=scripts/guest-env.sh
. "$repo/scripts/guest-env.sh"
guest_target_dir
target="$CARGO_TARGET_DIR"
mkdir -p "$target"
out="$(mktemp -d "$target/fabric-vm.XXXXXX")"
# Kept when the run fails (the logs of every run are there).
trap 'rc=$?; if [ "$rc" = 0 ]; then rm -rf "$out"; else echo "logs kept in $out"; fi' EXIT
bin="$out/bin"
mkdir -p "$bin"

t0=$(date +%s)
if [[ " $columns " == *" umm-kmod "* ]] || [ "$mpi" = 1 ]; then
    kver="$(bash scripts/build-kmod.sh)" || { echo "kmod-notifier did not build" >&2; exit 1; }
    export UMM_VM_KERNEL="$kver"
fi
echo "building libumm_fabric.so (release, target $target)..."
cargo build --release -p umm-fabric
cp "$target/release/libumm_fabric.so" "$bin/"
cc -O2 -Wall -Wextra -Werror -o "$bin/fabric-bytes" demos/stacks/fabric/fabric-bytes.c -lfabric -ldl
cc -shared -fPIC -O2 -Wall -Wextra -o "$bin/libregcount.so" demos/stacks/regcount/regcount.c -ldl
if [ "$mpi" = 1 ]; then
    mpicc -O2 -Wall -Wextra -Werror -o "$bin/mpi-remap" demos/stacks/fabric/mpi-remap.c -ldl
    cat >"$bin/rank-env" <<'EOS'
#!/bin/sh
# One MPI rank: rank 0 on rxe1, rank 1 on rxe0; LD_PRELOAD only here (not in mpirun).
export FI_VERBS_DEVICE_NAME="rxe$((1 - ${OMPI_COMM_WORLD_RANK:?}))"
if [ -n "${UMM_RANK_PRELOAD:-}" ]; then
    export LD_PRELOAD="$UMM_RANK_PRELOAD"
fi
exec "$@"
EOS
    chmod +x "$bin/rank-env"
    [ "$netpipe" = 0 ] || touch "$bin/netpipe"
fi
echo "build: $(( $(date +%s) - t0 )) s"

set +e
scripts/vm --timeout "$vm_timeout" --out "$out" -- "$repo/scripts/test-fabric.sh" --in-guest "$bin" "$columns" \
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

[ -z "$columns" ] || {
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

if [ "$mpi" = 1 ]; then
    echo
    echo "MPI job (Open MPI, pml cm + mtl ofi, verbs;ofi_rxm, 2 ranks rxe1 -> rxe0): 1 MiB"
    echo "messages from a buffer remapped by raw syscalls between iterations, every byte checked;"
    echo "then 8-byte ping-pong latency and 1 MiB bandwidth from a buffer that stays put:"
    declare -A lat bw
    for col in mpi-stock mpi-umm; do
        res="$(grep -h '^mpi-remap monitor=' "$out/$col.out" 2>/dev/null || true)"
        perf="$(grep -h '^mpi-remap latency_us=' "$out/$col.out" 2>/dev/null || true)"
        echo "  $col: ${res:-no result} ${perf#mpi-remap }"
        if [ -z "$res" ] || [ -z "$perf" ]; then
            fails+=("$col: the MPI job failed")
            continue
        fi
        corrupted="$(sed -n 's/.* corrupted=\([0-9]*\).*/\1/p' <<<"$res")"
        mon="$(sed -n 's/.* monitor=\([^ ]*\).*/\1/p' <<<"$res")"
        lat[$col]="$(sed -n 's/.*latency_us=\([0-9.]*\).*/\1/p' <<<"$perf")"
        bw[$col]="$(sed -n 's/.*bandwidth_MBps=\([0-9.]*\).*/\1/p' <<<"$perf")"
        case "$col" in
            mpi-stock)
                [ "$mon" = stock ] || fails+=("$col: monitor=$mon")
                [ "$corrupted" -gt 0 ] || fails+=("$col: no corrupted message with the stock monitor: the test cannot fail")
                ;;
            mpi-umm)
                [ "$mon" = umm:kmod ] || fails+=("$col: monitor=$mon")
                [ "$corrupted" = 0 ] || fails+=("$col: $corrupted corrupted messages with umm-fabric")
                ;;
        esac
    done
    if [ -n "${lat[mpi-stock]:-}" ] && [ -n "${lat[mpi-umm]:-}" ]; then
        awk -v ls="${lat[mpi-stock]}" -v lu="${lat[mpi-umm]}" -v bs="${bw[mpi-stock]}" -v bu="${bw[mpi-umm]}" \
            'BEGIN { printf "  overhead umm/stock: latency x%.2f, bandwidth x%.2f (TCG guest: noisy)\n", lu / ls, bu / bs }'
    fi
fi
if [ "$netpipe" = 1 ]; then
    echo
    echo "NetPIPE (NPopenmpi, same ranks; one-way latency at 8 B, bandwidth at 1 MiB):"
    declare -A nlat nbw
    for col in np-stock np-umm; do
        f="$out/$col.np"
        # NetPIPE's output file: bytes, Mbps, seconds (one way) per line.
        if [ ! -s "$f" ]; then
            fails+=("$col: NetPIPE produced no results")
            echo "  $col: no results"
            continue
        fi
        nlat[$col]="$(awk '$1 == 8 { printf "%.1f", $3 * 1e6; exit }' "$f")"
        nbw[$col]="$(awk '$1 == 1048576 { printf "%.2f", $2 / 8; exit }' "$f")"
        echo "  $col: latency ${nlat[$col]:-?} us, bandwidth ${nbw[$col]:-?} MB/s"
    done
    if [ -n "${nlat[np-stock]:-}" ] && [ -n "${nlat[np-umm]:-}" ] && [ -n "${nbw[np-stock]:-}" ] && [ -n "${nbw[np-umm]:-}" ]; then
        awk -v ls="${nlat[np-stock]}" -v lu="${nlat[np-umm]}" -v bs="${nbw[np-stock]}" -v bu="${nbw[np-umm]}" \
            'BEGIN { printf "  NetPIPE overhead umm/stock: latency x%.2f, bandwidth x%.2f\n", lu / ls, bu / bs }'
    fi
fi

echo
echo "total: $(( $(date +%s) - t0 )) s"
if [ "${#fails[@]}" -gt 0 ]; then
    printf 'FAIL: %s\n' "${fails[@]}"
    exit 1
fi
[ -z "$columns" ] || echo "PASS: umm-fabric sent new bytes in every row; the stock monitor sent old bytes in: ${stock_fails[*]}"
[ "$mpi" = 0 ] || echo "PASS: the MPI job was corrupted with the stock monitor and correct with umm-fabric"
