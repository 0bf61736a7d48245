"""The LiveKit Agents audio output against a real avatar-stream server on loopback (warp
engine): a real ``AgentSession`` (no room; small STT / LLM / TTS written for the test, real
espeak-ng speech) speaks its replies through a session that an aiortc client holds, as the
user's browser would. A reply is spoken by the avatar, the user's barge-in clears it, the
position the agent is told is what the browser heard, and each segment is reported once."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from conftest import espeak
from livekit import rtc
from livekit.agents import Agent, AgentSession
from livekit.agents.voice.io import PlaybackFinishedEvent, PlaybackStartedEvent
from livekit_parts import EnergySTT, ScriptedLLM, UserMic
from loopback_server import loopback_server  # noqa: F401  (the fixture `server`)
from speech_backend import RecordingEspeak
from speechtools import (
    AUDIO_AFTER_EVENT_S,
    at_rate,
    envelope,
    envelope_match,
    received_between,
    until,
)

from avatar_stream.client.avatarclient import AvatarClient
from avatar_stream.client.sessioncontrol import to_pcm16
from avatar_stream.integrations.livekit import AvatarSession, AvatarStreamTTS
from avatar_stream.media import OUT_RATE

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(150)]

STORY = ("Once upon a time there was a lighthouse keeper who lived alone on a rocky island. "
         "Every night he climbed the stairs and lit the great lamp for the passing ships.")
OKAY = "Okay, I will stop there."
HOP_S = 0.01  # envelope grid (speechtools.envelope)


def loud_hops(samples: np.ndarray, rate: int) -> np.ndarray:
    """Per 10 ms: is the speech loud there (over a tenth of its own loudest)."""
    env = envelope(samples, rate)
    return env > 0.1 * env.max()


async def test_reply_barge_in_and_position_through_an_agent_session(server, speech_dir) -> None:
    url, state = server
    hello = espeak("Hello there, tell me a story.", speech_dir / "lk-hello.wav", rate=16_000)
    wait = espeak("Wait, wait.", speech_dir / "lk-wait.wav", rate=16_000)
    async with AvatarClient(url, record_mouth=False) as browser:
        shown: list[str] = []
        state.sessions[browser.session_id].listeners.append(
            lambda e: shown.append(e["state"]) if e["type"] == "state.changed" else None)
        mic, voice = UserMic(), RecordingEspeak()
        session = AgentSession(
            stt=EnergySTT(["tell me a story", "wait"]),
            llm=ScriptedLLM({"tell me a story": STORY, "wait": OKAY}),
            tts=AvatarStreamTTS(voice), vad=None,
            aec_warmup_duration=None,  # no echo to cancel here: the user may barge in at once
            turn_handling={"turn_detection": "stt", "endpointing": {"min_delay": 0.2},
                           "interruption": {"resume_false_interruption": False}},
        )
        session.input.audio = mic
        avatar = AvatarSession(url, browser.session_id, browser.token)
        await avatar.start(session)
        assert session.output.audio is avatar.output
        started: list[PlaybackStartedEvent] = []
        finished: list[PlaybackFinishedEvent] = []
        avatar.output.on("playback_started", started.append)
        avatar.output.on("playback_finished", finished.append)
        await session.start(Agent(instructions="Tell stories."), record=False)

        mic.say(hello)
        story = await asyncio.wait_for(browser.wait_event("speech.started"), 30)
        t_story = time.perf_counter()
        assert len(started) == 1
        await asyncio.sleep(1.5)  # the user lets it speak, then talks over it
        mic.say(wait)
        cut = await asyncio.wait_for(browser.wait_event(
            "speech.finished", lambda e: e["utterance_id"] == story["utterance_id"]), 15)
        t_cut = time.perf_counter()
        okay = await asyncio.wait_for(browser.wait_event("speech.started"), 30)
        done = await asyncio.wait_for(browser.wait_event(
            "speech.finished", lambda e: e["utterance_id"] == okay["utterance_id"]), 30)
        await asyncio.sleep(AUDIO_AFTER_EVENT_S)  # the last frame's audio, after its event
        await session.aclose()
        assert await until(lambda: not avatar.control.connected, 5)
        assert browser.session_id in state.sessions  # the browser's session outlives the agent

    # the story was cut by the barge-in, the answer to it played in full
    assert cut["interrupted"] and not done["interrupted"]
    assert 1.0 < cut["position_s"] < 8.0
    # each segment reported once: started, and finished with the avatar's own figures
    assert avatar.output.captured_playout_segments == 2
    assert len(started) == 2 and len(finished) == 2
    assert [(f.interrupted, f.playback_position) for f in finished] == \
        [(True, cut["position_s"]), (False, done["position_s"])]
    okay_said, rate = voice.said(OKAY)
    assert done["position_s"] == pytest.approx(len(okay_said) / rate, abs=0.05)

    # the position the agent was told is what the browser heard of the story
    story_said = np.concatenate([s for text, s, _ in voice.spoken if text.strip() != OKAY])
    heard = received_between(browser.received, t_story - 0.2, t_cut + 0.5)
    offset, r = envelope_match(story_said[:rate], rate, heard)
    assert r >= 0.85, r
    heard_loud = loud_hops(heard, OUT_RATE)[int(round(offset / HOP_S)):]
    heard_end = (np.flatnonzero(heard_loud)[-1] + 1) * HOP_S  # on the story's clock
    said_loud = loud_hops(story_said, rate)
    later = np.flatnonzero(said_loud[int(round(heard_end / HOP_S)) + 5:])
    next_word = (int(round(heard_end / HOP_S)) + 5 + later[0]) * HOP_S if len(later) else 99.0
    position = cut["position_s"]
    print(f"livekit: cut at {position:.3f} s; the browser heard the story to {heard_end:.3f} s, "
          f"the next word starts at {next_word:.3f} s (position - heard = "
          f"{1000 * (position - heard_end):+.0f} ms)")
    assert heard_end - 0.06 <= position <= next_word + 0.06

    # the face: listening to the user, thinking, speaking; listening again at the barge-in
    print(f"livekit: states shown {shown}")
    assert shown[:3] == ["listening", "thinking", "speaking"]
    assert "listening" in shown[3:] and shown[-1] == "idle"




async def test_closing_the_avatar_mid_reply_stops_it_and_leaves_it_idle(server, speech48k) -> None:
    """The agent's avatar closed (the job ends, is cancelled) while a reply plays and the
    user has started to talk: the browser's avatar stops speaking at once, the segment is
    reported finished (interrupted), and the avatar does not stay listening."""
    url, state = server
    async with AvatarClient(url, record_mouth=False) as browser:
        session = state.sessions[browser.session_id]
        agent_session = AgentSession(vad=None, turn_handling={"turn_detection": None})
        avatar = AvatarSession(url, browser.session_id, browser.token)
        await avatar.start(agent_session)
        output = avatar.output
        finished: list[PlaybackFinishedEvent] = []
        output.on("playback_finished", finished.append)
        pcm = to_pcm16(at_rate(speech48k, 24_000)[: 8 * 24_000])[0]  # 8 s, captured at once
        for i in range(0, len(pcm), 960):
            await output.capture_frame(rtc.AudioFrame(pcm[i : i + 960], 24_000, 1, 480))
        await asyncio.wait_for(browser.wait_event("speech.started"), 10)
        avatar.turns.user_started()
        assert await until(lambda: session.turn.requested == "listening", 5)
        await avatar.aclose()
        t_closed = time.perf_counter()
        cut = await asyncio.wait_for(browser.wait_event("speech.finished"), 5)
        t_cut = time.perf_counter()
        assert await until(lambda: session.turn.shown == "idle", 5)
        await agent_session.aclose()
    assert cut["interrupted"] and cut["position_s"] < 6.0
    assert t_cut - t_closed < 1.0
    assert [f.interrupted for f in finished] == [True]
