"""FastAPI dependencies: the engine loaded at start-up, the serve settings, and the API-key checks."""

from __future__ import annotations

import os
import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ..config import Config, ServeConfig
from .engine import Engine

__all__ = ["EngineDep", "ServeDep", "api_key", "require_reader", "require_writer"]

KEY_ENV = "BSHAREDRAG_API_KEY"
_bearer = HTTPBearer(auto_error=False, description="The API key: `Authorization: Bearer KEY`.")


def api_key(config: Config) -> str | None:
    """The key for protected endpoints: the environment variable wins over `serve.api_key`."""
    return os.environ.get(KEY_ENV) or config.serve.api_key or None


def get_engine(request: Request) -> Engine:
    return request.app.state.engine


def get_serve(request: Request) -> ServeConfig:
    return request.app.state.config.serve


EngineDep = Annotated[Engine, Depends(get_engine)]
ServeDep = Annotated[ServeConfig, Depends(get_serve)]
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def _check_key(request: Request, credentials: HTTPAuthorizationCredentials | None, what: str) -> None:
    key = request.app.state.api_key
    if key is None:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            f"{what} are disabled because no API key is configured; set the environment variable "
            f"{KEY_ENV} (or `serve.api_key` in the config) and restart the server",
        )
    if credentials is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            f"{what} need an API key: send the header `Authorization: Bearer KEY`",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not secrets.compare_digest(credentials.credentials.encode(), key.encode()):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "the API key is not valid", headers={"WWW-Authenticate": "Bearer"}
        )


def require_writer(request: Request, credentials: Credentials) -> None:
    """Catalogue updates always need the key."""
    _check_key(request, credentials, "catalogue updates")


def require_reader(request: Request, credentials: Credentials) -> None:
    """Reads need the key only when `serve.open_reads` is false."""
    if not request.app.state.config.serve.open_reads:
        _check_key(request, credentials, "reads on this server")
