"""A shop's catalogue in: product records (JSONL, CSV or Parquet) become a BEIR-style corpus of passages.

A field mapping names which record fields hold the product id, the title and the text (several text
fields are joined, each on its own line). A long text is split into passages of at most
`chunk_tokens` tokens of the backbone's tokenizer, consecutive passages sharing `overlap_tokens`;
every passage keeps the record's title (so the title is embedded with each chunk) and its product
id, and is named `<product id>-p<n>`. The output folder holds `corpus.jsonl` and `manifest.json`
(the settings, the input file's hash, the counts, the records skipped and why); it appears only
once complete.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .config import CatalogueConfig
from .data import DataError, Document, report_malformed
from .files import file_hash, replacing

__all__ = ["FieldMap", "chunk_text", "import_catalogue", "read_records"]

log = logging.getLogger(__name__)
_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}


@dataclass(frozen=True)
class FieldMap:
    """Which record fields hold the product id, the title and the text."""

    id: str = "id"
    title: str = "title"
    text: tuple[str, ...] = ("text",)

    @classmethod
    def parse(cls, items: list[str] | None) -> FieldMap:
        """From `name=field` items: `id=sku`, `title=name`, `text=description,specs`."""
        mapping = {}
        for item in items or []:
            name, _, fields = item.partition("=")
            name, fields = name.strip(), [f.strip() for f in fields.split(",") if f.strip()]
            if name not in ("id", "title", "text") or not fields:
                raise ValueError(f"a field mapping looks like id=FIELD, title=FIELD or text=FIELD[,FIELD...]; "
                                 f"got {item!r}")
            if name != "text" and len(fields) > 1:
                raise ValueError(f"`{name}` maps to one field, got {', '.join(fields)}")
            mapping[name] = tuple(fields) if name == "text" else fields[0]
        return cls(**mapping)

    def document_parts(self, record: dict) -> tuple[str, str, str]:
        """(product id, title, text) of a record; a ValueError says what is missing."""
        if not isinstance(record, dict):
            raise ValueError(f"a record must be an object, got {type(record).__name__}")
        product = record.get(self.id)
        if product is None or str(product).strip() == "":
            raise ValueError(f"the id field `{self.id}` is missing or empty")
        parts = [str(record[name]).strip() for name in self.text if _present(record.get(name))]
        if not parts:
            raise ValueError(f"product {product}: none of the text fields {', '.join(self.text)} has text")
        title = record.get(self.title)
        return str(product).strip(), str(title).strip() if _present(title) else "", "\n".join(parts)


def _present(value) -> bool:
    return value is not None and value == value and str(value).strip() != ""  # value == value: not NaN


def read_records(path: Path) -> Iterator[tuple[int, dict | Exception]]:
    """(line or row number, record) of a JSONL, CSV or Parquet file; a record that cannot be read is an exception."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    kind = _FORMATS.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"{path}: unknown format; a catalogue is .jsonl, .csv or .parquet")
    if kind == "jsonl":
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if line.strip():
                    try:
                        yield number, json.loads(line)
                    except json.JSONDecodeError as error:
                        yield number, error
    elif kind == "csv":
        with path.open(encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            for row in reader:
                yield reader.line_num, (ValueError("more cells than header columns") if None in row else row)
    else:
        import pyarrow.parquet as parquet

        for number, row in enumerate(parquet.read_table(path).to_pylist(), 1):
            yield number, row


def chunk_text(text: str, tokenizer, chunk_tokens: int, overlap_tokens: int) -> list[str]:
    """`text` cut into spans of at most `chunk_tokens` tokens, each starting `chunk_tokens - overlap_tokens`
    tokens after the one before; spans are cut from the original text at token boundaries."""
    if not 0 <= overlap_tokens < chunk_tokens:
        raise ValueError(f"overlap_tokens ({overlap_tokens}) must be at least 0 and below chunk_tokens ({chunk_tokens})")

    def count(span: str) -> int:
        return len(tokenizer(span, add_special_tokens=False)["input_ids"])

    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    if len(offsets) <= chunk_tokens:
        return [text.strip()]
    chunks, start = [], 0
    while True:
        end = min(start + chunk_tokens, len(offsets))
        # A span re-tokenised alone can take a token or two more (byte-level BPE splits a character
        # over tokens; merges depend on context): shorten it until it fits.
        while end > start + 1 and count(text[offsets[start][0]: offsets[end - 1][1]]) > chunk_tokens:
            end -= 1
        chunks.append(text[offsets[start][0]: offsets[end - 1][1]].strip())
        if end == len(offsets):
            return chunks
        start = max(start + 1, end - overlap_tokens)


def import_catalogue(path: Path, out: Path, fields: FieldMap, tokenizer, settings: CatalogueConfig,
                     strict: bool = False) -> dict:
    """Write `out` (corpus.jsonl and manifest.json) from the records of `path`; returns the manifest.

    A malformed record is logged with its file and line and skipped (an error when `strict`); duplicate
    product ids are refused, naming them, and nothing is written.
    """
    started, skipped = time.time(), []
    records = []
    for number, record in read_records(path):
        try:
            if isinstance(record, Exception):
                raise ValueError(str(record))
            records.append(fields.document_parts(record))
        except ValueError as error:
            report_malformed(Path(path), number, error, strict, skipped, "fix it, or import without --strict")
    duplicates = sorted(product for product, count in Counter(r[0] for r in records).items() if count > 1)
    if duplicates:
        shown = ", ".join(duplicates[:10]) + (f" and {len(duplicates) - 10} more" if len(duplicates) > 10 else "")
        raise DataError(f"{path}: duplicate product ids {shown}; each record needs its own `{fields.id}`")
    if not records:
        raise DataError(f"{path}: no record could be read ({len(skipped)} skipped)")
    docs = [Document(f"{product}-p{n}", title, chunk, product)
            for product, title, text in records
            for n, chunk in enumerate(chunk_text(text, tokenizer, settings.chunk_tokens, settings.overlap_tokens))]
    manifest = {
        "source": str(path), "source_hash": file_hash(path), "fields": {"id": fields.id, "title": fields.title,
                                                                      "text": list(fields.text)},
        "settings": settings.model_dump(), "tokenizer": getattr(tokenizer, "name_or_path", ""),
        "products": len(records), "passages": len(docs), "skipped_records": skipped,
        "seconds": round(time.time() - started, 1),
    }
    with replacing(Path(out)) as partial:
        partial.mkdir(parents=True)
        with (partial / "corpus.jsonl").open("w", encoding="utf-8") as handle:
            for doc in docs:
                handle.write(json.dumps(doc.to_json(), ensure_ascii=False) + "\n")
        (partial / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
    log.info("%s: %d products -> %d passages in %s (%d records skipped)", path, len(records), len(docs), out,
             len(skipped))
    return manifest
