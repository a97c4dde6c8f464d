# shellcheck shell=bash
# Sourced by the scripts that run cargo-built binaries in the guest (scripts/demo.sh,
# scripts/test-rdma.sh); expects $repo (the repository root) to be set.

# Exports CARGO_TARGET_DIR (default <repo>/target) after checking the guest can see it:
# scripts/vm keeps the repository visible, but /tmp, /var/tmp and /run are tmpfs there.
guest_target_dir() {
    local target="${CARGO_TARGET_DIR:-$repo/target}"
    case "$target" in
        "$repo"/*) ;;
        /tmp/* | /var/tmp/* | /run/*)
            echo "$0: CARGO_TARGET_DIR=$target is invisible in the guest (tmpfs there)" >&2
            exit 2
            ;;
    esac
    export CARGO_TARGET_DIR="$target"
}

# Builds kmod-notifier for the kernel scripts/vm boots and exports UMM_VM_KERNEL; without
# it (no headers, build failure) only the kernel-module row is skipped, as $1 says.
build_kmod_optional() {
    local kver
    if kver="$(bash "$repo/scripts/build-kmod.sh")"; then
        export UMM_VM_KERNEL="$kver"
    else
        rm -f "$repo/kmod-notifier/umm_notify.ko"
        echo "warning: kmod-notifier not built: $1 will be skipped" >&2
    fi
}
