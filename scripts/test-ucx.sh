#!/usr/bin/env bash
# scripts/test-ucx.sh: UCX's registration cache with its stock monitor vs umm-ucx, with bytes,
# on Soft-RoCE in one guest boot (issue 16 items 2 and 3, UCX part).
#
# Usage: scripts/test-ucx.sh
#
# On the host: builds kmod-notifier (scripts/build-kmod.sh), umm-ucx (libumm_ucx.so),
# demos/stacks/ucx/ucx_bytes and the regcount preload; boots the guest ONCE; inside it sets
# up rxe0/rxe1 (scripts/rxe-setup.sh), loads the kernel module, and for each way of changing
# a buffer's mapping runs a UCP sender (rxe1) and receiver (rxe0) pair, connected through
# rdmacm, twice: with UCX's stock monitor and with umm-ucx preloaded into the sender. The
# sender sends 1 MiB (rendezvous), changes the mapping, writes new bytes, sends again; the
# receiver checks every byte of the second message: new, old (a stale registration), mixed.
# Registrations are counted on the sender by demos/stacks/regcount (ibv_reg_mr* calls).
#
# Exits non-zero if umm-ucx gives anything but the new bytes in any row, or if the stock
# monitor does NOT send old bytes in a row where issue 16 says it does (raw syscalls,
# fallocate(PUNCH_HOLE)): the test must be able to fail.
#
# UCX settings (found on this rig): UCX_TLS=rc_verbs, UCX_NET_DEVICES=rxe0:1 (receiver) and
# rxe1:1 (sender), connection through ucp_listener / UCP_EP_PARAM_FIELD_SOCK_ADDR (rdmacm).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

rows="${TEST_UCX_ROWS:-libc raw fixed fork punch shmremap dontneed}"
# The rows where issue 16 measured stale bytes with UCX's stock monitor.
stock_fails="raw punch"

if [ "${1:-}" = "--in-guest" ]; then
    # ---- inside the guest ------------------------------------------------------------------
    bin="$2"
    out="${UMM_VM_OUT:?not in scripts/vm}"
    set +e
    t0=$(date +%s)
    scripts/rxe-setup.sh >/dev/null || { echo "rxe setup failed"; exit 1; }
    insmod kmod-notifier/umm_notify.ko || { echo "insmod umm_notify.ko failed"; exit 1; }
    export UCX_TLS=rc_verbs BYTES_TIMEOUT=120 UMM_SOURCE="${UMM_SOURCE:-kmod}"
    port=13400
    # run_pair ROW MON: one receiver (stock) and one sender (MON: stock, umm = umm-ucx
    # preloaded with the kernel module, uffd = the same with UMM_SOURCE=uffd, linked =
    # ucx_bytes_linked calling umm_ucx_install()); appends one line to $out/results.
    run_pair() {
        local row=$1 mon=$2 log rpid preload prog=ucx_bytes src=kmod regs inv line
        port=$((port + 1))
        log="$out/$row.$mon"
        UCX_NET_DEVICES=rxe0:1 "$bin/ucx_bytes" recv 10.99.0.1 "$port" "$row" \
            >"$log.recv" 2>&1 &
        rpid=$!
        for _ in $(seq 600); do
            grep -q listening "$log.recv" && break
            kill -0 "$rpid" 2>/dev/null || break
            sleep 0.1
        done
        # umm-ucx first (it forwards to the next definition: regcount's, which counts only
        # what is really registered).
        preload="$bin/libregcount.so"
        case "$mon" in
            umm) preload="$bin/libumm_ucx.so $preload" ;;
            uffd) preload="$bin/libumm_ucx.so $preload"; src=uffd ;;
            # regcount would bind first and skip the linked library's definitions.
            # (and a preloaded libibverbs would come before the linked library).
            linked) preload=""; prog=ucx_bytes_linked ;;
        esac
        # libibverbs last: UCX loads it RTLD_LOCAL, out of the preloads' RTLD_NEXT reach.
        [ -n "$preload" ] && preload="$preload libibverbs.so.1"
        UCX_NET_DEVICES=rxe1:1 REGCOUNT_FILE="$log.regs" UMM_UCX_STATS=1 UMM_SOURCE=$src \
            LD_PRELOAD="$preload" \
            "$bin/$prog" send 10.99.0.1 "$port" "$row" >"$log.send" 2>&1
        # A sender that failed leaves the receiver waiting: give it 20 s, then stop it.
        for _ in $(seq 200); do kill -0 "$rpid" 2>/dev/null || break; sleep 0.1; done
        kill "$rpid" 2>/dev/null
        wait "$rpid"
        line="$(grep '^ucx_bytes row=' "$log.recv" || echo "ucx_bytes row=$row first=? second=none")"
        regs="$(sed -n 's/.* reg=\([0-9]*\) .*/\1/p' "$log.regs" 2>/dev/null | head -1)"
        inv="$(sed -n 's/.* invalidations=\([0-9]*\).*/\1/p' "$log.send" | head -1)"
        refused="$(sed -n 's/.* refused=\([0-9]*\).*/\1/p' "$log.send" | head -1)"
        echo "$line mon=$mon regs=${regs:--} inval=${inv:--} refused=${refused:--}" >>"$out/results"
        grep -v -E '^(sent row|umm-ucx pid)' "$log.send" | grep -v 'Failed sending ACK' |
            sed "s/^/  [$row $mon sender] /" | head -5
    }
    for row in $rows; do
        for mon in ${TEST_UCX_MONITORS:-stock umm}; do run_pair "$row" "$mon"; done
    done
    # The install call, and the userfaultfd source's strictness, on the rows that matter.
    for row in raw punch; do run_pair "$row" linked; done
    for row in raw punch shmremap; do run_pair "$row" uffd; done
    echo "guest time: $(( $(date +%s) - t0 )) s"
    exit 0
