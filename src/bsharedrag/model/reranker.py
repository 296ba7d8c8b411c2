"""The backbone as a cross-encoder: the `reranker` adapter reads a question and a passage together.

A pair is one sequence,

    Question: <question>
    Passage: <passage>
    Does the passage answer the question? Answer: yes|no

and its score is the last token's logit of " yes" minus that of " no", read from the model's own
LM head (two of its rows, not the whole vocabulary). This needs no new weights beside the LoRA, so
the reranker is an adapter like the other two, saved and switched the same way, and an instruct
backbone already ranks somewhat sensibly before training. A learned last-token head would need its
own parameters saved beside the adapter and start from nothing. Training (`train/reranker.py`)
puts a listwise softmax over one positive and its negatives on these scores.

`RerankedRetriever` wraps any first stage (dense, hybrid): it takes the first stage's top `depth`
hits, scores them, and returns the top k of the same hits reordered, with the reranker's scores.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..config import RerankerConfig
from ..data import Document
from .backbone import RERANKER, SharedBackbone
from .encoder import last_token_pool, right_pad
from .index import Hit

__all__ = ["RerankedRetriever", "Reranker"]

_QUESTION, _PASSAGE, _ASK = "Question: ", "\nPassage: ", "\nDoes the passage answer the question? Answer:"


class Reranker:
    """Scores (question, passage) pairs with the reranker adapter of a shared backbone.

    `memo`, a dict, remembers every pair's score by (question, passage text): evaluation reranks the
    same candidates for several systems. A server leaves it None.
    """

    def __init__(self, backbone: SharedBackbone, settings: RerankerConfig, adapter: str | None = RERANKER,
                 memo: dict | None = None):
        self.backbone = backbone
        self.settings = settings
        self.adapter = adapter
        self.memo = memo
        tokenizer = backbone.tokenizer
        encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        self._question, self._passage, self._ask = encode(_QUESTION), encode(_PASSAGE), encode(_ASK)
        self._start = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self._labels = [encode(" yes")[0], encode(" no")[0]]  # the first token of each word
        if self._labels[0] == self._labels[1]:
            raise ValueError("the tokenizer gives ' yes' and ' no' the same first token: it cannot score pairs")

    def pair_ids(self, question: str, passage: Document) -> list[int]:
        """The token ids of one pair, the question and the passage each cut to its length setting."""
        tokenizer, settings = self.backbone.tokenizer, self.settings
        question_ids = tokenizer(question, add_special_tokens=False)["input_ids"][: settings.max_query_len]
        passage_ids = tokenizer(passage.content, add_special_tokens=False)["input_ids"][: settings.max_passage_len]
        return self._start + self._question + question_ids + self._passage + passage_ids + self._ask

    def forward(self, rows: list[list[int]]) -> torch.Tensor:
        """(len(rows),) scores of tokenised pairs, right-padded into one batch (gradients flow when enabled)."""
        batch = right_pad(rows, self.backbone.tokenizer.pad_token_id, self.backbone.device)
        with self.backbone.autocast_context():
            hidden = self.backbone.decoder(**batch).last_hidden_state
        last = last_token_pool(hidden, batch["attention_mask"]).float()  # (batch, dim)
        head = self.backbone.base.get_output_embeddings()
        rows_ = head.weight[self._labels].float()  # (2, dim): the " yes" and " no" rows of the LM head
        logits = last @ rows_.T
        if getattr(head, "bias", None) is not None:
            logits = logits + head.bias[self._labels].float()
        return logits[:, 0] - logits[:, 1]

    @torch.inference_mode()
    def score(self, question: str, passages: Sequence[Document]) -> np.ndarray:
        """(len(passages),) float32 scores of `question` against each passage; higher is more relevant."""
        scores = np.zeros(len(passages), dtype=np.float32)
        known = self.memo if self.memo is not None else {}
        todo = []
        for i, doc in enumerate(passages):
            if (question, doc.content) in known:
                scores[i] = known[(question, doc.content)]
            else:
                todo.append(i)
        rows = {i: self.pair_ids(question, passages[i]) for i in todo}
        order = sorted(todo, key=lambda i: -len(rows[i]))  # length-sorted batches pad little
        with self.backbone.adapter(self.adapter):
            start = 0
            while start < len(order):
                per_batch = max(1, self.settings.batch_tokens // len(rows[order[start]]))
                chunk = order[start : start + per_batch]
                scores[chunk] = self.forward([rows[i] for i in chunk]).cpu().numpy()
                start += len(chunk)
        if self.memo is not None:
            self.memo.update({(question, passages[i].content): float(scores[i]) for i in todo})
        return scores

    def rerank(self, question: str, hits: Sequence[Hit], top_k: int) -> list[Hit]:
        """The `top_k` best of `hits` by the reranker, with its scores (ties keep the first stage's order)."""
        if not hits:
            return []
        scores = self.score(question, [hit.doc for hit in hits])
        order = sorted(range(len(hits)), key=lambda i: (-scores[i], i))
        return [Hit(hits[i].doc, float(scores[i])) for i in order[:top_k]]


class RerankedRetriever:
    """A first stage (anything with `search`) whose top `depth` hits the reranker reorders."""

    def __init__(self, first_stage, reranker: Reranker, depth: int | None = None):
        self.first_stage = first_stage
        self.reranker = reranker
        self.depth = depth or reranker.settings.depth
        self.name = f"{first_stage.name}+rerank"

    @property
    def encoder(self):
        return self.first_stage.encoder

    @property
    def index(self):
        return self.first_stage.index

    def search(self, questions: list[str], top_k: int, product_id: str | None = None,
               vectors: np.ndarray | None = None) -> list[list[Hit]]:
        """The first stage's top `depth` (at least `top_k`) for each question, reranked, cut to `top_k`."""
        candidates = self.first_stage.search(questions, max(self.depth, top_k), product_id=product_id, vectors=vectors)
        return [self.reranker.rerank(question, hits, top_k) for question, hits in zip(questions, candidates, strict=True)]
