"""The HTTP interface: bad input gets the right 4xx with a message, and a session that is
already streaming is untouched by any of it."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
import pytest_asyncio
from aiortc import RTCPeerConnection, RTCSessionDescription

from avatar_stream.client.avatarclient import AvatarClient
from avatar_stream.config import ServerConfig
from avatar_stream.transports.http.app import running_server
from avatar_stream.transports.webrtc.ice import filter_candidates, rtc_configuration

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def server():
    config = ServerConfig(host="127.0.0.1", port=0, ice_host_addresses=["127.0.0.1"],
                          max_sessions=2)
    async with running_server(config) as (url, state):
        async with aiohttp.ClientSession() as http:
            yield url, state, http


async def test_health_and_readiness(server) -> None:
    url, state, http = server
    async with http.get(f"{url}/healthz") as r:
        assert r.status == 200
    async with http.get(f"{url}/readyz") as r:
        assert r.status == 200 and (await r.json())["engine"] == "warp"
    async with http.get(f"{url}/") as r:
        assert r.status == 200 and "<video" in await r.text()


@pytest.mark.parametrize(
    "body, ctype, status, words",
    [
        (b"{not json", "application/json", 400, "malformed JSON"),
        (b'["offer"]', "application/json", 400, "expected"),
        (b'{"type": "offer", "sdp": "hello"}', "application/json", 400, "v=0"),
        (b'{"type": "offer", "sdp": "v=0\\r\\nnonsense"}', "application/json", 400, "m-line"),
        (b'{"type": "answer", "sdp": "v=0"}', "application/json", 400, "offer"),
        (b"v=0\r\nm=video x", "application/sdp", 400, "invalid SDP"),
        (b"v=0", "text/plain", 415, "application/json"),
        (b'{"type": "offer", "sdp": "v=0", "avatar": "nobody"}', "application/json", 404,
         "unknown avatar"),
    ],
)
async def test_bad_offers_are_refused_with_a_message(server, body, ctype, status, words) -> None:
    url, state, http = server
    before = len(state.sessions)
    async with http.post(f"{url}/v1/sessions", data=body, headers={"Content-Type": ctype}) as r:
        assert r.status == status
        assert words in (await r.json())["error"]
    assert len(state.sessions) == before


async def test_offer_without_video_is_refused(server) -> None:
    url, state, http = server
    pc = RTCPeerConnection(rtc_configuration([]))
    pc.addTransceiver("audio", direction="sendrecv")
    await pc.setLocalDescription(await pc.createOffer())
    async with http.post(f"{url}/v1/sessions", json={"sdp": pc.localDescription.sdp}) as r:
        assert r.status == 400 and "video" in (await r.json())["error"]
    await pc.close()
    assert not state.sessions


async def test_unknown_session_ids(server) -> None:
    url, state, http = server
    async with http.delete(f"{url}/v1/sessions/nope") as r:
        assert r.status == 404 and "unknown session" in (await r.json())["error"]
    async with http.post(f"{url}/v1/sessions/nope/interrupt") as r:
        assert r.status == 404


async def test_whep_style_sdp_offer_gets_an_sdp_answer(server) -> None:
    url, state, http = server
    pc = RTCPeerConnection(rtc_configuration([]))
    pc.addTransceiver("video", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    async with http.post(f"{url}/v1/sessions", data=pc.localDescription.sdp,
                         headers={"Content-Type": "application/sdp"}) as r:
        assert r.status == 201 and r.content_type == "application/sdp"
        location = r.headers["Location"]
        answer = await r.text()
    assert answer.startswith("v=0") and "m=video" in answer
    await pc.setRemoteDescription(RTCSessionDescription(
        sdp=filter_candidates(answer, ["127.0.0.1"]), type="answer"))
    async with http.delete(f"{url}{location}") as r:
        assert r.status == 204
    await pc.close()


async def test_a_live_session_survives_bad_requests_and_capacity_is_enforced(server) -> None:
    url, state, http = server
    async with AvatarClient(url) as client:
        rec = client.received
        frames_before = len(rec.video_t)
        for body in (b"{", b"v=0", b'{"sdp": 5}'):
            async with http.post(f"{url}/v1/sessions", data=body,
                                 headers={"Content-Type": "application/json"}) as r:
                assert r.status == 400
        async with http.delete(f"{url}/v1/sessions/{client.session_id}x") as r:
            assert r.status == 404
        async with AvatarClient(url) as second:
            assert second.session_id in state.sessions
            async with http.get(f"{url}/readyz") as r:
                assert r.status == 503
            third = AvatarClient(url)
            with pytest.raises(RuntimeError, match="503"):
                await third.connect()
            await third.close()
            async with http.post(f"{url}/v1/sessions", json={"sdp": "v=0"}) as r:
                assert r.status == 503 and r.headers["Retry-After"]
        t = time.perf_counter()
        while len(rec.video_t) < frames_before + 50 and time.perf_counter() - t < 5:
            await asyncio.sleep(0.05)
        assert len(rec.video_t) >= frames_before + 50  # still streaming
        assert rec.fps(since=t - 1) >= 20
        assert client.session_id in state.sessions
