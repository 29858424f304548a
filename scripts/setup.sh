#!/usr/bin/env bash
# Create .venv (reused when already complete) and install the project with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
# A complete venv is one where the pinned torch and the project import; then skip pip entirely.
if .venv/bin/python -c "import torch, torchvision, timm, torch_fidelity, submitit, optuna, sqlalchemy, alembic, pandas, matplotlib, pydantic, skimage, sklearn, pytest, core, orchestrator; assert torch.__version__.startswith('2.14.1')" 2>/dev/null \
   && [ .venv/.installed -nt pyproject.toml ]; then
    echo "[setup] .venv is complete; skipping install"
    exit 0
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install -q -e '.[dev]'
touch .venv/.installed
echo "[setup] installed into .venv"
