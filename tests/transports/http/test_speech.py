"""Pushed speech, end to end: a real aiortc client holds the session and watches the avatar
while speech is pushed over HTTP, the WebSocket and the data channel, at every rate and in
every format a TTS front-end sends; what comes back on the avatar's audio track must be
that speech (loudness envelopes correlate), in order, at real time, with events."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import numpy as np
import pytest
import pytest_asyncio
from conftest import espeak
from speechtools import (
    at_rate,
    envelope_match,
    events,
    received_between,
    until,
    utterance_window,
    wait_finished,
)
from wavs import wav_bytes

from avatar_stream.client.avatarclient import (
    DC_HIGH_WATER,
    AvatarClient,
    RequestError,
    SessionControl,
)
from avatar_stream.client.sessioncontrol import CHUNK_BYTES
from avatar_stream.config import ServerConfig
from avatar_stream.transports.http.app import running_server

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(120)]

SENTENCES = [
    "Good morning.",
    "The weather today is bright and sunny, with a light breeze.",
    "Would you like to hear more?",
]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def server():
    config = ServerConfig(host="127.0.0.1", port=0, ice_host_addresses=["127.0.0.1"],
                          max_sessions=4, utterance_idle_end_s=0.6)
    async with running_server(config) as (url, state):
        async with aiohttp.ClientSession() as http:
            yield url, state, http


@pytest.fixture(scope="module")
def sentences(speech_dir) -> list[np.ndarray]:
    """Three different sentences, int16 48 kHz."""
    return [espeak(text, speech_dir / f"sentence{i}.wav") for i, text in enumerate(SENTENCES)]


def auth(client: AvatarClient) -> dict[str, str]:
    return {"Authorization": f"Bearer {client.token}"}


async def post_audio(http, url, client, body: bytes, ctype: str, **params: str):
    async with http.post(f"{url}/v1/sessions/{client.session_id}/audio", data=body,
                         params=params, headers={"Content-Type": ctype, **auth(client)}) as r:
        return r.status, await r.json(), r.headers


def l16(x: np.ndarray, byteorder: str = ">") -> bytes:
    return (np.clip(x, -1, 1) * 32767).astype(f"{byteorder}i2").tobytes()


# rate, channels, how it is sent
CASES = [
    (8000, 1, "wav-s16"),
    (16000, 1, "wav-s16"),
    (22050, 1, "L16"),
    (24000, 1, "wav-f32"),  # F5-TTS's native rate, float
    (24000, 2, "L16"),
    (44100, 2, "wav-s16"),
    (48000, 1, "wav-f64-extensible"),
    (48000, 2, "pcm-s16le"),
    (96000, 1, "wav-s24"),
    (96000, 2, "wav-f32"),
]


def encode(x: np.ndarray, rate: int, channels: int, how: str) -> tuple[bytes, str]:
    data = np.stack([x, 0.5 * x], axis=1) if channels == 2 else x
    if how == "L16":
        return l16(data.reshape(-1)), f"audio/L16;rate={rate};channels={channels}"
    if how == "pcm-s16le":
        return l16(data.reshape(-1), "<"), f"audio/pcm;rate={rate};channels={channels}"
    kind = how.split("-")[1]
    return wav_bytes(data, rate, kind=kind, extensible=how.endswith("extensible")), "audio/wav"


async def test_pushed_speech_at_every_rate_and_format_comes_back(server, sentences) -> None:
    url, state, http = server
    phrase = sentences[0]  # ~1 s
    async with AvatarClient(url, record_mouth=False) as client:
        rec = client.received
        pushed = {}
        for i, (rate, channels, how) in enumerate(CASES):
            x = at_rate(phrase, rate)
            body, ctype = encode(x, rate, channels, how)
            status, reply, _ = await post_audio(http, url, client, body, ctype,
                                                utterance_id=f"case-{i}")
            assert status == 202, reply
            assert reply["sample_rate"] == rate and reply["channels"] == channels
            assert reply["received_s"] == pytest.approx(len(x) / rate, abs=0.002)
            pushed[f"case-{i}"] = (x, rate, channels)
        # all queued at once, far ahead of playout; they play one after another
        await wait_finished(rec, f"case-{len(CASES) - 1}", 30)

    started = [e["utterance_id"] for _, e in events(rec, "speech.started")]
    assert started == [f"case-{i}" for i in range(len(CASES))]
    for i, (rate, channels, how) in enumerate(CASES):
        uid = f"case-{i}"
        x, _, _ = pushed[uid]
        t0, t1, fin = utterance_window(rec, uid)
        got = received_between(rec, t0 - 0.1, t1 + 0.6)
        lag, r = envelope_match(x, rate, got)
        print(f"{rate:>6} Hz x{channels} {how:<20} position {fin['position_s']:.3f} s "
              f"(pushed {len(x) / rate:.3f}), r={r:.2f}, offset {lag:.2f} s")
        assert fin["interrupted"] is False
        assert fin["position_s"] == pytest.approx(len(x) / rate, abs=0.03)
        assert r >= 0.8, (uid, how, r)


async def test_faster_than_real_time_utterances_play_in_order_at_real_time(
        server, sentences) -> None:
    url, state, http = server
    async with AvatarClient(url, record_mouth=False) as client:
        rec = client.received
        session = state.sessions[client.session_id]
        gaps_before = session.sync.stats.speech_gaps
        fillers_before = session.sync.stats.fillers
        t_push = time.perf_counter()
        for i, s in enumerate(sentences):  # 24 kHz float, like F5-TTS
            await client.push_speech(at_rate(s, 24000), 24000, utterance_id=f"u{i}")
        push_s = time.perf_counter() - t_push
        total = sum(len(s) / 48000 for s in sentences)
        await wait_finished(rec, "u2", total + 10)
        gaps = session.sync.stats.speech_gaps - gaps_before
        fillers = session.sync.stats.fillers - fillers_before

    windows = [utterance_window(rec, f"u{i}") for i in range(3)]
    order = [e["utterance_id"] for _, e in events(rec) if e["type"].startswith("speech.")]
    assert order == ["u0", "u0", "u1", "u1", "u2", "u2"]
    print(f"pushed {total:.2f} s of speech in {push_s * 1000:.0f} ms")
    for i, (t0, t1, fin) in enumerate(windows):
        duration = len(sentences[i]) / 48000
        print(f"u{i}: {duration:.2f} s pushed, played {t1 - t0:.2f} s, "
              f"position {fin['position_s']:.3f}")
        assert fin["position_s"] == pytest.approx(duration, abs=0.03)
        assert t1 - t0 == pytest.approx(duration, abs=0.2)  # real time, no holes
    for (_, t1, _), (t0, _, _) in zip(windows, windows[1:], strict=False):
        assert t0 - t1 < 0.15  # the next utterance follows at once
    assert windows[-1][1] - windows[0][0] == pytest.approx(total, abs=0.3)
    assert gaps == 0 and fillers == 0, (gaps, fillers)
    # and what came back is the three sentences back to back
    whole = np.concatenate([s.astype(np.float32) / 32768 for s in sentences])
    lag, r = envelope_match(whole, 48000,
                            received_between(rec, windows[0][0] - 0.1, windows[-1][1] + 0.2))
    print(f"all three: r={r:.2f}")
    assert r >= 0.85


async def test_pieces_of_one_utterance_play_without_holes(server, sentences) -> None:
    url, state, http = server
    x = at_rate(sentences[1], 16000)
    pieces = np.array_split(x, 8)
    async with AvatarClient(url, record_mouth=False) as client:
        rec = client.received
        session = state.sessions[client.session_id]
        gaps_before = session.sync.stats.speech_gaps
        for i, piece in enumerate(pieces):  # streamed a little ahead of playout
            await client.push_speech(piece, 16000, utterance_id="long", end=i == len(pieces) - 1)
            await asyncio.sleep(0.05)
        fin = await wait_finished(rec, "long", 10)
        assert session.sync.stats.speech_gaps == gaps_before
    assert len(events(rec, "speech.started", "long")) == 1
    assert fin["position_s"] == pytest.approx(len(x) / 16000, abs=0.03)


async def test_an_utterance_left_open_still_finishes(server, sentences) -> None:
    url, state, http = server
    x = at_rate(sentences[0], 24000)
    async with AvatarClient(url, record_mouth=False) as client:
        rec = client.received
        t = time.perf_counter()
        await client.push_speech(x, 24000, utterance_id="open", end=False)  # no end, ever
        fin = await wait_finished(rec, "open", 10, settle=0)
        t_fin = time.perf_counter() - t
        # later audio under the same id plays as a continuation
        await client.push_speech(x, 24000, utterance_id="open", end=True)
        await until(lambda: len(events(rec, "speech.finished", "open")) == 2, 10)
    duration = len(x) / 24000
    print(f"open utterance of {duration:.2f} s finished after {t_fin:.2f} s")
    assert fin["position_s"] == pytest.approx(duration, abs=0.03)
    assert duration < t_fin < duration + 0.6 + 1.2  # idle end 0.6 s after it ran dry
    assert len(events(rec, "speech.started", "open")) == 2


async def test_websocket_speech_and_the_same_events_as_the_data_channel(
        server, sentences) -> None:
    url, state, http = server
    x = at_rate(sentences[1], 24000)
    async with AvatarClient(url, record_mouth=False) as client, \
            SessionControl(url, client.session_id, client.token) as control:
        rec = client.received
        uid = await control.push_speech(x, 24000, utterance_id="ws-1")
        fin_ws = await asyncio.wait_for(
            control.wait_event("speech.finished", lambda e: e["utterance_id"] == "ws-1"), 15)
        fin_dc = await wait_finished(rec, "ws-1", 5)
        t0, t1, _ = utterance_window(rec, "ws-1")
        got = received_between(rec, t0 - 0.1, t1 + 0.6)
        lag, r = envelope_match(x, 24000, got)
        assert uid == "ws-1" and r >= 0.8, r
        assert {k: fin_ws[k] for k in ("utterance_id", "position_s", "interrupted")} == \
            {k: fin_dc[k] for k in ("utterance_id", "position_s", "interrupted")}
        ws_kinds = [e["type"] for _, e in control.received if e["type"].startswith("speech")]
        assert ws_kinds == ["speech.started", "speech.finished"]

        # barge-in over the WebSocket: a long utterance is cut for both listeners
        long = np.concatenate([x, x, x])
        await control.push_speech(long, 24000, utterance_id="ws-2", end=False)
        await asyncio.wait_for(
            control.wait_event("speech.started", lambda e: e["utterance_id"] == "ws-2"), 5)
        await asyncio.sleep(0.5)
        await control.interrupt()
        cut = await asyncio.wait_for(
            control.wait_event("speech.finished", lambda e: e["utterance_id"] == "ws-2"), 5)
        assert cut["interrupted"] is True and 0.3 < cut["position_s"] < 2.0
        fin_dc = await wait_finished(rec, "ws-2", 5, settle=0)
        assert fin_dc["interrupted"] is True
        # more audio for the cut utterance is dropped, not played
        with pytest.raises(RequestError) as refused:
            await control.push_speech(x, 24000, utterance_id="ws-2", via="http")
        assert refused.value.status == 409
        print(f"WebSocket speech r={r:.2f}; barge-in at {cut['position_s']:.2f} s")


async def test_data_channel_speech_minds_buffering(server, sentences) -> None:
    url, state, http = server
    x = at_rate(np.concatenate(sentences), 48000)  # ~6 s: ~600 KB of PCM16, > high water
    async with AvatarClient(url, record_mouth=False) as client:
        rec = client.received
        channel = client._channel
        seen: list[int] = []
        send = channel.send

        def watched(data):  # what aiortc holds unsent after each message we hand it
            send(data)
            seen.append(channel.bufferedAmount)

        channel.send = watched  # type: ignore[method-assign]
        t = time.perf_counter()
        uid = await client.push_speech(x, 48000, utterance_id="dc-1", via="datachannel")
        push_s = time.perf_counter() - t
        fin = await wait_finished(rec, uid, 15)
        t0, t1, _ = utterance_window(rec, uid)
        lag, r = envelope_match(x, 48000, received_between(rec, t0 - 0.1, t1 + 0.6))
    print(f"data channel: {len(x) * 2 / 1e6:.2f} MB pushed in {push_s:.2f} s, max buffered "
          f"{max(seen) / 1024:.0f} KB, r={r:.2f}")
    assert max(seen) <= DC_HIGH_WATER + CHUNK_BYTES
    assert fin["position_s"] == pytest.approx(len(x) / 48000, abs=0.03)
    assert r >= 0.8


async def test_two_sessions_each_get_only_their_own_speech(server, sentences) -> None:
    url, state, http = server
    a_speech, b_speech = sentences[1], np.concatenate([sentences[2], sentences[0]])
    async with AvatarClient(url, record_mouth=False) as a, \
            AvatarClient(url, record_mouth=False) as b:
        await asyncio.gather(
            a.push_speech(a_speech, 48000, utterance_id="for-a"),
            b.push_speech(b_speech, 48000, utterance_id="for-b"),
        )
        await asyncio.gather(wait_finished(a.received, "for-a", 15),
                             wait_finished(b.received, "for-b", 15))
    results = {}
    for name, client, own, other in (("a", a, a_speech, b_speech), ("b", b, b_speech, a_speech)):
        rec = client.received
        ids = {e.get("utterance_id") for _, e in events(rec) if "utterance_id" in e}
        assert ids == {f"for-{name}"}, ids
        t0, t1, _ = utterance_window(rec, f"for-{name}")
        got = received_between(rec, t0 - 0.1, t1 + 0.6)
        _, r_own = envelope_match(own, 48000, got)
        _, r_other = envelope_match(other[: len(own)], 48000, got)
        results[name] = (r_own, r_other)
    print("isolation (own r, other r):", {k: tuple(round(v, 2) for v in rs)
                                          for k, rs in results.items()})
    for r_own, r_other in results.values():
        assert r_own >= 0.8 and r_other < r_own - 0.25
