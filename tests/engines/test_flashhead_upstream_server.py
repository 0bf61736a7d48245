"""The server on upstream FlashHead's real code (tiny random weights, ``--device cpu``): a real
aiortc client on loopback, speech pushed and over the audio track, barge-in, an upload that
fails in the engine and ``POST /v1/animate``
(``avatar-stream render`` is in test_flashhead_upstream.py).

A tiny model on 2 cores makes 24 frames in ~3-4 s, slower than real time, so these tests
check what is made from what and in what order, never the rate: the server admits one
session, and that session's speech plays in bursts of 24 frames with the picture held
(silent filler frames) between them. Speech is never skipped or reordered.
"""

from __future__ import annotations

import asyncio
import io

import aiohttp
import av
import cv2
import numpy as np
import pytest
import pytest_asyncio

torch = pytest.importorskip("torch")

from flashhead_tiny import tiny_checkpoints, upstream_src  # noqa: E402
from speechtools import envelope_match, events, until, wait_finished  # noqa: E402
from wavs import wav_bytes  # noqa: E402

from avatar_stream.avatars.photo import default_avatar_image  # noqa: E402
from avatar_stream.client.avatarclient import MIC_RATE, AvatarClient  # noqa: E402
from avatar_stream.config import ServerConfig  # noqa: E402
from avatar_stream.engines.flashhead import engine as fh  # noqa: E402
from avatar_stream.transports.http.app import load_state, running_server  # noqa: E402

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(600)]
STEP_S = 0.96  # 24 frames


@pytest.fixture(scope="module")
def upstream() -> tuple[str, str, str]:
    src = upstream_src()
    return (src, *tiny_checkpoints(src))


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def server(upstream):
    src, checkpoints, wav2vec = upstream
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fh, "IDLE_CHUNKS", 1)  # a tiny step takes seconds on these cores
        mp.setattr(fh, "MEASURE_STEPS", 1)
        config = ServerConfig(
            host="127.0.0.1", port=0, ice_host_addresses=["127.0.0.1"], max_sessions=4,
            engine="flashhead",
            engine_options={"checkpoint_dir": checkpoints, "wav2vec_dir": wav2vec,
                            "device": "cpu", "compile": False, "upstream_dir": src},
        )
        state = await load_state(config)
        async with running_server(config, state) as (url, state):
            async with aiohttp.ClientSession() as http:
                yield url, state, http


