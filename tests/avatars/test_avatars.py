"""Avatars: photo checks with their reasons, ranking, the store, and the HTTP API on the real
server (uploads, listing, previews, deletion, bad photos, sessions picking an avatar by id,
offline animation)."""

from __future__ import annotations

import asyncio
import io
import json
import math
import time
from pathlib import Path

import aiohttp
import av
import cv2
import numpy as np
import pytest
import pytest_asyncio
from matplotlib import cbook

from avatar_stream.avatars import facerig
from avatar_stream.avatars.facerig import PhotoError, check_pose, get_rigger
from avatar_stream.avatars.photo import load_image
from avatar_stream.avatars.ranking import format_ranking, main, rank_photos, score_photo
from avatar_stream.avatars.store import AvatarConflict, AvatarStore
from avatar_stream.client.avatarclient import AvatarClient
from avatar_stream.config import ServerConfig
from avatar_stream.engines.warp.engine import WarpEngine
from avatar_stream.transports.http import avatars as avatar_routes
from avatar_stream.transports.http.app import running_server

on_server_loop = pytest.mark.asyncio(loop_scope="module")


@pytest.fixture(scope="module", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(facerig.CACHE_DIR_ENV, str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def portrait() -> np.ndarray:
    return load_image(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))


def _jpeg(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, 92])
    assert ok
    return buf.tobytes()


def _rotated(image: np.ndarray, degrees: float) -> np.ndarray:
    h, w = image.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), degrees, 1.0)
    return cv2.warpAffine(image, m, (w, h), borderMode=cv2.BORDER_REFLECT)


@pytest.fixture(scope="module")
def bad_photos(portrait: np.ndarray) -> dict[str, tuple[bytes, int, str]]:
    """name -> (file bytes, expected status, expected reason)."""
    small = cv2.resize(portrait, None, fx=0.3, fy=0.3, interpolation=cv2.INTER_AREA)
    canvas = cv2.copyMakeBorder(small, 200, 200, 200, 200, cv2.BORDER_REPLICATE)  # face ~55 px
    return {
        "not an image": (b"just some text pretending to be a photo", 415, "not_image"),
        "too small": (_jpeg(cv2.resize(portrait, (100, 117))), 422, "too_small"),
        "no face": (_jpeg(np.full((400, 400, 3), 128, np.uint8)), 422, "no_face"),
        "several faces": (_jpeg(np.hstack([portrait, portrait])), 422, "several_faces"),
        "face too small": (_jpeg(canvas), 422, "face_too_small"),
    }


# --- checks on the photo ----------------------------------------------------------------------


def _turned(landmarks: np.ndarray, yaw: float = 0.0, pitch: float = 0.0) -> np.ndarray:
    """The face's 3-D landmarks turned about its own centre (yaw: vertical axis)."""
    pts = landmarks.astype(np.float64).copy()
    centre = pts.mean(axis=0)
    a, b = math.radians(yaw), math.radians(pitch)
    turn = np.array([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])
    nod = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    return ((pts - centre) @ (nod @ turn).T + centre).astype(np.float32)


def test_turned_away_faces_are_refused(portrait: np.ndarray, monkeypatch) -> None:
    rig = get_rigger().rig(portrait)
    check_pose(rig.landmarks)  # the frontal portrait passes
    check_pose(_turned(rig.landmarks, yaw=20))
    for yaw, pitch in ((50, 0), (-50, 0), (0, 45)):
        with pytest.raises(PhotoError, match="turned too far away") as info:
            check_pose(_turned(rig.landmarks, yaw=yaw, pitch=pitch))
        assert info.value.reason == "turned_away"
    # and rig() applies the check to what the landmark model sees
    real = facerig.FaceRigger.landmarks

    def turned_model(self, image, box, refine=True):
        r = real(self, image, box, refine)
        return facerig.make_rig(_turned(r.landmarks, yaw=55), r.score, image.shape)

    monkeypatch.setattr(facerig.FaceRigger, "landmarks", turned_model)
    with pytest.raises(PhotoError) as info:
        get_rigger().rig(portrait, use_cache=False)
    assert info.value.reason == "turned_away"


