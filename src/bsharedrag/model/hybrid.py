"""Hybrid first stage: the dense retriever and BM25 fused, with the fusion weight chosen on validation questions.

Two fusions, each of a candidate list of `depth` hits from either side:

* `rrf` (reciprocal rank fusion): score = w / (60 + dense rank) + (1 - w) / (60 + BM25 rank);
* `interpolate`: both sides' scores min-max normalised over the candidates, score = w * dense + (1 - w) * BM25.

`w` = 1 is the dense retriever alone, 0 is BM25 alone. `choose_weight` scores a grid of weights on
validation questions with known passages by MRR@10 (a continuous score: Hit@3 on a few hundred
questions ties often) and keeps the better side alone unless a fused weight beats it by more than
chance (a paired bootstrap over the questions). A few hundred questions cannot tell nearby weights
apart, and a fused weight picked on noise costs more on new questions than it gained on these
(ePQA, 2026-12-07: Hit@3 on 200 training questions tied at 0.5 and 1.0, while on dev 0.5 gave 0.869
against 0.925 for the dense side alone). When the dense side is weak (a Chinese catalogue served by
a retriever trained on English questions), the weight moves to BM25 or to a fusion leaning on it.
Without labelled questions, `pseudo_queries` makes them from the corpus itself (a span of a passage
asks for that passage, the inverse cloze task), which favours word overlap, so it errs towards BM25.
`validation_pairs` picks between the two; `fit_hybrid` chooses the weight on them.

Served, the BM25 side is a `LexicalIndex` over the vector index's own document store: it follows
every upsert and delete (it is rebuilt from the store when the store's generation has moved), so an
acknowledged update reaches both sides, and after a crash both are rebuilt from the same SQLite rows.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..data import Document, load_dataset
from ..metrics import hit_at_k, mrr_at_k, paired_difference
from ..text import has_cjk, words
from .index import Hit, VectorIndex

__all__ = [
    "DEPTH", "FUSIONS", "HybridRetriever", "LexicalIndex", "choose_weight", "fit_hybrid", "fuse", "pseudo_queries",
    "validation_pairs",
]

log = logging.getLogger(__name__)

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
    """The dense retriever and a BM25 retriever over the same documents, fused (see the module docstring).

    `chosen` records how the weight was chosen (method, weight, validation source, Hit@3 by weight).
    """

    name = "hybrid"

    def __init__(self, dense, lexical, weight: float, method: str = "rrf", depth: int = DEPTH,
                 chosen: dict | None = None):
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"the fusion weight must lie in [0, 1], got {weight}")
        if method not in FUSIONS:
            raise ValueError(f"unknown fusion {method!r}; known: {', '.join(FUSIONS)}")
        self.dense, self.lexical, self.weight, self.method, self.depth = dense, lexical, weight, method, depth
        self.chosen = chosen or {"method": method, "weight": weight}

    @property
    def encoder(self):
        return self.dense.encoder

    @property
    def index(self):
        return self.dense.index

    def search(self, questions: list[str], top_k: int, product_id: str | None = None,
               vectors: np.ndarray | None = None) -> list[list[Hit]]:
        """Fused hits; `vectors` are the questions' embeddings when the caller has them already."""
        if self.weight == 1.0:  # the dense ranking alone (what fusing would give), without scoring BM25
            return self.dense.search(questions, top_k, product_id=product_id, vectors=vectors)
        depth = max(self.depth, top_k)
        dense = self.dense.search(questions, depth, product_id=product_id, vectors=vectors)
        lexical = self.lexical.search(questions, depth)
        if product_id is not None:
            lexical = [[hit for hit in row if hit.doc.product_id == product_id] for row in lexical]
        return [fuse(d, b, self.weight, self.method)[:top_k] for d, b in zip(dense, lexical, strict=True)]


