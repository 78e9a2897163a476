#!/usr/bin/env bash
# Create .venv and install rdscale with its test extras. Torch is installed first, pinned, because a bare `torch`
# requirement would pull a multi-GB CUDA build; on a GPU machine set TORCH_SPEC (e.g. "torch==2.13.0" from the
# CUDA index via PIP_EXTRA_INDEX_URL) before running this.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
python -m pip install -q -e ".[test,plot]"
