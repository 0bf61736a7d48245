"""The HTTP side: signaling, session control, pushed speech, health, and the browser client.

Errors are JSON ``{"error": message}`` with a status that says whose fault it is; a bad
request never touches another session, and a refused push loses nothing queued before it.
Who may call what is in ``auth.py``; decoding pushed speech in ``speech.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any

import cv2
from aiohttp import WSMsgType, web

from . import aiortc_internals
from .aiortc_internals import AiortcMismatch
from .auth import (
    AuthError,
    Credentials,
    client_ip,
    cors_middleware,
    passed_on,
    retry_after,
)
from .avatar import reference_image
from .capacity import capacity_info
from .config import ServerConfig
from .engines import create_engine
from .engines.base import AvatarError
from .ice import restrict_host_addresses
from .media import Event
from .metrics import CONTENT_TYPE
from .routing import ANSWERED_BY, FORWARDED, Forwarder, owned_id
from .session import OfferError, Session
from .speech import SpeechError, SpeechProtocol, check_utterance_id, decode_body
from .state import STATE, ServerState
from .tts import TTSError, create_tts
from .turn import session_ice_servers
from .worker import EngineWorker
from .workers import WorkerError, WorkerPool

log = logging.getLogger(__name__)

WEB_DIR = Path(str(resources.files("avatar_stream") / "web"))
MAX_OFFER_BYTES = 256 * 1024
MAX_JSON_BYTES = 64 * 1024  # say, end, and other small JSON bodies
DECODE_OFF_LOOP_BYTES = 256 * 1024  # bodies bigger than this are decoded on a thread
DEFAULT_AVATAR = "default"
WS_OUTBOX = 256  # events waiting for a slow WebSocket reader before it is disconnected




def json_error(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers or None)


async def load_state(config: ServerConfig) -> ServerState:
    """Load the engine and prepare the avatar (raises AvatarError for an unusable photo)."""
    aiortc_internals.check()
    restrict_host_addresses(config.ice_host_addresses)
    loop = asyncio.get_running_loop()
    engine = await loop.run_in_executor(
        None, functools.partial(create_engine, config.engine, **config.engine_options)
    )
    image = await loop.run_in_executor(None, reference_image, config.avatar)
    avatar = await loop.run_in_executor(None, engine.prepare, image, DEFAULT_AVATAR)
    await loop.run_in_executor(None, engine.warm_up)
    threads = config.engine_threads or engine.worker_threads
    cpu_threads = 0  # CPU engines: their pool is the CPU pool
    if engine.worker_threads == 1:
        threads, cpu_threads = 1, 2  # the device thread, and CPU threads for device-free idle
    else:
        cv2.setNumThreads(1)  # parallelism comes from sessions, not from inside a frame
    worker = EngineWorker(threads, cpu_threads)
    state = ServerState(config, engine, worker, {DEFAULT_AVATAR: avatar})
    state.tts = create_tts(config)
    return state


_ERROR_KINDS = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                409: "conflict", 410: "gone", 413: "too_large", 415: "unsupported_media_type",
                429: "rate_limited", 502: "bad_gateway", 503: "unavailable", 504: "timeout"}


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
    if response.status >= 400 and ANSWERED_BY not in response:  # counted where answered
        metrics.errors.labels(_ERROR_KINDS.get(response.status, str(response.status))).inc()
    return response


class HTTPJSONError(web.HTTPException):
    """An error answered as ``{"error": message}`` with any status (raised by helpers)."""

    def __init__(self, status: int, message: str, **headers: str) -> None:
        self.status_code = status
        super().__init__(text=json.dumps({"error": message}), content_type="application/json",
                         headers=headers or None)


def create_app(state: ServerState) -> web.Application:
    config = state.config
    middlewares: list[Any] = [count_errors]
    if config.cors_origins:
        middlewares.insert(0, cors_middleware(config.cors_origins))
    if config.workers > 1 and state.pool is None:
        state.pool = WorkerPool(config, config.workers, serve=run)
    pool = state.pool
    # calls for another replica's (or worker's) session go to it (routing.py)
    forwarder = Forwarder.create(config, lambda sid: sid in state.sessions or sid in state.ended,
                                 (lambda: pool.addresses) if pool else None)
    if forwarder:
        middlewares.insert(len(middlewares) - 1, forwarder.middleware)
    # bodies are limited per route (read_body); this is only the outer bound
    app = web.Application(
        client_max_size=max(MAX_OFFER_BYTES, config.max_audio_bytes), middlewares=middlewares
    )
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
            web.post("/v1/sessions/{id}/audio", push_audio),
            web.post("/v1/sessions/{id}/end", end_utterance),
            web.post("/v1/sessions/{id}/say", say),
            web.get("/v1/sessions/{id}/ws", websocket),
        ]
    )
    # avatars (upload, list, preview, delete) and offline animation: avatars_api.py
    from .avatars_api import add_avatar_api

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
    state.worker.shutdown()
    state.engine.close()


# -- request helpers -------------------------------------------------------------------


async def read_body(request: web.Request, limit: int) -> bytes:
    """The body, refused with 413 past ``limit`` bytes (chunked uploads included)."""
    if request.content_length is not None and request.content_length > limit:
        raise HTTPJSONError(413, f"body of {request.content_length} bytes; at most {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            raise HTTPJSONError(413, f"body over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json_object(request: web.Request, limit: int = MAX_JSON_BYTES) -> dict[str, Any]:
    if request.content_type != "application/json":
        raise HTTPJSONError(415, "send application/json")
    body = await read_body(request, limit)
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise HTTPJSONError(400, f"malformed JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise HTTPJSONError(400, "expected a JSON object")
    return data


def _auth_error(exc: AuthError) -> HTTPJSONError:
    headers = {"WWW-Authenticate": 'Bearer realm="avatar-stream"'} if exc.status == 401 else {}
    return HTTPJSONError(exc.status, exc.message, **headers)


def _require_server(request: web.Request) -> None:
    try:
        request.app[STATE].guard.server(Credentials.of(request))
    except AuthError as exc:
        raise _auth_error(exc) from None


def _session(request: web.Request, allow_query_token: bool = False, touch: bool = True
             ) -> Session:
    """The session named in the path, if the caller may use it (401/403), else 404/410.

    ``touch``: the call counts as activity for the idle timeout (reading stats does not,
    so a monitor polling a session does not keep it alive)."""
    state = request.app[STATE]
    sid = request.match_info["id"]
    try:
        state.guard.session(Credentials.of(request, allow_query_token), sid)
    except AuthError as exc:
        raise _auth_error(exc) from None
    session = state.sessions.get(sid)
    if session is None or session.closing:
        reason = state.ended.get(sid) or (session.end_reason if session else None)
        if reason is not None:
            raise HTTPJSONError(410, f"session {sid!r} has ended ({reason})")
        raise HTTPJSONError(404, f"unknown session {sid!r}")
    if touch:
        session.touch()
    return session


def _speech_error(exc: SpeechError) -> HTTPJSONError:
    headers = {"Retry-After": retry_after(exc.retry_after)} if exc.retry_after else {}
    return HTTPJSONError(exc.status, exc.message, **headers)


# -- pages and health ------------------------------------------------------------------


async def index(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(WEB_DIR / "index.html")


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = {
        "engine": state.engine.name,
        **capacity_info(state.engine, state.max_sessions, len(state.sessions)),
    }
    if state.pool is not None:  # the workers' sessions, and room on the live ones
        loads = await state.pool.loads()
        active = sum(a["sessions"] for _, a in loads)
        free = sum(a["free"] for _, a in loads)  # their shares add up to --max-sessions
        body.update(sessions=active, free=free, workers=len(loads))
        if free == 0:
            return web.json_response({"status": "full", **body}, status=503)
        return web.json_response({"status": "ready", **body})
    if not state.has_capacity:
        return web.json_response({"status": "full", **body}, status=503)
    return web.json_response({"status": "ready", **body})


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = state.metrics.render()
    if state.pool is not None:
        body = await state.pool.metrics(body)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def client_config(request: web.Request) -> web.Response:
    state = request.app[STATE]
    _require_server(request)  # it may hold TURN credentials
    return web.json_response(
        {"ice_servers": [s.to_json() for s in session_ice_servers(state.config)]}
    )


# -- sessions --------------------------------------------------------------------------


async def _read_offer(request: web.Request) -> tuple[str, str | None, bool]:
    """Returns (sdp, avatar id, whether the client speaks WHEP-style application/sdp)."""
    ctype = request.content_type
    raw = await read_body(request, MAX_OFFER_BYTES)
    try:
        body = raw.decode(request.charset or "utf-8")
    except (UnicodeDecodeError, LookupError) as exc:
        raise _bad_request(f"the offer is not valid text: {exc}") from exc
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


async def create_session(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    _require_server(request)
    wait = state.creations.hit(client_ip(request, state.config.trust_forwarded_for))
    if wait:
        return json_error(
            429, f"too many sessions created from this address (at most "
            f"{state.config.sessions_per_ip_per_minute} a minute)",
            **{"Retry-After": retry_after(wait)},
        )
    if state.pool is not None:  # a worker makes the session (workers.py)
        response = await state.pool.create_session(request)
        if response is not None:
            return response
        state.metrics.refused.inc()
        return json_error(
            503, f"server full ({state.max_sessions} sessions)", **{"Retry-After": "5"}
        )
    sdp, avatar_id, whep = await _read_offer(request)
    if not sdp.lstrip().startswith("v=0"):
        return json_error(400, "invalid SDP offer: it must start with 'v=0'")
    avatar = state.avatars.get(avatar_id or DEFAULT_AVATAR)
    if avatar is None:
        return json_error(404, f"unknown avatar {avatar_id!r}")
    if not state.has_capacity:
        if request.headers.get(FORWARDED) != "front":  # the front tries another worker
            state.metrics.refused.inc()
        return json_error(
            503, f"server full ({state.max_sessions} sessions)", **{"Retry-After": "5"}
        )
    ice_servers = session_ice_servers(state.config)  # fresh TURN credentials
    session = Session(
        state.engine, avatar, state.worker, replace(state.config, ice_servers=ice_servers),
        on_closed=_forget(state),
        metrics=state.metrics,
    )
    session.id = owned_id(state.config, session.id)  # names this replica (routing.py)
    state.sessions[session.id] = session
    try:
        answer = await session.accept(sdp)
    except OfferError as exc:
        return json_error(400, str(exc))
    location = f"/v1/sessions/{session.id}"
    token, expires = state.guard.tokens.issue(session.id, state.token_ttl_s)
    if whep:
        return web.Response(
            status=201,
            text=answer,
            content_type="application/sdp",
            headers={"Location": location, "X-Session-Token": token},
        )
    return web.json_response(
        {
            "session_id": session.id,
            "type": "answer",
            "sdp": answer,
            "avatar": avatar.info(),
            "ice_servers": [s.to_json() for s in ice_servers],
            "token": token,
            "token_expires_at": expires,
        },
        status=201,
        headers={"Location": location},
    )


def _forget(state: ServerState) -> Any:
    def on_closed(session: Session) -> None:
        state.sessions.pop(session.id, None)
        state.ended[session.id] = session.end_reason or "closed"
        while len(state.ended) > 1000:
            state.ended.popitem(last=False)

    return on_closed


async def list_sessions(request: web.Request) -> web.Response:
    _require_server(request)
    state = request.app[STATE]
    if state.pool is not None:
        return web.json_response(await state.pool.sessions(passed_on(request)))
    return web.json_response([s.stats() for s in state.sessions.values()])


async def get_session(request: web.Request) -> web.Response:
    return web.json_response(_session(request, touch=False).stats())


async def delete_session(request: web.Request) -> web.Response:
    await _session(request).close("deleted by client")
    return web.Response(status=204)


async def interrupt_session(request: web.Request) -> web.Response:
    cut = _session(request).interrupt()
    return web.json_response({"interrupted": cut})


# -- pushed speech ---------------------------------------------------------------------


def _flag(value: str | None, default: bool) -> bool:
    if value is None:
        return default
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise HTTPJSONError(400, f"end={value!r}: use true or false")


async def push_audio(request: web.Request) -> web.Response:
    """``POST /v1/sessions/{id}/audio?utterance_id=U&end=true``: speech for the avatar.

    Without ``utterance_id`` the body is a whole utterance of its own (``end`` defaults to
    true); with one, pieces of one utterance may come in several requests, the last with
    ``end=true`` (or ``POST .../end``).
    """
    session = _session(request)
    state = request.app[STATE]
    uid_param = request.query.get("utterance_id")
    try:
        uid = check_utterance_id(uid_param) if uid_param is not None else session.input.new_id()
    except SpeechError as exc:
        raise _speech_error(exc) from None
    end = _flag(request.query.get("end"), default=uid_param is None)
    ctype = request.headers.get("Content-Type", "")
    body = await read_body(request, state.config.max_audio_bytes)
    try:
        if len(body) > DECODE_OFF_LOOP_BYTES:
            loop = asyncio.get_running_loop()
            pcm = await loop.run_in_executor(None, decode_body, ctype, body)
        else:
            pcm = decode_body(ctype, body)
        if session.closing:
            raise HTTPJSONError(410, f"session {session.id!r} has ended")
        queued = await session.input.push_async(pcm, uid, end)
    except SpeechError as exc:
        raise _speech_error(exc) from None
    return web.json_response(
        {
            "utterance_id": uid,
            "received_s": round(pcm.seconds, 3),
            "queued_s": round(queued, 3),
            "queue_s": round(session.speech.seconds, 3),
            "ended": end,
            "sample_rate": pcm.rate,
            "channels": pcm.channels,
            **({"notes": pcm.notes} if pcm.notes else {}),
        },
        status=202,
    )


async def end_utterance(request: web.Request) -> web.Response:
    """``POST /v1/sessions/{id}/end {"utterance_id": U}``: no more audio for U."""
    session = _session(request)
    data = await read_json_object(request)
    try:
        uid = check_utterance_id(data.get("utterance_id"))
    except SpeechError as exc:
        raise _speech_error(exc) from None
    return web.json_response({"utterance_id": uid, "was_open": session.input.end(uid)})


async def say(request: web.Request) -> web.Response:
    """``POST /v1/sessions/{id}/say {"text": ..., "voice"?, "utterance_id"?}``: speak text
    through the TTS backend; the speech is queued as it is synthesised."""
    session = _session(request)
    state = request.app[STATE]
    data = await read_json_object(request)
    text = data.get("text")
    if not isinstance(text, str) or not text.strip():
        raise HTTPJSONError(400, 'expected {"text": "something to say"}')
    if len(text) > state.config.tts_max_chars:
        raise HTTPJSONError(
            400, f"text of {len(text)} characters; at most {state.config.tts_max_chars}"
        )
    voice = data.get("voice")
    if voice is not None and not isinstance(voice, str):
        raise HTTPJSONError(400, "voice must be a string")
    try:
        uid = check_utterance_id(data["utterance_id"]) if "utterance_id" in data \
            else session.input.new_id()
    except SpeechError as exc:
        raise _speech_error(exc) from None
    if state.tts is None:
        raise HTTPJSONError(503, "text to speech is off on this server (--tts)")
    try:
        await asyncio.wait_for(state.tts_slots.acquire(), state.config.tts_timeout_s)
    except asyncio.TimeoutError:
        raise HTTPJSONError(503, "text to speech is busy", **{"Retry-After": "2"}) from None
    queued = 0.0
    started = time.perf_counter()
    try:
        async for pcm in state.tts.stream(text, voice):
            if session.closing:
                raise HTTPJSONError(410, f"session {session.id!r} has ended")
            queued += await session.input.push_async(pcm, uid)
    except TTSError as exc:
        raise HTTPJSONError(exc.status, exc.message) from None
    except SpeechError as exc:
        raise _speech_error(exc) from None
    finally:
        state.tts_slots.release()
        session.input.end(uid)  # whatever was queued plays to its end
    return web.json_response(
        {
            "utterance_id": uid,
            "queued_s": round(queued, 3),
            "synthesis_s": round(time.perf_counter() - started, 3),
            "tts": state.tts.name,
        },
        status=202,
    )


async def websocket(request: web.Request) -> web.StreamResponse:
    """``GET /v1/sessions/{id}/ws``: the speech protocol (JSON control + binary PCM16) in,
    the session's events out: the same messages as the ``control`` data channel."""
    session = _session(request, allow_query_token=True)
    state = request.app[STATE]
    # aiohttp refuses a message of exactly max_msg_size: the limit itself must pass
    ws = web.WebSocketResponse(max_msg_size=state.config.max_ws_message_bytes + 1, heartbeat=30)
    outbox: asyncio.Queue[Event | None] = asyncio.Queue(maxsize=WS_OUTBOX)
    too_slow: list[bool] = []  # set once: the close for a stuck reader is under way
    write_task: asyncio.Task[None] | None = None

    def send(event: Event) -> None:
        if ws.closed or outbox.full() and too_slow:
            return
        try:
            outbox.put_nowait(event)
        except asyncio.QueueFull:  # a reader this slow is gone or stuck: let it go
            too_slow.append(True)
            log.warning("session %s: WebSocket reader too slow; closing it", session.id)
            asyncio.get_running_loop().create_task(ws.close(code=1008, message=b"too slow"))

    async def writer() -> None:
        while (event := await outbox.get()) is not None:
            await ws.send_str(json.dumps(event))

    async def on_session_closed() -> None:
        with contextlib.suppress(asyncio.QueueFull):
            outbox.put_nowait(None)  # after session.ended, already queued
        if write_task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(write_task), 1.0)
        await ws.close(code=1000, message=b"session ended")

    def reply(event: Event) -> None:  # to this connection only: acks, pong, its errors
        if event["type"] == "error":
            state.metrics.errors.labels("control").inc()
        send(event)

    protocol = SpeechProtocol(
        session.input, session.interrupt, reply,
        max_binary_bytes=state.config.max_ws_message_bytes, on_activity=session.touch,
    )
    session.listeners.append(send)  # before the handshake: no event can slip past
    session.close_hooks.append(on_session_closed)
    try:
        await ws.prepare(request)
        write_task = asyncio.create_task(writer())
        async for msg in ws:
            if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                protocol.handle(msg.data)
            elif msg.type == WSMsgType.ERROR:
                break
    finally:
        with contextlib.suppress(ValueError):
            session.listeners.remove(send)
        with contextlib.suppress(ValueError):
            session.close_hooks.remove(on_session_closed)
        if write_task is not None:
            write_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await write_task
    return ws


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
            print(f"avatar-stream: {state.engine.name} engine ready{workers}; open {url}",
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
