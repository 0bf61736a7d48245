"""The HTTP API as OpenAPI 3.1 (``GET /openapi.json``) and a page that reads it (``GET /docs``:
Swagger UI, from the files the ``swagger-ui-py`` package ships, served here: no CDN).

The description is written out here by hand, for people and for generated clients; the
tests hold it to the server: one fails for any route it does not describe, one validates
it against the OpenAPI 3.1 schema, and schemathesis fuzzes every operation against a real
server and checks each answer against it. It describes this server as configured: with
``--api-key`` its calls carry a security requirement, without one they are open.
"""

from __future__ import annotations

import importlib.util
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from aiohttp import web

from avatar_stream.config import ServerConfig
from avatar_stream.core.speechinput import MAX_UTTERANCE_ID, MICROPHONE_MODES
from avatar_stream.core.turnstate import STATES as TURN_STATES
from avatar_stream.transports.http.health import files
from avatar_stream.transports.http.state import STATE

Json = dict[str, Any]

SWAGGER_UI = importlib.util.find_spec("swagger_ui")
DOCS_DIR = Path(SWAGGER_UI.origin).parent / "static" if SWAGGER_UI and SWAGGER_UI.origin \
    else None


def openapi_routes() -> list[web.RouteDef]:
    routes = [web.get("/openapi.json", openapi_json)]
    if DOCS_DIR is not None and DOCS_DIR.is_dir():
        routes += [web.get("/docs", docs_page), files("/docs", DOCS_DIR)]
    return routes


async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(spec(request.app[STATE].config))


DOCS_PAGE = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>avatar-stream API</title>
  <link rel="stylesheet" href="/docs/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="/docs/swagger-ui-bundle.js"></script>
  <script>
    window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui",
                                 deepLinking: true, tryItOutEnabled: false});
  </script>
