"""Retrieval baselines (BM25, MiniLM) on one dataset split: metrics and build/search times.

    python scripts/baseline_check.py --data src/bsharedrag/datasets/epqa --split dev
"""

from __future__ import annotations

import argparse
import time

from bsharedrag.model.baselines import BM25Retriever, EncoderRetriever, build_run
from bsharedrag.data import load_dataset
from bsharedrag.metrics import RETRIEVAL_METRICS, markdown_table, retrieval_metrics

SYSTEMS = {"bm25": BM25Retriever, "minilm": EncoderRetriever}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="src/bsharedrag/datasets/epqa", help="BEIR-style dataset folder")
    parser.add_argument("--split", default="dev", help="qrels split to evaluate")
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS))
    parser.add_argument("--autocast", default="auto", choices=["auto", "bf16", "off"], help="bf16 matmuls for MiniLM")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 can win on a busy machine)")
    parser.add_argument("--max-queries", type=int, default=None, help="evaluate a seeded sample of queries")
    args = parser.parse_args()

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    dataset = load_dataset(args.data, args.split).sample(args.max_queries)
    print(f"{args.data} [{args.split}]: {len(dataset.corpus)} passages, {len(dataset.queries)} queries")
    results = {}
    for name in args.systems:
        start = time.perf_counter()
        options = {"autocast": args.autocast} if name == "minilm" else {}
        retriever = SYSTEMS[name](dataset.corpus, **options)
        built = time.perf_counter()
        run = build_run(retriever, dataset.queries, top_k=10)
        searched = time.perf_counter()
        results[name] = retrieval_metrics(dataset.qrels, run)
        print(f"{name}: index {built - start:.1f} s, search {searched - built:.2f} s")
    print(markdown_table(results, list(RETRIEVAL_METRICS)))


if __name__ == "__main__":
    main()
