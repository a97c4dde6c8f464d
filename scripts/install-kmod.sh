#!/usr/bin/env bash
# scripts/install-kmod.sh: installs the kmod-notifier kernel module (/dev/umm_notify) with
# DKMS, so it is rebuilt for every new kernel, plus its udev rule (device mode 0660, group
# "umm", created here) and its modprobe.d file. Run as root.
#
#   sudo scripts/install-kmod.sh                  # for the running kernel, then: modprobe umm_notify
#   sudo scripts/install-kmod.sh --kernel 6.1.0-57-amd64
#   sudo scripts/install-kmod.sh --uninstall      # dkms remove + the files installed here
#   --no-system-config   only the DKMS part (no group, udev rule or modprobe.d file); CI uses it
#
# Needs: dkms and the headers of the target kernel (Debian: apt-get install dkms
# linux-headers-amd64). `make -C kmod-notifier install` runs this script.
# Idempotent: an earlier installation of the same version is removed first.
set -euo pipefail
repo="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)"
src="$repo/kmod-notifier"

kver="$(uname -r)"
uninstall=0
system=1
while [ $# -gt 0 ]; do
    case "$1" in
        --kernel) kver="$2"; shift 2 ;;
        --uninstall) uninstall=1; shift ;;
        --no-system-config) system=0; shift ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "install-kmod: unknown argument $1" >&2; exit 2 ;;
    esac
done

[ "$(id -u)" = 0 ] || { echo "install-kmod: run as root (sudo $0)" >&2; exit 1; }
command -v dkms >/dev/null || { echo "install-kmod: dkms not found (apt-get install dkms)" >&2; exit 1; }

name="$(sed -n 's/^PACKAGE_NAME="\(.*\)"$/\1/p' "$src/dkms.conf")"
ver="$(sed -n 's/^PACKAGE_VERSION="\(.*\)"$/\1/p' "$src/dkms.conf")"
dest="/usr/src/$name-$ver"
rules=/etc/udev/rules.d/99-umm-notify.rules
conf=/etc/modprobe.d/umm_notify.conf

remove_dkms() {
    if dkms status -m "$name" -v "$ver" 2>/dev/null | grep -q .; then
        dkms remove -m "$name" -v "$ver" --all >&2 || true
    fi
    rm -rf "$dest"
}

if [ "$uninstall" = 1 ]; then
    remove_dkms
    if [ "$system" = 1 ]; then
        cmp -s "$src/udev/99-umm-notify.rules" "$rules" && rm -f "$rules"
        cmp -s "$src/modprobe.d/umm_notify.conf" "$conf" && rm -f "$conf"
    fi
    echo "install-kmod: removed $name $ver"
    exit 0
fi

[ -d "/lib/modules/$kver/build" ] || {
    echo "install-kmod: no headers for kernel $kver in /lib/modules/$kver/build (apt-get install linux-headers-$kver)" >&2
    exit 1
}

remove_dkms
mkdir -p "$dest/include/uapi/linux"
cp "$src/dkms.conf" "$src/Kbuild" "$src/Makefile" "$src/umm_notify.c" "$dest/"
cp "$src/include/uapi/linux/umm_notify.h" "$dest/include/uapi/linux/"
dkms add -m "$name" -v "$ver" >&2
dkms build -m "$name" -v "$ver" -k "$kver" >&2
dkms install -m "$name" -v "$ver" -k "$kver" >&2

if [ "$system" = 1 ]; then
    getent group umm >/dev/null || groupadd --system umm
    install -m 0644 "$src/udev/99-umm-notify.rules" "$rules"
    [ -e "$conf" ] || install -m 0644 "$src/modprobe.d/umm_notify.conf" "$conf"
    if command -v udevadm >/dev/null && [ -d /run/udev ]; then
        udevadm control --reload || true
        [ -e /dev/umm_notify ] && udevadm trigger --name-match=umm_notify || true
    fi
    echo "install-kmod: group umm, $rules and $conf installed; add users with: usermod -aG umm <user>"
fi
echo "install-kmod: $name $ver installed for kernel $kver ($(modinfo -k "$kver" -n "$name"))"
echo "install-kmod: load it with: modprobe $name"
