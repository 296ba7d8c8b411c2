"""OpenAI-compatible `/v1/embeddings`, `/v1/chat/completions` and `/v1/models`, so OpenAI clients work unchanged.

Embeddings use the retriever adapter and chat uses the generator adapter of the same backbone: one
process and one copy of the weights serve both. Chat answers the last user message from retrieved
passages (`retrieval: false` answers closed-book); earlier turns are not part of the prompt.
"""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import AsyncIterator

import numpy as np
from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse

from ...rag import Answer
from ..deps import EngineDep, ServeDep, require_reader
from ..engine import Engine
from ..openai_schemas import (
    ChatChoice,
    ChatChunk,
    ChatRequest,
    ChatResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    ModelCard,
    ModelList,
)
from ._common import (
    ERRORS,
    SSE_HEADERS,
    check_batch,
    check_max_new_tokens,
    check_question,
    check_top_k,
    engine_errors,
    final_answer,
    sse,
    sse_responses,
    unprocessable,
)

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(require_reader)], responses=ERRORS)

_SSE_DOC = sse_responses("JSON, or with `stream: true` `chat.completion.chunk` events ending with `data: [DONE]`.")


@router.get("/models", response_model=ModelList)
async def models(engine: EngineDep) -> ModelList:
    """The one model this server runs (any `model` value in a request is accepted)."""
    return ModelList(data=[ModelCard(id=engine.model_name, created=int(engine.started))])


@router.post("/embeddings", response_model=EmbeddingResponse)
async def embeddings(body: EmbeddingRequest, engine: EngineDep, serve: ServeDep) -> EmbeddingResponse:
    """Embed texts with the retriever adapter (L2-normalised; `input_type` picks query or passage prefix)."""
    texts = body.texts
    if not texts:
        raise unprocessable("`input` must hold at least one text")
    check_batch(len(texts), serve, "inputs")
    limit = serve.max_question_chars if body.input_type == "query" else serve.max_document_chars
    for number, text in enumerate(texts):
        if not text.strip():
            raise unprocessable(f"input[{number}] is empty; every input must hold some text")
        if len(text) > limit:
            raise unprocessable(f"input[{number}] is {len(text)} characters; the limit for {body.input_type} "
                                 f"inputs is {limit}")
    if body.dimensions is not None and body.dimensions != engine.dim:
        raise unprocessable(f"`dimensions` must be {engine.dim} (this model's size) or absent, got {body.dimensions}")
    with engine_errors():
        vectors = await engine.embed(texts, body.input_type)  # (len(texts), dim)
    data = [{"index": i, "embedding": _encode(vector, body.encoding_format)} for i, vector in enumerate(vectors)]
    tokens = sum(engine.count_tokens(text) for text in texts)
    return EmbeddingResponse(data=data, model=engine.model_name,
                             usage={"prompt_tokens": tokens, "total_tokens": tokens})


def _encode(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector.tolist()


@router.post("/chat/completions", response_model=ChatResponse, responses=_SSE_DOC)
async def chat_completions(body: ChatRequest, engine: EngineDep, serve: ServeDep):
    """Answer the last user message with the generator adapter, from retrieved passages unless `retrieval` is false."""
    question = check_question(body.question, serve, field="messages[-1].content (the last user message)")
    check_top_k(body.top_k, serve)
    wanted = body.max_completion_tokens or body.max_tokens
    field = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    max_new_tokens = check_max_new_tokens(wanted, serve, field=field)
    sampling = {"temperature": body.temperature or 0.0, "top_p": body.top_p or 1.0, "seed": body.seed}
    parts = engine.answer(question, body.top_k, body.product_id, max_new_tokens, endpoint="chat",
                          retrieval=body.retrieval, **sampling)
    with engine_errors():
        first = await anext(parts)
    reply = _Reply(engine, question, body.retrieval, max_new_tokens)
    if not body.stream:
        answer = await final_answer(first, parts)
        return reply.response(answer)
    usage = bool(body.stream_options and body.stream_options.include_usage)
    return StreamingResponse(reply.events(first, parts, usage), media_type="text/event-stream",
                             headers=SSE_HEADERS)


class _Reply:
    """Builds one completion's JSON body or its stream of chunks."""

    def __init__(self, engine: Engine, question: str, retrieval: bool, max_new_tokens: int):
        self.engine, self.question, self.retrieval, self.max_new_tokens = engine, question, retrieval, max_new_tokens
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _usage_and_finish(self, answer: Answer) -> tuple[dict, str]:
        completion = self.engine.count_tokens(answer.text)
        prompt = self.engine.prompt_tokens(self.question, answer, self.retrieval)
        usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        # Re-tokenised text can differ from the generated ids by a token; at the cap, the answer was cut.
        return usage, "length" if completion >= self.max_new_tokens else "stop"

    def _citations(self, answer: Answer) -> list[dict]:
        return [{"number": c.number, "doc_id": c.doc_id, "title": c.title} for c in answer.citations]

    def response(self, answer: Answer) -> ChatResponse:
        usage, finish = self._usage_and_finish(answer)
        choice = ChatChoice(message={"content": answer.text}, finish_reason=finish)
        return ChatResponse(id=self.id, created=self.created, model=self.engine.model_name, choices=[choice],
                            usage=usage, citations=self._citations(answer))

    def _chunk(self, delta: dict, finish: str | None = None, **extra) -> str:
        choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
        chunk = ChatChunk(id=self.id, created=self.created, model=self.engine.model_name, choices=choices, **extra)
        return sse(chunk.model_dump(mode="json", exclude_none=True) | ({"choices": choices}))

    async def events(self, first, parts: AsyncIterator, include_usage: bool) -> AsyncIterator[str]:
        try:
            yield self._chunk({"role": "assistant", "content": ""})
            part = first
            while not isinstance(part, Answer):
                if isinstance(part, str):  # the passages come with the last chunk, as citations
                    yield self._chunk({"content": part})
                part = await anext(parts)
            usage, finish = self._usage_and_finish(part)
            yield self._chunk({}, finish, citations=self._citations(part))
            if include_usage:
                yield self._chunk(None, usage=usage)
            yield sse("[DONE]")
        except Exception as error:  # noqa: BLE001 - the status line is sent already; report in-band
            yield sse({"error": {"message": f"generation failed: {error}", "type": "server_error"}})
        finally:
            await parts.aclose()
