"""Speech segments from a voice-agent framework into one avatar session, and what became of
each one.

A framework hands over its TTS speech segment by segment, faster than real time, cuts it when
the user barges in, and wants to hear when each segment starts playing and when it finished
(and how far it got). ``SegmentSender`` does that for every adapter: one task sends each
segment's audio and end, in order, on the session's message channel (the data channel of an
``AvatarClient``, the WebSocket of a ``SessionControl``); a barge-in drops what is not yet
sent and reaches the server at once, ahead of anything queued after it; and the session's
events come back as at most one ``started`` and exactly one ``finished`` per segment,
whatever happens to it (played out, cut, refused, the session gone).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from avatar_stream import events
from avatar_stream.client.avatarclient import AvatarClient
from avatar_stream.client.sessioncontrol import SessionControl
from avatar_stream.core.speechinput import MAX_UTTERANCE_ID
from avatar_stream.events import Message

log = logging.getLogger(__name__)

Link = AvatarClient | SessionControl
OnStarted = Callable[["Segment"], Awaitable[None] | None]
OnFinished = Callable[["Segment", float, bool], Awaitable[None] | None]
OnGone = Callable[[str], Awaitable[None] | None]
_Op = tuple[str, "Segment", bytes, int, int]  # ("audio" | "end", segment, pcm16, rate, channels)

# a barge-in's speech.finished comes back in one round trip; past this the segment is
# reported finished without it (the server never heard of it, or the session is gone)
FINISH_TIMEOUT_S = 2.0
# on close, how long the barge-in that silences unfinished segments may take to go out
CLOSE_TIMEOUT_S = 1.0
# a preferred id (a TTS context id) longer than this gets a generated one: room for the
# suffix that makes a reused one unique
MAX_PREFERRED_ID = MAX_UTTERANCE_ID - 24


async def call(function: Callable[..., Any], *args: object) -> Any:
    """``function(*args)``, awaited if it returned an awaitable: a framework's callbacks
    and a link's methods may be plain functions or coroutine functions."""
    result = function(*args)
    if inspect.isawaitable(result):
        return await result
    return result


@dataclass(eq=False)
class Segment:
    """One segment of the framework's speech: one utterance of the session."""

    id: str
    queued: bool = False  # audio of it went to the sender
    sent_s: float = 0.0  # seconds of its audio sent to the server
    ended: bool = False  # the framework said no more audio comes
    started_at: float | None = None  # time.time() when its speech.started came
    cut_at: float | None = None  # time.monotonic() of the barge-in that cut it

    def played_estimate(self) -> float:
        """How much has played by now, for a segment the server reports no more on."""
        if self.started_at is None:
            return 0.0
        return max(0.0, min(self.sent_s, time.time() - self.started_at))


