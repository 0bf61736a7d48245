"""TurnStates against a real session: the framework's turn signals become the state the
session shows, only changes are sent, and no state outlives its reason (a turn the agent
never answers, a user who stopped and was not answered)."""

from __future__ import annotations

import time

import pytest
from loopback_server import loopback_server  # noqa: F401  (the fixture `server`)
from speechtools import until

from avatar_stream.client.avatarclient import AvatarClient
from avatar_stream.client.sessioncontrol import SessionControl
from avatar_stream.integrations.turns import TurnStates

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(60)]


async def test_signals_become_states_and_none_outlives_its_reason(server) -> None:
    url, state = server
    async with AvatarClient(url, record_mouth=False) as browser:
        session = state.sessions[browser.session_id]
        shown: list[tuple[float, str]] = []
        session.listeners.append(lambda e: shown.append((time.perf_counter(), e["state"]))
                                 if e["type"] == "state.changed" else None)
        control = SessionControl(url, browser.session_id, browser.token)
        await control.connect()
        link = CountingLink(control)
        turns = TurnStates(link, max_thinking_s=0.4, listen_grace_s=0.3)
        turns.start()

        def now_shows(expected: str):
            return until(lambda: session.turn.shown == expected, 5)

        # Pipecat's way: the user speaks, stops; the agent thinks until its reply plays
        turns.user_started()
        assert await now_shows("listening")
        turns.user_stopped()
        assert await now_shows("thinking")
        # ... no reply came: thinking gives way to idle
        t_thinking = shown[-1][0]
        assert await now_shows("idle")
        assert shown[-1][0] - t_thinking >= 0.35
        # LiveKit's way: the user stops, the turn is undecided a moment: still listening,
        # then the agent thinks
        turns.user_started()
        assert await now_shows("listening")
        turns.user_stopped(thinking=None)
        turns.thinking(True)
        assert await now_shows("thinking")
        assert [s for _, s in shown][-2:] == ["listening", "thinking"]  # no idle between
        turns.reply_started()
        assert await now_shows("idle")
        # a user who stopped and got no answer: listening ends after the grace
        turns.user_started()
        assert await now_shows("listening")
        turns.user_stopped(thinking=None)
        assert await now_shows("idle")
        # only changes are sent: signals that leave the state as it is send nothing
        sent_before = list(link.sent)
        turns.thinking(False)
        turns.reply_started()
        turns.user_started()  # and back: the task sees the latest state only
        turns.user_stopped(thinking=False)
        assert await until(lambda: len(link.sent) > len(sent_before), 1.0) is False
        await turns.close()  # idle already: nothing to send
        await control.close()
    assert link.sent == sent_before
    states = [s for _, s in shown]
    assert states == ["listening", "thinking", "idle", "listening", "thinking", "idle",
                      "listening", "idle"]
    assert link.sent == states  # each change sent once, nothing else


class CountingLink:
    """A link that notes every state set through it (the real session gets it too)."""

    def __init__(self, control: SessionControl) -> None:
        self.control = control
        self.sent: list[str] = []

    async def set_state(self, state: str) -> None:
        self.sent.append(state)
        await self.control.set_state(state)


async def test_closing_leaves_the_avatar_idle(server) -> None:
    """Closed while the user speaks (the adapter cancelled, the agent gone): the avatar
    does not stay listening for good (the server's state has no timeout)."""
    url, state = server
    async with AvatarClient(url, record_mouth=False) as browser:
        session = state.sessions[browser.session_id]
        control = SessionControl(url, browser.session_id, browser.token)
        await control.connect()
        turns = TurnStates(control)
        turns.start()
        turns.user_started()
        assert await until(lambda: session.turn.shown == "listening", 5)
        await turns.close()
        assert await until(lambda: session.turn.shown == "idle", 5)
        await control.close()
