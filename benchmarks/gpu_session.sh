#!/usr/bin/env bash
# One GPU session's checks for issue 4, in budget order (the device machine has torch + triton, no polars/hnswlib,
# which the training path does not import). Run from the repository root; everything lands in $OUT (default
# ./gpu_out). About 8 minutes on an H100:
#   1. the compiled fused-loss kernels against torch (float32 exact products; bf16 trainer; quality band)
#   2. their tile shapes against the matmul floor at B = 8192 / 65536, d = 128
#   3. the loss alone: plain / chunked / fused, bf16
#   4. train_bench: fused vs chunked softmax inside the trainer, with the reference loop; one profile
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PY:-python3}
stage() { echo; echo "=== $* ($(date +%T))"; }

stage env
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

stage "1. kernels vs torch on CUDA"
timeout 300 $PY -m pytest -q -p no:cacheprovider tests/test_fused_loss.py 2>&1 | tail -15

stage "2. tile sweep"
timeout 300 $PY benchmarks/fused_loss_sweep.py --batch-sizes 8192 65536 --dim 128 --out "$OUT/fused_loss_sweep.json"

stage "3. loss alone"
timeout 200 $PY benchmarks/loss_bench.py --device cuda --batch-sizes 8192 65536 --dim 128 --chunk-size 8192 --bf16 \
    --no-plain-above 16384 --reps 5 --out "$OUT/loss_bench.json"

stage "4. train_bench"
timeout 420 $PY benchmarks/train_bench.py --device cuda --loss-kernels triton torch --steps 20 --warmup 5 \
    --out "$OUT/train_bench.json"
timeout 120 $PY benchmarks/train_bench.py --device cuda --loss-kernels triton --towers id_only --batch-sizes 8192 \
    --no-reference --steps 10 --warmup 5 --profile --out "$OUT/train_bench_profile.json"
stage done
