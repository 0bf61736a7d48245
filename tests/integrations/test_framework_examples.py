"""The framework examples, run as a user would. examples/pipecat_avatar.py and
examples/livekit_avatar.py each drive a session that a real aiortc client (standing in for
the browser) holds, through its framework, and their lines come back as the avatar's speech,
in order, in full; examples/pipecat_relay.py carries the avatar to its visitor over its own
WebRTC transport."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from loopback_server import loopback_server  # noqa: F401  (the fixture `server`)
from speechtools import AUDIO_AFTER_EVENT_S, envelope_match, events, until
from standin_tts import serving_stand_in
from webrtc_visitor import Visitor

from avatar_stream.audio.tts import EspeakTTS
from avatar_stream.client.avatarclient import AvatarClient

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(120)]
LINES = ["Hello from the example.", "And a second line."]


@pytest.mark.parametrize("example, tts", [
    ("pipecat_avatar.py", "espeak"), ("pipecat_avatar.py", "endpoint"),
    ("livekit_avatar.py", "espeak"), ("livekit_avatar.py", "endpoint"),
])
async def test_framework_example_drives_a_watched_session(server, example, tts) -> None:
    url, state = server
    # an OpenAI-compatible TTS endpoint on 127.0.0.1 (standin_tts.py)
    async with serving_stand_in() as stand_in:
        tts_args = ["--tts-url", stand_in.url] if tts == "endpoint" else []
        async with AvatarClient(url, record_mouth=False) as browser, running_example(
                example, "--server", url, "--session", browser.session_id,
                "--token", browser.token, *tts_args, *LINES) as proc:
            out, _ = await asyncio.wait_for(proc.communicate(), 90)
            rec = browser.received
            assert await until(lambda: len(events(rec, "speech.finished")) >= 2, 5)
            assert browser.session_id in state.sessions  # the bot leaves the session open
    text = out.decode()
    print(text[-3000:])
    assert proc.returncode == 0, text[-3000:]
    if tts == "endpoint":
        assert [body["input"] for body, _ in stand_in.requests] == LINES
    finished = [e for _, e in events(rec, "speech.finished")]
    assert len(finished) == 2 and len({e["utterance_id"] for e in finished}) == 2
    assert all(not e["interrupted"] and e["position_s"] > 0.8 for e in finished), finished
    if example == "pipecat_avatar.py":
        assert text.count("[bot] speaking") >= 1 and "[bot] stopped speaking" in text
    else:
        assert text.count("[agent] played at") == 2


async def test_relay_example_carries_the_avatar_to_a_webrtc_visitor(server) -> None:
    """examples/pipecat_relay.py: a visitor (an aiortc peer standing in for the page's
    browser) connects to the bot, not to avatar-stream, and gets the avatar from the bot:
    the greeting and a line it asked for, spoken with lips at 25 fps. When the visitor
    leaves, the bot's avatar session ends."""
    greeting, line = "Hello, this is the bot speaking.", "Here is a line you asked for."
    said = {}
    for text in (greeting, line):  # what the bot's espeak-ng voice makes of them
        pieces = [p async for p in EspeakTTS().stream(text)]
        said[text] = (np.concatenate([p.samples for p in pieces]), pieces[0].rate)
    url, state = server
    visitor = Visitor()
    async with running_example(
            "pipecat_relay.py", "--server", url, "--port", "0", "--ice-host-addresses",
            "127.0.0.1", "--greeting", greeting) as proc:
        try:
            bot_url, banner = await page_of(proc)
            async with aiohttp.ClientSession() as http, http.get(bot_url + "/") as page:
                assert page.status == 200 and "RTCPeerConnection" in await page.text()
            await visitor.connect(bot_url + "/api/offer")
            # the bot's avatar session: the only one on the server
            assert await until(lambda: len(state.sessions) == 1, 10)
            finished: list[dict] = []
            (session,) = state.sessions.values()
            session.listeners.append(
                lambda e: finished.append(e) if e["type"] == "speech.finished" else None)
            assert await until(lambda: visitor.channel.readyState == "open", 10)
            assert await until(lambda: len(finished) >= 1, 30)  # the greeting
            visitor.channel.send(json.dumps({"type": "say", "text": line}))
            assert await until(lambda: len(finished) >= 2, 30)
            await asyncio.sleep(AUDIO_AFTER_EVENT_S)  # the last frame's voice, after its event
            await visitor.close()
            assert await until(lambda: not state.sessions, 15)  # the visitor left: it ends
        finally:
            await visitor.close()
            proc.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
    text = banner + out.decode()
    print(text[-2000:])
    assert proc.returncode == 0, text[-2000:]
    assert "visitor connected" in text and "visitor left" in text
    assert [e["interrupted"] for e in finished] == [False, False]
    fps = visitor.fps(visitor.video_t[-1] - 3.0, visitor.video_t[-1])  # saying the line
    heard = visitor.heard()
    print(f"relay example: {fps:.1f} fps at the visitor")
    assert fps >= 22
    offsets = []
    for text_said in (greeting, line):
        samples, rate = said[text_said]
        offset, r = envelope_match(samples, rate, heard)
        print(f"relay example: {text_said[:20]!r} heard at {offset:.2f} s, r={r:.3f}")
        assert r >= 0.8
        offsets.append(offset)
    assert offsets[0] < offsets[1]


