"""Request and response bodies of the native API (`/v1/search`, `/v1/ask`, `/v1/documents`).

Requests refuse unknown fields, so a typo is a 422 instead of a silently ignored setting. Documents
use the corpus.jsonl field names (`_id`, `title`, `text`, `product_id`, any extra fields), so a
document read back with GET can be sent to PUT unchanged. Limits that come from the server's
settings (question length, top_k, batch size) are checked by the routes, with the limit in the message.
The OpenAI-compatible bodies are in `openai_schemas.py`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from ..data import Document

if TYPE_CHECKING:
    from ..index import Hit
    from ..rag import Answer

__all__ = [
    "AskRequest",
    "AskResponse",
    "CitationOut",
    "DeleteResponse",
    "DocumentIn",
    "DocumentOut",
    "ErrorResponse",
    "HealthResponse",
    "PassageOut",
    "SearchRequest",
    "SearchResponse",
    "UpsertRequest",
    "UpsertResponse",
]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorResponse(BaseModel):
    detail: str = Field(description="What was wrong and how to fix it.")


class SearchRequest(_Request):
    question: str = Field(min_length=1, description="The customer's question.", examples=["Does it fit a 2012 Civic?"])
    top_k: int | None = Field(None, ge=1, description="Passages to return (default: the generator's top_k).")
    product_id: str | None = Field(None, description="Only passages of this product.")


class AskRequest(SearchRequest):
    stream: bool = Field(False, description="Send server-sent events: `token` chunks, then one `answer`.")
    max_new_tokens: int | None = Field(None, ge=1, description="Longest answer in tokens (default and cap: the server's).")


class DocumentIn(BaseModel):
    """One corpus.jsonl row; fields beyond these are kept with the document."""

    model_config = ConfigDict(extra="allow")

    id: str | int = Field(alias="_id", description="Unique document id; an existing id is replaced.")
    title: str = ""
    text: str
    product_id: str | int | None = None

    def to_document(self) -> Document:
        return Document.from_json(self.model_dump(by_alias=True))


class DocumentOut(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str = Field(alias="_id")
    title: str
    text: str
    product_id: str | None = None

    @classmethod
    def of(cls, doc: Document) -> DocumentOut:
        return cls.model_validate(doc.to_json())


class PassageOut(DocumentOut):
    score: float = Field(description="Inner product of the question and passage embeddings.")

    @classmethod
    def of_hit(cls, hit: Hit) -> PassageOut:
        return cls.model_validate({**hit.doc.to_json(), "score": hit.score})


class SearchResponse(BaseModel):
    passages: list[PassageOut] = Field(description="Best first.")


class CitationOut(BaseModel):
    number: int = Field(description="The [n] marker in the answer.")
    doc_id: str
    title: str


class AskResponse(BaseModel):
    answer: str
    citations: list[CitationOut]
    passages: list[PassageOut] = Field(description="The passages the prompt held, numbered from 1.")

    @classmethod
    def of(cls, answer: Answer) -> AskResponse:
        return cls(
            answer=answer.text,
            citations=[CitationOut(number=c.number, doc_id=c.doc_id, title=c.title) for c in answer.citations],
            passages=[PassageOut.of_hit(hit) for hit in answer.passages],
        )


class UpsertRequest(_Request):
    documents: list[DocumentIn] = Field(min_length=1, description="Documents to insert or replace, all or none.")


class UpsertResponse(BaseModel):
    upserted: int
    ids: list[str]
    documents: int = Field(description="Documents in the index after the update.")


class DeleteResponse(BaseModel):
    deleted: str
    documents: int = Field(description="Documents in the index after the update.")


class HealthResponse(BaseModel):
    status: str
    documents: int
    adapters: list[str]
    generator: bool = Field(description="Whether /v1/ask and /v1/chat/completions can answer.")
    queue_depth: int
