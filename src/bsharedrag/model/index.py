"""The vector index: a FAISS inner-product index over a SQLite document store, with a manifest.

SQLite is the source of truth: each row holds a document and its embedding, so an upsert or a
delete is one transaction (durable once committed, invisible if interrupted). `vectors.faiss`
is a snapshot for fast loading; it is trusted only when its generation matches the store's,
otherwise it is rebuilt from SQLite. The manifest records the backbone, the adapter and the
corpus hash the vectors were built with; opening with a different model is refused.

The FAISS side is one of three kinds (`faiss_index`, recorded under `faiss` in the manifest):
`flat` (exact), `ivf` (inverted lists: `ivf_probe` of `ivf_lists` searched; upserts are assigned
to the lists trained at build time, so rebuild after the catalogue has changed a lot) and `hnsw`
(a graph). Neither removes vectors under an ID map (HNSW cannot remove at all; faiss's
`IndexIDMap2` removes only from an index that keeps insertion order, and asserts on IVF), so in
both a deleted or replaced document's vector stays as a tombstone that searches skip, until the
index is rebuilt from the store: at open, once tombstones pass a quarter of it. A search within
one product is exact whatever the kind: it scores that product's vectors from the store, where an
approximate index filtered down to a few documents would miss.
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

from .. import distributed
from ..data import Document
from ..files import replacing, write_text_atomic

__all__ = ["FAISS_KINDS", "Hit", "IndexMismatchError", "VectorIndex", "build_index", "faiss_index"]

MANIFEST = "index.json"
_STORE = "docs.sqlite"
_SNAPSHOT = "vectors.faiss"
FAISS_KINDS = ("flat", "ivf", "hnsw")
_COMPACT_AT = 0.25  # share of tombstones in an approximate index at which opening rebuilds it


class IndexMismatchError(RuntimeError):
    """The index was built with another backbone or adapter than the one asked for."""


@dataclass(frozen=True)
class Hit:
    doc: Document
    score: float


class VectorIndex:
    """Documents and their L2-normalised embeddings, searchable by inner product, updatable by id."""

    def __init__(self, folder: Path, manifest: dict, connection: sqlite3.Connection, faiss_index,
                 tombstones: set[int] = frozenset()):
        self.folder = Path(folder)
        self.manifest = manifest
        self._db = connection
        self._faiss = faiss_index
        self._tombstones = set(tombstones)  # FAISS ids of removed vectors still in an approximate index
        self.spec = _spec(manifest.get("faiss"))  # the FAISS kind and all its parameters
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
        index = cls(folder, manifest, connection, _build_faiss(connection, manifest["dim"], manifest.get("faiss")))
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
        faiss_index, tombstones = None, set()
        if snapshot.exists() and manifest.get("generation") == generation:
            import faiss

            faiss_index = faiss.read_index(str(snapshot))
            live = {rowid for (rowid,) in connection.execute("SELECT rowid FROM docs")}
            held = set(faiss.vector_to_array(faiss_index.id_map).tolist())
            tombstones = held - live
            exact = _spec(manifest.get("faiss"))["kind"] == "flat"
            if live - held or (tombstones and exact) or len(tombstones) > _COMPACT_AT * max(len(held), 1):
                faiss_index = None  # out of step with the store, or an approximate index full of removed vectors
        stale = faiss_index is None
        if stale:
            faiss_index, tombstones = _build_faiss(connection, manifest["dim"], manifest.get("faiss")), set()
        index = cls(folder, manifest, connection, faiss_index, tombstones)
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
        return int(self._faiss.ntotal) - len(self._tombstones)

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
        if top_k <= 0:
            raise ValueError(f"`top_k` must be a positive integer, got {top_k}")
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, self.manifest["dim"])
        with self._lock:
            if product_id is not None:
                return self._search_product(vectors, top_k, product_id)
            k = min(top_k, len(self))
            if k == 0:
                return [[] for _ in range(len(vectors))]
            scores, ids = self._faiss_search(vectors, k)
            wanted = {int(i) for i in ids.ravel() if i >= 0}
            marks = ",".join("?" * len(wanted))
            bodies = dict(self._db.execute(f"SELECT rowid, body FROM docs WHERE rowid IN ({marks})", list(wanted)))
        docs = {rowid: Document.from_json(json.loads(body)) for rowid, body in bodies.items()}
        return [
            [Hit(docs[int(i)], float(s)) for i, s in zip(row_ids, row_scores, strict=True) if i >= 0 and int(i) in docs]
            for row_ids, row_scores in zip(ids, scores, strict=True)
        ]

    def _faiss_search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        spec = self.spec
        kind = spec["kind"]
        params = (faiss.SearchParametersIVF() if kind == "ivf" else faiss.SearchParametersHNSW() if kind == "hnsw"
                  else faiss.SearchParameters())
        if kind == "ivf":
            params.nprobe = spec["ivf_probe"]
        if kind == "hnsw":
            params.efSearch = max(spec["hnsw_ef_search"], k)
        if self._tombstones:  # the selectors must outlive the search
            removed = faiss.IDSelectorBatch(np.fromiter(self._tombstones, dtype=np.int64))
            kept = faiss.IDSelectorNot(removed)
            params.sel = kept
        return self._faiss.search(vectors, k, params=params)

    def _search_product(self, vectors: np.ndarray, top_k: int, product_id: str) -> list[list[Hit]]:
        """Exact search over one product's documents, scored from the vectors in the store."""
        rows = self._db.execute("SELECT body, vector FROM docs WHERE product_id = ? ORDER BY rowid",
                                (product_id,)).fetchall()
        if not rows:
            return [[] for _ in range(len(vectors))]
        docs = [Document.from_json(json.loads(body)) for body, _ in rows]
        scores = vectors @ np.stack([np.frombuffer(blob, dtype=np.float32) for _, blob in rows]).T  # (queries, docs)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :top_k]
        return [[Hit(docs[j], float(row_scores[j])) for j in row] for row, row_scores in zip(order, scores, strict=True)]

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
            self._remove(old.values())
            self._faiss.add_with_ids(vectors, np.array([new[d.id] for d in docs], dtype=np.int64))

    def delete(self, doc_ids: Sequence[str]) -> int:
        """Remove documents by id; returns how many existed."""
        with self._lock:
            with self._db:
                old = self._rowids(list(doc_ids))
                self._db.executemany("DELETE FROM docs WHERE doc_id = ?", [(d,) for d in doc_ids])
                self._bump()
            self._remove(old.values())
        return len(old)

    def _remove(self, faiss_ids) -> None:
        ids = np.array(list(faiss_ids), dtype=np.int64)
        if not len(ids):
            return
        if self.spec["kind"] != "flat":  # see the module docstring: searches skip them until a rebuild
            self._tombstones.update(ids.tolist())
        else:
            self._faiss.remove_ids(ids)

    def _rowids(self, doc_ids: list[str]) -> dict[str, int]:
        marks = ",".join("?" * len(doc_ids))
        return dict(self._db.execute(f"SELECT doc_id, rowid FROM docs WHERE doc_id IN ({marks})", doc_ids))

    def _bump(self) -> None:
        self._db.execute("UPDATE meta SET value = value + 1 WHERE key = 'generation'")


