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
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from avatar_stream import events
from avatar_stream.client.avatarclient import AvatarClient
from avatar_stream.client.sessioncontrol import SessionControl
from avatar_stream.core.speechinput import MAX_UTTERANCE_ID
from avatar_stream.events import Message

log = logging.getLogger(__name__)

Link = AvatarClient | SessionControl
OnStarted = Callable[["Segment"], Awaitable[None] | None]
OnFinished = Callable[["Segment", float, bool], Awaitable[None] | None]

# a barge-in's speech.finished comes back in one round trip; past this the segment is
# reported finished without it (the server never heard of it, or the session is gone)
FINISH_TIMEOUT_S = 2.0


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
    ``on_finished(segment, position_s, interrupted)`` exactly once per segment opened.
    Either may be a coroutine function. ``max_queued``: messages waiting to be sent before
    ``audio()`` waits (the framework's back-pressure).
    """

    def __init__(
        self,
        link: Link,
        *,
        on_started: OnStarted | None = None,
        on_finished: OnFinished | None = None,
        max_queued: int = 64,
        finish_timeout_s: float = FINISH_TIMEOUT_S,
    ) -> None:
        self.link = link
        self.via = "datachannel" if isinstance(link, AvatarClient) else "ws"
        self.on_started = on_started
        self.on_finished = on_finished
        self.finish_timeout_s = finish_timeout_s
        self.segments: dict[str, Segment] = {}  # opened, not yet finished
        self._ops: asyncio.Queue[tuple[str, Segment, bytes, int, int]] = \
            asyncio.Queue(max_queued)
        self._recent: deque[str] = deque(maxlen=1024)  # ids the session may still know
        self._ids = itertools.count(1)
        self._interrupting: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False

    async def start(self) -> None:
        """Start sending, and listening to the session's events (before any speech)."""
        self._spawn(self._read_events())
        self._spawn(self._send())
        await asyncio.sleep(0)  # the reader subscribes to the events before anything is sent

    # -- the framework's side ---------------------------------------------------------

    def open(self, preferred_id: str | None = None) -> Segment:
        """A new segment; its id is ``preferred_id`` (a TTS context id) if the session has
        not seen it yet, else one made unique."""
        base = preferred_id if preferred_id and len(preferred_id) <= MAX_UTTERANCE_ID - 8 \
            and preferred_id.isprintable() else "segment"
        uid = base if preferred_id == base else f"{base}-{next(self._ids)}"
        while uid in self.segments or uid in self._recent:
            uid = f"{base}-{next(self._ids)}"
        segment = Segment(uid)
        self.segments[uid] = segment
        self._recent.append(uid)
        self._idle.clear()
        return segment

    async def audio(self, segment: Segment, pcm16: bytes, rate: int, channels: int = 1) -> None:
        """Queue PCM16 (little-endian, interleaved) of the segment; waits while the queue is
        full. Audio of a segment that was cut or has finished is dropped."""
        if not pcm16 or not self._live(segment) or segment.ended:
            return
        segment.queued = True
        await self._ops.put(("audio", segment, pcm16, rate, channels))

    async def end(self, segment: Segment) -> None:
        """No more audio for the segment: it plays out, then finishes."""
        if segment.ended or not self._live(segment):
            segment.ended = True
            return
        segment.ended = True
        if not segment.queued:  # nothing to play: it is over already
            await self._finish(segment, 0.0, False)
            return
        await self._ops.put(("end", segment, b"", 0, 0))

    def interrupt(self) -> list[Segment]:
        """Barge in: every unfinished segment is cut (the server drops what it queued and
        fades out); returns them. Nothing is sent when nothing is unfinished."""
        cut = [s for s in self.segments.values() if s.cut_at is None]
        if not cut or self._closed:
            return []
        now = time.monotonic()
        for segment in cut:
            segment.cut_at = now
        while not self._ops.empty():  # what was not sent yet never will be
            self._ops.get_nowait()
        self._interrupting = asyncio.create_task(self._send_interrupt())
        self._spawn(self._expire(cut))
        return cut

    async def drain(self, timeout: float) -> bool:
        """Wait until every segment has finished; False if some had not by ``timeout``."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)
        return not self.segments

    async def close(self) -> None:
        """Stop; segments not yet finished finish now, as interrupted."""
        self._closed = True
        tasks = list(self._tasks) + ([self._interrupting] if self._interrupting else [])
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._finish_all()

    # -- internals ----------------------------------------------------------------------

    def _live(self, segment: Segment) -> bool:
        return segment.cut_at is None and self.segments.get(segment.id) is segment

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_interrupt(self) -> None:
        try:
            result = self.link.interrupt()
            if inspect.isawaitable(result):
                await result
        except Exception as exc:  # the events (or the timeout) finish the segments anyway
            log.warning("barge-in not sent to the avatar session: %s", exc)

    async def _send(self) -> None:
        """The one task that sends: segments' audio and ends, in order."""
        while True:
            kind, segment, pcm16, rate, channels = await self._ops.get()
            if self._interrupting is not None:  # a barge-in goes before anything after it
                await asyncio.shield(self._interrupting)
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
            except Exception as exc:  # one refused message must not stop the rest
                log.warning("avatar session refused %s of segment %s: %s", kind, segment.id,
                            exc)

    async def _read_events(self) -> None:
        async for event in self.link.events():
            await self._on_event(event)
        await self._finish_all()  # the session, or our connection to it, is gone

    async def _on_event(self, event: Message) -> None:
        kind = event.get("type")
        if kind == events.SESSION_ENDED:
            await self._finish_all()
            return
        segment = self.segments.get(str(event.get("utterance_id")))
        if segment is None:
            return
        if kind == events.SPEECH_STARTED and segment.started_at is None:
            segment.started_at = time.time()
            if self.on_started is not None:
                await _call(self.on_started, segment)
        elif kind == events.SPEECH_FINISHED:
            if not segment.ended and not event.get("interrupted"):
                # the server ended it after --utterance-idle-end without audio: what
                # follows would be a new utterance the framework does not know of
                log.warning("the avatar ended segment %s before the framework did (no audio "
                            "for --utterance-idle-end seconds); its later audio is dropped",
                            segment.id)
            await self._finish(segment, float(event.get("position_s") or 0.0),
                               bool(event.get("interrupted")))

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
            await _call(self.on_finished, segment, position_s, interrupted)
        if not self.segments:
            self._idle.set()  # after the callback: drain() returns once it has run

    async def _finish_all(self) -> None:
        for segment in list(self.segments.values()):
            await self._finish(segment, segment.played_estimate(), True)


async def _call(callback: Callable[..., Awaitable[None] | None], *args: object) -> None:
    try:
        result = callback(*args)
        if inspect.isawaitable(result):
            await result
    except asyncio.CancelledError:
        raise
    except Exception:  # the framework's handler failing must not stop the events
        log.exception("segment callback %r failed", callback)
