"""Worker processes: one server address, sessions served by several processes.

Every session of a CPU engine costs Python work on each packet and each frame, and one
process runs Python on one core at a time (the interpreter lock). Measured on a 2-core
machine, one process stopped at 3 warp sessions with a quarter of the CPU idle, while two
processes ran 4 at full rate. So with ``--workers N`` the process that owns the public
address (the front) runs no sessions itself: each worker is a whole server on a loopback
port, the front places each new session on the worker with the fewest sessions, and every
later call for that session reaches its worker through the session id, exactly as calls
reach another replica (``routing.py``). Media never passes through the front: a worker's
answer carries its own ICE candidates. Avatars uploaded or deleted at the front are
replayed to every worker; ``/metrics``, ``/readyz`` and ``GET /v1/sessions`` gather all of
theirs. A worker that dies is started again; its sessions are lost, the others go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry
from prometheus_client.samples import Sample

from avatar_stream.config import ServerConfig
from avatar_stream.engines.registry import CPU_ENGINES
from avatar_stream.errors import error_body
from avatar_stream.scale.capacity import cores
from avatar_stream.scale.routing import FORWARDED, forward

log = logging.getLogger(__name__)

START_TIMEOUT_S = 180.0  # a worker loads the engine and every avatar before it answers
RESTART_DELAY_S = 1.0
_QUERY_TIMEOUT = aiohttp.ClientTimeout(total=10)


class WorkerError(RuntimeError):
    """A worker process that would not start."""


def default_workers(config: ServerConfig) -> int:
    """``--workers auto``: for a CPU engine, one process more than there are cores (at most
    one per session slot): a process's Python runs one thread at a time, and it is busy
    with two or three sessions, so the spare lets sessions spread thinner (on 2 cores,
    measured: 4 sessions within the bench's bounds with 2 processes, 5 with 3). One core
    keeps one process, as does a GPU engine (that process owns the device). Replicas that
    name their sessions' owner by address (``--advertise``) run one process each."""
    if config.engine not in CPU_ENGINES or config.advertise:
        return 1
    n = cores()
    return max(1, min(n + 1 if n > 1 else 1, config.max_sessions))


@dataclass
class Worker:
    index: int
    address: str  # 127.0.0.1:PORT, the owner its session ids name
    listener: socket.socket  # bound by the front for the pool's life: the port stays ours
    process: multiprocessing.process.BaseProcess
    placing: int = 0  # sessions being created on it right now
    ready: bool = False  # up, and holding every avatar uploaded at the front
    failures: int = 0  # starts in a row that failed: the next waits longer

    @property
    def url(self) -> str:
        return f"http://{self.address}"


def _listener() -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


def _serve(run: Callable[..., None], config: ServerConfig, parent: int,
           listener: socket.socket) -> None:
    """A worker process: the ordinary server (``run``), ending when its front goes away."""

    def watch_parent() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)  # the front is gone (killed): nobody can reach these sessions any more

    threading.Thread(target=watch_parent, name="parent-watch", daemon=True).start()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s worker "
                        f"{config.port} %(name)s: %(message)s")
    for noisy in ("aioice", "aiortc", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    run(config, announce=False, sock=listener)


class WorkerPool:
    """The front's worker processes: started with the app, stopped with it."""

    def __init__(self, config: ServerConfig, count: int, serve: Callable[..., None]) -> None:
        """``serve``: what each worker process runs (``server.run``, handed in so that this
        module needs no import of the server that imports it)."""
        self.count = count
        self._run = serve
        self.workers: list[Worker] = []
        self._http: aiohttp.ClientSession | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._closing = False
        self._context = multiprocessing.get_context("spawn")  # no copy of the front's loop
        self._placement = asyncio.Lock()
        # one token secret for all: a session's token stays valid whichever process checks it
        self.config = replace(config, token_secret=config.token_secret or os.urandom(32))
        # avatars uploaded at the front: id -> (photo, the uploader's credentials), for a
        # worker started again
        self.uploads: dict[str, tuple[bytes, dict[str, str]]] = {}

    @property
    def addresses(self) -> set[str]:
        return {w.address for w in self.workers}

    @property
    def http(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = aiohttp.ClientSession(auto_decompress=False)
        return self._http

    # -- life cycle --------------------------------------------------------------------

    async def start(self, app: web.Application | None = None) -> None:
        self.workers = [self._spawn(i, _listener()) for i in range(self.count)]
        try:
            await asyncio.gather(*(self._until_up(w) for w in self.workers))
        except BaseException:
            await self.close()
            raise
        for w in self.workers:
            w.ready = True
        log.info("%d worker processes: %s", self.count, ", ".join(w.address for w in self.workers))
        self._supervisor = asyncio.create_task(self._supervise())

    async def close(self, app: web.Application | None = None) -> None:
        """At the front's shutdown: the workers close their sessions (which ends the calls
        the front is forwarding to them), then exit."""
        self._closing = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(None, _stop, w.process)
                               for w in self.workers))
        for w in self.workers:
            w.listener.close()
        if self._http is not None:
            await self._http.close()

    def _limit(self, index: int) -> int:
        """Worker ``index``'s share of ``--max-sessions`` (the shares add up to it)."""
        share, extra = divmod(self.config.max_sessions, self.count)
        return share + (1 if index < extra else 0)

    def _spawn(self, index: int, listener: socket.socket) -> Worker:
        port = listener.getsockname()[1]
        config = replace(
            self.config, host="127.0.0.1", port=port, advertise=f"127.0.0.1:{port}",
            peers=None, workers=1, max_sessions=self._limit(index),
            sessions_per_ip_per_minute=0,  # the front limits callers: here all are the front
        )
        process = self._context.Process(
            target=_serve, args=(self._run, config, os.getpid(), listener),
            name=f"avatar-stream-worker-{index}")
        process.start()
        return Worker(index, config.advertise or "", listener, process)

    async def _until_up(self, worker: Worker) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if not worker.process.is_alive():
                raise WorkerError(f"worker {worker.index} exited at start-up "
                                  f"(exit code {worker.process.exitcode}); see its log above")
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                async with self.http.get(f"{worker.url}/healthz", timeout=_QUERY_TIMEOUT) as r:
                    if r.status == 200:
                        return
            await asyncio.sleep(0.1)
        raise WorkerError(f"worker {worker.index} did not start in {START_TIMEOUT_S:.0f} s")

    async def _supervise(self) -> None:
        """Start a worker again when it dies, on the same socket (its ids stay its own); a
        worker that missed an avatar upload takes no sessions until it has them all."""
        while not self._closing:
            await asyncio.sleep(RESTART_DELAY_S)
            for i, w in enumerate(self.workers):
                if self._closing:
                    return
                try:
                    if not w.process.is_alive():
                        await self._restart(i, w)
                    elif not w.ready:
                        w.ready = await self._upload_all(w)
                except Exception:  # never let the supervisor die quietly
                    log.exception("worker %d: supervision failed", w.index)

    async def _restart(self, i: int, w: Worker) -> None:
        log.error("worker %d (%s) died (exit code %s); its sessions are lost; starting it "
                  "again", w.index, w.address, w.process.exitcode)
        await asyncio.sleep(min(30.0, RESTART_DELAY_S * (2**w.failures - 1)))  # backoff
        new = self.workers[i] = self._spawn(w.index, w.listener)
        new.failures = w.failures
        try:
            await self._until_up(new)
        except WorkerError as exc:
            log.error("%s", exc)
            new.failures += 1
            await asyncio.get_running_loop().run_in_executor(None, _stop, new.process)
            return
        new.failures = 0
        new.ready = await self._upload_all(new)

    async def _upload_all(self, worker: Worker) -> bool:
        results = [await self._add_avatar(worker, avatar_id, photo, headers)
                   for avatar_id, (photo, headers) in list(self.uploads.items())]
        return all(results)

    # -- sessions ------------------------------------------------------------------------

    async def _ask(self, worker: Worker, path: str, headers: dict[str, str] | None = None
                   ) -> Any:
        """A worker's JSON answer to GET ``path``, or None when it cannot answer."""
        try:
            async with self.http.get(f"{worker.url}{path}", headers=headers,
                                     timeout=_QUERY_TIMEOUT) as r:
                return await r.json(content_type=None)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            return None

    async def loads(self) -> list[tuple[Worker, dict[str, Any]]]:
        """Each ready worker with its ``/readyz`` capacity figures."""
        ready = [w for w in self.workers if w.ready]
        answers = await asyncio.gather(*(self._ask(w, "/readyz") for w in ready))
        return [(w, a) for w, a in zip(ready, answers, strict=True)
                if isinstance(a, dict) and "free" in a]

    async def create_session(self, request: web.Request) -> web.StreamResponse | None:
        """``POST /v1/sessions``, answered by the worker with the fewest sessions (or the
        next, when it turns out full); None when every worker is full. Each worker admits
        only its share of ``--max-sessions``, so the whole server never takes more."""
        tried: set[int] = set()
        while True:
            async with self._placement:  # concurrent requests spread over the workers
                # the fewest sessions first; of those, the most room
                loads = [(a["sessions"] + w.placing, -(a["free"] - w.placing), w.index, w)
                         for w, a in await self.loads()
                         if w.index not in tried and a["free"] - w.placing > 0]
                if not loads:
                    return None
                worker = min(loads, key=lambda load: load[:3])[3]
                worker.placing += 1
            try:
                response = await forward(self.http, request, worker.address, "front",
                                         f"worker {worker.index}")
            finally:
                worker.placing -= 1
            if response.status != 503:
                return response
            tried.add(worker.index)  # full after all (a session came in meanwhile)

    async def forward_to_any(self, request: web.Request) -> web.StreamResponse:
        """A call any worker can answer (``/v1/animate``: the front loads no engine), on
        the ready worker with the fewest sessions."""
        loads = await self.loads()
        if not loads:
            return web.json_response(error_body("no worker is ready; try again shortly"),
                                     status=503, headers={"Retry-After": "2"})
        worker = min(loads, key=lambda load: (load[1]["sessions"], load[0].index))[0]
        return await forward(self.http, request, worker.address, "front",
                             f"worker {worker.index}")

    async def sessions(self, headers: dict[str, str]) -> list[Any]:
        answers = await asyncio.gather(*(self._ask(w, "/v1/sessions", headers)
                                         for w in self.workers))
        return [s for a in answers if isinstance(a, list) for s in a]

    # -- avatars ----------------------------------------------------------------------------

    async def add_avatar(self, avatar_id: str, photo: bytes, headers: dict[str, str]) -> None:
        """An avatar uploaded at the front, uploaded to every worker too (now, and again to a
        worker that is started again). The first worker prepares it for the engine and fills
        the disk cache; the others then take it from there, at once."""
        self.uploads[avatar_id] = (photo, headers)
        if self.workers:
            first, *rest = self.workers
            await self._add_avatar(first, avatar_id, photo, headers)
            await asyncio.gather(*(self._add_avatar(w, avatar_id, photo, headers)
                                   for w in rest))

    async def remove_avatar(self, avatar_id: str, headers: dict[str, str]) -> None:
        self.uploads.pop(avatar_id, None)
        await asyncio.gather(*(self._call(w, "DELETE", f"/v1/avatars/{avatar_id}", headers)
                               for w in self.workers))

    async def _add_avatar(self, worker: Worker, avatar_id: str, photo: bytes,
                          headers: dict[str, str]) -> bool:
        """Upload to one worker; one that misses it takes no sessions until the supervisor
        has uploaded it again (else that avatar would fail on that worker only)."""
        ok = await self._call(worker, "POST", f"/v1/avatars?id={avatar_id}",
                              {**headers, "Content-Type": "application/octet-stream"}, photo)
        if not ok:
            worker.ready = False
        return ok

    async def _call(self, worker: Worker, method: str, path: str, headers: dict[str, str],
                    data: bytes | None = None) -> bool:
        """A change made at the front, made on a worker; False (and logged) if it was not."""
        try:
            async with self.http.request(method, f"{worker.url}{path}", data=data,
                                         headers={**headers, FORWARDED: "front"},
                                         timeout=aiohttp.ClientTimeout(total=60)) as r:
                if r.status < 300 or (method == "DELETE" and r.status == 404):
                    return True
                log.warning("worker %d refused %s %s: %s %s", worker.index, method, path,
                            r.status, (await r.text())[:200])
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            log.warning("worker %d missed %s %s: %s", worker.index, method, path, exc)
        return False

    # -- metrics --------------------------------------------------------------------------

    async def metrics(self, own: bytes) -> bytes:
        """The front's metrics and every worker's, each sample labelled with its process."""
        async def text(w: Worker) -> str:
            try:
                async with self.http.get(f"{w.url}/metrics", timeout=_QUERY_TIMEOUT) as r:
                    return await r.text()
            except (aiohttp.ClientError, asyncio.TimeoutError):
                return ""

        texts = await asyncio.gather(*(text(w) for w in self.workers))
        return merge_metrics([("front", own.decode())]
                             + [(str(w.index), t) for w, t in zip(self.workers, texts,
                                                                   strict=True)])


def _stop(process: multiprocessing.process.BaseProcess) -> None:
    """SIGTERM (the worker closes its sessions), then SIGKILL after 10 s."""
    if process.is_alive():
        process.terminate()
        process.join(10)
    if process.is_alive():
        process.kill()
        process.join(5)


class _Families:
    """Metric families gathered from several expositions (a collector for one scrape)."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self.families


def merge_metrics(sources: list[tuple[str, str]]) -> bytes:
    """Several processes' Prometheus text as one exposition: a metric family once, with
    a ``worker`` label on each sample naming the process it came from."""
    merged: dict[str, Metric] = {}
    for worker, text in sources:
        for family in text_string_to_metric_families(text):
            into = merged.setdefault(family.name,
                                     Metric(family.name, family.documentation, family.type))
            into.samples += [Sample(s.name, {**s.labels, "worker": worker}, s.value,
                                    s.timestamp, s.exemplar) for s in family.samples]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(merged.values()))  # type: ignore[arg-type]
    return generate_latest(registry)
