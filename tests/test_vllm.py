"""The vLLM engine: the client's protocol, the server command, RAG and serving over it; and, where the
optional vLLM environment exists (scripts/install_vllm.sh), the real vLLM against the native engine."""

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from serving_fixtures import QUESTION, make_client, served_rag, served_run  # noqa: F401
from test_serving import sse_events
from tiny import FakeRetriever, make_doc, tiny_backbone

from bsharedrag.config import GeneratorConfig, LoraSettings, VllmConfig
from bsharedrag.model.generate import generate, stop_token_ids
from bsharedrag.model.prompt import encode_prompt
from bsharedrag.model.vllm import VllmClient, VllmError, VllmServer, lora_rank_bound, vllm_python_default
from bsharedrag.rag import RAG, Answer, Citation, Retrieved

DOCS = [make_doc(1), make_doc(2, title="Crisper drawer"), make_doc(3)]


class _Completions(BaseHTTPRequestHandler):
    """An OpenAI-style `/v1/completions` that streams `server.chunks` as server-sent events (vLLM's
    wire format), recording each request body; `server.status` other than 200 answers an error."""

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(body)
        if self.server.status != 200:
            self.send_response(self.server.status)
            self.end_headers()
            self.wfile.write(b'{"error": "model not found"}')
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for chunk in self.server.chunks:
            event = {"choices": [{"index": 0, "text": chunk}]}
            self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")

    def log_message(self, *args):
        pass


@pytest.fixture
def completions():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Completions)
    server.requests, server.chunks, server.status = [], ["It fits ", "[2]", " but not [7]."], 200
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield server
    server.shutdown()


@pytest.fixture(scope="module")
def backbone():
    backbone = tiny_backbone()
    backbone.add_adapter("generator", LoraSettings(r=4, alpha=8))
    return backbone


@pytest.mark.parametrize(("rank", "bound"), [(1, 1), (4, 8), (8, 8), (16, 16), (17, 32), (512, 512)])
def test_lora_rank_bound_is_the_smallest_rank_vllm_accepts(rank, bound):
    assert lora_rank_bound(rank) == bound


def test_a_lora_rank_vllm_cannot_serve_is_refused():
    with pytest.raises(VllmError, match="up to 512"):
        lora_rank_bound(1024)


def test_the_client_sends_token_ids_with_the_stop_ids_and_streams_the_text(completions):
    client = VllmClient(completions.url, {7, 2})
    chunks = list(client.stream([5, 6, 7], 12, adapter="generator", temperature=0.5, seed=3))
    assert chunks == ["It fits ", "[2]", " but not [7]."]
    (body,) = completions.requests
    assert body["prompt"] == [5, 6, 7] and body["model"] == "generator" and body["max_tokens"] == 12
    assert body["stop_token_ids"] == [2, 7] and body["stream"] is True and body["seed"] == 3
    list(client.stream([5], 1, adapter=None))
    assert completions.requests[-1]["model"] == "backbone" and "seed" not in completions.requests[-1]


def test_the_async_client_streams_the_same_chunks(completions):
    async def read():
        return [chunk async for chunk in VllmClient(completions.url, []).astream([5, 6], 4)]

    assert asyncio.run(read()) == completions.chunks


def test_an_error_status_or_a_server_that_is_gone_raises_vllm_error(completions):
    completions.status = 404
    with pytest.raises(VllmError, match="404.*model not found"):
        list(VllmClient(completions.url, []).stream([5], 4))
    with pytest.raises(VllmError, match="did not answer"):
        list(VllmClient("http://127.0.0.1:9", []).stream([5], 4))


@pytest.mark.parametrize("bad", [{"prompt_ids": []}, {"max_new_tokens": 0}])
def test_an_empty_prompt_or_no_tokens_is_refused_before_any_request(completions, bad):
    arguments = {"prompt_ids": [1], "max_new_tokens": 4, **bad}
    with pytest.raises(ValueError):
        list(VllmClient(completions.url, []).stream(**arguments))
    assert completions.requests == []


def test_a_rag_on_the_remote_engine_sends_the_native_prompt_and_cites_only_given_passages(backbone, completions):
    settings = GeneratorConfig()
    remote = VllmClient(completions.url, stop_token_ids(backbone.tokenizer, backbone.base))
    answer = RAG(backbone, FakeRetriever(DOCS), settings, remote=remote).ask("Does it fit?")
    assert answer.text == "It fits [2] but not ."  # [7] points at no given passage
    assert answer.citations == [Citation(2, "d2", "Crisper drawer")]
    assert completions.requests[0]["prompt"] == encode_prompt(backbone.tokenizer, "Does it fit?", DOCS, settings).ids


def test_the_remote_adapter_need_not_be_loaded_here(completions):
    bare = tiny_backbone()  # no adapter: vLLM holds the generator
    rag = RAG(bare, FakeRetriever(DOCS), GeneratorConfig(), adapter="generator", remote=VllmClient(completions.url, []))
    assert rag.ask("Does it fit?").citations
    assert completions.requests[0]["model"] == "generator"