@pytest.mark.parametrize("example", ["pipecat_avatar.py", "livekit_avatar.py",
                                     "voice_assistant.py"])
async def test_ctrl_c_ends_a_framework_example_waiting_for_typed_lines(server, example) -> None:
    """Ctrl-C while the example waits for the user to type a line (nothing said): it ends,
    cleanly and at once, without a line typed; the browser's session stays."""
    url, state = server
    async with AvatarClient(url, record_mouth=False) as browser, running_example(
            example, "--server", url, "--session", browser.session_id,
            "--token", browser.token, stdin=True) as proc:
        assert proc.stdout is not None
        line = ""
        while not line.startswith("driving session"):
            line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
            assert line, "the example exited before it waited for a line"
        proc.send_signal(signal.SIGINT)
        await asyncio.wait_for(proc.wait(), 20)  # its stdin still open: nothing typed
        out = await proc.stdout.read()
        assert browser.session_id in state.sessions
    assert proc.returncode == 0, out.decode()[-2000:]
    assert "Traceback" not in out.decode()


async def test_relay_example_refuses_bad_offers_and_drops_a_visitor_that_never_connects(
        server) -> None:
    """examples/pipecat_relay.py: an offer without an SDP is a 400 with a message; a
    visitor whose connection never comes up (it never takes the bot's answer) does not
    hold its pipeline and avatar session for good: they end after --connect-timeout."""
    url, state = server
    visitor = Visitor()
    async with running_example(
            "pipecat_relay.py", "--server", url, "--port", "0", "--ice-host-addresses",
            "127.0.0.1", "--connect-timeout", "3") as proc:
        try:
            bot_url, banner = await page_of(proc)
            async with aiohttp.ClientSession() as http:
                for body in ({}, {"type": "offer"}, [1, 2]):
                    async with http.post(bot_url + "/api/offer", json=body) as r:
                        assert r.status == 400 and "sdp" in (await r.json())["error"]
                async with http.post(bot_url + "/api/offer", data=b"not json") as r:
                    assert r.status == 400
                async with http.post(bot_url + "/api/offer", json={
                        "sdp": await visitor.offer(), "type": "offer"}) as r:
                    assert r.status == 200  # its answer never reaches the visitor's side
            assert await until(lambda: len(state.sessions) == 1, 15)  # its avatar session
            assert await until(lambda: not state.sessions, 20)  # ended, unwatched
        finally:
            await visitor.close()
            proc.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
    text = banner + out.decode()
    assert proc.returncode == 0, text[-2000:]
    assert "visitor never connected" in text and "visitor connected" not in text


@contextlib.asynccontextmanager
async def running_example(name: str, *args: str, stdin: bool = False
                          ) -> AsyncIterator[asyncio.subprocess.Process]:
    """examples/<name> as a user runs it, its output piped (and its input, with ``stdin``);
    however the test ends, it does not outlive it (killed if still running, waited for)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "examples" / name), *args,
        stdin=asyncio.subprocess.PIPE if stdin else None,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


async def page_of(proc: asyncio.subprocess.Process) -> tuple[str, str]:
    """The bot's URL from its banner (past Pipecat's own import banner), and the banner."""
    banner = ""
    while not banner.startswith("open http"):
        assert proc.stdout is not None
        banner = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        assert banner, "the bot exited before serving its page"
    return banner.split()[-1].rstrip("/"), banner