def build_index(encoder, docs: list[Document], folder: Path, manifest: dict, batch_tokens: int = 4096) -> dict:
    """Embed `docs` with `encoder` (anything with `embed_passages`) into a new index at `folder`; returns timings.

    Over several processes in lockstep (`distributed.lockstep`), each embeds its contiguous share of
    `docs` and the main process writes the index from all of them.
    """
    started = time.time()
    start, end = distributed.lockstep_share(len(docs))
    vectors = encoder.embed_passages(docs[start:end], batch_tokens, desc=f"index {end - start} passages")
    vectors = distributed.gather_array(vectors)  # (len(docs), dim) in document order
    seconds = time.time() - started
    if distributed.is_main():
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


def _build_faiss(connection: sqlite3.Connection, dim: int, spec: dict | None):
    rows = connection.execute("SELECT rowid, vector FROM docs").fetchall()
    ids = np.array([r for r, _ in rows], dtype=np.int64)
    vectors = np.stack([np.frombuffer(blob, dtype=np.float32) for _, blob in rows]) if rows else np.zeros((0, dim), "float32")
    return faiss_index(spec, vectors, ids)


def _spec(recorded: dict | None) -> dict:
    """A recorded FAISS spec with `IndexConfig`'s defaults for the parameters it leaves out (`flat` for
    indexes built before there was a choice)."""
    from ..config import IndexConfig

    recorded = recorded or {"kind": "flat"}
    kind = recorded["kind"]
    if kind not in FAISS_KINDS:
        raise ValueError(f"unknown index kind {kind!r}; known: {', '.join(FAISS_KINDS)}")
    return {**IndexConfig(kind=kind).faiss_spec(), **recorded}


def faiss_index(spec: dict | None, vectors: np.ndarray, ids: np.ndarray, seed: int = 0):
    """A FAISS inner-product index of kind `spec["kind"]` (see the module docstring) holding `vectors` under `ids`.

    `ivf` trains its `ivf_lists` centroids (default 4 * sqrt(n)) on up to 64 vectors per list; with no
    vectors to train on it starts flat (exact) and stays so until rebuilt.
    """
    import faiss

    spec = _spec(spec)
    kind, dim = spec["kind"], vectors.shape[1]
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if kind == "hnsw":
        inner = faiss.IndexHNSWFlat(dim, spec["hnsw_neighbors"], faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = spec.get("hnsw_ef_construction", 80)
    elif kind == "ivf" and len(vectors):
        lists = max(1, min(spec["ivf_lists"] or int(4 * len(vectors) ** 0.5), len(vectors)))
        quantizer = faiss.IndexFlatIP(dim)
        inner = faiss.IndexIVFFlat(quantizer, dim, lists, faiss.METRIC_INNER_PRODUCT)
        inner.own_fields = True  # the IVF index frees its quantizer; Python's wrapper must not free it first
        quantizer.this.disown()
        sample = np.random.default_rng(seed).permutation(len(vectors))[: 64 * lists]
        inner.train(vectors[np.sort(sample)])
    else:
        inner = faiss.IndexFlatIP(dim)
    index = faiss.IndexIDMap2(inner)
    if len(vectors):
        index.add_with_ids(vectors, np.asarray(ids, dtype=np.int64))
    return index


def _dumps(doc: Document) -> str:
    return json.dumps(doc.to_json(), ensure_ascii=False)


def _blob(vector: np.ndarray) -> bytes:
    return np.asarray(vector, dtype=np.float32).tobytes()
