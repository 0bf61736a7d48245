"""A real aiortc client against the real server on loopback, with the warp engine."""

from __future__ import annotations

import asyncio
import time

import av
import numpy as np
import pytest
import pytest_asyncio
from speechtools import until

from avatar_stream.bench.analysis import echo_lag, mouth_motion
from avatar_stream.client.avatarclient import MIC_RATE, AvatarClient
from avatar_stream.config import ServerConfig
from avatar_stream.transports.http.app import running_server

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def server():
    config = ServerConfig(host="127.0.0.1", port=0, ice_host_addresses=["127.0.0.1"],
                          max_sessions=3)
    async with running_server(config) as (url, state):
        yield url, state


async def test_speech_comes_back_in_sync_with_a_moving_mouth(server, speech48k) -> None:
    url, state = server
    async with AvatarClient(url) as client:
        rec = client.received
        assert client.avatar_info["width"] == 512
        await until(lambda: len(rec.video_t) >= 40, 10)  # ~1.6 s idle
        t_speech = time.perf_counter()
        client.mic.play(speech48k)
        speech_s = len(speech48k) / MIC_RATE
        finished = await asyncio.wait_for(client.wait_event("speech.finished"), speech_s + 10)
        await asyncio.sleep(1.0)  # idle again after the speech
        t_end = time.perf_counter()

    # video: >= 20 fps over the run, timestamps strictly increasing
    assert rec.fps() >= 20, rec.fps()
    assert np.all(np.diff(rec.video_pts) > 0)
    assert rec.video_pts[-1] - rec.video_pts[0] >= 3600 * (len(rec.video_pts) - 1)
    assert finished["interrupted"] is False and finished["position_s"] > 0.5 * speech_s

    # audio: the sent speech comes back, same envelope, lag <= 400 ms
    lag, r = echo_lag(client.mic.sent_t0, client.mic.sent, MIC_RATE,
                      rec.audio_t, rec.audio, MIC_RATE)
    print(f"echo lag {lag * 1000:.0f} ms, r={r:.2f}, fps={rec.fps():.1f}")
    assert r >= 0.8 and 0 <= lag <= 0.4, (lag, r)

    # mouth: moves clearly more while the speech plays than while idle
    motion = mouth_motion(rec.mouth)
    t = np.asarray(rec.video_t)
    speaking = (t > t_speech + lag + 0.1) & (t < t_speech + lag + speech_s - 0.1)
    idle = (t < t_speech) | (t > t_speech + lag + speech_s + 0.5)
    idle &= t < t_end
    speak_m, idle_m = motion[speaking].mean(), motion[idle][1:].mean()
    print(f"mouth motion speaking {speak_m:.2f} vs idle {idle_m:.2f}")
    assert speak_m > 2.5 * idle_m and speak_m > 0.5


def sustained_voice(seconds: float, rate: int = MIC_RATE) -> np.ndarray:
    """A vowel-like buzz with no pauses, so 'loud right up to the barge-in' is certain."""
    t = np.arange(int(seconds * rate)) / rate
    f0 = 130 + 10 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voice = sum(np.sin(h * phase) / h for h in range(1, 12))
    return (0.25 * voice / np.abs(voice).max()).astype(np.float32)


async def test_interrupt_silences_the_speech_at_once(server) -> None:
    url, state = server
    async with AvatarClient(url) as client:
        rec = client.received
        client.mic.play(sustained_voice(6.0))
        await asyncio.wait_for(client.wait_event("speech.started"), 5)
        await asyncio.sleep(1.2)
        n_before = len(rec.audio)
        recent = [float(np.sqrt(np.mean(a**2))) for a in rec.audio[-5:]]
        assert min(recent) > 0.05, recent  # speech is playing right now
        t_int = client.interrupt()
        event = await asyncio.wait_for(
            client.wait_event("speech.finished", lambda e: e["interrupted"]), 2)
        await asyncio.sleep(1.0)
        after = rec.audio[n_before:]
        after_t = rec.audio_t[n_before:]
        levels = [float(np.sqrt(np.mean(a**2))) for a in after]
        last_loud = max((i for i, lv in enumerate(levels) if lv > 0.005), default=-1)
        assert 0 <= last_loud < len(levels) - 1  # speech still in flight, then silence
        t_silent = after_t[last_loud + 1]
        print(f"interrupt -> silence {1000 * (t_silent - t_int):.0f} ms")
        assert t_silent - t_int <= 0.2
        assert event["position_s"] > 0.5
        # and the avatar keeps streaming idle video
        n = len(rec.video_t)
        await until(lambda: len(rec.video_t) >= n + 10, 2)
        assert len(rec.video_t) >= n + 10


async def test_sessions_are_freed_on_delete_and_on_peer_close(server) -> None:
    url, state = server
    client = AvatarClient(url)
    await client.connect()
    sid = client.session_id
    assert sid in state.sessions
    await client.close()  # DELETE
    assert sid not in state.sessions

    client = AvatarClient(url)
    await client.connect()
    sid = client.session_id
    session = state.sessions[sid]
    await client.pc.close()  # the peer goes away without DELETE
    await client._http.close()
    assert await until(lambda: sid not in state.sessions, 40), "session not freed"
    assert session.closed.is_set()
    assert all(t.done() for t in session._tasks)
    peer = session.transport
    assert peer.video.readyState == "ended" and peer.audio.readyState == "ended"


async def test_server_shutdown_ends_every_session() -> None:
    config = ServerConfig(host="127.0.0.1", port=0, ice_host_addresses=["127.0.0.1"])
    async with running_server(config) as (url, state):
        client = AvatarClient(url)
        await client.connect()
        session = state.sessions[client.session_id]
    # the server is gone: its sessions were closed on the way out
    assert session.closed.is_set() and not state.sessions
    assert session.transport.pc.connectionState == "closed"
    assert all(t.done() for t in session._tasks)
    await client.close()


async def test_a_sending_stall_delays_speech_but_cuts_none_of_it(server) -> None:
    """aiortc's sender stops taking audio for 200 ms (a busy machine's worst) in the middle
    of the speech, while the pacer goes on: the queue holds it all, and every 20 ms
    arrives."""
    url, state = server
    async with AvatarClient(url) as client:
        session = state.sessions[client.session_id]
        assert session.transport.audio.opus is not None  # Opus negotiated: the track encodes
        take = session.transport.audio.recv
        calls = 0

        async def stalling_recv() -> av.Packet | av.frame.Frame:
            nonlocal calls
            calls += 1
            if calls == 60:
                await asyncio.sleep(0.2)
            return await take()

        session.transport.audio.recv = stalling_recv  # type: ignore[method-assign]
        rec = client.received
        n = len(rec.audio_pts)
        client.mic.play(sustained_voice(3.0))
        await asyncio.wait_for(client.wait_event("speech.started"), 5)
        await asyncio.wait_for(client.wait_event("speech.finished"), 8)
        await asyncio.sleep(0.3)
        pts = np.diff(rec.audio_pts[n:])
    assert calls > 60  # the stall happened while this session spoke
    assert session.transport.audio.dropped == 0
    assert set(pts.tolist()) == {960}, sorted(set(pts.tolist()))  # every 20 ms arrived