def test_bad_photos_name_their_reason(bad_photos) -> None:
    store = AvatarStore(WarpEngine(), {})
    for name, (data, _, reason) in bad_photos.items():
        with pytest.raises(PhotoError) as info:
            store.prepare(data, name)
        print(f"{name}: {info.value}")
        assert info.value.reason == reason
    assert not store.avatars


def test_store_ids_duplicates_and_conflicts(portrait: np.ndarray) -> None:
    store = AvatarStore(WarpEngine(), {})
    a, created = store.prepare(_jpeg(portrait), "Grace Hopper!")
    assert created and a.id == "grace-hopper"
    again, created = store.prepare(_jpeg(portrait), "grace hopper")
    assert not created and again is a
    with pytest.raises(AvatarConflict):
        store.prepare(_jpeg(portrait[:, ::-1].copy()), "grace-hopper")
    anonymous, _ = store.prepare(_jpeg(portrait))
    assert anonymous.id.startswith("a-")
    reserved, _ = store.prepare(_jpeg(portrait[:, :-8].copy()), "Rank")  # the API's own path
    assert reserved.id == "rank-avatar"
    info = store.info("grace-hopper")
    assert info and info["quality"]["score"] > 50 and info["face_box"] and info["mouth_box"]
    assert store.remove("grace-hopper") and "grace-hopper" not in store.avatars


# --- ranking -------------------------------------------------------------------------------------


def test_rank_prefers_the_sharp_frontal_photo(portrait: np.ndarray, tmp_path: Path) -> None:
    """The issue's test: a sharp frontal photo above a blurred and a rotated copy of it."""
    files = {
        "sharp.jpg": portrait,
        "blurred.jpg": cv2.GaussianBlur(portrait, (0, 0), 2.5),
        "rotated.jpg": _rotated(portrait, 20),
    }
    for name, image in files.items():
        (tmp_path / name).write_bytes(_jpeg(image))
    (tmp_path / "broken.jpg").write_bytes(b"not a photo")
    scores = rank_photos(sorted(tmp_path.iterdir()))
    table = format_ranking(scores)
    print(table)
    names = [s.name for s in scores]
    assert names[0] == "sharp.jpg" and names[-1] == "broken.jpg"
    by_name = {s.name: s for s in scores}
    assert by_name["sharp.jpg"].score > by_name["blurred.jpg"].score + 20
    assert by_name["sharp.jpg"].score > by_name["rotated.jpg"].score + 20
    assert "blurred" in by_name["blurred.jpg"].notes
    assert by_name["rotated.jpg"].parts["frontal"] < 0.3
    assert by_name["broken.jpg"].score == 0 and by_name["broken.jpg"].problem == "not an image"
    assert by_name["broken.jpg"].reason == "not_image" and by_name["sharp.jpg"].reason is None
    assert "recommended: sharp.jpg" in table


def test_score_parts(portrait: np.ndarray) -> None:
    base = score_photo(portrait)
    dark = score_photo((portrait * 0.25).astype(np.uint8))
    print(base.parts, dark.parts)
    assert base.score > 80 and not base.notes
    assert dark.parts["exposure"] < 0.3 < base.parts["exposure"]
    assert dark.parts["sharp"] > 0.8  # dark is not blurred
    several = score_photo(np.hstack([portrait, portrait]))
    assert several.score == 0 and "2 faces" in (several.problem or "")


def test_rank_command(portrait: np.ndarray, tmp_path: Path, capsys) -> None:
    (tmp_path / "a.jpg").write_bytes(_jpeg(portrait))
    (tmp_path / "b.png").write_bytes(_jpeg(cv2.GaussianBlur(portrait, (0, 0), 3)))
    (tmp_path / "notes.txt").write_text("not a photo: ignored")
    from avatar_stream.tools.cli import main as cli

    with pytest.raises(SystemExit) as code:
        cli(["avatars", "rank", str(tmp_path)])
    assert code.value.code == 0
    out = capsys.readouterr().out
    assert "recommended: a.jpg" in out and "notes.txt" not in out
    assert main(_args(tmp_path, as_json=True)) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["name"] for d in data] == ["a.jpg", "b.png"]
    assert main(_args(tmp_path / "missing")) == 2


def _args(folder: Path, as_json: bool = False):
    import argparse

    return argparse.Namespace(avatars_command="rank", folder=folder, json=as_json)


# --- the HTTP API on the real server ------------------------------------------------------------


