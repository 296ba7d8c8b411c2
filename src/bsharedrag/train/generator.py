"""Stage 4: retrieval-augmented instruction tuning of the `generator` LoRA adapter.

Training examples are (question, passages, answer) triples:

* One triple per (query, reference answer) pair, at most `MAX_ANSWERS_PER_QUERY` per query (a seeded
  sample). ePQA queries carry 3-5 crowd answers and HetPQA queries one or two; every answer is a
  valid target, and the cap keeps the few many-answer queries from dominating an epoch.
* The question is `query.text` (for ePQA it starts with the product title), and the passages are the
  retriever's `top_k` for it over the whole corpus, as evaluation retrieves them.
* Retrieval misses: when no qrels-relevant document is among the passages, with probability
  `gold_rate` the best-graded relevant document replaces the last passage, at a random position,
  so the model sees both answerable prompts and prompts it must answer without support.
* Citing: when relevant passages are in the prompt, the target is the answer followed by their
  markers, e.g. "It fits the 2012 model. [2]", so the generator learns to cite. A passage dropped
  to fit `max_prompt_len` is not cited.
* Abstaining (`abstain_rate` > 0): that share of the questions also gets a prompt of passages known
  not to answer it, with the target `abstention_answer` ("The passages do not say."). Known means:
  retrieved, not judged relevant, and from another product, or, in a dataset judged per product
  (`judged_per_product`, whose unjudged passages of a product are judged irrelevant), from any
  product. In such a dataset a retrieval miss left without its gold passage is known unsupported
  too, so its target becomes the abstention as well, rather than an answer the prompt cannot give.

The loss is the mean cross-entropy over answer tokens (and the closing end-of-turn token) of each
optimiser step; prompt and padding positions are labelled -100 and the LM head runs only on answer
positions, which saves most of its cost on long prompts. A forward pass holds at most
`micro_batch_tokens` tokens (long prompts alone, short ones together), padded to a multiple of
`pad_to_multiple`: the CPU's matmul kernels (oneDNN) are built and cached per shape, and a new length
in every batch made that cache grow by about 70 MB a step (the stage's peak climbed from 2.7 to 3.1
GB in 8 steps) and spent time building kernels; with lengths in steps of 64 the peak settles near
2.6 GB and a step is faster (4.7 s against 5.2 s, 2026-12-07, the quick profile).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .. import distributed
from ..config import GeneratorConfig
from ..data import Dataset, Document
from ..model.backbone import GENERATOR
from ..model.prompt import abstention_answer, citation_marker, encode_answer, encode_prompt
from ..progress import progress
from .loop import loss_summary, micro_batches, seed_everything, step_batches, train_loop

if TYPE_CHECKING:
    from ..model.backbone import SharedBackbone
    from ..model.encoder import DenseRetriever

__all__ = [
    "IGNORE_INDEX",
    "MAX_ANSWERS_PER_QUERY",
    "Triple",
    "answer_labels",
    "answer_loss_step",
    "build_triples",
    "collate",
    "encode_triple",
    "encode_triples",
    "train_generator",
]

IGNORE_INDEX = -100
MAX_ANSWERS_PER_QUERY = 3
_SEARCH_BATCH = 32  # questions embedded per retriever call


@dataclass(frozen=True)
class Triple:
    question: str
    passages: tuple[Document, ...]
    answer: str  # the reference answer, without citation markers
    cited: tuple[int, ...] = ()  # 1-based numbers of the relevant passages in `passages`
    query_id: str = ""


def _retrieve(retriever: DenseRetriever, queries: list, top_k: int) -> dict[str, list[Document]]:
    """query id -> the retriever's top_k documents for `query.text`."""
    found: dict[str, list[Document]] = {}
    bar = progress(total=len(queries), desc="retrieving passages for the generator")
    for start in range(0, len(queries), _SEARCH_BATCH):
        batch = queries[start : start + _SEARCH_BATCH]
        for query, hits in zip(batch, retriever.search([q.text for q in batch], top_k), strict=True):
            found[query.id] = [hit.doc for hit in hits]
        bar.update(len(batch))
    bar.close()
    return found


