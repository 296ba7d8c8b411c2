"""Catalogue updates on a run's index, shared by the server and `bsharedrag docs add|rm`.

An upsert embeds the documents with the retriever adapter, then writes them and their vectors in
one SQLite transaction (`VectorIndex.upsert`): acknowledged means durable, and a batch interrupted
by a crash leaves nothing behind. The FAISS snapshot is only a loading shortcut; a stale one is
rebuilt from SQLite when the index is opened.

A serving process holds an exclusive `flock` on `serve.lock` in the index folder. The CLI refuses to
write while it is held, because the server's in-memory FAISS index would not see the change (and
its next snapshot would record a generation it does not hold). The kernel drops the lock when the
process dies, even by kill -9, so a crashed server never blocks the CLI.
"""

from __future__ import annotations

import fcntl
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..data import Document, read_corpus
from .schemas import check_identifier

if TYPE_CHECKING:
    from ..model.encoder import DenseRetriever
    from ..model.index import VectorIndex

__all__ = ["ServingLockError", "delete_documents", "read_document_ids", "read_documents", "serving_lock",
           "upsert_documents", "upsert_steps"]

_LOCK = "serve.lock"


class ServingLockError(RuntimeError):
    """Another process is serving this index."""


def _addressable(doc: Document) -> None:
    """Refuse a document that could not be read or removed over HTTP again, or not stored as UTF-8."""
    check_identifier(doc.id)
    if doc.product_id is not None:
        check_identifier(doc.product_id)
    doc.content.encode("utf-8")


def read_documents(path: Path) -> list[Document]:
    """Documents of a corpus.jsonl file to upsert; any malformed line is an error naming its line number."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"document file {path} does not exist")
    docs = read_corpus(path, strict=True, check=_addressable, advice="nothing was stored")
    if not docs:
        raise ValueError(f"{path} holds no document")
    ids = [doc.id for doc in docs]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path} repeats document ids: {sorted({i for i in ids if ids.count(i) > 1})[:10]}")
    return docs


def read_document_ids(path: Path) -> list[str]:
    """Ids listed one per line in a file (`-`: standard input), blank lines skipped."""
    if str(path) == "-":
        lines = sys.stdin.read().splitlines()
    elif not Path(path).is_file():
        raise FileNotFoundError(f"id file {path} does not exist")
    else:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    ids = [line.strip() for line in lines if line.strip()]
    if not ids:
        raise ValueError(f"{path} lists no document id")
    return ids


def upsert_steps(retriever: DenseRetriever, docs: Sequence[Document], batch_tokens: int = 4096,
                 slice_documents: int = 16) -> Iterator[int]:
    """Upsert `docs` one embedding slice at a time: yields the documents embedded so far after each slice.

    Nothing is stored until the last slice is embedded; then every document and vector goes into the
    index in one transaction (all or none). A server advances this between other model jobs, so a
    large upsert does not hold up searches; closing the iterator early stores nothing.
    """
    if not docs:
        raise ValueError("no documents to upsert")
    docs = list(docs)
    slices = []
    for start in range(0, len(docs), slice_documents):
        slices.append(retriever.encoder.embed_passages(docs[start:start + slice_documents], batch_tokens))
        yield min(start + slice_documents, len(docs))
    retriever.index.upsert(docs, np.concatenate(slices))  # (len(docs), dim)


def upsert_documents(retriever: DenseRetriever, docs: Sequence[Document], batch_tokens: int = 4096) -> int:
    """Embed `docs` with the retriever's encoder and insert or replace them in its index, all or none; returns the count."""
    for _ in upsert_steps(retriever, docs, batch_tokens, slice_documents=max(len(docs), 1)):
        pass
    return len(docs)


def delete_documents(index: VectorIndex, doc_ids: Sequence[str]) -> list[str]:
    """Remove documents by id (one transaction); returns the ids that were not in the index."""
    missing = [doc_id for doc_id in doc_ids if index.get(doc_id) is None]
    index.delete(list(doc_ids))
    return missing


@contextmanager
def serving_lock(index_folder: Path, holder: str = "server") -> Iterator[None]:
    """Hold the index's serving lock for the duration of the block; raises ServingLockError if taken."""
    if not Path(index_folder).is_dir():
        raise FileNotFoundError(f"no index at {index_folder}; build one with `bsharedrag index`")
    path = Path(index_folder) / _LOCK
    handle = open(path, "a+")  # noqa: SIM115 - held open for the whole block
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            raise ServingLockError(
                f"the index at {index_folder} is in use by {owner}; send updates to the running server "
                f"(PUT/DELETE /v1/documents) or stop it first"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{holder} pid {os.getpid()}")
        handle.flush()
        yield
    finally:
        handle.close()  # closing the file releases the lock
