#!/usr/bin/env bash
# scripts/check-package.sh: every library crate can be packaged and published, and umm can
# be depended on from a project outside this workspace. Nothing is uploaded.
#
# Usage: scripts/check-package.sh [--quick]
#   --quick   skip the verification builds of step 3 (`cargo package --no-verify`)
#
# 1. Manifests (cargo metadata): each library crate has description, license, a real
#    repository URL, readme, keywords, categories and docs.rs metadata, and a version on
#    every path dependency; every other member (demos, benches, coverage, torture...) has
#    `publish = false`.
# 2. umm/Cargo.toml spells out what the others inherit from [workspace.package] and
#    [workspace.lints] (so a copy of umm/ alone builds): the values must match.
# 3. `cargo package --workspace` of the library crates. Why the whole workspace at once:
#    packaging one crate alone verifies it by building the .crate against crates.io, where
#    its unpublished path dependencies (umm for every other crate) do not exist, so it
#    fails. Packaged together, cargo verifies each .crate against the others through a
#    temporary local registry, exactly as crates.io will see them once published in
#    dependency order (umm first). Each verification is a full build of the crate from
#    its .crate (no hardware is needed: the backends load their drivers at run time).
# 4. `cargo publish --dry-run --workspace` of the same crates (`--no-verify`: step 3 built
#    them): the upload checks crates.io would make, without uploading.
# 5. A fresh project outside the workspace (in a temporary directory) builds and runs
#    against umm three ways: a path dependency on this checkout's umm/, a path dependency
#    on a copy of umm/ alone, and the unpacked umm .crate from step 3.
# The working tree may be dirty (a developer's checkout): then --allow-dirty is passed and
# the script says so; CI's fresh clone is clean.
# Closing line: `N passed, N failed`; exits non-zero if anything failed.
set -euo pipefail

repo="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)"
cd "$repo"

quick=0
[ "${1:-}" = "--quick" ] && quick=1

libs=(umm umm-rdma umm-cuda umm-vulkan umm-uffd umm-interpose umm-preload umm-kmod umm-auto umm-capi umm-fabric umm-ucx)
passed=0
failed=0
step() { # name command...
    local name="$1"
    shift
    printf '\n=== %s\n' "$name"
    if "$@"; then
        passed=$((passed + 1))
    else
        echo "!!! FAILED: $name"
        failed=$((failed + 1))
    fi
}

dirty=()
if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
    echo "note: the working tree has uncommitted changes: packaging with --allow-dirty"
    dirty=(--allow-dirty)
fi

check_manifests() {
    cargo metadata --no-deps --format-version 1 --locked | python3 -c '
import json, sys
libs = set(sys.argv[1].split())
meta = json.load(sys.stdin)
members = set(meta["workspace_members"])
bad = []
seen = set()
for p in meta["packages"]:
    if p["id"] not in members:
        continue
    name = p["name"]
    publishable = p["publish"] is None or p["publish"] != []
    if name not in libs:
        if publishable:
            bad.append(f"{name}: not a library crate but publishable (add publish = false)")
        continue
    seen.add(name)
    if not publishable:
        bad.append(f"{name}: library crate with publish = false")
    for field in ["description", "license", "repository", "readme"]:
        if not p.get(field):
            bad.append(f"{name}: no {field}")
    if "example.invalid" in (p.get("repository") or ""):
        bad.append(name + ": placeholder repository " + p["repository"])
    if not p.get("keywords"):
        bad.append(f"{name}: no keywords")
    if not p.get("categories"):
        bad.append(f"{name}: no categories")
    if len(p.get("keywords") or []) > 5:
        bad.append(f"{name}: more than 5 keywords")
    if not ((p.get("metadata") or {}).get("docs") or {}).get("rs"):
        bad.append(f"{name}: no [package.metadata.docs.rs]")
    for d in p["dependencies"]:
        if d.get("path") and d.get("kind") != "dev" and d.get("req") in (None, "*"):
            bad.append(name + ": path dependency " + d["name"] + " has no version")
for missing in sorted(libs - seen):
    bad.append(f"{missing}: library crate not in the workspace")
for b in bad:
    print("  " + b)
print(f"  {len(seen)} library crates, {len(members) - len(seen)} unpublished members checked")
sys.exit(1 if bad else 0)
' "${libs[*]}"
}

