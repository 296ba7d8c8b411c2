"""Synthetic training questions and answers from a bare corpus (a shop's catalogue has no labelled ones).

For each sampled passage a writer model is asked for `questions_per_passage` questions a shopper
would ask that the passage answers, each with an answer taken from it, in the passage's language.
The writer is an instruct model loaded with transformers (by default the run's backbone, before any
adapter) or an OpenAI-compatible endpoint. Its replies are parsed (`Q: ...` / `A: ...` pairs) and
filtered, each filter's count going into the manifest:

* unparsed: a reply with no question and answer pair;
* copies: a question that repeats a run of `copy_words` words of its passage (a shopper does not
  quote the catalogue, and a retriever learns nothing from string matching);
* unsupported: an answer whose content words are mostly not in the passage (`support` share);
* duplicates: a question whose words overlap an earlier kept one's by `duplicate` Jaccard or more;
* round trip: a question for which BM25 does not rank its passage in its top `round_trip_k` (the
  consistency filter of InPars and Promptagator).

The output is a BEIR-style dataset: the corpus, queries.jsonl (with `answers`), qrels/train.tsv and a
held-back qrels/dev.tsv (`validation_fraction` of the passages, never the same passage in both).
Replies are appended to `.OUT.writing/replies.jsonl` beside OUT as each batch finishes, so a killed synth resumes
where it stopped; passages are sampled and decoded deterministically, so one seed gives one dataset.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from .config import SynthConfig
from .data import Document, read_corpus
from .files import file_hash, remove_path, replacing, write_text_atomic
from .progress import progress
from .text import has_cjk, words

__all__ = ["filter_pairs", "parse_pairs", "synthesise", "writer_prompt"]

log = logging.getLogger(__name__)
_PAIR = re.compile(r"^\s*(?:\d+[.)]\s*)?(Q|A|问|答)\s*[:：]\s*(.+?)\s*$", re.IGNORECASE)
_STOP = frozenset("a an the is are was were be of to in on for and or it this that with does do can".split())


def writer_prompt(passage: Document, count: int) -> tuple[str, str]:
    """(system, user) messages asking for `count` question and answer pairs, in the passage's language."""
    text = f"{passage.title}: {passage.text}" if passage.title else passage.text
    if has_cjk(text):
        return ("你是网店的顾客。", f"商品资料：\n{text}\n\n写出{count}个顾客可能会问、并且这段资料能回答的问题，"
                "每个问题后面写出根据资料的简短回答。格式：\n问：……\n答：……")
    return ("You are a customer of an online shop.",
            f"Product information:\n{text}\n\nWrite {count} questions a shopper might ask that this information "
            "answers, each followed by a short answer taken from it. Format:\nQ: ...\nA: ...")


def parse_pairs(reply: str) -> list[tuple[str, str]]:
    """The (question, answer) pairs of a reply, in order; a question without an answer is dropped."""
    pairs, question = [], None
    for line in reply.splitlines():
        match = _PAIR.match(line)
        if not match:
            continue
        kind, text = match.group(1).lower(), match.group(2)
        if kind in ("q", "问"):
            question = text
        elif question is not None:
            pairs.append((question, text))
            question = None
    return pairs


def _content(text: str) -> list[str]:
    return [word for word in words(text) if word not in _STOP]


def _copies(question: str, passage: str, run: int) -> bool:
    """Whether `question` repeats `run` consecutive words of `passage`."""
    asked, source = words(question), " " + " ".join(words(passage)) + " "
    return any(" " + " ".join(asked[i: i + run]) + " " in source for i in range(len(asked) - run + 1))


