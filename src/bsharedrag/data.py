"""BEIR-style datasets: corpus.jsonl, queries.jsonl (optional `answers`) and qrels/<split>.tsv."""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["DataError", "Dataset", "Document", "Query", "load_dataset", "read_corpus", "read_qrels", "read_queries",
           "report_malformed"]

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A malformed data file; the message names the file and line."""


@dataclass(frozen=True)
class Document:
    id: str
    title: str
    text: str
    product_id: str | None = None
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def content(self) -> str:
        """What is embedded and searched: title and text together."""
        return f"{self.title}: {self.text}" if self.title else self.text

    def to_json(self) -> dict:
        row = {"_id": self.id, "title": self.title, "text": self.text, **self.extra}
        if self.product_id is not None:
            row["product_id"] = self.product_id
        return row

    @classmethod
    def from_json(cls, row: dict) -> Document:
        if not isinstance(row, dict):
            raise ValueError(f"a document must be a JSON object, got {type(row).__name__}")
        doc_id, text = row.get("_id"), row.get("text")
        if not isinstance(doc_id, str | int) or str(doc_id) == "":
            raise ValueError("`_id` is missing or empty")
        if not isinstance(text, str):
            raise ValueError(f"document {doc_id}: `text` must be a string")
        title = row.get("title") or ""
        product = row.get("product_id")
        extra = {k: v for k, v in row.items() if k not in ("_id", "title", "text", "product_id")}
        return cls(str(doc_id), str(title), text, None if product is None else str(product), extra)


@dataclass(frozen=True)
class Query:
    id: str
    text: str
    question: str
    product_id: str | None = None
    answers: tuple[str, ...] = ()


_STRICT_ADVICE = "fix it, or set strict_data: false to skip it"


def report_malformed(path: Path, number: int, error: Exception, strict: bool, skipped: list[str] | None,
               advice: str = _STRICT_ADVICE) -> None:
    """A malformed line: an error when `strict`, else logged and noted in `skipped` (`file:line: why`)."""
    if strict:
        raise DataError(f"{path}:{number}: malformed line ({error}); {advice}")
    log.warning("%s:%d: malformed line skipped (%s)", path, number, error)
    if skipped is not None:
        skipped.append(f"{path}:{number}: {error}")


def _read_jsonl(path: Path, parse, strict: bool, skipped: list[str] | None = None, advice: str = _STRICT_ADVICE) -> list:
    """Parse each line with `parse`; a bad line is logged with file:line (or raised when strict, with `advice`)."""
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    items, bad = [], 0
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                items.append(parse(json.loads(line)))
            except (json.JSONDecodeError, ValueError, TypeError) as error:
                report_malformed(path, number, error, strict, skipped, advice)
                bad += 1
    if bad:
        log.warning("%s: %d malformed line(s) skipped, %d read", path, bad, len(items))
    return items


def read_corpus(path: Path, strict: bool = False, skipped: list[str] | None = None, check=None,
                advice: str = _STRICT_ADVICE) -> list[Document]:
    """The documents of a corpus.jsonl file; `check(doc)` may refuse one with a ValueError, as a malformed line."""

    def parse(row) -> Document:
        doc = Document.from_json(row)
        if check is not None:
            check(doc)
        return doc

    return _read_jsonl(Path(path), parse, strict, skipped, advice)


def _query(row: dict) -> Query:
    if not isinstance(row, dict) or not str(row.get("_id", "")) or not isinstance(row.get("text"), str):
        raise ValueError("a query needs `_id` and a string `text`")
    if not row["text"].strip():
        raise ValueError(f"query {row['_id']}: `text` is empty")
    answers = row.get("answers") or []
    if not isinstance(answers, list):
        raise ValueError("`answers` must be a list of strings")
    question = row.get("question") or row["text"]
    product = row.get("product_id")
    return Query(str(row["_id"]), row["text"], question, None if product is None else str(product),
                 tuple(str(a) for a in answers if str(a).strip()))


def read_queries(path: Path, strict: bool = False, skipped: list[str] | None = None) -> list[Query]:
    return _read_jsonl(Path(path), _query, strict, skipped)


def read_qrels(path: Path, strict: bool = False, skipped: list[str] | None = None) -> dict[str, dict[str, int]]:
    """query id -> {doc id: graded relevance}; pairs with relevance <= 0 are dropped."""
    if not path.exists():
        splits = sorted(p.stem for p in path.parent.glob("*.tsv"))
        raise FileNotFoundError(f"{path} does not exist; splits available: {splits or 'none'}")
    qrels: dict[str, dict[str, int]] = {}
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            parts = line.rstrip("\n").split("\t")
            if number == 1 and parts[0] in ("query-id", "query_id", "qid"):
                continue
            if not line.strip():
                continue
            try:
                query_id, doc_id, score = parts[0], parts[1], int(float(parts[2]))
            except (IndexError, ValueError) as error:
                report_malformed(path, number, error, strict, skipped)
                continue
            if score > 0:
                qrels.setdefault(query_id, {})[doc_id] = score
    return qrels


@dataclass
class Dataset:
    """A corpus, the queries of one split (those with qrels) and their graded qrels."""

    path: Path
    split: str
    corpus: list[Document]
    queries: list[Query]
    qrels: dict[str, dict[str, int]]
    # What reading lost: `skipped_lines` ("file:line: why"), `dropped_judgements` (qrels naming a
    # passage the corpus lacks) and `dropped_queries` (judged queries left with no judgement).
    losses: dict = field(default_factory=dict)

    @property
    def docs(self) -> dict[str, Document]:
        if not hasattr(self, "_docs"):
            self._docs = {doc.id: doc for doc in self.corpus}
        return self._docs

    def best_judged(self, query_id: str) -> Document | None:
        """The query's highest-graded judged passage (ties: the smallest id); None when it has none."""
        relevant = self.qrels.get(query_id, {})
        return self.docs[min(relevant, key=lambda doc_id: (-relevant[doc_id], doc_id))] if relevant else None

    def answers_nothing(self, query: Query, doc: Document, judged_per_product: bool) -> bool:
        """Whether `doc` is known not to answer `query`: it is not judged relevant, and it comes from another
        product than the query's and its judged passages', unless the dataset judges every passage of a
        product (`judged_per_product`: its unjudged passages of any product are irrelevant)."""
        relevant = self.qrels.get(query.id, {})
        if doc.id in relevant:
            return False
        if judged_per_product:
            return True
        products = {query.product_id} | {self.docs[d].product_id for d in relevant if d in self.docs}
        return doc.product_id not in products - {None}

    def sample(self, max_queries: int | None, seed: int = 0) -> Dataset:
        """The same dataset with at most `max_queries` queries (a seeded sample); the corpus is kept whole."""
        if max_queries is None or len(self.queries) <= max_queries:
            return self
        queries = random.Random(seed).sample(self.queries, max_queries)
        kept = {q.id for q in queries}
        return Dataset(self.path, self.split, self.corpus, queries, {q: r for q, r in self.qrels.items() if q in kept},
                       self.losses)


