"""Worker processes behind one front: sessions spread over the workers, every call for a
session reaches its worker through the front, avatars and metrics span them all, a full
server refuses, and a worker that dies is started again."""

from __future__ import annotations

import argparse
import asyncio
import io
import time

import aiohttp
import av
import cv2
import numpy as np
import pytest
import pytest_asyncio
from matplotlib import cbook
from prometheus_client.parser import text_string_to_metric_families

from avatar_stream.avatars import facerig
from avatar_stream.avatars.photo import load_image
from avatar_stream.bench.cli import session_processes
from avatar_stream.client.avatarclient import MIC_RATE, AvatarClient
from avatar_stream.client.sessioncontrol import RequestError
from avatar_stream.config import ServerConfig
from avatar_stream.scale.routing import owner_of
from avatar_stream.scale.workers import default_workers, merge_metrics
from avatar_stream.tools.cli import serve_config
from avatar_stream.transports.http.app import running_server

ASYNC = pytest.mark.asyncio(loop_scope="module")


def test_merged_metrics_name_each_process() -> None:
    a = ('# HELP x_total X.\n# TYPE x_total counter\nx_total 3.0\n'
         '# HELP h Step.\n# TYPE h histogram\n'
         'h_bucket{le="1.0"} 2.0\nh_bucket{le="+Inf"} 2.0\nh_count 2.0\nh_sum 0.5\n')
    b = '# HELP x_total X.\n# TYPE x_total counter\nx_total{kind="a"} 4.0\n'
    families = {f.name: f for f in text_string_to_metric_families(
        merge_metrics([("front", a), ("0", b)]).decode())}
    assert {(s.labels.get("worker"), s.labels.get("kind"), s.value)
            for s in families["x"].samples} == {("front", None, 3.0), ("0", "a", 4.0)}
    assert families["x"].type == "counter" and families["h"].type == "histogram"
    assert {s.labels["worker"] for s in families["h"].samples} == {"front"}


def test_workers_by_default_one_more_than_the_cores_for_cpu_engines(monkeypatch) -> None:
    monkeypatch.setattr("avatar_stream.scale.workers.cores", lambda: 4)
    assert default_workers(ServerConfig(engine="warp")) == 5
    monkeypatch.setattr("avatar_stream.scale.workers.cores", lambda: 1)
    assert default_workers(ServerConfig(engine="warp")) == 1  # no front and worker on one core
    monkeypatch.setattr("avatar_stream.scale.workers.cores", lambda: 4)
    assert default_workers(ServerConfig(engine="warp", max_sessions=2)) == 2
    assert default_workers(ServerConfig(engine="flashhead")) == 1  # one process owns the GPU
    assert default_workers(ServerConfig(engine="warp", advertise="10.0.0.1:8080")) == 1


def _serve_args(*extra: str) -> argparse.Namespace:
    from avatar_stream.tools.cli import _add_serve

    parser = argparse.ArgumentParser()
    _add_serve(parser.add_subparsers(dest="command"))
    return parser.parse_args(["serve", *extra])


def test_workers_option_is_checked() -> None:
    assert serve_config(_serve_args("--workers", "3")).workers == 3
    for bad in ("0", "many"):
        with pytest.raises(SystemExit, match="--workers must be"):
            serve_config(_serve_args("--workers", bad))
    with pytest.raises(SystemExit, match="CPU engines"):  # one process owns the GPU
        serve_config(_serve_args("--workers", "2", "--engine", "flashhead"))
    with pytest.raises(SystemExit, match="--advertise"):
        serve_config(_serve_args("--workers", "2", "--advertise", "10.0.0.1:8080"))


@pytest.fixture(scope="module", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory):
    with pytest.MonkeyPatch.context() as mp:  # the workers inherit it
        mp.setenv(facerig.CACHE_DIR_ENV, str(tmp_path_factory.mktemp("cache")))
        yield


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def front():
    config = ServerConfig(host="127.0.0.1", port=0, ice_host_addresses=["127.0.0.1"],
                          engine="still", max_sessions=3, workers=2)
    async with running_server(config) as (url, state):
        async with aiohttp.ClientSession() as http:
            yield url, state, http


async def _until(condition, timeout: float, what: str) -> None:
    deadline = time.perf_counter() + timeout
    while not condition():
        assert time.perf_counter() < deadline, what
        await asyncio.sleep(0.05)


async def _no_sessions(http: aiohttp.ClientSession, url: str) -> None:
    """Until the sessions of earlier tests have ended on their workers (a worker's share of
    --max-sessions is small here)."""
    deadline = time.perf_counter() + 20
    while True:
        async with http.get(f"{url}/readyz") as r:
            if (await r.json())["sessions"] == 0:
                return
        assert time.perf_counter() < deadline, "earlier sessions never ended"
        await asyncio.sleep(0.05)