class SegmentSender:
    """Segments into one session: ``open()``, ``audio()`` ..., ``end()``; ``interrupt()``.

    ``on_started(segment)`` runs when the segment's first frame leaves the server;
    ``on_finished(segment, position_s, interrupted)`` exactly once per segment opened, even
    one the server refused or one opened after the session ended (at once, interrupted);
    ``on_gone(reason)`` once, when the session's events end before ``close()`` (the session
    ended, or the connection to it was lost). Each may be a coroutine function.
    ``max_queued``: messages waiting to be sent before ``audio()`` waits (the framework's
    back-pressure). Generated utterance ids carry a random tag of this sender's, so two
    senders on one session (two drivers, a restarted agent) never share one.
    """

    def __init__(
        self,
        link: Link,
        *,
        on_started: OnStarted | None = None,
        on_finished: OnFinished | None = None,
        on_gone: OnGone | None = None,
        max_queued: int = 64,
        finish_timeout_s: float = FINISH_TIMEOUT_S,
        close_timeout_s: float = CLOSE_TIMEOUT_S,
    ) -> None:
        self.link = link
        self.via = "datachannel" if isinstance(link, AvatarClient) else "ws"
        self.on_started = on_started
        self.on_finished = on_finished
        self.on_gone = on_gone
        self.max_queued = max_queued
        self.finish_timeout_s = finish_timeout_s
        self.close_timeout_s = close_timeout_s
        self.segments: dict[str, Segment] = {}  # opened, not yet finished
        self.gone: str | None = None  # why nothing more reaches the session (ended, closed)
        self._ops: deque[_Op] = deque()  # at most max_queued, sent in order by one task
        self._has_ops = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()
        self._recent: deque[str] = deque(maxlen=1024)  # ids the session may still know
        self._tag = secrets.token_hex(3)
        self._ids = itertools.count(1)
        self._interrupting: asyncio.Task[None] | None = None  # the latest barge-in's send
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False

    async def start(self) -> None:
        """Start sending, and listening to the session's events (before any speech)."""
        self._spawn(self._read_events(self.link.events()))  # subscribed here, at once
        self._spawn(self._send())

    # -- the framework's side ---------------------------------------------------------

    def open(self, preferred_id: str | None = None) -> Segment:
        """A new segment; its id is ``preferred_id`` (a TTS context id) if the session has
        not seen it yet, else one made unique. Once the session is gone (or the sender
        closed), the segment finishes at once, interrupted at 0."""
        preferred = preferred_id if preferred_id and len(preferred_id) <= MAX_PREFERRED_ID \
            and preferred_id.isprintable() else None
        uid = preferred
        while uid is None or uid in self.segments or uid in self._recent:
            uid = f"{preferred or 'segment'}-{self._tag}-{next(self._ids)}"
        segment = Segment(uid)
        self.segments[uid] = segment
        self._recent.append(uid)
        self._idle.clear()
        if self.gone is not None:  # nothing will ever play it
            self._spawn(self._finish(segment, 0.0, True))
        return segment

    async def audio(self, segment: Segment, pcm16: bytes, rate: int, channels: int = 1) -> None:
        """Queue PCM16 (little-endian, interleaved) of the segment; waits while the queue is
        full. Audio of a segment that was cut or has finished is dropped; once the session
        is gone the segment finishes (interrupted) instead of waiting."""
        if not pcm16 or not self._live(segment) or segment.ended:
            return
        segment.queued = True
        if not await self._put(("audio", segment, pcm16, rate, channels)):
            await self._finish(segment, segment.played_estimate(), True)

    async def end(self, segment: Segment) -> None:
        """No more audio for the segment: it plays out, then finishes."""
        if segment.ended or not self._live(segment):
            segment.ended = True
            return
        segment.ended = True
        if self.gone is not None:
            await self._finish(segment, segment.played_estimate(), True)
        elif not segment.queued:  # nothing to play: it is over already
            await self._finish(segment, 0.0, False)
        elif not await self._put(("end", segment, b"", 0, 0)):
            await self._finish(segment, segment.played_estimate(), True)

    def interrupt(self) -> list[Segment]:
        """Barge in: every unfinished segment is cut (the server drops what it queued and
        fades out); returns them. Nothing is sent when nothing is unfinished."""
        cut = [s for s in self.segments.values() if s.cut_at is None]
        if not cut or self.gone is not None:
            return []
        now = time.monotonic()
        for segment in cut:
            segment.cut_at = now
        self._ops.clear()  # what was not sent yet never will be
        self._space.set()
        self._interrupting = self._spawn(self._send_interrupt(self._interrupting))
        self._spawn(self._expire(cut))
        return cut

    async def drain(self, timeout: float) -> bool:
        """Wait until every segment has finished; False if some had not by ``timeout``."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)
        return not self.segments

    async def close(self) -> None:
        """Stop. Segments not yet finished are cut at the server (best effort, within
        ``close_timeout_s``: the avatar stops saying them) and finish now, interrupted."""
        if self._closed:
            return
        self._closed = True
        speaking = self.gone is None and any(
            s.cut_at is None and s.queued for s in self.segments.values())
        self.gone = self.gone or "the sender closed"
        self._ops.clear()
        self._space.set()  # audio() waiting for room returns
        if speaking:
            try:
                await asyncio.wait_for(call(self.link.interrupt), self.close_timeout_s)
            except Exception as exc:  # a timeout included
                log.warning("avatar session not told to stop speaking: %r", exc)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._finish_all()

    # -- internals ----------------------------------------------------------------------

    def _live(self, segment: Segment) -> bool:
        return segment.cut_at is None and self.segments.get(segment.id) is segment

    def _spawn(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _put(self, op: _Op) -> bool:
        """Queue one message for the sending task; False (nothing queued) once the session
        is gone, even while waiting for room."""
        while len(self._ops) >= self.max_queued and self.gone is None:
            self._space.clear()
            await self._space.wait()
        if self.gone is not None:
            return False
        self._ops.append(op)
        self._has_ops.set()
        return True

    async def _send_interrupt(self, before: asyncio.Task[None] | None) -> None:
        if before is not None:  # each barge-in's send waits for the one before it
            await asyncio.wait([before])
        try:
            await call(self.link.interrupt)
        except Exception as exc:  # the events (or the timeout) finish the segments anyway
            log.warning("barge-in not sent to the avatar session: %s", exc)

    async def _send(self) -> None:
        """The one task that sends: segments' audio and ends, in order."""
        while True:
            while not self._ops:
                self._has_ops.clear()
                await self._has_ops.wait()
            kind, segment, pcm16, rate, channels = self._ops.popleft()
            self._space.set()
            if self._interrupting is not None:  # a barge-in goes before anything after it
                await asyncio.wait([self._interrupting])
            if not self._live(segment):
                continue
            try:
                if kind == "audio":
                    await self.link.push_speech(pcm16, rate, segment.id, end=False,
                                                channels=channels, via=self.via)
                    segment.sent_s += len(pcm16) / (2 * channels * rate)
                else:
                    await self.link.end_utterance(segment.id, via=self.via)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the rest goes on; this segment will never play out
                log.warning("avatar session refused %s of segment %s (%s): reported "
                            "finished, interrupted", kind, segment.id, exc)
                await self._finish(segment, segment.played_estimate(), True)

    async def _read_events(self, stream: AsyncIterator[Message]) -> None:
        async for event in stream:
            await self._on_event(event)
        await self._went("the connection to the avatar session closed")

    async def _on_event(self, event: Message) -> None:
        kind = event.get("type")
        if kind == events.SESSION_ENDED:
            await self._went(f"the avatar session ended ({event.get('reason')})")
            return
        segment = self.segments.get(str(event.get("utterance_id")))
        if segment is None:
            return
        if kind == events.SPEECH_STARTED and segment.started_at is None:
            segment.started_at = time.time()
            if self.on_started is not None:
                await _notify(self.on_started, segment)
        elif kind == events.SPEECH_FINISHED:
            if not segment.ended and not event.get("interrupted"):
                # the server ended it after --utterance-idle-end without audio: what
                # follows would be a new utterance the framework does not know of
                log.warning("the avatar ended segment %s before the framework did (no audio "
                            "for --utterance-idle-end seconds); its later audio is dropped",
                            segment.id)
            await self._finish(segment, float(event.get("position_s") or 0.0),
                               bool(event.get("interrupted")))

    async def _went(self, reason: str) -> None:
        """The session is gone: what is unfinished finishes, and so will what comes."""
        if self.gone is None:
            self.gone = reason
            self._ops.clear()
            self._space.set()
            log.warning("%s: the avatar no longer speaks", reason)
            if self.on_gone is not None:
                await _notify(self.on_gone, reason)
        await self._finish_all()

    async def _expire(self, cut: list[Segment]) -> None:
        """Finish cut segments whose speech.finished never came (the server had not heard
        of them yet, or the session went away)."""
        await asyncio.sleep(self.finish_timeout_s)
        for segment in cut:
            if self.segments.get(segment.id) is segment:
                await self._finish(segment, segment.played_estimate(), True)

    async def _finish(self, segment: Segment, position_s: float, interrupted: bool) -> None:
        if self.segments.get(segment.id) is not segment:
            return  # finished already: exactly once
        del self.segments[segment.id]
        if self.on_finished is not None:
            await _notify(self.on_finished, segment, position_s, interrupted)
        if not self.segments:
            self._idle.set()  # after the callback: drain() returns once it has run

    async def _finish_all(self) -> None:
        while self.segments:
            segment = next(iter(self.segments.values()))
            await self._finish(segment, segment.played_estimate(), True)


async def _notify(callback: Callable[..., Any], *args: object) -> None:
    try:
        await call(callback, *args)
    except asyncio.CancelledError:
        raise
    except Exception:  # the framework's handler failing must not stop the events
        log.exception("segment callback %r failed", callback)