@pytest.fixture(scope="module")
def avatars_dir(portrait: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("avatars")
    (folder / "grace.jpg").write_bytes(_jpeg(portrait))
    (folder / "mirror.png").write_bytes(_jpeg(portrait[:, ::-1].copy()))
    (folder / "blank.jpg").write_bytes(_jpeg(np.full((300, 300, 3), 200, np.uint8)))
    return folder


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def server(avatars_dir: Path):
    config = ServerConfig(host="127.0.0.1", port=0, ice_host_addresses=["127.0.0.1"],
                          max_sessions=3, avatars_dir=str(avatars_dir))
    async with running_server(config) as (url, state):
        async with aiohttp.ClientSession() as http:
            yield url, state, http


@on_server_loop
async def test_avatars_folder_is_loaded_at_start(server) -> None:
    url, state, http = server
    async with http.get(f"{url}/v1/avatars") as r:
        assert r.status == 200
        ids = [a["id"] for a in (await r.json())["avatars"]]
    assert ids == ["default", "grace", "mirror"]  # blank.jpg has no face: skipped


@on_server_loop
async def test_avatar_api_round_trip(server, portrait: np.ndarray) -> None:
    url, state, http = server
    photo = _jpeg(cv2.resize(portrait, (384, 450)))
    form = aiohttp.FormData()
    form.add_field("id", "amazing grace")
    form.add_field("image", photo, filename="grace.jpg", content_type="image/jpeg")
    t = time.perf_counter()
    async with http.post(f"{url}/v1/avatars", data=form) as r:
        assert r.status == 201, await r.text()
        info = await r.json()
        assert r.headers["Location"] == "/v1/avatars/amazing-grace"
    print(f"upload + prepare: {time.perf_counter() - t:.2f} s")
    assert info["id"] == "amazing-grace" and (info["width"], info["height"]) == (512, 512)
    x0, y0, x1, y1 = info["face_box"]
    mx0, my0, mx1, my1 = info["mouth_box"]
    assert x0 < mx0 < mx1 < x1 and y0 < my0 < my1 < y1
    assert info["quality"]["score"] > 50
    # the same photo as a raw image body: already there
    async with http.post(f"{url}/v1/avatars?id=amazing-grace", data=photo,
                         headers={"Content-Type": "image/jpeg"}) as r:
        assert r.status == 200 and (await r.json())["id"] == "amazing-grace"
    async with http.get(f"{url}/v1/avatars") as r:
        assert "amazing-grace" in [a["id"] for a in (await r.json())["avatars"]]
    async with http.get(f"{url}/v1/avatars/amazing-grace") as r:
        got = await r.json()
        assert got["face_box"] == info["face_box"] and got["preview"].endswith("preview.png")
    async with http.get(f"{url}{got['preview']}") as r:
        assert r.status == 200 and r.content_type == "image/png"
        png = cv2.imdecode(np.frombuffer(await r.read(), np.uint8), cv2.IMREAD_COLOR)
    assert png.shape == (512, 512, 3)
    assert np.abs(png[..., ::-1].astype(int) - state.avatars["amazing-grace"].image).max() == 0
    # a session picks it by id and streams it
    async with AvatarClient(url, avatar="amazing-grace") as client:
        assert client.avatar_info["id"] == "amazing-grace"
        t = time.perf_counter()
        while len(client.received.video_t) < 10 and time.perf_counter() - t < 10:
            await asyncio.sleep(0.05)
        assert len(client.received.video_t) >= 10
        async with http.delete(f"{url}/v1/avatars/amazing-grace") as r:
            assert r.status == 204
        # the live session keeps its avatar; new sessions cannot pick it
        n = len(client.received.video_t)
        await asyncio.sleep(0.5)
        assert len(client.received.video_t) > n
    async with http.get(f"{url}/v1/avatars/amazing-grace") as r:
        assert r.status == 404
    async with http.delete(f"{url}/v1/avatars/amazing-grace") as r:
        assert r.status == 404
    async with http.post(f"{url}/v1/sessions", json={"sdp": "v=0", "avatar": "amazing-grace"}) \
            as r:
        assert r.status == 404 and "unknown avatar" in (await r.json())["error"]
    async with http.delete(f"{url}/v1/avatars/default") as r:
        assert r.status == 409


@on_server_loop
async def test_rank_uploaded_photos(server, portrait: np.ndarray, bad_photos,
                                    tmp_path: Path) -> None:
    """``POST /v1/avatars/rank``: the same scores and order as ``avatars rank`` on the same
    files, a reason for each unusable one (an oversized file among them), nothing stored."""
    url, state, http = server
    before = sorted(state.avatars)
    photos = {"sharp.jpg": _jpeg(portrait),
              "blurred.jpg": _jpeg(cv2.GaussianBlur(portrait, (0, 0), 2.5)),
              "rotated.jpg": _jpeg(_rotated(portrait, 20)),
              "small-face.jpg": bad_photos["face too small"][0],
              "text.jpg": bad_photos["not an image"][0]}
    for name, data in photos.items():
        (tmp_path / name).write_bytes(data)
    form = aiohttp.FormData()
    for name, data in photos.items():
        form.add_field("image", data, filename=name, content_type="image/jpeg")
    form.add_field("image", bytes(16 * 1024 * 1024), filename="huge.jpg")
    form.add_field("note", "other fields are ignored")
    async with http.post(f"{url}/v1/avatars/rank", data=form) as r:
        assert r.status == 200, await r.text()
        body = await r.json()
    print([(s["name"], s["score"], s["reason"], s["notes"]) for s in body["ranking"]])
    cli = rank_photos(sorted(tmp_path.iterdir()))
    got = [(s["name"], s["score"]) for s in body["ranking"]]
    assert [g for g in got if g[0] != "huge.jpg"] == [(s.name, s.score) for s in cli]
    assert ("huge.jpg", 0.0) in got[len(cli) - 2:]  # among the unusable, at the end
    assert body["recommended"] == "sharp.jpg"
    sent = [*photos, "huge.jpg"]  # the order of the files in the form
    assert sorted(s["index"] for s in body["ranking"]) == list(range(len(sent)))
    assert all(sent[s["index"]] == s["name"] for s in body["ranking"])
    assert body["recommended_index"] == sent.index("sharp.jpg")
    by_name = {s["name"]: s for s in body["ranking"]}
    assert "blurred" in by_name["blurred.jpg"]["notes"]
    assert (by_name["text.jpg"]["reason"], by_name["text.jpg"]["problem"]) == \
        ("not_image", "not an image")
    assert by_name["small-face.jpg"]["reason"] == "face_too_small"
    assert by_name["huge.jpg"]["reason"] == "too_large"
    assert sorted(state.avatars) == before
    # refused whole: no photos, not a form, too many files
    form = aiohttp.FormData()
    form.add_field("photo", b"x", filename="x.jpg")
    async with http.post(f"{url}/v1/avatars/rank", data=form) as r:
        assert r.status == 400 and "'image'" in (await r.json())["error"]
    async with http.post(f"{url}/v1/avatars/rank", data=photos["sharp.jpg"],
                         headers={"Content-Type": "image/jpeg"}) as r:
        assert r.status == 415
    form = aiohttp.FormData()
    for i in range(21):
        form.add_field("image", b"x", filename=f"{i}.jpg")
    async with http.post(f"{url}/v1/avatars/rank", data=form) as r:
        assert r.status == 413 and "more than 20" in (await r.json())["error"]
    async with http.get(f"{url}/v1/avatars/rank") as r:  # the ranking, never an avatar's id
        assert r.status == 405 and r.headers["Allow"] == "POST"
    # two files of one name (IMG_0001.jpg from two folders) stay two rows, told by index
    form = aiohttp.FormData()
    form.add_field("image", photos["text.jpg"], filename="IMG_0001.jpg")
    form.add_field("image", photos["sharp.jpg"], filename="IMG_0001.jpg")
    async with http.post(f"{url}/v1/avatars/rank", data=form) as r:
        body = await r.json()
    assert [(s["index"], s["reason"]) for s in body["ranking"]] == [(1, None), (0, "not_image")]
    assert body["recommended_index"] == 1
    # a server with no room for another job refuses at once, before reading the photos
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(avatar_routes, "MAX_WAITING_JOBS", -1)
        async with http.post(f"{url}/v1/avatars/rank", data=form) as r:
            assert r.status == 503 and r.headers["Retry-After"]


@on_server_loop
async def test_bad_uploads_get_the_right_status(server, bad_photos) -> None:
    url, state, http = server
    before = sorted(state.avatars)
    async with AvatarClient(url) as client:  # a live session, untouched by all of it
        for name, (data, status, reason) in bad_photos.items():
            form = aiohttp.FormData()
            form.add_field("image", data, filename="photo.jpg", content_type="image/jpeg")
            async with http.post(f"{url}/v1/avatars", data=form) as r:
                body = await r.json()
                print(f"{name}: {r.status} {body}")
                assert r.status == status and body["reason"] == reason
        async with http.post(f"{url}/v1/avatars", data=b"hello",
                             headers={"Content-Type": "text/plain"}) as r:
            assert r.status == 415
        form = aiohttp.FormData()
        form.add_field("photo", b"x", filename="x.jpg")
        async with http.post(f"{url}/v1/avatars", data=form) as r:
            assert r.status == 400 and "'image'" in (await r.json())["error"]
        big = b"\xff\xd8" + bytes(16 * 1024 * 1024)
        async with http.post(f"{url}/v1/avatars", data=big,
                             headers={"Content-Type": "image/jpeg"}) as r:
            assert r.status == 413 and (await r.json())["reason"] == "too_large"
        huge = _png_header(20_000, 20_000)  # 400 megapixels declared in a tiny file
        async with http.post(f"{url}/v1/avatars", data=huge,
                             headers={"Content-Type": "image/png"}) as r:
            body = await r.json()
            assert r.status == 413 and body["reason"] == "too_large", body
        frames = len(client.received.video_t)
        await asyncio.sleep(0.5)
        assert len(client.received.video_t) > frames + 5  # still streaming
    assert sorted(state.avatars) == before


def _png_header(width: int, height: int) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) \
        + chunk(b"IEND", b"")


