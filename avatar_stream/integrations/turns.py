"""The avatar's turn state, from a voice-agent framework's turn signals.

``listening`` while the user speaks, ``thinking`` from the end of the user's turn until the
reply starts to play, ``idle`` otherwise. Where the framework decides the end of the turn a
moment after the user stops (LiveKit's endpointing), the avatar keeps listening for that
moment rather than flashing idle between listening and thinking. Speaking needs no signal of
its own: the session shows it whenever speech plays, over any state. The adapters feed the
framework's signals in (Pipecat's user started / stopped speaking frames, LiveKit's user and
agent state changes); one task sends the latest state, only when it changed, so quick flips
never arrive out of order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from avatar_stream.integrations.segments import Link, call

log = logging.getLogger(__name__)

# a turn the agent never answers (nothing to say, an error upstream) must not leave the
# avatar looking up and away for good
MAX_THINKING_S = 20.0
# how long the avatar keeps listening after the user stops, waiting for the framework to
# say whether the turn ended (LiveKit's endpointing waits 0.5 s by default)
LISTEN_GRACE_S = 1.5
# on close, how long the last "idle" may take to go out (the server keeps a state forever)
CLOSE_TIMEOUT_S = 1.0


class TurnStates:
    """Turn signals in, ``set_state`` calls out (``start()`` first, ``close()`` last)."""

    def __init__(self, link: Link, max_thinking_s: float = MAX_THINKING_S,
                 listen_grace_s: float = LISTEN_GRACE_S) -> None:
        self.link = link
        self.max_thinking_s = max_thinking_s
        self.listen_grace_s = listen_grace_s
        self.user_speaking = False
        self.agent_thinking = False
        self._listen_until = 0.0  # time.monotonic(): still listening, the turn undecided
        self.sent = "idle"  # the last state the session took (sessions start idle)
        self._sending: str | None = None  # a state on its way (it may have arrived)
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def state(self) -> str:
        if self.user_speaking:
            return "listening"
        if self.agent_thinking:
            return "thinking"
        return "listening" if time.monotonic() < self._listen_until else "idle"

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Stop, leaving the avatar idle: a state the session shows has no timeout there,
        so one left behind would stay on the user's screen (best effort, ``timeout``)."""
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        if self.sent != "idle" or self._sending not in (None, "idle"):
            try:
                await asyncio.wait_for(call(self.link.set_state, "idle"), timeout)
                self.sent = "idle"
            except Exception as exc:  # a timeout included
                log.warning("turn state 'idle' not sent to the avatar session: %r", exc)

    # -- signals ----------------------------------------------------------------------

    def user_started(self) -> None:
        self.user_speaking = True
        self.agent_thinking = False
        self._changed.set()

    def user_stopped(self, thinking: bool | None = True) -> None:
        """The user's turn ended; the agent thinks about its reply (``thinking``; None:
        the agent's own state says, through ``thinking()``)."""
        self.user_speaking = False
        if thinking is None:
            self._listen_until = time.monotonic() + self.listen_grace_s
        else:
            self.agent_thinking = thinking
        self._changed.set()

    def thinking(self, on: bool) -> None:
        """The agent's own state: thinking, or not (speaking, listening, idle: the turn is
        decided either way)."""
        self.agent_thinking = on
        self._listen_until = 0.0
        self._changed.set()

    def reply_started(self) -> None:
        """The reply plays: when it ends, the avatar is idle, not thinking again."""
        self.agent_thinking = False
        self._listen_until = 0.0
        self._changed.set()

    # -- out --------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            timeout = self.max_thinking_s if self.state == "thinking" else None
            grace = self._listen_until - time.monotonic()
            if grace > 0 and not self.user_speaking:
                timeout = grace
            try:
                await asyncio.wait_for(self._changed.wait(), timeout)
            except asyncio.TimeoutError:
                if self.agent_thinking:
                    self.agent_thinking = False  # no reply came
            self._changed.clear()
            state = self.state
            if state == self.sent:
                continue
            try:
                self._sending = state
                await call(self.link.set_state, state)
                self.sent, self._sending = state, None
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the speech goes on without it
                log.warning("turn state %r not sent to the avatar session: %s", state, exc)