fi

# ---- on the host ---------------------------------------------------------------------------
# shellcheck source=scripts/guest-env.sh
. "$repo/scripts/guest-env.sh"
guest_target_dir
target="$CARGO_TARGET_DIR"
kver="$(bash scripts/build-kmod.sh)"
export UMM_VM_KERNEL="$kver"
cargo build --release -p umm-ucx
bin="$target/stacks-ucx"
mkdir -p "$bin"
cc -O2 -Wall -Wextra -o "$bin/ucx_bytes" demos/stacks/ucx/ucx_bytes.c -lucp -lucs
cc -shared -fPIC -O2 -o "$bin/libregcount.so" demos/stacks/regcount/regcount.c -ldl
cp "$target/release/libumm_ucx.so" "$bin/"
# -lumm_ucx before -lucp: its uct_md_mem_reg and ibv_reg_mr* must come first.
cc -O2 -Wall -Wextra -DUMM_UCX_LINKED -I monitors/ucx/include -o "$bin/ucx_bytes_linked" \
    demos/stacks/ucx/ucx_bytes.c -L"$bin" -lumm_ucx -lucp -lucs -Wl,-rpath,"$bin"

out="$(mktemp -d "$target/ucx-vm.XXXXXX")"
[ -n "${TEST_UCX_KEEP:-}" ] || trap 'rm -rf "$out"' EXIT
set +e
scripts/vm --timeout 600 --out "$out" --env TEST_UCX_ROWS="$rows" \
    --env TEST_UCX_MONITORS="${TEST_UCX_MONITORS:-stock umm}" -- "$0" --in-guest "$bin" |
    grep -v 'Failed sending ACK'
vm_rc=${PIPESTATUS[0]}
set -e
[ "$vm_rc" = 0 ] || echo "!!! the guest run exited $vm_rc"

