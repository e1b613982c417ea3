#!/bin/bash
# On a machine with a CUDA GPU: the CUDA tests (mamba-ssm's parity and whole-model tests too when it
# is importable), then the rollout and scan benchmarks on the GPU, in one short run. Logs go to
# $OUT (default outputs/cuda-check); the summary goes to stdout. Expects ssm-gym importable (an
# install, or PYTHONPATH set to the checkout). About 5-8 minutes on an H200, most of it Triton's
# first-use autotuning and the benchmarks' timed seconds.
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/cuda-check}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton; from ssm_gym.model import HAS_MAMBA_SSM; print('torch', torch.__version__, 'triton', triton.__version__, 'mamba-ssm importable:', HAS_MAMBA_SSM)" || exit 1
t0=$(date +%s)
timeout 240 python3 -m pytest -m cuda tests/test_cuda.py tests/test_ssd.py -q -rA -s -p no:cacheprovider > "$OUT/tests.log" 2>&1
echo "cuda tests: rc $? in $(( $(date +%s) - t0 )) s"
grep -E "passed|failed|error|mamba vs torch|PASSED|FAILED|SKIPPED" "$OUT/tests.log" | tail -40
t0=$(date +%s)
timeout 130 python3 benchmarks/rollout.py --device cuda --cuda-graph --bf16 --num-envs 1 64 256 1024 --seconds 1 > "$OUT/rollout.txt" 2>&1
echo "rollout benchmark: rc $? in $(( $(date +%s) - t0 )) s"; grep -v "^\s*$" "$OUT/rollout.txt" | tail -40
t0=$(date +%s)
timeout 70 python3 benchmarks/ssm_scan.py --device cuda > "$OUT/scan.txt" 2>&1
echo "scan benchmark: rc $? in $(( $(date +%s) - t0 )) s"; tail -30 "$OUT/scan.txt"
