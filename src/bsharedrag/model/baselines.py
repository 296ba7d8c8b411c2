"""Baseline retrievers: BM25 over `text.words` tokens and an off-the-shelf sentence encoder (MiniLM).

Both follow the `Retriever` protocol and return `Hit`s, as the dense retriever does, so evaluation and
RAG code treat any retriever the same way.
bm25s and sentence-transformers are imported when a retriever is built, not with this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from ..data import Document, Query
from ..metrics import local_model
from ..text import words
from .backbone import cpu_has_fast_bf16
from .index import Hit

__all__ = ["BM25Retriever", "EncoderRetriever", "Retriever", "SentenceEncoder", "bm25_tokens", "build_run", "stopword_set"]


@runtime_checkable
class Retriever(Protocol):
    name: str

    def search(self, questions: list[str], top_k: int) -> list[list[Hit]]:
        """The `top_k` best documents for each question, best first."""
        ...


def _check_corpus(corpus: Sequence[Document]) -> None:
    if not corpus:
        raise ValueError("the corpus is empty: a retriever needs at least one document")


def _check_top_k(top_k: int) -> None:
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}")


_STOPWORDS = {"en": "STOPWORDS_EN", "zh": "STOPWORDS_CHINESE"}


def bm25_tokens(text: str, stopwords: frozenset[str]) -> list[str]:
    """The words BM25 indexes and matches: lower-cased `text.words` (jieba for Chinese) less `stopwords`."""
    return [w for w in words(text) if w not in stopwords]


def stopword_set(languages: Sequence[str]) -> frozenset[str]:
    """bm25s's stopwords of `languages` ("en", "zh")."""
    from bm25s import stopwords

    if isinstance(languages, str):
        languages = (languages,)
    unknown = [lang for lang in languages if lang not in _STOPWORDS]
    if unknown:
        raise ValueError(f"unknown stopword list(s) {unknown}; known: {sorted(_STOPWORDS)}")
    return frozenset(word for lang in languages for word in getattr(stopwords, _STOPWORDS[lang]))


class BM25Retriever:
    """Okapi BM25 (bm25s, Lucene variant) over lower-cased `text.words(doc.content)` tokens.

    `stopwords` names bm25s's lists to drop ("en": 33 function words, "zh": 841 Chinese words; `()`
    keeps every word); dropping English ones lifts ePQA dev Hit@3 from 0.694 to 0.750. A question
    sharing no word with the corpus still gets `top_k` hits, all scored 0.
    """

    def __init__(
        self,
        corpus: Sequence[Document],
        k1: float = 1.5,
        b: float = 0.75,
        stopwords: Sequence[str] = ("en", "zh"),
        name: str = "bm25",
        tokens: Sequence[list[str]] | None = None,
    ):
        """`tokens`: each document's `bm25_tokens`, when the caller has them already."""
        import bm25s

        _check_corpus(corpus)
        self.name = name
        self.docs = list(corpus)
        self._stopwords = stopword_set(stopwords)
        if tokens is None:
            tokens = [self._tokens(doc.content) for doc in corpus]
        elif len(tokens) != len(self.docs):
            raise ValueError(f"{len(self.docs)} documents but {len(tokens)} token lists")
        self._bm25 = bm25s.BM25(k1=k1, b=b)
        self._bm25.index(list(tokens), show_progress=False)

    def _tokens(self, text: str) -> list[str]:
        return bm25_tokens(text, self._stopwords)

    def scores(self, questions: list[str]) -> np.ndarray:
        """(questions, docs) BM25 scores of every document, in corpus order."""
        return np.stack([self._bm25.get_scores(self._tokens(q)) for q in questions])

    def search(self, questions: list[str], top_k: int) -> list[list[Hit]]:
        _check_top_k(top_k)
        if not questions:
            return []
        k = min(top_k, len(self.docs))
        # bm25s drops query words outside the vocabulary itself; one batched call scores all questions.
        indices, scores = self._bm25.retrieve([self._tokens(q) for q in questions], k=k, show_progress=False)
        return [
            [Hit(self.docs[i], float(s)) for i, s in zip(row_indices, row_scores)]
            for row_indices, row_scores in zip(indices.tolist(), scores.tolist())
        ]


