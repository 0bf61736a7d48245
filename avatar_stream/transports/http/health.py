"""Pages and health: the browser page, ``/healthz``, ``/readyz`` (capacity), ``/metrics``
and the client configuration (``/v1/config``: ICE servers for the page)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from aiohttp import web

from avatar_stream.scale.capacity import capacity_info
from avatar_stream.scale.metrics import CONTENT_TYPE
from avatar_stream.transports.http.errors import HTTPJSONError
from avatar_stream.transports.http.sessions import require_server
from avatar_stream.transports.http.state import STATE
from avatar_stream.transports.webrtc.turn import session_ice_servers

WEB_DIR = Path(str(resources.files("avatar_stream") / "web"))


# -- pages and health ------------------------------------------------------------------


async def index(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(WEB_DIR / "index.html")


def files(prefix: str, directory: Path) -> web.RouteDef:
    """``GET prefix/{filename}``: the files under ``directory``, nothing outside it; a
    missing one gets the API's JSON 404 (aiohttp's static route answers an empty one)."""
    root = directory.resolve()

    async def serve(request: web.Request) -> web.StreamResponse:
        name = request.match_info["filename"]
        try:
            path = (root / name).resolve()
            found = path.is_relative_to(root) and path.is_file()
        except (OSError, ValueError):  # a NUL in the name, a name too long
            found = False
        if not found:
            raise HTTPJSONError(404, f"no file {name!r} under {prefix}/")
        return web.FileResponse(path)

    return web.get(prefix + "/{filename:.+}", serve)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = {
        "engine": state.config.engine,
        **capacity_info(state.engine, state.max_sessions, len(state.sessions)),
    }
    if state.pool is not None:  # the workers' sessions, and room on the live ones
        loads = await state.pool.loads()
        active = sum(a["sessions"] for _, a in loads)
        free = sum(a["free"] for _, a in loads)  # their shares add up to --max-sessions
        body.update(sessions=active, free=free, workers=len(loads))
        if free == 0:
            return web.json_response({"status": "full", **body}, status=503)
        return web.json_response({"status": "ready", **body})
    if not state.has_capacity:
        return web.json_response({"status": "full", **body}, status=503)
    return web.json_response({"status": "ready", **body})


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = state.metrics.render()
    if state.pool is not None:
        body = await state.pool.metrics(body)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def client_config(request: web.Request) -> web.Response:
    state = request.app[STATE]
    require_server(request)  # it may hold TURN credentials
    return web.json_response(
        {"ice_servers": [s.to_json() for s in session_ice_servers(state.config)]}
    )
