#!/usr/bin/env bash
# scripts/test-capi.sh: the C API (capi/, libumm) tested from C, as a C project uses it.
#
# Usage: scripts/test-capi.sh [--host-only]
#
# On the host:
#   1. cargo test -p umm-capi: include/umm.h is what cbindgen generates from the source.
#   2. capi/tests/c/test_callbacks.c (callback devices: hit, invalidate, re-register, errors,
#      two devices, destroy with a pin held, threads, fork) and capi/tests/c/test_vulkan.c
#      (a VkDevice the program created, on lavapipe) compiled with cc -Werror against umm.h
#      and linked twice: with libumm.so and with libumm.a; all run. capi/tests/c/test_cuda.c
#      (a CUcontext; without a driver only the missing-driver error) with libumm.so.
#   3. scripts/install-capi.sh into a temporary prefix, then capi/examples/hello_umm.c
#      built from a fresh directory with `pkg-config --cflags --libs umm` and run.
# In the guest (skipped with --host-only or UMM_SKIP_GUEST=1): capi/tests/c/test_verbs.c
# (a struct ibv_pd * the program allocated itself, on Soft-RoCE rxe0, MR counts checked
# against `rdma resource show`), shared and static, after scripts/rxe-setup.sh. A SKIP in
# the guest counts as a failure (rxe was set up).
# Closing line: `N passed, N failed` (C checks + steps); exits non-zero if anything failed.
set -euo pipefail

repo="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)"
cd "$repo"

# Adds a C program's "N passed, N failed" line (or one failure if it has none) to the totals.
passed=0
failed=0
count() {
    local log="$1" rc="$2" line
    line="$(grep -E '^[0-9]+ passed, [0-9]+ failed$' "$log" | tail -1 || true)"
    if [ -z "$line" ]; then
        echo "!!! $(basename "$log" .log) exited $rc without a result line"
        failed=$((failed + 1))
        return
    fi
    passed=$((passed + ${line%% passed*}))
    local f="${line#*, }"
    failed=$((failed + ${f%% failed}))
    if grep -q '^SKIP' "$log"; then
        echo "!!! $(basename "$log" .log) skipped"
        failed=$((failed + 1))
    fi
    if [ "$rc" != 0 ] && [ "${f%% failed}" = 0 ]; then failed=$((failed + 1)); fi
}

run() { # name command...: runs a C test binary, prints and counts its output
    local name="$1" log
    shift
    log="$out/$name.log"
    echo "=== $name"
    set +e
    "$@" >"$log" 2>&1
    local rc=$?
    set -e
    cat "$log"
    count "$log" "$rc"
}

if [ "${1:-}" = "--in-guest" ]; then
    out="${UMM_VM_OUT:?not in scripts/vm}"
    bin="$2"
    if ! scripts/rxe-setup.sh; then
        echo "rxe setup failed"
        echo "0 passed, 1 failed"
        exit 1
    fi
    run test_verbs_shared "$bin/test_verbs_shared"
    run test_verbs_static "$bin/test_verbs_static"
    echo "$passed passed, $failed failed"
    [ "$failed" = 0 ]
    exit
fi

host_only=0
[ "${1:-}" = "--host-only" ] && host_only=1
[ "${UMM_SKIP_GUEST:-0}" = 1 ] && host_only=1

# shellcheck source=scripts/guest-env.sh
. "$repo/scripts/guest-env.sh"
guest_target_dir
target="$CARGO_TARGET_DIR"
mkdir -p "$target"
out="$(mktemp -d "$target/capi-test.XXXXXX")"
trap 'rm -rf "$out"' EXIT
cflags=(-std=c11 -Wall -Wextra -Werror -g -Icapi/include)

step() { # name command...: a build/check step that counts as one pass or failure
    local name="$1"
    shift
    echo "=== $name"
    if "$@"; then passed=$((passed + 1)); else echo "!!! $name failed"; failed=$((failed + 1)); fi
}

echo "building libumm (debug)..."
cargo build -p umm-capi --locked
# libumm.so as installed: the library and its SONAME link, in one directory.
lib="$out/lib"
mkdir -p "$lib"
soname="$(readelf -d "$target/debug/libumm.so" | sed -n 's/.*Library soname: \[\(.*\)\]/\1/p')"
ln -s "$target/debug/libumm.so" "$lib/libumm.so"
ln -s "$target/debug/libumm.so" "$lib/${soname:?libumm.so has no SONAME}"
cp "$target/debug/libumm.a" "$lib/libumm.a"
native="$(cargo rustc -p umm-capi --lib --crate-type staticlib --locked -- --print native-static-libs 2>&1 |
    sed -n 's/.*native-static-libs: //p' | tail -1)"
