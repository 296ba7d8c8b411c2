"""Memory and latency of RAG on one shared backbone versus two separately loaded copies.

    python scripts/bench_rag.py --run runs/quick

Each configuration runs in a fresh subprocess so that its peak resident memory (VmHWM, see
`bsharedrag.efficiency.peak_rss_mib`) is its own. Reports peak RSS of: the backbone alone answering
over given passages (no index); `bare`, the same `ask` as below (same index, question, retrieval
and answer length) on the backbone with no adapter at all; `ask` with both adapters on one
backbone; and `ask` with each adapter on its own copy. `shared_over_bare` is what the two adapters
cost on top of the backbone doing the same work. Also: the cost of one adapter switch (ours and
peft's `set_adapter`); time to first token and tokens per second of generation.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

QUESTION = "Frigidaire 240337103 Crisper Pan for Refrigerator: will this fit a kenmore refrigerator?"


def child(mode: str, run: str) -> dict:
    from bsharedrag.efficiency import peak_rss_mib, time_answer
    from bsharedrag.model.backbone import SharedBackbone
    from bsharedrag.model.encoder import DenseRetriever, Encoder
    from bsharedrag.rag import RAG, load_rag
    from bsharedrag.run import Run

    run_folder = Run.open(run)
    config = run_folder.config
    if mode == "backbone":  # the bare backbone answering over given passages: every weight is touched
        rag = RAG(run_folder.backbone(), None, config.generator, adapter=None)
        rag.ask(QUESTION, passages=[], max_new_tokens=8)
        return {"peak_rss_mib": round(peak_rss_mib(), 1)}
    if mode == "shared":
        rag = load_rag(run_folder)
    elif mode == "bare":  # the same work with no adapter: what the adapters add is all that differs
        backbone = run_folder.backbone()
        index = run_folder.index()
        rag = RAG(backbone, DenseRetriever(Encoder(backbone, config.retriever, adapter=None), index),
                  config.generator, adapter=None)
    else:  # two copies: the retriever's backbone and the generator's backbone share nothing
        retriever_backbone = SharedBackbone.load(config.backbone, run_folder.backbone_path())
        retriever_backbone.load_adapter("retriever", run_folder.stage_folder("retriever"))
        generator_backbone = SharedBackbone.load(config.backbone, run_folder.backbone_path())
        generator_backbone.load_adapter("generator", run_folder.stage_folder("generator"))
        index = run_folder.index()
        encoder = Encoder(retriever_backbone, config.retriever)
        rag = RAG(generator_backbone, DenseRetriever(encoder, index), config.generator)
    rag.ask(QUESTION, max_new_tokens=8)  # warm-up
    timed = time_answer(rag, QUESTION, max_new_tokens=64)
    result = {"peak_rss_mib": round(peak_rss_mib(), 1), "ask_seconds": round(timed["seconds"], 3),
              "time_to_first_text_s": round(timed["time_to_first_text_s"], 3),
              "answer_tokens": timed["answer_tokens"], "decode_tokens_per_s": round(timed["tokens_per_second"] or 0, 1)}
    if mode == "shared":
        result.update(_switch_costs(rag.backbone))
    return result


def _switch_costs(backbone) -> dict:
    n = 2000
    started = time.perf_counter()
    for i in range(n):
        backbone.use("retriever" if i % 2 else "generator")
    ours = (time.perf_counter() - started) / n
    peft_model = backbone.model
    started = time.perf_counter()
    for i in range(50):
        peft_model.set_adapter("retriever" if i % 2 else "generator")
    theirs = (time.perf_counter() - started) / 50
    backbone.use(None)
    return {"switch_ms": round(ours * 1e3, 4), "peft_set_adapter_ms": round(theirs * 1e3, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/quick")
    parser.add_argument("--child", choices=["backbone", "bare", "shared", "separate"])
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.run)))
        return
    results = {}
    for mode in ("backbone", "bare", "shared", "separate"):
        out = subprocess.run([sys.executable, __file__, "--run", args.run, "--child", mode],
                             capture_output=True, text=True, check=True)
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    alone = results["backbone"]["peak_rss_mib"]
    results["shared_over_backbone"] = round(results["shared"]["peak_rss_mib"] / alone, 3)
    results["shared_over_bare"] = round(results["shared"]["peak_rss_mib"] / results["bare"]["peak_rss_mib"], 3)
    results["separate_over_backbone"] = round(results["separate"]["peak_rss_mib"] / alone, 3)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
