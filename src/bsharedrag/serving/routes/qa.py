"""`POST /v1/search` and `POST /v1/ask` (JSON, or server-sent events when `stream` is true)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse

from ...rag import Answer, Retrieved
from ..deps import EngineDep, ServeDep, require_reader
from ..schemas import AskRequest, AskResponse, PassageOut, SearchRequest, SearchResponse
from ._common import (
    ERRORS,
    SSE_HEADERS,
    check_max_new_tokens,
    check_question,
    check_top_k,
    engine_errors,
    final_answer,
    sse,
    sse_responses,
)

router = APIRouter(prefix="/v1", tags=["qa"], dependencies=[Depends(require_reader)], responses=ERRORS)

_SSE_DOC = sse_responses(
    "JSON, or with `stream: true` server-sent events: first one `passages` event `{\"passages\"}` (the "
    "numbered passages, before any text), then `token` events `{\"text\"}`, "
    "then one `answer` event holding the AskResponse (or one `error` event `{\"detail\"}`)."
)


@router.post("/search", response_model=SearchResponse)
async def search(body: SearchRequest, engine: EngineDep, serve: ServeDep) -> SearchResponse:
    """The passages that best match a question, best first, optionally from one product only."""
    question = check_question(body.question, serve)
    check_top_k(body.top_k, serve)
    with engine_errors():
        hits = await engine.search(question, body.top_k or engine.rag.settings.top_k, body.product_id)
    return SearchResponse(passages=[PassageOut.of_hit(hit) for hit in hits])


@router.post("/ask", response_model=AskResponse, responses=_SSE_DOC)
async def ask(body: AskRequest, engine: EngineDep, serve: ServeDep):
    """Answer a question from retrieved passages, with citations; streamed as server-sent events on request."""
    question = check_question(body.question, serve)
    check_top_k(body.top_k, serve)
    max_new_tokens = check_max_new_tokens(body.max_new_tokens, serve)
    parts = engine.answer(question, body.top_k, body.product_id, max_new_tokens, endpoint="ask")
    with engine_errors():
        first = await anext(parts)  # a full queue or a bad request fails here, before any byte is sent
    if not body.stream:
        answer = await final_answer(first, parts)
        return AskResponse.of(answer)
    return StreamingResponse(_events(first, parts), media_type="text/event-stream",
                             headers=SSE_HEADERS)


async def _events(first: str | Answer, parts: AsyncIterator[str | Answer]) -> AsyncIterator[str]:
    try:
        part = first
        while True:
            if isinstance(part, Answer):
                yield sse(AskResponse.of(part).model_dump_json(by_alias=True), event="answer")
            elif isinstance(part, Retrieved):
                passages = [PassageOut.of_hit(hit).model_dump(mode="json", by_alias=True) for hit in part.passages]
                yield sse({"passages": passages}, event="passages")
            else:
                yield sse({"text": part}, event="token")
            part = await anext(parts)
    except StopAsyncIteration:
        pass
    except Exception as error:  # noqa: BLE001 - the status line is sent already; report in-band
        yield sse({"detail": f"generation failed: {error}"}, event="error")
    finally:
        await parts.aclose()
