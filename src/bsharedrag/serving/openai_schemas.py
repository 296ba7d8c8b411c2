"""The OpenAI wire format for `/v1/embeddings`, `/v1/chat/completions` and `/v1/models`.

Unknown request fields are ignored, as OpenAI clients send optional fields freely; the fields that are
read are checked as the native API's are (`CheckedBody`: valid Unicode, finite numbers, strict types). Extensions are
optional fields an OpenAI client never sends: `input_type` for embeddings, and `retrieval`, `top_k`,
`product_id` for chat; responses add `citations`, which OpenAI clients ignore.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from .schemas import CheckedBody, Identifier

__all__ = [
    "ChatChoice",
    "ChatChunk",
    "ChatMessage",
    "ChatRequest",
    "ChatResponse",
    "EmbeddingRequest",
    "EmbeddingResponse",
    "ModelCard",
    "ModelList",
]


class EmbeddingRequest(CheckedBody):
    input: str | list[str] = Field(description="A text or a list of texts (token-id input is not supported).")
    model: str | None = Field(None, description="Accepted for compatibility; the run's retriever is always used.")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="`base64`: little-endian float32 bytes, what the OpenAI Python client asks for."
    )
    dimensions: int | None = Field(None, ge=1, description="Must equal the model's dimension when given.")
    user: str | None = None
    input_type: Literal["query", "passage"] = Field(
        "query", description="Extension: embed as a search query (default) or as a catalogue passage."
    )

    @property
    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int
    completion_tokens: int | None = None


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class TextPart(CheckedBody):
    type: Literal["text"]
    text: str


class ChatMessage(CheckedBody):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(CheckedBody):
    include_usage: bool = False


class ChatRequest(CheckedBody):
    messages: list[ChatMessage] = Field(min_length=1, description="The last user message is the question.")
    model: str | None = Field(None, description="Accepted for compatibility; the run's generator is always used.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="Wins over max_tokens when both are given.")
    temperature: float | None = Field(None, ge=0, le=2, description="0 or absent: greedy decoding.")
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    n: int | None = Field(None, ge=1, le=1, description="Only one choice is generated.")
    user: str | None = None
    retrieval: bool = Field(True, description="Extension: answer from retrieved passages (False: closed book).")
    top_k: int | None = Field(None, ge=1, description="Extension: passages retrieved.")
    product_id: Identifier | None = Field(None, description="Extension: only this product's passages.")

    @property
    def question(self) -> str:
        users = [m.text for m in self.messages if m.role == "user"]
        return users[-1].strip() if users else ""


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCitation(BaseModel):
    number: int
    doc_id: str
    title: str


class ChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    citations: list[ChatCitation] = Field(default_factory=list, description="Extension: the passages cited.")


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    citations: list[ChatCitation] | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "bsharedrag"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
