#!/usr/bin/env bash
# The prepared GPU benchmark of issue 5 (docs/BENCHMARKS.md has the exact device call). Runs from the
# repository root on the GPU machine with .gpu/ carried (scripts/gpu-prepare.sh stages it here):
#   1. sdstream bench on a random-weight benchmark model at SD-Turbo's architecture: 512x512, fp16, TAESD,
#      1 stage, one stream and 4 concurrent streams (components + end to end);
#   2. the same at SD 1.5's architecture with 4 stages (LCM), one stream;
#   3. the diffusers eager baseline (../shared/anchor/diffusers_eager.py, staged as .gpu/diffusers_eager.py)
#      in the same call, on the same card;
# writes everything under $OUT and prints a short comparison table last.
#
#   0. tests/graph.rs with SDSTREAM_TEST_DEVICE=cuda: the captured tick with real CUDA graphs, fp32, on the tiny
#      TEST models, against the eager tick and the StreamDiffusion fixtures (.gpu/graph-tests);
# SDSTREAM_GPU_BENCH_TINY=1 shrinks it to a CPU check (the bundled tiny configs as the random-weight model,
# 64x64, a few frames; the anchor is replaced by an import check of its carried wheels): `OUT=/tmp/gb SDSTREAM_GPU_BENCH_TINY=1
# scripts/gpu-bench.sh`. SDSTREAM_GPU_BENCH_ANCHOR=0 skips the anchor; COMPILE=0 skips its torch.compile part.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out/gpu-bench}"
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1

TINY="${SDSTREAM_GPU_BENCH_TINY:-0}"
BIN="${SDSTREAM_BIN:-.gpu/sdstream}"
PY="${SDSTREAM_PYTHON:-python3}"
MODELS="${SDSTREAM_RANDOM_MODEL_DIR:-/tmp/sdstream-random-models}"
TORCH_DIR="$("$PY" -c 'import torch,os;print(os.path.dirname(torch.__file__))')"
NV_LIB="$(dirname "$TORCH_DIR")/nvidia/cu13/lib"
export LD_LIBRARY_PATH="$TORCH_DIR/lib${NV_LIB:+:$NV_LIB}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
[ -f .gpu/COMMIT ] && export SDSTREAM_GIT_COMMIT="$(cat .gpu/COMMIT)"
export RUST_LOG="${RUST_LOG:-warn}"

if [ "$TINY" = "1" ]; then
  # The CPU dry run: the graph runner's CPU stand-in takes the place of CUDA graphs.
  TURBO=tiny-test; SD15=tiny-test; DEV=cpu; DT=fp32; SIZE=64; FRAMES=6; ITERS=2; WARM=1; STREAMS=4; GRAPHS=on
else
  TURBO=sd-turbo; SD15=sd15; DEV=cuda; DT=fp16; SIZE=512; FRAMES=300; ITERS=30; WARM=10; STREAMS=4; GRAPHS=auto
fi
echo "== gpu-bench: $(date -u +%FT%TZ) commit ${SDSTREAM_GIT_COMMIT:-?} tiny=$TINY"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
"$PY" -c 'import torch;print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
"$BIN" --version || { echo "the binary does not run: stage it with scripts/gpu-prepare.sh"; exit 1; }

status=0
echo "== 0. the captured tick on $DEV: tests/graph.rs (real CUDA graphs on a GPU) against the eager tick and the fixtures"
# Tolerance on the GPU: 2 levels of 8 bits between eager and captured outputs and against the CPU-made fixtures
# (bit-identical on the CPU).
GRAPH_TESTS="${SDSTREAM_GRAPH_TESTS:-.gpu/graph-tests}"
if [ -x "$GRAPH_TESTS" ]; then
  SDSTREAM_TEST_DEVICE="$DEV" SDSTREAM_FIXTURE_ROOT="$PWD" timeout 60 "$GRAPH_TESTS" --test-threads 1 2>&1 \
    | tee "$OUT/graph-tests.txt" | grep -E '^test |test result' || true
  grep -q 'test result: ok' "$OUT/graph-tests.txt" || { echo "!! the captured-tick tests failed (graph-tests.txt)"; status=1; }
else
  echo "!! no graph test binary at $GRAPH_TESTS (scripts/gpu-prepare.sh stages it)"; status=1
