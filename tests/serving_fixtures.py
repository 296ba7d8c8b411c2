"""A finished tiny run folder (built once per session) and helpers to serve it in tests."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from bsharedrag.config import load_config
from conftest import tiny_overrides, write_dataset

QUESTION = "Acme Kettle 1.7L: how long does it take to boil?"
KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
SERVE_STAGES = ("pretrain", "mine", "retriever", "index", "generator")

# Fixtures imported into several test modules are set up once per module; this cache makes the run
# and the loaded model really once per session.
_SESSION: dict = {}


@pytest.fixture(scope="session")
def served_run(tiny_model_dir, tmp_path_factory) -> Path:
    """A run folder with both adapters and an index of the tiny shop corpus (24 passages)."""
    from bsharedrag.pipeline import run_stages

    if "run" not in _SESSION:
        root = tmp_path_factory.mktemp("served")
        data = write_dataset(root / "shop")
        run_stages(load_config(overrides=tiny_overrides(tiny_model_dir, data, root / "run")), SERVE_STAGES)
        _SESSION["run"] = root / "run"
    return _SESSION["run"]


def run_config(run_dir: Path, *overrides: str):
    """The run's own config with `serve.*` overrides (small generation budget by default)."""
    return load_config(run_dir / "config.yaml", ["serve.max_new_tokens=8", *overrides], run_dir=str(run_dir))


@pytest.fixture(scope="session")
def served_rag(served_run):
    """The run loaded once: one backbone with both adapters. Apps over it must not run at the same time."""
    from bsharedrag.rag import load_rag

    if "rag" not in _SESSION:
        _SESSION["rag"] = load_rag(run_config(served_run))
    return _SESSION["rag"]


@contextlib.contextmanager
def make_client(rag, run_dir: Path, *overrides: str):
    """A TestClient (start-up and shutdown included) of an app over `rag` with `serve.*` overrides."""
    from fastapi.testclient import TestClient

    from bsharedrag.serving import create_app

    with TestClient(create_app(rag, run_config(run_dir, *overrides))) as client:
        yield client


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def uvicorn_thread(app, port: int | None = None):
    """Serve `app` on loopback from a thread; yields the base URL."""
    import uvicorn

    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, timeout=30)
        yield url
    finally:
        server.should_exit = True
        thread.join(30)


def wait_healthy(url: str, timeout: float, process: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}: {log.read_text()[-3000:] if log else ''}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not become healthy within {timeout} s")


def start_server(run_dir: Path, port: int, log: Path, *overrides: str) -> subprocess.Popen:
    """`bsharedrag serve --run run_dir` as a child process (what an operator runs), logging to `log`."""
    env = {**os.environ, "BSHAREDRAG_API_KEY": KEY, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    sets = [arg for item in ("serve.max_new_tokens=8", *overrides) for arg in ("--set", item)]
    command = [sys.executable, "-c", "from bsharedrag.cli import app; app()", "serve", "--run", str(run_dir),
               "--host", "127.0.0.1", "--port", str(port), *sets]
    with open(log, "a") as handle:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT)
