"""The reranker adapter: pair scores, reranking a first stage, the listwise objective and its stage."""

import json
import random

import numpy as np
import pytest

from bsharedrag.config import RerankerConfig, load_config
from bsharedrag.model.index import Hit
from bsharedrag.model.reranker import RerankedRetriever, Reranker
from bsharedrag.pipeline import run_stages
from bsharedrag.rag import load_rag
from bsharedrag.run import Run
from bsharedrag.train.reranker import RerankExample, _group, train_reranker
from conftest import tiny_overrides
from tiny import make_doc, tiny_backbone

DOCS = [make_doc(i, f"passage {i}: " + " ".join(["word"] * (i % 5)) + f" fact {i}") for i in range(12)]


class FixedFirstStage:
    """A first stage that returns the same ranked hits for every question."""

    name = "fixed"
    encoder = index = None

    def __init__(self, docs):
        self.docs = docs
        self.asked = []

    def search(self, questions, top_k, product_id=None, vectors=None):
        self.asked.append(top_k)
        return [[Hit(doc, 1.0 - i / 100) for i, doc in enumerate(self.docs[:top_k])] for _ in questions]


@pytest.fixture(scope="module")
def reranker():
    return Reranker(tiny_backbone(), RerankerConfig(depth=8), adapter=None)


def test_reranking_only_permutes_the_first_stage_candidates(reranker):
    first = FixedFirstStage(DOCS)
    reranked = RerankedRetriever(first, reranker)
    (hits,) = reranked.search(["does it fit?"], 5)
    candidates = {doc.id for doc in DOCS[:8]}
    assert first.asked == [8] and reranked.name == "fixed+rerank"
    assert len(hits) == 5 and len({h.doc.id for h in hits}) == 5 and {h.doc.id for h in hits} <= candidates
    (everything,) = RerankedRetriever(first, reranker).search(["does it fit?"], 8)
    assert sorted(h.doc.id for h in everything) == sorted(candidates)  # all of them, reordered by score
    scores = [h.score for h in everything]
    assert scores == sorted(scores, reverse=True)
    assert [h.doc.id for h in everything[:5]] == [h.doc.id for h in hits]
    (deeper,) = reranked.search(["does it fit?"], 10)  # a top k past the depth reranks that many
    assert first.asked[-1] == 10 and len(deeper) == 10


def test_scores_are_deterministic_and_do_not_depend_on_the_batch(reranker):
    question = "is it waterproof?"
    once = reranker.score(question, DOCS)
    assert np.array_equal(once, reranker.score(question, DOCS))
    one_at_a_time = Reranker(reranker.backbone, RerankerConfig(batch_tokens=1), adapter=None)
    np.testing.assert_allclose(one_at_a_time.score(question, DOCS), once, atol=1e-5)
    assert len(set(np.round(once, 4))) > 1  # the pairs are told apart
    assert reranker.rerank(question, [], 3) == []


def test_the_memo_scores_a_pair_once(monkeypatch):
    memo = {}
    reranker = Reranker(tiny_backbone(), RerankerConfig(), adapter=None, memo=memo)
    first = reranker.score("q", DOCS[:4])
    calls = []
    forward = reranker.forward
    monkeypatch.setattr(reranker, "forward", lambda rows: calls.append(len(rows)) or forward(rows))
    again = reranker.score("q", DOCS[2:6])
    assert calls == [2] and len(memo) == 6  # only the two new pairs ran
    np.testing.assert_allclose(again[:2], first[2:])


def test_a_group_holds_the_positive_then_half_mined_half_missed_negatives():
    example = RerankExample("q", (DOCS[0],), mined=tuple(DOCS[1:5]), misses=(DOCS[0], *DOCS[5:9]))
    group = _group(example, 4, random.Random(0))
    assert group[0] == DOCS[0]
    assert len({d.id for d in group[1:] if d in DOCS[1:5]}) == 2 and group[3:] == DOCS[5:7]  # a positive is never a miss
    short = RerankExample("q", (DOCS[0],), mined=(DOCS[1],), misses=tuple(DOCS[5:9]))
    assert _group(short, 4, random.Random(0))[1:] == [DOCS[1], *DOCS[5:8]]  # the misses fill in
    assert len(_group(RerankExample("q", (DOCS[0],), (), ()), 4, random.Random(0))) == 1


