"""Catalogue updates without a rebuild: `PUT /v1/documents`, `GET` and `DELETE /v1/documents/{id}`."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from ...config import ServeConfig
from ...data import Document
from ..deps import EngineDep, ServeDep, require_reader, require_writer
from ..schemas import DeleteResponse, DocumentOut, UpsertRequest, UpsertResponse
from ._common import ERRORS, check_batch, engine_errors, unprocessable

router = APIRouter(prefix="/v1/documents", tags=["documents"], responses=ERRORS)


def _documents(body: UpsertRequest, serve: ServeConfig) -> list[Document]:
    check_batch(len(body.documents), serve, "documents")
    docs, seen = [], set()
    for number, row in enumerate(body.documents):
        problem = None
        try:
            doc = row.to_document()
        except ValueError as error:
            problem = str(error)
        else:
            if row.size > serve.max_document_chars:
                problem = f"the document holds {row.size} characters (text, title and other fields together); " \
                          f"the limit is {serve.max_document_chars} (serve.max_document_chars)"
            elif doc.id in seen:
                problem = f"id {doc.id!r} appears twice in the batch"
            seen.add(doc.id)
        if problem:
            raise unprocessable(f"documents[{number}]: {problem}")
        docs.append(doc)
    return docs


@router.put("", response_model=UpsertResponse, dependencies=[Depends(require_writer)])
async def upsert(body: UpsertRequest, engine: EngineDep, serve: ServeDep) -> UpsertResponse:
    """Insert or replace a batch of documents: embedded, then stored in one transaction (all or none)."""
    docs = _documents(body, serve)
    with engine_errors():
        count = await engine.upsert(docs)
    return UpsertResponse(upserted=count, ids=[doc.id for doc in docs], documents=len(engine.index))


@router.get("/{doc_id:path}", response_model=DocumentOut, dependencies=[Depends(require_reader)])
async def get_document(doc_id: str, engine: EngineDep) -> DocumentOut:
    """One document by id, in the corpus.jsonl fields (ready to send back to PUT)."""
    with engine_errors():
        return DocumentOut.of(await engine.get(doc_id))


@router.delete("/{doc_id:path}", response_model=DeleteResponse, dependencies=[Depends(require_writer)])
async def delete_document(doc_id: str, engine: EngineDep) -> DeleteResponse:
    """Remove a document by id (durable once answered)."""
    with engine_errors():
        await engine.delete(doc_id)
    return DeleteResponse(deleted=doc_id, documents=len(engine.index))