async def _metric(http: aiohttp.ClientSession, url: str, name: str) -> dict[str, float]:
    """A metric's value per worker label, read off the front's /metrics."""
    async with http.get(f"{url}/metrics") as r:
        assert r.status == 200
        text = await r.text()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                out[s.labels["worker"]] = out.get(s.labels["worker"], 0.0) + s.value
    return out


@ASYNC
async def test_sessions_spread_over_the_workers_and_calls_reach_them(front, speech48k) -> None:
    url, state, http = front
    await _no_sessions(http, url)
    assert not state.sessions  # the front runs none itself
    async with AvatarClient(url) as a, AvatarClient(url) as b:
        owners = {owner_of(a.session_id), owner_of(b.session_id)}
        assert owners == state.pool.addresses  # one on each worker
        async with http.get(f"{url}/readyz") as r:
            body = await r.json()
            assert r.status == 200 and body["sessions"] == 2 and body["workers"] == 2
            assert body["free"] == 1  # --max-sessions 3 over the whole server
        async with http.get(f"{url}/v1/sessions") as r:
            assert {s["session_id"] for s in await r.json()} == {a.session_id, b.session_id}
        # speech pushed through the front is spoken by that session's worker only
        await a.push_speech(speech48k[: 2 * MIC_RATE], MIC_RATE)

        def loud(c: AvatarClient) -> int:
            return sum(1 for f in c.received.audio if np.sqrt(np.mean(f**2)) > 0.02)

        await _until(lambda: loud(a) >= 25, 20, "the pushed speech never came back")
        assert loud(b) == 0
        await _until(lambda: len(a.received.video_t) > 50 and len(b.received.video_t) > 50,
                     20, "video stopped")
        async with http.post(f"{url}/v1/sessions/{a.session_id}/interrupt") as r:
            assert r.status == 200
        async with http.post(f"{url}/v1/sessions/{b.session_id}/state",
                             json={"state": "thinking"}) as r:  # a turn state, through it too
            assert r.status == 200 and (await r.json())["turn_state"] == "thinking"
        await asyncio.wait_for(b.wait_event("state.changed"), 5)
        sent = await _metric(http, url, "avatar_frames_sent_total")
        assert sent["0"] > 0 and sent["1"] > 0 and sent["front"] == 0
        interrupts = await _metric(http, url, "avatar_interrupts_total")
        assert sum(interrupts.values()) == 1
    async with http.get(f"{url}/v1/sessions/{a.session_id}") as r:
        assert r.status == 410  # its worker says: ended
    async with http.get(f"{url}/readyz") as r:
        assert (await r.json())["sessions"] == 0


@ASYNC
async def test_a_full_server_refuses_at_the_front(front) -> None:
    url, state, http = front
    await _no_sessions(http, url)
    clients = [AvatarClient(url) for _ in range(3)]
    try:
        # created at the same moment, they still spread (2 + 1: the workers' shares of 3)
        await asyncio.gather(*(c.connect() for c in clients))
        owners = [owner_of(c.session_id) for c in clients]
        assert sorted(owners.count(a) for a in state.pool.addresses) == [1, 2]
        refused = sum((await _metric(http, url, "avatar_sessions_refused_total")).values())
        with pytest.raises(RequestError, match="503"):
            async with AvatarClient(url):
                pass
        after = await _metric(http, url, "avatar_sessions_refused_total")
        assert after["front"] >= 1 and sum(after.values()) == refused + 1
    finally:
        await asyncio.gather(*(c.close() for c in clients))


async def _upload(http: aiohttp.ClientSession, url: str, avatar_id: str,
                  headers: dict[str, str] | None = None) -> None:
    """A portrait uploaded at the front as ``avatar_id``."""
    portrait = load_image(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(portrait, cv2.COLOR_RGB2BGR))
    async with http.post(f"{url}/v1/avatars?id={avatar_id}", data=jpeg.tobytes(),
                         headers={**(headers or {}), "Content-Type": "image/jpeg"}) as r:
        assert r.status == 201, await r.text()


@ASYNC
async def test_the_front_loads_no_engine_and_a_worker_renders(front, speech_wav) -> None:
    """The front runs no session and holds no engine (it checks photos only), so a render
    asked of it can only have been made by a worker."""
    url, state, http = front
    assert state.engine is None and state.worker is None
    async with http.get(f"{url}/v1/avatars/default") as r:
        info = await r.json()
        assert r.status == 200 and info["engine"] == "still" and info["face_box"]
    form = aiohttp.FormData()
    form.add_field("audio", speech_wav.read_bytes(), filename="speech.wav",
                   content_type="audio/wav")
    async with http.post(f"{url}/v1/animate", data=form) as r:
        assert r.status == 200, await r.text()
        clip = await r.read()
    with av.open(io.BytesIO(clip)) as c:
        assert sum(1 for _ in c.decode(video=0)) > 25