check_umm_literals() {
    python3 - <<'PY'
import sys, tomllib
ws = tomllib.load(open("Cargo.toml", "rb"))
umm = tomllib.load(open("umm/Cargo.toml", "rb"))
bad = []
for k, v in ws["workspace"]["package"].items():
    if k == "readme":
        continue  # umm points at ../README.md itself
    if umm["package"].get(k) != v:
        bad.append(f"umm/Cargo.toml package.{k} = {umm['package'].get(k)!r}, workspace has {v!r}")
if umm.get("lints") != ws["workspace"]["lints"]:
    bad.append(f"umm/Cargo.toml [lints] {umm.get('lints')!r} != [workspace.lints] {ws['workspace']['lints']!r}")
for b in bad:
    print("  " + b)
sys.exit(1 if bad else 0)
PY
}

package_args=()
for l in "${libs[@]}"; do package_args+=(-p "$l"); done

package() {
    local verify=()
    [ "$quick" = 1 ] && verify=(--no-verify)
    cargo package "${package_args[@]}" --locked "${dirty[@]}" "${verify[@]}"
    local target="${CARGO_TARGET_DIR:-$repo/target}"
    for l in "${libs[@]}"; do
        local crate="$target/package/$l-$(cargo pkgid -p "$l" | sed 's/.*[#@]//').crate"
        [ -f "$crate" ] || { echo "  missing $crate"; return 1; }
        # Both licence texts and a readme travel with every crate.
        local files f
        files="$(tar -tzf "$crate")"
        for f in LICENSE-MIT LICENSE-APACHE README.md; do
            grep -qx "[^/]*/$f" <<<"$files" || { echo "  $l: no $f in the .crate"; return 1; }
        done
    done
    echo "  ${#libs[@]} .crate files with LICENSE-MIT, LICENSE-APACHE and README.md"
}

publish_dry_run() {
    local log rc=0
    log="$(mktemp)"
    cargo publish "${package_args[@]}" --dry-run --no-verify --locked "${dirty[@]}" 2>&1 | tee "$log" || rc=1
    # A dry run only warns when a name is taken; the real upload would be refused.
    if grep -q 'already exists on crates.io index' "$log"; then
        echo "  NOTE: $(grep -o 'crate [^ ]* already exists on crates.io index' "$log" | sort -u | paste -sd ';' -)"
        echo "  (a name owned by someone else on crates.io: publishing needs another package name)"
    fi
    rm -f "$log"
    return "$rc"
}

outside_project() {
    local tmp version crate
    tmp="$(mktemp -d)"
    # shellcheck disable=SC2064
    trap "rm -rf '$tmp'" RETURN
    version="$(cargo pkgid -p umm | sed 's/.*[#@]//')"
    crate="${CARGO_TARGET_DIR:-$repo/target}/package/umm-$version.crate"
    mkdir -p "$tmp/vendor"
    cp -r umm "$tmp/vendor/umm-copy"
    rm -rf "$tmp/vendor/umm-copy/target"
    tar -xzf "$crate" -C "$tmp/vendor"
    local main='fn main() {
    let manager = umm::Manager::default();
    let nic = manager.attach(umm::testing::RecordingBackend::new("nic")).unwrap();
    let buf = vec![0u8; 1 << 16];
    let range = umm::Range::of_slice(&buf).unwrap();
    drop(manager.pin(range, &[nic.id()]).unwrap());
    let pin = manager.pin(range, &[nic.id()]).unwrap();
    assert!(pin.is_valid());
    let stats = manager.stats();
    assert_eq!((stats.hits(), stats.misses()), (1, 1));
    println!("outside project: umm works (hits {}, misses {})", stats.hits(), stats.misses());
}'
    local how path ok=0
    for how in checkout copy crate; do
        case "$how" in
            checkout) path="$repo/umm" ;;
            copy) path="$tmp/vendor/umm-copy" ;;
            crate) path="$tmp/vendor/umm-$version" ;;
        esac
        rm -rf "$tmp/app"
        cargo new --quiet --vcs none "$tmp/app"
        printf 'umm = { path = "%s" }\n' "$path" >>"$tmp/app/Cargo.toml"
        printf '%s\n' "$main" >"$tmp/app/src/main.rs"
        echo "  [$how] umm = { path = \"$path\" }"
        if (cd "$tmp/app" && CARGO_TARGET_DIR="$tmp/target" cargo run --quiet); then
            :
        else
            echo "  [$how] FAILED"
            ok=1
        fi
    done
    return "$ok"
}

step "manifests: metadata of library crates, publish = false elsewhere" check_manifests
step "umm/Cargo.toml literals match [workspace.package] and [workspace.lints]" check_umm_literals
if [ "$quick" = 1 ]; then
    step "cargo package --no-verify (library crates)" package
else
    step "cargo package (library crates, each verified by a build of its .crate)" package
fi
step "cargo publish --dry-run (library crates)" publish_dry_run
step "a project outside the workspace depends on umm (checkout, copy of umm/, .crate)" outside_project

printf '\n%s passed, %s failed\n' "$passed" "$failed"
[ "$failed" = 0 ]
