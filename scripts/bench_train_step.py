"""Peak memory and time of one retriever training step on the embedded default, by how texts are batched.

    python scripts/bench_train_step.py [--steps 3] [--trim] [--fused] [--set retriever.batch_size=16 ...]

Each variant runs in a fresh process, so its peak resident memory (VmHWM) is its own:
`padded` embeds each side of the batch in one forward pass padded to its longest text (the code
before length grouping), `grouped` in length-sorted groups of 8 (the default), `cached-8` and
`cached-4` with gradient caching over micro-batches of 8 and 4. The batch is the quick profile's
(16 ePQA train questions, each with its positive and one same-product negative); the step is the
training stage's own `contrastive_step` with the retriever's LoRA. `--trim` hands the heap's free pages
back after every step (`memory.trim_heap`), `--fused` steps AdamW with its fused kernel.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time

VARIANTS = {"padded": (10**6, None), "grouped": (8, None), "cached-8": (8, 8), "cached-4": (4, 4)}


def child(variant: str, steps: int, overrides: list[str], trim: bool, fused: bool) -> dict:
    import torch

    from bsharedrag.config import load_config
    from bsharedrag.data import load_dataset
    from bsharedrag.memory import peak_rss_mib, reset_peak_rss, trim_heap
    from bsharedrag.model.backbone import RETRIEVER, SharedBackbone
    from bsharedrag.model.encoder import Encoder
    from bsharedrag.train import retriever as training
    from bsharedrag.train.retriever import TrainingExample, contrastive_step

    config = load_config(overrides=overrides)
    group, micro = VARIANTS[variant]
    training._GROUP = group
    settings = config.retriever.model_copy(update={"micro_batch_size": micro})
    dataset = load_dataset(settings.datasets[0].path, "train")
    by_product: dict = {}
    for doc in dataset.corpus:
        by_product.setdefault(doc.product_id, []).append(doc)
    rng = random.Random(0)
    examples = []
    for query in dataset.queries:
        relevant = dataset.qrels[query.id]
        positives = tuple(dataset.docs[d] for d in relevant)
        others = tuple(d for d in by_product.get(query.product_id, []) if d.id not in relevant) or (rng.choice(dataset.corpus),)
        examples.append(TrainingExample(query.text, positives, others))
    backbone = SharedBackbone.load(config.backbone)
    encoder = Encoder(backbone, settings)
    reset_peak_rss()
    loaded = peak_rss_mib()
    seconds = []
    with backbone.training(RETRIEVER, settings.lora) as named:
        optimizer = torch.optim.AdamW(named.values(), lr=settings.lr, fused=fused)
        for step in range(steps):
            batch = rng.sample(examples, settings.batch_size)
            started = time.perf_counter()
            contrastive_step(encoder, batch, settings, rng)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if trim:
                trim_heap()
            seconds.append(time.perf_counter() - started)
    return {"variant": variant, "trim": trim, "fused": fused, "model_loaded_rss_mib": round(loaded), "peak_rss_mib": round(peak_rss_mib()),
            "seconds_per_step": round(sorted(seconds)[len(seconds) // 2], 2), "steps": steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--trim", action="store_true", help="trim the heap after every step")
    parser.add_argument("--fused", action="store_true", help="fused AdamW")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.overrides, args.trim, args.fused)))
        return
    for variant in args.variants:
        command = [sys.executable, __file__, "--child", variant, "--steps", str(args.steps)]
        command += ["--trim"] * args.trim + ["--fused"] * args.fused
        command += [f"--set={item}" for item in args.overrides]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        print(done.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
