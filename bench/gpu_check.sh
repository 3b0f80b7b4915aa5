#!/usr/bin/env bash
# One command for a lent GPU machine (no package registry there): install fastsae from this
# tree without fetching anything, check that it imports, run the kernel correctness tests
# compiled (not interpreted) in fp32 and bf16 at larger shapes, then the "full" benchmarks.
# Every stage has its own time limit and its failure is recorded, not fatal to the rest.
# Writes bench/results/<date>-<gpu>.json (+ .md summary), and copies them to $OUT if set.
# sparsify (the comparison library) is installed from bench/wheelhouse/ when that folder was
# fetched beforehand (bench/fetch_wheels.sh) and carried along; without it its benches skip.
set -u
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET
RESULTS=bench/results
mkdir -p "$RESULTS"
LOG=$(mktemp)
status() { echo "== $1: $2" | tee -a "$LOG"; }

python3 -m pip install --no-deps --no-build-isolation -e . >>"$LOG" 2>&1 && status install ok || status install FAILED
if [ -d bench/wheelhouse ]; then
  # sparsify without its trainer's dependencies (datasets, accelerate: the benches load only the
  # coder), then what the coder imports; --no-index never replaces the machine's torch.
  python3 -m pip install --no-index --find-links bench/wheelhouse --no-deps eai-sparsify >>"$LOG" 2>&1 &&
    python3 -m pip install --no-index --find-links bench/wheelhouse transformers schedulefree simple-parsing \
      natsort einops >>"$LOG" 2>&1 && status sparsify-install ok || status sparsify-install FAILED
fi
if ! python3 -c "import fastsae, fastsae.ops, fastsae.kernels.encode, fastsae.kernels.sparse_matmul" >>"$LOG" 2>&1; then
  status import FAILED; cat "$LOG"; exit 1
fi
status import ok
GPU=$(python3 -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-'))" 2>/dev/null || echo no-gpu)
STAMP="$(date +%Y-%m-%d)-$GPU"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$LOG"

# Compiled kernel tests: the unit suites (their bf16/fp16 cases run on CUDA) and the
# larger-shape fp32/bf16 comparison against the reference.
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernel_sparse_matmul.py tests/test_kernel_topk_encode.py \
  tests/test_kernel_gated.py tests/test_ops.py -k "not hypothesis" >>"$LOG" 2>&1; status kernel-tests "rc=$?"
timeout 120 python3 bench/gpu_correctness.py --json "$RESULTS/$STAMP-correctness.json" >>"$LOG" 2>&1
status correctness "rc=$?"

# Full-size benchmarks, one file at a time so one out-of-memory does not lose the rest.
for f in bench/test_bench_topk_encode.py bench/test_bench_decode.py bench/test_bench_gated.py \
         bench/test_bench_train.py bench/test_bench_overhead.py; do
  [ -f "$f" ] || continue
  name=$(basename "$f" .py)
  FASTSAE_BENCH_SIZE=full timeout 150 python3 -m pytest -q -p no:cacheprovider "$f" --benchmark-min-rounds=3 \
    --benchmark-max-time=2 --benchmark-json="$RESULTS/$STAMP-$name.json" >>"$LOG" 2>&1
  status "$name" "rc=$?"
done

python3 bench/render_table.py "$RESULTS"/"$STAMP"-test_bench_*.json --out "$RESULTS/$STAMP.md" >>"$LOG" 2>&1
status render "rc=$?"
cp "$LOG" "$RESULTS/$STAMP.log"
if [ -n "${OUT:-}" ]; then cp "$RESULTS/$STAMP"* "$OUT"/ 2>/dev/null; fi
tail -n 40 "$LOG"
