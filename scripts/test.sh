#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what the tests need (PyPI torch 2.11.0 for libtorch,
# cached per user; Debian's cmake, nasm, chromium, haproxy, nginx and libclang-dev; npm's playwright-core;
# PyPI's kubernetes-validate for deploy/kubernetes.yaml), builds, and runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/deps.sh
sdstream_ensure cmake nasm libclang chromium haproxy nginx node npm
# playwright-core (the browser test) needs Node.js 20 or newer.
sdstream_ensure_node_major 20
if [ ! -d tests/e2e/node_modules/playwright-core ]; then
  echo "sdstream tests: installing playwright-core (npm) for the browser test" >&2
  (cd tests/e2e && npm install --no-audit --no-fund --silent)
fi

. scripts/setup.sh
# The Kubernetes schema check of deploy/kubernetes.yaml (tests/scale_out.rs), offline, in the same venv.
if ! command -v kubernetes-validate >/dev/null 2>&1; then
  echo "sdstream tests: installing kubernetes-validate (PyPI) for the deploy/kubernetes.yaml check" >&2
  python -m pip install --quiet "kubernetes-validate==1.37.0"
fi
status=0
cargo test --no-fail-fast --features camera,fault-injection --all-targets "$@" || status=$?
# The documentation tests: among them, that captured work cannot capture a stray tensor (src/graph/mod.rs).
cargo test --features camera,fault-injection --doc || status=$?
exit $status
