"""Bad and excessive speech input: every bad request gets the right 4xx with a message,
loses nothing accepted before it, and leaves the session (and the one beside it) streaming.
Real server, real aiortc peers, small limits so they are reached quickly."""

from __future__ import annotations

import json
import time

import aiohttp
import numpy as np
import pytest
import pytest_asyncio
from conftest import espeak
from speechtools import at_rate, events, until, wait_finished, ws_reply
from wavs import tone, wav_bytes

from avatar_stream.client.avatarclient import AvatarClient
from avatar_stream.config import ServerConfig
from avatar_stream.transports.http.app import running_server

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(120)]

QUEUE_S = 4.0
MAX_AUDIO = 512 * 1024
MAX_MESSAGE = 64 * 1024


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def server():
    config = ServerConfig(host="127.0.0.1", port=0, ice_host_addresses=["127.0.0.1"],
                          max_sessions=3, speech_queue_s=QUEUE_S, max_audio_bytes=MAX_AUDIO,
                          max_ws_message_bytes=MAX_MESSAGE)
    async with running_server(config) as (url, state):
        async with aiohttp.ClientSession() as http:
            yield url, state, http


@pytest.fixture(scope="module")
def sentence(speech_dir) -> np.ndarray:
    return espeak("The weather today is bright and sunny, with a light breeze.",
                  speech_dir / "limits.wav")


async def test_overflow_is_429_and_nothing_queued_is_lost(server) -> None:
    url, state, http = server
    three = tone(24000, 3.0, amp=0.3)
    two = tone(24000, 2.0, amp=0.3)
    async with AvatarClient(url, record_mouth=False) as client:
        headers = {"Authorization": f"Bearer {client.token}", "Content-Type": "audio/wav"}
        base = f"{url}/v1/sessions/{client.session_id}/audio"
        async with http.post(base, data=wav_bytes(three, 24000), headers=headers,
                             params={"utterance_id": "first"}) as r:
            assert r.status == 202
        async with http.post(base, data=wav_bytes(two, 24000), headers=headers,
                             params={"utterance_id": "second"}) as r:
            body = await r.json()
            assert r.status == 429, body
            assert "speech queue full" in body["error"] and int(r.headers["Retry-After"]) >= 1
        session = state.sessions[client.session_id]
        assert session.speech.seconds > 2.0  # the first utterance is all still there
        # the same over the WebSocket: an error event, the chunk dropped, the rest intact
        async with http.ws_connect(f"{url}/v1/sessions/{client.session_id}/ws",
                                   headers={"Authorization": f"Bearer {client.token}"}) as ws:
            await ws.send_json({"type": "start", "sample_rate": 24000, "utterance_id": "ws"})
            assert (await ws_reply(ws))["type"] == "ack"
            await ws.send_bytes((two * 32767).astype("<i2").tobytes()[:MAX_MESSAGE])
            error = await ws_reply(ws)
            assert error["type"] == "error" and error["code"] == "queue_full"
            # it names the chunk, so the sender can resend it once there is room
            assert (error["utterance_id"], error["offset"]) == ("ws", 0)
            assert error["retry_after"] > 0
            await ws.send_json({"type": "end"})
        finished = await wait_finished(client.received, "first", 10, settle=0)
        assert finished["position_s"] == pytest.approx(3.0, abs=0.03)
        assert finished["interrupted"] is False
        # once it has drained, the same push fits
        async with http.post(base, data=wav_bytes(two, 24000), headers=headers,
                             params={"utterance_id": "second"}) as r:
            assert r.status == 202
        finished = await wait_finished(client.received, "second", 10, settle=0)
        assert finished["position_s"] == pytest.approx(2.0, abs=0.03)


