"""Several replicas behind one address: every call for a session reaches the pod that owns it.

A session lives in one process (its peer connection, its GPU state), but the load balancer
in front of the replicas sends each HTTP request wherever it likes, and readiness (which
turns 503 when a pod is full) takes a full pod out of the balanced Service altogether, so
not even sticky cookies would reach it again. So the session id names its owner: a replica
started with ``--advertise ADDR:PORT`` issues ids ``<hex of ADDR:PORT>.<random>``. A request
for ``/v1/sessions/<id>/...`` that arrives at another replica is forwarded to the owner
(plain HTTP and WebSocket alike), which authenticates it as usual. Forwarding goes only to
addresses that ``--peers NAME`` resolves to (a headless Service listing every replica,
ready or not), never to an address a client made up, and a forwarded request is never
forwarded again.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import socket
import time
from collections.abc import Callable, Collection
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from avatar_stream.config import ServerConfig
from avatar_stream.errors import error_body

log = logging.getLogger(__name__)

FORWARDED = "X-Avatar-Forwarded"  # set on forwarded requests: never forward twice
# on a response that another process answered: its errors are counted there
ANSWERED_BY = web.ResponseKey("answered_by", str)
PEER_TTL_S = 5.0  # how long a DNS answer for --peers is trusted
_SESSION_PATH = re.compile(r"^/v1/sessions/([^/]+)(?:/|$)")
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
               "trailer", "transfer-encoding", "upgrade", "host", "content-length"}


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def replica_prefix(address: str) -> str:
    """``10.42.1.7:8080`` -> ``0a2a01071f90``: the address packed as hex (IPv6 too)."""
    host, port = _split(address)
    return ipaddress.ip_address(host).packed.hex() + f"{port:04x}"


def owner_of(session_id: str) -> str | None:
    """The ``ADDR:PORT`` a session id names, or None for an id without one."""
    prefix, dot, _ = session_id.partition(".")
    if not dot or len(prefix) not in (12, 36):
        return None
    try:
        raw = bytes.fromhex(prefix)
    except ValueError:
        return None
    ip = ipaddress.ip_address(raw[:-2])
    port = int.from_bytes(raw[-2:], "big")
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def owned_id(config: ServerConfig, session_id: str) -> str:
    """The id this replica gives a new session: prefixed with its address when it has one."""
    if not config.advertise:
        return session_id
    return f"{replica_prefix(config.advertise)}.{session_id}"


class Forwarder:
    """The middleware that hands another replica's (or worker's) session calls to it."""

    def __init__(self, config: ServerConfig, is_local: Callable[[str], bool],
                 local_owners: Callable[[], Collection[str]] | None = None) -> None:
        self.me = owner_of(owned_id(config, "x")) if config.advertise else None
        self.peers = config.peers
        self.is_local = is_local
        self.local_owners = local_owners  # this server's worker processes (workers.py)
        self._peer_ips: set[str] = set()
        self._peer_time = 0.0
        self._http: aiohttp.ClientSession | None = None

    @classmethod
    def create(cls, config: ServerConfig, is_local: Callable[[str], bool],
               local_owners: Callable[[], Collection[str]] | None = None) -> Forwarder | None:
        if local_owners is None and not (config.advertise and config.peers):
            return None
        return cls(config, is_local, local_owners)

    async def close(self, app: web.Application | None = None) -> None:
        if self._http is not None:
            await self._http.close()

    async def _allowed(self, owner: str) -> bool:
        """Is ``owner`` one of our workers, or one of the replicas ``--peers`` resolves to?"""
        if self.local_owners is not None and owner in self.local_owners():
            return True
        if not self.peers:
            return False
        if time.monotonic() - self._peer_time > PEER_TTL_S:
            loop = asyncio.get_running_loop()
            try:
                infos = await loop.getaddrinfo(self.peers, None, type=socket.SOCK_STREAM)
            except OSError as exc:
                log.warning("cannot resolve --peers %s: %s", self.peers, exc)
                infos = []
            self._peer_ips = {str(ipaddress.ip_address(i[4][0])) for i in infos}
            self._peer_time = time.monotonic()
        return str(ipaddress.ip_address(_split(owner)[0])) in self._peer_ips

    @web.middleware
    async def middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        match = _SESSION_PATH.match(request.path)
        if match is None or FORWARDED in request.headers or self.is_local(match.group(1)):
            return await handler(request)
        owner = owner_of(match.group(1))
        if owner is None or owner == self.me or not await self._allowed(owner):
            return await handler(request)  # answered here: 404 for an unknown session
        if self._http is None:
            self._http = aiohttp.ClientSession(auto_decompress=False)
        return await forward(self._http, request, owner, self.me or "1",
                             "the replica that owns this session")


async def forward(http: aiohttp.ClientSession, request: web.Request, owner: str, via: str,
                  what: str) -> web.StreamResponse:
    """Hand ``request`` (plain HTTP or a WebSocket) to the server at ``owner`` and its answer
    back; marked so that it is never forwarded again. 502 when ``what`` cannot be reached."""
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
    headers[FORWARDED] = via
    url = f"http://{owner}{request.path_qs}"
    try:
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await _websocket(http, request, url, headers)
        async with http.request(
            request.method, url, headers=headers, data=await request.read(),
            allow_redirects=False, timeout=aiohttp.ClientTimeout(total=60),
        ) as resp:
            body = await resp.read()
            out = CIMultiDict((k, v) for k, v in resp.headers.items()  # Link: several
                              if k.lower() not in _HOP_BY_HOP)
            response = web.Response(status=resp.status, body=body, headers=out)
            response[ANSWERED_BY] = owner
            return response
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        return web.json_response(error_body(f"{what} is unreachable: {exc}"), status=502)


async def _websocket(http: aiohttp.ClientSession, request: web.Request, url: str,
                     headers: dict[str, str]) -> web.StreamResponse:
    drop = {"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions"}
    headers = {k: v for k, v in headers.items() if k.lower() not in drop}
    upstream = await http.ws_connect(url, headers=headers, autoping=True)
    downstream = web.WebSocketResponse(autoping=True)
    await downstream.prepare(request)

    async def pipe(src: Any, dst: Any) -> None:
        async for msg in src:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await dst.send_str(msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await dst.send_bytes(msg.data)
            else:
                break

    tasks = [asyncio.ensure_future(pipe(downstream, upstream)),
             asyncio.ensure_future(pipe(upstream, downstream))]
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in tasks:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    await upstream.close()
    await downstream.close()
    return downstream


def add_cli_options(parser: Any) -> None:
    g = parser.add_argument_group("replicas (see README, Deployment)")
    g.add_argument("--advertise", metavar="ADDR:PORT",
                   help="this replica's address as its peers reach it (e.g. $(POD_IP):8080); "
                        "session ids then carry it")
    g.add_argument("--peers", metavar="NAME",
                   help="DNS name resolving to every replica (a headless Service); calls for "
                        "another replica's session are forwarded to it")
