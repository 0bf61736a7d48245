"""HTTP routes for avatars and offline animation.

- ``POST /v1/avatars``: a photo (multipart field ``image`` and optional ``id``, or an
  ``image/*`` body with ``?id=``) -> 201 and its info (200 if that photo is already there)
- ``POST /v1/avatars/rank``: photos (multipart, ``image`` once per photo) -> how good each
  is as a reference, best first (``avatars rank``'s scores and reasons); nothing is stored
- ``GET /v1/avatars``: ``{"avatars": [info, ...]}``
- ``GET /v1/avatars/{id}``: info (size, face box, mouth box, source, quality)
- ``GET /v1/avatars/{id}/preview.png``: the 512x512 reference the engine animates
- ``DELETE /v1/avatars/{id}``: 204 (sessions using it keep it until they end)
- ``POST /v1/animate``: multipart ``audio`` + ``image`` (or ``avatar`` id), optional
  ``format`` (webm, mp4) -> the clip with its sound

A photo that cannot be animated gets a 4xx whose JSON names the reason (``{"error":
message, "reason": code}``): 413 too_large, 415 not_image, 422 too_small / no_face /
several_faces / face_too_small / turned_away. Preparing (~0.4 s) and rendering run on their
own threads, one job at a time each, never on the event loop and never on the engine
worker's threads, so live sessions keep their frame rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from avatar_stream.avatars.facerig import PhotoError
from avatar_stream.avatars.ranking import (
    PhotoScore,
    best_first,
    photos_in,
    score_file,
    unusable,
)
from avatar_stream.avatars.store import DEFAULT_ID, RESERVED_IDS, AvatarConflict, AvatarStore
from avatar_stream.engines.base import Avatar, AvatarError, EngineError
from avatar_stream.errors import SpeechError
from avatar_stream.tools.render import FORMATS, load_speech, render_clip
from avatar_stream.transports.http.auth import passed_on
from avatar_stream.transports.http.body import (
    form_text,
    read_form,
    read_form_files,
    read_limited,
)
from avatar_stream.transports.http.errors import HTTPJSONError, speech_error
from avatar_stream.transports.http.sessions import require_server
from avatar_stream.transports.http.state import STATE

T = TypeVar("T")

AVATAR_STORE = web.AppKey("avatar_store", AvatarStore)
MAX_PHOTO_BYTES = 15 * 1024 * 1024
MAX_AUDIO_BYTES = 32 * 1024 * 1024
MAX_ANIMATE_SPEECH_S = 120.0
MAX_RANK_PHOTOS = 20  # photos ranked in one request
MAX_RANK_BYTES = 64 * 1024 * 1024  # and their bytes in all
MAX_WAITING_JOBS = 2  # more prepare or render jobs than this waiting: 503, try later
PHOTO_STATUS = {"too_large": 413, "not_image": 415}  # every other photo problem: 422
PHOTO_TYPES = ("image/", "application/octet-stream")


class _Jobs:
    """One thread for one kind of heavy job, with a bound on how many may wait. A request
    takes its place (``slot``) before it reads its body: a busy server refuses at once,
    without first holding every waiting request's megabytes."""

    def __init__(self, name: str) -> None:
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self.pending = 0

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        if self.pending > MAX_WAITING_JOBS:
            raise HTTPJSONError(503, "busy with other uploads or renders; try again shortly",
                                **{"Retry-After": "2"})
        self.pending += 1
        try:
            yield
        finally:
            self.pending -= 1

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run on the job thread (inside a ``slot``)."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        with self.slot():
            return await self.call(fn, *args)


PREPARE_JOBS = web.AppKey("avatar_prepare_jobs", _Jobs)
RENDER_JOBS = web.AppKey("animate_jobs", _Jobs)


def add_avatar_api(app: web.Application) -> None:
    """Register the routes and the store on the server's app (``app[STATE]`` must be set).
    The ``--avatars`` folder (``config.avatars_dir``) is loaded before the server listens."""
    state = app[STATE]
    app[AVATAR_STORE] = AvatarStore(state.engine, state.avatars,
                                    engine_name=state.config.engine)
    app[PREPARE_JOBS] = _Jobs("avatar-prepare")
    app[RENDER_JOBS] = _Jobs("animate")
    app.add_routes(avatar_routes())
    app.on_startup.append(_load_folder)
    app.on_cleanup.append(_stop_jobs)


