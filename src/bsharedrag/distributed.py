"""Training over several processes, launched by `accelerate launch` or `torchrun`.

Every process builds the same seeded step batches and takes its contiguous share of each
(`share`). A step function scales its loss by the step's *global* size (examples or answer
tokens), so the gradients summed over the processes after the step (`sum_gradients`) are the
gradients one process would get from the whole batch: the trained weights do not depend on the
number of processes (tests/test_distributed.py checks it). The contrastive loss gathers every
process's embeddings (`gather_rows`), so each question sees all passages of the step as negatives.

DDP's module wrapper is not used: the stages call the backbone's decoder and LM head directly,
outside a wrapped `forward`, and the trainable LoRA weights are a few MB, so one all-reduce of
their gradients per step costs what DDP's reducer would. With one process every function here is
a no-op, and torch.distributed is never initialised.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from datetime import timedelta

__all__ = ["barrier", "broadcast_from_main", "gather_array", "gather_rows", "init", "is_main", "lockstep", "lockstep_share",
           "rank", "share", "share_range", "sum_gradients", "sum_value", "sync", "world_size"]

_TIMEOUT = timedelta(hours=12)  # a stage that only the main process builds (an index, an evaluation) may take long
_in_lockstep = False


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def init() -> None:
    """Join the process group the launcher describes (WORLD_SIZE > 1 in the environment); else nothing."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and _dist() is None:
        from accelerate import PartialState

        PartialState(timeout=_TIMEOUT)  # gloo on CPU, NCCL on CUDA, each process on its own GPU


def world_size() -> int:
    dist = _dist()
    return dist.get_world_size() if dist else 1


def rank() -> int:
    dist = _dist()
    return dist.get_rank() if dist else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist := _dist():
        dist.barrier()


@contextlib.contextmanager
def lockstep() -> Iterator[None]:
    """A block that every process runs at once (a training stage): `sync` waits for all of them inside it."""
    global _in_lockstep
    previous, _in_lockstep = _in_lockstep, True
    try:
        yield
    finally:
        _in_lockstep = previous


def sync() -> None:
    """A barrier inside a `lockstep` block; elsewhere nothing (the main process builds such a stage alone,
    and a barrier there would meet the others' wait at the stage's end)."""
    if _in_lockstep:
        barrier()


def share_range(count: int) -> tuple[int, int]:
    """[start, end) of this process's contiguous share of `count` items (shares differ by at most one)."""
    size, here = world_size(), rank()
    base, extra = divmod(count, size)
    start = here * base + min(here, extra)
    return start, start + base + (here < extra)


def share(items: Sequence) -> list:
    start, end = share_range(len(items))
    return list(items[start:end])


def lockstep_share(count: int) -> tuple[int, int]:
    """`share_range` inside a `lockstep` block, where every process takes part; elsewhere all of them
    (the main process works alone there)."""
    return share_range(count) if _in_lockstep else (0, count)


def gather_array(rows):
    """A numpy array (n_i, ...) of each process, concatenated in rank order, inside a `lockstep` block
    (every process gets the whole); elsewhere `rows` itself."""
    if not _in_lockstep or _dist() is None:
        return rows
    import torch

    tensor = torch.from_numpy(rows)
    if _dist().get_backend() == "nccl":
        tensor = tensor.cuda()
    return gather_rows(tensor).cpu().numpy()


def gather_rows(rows):
    """Every process's `rows` (n_i, ...) concatenated in rank order; without gradients (callers that need
    them back-propagate into their own share, as gradient caching does)."""
    dist = _dist()
    if dist is None:
        return rows
    import torch

    counts = [torch.zeros(1, dtype=torch.long, device=rows.device) for _ in range(world_size())]
    dist.all_gather(counts, torch.tensor([rows.shape[0]], device=rows.device))
    widest = int(max(count.item() for count in counts))
    padded = torch.zeros((widest, *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
    padded[: rows.shape[0]] = rows.detach()
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(count.item())] for part, count in zip(parts, counts, strict=True)])


def broadcast_from_main(params) -> None:
    """Give every process the main process's values of `params` (a new adapter's random start)."""
    if dist := _dist():
        for p in params:
            dist.broadcast(p.data, src=0)


def sum_gradients(params) -> None:
    """Sum each parameter's gradient over the processes (a missing one counts as zero)."""
    dist = _dist()
    if dist is None:
        return
    import torch

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)


def sum_value(value: float) -> float:
    """A float summed over the processes (each step function returns its share of the step's loss)."""
    dist = _dist()
    if dist is None:
        return value
    import torch

    tensor = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return float(tensor.item())
