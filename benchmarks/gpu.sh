#!/usr/bin/env bash
# GPU figures for BENCHMARKS.md, in under 12 minutes on one H100: per-step plain against NESS times, the task boundary
# and images/s for AlexNet-5 and reduced ResNet-18 at the paper's shapes (benchmarks/ness_cost.py on CUDA); then
# train_task eager against TrainConfig.compile (inductor) with its compile times (benchmarks/overhead.py --compile).
# Usage: bash benchmarks/gpu.sh [OUT_DIR]   (default runs/bench/gpu; needs a CUDA build of torch and one GPU)
set -euo pipefail
out="${1:-runs/bench/gpu}"
mkdir -p "$out"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device: run this on a GPU machine'"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
# 3 networks × (plain step, NESS step, 2 forced-rank steps, boundary): about 2 minutes each with 1 s per timing
timeout 450 python benchmarks/ness_cost.py --device cuda --min-run-time 1 --json "$out/ness_cost_cuda.json" \
    | tee "$out/ness_cost_cuda.md"
# finetune task 0 and NESS task 1 (Permuted MNIST's MLP, batch 10), eager and compiled, 2 epochs each, 3 repeats
# (about a minute on one CPU thread, 13 s of it the first compile; not yet run on a GPU)
timeout 240 python benchmarks/overhead.py --compile --device cuda --images 10000 --repeats 3 \
    --json "$out/overhead_compile_cuda.json" | tee "$out/overhead_compile_cuda.md"
