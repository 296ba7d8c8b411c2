"""Every endpoint of the app on a tiny finished run: answers, auth, bounds (4xx, never 5xx), streaming."""

from __future__ import annotations

import json

import pytest
from serving_fixtures import AUTH, KEY, QUESTION, make_client, served_rag, served_run  # noqa: F401

@pytest.fixture
def client(served_rag, served_run, monkeypatch):
    monkeypatch.delenv("BSHAREDRAG_API_KEY", raising=False)
    limits = ["serve.max_question_chars=200", "serve.max_top_k=5", "serve.max_batch_documents=3",
              "serve.max_body_bytes=20000", "serve.max_document_chars=500", f"serve.api_key={KEY}"]
    with make_client(served_rag, served_run, *limits) as client:
        yield client


def sse_events(text: str) -> list[tuple[str | None, str]]:
    """(event, data) of each server-sent event in a response body."""
    events = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        events.append((fields.get("event"), fields["data"]))
    return events


# --- native QA ---------------------------------------------------------------------------------


def test_search_returns_top_k_passages_best_first(client):
    passages = client.post("/v1/search", json={"question": QUESTION, "top_k": 4}).json()["passages"]
    assert len(passages) == 4
    assert [p["score"] for p in passages] == sorted((p["score"] for p in passages), reverse=True)
    assert {"_id", "title", "text", "product_id", "score"} <= set(passages[0])


def test_search_filters_by_product(client):
    passages = client.post("/v1/search", json={"question": QUESTION, "top_k": 5, "product_id": "p3"}).json()["passages"]
    assert len(passages) == 3 and {p["product_id"] for p in passages} == {"p3"}
    empty = client.post("/v1/search", json={"question": QUESTION, "product_id": "no-such-product"})
    assert empty.status_code == 200 and empty.json() == {"passages": []}


def test_ask_answers_with_citations_and_passages(client):
    body = client.post("/v1/ask", json={"question": QUESTION, "top_k": 2}).json()
    assert isinstance(body["answer"], str) and len(body["passages"]) <= 2
    assert all(1 <= c["number"] <= len(body["passages"]) for c in body["citations"])


