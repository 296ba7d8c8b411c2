"""What the reranker costs when serving: search latency with top-N reranking, and memory with three adapters.

    python scripts/bench_rerank.py --run runs/rerank [--questions 40] [--depth 20]

The run folder must have a trained reranker (`bsharedrag train-reranker --run RUN --set reranker.enabled=true`).
Latency: one-question searches (top 3) over ePQA dev questions, the run's first stage alone and
reranked from its top `--depth`, p50 and p95. Memory: the peak resident memory of a fresh process
that loads (a) the backbone alone, (b) what `bsharedrag serve` holds without the reranker (backbone,
retriever and generator adapters, index, BM25 side) and (c) the same with the reranker adapter,
each after one search so that the lazily built parts are counted; (c)/(a) and (c)/(b) are reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

_MEMORY = """
import json, sys
from bsharedrag.memory import peak_rss_mib
from bsharedrag.rag import load_rag
from bsharedrag.run import Run
folder, part = sys.argv[1], sys.argv[2]
run = Run.open(folder, [] if part == "three adapters" else ["reranker.enabled=false"])
if part == "backbone alone":
    run.backbone()
else:
    rag = load_rag(run)
    rag.search("Is it waterproof?", top_k=3)
print(json.dumps({"peak_rss_mib": round(peak_rss_mib())}))
"""


def _memory(folder: Path, part: str) -> float:
    done = subprocess.run([sys.executable, "-c", _MEMORY, str(folder), part], capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_mib"]


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--questions", type=int, default=40)
    parser.add_argument("--depth", type=int, default=20)
    args = parser.parse_args()

    from bsharedrag.data import load_dataset
    from bsharedrag.model.reranker import RerankedRetriever
    from bsharedrag.run import Run

    run = Run.open(args.run)
    if not run.reranks:
        sys.exit(f"{args.run} has no trained reranker: run `bsharedrag train-reranker --run {args.run} "
                 "--set reranker.enabled=true` first")
    served = run.first_stage()
    first, reranked = served.first_stage, RerankedRetriever(served.first_stage, served.reranker, args.depth)
    questions = [q.text for q in load_dataset(run.config.eval.data, "dev").queries][: args.questions]
    reranked.search(questions[:1], 3)  # warm-up: adapters switched in, BM25 side built
    rows = {}
    for name, retriever in ((f"{first.name} (first stage)", first), (f"{first.name} + rerank top {args.depth}", reranked)):
        times = []
        for question in questions:
            started = time.perf_counter()
            retriever.search([question], 3)
            times.append(1000 * (time.perf_counter() - started))
        rows[name] = {"mean_ms": round(statistics.mean(times), 1), "p50_ms": round(_percentile(times, 0.5), 1),
                      "p95_ms": round(_percentile(times, 0.95), 1)}
    memory = {part: _memory(args.run, part) for part in ("backbone alone", "two adapters", "three adapters")}
    print(json.dumps({"questions": len(questions), "latency": rows, "peak_rss_mib": memory,
                      "three_over_backbone": round(memory["three adapters"] / memory["backbone alone"], 3),
                      "three_over_two": round(memory["three adapters"] / memory["two adapters"], 3)}, indent=2))


if __name__ == "__main__":
    main()
