"""A hostile client: invalid Unicode, non-finite numbers, loose types and unreachable ids get a 422,
never a 5xx; one bad request never fails another; a large upsert does not stop searches."""

from __future__ import annotations

import asyncio
import json
import urllib.parse

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serving_fixtures import AUTH, KEY, QUESTION, make_client, run_config, served_rag, served_run, uvicorn_thread  # noqa: F401

from bsharedrag.data import Document
from bsharedrag.serving import create_app
from bsharedrag.serving.catalogue import upsert_steps
from bsharedrag.serving.scheduler import Scheduler

SURROGATE = "\udfff"
CHAT = "/v1/chat/completions"


@pytest.fixture
def client(served_rag, served_run):
    with make_client(served_rag, served_run, "serve.max_document_chars=500", f"serve.api_key={KEY}") as client:
        yield client


def _raw(client, method: str, path: str, text: str):
    """Send `text` as the JSON body unchanged: Python's json writes NaN, Infinity and \\udfff escapes."""
    return client.request(method, path, content=text.encode(), headers={**AUTH, "Content-Type": "application/json"})


def _user(content) -> dict:
    return {"messages": [{"role": "user", "content": content}]}


UNENCODABLE = [
    ("POST", "/v1/search", {"question": f"kettle {SURROGATE}"}),
    ("POST", "/v1/search", {"question": "kettle", "product_id": SURROGATE}),
    ("POST", "/v1/ask", {"question": f"kettle {SURROGATE}"}),
    ("PUT", "/v1/documents", {"documents": [{"_id": "u1", "title": SURROGATE, "text": "x"}]}),
    ("PUT", "/v1/documents", {"documents": [{"_id": "u1", "text": f"x{SURROGATE}"}]}),
    ("PUT", "/v1/documents", {"documents": [{"_id": "u1", "text": "x", "colour": [SURROGATE]}]}),
    ("PUT", "/v1/documents", {"documents": [{"_id": "u1", "text": "x", SURROGATE: "key"}]}),
    ("POST", "/v1/embeddings", {"input": ["ok", SURROGATE]}),
    ("POST", CHAT, _user(f"kettle {SURROGATE}")),
    ("POST", CHAT, _user([{"type": "text", "text": SURROGATE}])),
    ("POST", CHAT, {**_user("q"), SURROGATE: 1}),  # an ignored unknown field, named in no error
]


@pytest.mark.parametrize(("method", "path", "body"), UNENCODABLE)
def test_invalid_unicode_is_a_422_and_the_connection_survives(client, method, path, body):
    response = _raw(client, method, path, json.dumps(body))
    assert response.status_code == 422, response.text
    assert "lone surrogate" in response.text or "\\udfff" in response.text
    assert client.post("/v1/search", json={"question": QUESTION}).status_code == 200


NON_FINITE = [(path, field, literal) for literal in ("NaN", "Infinity", "-Infinity", "1e400")
              for path, field in (("/v1/search", "top_k"), ("/v1/ask", "max_new_tokens"), (CHAT, "temperature"),
                                  (CHAT, "top_p"), (CHAT, "max_tokens"))]


@pytest.mark.parametrize(("path", "field", "literal"), NON_FINITE)
def test_non_finite_numbers_are_a_422(client, path, field, literal):
    body = json.dumps(_user("kettle?") if path == CHAT else {"question": "kettle?"})
    response = _raw(client, "POST", path, body[:-1] + f', "{field}": {literal}}}')
    assert response.status_code == 422, response.text
    assert field in response.text


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-5])
def test_a_vanishing_temperature_decodes_greedily(client, temperature):
    body = {**_user(QUESTION), "temperature": temperature, "max_tokens": 4, "seed": 1}
    response = client.post(CHAT, json=body)
    assert response.status_code == 200, response.text
    greedy = client.post(CHAT, json={**_user(QUESTION), "max_tokens": 4}).json()
    assert response.json()["choices"][0]["message"] == greedy["choices"][0]["message"]


