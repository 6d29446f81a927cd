#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs libtorch (PyPI torch 2.11.0, cached per user), builds, tests.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
cargo test --all-targets "$@"