def test_listwise_training_learns_to_put_the_positive_first(tmp_path):
    backbone = tiny_backbone(seed=1)
    positives = [make_doc(100 + i, f"the answer to question {i} is here") for i in range(8)]
    examples = [RerankExample(f"question {i}", (positives[i],), mined=tuple(DOCS[i : i + 3]), misses=())
                for i in range(8)]
    settings = RerankerConfig(lr=5e-3, batch_size=4, micro_batch_size=2, max_steps=30, epochs=20, negatives_per_query=3,
                              warmup_ratio=0.0)
    stats = train_reranker(backbone, examples, settings, tmp_path / "reranker", seed=0)
    assert stats["steps"] == 30 and stats["final_loss"] < 0.5 * stats["first_loss"]
    assert (tmp_path / "reranker" / "adapter_config.json").exists()
    trained = Reranker(backbone, settings)
    wins = [trained.score(ex.query, [ex.positives[0], *ex.mined]).argmax() == 0 for ex in examples]
    assert sum(wins) >= 6


def test_the_stage_trains_the_third_adapter_and_search_and_eval_rerank(tiny_model_dir, tiny_dataset, tmp_path):
    overrides = [*tiny_overrides(tiny_model_dir, tiny_dataset, tmp_path / "run"), "reranker.enabled=true",
                 f"reranker.datasets={json.dumps([{'path': str(tiny_dataset), 'split': 'train'}])}",
                 "reranker.batch_size=2", "reranker.max_steps=2", "reranker.lora.r=4", "reranker.depth=6",
                 "eval.systems=[bsharedrag,bm25,hybrid]", "eval.generation=false"]
    run = Run(load_config(overrides=overrides))
    done = run_stages(run)
    assert done["reranker"]["stats"]["steps"] == 2 and done["reranker"]["inputs"]["retriever"] == done["retriever"]["id"]
    assert done["eval"]["inputs"]["reranker"] == done["reranker"]["id"]
    rag = load_rag(Run.open(run.folder))
    assert isinstance(rag.retriever, RerankedRetriever) and rag.retriever.depth == 6
    assert sorted(rag.backbone.adapters) == ["generator", "reranker", "retriever"]  # one backbone, three adapters
    assert len(rag.search("Is it waterproof?", top_k=3)) == 3
    from fastapi.testclient import TestClient

    from bsharedrag.serving import create_app

    with TestClient(create_app(rag, load_config(run.config_file, ["serve.max_new_tokens=4"], run_dir=str(run.folder)))) as client:
        searched = client.post("/v1/search", json={"question": "Is it waterproof?", "top_k": 4}).json()["passages"]
        direct = rag.retriever.search(["Is it waterproof?"], 4)[0]
        assert [p["_id"] for p in searched] == [hit.doc.id for hit in direct]  # the server reranks too
        asked = client.post("/v1/ask", json={"question": "Is it waterproof?", "top_k": 2}).json()
        assert [p["_id"] for p in asked["passages"]] == [hit.doc.id for hit in direct[:2]]
    results = json.loads(run.eval_results().read_text())
    assert list(results["retrieval"]) == ["bsharedrag", "bsharedrag+rerank", "bm25", "hybrid", "hybrid+rerank"]
    assert set(results["search_ms_per_query"]) >= {"bsharedrag+rerank", "hybrid+rerank"}
    for system in ("bsharedrag", "hybrid"):  # reranking 10 of the first stage's hits reorders those 10
        for qid, ranked in results["runs"][system + "+rerank"].items():
            assert sorted(ranked) == sorted(results["runs"][system][qid]) and len(ranked) == 10
    off = Run.open(run.folder, ["reranker.enabled=false"])
    assert not off.reranks and not isinstance(off.first_stage(), RerankedRetriever)
