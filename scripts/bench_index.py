"""The FAISS index kinds at catalogue scale: build time, memory, query latency and recall@10 against flat.

    python scripts/bench_index.py --count 1000000 --dim 576 [--kinds flat ivf hnsw]

Synthetic, L2-normalised vectors of the backbone's width (576 for SmolLM2-135M), drawn around
`--clusters` random centres so that, like passage embeddings, they have neighbourhoods (uniform
random vectors are the worst case of every approximate index and resemble no real corpus). Queries
are drawn the same way and are not in the index. Each kind is built with `model.index.faiss_index`,
the function the served index uses, with the defaults of `IndexConfig` (ivf: 4 * sqrt(n) lists, 16
probed; hnsw: M 32, efSearch 128). Latency is of one question at a time, as a search request is.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from bsharedrag.config import IndexConfig
from bsharedrag.model.index import FAISS_KINDS, faiss_index


def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def _vectors(count: int, dim: int, centres: np.ndarray, rng: np.random.Generator, spread: float) -> np.ndarray:
    out = np.empty((count, dim), dtype=np.float32)
    for start in range(0, count, 100_000):  # in chunks: the float64 noise of 1M rows would take 4.6 GB
        n = min(100_000, count - start)
        rows = centres[rng.integers(0, len(centres), n)] + spread * rng.standard_normal((n, dim), dtype=np.float32)
        out[start:start + n] = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=576)
    parser.add_argument("--clusters", type=int, default=5000)
    parser.add_argument("--spread", type=float, default=0.02,
                        help="Noise per dimension around a centre (0.02 at 576 dims: neighbours at cosine ~0.8).")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--kinds", nargs="+", default=list(FAISS_KINDS), choices=FAISS_KINDS)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((args.clusters, args.dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    vectors = _vectors(args.count, args.dim, centres, rng, args.spread)
    queries = _vectors(args.queries, args.dim, centres, rng, args.spread)
    ids = np.arange(args.count, dtype=np.int64)
    print(f"{os.cpu_count()} CPUs; {args.count:,} vectors of {args.dim} dims ({vectors.nbytes / 2**30:.2f} GiB), "
          f"{args.clusters:,} clusters, {args.queries} queries one at a time, top 10")

    truth = None
    print(f"{'kind':6} {'build s':>9} {'memory MiB':>11} {'p50 ms':>8} {'p95 ms':>8} {'recall@10':>10}")
    for kind in ["flat", *[k for k in args.kinds if k != "flat"]]:  # flat first: it is the ground truth
        spec = IndexConfig(kind=kind).faiss_spec()
        before = _rss_mib()
        started = time.perf_counter()
        index = faiss_index(spec, vectors, ids)
        build = time.perf_counter() - started
        memory = _rss_mib() - before
        params = None
        if kind == "ivf":
            import faiss

            params = faiss.SearchParametersIVF()
            params.nprobe = spec["ivf_probe"]
        elif kind == "hnsw":
            import faiss

            params = faiss.SearchParametersHNSW()
            params.efSearch = spec["hnsw_ef_search"]
        latencies, found = [], []
        for query in queries:
            started = time.perf_counter()
            _, labels = index.search(query[None], 10, params=params)
            latencies.append(time.perf_counter() - started)
            found.append(labels[0])
        found = np.array(found)
        if kind == "flat":
            truth = found
        recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=True)])
        if kind in args.kinds:
            p50, p95 = np.percentile(latencies, [50, 95]) * 1000
            print(f"{kind:6} {build:9.1f} {memory:11.0f} {p50:8.2f} {p95:8.2f} {recall:10.3f}", flush=True)
        del index


if __name__ == "__main__":
    main()
