"""The avatar's turn state, from a voice-agent framework's turn signals.

``listening`` while the user speaks, ``thinking`` from the end of the user's turn until the
reply starts to play, ``idle`` otherwise. Speaking needs no signal of its own: the session
shows it whenever speech plays, over either state. The adapters feed the framework's
signals in (Pipecat's user started / stopped speaking frames, LiveKit's user and agent state
changes); one task sends the latest state, only when it changed, so quick flips never
arrive out of order.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging

from avatar_stream.integrations.segments import Link

log = logging.getLogger(__name__)

# a turn the agent never answers (nothing to say, an error upstream) must not leave the
# avatar looking up and away for good
MAX_THINKING_S = 20.0


class TurnStates:
    """Turn signals in, ``set_state`` calls out (``start()`` first, ``close()`` last)."""

    def __init__(self, link: Link, max_thinking_s: float = MAX_THINKING_S) -> None:
        self.link = link
        self.max_thinking_s = max_thinking_s
        self.user_speaking = False
        self.agent_thinking = False
        self.sent = "idle"  # the last state the session took (sessions start idle)
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def state(self) -> str:
        if self.user_speaking:
            return "listening"
        return "thinking" if self.agent_thinking else "idle"

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    # -- signals ----------------------------------------------------------------------

    def user_started(self) -> None:
        self.user_speaking = True
        self.agent_thinking = False
        self._changed.set()

    def user_stopped(self, thinking: bool = True) -> None:
        """The user's turn ended; the agent thinks about its reply (``thinking``)."""
        self.user_speaking = False
        self.agent_thinking = thinking
        self._changed.set()

    def thinking(self, on: bool) -> None:
        self.agent_thinking = on
        self._changed.set()

    def reply_started(self) -> None:
        """The reply plays: when it ends, the avatar is idle, not thinking again."""
        self.agent_thinking = False
        self._changed.set()

    # -- out --------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            timeout = self.max_thinking_s if self.state == "thinking" else None
            try:
                await asyncio.wait_for(self._changed.wait(), timeout)
            except asyncio.TimeoutError:
                self.agent_thinking = False  # no reply came
            self._changed.clear()
            state = self.state
            if state == self.sent:
                continue
            try:
                result = self.link.set_state(state)
                if inspect.isawaitable(result):
                    await result
                self.sent = state
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the speech goes on without it
                log.warning("turn state %r not sent to the avatar session: %s", state, exc)
