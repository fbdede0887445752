#!/usr/bin/env bash
# GPU checks for issue 6 (fast quantized-cache kernels), prepared to run in under 11 minutes on one
# H100/H200 with this repository checked out and a Python that has torch (CUDA), triton and the
# project installed (`pip install -e '.[dev]'`); the machine needs no network.
#
#   bash reports/gpu/run_gpu.sh            # results under ${OUT:-reports/gpu/out}
#
# Steps (each capped by `timeout`, each exit status in $OUT/status.txt; a failing step does not
# stop the next):
#   1. tests/test_kernels.py -m gpu: the compiled Triton kernels against torch on CUDA  (<= 90 s)
#   2. python -m harness profile ... llama-2-7b-shape, contexts 4096 and 32768, batch 8, against fp16
#      and transformers' DynamicCache, plus its QuantizedCache (quanto) when installed (<= 250 s;
#      MoQAE with an untrained router (ckpt=random): no router is trained for this shape, and speed
#      and memory do not depend on weight values, though its chunk mix does;
#      the CLI writes its JSON after every setting, so a cut keeps the finished rows; OOM settings
#      are recorded as such)
#   3. python -m harness profile ... the other methods of the CPU table at 4096 tokens, batch 1   (<= 180 s)
#   4. pytest tests/bench --benchmark-only: quantize+pack, unpack+dequant and decode attention
#      (dequantize-then-attend, from codes, Triton), GB/s and ratios              (<= 110 s)
# Caps: GPU_TESTS_TIMEOUT, PROFILE_TIMEOUT, PROFILE_ALL_TIMEOUT, BENCH_TIMEOUT (seconds).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-reports/gpu/out}"
PYTHON="${PYTHON:-python}"
mkdir -p "$OUT"
unset TRITON_INTERPRET  # compiled kernels, not the interpreter
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
status="$OUT/status.txt"
: > "$status"
start=$SECONDS

step() {  # step NAME TIMEOUT_S COMMAND...: run, log to $OUT/NAME.log, record the exit status
    local name=$1 limit=$2
    shift 2
    echo "== $name (<= ${limit}s): $*"
    local t0=$SECONDS
    timeout --signal=INT --kill-after=15 "$limit" "$@" > >(tee "$OUT/$name.log") 2>&1
    local rc=$?
    echo "$name rc=$rc ${limit}s-cap $((SECONDS - t0))s" | tee -a "$status"
}

{
    date -u +%FT%TZ
    git rev-parse HEAD 2>/dev/null
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
    "$PYTHON" - <<'PY'
import sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
try:
    import triton
    print("triton", triton.__version__)
except Exception as e:  # the kernels' steps will skip or fail; the profile still runs
    print("triton not importable:", e)
PY
} 2>&1 | tee "$OUT/env.txt"

step gpu_tests "${GPU_TESTS_TIMEOUT:-90}" \
    "$PYTHON" -m pytest tests/test_kernels.py -m gpu -q -ra -p no:cacheprovider --junitxml "$OUT/gpu_tests.xml"

# transformers' QuantizedCache beside ours (issue 16) where optimum-quanto is installed ('.[peers]');
# the default references fp16 and dynamic (DynamicCache untouched) are profiled in any case
PEERS=""
"$PYTHON" -c "import optimum.quanto" 2>/dev/null && PEERS=",hf-quanto,hf-quanto:nbits=2"
step profile "${PROFILE_TIMEOUT:-250}" \
    "$PYTHON" -m harness profile --methods "fp16,kivi-2,int4,moqae:ckpt=random$PEERS" --model llama-2-7b-shape \
    --context 4096,32768 --batch 8 --new-tokens 32 --device cuda --dtype fp16 \
    --out "$OUT/profile_gpu.json" --no-progress

# every other method of the CPU profile table (docs/results.md), one context, batch 1: their decode paths
# on a GPU (kvquant and kvmix are left out: their calibration runs Fisher / gradient passes through the
# 7B-shape model, minutes on their own; qoq without its calibrated smoothing, which changes no byte or op)
step profile_all "${PROFILE_ALL_TIMEOUT:-180}" \
    "$PYTHON" -m harness profile \
    --methods "int-k4v2,kivi-k4v2,qoq:smooth=false,mikv,xquant,alignedkv,qjl,polarquant" \
    --model llama-2-7b-shape --context 4096 --batch 1 --new-tokens 16 --device cuda --dtype fp16 \
    --out "$OUT/profile_gpu_all.json" --no-progress

step bench "${BENCH_TIMEOUT:-110}" \
    "$PYTHON" -m pytest tests/bench --benchmark-only -q -p no:cacheprovider \
    --ignore tests/bench/test_bench_decode.py \
    --benchmark-max-time=0.5 --benchmark-min-rounds=5 --benchmark-sort=name \
    --benchmark-columns=min,median,iqr,rounds --benchmark-json "$OUT/bench.json"

echo "total $((SECONDS - start))s" | tee -a "$status"
ls -l "$OUT"
