"""Controlling a session without media: the calls a voice-assistant front-end makes.

``SessionControl`` drives a session that another peer holds (typically the user's browser,
which created it and watches the avatar): it pushes speech over the session's WebSocket
(or HTTP), ends utterances, barges in, asks for ``say``, and iterates the session's
events. It needs only the session id and the session's token (or the API key).

``SessionCalls`` holds the HTTP calls shared with ``client.AvatarClient``, and
``SpeechSender`` the speech protocol shared by the WebSocket and the data channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import numpy as np

from avatar_stream.core.turnstate import check_state
from avatar_stream.events import Message

Audio = np.ndarray | bytes
CHUNK_BYTES = 16 * 1024  # per binary message: safe for every SCTP stack, small for a WebSocket
ACK_TIMEOUT_S = 15.0
# speech sent and not yet known to be queued is kept to resend (the queue may refuse it);
# a ping after this much tells when the server has taken it all
CHECKPOINT_BYTES = 256 * 1024
# a full queue: wait what the server says it takes to have room, plus a margin (room for
# more than the one chunk), at most MAX_RESUME_S (a refused utterance stays open that long
# past --utterance-idle-end's default); give up when nothing of it is taken for GIVE_UP_S
RESUME_MARGIN_S, MAX_RESUME_S, GIVE_UP_S = 0.25, 0.5, 30.0


class RequestError(RuntimeError):
    """The server refused a call: ``status`` (HTTP, or 0 for a protocol error event) and why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{message} ({status})" if status else message)
        self.status = status
        self.message = message

    def __reduce__(self) -> tuple[type[RequestError], tuple[int, str]]:
        """Picklable as it was made (the bench's client processes send it back)."""
        return RequestError, (self.status, self.message)


# -- audio in any form -> what the server takes ---------------------------------------------


def as_interleaved(audio: np.ndarray, channels: int | None) -> tuple[np.ndarray, int]:
    """A (n,) or (n, channels) array -> flat interleaved samples and the channel count."""
    a = np.asarray(audio)
    if a.ndim == 2:
        if channels not in (None, a.shape[1]):
            raise ValueError(f"array has {a.shape[1]} channels, channels={channels}")
        return a.reshape(-1), a.shape[1]
    if a.ndim != 1:
        raise ValueError("audio must be shaped (samples,) or (samples, channels)")
    return a, channels or 1


def to_pcm16(audio: np.ndarray, channels: int | None = None) -> tuple[bytes, int]:
    """Little-endian PCM16 bytes and the channel count of an int16 or float array."""
    flat, ch = as_interleaved(audio, channels)
    if flat.dtype == np.int16:
        return flat.astype("<i2", copy=False).tobytes(), ch
    if flat.dtype.kind in "iu":
        raise ValueError("integer audio must be int16; pass floats in [-1, 1] otherwise")
    pcm = np.round(np.clip(np.nan_to_num(flat.astype(np.float64)), -1, 1) * 32767)
    return pcm.astype("<i2").tobytes(), ch


def stream_pcm16(audio: Audio, rate: int, channels: int | None) -> tuple[bytes, int, int]:
    """What the speech protocol sends: (PCM16 bytes, rate, channels). ``bytes`` are PCM16
    already, or a WAV file (decoded; its own rate wins)."""
    if isinstance(audio, bytes | bytearray | memoryview):
        raw = bytes(audio)
        if raw[:4] == b"RIFF":
            from avatar_stream.audio.decode import decode_wav  # only the WAV case needs it

            pcm = decode_wav(raw)
            return to_pcm16(pcm.samples)[0], pcm.rate, 1
        return raw, rate, channels or 1
    data, ch = to_pcm16(audio, channels)
    return data, rate, ch


def http_body(audio: Audio, rate: int, channels: int | None = None) -> tuple[bytes, str]:
    """(body, content type) for ``POST .../audio``: WAV bytes go as they are, float arrays
    as float32 (no quantisation), the rest as PCM16."""
    if isinstance(audio, bytes | bytearray | memoryview):
        raw = bytes(audio)
        if raw[:4] == b"RIFF":
            return raw, "audio/wav"
        return raw, f"audio/pcm;rate={rate};channels={channels or 1}"
    flat, ch = as_interleaved(audio, channels)
    if flat.dtype.kind == "f":
        return flat.astype("<f4").tobytes(), f"audio/pcm;rate={rate};channels={ch};format=f32"
    data, ch = to_pcm16(flat, ch)
    return data, f"audio/pcm;rate={rate};channels={ch}"


