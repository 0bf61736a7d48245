"""What went wrong, as a caller is told it: a short kind and a message, and the one map
from kinds to HTTP statuses.

The kind is the ``code`` of an error event on the WebSocket and the data channel, the
label of the error counter in ``/metrics``, and (where a client can act on it) the
``reason`` of an HTTP error body; the status follows from the kind, never the other way.
"""

from __future__ import annotations

STATUS: dict[str, int] = {
    "bad_request": 400,
    "bad_audio": 400,
    "bad_state": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "method_not_allowed": 405,
    "conflict": 409,
    "utterance_closed": 409,
    "gone": 410,
    "too_large": 413,
    "unsupported_media_type": 415,
    "unprocessable": 422,
    "rate_limited": 429,
    "queue_full": 429,
    "internal": 500,
    "bad_gateway": 502,
    "unavailable": 503,
    "engine_failed": 503,
    "timeout": 504,
}
# the kind of an error that carries only a status (aiohttp's own, a forwarded answer)
_GENERIC = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
    405: "method_not_allowed", 409: "conflict", 410: "gone", 413: "too_large",
    415: "unsupported_media_type", 422: "unprocessable", 429: "rate_limited", 500: "internal",
    502: "bad_gateway", 503: "unavailable", 504: "timeout",
}


def error_body(message: str, reason: str | None = None) -> dict[str, str]:
    """The one JSON shape of an HTTP error: ``{"error": message}``, with a ``reason`` where
    the client can act on it."""
    body = {"error": message}
    if reason:
        body["reason"] = reason
    return body


def kind_of(status: int) -> str:
    """The generic kind of an HTTP status (``str(status)`` for one with none)."""
    return _GENERIC.get(status, str(status))


class SpeechError(Exception):
    """Speech that cannot be queued: ``kind`` says what (``bad_audio``, ``queue_full``...),
    the message says why."""

    def __init__(self, kind: str, message: str, retry_after: float | None = None) -> None:
        if kind not in STATUS:
            raise ValueError(f"unknown error kind {kind!r}")
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.retry_after = retry_after

    @property
    def status(self) -> int:
        return STATUS[self.kind]
