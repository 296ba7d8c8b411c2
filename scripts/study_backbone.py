"""Does continual pre-training cost the instruct model its answering? Four generators, the same passages.

    python scripts/study_backbone.py --domain-run runs/quick --base-run runs/separate \
        --passages encoder --queries 80 --output runs/study-backbone.json

`--domain-run` is a BSharedRAG run (continual pre-training on); `--base-run` a run whose generator
adapter was trained on the base model (`architecture=separate`, `pretrain.enabled=false`). Every
question is answered four times from the *same* retrieved passages: by the base model and by the
domain backbone, each with no adapter (zero-shot) and with its own generator adapter. So the
differences measure the backbone alone, not the retriever that the two architectures also differ in.

`--passages encoder` retrieves with all-MiniLM-L6-v2 (the `separate` system's retriever),
`bsharedrag` with the domain run's retriever adapter. Scores: BLEU-3, ROUGE-L, BERTScore and
citation precision with 95% bootstrap intervals, the answers' length in words against the
references', and paired differences (domain minus base) with their intervals.

`--probe-stops` generates nothing: for the questions whose reference answer starts with a bare
"Yes." or "No." and goes on, it feeds each generator the prompt and that first word, and reports
the probability that the answer ends there (end of turn, EOS, or the start of a citation marker)
instead of going on to the evidence, and the mean log-probability of the reference continuation.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import re

import torch

from bsharedrag.data import load_dataset
from bsharedrag.metrics import bootstrap_intervals, generation_scores, mean_scores, paired_difference
from bsharedrag.model.baselines import EncoderRetriever
from bsharedrag.model.generate import stop_token_ids
from bsharedrag.model.prompt import build_prompt
from bsharedrag.rag import RAG
from bsharedrag.run import GENERATOR, Run
from bsharedrag.text import words


def _passages(name: str, domain: Run, dataset, queries, depth: int) -> dict:
    if name == "encoder":
        retriever = EncoderRetriever(dataset.corpus, domain.config.eval.encoder_model)
    else:
        retriever = domain.retriever(dataset.path)
    return dict(zip([q.id for q in queries], retriever.search([q.text for q in queries], depth), strict=True))


_BARE_POLAR = re.compile(r"^\s*(yes|no)[.!,]\s+(\S.*)$", re.IGNORECASE | re.DOTALL)


def _probe_stops(run: Run, adapter: str | None, settings, queries, hits, top_k: int) -> dict:
    """P(the answer ends right after its bare "Yes."/"No.") and the continuation's mean log-probability."""
    backbone = run.backbone()
    tokenizer = backbone.tokenizer
    ends = set(stop_token_ids(tokenizer, backbone.base)) | {tokenizer(" [1]", add_special_tokens=False)["input_ids"][0],
                                                           tokenizer("[1]", add_special_tokens=False)["input_ids"][0]}
    ended, continuation = {}, []
    for query in queries:
        match = next((m for m in map(_BARE_POLAR.match, query.answers) if m), None)
        if match is None:
            continue
        prompt = build_prompt(tokenizer, query.text, [hit.doc for hit in hits[query.id][:top_k]], settings)
        head = tokenizer(match.group(0)[: match.start(2)].rstrip(), add_special_tokens=False)["input_ids"]
        rest = tokenizer(" " + match.group(2).strip(), add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + head + rest], device=backbone.device)
        with torch.inference_mode(), backbone.adapter(adapter):
            logits = backbone.base(input_ids=ids).logits[0].float()
        log_probs = torch.log_softmax(logits, dim=-1)
        at = len(prompt) + len(head) - 1  # the position that predicts what follows "Yes."
        ended[query.id] = float(log_probs[at, sorted(ends)].exp().sum())
        targets = torch.tensor(rest, device=backbone.device)
        continuation.append(float(log_probs[at: at + len(rest)].gather(1, targets[:, None]).mean()))
    return {"questions": len(ended), "p_end_after_yes_no": statistics.mean(ended.values()),
            "continuation_mean_log_prob": statistics.mean(continuation), "per_query": ended}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domain-run", type=Path, required=True)
    parser.add_argument("--base-run", type=Path, required=True)
    parser.add_argument("--data", type=Path, help="BEIR dataset folder (default: the domain run's eval.data)")
    parser.add_argument("--split", default="dev")
    parser.add_argument("--queries", type=int, default=80, help="First N queries with reference answers.")
    parser.add_argument("--passages", choices=["encoder", "bsharedrag"], default="encoder")
    parser.add_argument("--no-bertscore", action="store_true")
    parser.add_argument("--probe-stops", action="store_true", help="Measure where answers end instead of generating.")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()

    domain, base = Run.open(args.domain_run), Run.open(args.base_run)
    dataset = load_dataset(domain.data_path(args.data or domain.config.eval.data), args.split)
    queries = [q for q in dataset.queries if q.answers][: args.queries]
    settings = domain.config.generator
    top_k, max_new_tokens = settings.top_k, domain.config.eval.max_new_tokens
    hits = _passages(args.passages, domain, dataset, queries, top_k)
    references = {q.id: list(q.answers) for q in queries}

    generators = {
        "base, zero-shot": (base, None), "domain, zero-shot": (domain, None),
        "base + generator": (base, GENERATOR), "domain + generator": (domain, GENERATOR),
    }
    if args.probe_stops:
        probes = {label: _probe_stops(run, run.adapter(adapter) if adapter else None, settings, queries, hits, top_k)
                  for label, (run, adapter) in generators.items()}
        differences = {f"{first} - {second}": paired_difference(probes[first]["per_query"], probes[second]["per_query"])
                       for first, second in (("domain, zero-shot", "base, zero-shot"),
                                             ("domain + generator", "base + generator"))}
        args.output.write_text(json.dumps({"passages": args.passages, "queries": len(queries), "probes": probes,
                                           "differences": differences}, indent=2))
        for label, probe in probes.items():
            print(f"{label:20} questions {probe['questions']}, P(end after yes/no) {probe['p_end_after_yes_no']:.3f}, "
                  f"continuation mean log-prob {probe['continuation_mean_log_prob']:.3f}")
        print(json.dumps(differences, indent=1))
        return
    scores, answers, lengths, seconds = {}, {}, {}, {}
    for label, (run, adapter) in generators.items():
        started = time.time()
        rag = RAG(run.backbone(), None, settings, adapter=run.adapter(adapter) if adapter else None)
        predictions, citations = {}, {}
        for query in queries:
            answer = rag.ask(query.text, passages=hits[query.id][:top_k], max_new_tokens=max_new_tokens)
            predictions[query.id], citations[query.id] = answer.text, [c.doc_id for c in answer.citations]
        seconds[label] = round(time.time() - started, 1)
        scores[label] = generation_scores(predictions, references, citations, dataset.qrels,
                                          with_bertscore=not args.no_bertscore,
                                          model_path=domain.config.eval.bertscore_model)
        answers[label] = predictions
        lengths[label] = statistics.mean(len(words(text)) for text in predictions.values())
        print(f"{label}: {mean_scores(scores[label])} ({seconds[label]} s)", flush=True)

    reference_words = statistics.mean(statistics.mean(len(words(a)) for a in q.answers) for q in queries)
    summary = {
        label: {"mean": mean_scores(per_query), "interval_95": bootstrap_intervals(per_query),
                "answer_words": round(lengths[label], 1)}
        for label, per_query in scores.items()
    }
    differences = {}
    for first, second in (("domain, zero-shot", "base, zero-shot"), ("domain + generator", "base + generator")):
        differences[f"{first} - {second}"] = {
            metric: paired_difference({q: s[metric] for q, s in scores[first].items()},
                                      {q: s[metric] for q, s in scores[second].items()})
            for metric in next(iter(scores[first].values()))
        }
    result = {
        "domain_run": str(args.domain_run), "base_run": str(args.base_run), "data": str(dataset.path),
        "split": args.split, "queries": len(queries), "passages": args.passages, "top_k": top_k,
        "max_new_tokens": max_new_tokens, "reference_words": round(reference_words, 1), "seconds": seconds,
        "summary": summary, "differences": differences, "answers": answers,
    }
    args.output.write_text(json.dumps(result, indent=2, ensure_ascii=False))
    print(f"{'generator':20} {'bleu3':>7} {'rougeL':>7} {'bertscore':>9} {'words':>6}")
    for label, row in summary.items():
        mean = row["mean"]
        print(f"{label:20} {mean['bleu3']:7.2f} {mean['rougeL']:7.2f} {mean.get('bertscore', float('nan')):9.2f} "
              f"{row['answer_words']:6.1f}")
    print(f"references: {reference_words:.1f} words")
    print(json.dumps(differences, indent=1))


if __name__ == "__main__":
    main()
