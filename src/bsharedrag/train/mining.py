"""Stage 2: hard-negative mining with a baseline retriever.

For each training query the baseline scores the whole corpus; known positives are dropped and
negatives are sampled from a rank window. False-negative guard: a candidate scoring above
`false_negative_margin` x the score of the query's lowest-scoring positive is dropped, as are
candidates whose text equals a positive's. The score-relative guard ("TopK-PercPos", NV-Retriever,
Moreira et al. 2024) was chosen over a fixed rank skip because unlabelled positives are the
candidates the baseline scores as high as the labelled ones, wherever they rank; with a fixed skip
the guard's strength depends on how many passages a product happens to have.

Where a dataset's qrels judge each question against every passage of its product (ePQA), the
product's unlabelled passages are known negatives, and the hardest ones: a question names its
product, so the baseline ranks them near the top, where the guard would drop them (on ePQA train
it drops 77% of them with BM25). Up to `same_product` negatives per query come from there, hardest
first, guarded only against duplicating a positive's text.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np

from ..config import MineConfig
from ..data import Dataset
from ..progress import progress

__all__ = ["mine_negatives", "random_negatives", "retriever_misses"]

Scorer = Callable[[list[str]], np.ndarray]  # questions -> (n_questions, n_docs) scores


def mine_negatives(
    dataset: Dataset, scorer: Scorer, settings: MineConfig, seed: int, judged_per_product: bool = False
) -> dict[str, list[str]]:
    """query id -> mined negative doc ids (never a labelled positive).

    `judged_per_product`: the dataset's qrels judge each question against all its product's passages.
    """
    if settings.random_negatives:
        return random_negatives(dataset, settings.num_negatives, seed)
    rng = random.Random(seed)
    doc_ids = [doc.id for doc in dataset.corpus]
    position = {doc_id: i for i, doc_id in enumerate(doc_ids)}
    texts = [doc.text.strip().lower() for doc in dataset.corpus]
    by_product: dict[str, list[int]] = {}
    if judged_per_product and settings.same_product:
        for i, doc in enumerate(dataset.corpus):
            if doc.product_id is not None:
                by_product.setdefault(doc.product_id, []).append(i)
    start, end = settings.rank_window
    mined: dict[str, list[str]] = {}
    chunk = 64
    for offset in progress(range(0, len(dataset.queries), chunk), desc=f"mine {dataset.path.name}"):
        queries = dataset.queries[offset : offset + chunk]
        scores = scorer([q.text for q in queries])  # (chunk, n_docs)
        for query, row in zip(queries, scores, strict=True):
            positives = [position[d] for d in dataset.qrels[query.id] if d in position]
            threshold = settings.false_negative_margin * float(min(row[p] for p in positives))
            positive_texts = {texts[p] for p in positives}
            own_product = [
                i for i in by_product.get(query.product_id, [])
                if doc_ids[i] not in dataset.qrels[query.id] and texts[i] not in positive_texts
            ]
            picked = sorted(own_product, key=lambda i: -row[i])[: min(settings.same_product, settings.num_negatives)]
            wanted = settings.num_negatives - len(picked)
            ranked = np.argsort(-row, kind="stable")
            in_window, beyond = [], []
            for rank in range(start, len(ranked)):
                i = int(ranked[rank])
                if (doc_ids[i] in dataset.qrels[query.id] or row[i] > threshold or texts[i] in positive_texts
                        or i in picked):
                    continue
                (in_window if rank < end else beyond).append(i)
                if rank >= end and len(in_window) + len(beyond) >= wanted:
                    break  # the guard left the window short: top it up with the next ranks
            picked += rng.sample(in_window, min(wanted, len(in_window)))
            picked += beyond[: settings.num_negatives - len(picked)]
            mined[query.id] = [doc_ids[i] for i in picked]
    return mined


def random_negatives(dataset: Dataset, count: int, seed: int) -> dict[str, list[str]]:
    """Ablation: negatives drawn uniformly from the corpus, positives excluded."""
    rng = random.Random(seed)
    doc_ids = [doc.id for doc in dataset.corpus]
    mined = {}
    for query in dataset.queries:
        negatives: list[str] = []
        while len(negatives) < min(count, len(doc_ids) - len(dataset.qrels[query.id])):
            candidate = rng.choice(doc_ids)
            if candidate not in dataset.qrels[query.id] and candidate not in negatives:
                negatives.append(candidate)
        mined[query.id] = negatives
    return mined


def retriever_misses(dataset: Dataset, retriever, count: int, depth: int) -> dict[str, list[str]]:
    """query id -> the ids of the first `count` passages among `retriever`'s top `depth` that are not
    labelled relevant and do not repeat a positive's text: the first stage's misses, best first."""
    texts = {doc.id: doc.text.strip().lower() for doc in dataset.corpus}
    misses: dict[str, list[str]] = {}
    chunk = 128
    for offset in progress(range(0, len(dataset.queries), chunk), desc=f"retriever misses {dataset.path.name}"):
        queries = dataset.queries[offset : offset + chunk]
        for query, hits in zip(queries, retriever.search([q.text for q in queries], depth), strict=True):
            relevant = dataset.qrels[query.id]
            positive_texts = {texts[d] for d in relevant if d in texts}
            misses[query.id] = [hit.doc.id for hit in hits
                                if hit.doc.id not in relevant and texts.get(hit.doc.id) not in positive_texts][:count]
    return misses