def test_astream_yields_the_passages_the_chunks_then_the_answer(backbone, completions):
    rag = RAG(backbone, None, GeneratorConfig(), remote=VllmClient(completions.url, []))
    hits = FakeRetriever(DOCS).search(["q"], 3)[0]

    async def read(passages):
        return [part async for part in rag.astream("Does it fit?", passages, 16)]

    retrieved, *chunks, answer = asyncio.run(read(hits))
    assert isinstance(retrieved, Retrieved) and retrieved.passages == hits
    assert chunks == ["It fits ", "[2]", " but not ."] and isinstance(answer, Answer)
    assert answer.text == "It fits [2] but not ." and [c.number for c in answer.citations] == [2]
    requests = len(completions.requests)
    _, text, empty = asyncio.run(read([]))  # no passage: said so, and nothing is generated
    assert "no passage" in text and empty.citations == [] and len(completions.requests) == requests


def test_ask_many_on_the_remote_engine_keeps_the_order(backbone, completions):
    rag = RAG(backbone, None, GeneratorConfig(), remote=VllmClient(completions.url, []))
    hits = FakeRetriever(DOCS).search(["q"], 3)[0]
    answers = rag.ask_many([(f"Question {n}?", hits) for n in range(6)], 8, together=3)
    assert [a.text for a in answers] == ["It fits [2] but not ."] * 6
    assert sorted(r["prompt"][-20:] != [] for r in completions.requests) == [True] * 6


def test_the_server_command_serves_the_backbone_and_the_adapters(tmp_path):
    adapter = tmp_path / "generator"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 12}))
    settings = VllmConfig(python=Path("/opt/vllm/bin/python"), memory_share=0.25, extra_args=["--enforce-eager"])
    command = VllmServer(tmp_path / "model", {"generator": adapter}, settings).command(8123)
    assert command[:3] == ["/opt/vllm/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    joined = " ".join(command)
    assert f"--model {tmp_path / 'model'}" in joined and "--served-model-name backbone" in joined
    assert f"--lora-modules generator={adapter}" in joined and "--max-lora-rank 16" in joined
    assert "--gpu-memory-utilization 0.25" in joined and "--port 8123" in joined
    assert command[-1] == "--enforce-eager"


def test_starting_without_the_vllm_environment_says_how_to_install_it(tmp_path):
    settings = VllmConfig(python=tmp_path / "nowhere" / "python")
    with pytest.raises(VllmError, match="install_vllm.sh"):
        VllmServer(tmp_path, {}, settings).start()


_VLLM_PYTHON = vllm_python_default()


@pytest.mark.skipif(not _VLLM_PYTHON.exists(), reason="no .venv-vllm: run scripts/install_vllm.sh to test on vLLM")
def test_vllm_answers_as_the_native_engine_does(tmp_path):
    """A tiny random Llama and its generator LoRA, served by vLLM (fp32), answer greedily as the native engine."""
    import torch

    backbone = tiny_backbone(seed=3, hidden_size=128)  # vLLM's CPU attention needs heads of 32 or more
    model_dir = tmp_path / "model"
    backbone.base.save_pretrained(model_dir)
    backbone.tokenizer.save_pretrained(model_dir)
    backbone.add_adapter("generator", LoraSettings(r=8, alpha=16))
    with torch.no_grad():  # a LoRA that changes the output: B is zero when it is made
        for name, parameter in backbone.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    backbone.save_adapter("generator", tmp_path / "generator")
    prompt = encode_prompt(backbone.tokenizer, "Does it fit?", DOCS, GeneratorConfig()).ids
    settings = VllmConfig(dtype="float32", max_model_len=1024, memory_share=0.05)
    with VllmServer(model_dir, {"generator": tmp_path / "generator"}, settings) as server:
        client = VllmClient(server.url, stop_token_ids(backbone.tokenizer, backbone.base))
        for adapter in ("generator", None):
            remote = "".join(client.stream(prompt, 12, adapter=adapter))
            assert remote == generate(backbone, prompt, 12, adapter=adapter)


# --- serving with answers from the remote engine ---------------------------------------------


@pytest.fixture
def remote_client(served_rag, served_run, completions, monkeypatch):
    monkeypatch.delenv("BSHAREDRAG_API_KEY", raising=False)
    rag = RAG(served_rag.backbone, served_rag.retriever, served_rag.settings, served_rag.adapter,
              remote=VllmClient(completions.url, []))
    with make_client(rag, served_run, "serve.engine=vllm", "serve.queue_size=2") as client:
        yield client


def test_ask_on_the_remote_engine_retrieves_here_and_answers_from_vllm(remote_client, completions):
    completions.chunks = ["It boils fast ", "[1]", "."]
    body = remote_client.post("/v1/ask", json={"question": QUESTION, "top_k": 2}).json()
    assert body["answer"] == "It boils fast [1]." and len(body["passages"]) == 2
    assert [c["number"] for c in body["citations"]] == [1]
    assert completions.requests[-1]["model"] == "generator" and completions.requests[-1]["max_tokens"] == 8
    with remote_client.stream("POST", "/v1/ask", json={"question": QUESTION, "top_k": 2, "stream": True}) as response:
        events = sse_events(response.read().decode())
    assert [event for event, _ in events] == ["passages", "token", "token", "token", "answer"]
    assert json.loads(events[-1][1]) == body
    chat = remote_client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": QUESTION}]})
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"].startswith("It boils fast")


def test_a_failing_remote_engine_answers_503_and_the_server_stays_up(remote_client, completions):
    completions.status = 500
    failed = remote_client.post("/v1/ask", json={"question": QUESTION})
    assert failed.status_code == 503 and "answer engine failed" in failed.json()["detail"]
    assert failed.headers["Retry-After"]
    assert remote_client.post("/v1/search", json={"question": QUESTION}).status_code == 200
    completions.status = 200
    assert remote_client.post("/v1/ask", json={"question": QUESTION}).status_code == 200
