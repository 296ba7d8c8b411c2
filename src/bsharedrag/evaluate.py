"""Evaluation of a run against baselines on any BEIR-style dataset split.

Writes `{"retrieval": {system: metrics}, "generation": {system: metrics}, ...}` to a JSON file.
Retrieval systems: `bsharedrag` (the retriever adapter over an index of the dataset's corpus),
`bm25`, `encoder` (all-MiniLM-L6-v2), `hybrid` (BM25 fused with `bsharedrag`) and, when the run
reranks, `bsharedrag+rerank` and `hybrid+rerank` (their top `reranker.depth` reordered by the
reranker adapter); each with its mean search time per query. Generation systems, on the queries that have reference
answers: `bsharedrag` (generator adapter) and `zero_shot` (the same backbone with no adapter),
both given the same passages, those of the served first stage (`served_system`: what `ask` and the
server retrieve with), and the same prompt.

With `eval.faithfulness`, two probes of whether the generator follows its passages (`faithfulness`):
* withheld: the retrieved passages known not to answer (`Dataset.answers_nothing`: not judged relevant
  and, unless the data is `judged_per_product`, of another product), so the passages do not answer; the
  answer should abstain (`model.prompt.is_abstention`). `answered_without_support` is the share
  that did not: answers that go beyond their passages.
* polar: queries whose reference answers mostly start with "yes" or mostly with "no" (the crowd's
  answers are the labels), asked with the gold passage in the prompt (it replaces the last retrieved
  one when retrieval missed it); `contradicted` is the share of answers that start with the
  opposite word, `agreed` with the same one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .data import Dataset, load_dataset
from .files import write_text_atomic
from .memory import free_memory, trim_heap
from .metrics import RETRIEVAL_METRICS, bootstrap_intervals, generation_scores, mean_scores, per_query_metrics
from .model.prompt import is_abstention
from .progress import progress

if TYPE_CHECKING:
    from .run import Run

__all__ = ["evaluate", "retrieval_runs", "retrieval_systems"]

log = logging.getLogger(__name__)
_DEPTH = 10  # the deepest cut-off among the retrieval metrics
_SEARCH_CHUNK = 128  # questions per search call: enough to fill the encoder's batches


_RERANKED = "+rerank"


def _retriever(run: Run, dataset: Dataset, system: str, reranker=None):
    from .model.baselines import BM25Retriever, EncoderRetriever
    from .model.reranker import RerankedRetriever

    if system.endswith(_RERANKED) and system[: -len(_RERANKED)] in ("bsharedrag", "hybrid"):
        return RerankedRetriever(_retriever(run, dataset, system[: -len(_RERANKED)]), reranker)
    if system == "bsharedrag":
        return run.retriever(dataset.path)
    if system == "bm25":
        return BM25Retriever(dataset.corpus)
    if system == "encoder":
        return EncoderRetriever(dataset.corpus, run.config.eval.encoder_model, show_progress=True)
    if system == "hybrid":
        return _hybrid(run, dataset)
    raise ValueError(f"unknown retrieval system {system!r}; known: bsharedrag, bm25, encoder, hybrid, "
                     "bsharedrag+rerank, hybrid+rerank")


def retrieval_systems(run: Run) -> list[str]:
    """`eval.systems`, with `bsharedrag+rerank` and `hybrid+rerank` after their first stages when the run reranks."""
    systems = []
    for system in run.config.eval.systems:
        systems.append(system)
        if system in ("bsharedrag", "hybrid") and run.reranks and system + _RERANKED not in run.config.eval.systems:
            systems.append(system + _RERANKED)
    return systems


def _hybrid(run: Run, dataset: Dataset):
    """BM25 fused with the run's dense retriever, the weight chosen on the dataset's training questions
    (a sample, never the evaluated split), or on pseudo-queries from its corpus when it has none."""
    from .model.baselines import BM25Retriever
    from .model.hybrid import fit_hybrid, validation_pairs

    settings = run.config.index
    pairs, source = validation_pairs(dataset.path, dataset.corpus, settings.fusion_validation_queries,
                                     run.config.seed, evaluated_split=dataset.split)
    return fit_hybrid(run.retriever(dataset.path), BM25Retriever(dataset.corpus), pairs, source, settings.fusion,
                      run.config.seed)


def served_system(run: Run) -> str:
    """The retrieval system that `search`, `ask` and the server use for this run: answers are evaluated
    on its passages, as users get them."""
    first = "hybrid" if run.config.index.first_stage == "hybrid" else "bsharedrag"
    return first + _RERANKED if run.reranks else first


def retrieval_runs(run: Run, dataset: Dataset, systems: list[str]) -> tuple[dict, dict, dict]:
    """system -> {query id -> ranked doc ids}; system -> {query id -> its hits}; and facts for the results:
    each system's seconds (building it included), its search time per query, fusion weights."""
    runs, found = {}, {}
    facts: dict = {"timings_seconds": {}, "search_ms_per_query": {}}
    reranker = run.reranker(memo={}) if any(s.endswith(_RERANKED) for s in systems) else None
    questions = [q.text for q in dataset.queries]
    for system in systems:
        started = time.time()
        retriever, rows, searching = _retriever(run, dataset, system, reranker), [], 0.0
        bar = progress(total=len(questions), desc=f"retrieve ({system})")
        for start in range(0, len(questions), _SEARCH_CHUNK):  # in chunks, for the progress bar
            chunk = questions[start: start + _SEARCH_CHUNK]
            began = time.perf_counter()
            rows += retriever.search(chunk, _DEPTH)
            searching += time.perf_counter() - began
            bar.update(len(chunk))
        bar.close()
        hits = dict(zip([q.id for q in dataset.queries], rows, strict=True))
        runs[system] = {qid: [hit.doc.id for hit in row] for qid, row in hits.items()}
        found[system] = hits
        facts["timings_seconds"][system] = round(time.time() - started, 1)
        facts["search_ms_per_query"][system] = round(1000 * searching / len(questions), 1)
        if system == "hybrid":
            facts.setdefault("fusion", {})[system] = retriever.chosen
        del retriever
        free_memory()  # a baseline's model and index go before the next system's
    if reranker is not None and len(reranker.memo):  # a pair scored for one system is not scored again for another
        facts["reranked_pairs"] = len(reranker.memo)
    return runs, found, facts