read -r -a native_libs <<<"${native:--lgcc_s -lutil -lrt -lpthread -lm -ldl -lc}"

step "header is current (cargo test -p umm-capi)" cargo test -p umm-capi --locked

build_shared() { cc "${cflags[@]}" "$1" -L"$lib" -Wl,-rpath,"$lib" -lumm "${@:3}" -o "$2"; }
build_static() { cc "${cflags[@]}" "$1" "$lib/libumm.a" "${@:3}" "${native_libs[@]}" -o "$2"; }

step "cc test_callbacks.c (shared)" build_shared capi/tests/c/test_callbacks.c "$out/test_callbacks_shared" -lpthread
step "cc test_callbacks.c (static)" build_static capi/tests/c/test_callbacks.c "$out/test_callbacks_static" -lpthread
[ -x "$out/test_callbacks_shared" ] && run test_callbacks_shared "$out/test_callbacks_shared"
[ -x "$out/test_callbacks_static" ] && run test_callbacks_static "$out/test_callbacks_static"

# A Vulkan device the program created (lavapipe here; scripts/setup.sh installs it and
# libvulkan-dev). A SKIP (no driver) counts as a failure, as in scripts/test.sh.
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"
export UMM_REQUIRE_VULKAN=1
step "cc test_vulkan.c (shared)" build_shared capi/tests/c/test_vulkan.c "$out/test_vulkan_shared" -lvulkan
step "cc test_vulkan.c (static)" build_static capi/tests/c/test_vulkan.c "$out/test_vulkan_static" -lvulkan
[ -x "$out/test_vulkan_shared" ] && run test_vulkan_shared "$out/test_vulkan_shared"
[ -x "$out/test_vulkan_static" ] && run test_vulkan_static "$out/test_vulkan_static"

# A CUcontext the program owns: without a CUDA driver only the missing-driver error is
# checked (the program prints a note); with one, the GPU part runs.
step "cc test_cuda.c (shared)" build_shared capi/tests/c/test_cuda.c "$out/test_cuda_shared" -ldl
[ -x "$out/test_cuda_shared" ] && run test_cuda_shared "$out/test_cuda_shared"

# A fresh C project: install into a prefix, build the example with pkg-config elsewhere.
prefix="$out/prefix"
fresh="$out/fresh-project"
mkdir -p "$fresh"
cp capi/examples/hello_umm.c "$fresh/"
example() {
    scripts/install-capi.sh "$prefix" --debug >"$out/install.log" 2>&1 || { cat "$out/install.log"; return 1; }
    (
        cd "$fresh"
        export PKG_CONFIG_PATH="$prefix/lib/pkgconfig"
        # shellcheck disable=SC2046
        cc -std=c11 -Wall -Wextra -Werror hello_umm.c $(pkg-config --cflags --libs umm) \
            -Wl,-rpath,"$prefix/lib" -o hello_umm
        ./hello_umm | tee run.log
        grep -q '^hits 1, misses 2, registrations 2, deregistrations 1$' run.log
    )
}
step "install + pkg-config build of capi/examples/hello_umm.c in a fresh directory" example

if [ "$host_only" = 0 ]; then
    if [ -f /usr/include/infiniband/verbs.h ]; then
        step "cc test_verbs.c (shared)" build_shared capi/tests/c/test_verbs.c "$out/test_verbs_shared" -libverbs
        step "cc test_verbs.c (static)" build_static capi/tests/c/test_verbs.c "$out/test_verbs_static" -libverbs
        echo "=== guest: verbs on Soft-RoCE"
        set +e
        scripts/vm --timeout 600 --out "$out" -- "$repo/scripts/test-capi.sh" --in-guest "$out" 2>&1 | tee "$out/console.log"
        set -e
        count "$out/console.log" 0
    else
        echo "!!! /usr/include/infiniband/verbs.h missing (scripts/setup.sh installs libibverbs-dev)"
        failed=$((failed + 1))
    fi
else
    echo "(guest verbs test skipped: --host-only / UMM_SKIP_GUEST=1)"
fi

echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
