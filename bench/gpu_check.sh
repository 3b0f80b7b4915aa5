#!/usr/bin/env bash
# One call on a lent GPU machine that always returns what it measured.
#   bash bench/gpu_check.sh            # on the GPU machine (no package registry there)
#   bash bench/gpu_check.sh --dry-run  # on CPU: every stage's plumbing, tiny shapes, interpreted
# A global deadline of 8 minutes; each stage runs under `timeout -k` with what is left of it.
# Order: environment, install, target-shape timings (one JSON per case the moment it is done),
# compiled correctness (bf16, fp32; one JSON per case), then the kernel unit tests with a
# bounded number of compiles. Everything goes to $OUT (default bench/results/gpu-run).
set -u
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT="${OUT:-bench/results/gpu-run}"
mkdir -p "$OUT"
# Backend "auto" (the CUDA default) records the choice it timed for each primitive and shape here.
export FASTSAE_CACHE_DIR="$OUT/autotune"
DEADLINE=$(( $(date +%s) + 480 ))
STAGES="$OUT/stages.txt"
: > "$STAGES"
if [ "$DRY" = 1 ]; then export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""; else unset TRITON_INTERPRET; fi

# stage NAME LIMIT_S COMMAND...: runs under the smaller of its limit and the time left.
stage() {
  local name=$1 limit=$2; shift 2
  local left=$(( DEADLINE - $(date +%s) - 5 ))
  if [ "$left" -lt 10 ]; then echo "$name skipped: deadline" >> "$STAGES"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  local start; start=$(date +%s)
  timeout -k 5 "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "$name rc=$? ${limit}s-limit $(( $(date +%s) - start ))s" | tee -a "$STAGES"
}

stage environment 30 python3 - "$OUT" <<'EOF'
import json, platform, subprocess, sys
import torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
try:
    import triton
    info["triton"] = triton.__version__
except Exception as e:
    info["triton"] = f"missing: {e}"
try:
    info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,name,memory.total",
                                     "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
except OSError:
    info["driver"] = None
open(f"{sys.argv[1]}/environment.json", "w").write(json.dumps(info, indent=1))
print(info)
EOF
if [ "$DRY" = 0 ]; then
  stage install 90 python3 -m pip install --no-deps --no-build-isolation -e .
fi
if [ "$DRY" = 0 ] && [ -d bench/wheelhouse ]; then
  # sparsify (bench/fetch_wheels.sh, carried along) without its trainer's dependencies.
  stage sparsify-install 60 bash -c "python3 -m pip install --no-index --find-links bench/wheelhouse --no-deps \
    eai-sparsify && python3 -m pip install --no-index --find-links bench/wheelhouse schedulefree simple-parsing natsort"
fi
stage import 60 python3 -c "import fastsae.ops, fastsae.kernels.encode, fastsae.kernels.sparse_matmul"

TINY=""
[ "$DRY" = 1 ] && TINY="--tiny"
stage timings 240 python3 -m bench.gpu_timings --out "$OUT" $TINY
stage correctness 120 python3 bench/gpu_correctness.py --out "$OUT" $TINY $([ "$DRY" = 1 ] && echo --device cpu)
# A bounded unit-test stage: the cutoff-path, ties, subset and bf16/fp16 cases (about 20 compiles).
stage unit-tests 120 python3 -m pytest -q -p no:cacheprovider tests/test_kernel_topk_encode.py \
  -k "cutoff or ties or half or overflowing or subset"
if [ "$DRY" = 0 ]; then  # last: the train step against sparsify, if time is left
  stage train-bench 150 env FASTSAE_BENCH_SIZE=full python3 -m pytest -q -p no:cacheprovider bench/test_bench_train.py \
    --benchmark-min-rounds=3 --benchmark-max-time=2 --benchmark-json="$OUT/train-bench.json"
fi
stage info 30 python3 -m fastsae.cli info  # versions and the backend choices "auto" made
ls "$OUT" | tee -a "$STAGES"
# The dry run is CI's check of this script: every stage must pass and leave its files.
if [ "$DRY" = 1 ]; then
  grep "rc=" "$STAGES" | grep -qv "rc=0" && { echo "a stage failed: $STAGES"; exit 1; }
  for f in environment.json info.log timing-topk_encode.json timing-topk_auxk_dead30.json timing-decode_fwd_bwd.json \
           correctness-topk_encode-float32-9x16x600x4.json correctness-topk_encode_trained-float32-9x16x600x4.json; do
    [ -s "$OUT/$f" ] || { echo "missing $OUT/$f"; exit 1; }
  done
fi
exit 0