_AUTOCAST = ("auto", "bf16", "off")


class SentenceEncoder:
    """An off-the-shelf sentence-transformers bi-encoder, with the embedding interface of `encoder.Encoder`.

    `model` is 'minilm' (the embedded all-MiniLM-L6-v2) or a local sentence-transformers folder;
    nothing is downloaded. `autocast="auto"` runs the matmuls in bfloat16 on a CPU with native bf16
    (about 3x faster, cosine to float32 > 0.9999), "bf16" always does, "off" never does.
    """

    def __init__(self, model: str | Path = "minilm", batch_size: int = 64, device: str | None = None,
                 autocast: str = "auto"):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if autocast not in _AUTOCAST:
            raise ValueError(f"autocast must be one of {_AUTOCAST}, got {autocast!r}")
        from sentence_transformers import SentenceTransformer

        path = local_model(model)
        self.name = "minilm" if str(model) == "minilm" else path.name
        self.batch_size = batch_size
        self.model = SentenceTransformer(str(path), device=device, local_files_only=True)
        on_cpu = self.model.device.type == "cpu"
        self.bf16 = autocast == "bf16" or (autocast == "auto" and on_cpu and cpu_has_fast_bf16())

    def embed(self, texts: list[str], show_progress: bool = False) -> np.ndarray:
        """(len(texts), dim) L2-normalised float32 embeddings."""
        import torch

        if not texts:
            raise ValueError("nothing to embed: the list of texts is empty")
        # LayerNorm, pooling and normalisation stay float32 under autocast: only matmuls run in bf16.
        # encode() sorts texts by length, so batches hold similar lengths and pad little.
        with torch.autocast(self.model.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            vectors = self.model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                                        convert_to_numpy=True, show_progress_bar=show_progress)
        return np.asarray(vectors, dtype=np.float32)

    def embed_queries(self, questions: list[str]) -> np.ndarray:
        return self.embed(list(questions))

    def embed_passages(self, docs: Sequence[Document], batch_tokens: int = 0, desc: str | None = None) -> np.ndarray:
        """`batch_tokens` is accepted for interface parity; batches are `batch_size` texts."""
        return self.embed([doc.content for doc in docs], show_progress=desc is not None)


class EncoderRetriever:
    """Exact inner-product search over a corpus embedded once, at construction, by a `SentenceEncoder`."""

    def __init__(
        self,
        corpus: Sequence[Document],
        model: str | Path = "minilm",
        batch_size: int = 64,
        device: str | None = None,
        autocast: str = "auto",
        show_progress: bool = False,
    ):
        _check_corpus(corpus)
        self.encoder = SentenceEncoder(model, batch_size, device, autocast)
        self.name = self.encoder.name
        self.docs = list(corpus)
        self.embeddings = self.encoder.embed([doc.content for doc in corpus], show_progress)  # (docs, dim)

    def search(self, questions: list[str], top_k: int) -> list[list[Hit]]:
        _check_top_k(top_k)
        if not questions:
            return []
        k = min(top_k, len(self.docs))
        scores = self.encoder.embed(list(questions)) @ self.embeddings.T  # (questions, docs)
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # (questions, k), unordered
        results = []
        for row, candidates in zip(scores, top):
            ranked = candidates[np.argsort(-row[candidates], kind="stable")]
            results.append([Hit(self.docs[i], float(row[i])) for i in ranked])
        return results


def build_run(retriever: Retriever, queries: Sequence[Query], top_k: int = 10) -> dict[str, list[str]]:
    """query id -> ranked doc ids, searching each query's `text` (product title + question)."""
    hits = retriever.search([q.text for q in queries], top_k)
    return {q.id: [hit.doc.id for hit in row] for q, row in zip(queries, hits, strict=True)}