def _with_gold(retrieved: list[Document], dataset: Dataset, query_id: str, settings: GeneratorConfig, rng
               ) -> list[Document]:
    passages = list(retrieved[: settings.top_k])
    relevant = dataset.qrels.get(query_id, {})
    if not relevant or any(doc.id in relevant for doc in passages) or rng.random() >= settings.gold_rate:
        return passages
    if len(passages) >= settings.top_k:
        passages.pop()
    passages.insert(rng.randrange(len(passages) + 1), dataset.best_judged(query_id))
    return passages


def build_triples(
    datasets: list[Dataset],
    retrievers: DenseRetriever | Sequence[DenseRetriever] | None,
    settings: GeneratorConfig,
    seed: int = 0,
    judged_per_product: Sequence[bool] = (),
) -> list[Triple]:
    """Training triples for every query with reference answers (see the module docstring for the rules).

    `retrievers` is one retriever for all datasets or one per dataset, each indexing its dataset's
    corpus; it may be None when `settings.with_passages` is False. `judged_per_product` marks, per
    dataset, those whose unjudged passages of a product are irrelevant (default: none).
    """
    if not settings.with_passages:
        per_dataset = [None] * len(datasets)
    elif retrievers is None:
        raise ValueError("a retriever is needed to build triples with passages (or set with_passages=False)")
    elif isinstance(retrievers, Sequence):
        if len(retrievers) != len(datasets):
            raise ValueError(f"got {len(retrievers)} retrievers for {len(datasets)} datasets; pass one or one each")
        per_dataset = list(retrievers)
    else:
        per_dataset = [retrievers] * len(datasets)
    judged_per_product = list(judged_per_product) or [False] * len(datasets)
    abstain = settings.abstain_rate > 0 and settings.with_passages
    depth = settings.top_k * (4 if abstain else 1)  # deeper, to find passages that do not answer
    rng = random.Random(seed)
    triples: list[Triple] = []
    for dataset, retriever, judged in zip(datasets, per_dataset, judged_per_product, strict=True):
        queries = [query for query in dataset.queries if query.answers]
        retrieved = _retrieve(retriever, queries, depth) if retriever is not None else {}
        for query in queries:
            answers = list(query.answers)
            if len(answers) > MAX_ANSWERS_PER_QUERY:
                answers = rng.sample(answers, MAX_ANSWERS_PER_QUERY)
            relevant = dataset.qrels.get(query.id, {})
            for answer in answers:
                passages = _with_gold(retrieved[query.id], dataset, query.id, settings, rng) if retrieved else []
                cited = tuple(number for number, doc in enumerate(passages, 1) if doc.id in relevant)
                if abstain and judged and not cited:
                    answer = abstention_answer(query.text)
                triples.append(Triple(query.text, tuple(passages), answer.strip(), cited, query.id))
            if abstain and rng.random() < settings.abstain_rate:
                passages = tuple(doc for doc in retrieved[query.id]
                                 if dataset.answers_nothing(query, doc, judged))[: settings.top_k]
                if passages:
                    triples.append(Triple(query.text, passages, abstention_answer(query.text), (), query.id))
    if not triples:
        raise ValueError(f"no query with reference answers in {[str(d.path) for d in datasets]}; nothing to train on")
    return triples


