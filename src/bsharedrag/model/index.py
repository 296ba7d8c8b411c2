"""The vector index: a FAISS inner-product index over a SQLite document store, with a manifest.

SQLite is the source of truth: each row holds a document and its embedding, so an upsert or a
delete is one transaction (durable once committed, invisible if interrupted). `vectors.faiss`
is a snapshot for fast loading; it is trusted only when its generation matches the store's,
otherwise it is rebuilt from SQLite. The manifest records the backbone, the adapter and the
corpus hash the vectors were built with; opening with a different model is refused.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data import Document
from ..files import replacing, write_text_atomic

__all__ = ["Hit", "IndexMismatchError", "VectorIndex", "build_index"]

MANIFEST = "index.json"
_STORE = "docs.sqlite"
_SNAPSHOT = "vectors.faiss"


class IndexMismatchError(RuntimeError):
    """The index was built with another backbone or adapter than the one asked for."""


@dataclass(frozen=True)
class Hit:
    doc: Document
    score: float


class VectorIndex:
    """Documents and their L2-normalised embeddings, searchable by inner product, updatable by id."""

    def __init__(self, folder: Path, manifest: dict, connection: sqlite3.Connection, faiss_index):
        self.folder = Path(folder)
        self.manifest = manifest
        self._db = connection
        self._faiss = faiss_index
        self._lock = threading.RLock()

    # --- building and opening -------------------------------------------------------------

    @classmethod
    def create(cls, folder: Path, docs: Sequence[Document], vectors: np.ndarray, manifest: dict) -> VectorIndex:
        """Write a new index into `folder` (replacing any index there)."""
        if len(docs) != len(vectors):
            raise ValueError(f"{len(docs)} documents but {len(vectors)} vectors")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name in (_STORE, _SNAPSHOT, MANIFEST, _STORE + "-wal", _STORE + "-shm"):
            (folder / name).unlink(missing_ok=True)
        manifest = {**manifest, "dim": int(vectors.shape[1])}
        connection = _connect(folder / _STORE)
        with connection:
            connection.executemany(
                "INSERT INTO docs (doc_id, product_id, body, vector) VALUES (?, ?, ?, ?)",
                [(d.id, d.product_id, _dumps(d), _blob(v)) for d, v in zip(docs, vectors, strict=True)],
            )
        index = cls(folder, manifest, connection, _build_faiss(connection, manifest["dim"]))
        index.save()
        return index

    @classmethod
    def open(cls, folder: Path, expect: dict | None = None) -> VectorIndex:
        """Open an index; `expect` ({"backbone": ..., "adapter": ...}) must match what built it."""
        folder = Path(folder)
        if not (folder / MANIFEST).exists():
            raise FileNotFoundError(f"no index at {folder}; build one with `bsharedrag index`")
        manifest = json.loads((folder / MANIFEST).read_text())
        for key, wanted in (expect or {}).items():
            if manifest.get(key) != wanted:
                raise IndexMismatchError(
                    f"the index at {folder} was built with {key} {manifest.get(key)!r}, but {wanted!r} is loaded; "
                    f"rebuild it with `bsharedrag index` (or load the {key} it was built with)"
                )
        connection = _connect(folder / _STORE)
        generation = _generation(connection)
        snapshot = folder / _SNAPSHOT
        faiss_index = None
        if snapshot.exists() and manifest.get("generation") == generation:
            import faiss

            faiss_index = faiss.read_index(str(snapshot))
        stale = faiss_index is None or faiss_index.ntotal != len(connection.execute("SELECT 1 FROM docs").fetchall())
        if stale:
            faiss_index = _build_faiss(connection, manifest["dim"])
        index = cls(folder, manifest, connection, faiss_index)
        if stale:
            try:
                index.save()  # so that the next start loads the snapshot instead of rebuilding it again
            except OSError:
                pass  # a read-only folder still serves; it rebuilds at each start
        return index

    def save(self) -> None:
        """Write the FAISS snapshot and the manifest (the documents are already durable in SQLite)."""
        import faiss

        with self._lock:
            self.manifest["generation"] = _generation(self._db)
            self.manifest["count"] = len(self)
            with replacing(self.folder / _SNAPSHOT) as partial:
                faiss.write_index(self._faiss, str(partial))
            write_text_atomic(self.folder / MANIFEST, json.dumps(self.manifest, indent=2))

    # --- reading --------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self._faiss.ntotal)

    @property
    def generation(self) -> int:
        """Bumped by every committed upsert and delete: what derived views (BM25) check to stay in step."""
        with self._lock:
            return _generation(self._db)

    def get(self, doc_id: str) -> Document | None:
        with self._lock:
            row = self._db.execute("SELECT body FROM docs WHERE doc_id = ?", (doc_id,)).fetchone()
        return None if row is None else Document.from_json(json.loads(row[0]))

    def documents(self) -> list[Document]:
        with self._lock:
            rows = self._db.execute("SELECT body FROM docs ORDER BY rowid").fetchall()
        return [Document.from_json(json.loads(body)) for (body,) in rows]

    def search(self, vectors: np.ndarray, top_k: int, product_id: str | None = None) -> list[list[Hit]]:
        """For each query vector, the top_k documents by inner product, best first."""
        import faiss

        if top_k <= 0:
            raise ValueError(f"`top_k` must be a positive integer, got {top_k}")
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, self.manifest["dim"])
        with self._lock:
            params = None
            if product_id is not None:
                rows = self._db.execute("SELECT rowid FROM docs WHERE product_id = ?", (product_id,)).fetchall()
                if not rows:
                    return [[] for _ in range(len(vectors))]
                params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(np.array([r for (r,) in rows])))
            k = min(top_k, len(self))
            if k == 0:
                return [[] for _ in range(len(vectors))]
            scores, ids = self._faiss.search(vectors, k, params=params)
            wanted = {int(i) for i in ids.ravel() if i >= 0}
            marks = ",".join("?" * len(wanted))
            bodies = dict(self._db.execute(f"SELECT rowid, body FROM docs WHERE rowid IN ({marks})", list(wanted)))
        docs = {rowid: Document.from_json(json.loads(body)) for rowid, body in bodies.items()}
        return [
            [Hit(docs[int(i)], float(s)) for i, s in zip(row_ids, row_scores, strict=True) if i >= 0]
            for row_ids, row_scores in zip(ids, scores, strict=True)
        ]

    # --- updating -------------------------------------------------------------------------

    def upsert(self, docs: Sequence[Document], vectors: np.ndarray) -> None:
        """Insert or replace documents by id, atomically: all of the batch or none of it."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if len(docs) != len(vectors):
            raise ValueError(f"{len(docs)} documents but {len(vectors)} vectors")
        with self._lock:
            with self._db:  # one transaction
                old = self._rowids([d.id for d in docs])
                self._db.executemany("DELETE FROM docs WHERE doc_id = ?", [(d.id,) for d in docs])
                self._db.executemany(
                    "INSERT INTO docs (doc_id, product_id, body, vector) VALUES (?, ?, ?, ?)",
                    [(d.id, d.product_id, _dumps(d), _blob(v)) for d, v in zip(docs, vectors, strict=True)],
                )
                self._bump()
                new = self._rowids([d.id for d in docs])
            if old:
                self._faiss.remove_ids(np.array(list(old.values()), dtype=np.int64))
            self._faiss.add_with_ids(vectors, np.array([new[d.id] for d in docs], dtype=np.int64))

    def delete(self, doc_ids: Sequence[str]) -> int:
        """Remove documents by id; returns how many existed."""
        with self._lock:
            with self._db:
                old = self._rowids(list(doc_ids))
                self._db.executemany("DELETE FROM docs WHERE doc_id = ?", [(d,) for d in doc_ids])
                self._bump()
            if old:
                self._faiss.remove_ids(np.array(list(old.values()), dtype=np.int64))
        return len(old)

    def _rowids(self, doc_ids: list[str]) -> dict[str, int]:
        marks = ",".join("?" * len(doc_ids))
        return dict(self._db.execute(f"SELECT doc_id, rowid FROM docs WHERE doc_id IN ({marks})", doc_ids))

    def _bump(self) -> None:
        self._db.execute("UPDATE meta SET value = value + 1 WHERE key = 'generation'")


