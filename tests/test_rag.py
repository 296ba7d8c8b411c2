import pytest
from tiny import FakeRetriever, make_doc, tiny_backbone

from bsharedrag import rag as rag_module
from bsharedrag.config import GeneratorConfig, LoraSettings
from bsharedrag.rag import RAG, Answer, Citation, Retrieved

DOCS = [make_doc(1), make_doc(2, title="Crisper drawer"), make_doc(3)]


@pytest.fixture(scope="module")
def backbone():
    backbone = tiny_backbone()
    backbone.add_adapter("generator", LoraSettings(r=4, alpha=8))
    return backbone


@pytest.fixture
def retriever():
    return FakeRetriever(DOCS)


def _scripted(chunks):
    def fake_stream_tokens(backbone, prompt_ids, max_new_tokens, adapter="generator", **sampling):
        assert adapter == "generator" and prompt_ids
        yield from chunks

    return fake_stream_tokens


def test_ask_cites_only_given_passages(backbone, retriever, monkeypatch):
    monkeypatch.setattr(rag_module, "stream_tokens", _scripted(["It fits ", "[2]", " but not [7]."]))
    answer = RAG(backbone, retriever, GeneratorConfig()).ask("Does it fit?", product_id="B001")

    assert answer.text == "It fits [2] but not ."  # [7] points at no given passage
    assert answer.citations == [Citation(2, "d2", "Crisper drawer")]
    assert [hit.doc.id for hit in answer.passages] == ["d1", "d2", "d3"]
    assert retriever.calls == [(["Does it fit?"], 3, "B001")]


def test_ask_with_the_tiny_model_returns_a_consistent_answer(backbone, retriever):
    answer = RAG(backbone, retriever, GeneratorConfig(top_k=2)).ask("Does it fit?", max_new_tokens=12)
    assert isinstance(answer, Answer) and len(answer.passages) == 2
    assert all(1 <= citation.number <= 2 for citation in answer.citations)


def test_stream_yields_the_passages_then_text_chunks_then_the_answer(backbone, retriever):
    parts = list(RAG(backbone, retriever, GeneratorConfig()).stream("Is it waterproof?", max_new_tokens=10))
    retrieved, *chunks, answer = parts
    assert isinstance(retrieved, Retrieved)
    assert chunks and all(isinstance(chunk, str) for chunk in chunks)
    assert isinstance(answer, Answer) and answer.text == "".join(chunks).strip()
    assert retrieved.passages == answer.passages


def test_passages_cut_from_the_prompt_are_not_returned(backbone, monkeypatch):
    long_docs = [make_doc(n, " ".join(f"word{i}" for i in range(300))) for n in (1, 2, 3)]
    monkeypatch.setattr(rag_module, "stream_tokens", _scripted(["See [3]."]))
    settings = GeneratorConfig(max_passage_tokens=200, max_prompt_len=300)
    answer = RAG(backbone, FakeRetriever(long_docs), settings).ask("Does it fit?")
    assert len(answer.passages) < 3 and answer.citations == []


def test_closed_book_settings_skip_retrieval(backbone, retriever):
    answer = RAG(backbone, retriever, GeneratorConfig(with_passages=False)).ask("Is it red?", max_new_tokens=4)
    assert answer.passages == [] and answer.citations == [] and retriever.calls == []


def test_zero_shot_runs_the_bare_model(retriever):
    answer = RAG(tiny_backbone(), retriever, GeneratorConfig(), adapter=None).ask("Is it red?", max_new_tokens=4)
    assert isinstance(answer, Answer)


@pytest.mark.parametrize("call", ["ask", "stream", "search"])
@pytest.mark.parametrize("question", ["", "   ", "\n\t"])
def test_empty_question_raises(backbone, retriever, call, question):
    with pytest.raises(ValueError, match="question must be non-empty"):
        getattr(RAG(backbone, retriever, GeneratorConfig()), call)(question)
    assert retriever.calls == []


@pytest.mark.parametrize("top_k", [0, -1, 2.5])
def test_bad_top_k_raises(backbone, retriever, top_k):
    with pytest.raises(ValueError, match="top_k"):
        RAG(backbone, retriever, GeneratorConfig()).search("Does it fit?", top_k=top_k)


