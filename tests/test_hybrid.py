from bsharedrag.data import Document
from bsharedrag.model.hybrid import HybridRetriever, choose_weight, fuse, pseudo_queries
from bsharedrag.model.index import Hit

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
    weight, scores = choose_weight(useless_dense, good_lexical, relevant, k=1)
    assert weight <= 0.4 and scores[weight] == 1.0 and scores[1.0] == 0.0
    weight, _ = choose_weight(good_lexical, useless_dense, relevant, k=1)
    assert weight >= 0.6
    weight, _ = choose_weight(good_lexical, good_lexical, relevant, k=1)
    assert weight == 0.5  # both as good: the tie goes to the middle


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

    def search(self, questions, top_k, product_id=None):
        self.calls.append(product_id)
        return [[h for h in self.hits if product_id is None or h.doc.product_id == product_id][:top_k]
                for _ in questions]


def test_the_hybrid_retriever_filters_both_sides_by_product():
    dense, lexical = _Fixed(_hits(0, 3, 1)), _Fixed(_hits(4, 2, 0))
    (row,) = HybridRetriever(dense, lexical, 0.5).search(["q"], 2, product_id="p1")
    assert {h.doc.product_id for h in row} == {"p1"} and len(row) == 2 and dense.calls == ["p1"]
