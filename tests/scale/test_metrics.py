"""/metrics scraped while a real session runs: the counters move."""

from __future__ import annotations

import asyncio
import re

import aiohttp
import numpy as np

from avatar_stream.client.avatarclient import AvatarClient
from avatar_stream.config import ServerConfig
from avatar_stream.transports.http.app import running_server


def value(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    assert m, f"{name}{labels} missing"
    return float(m.group(1))


async def test_metrics_move_during_a_session(speech48k) -> None:
    config = ServerConfig(port=0, ice_host_addresses=["127.0.0.1"], max_sessions=1)
    async with running_server(config) as (url, state), aiohttp.ClientSession() as http:

        async def scrape() -> str:
            async with http.get(f"{url}/metrics") as r:
                assert r.status == 200 and r.content_type == "text/plain"
                return await r.text()

        before = await scrape()
        assert value(before, "avatar_sessions_active") == 0
        async with AvatarClient(url) as client:
            client.mic.play(speech48k[: 48000 * 2])
            await asyncio.wait_for(client.wait_event("speech.started"), 5)
            during = await scrape()
            async with http.post(f"{url}/v1/sessions", json={"sdp": "v=0"}) as r:
                assert r.status == 503
            client.interrupt()
            await asyncio.wait_for(client.wait_event("speech.finished"), 5)
            n = len(client.received.video_t)
            while len(client.received.video_t) < max(n + 5, 50):  # ~2 s of session
                await asyncio.sleep(0.04)
            after = await scrape()
            sid = client.session_id
        gone = await scrape()

    assert value(during, "avatar_sessions_active") == 1
    assert value(after, "avatar_frames_sent_total") > value(during, "avatar_frames_sent_total") > 0
    assert value(after, "avatar_frames_generated_total") >= value(after, "avatar_frames_sent_total")
    assert value(after, "avatar_interrupts_total") == 1
    assert value(after, "avatar_encoder_dropped_audio_frames_total") == 0  # nothing cut
    assert value(after, "avatar_sessions_refused_total") == 1
    assert value(after, "avatar_errors_total", '{kind="unavailable"}') == 1
    assert value(after, "avatar_engine_step_seconds_count") > 25
    assert value(after, "avatar_encode_seconds_count", '{kind="video"}') > 25
    assert np.isfinite(value(during, "avatar_av_skew_seconds", f'{{session="{sid}"}}'))
    assert 0 <= value(during, "avatar_playout_reserve_seconds", f'{{session="{sid}"}}') <= 0.1
    value(during, "avatar_speech_queue_seconds", f'{{session="{sid}"}}')
    # the process's own figures, and its event loop's tasks (the soak watches them)
    assert value(during, "avatar_event_loop_tasks") > 5
    assert value(after, "process_cpu_seconds_total") > value(during, "process_cpu_seconds_total")
    assert value(after, "process_resident_memory_bytes") > 50e6
    # a session's counters outlive it
    assert value(gone, "avatar_sessions_active") == 0
    assert value(gone, "avatar_frames_sent_total") >= value(after, "avatar_frames_sent_total")
    assert f'session="{sid}"' not in gone