@on_server_loop
async def test_animate_returns_a_clip(server, speech_wav: Path) -> None:
    url, state, http = server
    form = aiohttp.FormData()
    form.add_field("audio", speech_wav.read_bytes(), filename="speech.wav",
                   content_type="audio/wav")
    form.add_field("avatar", "grace")
    t = time.perf_counter()
    async with http.post(f"{url}/v1/animate", data=form) as r:
        assert r.status == 200, await r.text()
        assert r.content_type == "video/webm"
        clip = await r.read()
    print(f"animate: {len(clip) / 1e3:.0f} kB in {time.perf_counter() - t:.1f} s")
    with av.open(io.BytesIO(clip)) as c:
        frames = sum(1 for _ in c.decode(video=0))
    with av.open(str(speech_wav)) as c:
        duration = c.streams.audio[0].frames / c.streams.audio[0].rate if \
            c.streams.audio[0].frames else float(c.duration) / 1e6
    assert abs(frames - duration * 25) <= 1
    form = aiohttp.FormData()
    form.add_field("audio", b"not audio", filename="x.wav")
    async with http.post(f"{url}/v1/animate", data=form) as r:
        assert r.status == 415
    form = aiohttp.FormData()
    form.add_field("audio", speech_wav.read_bytes(), filename="speech.wav")
    form.add_field("image", b"not a photo", filename="x.jpg")
    async with http.post(f"{url}/v1/animate", data=form) as r:
        assert r.status == 415 and (await r.json())["reason"] == "not_image"


@on_server_loop
async def test_avatar_calls_need_the_api_key_when_one_is_set() -> None:
    config = ServerConfig(host="127.0.0.1", port=0, ice_host_addresses=["127.0.0.1"],
                          api_key="sesame")
    async with running_server(config) as (url, _), aiohttp.ClientSession() as http:
        async with http.get(f"{url}/v1/avatars") as r:
            assert r.status == 401
        async with http.delete(f"{url}/v1/avatars/default") as r:
            assert r.status == 401
        async with http.post(f"{url}/v1/avatars", data=b"x",
                             headers={"Content-Type": "image/jpeg"}) as r:
            assert r.status == 401
        key = {"Authorization": "Bearer sesame"}
        async with http.get(f"{url}/v1/avatars", headers=key) as r:
            assert r.status == 200
        async with http.get(f"{url}/v1/avatars/default/preview.png?token=sesame") as r:
            assert r.status == 200 and r.content_type == "image/png"  # an <img> src works
