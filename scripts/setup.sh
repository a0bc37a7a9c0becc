#!/usr/bin/env bash
# Create .venv and install neoxq with its dev/eval extras. torch is installed
# first, pinned to the CPU build available locally, so that the project's torch
# range does not pull a multi-GB CUDA build (on a GPU host, install your CUDA
# torch first and this step keeps it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/python -m pip install -q "torch==${NEOXQ_TORCH_VERSION:-2.13.0}"
fi
.venv/bin/python -m pip install -q -e ".[dev]"
