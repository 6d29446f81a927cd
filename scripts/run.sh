#!/usr/bin/env bash
# The main job on a fresh machine: installs libtorch (cached per user), builds sdstream and runs it on the
# bundled random-weight TEST model. Pass a different --model (a diffusers folder or a Hugging Face id) for real
# weights; any arguments given replace the defaults below.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
cargo build --release --quiet
if [ "$#" -eq 0 ]; then
  set -- txt2img --model models/tiny-sd-test --prompt "a watercolor fox in the snow" --seed 42 --steps 4 \
    --scheduler euler --guidance 1.0 --width 256 --height 256 --device auto --output out/txt2img.png
  mkdir -p out
fi
exec target/release/sdstream "$@"