@pytest.mark.parametrize("adapter", ["generator", None])
def test_given_passages_need_no_retriever(backbone, monkeypatch, adapter):
    used = []

    def fake_stream_tokens(backbone, prompt_ids, max_new_tokens, adapter="generator", **sampling):
        used.append(adapter)
        yield "Yes [1]."

    monkeypatch.setattr(rag_module, "stream_tokens", fake_stream_tokens)
    rag = RAG(backbone, None, GeneratorConfig(), adapter=adapter)
    hits = FakeRetriever(DOCS[1:]).search(["q"], 2)[0]
    answer = rag.ask("Does it fit?", passages=hits)
    assert answer.citations == [Citation(1, "d2", "Crisper drawer")] and answer.passages == hits
    assert used == [adapter]
    with pytest.raises(ValueError, match="no retriever"):
        rag.ask("Does it fit?")


def test_unknown_adapter_raises(backbone, retriever):
    with pytest.raises(KeyError, match="known adapters"):
        RAG(backbone, retriever, GeneratorConfig(), adapter="nope")


@pytest.mark.parametrize(("chunks", "expected"), [
    (["See [", "2", "]", "."], ["See ", "[2]", "."]),
    (["See [1", ", 9] and [", "7]", " too [x]"], ["See ", "[1] and ", " too [x]"]),
    (["[12", "]"], []),
    (["ends [3"], ["ends ", "[3"]),  # never closed: not a marker, sent once the answer ends
])
def test_markers_of_passages_not_given_never_reach_the_stream(backbone, retriever, monkeypatch, chunks, expected):
    monkeypatch.setattr(rag_module, "stream_tokens", _scripted(chunks))
    _, *streamed, answer = RAG(backbone, retriever, GeneratorConfig()).stream("Does it fit?")
    assert streamed == expected and answer.text == "".join(expected).strip()
    assert all(1 <= c.number <= 3 for c in answer.citations)


@pytest.mark.parametrize(("question", "fragment"), [("Is it waterproof?", "no passage"), ("防水吗？", "无法回答")])
def test_no_passage_found_says_so_and_generates_nothing(backbone, monkeypatch, question, fragment):
    def must_not_generate(*args, **kwargs):
        raise AssertionError("generated an answer from no passage")

    monkeypatch.setattr(rag_module, "stream_tokens", must_not_generate)
    answer = RAG(backbone, FakeRetriever([]), GeneratorConfig()).ask(question, product_id="NOPE-1")
    assert fragment in answer.text and answer.citations == [] and answer.passages == []


def test_answers_asked_together_are_the_answers_asked_one_by_one(backbone):
    rag = RAG(backbone, None, GeneratorConfig())
    hits = FakeRetriever(DOCS).search(["q"], 3)[0]
    requests = [(f"Does model {n} fit a {'big ' * n}fridge?", hits[: 1 + n % 3]) for n in range(7)]
    alone = [rag.ask(question, passages=passages, max_new_tokens=6 + n) for n, (question, passages) in
             enumerate(requests)]
    ended = []
    together = rag.ask_many(requests, max_new_tokens=10, together=3, on_answer=lambda: ended.append(1))
    assert [a.text for a in together] == [rag.ask(q, passages=p, max_new_tokens=10).text for q, p in requests]
    assert [a.passages for a in together] == [p for _, p in requests] and len(ended) == len(requests)
    assert alone  # each answer alone decodes too (and leaves no stream open behind)
    assert not backbone.decode_batches["generator"].running


def test_a_failed_answer_among_many_closes_the_others(backbone, monkeypatch):
    rag = RAG(backbone, None, GeneratorConfig())
    hits = FakeRetriever(DOCS).search(["q"], 3)[0]
    with pytest.raises(ValueError, match="non-empty"):
        rag.ask_many([("Is it red?", hits), ("  ", hits), ("Is it blue?", hits)], max_new_tokens=8, together=3)
    assert not backbone.decode_batches["generator"].running