def build_index(encoder, docs: list[Document], folder: Path, manifest: dict, batch_tokens: int = 4096) -> dict:
    """Embed `docs` with `encoder` (anything with `embed_passages`) into a new index at `folder`; returns timings."""
    started = time.time()
    vectors = encoder.embed_passages(docs, batch_tokens, desc=f"index {len(docs)} passages")
    seconds = time.time() - started
    VectorIndex.create(folder, docs, vectors, manifest)
    return {"documents": len(docs), "embed_seconds": round(seconds, 1),
            "passages_per_second": round(len(docs) / max(seconds, 1e-9), 1)}


def _connect(path: Path) -> sqlite3.Connection:
    connection = sqlite3.connect(path, check_same_thread=False)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=FULL")
    with connection:
        connection.execute(
            "CREATE TABLE IF NOT EXISTS docs (rowid INTEGER PRIMARY KEY AUTOINCREMENT, doc_id TEXT UNIQUE NOT NULL,"
            " product_id TEXT, body TEXT NOT NULL, vector BLOB NOT NULL)"
        )
        connection.execute("CREATE INDEX IF NOT EXISTS docs_product ON docs (product_id)")
        connection.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER)")
        connection.execute("INSERT OR IGNORE INTO meta VALUES ('generation', 0)")
    return connection


def _generation(connection: sqlite3.Connection) -> int:
    return connection.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0]


def _build_faiss(connection: sqlite3.Connection, dim: int):
    import faiss

    index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    rows = connection.execute("SELECT rowid, vector FROM docs").fetchall()
    if rows:
        ids = np.array([r for r, _ in rows], dtype=np.int64)
        vectors = np.stack([np.frombuffer(blob, dtype=np.float32) for _, blob in rows])
        index.add_with_ids(vectors, ids)
    return index


def _dumps(doc: Document) -> str:
    return json.dumps(doc.to_json(), ensure_ascii=False)


def _blob(vector: np.ndarray) -> bytes:
    return np.asarray(vector, dtype=np.float32).tobytes()
