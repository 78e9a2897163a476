#!/usr/bin/env bash
# Set up, then run the whole pipeline offline on the bundled example: tiny ESM-2 family -> fit -> embed ->
# Lance tables -> index -> search. Outputs in runs/demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
[ -f models/tiny/esm2_t4_64_tiny.pt ] || rdscale make-tiny-family models/tiny
rdscale run -c conf/demo.yaml "$@"
rdscale index runs/demo --width 32
first=$(python -c "import lance; print(lance.dataset('runs/demo/proteins.lance').to_table(columns=['id'], limit=1)['id'][0])")
rdscale search runs/demo --id "$first" --width 32 --mode funnel -k 5
