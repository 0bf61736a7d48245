"""TURN credentials from a shared secret, and the server handing them to each session."""

from __future__ import annotations

import base64
import hashlib
import hmac
import socket

import aiohttp
import pytest
import pytest_asyncio
from aiortc import RTCPeerConnection

from avatar_stream.config import IceServer, ServerConfig
from avatar_stream.transports.http.app import running_server
from avatar_stream.transports.webrtc.ice import rtc_configuration
from avatar_stream.transports.webrtc.turn import (
    check_credentials,
    session_ice_servers,
    turn_credentials,
)

SECRET = "north-shore-turn-secret"


def test_credentials_follow_the_turn_rest_api_scheme() -> None:
    username, credential = turn_credentials(SECRET, "alice", ttl_s=600, now=1_000_000)
    assert username == "1000600:alice"
    expected = hmac.new(SECRET.encode(), b"1000600:alice", hashlib.sha1).digest()
    assert base64.b64decode(credential) == expected
    assert check_credentials(SECRET, username, credential, now=1_000_599)
    assert not check_credentials(SECRET, username, credential, now=1_000_601)  # expired
    assert not check_credentials("other secret", username, credential, now=1_000_000)
    assert not check_credentials(SECRET, "1000600:bob", credential, now=1_000_000)
    with pytest.raises(ValueError):
        turn_credentials(SECRET, "a:b")


def test_each_session_gets_fresh_credentials_beside_the_static_servers() -> None:
    config = ServerConfig(ice_servers=[IceServer(("stun:stun.example.org:3478",))],
                          turn_urls=["turn:turn.example.org:3478"], turn_secret=SECRET,
                          turn_ttl_s=60)
    stun, turn = session_ice_servers(config)
    assert stun.urls == ("stun:stun.example.org:3478",) and stun.username is None
    assert turn.urls == ("turn:turn.example.org:3478",)
    assert turn.username and turn.credential
    assert check_credentials(SECRET, turn.username, turn.credential)
    assert session_ice_servers(ServerConfig(turn_urls=["turn:x"])) == []  # no secret: none


def _closed_port() -> int:
    """A loopback TCP port nobody listens on: TURN allocations there fail at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def server():
    turn_url = f"turn:127.0.0.1:{_closed_port()}?transport=tcp"
    config = ServerConfig(host="127.0.0.1", port=0, ice_host_addresses=["127.0.0.1"],
                          turn_urls=[turn_url], turn_secret=SECRET, turn_ttl_s=120)
    async with running_server(config) as (url, state):
        async with aiohttp.ClientSession() as http:
            yield url, state, http, turn_url


@pytest.mark.asyncio(loop_scope="module")
async def test_config_and_session_creation_hand_out_turn_credentials(server) -> None:
    url, state, http, turn_url = server
    async with http.get(f"{url}/v1/config") as r:
        servers = (await r.json())["ice_servers"]
    (turn,) = servers
    assert turn["urls"] == [turn_url]
    assert check_credentials(SECRET, turn["username"], turn["credential"])
    pc = RTCPeerConnection(rtc_configuration([]))
    pc.addTransceiver("video", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    async with http.post(f"{url}/v1/sessions", json={"sdp": pc.localDescription.sdp}) as r:
        assert r.status == 201
        body = await r.json()
    (given,) = body["ice_servers"]
    assert given["urls"] == [turn_url]
    assert check_credentials(SECRET, given["username"], given["credential"])
    session = state.sessions[body["session_id"]]
    (own,) = session.config.ice_servers  # the server's own peer relays through it too
    assert (own.username, own.credential) == (given["username"], given["credential"])
    assert state.config.ice_servers == []  # minted per session, never stored
    async with http.delete(f"{url}/v1/sessions/{body['session_id']}") as r:
        assert r.status == 204
    await pc.close()
