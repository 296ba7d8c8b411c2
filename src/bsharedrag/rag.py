"""The public question-answering API: retrieve passages, then generate a cited answer, on one backbone.

    rag = RAG(backbone, retriever, config.generator)
    answer = rag.ask("Does it fit a 2012 Civic?", product_id="B00545ATZW")
    for part in rag.stream("Is it waterproof?"):  # Retrieved (the passages), text chunks, then the Answer
        print(part if isinstance(part, str) else part)

The retriever switches the backbone to its own adapter while it searches; generation runs with the
generator adapter (or the bare model, `adapter=None`, for a zero-shot baseline).
"""

from __future__ import annotations

import collections
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .config import Config, GeneratorConfig
from .model.backbone import GENERATOR
from .model.generate import stream_tokens
from .model.prompt import drop_foreign_citations, encode_prompt, open_citation_start, parse_citations
from .run import Run
from .text import has_cjk

if TYPE_CHECKING:
    from .model.backbone import SharedBackbone
    from .model.encoder import DenseRetriever
    from .model.index import Hit
    from .model.vllm import VllmClient

__all__ = ["RAG", "Answer", "Citation", "Retrieved", "load_rag", "no_passages_answer"]


@dataclass(frozen=True)
class Citation:
    number: int  # the [n] marker in the answer text
    doc_id: str
    title: str


@dataclass(frozen=True)
class Retrieved:
    """The first part of an answer stream: the passages the prompt holds, numbered from 1, before any text."""

    passages: list[Hit]


@dataclass(frozen=True)
class Answer:
    text: str
    citations: list[Citation] = field(default_factory=list)
    passages: list[Hit] = field(default_factory=list)  # the passages the prompt held, numbered from 1


class RAG:
    """Retrieval-augmented answers from one shared backbone with retriever and generator adapters.

    `retriever` may be None for a RAG that only answers over given passages (`ask(passages=...)`) or, with
    `settings.with_passages` False, closed-book.
    """

    def __init__(
        self,
        backbone: SharedBackbone,
        retriever: DenseRetriever | None,
        settings: GeneratorConfig,
        adapter: str | None = GENERATOR,
        remote: VllmClient | None = None,
    ):
        if remote is None and adapter is not None and adapter not in backbone.adapters:
            raise KeyError(f"unknown generator adapter {adapter!r}; known adapters: {backbone.adapters or 'none'}")
        self.backbone = backbone
        self.retriever = retriever
        self.settings = settings
        self.adapter = adapter
        self.remote = remote  # None: the shared backbone writes the answers; else the vLLM server behind it

    @staticmethod
    def _check_question(question: str) -> str:
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"the question must be non-empty text, got {question!r}")
        return question.strip()

    def search(self, question: str, top_k: int | None = None, product_id: str | None = None) -> list[Hit]:
        """The `top_k` best passages for `question` (default `settings.top_k`), best first."""
        question = self._check_question(question)
        if self.retriever is None:
            raise ValueError("this RAG has no retriever: pass `passages` to ask/stream, or give it a retriever")
        top_k = self.settings.top_k if top_k is None else top_k
        if not isinstance(top_k, int) or top_k <= 0:
            raise ValueError(f"`top_k` must be a positive integer, got {top_k!r}")
        return self.retriever.search([question], top_k, product_id=product_id)[0]

    def stream(
        self,
        question: str,
        top_k: int | None = None,
        product_id: str | None = None,
        max_new_tokens: int = 128,
        passages: list[Hit] | None = None,
        **sampling,
    ) -> Iterator[str | Answer]:
        """Yield `Retrieved` (the passages), the answer text in chunks as it is generated, then the `Answer`.

        `passages` skips retrieval and answers from the given hits (evaluation compares systems on
        the same passages). `sampling` is passed to `stream_tokens` (temperature, top_p, seed); the
        default is greedy.
        """
        question = self._check_question(question)
        if passages is not None:
            hits = list(passages)
        else:
            hits = self.search(question, top_k, product_id) if self.settings.with_passages else []
        return self._generate(question, hits, max_new_tokens, self.adapter, sampling)

    def ask(
        self,
        question: str,
        top_k: int | None = None,
        product_id: str | None = None,
        max_new_tokens: int = 128,
        passages: list[Hit] | None = None,
        **sampling,
    ) -> Answer:
        """The answer to `question` with its citations and the passages it was given."""
        *_, answer = self.stream(question, top_k, product_id, max_new_tokens, passages, **sampling)
        return answer

    def ask_many(self, requests: list[tuple[str, list[Hit]]], max_new_tokens: int = 128, together: int = 8,
                 on_answer: Callable[[], None] | None = None, **sampling) -> list[Answer]:
        """The answers to (question, passages) pairs, in order, `together` of them generated at once
        (`on_answer` is called as each one ends).

        The native engine decodes the open answers in one batch per step (`model.generate.DecodeBatch`):
        each answer is read one chunk at a time, round-robin, and the first whose next chunk is not
        ready advances all of them. A remote engine gets `together` requests at once. Greedy answers
        are the same as asked one at a time.
        """
        if together <= 0:
            raise ValueError(f"`together` must be a positive integer, got {together}")
        if self.remote is not None:
            from concurrent.futures import ThreadPoolExecutor

            def ask(item: tuple[str, list[Hit]]) -> Answer:
                answer = self.ask(item[0], passages=item[1], max_new_tokens=max_new_tokens, **sampling)
                if on_answer is not None:
                    on_answer()
                return answer

            with ThreadPoolExecutor(together) as pool:
                return list(pool.map(ask, requests))
        answers: list[Answer | None] = [None] * len(requests)
        waiting = collections.deque(enumerate(requests))
        open_streams: dict[int, Iterator] = {}
        try:
            while waiting or open_streams:
                while waiting and len(open_streams) < together:
                    number, (question, passages) = waiting.popleft()
                    open_streams[number] = self.stream(question, passages=passages, max_new_tokens=max_new_tokens,
                                                       **sampling)
                for number, parts in list(open_streams.items()):
                    part = next(parts)
                    if isinstance(part, Answer):
                        answers[number] = part
                        del open_streams[number]
                        if on_answer is not None:
                            on_answer()
        finally:
            for parts in open_streams.values():  # an error in one answer frees the others' caches
                parts.close()
        return answers

    def _prompt(self, question: str, hits: list[Hit]) -> tuple[list[int] | None, list[Hit]]:
        """The prompt's token ids and the passages it holds (None: no passage to answer from, so no prompt)."""
        if self.settings.with_passages and not hits:
            return None, []
        prompt = encode_prompt(self.backbone.tokenizer, question, [hit.doc for hit in hits], self.settings)
        return prompt.ids, hits[: prompt.n_passages]  # passages cut to fit the prompt cannot be cited

    def _generate(
        self, question: str, hits: list[Hit], max_new_tokens: int, adapter: str | None, sampling: dict
    ) -> Iterator[str | Answer]:
        prompt_ids, hits = self._prompt(question, hits)
        if prompt_ids is None:
            return self._answer_after(iter([no_passages_answer(question)]), [])  # nothing to answer from
        if self.remote is not None:
            chunks = self.remote.stream(prompt_ids, max_new_tokens, adapter=adapter, **sampling)
        else:
            chunks = stream_tokens(self.backbone, prompt_ids, max_new_tokens, adapter=adapter, **sampling)
        return self._answer_after(chunks, hits)

    async def astream(self, question: str, passages: list[Hit], max_new_tokens: int = 128, **sampling
                      ) -> AsyncIterator[str | Answer]:
        """`stream` over passages already retrieved, written by the remote engine: nothing blocks the event loop."""
        if self.remote is None:
            raise ValueError("astream needs a remote engine (RAG(..., remote=VllmClient(...))); use stream")
        question = self._check_question(question)
        prompt_ids, hits = self._prompt(question, list(passages) if self.settings.with_passages else [])
        answer = _CitedAnswer(hits)
        yield Retrieved(hits)
        if prompt_ids is None:
            chunks = _aiter([no_passages_answer(question)])
        else:
            chunks = self.remote.astream(prompt_ids, max_new_tokens, adapter=self.adapter, **sampling)
        try:
            async for chunk in chunks:
                if ready := answer.feed(chunk):
                    yield ready
        finally:
            if hasattr(chunks, "aclose"):
                await chunks.aclose()
        if rest := answer.flush():
            yield rest
        yield answer.result()

    @staticmethod
    def _answer_after(chunks: Iterator[str], hits: list[Hit]) -> Iterator[str | Answer]:
        """`Retrieved`, the chunks as `_CitedAnswer` passes them, then the `Answer`."""
        yield Retrieved(hits)
        answer = _CitedAnswer(hits)
        try:
            for chunk in chunks:
                if ready := answer.feed(chunk):
                    yield ready
        finally:  # a reader that stops early frees the answer's place in the decode batch at once
            if hasattr(chunks, "close"):
                chunks.close()
        if rest := answer.flush():
            yield rest
        yield answer.result()