LOOSE = [
    ("PUT", "/v1/documents", {"documents": [{"_id": True, "text": "x"}]}, "documents.0._id"),
    ("PUT", "/v1/documents", {"documents": [{"_id": 1.0, "text": "x"}]}, "documents.0._id"),
    ("PUT", "/v1/documents", {"documents": [{"_id": "a", "text": "x", "product_id": False}]}, "product_id"),
    ("PUT", "/v1/documents", {"documents": [{"_id": "a\nb", "text": "x"}]}, "line breaks"),
    ("PUT", "/v1/documents", {"documents": [{"_id": "a" * 257, "text": "x"}]}, "at most 256"),
    ("PUT", "/v1/documents", {"documents": [{"_id": "a", "text": "x", "product_id": "p\r1"}]}, "line breaks"),
    ("PUT", "/v1/documents", {"documents": [{"_id": "a", "title": "t" * 500, "text": "x"}]}, "max_document_chars"),
    ("PUT", "/v1/documents", {"documents": [{"_id": "a", "text": "x", "specs": "s" * 500}]}, "max_document_chars"),
    ("POST", "/v1/search", {"question": "q", "top_k": "5"}, "valid integer"),
    ("POST", "/v1/search", {"question": "q", "top_k": 2.0}, "valid integer"),
    ("POST", "/v1/search", {"question": "q", "product_id": 7}, "valid string"),
    ("POST", "/v1/ask", {"question": "q", "stream": "yes"}, "valid boolean"),
    ("POST", "/v1/ask", {"question": "q", "stream": 1}, "valid boolean"),
    ("POST", CHAT, {**_user("q"), "stream": "yes"}, "valid boolean"),
]


@pytest.mark.parametrize(("method", "path", "body", "fragment"), LOOSE)
def test_ids_flags_and_numbers_are_strict_and_every_field_is_bounded(client, method, path, body, fragment):
    response = client.request(method, path, json=body, headers=AUTH)
    assert response.status_code == 422, response.text
    assert fragment in response.text or fragment in json.dumps(response.json()["detail"][0]["loc"]).replace(
        '", ', ".").replace('"', "").replace(", ", ".")


def test_a_stored_id_can_always_be_read_and_deleted(client):
    doc_id = "shop/ünïcode id?# " + "x" * 200  # ("%" too over HTTP; TestClient decodes paths twice)
    assert client.put("/v1/documents", json={"documents": [{"_id": doc_id, "text": "x"}]}, headers=AUTH).status_code == 200
    path = "/v1/documents/" + urllib.parse.quote(doc_id, safe="")
    assert client.get(path).json()["_id"] == doc_id
    assert client.delete(path, headers=AUTH).status_code == 200
    assert client.get(path).status_code == 404


