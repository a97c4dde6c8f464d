#!/usr/bin/env bash
# Builds the CUDA backend's tests and its cost measurement here (release, stripped) into
# one folder for a GPU machine that has the NVIDIA driver but no Rust toolchain:
#
#   bash backends/cuda/gpu-bundle.sh target/cuda-gpu-bundle     # here
#   bash target/cuda-gpu-bundle/run.sh                           # on the GPU machine
#
# run.sh runs every test binary with UMM_REQUIRE_CUDA=1 (a missing GPU fails instead of
# skipping) and --nocapture, then the register/hit measurement.
set -euo pipefail
cd "$(dirname "$0")/../.."
dir="${1:?usage: gpu-bundle.sh DIR (inside the repository, git-ignored)}"
rm -rf "$dir"
mkdir -p "$dir"
target="${CARGO_TARGET_DIR:-target}"

cargo test --release -p umm-cuda --no-run --message-format=json \
    | grep -o '"executable":"[^"]*"' | grep -v '/examples/' | sed 's/"executable":"\(.*\)"/\1/' \
    | while read -r exe; do
        name="$(basename "$exe")"
        cp "$exe" "$dir/test-${name%-*}"
    done
cargo build --release -p umm-cuda --example register_cost
cp "$target/release/examples/register_cost" "$dir/register_cost"
strip "$dir"/* 2>/dev/null || true

cat > "$dir/run.sh" <<'RUN'
#!/usr/bin/env bash
# Runs the bundled CUDA tests and measurement (see backends/cuda/gpu-bundle.sh).
cd "$(dirname "$0")"
export UMM_REQUIRE_CUDA=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true
rc=0
for t in ./test-*; do
    echo "== $t"
    "$t" --nocapture || rc=1
done
echo "== register_cost"
./register_cost || rc=1
exit $rc
RUN
chmod +x "$dir/run.sh"
du -sh "$dir"
ls -l "$dir"
