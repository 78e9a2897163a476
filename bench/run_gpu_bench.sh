#!/usr/bin/env bash
# Run the GPU benchmark on a machine that has torch with CUDA, numpy and pyarrow (no Ray, no PyYAML needed).
# fair-esm and pylance come from bench/gpu_deps/*.tar.xz (bench/pack_gpu_deps.sh) when present.
# Results: $OUT/bench_gpu.json and $OUT/bench_gpu.log when $OUT names an output folder, else bench/results/.
# The JSON is rewritten after every part of the benchmark, so a run killed at its time limit still leaves what it
# measured; if the benchmark could not even start, a small JSON with the error and the log's tail is written.
# A compact table of the results ends the output.
#   bash bench/run_gpu_bench.sh [extra bench_gpu.py flags, e.g. --residues 500000 --max-seconds 400]
# Python: $PYTHON, else python3 (the one that holds torch with CUDA).
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1  # rows appear as they are measured, also when the run is killed
deps=${TMPDIR:-/tmp}/rdscale_gpu_deps
mkdir -p "$deps"
for t in bench/gpu_deps/*.tar.xz; do
  [ -e "$t" ] && { tar -xJf "$t" -C "$deps" || echo "warning: could not unpack $t"; }
done
export PYTHONPATH="$PWD:$deps${PYTHONPATH:+:$PYTHONPATH}"
"$py" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.is_available())" || true
for m in numpy pyarrow lance esm; do
  "$py" -c "import $m" 2>/dev/null || echo "warning: python module '$m' is missing (carry bench/gpu_deps?)"
done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
out=${OUT:-bench/results}
mkdir -p "$out"
json="$out/bench_gpu.json"
log="$out/bench_gpu.log"
rm -f "$json"
"$py" bench/bench_gpu.py --local --out "$json" "$@" > "$log" 2>&1 &
pid=$!
# progress as it comes (unbuffered: it is what remains if the device call is killed), at most 6 kB of it
tail -n +1 -f "$log" --pid "$pid" 2>/dev/null | head -c 6000
wait "$pid"
rc=$?
if [ ! -s "$json" ]; then  # it died before its first write (import error, no GPU): keep the reason
  "$py" - "$json" "$log" "$rc" <<'EOF'
import json, sys
path, log, rc = sys.argv[1], sys.argv[2], int(sys.argv[3])
tail = open(log, errors="replace").read()[-4000:]
json.dump({"benchmark": "bench_gpu", "finished": False, "exit_code": rc, "error": "the benchmark did not start",
           "log_tail": tail}, open(path, "w"), indent=2)
EOF
  echo "bench_gpu.py exited with $rc before writing results; log tail:"
  tail -c 3000 "$log"
else
  [ "$rc" -eq 0 ] || echo "bench_gpu.py exited with $rc (see the sections' status below and $log)"
  "$py" bench/bench_gpu.py --table "$json"
fi
exit "$rc"
