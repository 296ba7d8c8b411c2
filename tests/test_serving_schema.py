"""Schemathesis against /openapi.json of a live server: generated requests, valid and invalid, get no 5xx.

Runs schemathesis' own CLI (its pytest plugin does not support pytest 9 yet); docs/serving.md has the
same command for a real run.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from serving_fixtures import KEY, run_config, served_run, uvicorn_thread  # noqa: F401

SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")


@pytest.mark.skipif(not SCHEMATHESIS.exists(), reason="needs schemathesis (the dev extra)")
def test_no_generated_request_gets_a_server_error(served_run, tmp_path):
    from bsharedrag.rag import load_rag
    from bsharedrag.serving import create_app

    run = shutil.copytree(served_run, tmp_path / "run")  # generated updates touch no other test
    config = run_config(run, f"serve.api_key={KEY}", "serve.max_new_tokens=4", "serve.max_batch_documents=8")
    with uvicorn_thread(create_app(load_rag(config), config)) as url:
        command = [str(SCHEMATHESIS), "run", f"{url}/openapi.json", "--checks", "not_a_server_error",
                   "--header", f"Authorization: Bearer {KEY}", "--max-examples", "20", "--workers", "1",
                   "--seed", "1", "--generation-database", "none", "--no-color", "--request-timeout", "60"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
