#!/usr/bin/env bash
# GPU figures for BENCHMARKS.md, in under 8 minutes on one H100 (the two timing steps are capped at 5 and 2.5 minutes):
# per-step plain against NESS times, the task boundary and images/s for AlexNet-5 and reduced ResNet-18 at the
# paper's shapes (benchmarks/ness_cost.py on CUDA; its JSON is rewritten after each network, so a capped run keeps
# the networks it finished); then train_task eager against TrainConfig.compile (inductor) with its compile times
# (benchmarks/overhead.py --compile; MNIST from NESS_DATA_ROOT if set, else random pixels of MNIST's shape).
# Runs from a plain checkout (the package from src/, no install) with the machine's own python3 and torch.
# Usage: bash benchmarks/gpu.sh [OUT_DIR]   (default runs/bench/gpu; needs a CUDA build of torch and one GPU)
# With the device tool: run(command='bash benchmarks/gpu.sh "$OUT"', timeout_s=540)
set -euo pipefail
out="${1:-runs/bench/gpu}"
python="${PYTHON:-python3}"
mkdir -p "$out"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$python" - <<'PY' | tee "$out/gpu.txt"
import platform, torch, ness
assert torch.cuda.is_available(), "no CUDA device: run this on a GPU machine"
print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, Python {platform.python_version()}, ness {ness.__version__}")
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$out/gpu.txt" || true
status=0
# 3 networks × (plain step, NESS step, 2 forced-rank steps, boundary, per-layer covariance and eigh), 0.5 s a timing
timeout 300 "$python" benchmarks/ness_cost.py --device cuda --min-run-time 0.5 --json "$out/ness_cost_cuda.json" \
    | tee "$out/ness_cost_cuda.md" || status=$?
# finetune task 0 and NESS task 1 (Permuted MNIST's MLP, batch 10), eager and compiled, 2 epochs each, 3 repeats
timeout 150 "$python" benchmarks/overhead.py --compile --device cuda --images 10000 --repeats 3 \
    --json "$out/overhead_compile_cuda.json" | tee "$out/overhead_compile_cuda.md" || status=$?
exit "$status"
