"""Auth, bounds (a clear 4xx, never a 5xx), a saturated queue (503), and 50 concurrent clients."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest
from serving_fixtures import (  # noqa: F401
    AUTH,
    KEY,
    QUESTION,
    make_client,
    run_config,
    served_rag,
    served_run,
    uvicorn_thread,
)

from bsharedrag.serving import create_app

LIMITS = ["serve.max_question_chars=200", "serve.max_top_k=5", "serve.max_batch_documents=3",
          "serve.max_body_bytes=20000", "serve.max_document_chars=500", f"serve.api_key={KEY}"]


@pytest.fixture
def client(served_rag, served_run, monkeypatch):
    monkeypatch.delenv("BSHAREDRAG_API_KEY", raising=False)
    with make_client(served_rag, served_run, *LIMITS) as client:
        yield client


def _doc(number: int, **fields) -> dict:
    return {"_id": f"bound-{number}", "title": "t", "text": "x", **fields}


# (method, path, body, expected status, a fragment of the message)
BAD_REQUESTS = [
    ("POST", "/v1/search", {"question": "q" * 201}, 422, "max_question_chars"),
    ("POST", "/v1/search", {"question": ""}, 422, "at least 1 character"),
    ("POST", "/v1/search", {"question": "  \n "}, 422, "must hold some text"),
    ("POST", "/v1/search", {"question": "q", "top_k": 6}, 422, "serve.max_top_k"),
    ("POST", "/v1/search", {"question": "q", "top_k": 0}, 422, "greater than or equal to 1"),
    ("POST", "/v1/search", {"question": "q", "top_k": "many"}, 422, "valid integer"),
    ("POST", "/v1/search", {"question": "q", "topk": 3}, 422, "Extra inputs are not permitted"),
    ("POST", "/v1/search", ["q"], 422, "valid dictionary"),
    ("POST", "/v1/search", None, 422, "Field required"),
    ("POST", "/v1/ask", {"question": "q", "max_new_tokens": 9}, 422, "serve.max_new_tokens"),
    ("POST", "/v1/ask", {"question": "q", "stream": "maybe"}, 422, "valid boolean"),
    ("PUT", "/v1/documents", {"documents": [_doc(n) for n in range(4)]}, 422, "serve.max_batch_documents"),
    ("PUT", "/v1/documents", {"documents": []}, 422, "at least 1 item"),
    ("PUT", "/v1/documents", {"documents": [_doc(1), _doc(1)]}, 422, "appears twice"),
    ("PUT", "/v1/documents", {"documents": [_doc(1, text="y" * 501)]}, 422, "serve.max_document_chars"),
    ("PUT", "/v1/documents", {"documents": [{"_id": "", "text": "x"}]}, 422, "an id must not be empty"),
    ("PUT", "/v1/documents", {"documents": [{"_id": "a"}]}, 422, "Field required"),
    ("PUT", "/v1/documents", {"documents": [_doc(1, text="z" * 400) for _ in range(60)]}, 413, "max_body_bytes"),
    ("GET", "/v1/documents/no-such-doc", None, 404, "no document with id 'no-such-doc'"),
    ("DELETE", "/v1/documents/no-such-doc", None, 404, "no document with id 'no-such-doc'"),
    ("POST", "/v1/embeddings", {"input": []}, 422, "at least one text"),
    ("POST", "/v1/embeddings", {"input": ["a", "b", "c", "d"]}, 422, "serve.max_batch_documents"),
    ("POST", "/v1/embeddings", {"input": ["ok", " "]}, 422, "input[1] is empty"),
    ("POST", "/v1/embeddings", {"input": [[1, 2, 3]]}, 422, "valid string"),
    ("POST", "/v1/embeddings", {"input": "a", "dimensions": 7}, 422, "`dimensions` must be 32"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "system", "content": "hi"}]}, 422, "last user message"),
    ("POST", "/v1/chat/completions", {"messages": []}, 422, "at least 1 item"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "q"}], "n": 2}, 422, "less than or equal"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "q"}], "max_tokens": 9}, 422,
     "`max_tokens` must be at most 8"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "q"}]}, 422, "Input should be"),
]


@pytest.mark.parametrize(("method", "path", "body", "status", "fragment"), BAD_REQUESTS)
def test_bad_requests_get_a_clear_4xx(client, method, path, body, status, fragment):
    response = client.request(method, path, json=body, headers=AUTH)
    assert response.status_code == status, response.text
    assert fragment in response.text


def test_a_body_over_the_limit_without_content_length_is_refused(client):
    chunks = iter([b'{"question": "', b"q" * 25_000, b'"}'])
    response = client.post("/v1/search", content=chunks, headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and "serve.max_body_bytes" in response.json()["detail"]


def test_malformed_json_is_a_422(client):
    response = client.post("/v1/search", content=b'{"question": ', headers={"Content-Type": "application/json"})
    assert response.status_code == 422 and "JSON decode error" in response.text


# --- auth ------------------------------------------------------------------------------------

WRITES = [("PUT", "/v1/documents", {"documents": [_doc(9)]}), ("DELETE", "/v1/documents/bound-9", None)]


@pytest.mark.parametrize(("method", "path", "body"), WRITES)
@pytest.mark.parametrize(("headers", "status"), [({}, 401), ({"Authorization": "Bearer wrong"}, 401),
                                                 ({"Authorization": KEY}, 401), (AUTH, 200)])
def test_writes_need_the_key(client, method, path, body, headers, status):
    if method == "DELETE" and status == 200:
        client.put("/v1/documents", json={"documents": [_doc(9)]}, headers=AUTH)
    response = client.request(method, path, json=body, headers=headers)
    assert response.status_code == status, response.text
    if status == 401:
        assert response.headers["www-authenticate"] == "Bearer"


def test_writes_are_refused_with_a_hint_when_no_key_is_configured(served_rag, served_run, monkeypatch):
    monkeypatch.delenv("BSHAREDRAG_API_KEY", raising=False)
    with make_client(served_rag, served_run) as client:
        response = client.put("/v1/documents", json={"documents": [_doc(1)]}, headers=AUTH)
    assert response.status_code == 403
    assert "BSHAREDRAG_API_KEY" in response.json()["detail"] and "serve.api_key" in response.json()["detail"]


def test_the_environment_key_wins_over_the_config(served_rag, served_run, monkeypatch):
    monkeypatch.setenv("BSHAREDRAG_API_KEY", "from-env")
    with make_client(served_rag, served_run, f"serve.api_key={KEY}") as client:
        doc = {"documents": [_doc(5)]}
        assert client.put("/v1/documents", json=doc, headers=AUTH).status_code == 401
        assert client.put("/v1/documents", json=doc, headers={"Authorization": "Bearer from-env"}).status_code == 200
        client.delete("/v1/documents/bound-5", headers={"Authorization": "Bearer from-env"})


@pytest.mark.parametrize(("method", "path", "body"), [
    ("POST", "/v1/search", {"question": QUESTION}), ("POST", "/v1/ask", {"question": QUESTION}),
    ("POST", "/v1/embeddings", {"input": "x"}), ("GET", "/v1/models", None), ("GET", "/v1/documents/p1-d0", None),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": QUESTION}]}),
])
def test_closed_reads_need_the_key(served_rag, served_run, monkeypatch, method, path, body):
    monkeypatch.delenv("BSHAREDRAG_API_KEY", raising=False)
    with make_client(served_rag, served_run, "serve.open_reads=false", f"serve.api_key={KEY}") as client:
        assert client.request(method, path, json=body).status_code == 401
        assert client.request(method, path, json=body, headers=AUTH).status_code == 200
        assert client.get("/healthz").status_code == 200  # probes stay open


def test_closed_reads_without_any_key_refuse_to_start(served_rag, served_run, monkeypatch):
    monkeypatch.delenv("BSHAREDRAG_API_KEY", raising=False)
    with pytest.raises(ValueError, match="open_reads is false but no API key"):
        create_app(served_rag, run_config(served_run, "serve.open_reads=false"))


# --- load --------------------------------------------------------------------------------------


def test_a_full_queue_answers_503_with_retry_after(served_rag, served_run):
    with make_client(served_rag, served_run, "serve.queue_size=1") as client:
        release = threading.Event()
        blocker = client.app.state.engine.scheduler.submit(release.wait)  # occupies the only slot
        try:
            response = client.post("/v1/search", json={"question": QUESTION})
        finally:
            release.set()
            blocker.result(timeout=10)
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert "serve.queue_size=1" in response.json()["detail"]
        assert client.post("/v1/search", json={"question": QUESTION}).status_code == 200


def test_fifty_concurrent_clients_are_all_served(served_rag, served_run):
    app = create_app(served_rag, run_config(served_run, "serve.max_new_tokens=4"))

    async def hammer(url: str) -> list[int]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as http:
            searches = [http.post("/v1/search", json={"question": f"{QUESTION} {i}"}) for i in range(50)]
            asks = [http.post("/v1/ask", json={"question": f"question {i}", "stream": i % 2 == 0}) for i in range(10)]
            return [r.status_code for r in await asyncio.gather(*searches, *asks)]

    with uvicorn_thread(app) as url:
        statuses = asyncio.run(hammer(url))
        metrics = httpx.get(f"{url}/metrics").text
    assert statuses == [200] * 60
    batches = float(metrics.split("bsharedrag_search_batch_size_count ")[1].split()[0])
    assert batches < 50  # queued searches were embedded together
