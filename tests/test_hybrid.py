import signal
import subprocess
import sys

import numpy as np
import pytest

from bsharedrag.data import Document
from bsharedrag.model.hybrid import HybridRetriever, LexicalIndex, choose_weight, fit_hybrid, fuse, pseudo_queries
from bsharedrag.model.index import Hit, VectorIndex

DOCS = [Document(f"d{n}", "", f"passage {n}", "p1" if n < 3 else "p2") for n in range(6)]


def _hits(*numbers, scores=None):
    return [Hit(DOCS[n], s) for n, s in zip(numbers, scores or [1.0 - i / 10 for i in range(len(numbers))])]


def test_fusion_weights_move_between_the_two_sides():
    dense, lexical = _hits(0, 1, 2), _hits(3, 4, 0)
    assert [h.doc.id for h in fuse(dense, lexical, 1.0)][:3] == ["d0", "d1", "d2"]  # dense alone
    assert [h.doc.id for h in fuse(dense, lexical, 0.0)][:3] == ["d3", "d4", "d0"]  # BM25 alone
    assert fuse(dense, lexical, 0.5)[0].doc.id == "d0"  # ranked by both sides
    interpolated = fuse(_hits(0, 1, scores=[0.9, 0.1]), _hits(1, 0, scores=[10.0, 2.0]), 0.75, "interpolate")
    assert [(h.doc.id, h.score) for h in interpolated] == [("d0", 0.75), ("d1", 0.25)]  # min-max scaled sides


def test_the_chosen_weight_follows_the_side_that_finds_the_passages():
    relevant = [{"d3": 1}, {"d4": 1}]
    useless_dense = [_hits(0, 1, 2), _hits(0, 1, 2)]
    good_lexical = [_hits(3, 5), _hits(4, 5)]
    weight, scores = choose_weight(useless_dense, good_lexical, relevant)
    assert weight == 0.0 and scores[0.0] == {"mrr@10": 1.0, "hit@3": 1.0} and scores[1.0]["hit@3"] == 0.0
    assert choose_weight(good_lexical, useless_dense, relevant)[0] == 1.0
    assert choose_weight(good_lexical, good_lexical, relevant)[0] == 1.0  # as good: the dense side alone


def _ranked(gold: int, rank: int, reverse: bool = False) -> list[Hit]:
    """A ranking of DOCS with passage `gold` at 1-based `rank`, the others around it (in reverse order: as
    another retriever ranks them)."""
    others = [n for n in range(6) if n != gold][:: -1 if reverse else 1]
    return _hits(*others[: rank - 1], gold, *others[rank - 1:])


def test_a_fusion_is_chosen_only_when_it_beats_the_better_side_beyond_chance():
    # each side finds half of the passages first and the other half lower down: fused, every one comes first
    relevant = [{f"d{n % 6}": 1} for n in range(30)]
    dense = [_ranked(n % 6, 1 if n < 15 else 3) for n in range(30)]
    lexical = [_ranked(n % 6, 2 if n < 15 else 1, reverse=True) for n in range(30)]
    weight, scores = choose_weight(dense, lexical, relevant)
    assert 0 < weight < 1 and scores[weight]["mrr@10"] > max(scores[0.0]["mrr@10"], scores[1.0]["mrr@10"])
    # a fusion that wins on one question and loses on another is noise: the better side alone
    relevant, dense, lexical = [{"d0": 1}, {"d1": 1}], [_ranked(0, 2), _ranked(1, 1)], [_ranked(0, 1, True), _ranked(1, 4, True)]
    weight, scores = choose_weight(dense, lexical, relevant)
    assert weight in (0.0, 1.0) and scores[weight]["mrr@10"] == max(scores[0.0]["mrr@10"], scores[1.0]["mrr@10"])


def test_pseudo_queries_are_spans_of_their_passage_in_either_language():
    corpus = [Document("en", "", "the kettle boils water in three minutes and has a steel lid"),
              Document("zh", "", "这款保温杯采用不锈钢内胆，可以保温十二小时")]
    pairs = dict((next(iter(relevant)), question) for question, relevant in pseudo_queries(corpus, 5, seed=1))
    assert set(pairs) == {"en", "zh"}
    assert pairs["en"] in corpus[0].text and len(pairs["en"].split()) == 8
    assert " " not in pairs["zh"] and set(pairs["zh"]) <= set(corpus[1].text)  # jieba words, joined unspaced


class _Fixed:
    def __init__(self, hits):
        self.hits, self.calls = hits, []

    def search(self, questions, top_k, product_id=None, vectors=None):
        self.calls.append(product_id)
        return [[h for h in self.hits if product_id is None or h.doc.product_id == product_id][:top_k]
                for _ in questions]


def test_the_hybrid_retriever_filters_both_sides_by_product():
    dense, lexical = _Fixed(_hits(0, 3, 1)), _Fixed(_hits(4, 2, 0))
    (row,) = HybridRetriever(dense, lexical, 0.5).search(["q"], 2, product_id="p1")
    assert {h.doc.product_id for h in row} == {"p1"} and len(row) == 2 and dense.calls == ["p1"]


