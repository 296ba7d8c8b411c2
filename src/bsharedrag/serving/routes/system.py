"""`GET /healthz`, `GET /metrics` (Prometheus) and the web assistant at `GET /`."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response

from ..deps import EngineDep
from ..metrics import CONTENT_TYPE_LATEST
from ..schemas import HealthResponse

WEB = Path(__file__).resolve().parents[2] / "web"

router = APIRouter(tags=["system"])


@router.get("/healthz", response_model=HealthResponse)
async def healthz(engine: EngineDep) -> HealthResponse:
    """Liveness and a summary: documents indexed, adapters loaded, model jobs queued."""
    return HealthResponse(
        status="ok",
        documents=len(engine.index),
        adapters=engine.rag.backbone.adapters,
        generator=engine.rag.adapter is not None,
        queue_depth=engine.scheduler.depth,
    )


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics(request: Request) -> Response:
    """Prometheus metrics: request counts and latency, queue depth and wait, tokens generated."""
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/favicon.ico", response_class=FileResponse, include_in_schema=False)
async def favicon() -> FileResponse:
    return FileResponse(WEB / "favicon.svg", media_type="image/svg+xml")


@router.get("/", response_class=FileResponse, include_in_schema=False)
async def index_page() -> FileResponse:
    """The product-QA web assistant (plain HTML and JavaScript)."""
    return FileResponse(WEB / "index.html")
