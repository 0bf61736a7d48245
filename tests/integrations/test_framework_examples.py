"""examples/pipecat_avatar.py and examples/livekit_avatar.py, run as a user would: each
drives a session that a real aiortc client (standing in for the browser) holds, through its
framework, and its lines come back as the avatar's speech, in order, in full."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest
from aiohttp import web
from audio.test_tts import StandInTTS  # tests/ is on the path (pyproject)
from speechtools import events, until

from avatar_stream.client.avatarclient import AvatarClient
from avatar_stream.config import ServerConfig
from avatar_stream.transports.http.app import running_server

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
