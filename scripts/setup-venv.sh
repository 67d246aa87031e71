#!/usr/bin/env bash
# Creates .venv (or $VENV) and installs segscale with its test tools.
# torch goes in first: with no torch installed, the package's `torch>=2.4` range would pull a
# multi-GB CUDA build. Without a GPU we pin torch==2.13.0 (on these machines a CPU build lies on
# disk; elsewhere set TORCH_INDEX_URL to PyTorch's CPU index).
set -euo pipefail
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "$VENV/bin/python" -m pip install -q "torch>=2.4"
  else
    # TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu: the CPU build where the index is PyPI
    "$VENV/bin/python" -m pip install -q "torch==2.13.0" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
  fi
fi
"$VENV/bin/python" -m pip install -q -e ".[test]"
touch "$VENV/.installed"
