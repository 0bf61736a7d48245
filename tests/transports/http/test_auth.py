"""Who may call what, on the real server: the API key, per-session tokens (missing, wrong,
another session's, expired), CORS, the per-address creation limit, and sessions that end
on their own (idle timeout, maximum duration)."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
import pytest_asyncio
from speechtools import events, until
from wavs import tone, wav_bytes

from avatar_stream.client.avatarclient import AvatarClient, RequestError, SessionControl
from avatar_stream.config import ServerConfig
from avatar_stream.transports.http.app import running_server
from avatar_stream.transports.http.auth import RateLimiter, TokenIssuer

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(90)]

KEY = "test-key-0123456789"
ORIGIN = "https://assistant.example"


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def server():
    config = ServerConfig(host="127.0.0.1", port=0, ice_host_addresses=["127.0.0.1"],
                          max_sessions=3, api_key=KEY, cors_origins=[ORIGIN],
                          sessions_per_ip_per_minute=0)
    async with running_server(config) as (url, state):
        async with aiohttp.ClientSession() as http:
            yield url, state, http


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


WAV = wav_bytes(tone(16000, 0.3), 16000)


async def test_api_key_and_session_tokens(server) -> None:
    url, state, http = server
    # open: the page, health, metrics
    for path in ("/", "/healthz", "/readyz", "/metrics"):
        async with http.get(f"{url}{path}") as r:
            assert r.status == 200, path
    # server-wide calls need the key
    for headers, words in (({}, "missing"), (bearer("nope"), "wrong API key"),
                           ({"Authorization": f"Basic {KEY}"}, "missing")):
        async with http.post(f"{url}/v1/sessions", json={"sdp": "v=0"}, headers=headers) as r:
            assert r.status == 401 and words in (await r.json())["error"]
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
        async with http.get(f"{url}/v1/sessions", headers=headers) as r:
            assert r.status == 401
        async with http.get(f"{url}/v1/config", headers=headers) as r:
            assert r.status == 401  # it may hold TURN credentials
    keyless = AvatarClient(url, record_mouth=False)
    with pytest.raises(RequestError) as refused:
        await keyless.connect()
    await keyless.close()
    assert refused.value.status == 401

    async with AvatarClient(url, api_key=KEY, record_mouth=False) as a, \
            AvatarClient(url, api_key=KEY, record_mouth=False) as b:
        assert a.token and b.token and a.token != b.token
        audio = f"{url}/v1/sessions/{a.session_id}/audio"
        ctype = {"Content-Type": "audio/wav"}
        cases = [
            ({}, 401, "missing"),
            (bearer("garbage"), 401, "wrong API key or malformed token"),
            (bearer("123.abc"), 403, "not valid for this session"),
            (bearer(b.token), 403, "not valid for this session"),  # another session's token
            (bearer(state.guard.tokens.issue(a.session_id, -5)[0]), 401, "expired"),
        ]
        for headers, status, words in cases:
            async with http.post(audio, data=WAV, headers={**headers, **ctype}) as r:
                reply = await r.json()
                assert r.status == status and words in reply["error"], (headers, reply)
            async with http.post(f"{url}/v1/sessions/{a.session_id}/interrupt",
                                 headers=headers) as r:
                assert r.status == status
            async with http.post(f"{url}/v1/sessions/{a.session_id}/state",
                                 json={"state": "thinking"}, headers=headers) as r:
                assert r.status == status
        # the session's own token, or the key, work for that session's calls
        for headers in (bearer(a.token), bearer(KEY)):
            async with http.post(audio, data=WAV, headers={**headers, **ctype}) as r:
                assert r.status == 202
            async with http.post(f"{url}/v1/sessions/{a.session_id}/state",
                                 json={"state": "listening"}, headers=headers) as r:
                assert r.status == 200
        async with http.get(f"{url}/v1/sessions", headers=bearer(a.token)) as r:
            assert r.status == 401  # a token is for one session, not the server
        async with http.get(f"{url}/v1/sessions", headers=bearer(KEY)) as r:
            assert r.status == 200 and len(await r.json()) == 2
        # WebSocket: the token in the query (browsers cannot set headers there) or header
        ws_url = f"{url}/v1/sessions/{a.session_id}/ws"
        for params, headers, status in (({}, {}, 401), ({"token": b.token}, {}, 403),
                                        ({"token": "1.x"}, {}, 403)):
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused_ws:
                await http.ws_connect(ws_url, params=params, headers=headers)
            assert refused_ws.value.status == status
        async with http.ws_connect(ws_url, params={"token": a.token}) as ws:
            await ws.send_json({"type": "ping"})
            while (reply := await ws.receive_json(timeout=5))["type"] != "pong":
                assert reply["type"].startswith(("speech.", "state.")), reply  # of the above
        async with SessionControl(url, a.session_id, a.token) as control:
            await control.push_speech(tone(24000, 0.5), 24000, utterance_id="via-token")
            await asyncio.wait_for(control.wait_event("speech.finished"), 5)
        # an unknown id with the key is 404; with a token of another session, 403
        async with http.get(f"{url}/v1/sessions/unknown", headers=bearer(KEY)) as r:
            assert r.status == 404
        async with http.get(f"{url}/v1/sessions/unknown", headers=bearer(a.token)) as r:
            assert r.status == 403
        sid_b, token_b = b.session_id, b.token
    # after the session ends its token opens nothing (410 says it ended)
    async with http.post(f"{url}/v1/sessions/{sid_b}/audio", data=WAV,
                         headers={**bearer(token_b), **ctype}) as r:
        assert r.status == 410


async def test_cors(server) -> None:
    url, state, http = server
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    async with http.options(f"{url}/v1/sessions/abc/audio", headers=preflight) as r:
        assert r.status == 204
        assert r.headers["Access-Control-Allow-Origin"] == ORIGIN
        assert "Authorization" in r.headers["Access-Control-Allow-Headers"]
        assert "POST" in r.headers["Access-Control-Allow-Methods"]
    async with http.options(f"{url}/v1/sessions", headers={**preflight,
                                                           "Origin": "https://evil.example"}) as r:
        assert r.status == 403 and "Access-Control-Allow-Origin" not in r.headers
    # real responses carry the header for the allowed origin, errors included
    async with http.post(f"{url}/v1/sessions", json={"sdp": "v=0"},
                         headers={"Origin": ORIGIN}) as r:
        assert r.status == 401 and r.headers["Access-Control-Allow-Origin"] == ORIGIN
    async with http.get(f"{url}/healthz", headers={"Origin": "https://evil.example"}) as r:
        assert r.status == 200 and "Access-Control-Allow-Origin" not in r.headers


async def test_session_creations_are_limited_per_address() -> None:
    config = ServerConfig(host="127.0.0.1", port=0, ice_host_addresses=["127.0.0.1"],
                          sessions_per_ip_per_minute=3, trust_forwarded_for=True)
    async with running_server(config) as (url, state), aiohttp.ClientSession() as http:
        statuses = []
        for _ in range(4):
            async with http.post(f"{url}/v1/sessions", json={"sdp": "hello"}) as r:
                statuses.append(r.status)
                last = r
                body = await r.json()
        assert statuses == [400, 400, 400, 429], statuses
        assert "too many sessions" in body["error"]
        assert 1 <= int(last.headers["Retry-After"]) <= 60
        # another client (behind the trusted proxy) has its own budget
        async with http.post(f"{url}/v1/sessions", json={"sdp": "hello"},
                             headers={"X-Forwarded-For": "10.1.2.3"}) as r:
            assert r.status == 400


async def test_sessions_end_when_idle_and_at_their_maximum_duration() -> None:
    config = ServerConfig(host="127.0.0.1", port=0, ice_host_addresses=["127.0.0.1"],
                          session_idle_timeout_s=1.5, session_max_duration_s=4.0)
    async with running_server(config) as (url, state):
        # idle: nobody speaks or calls
        idle = AvatarClient(url, record_mouth=False)
        await idle.connect()
        t = time.perf_counter()
        async with SessionControl(url, idle.session_id, idle.token) as control:
            assert await until(lambda: idle.session_id not in state.sessions, 5)
            idle_s = time.perf_counter() - t
            await until(lambda: not control.connected, 3)
            assert not control.connected  # its WebSocket was closed with it
            ended = [e for _, e in control.received if e["type"] == "session.ended"]
        assert ended and "idle" in ended[0]["reason"]
        assert events(idle.received, "session.ended")  # the data channel was told too
        await idle.close()
        print(f"idle session ended after {idle_s:.1f} s")
        assert 1.4 < idle_s < 3.5

        # busy, but past its maximum duration
        busy = AvatarClient(url, record_mouth=False)
        await busy.connect()
        t = time.perf_counter()
        with pytest.raises(RequestError) as gone:
            while time.perf_counter() - t < 8:
                await busy.push_speech(tone(16000, 0.5), 16000)
                await asyncio.sleep(0.5)
        busy_s = time.perf_counter() - t
        await busy.close()
        print(f"busy session ended after {busy_s:.1f} s ({gone.value})")
        assert gone.value.status == 410 and "maximum session duration" in gone.value.message
        assert 3.5 < busy_s < 6


async def test_tokens_and_rate_limiter_units() -> None:
    issuer = TokenIssuer(b"k" * 32)
    token, expires = issuer.issue("s1", 60)
    issuer.check(token, "s1")
    assert expires > time.time() + 59
    with pytest.raises(Exception, match="not valid"):
        issuer.check(token, "s2")
    with pytest.raises(Exception, match="not valid"):
        TokenIssuer(b"x" * 32).check(token, "s1")  # another server's secret
    with pytest.raises(Exception, match="malformed"):
        issuer.check("abc", "s1")
    limiter = RateLimiter(2, window_s=60)
    assert limiter.hit("a", 0) == 0 and limiter.hit("a", 1) == 0
    assert limiter.hit("a", 2) == pytest.approx(58)
    assert limiter.hit("b", 2) == 0
    assert limiter.hit("a", 60.5) == 0  # the first one left the window
