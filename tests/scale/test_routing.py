"""Two replicas on loopback: a session's calls reach the replica that owns it, whichever
replica they arrive at, and forwarding goes only to real replicas."""

from __future__ import annotations

import asyncio
import json
import socket

import aiohttp
import pytest
import pytest_asyncio

from avatar_stream.client.avatarclient import AvatarClient
from avatar_stream.config import ServerConfig
from avatar_stream.scale.routing import owned_id, owner_of, replica_prefix
from avatar_stream.transports.http.app import running_server

ASYNC = pytest.mark.asyncio(loop_scope="module")


def test_session_ids_carry_their_replica() -> None:
    assert replica_prefix("10.42.1.7:8080") == "0a2a01071f90"
    config = ServerConfig(advertise="10.42.1.7:8080")
    sid = owned_id(config, "abc_-DEF")
    assert sid == "0a2a01071f90.abc_-DEF" and owner_of(sid) == "10.42.1.7:8080"
    assert owner_of(owned_id(ServerConfig(advertise="[fd00::1]:8080"), "x")) == "[fd00::1]:8080"
    assert owned_id(ServerConfig(), "abc") == "abc"  # one replica: plain ids
    for plain in ("abc", "zz.abc", "0a2a0107.abc", "0a2a01071f9g.abc"):
        assert owner_of(plain) is None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def replicas():
    ports = [_free_port(), _free_port()]
    configs = [
        ServerConfig(host="127.0.0.1", port=p, ice_host_addresses=["127.0.0.1"], engine="still",
                     advertise=f"127.0.0.1:{p}", peers="localhost")
        for p in ports
    ]
    async with running_server(configs[0]) as (url_a, state_a):
        async with running_server(configs[1]) as (url_b, state_b):
            async with aiohttp.ClientSession() as http:
                yield (url_a, state_a), (url_b, state_b), http


@ASYNC
async def test_calls_reach_the_owner_through_any_replica(replicas) -> None:
    (url_a, state_a), (url_b, state_b), http = replicas
    async with AvatarClient(url_a) as client:
        sid = client.session_id
        assert sid in state_a.sessions and owner_of(sid) == f"127.0.0.1:{state_a.config.port}"
        async with http.get(f"{url_b}/v1/sessions/{sid}") as r:  # plain HTTP, via B
            assert r.status == 200 and (await r.json())["session_id"] == sid
        async with http.ws_connect(f"{url_b}/v1/sessions/{sid}/ws") as ws:  # WebSocket, via B
            await ws.send_str(json.dumps({"type": "ping"}))
            msg = await asyncio.wait_for(ws.receive(), 5)
            assert json.loads(msg.data)["type"] == "pong"
        async with http.post(f"{url_b}/v1/sessions/{sid}/interrupt") as r:
            assert r.status == 200
        assert not state_b.sessions
        async with http.delete(f"{url_b}/v1/sessions/{sid}") as r:
            assert r.status == 204
        for _ in range(50):
            if sid not in state_a.sessions:
                break
            await asyncio.sleep(0.05)
        assert sid not in state_a.sessions
        async with http.get(f"{url_b}/v1/sessions/{sid}") as r:  # the owner says: ended
            assert r.status == 410


@ASYNC
async def test_never_forwards_to_an_address_that_is_not_a_replica(replicas) -> None:
    (url_a, state_a), (url_b, state_b), http = replicas
    made_up = owned_id(ServerConfig(advertise="127.0.0.2:80"), "abc")  # not what peers resolve
    async with http.get(f"{url_b}/v1/sessions/{made_up}") as r:
        assert r.status == 404
    gone = owned_id(ServerConfig(advertise=f"127.0.0.1:{_free_port()}"), "abc")  # a peer address
    async with http.get(f"{url_b}/v1/sessions/{gone}") as r:  # ... where nothing listens
        assert r.status == 502 and "unreachable" in (await r.json())["error"]
