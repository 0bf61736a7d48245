"""Session routes: create (JSON or WHEP-style SDP offers), list, inspect, interrupt and
end sessions; and the access checks every session or server-wide call makes."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from aiohttp import web

from avatar_stream.avatars.store import DEFAULT_ID
from avatar_stream.config import IceServer
from avatar_stream.core.session import Session
from avatar_stream.core.speechinput import check_microphone
from avatar_stream.core.turnstate import check_state
from avatar_stream.scale.routing import FORWARDED, owned_id
from avatar_stream.transports.http.auth import (
    AuthError,
    Credentials,
    client_ip,
    passed_on,
    retry_after,
)
from avatar_stream.transports.http.body import read_json_object, read_text
from avatar_stream.transports.http.errors import HTTPJSONError, auth_error
from avatar_stream.transports.http.state import STATE, ServerState
from avatar_stream.transports.webrtc.peer import OfferError, WebRTCPeer
from avatar_stream.transports.webrtc.turn import session_ice_servers

MAX_OFFER_BYTES = 256 * 1024


def require_server(request: web.Request, allow_query: bool = False) -> None:
    """Server-wide calls (creating sessions, avatars, listing): the API key, when one is
    set (``allow_query``: also as ``?token=``, for what a browser cannot add a header to)."""
    try:
        request.app[STATE].guard.server(Credentials.of(request, allow_query))
    except AuthError as exc:
        raise auth_error(exc) from None


def session_for(request: web.Request, allow_query_token: bool = False, touch: bool = True
             ) -> Session:
    """The session named in the path, if the caller may use it (401/403), else 404/410.

    ``touch``: the call counts as activity for the idle timeout (reading stats does not,
    so a monitor polling a session does not keep it alive)."""
    state = request.app[STATE]
    sid = request.match_info["id"]
    try:
        state.guard.session(Credentials.of(request, allow_query_token), sid)
    except AuthError as exc:
        raise auth_error(exc) from None
    session = state.sessions.get(sid)
    if session is None or session.closing:
        reason = state.ended.get(sid) or (session.end_reason if session else None)
        if reason is not None:
            raise HTTPJSONError(410, f"session {sid!r} has ended ({reason})")
        raise HTTPJSONError(404, f"unknown session {sid!r}")
    if touch:
        session.touch()
    return session


# -- sessions --------------------------------------------------------------------------


async def _read_offer(request: web.Request) -> tuple[str, str | None, bool, str]:
    """Returns (sdp, avatar id, whether the client speaks WHEP-style application/sdp,
    what its microphone is: ``core/speechinput.py``'s MICROPHONE_MODES)."""
    ctype = request.content_type
    body = await read_text(request, MAX_OFFER_BYTES, "the offer")
    # the query's microphone, checked whatever the body (a JSON offer's own field wins)
    microphone = microphone_mode(request.query.get("microphone", "speak"))
    if ctype == "application/sdp":
        return body, request.query.get("avatar"), True, microphone
    if ctype != "application/json":
        raise HTTPJSONError(415, "send the offer as application/json or application/sdp")
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise HTTPJSONError(400, f"malformed JSON: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("sdp"), str):
        raise HTTPJSONError(400, 'expected {"type": "offer", "sdp": "..."}')
    if data.get("type", "offer") != "offer":
        raise HTTPJSONError(400, "type must be 'offer'")
    avatar = data.get("avatar")
    if avatar is not None and not isinstance(avatar, str):
        raise HTTPJSONError(400, "avatar must be an avatar id (a string)")
    return data["sdp"], avatar, False, microphone_mode(data.get("microphone", microphone))


def microphone_mode(value: object) -> str:
    try:
        return check_microphone(value)
    except ValueError as exc:
        raise HTTPJSONError(400, str(exc)) from None


async def admit(request: web.Request) -> web.StreamResponse | None:
    """What every session creation checks before its offer is read: credentials (401) and
    the per-address limit (429); with worker processes, a worker answers the request (its
    answer is returned) or none has room (503)."""
    state = request.app[STATE]
    require_server(request)
    wait = state.creations.hit(client_ip(request, state.config.trust_forwarded_for))
    if wait:
        raise HTTPJSONError(
            429, f"too many sessions created from this address (at most "
            f"{state.config.sessions_per_ip_per_minute} a minute)",
            **{"Retry-After": retry_after(wait)},
        )
    if state.pool is not None:  # a worker makes the session (workers.py)
        response = await state.pool.create_session(request)
        if response is not None:
            return response
        state.metrics.refused.inc()
        raise _full(state)
    return None


def _full(state: ServerState) -> HTTPJSONError:
    return HTTPJSONError(503, f"server full ({state.max_sessions} sessions)",
                         **{"Retry-After": "5"})


async def open_session(request: web.Request, sdp: str, avatar_id: str | None,
                       microphone: str = "speak") -> tuple[Session, str, list[IceServer]]:
    """A new session answering ``sdp``: (session, SDP answer, the ICE servers it was given,
    with fresh TURN credentials). Raises HTTPJSONError 400 / 404 / 503."""
    state = request.app[STATE]
    if not sdp.lstrip().startswith("v=0"):
        raise HTTPJSONError(400, "invalid SDP offer: it must start with 'v=0'")
    avatar = state.avatars.get(avatar_id or DEFAULT_ID)
    if avatar is None:
        raise HTTPJSONError(404, f"unknown avatar {avatar_id!r}")
    if not state.has_capacity:
        if request.headers.get(FORWARDED) != "front":  # the front tries another worker
            state.metrics.refused.inc()
        raise _full(state)
    ice_servers = session_ice_servers(state.config)  # fresh TURN credentials
    assert state.engine is not None and state.worker is not None  # only a front has none
    session = Session(
        state.engine, avatar, state.worker, replace(state.config, ice_servers=ice_servers),
        on_closed=_forget(state),
        metrics=state.metrics,
    )
    session.id = owned_id(state.config, session.id)  # names this replica (routing.py)
    session.input.microphone = microphone
    state.sessions[session.id] = session
    try:
        answer = await WebRTCPeer(session).accept(sdp)
    except OfferError as exc:
        raise HTTPJSONError(400, str(exc)) from None
    return session, answer, ice_servers


async def create_session(request: web.Request) -> web.StreamResponse:
    answered = await admit(request)
    if answered is not None:
        return answered
    state = request.app[STATE]
    sdp, avatar_id, whep, microphone = await _read_offer(request)
    session, answer, ice_servers = await open_session(request, sdp, avatar_id, microphone)
    location = f"/v1/sessions/{session.id}"
    token, expires = state.guard.tokens.issue(session.id, state.token_ttl_s)
    if whep:
        return web.Response(
            status=201,
            text=answer,
            content_type="application/sdp",
            headers={"Location": location, "X-Session-Token": token},
        )
    return web.json_response(
        {
            "session_id": session.id,
            "type": "answer",
            "sdp": answer,
            "avatar": session.avatar.info(),
            "ice_servers": [s.to_json() for s in ice_servers],
            "token": token,
            "token_expires_at": expires,
        },
        status=201,
        headers={"Location": location},
    )


def _forget(state: ServerState) -> Any:
    def on_closed(session: Session) -> None:
        state.sessions.pop(session.id, None)
        state.ended[session.id] = session.end_reason or "closed"
        while len(state.ended) > 1000:
            state.ended.popitem(last=False)

    return on_closed


async def list_sessions(request: web.Request) -> web.Response:
    require_server(request)
    state = request.app[STATE]
    if state.pool is not None:
        return web.json_response(await state.pool.sessions(passed_on(request)))
    return web.json_response([s.stats() for s in state.sessions.values()])


async def get_session(request: web.Request) -> web.Response:
    return web.json_response(session_for(request, touch=False).stats())


async def delete_session(request: web.Request) -> web.Response:
    await session_for(request).close("deleted by client")
    return web.Response(status=204)


async def interrupt_session(request: web.Request) -> web.Response:
    cut = session_for(request).interrupt()
    return web.json_response({"interrupted": cut})


async def set_turn_state(request: web.Request) -> web.Response:
    """``POST /v1/sessions/{id}/state {"state": "listening"}``: the turn state
    (``core/turnstate.py``) -> what the face shows now and the state set."""
    session = session_for(request)
    data = await read_json_object(request)
    try:
        session.set_state(check_state(data.get("state")))
    except ValueError as exc:
        raise HTTPJSONError(400, str(exc), "bad_state") from None
    return web.json_response(
        {"turn_state": session.turn.shown, "turn_state_set": session.turn.requested}
    )
