"""Catalogue updates survive kill -9 of the server; a batch cut short leaves nothing; the CLI does the same."""

from __future__ import annotations

import shutil
import signal
import threading
import time

import httpx
import pytest
from serving_fixtures import AUTH, free_port, served_run, start_server, wait_healthy  # noqa: F401
from typer.testing import CliRunner

from bsharedrag.cli import app as cli
from bsharedrag.model.index import VectorIndex

BIG = 1500  # documents in the batch that is killed mid-way


@pytest.fixture
def run_copy(served_run, tmp_path):
    """A private copy of the finished run, so that these updates touch no other test."""
    return shutil.copytree(served_run, tmp_path / "run")


def _docs(prefix: str, count: int, **fields) -> list[dict]:
    text = "a sturdy steel frame with a long warranty and many colours to choose from " * 4
    return [{"_id": f"{prefix}-{n}", "title": f"{prefix} {n}", "text": text, **fields} for n in range(count)]


def _gauge(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"metric {name} missing")


def _present(url: str, ids: list[str]) -> int:
    return sum(httpx.get(f"{url}/v1/documents/{doc_id}", timeout=10).status_code == 200 for doc_id in ids)


def test_acknowledged_updates_survive_kill_9_and_a_killed_batch_is_all_or_nothing(run_copy, tmp_path):
    port, log = free_port(), tmp_path / "server.log"
    url = f"http://127.0.0.1:{port}"
    overrides = (f"serve.max_batch_documents={BIG}", "serve.max_body_bytes=10000000")
    server = start_server(run_copy, port, log, *overrides)
    try:
        wait_healthy(url, 180, server, log)
        acked = _docs("acked", 3) + [{"_id": "p1-d0", "title": "Acme Kettle 1.7L", "text": "boils in 90 seconds"}]
        assert httpx.put(f"{url}/v1/documents", json={"documents": acked}, headers=AUTH, timeout=60).status_code == 200
        assert httpx.delete(f"{url}/v1/documents/p2-d1", headers=AUTH, timeout=30).status_code == 200

        big = _docs("big", BIG)
        outcome: dict = {}

        def send_big():
            try:
                outcome["status"] = httpx.put(f"{url}/v1/documents", json={"documents": big}, headers=AUTH,
                                              timeout=120).status_code
            except httpx.HTTPError as error:
                outcome["error"] = error

        sender = threading.Thread(target=send_big)
        sender.start()
        deadline = time.monotonic() + 60
        while _gauge(url, "bsharedrag_queue_depth") < 1 and "status" not in outcome and time.monotonic() < deadline:
            time.sleep(0.005)
        server.send_signal(signal.SIGKILL)  # mid-batch: the upsert job is queued or embedding
        server.wait(30)
        sender.join(60)
        acknowledged = outcome.get("status") == 200  # normally not: the kill lands while the batch embeds

        server = start_server(run_copy, port, log, *overrides)  # the dead server's lock went with it
        wait_healthy(url, 180, server, log)
        assert _present(url, [d["_id"] for d in acked[:3]]) == 3
        assert httpx.get(f"{url}/v1/documents/p1-d0").json()["text"] == "boils in 90 seconds"
        assert httpx.get(f"{url}/v1/documents/p2-d1").status_code == 404
        landed = _present(url, [d["_id"] for d in big[:: BIG // 10]])
        documents = httpx.get(f"{url}/healthz").json()["documents"]
        assert (landed, documents) in ((0, 24 + 3 - 1), (10, 24 + 3 - 1 + BIG))  # all of the batch or none
        assert landed == 10 or not acknowledged
        found = httpx.post(f"{url}/v1/search", json={"question": "acked 1", "top_k": 50}).json()["passages"]
        assert "acked-1" in {p["_id"] for p in found} and "p2-d1" not in {p["_id"] for p in found}

        assert httpx.delete(f"{url}/v1/documents/acked-2", headers=AUTH, timeout=30).status_code == 200
        documents -= 1
        server.send_signal(signal.SIGTERM)  # a clean shutdown writes the FAISS snapshot of the changed index
        assert server.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down
        assert "index snapshot written" in log.read_text()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(30)
    index = VectorIndex.open(run_copy / "index")
    assert index.manifest["count"] == len(index) == documents


def test_cli_docs_add_and_rm(run_copy, tmp_path):
    runner, run = CliRunner(), str(run_copy)
    corpus = tmp_path / "new.jsonl"
    corpus.write_text('{"_id": "cli-1", "title": "Mop", "text": "spin mop", "product_id": "p9"}\n'
                      '{"_id": "cli-2", "title": "Bucket", "text": "ten litres"}\n')
    added = runner.invoke(cli, ["docs", "add", str(corpus), "--run", run])
    assert added.exit_code == 0, added.output
    assert "upserted 2 documents; the index holds 26" in added.output

    removed = runner.invoke(cli, ["docs", "rm", "cli-1", "nope", "--run", run])
    assert removed.exit_code == 0, removed.output
    assert "removed 1 documents; the index holds 25" in removed.output and "not in the index: nope" in removed.output
    index = VectorIndex.open(run_copy / "index")
    assert index.get("cli-2").text == "ten litres" and index.get("cli-1") is None

    ids = tmp_path / "ids.txt"
    ids.write_text("cli-2\n\n")
    from_file = runner.invoke(cli, ["docs", "rm", "--ids-file", str(ids), "--run", run])
    assert from_file.exit_code == 0 and "removed 1 documents; the index holds 24" in from_file.output
    assert runner.invoke(cli, ["docs", "rm", "--run", run]).exit_code == 1
    unknown = runner.invoke(cli, ["docs", "rm", "nope", "--run", run])
    assert unknown.exit_code == 1 and "none of the ids is in the index (nope)" in unknown.output

    corpus.write_text('{"_id": "bad\\nid", "text": "x"}\n')
    refused = runner.invoke(cli, ["docs", "add", str(corpus), "--run", run])
    assert refused.exit_code == 1 and "new.jsonl:1" in refused.output and "line breaks" in refused.output

    corpus.write_text('{"_id": "cli-3", "title": "Mop"}\n')
    broken = runner.invoke(cli, ["docs", "add", str(corpus), "--run", run])
    assert broken.exit_code == 1 and "new.jsonl:1" in broken.output and "`text` must be a string" in broken.output


def test_cli_refuses_to_write_while_a_server_holds_the_index(run_copy, tmp_path):
    port, log = free_port(), tmp_path / "server.log"
    server = start_server(run_copy, port, log)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", 180, server, log)
        refused = CliRunner().invoke(cli, ["docs", "rm", "p1-d0", "--run", str(run_copy)])
        assert refused.exit_code == 1 and "in use by server pid" in refused.output
        second = start_server(run_copy, free_port(), tmp_path / "second.log")
        assert second.wait(180) == 1 and "in use by server pid" in (tmp_path / "second.log").read_text()
    finally:
        server.kill()
        server.wait(30)
