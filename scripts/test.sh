#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what the tests need (PyPI torch 2.11.0 for libtorch,
# cached per user; Debian's cmake, nasm, chromium and libclang-dev; npm's playwright-core), builds, and runs
# every test.
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/deps.sh
sdstream_ensure cmake nasm libclang chromium node npm
# playwright-core (the browser test) needs Node.js 20 or newer.
sdstream_ensure_node_major 20
if [ ! -d tests/e2e/node_modules/playwright-core ]; then
  echo "sdstream tests: installing playwright-core (npm) for the browser test" >&2
  (cd tests/e2e && npm install --no-audit --no-fund --silent)
fi

. scripts/setup.sh
status=0
cargo test --no-fail-fast --features camera,fault-injection --all-targets "$@" || status=$?
# The documentation tests: among them, that captured work cannot capture a stray tensor (src/graph/mod.rs).
cargo test --features camera,fault-injection --doc || status=$?
exit $status
