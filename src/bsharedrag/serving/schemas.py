"""Request and response bodies of the native API (`/v1/search`, `/v1/ask`, `/v1/documents`).

Requests refuse unknown fields, so a typo is a 422 instead of a silently ignored setting. Every request
body is checked before anything runs on it (`CheckedBody`): text that UTF-8 cannot encode (a lone
surrogate, which JSON's `\udfff` escape can carry), `NaN` and infinities are refused, and types are
strict (`"5"` is not an integer, `"yes"` is not a boolean, `true` is not an id). Documents
use the corpus.jsonl field names (`_id`, `title`, `text`, `product_id`, any extra fields), so a
document read back with GET can be sent to PUT unchanged. Limits that come from the server's
settings (question length, top_k, batch size) are checked by the routes, with the limit in the message.
The OpenAI-compatible bodies are in `openai_schemas.py`.
"""

from __future__ import annotations

import json
import math
import unicodedata
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictStr, model_validator

from ..data import Document

if TYPE_CHECKING:
    from ..model.index import Hit
    from ..rag import Answer

__all__ = [
    "MAX_ID_CHARS",
    "AskRequest",
    "CheckedBody",
    "Identifier",
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
    "check_identifier",
]


MAX_ID_CHARS = 256


def unencodable_text(value: Any, where: str = "body") -> str | None:
    """Where in a parsed JSON value a string (or key) UTF-8 cannot encode, or a non-finite number, sits."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as error:
            return f"{where} holds a character that is not valid Unicode (a lone surrogate) at position {error.start}"
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"{where} is not a finite number (NaN, Infinity and overflowing literals are refused)"
    if isinstance(value, dict):
        for key, item in value.items():
            if problem := unencodable_text(key, f"a key of {where}") or unencodable_text(item, f"{where}.{key}"):
                return problem
    if isinstance(value, list):
        for number, item in enumerate(value):
            if problem := unencodable_text(item, f"{where}[{number}]"):
                return problem
    return None


class CheckedBody(BaseModel):
    """A request body: valid Unicode and finite numbers only, strict types; unknown fields are subclasses' call."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _encodable(cls, data: Any) -> Any:
        if problem := unencodable_text(data):
            raise ValueError(problem)
        return data


def check_identifier(value: str) -> str:
    """`value` if it can serve as a document or product id; ValueError saying why not."""
    if not value:
        raise ValueError("an id must not be empty")
    if len(value) > MAX_ID_CHARS:
        raise ValueError(f"an id is at most {MAX_ID_CHARS} characters, got {len(value)}")
    for position, char in enumerate(value):
        if unicodedata.category(char) in ("Cc", "Zl", "Zp"):
            raise ValueError(f"an id must not hold control characters or line breaks (U+{ord(char):04X} at "
                             f"position {position}): it could never be addressed in a URL or on a command line")
    return value


# Document and product ids: what can be stored can be read and deleted again over HTTP and the CLI.
Identifier = Annotated[StrictStr, AfterValidator(check_identifier)]


class _Request(CheckedBody):
    model_config = ConfigDict(extra="forbid")


class ErrorResponse(BaseModel):
    detail: str = Field(description="What was wrong and how to fix it.")


class SearchRequest(_Request):
    question: str = Field(min_length=1, description="The customer's question.", examples=["Does it fit a 2012 Civic?"])
    top_k: int | None = Field(None, ge=1, description="Passages to return (default: the generator's top_k).")
    product_id: Identifier | None = Field(None, description="Only passages of this product.")


class AskRequest(SearchRequest):
    stream: bool = Field(False, description="Send server-sent events: `token` chunks, then one `answer`.")
    max_new_tokens: int | None = Field(None, ge=1, description="Longest answer in tokens (default and cap: the server's).")


class DocumentIn(CheckedBody):
    """One corpus.jsonl row; fields beyond these are kept with the document."""

    model_config = ConfigDict(extra="allow")

    id: Identifier = Field(alias="_id", description="Unique document id (a string); an existing id is replaced.")
    title: StrictStr = ""
    text: StrictStr
    product_id: Identifier | None = None

    def to_document(self) -> Document:
        return Document.from_json(self.model_dump(by_alias=True))

    @property
    def size(self) -> int:
        """Characters the document stores: text, title, product id and every extra field (as JSON)."""
        extra = json.dumps(self.model_extra, ensure_ascii=False) if self.model_extra else ""
        return len(self.text) + len(self.title) + len(self.product_id or "") + len(extra)


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
