#!/usr/bin/env bash
# The main job on a fresh machine: installs libtorch (PyPI torch 2.11.0, cached per user), builds sdstream and
# starts the daemon on the bundled random-weight TEST model: open http://127.0.0.1:8765/ in a browser.
# Arguments replace the default command, e.g. `scripts/run.sh serve --config configs/sd-turbo.toml`
# or `scripts/run.sh txt2img --model stabilityai/sd-turbo --prompt "a fox" --steps 1 --scheduler euler ...`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
if [ "$#" -eq 0 ]; then
  set -- serve --config configs/tiny.toml
fi
. scripts/deps.sh
# The JPEG encoder (libjpeg-turbo, built from the turbojpeg crate's sources) needs cmake and nasm to build.
needs=(cmake nasm)
features=()
case "$1" in
  webcam|cameras)
    # Camera support (nokhwa's V4L2 bindings) needs libclang to build.
    needs+=(libclang)
    features=(--features camera) ;;
esac
sdstream_ensure "${needs[@]}"
cargo build --release --quiet "${features[@]}"
exec target/release/sdstream "$@"