</body>
</html>
"""


async def docs_page(request: web.Request) -> web.Response:
    return web.Response(text=DOCS_PAGE, content_type="text/html")


# -- building blocks -------------------------------------------------------------------------


def _ref(name: str) -> Json:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: Json, description: str) -> Json:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


ERRORS = {
    400: "The request is malformed; the message says what is wrong.",
    401: "Missing, wrong or expired credentials.",
    403: "Good credentials for another session.",
    404: "No such session, avatar or file.",
    409: "The request clashes with the current state (the message says which).",
    410: "The session has ended; the message says why.",
    412: "If-Match names another ICE session than this session's (see ETag).",
    413: "The body is over its limit.",
    415: "The body is of a type this call does not take.",
    422: "The content cannot be used (the reason says why).",
    426: "This URL is a WebSocket: connect with an Upgrade: websocket handshake.",
    428: "The fragment names no ICE session: send If-Match, or a=ice-ufrag in it.",
    429: "Too many: the speech queue is full, or too many sessions were created from this "
         "address (see Retry-After).",
    502: "The TTS endpoint, or the worker process that holds the session, failed.",
    503: "No room now (server full, busy, TTS off); see Retry-After where given.",
    504: "The TTS endpoint took too long.",
}
RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before trying again.",
                               "schema": {"type": "string"}}}


def _errors(*statuses: int) -> dict[str, Json]:
    out = {}
    for status in statuses:
        response = _json(_ref("Error"), ERRORS[status])
        if status in (429, 503):
            response["headers"] = RETRY_AFTER
        if status == 401:
            response["headers"] = {"WWW-Authenticate": {
                "description": "Bearer realm", "schema": {"type": "string"}}}
        out[str(status)] = response
    return out


SESSION_ID = {"name": "id", "in": "path", "required": True, "description": "The session id "
              "(`session_id` of its creation, or the last part of its `Location`).",
              "schema": {"type": "string"}}
AVATAR_ID = {"name": "id", "in": "path", "required": True, "description": "The avatar id.",
             "schema": {"type": "string"}}
SESSION_ERRORS = (401, 403, 404, 410)


def _op(summary: str, description: str, responses: dict[str, Json], *, tag: str,
        operation_id: str, security: list[Json] | None = None, **extra: Any) -> Json:
    op: Json = {"summary": summary, "description": description, "operationId": operation_id,
                "tags": [tag], "responses": responses, **extra}
    if security is not None:
        op["security"] = security
    return op


_FINGERPRINT = ("a=fingerprint:sha-256 6F:97:E6:B9:3A:BA:7B:3C:64:B0:7C:49:61:C6:B7:C0:44:C7:3B:"
                "68:4E:E2:DD:12:A6:D3:1E:BF:A7:E5:9C:9F")
_ICE = "a=ice-ufrag:jOKY\r\na=ice-pwd:OuW3NCsDLAp6TZ21BvrBOX\r\n"
# what a viewer offers (candidates trickled later), for the page's examples
EXAMPLE_OFFER = (
    "v=0\r\no=- 0 0 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0 1\r\n"
    "m=video 9 UDP/TLS/RTP/SAVPF 99\r\nc=IN IP4 0.0.0.0\r\na=recvonly\r\na=mid:0\r\n"
    "a=rtcp-mux\r\na=rtpmap:99 H264/90000\r\n"
    "a=fmtp:99 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f\r\n"
    f"{_ICE}{_FINGERPRINT}\r\na=setup:actpass\r\n"
    "m=audio 9 UDP/TLS/RTP/SAVPF 96\r\nc=IN IP4 0.0.0.0\r\na=recvonly\r\na=mid:1\r\n"
    "a=rtcp-mux\r\na=rtpmap:96 opus/48000/2\r\n"
    f"{_ICE}{_FINGERPRINT}\r\na=setup:actpass\r\n"
)
EXAMPLE_FRAGMENT = (
    f"{_ICE}m=video 9 UDP/TLS/RTP/SAVPF 0\r\na=mid:0\r\n"
    "a=candidate:1 1 udp 2130706431 127.0.0.1 50000 typ host\r\na=end-of-candidates\r\n"
)


UTTERANCE_ID = {"type": "string", "minLength": 1, "maxLength": MAX_UTTERANCE_ID}
MICROPHONE = {"enum": list(MICROPHONE_MODES), "default": "speak",
              "description": "The offer's audio track: `speak`, speech the avatar says; "
                             "`listen`, the user's voice, which the avatar listens to."}


# -- schemas ---------------------------------------------------------------------------------

SCHEMAS: Json = {
    "Error": {
        "type": "object", "required": ["error"],
        "properties": {
            "error": {"type": "string", "description": "What went wrong, for a person."},
            "reason": {"type": "string", "description": "A code a client can act on "
                       "(e.g. `no_face`, `too_large`, `ice_restart_unsupported`)."},
        },
    },
    "IceServer": {
        "type": "object", "required": ["urls"],
        "properties": {
            "urls": {"type": "array", "items": {"type": "string"}},
            "username": {"type": "string"},
            "credential": {"type": "string"},
        },
    },
    "Offer": {
        "type": "object", "required": ["sdp"],
        "examples": [{"type": "offer", "sdp": EXAMPLE_OFFER}],
        "properties": {
            "type": {"const": "offer"},
            "sdp": {"type": "string", "description": "The SDP offer, ICE candidates gathered "
                    "(or none: the client's own checks then find it)."},
            "avatar": {"type": ["string", "null"],
                       "description": "Avatar id (default: `default`)."},
            "microphone": MICROPHONE,
        },
    },
    "SessionCreated": {
        "type": "object",
        "required": ["session_id", "type", "sdp", "avatar", "ice_servers", "token",
                     "token_expires_at"],
        "properties": {
            "session_id": {"type": "string"},
            "type": {"const": "answer"},
            "sdp": {"type": "string", "description": "The SDP answer."},
            "avatar": _ref("Avatar"),
            "ice_servers": {"type": "array", "items": _ref("IceServer"),
                            "description": "STUN/TURN servers, TURN credentials minted for "
                                           "this session."},
            "token": {"type": "string", "description": "Opens this session's own calls."},
            "token_expires_at": {"type": "integer", "description": "Unix time."},
        },
    },
    "SessionStats": {
        "type": "object", "required": ["session_id", "state", "speech_queued_s", "age_s"],
        "properties": {
            "session_id": {"type": "string"},
            "state": {"type": "string", "description": "The peer connection's state."},
            "turn_state": {"type": "string", "description": "What the face shows now: "
                           "speaking, listening, thinking or idle."},
            "turn_state_set": {"type": "string", "description": "The state a client set."},
            "microphone": {"enum": list(MICROPHONE_MODES)},
            "engine_shows_states": {"type": "array", "items": {"type": "string"}},
            "speech_queued_s": {"type": "number"},
            "age_s": {"type": "number"},
        },
        "additionalProperties": {"type": "number", "description": "Pacing counters: frames "
                                 "generated, sent, dropped, underruns, fillers, ..."},
    },
    "Avatar": {
        "type": "object", "required": ["id", "width", "height", "face_box", "mouth_box"],
        "properties": {
            "id": {"type": "string"},
            "width": {"type": "integer"},
            "height": {"type": "integer"},
            "face_box": {"type": "array", "items": {"type": "integer"},
                         "description": "x0, y0, x1, y1 in the 512x512 reference."},
            "mouth_box": {"type": "array", "items": {"type": "integer"}},
            "source": {"type": "string"},
            "created": {"type": "number"},
            "quality": {"type": "object", "properties": {
                "score": {"type": "number"},
                "notes": {"type": "array", "items": {"type": "string"}}}},
            "preview": {"type": "string", "description": "The reference picture's URL."},
        },
    },
    "PhotoScore": {
        "type": "object", "required": ["name", "score"],
        "properties": {
            "name": {"type": "string", "description": "The file's name."},
            "score": {"type": "number", "description": "0 (unusable) to 100."},
            "parts": {"type": "object", "additionalProperties": {"type": "number"},
                      "description": "Each part, 0-1: face, pose, sharpness, exposure, ..."},
            "measures": {"type": "object", "additionalProperties": {"type": "number"}},
            "problem": {"type": ["string", "null"], "description": "Why it is unusable."},
            "notes": {"type": "array", "items": {"type": "string"}},
            "reason": {"type": ["string", "null"],
                       "description": "The problem's code: `not_image`, `no_face`, ..."},
        },
    },
    "Pushed": {
        "type": "object",
        "required": ["utterance_id", "received_s", "queued_s", "queue_s", "ended",
                     "sample_rate", "channels"],
        "properties": {
            "utterance_id": {"type": "string"},
            "received_s": {"type": "number", "description": "Seconds of speech received."},
            "queued_s": {"type": "number", "description": "Seconds of it queued."},
            "queue_s": {"type": "number", "description": "The session's whole queue."},
            "ended": {"type": "boolean"},
            "sample_rate": {"type": "integer"},
            "channels": {"type": "integer"},
            "notes": {"type": "array", "items": {"type": "string"}},
        },
    },
    "Ready": {
        "type": "object", "required": ["status", "sessions", "max_sessions", "free"],
        "properties": {
            "status": {"enum": ["ready", "full"]},
            "engine": {"type": "string"},
            "sessions": {"type": "integer"},
            "max_sessions": {"type": "integer"},
            "free": {"type": "integer"},
            "step_fps": {"type": "number"},
            "realtime_sessions": {"type": "integer"},
            "workers": {"type": "integer"},
        },
    },
}


# -- the document ----------------------------------------------------------------------------


def spec(config: ServerConfig) -> Json:
    """The OpenAPI 3.1 document of a server with this configuration."""
    keyed = config.api_key is not None
    server_auth: list[Json] | None = [{"apiKey": []}] if keyed else None
    session_auth: list[Json] | None = [{"apiKey": []}, {"sessionToken": []}] if keyed \
        else None
    query_auth: list[Json] | None = [{"apiKey": []}, {"sessionToken": []}, {"queryToken": []}] \
        if keyed else None
    server_errors = (401,) if keyed else ()
    session_errors = SESSION_ERRORS if keyed else (404, 410)
    sdp_body = {"application/sdp": {"schema": {"type": "string"}, "example": EXAMPLE_OFFER}}
    sdp_answer = {"application/sdp": {"schema": {"type": "string"}}}

    paths: Json = {
        "/": {"get": _op(
            "The browser client", "The page: connect, speak, interrupt, watch the avatar.",
            {"200": {"description": "HTML", "content": {"text/html": {}}}},
            tag="pages", operation_id="page")},
        "/web/{filename}": {"get": _op(
            "The browser client's files", "Scripts, styles and pictures of the page.",
            {"200": {"description": "The file", "content": {"*/*": {}}},
             **_errors(404)},
            tag="pages", operation_id="pageFile",
            parameters=[{"name": "filename", "in": "path", "required": True,
                         "schema": {"type": "string"}}])},
        "/docs": {"get": _op(
            "This description, readable", "Swagger UI showing `/openapi.json`.",
            {"200": {"description": "HTML", "content": {"text/html": {}}}},
            tag="pages", operation_id="docs")},
        "/docs/{filename}": {"get": _op(
            "Swagger UI's files", "Served from the `swagger-ui-py` package.",
            {"200": {"description": "The file", "content": {"*/*": {}}},
             **_errors(404)},
            tag="pages", operation_id="docsFile",
            parameters=[{"name": "filename", "in": "path", "required": True,
                         "schema": {"type": "string"}}])},
        "/openapi.json": {"get": _op(
            "This description", "The HTTP API as OpenAPI 3.1, for this server's settings.",
            {"200": {"description": "OpenAPI 3.1", "content": {"application/json": {}}}},
            tag="pages", operation_id="openapi")},
        "/healthz": {"get": _op(
            "Liveness", "200 while the process serves requests.",
            {"200": _json({"type": "object", "required": ["status"],
                           "properties": {"status": {"const": "ok"}}}, "Alive")},
            tag="health", operation_id="healthz")},
        "/readyz": {"get": _op(
            "Readiness and capacity", "200 when the engine is loaded and a session slot is "
            "free, 503 when full (a load balancer then sends new sessions elsewhere).",
            {"200": _json(_ref("Ready"), "Ready"), "503": _json(_ref("Ready"), "Full")},
            tag="health", operation_id="readyz")},
        "/metrics": {"get": _op(
            "Prometheus metrics", "Sessions, frames, pacing, errors, engine step times.",
            {"200": {"description": "Prometheus text format",
                     "content": {"text/plain": {"schema": {"type": "string"}}}}},
            tag="health", operation_id="metrics")},
        "/v1/config": {"get": _op(
            "ICE servers for browser peers", "STUN/TURN servers to gather the offer with "
            "(TURN credentials minted now: fetch it before each offer).",
            {"200": _json({"type": "object", "required": ["ice_servers"], "properties": {
                "ice_servers": {"type": "array", "items": _ref("IceServer")}}}, "ICE servers"),
             **_errors(*server_errors)},
            tag="sessions", operation_id="clientConfig", security=server_auth)},
        "/v1/sessions": {
            "post": _op(
                "Create a session", "Answer a WebRTC offer (it must receive video; an audio "
                "sendrecv m-line carries speech in and the avatar's speech out). JSON in and "
                "out; or `application/sdp` in and out (`?avatar=ID`; the token in "
                "`X-Session-Token`). WHEP players use `/v1/whep`.",
                {"201": {"description": "The session: its answer, token and ICE servers",
                         "headers": {"Location": {"schema": {"type": "string"}}},
                         "content": {"application/json": {"schema": _ref("SessionCreated")},
                                     **sdp_answer}},
                 **_errors(400, *server_errors, 404, 413, 415, 429, 503)},
                tag="sessions", operation_id="createSession", security=server_auth,
                parameters=[{"name": "avatar", "in": "query", "schema": {"type": "string"},
                             "description": "Avatar id, for an `application/sdp` offer."},
                            {"name": "microphone", "in": "query", "schema": MICROPHONE}],
                requestBody={"required": True, "content": {
                    "application/json": {"schema": _ref("Offer")}, **sdp_body}}),
            "get": _op(
                "List sessions", "Every open session's stats.",
                {"200": _json({"type": "array", "items": _ref("SessionStats")}, "Sessions"),
                 **_errors(*server_errors)},
                tag="sessions", operation_id="listSessions", security=server_auth),
        },
        "/v1/sessions/{id}": {
            "parameters": [SESSION_ID],
            "get": _op(
                "Session stats", "State, queued speech and pacing counters (does not count "
                "as activity for the idle timeout).",
                {"200": _json(_ref("SessionStats"), "Stats"), **_errors(*session_errors)},
                tag="sessions", operation_id="getSession", security=session_auth),
            "delete": _op(
                "End a session", "Ends it and frees everything it held.",
                {"204": {"description": "Ended"}, **_errors(*session_errors)},
                tag="sessions", operation_id="deleteSession", security=session_auth),
        },
        "/v1/sessions/{id}/interrupt": {
            "parameters": [SESSION_ID],
            "post": _op(
                "Barge in", "Drops queued speech, fades the avatar's audio out, returns to "
                "idle; `speech.finished` with `interrupted: true` follows.",
                {"200": _json({"type": "object", "required": ["interrupted"], "properties": {
                    "interrupted": {"type": "array", "items": {"type": "string"},
                                    "description": "The utterances cut."}}}, "Interrupted"),
                 **_errors(*session_errors)},
                tag="speech", operation_id="interrupt", security=session_auth)},
        "/v1/sessions/{id}/state": {
            "parameters": [SESSION_ID],
            "post": _op(
                "Set the turn state", "What the avatar does between its speech: `listening` "
                "(to the user), `thinking` (ends when its speech starts) or `idle`. Speech "
                "always shows as speaking.",
                {"200": _json({"type": "object", "required": ["turn_state", "turn_state_set"],
                               "properties": {"turn_state": {"type": "string"},
                                              "turn_state_set": {"type": "string"}}},
                              "What shows now, and the state set"),
                 **_errors(400, *session_errors, 413, 415)},
                tag="speech", operation_id="setTurnState", security=session_auth,
                requestBody={"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["state"],
                    "properties": {"state": {"enum": list(TURN_STATES)}}}}}})},
        "/v1/sessions/{id}/audio": {
            "parameters": [SESSION_ID],
            "post": _op(
                "Push speech", "Speech for the avatar to say, any rate (8-192 kHz) and up to 8 "
                "channels: `audio/wav` (PCM 8/16/24/32-bit, float), `audio/L16;rate=R;"
                "channels=C` (big-endian) or `audio/pcm;rate=R;channels=C[;format=f32]` "
                "(little-endian). Without `utterance_id` the body is one whole utterance.",
                {"202": _json(_ref("Pushed"), "Queued"),
                 **_errors(400, *session_errors, 409, 413, 415, 429)},
                tag="speech", operation_id="pushAudio", security=session_auth,
                parameters=[
                    {"name": "utterance_id", "in": "query", "schema": UTTERANCE_ID,
                     "description": "Send one utterance in pieces under this id."},
                    {"name": "end", "in": "query",
                     "schema": {"enum": ["true", "false", "1", "0", "yes", "no", "on", "off"]},
                     "description": "Whether this piece ends the utterance (default: true "
                                    "without `utterance_id`, false with it)."}],
                requestBody={"required": True, "content": {
                    "audio/wav": {"schema": {"type": "string", "format": "binary"}},
                    "audio/L16": {"schema": {"type": "string", "format": "binary"}},
                    "audio/pcm": {"schema": {"type": "string", "format": "binary"}}}})},
        "/v1/sessions/{id}/end": {
            "parameters": [SESSION_ID],
            "post": _op(
                "End an utterance", "No more audio for it: it plays to its end.",
                {"200": _json({"type": "object", "required": ["utterance_id", "was_open"],
                               "properties": {"utterance_id": {"type": "string"},
                                              "was_open": {"type": "boolean"}}}, "Ended"),
                 **_errors(400, *session_errors, 413, 415)},
                tag="speech", operation_id="endUtterance", security=session_auth,
                requestBody={"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["utterance_id"],
                    "properties": {"utterance_id": UTTERANCE_ID}}}}})},
        "/v1/sessions/{id}/say": {
            "parameters": [SESSION_ID],
            "post": _op(
                "Say text", "Speaks the text through the server's TTS (`--tts`); answers "
                "once it is queued (the avatar starts before a long text is synthesised).",
                {"202": _json({"type": "object",
                               "required": ["utterance_id", "queued_s", "synthesis_s", "tts"],
                               "properties": {"utterance_id": {"type": "string"},
                                              "queued_s": {"type": "number"},
                                              "synthesis_s": {"type": "number"},
                                              "tts": {"type": "string"}}}, "Queued"),
                 **_errors(400, *session_errors, 409, 413, 415, 429, 502, 503, 504)},
                tag="speech", operation_id="say", security=session_auth,
                requestBody={"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["text"],
                    "examples": [{"text": "Hello! I am a talking head."}],
                    "properties": {"text": {"type": "string", "minLength": 1,
                                            "maxLength": config.tts_max_chars},
                                   "voice": {"type": ["string", "null"],
                                             "description": "The TTS voice (null: its "
                                                            "default)."},
                                   "utterance_id": UTTERANCE_ID}}}}})},
        "/v1/sessions/{id}/ws": {
            "parameters": [SESSION_ID],
            "get": _op(
                "The session's WebSocket", "JSON control (`start`, `end`, `interrupt`, `ping`) "
                "and binary PCM16 speech in; the session's events out (`ready`, "
                "`speech.started`, `speech.finished`, `error`, `session.ended`). Browsers pass "
                "the token as `?token=`.",
                {"101": {"description": "Switching to the WebSocket protocol"},
                 **_errors(*session_errors, 426)},
                tag="speech", operation_id="websocket", security=query_auth,
                parameters=[{"name": "token", "in": "query", "schema": {"type": "string"},
                             "description": "The session token or API key (browsers)."}])},
        "/v1/whep": {
            "post": _op(
                "WHEP: play the avatar", "A WHEP player's offer (draft-ietf-wish-whep). The "
                "offer may carry no candidates: they follow by PATCH to the Location.",
                {"201": {"description": "The SDP answer",
                         "headers": {
                             "Location": {"description": "The WHEP session resource",
                                          "schema": {"type": "string"}},
                             "ETag": {"description": "Its ICE session",
                                      "schema": {"type": "string"}},
                             "Link": {"description": 'ICE servers (`rel="ice-server"`, TURN '
                                      "credentials minted for this session), the event "
                                      "WebSocket (`urn:avatar-stream:whep:events`) and the "
                                      "session's JSON resource "
                                      "(`urn:avatar-stream:whep:session`)",
                                      "schema": {"type": "string"}},
                             "X-Session-Token": {"description": "Opens the session's calls",
                                                 "schema": {"type": "string"}}},
                         "content": sdp_answer},
                 **_errors(400, *server_errors, 404, 413, 415, 429, 503)},
                tag="whep", operation_id="whepOffer", security=server_auth,
                parameters=[{"name": "avatar", "in": "query", "schema": {"type": "string"},
                             "description": "Avatar id (default: `default`)."},
                            {"name": "microphone", "in": "query", "schema": MICROPHONE}],
                requestBody={"required": True, "content": sdp_body}),
            "options": _op(
                "WHEP endpoint options", "What it accepts; no credentials needed.",
                {"204": {"description": "Allow and Accept-Post", "headers": {
                    "Accept-Post": {"schema": {"type": "string"}},
                    "Allow": {"schema": {"type": "string"}}}}},
                tag="whep", operation_id="whepEndpointOptions"),
        },
        "/v1/sessions/{id}/whep": {
            "parameters": [SESSION_ID],
            "patch": _op(
                "WHEP: trickle ICE", "Candidates gathered after the POST, and "
                "end-of-candidates (RFC 8840). Candidates outside `--ice-host-addresses` are "
                "dropped, as in offers. ICE restarts are refused (422).",
                {"204": {"description": "Taken", "headers": {
                    "ETag": {"schema": {"type": "string"}}}},
                 **_errors(400, *session_errors, 412, 413, 415, 422, 428)},
                tag="whep", operation_id="whepTrickle", security=session_auth,
                parameters=[{"name": "If-Match", "in": "header", "schema": {"type": "string"},
                             "description": "The ETag of the POST's answer."}],
                requestBody={"required": True, "content": {
                    "application/trickle-ice-sdpfrag": {"schema": {"type": "string"},
                                                        "example": EXAMPLE_FRAGMENT}}}),
            "delete": _op(
                "WHEP: stop", "Ends the session (204 also when it has already ended).",
                {"204": {"description": "Ended"}, **_errors(*session_errors[:-1])},
                tag="whep", operation_id="whepDelete", security=session_auth),
            "options": _op(
                "WHEP resource options", "What it accepts; no credentials needed.",
                {"204": {"description": "Allow and Accept-Patch", "headers": {
                    "Accept-Patch": {"schema": {"type": "string"}},
                    "Allow": {"schema": {"type": "string"}}}}},
                tag="whep", operation_id="whepResourceOptions"),
        },
        "/v1/avatars": {
            "post": _op(
                "Add an avatar", "A photo with one clear face: multipart (`image`, optional "
                "`id`) or an `image/*` body (`?id=`). 201 for a new one, 200 when that photo "
                "is there already.",
                {"201": _json(_ref("Avatar"), "Added"), "200": _json(_ref("Avatar"), "Known"),
                 **_errors(400, *server_errors, 409, 413, 415, 422, 503)},
                tag="avatars", operation_id="uploadAvatar", security=server_auth,
                parameters=[{"name": "id", "in": "query", "schema": {"type": "string"},
                             "description": "Avatar id, for an `image/*` body."}],
                requestBody={"required": True, "content": {
                    "multipart/form-data": {"schema": {
                        "type": "object", "required": ["image"],
                        "properties": {"image": {"type": "string", "format": "binary"},
                                       "id": {"type": "string"}}}},
                    "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
                    "image/png": {"schema": {"type": "string", "format": "binary"}}}}),
            "get": _op(
                "List avatars", "Every avatar's info.",
                {"200": _json({"type": "object", "required": ["avatars"], "properties": {
                    "avatars": {"type": "array", "items": _ref("Avatar")}}}, "Avatars"),
                 **_errors(*server_errors)},
                tag="avatars", operation_id="listAvatars", security=server_auth),
        },
        "/v1/avatars/rank": {"post": _op(
            "Rank photos", "How good each photo is as a reference (0-100, best first), with "
            "the reasons for a low part: the same scores as `avatar-stream avatars rank`. "
            "Nothing is stored; a file that is no usable photo is ranked last with its "
            "reason.",
            {"200": _json({"type": "object",
                           "required": ["ranking", "recommended", "recommended_index"],
                           "properties": {
                               "ranking": {"type": "array", "items": {"allOf": [
                                   _ref("PhotoScore"),
                                   {"type": "object", "required": ["index"], "properties": {
                                       "index": {"type": "integer", "description":
                                                 "The file's place in the request (two "
                                                 "files may share a name)."}}}]}},
                               "recommended": {"type": ["string", "null"],
                                               "description": "The best usable photo's "
                                                              "name."},
                               "recommended_index": {"type": ["integer", "null"],
                                                     "description": "Its place in the "
                                                                    "request."}}},
                          "The ranking"),
             **_errors(400, *server_errors, 413, 415, 503)},
            tag="avatars", operation_id="rankPhotos", security=server_auth,
            requestBody={"required": True, "content": {"multipart/form-data": {"schema": {
                "type": "object", "required": ["image"],
                "properties": {"image": {
                    "description": "A photo: the field once per photo. Any bytes (on the "
                                   "wire one part is one part, whatever it holds): a file "
                                   "that is no usable photo is ranked too, last, with its "
                                   "reason."}}}}}})},
        "/v1/avatars/{id}": {
            "parameters": [AVATAR_ID],
            "get": _op(
                "An avatar", "Size, face and mouth boxes, source, quality score and notes.",
                {"200": _json(_ref("Avatar"), "The avatar"), **_errors(*server_errors, 404)},
                tag="avatars", operation_id="getAvatar", security=server_auth),
            "delete": _op(
                "Delete an avatar", "Sessions already using it keep it; `default` stays (409).",
                {"204": {"description": "Deleted"}, **_errors(*server_errors, 404, 409)},
                tag="avatars", operation_id="deleteAvatar", security=server_auth),
        },
        "/v1/avatars/{id}/preview.png": {
            "parameters": [AVATAR_ID],
            "get": _op(
                "An avatar's picture", "The 512x512 reference the engine animates (`?token=` "
                "for an <img>).",
                {"200": {"description": "PNG", "content": {"image/png": {}}},
                 **_errors(*server_errors, 404)},
                tag="avatars", operation_id="avatarPreview",
                security=[*server_auth, {"queryToken": []}] if server_auth else None,
                parameters=[{"name": "token", "in": "query", "schema": {"type": "string"},
                             "description": "The API key, where a header cannot be sent."}])},
        "/v1/animate": {"post": _op(
            "Render a clip", "The avatar speaking the audio, as one video file with its sound "
            "(the same engine as a live session, faster than real time).",
            {"200": {"description": "The clip", "content": {"video/webm": {}, "video/mp4": {}}},
             **_errors(400, *server_errors, 404, 413, 415, 422, 503)},
            tag="avatars", operation_id="animate", security=server_auth,
            requestBody={"required": True, "content": {"multipart/form-data": {"schema": {
                "type": "object", "required": ["audio"],
                "properties": {
                    "audio": {"type": "string", "format": "binary",
                              "description": "Speech, any format FFmpeg reads."},
                    "image": {"type": "string", "format": "binary",
                              "description": "A photo to animate instead of an avatar."},
                    "avatar": {"type": "string", "description": "Avatar id."},
                    "format": {"enum": ["webm", "mp4"]}}}}}})},
    }
    components: Json = {"schemas": SCHEMAS}
    if keyed:
        components["securitySchemes"] = {
            "apiKey": {"type": "http", "scheme": "bearer",
                       "description": "The server's `--api-key`."},
            "sessionToken": {"type": "http", "scheme": "bearer",
                             "description": "A session's token (`token`, `X-Session-Token`): "
                                            "that session's own calls only."},
            "queryToken": {"type": "apiKey", "in": "query", "name": "token",
                           "description": "The same, where a header cannot be sent."},
        }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "avatar-stream",
            "version": _version(),
            "description": "A real-time talking-head avatar server: speech in, a lip-synced "
                           "WebRTC video of a person out. Errors are JSON `{\"error\": "
                           "message}` (with `reason` where a client can act on it).",
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "tags": [{"name": n, "description": d} for n, d in (
            ("sessions", "WebRTC sessions"), ("speech", "Speech into a session"),
            ("whep", "WHEP players (draft-ietf-wish-whep)"),
            ("avatars", "Avatars and offline rendering"), ("health", "Health and metrics"),
            ("pages", "Pages and this description"))],
        "paths": paths,
        "components": components,
    }


def _version() -> str:
    try:
        return version("avatar-stream")
    except PackageNotFoundError:
        return "0"
