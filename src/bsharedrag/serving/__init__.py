"""The HTTP service: one backbone behind a FastAPI app, an OpenAI-compatible API and a web assistant.

    from bsharedrag.serving import create_app
    app = create_app(load_rag(config), config)

See docs/serving.md for the endpoints, the scheduling of model work and the operations.
"""

from __future__ import annotations

from .app import create_app, serve
from .catalogue import (
    ServingLockError,
    delete_documents,
    read_document_ids,
    read_documents,
    serving_lock,
    upsert_documents,
)
from .scheduler import QueueFull, Scheduler

__all__ = [
    "QueueFull",
    "Scheduler",
    "ServingLockError",
    "create_app",
    "delete_documents",
    "read_document_ids",
    "read_documents",
    "serve",
    "serving_lock",
    "upsert_documents",
]