def _answered_queries(run: Run, dataset: Dataset) -> list:
    """The queries with reference answers, at most `eval.max_generation_queries` of them."""
    queries = [q for q in dataset.queries if q.answers]
    return queries[: run.config.eval.max_generation_queries]  # a None bound keeps them all


def _answer_all(rag, requests: list[tuple[str, list]], settings, desc: str) -> list:
    """Every (question, passages) request answered, `eval.decode_together` at a time, with a progress bar."""
    bar = progress(total=len(requests), desc=desc)

    def answered() -> None:
        bar.update(1)
        trim_heap()  # every answer's cache has another length

    answers = rag.ask_many(requests, settings.max_new_tokens, settings.decode_together, on_answer=answered)
    bar.close()
    return answers


def _rag(run: Run, adapter: str | None, remote):
    """A RAG over given passages with `adapter` (None: the bare backbone), written by `remote` or the backbone."""
    from .rag import RAG

    if adapter is not None and remote is None:
        run.adapter(adapter)
    return RAG(run.backbone(), None, run.config.generator, adapter=adapter, remote=remote)


def _generation(run: Run, dataset: Dataset, served_hits: dict, top_k: int, remote=None) -> tuple[dict, dict]:
    """system -> per-query scores of its answers, and system -> the answers with their citations."""
    settings = run.config.eval
    queries = _answered_queries(run, dataset)
    requests = [(query.text, served_hits[query.id][:top_k] if run.config.generator.with_passages else [])
                for query in queries]
    results, outputs = {}, {}
    for system in settings.generation_systems:
        adapter = {"bsharedrag": run.generator_adapter, "zero_shot": None}.get(system, "unknown")
        if adapter == "unknown":
            raise ValueError(f"unknown generation system {system!r}; known: bsharedrag, zero_shot")
        answers = _answer_all(_rag(run, adapter, remote), requests, settings, f"generate ({system})")
        answered = dict(zip([query.id for query in queries], answers, strict=True))
        predictions = {query_id: answer.text for query_id, answer in answered.items()}
        citations = {query_id: [c.doc_id for c in answer.citations] for query_id, answer in answered.items()}
        references = {q.id: list(q.answers) for q in queries}
        results[system] = generation_scores(
            predictions, references, citations, dataset.qrels,
            with_bertscore=True, model_path=settings.bertscore_model,
        )
        outputs[system] = {qid: {"answer": predictions[qid], "citations": citations[qid]} for qid in predictions}
        free_memory()  # the BERTScore model
    return results, outputs


_YES = re.compile(r"^\W*(yes|yeah|yep|yup)\b", re.IGNORECASE)
_NO = re.compile(r"^\W*(no|nope|not)\b", re.IGNORECASE)


def polarity(answer: str) -> str | None:
    """'yes' or 'no' when the answer starts with one (or a synonym), else None."""
    return "yes" if _YES.match(answer) else "no" if _NO.match(answer) else None


