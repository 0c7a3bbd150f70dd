#!/usr/bin/env bash
# One GPU session's checks for issue 4, in budget order (the device machine has torch + triton, no polars/hnswlib,
# which the training path does not import). Run from the repository root; everything lands in $OUT (default
# ./gpu_out). Planned at about 10 minutes on an H100 (each stage has its own timeout):
#   1. the compiled fused-loss kernels against torch (float32 exact products; bf16 trainer; quality band), the
#      captured step against eager steps
#   2. the kernels' tile shapes against the matmul floor at B = 8192 / 65536, d = 128
#   3. the loss alone: plain / chunked / fused, bf16
#   4-5. train_bench: fused vs chunked softmax inside the trainer with the reference loop, then with CUDA graphs
#   6. a profile of eager steps, ID-only and history + features
# Arguments pick stages (default: all). The device tool stops a command at 10 minutes, so run it as two calls:
#   bash benchmarks/gpu_session.sh 1 2 3      then      bash benchmarks/gpu_session.sh 4 5 6
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
stage "1. kernels and graphs vs eager on CUDA"
timeout 240 $PY -m pytest -q -p no:cacheprovider tests/test_fused_loss.py tests/test_triton_optim.py tests/test_graphs.py \
    tests/test_distributed.py -k "cuda or fused or equal or hand_worked or self_check" 2>&1 | tail -15

fi
if on 2; then
stage "2. tile sweep"
timeout 200 $PY benchmarks/fused_loss_sweep.py --batch-sizes 8192 65536 --dim 128 \
    --configs "64x64 w4 s3" "64x64 w8 s3" "fwd128 w8 s3" "128x32 w8 s3" "128x128 w8 s2" \
    --out "$OUT/fused_loss_sweep.json"

fi
if on 3; then
stage "3. loss alone"
timeout 120 $PY benchmarks/loss_bench.py --device cuda --batch-sizes 8192 65536 --dim 128 --chunk-size 8192 --bf16 \
    --no-plain-above 16384 --reps 3 --no-memory --out "$OUT/loss_bench.json"

fi
if on 4; then
stage "4. train_bench: fused vs chunked softmax, eager, with the reference"
timeout 250 $PY benchmarks/train_bench.py --device cuda --loss-kernels triton torch --steps 15 --warmup 5 \
    --out "$OUT/train_bench.json"

fi
if on 5; then
stage "5. train_bench: fused softmax + the whole step as a CUDA graph"
timeout 200 $PY benchmarks/train_bench.py --device cuda --loss-kernels triton --cuda-graphs --no-reference \
    --steps 15 --warmup 5 --out "$OUT/train_bench_graphs.json"

fi
if on 6; then
stage "6. profile of eager fused steps (both tower kinds)"
timeout 140 $PY benchmarks/train_bench.py --device cuda --loss-kernels triton --batch-sizes 8192 \
    --no-reference --steps 10 --warmup 5 --profile --out "$OUT/train_bench_profile.json"
fi
stage done