# -- events -----------------------------------------------------------------------------------


class EventHub:
    """Every event, to every ``events()`` iterator (each gets its own bounded queue)."""

    def __init__(self) -> None:
        self._subscribers: list[asyncio.Queue[Message | None]] = []
        self.finished = False  # the session or the connection ended: no more events

    def publish(self, event: Message) -> None:
        for q in list(self._subscribers):
            with contextlib.suppress(asyncio.QueueFull):
                q.put_nowait(dict(event))

    def finish(self) -> None:
        self.finished = True
        for q in list(self._subscribers):
            with contextlib.suppress(asyncio.QueueFull):
                q.put_nowait(None)

    def events(self, maxsize: int = 1000) -> AsyncIterator[Message]:
        """Events from now on, until the session or connection ends (at once if it has).
        Subscribed when called, not when first iterated: nothing published in between is
        missed. Iterate it to its end or ``aclose()`` it."""
        q: asyncio.Queue[Message | None] = asyncio.Queue(maxsize)
        if self.finished:
            q.put_nowait(None)
        else:
            self._subscribers.append(q)
        return self._drain(q)

    async def _drain(self, q: asyncio.Queue[Message | None]) -> AsyncIterator[Message]:
        try:
            while (event := await q.get()) is not None:
                yield event
        finally:
            with contextlib.suppress(ValueError):
                self._subscribers.remove(q)


# -- the speech protocol on a message channel -----------------------------------------------


