"""The flashhead engine (test-only stand-in pipeline) behind the real server: admission by
measured capacity, and a real aiortc session on loopback end to end."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import numpy as np
import pytest
import pytest_asyncio

pytest.importorskip("torch")

from avatar_stream.bench.analysis import echo_lag, signal_envelope  # noqa: E402
from avatar_stream.client.avatarclient import MIC_RATE, AvatarClient  # noqa: E402
from avatar_stream.config import ServerConfig  # noqa: E402
from avatar_stream.engines.flashhead.standin import read_tag  # noqa: E402
from avatar_stream.transports.http.app import load_state, running_server  # noqa: E402

pytestmark = pytest.mark.asyncio(loop_scope="module")

STEP_FPS = 50.0  # as if warm-up had measured a GPU making 50 frames/s: 2 sessions fit


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def server():
    config = ServerConfig(
        host="127.0.0.1", port=0, ice_host_addresses=["127.0.0.1"], max_sessions=8,
        engine="flashhead",
        engine_options={"checkpoint_dir": "standin", "model": "lite", "device": "cpu"},
    )
    state = await load_state(config)
    assert state.engine.step_fps and state.engine.step_s  # warm-up measured the stand-in
    state.engine.step_fps = STEP_FPS
    async with running_server(config, state) as (url, state):
        async with aiohttp.ClientSession() as http:
            yield url, state, http


class FrameSampler(AvatarClient):
    """AvatarClient that also keeps the luma of every 5th received video frame whole."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.luma: list[np.ndarray] = []

    async def _record(self, track) -> None:  # type: ignore[override]
        if track.kind != "video":
            return await super()._record(track)
        sampler = self

        class Tap:
            kind = "video"

            async def recv(self):  # noqa: ANN202
                frame = await track.recv()
                if frame.pts // 3600 % 5 == 0:
                    sampler.luma.append(frame.to_ndarray(format="gray"))
                return frame

        return await super()._record(Tap())


async def test_capacity_from_the_measured_step_rate(server) -> None:
    url, state, http = server
    async with http.get(f"{url}/readyz") as r:
        body = await r.json()
        assert r.status == 200 and body["engine"] == "flashhead"
        assert body["max_sessions"] == 2 and body["realtime_sessions"] == 2
        assert body["step_fps"] == STEP_FPS and body["free"] == 2
    async with http.get(f"{url}/metrics") as r:
        text = await r.text()
    assert "avatar_sessions_max 2.0" in text and "avatar_engine_step_fps 50.0" in text
    async with AvatarClient(url) as a, AvatarClient(url) as b:
        assert a.session_id in state.sessions and b.session_id in state.sessions
        async with http.get(f"{url}/readyz") as r:
            assert r.status == 503 and (await r.json())["free"] == 0
        third = AvatarClient(url)
        with pytest.raises(RuntimeError, match="503"):
            await third.connect()
        await third.close()
    for _ in range(100):
        if not state.sessions:
            break
        await asyncio.sleep(0.05)
    async with http.get(f"{url}/readyz") as r:
        assert r.status == 200


async def test_a_flashhead_session_end_to_end(server, speech48k) -> None:
    url, state, http = server
    async with FrameSampler(url) as client:
        rec = client.received
        assert client.avatar_info["engine"] == "flashhead"
        assert client.avatar_info["frames_per_step"] == 24
        await asyncio.sleep(1.5)  # idle from the cached loop
        t_speech = time.perf_counter()
        client.mic.play(speech48k)
        speech_s = len(speech48k) / MIC_RATE
        finished = await asyncio.wait_for(client.wait_event("speech.finished"), speech_s + 15)
        # the live gate may cut the clip into several utterances: let all of them play out
        await asyncio.sleep(max(0.0, t_speech + speech_s + 3.0 - time.perf_counter()))
        t_finished = time.perf_counter()
        await asyncio.sleep(1.5)
        stats = state.sessions[client.session_id].stats()

    # video: real time, timestamps only forward
    assert rec.fps() >= 20, rec.fps()
    assert all(b > a for a, b in zip(rec.video_pts, rec.video_pts[1:], strict=False))
    assert finished["interrupted"] is False
    # the frames are FlashHead's: the stand-in's tags say which of a chunk's 33 frames each
    # one was, and only new frames (9..32) ever leave; idle-loop frames carry them too
    tags = [read_tag(y)["chunk_index"] for y in client.luma]
    kept = sum(9 <= t < 33 for t in tags)
    assert len(tags) > 20 and kept >= 0.8 * len(tags), tags
    # the mouth band darkens with loudness: the mouth crop is darker while speech plays
    t = np.asarray(rec.video_t)
    luma = np.asarray([m.mean() for m in rec.mouth])
    idle = luma[t < t_speech]
    speaking = luma[(t > t_speech) & (t < t_finished)]
    print(f"mouth luma idle {idle.mean():.1f}, speaking {speaking.mean():.1f} "
          f"(min {speaking.min():.1f}); sync stats {stats}")
    assert idle.mean() - speaking.min() > 20
    # all the speech comes back (the synchronizer never skips speech). With live audio the
    # current synchronizer still starts some 24-frame steps before their speech is all in
    # and pads them with silence (stats: speech_gaps), so the envelope match is printed,
    # not held to the warp engine's bound; playout_delay_s is the engine's hint for that.
    sent = client.mic.sent.astype(np.float32) / 32768.0
    back = rec.audio_samples()
    voiced = voiced_seconds(back) / voiced_seconds(sent)
    lag, r = echo_lag(client.mic.sent_t0, client.mic.sent, MIC_RATE,
                      rec.audio_t, rec.audio, MIC_RATE, max_lag_s=3.0)
    print(f"voiced time back/sent {voiced:.2f}; echo lag {lag:.2f} s, r={r:.2f}")
    assert 0.8 < voiced < 1.25, voiced


def voiced_seconds(pcm: np.ndarray, rate: int = MIC_RATE) -> float:
    """Seconds of 10 ms blocks louder than a tenth of the signal's loudest (level-free)."""
    _, env = signal_envelope(0.0, pcm, rate)
    return float(np.sum(env > 0.1 * env.max()) * 0.01)


async def test_pushed_speech_plays_whole_and_in_step(server, speech48k) -> None:
    """TTS-style: the whole clip pushed at once. Every 24-frame step then finds its speech
    complete, so nothing is padded and the speech comes back intact, in sync."""
    url, state, http = server
    async with AvatarClient(url) as client:
        rec = client.received
        await asyncio.sleep(1.0)
        t_push = time.perf_counter()
        uid = await client.push_speech(speech48k, MIC_RATE)
        speech_s = len(speech48k) / MIC_RATE
        finished = await asyncio.wait_for(
            client.wait_event("speech.finished", lambda e: e["utterance_id"] == uid),
            speech_s + 15)
        await asyncio.sleep(0.5)
        stats = state.sessions[client.session_id].stats()
    assert finished["interrupted"] is False
    assert abs(finished["position_s"] - speech_s) < 0.05  # all of it, 25 frames a second
    assert stats["speech_gaps"] == 0
    assert rec.fps() >= 20
    lag, r = echo_lag(t_push, speech48k, MIC_RATE, rec.audio_t, rec.audio, MIC_RATE,
                      max_lag_s=3.0)
    print(f"pushed speech: first audio after {lag:.2f} s, r={r:.2f}; stats {stats}")
    assert r >= 0.8 and stats["fillers"] <= 10, (r, stats["fillers"])
    assert 0 < lag < 2.0, lag