def _supported(answer: str, passage: str, share: float) -> bool:
    said, source = _content(answer), set(words(passage))
    return not said or sum(word in source for word in said) / len(said) >= share


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def filter_pairs(replies: dict[str, str], docs: dict[str, Document], settings: SynthConfig) -> tuple[list, dict]:
    """The kept (passage id, question, answer) triples of the writer's replies, and each filter's count."""
    from .model.baselines import BM25Retriever

    counts = dict.fromkeys(("replies", "pairs", "unparsed", "copies", "unsupported", "duplicates", "round_trip",
                            "kept"), 0)
    candidates, seen = [], []
    for doc_id, reply in replies.items():
        counts["replies"] += 1
        pairs = parse_pairs(reply)[: settings.questions_per_passage]
        counts["unparsed"] += not pairs
        passage = docs[doc_id].content
        for question, answer in pairs:
            counts["pairs"] += 1
            if _copies(question, passage, settings.copy_words):
                counts["copies"] += 1
            elif not _supported(answer, passage, settings.support):
                counts["unsupported"] += 1
            elif any(_jaccard(set(_content(question)), other) >= settings.duplicate for other in seen):
                counts["duplicates"] += 1
            else:
                seen.append(set(_content(question)))
                candidates.append((doc_id, question, answer))
    kept = []
    if candidates:
        bm25 = BM25Retriever(list(docs.values()))
        hits = bm25.search([question for _, question, _ in candidates], settings.round_trip_k)
        for candidate, ranked in zip(candidates, hits, strict=True):
            if candidate[0] in {hit.doc.id for hit in ranked if hit.score > 0}:  # a 0 score matched no word
                kept.append(candidate)
            else:
                counts["round_trip"] += 1
    counts["kept"] = len(kept)
    return kept, counts


# --- writers ---------------------------------------------------------------------------------


