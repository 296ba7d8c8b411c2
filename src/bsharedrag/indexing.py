"""Building and opening the dense indexes of a run (the served corpus, and any other corpus searched)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from .artefacts import file_hash
from .config import Config
from .data import Dataset, Document, read_corpus
from .index import VectorIndex
from .retriever import DenseRetriever

if TYPE_CHECKING:
    from .pipeline import Pipeline

__all__ = ["build_index", "index_for_corpus", "retriever_for"]


def build_index(encoder, docs: list[Document], config: Config, folder: Path, ids: dict) -> dict:
    """Embed `docs` with `encoder` (see `Pipeline.encoder`) into a new index at `folder`; `ids` go into its manifest."""
    started = time.time()
    vectors = encoder.embed_passages(docs, config.index.batch_tokens, desc=f"index {len(docs)} passages")
    seconds = time.time() - started
    manifest = {**ids, "passage_prefix": config.retriever.passage_prefix,
                "max_passage_len": config.retriever.max_passage_len}
    VectorIndex.create(folder, docs, vectors, manifest)
    return {"documents": len(docs), "embed_seconds": round(seconds, 1),
            "passages_per_second": round(len(docs) / max(seconds, 1e-9), 1)}


def index_for_corpus(pipeline: Pipeline, corpus_dir: Path) -> VectorIndex:
    """The run's index when `corpus_dir` holds the served corpus; else a cached side index for it.

    Side indexes live in the retriever's artefact folder: they are derived from it alone, and a run
    that adopts the retriever adopts them too.
    """
    ids = pipeline.index_ids()
    corpus_file = Path(corpus_dir) / "corpus.jsonl"
    digest = file_hash(corpus_file)
    if pipeline.manifest("index")["inputs"]["corpus"] == digest:
        return VectorIndex.open(pipeline.folder("index"), expect=ids)
    side = pipeline.folder("retriever") / "side-indexes" / digest
    try:
        return VectorIndex.open(side, expect=ids)
    except (FileNotFoundError, RuntimeError):
        docs = read_corpus(corpus_file, pipeline.config.strict_data)
        build_index(pipeline.encoder(), docs, pipeline.config, side, {**ids, "corpus": digest})
        return VectorIndex.open(side, expect=ids)


def retriever_for(pipeline: Pipeline, dataset: Dataset) -> DenseRetriever:
    return DenseRetriever(pipeline.encoder(), index_for_corpus(pipeline, dataset.path))
