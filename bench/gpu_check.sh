#!/usr/bin/env bash
# One GPU session's checks of the Triton kernels, in <= 8 minutes on one H100 / H200:
#   1. the kernel tests on the GPU (tests/test_triton_kernels.py without TRITON_INTERPRET:
#      the packed CUDA GEMV paths, split-K, CUDA-graph capture), default configs;
#   2. bench/kernels.py with default configs on the Llama shapes (M = 1, 16, 256) and the decode
#      tokens/s of a Llama-1B-shaped stack per format; it writes bench/results/kernels-<gpu>.md;
#   3. if time is left, the tuned M = 1 row of 4096x14336 (tuning compiles every candidate).
# Each stage has its own time limit, so a slow or failing stage cannot eat the others' time.
# Output: bench/results/kernels-<gpu>.md and bench/results/gpu-check-<gpu>.log (also copied
# to $OUT when that is set, for the device tool).
#
#   bash bench/gpu_check.sh            # from the repository root
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
unset TRITON_INTERPRET
export TRITON_DEFAULT_FP_FUSION=1
export AUTOQ_CACHE_DIR=${AUTOQ_CACHE_DIR:-/tmp/autoq-cache}  # tuning cache (copied to $OUT)
START=$(date +%s)

GPU=$($PY -c "import torch; print(torch.cuda.get_device_name())" 2>/dev/null) || {
    echo "gpu_check: no CUDA GPU visible to torch"; exit 2; }
SLUG=$(echo "$GPU" | tr -cs 'A-Za-z0-9' '-' | sed 's/^-//; s/-$//' | tr 'A-Z' 'a-z')
mkdir -p bench/results
LOG=bench/results/gpu-check-$SLUG.log
: > "$LOG"
say() { echo "[gpu_check $(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

say "GPU: $GPU"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv 2>&1 | tee -a "$LOG"
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" 2>&1 | tee -a "$LOG"

say "1/3 kernel tests on the GPU, two halves in parallel (Triton compiles on CPU; limit 240 s)"
timeout 240 $PY -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py -k "int4" \
    > /tmp/gpu-tests-int4.log 2>&1 &
PID_A=$!
timeout 240 $PY -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py -k "not int4" \
    > /tmp/gpu-tests-rest.log 2>&1 &
PID_B=$!
wait $PID_A; TESTS_A=$?
wait $PID_B; TESTS_B=$?
for part in int4 rest; do
    say "tests ($part):"; tail -25 /tmp/gpu-tests-$part.log | tee -a "$LOG"
done
TESTS=$(( TESTS_A > TESTS_B ? TESTS_A : TESTS_B ))
say "tests exit status: int4 $TESTS_A, rest $TESTS_B (124 = time limit)"

say "2/3 bench/kernels.py, default configs, plus decode tokens/s (limit 210 s)"
timeout 210 $PY bench/kernels.py --no-tune --ms 1 16 256 --rep 30 --decode \
    --shapes 4096x14336 14336x4096 4096x4096 2>&1 | tee -a "$LOG"
BENCH=${PIPESTATUS[0]}
say "bench exit status: $BENCH"

LEFT=$(( 450 - ($(date +%s) - START) ))
if [ "$LEFT" -gt 60 ]; then
    say "3/3 tuned M = 1 on 4096x14336 (limit ${LEFT} s)"
    AUTOQ_PRETUNE_M=1 timeout "$LEFT" $PY bench/kernels.py --ms 1 --rep 30 --shapes 4096x14336 \
        --out "bench/results/kernels-$SLUG-tuned-m1.md" 2>&1 | tail -20 | tee -a "$LOG"
    say "tuned bench exit status: ${PIPESTATUS[0]}"
else
    say "3/3 skipped: ${LEFT} s left"
fi

if [ -n "${OUT:-}" ]; then
    cp bench/results/kernels-"$SLUG"*.md "$LOG" "$OUT"/ 2>/dev/null || true
    cp "$AUTOQ_CACHE_DIR"/kernels/*.json "$OUT"/ 2>/dev/null || true
fi
say "done: tests $TESTS, bench $BENCH"
[ "$TESTS" -eq 0 ] && [ "$BENCH" -eq 0 ]
