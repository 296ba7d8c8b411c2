import numpy as np
import pytest

from bsharedrag.data import Document
from bsharedrag.model.index import IndexMismatchError, VectorIndex


def _unit(rows):
    rows = np.asarray(rows, dtype=np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


@pytest.fixture
def index(tmp_path):
    docs = [Document("a", "A", "alpha", "p1"), Document("b", "B", "beta", "p1"), Document("c", "C", "gamma", "p2")]
    return VectorIndex.create(tmp_path / "idx", docs, _unit([[1, 0, 0], [0, 1, 0], [0, 0, 1]]),
                              {"backbone": "bb1", "adapter": "ad1"})


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
