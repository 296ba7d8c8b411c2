"""The API routers: native QA, catalogue documents, OpenAI-compatible endpoints, and system routes."""

from . import documents, openai, qa, system

__all__ = ["documents", "openai", "qa", "system"]
