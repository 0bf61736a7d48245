"""HTTP error answers: one JSON shape, ``{"error": message}`` with a ``reason`` where the
client can act on it, raised from anywhere in a handler."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from avatar_stream.errors import SpeechError, error_body, kind_of
from avatar_stream.transports.http.auth import AuthError, retry_after

BEARER_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="avatar-stream"'}


class HTTPJSONError(web.HTTPException):
    """An error answered as JSON with any status; ``kind`` labels it in the metrics."""

    def __init__(self, status: int, message: str, reason: str | None = None,
                 kind: str | None = None, **headers: str) -> None:
        self.status_code = status
        self.kind = kind or reason or kind_of(status)
        super().__init__(text=json.dumps(error_body(message, reason)),
                         content_type="application/json", headers=headers or None)


def json_error(status: int, message: str, reason: str | None = None, **headers: str
               ) -> web.Response:
    """The same answer, returned instead of raised."""
    return web.json_response(error_body(message, reason), status=status,
                             headers=headers or None)


def auth_error(exc: AuthError) -> HTTPJSONError:
    headers = BEARER_CHALLENGE if exc.status == 401 else {}
    return HTTPJSONError(exc.status, exc.message, **headers)


def speech_error(exc: SpeechError) -> HTTPJSONError:
    headers = {"Retry-After": retry_after(exc.retry_after)} if exc.retry_after else {}
    return HTTPJSONError(exc.status, exc.message, kind=exc.kind, **headers)


@web.middleware
async def json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """aiohttp's own refusals (no such route, a method the route lacks, a request that is
    not a WebSocket handshake) in the API's one error shape, their headers (``Allow``) kept."""
    try:
        return await handler(request)
    except HTTPJSONError:
        raise
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if isinstance(exc, web.HTTPMethodNotAllowed):
            message = (f"{request.method} is not allowed on {request.path}; allowed: "
                       f"{', '.join(sorted(exc.allowed_methods))}")
        elif exc.text and not exc.text.startswith(f"{exc.status}:"):
            message = exc.text  # aiohttp's own words, where it has some
        else:
            message = f"{exc.reason}: {request.path}"
        headers = {k: v for k, v in exc.headers.items()
                   if k.lower() not in ("content-type", "content-length")}
        raise HTTPJSONError(exc.status, message, **headers) from None
