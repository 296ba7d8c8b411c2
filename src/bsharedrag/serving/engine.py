"""The model work behind the routes: every use of the backbone goes through the scheduler.

The engine knows nothing of HTTP: it raises ValueError for bad input, DocumentNotFound for an
unknown document and QueueFull when the model is saturated; the routes turn those into status codes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing
from typing import TYPE_CHECKING

import numpy as np

from ..data import Document
from ..model.generate import kv_cache_bytes
from ..model.prompt import encode_prompt
from ..rag import RAG, Answer
from .catalogue import upsert_steps
from .scheduler import QueueFull, Scheduler

if TYPE_CHECKING:
    from ..config import Config
    from ..model.index import Hit
    from .metrics import Metrics

__all__ = ["DocumentNotFound", "Engine"]

log = logging.getLogger(__name__)


class DocumentNotFound(LookupError):
    """No document has the id asked for."""


class Engine:
    """Search, answer, embed and update the catalogue on one shared backbone."""

    def __init__(self, rag: RAG, config: Config, scheduler: Scheduler, metrics: Metrics):
        self.rag = rag
        self.config = config
        self.scheduler = scheduler
        self.metrics = metrics
        self._closed_book = RAG(
            rag.backbone, rag.retriever, rag.settings.model_copy(update={"with_passages": False}), rag.adapter,
            remote=rag.remote,
        )
        self._remote_answers = 0  # answers being written by the remote engine (rag.remote)
        self._dirty = False  # the index changed since the last FAISS snapshot
        largest = self.kv_reserve(config.serve.max_new_tokens)
        if rag.remote is None and scheduler.memory_budget is not None and largest > scheduler.memory_budget:
            raise ValueError(
                f"one answer of serve.max_new_tokens={config.serve.max_new_tokens} tokens may need "
                f"{largest / 2**20:.1f} MiB of KV cache, more than serve.kv_cache_mib={config.serve.kv_cache_mib}; "
                "raise it or lower the tokens"
            )
        self.started = time.time()
        metrics.documents.set(len(self.index))

    @property
    def index(self):
        return self.rag.retriever.index

    @property
    def dim(self) -> int:
        return int(self.index.manifest["dim"])

    @property
    def model_name(self) -> str:
        return f"bsharedrag:{self.config.run_dir.name}"

    def count_tokens(self, text: str) -> int:
        return len(self.rag.backbone.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0

    # --- retrieval ------------------------------------------------------------------------

    def _search_batch(self, items: list[tuple[str, int, str | None]]) -> list[list[Hit]]:
        """Embed every queued question in one forward pass, then search once per (top_k, product)."""
        retriever = self.rag.retriever
        questions = [question for question, _, _ in items]
        vectors = retriever.encoder.embed_queries(questions)  # (n, dim)
        self.metrics.embedded.labels("query").inc(len(items))
        groups: dict[tuple[int, str | None], list[int]] = defaultdict(list)
        for i, (_, top_k, product_id) in enumerate(items):
            groups[top_k, product_id].append(i)
        results: list[list[Hit]] = [[] for _ in items]
        for (top_k, product_id), rows in groups.items():
            found = retriever.search([questions[i] for i in rows], top_k, product_id=product_id, vectors=vectors[rows])
            for i, hits in zip(rows, found, strict=True):
                results[i] = hits
        return results

    async def search(self, question: str, top_k: int, product_id: str | None = None) -> list[Hit]:
        return await self.scheduler.run_batched("search", self._search_batch, (question, top_k, product_id))

    async def embed(self, texts: list[str], kind: str) -> np.ndarray:
        """(len(texts), dim) L2-normalised embeddings with the retriever adapter."""
        encoder = self.rag.retriever.encoder
        if kind == "query":
            vectors = await self.scheduler.run(encoder.embed_queries, texts)
        else:
            docs = [Document(str(i), "", text) for i, text in enumerate(texts)]
            vectors = await self.scheduler.run(encoder.embed_passages, docs, self.config.index.batch_tokens)
        self.metrics.embedded.labels(kind).inc(len(texts))
        return vectors

    # --- generation -----------------------------------------------------------------------

    async def answer(
        self, question: str, top_k: int | None, product_id: str | None, max_new_tokens: int, endpoint: str,
        retrieval: bool = True, **sampling,
    ) -> AsyncIterator[str | Answer]:
        """`Retrieved`, text chunks as they are generated, then the `Answer`; the generation interleaves with other jobs."""
        rag = self.rag if retrieval else self._closed_book
        if rag.remote is not None:
            async with aclosing(self._answer_remotely(rag, question, top_k, product_id, max_new_tokens, sampling)
                                ) as parts:
                async for part in parts:
                    if isinstance(part, Answer):
                        self.metrics.tokens.labels(endpoint).inc(self.count_tokens(part.text))
                    yield part
            return

        def start() -> Iterator[str | Answer]:
            return rag.stream(question, top_k, product_id, max_new_tokens, **sampling)

        async with aclosing(self.scheduler.stream(start, self.kv_reserve(max_new_tokens))) as parts:  # closing it cancels the job
            async for part in parts:
                if isinstance(part, Answer):
                    self.metrics.tokens.labels(endpoint).inc(self.count_tokens(part.text))
                yield part

    async def _answer_remotely(self, rag: RAG, question: str, top_k: int | None, product_id: str | None,
                               max_new_tokens: int, sampling: dict) -> AsyncIterator[str | Answer]:
        """An answer written by the remote engine: the search goes through the scheduler like any other
        (batched with them), the answer streams from vLLM without holding the model's worker."""
        if self._remote_answers >= self.config.serve.queue_size:
            raise QueueFull(f"{self._remote_answers} answers are already being written "
                            f"(serve.queue_size={self.config.serve.queue_size})")
        self._remote_answers += 1
        try:
            hits = []
            if rag.settings.with_passages:
                hits = await self.search(question, top_k or rag.settings.top_k, product_id)
            async with aclosing(rag.astream(question, hits, max_new_tokens, **sampling)) as parts:
                async for part in parts:
                    yield part
        finally:
            self._remote_answers -= 1

    def kv_reserve(self, max_new_tokens: int) -> int:
        """Bytes of KV cache an answer of at most `max_new_tokens` can grow to (its prompt at the prompt budget)."""
        return kv_cache_bytes(self.rag.backbone, self.rag.settings.max_prompt_len + max_new_tokens)

    def prompt_tokens(self, question: str, answer: Answer, retrieval: bool) -> int:
        """Tokens of the prompt the answer was generated from (for OpenAI `usage`)."""
        settings = self.rag.settings if retrieval else self._closed_book.settings
        docs = [hit.doc for hit in answer.passages]
        return len(encode_prompt(self.rag.backbone.tokenizer, question, docs, settings).ids)

    # --- catalogue ------------------------------------------------------------------------

    async def upsert(self, docs: list[Document]) -> int:
        """Embed and store `docs` (all or none); durable once this returns.

        The embedding runs as a stream of slices (`serve.upsert_slice_documents` each), so searches and
        answers queued meanwhile take their turns between two slices.
        """
        def steps() -> Iterator[int]:
            return upsert_steps(self.rag.retriever, docs, self.config.index.batch_tokens, self.config.serve.upsert_slice_documents)

        async with aclosing(self.scheduler.stream(steps)) as progress:
            async for _ in progress:
                pass
        self._changed("upsert", len(docs))
        return len(docs)

    async def delete(self, doc_id: str) -> None:
        """Remove a document; DocumentNotFound if there is none with this id."""
        if not await asyncio.to_thread(self.index.delete, [doc_id]):
            raise DocumentNotFound(f"no document with id {doc_id!r}")
        self._changed("delete", 1)

    async def get(self, doc_id: str) -> Document:
        doc = await asyncio.to_thread(self.index.get, doc_id)
        if doc is None:
            raise DocumentNotFound(f"no document with id {doc_id!r}")
        return doc

    def _changed(self, op: str, count: int) -> None:
        self._dirty = True
        self.metrics.updates.labels(op).inc(count)
        self.metrics.documents.set(len(self.index))

    def snapshot(self) -> bool:
        """Write the FAISS snapshot if the index changed since the last one; True if written."""
        if not self._dirty:
            return False
        self._dirty = False
        self.index.save()
        log.info("index snapshot written (%d documents)", len(self.index))
        return True

    async def snapshot_every(self, seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await asyncio.to_thread(self.snapshot)
            except Exception:  # noqa: BLE001 - SQLite holds the data; the next snapshot retries
                self._dirty = True
                log.exception("index snapshot failed")
