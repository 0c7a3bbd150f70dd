#!/usr/bin/env bash
# One GPU session's checks for issue 4, most decisive first (the device machine has torch + triton, no
# polars/hnswlib, which the training path does not import). Run from the repository root; everything lands in $OUT
# (default ./gpu_out). Each stage has its own timeout; the device tool stops a command at 10 minutes and a session
# has 15 minutes of device time in all, so run it as two calls and expect the second to be cut short:
#   bash benchmarks/gpu_session.sh 1 2 3      then      bash benchmarks/gpu_session.sh 4 5 6
#   1. train_bench: the fused kernels (softmax + history pooling, auto) eager and as a CUDA graph, with the
#      bare-PyTorch reference in the same process: the table issue 4 asks for
#   2. train_bench, eager: softmax triton/torch x history pooling auto/torch (what each kernel is worth)
#   3. the CUDA tests: compiled kernels against torch, the captured step against eager steps
#   4. a profile of eager fused steps, ID-only and history + features
#   5. the loss alone: plain / chunked / fused, bf16
#   6. the softmax kernels' tile shapes against the matmul floor at B = 8192 / 65536, d = 128
set -uo pipefail
WANT=" ${*:-1 2 3 4 5 6} "
on() { [[ "$WANT" == *" $1 "* ]]; }
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PY:-python3}
stage() { echo; echo "=== $* ($(date +%T))"; }

stage env
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

if on 1; then
stage "1. train_bench: fused kernels eager and graphed, with the reference"
timeout 240 $PY benchmarks/train_bench.py --device cuda --loss-kernels triton --history-kernels auto \
    --cuda-graphs off on --steps 15 --warmup 5 --out "$OUT/train_bench.json"

fi
if on 2; then
stage "2. train_bench, eager: softmax triton/torch x history pooling auto/torch"
timeout 200 $PY benchmarks/train_bench.py --device cuda --loss-kernels triton torch --history-kernels auto torch \
    --no-reference --steps 10 --warmup 3 --out "$OUT/train_bench_kernels.json"

fi
if on 3; then
stage "3. kernels and graphs vs eager on CUDA"
timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_fused_loss.py tests/test_fused_pool.py \
    tests/test_triton_optim.py tests/test_graphs.py tests/test_distributed.py \
    -k "cuda or fused or equal or hand_worked or self_check or matches" 2>&1 | tail -15

fi
if on 4; then
stage "4. profile of eager fused steps (both tower kinds)"
timeout 140 $PY benchmarks/train_bench.py --device cuda --loss-kernels triton --batch-sizes 8192 \
    --no-reference --steps 10 --warmup 5 --profile --out "$OUT/train_bench_profile.json"

fi
if on 5; then
stage "5. loss alone"
timeout 120 $PY benchmarks/loss_bench.py --device cuda --batch-sizes 8192 65536 --dim 128 --chunk-size 8192 --bf16 \
    --no-plain-above 16384 --reps 3 --no-memory --out "$OUT/loss_bench.json"

fi
if on 6; then
stage "6. tile sweep"
timeout 200 $PY benchmarks/fused_loss_sweep.py --batch-sizes 8192 65536 --dim 128 \
    --configs "64x64 w4 s3" "64x64 w8 s3" "fwd128 w8 s3" "128x32 w8 s3" "128x128 w8 s2" \
    --out "$OUT/fused_loss_sweep.json"
fi
stage done
