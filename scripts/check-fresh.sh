#!/usr/bin/env bash
# Proves the README's two commands on a fresh machine, the hard way: removes what scripts/test.sh and
# scripts/run.sh install (Debian's cmake, nasm, libclang-dev, chromium, haproxy, nginx, nodejs and npm, with the packages they
# pulled in; the per-user cache ~/.cache/sdstream with the torch venv and any npm-installed Node.js; the
# browser test's node_modules), clones this repository's HEAD into a scratch folder, and runs
# `scripts/test.sh` there with CI=true, then `scripts/run.sh` until the daemon's /health answers. Times both.
#
#   scripts/check-fresh.sh --purge [SCRATCH_DIR]
#
# --purge is required because it uninstalls system packages (root or sudo). The scratch clone is kept, so its
# target/ can be reused afterwards. Exit status: that of the test run, or 1 when the daemon never got healthy.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
if [ "${1:-}" != "--purge" ]; then
  sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
scratch="${2:-$(mktemp -d /tmp/sdstream-fresh.XXXXXX)}"
sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
. scripts/deps.sh

echo "== removing what the scripts install" >&2
# Only the packages that are installed: purging a missing one is an error for apt.
to_purge=()
for pkg in cmake nasm libclang-dev chromium haproxy nginx nodejs npm; do
  sdstream_deb_installed "$pkg" && to_purge+=("$pkg")
done
if [ ${#to_purge[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive $sudo apt-get purge -y -qq "${to_purge[@]}" >/dev/null
fi
DEBIAN_FRONTEND=noninteractive $sudo apt-get autoremove --purge -y -qq >/dev/null
rm -rf "${SDSTREAM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sdstream}"
rm -rf tests/e2e/node_modules
for need in cmake nasm libclang chromium node npm; do
  missing=$(sdstream_missing_for "$need")
  if [ -n "$missing" ]; then
    echo "   $need: missing (the scripts will install $missing)" >&2
  else
    echo "   $need: still present" >&2
  fi
done

echo "== fresh clone of HEAD into $scratch" >&2
rm -rf "$scratch"
git clone --quiet --no-hardlinks "$repo" "$scratch"
cd "$scratch"

start=$(date +%s)
status=0
CI=true scripts/test.sh || status=$?
test_s=$(( $(date +%s) - start ))
echo "== scripts/test.sh: exit $status after ${test_s} s" >&2

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
start=$(date +%s)
CI=true scripts/run.sh serve --config configs/tiny.toml --listen "127.0.0.1:$port" >run.log 2>&1 &
run_pid=$!
healthy=0
for _ in $(seq 1 1800); do
  if python3 -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$port/health', timeout=2)" 2>/dev/null; then
    healthy=1; break
  fi
  kill -0 "$run_pid" 2>/dev/null || break
  sleep 1
done
run_s=$(( $(date +%s) - start ))
pkill -TERM -P "$run_pid" 2>/dev/null || true
kill -TERM "$run_pid" 2>/dev/null || true
wait "$run_pid" 2>/dev/null || true
if [ "$healthy" = 1 ]; then
  echo "== scripts/run.sh: /health answered after ${run_s} s (build included)" >&2
else
  echo "== scripts/run.sh: the daemon never answered /health (${run_s} s); its log:" >&2
  tail -n 30 run.log >&2
  [ "$status" -ne 0 ] || status=1
fi
echo "== check-fresh: test.sh ${test_s} s (exit $status), run.sh to healthy ${run_s} s; clone kept in $scratch" >&2
exit "$status"
