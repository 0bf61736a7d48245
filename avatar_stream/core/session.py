"""One avatar session, whatever carries it: its speech queue and speech input, engine
stream and synchronizer, events and lifetime.

A transport (``transports/webrtc/peer.py``; a framework adapter) creates the session, opens
it with a :class:`MediaSink` once it knows what its viewer takes, starts it when the viewer
is connected, hands it the microphone's audio and the control messages, and listens to its
events. The session holds no socket of its own.

A session ends the same way whatever ends it (DELETE, the transport failing or closing, a
connect timeout, the idle timeout or maximum duration, server shutdown): ``close()`` tells
its listeners why (``session.ended``), stops the synchronizer, closes the transport and the
engine stream, runs its close hooks (WebSockets) and drops its queues.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from avatar_stream import events
from avatar_stream.config import ServerConfig
from avatar_stream.core.sink import MediaSink, Transport
from avatar_stream.core.speechinput import SpeechInput
from avatar_stream.core.speechqueue import SpeechQueue
from avatar_stream.core.synchronizer import Synchronizer
from avatar_stream.core.turnstate import TurnState
from avatar_stream.core.worker import EngineWorker
from avatar_stream.engines.base import Avatar, Engine, EngineStream
from avatar_stream.events import Event
from avatar_stream.media import FPS
from avatar_stream.scale.metrics import Metrics

log = logging.getLogger(__name__)
HANDOVER_S = 1.5 / FPS  # the avatar still speaks if the next utterance starts within this


class Session:
    def __init__(
        self,
        engine: Engine,
        avatar: Avatar,
        worker: EngineWorker,
        config: ServerConfig,
        on_closed: Callable[[Session], None] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.id = secrets.token_hex(12)  # hex: safe in URLs and as a command-line argument
        self.avatar = avatar
        self.engine = engine
        self.worker = worker
        self.config = config
        self._on_closed = on_closed
        self.metrics = metrics
        self.speech = SpeechQueue(config.speech_queue_s)
        self.turn = TurnState(self._turn_changed)
        self.input = SpeechInput(self.speech, self.touch, config.utterance_idle_end_s,
                                 on_voice=self.turn.hear)
        self.transport: Transport | None = None
        self.stream: EngineStream | None = None
        self.sync: Synchronizer | None = None
        # event fan-out (the data channel, WebSockets) and what to close with the session
        self.listeners: list[Callable[[Event], None]] = []
        self.close_hooks: list[Callable[[], Awaitable[None]]] = []
        self.closed = asyncio.Event()
        self.end_reason: str | None = None
        loop = asyncio.get_running_loop()
        self.created_at = loop.time()
        self.last_activity = self.created_at
        self._closing = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._speaking_check: asyncio.Handle | None = None

    # -- set-up ----------------------------------------------------------------------

    async def open(self, sink: MediaSink[Any]) -> None:
        """Open the engine stream and the synchronizer that will feed ``sink``, and start
        the session's timers (the connect timeout and the idle watchdog)."""
        stream, _ = await self.worker.run(self.engine.open_stream, self.avatar)
        self.stream = stream
        self.turn.attach(stream.set_state)
        self.sync = Synchronizer(
            stream, self.worker, self.speech, sink, self.emit,
            on_step=self.metrics.engine_step.observe if self.metrics else None,
        )
        self.spawn(self._connect_timeout())
        self.spawn(self._watchdog())

    def start(self) -> None:
        """The viewer is connected: media starts flowing."""
        if self.sync is not None:
            self.sync.start()

    @property
    def running(self) -> bool:
        return self.sync is not None and self.sync.running

    @property
    def state(self) -> str:
        return self.transport.state if self.transport else "new"

    async def _connect_timeout(self) -> None:
        await asyncio.sleep(self.config.connect_timeout_s)
        if not self.running:
            await self.close("connect timeout")

    def touch(self) -> None:
        """Someone used the session (speech, a call, a control message): not idle."""
        self.last_activity = asyncio.get_running_loop().time()

    async def _watchdog(self) -> None:
        """End the session when idle too long or past its maximum duration, so a
        front-end that forgets DELETE (or a browser tab left open) frees its slot."""
        idle_s = self.config.session_idle_timeout_s
        max_s = self.config.session_max_duration_s
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            if self.speech.total or (self.sync is not None and self.sync.speaking):
                self.last_activity = now  # speaking is not idle
            if max_s > 0 and now - self.created_at >= max_s:
                await self.close(f"maximum session duration ({max_s:g} s) reached")
                return
            if idle_s > 0 and now - self.last_activity >= idle_s:
                await self.close(f"idle for {idle_s:g} s")
                return
            waits = [1.0]
            if idle_s > 0:
                waits.append(self.last_activity + idle_s - now)
            if max_s > 0:
                waits.append(self.created_at + max_s - now)
            await asyncio.sleep(max(0.05, min(waits)))

    # -- control ---------------------------------------------------------------------

    def interrupt(self) -> list[str]:
        """Barge-in: stop speaking now and go back to idle."""
        self.touch()
        self.input.interrupt()
        return self.sync.interrupt() if self.sync else self.speech.clear()

    def set_state(self, state: str) -> None:
        """The turn state a client set (idle, listening, thinking: ``core/turnstate.py``);
        ValueError for another."""
        self.touch()
        self.turn.set(state)

    # -- events out ------------------------------------------------------------------

    def emit(self, event: Event) -> None:
        kind = event["type"]
        if kind == events.ERROR and self.metrics:
            self.metrics.errors.labels("control").inc()
        for listener in list(self.listeners):
            try:
                listener(event)
            except Exception:  # one broken listener must not starve the others
                log.exception("session %s: event listener failed", self.id)
        if kind == events.SPEECH_STARTED or kind == events.SPEECH_FINISHED:
            # one utterance handing over to the next (in the same frame or the next one)
            # is no change of turn: speech ends a frame after its last speech.finished,
            # unless a barge-in cut it
            if self._speaking_check is not None:
                self._speaking_check.cancel()
            ended = kind == events.SPEECH_FINISHED and not dict(event).get("interrupted")
            wait = HANDOVER_S if ended else 0
            loop = asyncio.get_running_loop()
            self._speaking_check = loop.call_later(wait, self._check_speaking)

    def _check_speaking(self) -> None:
        self._speaking_check = None
        if not self._closing:
            self.turn.set_speaking(self.sync is not None and self.sync.speaking)

    def _turn_changed(self, state: str, previous: str) -> None:
        self.emit(events.state_changed(state, previous))

    # -- teardown --------------------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """A task that lives no longer than the session."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def closing(self) -> bool:
        """close() has begun: the session takes no more speech or calls."""
        return self._closing

    async def close(self, reason: str = "closed") -> None:
        if self._closing:
            await self.closed.wait()
            return
        self._closing = True
        self.end_reason = reason
        log.info("session %s ends: %s", self.id, reason)
        with contextlib.suppress(Exception):
            self.emit(events.session_ended(reason))
        if self._speaking_check is not None:
            self._speaking_check.cancel()
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()
        if self.sync:
            await self.sync.stop()
            st = self.sync.stats
            log.info("session %s: %d frames sent, %d late (clock slipped %.2f s), %d repeated;"
                     " the sink fell behind and dropped %d video, %d audio frames",
                     self.id, st.frames_sent, st.underruns, self.sync.clock.slipped_s,
                     st.fillers, st.video_encoder_drops, st.audio_encoder_drops)
            if self.metrics:
                self.metrics.retire(self.sync.stats)
        if self.transport is not None:
            with contextlib.suppress(Exception):
                await self.transport.close()
        for task in list(self._tasks):
            if task is not current:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self.stream is not None:
            await self.worker.run(self.stream.close)
        self.input.close()
        self.speech.clear()
        self.listeners.clear()
        for hook in list(self.close_hooks):
            with contextlib.suppress(Exception):
                await hook()
        self.close_hooks.clear()
        self.closed.set()
        if self._on_closed:
            self._on_closed(self)

    def stats(self) -> dict[str, Any]:
        sync = self.sync.stats if self.sync else None
        return {
            "session_id": self.id,
            "state": self.state,
            "turn_state": self.turn.shown,
            "turn_state_set": self.turn.requested,
            "microphone": self.input.microphone,
            "engine_shows_states": sorted(self.engine.shows_states),
            "speech_queued_s": round(self.speech.seconds, 3),
            "age_s": round(asyncio.get_running_loop().time() - self.created_at, 1),
            **({k: round(v, 5) for k, v in vars(sync).items()} if sync else {}),
        }
