#!/usr/bin/env bash
# Run the GPU benchmark on a machine that has torch with CUDA, numpy and pyarrow (no Ray, no PyYAML needed).
# fair-esm and pylance come from bench/gpu_deps/*.tar.xz (bench/pack_gpu_deps.sh) when present.
# Results: $OUT/bench_gpu.json when $OUT is set (the device runner), else bench/results/bench_gpu.json.
#   bash bench/run_gpu_bench.sh [extra bench_gpu.py flags, e.g. --residues 500000]
set -euo pipefail
cd "$(dirname "$0")/.."
deps=${TMPDIR:-/tmp}/rdscale_gpu_deps
mkdir -p "$deps"
for t in bench/gpu_deps/*.tar.xz; do
  [ -e "$t" ] && tar -xJf "$t" -C "$deps"
done
export PYTHONPATH="$PWD:$deps${PYTHONPATH:+:$PYTHONPATH}"
python -c "import torch, numpy, pyarrow, lance, esm; print('torch', torch.__version__, 'CUDA', torch.cuda.is_available(), 'lance', lance.__version__)"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true
out=${OUT:-bench/results}
python bench/bench_gpu.py --local --out "$out/bench_gpu.json" "$@"
