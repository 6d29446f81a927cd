#!/usr/bin/env bash
# Idempotent setup: a Python virtual environment with PyPI's torch==2.11.0 (which carries libtorch 2.11.0) and
# the nvidia-cuda-crt headers the CUDA graph shim needs, in a per-user cache folder, reused by every clone and
# CI run on this machine.
# Source it (`. scripts/setup.sh`) to get the environment torch-sys needs, or run it to just install.
# SDSTREAM_TOOLS=1 also installs the Python reference libraries used by tools/ (diffusers, transformers).
set -euo pipefail
SDSTREAM_CACHE="${SDSTREAM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sdstream}"
SDSTREAM_VENV="${SDSTREAM_VENV:-$SDSTREAM_CACHE/venv-torch-2.11.0}"
TORCH_VERSION="2.11.0"

_sdstream_py() { "$SDSTREAM_VENV/bin/python" "$@"; }

if ! [ -x "$SDSTREAM_VENV/bin/python" ] || ! _sdstream_py -c "import torch,sys; sys.exit(0 if torch.__version__.startswith('$TORCH_VERSION') else 1)" 2>/dev/null; then
  echo "sdstream setup: installing torch==$TORCH_VERSION into $SDSTREAM_VENV (once per machine, about 2 minutes)" >&2
  mkdir -p "$SDSTREAM_CACHE"
  python3 -m venv "$SDSTREAM_VENV"
  _sdstream_py -m pip install --quiet --upgrade pip
  _sdstream_py -m pip install --quiet "torch==$TORCH_VERSION"
fi

if [ "${SDSTREAM_TOOLS:-0}" = "1" ] && ! _sdstream_py -c "import diffusers, transformers, safetensors, PIL" 2>/dev/null; then
  echo "sdstream setup: installing the Python reference libraries for tools/" >&2
  _sdstream_py -m pip install --quiet "diffusers==0.42.1" "transformers" "safetensors" "pillow" "accelerate" "peft"
fi

SDSTREAM_TORCH_LIB="$(_sdstream_py -c 'import torch,os;print(os.path.join(os.path.dirname(torch.__file__),"lib"))')"

# The CUDA graph shim (csrc/cuda_graph.cpp, built by build.rs on every machine) includes cuda_runtime.h, which
# needs crt/host_config.h: torch's nvidia wheels lack it, the small nvidia-cuda-crt wheel (CUDA 13.0, as
# torch 2.11.0's) puts it into site-packages/nvidia/cu13/include/crt/, beside the other CUDA headers.
if ! [ -f "$SDSTREAM_TORCH_LIB/../../nvidia/cu13/include/crt/host_config.h" ]; then
  echo "sdstream setup: installing nvidia-cuda-crt==13.0.* (CUDA headers for the CUDA graph shim) into $SDSTREAM_VENV" >&2
  _sdstream_py -m pip install --quiet "nvidia-cuda-crt==13.0.*"
fi

export PATH="$SDSTREAM_VENV/bin:$PATH"
export LIBTORCH_USE_PYTORCH=1
export LIBTORCH_BYPASS_VERSION_CHECK="${LIBTORCH_BYPASS_VERSION_CHECK:-0}"
export SDSTREAM_TORCH_LIB