def _reference_polarity(answers: tuple[str, ...]) -> str | None:
    votes = [polarity(answer) for answer in answers]
    return next((side for side in ("yes", "no") if votes.count(side) > len(votes) / 2), None)


def faithfulness(run: Run, dataset: Dataset, served_hits: dict, top_k: int, remote=None) -> tuple[dict, dict]:
    """The two probes of the module docstring for the run's generator: (rates, the answers they read)."""
    from .model.index import Hit

    settings = run.config.eval
    queries = _answered_queries(run, dataset)
    withheld_requests, polar_requests = {}, {}
    for query in queries:
        relevant = dataset.qrels.get(query.id, {})
        unsupported = [hit for hit in served_hits[query.id]
                       if dataset.answers_nothing(query, hit.doc, settings.judged_per_product)][:top_k]
        if unsupported:
            withheld_requests[query.id] = (query.text, unsupported)
        if _reference_polarity(query.answers) is not None:
            passages = list(served_hits[query.id][:top_k])
            if relevant and not any(hit.doc.id in relevant for hit in passages):
                passages[-1:] = [Hit(dataset.best_judged(query.id), 0.0)]
            polar_requests[query.id] = (query.text, passages)
    rag = _rag(run, run.generator_adapter, remote)
    answers = iter(_answer_all(rag, [*withheld_requests.values(), *polar_requests.values()], settings,
                               "faithfulness probes"))
    withheld = {query_id: next(answers).text for query_id in withheld_requests}
    polar = {query.id: {"expected": _reference_polarity(query.answers), "answer": next(answers).text}
             for query in queries if query.id in polar_requests}
    given = [polarity(item["answer"]) for item in polar.values()]
    expected = [item["expected"] for item in polar.values()]

    def share(count: int, total: int) -> float | None:
        return round(count / total, 4) if total else None

    abstained = sum(map(is_abstention, withheld.values()))
    rates = {
        "withheld_queries": len(withheld),
        "abstained_when_withheld": share(abstained, len(withheld)),
        "answered_without_support": share(len(withheld) - abstained, len(withheld)),
        "polar_queries": len(polar),
        "contradicted": share(sum(g is not None and g != e for g, e in zip(given, expected)), len(polar)),
        "agreed": share(sum(g == e for g, e in zip(given, expected)), len(polar)),
        "abstained_when_answerable": share(sum(is_abstention(item["answer"]) for item in polar.values()), len(polar)),
    }
    return rates, {"withheld": withheld, "polar": polar}


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
    scored = retrieval_systems(run)
    systems = list(scored)
    served = served_system(run)
    if (settings.generation or settings.faithfulness) and served not in systems:
        systems.append(served)  # answers read the passages that the served first stage finds
    runs, found, facts = retrieval_runs(run, dataset, systems)
    served_hits = found.get(served, {})
    scores = {"retrieval": {s: per_query_metrics(dataset.qrels, runs[s], RETRIEVAL_METRICS) for s in scored}}
    results = {
        "data": str(data),
        "split": split,
        "queries": len(dataset.queries),
        "data_losses": dataset.losses,
        **facts,
        "runs": runs,
    }
    has_answers = any(q.answers for q in dataset.queries)
    generator_ready = run.is_built("generator")
    top_k = top_k or run.config.generator.top_k
    answering = (settings.generation or settings.faithfulness) and has_answers and generator_ready
    with run.vllm() if answering and settings.engine == "vllm" else contextlib.nullcontext() as remote:
        if settings.generation and has_answers and generator_ready:
            scores["generation"], results["answers"] = _generation(run, dataset, served_hits, top_k, remote)
            results["generation_top_k"] = top_k
            results["generation_passages"] = served
            results["generation_queries"] = len(next(iter(results["answers"].values()), {}))
            results["generation_engine"] = settings.engine
        if settings.faithfulness and has_answers and generator_ready:
            results["faithfulness"], results["faithfulness_answers"] = faithfulness(run, dataset, served_hits, top_k,
                                                                                    remote)
    if (settings.generation or settings.faithfulness) and not (has_answers and generator_ready):
        log.warning("answers not evaluated: %s", "no reference answers" if not has_answers else "no generator")
    for section, systems_scores in scores.items():  # means, 95% bootstrap intervals, and the per-query scores
        results[section] = {system: mean_scores(per_query) for system, per_query in systems_scores.items()}
        results.setdefault("intervals", {})[section] = {
            system: {metric: list(bounds) for metric, bounds in  # lists: the results read back as JSON
                     bootstrap_intervals(per_query, settings.bootstrap_resamples, run.config.seed).items()}
            for system, per_query in systems_scores.items()}
    results["per_query"] = scores
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(output, json.dumps(results, indent=2, ensure_ascii=False))
    return results
