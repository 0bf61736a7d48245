"""Who may call what: the API key, per-session tokens, CORS, and the session-creation limit.

- With an API key configured, every ``/v1`` call needs ``Authorization: Bearer <key>``,
  except that a session's own calls (speech, WebSocket, interrupt, say, stats, delete) may
  instead carry that session's token. A front-end can hand a browser one session's token
  and nothing more. Without an API key ``/v1`` is open, as on a developer's machine:
  tokens are still issued, so clients work the same either way, but nothing is checked.
- A session token is ``<expiry>.<HMAC-SHA256(server secret, session id + expiry)>``: the
  server keeps no table of tokens, a token names one session only, and it stops working
  at its expiry or when the session ends.
- Browsers cannot put headers on a WebSocket handshake: there the token (or key) may come
  as the ``token`` query parameter instead.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from avatar_stream.errors import error_body

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class AuthError(Exception):
    """401 (no or bad credentials) or 403 (good credentials, another session)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class TokenIssuer:
    """Signs and checks session tokens with a per-process secret (or a configured one)."""

    def __init__(self, secret: bytes | None = None) -> None:
        self._secret = secret or secrets.token_bytes(32)

    def _sign(self, session_id: str, expires: int) -> str:
        mac = hmac.new(self._secret, f"{session_id}.{expires}".encode(), hashlib.sha256)
        return base64.urlsafe_b64encode(mac.digest()[:24]).decode().rstrip("=")

    def issue(self, session_id: str, ttl_s: float) -> tuple[str, int]:
        """A token for ``session_id`` valid ``ttl_s`` seconds; returns (token, expiry epoch)."""
        expires = int(time.time() + ttl_s)
        return f"{expires}.{self._sign(session_id, expires)}", expires

    def check(self, token: str, session_id: str) -> None:
        """Raises AuthError unless ``token`` is this session's and has not expired."""
        expires_s, _, mac = token.partition(".")
        if not expires_s.isdigit() or not mac:
            raise AuthError(401, "malformed token")
        expires = int(expires_s)
        if not hmac.compare_digest(mac, self._sign(session_id, expires)):
            raise AuthError(403, "this token is not valid for this session")
        if time.time() >= expires:
            raise AuthError(401, "token expired")


def passed_on(request: web.Request) -> dict[str, str]:
    """The caller's ``Authorization`` header, for the calls made on its behalf to the worker
    processes (which check it again)."""
    auth = request.headers.get("Authorization")
    return {"Authorization": auth} if auth else {}


@dataclass
class Credentials:
    """What a request carries: a bearer value from the header or the ``token`` query."""

    bearer: str | None

    @classmethod
    def of(cls, request: web.Request, allow_query: bool = False) -> Credentials:
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return cls(value.strip())
        if allow_query and request.query.get("token"):
            return cls(request.query["token"])
        return cls(None)


class Guard:
    """Decides whether a request may touch the server or one session."""

    def __init__(self, api_key: str | None, tokens: TokenIssuer) -> None:
        self.api_key = api_key or None
        self.tokens = tokens

    def is_key(self, creds: Credentials) -> bool:
        return bool(
            self.api_key and creds.bearer
            and hmac.compare_digest(creds.bearer.encode(), self.api_key.encode())
        )

    def server(self, creds: Credentials) -> None:
        """Server-wide calls (create, list, config): the API key, when one is set."""
        if self.api_key is None:
            return
        if creds.bearer is None:
            raise AuthError(401, "missing credentials: send Authorization: Bearer <API key>")
        if not self.is_key(creds):
            raise AuthError(401, "wrong API key")

    def session(self, creds: Credentials, session_id: str) -> None:
        """One session's calls: the API key, or that session's token (open without a key)."""
        if self.api_key is None:
            return
        if creds.bearer is None:
            raise AuthError(401, "missing credentials: send Authorization: Bearer <session "
                                 "token or API key>")
        if self.is_key(creds):
            return
        if "." not in creds.bearer:
            raise AuthError(401, "wrong API key or malformed token")
        self.tokens.check(creds.bearer, session_id)


class RateLimiter:
    """At most ``per_minute`` events per key in any 60 s window (sliding log per key)."""

    def __init__(self, per_minute: int, window_s: float = 60.0, max_keys: int = 10_000) -> None:
        self.per_minute = per_minute
        self.window_s = window_s
        self.max_keys = max_keys
        self._log: OrderedDict[str, deque[float]] = OrderedDict()

    def hit(self, key: str, now: float | None = None) -> float:
        """Count one event; returns 0 if allowed, else seconds until one would be."""
        if self.per_minute <= 0:
            return 0.0
        now = time.monotonic() if now is None else now
        log = self._log.get(key)
        if log is None:
            log = self._log[key] = deque()
            while len(self._log) > self.max_keys:  # forget the least recently seen
                self._log.popitem(last=False)
        else:
            self._log.move_to_end(key)
        while log and log[0] <= now - self.window_s:
            log.popleft()
        if len(log) >= self.per_minute:
            return log[0] + self.window_s - now
        log.append(now)
        return 0.0


def client_ip(request: web.Request, trust_forwarded: bool) -> str:
    """The caller's address; behind a proxy that sets X-Forwarded-For, its first entry."""
    if trust_forwarded:
        forwarded = request.headers.get("X-Forwarded-For", "")
        first = forwarded.split(",")[0].strip()
        if first:
            return first
    return request.remote or "unknown"


def retry_after(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))


ALLOW_HEADERS = "Authorization, Content-Type, If-Match"
ALLOW_METHODS = "GET, POST, PATCH, DELETE, OPTIONS"
# what a page on another origin may read: WHEP's answer headers included
EXPOSE_HEADERS = ("Location, Retry-After, ETag, Link, X-Session-Token, Accept-Post, "
                  "Accept-Patch, Allow")


def cors_middleware(origins: list[str]) -> Callable[[web.Request, Handler],
                                                     Awaitable[web.StreamResponse]]:
    """CORS for ``/v1``: allowed origins get the headers; a preflight is answered here,
    before any credentials are checked (browsers send none on a preflight)."""
    allow_all = "*" in origins
    allowed = set(origins)

    def allow(origin: str | None) -> str | None:
        if not origin:
            return None
        if allow_all:
            return "*"
        return origin if origin in allowed else None

    @web.middleware
    async def cors(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        allowed_origin = allow(origin)
        if request.method == "OPTIONS" and request.headers.get("Access-Control-Request-Method"):
            if allowed_origin is None:
                return web.json_response(error_body(f"origin {origin!r} is not allowed"),
                                         status=403)
            return web.Response(status=204, headers={
                "Access-Control-Allow-Origin": allowed_origin,
                "Access-Control-Allow-Methods": ALLOW_METHODS,
                "Access-Control-Allow-Headers": ALLOW_HEADERS,
                "Access-Control-Max-Age": "600",
                "Vary": "Origin",
            })
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            if allowed_origin is not None:
                _add_cors(exc.headers, allowed_origin)
            raise
        if allowed_origin is not None and not response.prepared:
            _add_cors(response.headers, allowed_origin)
        return response

    return cors


def _add_cors(headers: object, origin: str) -> None:
    h = headers  # CIMultiDict of a response or an HTTPException
    h["Access-Control-Allow-Origin"] = origin  # type: ignore[index]
    h["Access-Control-Expose-Headers"] = EXPOSE_HEADERS  # type: ignore[index]
    h["Vary"] = "Origin"  # type: ignore[index]
