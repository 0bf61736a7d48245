"""The framework tests' server: the real one, on loopback, warp engine, one per module.
A test module imports ``loopback_server``; its tests ask for the fixture ``server``."""

from __future__ import annotations

import pytest_asyncio

from avatar_stream.config import ServerConfig
from avatar_stream.transports.http.app import running_server


@pytest_asyncio.fixture(loop_scope="module", scope="module", name="server")
async def loopback_server():
    config = ServerConfig(host="127.0.0.1", port=0, ice_host_addresses=["127.0.0.1"],
                          max_sessions=4)
    async with running_server(config) as (url, state):
        yield url, state