def encode_triple(tokenizer, triple: Triple, settings: GeneratorConfig) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) for a triple; citations refer only to passages the prompt kept."""
    prompt = encode_prompt(tokenizer, triple.question, list(triple.passages), settings)
    cited = [number for number in triple.cited if number <= prompt.n_passages]
    target = f"{triple.answer} {citation_marker(cited)}" if cited else triple.answer
    return prompt.ids, encode_answer(tokenizer, target, settings)


def answer_labels(prompt_ids: list[int], answer_ids: list[int]) -> tuple[list[int], list[int]]:
    """(input ids, labels) for one example: the loss sees the answer tokens only."""
    return prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids


def padded_length(length: int, multiple: int) -> int:
    return -(-length // multiple) * multiple


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int, multiple: int = 1) -> dict[str, torch.Tensor]:
    """Right-pad (input ids, labels) pairs into `input_ids`, `attention_mask` and `labels` (batch, seq),
    seq a multiple of `multiple`."""
    width = padded_length(max(len(ids) for ids, _ in examples), multiple)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, row_labels) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(row_labels)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def answer_loss_sum(backbone: SharedBackbone, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross-entropy over the labelled (answer) positions of a collated batch."""
    device = backbone.device
    hidden = backbone.decoder(
        input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
    ).last_hidden_state  # (batch, seq, hidden)
    targets = batch["labels"][:, 1:].to(device)  # (batch, seq - 1): position i predicts token i + 1
    mask = targets != IGNORE_INDEX
    logits = backbone.base.get_output_embeddings()(hidden[:, :-1][mask]).float()  # (answer tokens, vocab)
    return F.cross_entropy(logits, targets[mask], reduction="sum")


def encode_triples(tokenizer, triples: list[Triple], settings: GeneratorConfig) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) of every triple, ready for `step_batches` and `answer_loss_step`."""
    return [answer_labels(*encode_triple(tokenizer, triple, settings)) for triple in triples]


def answer_loss_step(
    backbone: SharedBackbone, batch: list[tuple[list[int], list[int]]], settings: GeneratorConfig, pad_id: int,
    weight: float = 1.0,
) -> float:
    """Forward and backward over one step batch; returns its mean loss per answer token.

    Every micro-batch is divided by the step's answer-token count, so the step's gradient is
    `weight` x the mean over its answer tokens however the batch is split, over micro-batches or
    processes (each process returns its share of the mean).
    """
    n_tokens = sum(sum(label != IGNORE_INDEX for label in labels) for _, labels in batch)
    total = 0.0
    share = distributed.share(batch)  # this process's share (all of it alone)
    multiple = settings.pad_to_multiple
    for micro in micro_batches(share, settings, length=lambda example: padded_length(len(example[0]), multiple)):
        with backbone.autocast_context():
            loss_sum = answer_loss_sum(backbone, collate(micro, pad_id, multiple))
        (loss_sum * (weight / n_tokens)).backward()
        total += loss_sum.item()
    return total / n_tokens


def train_generator(
    backbone: SharedBackbone, triples: list[Triple], settings: GeneratorConfig, out_dir: Path, seed: int = 0
) -> dict:
    """Train the `generator` adapter on `triples` and save it to `out_dir`; returns training stats.

    Resumes from `out_dir/checkpoint` when an interrupted run left one.
    """
    out_dir = Path(out_dir)
    tokenizer = backbone.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    seed_everything(seed)
    batches = step_batches(encode_triples(tokenizer, triples, settings), settings, seed)

    def step(batch: list[tuple[list[int], list[int]]]) -> float:
        return answer_loss_step(backbone, batch, settings, pad_id)

    started = time.perf_counter()
    with backbone.training(GENERATOR, settings.lora) as named:
        losses = train_loop(named, batches, step, settings, out_dir / "checkpoint", "training the generator")
    out_dir.mkdir(parents=True, exist_ok=True)
    backbone.save_adapter(GENERATOR, out_dir)
    stats = {**loss_summary(losses), "examples": len(triples), "seconds": round(time.perf_counter() - started, 2)}
    record = {"stats": stats, "seed": seed, "settings": settings.model_dump(mode="json"), "losses": losses}
    (out_dir / "training.json").write_text(json.dumps(record, indent=2))
    return stats