class SpeechSender:
    """Sends one utterance as ``start``, binary PCM16 chunks, ``end`` and waits for the
    server's ``ack`` of the end, raising the first error the server reported meanwhile.

    A chunk the server refuses because the session's speech queue is full (its error
    names the utterance, the chunk's byte ``offset`` since the start, and ``retry_after``)
    is not lost: the server drops the rest of the utterance's chunks until it is started
    again, and this sender waits a moment (it speaks at real time meanwhile), starts it
    again and resends from that chunk. So a reply longer than the queue is spoken whole,
    and sending waits while the queue is full (back-pressure). Until the server is known
    to have taken them (a ``ping``'s ``pong`` after them), the chunks sent are kept: at
    most about CHECKPOINT_BYTES and what is in flight.

    ``send_text`` / ``send_bytes`` write one message; ``drain`` waits while the channel
    has too much buffered (the data channel's ``bufferedAmount``), so a long utterance
    never piles up in this process's memory.
    """

    def __init__(
        self,
        send_text: Callable[[str], Awaitable[None]],
        send_bytes: Callable[[bytes], Awaitable[None]],
        drain: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.send_text = send_text
        self.send_bytes = send_bytes
        self.drain = drain
        self._lock = asyncio.Lock()  # one utterance at a time on a channel
        self._replies: asyncio.Queue[Message] = asyncio.Queue()
        self._open: tuple[str, int, int] | None = None  # the utterance the channel has open
        self._starts = 0  # starts sent: a pong's checkpoint counts only for the same start
        self._sent = 0  # bytes of the open utterance since its start
        self._kept: deque[tuple[int, bytes]] = deque()  # (offset, chunk) not known taken
        self._unchecked = 0  # bytes sent since the last ping
        self._checkpoints: deque[tuple[int, int]] = deque()  # (start, offset) per ping out
        self._refused: Message | None = None  # the open utterance's refused chunk
        self._stuck_since: float | None = None  # refused at its start since, no progress
        self._cut: str | None = None  # the utterance a barge-in cut: nothing of it resent
        self._woken = asyncio.Event()

    def on_message(self, event: Message) -> None:
        """Feed every event the channel receives (acks, pongs and errors are picked out)."""
        if event.get("type") in ("ack", "error", "pong"):
            self._replies.put_nowait(event)

    def cut(self) -> None:
        """A barge-in went out: the open utterance is over at the server, so nothing of it
        is resent (a wait for room ends at once)."""
        if self._open is not None:
            self._cut = self._open[0]
        self._woken.set()

    async def send(
        self, pcm16: bytes, rate: int, channels: int, utterance_id: str | None, end: bool
    ) -> str:
        async with self._lock:
            await self._settle()  # what the server said about earlier pieces
            if self._open is None or utterance_id is None or \
                    self._open != (utterance_id, rate, channels):
                # a new utterance (or a new format): start it, once the server has all of
                # the open one (a new start ends it); a further piece needs no start
                await self._settle(barrier=True)
                await self._start(utterance_id, rate, channels)
            assert self._open is not None
            uid = self._open[0]
            await self._send_audio(pcm16, channels)
            if end:
                await self._end(uid)
            return uid

    async def end(self, utterance_id: str) -> None:
        """End an utterance on this channel, after the audio already sent on it."""
        async with self._lock:
            await self._settle()
            await self._end(utterance_id)

    async def _start(self, utterance_id: str | None, rate: int, channels: int) -> None:
        start: Message = {"type": "start", "sample_rate": rate, "channels": channels}
        if utterance_id is not None:
            start["utterance_id"] = utterance_id
        self._open, self._refused = None, None
        self._sent, self._unchecked = 0, 0
        self._kept.clear()
        self._starts += 1
        await self.send_text(json.dumps(start))
        ack = await self._reply("start")
        self._open = (str(ack["utterance_id"]), rate, channels)
        self._cut = None

    async def _send_audio(self, pcm16: bytes, channels: int) -> None:
        step = CHUNK_BYTES - CHUNK_BYTES % (2 * channels)
        for i in range(0, len(pcm16), step):
            chunk = pcm16[i : i + step]
            if self.drain is not None:
                await self.drain()
            await self.send_bytes(chunk)
            self._kept.append((self._sent, chunk))
            self._sent += len(chunk)
            self._unchecked += len(chunk)
        if self._unchecked >= CHECKPOINT_BYTES:
            await self._ping()

    async def _end(self, utterance_id: str) -> None:
        if self._open is not None and self._open[0] == utterance_id:
            await self._settle(barrier=True)  # all of it taken before the end closes it
            self._open = None
            self._kept.clear()
        await self.send_text(json.dumps({"type": "end", "utterance_id": utterance_id}))
        await self._reply("end")

    async def _ping(self) -> None:
        await self.send_text(json.dumps({"type": "ping"}))
        self._checkpoints.append((self._starts, self._sent))
        self._unchecked = 0

    async def _settle(self, barrier: bool = False) -> None:
        """Take the server's replies so far: pongs free kept chunks, a refused chunk is
        waited out and resent (until the server has taken all of it), another error is
        raised. With ``barrier``, first until the server has taken everything sent."""
        while True:
            pongs = 0
            if barrier and self._open is not None and self._kept and \
                    self._cut != self._open[0]:
                await self._ping()
                pongs = len(self._checkpoints)  # ours is the last of them to come back
            while pongs or not self._replies.empty():
                event = await self._next_reply() if pongs else self._replies.get_nowait()
                if self._take(event) and pongs:
                    pongs -= 1
            if self._refused is None:
                self._stuck_since = None
                return
            await self._resume()
            barrier = True  # the resent audio is taken before anything new goes

    def _take(self, event: Message) -> bool:
        """One reply that no ``_reply`` waits for; True if it was a pong."""
        if event["type"] == "pong":
            if self._checkpoints:
                starts, offset = self._checkpoints.popleft()
                if starts == self._starts and self._refused is None:
                    while self._kept and self._kept[0][0] < offset:
                        self._kept.popleft()  # the server has taken it
            return True
        if event["type"] == "error":
            if event.get("code") == "queue_full" and "offset" in event:
                if self._open is not None and event.get("utterance_id") == self._open[0] \
                        and self._refused is None:
                    self._refused = event
                return False  # else: of an utterance that is over, nothing to resend
            raise RequestError(0, f"{event.get('code')}: {event.get('message')}")
        return False

    async def _resume(self) -> None:
        """The server refused a chunk of the open utterance (the queue was full) and
        dropped what followed: wait for room, start it again, resend from that chunk."""
        refused, self._refused = self._refused, None
        assert refused is not None and self._open is not None
        uid, rate, channels = self._open
        offset = int(refused["offset"])
        now = time.monotonic()
        if offset > 0 or self._stuck_since is None:
            self._stuck_since = now
        elif now - self._stuck_since > GIVE_UP_S:  # the queue has not moved: give up
            self._stuck_since = None
            raise RequestError(0, f"queue_full: {refused.get('message')}")
        wait = min(float(refused.get("retry_after") or 0.0) + RESUME_MARGIN_S, MAX_RESUME_S)
        self._woken.clear()
        if self._cut != uid:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._woken.wait(), wait)
        if self._cut == uid:  # a barge-in cut it meanwhile: nothing of it is wanted
            self._open = None
            self._kept.clear()
            return
        tail = b"".join(chunk for at, chunk in self._kept if at >= offset)
        await self._start(uid, rate, channels)
        await self._send_audio(tail, channels)

    async def _next_reply(self) -> Message:
        try:
            return await asyncio.wait_for(self._replies.get(), ACK_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise RequestError(0, "no answer from the server") from None

    async def _reply(self, of: str) -> Message:
        deadline = time.monotonic() + ACK_TIMEOUT_S
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RequestError(0, f"no acknowledgement of {of!r} from the server")
            try:
                event = await asyncio.wait_for(self._replies.get(), left)
            except asyncio.TimeoutError:
                raise RequestError(0, f"no acknowledgement of {of!r} from the server") \
                    from None
            if event["type"] == "ack" and event.get("of") == of:
                return event
            self._take(event)  # raises the error that answers it


# -- HTTP calls on one session ----------------------------------------------------------------


class SessionCalls:
    """The HTTP calls on one session; needs ``base_url``, ``session_id``, ``token``,
    ``api_key`` and an open ``_http`` session."""

    base_url: str
    session_id: str | None
    token: str | None
    api_key: str | None
    _http: aiohttp.ClientSession | None

    def _auth(self) -> dict[str, str]:
        credential = self.api_key or self.token  # a key never expires
        return {"Authorization": f"Bearer {credential}"} if credential else {}

    def _url(self, path: str = "") -> str:
        if self.session_id is None:
            raise RuntimeError("no session yet")
        return f"{self.base_url}/v1/sessions/{self.session_id}{path}"

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        if self._http is None:
            raise RuntimeError("not connected")
        headers = {**self._auth(), **kwargs.pop("headers", {})}
        async with self._http.request(method, self._url(path), headers=headers, **kwargs) as r:
            if r.status == 204:
                return None
            try:
                data = await r.json(content_type=None)
            except (ValueError, aiohttp.ContentTypeError):
                data = {"error": (await r.text())[:200]}
            if r.status >= 400:
                raise RequestError(r.status, str(data.get("error", data)))
            return data

    async def push_speech_http(
        self, audio: Audio, rate: int, utterance_id: str | None = None, end: bool = True,
        channels: int | None = None,
    ) -> dict[str, Any]:
        """``POST .../audio``; returns the server's reply (``utterance_id``, ``queued_s``...).
        Raises RequestError (429 when the queue is full: nothing of this push was queued)."""
        body, ctype = http_body(audio, rate, channels)
        params = {"end": "true" if end else "false"}
        if utterance_id is not None:
            params["utterance_id"] = utterance_id
        return await self._call("POST", "/audio", data=body, params=params,  # type: ignore[no-any-return]
                                headers={"Content-Type": ctype})

    async def end_utterance_http(self, utterance_id: str) -> bool:
        reply = await self._call("POST", "/end", json={"utterance_id": utterance_id})
        return bool(reply["was_open"])

    async def interrupt_http(self) -> list[str]:
        """Barge in over HTTP; returns the utterances cut."""
        return list((await self._call("POST", "/interrupt"))["interrupted"])

    async def set_state_http(self, state: str) -> dict[str, Any]:
        """``POST .../state``; returns ``{"turn_state", "turn_state_set"}`` (what shows now,
        what was set). Raises RequestError (400 for an unknown state)."""
        return await self._call("POST", "/state", json={"state": state})  # type: ignore[no-any-return]

    async def say(self, text: str, voice: str | None = None,
                  utterance_id: str | None = None) -> dict[str, Any]:
        """Speak ``text`` through the server's TTS; returns when it is queued."""
        body: dict[str, Any] = {"text": text}
        if voice is not None:
            body["voice"] = voice
        if utterance_id is not None:
            body["utterance_id"] = utterance_id
        return await self._call("POST", "/say", json=body)  # type: ignore[no-any-return]

    async def stats(self) -> dict[str, Any]:
        return await self._call("GET", "")  # type: ignore[no-any-return]

    async def delete(self) -> None:
        """End the session for everyone (the browser's peer connection too)."""
        await self._call("DELETE", "")


class SessionControl(SessionCalls):
    """Drive a session another peer holds: ``async with SessionControl(url, sid, token)``.

    Speech goes over the session's WebSocket (``via="ws"``, the default: one connection,
    ordered with the events) or HTTP. Events (``speech.started``, ``speech.finished``,
    ``session.ended``...) arrive on the WebSocket; iterate them with ``events()``.
    """

    def __init__(self, base_url: str, session_id: str, token: str | None = None, *,
                 api_key: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.session_id = session_id
        self.token = token
        self.api_key = api_key
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse[Any] | None = None
        self._reader: asyncio.Task[None] | None = None
        self.hub = EventHub()
        self.received: list[tuple[float, Message]] = []
        self._sender: SpeechSender | None = None
        self._seen: set[int] = set()
        self._arrived = asyncio.Event()

    async def __aenter__(self) -> SessionControl:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Open the WebSocket (raises RequestError: 401/403 token, 404/410 session)."""
        self._http = aiohttp.ClientSession()
        try:
            ws = await self._http.ws_connect(self._url("/ws"), headers=self._auth(), heartbeat=30)
        except aiohttp.WSServerHandshakeError as exc:
            await self._http.close()
            raise RequestError(exc.status, f"WebSocket refused: {exc.message}") from None
        except BaseException:  # no server there, cancelled...: nothing of it stays open
            await self._http.close()
            raise
        self._ws = ws
        self._sender = SpeechSender(ws.send_str, ws.send_bytes)
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self._ws is not None and self._sender is not None
        async for msg in self._ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            with contextlib.suppress(ValueError):
                event = json.loads(msg.data)
                self.received.append((time.perf_counter(), event))
                self._sender.on_message(event)
                self.hub.publish(event)
                self._arrived.set()
        self.hub.finish()
        self._arrived.set()

    @property
    def connected(self) -> bool:
        return self._ws is not None and not self._ws.closed

    def events(self) -> AsyncIterator[Message]:
        """Session events from now on (ends when the WebSocket closes)."""
        return self.hub.events()

    async def wait_event(self, kind: str,
                         predicate: Callable[[Message], bool] | None = None) -> Message:
        """The next not yet waited-for event of this type (earlier ones are checked too)."""
        while True:
            for i, (_, event) in enumerate(self.received):
                if i not in self._seen and event.get("type") == kind and \
                        (predicate is None or predicate(event)):
                    self._seen.add(i)
                    return event
            if not self.connected:
                raise RequestError(0, "the WebSocket closed")
            self._arrived.clear()
            await self._arrived.wait()

    async def push_speech(
        self, audio: Audio, rate: int, utterance_id: str | None = None, end: bool = True, *,
        channels: int | None = None, via: str = "ws",
    ) -> str:
        """Queue speech (numpy: float in [-1, 1] or int16, (n,) or (n, channels); bytes:
        PCM16 or a WAV file) at any ``rate``; returns the utterance id. With ``end=False``
        more pieces of the same utterance may follow (pass the id back). Over the
        WebSocket a full speech queue is waited out (the refused audio is resent); over
        HTTP it is a RequestError (429)."""
        if via == "http":
            reply = await self.push_speech_http(audio, rate, utterance_id, end, channels)
            return str(reply["utterance_id"])
        if via != "ws" or self._sender is None:
            raise ValueError("via must be 'ws' (after connect()) or 'http'")
        pcm16, rate, ch = stream_pcm16(audio, rate, channels)
        return await self._sender.send(pcm16, rate, ch, utterance_id, end)

    async def end_utterance(self, utterance_id: str, via: str = "ws") -> None:
        """No more audio for this utterance. Over the WebSocket (default) the end follows
        the audio already sent there; over HTTP it could overtake it."""
        if via == "ws" and self._sender is not None and self.connected:
            await self._sender.end(utterance_id)
        else:
            await self.end_utterance_http(utterance_id)

    async def interrupt(self) -> None:
        """Barge in (over the WebSocket when open, else HTTP)."""
        if self._sender is not None:
            self._sender.cut()
        if self.connected and self._ws is not None:
            await self._ws.send_str(json.dumps({"type": "interrupt"}))
        else:
            await self.interrupt_http()

    async def set_state(self, state: str, via: str = "ws") -> None:
        """The turn state: ``listening`` (the user speaks), ``thinking`` (the reply is on
        its way) or ``idle``. Speech shows over it; ``thinking`` ends when speech starts.
        Over the WebSocket (default, ordered with the speech sent there) or HTTP; a
        ``state.changed`` event follows when what the face shows changes. ValueError for
        another state (checked here, so the server never has to refuse it)."""
        check_state(state)
        if via == "ws" and self.connected and self._ws is not None:
            await self._ws.send_str(json.dumps({"type": "state", "state": state}))
        elif via in ("ws", "http"):
            await self.set_state_http(state)
        else:
            raise ValueError("via must be 'ws' or 'http'")

    async def close(self, delete: bool = False) -> None:
        """Close the WebSocket; with ``delete`` also end the session for everyone."""
        if delete and self._http is not None:
            with contextlib.suppress(RequestError, aiohttp.ClientError):
                await self.delete()
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._reader, 2)
        if self._http is not None:
            await self._http.close()
