"""Stage 3: the backbone as a dense retriever (a LoRA adapter trained with InfoNCE).

Texts are `query: ...` / `passage: ...` plus the EOS token; the embedding is the last real
token's final hidden state, L2-normalised. The loss is InfoNCE over in-batch negatives plus
mined hard negatives. With `micro_batch_size` below the batch, gradient caching (Gao et al., 2021)
keeps the full batch as negatives while only one micro-batch holds activations at a time.
"""

from __future__ import annotations

import contextlib
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .backbone import SharedBackbone
from .config import RetrieverConfig
from .data import Dataset, Document
from .progress import progress
from .training import micro_batches, step_batches, train_loop

__all__ = [
    "ADAPTER",
    "DenseRetriever",
    "Encoder",
    "TrainingExample",
    "contrastive_step",
    "info_nce",
    "last_token_pool",
    "train_retriever",
    "training_examples",
]

ADAPTER = "retriever"


def last_token_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Hidden state of the last real token, whether the batch is left- or right-padded."""
    # (batch, seq, dim), (batch, seq) -> (batch, dim)
    seq_len = attention_mask.shape[1]
    last = seq_len - 1 - attention_mask.flip(dims=[1]).int().argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def info_nce(
    queries: torch.Tensor, passages: torch.Tensor, targets: torch.Tensor, temperature: float, mask=None
) -> torch.Tensor:
    """Cross-entropy of each query against all passages; `targets[i]` indexes query i's positive.

    `mask` (batch, n_passages), True where a passage is a known positive of query i other than its
    target: those are removed from the negatives instead of being pushed away.
    """
    scores = queries @ passages.T / temperature  # (batch, n_passages)
    if mask is not None:
        scores = scores.masked_fill(mask, torch.finfo(scores.dtype).min)
    return F.cross_entropy(scores, targets)


class Encoder:
    """Embeds queries and passages with the retriever adapter of a shared backbone."""

    def __init__(self, backbone: SharedBackbone, settings: RetrieverConfig, adapter: str | None = ADAPTER):
        self.backbone = backbone
        self.settings = settings
        self.adapter = adapter

    def tokenize(self, texts: list[str], max_len: int) -> dict[str, torch.Tensor]:
        """Tokenise, truncate to leave room for EOS, append EOS, right-pad."""
        tokenizer = self.backbone.tokenizer
        ids = tokenizer(texts, add_special_tokens=True, truncation=True, max_length=max_len - 1)["input_ids"]
        ids = [row + [tokenizer.eos_token_id] for row in ids]
        width = max(len(row) for row in ids)
        input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, row in enumerate(ids):
            input_ids[i, : len(row)] = torch.tensor(row)
            attention_mask[i, : len(row)] = 1
        device = self.backbone.device
        return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with self.backbone.autocast_context():
            hidden = self.backbone.decoder(**batch).last_hidden_state  # (batch, seq, dim)
        return F.normalize(last_token_pool(hidden, batch["attention_mask"]).float(), dim=-1)

    def query_texts(self, questions: list[str]) -> list[str]:
        return [self.settings.query_prefix + q for q in questions]

    def passage_texts(self, docs: list[Document]) -> list[str]:
        return [self.settings.passage_prefix + d.content for d in docs]

    @torch.inference_mode()
    def embed(self, texts: list[str], max_len: int, batch_tokens: int = 4096, desc: str | None = None) -> np.ndarray:
        """(len(texts), dim) float32 embeddings; batches are length-sorted so padding is minimal."""
        if not texts:
            raise ValueError("nothing to embed: the list of texts is empty")
        tokenizer = self.backbone.tokenizer
        lengths = [min(len(ids), max_len) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]
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

    def search(self, questions: list[str], top_k: int, product_id: str | None = None) -> list:
        """For each question, the top_k hits (documents with scores), best first."""
        for question in questions:
            if not question or not question.strip():
                raise ValueError("a question must not be empty")
        vectors = self.encoder.embed_queries(questions)
        return self.index.search(vectors, top_k, product_id=product_id)


@dataclass(frozen=True)
class TrainingExample:
    query: str
    positives: tuple[Document, ...]  # best grade first
    negatives: tuple[Document, ...]  # mined hard negatives


def training_examples(datasets: list[Dataset], negatives: dict[str, list[str]]) -> list[TrainingExample]:
    """One example per judged query; its positives sorted by grade, its mined negatives attached."""
    examples = []
    for dataset in datasets:
        docs = dataset.docs
        for query in dataset.queries:
            graded = sorted(dataset.qrels[query.id].items(), key=lambda item: -item[1])
            top = graded[0][1]
            positives = tuple(docs[d] for d, grade in graded if grade == top)
            mined = tuple(docs[d] for d in negatives.get(query.id, []) if d in docs)
            examples.append(TrainingExample(query.text, positives, mined))
    return examples


def _batch_tensors(batch: list[TrainingExample], settings: RetrieverConfig, rng: random.Random):
    """Queries, passages (each query's positive then its negatives), targets and the false-negative mask."""
    queries = [ex.query for ex in batch]
    passages: list[Document] = []
    targets = []
    for ex in batch:
        targets.append(len(passages))
        passages.append(rng.choice(ex.positives))
        k = min(settings.negatives_per_query, len(ex.negatives))
        passages += rng.sample(ex.negatives, k)
    known = [{doc.id for doc in ex.positives} for ex in batch]
    mask = torch.tensor(
        [[doc.id in known[i] and j != targets[i] for j, doc in enumerate(passages)] for i in range(len(batch))]
    )
    return queries, passages, torch.tensor(targets), mask


def contrastive_step(
    encoder: Encoder, batch, settings: RetrieverConfig, rng: random.Random, weight: float = 1.0
) -> float:
    """One InfoNCE forward and backward pass over `batch`; returns the loss.

    Back-propagates `weight` x the loss (the fully shared architecture weights it against the
    generation loss) and returns the unweighted loss. A batch that fits in one micro-batch runs in
    one pass; a larger one uses gradient caching (Gao et al., 2021), holding activations for one
    micro-batch at a time:
    1. embed everything without gradients; 2. loss and its gradient w.r.t. the embeddings;
    3. re-embed each micro-batch with gradients and back-propagate the cached embedding gradient.
    LoRA dropout is 0 by default; with dropout the two passes would see different masks.
    """
    queries, passages, targets, mask = _batch_tensors(batch, settings, rng)
    query_chunks = micro_batches(encoder.query_texts(queries), settings)
    passage_chunks = micro_batches(encoder.passage_texts(passages), settings)

    def encode(chunks, max_len):
        return torch.cat([encoder.forward(encoder.tokenize(chunk, max_len)) for chunk in chunks])

    cached = len(query_chunks) > 1 or len(passage_chunks) > 1
    with torch.no_grad() if cached else contextlib.nullcontext():
        q = encode(query_chunks, settings.max_query_len)  # (batch, dim)
        p = encode(passage_chunks, settings.max_passage_len)  # (n_passages, dim)
    if cached:
        q.requires_grad_(True)
        p.requires_grad_(True)
    loss = info_nce(q, p, targets.to(q.device), settings.temperature, mask.to(q.device))
    (loss * weight).backward()
    if cached:
        for chunks, grads, max_len in (
            (query_chunks, q.grad, settings.max_query_len),
            (passage_chunks, p.grad, settings.max_passage_len),
        ):
            offset = 0
            for chunk in chunks:
                reps = encoder.forward(encoder.tokenize(chunk, max_len))
                (reps * grads[offset : offset + len(chunk)]).sum().backward()
                offset += len(chunk)
    return loss.item()


def train_retriever(
    backbone: SharedBackbone, examples: list[TrainingExample], settings: RetrieverConfig, out_dir: Path, seed: int
) -> dict:
    """Train the `retriever` adapter on `examples` and save it to `out_dir`."""
    encoder = Encoder(backbone, settings)
    rng = random.Random(seed)
    started = time.time()
    with backbone.training(ADAPTER, settings.lora) as named:
        losses = train_loop(
            named,
            step_batches(examples, settings, seed),
            lambda batch: contrastive_step(encoder, batch, settings, rng),
            settings,
            Path(out_dir) / "checkpoint",
            "train retriever",
        )
    backbone.save_adapter(ADAPTER, out_dir)
    return {
        "steps": len(losses),
        "first_loss": losses[0] if losses else None,
        "final_loss": sum(losses[-5:]) / max(1, len(losses[-5:])),
        "examples": len(examples),
        "seconds": round(time.time() - started, 1),
    }
