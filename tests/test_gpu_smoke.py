"""scripts/gpu_smoke.py runs every stage's code path; here on the CPU with a tiny shape (CI has no GPU)."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_smoke.py"


def test_the_gpu_smoke_script_runs_every_stage_on_a_tiny_shape(tmp_path):
    out = tmp_path / "smoke.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--shape", "tiny", "--device", "cpu", "--steps", "1",
                           "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["pretrain"]["steps"] == results["retriever"]["steps"] == results["generator"]["steps"] == 1
    assert results["pretrain"]["tokens_per_s"] > 0 and results["embed"]["passages_per_s"] > 0
    decode = results["decode"]
    assert decode["bound_tokens_per_s"] > 0 and decode["tokens_per_s_1"] > 0 and decode["tokens_per_s_8"] > 0