def load_dataset(path: Path, split: str, strict: bool = False) -> Dataset:
    """Read a BEIR-style folder; only queries judged in `split` are kept."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"dataset folder {path} does not exist")
    skipped: list[str] = []
    corpus = read_corpus(path / "corpus.jsonl", strict, skipped)
    if not corpus:
        raise DataError(f"{path / 'corpus.jsonl'} holds no valid document")
    qrels = read_qrels(path / "qrels" / f"{split}.tsv", strict, skipped)
    known = {doc.id for doc in corpus}
    dropped_judgements, dropped_queries = 0, 0
    for query_id in list(qrels):
        kept = {d: s for d, s in qrels[query_id].items() if d in known}
        dropped_judgements += len(qrels[query_id]) - len(kept)
        qrels[query_id] = kept
        if not kept:
            del qrels[query_id]
            dropped_queries += 1
    if dropped_judgements:
        log.warning("%s: %d judgement(s) of split %r name passages missing from the corpus and were dropped "
                    "(%d queries lost every judgement)", path, dropped_judgements, split, dropped_queries)
    queries = [q for q in read_queries(path / "queries.jsonl", strict, skipped) if q.id in qrels]
    losses = {"skipped_lines": skipped, "dropped_judgements": dropped_judgements, "dropped_queries": dropped_queries}
    return Dataset(path, split, corpus, queries, {q.id: qrels[q.id] for q in queries}, losses)
