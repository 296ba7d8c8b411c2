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

from ..config import GeneratorConfig, RetrieverConfig
from ..data import Dataset
from ..model.backbone import RETRIEVER, SharedBackbone
from ..model.baselines import BM25Retriever
from ..model.encoder import Encoder
from .generator import answer_loss_step, build_triples, encode_triples
from .loop import loss_summary, seed_everything, step_batches, train_loop
from .retriever import TrainingExample, contrastive_step

__all__ = ["train_fully_shared"]


def train_fully_shared(
    backbone: SharedBackbone,
    examples: list[TrainingExample],
    datasets: list[Dataset],
    ret_settings: RetrieverConfig,
    gen_settings: GeneratorConfig,
    weight: float,
    out_dir: Path,
    seed: int = 0,
    end_id: int | None = None,
) -> dict:
    """Train the one adapter on L_gen + `weight`·L_ret (saved as the `retriever` adapter in `out_dir`); returns stats.

    Texts the retriever embeds end with `end_id` (see `Encoder`)."""
    seed_everything(seed)
    passages = [BM25Retriever(dataset.corpus) for dataset in datasets] if gen_settings.with_passages else None
    triples = build_triples(datasets, passages, gen_settings, seed)
    tokenizer = backbone.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    retrieval_batches = step_batches(examples, ret_settings, seed)
    steps = len(retrieval_batches)
    cycling = gen_settings.model_copy(update={"max_steps": steps, "epochs": float(steps)})
    generation_batches = step_batches(encode_triples(tokenizer, triples, gen_settings), cycling, seed)

    encoder = Encoder(backbone, ret_settings, end_id=end_id)
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
    with backbone.training(RETRIEVER, ret_settings.lora) as named:
        losses = train_loop(named, [list(pair) for pair in zip(retrieval_batches, generation_batches)], step,
                            ret_settings, Path(out_dir) / "checkpoint", f"train fully shared (λ={weight})")
    backbone.save_adapter(RETRIEVER, out_dir)

    def tail(values: list[float]) -> float | None:
        return loss_summary(values)["final_loss"]

    stats = {
        **loss_summary(losses),
        "lambda": weight,
        "examples": len(examples),
        "triples": len(triples),
        "final_retrieval_loss": tail(parts["retrieval"]),  # since the last resume
        "final_generation_loss": tail(parts["generation"]),
        "seconds": round(time.perf_counter() - started, 1),
    }
    (Path(out_dir) / "training.json").write_text(json.dumps({"stats": stats, **parts}, indent=2))
    return stats
