"""The public question-answering API: retrieve passages, then generate a cited answer, on one backbone.

    rag = RAG(backbone, retriever, config.generator)
    answer = rag.ask("Does it fit a 2012 Civic?", product_id="B00545ATZW")
    for part in rag.stream("Is it waterproof?"):  # Retrieved (the passages), text chunks, then the Answer
        print(part if isinstance(part, str) else part)

The retriever switches the backbone to its own adapter while it searches; generation runs with the
generator adapter (or the bare model, `adapter=None`, for a zero-shot baseline).
"""

from __future__ import annotations

from collections.abc import Iterator
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
    ):
        if adapter is not None and adapter not in backbone.adapters:
            raise KeyError(f"unknown generator adapter {adapter!r}; known adapters: {backbone.adapters or 'none'}")
        self.backbone = backbone
        self.retriever = retriever
        self.settings = settings
        self.adapter = adapter

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

    def _generate(
        self, question: str, hits: list[Hit], max_new_tokens: int, adapter: str | None, sampling: dict
    ) -> Iterator[str | Answer]:
        if self.settings.with_passages and not hits:
            return self._answer_after(iter([no_passages_answer(question)]), [])  # nothing to answer from
        prompt = encode_prompt(self.backbone.tokenizer, question, [hit.doc for hit in hits], self.settings)
        hits = hits[: prompt.n_passages]  # passages cut to fit the prompt cannot be cited
        chunks = stream_tokens(self.backbone, prompt.ids, max_new_tokens, adapter=adapter, **sampling)
        return self._answer_after(chunks, hits)

    @staticmethod
    def _answer_after(chunks: Iterator[str], hits: list[Hit]) -> Iterator[str | Answer]:
        """`Retrieved`, the chunks with every citation of a passage not given removed (a marker split
        over chunks is held back until it closes), then the `Answer`."""
        yield Retrieved(hits)
        parts, pending = [], ""
        try:
            for chunk in chunks:
                pending += chunk
                cut = open_citation_start(pending)
                ready, pending = drop_foreign_citations(pending[:cut], len(hits)), pending[cut:]
                if ready:
                    parts.append(ready)
                    yield ready
        finally:  # a reader that stops early frees the answer's place in the decode batch at once
            if hasattr(chunks, "close"):
                chunks.close()
        if rest := drop_foreign_citations(pending, len(hits)):
            parts.append(rest)
            yield rest
        text = "".join(parts).strip()
        citations = [
            Citation(number, hits[number - 1].doc.id, hits[number - 1].doc.title)
            for number in parse_citations(text, len(hits))
        ]
        yield Answer(text, citations, hits)


def no_passages_answer(question: str) -> str:
    """What is said, instead of generating, when retrieval found no passage (in the question's language)."""
    if has_cjk(question):
        return "目录中没有找到与这个问题相关的内容，所以无法回答。"
    return "I found no passage about this in the catalogue, so I cannot answer it."


def load_rag(run: Run | Config, with_generator: bool = True) -> RAG:
    """The RAG of a finished run folder: its backbone (loaded once), its adapters, the index of its catalogue."""
    run = run if isinstance(run, Run) else Run(run)
    retriever = run.first_stage()
    adapter = run.adapter(run.generator_adapter) if with_generator else None
    return RAG(run.backbone(), retriever, run.config.generator, adapter=adapter)
