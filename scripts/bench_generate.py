"""Decoding speed of `stream_tokens` on the real backbone: time to first token and tokens/s.

    python scripts/bench_generate.py [--new-tokens 64] [--prompt-tokens 300] [--repeats 3]

Runs a ~300-token RAG prompt built from ePQA passages, with no adapter and with an untrained LoRA
`generator`, under fp32 and under the backbone's bf16 autocast for the prompt. Two reference
loops show what the choices in `bsharedrag.generate` buy: transformers' own cached forward, and
decoding every token under bf16 autocast. EOS is ignored so every run makes the same number of tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

import torch

from bsharedrag import generate as generation
from bsharedrag.backbone import SharedBackbone
from bsharedrag.config import BackboneConfig, GeneratorConfig, LoraSettings
from bsharedrag.data import load_dataset
from bsharedrag.prompt import build_prompt


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


def _time_reference(backbone, prompt_ids, new_tokens, adapter, lean: bool, decode_autocast: bool):
    """The same greedy loop, run directly on a lean or transformers decoder, optionally under autocast."""
    with torch.inference_mode(), backbone.adapter(adapter):
        start = time.perf_counter()
        with backbone.autocast_context():
            if lean:
                decoder = generation._LeanDecoder(backbone.base, adapter, len(prompt_ids) + new_tokens, "cpu")
            else:
                decoder = generation._CachedDecoder(backbone.base)
            token = int(decoder(torch.tensor(prompt_ids), 0).argmax())
        first = time.perf_counter()
        decode_context = backbone.autocast_context() if decode_autocast else contextlib.nullcontext()
        with decode_context:
            for position in range(len(prompt_ids), len(prompt_ids) + new_tokens - 1):
                token = int(decoder(torch.tensor([token]), position).argmax())
        end = time.perf_counter()
    return first - start, (new_tokens - 1) / (end - first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    backbone = SharedBackbone.load(BackboneConfig(precision="fp32"))
    backbone.add_adapter("generator", LoraSettings())
    prompt_ids = _prompt(backbone, args.prompt_tokens)
    generation.stop_token_ids = lambda tokenizer, model=None: set()  # benchmark a fixed number of tokens
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"prompt {len(prompt_ids)} tokens, {args.new_tokens} new tokens, median of {args.repeats}")

    bf16 = torch.bfloat16
    cases = [
        ("stream_tokens, fp32", None, lambda b, a: _time_stream(b, prompt_ids, args.new_tokens, a)),
        ("stream_tokens, bf16 prompt", bf16, lambda b, a: _time_stream(b, prompt_ids, args.new_tokens, a)),
        ("lean loop, bf16 autocast decode", bf16,
         lambda b, a: _time_reference(b, prompt_ids, args.new_tokens, a, lean=True, decode_autocast=True)),
        ("transformers forward + cache, fp32", None,
         lambda b, a: _time_reference(b, prompt_ids, args.new_tokens, a, lean=False, decode_autocast=False)),
    ]
    _time_stream(backbone, prompt_ids, 8, None)  # warm-up
    print(f"{'variant':38} {'adapter':10} {'first token s':>14} {'decode tok/s':>13}")
    for label, autocast, run in cases:
        backbone.autocast = autocast
        for adapter in (None, "generator"):
            runs = [run(backbone, adapter) for _ in range(args.repeats)]
            ttft = statistics.median(r[0] for r in runs)
            rate = statistics.median(r[1] for r in runs)
            print(f"{label:38} {adapter or 'none':10} {ttft:14.3f} {rate:13.1f}", flush=True)


if __name__ == "__main__":
    main()
