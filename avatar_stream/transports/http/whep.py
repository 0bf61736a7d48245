"""WHEP (draft-ietf-wish-whep, the egress counterpart of RFC 9725's WHIP): any WHEP player
plays the avatar.

- ``POST /v1/whep`` (``application/sdp``; ``?avatar=ID``, ``?microphone=``) -> 201 with
  the SDP answer;
  ``Location``: the session's WHEP resource; ``ETag``: its ICE session; ``Link``: each ICE
  server (``rel="ice-server"``, with the TURN credentials minted for this session), the
  session's event WebSocket and its JSON resource; ``X-Session-Token``: the session's token.
- ``PATCH /v1/sessions/{id}/whep`` (``application/trickle-ice-sdpfrag``): trickled
  candidates and end-of-candidates -> 204. An ``If-Match`` must be the ETag (else 412); a
  fragment naming no ICE session (neither ``If-Match`` nor ``a=ice-ufrag``) gets 428; new ICE
  credentials, an ICE restart, get 422: aiortc cannot restart ICE.
- ``DELETE /v1/sessions/{id}/whep`` ends the session (204, also once it has ended);
  ``OPTIONS`` on both answers ``Allow`` and ``Accept-Post`` / ``Accept-Patch`` without
  credentials; any other method gets 405 with ``Allow``.

The resource sits under the session's own path, so its calls reach the worker process or
replica that holds the session like every other session call (``routing.py``), and a
session token opens it.
"""

from __future__ import annotations

from aiohttp import web
from multidict import CIMultiDict

from avatar_stream.config import IceServer
from avatar_stream.transports.http.body import read_text
from avatar_stream.transports.http.errors import HTTPJSONError
from avatar_stream.transports.http.sessions import (
    MAX_OFFER_BYTES,
    admit,
    microphone_mode,
    open_session,
    session_for,
)
from avatar_stream.transports.http.state import STATE
from avatar_stream.transports.webrtc.ice import parse_trickle_fragment
from avatar_stream.transports.webrtc.peer import IceRestartRefused, WebRTCPeer

SDP = "application/sdp"
SDPFRAG = "application/trickle-ice-sdpfrag"
MAX_FRAGMENT_BYTES = 64 * 1024
# extension link relations (RFC 8288 extension types: no registry entry exists for them)
EVENTS_REL = "urn:avatar-stream:whep:events"  # the session's WebSocket: events, speech in
SESSION_REL = "urn:avatar-stream:whep:session"  # its JSON resource: stats, audio, say, ...


def whep_routes() -> list[web.RouteDef]:
    return [
        web.post("/v1/whep", whep_offer),
        web.options("/v1/whep", endpoint_options),
        web.patch("/v1/sessions/{id}/whep", trickle),
        web.delete("/v1/sessions/{id}/whep", end_session),
        web.options("/v1/sessions/{id}/whep", resource_options),
    ]


async def endpoint_options(request: web.Request) -> web.Response:
    return web.Response(status=204, headers={"Allow": "OPTIONS, POST", "Accept-Post": SDP})


async def resource_options(request: web.Request) -> web.Response:
    return web.Response(status=204, headers={"Allow": "OPTIONS, PATCH, DELETE",
                                             "Accept-Patch": SDPFRAG})


async def whep_offer(request: web.Request) -> web.StreamResponse:
    answered = await admit(request)
    if answered is not None:
        return answered
    if request.content_type != SDP:
        raise HTTPJSONError(415, f"send the offer as {SDP}", **{"Accept-Post": SDP})
    sdp = await read_text(request, MAX_OFFER_BYTES, "the offer")
    session, answer, ice_servers = await open_session(
        request, sdp, request.query.get("avatar"),
        microphone_mode(request.query.get("microphone", "speak")))
    assert isinstance(session.transport, WebRTCPeer)
    state = request.app[STATE]
    token, _ = state.guard.tokens.issue(session.id, state.token_ttl_s)
    path = f"/v1/sessions/{session.id}"
    headers: CIMultiDict[str] = CIMultiDict({
        "Location": f"{path}/whep",
        "ETag": _etag(session.transport),
        "X-Session-Token": token,
    })
    for link in ice_server_links(ice_servers):
        headers.add("Link", link)
    headers.add("Link", f'<{path}/ws>; rel="{EVENTS_REL}"')
    headers.add("Link", f'<{path}>; rel="{SESSION_REL}"')
    return web.Response(status=201, text=answer, content_type=SDP, headers=headers)


async def trickle(request: web.Request) -> web.Response:
    """Trickled candidates, end-of-candidates; ICE restarts are refused (422)."""
    session = session_for(request)
    peer = session.transport
    if not isinstance(peer, WebRTCPeer):  # a session another transport carries
        raise HTTPJSONError(404, f"session {session.id!r} has no WHEP resource")
    if request.content_type != SDPFRAG:
        raise HTTPJSONError(415, f"send candidates as {SDPFRAG}", **{"Accept-Patch": SDPFRAG})
    text = await read_text(request, MAX_FRAGMENT_BYTES, "the SDP fragment")
    try:
        frag = parse_trickle_fragment(text)
    except ValueError as exc:
        raise HTTPJSONError(400, f"invalid SDP fragment: {exc}") from None
    etag = _etag(peer)
    if_match = request.headers.get("If-Match")
    if if_match is not None:
        tags = {t.strip() for t in if_match.split(",")}
        if etag not in tags and "*" not in tags:
            raise HTTPJSONError(412, f"If-Match {if_match} is not this session's ICE session "
                                     f"(ETag {etag})", ETag=etag)
    elif frag.ufrag is None:
        raise HTTPJSONError(428, "name the ICE session: send If-Match with the ETag of the "
                                 "POST's answer, or a=ice-ufrag in the fragment", ETag=etag)
    try:
        await peer.add_candidates(frag)
    except IceRestartRefused as exc:
        raise HTTPJSONError(422, str(exc), "ice_restart_unsupported", ETag=etag) from None
    return web.Response(status=204, headers={"ETag": etag})


async def end_session(request: web.Request) -> web.Response:
    """A session that has already ended is answered 204 too: players close their peer
    connection before they DELETE, and that alone may have ended it."""
    try:
        session = session_for(request)
    except HTTPJSONError as exc:
        if exc.status == 410:
            return web.Response(status=204)
        raise
    await session.close("deleted by client")
    return web.Response(status=204)


def _etag(peer: WebRTCPeer) -> str:
    """The ICE session, named by this side's username fragment (no restart changes it)."""
    return f'"{peer.local_ice_ufrag}"'


def ice_server_links(servers: list[IceServer]) -> list[str]:
    """RFC 9725 section 4.6: one ``Link`` per ICE server URL, with its credentials."""
    links = []
    for server in servers:
        params = ""
        if server.username is not None and server.credential is not None:
            params = (f'; username="{_quoted(server.username)}"; '
                      f'credential="{_quoted(server.credential)}"; credential-type="password"')
        links += [f'<{url}>; rel="ice-server"{params}' for url in server.urls]
    return links


def _quoted(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')
