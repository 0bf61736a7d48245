"""``POST .../say``: text through a TTS backend into the avatar's speech.

espeak-ng (the offline default) runs for real. No OpenAI-compatible TTS server exists on
this machine, so a stand-in one (standin_tts.py) runs on 127.0.0.1 inside the test: it answers
``POST /v1/audio/speech`` the way such servers do (JSON request, streamed ``wav`` with a
streaming writer's placeholder sizes, or raw 24 kHz ``pcm``), speaking with espeak-ng
so the speech that comes back can be recognised."""

from __future__ import annotations

import pytest
import pytest_asyncio
from speechtools import envelope_match, received_between, utterance_window, wait_finished
from standin_tts import espeak_wav, serving_stand_in

from avatar_stream.audio.decode import decode_wav
from avatar_stream.client.avatarclient import AvatarClient, RequestError
from avatar_stream.config import ServerConfig
from avatar_stream.transports.http.app import running_server

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(90)]

TEXT = "Hello, I am speaking from a text to speech endpoint."


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def stand_in():
    async with serving_stand_in() as tts:
        yield tts


async def say_and_check(url: str, text: str) -> tuple[dict, float, float]:
    async with AvatarClient(url, record_mouth=False) as client:
        reply = await client.say(text, utterance_id="said")
        fin = await wait_finished(client.received, "said", 20)
        t0, t1, _ = utterance_window(client.received, "said")
        got = received_between(client.received, t0 - 0.1, t1 + 0.6)
    reference = decode_wav(espeak_wav(text))
    _, r = envelope_match(reference.samples, reference.rate, got)
    return reply, fin["position_s"], r


async def test_say_with_espeak_offline() -> None:
    config = ServerConfig(host="127.0.0.1", port=0, ice_host_addresses=["127.0.0.1"])
    async with running_server(config) as (url, state):
        reply, position, r = await say_and_check(url, TEXT)
    print(f"espeak: {reply}, played {position:.2f} s, r={r:.2f}")
    assert reply["tts"] == "espeak" and reply["queued_s"] > 1.5
    assert position == pytest.approx(reply["queued_s"], abs=0.05)
    assert r >= 0.8


@pytest.mark.parametrize("fmt", ["wav", "pcm"])
async def test_say_through_an_openai_compatible_endpoint(stand_in, fmt) -> None:
    stand_in.mode, stand_in.requests = "ok", []
    config = ServerConfig(host="127.0.0.1", port=0, ice_host_addresses=["127.0.0.1"],
                          tts="openai", tts_url=stand_in.url, tts_model="f5-tts",
                          tts_voice="narrator", tts_api_key="tts-secret", tts_format=fmt,
                          tts_timeout_s=2.0)
    async with running_server(config) as (url, state):
        reply, position, r = await say_and_check(url, TEXT)
        (body, headers), = stand_in.requests
        assert body == {"model": "f5-tts", "input": TEXT, "voice": "narrator",
                        "response_format": fmt}
        assert headers["Authorization"] == "Bearer tts-secret"
        print(f"openai-compatible ({fmt}): {reply}, played {position:.2f} s, r={r:.2f}")
        assert reply["tts"] == "openai" and r >= 0.8

        # the endpoint misbehaving is the endpoint's fault: 502 / 504, the session lives on
        async with AvatarClient(url, record_mouth=False) as client:
            for mode, status, words in (("error", 502, "answered 500"),
                                        ("mp3", 502, "audio/mpeg"),
                                        ("slow", 504, "longer than")):
                stand_in.mode = mode
                with pytest.raises(RequestError) as err:
                    await client.say("Hi.")
                assert err.value.status == status and words in err.value.message, err.value
            stand_in.mode = "ok"
            await client.say("Still here.", utterance_id="after")
            await wait_finished(client.received, "after", 10, settle=0)


async def test_say_without_a_backend() -> None:
    config = ServerConfig(host="127.0.0.1", port=0, ice_host_addresses=["127.0.0.1"], tts="off")
    async with running_server(config) as (url, state), AvatarClient(url) as client:
        with pytest.raises(RequestError) as err:
            await client.say("Hello")
        assert err.value.status == 503 and "--tts" in err.value.message
