#!/usr/bin/env bash
# Install what the tests need and run the default suite (tiny random models; slow tests are opt-in: -m slow).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
python -m pytest -q "$@"
