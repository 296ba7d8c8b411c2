"""Decoding speed of `stream_tokens` on the real backbone: time to first token and tokens/s.

    python scripts/bench_generate.py [--new-tokens 64] [--prompt-tokens 300] [--repeats 3] [--threads N]

Runs a ~300-token RAG prompt built from ePQA passages, with no adapter and with an untrained LoRA
`generator`, under fp32 and under the backbone's bf16 autocast for the prompt. Two reference
loops show what the choices in `bsharedrag.model.generate` buy: transformers' own cached forward, and
decoding every token under bf16 autocast. EOS is ignored so every run makes the same number of tokens.

The memory-bandwidth bound is probed right before each row, because it moves with the other tenants
of a shared host: one matrix-vector product per weight matrix of the backbone (the least a decoder
must read per token). `bound tok/s` is the inverse of that read time and `% bound` the row's share.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import time

import torch

from bsharedrag.model import generate as generation
from bsharedrag.model.backbone import SharedBackbone
from bsharedrag.config import BackboneConfig, GeneratorConfig, LoraSettings
from bsharedrag.data import load_dataset
from bsharedrag.model.prompt import build_prompt


def _prompt(backbone: SharedBackbone, target_tokens: int) -> list[int]:
    data = load_dataset(GeneratorConfig().datasets[0].path, "dev")
    query = data.queries[0]
    passages = [data.docs[doc_id] for doc_id in data.qrels[query.id]] + data.corpus[:20]
    settings = GeneratorConfig(max_prompt_len=target_tokens, max_passage_tokens=200)
    return build_prompt(backbone.tokenizer, query.text, passages, settings)


def _time_stream(backbone, prompt_ids, new_tokens, adapter) -> tuple[float, float]:
    """(seconds to the first chunk, decode tokens/s after it) for one `stream_tokens` run."""
    start = time.perf_counter()
    first = None
    for _ in generation.stream_tokens(backbone, prompt_ids, new_tokens, adapter=adapter):
        first = first or time.perf_counter()
    end = time.perf_counter()
    return first - start, (new_tokens - 1) / (end - first)


def _weight_matrices(backbone) -> list[torch.Tensor]:
    return [w for w in backbone.base.parameters() if w.dim() == 2]


def _bound_tokens_per_second(backbone, repeats: int = 9) -> float:
    """Tokens/s if a decode step cost nothing but reading every weight matrix once (median of runs)."""
    weights = _weight_matrices(backbone)
    vectors = {w.shape[1]: torch.randn(w.shape[1]) for w in weights}
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            for w in weights:
                torch.mv(w, vectors[w.shape[1]])
            times.append(time.perf_counter() - start)
    return 1 / statistics.median(times)


def _time_reference(backbone, prompt_ids, new_tokens, adapter, lean: bool, decode_autocast: bool):
    """The same greedy loop, run directly on a lean or transformers decoder, optionally under autocast."""
    with torch.inference_mode(), backbone.adapter(adapter):
        start = time.perf_counter()
        with backbone.autocast_context():
            model = generation._LeanModel(backbone.base, adapter, "cpu") if lean else generation._GenericModel(backbone.base)
            cache = model.new_cache(len(prompt_ids) + new_tokens)
            token = int(model(torch.tensor(prompt_ids), 0, cache).argmax())
        first = time.perf_counter()
        decode_context = backbone.autocast_context() if decode_autocast else contextlib.nullcontext()
        with decode_context:
            for position in range(len(prompt_ids), len(prompt_ids) + new_tokens - 1):
                token = int(model(torch.tensor([token]), position, cache).argmax())
        end = time.perf_counter()
    return first - start, (new_tokens - 1) / (end - first)


def _time_batch(backbone, prompt_ids, new_tokens, adapter, answers: int) -> tuple[float, float]:
    """(seconds until every answer has its first chunk, aggregate decode tokens/s) for `answers`
    streams decoded together (`DecodeBatch`), read round-robin as the server reads them."""
    start = time.perf_counter()
    streams = [generation.stream_tokens(backbone, prompt_ids, new_tokens, adapter=adapter) for _ in range(answers)]
    for stream in streams:  # prefills, one after another
        next(stream)
    first = time.perf_counter()
    live = list(streams)
    while live:
        for stream in list(live):
            if next(stream, None) is None:
                live.remove(stream)
    end = time.perf_counter()
    return first - start, answers * (new_tokens - 1) / (end - first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--batch", nargs="+", type=int, default=[],
                        help="also decode this many answers together (e.g. 1 8 32): aggregate tokens/s")
    args = parser.parse_args()

    backbone = SharedBackbone.load(BackboneConfig(precision="fp32", threads=args.threads))
    backbone.add_adapter("generator", LoraSettings())
    prompt_ids = _prompt(backbone, args.prompt_tokens)
    generation.stop_token_ids = lambda tokenizer, model=None: set()  # benchmark a fixed number of tokens
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"prompt {len(prompt_ids)} tokens, {args.new_tokens} new tokens, median of {args.repeats}")

    bf16 = torch.bfloat16
    stream = functools.partial(_time_stream, prompt_ids=prompt_ids, new_tokens=args.new_tokens)
    reference = functools.partial(_time_reference, prompt_ids=prompt_ids, new_tokens=args.new_tokens)
    cases = [  # (label, autocast, runs, timer); the slow reference loops run once
        ("stream_tokens, fp32", None, args.repeats, stream),
        ("stream_tokens, bf16 prompt", bf16, args.repeats, stream),
        ("lean loop, bf16 autocast decode", bf16, 1, functools.partial(reference, lean=True, decode_autocast=True)),
        ("transformers forward+cache, fp32", None, 1, functools.partial(reference, lean=False, decode_autocast=False)),
    ]
    stream(backbone, adapter=None)  # warm-up
    print(f"load average before: {os.getloadavg()[0]:.2f} (other processes on these cores skew every number)")
    weight_gb = sum(w.numel() * w.element_size() for w in _weight_matrices(backbone)) / 1e9
    print(f"weight matrices: {weight_gb:.3f} GB read per token")
    print(f"{'variant':34} {'adapter':10} {'runs':>4} {'first token s':>14} {'decode tok/s':>13} "
          f"{'bound tok/s':>12} {'% bound':>8}")
    for label, autocast, repeats, timer in cases:
        backbone.autocast = autocast
        for adapter in (None, "generator"):
            bound = _bound_tokens_per_second(backbone)
            runs = [timer(backbone, adapter=adapter) for _ in range(repeats)]
            ttft = statistics.median(r[0] for r in runs)
            rate = statistics.median(r[1] for r in runs)
            print(f"{label:34} {adapter or 'none':10} {repeats:4} {ttft:14.3f} {rate:13.1f} {bound:12.1f} "
                  f"{100 * rate / bound:7.0f}%", flush=True)
    backbone.autocast = bf16
    for answers in args.batch:
        runs = [_time_batch(backbone, prompt_ids, args.new_tokens, "generator", answers) for _ in range(args.repeats)]
        print(f"{answers} answers decoded together (generator, bf16 prompt): all first tokens after "
              f"{statistics.median(r[0] for r in runs):.3f} s, {statistics.median(r[1] for r in runs):.1f} "
              "generated tokens/s in all", flush=True)
    print(f"bandwidth at the end: {weight_gb * _bound_tokens_per_second(backbone):.1f} GB/s")
    print(f"load average after: {os.getloadavg()[0]:.2f}")

if __name__ == "__main__":
    main()
