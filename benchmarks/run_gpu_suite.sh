#!/usr/bin/env bash
# Every GPU check in one go, for a session that is lent a GPU machine (its time is short):
#   1. the GPU correctness tests (Triton kernels at real sizes against the float64 reference, model parity),
#   2. the attention benchmark (writes benchmarks/results/<device>/attention.{json,png}),
#   3. the pretraining benchmark (benchmarks/results/<device>/pretrain.{json,md,png}).
# Usage: bash benchmarks/run_gpu_suite.sh [OUT_DIR]   (results are also copied to OUT_DIR when given)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-}"
export TRITON_DEFAULT_FP_FUSION=1
python -m pip install -q torch triton 2>/dev/null || true
python -m pip install -q -e ".[test]"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
python -m pytest -q -m "gpu or triton" tests/test_triton_kernels.py -x 2>&1 | tee gpu-tests.log
python benchmarks/bench_attention.py 2>&1 | tee gpu-bench.log
# pretraining: base model at 4,096 tokens, fused vs dense attention (largest micro-batch, tokens/s, MFU), and the tiny
# preset's per-ZeRO-stage table on this machine's CPU -> benchmarks/results/<device>/pretrain.{json,md,png}
python benchmarks/bench_pretrain.py --stages 0 2 3 --steps 12 2>&1 | tee gpu-bench-pretrain.log
if [ -n "$out" ]; then
    mkdir -p "$out" && cp -r gpu-tests.log gpu-bench.log gpu-bench-pretrain.log benchmarks/results "$out"/
fi
