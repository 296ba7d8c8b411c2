"""Hybrid first stage: the dense retriever and BM25 fused, with the fusion weight chosen on validation questions.

Two fusions, each of a candidate list of `depth` hits from either side:

* `rrf` (reciprocal rank fusion): score = w / (60 + dense rank) + (1 - w) / (60 + BM25 rank);
* `interpolate`: both sides' scores min-max normalised over the candidates, score = w * dense + (1 - w) * BM25.

`w` = 1 is the dense retriever alone, 0 is BM25 alone. `choose_weight` tries a grid of weights on
validation questions with known passages and keeps the best by Hit@k (ties go to the weight nearer
0.5), so the fusion is never below its better side on those questions: when the dense side is weak
(a Chinese catalogue served by a retriever trained on English questions), the weight moves to BM25.
Without labelled questions, `pseudo_queries` makes them from the corpus itself (a span of a passage
asks for that passage, the inverse cloze task), which favours word overlap, so it errs towards BM25.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from ..data import Document
from ..metrics import hit_at_k
from ..text import has_cjk, words
from .index import Hit

__all__ = ["DEPTH", "FUSIONS", "HybridRetriever", "choose_weight", "fuse", "pseudo_queries"]

FUSIONS = ("rrf", "interpolate")
DEPTH = 50  # candidates taken from each side before fusing
_RRF_K = 60
WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def fuse(dense: Sequence[Hit], lexical: Sequence[Hit], weight: float, method: str = "rrf") -> list[Hit]:
    """One question's fused ranking of the union of both candidate lists, best first."""
    if method not in FUSIONS:
        raise ValueError(f"unknown fusion {method!r}; known: {', '.join(FUSIONS)}")
    docs = {hit.doc.id: hit.doc for hit in [*dense, *lexical]}
    if method == "rrf":
        def side(hits):
            return {hit.doc.id: 1.0 / (_RRF_K + rank) for rank, hit in enumerate(hits, 1)}
    else:
        def side(hits):
            if not hits:
                return {}
            low, high = min(h.score for h in hits), max(h.score for h in hits)
            return {h.doc.id: (h.score - low) / (high - low) if high > low else 1.0 for h in hits}
    ours, theirs = side(dense), side(lexical)
    scores = {doc_id: weight * ours.get(doc_id, 0.0) + (1 - weight) * theirs.get(doc_id, 0.0) for doc_id in docs}
    return [Hit(docs[doc_id], score) for doc_id, score in sorted(scores.items(), key=lambda item: (-item[1], item[0]))]


class HybridRetriever:
    """The dense retriever and a BM25 retriever over the same documents, fused (see the module docstring)."""

    name = "hybrid"

    def __init__(self, dense, lexical, weight: float, method: str = "rrf", depth: int = DEPTH):
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"the fusion weight must lie in [0, 1], got {weight}")
        self.dense, self.lexical, self.weight, self.method, self.depth = dense, lexical, weight, method, depth

    def search(self, questions: list[str], top_k: int, product_id: str | None = None) -> list[list[Hit]]:
        depth = max(self.depth, top_k)
        dense = self.dense.search(questions, depth, product_id=product_id)
        lexical = self.lexical.search(questions, depth)
        if product_id is not None:
            lexical = [[hit for hit in row if hit.doc.product_id == product_id] for row in lexical]
        return [fuse(d, b, self.weight, self.method)[:top_k] for d, b in zip(dense, lexical, strict=True)]


def choose_weight(dense_hits: list[list[Hit]], lexical_hits: list[list[Hit]], relevant: list[dict[str, int]],
                  method: str = "rrf", k: int = 3, weights: Sequence[float] = WEIGHTS) -> tuple[float, dict]:
    """The weight with the best mean Hit@k on the validation questions (ties: nearest 0.5), and every weight's score."""
    if not relevant:
        raise ValueError("no validation question to choose the fusion weight on")
    scores = {}
    for weight in weights:
        fused = [fuse(d, b, weight, method) for d, b in zip(dense_hits, lexical_hits, strict=True)]
        scores[weight] = sum(hit_at_k(rel, [h.doc.id for h in row], k) for rel, row in zip(relevant, fused)) / len(fused)
    best = max(scores.values())
    chosen = min((w for w, score in scores.items() if score == best), key=lambda w: abs(w - 0.5))
    return chosen, scores


def pseudo_queries(corpus: Sequence[Document], count: int, seed: int = 0,
                   span_words: int = 8) -> list[tuple[str, dict[str, int]]]:
    """(question, {doc id: 1}) pairs made from the corpus: a random span of a passage's words asks for it."""
    rng = random.Random(seed)
    pairs = []
    for doc in rng.sample(list(corpus), min(count, len(corpus))):
        tokens = words(doc.text, lower=False)
        if len(tokens) < 3:
            continue
        start = rng.randrange(max(1, len(tokens) - span_words + 1))
        separator = "" if has_cjk(doc.text) else " "
        pairs.append((separator.join(tokens[start: start + span_words]), {doc.id: 1}))
    return pairs
