"""Evaluation of a run against baselines on any BEIR-style dataset split.

Writes `{"retrieval": {system: metrics}, "generation": {system: metrics}, ...}` to a JSON file.
Retrieval systems: `bsharedrag` (the retriever adapter over an index of the dataset's corpus),
`bm25` and `encoder` (all-MiniLM-L6-v2). Generation systems, on the queries that have reference
answers: `bsharedrag` (generator adapter) and `zero_shot` (the same backbone with no adapter),
both given the same retrieved passages and the same prompt.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .data import Dataset, load_dataset
from .files import write_text_atomic
from .memory import free_memory, trim_heap
from .metrics import RETRIEVAL_METRICS, generation_metrics, retrieval_metrics
from .progress import progress

if TYPE_CHECKING:
    from .run import Run

__all__ = ["evaluate", "retrieval_runs"]

log = logging.getLogger(__name__)
_DEPTH = 10  # the deepest cut-off among the retrieval metrics
_SEARCH_CHUNK = 128  # questions per search call: enough to fill the encoder's batches


def _retriever(run: Run, dataset: Dataset, system: str):
    from .model.baselines import BM25Retriever, EncoderRetriever

    if system == "bsharedrag":
        return run.retriever(dataset.path)
    if system == "bm25":
        return BM25Retriever(dataset.corpus)
    if system == "encoder":
        return EncoderRetriever(dataset.corpus, run.config.eval.encoder_model, show_progress=True)
    raise ValueError(f"unknown retrieval system {system!r}; known: bsharedrag, bm25, encoder")


def retrieval_runs(run: Run, dataset: Dataset, systems: list[str]) -> tuple[dict, dict, dict]:
    """system -> {query id -> ranked doc ids}; also the BSharedRAG hits (for generation) and timings."""
    runs, timings, dense_hits = {}, {}, {}
    questions = [q.text for q in dataset.queries]
    for system in systems:
        started = time.time()
        retriever, rows = _retriever(run, dataset, system), []
        bar = progress(total=len(questions), desc=f"retrieve ({system})")
        for start in range(0, len(questions), _SEARCH_CHUNK):  # in chunks, for the progress bar
            rows += retriever.search(questions[start: start + _SEARCH_CHUNK], _DEPTH)
            bar.update(len(questions[start: start + _SEARCH_CHUNK]))
        bar.close()
        hits = dict(zip([q.id for q in dataset.queries], rows, strict=True))
        runs[system] = {qid: [hit.doc.id for hit in row] for qid, row in hits.items()}
        if system == "bsharedrag":
            dense_hits = hits
        timings[system] = round(time.time() - started, 1)
        del retriever
        free_memory()  # a baseline's model and index go before the next system's
    return runs, dense_hits, timings


def _generation(run: Run, dataset: Dataset, dense_hits: dict, top_k: int) -> tuple[dict, dict]:
    from .rag import RAG

    settings = run.config.eval
    queries = [q for q in dataset.queries if q.answers]
    if settings.max_generation_queries is not None:
        queries = queries[: settings.max_generation_queries]
    generator = run.adapter(run.generator_adapter)
    results, outputs = {}, {}
    for system in settings.generation_systems:
        adapter = {"bsharedrag": generator, "zero_shot": None}.get(system, "unknown")
        if adapter == "unknown":
            raise ValueError(f"unknown generation system {system!r}; known: bsharedrag, zero_shot")
        rag = RAG(run.backbone(), None, run.config.generator, adapter=adapter)
        predictions, citations = {}, {}
        for query in progress(queries, desc=f"generate ({system})"):
            passages = dense_hits[query.id][:top_k] if run.config.generator.with_passages else []
            answer = rag.ask(query.text, passages=passages,
                             max_new_tokens=settings.max_new_tokens)
            predictions[query.id] = answer.text
            citations[query.id] = [c.doc_id for c in answer.citations]
            trim_heap()  # every answer's cache has another length
        references = {q.id: list(q.answers) for q in queries}
        results[system] = generation_metrics(
            predictions, references, citations, dataset.qrels,
            with_bertscore=True, model_path=settings.bertscore_model,
        )
        outputs[system] = {qid: {"answer": predictions[qid], "citations": citations[qid]} for qid in predictions}
        free_memory()  # the BERTScore model
    return results, outputs


def evaluate(run: Run, data: Path, split: str, output: Path, top_k: int | None = None,
             max_queries: int | None = None) -> dict:
    """Evaluate `run` on `data`/`split` and write the results to `output`.

    `top_k` passages go into each generation prompt (default: the generator's `top_k`);
    `max_queries` evaluates a seeded sample of the split's queries.
    """
    settings = run.config.eval
    dataset = load_dataset(data, split, strict=run.config.strict_data).sample(max_queries, run.config.seed)
    if not dataset.queries:
        raise ValueError(f"{data} split {split!r} has no judged query to evaluate")
    systems = list(settings.systems)
    if settings.generation and "bsharedrag" not in systems:
        systems.append("bsharedrag")  # generation reads the passages the BSharedRAG retriever found
    runs, dense_hits, timings = retrieval_runs(run, dataset, systems)
    results = {
        "data": str(data),
        "split": split,
        "queries": len(dataset.queries),
        "data_losses": dataset.losses,
        "retrieval": {s: retrieval_metrics(dataset.qrels, runs[s], RETRIEVAL_METRICS) for s in settings.systems},
        "timings_seconds": timings,
        "runs": runs,
    }
    has_answers = any(q.answers for q in dataset.queries)
    generator_ready = run.is_built("generator")
    if settings.generation and has_answers and generator_ready:
        top_k = top_k or run.config.generator.top_k
        results["generation"], results["answers"] = _generation(run, dataset, dense_hits, top_k)
        results["generation_top_k"] = top_k
        results["generation_queries"] = len(next(iter(results["answers"].values()), {}))
    elif settings.generation:
        log.warning("generation not evaluated: %s", "no reference answers" if not has_answers else "no generator")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(output, json.dumps(results, indent=2, ensure_ascii=False))
    return results
