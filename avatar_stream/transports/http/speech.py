"""Pushed-speech routes: audio bodies (``POST .../audio``), ``end``, text to speech
(``say``), and the session's WebSocket (events out, the speech protocol in)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time

from aiohttp import WSMsgType, web

from avatar_stream import events
from avatar_stream.audio.decode import decode_body
from avatar_stream.audio.tts import TTSError
from avatar_stream.core.speechinput import check_utterance_id
from avatar_stream.errors import SpeechError
from avatar_stream.events import Event, Message
from avatar_stream.transports.http.body import read_json_object, read_limited
from avatar_stream.transports.http.errors import HTTPJSONError, speech_error
from avatar_stream.transports.http.sessions import session_for
from avatar_stream.transports.http.state import STATE
from avatar_stream.transports.protocol import SpeechProtocol

log = logging.getLogger(__name__)
DECODE_OFF_LOOP_BYTES = 256 * 1024  # bodies bigger than this are decoded on a thread
WS_OUTBOX = 256  # events waiting for a slow WebSocket reader before it is disconnected


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
    session = session_for(request)
    state = request.app[STATE]
    uid_param = request.query.get("utterance_id")
    try:
        uid = check_utterance_id(uid_param) if uid_param is not None else session.input.new_id()
    except SpeechError as exc:
        raise speech_error(exc) from None
    end = _flag(request.query.get("end"), default=uid_param is None)
    ctype = request.headers.get("Content-Type", "")
    body = await read_limited(request, state.config.max_audio_bytes)
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
        raise speech_error(exc) from None
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
    session = session_for(request)
    data = await read_json_object(request)
    try:
        uid = check_utterance_id(data.get("utterance_id"))
    except SpeechError as exc:
        raise speech_error(exc) from None
    return web.json_response({"utterance_id": uid, "was_open": session.input.end(uid)})


async def say(request: web.Request) -> web.Response:
    """``POST /v1/sessions/{id}/say {"text": ..., "voice"?, "utterance_id"?}``: speak text
    through the TTS backend; the speech is queued as it is synthesised."""
    session = session_for(request)
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
        raise speech_error(exc) from None
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
        raise speech_error(exc) from None
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
    session = session_for(request, allow_query_token=True)
    state = request.app[STATE]
    # aiohttp refuses a message of exactly max_msg_size: the limit itself must pass
    ws = web.WebSocketResponse(max_msg_size=state.config.max_ws_message_bytes + 1, heartbeat=30)
    if not ws.can_prepare(request).ok:
        raise HTTPJSONError(426, "this is the session's WebSocket: connect with an Upgrade: "
                                 "websocket handshake", Upgrade="websocket")
    outbox: asyncio.Queue[Event | Message | None] = asyncio.Queue(maxsize=WS_OUTBOX)
    too_slow: list[bool] = []  # set once: the close for a stuck reader is under way
    write_task: asyncio.Task[None] | None = None

    def send(event: Event | Message) -> None:
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

    def reply(event: Message) -> None:  # to this connection only: acks, pong, its errors
        if event["type"] == events.ERROR:
            state.metrics.errors.labels("control").inc()
        send(event)

    protocol = SpeechProtocol(
        session.input, session.interrupt, reply,
        max_binary_bytes=state.config.max_ws_message_bytes, on_activity=session.touch,
        set_state=session.set_state,
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
