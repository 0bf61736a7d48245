"""The framework examples, run as a user would. examples/pipecat_avatar.py and
examples/livekit_avatar.py each drive a session that a real aiortc client (standing in for
the browser) holds, through its framework, and their lines come back as the avatar's speech,
in order, in full; examples/pipecat_relay.py carries the avatar to its visitor over its own
WebRTC transport."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from aiohttp import web
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from audio.test_tts import StandInTTS  # tests/ is on the path (pyproject)
from speechtools import AUDIO_AFTER_EVENT_S, envelope_match, events, until

from avatar_stream.audio.resample import frame_to_mono
from avatar_stream.audio.tts import EspeakTTS
from avatar_stream.client.avatarclient import AvatarClient
from avatar_stream.config import ServerConfig
from avatar_stream.transports.http.app import running_server
from avatar_stream.transports.webrtc.ice import filter_candidates, rtc_configuration

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.timeout(120)]
LINES = ["Hello from the example.", "And a second line."]


@pytest.mark.parametrize("example, tts", [
    ("pipecat_avatar.py", "espeak"), ("pipecat_avatar.py", "endpoint"),
    ("livekit_avatar.py", "espeak"), ("livekit_avatar.py", "endpoint"),
])
async def test_framework_example_drives_a_watched_session(example, tts) -> None:
    config = ServerConfig(host="127.0.0.1", port=0, ice_host_addresses=["127.0.0.1"])
    stand_in = StandInTTS()  # an OpenAI-compatible TTS endpoint on 127.0.0.1 (test_tts.py)
    app = web.Application()
    app.router.add_post("/v1/audio/speech", stand_in.speech)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    tts_args = ["--tts-url", f"http://127.0.0.1:{runner.addresses[0][1]}/v1/audio/speech"] \
        if tts == "endpoint" else []
    try:
        async with running_server(config) as (url, state), \
                AvatarClient(url, record_mouth=False) as browser:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, str(ROOT / "examples" / example), "--server", url,
                "--session", browser.session_id, "--token", browser.token, *tts_args, *LINES,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            )
            out, _ = await asyncio.wait_for(proc.communicate(), 90)
            rec = browser.received
            assert await until(lambda: len(events(rec, "speech.finished")) >= 2, 5)
            assert browser.session_id in state.sessions  # the bot leaves the session open
    finally:
        await runner.cleanup()
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


async def test_relay_example_carries_the_avatar_to_a_webrtc_visitor() -> None:
    """examples/pipecat_relay.py: a visitor (an aiortc peer standing in for the page's
    browser) connects to the bot, not to avatar-stream, and gets the avatar from the bot:
    the greeting and a line it asked for, spoken with lips at 25 fps. When the visitor
    leaves, the bot's avatar session ends."""
    greeting, line = "Hello, this is the bot speaking.", "Here is a line you asked for."
    said = {}
    for text in (greeting, line):  # what the bot's espeak-ng voice makes of them
        pieces = [p async for p in EspeakTTS().stream(text)]
        said[text] = (np.concatenate([p.samples for p in pieces]), pieces[0].rate)
    config = ServerConfig(host="127.0.0.1", port=0, ice_host_addresses=["127.0.0.1"])
    async with running_server(config) as (url, state):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(ROOT / "examples" / "pipecat_relay.py"), "--server", url,
            "--port", "0", "--ice-host-addresses", "127.0.0.1", "--greeting", greeting,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        try:
            banner = ""
            while not banner.startswith("open http"):  # past Pipecat's own import banner
                banner = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
                assert banner, "the bot exited before serving its page"
            bot_url = banner.split()[-1].rstrip("/")
            async with aiohttp.ClientSession() as http, http.get(bot_url + "/") as page:
                assert page.status == 200 and "RTCPeerConnection" in await page.text()
            visitor = Visitor()
            await visitor.connect(bot_url)
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
            proc.send_signal(signal.SIGTERM)
            out, _ = await asyncio.wait_for(proc.communicate(), 30)
    text = banner + out.decode()
    print(text[-2000:])
    assert proc.returncode == 0, text[-2000:]
    assert "visitor connected" in text and "visitor left" in text
    assert [e["interrupted"] for e in finished] == [False, False]
    fps = visitor.fps()
    heard = np.concatenate(visitor.audio)
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


class Visitor:
    """The page's browser, as an aiortc peer: receives the bot's tracks, has the data
    channel the page sends its lines on."""

    def __init__(self) -> None:
        self.pc = RTCPeerConnection(rtc_configuration([]))
        self.pc.addTransceiver("audio", direction="recvonly")
        self.pc.addTransceiver("video", direction="recvonly")
        self.channel = self.pc.createDataChannel("chat")
        self.video_t: list[float] = []
        self.audio: list[np.ndarray] = []
        self._readers: list[asyncio.Task[None]] = []
        self.pc.on("track", lambda track: self._readers.append(
            asyncio.create_task(self._read(track))))

    async def connect(self, bot_url: str) -> None:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        async with aiohttp.ClientSession() as http, http.post(
                bot_url + "/api/offer",
                json={"sdp": self.pc.localDescription.sdp, "type": "offer"}) as resp:
            answer = await resp.json()
        await self.pc.setRemoteDescription(RTCSessionDescription(
            sdp=filter_candidates(answer["sdp"], ["127.0.0.1"]), type="answer"))

    async def _read(self, track) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            if track.kind == "video":
                self.video_t.append(time.perf_counter())
            else:
                self.audio.append(frame_to_mono(frame))

    def fps(self) -> float:
        """The rate over the last 3 s (the avatar speaking its line)."""
        recent = [t for t in self.video_t if t >= self.video_t[-1] - 3.0]
        return (len(recent) - 1) / (recent[-1] - recent[0])

    async def close(self) -> None:
        await self.pc.close()
        for task in self._readers:
            task.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)