def bad_wav_cases() -> list[tuple[str, bytes, str, int, str]]:
    """(what, body, content type, status, words in the error)."""
    x = tone(16000, 0.5)
    good = wav_bytes(x, 16000)
    nan = x.copy()
    nan[100] = np.nan
    inf = x.copy()
    inf[5] = np.inf
    return [
        ("empty body", b"", "audio/wav", 400, "empty body"),
        ("mp3 sent as wav", b"ID3\x04\x00\x00\x00\x00\x00\x00" + bytes(4000), "audio/wav", 400,
         "not a WAV file"),
        ("text sent as wav", b"hello, I am not audio at all", "audio/wav", 400, "not a WAV"),
        ("truncated header", good[:30], "audio/wav", 400, "truncated"),
        ("header lying about length", good[:2000], "audio/wav", 400, "data chunk says"),
        ("malformed fmt", good[:20] + b"\xff\xff" + good[22:], "audio/wav", 400, ""),
        ("zero channels", wav_bytes(x, 16000, fmt_overrides={"channels": 0, "align": 0}),
         "audio/wav", 400, "0 channels"),
        ("absurd rate", wav_bytes(x, 16000, fmt_overrides={"rate": 3_000_000}), "audio/wav",
         400, "sample rate"),
        ("rate zero", wav_bytes(x, 16000, fmt_overrides={"rate": 0}), "audio/wav", 400,
         "sample rate"),
        ("NaN floats", wav_bytes(nan, 16000, kind="f32"), "audio/wav", 400, "NaN"),
        ("inf floats", wav_bytes(inf, 16000, kind="f64"), "audio/wav", 400, "infinity"),
        ("L16 without rate", b"\x00\x01" * 100, "audio/L16", 400, "rate="),
        ("L16 absurd rate", b"\x00\x01" * 100, "audio/L16;rate=5", 400, "sample rate 5"),
        ("L16 odd length", b"\x00" * 101, "audio/L16;rate=16000", 400, "whole number"),
        ("mp3 content type", b"ID3" + bytes(100), "audio/mpeg", 415, "unsupported"),
        ("no content type", good, "", 415, "unsupported"),
        ("oversized body", bytes(MAX_AUDIO + 1), "audio/L16;rate=16000", 413, "at most"),
    ]


