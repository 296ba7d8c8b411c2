import numpy as np
import pytest

from bsharedrag.data import Document
from bsharedrag.model.index import IndexMismatchError, VectorIndex


def _unit(rows):
    rows = np.asarray(rows, dtype=np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


@pytest.fixture(params=["flat", "ivf", "hnsw"])
def index(tmp_path, request):
    docs = [Document("a", "A", "alpha", "p1"), Document("b", "B", "beta", "p1"), Document("c", "C", "gamma", "p2")]
    return VectorIndex.create(tmp_path / "idx", docs, _unit([[1, 0, 0], [0, 1, 0], [0, 0, 1]]),
                              {"backbone": "bb1", "adapter": "ad1", "faiss": {"kind": request.param}})


def test_search_ranks_by_inner_product_and_filters_by_product(index):
    hits = index.search(_unit([[0.9, 0.1, 0.4]]), 2)[0]
    assert [h.doc.id for h in hits] == ["a", "c"]
    assert hits[0].score > hits[1].score
    assert {h.doc.id for h in index.search(_unit([[0, 0, 1]]), 3, product_id="p1")[0]} == {"a", "b"}
    assert index.search(_unit([[0, 0, 1]]), 3, product_id="nope") == [[]]


def test_upsert_and_delete_survive_reopening(index, tmp_path):
    index.upsert([Document("d", "D", "delta"), Document("a", "A2", "alpha two")], _unit([[1, 1, 0], [0, 0, 1]]))
    assert index.delete(["b", "missing"]) == 1
    reopened = VectorIndex.open(tmp_path / "idx", expect={"backbone": "bb1", "adapter": "ad1"})
    assert len(reopened) == 3
    assert reopened.get("a").title == "A2" and reopened.get("b") is None
    assert reopened.search(_unit([[0, 0, 1]]), 1)[0][0].doc.id in {"a", "c"}


def test_index_built_with_another_adapter_is_refused(index, tmp_path):
    with pytest.raises(IndexMismatchError, match="adapter"):
        VectorIndex.open(tmp_path / "idx", expect={"backbone": "bb1", "adapter": "other"})
    with pytest.raises(FileNotFoundError, match="bsharedrag index"):
        VectorIndex.open(tmp_path / "nothing")


APPROXIMATE = [{"kind": "hnsw"}, {"kind": "ivf", "ivf_probe": 64}]  # ivf: 56 lists, all probed


def _graph(tmp_path, count: int, spec: dict):
    rng = np.random.default_rng(0)
    docs = [Document(f"d{n}", "", f"passage {n}", f"p{n % 7}") for n in range(count)]
    vectors = _unit(rng.normal(size=(count, 16)))
    return VectorIndex.create(tmp_path / "graph", docs, vectors, {"faiss": spec}), vectors


@pytest.mark.parametrize("spec", APPROXIMATE, ids=lambda spec: spec["kind"])
def test_an_approximate_index_skips_removed_vectors_and_is_compacted_when_they_pile_up(tmp_path, spec):
    index, vectors = _graph(tmp_path, 200, spec)
    assert index.search(vectors[:1], 1)[0][0].doc.id == "d0"
    index.delete(["d0"])
    index.upsert([Document("d1", "", "moved", "p1")], vectors[2:3])  # d1 now points where d2 does
    assert len(index) == 199 and index.search(vectors[:1], 200)[0][0].doc.id != "d0"
    assert {h.doc.id for h in index.search(vectors[2:3], 2)[0]} == {"d1", "d2"}
    assert len(index.search(vectors[:1], 500)[0]) == 199  # every live document once, no removed one
    index.save()
    reopened = VectorIndex.open(tmp_path / "graph")  # the snapshot keeps the removed vectors: skipped again
    assert len(reopened) == 199 and "d0" not in {h.doc.id for h in reopened.search(vectors[:1], 10)[0]}
    assert reopened._tombstones and reopened._faiss.ntotal == 201
    reopened.delete([f"d{n}" for n in range(3, 80)])
    reopened.save()
    compacted = VectorIndex.open(tmp_path / "graph")  # over a quarter removed: rebuilt from the store
    assert not compacted._tombstones and compacted._faiss.ntotal == len(compacted) == 122


@pytest.mark.parametrize("spec", [{"kind": "hnsw"}, {"kind": "ivf", "ivf_probe": 1}], ids=lambda spec: spec["kind"])
def test_a_product_search_is_exact_on_an_approximate_index(tmp_path, spec):
    index, vectors = _graph(tmp_path, 200, spec)
    for n in range(0, 200, 29):
        hits = index.search(vectors[n:n + 1], 3, product_id=f"p{n % 7}")[0]
        assert hits[0].doc.id == f"d{n}" and all(h.doc.product_id == f"p{n % 7}" for h in hits)
