#!/usr/bin/env bash
# Pack what bench/bench_gpu.py needs besides torch (with CUDA), numpy and pyarrow into bench/gpu_deps/ (git-ignored),
# from an installed environment, without a download: fair-esm (pure Python, ~0.3 MB) and pylance (one native
# library; xz -9: ~46 MiB, ~5 minutes on 2 cores). Copy the repository with bench/gpu_deps to the GPU machine and
# run bench/run_gpu_bench.sh there; bench/README.md says how.
#   bash bench/pack_gpu_deps.sh [python]          # default: the python on PATH
#   PACK_PYARROW=1 bash bench/pack_gpu_deps.sh    # also pyarrow, for a GPU machine without it
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-python}
site=$("$py" -c "import lance, os; print(os.path.dirname(os.path.dirname(lance.__file__)))")
mkdir -p bench/gpu_deps
pack() {  # name, then the paths under site-packages
  local name=$1; shift
  (cd "$site" && tar --exclude=__pycache__ -cf - "$@") | xz -9 -T0 > "bench/gpu_deps/$name.tar.xz"
  echo "bench/gpu_deps/$name.tar.xz: $(du -h "bench/gpu_deps/$name.tar.xz" | cut -f1)"
}
pack fair-esm esm $(cd "$site" && ls -d fair_esm-*.dist-info)
pack pylance lance $(cd "$site" && ls -d pylance-*.dist-info)
if [ "${PACK_PYARROW:-0}" = 1 ]; then
  pack pyarrow pyarrow $(cd "$site" && ls -d pyarrow-*.dist-info)
fi
total=$(du -cb bench/gpu_deps/*.tar.xz | tail -1 | cut -f1)
echo "bench/gpu_deps: $((total / 1048576)) MiB in all"
if [ "$total" -gt $((58 * 1048576)) ]; then
  echo "warning: over 58 MiB; with the working tree it may not fit the 64 MiB a device call carries" >&2
fi