async def test_bad_input_gets_the_right_4xx_and_the_sessions_stream_on(
        server, sentence) -> None:
    url, state, http = server
    x = at_rate(sentence, 24000)
    async with AvatarClient(url, record_mouth=False) as client, \
            AvatarClient(url, record_mouth=False) as other:
        sid, token = client.session_id, client.token
        auth = {"Authorization": f"Bearer {token}"}
        base = f"{url}/v1/sessions/{sid}"
        await client.push_speech(x, 24000, utterance_id="kept")  # accepted before the storm
        rec, orec = client.received, other.received
        t_start = time.perf_counter()
        n0, m0 = len(rec.video_t), len(orec.video_t)

        # -- HTTP bodies
        for what, body, ctype, status, words in bad_wav_cases():
            headers = {**auth, **({"Content-Type": ctype} if ctype else {})}
            async with http.post(f"{base}/audio", data=body, headers=headers,
                                 params={"utterance_id": "bad"}) as r:
                reply = await r.json()
                assert r.status == status, (what, r.status, reply)
                assert words in reply["error"], (what, reply)
        # -- query parameters and other calls
        for params, words in (({"end": "maybe"}, "end="),
                              ({"utterance_id": "x" * 500}, "utterance_id")):
            async with http.post(f"{base}/audio", data=wav_bytes(tone(16000, 0.1), 16000),
                                 params=params, headers={**auth, "Content-Type": "audio/wav"}) as r:
                assert r.status == 400 and words in (await r.json())["error"]
        for body, ctype, status in ((b"{", "application/json", 400),
                                    (b'{"text": ""}', "application/json", 400),
                                    (b'{"text": 5}', "application/json", 400),
                                    (json.dumps({"text": "a" * 5000}).encode(),
                                     "application/json", 400),
                                    (b"say hi", "text/plain", 415),
                                    (b'{"text": "hi", "voice": "-f /etc/passwd"}',
                                     "application/json", 400)):
            async with http.post(f"{base}/say", data=body,
                                 headers={**auth, "Content-Type": ctype}) as r:
                assert r.status == status, (body, r.status, await r.text())
        async with http.post(f"{base}/end", json={"utterance_id": 7}, headers=auth) as r:
            assert r.status == 400
        for path in ("/audio", "/interrupt", "/say", ""):
            async with http.post(f"{url}/v1/sessions/nope{path}", headers=auth) as r:
                assert r.status in (404, 405), (path, r.status)  # open server: no 403
            async with http.post(f"{url}/v1/sessions/nope{path}") as r:
                assert r.status in (404, 405), (path, r.status)

        # -- garbage on the WebSocket
        async with http.ws_connect(f"{base}/ws", params={"token": token}) as ws:
            garbage = ["not json", "[1, 2]", '{"no": "type"}', '{"type": "dance"}',
                       b"\x01\x02 binary before start",
                       '{"type": "start", "sample_rate": 0}',
                       '{"type": "start", "sample_rate": 1000000000}',
                       '{"type": "start", "sample_rate": "fast"}',
                       '{"type": "start", "sample_rate": 16000, "channels": 0}',
                       '{"type": "start", "sample_rate": 16000, "utterance_id": 12}',
                       '{"type": "end"}']
            for message in garbage:
                if isinstance(message, bytes):
                    await ws.send_bytes(message)
                else:
                    await ws.send_str(message)
                reply = await ws_reply(ws)
                assert reply["type"] == "error" and reply["message"], (message, reply)
            await ws.send_json({"type": "start", "sample_rate": 16000, "utterance_id": "ws-ok"})
            assert (await ws_reply(ws))["type"] == "ack"
            await ws.send_bytes(b"\x00\x01\x02")  # odd length
            assert (await ws_reply(ws))["code"] == "bad_audio"
            await ws.send_json({"type": "end"})
            assert (await ws_reply(ws))["type"] == "ack"
            await ws.send_bytes(bytes(MAX_MESSAGE + 2))  # too big: the socket is closed
            closing = await ws.receive(timeout=5)
            assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                                    aiohttp.WSMsgType.ERROR)
        # -- garbage on the data channel
        for message in ("{", '{"type": "dance"}', b"\x00\x00 before start"):
            client._channel.send(message)
        await until(lambda: len(events(rec, "error")) >= 3, 5)
        assert all(e["message"] for _, e in events(rec, "error"))

        finished = await wait_finished(rec, "kept", 15, settle=0)
        elapsed = time.perf_counter() - t_start
        fps = (len(rec.video_t) - n0) / elapsed
        other_fps = (len(orec.video_t) - m0) / elapsed

    print(f"bad input for {elapsed:.1f} s: session {fps:.1f} fps, the other {other_fps:.1f} fps")
    assert finished["interrupted"] is False
    assert finished["position_s"] == pytest.approx(len(x) / 24000, abs=0.03)  # nothing lost
    assert fps >= 20 and other_fps >= 20
    assert not [e for _, e in events(orec) if e["type"].startswith("speech")]  # untouched
    assert not events(rec, "speech.started", "bad")


async def test_unknown_and_ended_sessions(server) -> None:
    url, state, http = server
    client = AvatarClient(url, record_mouth=False)
    await client.connect()
    sid, token = client.session_id, client.token
    await client.close()  # DELETE
    auth = {"Authorization": f"Bearer {token}"}
    for method, path in (("POST", "/audio"), ("POST", "/interrupt"), ("GET", ""),
                         ("DELETE", ""), ("POST", "/say")):
        async with http.request(method, f"{url}/v1/sessions/{sid}{path}", headers=auth,
                                data=b"x") as r:
            body = await r.json()
            assert r.status == 410 and "ended" in body["error"], (path, r.status, body)
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await http.ws_connect(f"{url}/v1/sessions/{sid}/ws", params={"token": token})
    assert refused.value.status == 410
    async with http.get(f"{url}/v1/sessions/never-was") as r:
        assert r.status == 404 and "unknown session" in (await r.json())["error"]
