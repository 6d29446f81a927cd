#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what the tests need (PyPI torch 2.11.0 for libtorch,
# cached per user; Debian's chromium and libclang-dev; npm's playwright-core), builds, and runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
[ -n "$(ls /usr/lib/llvm-*/lib/libclang*.so* 2>/dev/null)" ] || need_apt+=(libclang-dev)
command -v node >/dev/null 2>&1 || need_apt+=(nodejs npm)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "sdstream tests: installing ${need_apt[*]} (Debian packages)" >&2
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
if [ ! -d tests/e2e/node_modules/playwright-core ]; then
  echo "sdstream tests: installing playwright-core (npm) for the browser test" >&2
  (cd tests/e2e && npm install --no-audit --no-fund --silent)
fi

. scripts/setup.sh
cargo test --no-fail-fast --features camera --all-targets "$@"
