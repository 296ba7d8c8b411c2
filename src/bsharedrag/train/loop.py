"""The one training loop every stage uses: schedule -> checkpoint -> accumulate -> clip -> step -> log.

A stage supplies the step batches and a `step_fn` that runs forward and backward over one step
batch (micro-batching or gradient caching inside) and returns the loss. The loop owns the
optimiser, the learning-rate schedule and resumable checkpoints.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .. import distributed
from ..config import TrainSettings
from ..files import replacing, settled
from ..memory import trim_heap
from ..progress import progress

__all__ = ["FINAL_LOSS_STEPS", "loss_summary", "lr_at", "micro_batches", "train_loop", "seed_everything", "step_batches"]

FINAL_LOSS_STEPS = 5  # `final_loss` is the mean loss of this many last steps

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover
        pass


def step_batches(examples: Sequence, settings: TrainSettings, seed: int) -> list[list]:
    """Shuffle `examples` per epoch and cut them into optimiser-step batches (last partial one dropped)."""
    size = settings.batch_size
    if len(examples) < size:
        raise ValueError(f"{len(examples)} training examples are fewer than one batch of {size}; lower batch_size")
    rng = random.Random(seed)
    per_epoch = len(examples) // size
    total = max(1, math.ceil(per_epoch * settings.epochs))
    if settings.max_steps is not None:
        total = min(total, settings.max_steps)
    batches: list[list] = []
    while len(batches) < total:
        order = list(examples)
        rng.shuffle(order)
        batches += [order[i : i + size] for i in range(0, per_epoch * size, size)]
    return batches[:total]


def micro_batches(batch: list, settings: TrainSettings, length: Callable[[object], int] | None = None) -> list[list]:
    """The forward passes of one step batch: `micro_batch_size` examples each or, with `micro_batch_tokens`
    and the examples' `length`, length-sorted groups of at most that many padded tokens."""
    if settings.micro_batch_tokens is None or length is None:
        size = settings.micro_batch_size or len(batch)
        return [batch[i : i + size] for i in range(0, len(batch), size)]
    groups: list[list] = []
    for example in sorted(batch, key=length, reverse=True):  # each group's first example is its longest
        if groups and (len(groups[-1]) + 1) * length(groups[-1][0]) <= settings.micro_batch_tokens:
            groups[-1].append(example)
        else:
            groups.append([example])
    return groups


def lr_at(step: int, total: int, settings: TrainSettings) -> float:
    warmup = int(settings.warmup_ratio * total)
    if step < warmup:
        return settings.lr * (step + 1) / warmup
    progress_ = (step - warmup) / max(1, total - warmup)
    return settings.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_)))


def _save_checkpoint(folder: Path, named: dict[str, torch.nn.Parameter], optimizer, step: int, losses: list) -> None:
    with replacing(folder) as partial:  # a kill during the save leaves the previous checkpoint intact
        partial.mkdir(parents=True)
        torch.save(
            {
                "params": {name: p.detach().cpu() for name, p in named.items()},
                "optimizer": optimizer.state_dict(),
                "rng": {"python": random.getstate(), "torch": torch.get_rng_state()},
            },
            partial / "state.pt",
        )
        (partial / "progress.json").write_text(json.dumps({"step": step, "losses": losses}))


def _load_checkpoint(folder: Path, named: dict[str, torch.nn.Parameter], optimizer) -> tuple[int, list]:
    state = torch.load(folder / "state.pt", weights_only=False)
    with torch.no_grad():
        for name, p in named.items():
            p.copy_(state["params"][name])
    optimizer.load_state_dict(state["optimizer"])
    random.setstate(state["rng"]["python"])
    torch.set_rng_state(state["rng"]["torch"])
    info = json.loads((folder / "progress.json").read_text())
    return info["step"], info["losses"]


def train_loop(
    named_params: dict[str, torch.nn.Parameter],
    batches: list[list],
    step_fn: Callable[[list], float],
    settings: TrainSettings,
    checkpoint_dir: Path,
    description: str,
) -> list[float]:
    """Run the optimiser over `batches`; resumes from `checkpoint_dir` when a checkpoint is there.

    Returns the loss of every step. `step_fn` must call `backward()`; the loop only steps. Over
    several processes (`distributed`), `step_fn` handles this process's share of the batch and returns
    its share of the loss; the loop sums gradients and losses over the processes before stepping.
    """
    params = list(named_params.values())
    if not params:
        raise ValueError("no trainable parameters were given to the training loop")
    # fused: one in-place kernel over all parameters, without a temporary copy of each
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay, fused=True)
    start, losses = 0, []
    checkpoint = Path(checkpoint_dir)
    if (settled(checkpoint) / "state.pt").exists():
        start, losses = _load_checkpoint(checkpoint, named_params, optimizer)
        log.info("%s: resuming from step %d of %d", description, start, len(batches))
    distributed.broadcast_from_main(params)  # every process starts from the same weights
    total = len(batches)
    bar = progress(total=total, initial=start, desc=description, quiet=not distributed.is_main())
    for step in range(start, total):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total, settings)
        if step > start and step % settings.checkpoint_every == 0:
            _save_checkpoint(checkpoint, named_params, optimizer, step, losses)
        loss = distributed.sum_value(step_fn(batches[step]))
        distributed.sum_gradients(params)
        torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        trim_heap()  # each step's activations differ in shape: without it the heap climbs step by step
        losses.append(float(loss))
        bar.update(1)
        if step % settings.log_every == 0 or step == total - 1:
            recent = losses[-settings.log_every :]
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}")
    bar.close()
    shutil.rmtree(checkpoint, ignore_errors=True)
    return losses


def loss_summary(losses: list[float]) -> dict:
    """The loss statistics every training stage reports, with one meaning of `final_loss`."""
    tail = losses[-FINAL_LOSS_STEPS:]
    return {"steps": len(losses), "first_loss": losses[0] if losses else None,
            "final_loss": sum(tail) / len(tail) if tail else None}
