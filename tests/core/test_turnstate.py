"""Turn states: the rules (what shows when, one event per change) on their own, then over the
real server: the ``state`` message on the data channel and the WebSocket, ``POST .../state``,
the events and the stats, and the microphone as the user's voice."""

from __future__ import annotations

import asyncio

import aiohttp
import numpy as np
import pytest
import pytest_asyncio
from speechtools import at_rate, until

from avatar_stream.client.avatarclient import MIC_RATE, AvatarClient, RequestError, SessionControl
from avatar_stream.config import ServerConfig
from avatar_stream.core.turnstate import TurnState, check_state
from avatar_stream.transports.http.app import running_server

# -- the rules --------------------------------------------------------------------------------


def turn() -> tuple[TurnState, list[tuple[str, str]], list[tuple[str, float | None]]]:
    changes: list[tuple[str, str]] = []
    shown: list[tuple[str, float | None]] = []
    t = TurnState(lambda state, previous: changes.append((state, previous)))
    t.attach(lambda state, energy: shown.append((state, energy)))
    return t, changes, shown


def test_states_are_checked() -> None:
    for state in ("idle", "listening", "thinking"):
        assert check_state(state) == state
    for bad in ("speaking", "LISTENING", "", None, 1, ["idle"]):
        with pytest.raises(ValueError, match="idle, listening, thinking"):
            check_state(bad)


def test_one_event_per_change_of_what_shows() -> None:
    t, changes, shown = turn()
    assert shown == [("idle", None)]  # the engine is told at once
    t.set("listening")
    t.set("listening")  # no change, no event
    t.set("thinking")
    t.set("idle")
    assert changes == [("listening", "idle"), ("thinking", "listening"), ("idle", "thinking")]
    assert [s for s, _ in shown[1:]] == ["listening", "listening", "thinking", "idle"]
    with pytest.raises(ValueError):
        t.set("dancing")
    assert t.shown == t.requested == "idle"  # a bad state changes nothing


def test_speaking_wins_and_thinking_ends_with_speech() -> None:
    t, changes, shown = turn()
    t.set("thinking")
    t.set_speaking(True)  # the answer has come: thinking is over
    assert t.shown == "speaking" and t.requested == "idle"
    assert shown[-1] == ("idle", None)  # under the speech, the engine eases to idle
    t.set_speaking(False)
    assert changes == [("thinking", "idle"), ("speaking", "thinking"), ("idle", "speaking")]


def test_a_state_set_while_speaking_shows_when_the_speech_ends() -> None:
    t, changes, _ = turn()
    t.set("listening")
    t.set_speaking(True)
    t.set("listening")
    changes.clear()
    t.set_speaking(False)
    assert changes == [("listening", "speaking")]  # listening outlives speech
    t.set_speaking(True)
    t.set("thinking")  # set during the speech: not ended by it
    t.set_speaking(False)
    assert t.shown == "thinking"


def test_the_users_voice_shows_listening_over_what_was_set() -> None:
    t, changes, shown = turn()
    t.set("thinking")
    t.hear(True, 0.4)
    t.hear(True, 0.7)
    assert t.shown == "listening" and t.requested == "thinking"
    assert shown[-2:] == [("listening", 0.4), ("listening", 0.7)]  # energy on every packet
    t.set_speaking(True)  # the avatar's speech still wins
    assert t.shown == "speaking"
    t.set_speaking(False)
    t.hear(False, 0.0)
    assert t.shown == "idle"  # thinking ended when the speech started
    assert changes[-3:] == [("speaking", "listening"), ("listening", "speaking"),
                            ("idle", "listening")]
    assert shown[-1] == ("idle", None)


# -- over the server --------------------------------------------------------------------------


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def server():
    config = ServerConfig(host="127.0.0.1", port=0, ice_host_addresses=["127.0.0.1"],
                          max_sessions=3)
    async with running_server(config) as (url, state):
        async with aiohttp.ClientSession() as http:
            yield url, state, http