def voiced(samples: np.ndarray, rate: int) -> np.ndarray:
    """The 20 ms blocks that hold sound, in order: the held-picture gaps taken out."""
    n = rate // 50
    blocks = samples[: len(samples) // n * n].reshape(-1, n)
    loud = np.sqrt(np.square(blocks).mean(axis=1)) > 0.01
    return blocks[loud].reshape(-1)


async def test_one_session_is_admitted_when_slower_than_real_time(server) -> None:
    url, state, http = server
    assert type(state.engine.pipeline).__module__.startswith("flash_head.")
    async with http.get(f"{url}/readyz") as r:
        body = await r.json()
    assert r.status == 200 and body["realtime_sessions"] == 0 and body["max_sessions"] == 1
    async with AvatarClient(url) as client:
        assert client.avatar_info["engine"] == "flashhead"
        second = AvatarClient(url)
        with pytest.raises(RuntimeError, match="503"):
            await second.connect()
        await second.close()


async def test_pushed_speech_plays_whole_in_order_then_a_barge_in_cuts_it(
        server, speech48k) -> None:
    url, state, http = server
    speech = speech48k[: int(2 * STEP_S * MIC_RATE)]  # two steps' worth
    async with AvatarClient(url) as client:
        rec = client.received
        uid = await client.push_speech(speech, MIC_RATE)
        finished = await wait_finished(rec, uid, timeout=120, settle=1.5)
        session = state.sessions[client.session_id]
        stats = session.stats()
        assert events(rec, "speech.started", uid) and finished["interrupted"] is False
        assert abs(finished["position_s"] - len(speech) / MIC_RATE) < 0.05  # all of it
        assert stats["speech_gaps"] == 0 and stats["fillers"] > 0  # held, never skipped
        # the speech comes back whole and in order, once the held gaps are taken out
        pts = np.array(rec.video_pts)
        assert len(pts) > 2 * 24 and np.all(np.diff(pts) > 0)
        sent = voiced(speech.astype(np.float32) / 32768.0, MIC_RATE)
        back = voiced(rec.audio_samples(), MIC_RATE)
        gaps = np.diff(np.array(rec.audio_pts))
        print(f"voiced back {len(back) / MIC_RATE:.2f} s of {len(sent) / MIC_RATE:.2f} s; "
              f"audio pts steps {np.unique(gaps, return_counts=True)}; stats {stats}")
        assert 0.8 < len(back) / len(sent) < 1.25, (len(back), len(sent))
        _, r = envelope_match(sent, MIC_RATE, back, MIC_RATE)
        assert r > 0.7, r

        # a longer utterance, cut as soon as it is heard
        long_uid = await client.push_speech(speech48k[: int(4 * STEP_S * MIC_RATE)], MIC_RATE)
        assert await until(lambda: bool(events(rec, "speech.started", long_uid)), 120)
        cut_at = asyncio.get_running_loop().time()
        client.interrupt()
        cut = await wait_finished(rec, long_uid, timeout=10, settle=0)
        assert cut["interrupted"] is True and cut["position_s"] < 4 * STEP_S
        assert asyncio.get_running_loop().time() - cut_at < 5  # not after the engine's step
        assert session.stats()["interrupts"] == 1


async def test_speech_over_the_audio_track(server, speech48k) -> None:
    url, state, http = server
    async with AvatarClient(url) as client:
        rec = client.received
        client.mic.play(speech48k[: int(2 * STEP_S * MIC_RATE)])
        assert await until(lambda: bool(events(rec, "speech.finished")), 120), rec.events
        (_, started), *_ = events(rec, "speech.started")
        (_, finished), *_ = events(rec, "speech.finished")
        assert started["utterance_id"] == finished["utterance_id"]
        assert finished["interrupted"] is False and finished["position_s"] > 0.5


async def test_an_upload_the_engine_fails_on_is_a_clear_503(server) -> None:
    url, state, http = server
    pipe = state.engine.pipeline
    encode = pipe.vae.encode

    def out_of_memory(video):
        raise RuntimeError("CUDA out of memory (injected by the test)")

    rgb = default_avatar_image()
    png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()
    pipe.vae.encode = out_of_memory
    try:
        async with http.post(f"{url}/v1/avatars?id=doomed", data=png,
                             headers={"Content-Type": "image/png"}) as r:
            body = await r.json()
    finally:
        pipe.vae.encode = encode
    assert r.status == 503 and body["reason"] == "engine_failed", body
    assert "out of memory" in body["error"] and r.headers["Retry-After"]
    async with http.get(f"{url}/v1/avatars") as r:
        ids = [a["id"] for a in (await r.json())["avatars"]]
    assert "doomed" not in ids
    async with AvatarClient(url) as client:  # the default avatar still works
        assert await until(lambda: len(client.received.video_pts) > 10, 30)


async def test_animate_with_flashhead(server, speech48k) -> None:
    url, state, http = server
    speech = speech48k[: int(1.0 * MIC_RATE)]
    form = aiohttp.FormData()
    form.add_field("audio", wav_bytes(speech / 32768.0, MIC_RATE), filename="s.wav",
                   content_type="audio/wav")
    form.add_field("format", "webm")
    async with http.post(f"{url}/v1/animate", data=form) as r:
        assert r.status == 200, await r.text()
        clip = await r.read()
    with av.open(io.BytesIO(clip)) as c:
        frames = sum(1 for p in c.demux(c.streams.video[0]) for _ in p.decode())
    assert frames == 25  # one frame per 40 ms of speech, though the engine steps 24 at once
