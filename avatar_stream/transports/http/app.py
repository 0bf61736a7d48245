"""The HTTP side: signaling, session control, pushed speech, health, and the browser client.

Errors are JSON ``{"error": message}`` with a status that says whose fault it is; a bad
request never touches another session, and a refused push loses nothing queued before it.
Who may call what is in ``auth.py``; decoding pushed speech in ``speech.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
from collections.abc import AsyncIterator
from typing import Any

import cv2
from aiohttp import web

from avatar_stream.audio.tts import create_tts
from avatar_stream.avatars.photo import reference_image
from avatar_stream.avatars.store import DEFAULT_ID, photo_avatar
from avatar_stream.config import ServerConfig
from avatar_stream.core.worker import EngineWorker
from avatar_stream.engines.base import AvatarError
from avatar_stream.engines.registry import create_engine
from avatar_stream.errors import kind_of
from avatar_stream.scale.routing import ANSWERED_BY, Forwarder
from avatar_stream.scale.workers import WorkerError, WorkerPool
from avatar_stream.transports.http.auth import (
    cors_middleware,
)
from avatar_stream.transports.http.errors import json_errors
from avatar_stream.transports.http.health import (
    WEB_DIR,
    client_config,
    files,
    healthz,
    index,
    metrics,
    readyz,
)
from avatar_stream.transports.http.openapi import openapi_routes
from avatar_stream.transports.http.sessions import (
    MAX_OFFER_BYTES,
    create_session,
    delete_session,
    get_session,
    interrupt_session,
    list_sessions,
    set_turn_state,
)
from avatar_stream.transports.http.speech import end_utterance, push_audio, say, websocket
from avatar_stream.transports.http.state import STATE, ServerState
from avatar_stream.transports.http.whep import whep_routes
from avatar_stream.transports.webrtc import internals as aiortc_internals
from avatar_stream.transports.webrtc.ice import restrict_host_addresses
from avatar_stream.transports.webrtc.internals import AiortcMismatch


async def load_state(config: ServerConfig) -> ServerState:
    """Load the engine and prepare the avatar (raises AvatarError for an unusable photo).
    The front of ``--workers`` loads no engine: it checks the avatar photo (its workers
    prepare it for the engine, from the disk cache after the first) and runs no session."""
    aiortc_internals.check()
    restrict_host_addresses(config.ice_host_addresses)
    loop = asyncio.get_running_loop()
    if config.workers > 1:
        image = await loop.run_in_executor(None, reference_image, config.avatar)
        avatar = await loop.run_in_executor(None, photo_avatar, image, DEFAULT_ID,
                                            config.engine)
        return ServerState(config, None, None, {DEFAULT_ID: avatar})
    engine = await loop.run_in_executor(
        None, functools.partial(create_engine, config.engine, **config.engine_options)
    )
    image = await loop.run_in_executor(None, reference_image, config.avatar)
    avatar = await loop.run_in_executor(None, engine.prepare, image, DEFAULT_ID)
    await loop.run_in_executor(None, engine.warm_up)
    threads = config.engine_threads or engine.worker_threads
    cpu_threads = 0  # CPU engines: their pool is the CPU pool
    if engine.worker_threads == 1:
        threads, cpu_threads = 1, 2  # the device thread, and CPU threads for device-free idle
    else:
        cv2.setNumThreads(1)  # parallelism comes from sessions, not from inside a frame
    worker = EngineWorker(threads, cpu_threads)
    state = ServerState(config, engine, worker, {DEFAULT_ID: avatar})
    state.tts = create_tts(config)
    return state


@web.middleware
async def count_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    metrics = request.app[STATE].metrics
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.status >= 400:
            metrics.errors.labels(getattr(exc, "kind", None) or kind_of(exc.status)).inc()
        raise
    except Exception:
        metrics.errors.labels("internal").inc()
        raise
    if response.status >= 400 and ANSWERED_BY not in response:  # counted where answered
        metrics.errors.labels(kind_of(response.status)).inc()
    return response


def create_app(state: ServerState) -> web.Application:
    config = state.config
    middlewares: list[Any] = [count_errors, json_errors]
    if config.cors_origins:
        middlewares.insert(0, cors_middleware(config.cors_origins))
    if config.workers > 1 and state.pool is None:
        state.pool = WorkerPool(config, config.workers, serve=run)
    pool = state.pool
    # calls for another replica's (or worker's) session go to it (routing.py)
    forwarder = Forwarder.create(config, lambda sid: sid in state.sessions or sid in state.ended,
                                 (lambda: pool.addresses) if pool else None)
    if forwarder:
        middlewares.insert(len(middlewares) - 2, forwarder.middleware)
    # bodies are limited per route (body.py); this is only the outer bound
    app = web.Application(
        client_max_size=max(MAX_OFFER_BYTES, config.max_audio_bytes), middlewares=middlewares
    )
    app[STATE] = state
    app.add_routes(
        [
            web.get("/", index),
            files("/web", WEB_DIR),
            web.get("/healthz", healthz),
            web.get("/readyz", readyz),
            web.get("/metrics", metrics),
            web.get("/v1/config", client_config),
            web.post("/v1/sessions", create_session),
            web.get("/v1/sessions", list_sessions),
            web.get("/v1/sessions/{id}", get_session),
            web.delete("/v1/sessions/{id}", delete_session),
            web.post("/v1/sessions/{id}/interrupt", interrupt_session),
            web.post("/v1/sessions/{id}/state", set_turn_state),
            web.post("/v1/sessions/{id}/audio", push_audio),
            web.post("/v1/sessions/{id}/end", end_utterance),
            web.post("/v1/sessions/{id}/say", say),
            web.get("/v1/sessions/{id}/ws", websocket),
            *whep_routes(),
            *openapi_routes(),
        ]
    )
    # avatars (upload, list, preview, delete) and offline animation: avatars_api.py
    from avatar_stream.transports.http.avatars import add_avatar_api

    add_avatar_api(app)
    if pool:
        app.on_startup.append(pool.start)
        app.on_shutdown.append(pool.close)  # the workers' sessions end with the front's
    app.on_shutdown.append(_close_sessions)
    app.on_cleanup.append(_stop_engine)
    if forwarder:
        app.on_cleanup.append(forwarder.close)
    return app


async def _close_sessions(app: web.Application) -> None:
    sessions = list(app[STATE].sessions.values())
    await asyncio.gather(*(s.close("server shutdown") for s in sessions))


async def _stop_engine(app: web.Application) -> None:
    state = app[STATE]
    if state.tts is not None:
        await state.tts.close()
    if state.worker is not None:
        state.worker.shutdown()
    if state.engine is not None:
        state.engine.close()


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


def run(config: ServerConfig, announce: bool = True, sock: socket.socket | None = None
        ) -> None:
    """Start the server and block; exits with a message if the avatar photo is unusable."""

    async def make() -> web.Application:
        state = await load_state(config)
        app = create_app(state)

        async def ready(app: web.Application) -> None:  # after the workers are up
            url = f"http://{config.host}:{config.port}/"
            workers = f" in {config.workers} worker processes" if state.pool else ""
            print(f"avatar-stream: {config.engine} engine ready{workers}; open {url}",
                  flush=True)

        if announce:
            app.on_startup.append(ready)
        return app

    try:
        if sock is not None:  # a worker process: the socket its front bound for it
            web.run_app(make(), sock=sock, print=None)
        else:
            web.run_app(make(), host=config.host, port=config.port, print=None)
    except AvatarError as exc:
        raise SystemExit(f"avatar-stream: cannot use the avatar photo: {exc}") from None
    except (WorkerError, AiortcMismatch) as exc:
        raise SystemExit(f"avatar-stream: {exc}") from None
