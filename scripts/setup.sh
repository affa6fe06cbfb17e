#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with mvsdi installed (editable) and its test tools.
# Reuses a torch the machine already has; otherwise installs torch 2.13.0 (a CPU build exists here
# as a local file; on a GPU machine install your CUDA build of torch first and it will be reused).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  # --system-site-packages: an already installed torch (CUDA or CPU) is reused, not downloaded again
  "$PY" -m venv --system-site-packages .venv
fi
VPY=.venv/bin/python
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  echo "setup: no torch found, installing torch==2.13.0" >&2
  "$VPY" -m pip install -q "torch==2.13.0"
fi
stamp=.venv/.mvsdi-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  "$VPY" -m pip install -q -e ".[test]"
  touch "$stamp"
fi
