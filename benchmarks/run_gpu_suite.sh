#!/usr/bin/env bash
# The GPU suite: every GPU check and benchmark, as stages ordered by value, for a lent GPU machine (one command of at
# most 10 minutes, no network, the repository copied as a working tree, torch/triton from the image).
#
#   OUT=/some/folder bash benchmarks/run_gpu_suite.sh            # on the GPU machine ($OUT defaults to ./gpu-suite)
#   OUT=/tmp/dry bash benchmarks/run_gpu_suite.sh --dry-run      # CPU stand-in (CI): interpreter, tiny sizes
#
# Nothing is installed: the package and its kernels run from this working tree (PYTHONPATH). Each stage runs under
# its own timeout, unbuffered, and writes $OUT/<stage>.json and $OUT/<stage>.log as soon as it ends; $OUT/summary.txt
# gets one line per stage (exit code, seconds, budget). A stage that fails or times out does not stop the next.
# The stages' budgets add up to the suite's (GPU_SUITE_BUDGET_S, default 540 s); a stage never runs past what is
# left of it, and one that cannot get GPU_SUITE_MIN_STAGE_S (30 s) is skipped with a line saying so.
set -u
cd "$(dirname "$0")/.."

dry=""
if [ "${1:-}" = "--dry-run" ]; then
    dry="--dry-run"
elif [ $# -gt 0 ]; then
    echo "usage: OUT=DIR bash benchmarks/run_gpu_suite.sh [--dry-run]" >&2
    exit 2
fi
out="${OUT:-gpu-suite}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
python="${PYTHON:-python3}"
export PYTHONPATH="$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
export BIGBIRD_JA_AUTOTUNE="${BIGBIRD_JA_AUTOTUNE:-suite}"  # the pruned autotuning space (4 tiles, not 15)
deadline=$(( $(date +%s) + ${GPU_SUITE_BUDGET_S:-540} ))
min_stage=${GPU_SUITE_MIN_STAGE_S:-30}

{
    echo "GPU suite $(date -u +%Y-%m-%dT%H:%M:%SZ) ${dry:-(real run)} python=$python"
    if command -v nvidia-smi > /dev/null; then
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
    else
        echo "nvidia-smi: not found"
    fi
} > "$out/summary.txt"

# stage NAME BUDGET_S ARGS...: python benchmarks/gpu_suite.py ARGS under `timeout`, log to $out/NAME.log
stage() {
    local name=$1 budget=$2 left started rc
    shift 2
    left=$(( deadline - $(date +%s) ))
    if [ "$left" -lt "$min_stage" ]; then
        echo "$name: skipped, ${left}s of the suite's budget left (needs ${min_stage}s)" | tee -a "$out/summary.txt"
        return
    fi
    [ "$budget" -gt "$left" ] && budget=$left
    started=$(date +%s)
    echo "== $name (budget ${budget}s)"
    timeout -k 10 "$budget" "$python" -u benchmarks/gpu_suite.py "$@" --name "$name" --out "$out" $dry \
        > "$out/$name.log" 2>&1
    rc=$?
    tail -n 5 "$out/$name.log"
    [ "$rc" -eq 124 ] && rc="124 (timed out)"
    echo "$name: exit $rc, $(( $(date +%s) - started ))s of ${budget}s" | tee -a "$out/summary.txt"
}

stage cuda 45 cuda
stage peak 45 peak
stage correctness 140 correctness
stage attention-4k 130 attention --lengths 4096
stage pretrain 110 pretrain
stage attention-16k-32k 70 attention --lengths 16384 32768 --cases triton flex-128 sdpa --batch 1
echo "results in $out: $(cd "$out" && ls | tr '\n' ' ')"
