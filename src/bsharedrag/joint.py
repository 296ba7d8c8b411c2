"""The fully shared baseline: one LoRA adapter trained on L_gen + λ·L_ret, used to retrieve and to answer.

Each optimiser step takes one retrieval batch (InfoNCE with in-batch and mined hard negatives,
gradient-cached as in `retriever.py`) and one generation batch (answer-token cross-entropy, as in
`generator.py`) and back-propagates `L_gen + λ·L_ret` into the same adapter. The number of steps,
the learning rate and the LoRA shape come from the retriever settings; generation batches cycle
through the triples with the generator's batch size.

No dense retriever exists before this adapter is trained, so the generation triples get their
passages from BM25 over each dataset's corpus (with the generator's gold-passage rule).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from .backbone import SharedBackbone
from .baselines import BM25Retriever
from .config import Config
from .data import Dataset
from .generator import answer_loss_step, build_triples, encode_triples
from .index import Hit
from .retriever import ADAPTER, Encoder, TrainingExample, contrastive_step
from .training import seed_everything, step_batches, train_loop

__all__ = ["train_fully_shared"]


class _BM25Passages:
    """BM25 search returning `Hit`s, the shape `build_triples` reads."""

    def __init__(self, dataset: Dataset):
        self._bm25 = BM25Retriever(dataset.corpus)
        self._docs = dataset.docs

    def search(self, questions: list[str], top_k: int) -> list[list[Hit]]:
        return [[Hit(self._docs[doc_id], score) for doc_id, score in row]
                for row in self._bm25.search(questions, top_k)]


def train_fully_shared(
    backbone: SharedBackbone, examples: list[TrainingExample], datasets: list[Dataset], config: Config, out_dir: Path
) -> dict:
    """Train the one adapter (saved as the `retriever` adapter in `out_dir`); returns training stats."""
    ret_settings, gen_settings = config.retriever, config.generator
    weight, seed = config.fully_shared_lambda, config.seed
    seed_everything(seed)
    passages = [_BM25Passages(dataset) for dataset in datasets] if gen_settings.with_passages else None
    triples = build_triples(datasets, passages, gen_settings, seed)
    tokenizer = backbone.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    retrieval_batches = step_batches(examples, ret_settings, seed)
    steps = len(retrieval_batches)
    cycling = gen_settings.model_copy(update={"max_steps": steps, "epochs": float(steps)})
    generation_batches = step_batches(encode_triples(tokenizer, triples, gen_settings), cycling, seed)

    encoder = Encoder(backbone, ret_settings)
    rng = random.Random(seed)
    parts: dict[str, list[float]] = {"retrieval": [], "generation": []}

    def step(pair: list) -> float:
        retrieval_batch, generation_batch = pair
        ret_loss = contrastive_step(encoder, retrieval_batch, ret_settings, rng, weight=weight)
        gen_loss = answer_loss_step(backbone, generation_batch, gen_settings, pad_id)
        parts["retrieval"].append(ret_loss)
        parts["generation"].append(gen_loss)
        return gen_loss + weight * ret_loss

    started = time.perf_counter()
    with backbone.training(ADAPTER, ret_settings.lora) as named:
        losses = train_loop(named, [list(pair) for pair in zip(retrieval_batches, generation_batches)], step,
                            ret_settings, Path(out_dir) / "checkpoint", f"train fully shared (λ={weight})")
    backbone.save_adapter(ADAPTER, out_dir)

    def tail(values: list[float]) -> float | None:
        return sum(values[-5:]) / len(values[-5:]) if values else None

    stats = {
        "steps": len(losses),
        "lambda": weight,
        "examples": len(examples),
        "triples": len(triples),
        "first_loss": losses[0] if losses else None,
        "final_loss": tail(losses),
        "final_retrieval_loss": tail(parts["retrieval"]),  # since the last resume
        "final_generation_loss": tail(parts["generation"]),
        "seconds": round(time.perf_counter() - started, 1),
    }
    (Path(out_dir) / "training.json").write_text(json.dumps({"stats": stats, **parts}, indent=2))
    return stats
