#!/usr/bin/env bash
# The main job: every stage on the embedded default (SmolLM2-135M-Instruct, ePQA + hetPQA), quick profile.
# Extra arguments go to `bsharedrag run`, e.g. --set profile=full or --run runs/other.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
bsharedrag run --run runs/quick "$@"
