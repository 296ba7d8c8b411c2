"""Serving efficiency of a finished run: peak memory, query latency and generation speed.

    python -m bsharedrag.efficiency RUN_DIR [--queries 20] [--answers 3]

prints one JSON object. Run it in its own process (as `compare` does) so that the peak resident
memory (`ru_maxrss`) is the run's own: the RAG is loaded as `bsharedrag serve` loads it, searches
are timed one question at a time, answers are streamed greedily.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .memory import peak_rss_mib

__all__ = ["measure", "measure_in_subprocess", "peak_rss_mib", "time_answer"]


def time_answer(rag, question: str, max_new_tokens: int = 64, **ask) -> dict:
    """Seconds to the first text and decode tokens per second of one streamed answer."""
    from .rag import Answer

    started = time.perf_counter()
    first, answer = None, None
    for part in rag.stream(question, max_new_tokens=max_new_tokens, **ask):
        if isinstance(part, Answer):
            answer = part
        elif isinstance(part, str) and first is None:
            first = time.perf_counter()
    total = time.perf_counter() - started
    first = first or time.perf_counter()
    tokens = len(rag.backbone.tokenizer(answer.text, add_special_tokens=False)["input_ids"])
    decode_seconds = max(total - (first - started), 1e-9)
    return {"seconds": total, "time_to_first_text_s": first - started, "answer_tokens": tokens,
            "tokens_per_second": (tokens - 1) / decode_seconds if tokens > 1 else None}


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure(run_dir: Path, queries: int = 20, answers: int = 3, max_new_tokens: int = 64) -> dict:
    """Load the run's RAG and time it on the first questions of its evaluation split."""
    from .data import load_dataset
    from .rag import load_rag
    from .run import Run

    run = Run.open(run_dir)
    config = run.config
    questions = [q.text for q in load_dataset(config.eval.data, config.eval.split).queries]
    if not questions:
        raise ValueError(f"{config.eval.data} split {config.eval.split!r} has no question to time")
    questions = (questions * (1 + queries // len(questions)))[:queries]
    rag = load_rag(run)
    rag.search(questions[0])  # warm-up: first-call allocations are not query latency
    latencies = []
    for question in questions:
        started = time.perf_counter()
        rag.search(question)
        latencies.append((time.perf_counter() - started) * 1e3)
    timed = [time_answer(rag, q, max_new_tokens) for q in questions[:answers]]
    speeds = [t["tokens_per_second"] for t in timed if t["tokens_per_second"]]
    index_stats = run.manifest("index")["stats"]
    return {
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "index_seconds": index_stats.get("embed_seconds"),
        "query_ms_p50": round(_percentile(latencies, 0.5), 1),
        "query_ms_p95": round(_percentile(latencies, 0.95), 1),
        "tokens_per_second": round(statistics.median(speeds), 1) if speeds else None,
        "time_to_first_text_s": round(statistics.median(t["time_to_first_text_s"] for t in timed), 3),
        "queries": len(latencies),
        "answers": len(timed),
    }


def measure_in_subprocess(run_dir: Path, queries: int = 20, answers: int = 3) -> dict:
    command = [sys.executable, "-m", "bsharedrag.efficiency", str(run_dir), "--queries", str(queries),
               "--answers", str(answers)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"efficiency measurement of {run_dir} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--answers", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    print(json.dumps(measure(args.run_dir, args.queries, args.answers, args.max_new_tokens)))


if __name__ == "__main__":
    main()