res="$out/results"
[ -s "$res" ] || { echo "no results from the guest"; exit 1; }
get() { # row mon field
    grep "row=$1 " "$res" | grep "mon=$2 " | sed -n "s/.* $3=\([^ ]*\).*/\1/p" | head -1
}
echo
echo "UCX 1.13 rc_verbs over Soft-RoCE (rxe1 -> rxe0), 1 MiB rendezvous sends; the buffer's"
echo "mapping changes between two sends; bytes = what the receiver got the second time."
echo
printf '| %-35s | %-11s | %-10s | %-9s | %-8s | %-10s |\n' "change between the sends" \
    "stock bytes" "stock regs" "umm bytes" "umm regs" "umm inval."
dashes() { printf -- '-%.0s' $(seq "$1"); }
printf '|%s|%s|%s|%s|%s|%s|\n' "$(dashes 37)" "$(dashes 13)" "$(dashes 12)" "$(dashes 11)" \
    "$(dashes 10)" "$(dashes 12)"
declare -A title=(
    [libc]="libc munmap + mmap"
    [raw]="syscall(SYS_munmap) + SYS_mmap"
    [fixed]="mmap(MAP_FIXED) over it"
    [fork]="fork, parent writes"
    [punch]="fallocate(PUNCH_HOLE), tmpfs shared"
    [shmremap]="shmat(SHM_REMAP)"
    [dontneed]="madvise(MADV_DONTNEED)"
)
bad=0
for row in $rows; do
    sb="$(get "$row" stock second)"; ub="$(get "$row" umm second)"
    printf '| %-35s | %-11s | %-10s | %-9s | %-8s | %-10s |\n' "${title[$row]}" "${sb:-?}" \
        "$(get "$row" stock regs)" "${ub:-?}" "$(get "$row" umm regs)" "$(get "$row" umm inval)"
    if [ "$ub" != new ]; then
        echo "!!! umm-ucx: row $row got '$ub' bytes, not the new ones"
        bad=1
    fi
    if [[ " $stock_fails " == *" $row "* ]] && [ "$sb" != old ]; then
        echo "!!! stock UCX: row $row got '$sb', but issue 16 measured old bytes there"
        bad=1
    fi
done
echo
echo "The install call (ucx_bytes linked with -lumm_ucx, umm_ucx_install() before ucp_init) and"
echo "the userfaultfd source (UMM_SOURCE=uffd, strict: refuses what it cannot see):"
echo
printf '| %-35s | %-22s | %-9s | %-10s | %-7s |\n' "change between the sends" "umm-ucx" "bytes" \
    "umm inval." "refused"
printf '|%s|%s|%s|%s|%s|\n' "$(dashes 37)" "$(dashes 24)" "$(dashes 11)" "$(dashes 12)" "$(dashes 9)"
for pair in raw:linked punch:linked raw:uffd punch:uffd shmremap:uffd; do
    row=${pair%%:*} mon=${pair#*:}
    b="$(get "$row" "$mon" second)"
    what="linked, kernel module"
    [ "$mon" = uffd ] && what="preloaded, userfaultfd"
    printf '| %-35s | %-22s | %-9s | %-10s | %-7s |\n' "${title[$row]}" "$what" "${b:-?}" \
        "$(get "$row" "$mon" inval)" "$(get "$row" "$mon" refused)"
    case "$mon:$row" in
        linked:* | uffd:raw)
            [ "$b" = new ] || { echo "!!! umm-ucx ($what): row $row got '$b', not the new bytes"; bad=1; } ;;
        uffd:*)
            # Strict: the registration is refused (no stale translation can exist); the send
            # then fails or goes by copy, but old bytes would be a silent gap.
            if [ "$b" = old ] || [ "$(get "$row" "$mon" refused)" = 0 ]; then
                echo "!!! umm-ucx (userfaultfd): row $row got '$b' with no refusal"
                bad=1
            fi ;;
    esac
done
echo
echo "bytes: new / old (stale registration) / none (the send failed: nothing arrived)."
echo "regs: ibv_reg_mr* calls in the sender (regcount), UCX's own bounce buffers included."
echo "umm inval.: ranges umm-ucx handed to ucm_vm_munmap; refused: registrations it refused."
if [ "$bad" = 0 ]; then echo "RESULT: PASS"; else echo "RESULT: FAIL"; fi
exit "$bad"
