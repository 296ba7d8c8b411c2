"""The backbone as a dense encoder: the retriever adapter embeds questions and passages.

Texts are `query: ...` / `passage: ...` plus the document-end token (`end_id`: the token continual
pre-training put after every passage, `model.prompt.document_end_id`); the embedding is that last
token's final hidden state, L2-normalised. Training the adapter is `train/retriever.py`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..config import RetrieverConfig
from ..data import Document
from ..progress import progress
from .backbone import RETRIEVER, SharedBackbone
from .index import Hit
from .prompt import document_end_id

__all__ = ["DenseRetriever", "Encoder", "last_token_pool", "right_pad"]


def right_pad(rows: list[list[int]], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Token id rows as one right-padded batch: `input_ids` and `attention_mask`, (len(rows), longest)."""
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}


def last_token_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Hidden state of the last real token, whether the batch is left- or right-padded."""
    # (batch, seq, dim), (batch, seq) -> (batch, dim)
    seq_len = attention_mask.shape[1]
    last = seq_len - 1 - attention_mask.flip(dims=[1]).int().argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class Encoder:
    """Embeds queries and passages with the retriever adapter of a shared backbone.

    `end_id` is the token appended to every text and pooled on (default: `document_end_id`); an
    adapter is used with the one it was trained with (`Run.encoder` reads it from the retriever's manifest).
    """

    def __init__(self, backbone: SharedBackbone, settings: RetrieverConfig, adapter: str | None = RETRIEVER,
                 end_id: int | None = None):
        self.backbone = backbone
        self.settings = settings
        self.adapter = adapter
        self.end_id = document_end_id(backbone.tokenizer) if end_id is None else end_id

    def tokenize(self, texts: list[str], max_len: int) -> dict[str, torch.Tensor]:
        """Tokenise, truncate to leave room for the end token, append it, right-pad."""
        tokenizer = self.backbone.tokenizer
        ids = tokenizer(texts, add_special_tokens=True, truncation=True, max_length=max_len - 1)["input_ids"]
        return right_pad([row + [self.end_id] for row in ids], tokenizer.pad_token_id, self.backbone.device)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with self.backbone.autocast_context():
            hidden = self.backbone.decoder(**batch).last_hidden_state  # (batch, seq, dim)
        return F.normalize(last_token_pool(hidden, batch["attention_mask"]).float(), dim=-1)

    def query_texts(self, questions: list[str]) -> list[str]:
        return [self.settings.query_prefix + q for q in questions]

    def passage_texts(self, docs: list[Document]) -> list[str]:
        return [self.settings.passage_prefix + d.content for d in docs]

    def lengths(self, texts: list[str], max_len: int) -> list[int]:
        """Tokens of each text as `tokenize` will cut it (at most `max_len`), to sort texts by length."""
        return [min(len(ids), max_len) for ids in self.backbone.tokenizer(texts, add_special_tokens=True)["input_ids"]]

    @torch.inference_mode()
    def embed(self, texts: list[str], max_len: int, batch_tokens: int = 4096, desc: str | None = None) -> np.ndarray:
        """(len(texts), dim) float32 embeddings; batches are length-sorted so padding is minimal."""
        if not texts:
            raise ValueError("nothing to embed: the list of texts is empty")
        lengths = self.lengths(texts, max_len)
        order = np.argsort(lengths)[::-1]  # longest first: the largest batch shows memory trouble early
        out = np.zeros((len(texts), self.backbone.base.config.hidden_size), dtype=np.float32)
        bar = progress(total=len(texts), desc=desc, quiet=desc is None)
        with self.backbone.adapter(self.adapter):
            start = 0
            while start < len(order):
                per_batch = max(1, batch_tokens // (lengths[order[start]] + 1))
                chunk = order[start : start + per_batch]
                vectors = self.forward(self.tokenize([texts[i] for i in chunk], max_len))
                out[chunk] = vectors.cpu().numpy()
                start += len(chunk)
                bar.update(len(chunk))
        bar.close()
        return out

    def embed_queries(self, questions: list[str]) -> np.ndarray:
        return self.embed(self.query_texts(questions), self.settings.max_query_len)

    def embed_passages(self, docs: list[Document], batch_tokens: int = 4096, desc: str | None = None) -> np.ndarray:
        return self.embed(self.passage_texts(docs), self.settings.max_passage_len, batch_tokens, desc)


class DenseRetriever:
    """Search a vector index with questions embedded by `encoder`.

    The encoder is an `Encoder` (the retriever adapter of the shared backbone) or, for the
    `separate` architecture, a `SentenceEncoder` (an off-the-shelf bi-encoder); both offer
    `embed_queries` and `embed_passages`.
    """

    def __init__(self, encoder, index):
        self.encoder = encoder
        self.index = index

    name = "bsharedrag"

    def search(self, questions: list[str], top_k: int, product_id: str | None = None,
               vectors: np.ndarray | None = None) -> list[list[Hit]]:
        """For each question, the top_k hits (documents with scores), best first; `vectors` are the
        questions' embeddings when the caller has them already (the server embeds a batch at once)."""
        if vectors is None:
            vectors = self.encoder.embed_queries(questions)
        return self.index.search(vectors, top_k, product_id=product_id)
