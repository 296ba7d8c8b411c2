"""The `reranker` adapter: a listwise softmax over one positive and its negatives, per question.

Each training question gets a group: one of its positives, then `negatives_per_query` negatives,
half from the mined hard negatives (`mine` stage) and half from the trained retriever's own
top-ranked misses (`retriever_misses`), the other kind filling in when one runs short. The misses
are what the reranker meets at query time: passages the first stage ranks high that are not
relevant. The loss is the cross-entropy of the group's scores (`model/reranker.py`) with the
positive as the target, averaged over the step's questions.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import distributed
from ..config import RerankerConfig
from ..data import Document
from ..model.backbone import RERANKER, SharedBackbone
from ..model.reranker import Reranker
from .loop import loss_summary, micro_batches, seed_everything, step_batches, train_loop
from .retriever import TrainingExample, training_attention

__all__ = ["RerankExample", "listwise_step", "rerank_examples", "train_reranker"]


@dataclass(frozen=True)
class RerankExample:
    query: str
    positives: tuple[Document, ...]  # best grade first
    mined: tuple[Document, ...]  # mined hard negatives
    misses: tuple[Document, ...]  # the retriever's top-ranked passages that are not relevant, best first


def rerank_examples(mined: list[TrainingExample], misses: list[TrainingExample]) -> list[RerankExample]:
    """Zip two `training_examples` lists of the same queries, one with mined negatives, one with the misses."""
    if len(mined) != len(misses):
        raise ValueError(f"{len(mined)} examples with mined negatives but {len(misses)} with retriever misses")
    examples = []
    for a, b in zip(mined, misses, strict=True):
        if a.query != b.query:
            raise ValueError(f"the two example lists disagree: {a.query!r} against {b.query!r}")
        examples.append(RerankExample(a.query, a.positives, a.negatives, b.negatives))
    return examples


def _group(example: RerankExample, count: int, rng: random.Random) -> list[Document]:
    """The positive, then `count` negatives (or as many as there are), half of each kind where both suffice."""
    positive = rng.choice(example.positives)
    known = {doc.id for doc in example.positives}
    mined = [doc for doc in example.mined if doc.id not in known]
    taken = known | {doc.id for doc in mined}
    misses = [doc for doc in example.misses if doc.id not in taken]
    take_mined = min(len(mined), max(count // 2, count - len(misses)))
    take_misses = min(len(misses), count - take_mined)
    return [positive, *rng.sample(mined, take_mined), *misses[:take_misses]]


def listwise_step(reranker: Reranker, batch: list[RerankExample], settings: RerankerConfig,
                  rng: random.Random) -> float:
    """One forward and backward pass over `batch` (micro-batched by question); returns the mean loss
    (this process's share of it: the groups are drawn for the whole batch on every process)."""
    groups = [_group(example, settings.negatives_per_query, rng) for example in batch]
    total = 0.0
    pairs = {id(ex): [reranker.pair_ids(ex.query, doc) for doc in group] for ex, group in zip(batch, groups)}
    with reranker.backbone.attention(training_attention(settings, reranker.backbone.device)):
        for micro in micro_batches(distributed.share(batch), settings):  # this process's share
            rows = [row for ex in micro for row in pairs[id(ex)]]
            scores = reranker.forward(rows)
            losses, start = [], 0
            for ex in micro:
                size = len(pairs[id(ex)])
                losses.append(F.cross_entropy(scores[start : start + size].unsqueeze(0),
                                              torch.zeros(1, dtype=torch.long, device=scores.device)))
                start += size
            loss = torch.stack(losses).sum() / len(batch)
            loss.backward()
            total += loss.item()
    return total


def train_reranker(backbone: SharedBackbone, examples: list[RerankExample], settings: RerankerConfig,
                   out_dir: Path, seed: int) -> dict:
    """Train the `reranker` adapter on `examples` and save it to `out_dir`."""
    usable = [ex for ex in examples if ex.mined or ex.misses]
    if not usable:
        raise ValueError("no training question has a negative to rank its positive against")
    reranker = Reranker(backbone, settings)
    rng = random.Random(seed)
    seed_everything(seed)  # the new adapter's random start, whatever ran before in this process
    started = time.time()
    with backbone.training(RERANKER, settings.lora) as named:
        losses = train_loop(named, step_batches(usable, settings, seed),
                            lambda batch: listwise_step(reranker, batch, settings, rng),
                            settings, Path(out_dir) / "checkpoint", "train reranker")
    backbone.save_adapter(RERANKER, out_dir)
    return {**loss_summary(losses), "examples": len(usable), "seconds": round(time.time() - started, 1)}
