#!/usr/bin/env bash
# The GPU checks still owed, one step per call so each fits a lent machine's 10-minute limit:
#
#   bash benchmarks/gpu_checks.sh tests      # the whole suite on the GPU (bf16/fp16/fp32 triton tests)
#   bash benchmarks/gpu_checks.sh cuda       # build csrc/ with ninja, then tests/test_csrc.py on the real kernels
#   bash benchmarks/gpu_checks.sh sanitize   # compute-sanitizer memcheck + racecheck, triton and csrc kernels
#   bash benchmarks/gpu_checks.sh decode     # decode latency + routing-metadata suites -> benchmarks/results/
#   bash benchmarks/gpu_checks.sh tune       # tile tuning -> triton_kernels/configs/<gpu>.json
#   bash benchmarks/gpu_checks.sh bench      # the benchmark harness -> benchmarks/results/
#   bash benchmarks/gpu_checks.sh bench-quick
#
# Logs and copies of what each step writes go to $OUT (the device tool fetches it back).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/routedlora-gpu}
mkdir -p "$OUT"
unset TRITON_INTERPRET
export TRITON_DEFAULT_FP_FUSION=1
python -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || cat "$OUT/install.log"
{ nvidia-smi; python -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)"; } \
    >"$OUT/env.txt" 2>&1
case "${1:-}" in
  tests)
    python -m pytest -q tests -p no:cacheprovider 2>&1 | tee "$OUT/pytest-gpu.txt" | tail -30 ;;
  cuda)
    python -m routedlora.cuda_build --build >"$OUT/cuda-build.txt" 2>&1; echo "build exit $?: $(tail -1 "$OUT/cuda-build.txt")"
    python -m pytest -q tests/test_csrc.py -p no:cacheprovider 2>&1 | tee "$OUT/pytest-csrc.txt" | tail -20 ;;
  sanitize)
    python -m routedlora.cuda_build --build >"$OUT/cuda-build.txt" 2>&1  # build outside the sanitizer
    for tool in memcheck racecheck; do
      compute-sanitizer --tool "$tool" --error-exitcode 1 python -m pytest -q -x tests/test_triton.py \
        -k "routers_combines_heads_float32 and (2-params-topk or 1-outputs-topk) or test_dtypes or kernel_routers" \
        >"$OUT/sanitizer-$tool.txt" 2>&1
      echo "triton $tool exit $?: $(tail -1 "$OUT/sanitizer-$tool.txt")"
      compute-sanitizer --tool "$tool" --error-exitcode 1 python -m pytest -q -x tests/test_csrc.py \
        -k "group or backend" >"$OUT/sanitizer-csrc-$tool.txt" 2>&1
      echo "csrc $tool exit $?: $(tail -1 "$OUT/sanitizer-csrc-$tool.txt")"
    done ;;
  decode)
    python -m routedlora.cuda_build --build >"$OUT/cuda-build.txt" 2>&1
    for suite in decode grouping; do
      python -m benchmarks.run --only "$suite" --out "$OUT/results" 2>&1 | tee "$OUT/bench-$suite.txt" | tail -30
    done
    mkdir -p benchmarks/results && cp "$OUT"/results/* benchmarks/results/ ;;
  tune)
    python -m benchmarks.tune_triton 2>&1 | tee "$OUT/tune.txt" | tail -8
    cp triton_kernels/configs/*.json "$OUT/" ;;
  bench|bench-quick)
    extra=(); [ "$1" = bench-quick ] && extra=(--quick)
    python -m benchmarks.run "${extra[@]}" --out "$OUT/results" 2>&1 | tee "$OUT/bench.txt" | tail -40
    mkdir -p benchmarks/results && cp "$OUT"/results/* benchmarks/results/ ;;
  *)
    sed -n 2,12p "$0"; exit 2 ;;
esac
