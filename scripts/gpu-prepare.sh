#!/usr/bin/env bash
# Stages .gpu/ for scripts/gpu-bench.sh: the release binary, the captured-tick test binary, the commit it was built from, the diffusers eager
# anchor script, and the two wheels it needs on the GPU machine (diffusers, importlib_metadata; torch and
# transformers are already there). .gpu/ is ignored by git (.git/info/exclude) and travels as `carry`.
# The exact device call to make is in docs/BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
. scripts/deps.sh
sdstream_ensure cmake nasm
cargo build --release
mkdir -p .gpu/wheels
cp target/release/sdstream .gpu/sdstream
# The captured-tick tests (tests/graph.rs), run on the GPU with real CUDA graphs against the eager tick and the
# StreamDiffusion fixtures (the fixtures travel with the working tree).
graph_tests=$(cargo test --release --test graph --no-run 2>&1 | sed -n 's/.*Executable.*(\(target\/release\/deps\/graph-[0-9a-f]*\)).*/\1/p' | tail -1)
[ -n "$graph_tests" ] || { echo "could not build the graph tests" >&2; exit 1; }
cp "$graph_tests" .gpu/graph-tests
commit="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then commit="$commit-dirty"; fi
echo "$commit" > .gpu/COMMIT
anchor="${SDSTREAM_ANCHOR:-../shared/anchor/diffusers_eager.py}"
install -m 0644 "$anchor" .gpu/diffusers_eager.py
# The GPU machine runs Python 3.12 (manylinux x86-64); both wheels are pure Python.
if ! ls .gpu/wheels/diffusers-0.42.1-*.whl >/dev/null 2>&1 || ! ls .gpu/wheels/importlib_metadata-*.whl >/dev/null 2>&1; then
  python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .gpu/wheels \
    "diffusers==0.42.1" "importlib_metadata"
fi
exclude=.git/info/exclude
mkdir -p "$(dirname "$exclude")"
grep -qx '/.gpu/' "$exclude" 2>/dev/null || echo '/.gpu/' >> "$exclude"
du -sh .gpu
ls -l .gpu .gpu/wheels
