"""examples/voice_assistant.py, run as a user would, drives a session a real aiortc client
(standing in for the browser) holds: its lines come back as the avatar's speech."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest
from speechtools import events, until
from standin_tts import serving_stand_in

from avatar_stream.client.avatarclient import AvatarClient
from avatar_stream.config import ServerConfig
from avatar_stream.transports.http.app import running_server

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.timeout(90)]


@pytest.mark.parametrize("via, tts", [("ws", "espeak"), ("http", "espeak"), ("ws", "endpoint")])
async def test_voice_assistant_example_drives_a_watched_session(via, tts) -> None:
    config = ServerConfig(host="127.0.0.1", port=0, ice_host_addresses=["127.0.0.1"])
    # an OpenAI-compatible TTS endpoint on 127.0.0.1 (standin_tts.py)
    async with serving_stand_in() as stand_in, running_server(config) as (url, state), \
            AvatarClient(url, record_mouth=False) as watcher:
        tts_args = ["--tts-url", stand_in.url] if tts == "endpoint" else []
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(ROOT / "examples" / "voice_assistant.py"),
            "--server", url, "--session", watcher.session_id, "--token", watcher.token,
            "--via", via, *tts_args, "Hello from the example.", "And a second line.",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    text = out.decode()
    print(text)
    assert proc.returncode == 0, text
    rec = watcher.received
    assert await until(lambda: len(events(rec, "speech.finished")) >= 2, 5)
    if tts == "endpoint":
        assert [body["input"] for body, _ in stand_in.requests] == \
            ["Hello from the example.", "And a second line."]
    finished = [e for _, e in events(rec, "speech.finished")]
    assert [e["utterance_id"] for e in finished] == ["line-1", "line-2"]
    assert all(not e["interrupted"] and e["position_s"] > 0.8 for e in finished), finished
    assert "[line-2] played" in text
