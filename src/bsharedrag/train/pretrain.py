"""Stage 1: domain continual pre-training (causal LM loss on packed corpus text).

Passages are packed back to back, each ended by the document-end token (`pretrain.document_end`,
`model.prompt.document_end_id`: EOS by default). The retriever pools on the same token, so what
pre-training taught the model to hold there, a summary of the passage, serves retrieval.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import torch

from .. import distributed
from ..config import PretrainConfig
from ..data import read_corpus
from ..model.backbone import SharedBackbone
from ..model.prompt import document_end_id
from .loop import loss_summary, micro_batches, step_batches, train_loop

__all__ = ["domain_texts", "pack", "perplexity", "pretrain"]

_ADAPTER = "pretrain"


def domain_texts(settings: PretrainConfig, strict: bool = False) -> list[str]:
    """Every corpus passage of the configured datasets plus each line of the extra text files."""
    texts = [doc.content for path in settings.datasets for doc in read_corpus(Path(path) / "corpus.jsonl", strict)]
    for path in settings.text_files:
        if not Path(path).exists():
            raise FileNotFoundError(f"pretrain.text_files: {path} does not exist")
        texts += [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise ValueError("continual pre-training found no text: check pretrain.datasets and pretrain.text_files")
    return texts


def pack(tokenizer, texts: list[str], seq_len: int, max_tokens: int | None = None,
         end_id: int | None = None) -> list[list[int]]:
    """Concatenate `text + end` token streams (`end_id`, default EOS) and cut them into full sequences of
    `seq_len` tokens."""
    end_id = tokenizer.eos_token_id if end_id is None else end_id
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream += ids + [end_id]
        if max_tokens is not None and len(stream) >= max_tokens:
            break
    return [stream[i : i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]


def _loss(model, sequences: list[list[int]], device: str) -> torch.Tensor:
    ids = torch.tensor(sequences, device=device)
    return model(input_ids=ids, labels=ids).loss


@torch.inference_mode()
def perplexity(backbone: SharedBackbone, sequences: list[list[int]], batch_size: int = 8) -> float:
    total = 0.0
    for i in range(0, len(sequences), batch_size):
        chunk = sequences[i : i + batch_size]
        with backbone.autocast_context():
            total += _loss(backbone.model, chunk, backbone.device).item() * len(chunk)
    return math.exp(total / len(sequences))


def pretrain(backbone: SharedBackbone, texts: list[str], settings: PretrainConfig, out_dir: Path, seed: int) -> dict:
    """Continue pre-training `backbone` on `texts` and save the domain backbone to `out_dir`."""
    rng = random.Random(seed)
    texts = list(texts)
    rng.shuffle(texts)
    n_heldout = max(1, int(len(texts) * settings.heldout_fraction))
    end_id = document_end_id(backbone.tokenizer, settings.document_end)
    heldout = pack(backbone.tokenizer, texts[:n_heldout], settings.seq_len, end_id=end_id)[:64]
    train = pack(backbone.tokenizer, texts[n_heldout:], settings.seq_len, settings.max_tokens, end_id)
    if not heldout:
        raise ValueError("too little held-out text for one sequence; raise pretrain.heldout_fraction")
    started = time.time()
    eval_batch = settings.micro_batch_size or settings.batch_size
    before = perplexity(backbone, heldout, eval_batch)

    if settings.mode == "lora-merge":
        backbone.add_adapter(_ADAPTER, settings.lora)
        backbone.train_adapter(_ADAPTER)
    else:
        for p in backbone.model.parameters():
            p.requires_grad_(True)
    named = {n: p for n, p in backbone.model.named_parameters() if p.requires_grad}

    def step(batch: list[list[int]]) -> float:
        total = 0.0
        for micro in micro_batches(distributed.share(batch), settings):  # this process's share
            with backbone.autocast_context():
                loss = _loss(backbone.model, micro, backbone.device) * len(micro) / len(batch)
            loss.backward()
            total += loss.item()
        return total

    backbone.model.train()
    with backbone.checkpointed():
        losses = train_loop(named, step_batches(train, settings, seed), step, settings, Path(out_dir) / "checkpoint",
                            "continual pre-training")
    backbone.model.eval()
    for p in backbone.model.parameters():
        p.requires_grad_(False)
    if settings.mode == "lora-merge":
        backbone.merge_and_unload()
    after = perplexity(backbone, heldout, eval_batch)
    backbone.base.save_pretrained(out_dir)
    backbone.tokenizer.save_pretrained(out_dir)
    return {
        "document_end": backbone.tokenizer.convert_ids_to_tokens(end_id),
        "train_sequences": len(train),
        "train_tokens": len(train) * settings.seq_len,
        **loss_summary(losses),
        "heldout_sequences": len(heldout),
        "heldout_perplexity_before": round(before, 3),
        "heldout_perplexity_after": round(after, 3),
        "seconds": round(time.time() - started, 1),
    }