def _local_writer(model_source, settings: SynthConfig) -> Callable[[list[tuple[str, str]]], list[str]]:
    """A batched greedy writer on a transformers causal LM (left-padded, one generate call per batch)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_source)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_source).eval()

    def render(system: str, user: str) -> str:
        if tokenizer.chat_template:
            return tokenizer.apply_chat_template([{"role": "system", "content": system},
                                                  {"role": "user", "content": user}],
                                                 tokenize=False, add_generation_prompt=True)
        return f"{system}\n\n{user}\n\n"

    @torch.inference_mode()
    def write(prompts: list[tuple[str, str]]) -> list[str]:
        batch = tokenizer([render(*p) for p in prompts], return_tensors="pt", padding=True,
                          truncation=True, max_length=settings.max_prompt_tokens, add_special_tokens=False)
        out = model.generate(**batch, max_new_tokens=settings.max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)

    return write


def _endpoint_writer(settings: SynthConfig) -> Callable[[list[tuple[str, str]]], list[str]]:
    """A writer on an OpenAI-compatible chat completions endpoint (`endpoint`, key in `api_key_env`)."""
    key = os.environ.get(settings.api_key_env, "")

    def ask(system: str, user: str) -> str:
        body = json.dumps({"model": settings.endpoint_model, "temperature": 0, "seed": 0,
                           "max_tokens": settings.max_new_tokens,
                           "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]})
        request = urllib.request.Request(settings.endpoint.rstrip("/") + "/chat/completions", body.encode(),
                                         {"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
        with urllib.request.urlopen(request, timeout=settings.endpoint_timeout) as response:
            return json.loads(response.read())["choices"][0]["message"]["content"]

    return lambda prompts: [ask(*prompt) for prompt in prompts]


# --- the whole job ---------------------------------------------------------------------------


def synthesise(corpus_dir: Path, out: Path, settings: SynthConfig, seed: int = 0, model_source=None,
               writer: Callable[[list[tuple[str, str]]], list[str]] | None = None) -> dict:
    """Write the synthetic dataset of `corpus_dir` to `out` (see the module docstring); returns the manifest.

    `writer` maps (system, user) prompts to replies; by default the endpoint when one is set, else
    the transformers model at `model_source`.
    """
    started = time.time()
    corpus = read_corpus(Path(corpus_dir) / "corpus.jsonl")
    if not corpus:
        raise ValueError(f"{corpus_dir}/corpus.jsonl holds no passage")
    rng = random.Random(seed)
    sampled = sorted(corpus, key=lambda doc: doc.id)
    rng.shuffle(sampled)
    sampled = sampled[: settings.passages] if settings.passages else sampled
    out = Path(out)
    writing = out.with_name(f".{out.name}.writing")
    writing.mkdir(parents=True, exist_ok=True)
    replies_file = writing / "replies.jsonl"
    replies = _read_replies(replies_file, settings)
    todo = [doc for doc in sampled if doc.id not in replies]
    if replies:
        log.info("synth: resuming, %d of %d passages written already", len(replies), len(sampled))
    if todo:
        writer = writer or (_endpoint_writer(settings) if settings.endpoint else _local_writer(model_source, settings))
        bar = progress(total=len(sampled), initial=len(sampled) - len(todo), desc="writing questions")
        with replies_file.open("a", encoding="utf-8") as handle:
            for start in range(0, len(todo), settings.batch_size):
                batch = todo[start: start + settings.batch_size]
                for doc, reply in zip(batch, writer([writer_prompt(doc, settings.questions_per_passage)
                                                     for doc in batch]), strict=True):
                    replies[doc.id] = reply
                    handle.write(json.dumps({"doc_id": doc.id, "settings": _writer_key(settings), "reply": reply},
                                            ensure_ascii=False) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
                bar.update(len(batch))
        bar.close()
    docs = {doc.id: doc for doc in corpus}
    kept, counts = filter_pairs({d.id: replies[d.id] for d in sampled}, docs, settings)
    if not kept:
        raise ValueError(f"no question survived the filters ({', '.join(f'{k} {v}' for k, v in counts.items())}); "
                         f"the writer's replies are in {replies_file}")
    manifest = _write_dataset(out, corpus, kept, counts, settings, seed, Path(corpus_dir), started)
    remove_path(writing)
    return manifest


def _writer_key(settings: SynthConfig) -> dict:
    """What a reply depends on: a resumed synth reuses only replies written with the same settings."""
    return {k: getattr(settings, k) for k in ("writer", "endpoint", "endpoint_model", "questions_per_passage",
                                              "max_new_tokens", "max_prompt_tokens")}


def _read_replies(path: Path, settings: SynthConfig) -> dict[str, str]:
    replies = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # the line a kill cut short: its passage is written again
            if row.get("settings") == _writer_key(settings):
                replies[row["doc_id"]] = row["reply"]
    return replies


def _write_dataset(out: Path, corpus: Sequence[Document], kept: list, counts: dict,
                   settings: SynthConfig, seed: int, corpus_dir: Path, started: float) -> dict:
    passages = sorted({doc_id for doc_id, _, _ in kept})
    random.Random(seed + 1).shuffle(passages)
    held = set(passages[: round(len(passages) * settings.validation_fraction)])
    by_passage: dict[str, list] = {}
    for doc_id, question, answer in kept:
        by_passage.setdefault(doc_id, []).append((question, answer))
    docs = {doc.id: doc for doc in corpus}
    with replacing(out) as folder:
        (folder / "qrels").mkdir(parents=True)
        with (folder / "corpus.jsonl").open("w", encoding="utf-8") as handle:
            for doc in corpus:
                handle.write(json.dumps(doc.to_json(), ensure_ascii=False) + "\n")
        rows, qrels = [], {"train": [], "dev": []}
        for doc_id, pairs in by_passage.items():
            for n, (question, answer) in enumerate(pairs):
                query_id = f"synth-{doc_id}-{n}"
                product = docs[doc_id].product_id
                text = f"{docs[doc_id].title}: {question}" if docs[doc_id].title else question
                rows.append({"_id": query_id, "text": text, "question": question, "answers": [answer],
                             **({"product_id": product} if product is not None else {})})
                qrels["dev" if doc_id in held else "train"].append(f"{query_id}\t{doc_id}\t1")
        (folder / "queries.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                              encoding="utf-8")
        for split, lines in qrels.items():
            (folder / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
                line + "\n" for line in lines))
        manifest = {"corpus": str(corpus_dir), "corpus_hash": file_hash(corpus_dir / "corpus.jsonl"), "seed": seed,
                    "settings": json.loads(settings.model_dump_json()), "filters": counts,
                    "queries": {split: len(lines) for split, lines in qrels.items()},
                    "seconds": round(time.time() - started, 1)}
        write_text_atomic(folder / "manifest.json", json.dumps(manifest, indent=2))
    log.info("synth: %d questions kept of %d pairs (%s)", counts["kept"], counts["pairs"], counts)
    return manifest
