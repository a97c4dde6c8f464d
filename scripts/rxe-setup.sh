#!/usr/bin/env bash
# scripts/rxe-setup.sh: Soft-RoCE for umm's RDMA tests, run as root INSIDE the guest
# (scripts/vm). Idempotent.
#
# Builds, in the initial network namespace (rxe's UDP socket lives only there on 6.1):
#   v0 (10.99.0.1/24) <-veth-> v1 (10.99.0.2/24), rxe0 on v0, rxe1 on v1,
# with policy routes so that traffic between the two addresses really crosses the veth
# (without them the `local` table answers and everything stays on lo), and the sysctls that
# GID index 1 (IPv4-mapped) needs. Checks both ports are ACTIVE with GIDs 0 and 1 populated
# and /dev/infiniband/uverbs* present. Prints one line per step; exits non-zero on failure.
set -euo pipefail

step() { printf 'rxe-setup: %s\n' "$*"; }
fail() { printf 'rxe-setup: FAILED: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || fail "must run as root (inside the guest)"

# crc32_generic first: rdma_rxe fails with "failed to init crc32 algorithm" otherwise.
for m in crc32_generic rdma_rxe ib_uverbs rdma_ucm veth; do
    modprobe "$m" || fail "modprobe $m"
done
step "modules loaded"

# No IPv6 duplicate address detection on the veth pair: while the link-local address behind
# GID 0 is "tentative" (about a second after link up) a QP's move to RTR fails (route lookup
# to the peer's GID); seen as an intermittent "ibv_modify_qp(RTR) failed".
sysctl -qw net.ipv6.conf.default.accept_dad=0
if ! ip link show v0 >/dev/null 2>&1; then
    ip link add v0 type veth peer name v1
fi
for i in v0 v1; do sysctl -qw "net.ipv6.conf.$i.accept_dad=0"; done
ip addr replace 10.99.0.1/24 dev v0
ip addr replace 10.99.0.2/24 dev v1
ip link set lo up
ip link set v0 up
ip link set v1 up

for i in all default lo v0 v1; do
    sysctl -qw "net.ipv4.conf.$i.accept_local=1"
    sysctl -qw "net.ipv4.conf.$i.rp_filter=0"
done

# Policy routing: send 10.99.0.2 out of v0 (from .1) and 10.99.0.1 out of v1 (from .2)
# before the local table gets to answer them as local addresses.
if ! ip rule show | grep -q 'lookup 100'; then
    ip route replace 10.99.0.2 dev v0 src 10.99.0.1 table 100
    ip route replace 10.99.0.1 dev v1 src 10.99.0.2 table 101
    ip rule add pref 100 to 10.99.0.2 iif lo lookup 100
    ip rule add pref 101 to 10.99.0.1 iif lo lookup 101
    ip rule add pref 1000 lookup local
    ip rule del pref 0 lookup local
fi
for _ in $(seq 1 50); do
    [ -z "$(ip -6 addr show tentative dev v0; ip -6 addr show tentative dev v1)" ] && break
    sleep 0.1
done
[ -z "$(ip -6 addr show tentative dev v0; ip -6 addr show tentative dev v1)" ] ||
    fail "IPv6 link-local addresses of v0/v1 still tentative"
step "veth v0/v1 up with policy routes"

rdma link show rxe0/1 >/dev/null 2>&1 || rdma link add rxe0 type rxe netdev v0
rdma link show rxe1/1 >/dev/null 2>&1 || rdma link add rxe1 type rxe netdev v1

# The ports go ACTIVE and the GIDs appear asynchronously (IPv6 link-local needs DAD).
for dev in rxe0 rxe1; do
    ok=0
    for _ in $(seq 1 100); do
        state="$(cat /sys/class/infiniband/$dev/ports/1/state 2>/dev/null || true)"
        g0="$(cat /sys/class/infiniband/$dev/ports/1/gids/0 2>/dev/null || true)"
        g1="$(cat /sys/class/infiniband/$dev/ports/1/gids/1 2>/dev/null || true)"
        zero=0000:0000:0000:0000:0000:0000:0000:0000
        if [[ "$state" == *ACTIVE* && -n "$g0" && "$g0" != "$zero" && -n "$g1" && "$g1" != "$zero" ]]; then
            ok=1
            break
        fi
        sleep 0.1
    done
    [ "$ok" = 1 ] || fail "$dev not ACTIVE with GIDs 0 and 1 (state '$state', gid0 '$g0', gid1 '$g1')"
    step "$dev ACTIVE gid0 $g0 gid1 $g1"
done

ls /dev/infiniband/uverbs* >/dev/null 2>&1 || fail "no /dev/infiniband/uverbs*"
step "ready: $(ls /dev/infiniband | tr '\n' ' ')"