def test_a_keep_alive_connection_survives_bad_requests(served_rag, served_run):
    """Over a real server: after each refused body, the same connection still serves a normal search."""
    app = create_app(served_rag, run_config(served_run))
    bodies = [("/v1/search", json.dumps({"question": SURROGATE})), ("/v1/search", '{"question": "q", "top_k": NaN}'),
              (CHAT, json.dumps(_user(SURROGATE))), (CHAT, json.dumps({**_user("q"), "temperature": 1e-300}))]
    with uvicorn_thread(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        for path, body in bodies:
            refused = http.post(path, content=body, headers={"Content-Type": "application/json"})
            assert refused.status_code < 500, refused.text
            assert http.post("/v1/search", json={"question": QUESTION}).status_code == 200
        assert len(http._transport._pool.connections) == 1  # one connection served all eight requests


def test_a_bad_search_does_not_fail_its_neighbours(served_rag, served_run):
    """The probe's case: a surrogate product id among 15 normal concurrent searches."""
    app = create_app(served_rag, run_config(served_run))

    async def burst(url: str) -> list[int]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            good = [http.post("/v1/search", json={"question": f"{QUESTION} {i}"}) for i in range(15)]
            bad = http.post("/v1/search", content=json.dumps({"question": "kettle", "product_id": SURROGATE}),
                            headers={"Content-Type": "application/json"})
            return [r.status_code for r in await asyncio.gather(bad, *good)]

    with uvicorn_thread(app) as url:
        for _ in range(3):
            assert asyncio.run(burst(url)) == [422] + [200] * 15


def test_searches_run_between_the_slices_of_an_upsert(served_rag):
    """A search queued behind a 6-slice upsert is answered after the first slice, before anything is stored."""
    index = served_rag.retriever.index
    before = len(index)
    docs = [Document(f"slice-{n}", "Mop", f"spin mop number {n}") for n in range(6)]
    order: list[str] = []
    scheduler = Scheduler(capacity=8, max_batch=4)

    def search(items):
        order.append(f"search with {len(index) - before} new documents stored")
        return [len(items)] * len(items)

    def upsert():
        for embedded in upsert_steps(served_rag.retriever, docs, slice_documents=1):
            order.append(f"embedded {embedded}")
            yield embedded

    async def main():
        async def run_upsert():
            async for _ in scheduler.stream(upsert):
                pass

        task = asyncio.ensure_future(run_upsert())
        await asyncio.sleep(0)  # the upsert is queued first
        searched = scheduler.submit_batched("search", search, "q")
        scheduler.start()
        await task
        searched.result(10)

    try:
        asyncio.run(main())
    finally:
        scheduler.stop(10)
        index.delete([doc.id for doc in docs])
    assert order[:2] == ["embedded 1", "search with 0 new documents stored"]
    assert order[-1] == "embedded 6" and len(index) == before


# --- fuzzing: any JSON at all, with invalid Unicode and non-finite numbers, never gets a 5xx ---------

_text = st.text(st.characters(exclude_categories=()), max_size=12)  # surrogates included
_scalar = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), _text,
                    st.floats(allow_nan=True, allow_infinity=True))
_json = st.recursive(_scalar, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
                     max_leaves=8)
_FIELDS = {
    "/v1/search": ["question", "top_k", "product_id"],
    "/v1/ask": ["question", "top_k", "product_id", "max_new_tokens"],
    "/v1/embeddings": ["input", "input_type", "encoding_format", "dimensions"],
    CHAT: ["messages", "temperature", "top_p", "max_tokens", "seed", "top_k", "retrieval", "product_id"],
    "/v1/documents": ["documents"],
}
_VALID = {"/v1/search": {"question": "kettle?"}, "/v1/ask": {"question": "kettle?", "max_new_tokens": 2},
          "/v1/embeddings": {"input": "kettle"}, CHAT: {**_user("kettle?"), "max_tokens": 2},
          "/v1/documents": {"documents": [{"_id": "fuzz-1", "text": "x"}]}}


@st.composite
def _bodies(draw):
    path = draw(st.sampled_from(sorted(_FIELDS)))
    body = dict(_VALID[path])
    for field in draw(st.lists(st.sampled_from(_FIELDS[path]), min_size=1, max_size=2, unique=True)):
        body[field] = draw(_json)
    if path == CHAT and draw(st.booleans()):
        body["messages"] = [{"role": "user", "content": draw(_json)}]
    return path, body


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_bodies())
def test_fuzzed_bodies_never_get_a_server_error(client, case):
    path, body = case
    response = _raw(client, "PUT" if path == "/v1/documents" else "POST", path, json.dumps(body))
    assert response.status_code < 500, (body, response.text)


@pytest.mark.parametrize("stream", [False, True])
def test_a_filter_that_matches_nothing_gets_no_invented_answer(client, stream):
    response = client.post("/v1/ask", json={"question": "Is it waterproof?", "product_id": "NOPE-1", "stream": stream})
    assert response.status_code == 200
    answer = json.loads(response.text.split("event: answer\ndata: ")[1]) if stream else response.json()
    assert answer["passages"] == [] and answer["citations"] == [] and "no passage" in answer["answer"]
    chat = client.post(CHAT, json={**_user("Is it waterproof?"), "product_id": "NOPE-1"}).json()
    assert "no passage" in chat["choices"][0]["message"]["content"] and chat["citations"] == []
