#!/usr/bin/env bash
# Submit the UniRef50 run to a Ray cluster (cluster/ray-cluster.yaml or cluster/kuberay-rayjob.yaml).
# RAY_ADDRESS: the head's dashboard address, e.g. http://127.0.0.1:8265 after `ray dashboard cluster/ray-cluster.yaml`.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${RAY_ADDRESS:?set RAY_ADDRESS to the cluster dashboard, e.g. http://127.0.0.1:8265}"
ray job submit --address "$RAY_ADDRESS" --working-dir . \
  --runtime-env-json '{"excludes": [".venv", "runs", "models", ".git"]}' \
  -- python jobs/rdscale_job.py run -c uniref50_cluster "$@"
