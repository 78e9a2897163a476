#!/usr/bin/env bash
# Submit the UniRef50 run to a Ray cluster (cluster/ray-cluster.yaml or cluster/kuberay-rayjob.yaml).
# RAY_ADDRESS: the head's dashboard address, e.g. http://127.0.0.1:8265 after `ray dashboard cluster/ray-cluster.yaml`.
# Only if the cluster was started with token authentication (optional, Ray >= 2.52): export RAY_AUTH_MODE=token and
# the cluster's token (~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN). RDSCALE_AUTOSCALER=1: the launcher's GPU workers start on demand
# (min_workers: 0), so actors wait for them instead of being refused.
# The job is resubmitted (jobs/resubmit.py: up to RDSCALE_RESUBMITS times, 3 by default) when it dies with its
# driver; the resubmitted job skips the shards already committed. A configuration error is not resubmitted.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${RAY_ADDRESS:?set RAY_ADDRESS to the cluster dashboard, e.g. http://127.0.0.1:8265}"
python jobs/resubmit.py --retries "${RDSCALE_RESUBMITS:-3}" -- \
ray job submit --address "$RAY_ADDRESS" --working-dir . \
  --runtime-env-json '{"excludes": [".venv", "runs", "models", ".git"], "env_vars": {"RDSCALE_AUTOSCALER": "1"}}' \
  -- python jobs/rdscale_job.py run -c uniref50_cluster "$@"