def test_ask_streams_tokens_then_the_same_answer(client):
    plain = client.post("/v1/ask", json={"question": QUESTION}).json()
    with client.stream("POST", "/v1/ask", json={"question": QUESTION, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response.read().decode())
    (first_event, first_data), *tokens, (last_event, last_data) = events
    assert first_event == "passages" and json.loads(first_data)["passages"] == plain["passages"]  # before any text
    assert tokens and {event for event, _ in tokens} == {"token"}
    assert last_event == "answer" and json.loads(last_data) == plain  # greedy decoding: the same answer
    assert "".join(json.loads(data)["text"] for _, data in tokens).strip() == plain["answer"]


# --- OpenAI-compatible ---------------------------------------------------------------------------


def test_embeddings_follow_the_openai_wire_format(client):
    import numpy as np

    body = client.post("/v1/embeddings", json={"input": ["red kettle", "blue case"], "model": "any"}).json()
    assert body["object"] == "list" and isinstance(body["model"], str)
    assert [(d["object"], d["index"]) for d in body["data"]] == [("embedding", 0), ("embedding", 1)]
    vectors = np.array([d["embedding"] for d in body["data"]])
    assert vectors.shape == (2, 32) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-4)
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0

    packed = client.post("/v1/embeddings", json={"input": "red kettle", "encoding_format": "base64"}).json()
    decoded = np.frombuffer(__import__("base64").b64decode(packed["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, vectors[0], atol=1e-5)  # what the OpenAI Python client decodes
    passage = client.post("/v1/embeddings", json={"input": "red kettle", "input_type": "passage"}).json()
    assert not np.allclose(passage["data"][0]["embedding"], vectors[0])  # the passage prefix differs


def test_chat_completion_follows_the_openai_wire_format(client):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": QUESTION}]
    body = client.post("/v1/chat/completions", json={"model": "gpt-x", "messages": messages}).json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert isinstance(body["created"], int) and isinstance(body["model"], str)
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str) and choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] > 0 and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

    closed = client.post("/v1/chat/completions", json={"messages": messages, "retrieval": False}).json()
    assert closed["citations"] == [] and closed["usage"]["prompt_tokens"] < usage["prompt_tokens"]


def test_chat_completion_streams_openai_chunks(client):
    parts = [{"type": "text", "text": QUESTION}]  # the content-parts form of a message
    request = {"messages": [{"role": "user", "content": parts}], "stream_options": {"include_usage": True}}
    plain = client.post("/v1/chat/completions", json=request).json()
    with client.stream("POST", "/v1/chat/completions", json={**request, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response.read().decode())
    assert all(event is None for event, _ in events) and events[-1][1] == "[DONE]"
    chunks = [json.loads(data) for _, data in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    *content, final, usage = chunks
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in content)
    assert text.strip() == plain["choices"][0]["message"]["content"]
    assert final["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert usage["choices"] == [] and usage["usage"] == plain["usage"]


def test_models_lists_the_served_model(client):
    body = client.get("/v1/models").json()
    assert body["object"] == "list" and body["data"][0]["object"] == "model"


# --- catalogue ---------------------------------------------------------------------------------


def test_documents_upsert_get_search_replace_delete(client):
    doc = {"_id": "new/1", "title": "Frost Fridge", "text": "keeps food cold", "product_id": "p9", "colour": "white"}
    put = client.put("/v1/documents", json={"documents": [doc]}, headers=AUTH)
    assert put.status_code == 200 and put.json()["ids"] == ["new/1"] and put.json()["upserted"] == 1
    assert client.get("/v1/documents/new/1").json() == doc  # extra fields survive; ids may hold slashes
    found = client.post("/v1/search", json={"question": "fridge", "product_id": "p9"}).json()["passages"]
    assert [p["_id"] for p in found] == ["new/1"]

    client.put("/v1/documents", json={"documents": [{**doc, "text": "now frost free"}]}, headers=AUTH)
    assert client.get("/v1/documents/new/1").json()["text"] == "now frost free"
    count = client.get("/healthz").json()["documents"]
    deleted = client.delete("/v1/documents/new/1", headers=AUTH)
    assert deleted.json() == {"deleted": "new/1", "documents": count - 1}
    assert client.get("/v1/documents/new/1").status_code == 404
    assert client.delete("/v1/documents/new/1", headers=AUTH).status_code == 404
    assert client.post("/v1/search", json={"question": "fridge", "product_id": "p9"}).json() == {"passages": []}


def test_health_and_metrics(client):
    client.post("/v1/ask", json={"question": QUESTION})
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["generator"] is True
    assert set(health["adapters"]) == {"retriever", "generator"} and health["documents"] >= 24
    text = client.get("/metrics").text
    assert 'bsharedrag_requests_total{method="POST",route="/v1/ask",status="200"} 1.0' in text
    assert "bsharedrag_request_seconds_bucket" in text and "bsharedrag_queue_wait_seconds" in text
    assert float(text.split('bsharedrag_generated_tokens_total{endpoint="ask"} ')[1].split()[0]) >= 1


def test_web_page_and_its_assets_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and 'id="question"' in page.text and 'id="admin-status"' in page.text
    assert client.get("/static/app.js").status_code == 200 and client.get("/static/style.css").status_code == 200
    for icon in ("/favicon.ico", "/static/favicon.svg"):  # browsers ask for /favicon.ico whatever the page says
        response = client.get(icon)
        assert response.status_code == 200 and response.headers["content-type"].startswith("image/svg+xml")
    assert "/v1/search" in client.get("/openapi.json").json()["paths"]


def test_concurrent_asks_are_decoded_together_and_answer_as_they_do_alone(client, served_rag, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from bsharedrag.model import generate as generation

    questions = [QUESTION, "is it waterproof?", "how long is the battery life?", "does it fit a small bag?"]
    alone = [client.post("/v1/ask", json={"question": q}).json()["answer"] for q in questions]
    rows = []
    step = generation.DecodeBatch.step
    monkeypatch.setattr(generation.DecodeBatch, "step", lambda self: (rows.append(len(self.running)), step(self))[1])
    with ThreadPoolExecutor(len(questions)) as pool:
        together = list(pool.map(lambda q: client.post("/v1/ask", json={"question": q}).json()["answer"], questions))
    assert together == alone
    assert max(rows) > 1, "no decode step ran more than one answer"


def test_a_kv_budget_too_small_for_one_answer_is_refused_at_start_up(served_rag, served_run):
    with pytest.raises(ValueError, match="serve.kv_cache_mib"):
        with make_client(served_rag, served_run, "serve.kv_cache_mib=0.001"):
            pass