class _CitedAnswer:
    """An answer's text as it streams, with every citation of a passage not given removed (a marker
    split over chunks is held back until it closes), and the `Answer` it makes."""

    def __init__(self, hits: list[Hit]):
        self.hits = hits
        self.parts: list[str] = []
        self.pending = ""

    def feed(self, chunk: str) -> str:
        """The text that can be sent after `chunk` ('' while a marker is still open)."""
        self.pending += chunk
        cut = open_citation_start(self.pending)
        ready, self.pending = drop_foreign_citations(self.pending[:cut], len(self.hits)), self.pending[cut:]
        if ready:
            self.parts.append(ready)
        return ready

    def flush(self) -> str:
        """What was held back, once the answer has ended."""
        rest, self.pending = drop_foreign_citations(self.pending, len(self.hits)), ""
        if rest:
            self.parts.append(rest)
        return rest

    def result(self) -> Answer:
        text = "".join(self.parts).strip()
        citations = [Citation(number, self.hits[number - 1].doc.id, self.hits[number - 1].doc.title)
                     for number in parse_citations(text, len(self.hits))]
        return Answer(text, citations, self.hits)


async def _aiter(items: list[str]) -> AsyncIterator[str]:
    for item in items:
        yield item


def no_passages_answer(question: str) -> str:
    """What is said, instead of generating, when retrieval found no passage (in the question's language)."""
    if has_cjk(question):
        return "目录中没有找到与这个问题相关的内容，所以无法回答。"
    return "I found no passage about this in the catalogue, so I cannot answer it."


def load_rag(run: Run | Config, with_generator: bool = True, remote: VllmClient | None = None) -> RAG:
    """The RAG of a finished run folder: its backbone (loaded once), its adapters, the index of its catalogue.

    With `remote` (see `Run.vllm`), answers come from vLLM, which holds the generator adapter itself.
    """
    run = run if isinstance(run, Run) else Run(run)
    retriever = run.first_stage()
    if not with_generator:
        adapter = None
    else:
        adapter = run.generator_adapter if remote is not None else run.adapter(run.generator_adapter)
    return RAG(run.backbone(), retriever, run.config.generator, adapter=adapter, remote=remote)
