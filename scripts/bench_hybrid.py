"""What hybrid retrieval costs when serving: the BM25 side's build and rebuild, and search latency.

    python scripts/bench_hybrid.py --run runs/quick [--questions 50]

Works on a copy of the run's index (the run folder is left as it is). Times the BM25 side built
from the index's document store (cold: every passage tokenised), its rebuild after one upserted
document (warm: token lists cached), and the mean latency of one-question searches, dense alone
hybrid at the weight the index records (0.5 for an index built before hybrid retrieval) and hybrid
at 0.5 (a weight of 1 searches the dense side alone), over ePQA dev questions.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bsharedrag.data import Document, load_dataset
from bsharedrag.model.encoder import DenseRetriever
from bsharedrag.model.hybrid import HybridRetriever, LexicalIndex
from bsharedrag.model.index import VectorIndex
from bsharedrag.run import Run


def _timed(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--questions", type=int, default=50)
    args = parser.parse_args()

    run = Run.open(args.run)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(shutil.copytree(run.index_folder, Path(scratch) / "index"))
        index = VectorIndex.open(folder)
        lexical = LexicalIndex(index)
        cold = _timed(lambda: lexical.search(["warm-up"], 1))
        encoder = run.encoder()
        added = Document("bench-new", "Bench", "a freshly upserted passage about solar lanterns")
        index.upsert([added], encoder.embed_passages([added]))
        warm = _timed(lambda: lexical.search(["solar lanterns"], 1))
        assert lexical.search(["solar lanterns"], 1)[0][0].doc.id == "bench-new"

        dense = DenseRetriever(encoder, index)
        weight = index.manifest.get("fusion", {}).get("weight", 0.5)
        hybrid = HybridRetriever(dense, lexical, weight)
        questions = [q.text for q in load_dataset(run.config.eval.data, "dev").queries][: args.questions]
        dense.search(questions[:1], 5)
        latency = {}
        fused = HybridRetriever(dense, lexical, 0.5)  # both sides scored, whatever the recorded weight
        for name, retriever in (("dense", dense), (f"hybrid at the recorded weight {weight}", hybrid),
                                ("hybrid at weight 0.5", fused)):
            latency[name] = statistics.mean(_timed(lambda q=q: retriever.search([q], 5)) for q in questions)
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; {len(index):,} passages")
    print(f"BM25 side built from the store: {cold:.2f} s; rebuilt after one upsert: {warm:.2f} s")
    print(f"fusion weight {weight} ({'recorded in the index' if 'fusion' in index.manifest else 'assumed'})")
    for name, seconds in latency.items():
        print(f"{name:36} search, one question, top 5: {1000 * seconds:.1f} ms mean over {len(questions)} questions")


if __name__ == "__main__":
    main()