def _unit(rows):
    rows = np.asarray(rows, dtype=np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


@pytest.fixture
def catalogue(tmp_path):
    docs = [Document("kettle", "Kettle", "the kettle boils water in three minutes", "p1"),
            Document("mat", "Mat", "a thick yoga mat that does not slip", "p2"),
            Document("cup", "杯子", "这款保温杯采用不锈钢内胆，可以保温十二小时", "p3")]
    return VectorIndex.create(tmp_path / "idx", docs, _unit(np.eye(3)), {"backbone": "b", "adapter": "a"})


def _ids(rows):
    return [[hit.doc.id for hit in row] for row in rows]


def test_the_bm25_side_follows_upserts_and_deletes_of_the_vector_index(catalogue):
    lexical = LexicalIndex(catalogue)
    assert _ids(lexical.search(["kettle boils", "保温杯保温多久"], 1)) == [["kettle"], ["cup"]]  # jieba for Chinese
    catalogue.upsert([Document("lamp", "Lamp", "a solar lamp charged by sunlight", "p4")], _unit([[1, 1, 0]]))
    assert _ids(lexical.search(["solar lamp"], 1)) == [["lamp"]]  # an acknowledged upsert reaches BM25 at once
    catalogue.upsert([Document("kettle", "Kettle", "an electric teapot", "p1")], _unit([[1, 0, 1]]))
    matched = [hit.doc.id for hit in lexical.search(["boils water minutes"], 4)[0] if hit.score > 0]
    assert "kettle" not in matched  # a replaced text is forgotten
    catalogue.delete(["mat"])
    assert "mat" not in _ids(lexical.search(["yoga mat"], 4))[0]
    assert {hit.doc.id for hit in lexical.search(["a"], 10)[0]} == {d.id for d in catalogue.documents()}
    catalogue.delete([d.id for d in catalogue.documents()])
    assert lexical.search(["lamp"], 3) == [[]]  # an empty catalogue finds nothing, without an error


_KILLED_AFTER_UPSERT = """
import os, signal, sys
import numpy as np
from bsharedrag.data import Document
from bsharedrag.model.index import VectorIndex
index = VectorIndex.open(sys.argv[1])
index.upsert([Document("lamp", "Lamp", "a solar lamp charged by sunlight", "p4")], np.array([[0.6, 0.8, 0.0]], "float32"))
index.delete(["mat"])
os.kill(os.getpid(), signal.SIGKILL)  # before any snapshot is written
"""


def test_after_a_kill_both_sides_come_back_with_every_committed_update(catalogue, tmp_path):
    folder = catalogue.folder
    catalogue.save()
    killed = subprocess.run([sys.executable, "-c", _KILLED_AFTER_UPSERT, str(folder)], capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    reopened = VectorIndex.open(folder)
    dense = {hit.doc.id for hit in reopened.search(_unit(np.eye(3)), 5)[0]}
    lexical = {hit.doc.id for hit in LexicalIndex(reopened).search(["a"], 10)[0]}
    assert dense == lexical == {"kettle", "cup", "lamp"}


class _VectorsOnly:
    """A dense side that must be given the question vectors (it cannot embed)."""

    def __init__(self, index):
        self.index = index

    def search(self, questions, top_k, product_id=None, vectors=None):
        assert vectors is not None
        return self.index.search(vectors, top_k, product_id=product_id)


def test_the_hybrid_searches_with_given_vectors_and_keeps_to_a_product(catalogue):
    hybrid = HybridRetriever(_VectorsOnly(catalogue), LexicalIndex(catalogue), 0.5)
    rows = hybrid.search(["kettle boils", "yoga mat"], 2, vectors=_unit([[1, 0, 0], [0, 1, 0]]))
    assert [row[0].doc.id for row in rows] == ["kettle", "mat"]
    assert _ids(hybrid.search(["kettle boils"], 3, product_id="p2", vectors=_unit([[1, 0, 0]]))) == [["mat"]]


class _AlwaysTheCup:
    """A dense side that ranks the Chinese cup first for every question (a retriever trained on another language)."""

    def __init__(self, index):
        self.index = index

    def search(self, questions, top_k, product_id=None, vectors=None):
        return self.index.search(_unit([[0, 0, 1]] * len(questions)), top_k)


def test_the_fitted_weight_leans_on_bm25_when_the_dense_side_is_weak_and_records_its_choice(catalogue):
    fillers = [Document(f"cup-{n}", "", f"保温杯 {n} 号", "p3") for n in range(3)]
    catalogue.upsert(fillers, _unit([[0, 0.1 * n, 1] for n in range(1, 4)]))  # the dense side's top 3: cups only
    pairs = [("kettle boils water", {"kettle": 1}), ("thick yoga mat", {"mat": 1})]
    hybrid = fit_hybrid(_AlwaysTheCup(catalogue), LexicalIndex(catalogue), pairs, "hand-made", "rrf")
    assert hybrid.weight <= 0.4
    assert hybrid.chosen["validation"] == "hand-made" and hybrid.chosen["questions"] == 2
    assert hybrid.chosen["scores_by_weight"][hybrid.weight]["hit@3"] == 1.0