def avatar_routes() -> list[web.RouteDef]:
    # an id is never one of the API's own segments: /v1/avatars/rank is the ranking alone
    # (a GET there is a 405, not "unknown avatar 'rank'")
    one = "/v1/avatars/{id:(?!(?:" + "|".join(sorted(RESERVED_IDS)) + ")(?:/|$))[^{}/]+}"
    return [
        web.post("/v1/avatars", upload_avatar),
        web.post("/v1/avatars/rank", rank_avatar_photos),
        web.get("/v1/avatars", list_avatars),
        web.get(one, get_avatar),
        web.get(one + "/preview.png", avatar_preview),
        web.delete(one, delete_avatar),
        web.post("/v1/animate", animate),
    ]


async def _load_folder(app: web.Application) -> None:
    """``--avatars DIR``: every usable photo becomes an avatar; bad ones are logged and
    skipped, but a folder without a single usable photo stops the start (a typo in a path
    should not go unnoticed)."""
    folder = getattr(app[STATE].config, "avatars_dir", None)
    if not folder:
        return
    path = Path(folder)
    if not path.is_dir():
        raise AvatarError(f"--avatars {folder}: not a folder")
    photos = photos_in(path)
    skipped = await app[PREPARE_JOBS].run(app[AVATAR_STORE].load_folder, path)
    if len(skipped) == len(photos):
        raise AvatarError(f"no usable photo in {folder}"
                          + (f": {skipped}" if skipped else ""))


async def _stop_jobs(app: web.Application) -> None:
    for key in (PREPARE_JOBS, RENDER_JOBS):
        app[key].pool.shutdown(wait=True, cancel_futures=True)


# -- helpers ----------------------------------------------------------------------------------


def _photo_error(exc: AvatarError) -> web.HTTPException:
    reason = exc.reason if isinstance(exc, PhotoError) else "unusable"
    return HTTPJSONError(PHOTO_STATUS.get(reason, 422), str(exc), reason)


# -- avatars ----------------------------------------------------------------------------------


async def upload_avatar(request: web.Request) -> web.Response:
    require_server(request)
    with request.app[PREPARE_JOBS].slot():
        return await _upload(request)


async def _upload(request: web.Request) -> web.Response:
    ctype = request.content_type
    if ctype == "multipart/form-data":
        form = await read_form(request, {"image": MAX_PHOTO_BYTES})
        photo, name = form.get("image"), form_text(form, "id") or form_text(form, "name")
        if photo is None:
            raise HTTPJSONError(400, "send the photo in a form field named 'image'")
    elif ctype.startswith(PHOTO_TYPES):
        photo, name = await read_limited(request, MAX_PHOTO_BYTES, "photo"), \
            request.query.get("id")
    else:
        raise HTTPJSONError(415, "send the photo as multipart/form-data (field 'image') or as "
                            "an image/* body", "not_image")
    store = request.app[AVATAR_STORE]
    try:
        avatar, created = await request.app[PREPARE_JOBS].call(store.prepare, photo, name)
    except AvatarError as exc:
        raise _photo_error(exc) from None
    except AvatarConflict as exc:
        raise HTTPJSONError(409, str(exc)) from None
    except EngineError as exc:  # e.g. the GPU out of memory: nothing changed, try again
        raise HTTPJSONError(503, str(exc), "engine_failed", **{"Retry-After": "10"}) from None
    pool = request.app[STATE].pool
    if pool is not None:  # every worker process makes sessions with it
        await pool.add_avatar(avatar.id, photo, passed_on(request))
    info = store.info(avatar.id) or avatar.info()
    return web.json_response(info, status=201 if created else 200,
                             headers={"Location": f"/v1/avatars/{avatar.id}"})


async def rank_avatar_photos(request: web.Request) -> web.Response:
    """Score photos as references before choosing one: the ranking ``avatar-stream avatars
    rank`` prints, over HTTP for the page. A file that is not a usable image is ranked last
    with its reason, never refused alone. Each row's ``index`` is its file's place in the
    request (two files may share a name)."""
    require_server(request)
    jobs = request.app[PREPARE_JOBS]
    with jobs.slot():
        files = await read_form_files(request, "image", MAX_PHOTO_BYTES, MAX_RANK_PHOTOS,
                                      MAX_RANK_BYTES)
        if not files:
            raise HTTPJSONError(400, "send the photos in form fields named 'image'")
        ranked = await jobs.call(_rank, files)
    usable = [(i, s) for i, s in ranked if s.score > 0]
    return web.json_response({
        "ranking": [{**s.to_json(), "index": i} for i, s in ranked],
        "recommended": usable[0][1].name if usable else None,
        "recommended_index": usable[0][0] if usable else None,
    })


def _rank(files: list[tuple[str, bytes | None]]) -> list[tuple[int, PhotoScore]]:
    """(index in ``files``, score), best first."""
    too_large = PhotoError(f"file over {MAX_PHOTO_BYTES // (1024 * 1024)} MB", "too_large")
    scores = [score_file(data, name) if data is not None else unusable(name, too_large)
              for name, data in files]
    index = {id(s): i for i, s in enumerate(scores)}
    return [(index[id(s)], s) for s in best_first(scores)]