@ASYNC
async def test_avatars_uploaded_at_the_front_reach_every_worker(front) -> None:
    url, state, http = front
    await _upload(http, url, "grace")
    await _no_sessions(http, url)
    async with AvatarClient(url, avatar="grace") as a, AvatarClient(url, avatar="grace") as b:
        assert {owner_of(a.session_id), owner_of(b.session_id)} == state.pool.addresses
        assert a.avatar_info["id"] == b.avatar_info["id"] == "grace"
    async with http.delete(f"{url}/v1/avatars/grace") as r:
        assert r.status == 204
    for _ in range(2):  # on neither worker any more
        with pytest.raises(RequestError, match="404"):
            async with AvatarClient(url, avatar="grace"):
                pass


@ASYNC
async def test_a_worker_that_dies_is_started_again(front) -> None:
    url, state, http = front
    await _upload(http, url, "ada")
    await _no_sessions(http, url)
    async with AvatarClient(url) as a:
        lost = a.session_id
        i, victim = next((i, w) for i, w in enumerate(state.pool.workers)
                         if w.address == owner_of(lost))
        victim.process.kill()
        await _until(lambda: state.pool.workers[i].process is not victim.process
                     and state.pool.workers[i].process.is_alive(), 30, "not restarted")

    async def ready_workers() -> int:
        async with http.get(f"{url}/readyz") as r:
            return (await r.json())["workers"]

    deadline = time.perf_counter() + 120
    while await ready_workers() < 2:
        assert time.perf_counter() < deadline, "the restarted worker never became ready"
        await asyncio.sleep(0.2)
    assert state.pool.workers[i].address == victim.address  # same port: same owner in ids
    async with http.get(f"{url}/v1/sessions/{lost}") as r:
        assert r.status == 404  # that session is gone with its process
    await _no_sessions(http, url)
    # both workers serve again, the new one with the avatar uploaded before it started
    async with AvatarClient(url, avatar="ada") as a, AvatarClient(url, avatar="ada") as b:
        assert {owner_of(a.session_id), owner_of(b.session_id)} == state.pool.addresses


@ASYNC
async def test_the_bench_sees_how_many_processes_serve_sessions(front) -> None:
    url, state, http = front
    assert await session_processes(url) == 2


async def test_the_workers_end_with_the_front() -> None:
    config = ServerConfig(host="127.0.0.1", port=0, ice_host_addresses=["127.0.0.1"],
                          engine="still", workers=2)
    async with running_server(config) as (url, state), AvatarClient(url) as client:
        processes = [w.process for w in state.pool.workers]
        assert all(p.is_alive() for p in processes) and client.session_id
    # the session was closed by its worker, and no worker outlives the front
    assert not any(p.is_alive() for p in processes)
    assert all(p.exitcode == 0 for p in processes), [p.exitcode for p in processes]


async def test_keys_and_tokens_hold_across_the_workers() -> None:
    """With an API key: the front checks it, the workers check it again on what it hands
    them, and a session's token is good for its own calls through the front."""
    config = ServerConfig(host="127.0.0.1", port=0, ice_host_addresses=["127.0.0.1"],
                          engine="still", workers=2, api_key="k3y")
    key = {"Authorization": "Bearer k3y"}
    async with running_server(config) as (url, state), aiohttp.ClientSession() as http:
        await _upload(http, url, "grace", key)
        with pytest.raises(RequestError, match="401"):
            async with AvatarClient(url):
                pass
        async with AvatarClient(url, api_key="k3y", avatar="grace") as a, \
                AvatarClient(url, api_key="k3y", avatar="grace") as b:
            assert {owner_of(a.session_id), owner_of(b.session_id)} == state.pool.addresses
            async with http.get(f"{url}/v1/sessions") as r:
                assert r.status == 401
            async with http.get(f"{url}/v1/sessions", headers=key) as r:
                assert {s["session_id"] for s in await r.json()} == {a.session_id,
                                                                     b.session_id}
            token = {"Authorization": f"Bearer {a.token}"}
            async with http.post(f"{url}/v1/sessions/{a.session_id}/interrupt",
                                 headers=token) as r:
                assert r.status == 200
            async with http.post(f"{url}/v1/sessions/{b.session_id}/interrupt",
                                 headers=token) as r:
                assert r.status == 403  # a's token is not b's
