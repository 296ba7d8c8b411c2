"""Every stage for a few steps on a randomly initialised model of a real shape, on a GPU: throughput
against the memory-bandwidth bound.

    python scripts/gpu_smoke.py                                   # Qwen2.5-0.5B's shape on CUDA
    python scripts/gpu_smoke.py --shape qwen2.5-1.5b --steps 5
    python scripts/gpu_smoke.py --shape tiny --device cpu --steps 1   # the same code paths on a CPU, in seconds

No weights are needed: the model is built from its shape and initialised at random (the tokenizer is
the test suite's copy of SmolLM2's, so the vocabulary is 49,152 rather than the shape's own). The
stages are the library's own functions, so this runs the CUDA paths of continual pre-training (full
weights, bf16 autocast, gradient checkpointing), the retriever (InfoNCE, gradient caching), the
generator (answer-only loss), embedding, and decoding (the lean loop, 1 and 8 answers together). It
prints tokens/s per stage and, for decoding, the bound set by reading every weight once per step at
the measured memory bandwidth. Texts are random words: the losses mean nothing, the speeds do.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {  # Qwen2-family shapes (hidden, layers, heads, KV heads, MLP width)
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                 intermediate_size=128),
    "qwen2.5-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         intermediate_size=4864),
    "qwen2.5-1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         intermediate_size=8960),
}
TOKENIZER = Path(__file__).resolve().parents[1] / "tests" / "assets" / "tokenizer"
_WORDS = ("kettle steel lid litre boil water fits model case laptop strap waterproof battery hours charge cable "
          "colour black size small large warranty wash hand dishwasher safe handle grip plastic glass").split()


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(words))


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bandwidth_gb_s(device: str, mib: int) -> float:
    """Memory bandwidth from timing a large copy (bytes read plus bytes written per second)."""
    source = torch.empty(mib * 2**20 // 4, dtype=torch.float32, device=device).uniform_()
    target = torch.empty_like(source)
    target.copy_(source)
    _sync(device)
    started, repeats = time.perf_counter(), 5
    for _ in range(repeats):
        target.copy_(source)
    _sync(device)
    return 2 * source.numel() * 4 * repeats / (time.perf_counter() - started) / 1e9


def build_backbone(shape: str, device: str):
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from bsharedrag.model.backbone import SharedBackbone, autocast_dtype

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    config = Qwen2Config(vocab_size=len(tokenizer), tie_word_embeddings=True, max_position_embeddings=4096,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **SHAPES[shape])
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(device).eval()
    backbone = SharedBackbone(model, tokenizer, device, autocast_dtype("auto", device))
    backbone.gradient_checkpointing = device == "cuda"
    return backbone


def _timed(device: str, work) -> tuple[object, float]:
    _sync(device)
    started = time.perf_counter()
    result = work()
    _sync(device)
    return result, time.perf_counter() - started


def run(shape: str, device: str, steps: int, scratch: Path) -> dict:
    from bsharedrag.config import GeneratorConfig, PretrainConfig, RetrieverConfig
    from bsharedrag.data import Document
    from bsharedrag.model.encoder import Encoder
    from bsharedrag.model.generate import stream_tokens
    from bsharedrag.model.prompt import encode_prompt
    from bsharedrag.train.generator import Triple, train_generator
    from bsharedrag.train.pretrain import pretrain
    from bsharedrag.train.retriever import TrainingExample, train_retriever

    rng = random.Random(0)
    backbone = build_backbone(shape, device)
    parameters = sum(p.numel() for p in backbone.model.parameters())
    results: dict = {"shape": shape, "device": device, "parameters": parameters,
                     "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
                     "bandwidth_gb_s": round(bandwidth_gb_s(device, 1024 if device == "cuda" else 256), 1)}

    # continual pre-training: full weights
    settings = PretrainConfig(seq_len=512, batch_size=8, micro_batch_size=4, max_steps=steps, heldout_fraction=0.05)
    texts = [_text(rng, 60) for _ in range(8 * 512 * steps // 40 + 200)]
    stats, seconds = _timed(device, lambda: pretrain(backbone, texts, settings, scratch / "pretrain", seed=0))
    results["pretrain"] = {"steps": stats["steps"], "tokens_per_s": round(stats["steps"] * 8 * 512 / seconds),
                           "seconds": round(seconds, 1), "note": "wall time incl. two held-out perplexity passes"}
    # retriever: InfoNCE with gradient caching
    docs = [Document(f"d{n}", _text(rng, 4), _text(rng, 80), f"p{n // 4}") for n in range(512)]
    examples = [TrainingExample(_text(rng, 10), (docs[n],), (docs[(n + 7) % len(docs)],)) for n in range(256)]
    settings = RetrieverConfig(batch_size=32, micro_batch_size=8, max_steps=steps, max_passage_len=128,
                               negatives_per_query=1)
    stats, seconds = _timed(device, lambda: train_retriever(backbone, examples, settings, scratch / "retriever", 0))
    texts_per_step = 32 * 3  # each question, its positive and one negative
    results["retriever"] = {"steps": stats["steps"], "texts_per_s": round(stats["steps"] * texts_per_step / seconds, 1),
                            "seconds": round(seconds, 1)}
    # embedding passages with the retriever adapter
    encoder = Encoder(backbone, settings)
    _, seconds = _timed(device, lambda: encoder.embed_passages(docs, 8192))
    results["embed"] = {"passages": len(docs), "passages_per_s": round(len(docs) / seconds, 1)}
    # generator: answer-only loss on (question, passages, answer)
    triples = [Triple(_text(rng, 10), tuple(rng.sample(docs, 3)), _text(rng, 20), (1,)) for _ in range(128)]
    settings = GeneratorConfig(batch_size=8, micro_batch_size=4, max_steps=steps)
    stats, seconds = _timed(device, lambda: train_generator(backbone, triples, settings, scratch / "generator", 0))
    results["generator"] = {"steps": stats["steps"], "examples_per_s": round(stats["steps"] * 8 / seconds, 1),
                            "seconds": round(seconds, 1)}
    # decoding with the generator adapter: 1 and 8 answers together
    prompt = encode_prompt(backbone.tokenizer, _text(rng, 12), list(docs[:3]), settings).ids
    bound = results["bandwidth_gb_s"] * 1e9 / (parameters * backbone.base.dtype.itemsize)  # fp32 decode steps
    results["decode"] = {"prompt_tokens": len(prompt), "bound_tokens_per_s": round(bound, 1)}
    for together in (1, 8):
        from bsharedrag.model import generate as generation

        stops = generation.stop_token_ids
        generation.stop_token_ids = lambda tokenizer, model=None: set()  # a fixed number of tokens per answer
        try:
            streams = [stream_tokens(backbone, prompt, 65, adapter="generator") for _ in range(together)]
            for stream in streams:
                next(stream)  # prefill and first token
            _, seconds = _timed(device, lambda: [list(stream) for stream in streams])
        finally:
            generation.stop_token_ids = stops
        rate = together * 64 / seconds
        results["decode"][f"tokens_per_s_{together}"] = round(rate, 1)
        results["decode"][f"share_of_bound_{together}"] = round(rate / together / bound, 3)
    if device == "cuda":
        results["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json", type=Path, help="Also write the results to this file.")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or pass --device cpu (with --shape tiny)")
    with tempfile.TemporaryDirectory() as scratch:
        results = run(args.shape, args.device, args.steps, Path(scratch))
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