fi
common=(--random-model-dir "$MODELS" --device "$DEV" --dtype "$DT" --width "$SIZE" --height "$SIZE"
        --frames "$FRAMES" --iters "$ITERS" --warmup "$WARM")
echo "== 1. $TURBO, TAESD, 1 stage, 1 and $STREAMS streams, captured tick (--cuda-graphs $GRAPHS)"
# Components time the eager tick and the captured tick side by side, and check the captured tick against the
# eager one for 1, 2 and 4 streams (capture must work; outputs within 2 levels); end to end through the daemon.
timeout 140 "$BIN" bench --random-model "$TURBO" --vae taesd --stages 1 --streams "$STREAMS" --cuda-graphs "$GRAPHS" \
  "${common[@]}" --json "$OUT/sd-turbo.json" --plot "$OUT/sd-turbo.svg" || { echo "!! sd-turbo run failed ($?)"; status=1; }
echo "== 1b. the same end to end with the eager tick (--cuda-graphs off), same call, same card"
timeout 60 "$BIN" bench --random-model "$TURBO" --vae taesd --stages 1 --streams "$STREAMS" --cuda-graphs off --e2e \
  "${common[@]}" --json "$OUT/sd-turbo-eager.json" || { echo "!! sd-turbo eager run failed ($?)"; status=1; }
echo "== 2. $SD15, TAESD, 4 stages (LCM), 1 stream, captured tick"
timeout 80 "$BIN" bench --random-model "$SD15" --vae taesd --stages 4 --streams 1 --cuda-graphs "$GRAPHS" "${common[@]}" \
  --json "$OUT/sd15.json" --plot "$OUT/sd15.svg" || { echo "!! sd15 run failed ($?)"; status=1; }
rm -rf "$MODELS"