def states(client: AvatarClient) -> list[tuple[str, str]]:
    return [(e["state"], e["previous"]) for _, e in client.received.events
            if e["type"] == "state.changed"]


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.timeout(60)
async def test_state_messages_events_and_stats(server) -> None:
    url, _, _ = server
    async with AvatarClient(url, record_mouth=False) as client:
        stats = await client.stats()
        assert (stats["turn_state"], stats["turn_state_set"]) == ("idle", "idle")
        assert stats["engine_shows_states"] == ["listening", "thinking"]  # warp shows both
        await client.set_state("listening")  # the data channel
        await asyncio.wait_for(client.wait_event("state.changed"), 5)
        async with SessionControl(url, client.session_id, client.token) as control:
            await control.set_state("thinking")  # the WebSocket
            changed = await asyncio.wait_for(control.wait_event("state.changed"), 5)
            assert changed == {"type": "state.changed", "state": "thinking",
                               "previous": "listening"}
            reply = await control.set_state_http("idle")  # HTTP
            assert reply == {"turn_state": "idle", "turn_state_set": "idle"}
            await asyncio.wait_for(control.wait_event("state.changed"), 5)
        await until(lambda: len(states(client)) == 3, 5)
        assert states(client) == [("listening", "idle"), ("thinking", "listening"),
                                  ("idle", "thinking")]
        await client.set_state("listening", via="http")
        stats = await client.stats()
        assert (stats["turn_state"], stats["turn_state_set"]) == ("listening", "listening")


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.timeout(60)
async def test_a_bad_state_is_refused_on_that_connection_only(server) -> None:
    url, _, http = server
    async with AvatarClient(url, record_mouth=False) as client:
        async with SessionControl(url, client.session_id, client.token) as control, \
                SessionControl(url, client.session_id, client.token) as other:
            await control._ws.send_str('{"type": "state", "state": "dancing"}')
            error = await asyncio.wait_for(control.wait_event("error"), 5)
            assert error["code"] == "bad_state" and "idle, listening, thinking" in \
                error["message"]
            client.send({"type": "state"})  # on the data channel: no state at all
            dc_error = await asyncio.wait_for(client.wait_event("error"), 5)
            assert dc_error["code"] == "bad_state" and "None" in dc_error["message"]
            with pytest.raises(ValueError):
                await control.set_state("speaking")  # refused before it is sent
            # nothing changed, and no one else was told
            await control.set_state("thinking")
            await asyncio.wait_for(other.wait_event("state.changed"), 5)
            assert [e["type"] for _, e in other.received] == ["state.changed"]
            assert [e["type"] for _, e in control.received] == ["error", "state.changed"]
            assert [e["type"] for _, e in client.received.events
                    if e["type"] == "error"] == ["error"]

        headers = {"Authorization": f"Bearer {client.token}"}
        state_url = f"{url}/v1/sessions/{client.session_id}/state"
        for body in ({"state": "dancing"}, {"state": None}, {}):
            async with http.post(state_url, json=body, headers=headers) as r:
                assert r.status == 400
                reply = await r.json()
                assert "idle, listening, thinking" in reply["error"]
        async with http.post(state_url, data="listening", headers=headers) as r:
            assert r.status == 415  # JSON only
        async with http.post(f"{url}/v1/sessions/nope/state", json={"state": "idle"}) as r:
            assert r.status == 404
        assert (await client.stats())["turn_state"] == "thinking"


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.timeout(60)
async def test_speaking_overrides_and_thinking_ends_with_the_reply(server, speech48k) -> None:
    url, state, _ = server
    async with AvatarClient(url, record_mouth=False) as client:
        await client.set_state("thinking")
        await asyncio.wait_for(client.wait_event("state.changed"), 5)
        reply = speech48k[: MIC_RATE * 2]
        uid = await client.push_speech(reply, MIC_RATE)
        await asyncio.wait_for(
            client.wait_event("speech.finished", lambda e: e["utterance_id"] == uid), 15)
        await until(lambda: states(client)[-1][0] == "idle", 5)
        assert states(client) == [("thinking", "idle"), ("speaking", "thinking"),
                                  ("idle", "speaking")]
        kinds = [e["type"] for _, e in client.received.events
                 if e["type"] in ("speech.started", "speech.finished", "state.changed")]
        assert kinds == ["state.changed", "speech.started", "state.changed",
                         "speech.finished", "state.changed"]

        # listening set while it speaks waits under the speech; a barge-in shows it at once
        uid = await client.push_speech(speech48k, MIC_RATE)
        await asyncio.wait_for(
            client.wait_event("speech.started", lambda e: e["utterance_id"] == uid), 10)
        await client.set_state("listening")
        session = state.sessions[client.session_id]
        assert await until(lambda: session.stats()["turn_state_set"] == "listening", 5)
        assert session.stats()["turn_state"] == "speaking"  # set, but under the speech
        assert states(client)[-1] == ("speaking", "idle")
        client.interrupt()
        await asyncio.wait_for(client.wait_event(
            "speech.finished", lambda e: e["utterance_id"] == uid and e["interrupted"]), 5)
        await until(lambda: states(client)[-1] == ("listening", "speaking"), 5)
        assert states(client)[-1] == ("listening", "speaking")


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.timeout(60)
async def test_back_to_back_utterances_are_one_turn(server, speech48k) -> None:
    """Utterances queued one after another play as one turn: speaking once, idle once."""
    url, _, _ = server
    async with AvatarClient(url, record_mouth=False) as client:
        # lengths a whole number of frames long too: one ends on a frame's last sample
        ids = [await client.push_speech(speech48k[: n * 1920], MIC_RATE) for n in (20, 13, 9)]
        await asyncio.wait_for(
            client.wait_event("speech.finished", lambda e: e["utterance_id"] == ids[-1]), 15)
        await until(lambda: len(states(client)) >= 2, 5)
        await asyncio.sleep(0.2)
        assert states(client) == [("speaking", "idle"), ("idle", "speaking")]
        started = [e["utterance_id"] for _, e in client.received.events
                   if e["type"] == "speech.started"]
        assert started == ids


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.timeout(60)
async def test_the_microphone_as_the_users_voice(server, speech48k) -> None:
    """``"microphone": "listen"``: while the user speaks the avatar listens (and says
    nothing of it); the default, ``speak``, says what it hears and never listens."""
    url, _, http = server
    voice = at_rate(speech48k, MIC_RATE)[: MIC_RATE * 2]
    async with AvatarClient(url, record_mouth=False, microphone="listen") as client:
        assert (await client.stats())["microphone"] == "listen"
        client.mic.play(voice)
        await asyncio.wait_for(client.wait_event("state.changed"), 5)
        assert states(client) == [("listening", "idle")]
        await until(lambda: len(states(client)) == 2, 5)
        assert states(client) == [("listening", "idle"), ("idle", "listening")]
        assert not any(e["type"] == "speech.started" for _, e in client.received.events)
        heard = np.concatenate(client.received.audio[-50:]) if client.received.audio else []
        assert np.abs(heard).max() < 0.01  # the avatar said nothing

    async with AvatarClient(url, record_mouth=False) as client:
        client.mic.play(voice)
        await asyncio.wait_for(client.wait_event("speech.finished"), 10)
        await until(lambda: len(states(client)) >= 2, 5)
        assert states(client) == [("speaking", "idle"), ("idle", "speaking")]

    offer = {"type": "offer", "sdp": "v=0\r\n", "microphone": "sing"}
    async with http.post(f"{url}/v1/sessions", json=offer) as r:
        assert r.status == 400
        assert "speak, listen" in (await r.json())["error"]
    with pytest.raises(RequestError):
        async with AvatarClient(url, microphone="sing"):
            pass
