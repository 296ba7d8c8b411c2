"""`create_app(rag, config)`: the FastAPI app serving one loaded RAG (one backbone, two adapters).

    rag = load_rag(config)
    uvicorn.run(create_app(rag, config), host=config.serve.host, port=config.serve.port)

The model is loaded once, before the app exists, and reaches the routes as a dependency
(`deps.get_engine`). Start-up takes the index's serving lock and starts the model's worker thread;
shutdown finishes the admitted jobs and writes the FAISS snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

from .. import __version__
from .catalogue import serving_lock
from .deps import KEY_ENV, api_key
from .engine import Engine
from .metrics import Metrics, MetricsMiddleware
from .routes import documents, openai, qa, system
from .scheduler import Scheduler

if TYPE_CHECKING:
    from ..config import Config
    from ..rag import RAG
    from ..run import Run

__all__ = ["create_app", "serve"]

log = logging.getLogger(__name__)

_DESCRIPTION = """Backbone-shared RAG: one causal LM serves search and embeddings (retriever adapter) and
answers (generator adapter). Write endpoints need `Authorization: Bearer KEY`."""


def create_app(rag: RAG, config: Config) -> FastAPI:
    """The app for `rag`; raises ValueError on settings it cannot serve with."""
    key = api_key(config)
    if not config.serve.open_reads and key is None:
        raise ValueError(
            f"serve.open_reads is false but no API key is configured, so nobody could read; "
            f"set {KEY_ENV} or serve.api_key, or set serve.open_reads=true"
        )
    if rag.retriever is None:
        raise ValueError("the server needs a RAG with a retriever (a run folder with an index)")
    metrics = Metrics()
    budget = int(config.serve.kv_cache_mib * 2**20)
    scheduler = Scheduler(config.serve.queue_size, config.serve.max_search_batch, metrics, memory_budget=budget)
    engine = Engine(rag, config, scheduler, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        with serving_lock(engine.index.folder):
            scheduler.start()
            snapshots = asyncio.create_task(engine.snapshot_every(config.serve.snapshot_every_s))
            try:
                yield
            finally:
                snapshots.cancel()
                await asyncio.to_thread(scheduler.stop)
                await asyncio.to_thread(engine.snapshot)

    app = FastAPI(title="bsharedrag", version=__version__, description=_DESCRIPTION, lifespan=lifespan)
    app.state.config = config
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.api_key = key
    app.add_exception_handler(RequestValidationError, validation_error)
    for module in (qa, openai, documents, system):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=system.WEB), name="static")
    app.add_middleware(BodyLimit, max_bytes=config.serve.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # added last: outermost, so it also counts 413s
    return app


def serve(run: Run | Config, host: str | None = None, port: int | None = None) -> None:
    """Load a finished run (a `Run`, or the config of one) and serve it until interrupted.

    With `serve.engine` vllm, answers come from a vLLM server (`vllm.url`, or one started here for the
    run and stopped with it); searches and embeddings stay on the run's backbone.
    """
    import uvicorn

    from ..rag import load_rag
    from ..run import Run

    run = run if isinstance(run, Run) else Run(run)
    with serving_lock(run.index_folder):
        pass  # fail fast, before the model loads, if another process serves or updates this index
    with run.vllm() if run.config.serve.engine == "vllm" else contextlib.nullcontext() as remote:
        app = create_app(load_rag(run, remote=remote), run.config)
        uvicorn.run(app, host=host or run.config.serve.host, port=port or run.config.serve.port, log_level="info")


def _printable(value) -> str | int:
    """`value` for an error body: integers as they are, text with anything UTF-8 cannot encode escaped."""
    if isinstance(value, int):
        return value
    return str(value).encode("utf-8", "backslashreplace").decode("utf-8")


async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    """422 with where and what for each problem, never the input itself.

    FastAPI's own handler echoes each rejected input, which fails to serialise exactly for the inputs
    worth refusing (NaN, a lone surrogate) and turns a 422 into a 500.
    """
    detail = [{"loc": [_printable(part) for part in problem.get("loc", ())], "msg": _printable(problem.get("msg", "")),
               "type": _printable(problem.get("type", ""))} for problem in error.errors()]
    return JSONResponse(status_code=422, content={"detail": detail})


class BodyLimit:
    """Refuse request bodies over `max_bytes` with 413, whether Content-Length is sent or not.

    The body is read here (at most `max_bytes` + 1 bytes) and replayed to the app, so an oversized
    body never reaches JSON parsing.
    """

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._refuse(send)
                return
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # afterwards: wait for the client's disconnect, as Starlette expects

        await self.app(scope, replay, send)

    async def _refuse(self, send) -> None:
        detail = f"the request body is larger than {self.max_bytes} bytes, the limit (serve.max_body_bytes)"
        payload = json.dumps({"detail": detail}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})
