"""The HTTP side: signaling, session control, health, and the browser client.

Errors are JSON ``{"error": message}`` with a status that says whose fault it is; a bad
request never touches another session.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import cv2
from aiohttp import web

from .avatar import reference_image
from .config import ServerConfig
from .engines import create_engine
from .engines.base import Avatar, AvatarError, Engine
from .ice import restrict_host_addresses
from .metrics import CONTENT_TYPE, Metrics
from .session import OfferError, Session
from .worker import EngineWorker

log = logging.getLogger(__name__)

WEB_DIR = Path(str(resources.files("avatar_stream") / "web"))
MAX_OFFER_BYTES = 256 * 1024
DEFAULT_AVATAR = "default"


@dataclass
class ServerState:
    config: ServerConfig
    engine: Engine
    worker: EngineWorker
    avatars: dict[str, Avatar]
    sessions: dict[str, Session] = field(default_factory=dict)
    metrics: Metrics = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = Metrics(lambda: list(self.sessions.values()))

    @property
    def has_capacity(self) -> bool:
        return len(self.sessions) < self.config.max_sessions


STATE = web.AppKey("state", ServerState)


def json_error(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers or None)


async def load_state(config: ServerConfig) -> ServerState:
    """Load the engine and prepare the avatar (raises AvatarError for an unusable photo)."""
    restrict_host_addresses(config.ice_host_addresses)
    loop = asyncio.get_running_loop()
    engine = await loop.run_in_executor(None, create_engine, config.engine)
    image = await loop.run_in_executor(None, reference_image, config.avatar)
    avatar = await loop.run_in_executor(None, engine.prepare, image, DEFAULT_AVATAR)
    await loop.run_in_executor(None, engine.warm_up)
    threads = config.engine_threads or engine.worker_threads
    if engine.worker_threads == 1:
        threads = 1
    else:
        cv2.setNumThreads(1)  # parallelism comes from sessions, not from inside a frame
    return ServerState(config, engine, EngineWorker(threads), {DEFAULT_AVATAR: avatar})


_ERROR_KINDS = {400: "bad_request", 401: "unauthorized", 404: "not_found", 413: "too_large",
                415: "unsupported_media_type", 429: "rate_limited", 503: "unavailable"}


@web.middleware
async def count_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    metrics = request.app[STATE].metrics
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.status >= 400:
            metrics.errors.labels(_ERROR_KINDS.get(exc.status, str(exc.status))).inc()
        raise
    except Exception:
        metrics.errors.labels("internal").inc()
        raise
    if response.status >= 400:
        metrics.errors.labels(_ERROR_KINDS.get(response.status, str(response.status))).inc()
    return response


def create_app(state: ServerState) -> web.Application:
    app = web.Application(client_max_size=MAX_OFFER_BYTES, middlewares=[count_errors])
    app[STATE] = state
    app.add_routes(
        [
            web.get("/", index),
            web.static("/web", WEB_DIR),
            web.get("/healthz", healthz),
            web.get("/readyz", readyz),
            web.get("/metrics", metrics),
            web.get("/v1/config", client_config),
            web.post("/v1/sessions", create_session),
            web.get("/v1/sessions", list_sessions),
            web.get("/v1/sessions/{id}", get_session),
            web.delete("/v1/sessions/{id}", delete_session),
            web.post("/v1/sessions/{id}/interrupt", interrupt_session),
        ]
    )
    app.on_shutdown.append(_close_sessions)
    app.on_cleanup.append(_stop_engine)
    return app


async def _close_sessions(app: web.Application) -> None:
    sessions = list(app[STATE].sessions.values())
    await asyncio.gather(*(s.close("server shutdown") for s in sessions))


async def _stop_engine(app: web.Application) -> None:
    state = app[STATE]
    state.worker.shutdown()
    state.engine.close()


# -- pages and health ------------------------------------------------------------------


async def index(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(WEB_DIR / "index.html")


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = {
        "engine": state.engine.name,
        "sessions": len(state.sessions),
        "max_sessions": state.config.max_sessions,
    }
    if not state.has_capacity:
        return web.json_response({"status": "full", **body}, status=503)
    return web.json_response({"status": "ready", **body})


async def metrics(request: web.Request) -> web.Response:
    body = request.app[STATE].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def client_config(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.json_response(
        {"ice_servers": [s.to_json() for s in state.config.ice_servers]}
    )


# -- sessions --------------------------------------------------------------------------


async def _read_offer(request: web.Request) -> tuple[str, str | None, bool]:
    """Returns (sdp, avatar id, whether the client speaks WHEP-style application/sdp)."""
    ctype = request.content_type
    try:
        body = await request.text()
    except web.HTTPRequestEntityTooLarge:
        raise
    if ctype == "application/sdp":
        return body, request.query.get("avatar"), True
    if ctype != "application/json":
        raise web.HTTPUnsupportedMediaType(
            text=json.dumps({"error": "send the offer as application/json or application/sdp"}),
            content_type="application/json",
        )
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise _bad_request(f"malformed JSON: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("sdp"), str):
        raise _bad_request('expected {"type": "offer", "sdp": "..."}')
    if data.get("type", "offer") != "offer":
        raise _bad_request("type must be 'offer'")
    avatar = data.get("avatar")
    if avatar is not None and not isinstance(avatar, str):
        raise _bad_request("avatar must be an avatar id (a string)")
    return data["sdp"], avatar, False


def _bad_request(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(
        text=json.dumps({"error": message}), content_type="application/json"
    )


async def create_session(request: web.Request) -> web.Response:
    state = request.app[STATE]
    sdp, avatar_id, whep = await _read_offer(request)
    if not sdp.lstrip().startswith("v=0"):
        return json_error(400, "invalid SDP offer: it must start with 'v=0'")
    avatar = state.avatars.get(avatar_id or DEFAULT_AVATAR)
    if avatar is None:
        return json_error(404, f"unknown avatar {avatar_id!r}")
    if not state.has_capacity:
        state.metrics.refused.inc()
        return json_error(
            503, f"server full ({state.config.max_sessions} sessions)", **{"Retry-After": "5"}
        )
    session = Session(
        state.engine, avatar, state.worker, state.config, on_closed=_forget(state),
        metrics=state.metrics,
    )
    state.sessions[session.id] = session
    try:
        answer = await session.accept(sdp)
    except OfferError as exc:
        return json_error(400, str(exc))
    location = f"/v1/sessions/{session.id}"
    if whep:
        return web.Response(
            status=201,
            text=answer,
            content_type="application/sdp",
            headers={"Location": location},
        )
    return web.json_response(
        {
            "session_id": session.id,
            "type": "answer",
            "sdp": answer,
            "avatar": avatar.info(),
        },
        status=201,
        headers={"Location": location},
    )


def _forget(state: ServerState) -> Any:
    def on_closed(session: Session) -> None:
        state.sessions.pop(session.id, None)

    return on_closed


def _session(request: web.Request) -> Session:
    session = request.app[STATE].sessions.get(request.match_info["id"])
    if session is None:
        raise web.HTTPNotFound(
            text=json.dumps({"error": f"unknown session {request.match_info['id']!r}"}),
            content_type="application/json",
        )
    return session


async def list_sessions(request: web.Request) -> web.Response:
    return web.json_response([s.stats() for s in request.app[STATE].sessions.values()])


async def get_session(request: web.Request) -> web.Response:
    return web.json_response(_session(request).stats())


async def delete_session(request: web.Request) -> web.Response:
    await _session(request).close("deleted by client")
    return web.Response(status=204)


async def interrupt_session(request: web.Request) -> web.Response:
    cut = _session(request).interrupt()
    return web.json_response({"interrupted": cut})


@contextlib.asynccontextmanager
async def running_server(
    config: ServerConfig, state: ServerState | None = None
) -> AsyncIterator[tuple[str, ServerState]]:
    """The real server on this event loop (port 0 = any free port); yields its URL."""
    state = state or await load_state(config)
    runner = web.AppRunner(create_app(state))
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://{config.host}:{port}", state
    finally:
        await runner.cleanup()


def run(config: ServerConfig) -> None:
    """Start the server and block; exits with a message if the avatar photo is unusable."""

    async def make() -> web.Application:
        state = await load_state(config)
        url = f"http://{config.host}:{config.port}/"
        print(f"avatar-stream: {state.engine.name} engine ready; open {url}", flush=True)
        return create_app(state)

    try:
        web.run_app(make(), host=config.host, port=config.port, print=None)
    except AvatarError as exc:
        raise SystemExit(f"avatar-stream: cannot use the avatar photo: {exc}") from None