echo "== 3. diffusers eager baseline (same card, same call)"
site="$(mktemp -d)"
if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .gpu/wheels/*.whl; then
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  if [ "${SDSTREAM_GPU_BENCH_ANCHOR:-$((1 - TINY))}" = "1" ]; then
    PYTHONUNBUFFERED=1 COMPILE="${COMPILE:-0}" OUT="$OUT" timeout 140 "$PY" .gpu/diffusers_eager.py || { echo "!! anchor failed ($?)"; status=1; }
  else
    # CPU check: the carried wheels import (the anchor itself takes many minutes on a CPU).
    "$PY" -c 'import diffusers, importlib_metadata; print("anchor skipped; diffusers", diffusers.__version__, "from", diffusers.__file__)' \
      || { echo "!! the carried wheels do not import"; status=1; }
  fi
else
  echo "!! installing the carried wheels failed"; status=1
fi

echo "== summary"
OUT="$OUT" "$PY" - <<'PY' | tee "$OUT/summary.txt"
import json, os
out = os.environ["OUT"]
def load(name):
    try:
        return json.load(open(os.path.join(out, name)))
    except Exception:
        return None
turbo, sd15, anchor = load("sd-turbo.json"), load("sd15.json"), load("anchor.json") or {}
turbo_eager = load("sd-turbo-eager.json")
def comp(r, name):
    for c in (r or {}).get("components", []):
        if c["name"] == name:
            return c["ms"]["median"]
def e2e(r, k):
    for e in (r or {}).get("e2e", []):
        if e["streams"] == k:
            return e
def fmt(x, unit=""):
    return "-" if x is None else f"{x:.2f}{unit}"
rows = []
for b in (1, 2, 4):
    rows.append((f"SD-Turbo UNet b={b} (ms)", comp(turbo, f"unet b={b}"), anchor.get(f"sd-turbo unet b={b}")))
for b in (1, 2, 4):
    rows.append((f"SD 1.5 UNet b={b} (ms)", comp(sd15, f"unet b={b}"), anchor.get(f"sd15 unet b={b}")))
rows += [
    ("TAESD encode (ms)", comp(turbo, "taesd encode"), anchor.get("taesd encode 512")),
    ("TAESD decode (ms)", comp(turbo, "taesd decode"), anchor.get("taesd decode 512")),
    ("VAE encode (ms)", comp(turbo, "vae encode"), anchor.get("vae-kl encode 512")),
    ("VAE decode (ms)", comp(turbo, "vae decode"), anchor.get("vae-kl decode 512")),
    ("text encoder, CLIP-H (ms)", comp(turbo, "text encoder"), anchor.get("clip-h text encode")),
    ("img2img frame: tick vs eager n=1 (ms)", comp(turbo, "engine tick (1 stream)"), anchor.get("eager stream frame n=1")),
    ("img2img frame: captured tick vs eager n=1 (ms)", next((c["ms"]["median"] for c in (turbo or {}).get("components", []) if c["name"].startswith("captured tick (1 stream")), None), anchor.get("eager stream frame n=1")),
    ("UNet b=1 vs torch.compile (ms)", comp(turbo, "unet b=1"), anchor.get("sd-turbo unet b=1 torch.compile(reduce-overhead)")),
]
print(f"{'what':42s} {'sdstream':>10s} {'diffusers':>10s} {'ratio':>7s}")
for name, ours, theirs in rows:
    ratio = f"{theirs / ours:.2f}x" if ours and theirs else "-"
    print(f"{name:42s} {fmt(ours):>10s} {fmt(theirs):>10s} {ratio:>7s}")
print("(ratio = diffusers / sdstream: above 1 means sdstream is faster)")
eager_fps = 1000 / anchor["eager stream frame n=1"] if anchor.get("eager stream frame n=1") else None
print(f"\n{'end to end (daemon, loopback)':42s} {'fps/strm':>9s} {'p50 ms':>8s} {'daemon p50':>11s}  target")
for label, r, k, target in [("SD-Turbo 1 stage, 1 stream", turbo, 1, ">=150 fps, daemon p50 <=12 ms"),
                            ("SD-Turbo 1 stage, 4 streams", turbo, 4, ">=60 fps each"),
                            ("SD-Turbo 1 stage, 2 streams (tiny)", turbo, 2, "-"),
                            ("SD 1.5 4 stages, 1 stream", sd15, 1, ">=60 fps")]:
    e = e2e(r, k)
    if e is None:
        continue
    print(f"{label:42s} {e['per_stream_fps']['median']:>9.1f} {e['latency_ms']['median']:>8.2f} "
          f"{e['stages_ms']['total_ms']['median']:>11.2f}  {target}")
for label, r in [("SD-Turbo eager tick, 1 stream", turbo_eager)]:
    for k in (1, 4, 2):
        e = e2e(r, k)
        if e is not None:
            print(f"{label[:-9] + f' {k} stream(s)':42s} {e['per_stream_fps']['median']:>9.1f} {e['latency_ms']['median']:>8.2f} "
                  f"{e['stages_ms']['total_ms']['median']:>11.2f}  (eager, for comparison)")
print("\ncaptured tick vs eager tick (8-bit outputs; capture must work):")
for r in (turbo, sd15):
    for g in (r or {}).get("graph_check", []):
        ok = g["error"] is None and g["max_level_diff"] <= 2 and g["outputs"] > 0
        print(f"  {g['streams']} stream(s) {g['backend']}: {g['outputs']} outputs, max diff {g['max_level_diff']} levels, "
              f"{g['captures']} capture(s): {'ok' if ok else 'FAILED ' + str(g['error'])}")
host, host_resized = comp(turbo, "host per frame"), comp(turbo, "host per frame + resize")
if host is not None:
    parts = ", ".join(f"{n} {fmt(comp(turbo, n))}" for n in
                      ("jpeg decode", "host resize", "host frame buffer", "host readback", "jpeg encode"))
    print(f"\nhost per frame, one thread: {host:.2f} ms, {fmt(host_resized)} ms with a 640x480 resize "
          f"(target <= 2 ms: {'met' if host <= 2 else 'NOT met'}); {parts}")
one = e2e(turbo, 1)
if one and eager_fps:
    print(f"SD-Turbo 1 stream vs diffusers eager frame rate: {one['per_stream_fps']['median'] / eager_fps:.2f}x (target >= 3x)")
for r in (turbo, sd15):
    if r:
        m = r["meta"]
        print(f"[{m['model_kind']}: {m['device_name']}, {m['dtype']}, {m['width']}x{m['height']}, {m['autoencoder']}, t_index_list {m['t_index_list']}]")
PY
ls -l "$OUT"
exit $status
