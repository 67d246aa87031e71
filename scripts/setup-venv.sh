#!/usr/bin/env bash
# Creates .venv (or $VENV) and installs segscale with its test tools.
# torch goes in first: with no torch installed, the package's `torch>=2.4` range would pull a
# multi-GB CUDA build. Without a GPU we pin the CPU build (on these machines it lies on disk).
set -euo pipefail
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "$VENV/bin/python" -m pip install -q "torch>=2.4"
  else
    "$VENV/bin/python" -m pip install -q "torch==2.13.0"
  fi
fi
"$VENV/bin/python" -m pip install -q -e ".[test]"
touch "$VENV/.installed"
