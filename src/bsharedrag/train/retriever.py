"""Stage 3: the backbone as a dense retriever: the `retriever` LoRA adapter trained with InfoNCE.

The encoder (prefixes, last-token pooling, L2 norm) is `model/encoder.py`. The loss is InfoNCE over
in-batch negatives plus mined hard negatives. With `micro_batch_size` below the batch, gradient caching (Gao et al., 2021)
keeps the full batch as negatives while only one micro-batch holds activations at a time.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import distributed
from ..config import RerankerConfig, RetrieverConfig
from ..data import Dataset, Document
from ..model.backbone import RETRIEVER, SharedBackbone
from ..model.encoder import Encoder
from .loop import loss_summary, seed_everything, step_batches, train_loop

__all__ = [
    "TrainingExample", "contrastive_step", "info_nce", "train_retriever", "training_attention", "training_examples",
]


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


_GROUP = 8  # texts per forward pass when the whole batch is held for one backward pass


def _length_groups(encoder: Encoder, texts: list[str], max_len: int, size: int) -> list[list[int]]:
    """Indices of `texts` in groups of at most `size`, shortest first, so that a group pads little.

    Padding every text of a batch to its longest costs about 40% of the tokens of a quick-profile step
    (ePQA passages average 56 of 96 tokens, questions 41 of 64): memory held for the backward pass and compute.
    """
    lengths = encoder.lengths(texts, max_len)
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    return [order[start : start + size] for start in range(0, len(order), size)]


def _encode(encoder: Encoder, texts: list[str], groups: list[list[int]], max_len: int) -> torch.Tensor:
    """(len(texts), dim) embeddings in the order of `texts`, one forward pass per group."""
    reps = torch.cat([encoder.forward(encoder.tokenize([texts[i] for i in group], max_len)) for group in groups])
    position = torch.empty(len(texts), dtype=torch.long)
    position[torch.tensor([i for group in groups for i in group])] = torch.arange(len(texts))
    return reps[position.to(reps.device)]


def contrastive_step(
    encoder: Encoder, batch, settings: RetrieverConfig, rng: random.Random, weight: float = 1.0
) -> float:
    """One InfoNCE forward and backward pass over `batch`; returns the loss.

    Back-propagates `weight` x the loss (the fully shared architecture weights it against the
    generation loss) and returns the unweighted loss. Texts are embedded in length-sorted groups.
    Without `micro_batch_size` (or with one at least the batch) every group keeps its activations
    for one backward pass; with a smaller one, gradient caching (Gao et al., 2021) holds activations
    for one micro-batch at a time:
    1. embed everything without gradients; 2. loss and its gradient w.r.t. the embeddings;
    3. re-embed each micro-batch with gradients and back-propagate the cached embedding gradient.
    LoRA dropout is 0 by default; with dropout the two passes would see different masks.
    Both passes run with the attention kernel of `training_attention`; inference keeps the model's.
    """
    queries, passages, targets, mask = _batch_tensors(batch, settings, rng)  # the whole batch, on every process
    cached = settings.micro_batch_size is not None and settings.micro_batch_size < len(batch)
    if cached or distributed.world_size() > 1:
        return _cached_step(encoder, queries, passages, targets, mask, settings, weight)
    sides = []
    for texts, max_len in ((encoder.query_texts(queries), settings.max_query_len),
                           (encoder.passage_texts(passages), settings.max_passage_len)):
        sides.append((texts, _length_groups(encoder, texts, max_len, _GROUP), max_len))
    with encoder.backbone.attention(training_attention(settings, encoder.backbone.device)):
        q, p = (_encode(encoder, texts, groups, max_len) for texts, groups, max_len in sides)
        loss = info_nce(q, p, targets.to(q.device), settings.temperature, mask.to(q.device))
        (loss * weight).backward()
    return loss.item()


def _cached_step(encoder: Encoder, queries, passages, targets, mask, settings: RetrieverConfig,
                 weight: float) -> float:
    """`contrastive_step` with gradient caching, over one process or several.

    Each process embeds its contiguous share of the questions and of the passages (alone: all of
    them) without gradients; the shares are gathered in rank order (the whole batch's order), every
    process computes the same loss over all of them, and re-embeds its own share micro-batch by
    micro-batch to back-propagate the embeddings' gradients. Summed over the processes, the weight
    gradients are one process's over the whole batch, so each process's embeddings are negatives
    for every question. Returns this process's share of the loss (the loss / the number of processes).
    """
    size = settings.micro_batch_size or _GROUP
    sides, ranges = [], []
    for texts, max_len in ((encoder.query_texts(queries), settings.max_query_len),
                           (encoder.passage_texts(passages), settings.max_passage_len)):
        start, end = distributed.share_range(len(texts))
        sides.append((texts[start:end], _length_groups(encoder, texts[start:end], max_len, size), max_len))
        ranges.append((start, end))
    with encoder.backbone.attention(training_attention(settings, encoder.backbone.device)):
        with torch.no_grad():
            q, p = (distributed.gather_rows(_encode(encoder, texts, groups, max_len)) for texts, groups, max_len in sides)
        q.requires_grad_(True)
        p.requires_grad_(True)
        loss = info_nce(q, p, targets.to(q.device), settings.temperature, mask.to(q.device))
        (loss * weight).backward()
        for (texts, groups, max_len), full, (start, end) in zip(sides, (q, p), ranges, strict=True):
            grads = full.grad[start:end]
            for group in groups:
                reps = encoder.forward(encoder.tokenize([texts[i] for i in group], max_len))
                (reps * grads[torch.tensor(group, device=grads.device)]).sum().backward()
    return loss.item() / distributed.world_size()


def training_attention(settings: RetrieverConfig | RerankerConfig, device: str) -> str | None:
    """The attention kernel of the training passes (None: the model's own); see `training_attention`."""
    if settings.training_attention == "auto":
        return "eager" if device == "cpu" else None
    return settings.training_attention


def train_retriever(
    backbone: SharedBackbone, examples: list[TrainingExample], settings: RetrieverConfig, out_dir: Path, seed: int,
    end_id: int | None = None,
) -> dict:
    """Train the `retriever` adapter on `examples` (texts ended by `end_id`, see `Encoder`) and save it to `out_dir`."""
    encoder = Encoder(backbone, settings, end_id=end_id)
    rng = random.Random(seed)
    seed_everything(seed)  # the new adapter's random start, whatever ran before in this process
    started = time.time()
    with backbone.training(RETRIEVER, settings.lora) as named:
        losses = train_loop(
            named,
            step_batches(examples, settings, seed),
            lambda batch: contrastive_step(encoder, batch, settings, rng),
            settings,
            Path(out_dir) / "checkpoint",
            "train retriever",
        )
    backbone.save_adapter(RETRIEVER, out_dir)
    return {**loss_summary(losses), "examples": len(examples), "seconds": round(time.time() - started, 1)}