async def list_avatars(request: web.Request) -> web.Response:
    require_server(request)
    return web.json_response({"avatars": request.app[AVATAR_STORE].list()})


def _avatar_id(request: web.Request) -> str:
    avatar_id = request.match_info["id"]
    if avatar_id not in request.app[STATE].avatars:
        raise HTTPJSONError(404, f"unknown avatar {avatar_id!r}")
    return avatar_id


async def get_avatar(request: web.Request) -> web.Response:
    require_server(request)
    avatar_id = _avatar_id(request)
    info = request.app[AVATAR_STORE].info(avatar_id)
    if info is None:
        raise HTTPJSONError(404, f"unknown avatar {avatar_id!r}")
    return web.json_response({**info, "preview": f"/v1/avatars/{avatar_id}/preview.png"})


async def avatar_preview(request: web.Request) -> web.Response:
    require_server(request, allow_query=True)  # an <img> cannot send a header
    png = request.app[AVATAR_STORE].preview_png(_avatar_id(request))
    if png is None:
        raise HTTPJSONError(404, f"unknown avatar {request.match_info['id']!r}")
    return web.Response(body=png, content_type="image/png",
                        headers={"Cache-Control": "private, max-age=60"})


async def delete_avatar(request: web.Request) -> web.Response:
    require_server(request)
    try:
        removed = request.app[AVATAR_STORE].remove(_avatar_id(request))
    except AvatarConflict as exc:
        raise HTTPJSONError(409, str(exc)) from None
    if not removed:
        raise HTTPJSONError(404, f"unknown avatar {request.match_info['id']!r}")
    pool = request.app[STATE].pool
    if pool is not None:
        await pool.remove_avatar(request.match_info["id"], passed_on(request))
    return web.Response(status=204)


# -- offline animation ------------------------------------------------------------------------


async def animate(request: web.Request) -> web.StreamResponse:
    """``POST /v1/animate``: the avatar speaking the audio, as one video file with sound.
    At the front of ``--workers`` (no engine here), a worker renders it."""
    require_server(request)
    pool = request.app[STATE].pool
    if pool is not None:
        return await pool.forward_to_any(request)
    with request.app[RENDER_JOBS].slot():
        return await _animate(request)


async def _animate(request: web.Request) -> web.Response:
    form = await read_form(request, {"audio": MAX_AUDIO_BYTES, "image": MAX_PHOTO_BYTES})
    audio = form.get("audio")
    if not audio:
        raise HTTPJSONError(400, "send the speech in a form field named 'audio'")
    fmt = (form_text(form, "format") or "webm").lower()
    if fmt not in FORMATS:
        raise HTTPJSONError(400, f"format must be one of {', '.join(FORMATS)}")
    store = request.app[AVATAR_STORE]
    avatar: Avatar | None
    if form.get("image"):
        try:
            avatar = await request.app[PREPARE_JOBS].run(_prepare_once, store, form["image"])
        except AvatarError as exc:
            raise _photo_error(exc) from None
    else:
        avatar_id = form_text(form, "avatar") or DEFAULT_ID
        avatar = request.app[STATE].avatars.get(avatar_id)
        if avatar is None:
            raise HTTPJSONError(404, f"unknown avatar {avatar_id!r}")
    try:
        clip = await request.app[RENDER_JOBS].call(_render, store, avatar, audio, fmt)
    except SpeechError as exc:
        raise speech_error(exc) from None
    media = "video/webm" if fmt == "webm" else "video/mp4"
    return web.Response(body=clip, content_type=media, headers={
        "Content-Disposition": f'inline; filename="{avatar.id}.{fmt}"'})


def _prepare_once(store: AvatarStore, photo: bytes) -> Avatar:
    """A photo for one clip: checked and prepared like an upload (and cached the same way)
    but not added to the store."""
    from avatar_stream.avatars.facerig import get_rigger
    from avatar_stream.avatars.photo import crop_to_face, load_image

    image = load_image(photo)
    return store.prepare_image(crop_to_face(image, get_rigger().rig(image)), "upload")


def _render(store: AvatarStore, avatar: Avatar, audio: bytes, fmt: str) -> bytes:
    speech, rate = load_speech(audio)
    if len(speech) > MAX_ANIMATE_SPEECH_S * rate:
        raise SpeechError("too_large", f"speech longer than {MAX_ANIMATE_SPEECH_S:.0f} s")
    out = io.BytesIO()
    assert store.engine is not None  # a front forwards renders to its workers
    render_clip(store.engine, avatar, speech, rate, out, fmt)
    return out.getvalue()
