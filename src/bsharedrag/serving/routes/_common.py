"""Checks of the server's bounds and the mapping of engine errors to HTTP status codes."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

from fastapi import HTTPException, status

from ...config import ServeConfig
from ...model.vllm import VllmError
from ..engine import DocumentNotFound
from ..scheduler import QueueFull
from ..schemas import ErrorResponse

__all__ = [
    "ERRORS",
    "check_batch",
    "check_max_new_tokens",
    "check_question",
    "check_top_k",
    "engine_errors",
    "final_answer",
    "SSE_HEADERS",
    "sse",
    "sse_responses",
    "unprocessable",
]

# The error bodies every model route may answer with, for the OpenAPI page.
ERRORS = {code: {"model": ErrorResponse} for code in (401, 403, 404, 413, 422, 503)}


def unprocessable(message: str) -> HTTPException:
    return HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, message)


def check_question(question: str, serve: ServeConfig, field: str = "question") -> str:
    question = question.strip()
    if not question:
        raise unprocessable(f"`{field}` must hold some text, got {question!r}")
    if len(question) > serve.max_question_chars:
        raise unprocessable(
            f"`{field}` is {len(question)} characters long; the limit is {serve.max_question_chars} "
            f"(serve.max_question_chars)"
        )
    return question


def check_top_k(top_k: int | None, serve: ServeConfig) -> None:
    if top_k is not None and top_k > serve.max_top_k:
        raise unprocessable(f"`top_k` must be at most {serve.max_top_k} (serve.max_top_k), got {top_k}")


def check_max_new_tokens(max_new_tokens: int | None, serve: ServeConfig, field: str = "max_new_tokens") -> int:
    if max_new_tokens is None:
        return serve.max_new_tokens
    if max_new_tokens > serve.max_new_tokens:
        raise unprocessable(
            f"`{field}` must be at most {serve.max_new_tokens} (serve.max_new_tokens), got {max_new_tokens}"
        )
    return max_new_tokens


def check_batch(count: int, serve: ServeConfig, what: str) -> None:
    if count > serve.max_batch_documents:
        raise unprocessable(
            f"{count} {what} in one request; the limit is {serve.max_batch_documents} (serve.max_batch_documents)"
        )


@contextmanager
def engine_errors() -> Iterator[None]:
    """Map the engine's exceptions: bad input 422, unknown document 404, saturated or failed model 503."""
    try:
        yield
    except VllmError as error:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, f"the answer engine failed ({error}); retry shortly",
            headers={"Retry-After": "5"},
        ) from error
    except QueueFull as error:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, f"the model is busy ({error}); retry shortly",
            headers={"Retry-After": "1"},
        ) from error
    except DocumentNotFound as error:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(error)) from error
    except ValueError as error:
        raise unprocessable(str(error)) from error


def sse(data: dict | str, event: str | None = None) -> str:
    """One server-sent event; `data` is sent as JSON unless it is already a string."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return (f"event: {event}\n" if event else "") + f"data: {payload}\n\n"


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_responses(description: str) -> dict:
    """The OpenAPI `responses` of a route answering JSON, or server-sent events as `description` says."""
    return {200: {"description": description, "content": {"text/event-stream": {"schema": {"type": "string"}}}}}


async def final_answer(first, parts: AsyncIterator):
    """Drain an answer stream whose first part is `first`; its last part is the `Answer`."""
    answer = first
    try:
        with engine_errors():
            async for answer in parts:  # noqa: B007 - the last part is the Answer
                pass
    finally:
        await parts.aclose()
    return answer