class LexicalIndex:
    """BM25 over the documents of a `VectorIndex`, kept in step with it.

    Before each search it compares the store's generation (bumped by every committed upsert and
    delete) with the one it was built at and rebuilds when they differ, so a search after an
    acknowledged update sees it on both sides. Token lists are cached by text, so a rebuild
    tokenises only the documents that changed; bm25s itself re-indexes the whole catalogue (it has
    no incremental update), which is why this rebuilds on the first search after updates rather
    than on every update.
    """

    name = "bm25"

    def __init__(self, index: VectorIndex, stopwords: Sequence[str] = ("en", "zh")):
        from .baselines import stopword_set

        self.vector_index = index
        self.stopwords = tuple(stopwords)
        self._stopword_set = stopword_set(stopwords)
        self._tokens: dict[str, list[str]] = {}  # document text -> its BM25 tokens
        self._generation: int | None = None
        self._bm25 = None
        self._lock = threading.Lock()

    def _current(self):
        from .baselines import BM25Retriever, bm25_tokens

        with self._lock:
            generation = self.vector_index.generation  # read first: an update after it rebuilds again
            if generation != self._generation:
                docs = self.vector_index.documents()
                self._tokens = {doc.content: self._tokens.get(doc.content) or bm25_tokens(doc.content, self._stopword_set)
                                for doc in docs}  # texts no longer in the catalogue leave the cache
                tokens = [self._tokens[doc.content] for doc in docs]
                self._bm25 = BM25Retriever(docs, stopwords=self.stopwords, tokens=tokens) if docs else None
                self._generation = generation
            return self._bm25

    def search(self, questions: list[str], top_k: int) -> list[list[Hit]]:
        bm25 = self._current()
        if bm25 is None:  # an empty catalogue
            return [[] for _ in questions]
        return bm25.search(questions, top_k)


def choose_weight(dense_hits: list[list[Hit]], lexical_hits: list[list[Hit]], relevant: list[dict[str, int]],
                  method: str = "rrf", weights: Sequence[float] = WEIGHTS, seed: int = 0) -> tuple[float, dict]:
    """The fusion weight for these validation questions, and every weight's mean MRR@10 and Hit@3.

    The best weight by MRR@10 when it is a fusion whose gain over the better side alone (weight 0 or
    1, by MRR@10) has a paired bootstrap 95% interval above zero; else that side alone.
    """
    if not relevant:
        raise ValueError("no validation question to choose the fusion weight on")
    per_query, scores = {}, {}
    for weight in weights:
        fused = [[h.doc.id for h in fuse(d, b, weight, method)] for d, b in zip(dense_hits, lexical_hits, strict=True)]
        per_query[weight] = {str(i): mrr_at_k(rel, row, 10) for i, (rel, row) in enumerate(zip(relevant, fused))}
        scores[weight] = {"mrr@10": round(sum(per_query[weight].values()) / len(fused), 4),
                          "hit@3": round(sum(hit_at_k(rel, row, 3) for rel, row in zip(relevant, fused)) / len(fused), 4)}
    sides = [w for w in (1.0, 0.0) if w in scores] or list(scores)  # ties between the sides go to the dense one
    side = max(sides, key=lambda w: scores[w]["mrr@10"])
    best = max(scores, key=lambda w: (scores[w]["mrr@10"], w == side))
    if best != side and not paired_difference(per_query[best], per_query[side], seed=seed)["low"] > 0:
        best = side
    return best, scores


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


def validation_pairs(data_dir: Path, corpus: Sequence[Document], count: int, seed: int,
                     evaluated_split: str | None = None) -> tuple[list[tuple[str, dict[str, int]]], str]:
    """(question, relevant passages) pairs to choose a fusion weight on, and where they come from.

    A sample of the dataset's training questions when it has them (and the split being evaluated
    is not that one), else pseudo-queries from its corpus.
    """
    train = Path(data_dir) / "qrels" / "train.tsv"
    if evaluated_split != "train" and train.exists():
        validation = load_dataset(data_dir, "train").sample(count, seed)
        return [(q.text, validation.qrels[q.id]) for q in validation.queries], "train split"
    return pseudo_queries(corpus, count, seed), "pseudo-queries (passage spans)"


def fit_hybrid(dense, lexical, pairs: list[tuple[str, dict[str, int]]], source: str,
               method: str = "rrf", seed: int = 0) -> HybridRetriever:
    """The hybrid of `dense` and `lexical` with the weight `choose_weight` picks on `pairs`."""
    questions = [question for question, _ in pairs]
    weight, scores = choose_weight(dense.search(questions, DEPTH), lexical.search(questions, DEPTH),
                                   [relevant for _, relevant in pairs], method, seed=seed)
    log.info("hybrid: %s weight %.1f chosen on %d %s", method, weight, len(pairs), source)
    chosen = {"method": method, "weight": weight, "validation": source, "questions": len(pairs),
              "scores_by_weight": scores}
    return HybridRetriever(dense, lexical, weight, method, chosen=chosen)
