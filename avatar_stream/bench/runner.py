"""Drive benchmark sessions: real aiortc clients speaking to a server, as a browser would.

Each session idles, then speaks the test speech clip after clip with a short pause in
between, and every few clips barges in halfway through. Everything is recorded with its
arrival time; ``measure`` turns the recording into the figures the report shows.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import socket
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import numpy as np

from avatar_stream.bench import analysis as A
from avatar_stream.bench.machine import (
    CpuMeter,
    CpuShare,
    listening_pid,
    profiled,
    split_meters,
)
from avatar_stream.client.avatarclient import AUDIO_PREFETCH, MIC_RATE, AvatarClient
from avatar_stream.config import ServerConfig
from avatar_stream.scale.capacity import cores
from avatar_stream.transports.webrtc.ice import parse_addresses

PAUSE_S = 1.2  # between clips
IDLE_S = 1.0  # before the first clip
QUIET_RMS = 0.004  # received audio below this counts as silent


@dataclass
class Script:
    """What a session did and when (perf_counter seconds)."""

    mode: str = "live"
    clips: list[tuple[float, float, bool]] = field(default_factory=list)  # start, length, cut
    interrupts: list[float] = field(default_factory=list)
    end: float = 0.0


@dataclass
class SessionResult:
    """Raw samples of one session; every figure in the report comes from these."""

    connect_s: float
    echo: list[tuple[float, float, float]]  # (window start, lag s, r)
    mouth: list[tuple[float, float, float]]
    av_offset: list[float]  # audio lag - mouth lag per window at network arrival (+ = audio late)
    frame_intervals: list[float]
    pts_monotonic: bool
    fps: float
    interrupt_to_silence: list[float]  # heard: after this client's jitter buffer
    interrupt_to_silence_net: list[float]  # the last speech packet off the network
    lipsync_r: float | None = None  # received mouth vs received audio
    lipsync_lag_s: float | None = None  # positive: the mouth moves after its sound
    # the speech that came back against what was sent, over the whole run (envelopes, r
    # at the best lag): how much of it survived the network
    speech_r: float | None = None
    # per second: (time from the start, video kbps received, kbps the sender sent: the
    # received bytes scaled by the packets sent, read off the RTP sequence numbers)
    video_kbps: list[tuple[float, float, float]] = field(default_factory=list)
    timeline: dict[str, Any] = field(default_factory=dict)

    @property
    def freezes(self) -> int:
        return sum(1 for d in self.frame_intervals if d > 0.2)

    @property
    def jitter(self) -> list[float]:
        return [abs(d - 0.04) for d in self.frame_intervals]


async def run_session(
    url: str,
    speech: np.ndarray,
    duration: float,
    *,
    mode: str = "live",
    interrupt_every: int = 3,
    load: bool = False,
    hosts: Sequence[str] | None = ("127.0.0.1",),  # ICE host addresses (None: every one)
    record_face: bool = False,
    audio_buffer: int = AUDIO_PREFETCH,
    progress: Callable[[str], None] | None = None,
    label: str = "",
    idle_every: int = 0,
    idle_s: float = 8.0,
) -> SessionResult:
    """One session as a user would hold it; returns the raw measurements.

    ``live``: the speech goes out on the client's audio track in real time, like a
    microphone. ``push``: each clip is posted whole, ahead of playout, like a TTS
    front-end; its latency counts from the post. A ``load`` session decodes nothing while
    it runs (see ``AvatarClient``'s ``decode_video`` and ``decode_audio``): it has no mouth
    figures, and its audio is decoded after it closed, as a receiver holding
    ``audio_buffer`` packets back would have played it. ``idle_every``: after every so many
    clips the session idles ``idle_s`` longer (a listening avatar).
    """
    clip_s = len(speech) / MIC_RATE
    script = Script(mode=mode)
    client = AvatarClient(url, record_mouth=not load, record_face=record_face and not load,
                          ice_host_addresses=list(hosts) if hosts else None,
                          decode_video=not load, decode_audio=not load,
                          audio_prefetch=audio_buffer)
    try:
        await client.connect()
        t0 = time.perf_counter()
        await asyncio.sleep(IDLE_S)
        n = 0
        while time.perf_counter() - t0 + clip_s + PAUSE_S <= duration:
            n += 1
            cut = interrupt_every > 0 and n % interrupt_every == 0
            start = time.perf_counter()
            if mode == "push":
                await client.push_speech(speech, MIC_RATE, end=True)
            else:
                client.mic.play(speech)
            script.clips.append((start, clip_s, cut))
            if cut:
                await asyncio.sleep(min(1.0, clip_s / 3))
                if not load:  # (a load session cannot tell: it decodes nothing)
                    await _until_loud(client, timeout=min(1.5, clip_s / 2))
                client.mic.play(np.zeros(0, np.int16))  # the speaker stops...
                script.interrupts.append(client.interrupt())  # ...and barges in
                await asyncio.sleep(PAUSE_S)
            else:
                await asyncio.sleep(clip_s + PAUSE_S)
            if idle_every and n % idle_every == 0:
                await asyncio.sleep(min(idle_s, max(0.0, duration - (time.perf_counter() - t0)
                                                    - clip_s - PAUSE_S)))
            if progress:
                progress(f"{label}{time.perf_counter() - t0:5.1f}/{duration:.0f} s, "
                         f"{len(client.received.video_t)} frames")
        script.end = time.perf_counter()
    finally:
        try:
            await asyncio.wait_for(client.close(), 20)
        except asyncio.TimeoutError:
            print(f"bench: {label}a session took over 20 s to close", file=sys.stderr)
    if load:
        client.received.decode_packets(audio_buffer)
    return measure(client, script, speech)


async def _until_loud(client: AvatarClient, timeout: float) -> None:
    """Barge in mid-word, not in a pause, so the figure counts speech that was playing."""
    audio = client.received.audio
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if audio and float(np.sqrt(np.mean(audio[-1] ** 2))) > 8 * QUIET_RMS:
            return
        await asyncio.sleep(0.005)


def measure(client: AvatarClient, script: Script, speech: np.ndarray) -> SessionResult:
    rec = client.received
    if script.mode == "push":  # the reference is each clip placed at its post
        sent_t, sent_env = _clips_envelope(script, speech)
    else:  # exactly what the microphone track sent, when it sent it
        sent_t, sent_env = A.signal_envelope(client.mic.sent_t0 or 0.0, client.mic.sent,
                                             MIC_RATE)
    recv_t, recv_env = A.frame_envelope(rec.audio_t, rec.audio, MIC_RATE)
    start, stop = (sent_t[0], script.end) if len(sent_t) else (0.0, 0.0)
    grid = np.arange(start, stop, A.HOP_S)
    sent = A.smooth(A.on_grid(sent_t, sent_env, start, stop))
    recv = A.smooth(A.on_grid(recv_t, recv_env, start, stop))
    # A/V offset and lip sync are judged at network arrival: this client's own jitter
    # buffers hold audio back longer than video, which a lip-syncing receiver undoes
    net_t, net_env = A.frame_envelope(rec.audio_net_t, rec.audio, MIC_RATE)
    recv_net = A.smooth(A.on_grid(net_t, net_env, start, stop))
    mouth_signal = mouth_openness(rec.mouth)
    lips_signal = _rig_openings(rec.faces) if rec.faces else None
    mouth = mouth_net = None
    if len(mouth_signal):
        mouth = A.smooth(A.on_grid(np.asarray(rec.video_t), mouth_signal, start, stop))
        mouth_net = A.smooth(A.on_grid(np.asarray(rec.video_net_t), mouth_signal, start, stop))
    echo, mouth_w, offsets = [], [], []
    for a, b in _speech_windows(script):
        i0, i1 = (int(i) for i in np.searchsorted(grid, [a, b]))
        lag, r = A.window_lag(sent, recv, i0, i1, max_lag_s=1.0)
        if np.isfinite(lag) and r >= 0.5:
            echo.append((a, lag, r))
        if mouth is None or mouth_net is None:
            continue
        mlag, mr = A.window_lag(sent, mouth, i0, i1, max_lag_s=1.0)
        if np.isfinite(mlag) and mr >= 0.3:
            mouth_w.append((a, mlag, mr))
        alag, ar = A.window_lag(sent, recv_net, i0, i1, max_lag_s=1.0)
        vlag, vr = A.window_lag(sent, mouth_net, i0, i1, max_lag_s=1.0)
        if np.isfinite(alag) and np.isfinite(vlag) and ar >= 0.5 and vr >= 0.5:
            offsets.append(alag - vlag)
    vt = np.asarray(rec.video_t)
    played = vt[vt <= script.end] if script.end else vt  # not the closing's last frames
    intervals = np.diff(played).tolist() if len(played) > 1 else []
    lips = None
    if lips_signal is not None and len(echo):
        # the face rig's lip gap on each received frame, as lipsync measures rendered clips
        valid = np.isfinite(lips_signal)
        lips_net = A.smooth(A.on_grid(np.asarray(rec.video_net_t)[valid], lips_signal[valid],
                                      start, stop))
        lips = A.best_lag(recv_net, lips_net, max_lag_s=0.3, min_lag_s=-0.3)
    whole = A.best_lag(sent, recv, max_lag_s=1.0) if len(sent) else (float("nan"),) * 2
    return SessionResult(
        connect_s=(client.first_frame_at or float("nan")) - (client.connect_started or 0.0),
        echo=echo,
        mouth=mouth_w,
        av_offset=offsets,
        frame_intervals=intervals,
        pts_monotonic=bool(np.all(np.diff(rec.video_pts) > 0)),
        fps=rec.fps(until=script.end or None),
        interrupt_to_silence=_interrupt_delays(rec.audio_t, rec.audio, script.interrupts),
        interrupt_to_silence_net=_interrupt_delays(rec.audio_net_t, rec.audio,
                                                   script.interrupts),
        lipsync_r=lips[1] if lips else None,
        lipsync_lag_s=lips[0] if lips else None,
        speech_r=whole[1] if np.isfinite(whole[1]) else None,
        video_kbps=video_bitrate(rec.video_packets, start),
        timeline={
            "t0": start, "grid_hop_s": A.HOP_S, "sent_envelope": sent.tolist(),
            "received_envelope": recv.tolist(),
            "mouth": mouth.tolist() if mouth is not None else [],
            "video_t": (vt - start).tolist(), "video_key": list(rec.video_key),
            "end": script.end,  # the script's end (perf_counter): closing comes after
            "clips": [(c[0] - start, c[1], c[2])
                                                         for c in script.clips],
            "interrupts": [t - start for t in script.interrupts],
        },
    )


def video_bitrate(packets: list[tuple[float, int, int]], start: float, bin_s: float = 1.0
                  ) -> list[tuple[float, float, float]]:
    """Per ``bin_s``: (bin start from ``start``, kbps received, kbps sent). The sender's
    packets in a bin are told by how far the highest sequence number moved; each is
    counted at the bin's mean received size (lost packets are as big as the others)."""
    if not packets:
        return []
    t = np.array([p[0] for p in packets]) - start
    seq = np.array([p[1] for p in packets], dtype=np.int64)
    seq = seq[0] + np.cumsum(np.r_[0, (np.diff(seq) + 32768) % 65536 - 32768])  # unwrap
    size = np.array([p[2] for p in packets], dtype=np.float64)
    out = []
    top = int(seq[0]) - 1
    for b in range(int(max(t[0], 0) // bin_s), int(t[-1] // bin_s) + 1):
        inside = (t >= b * bin_s) & (t < (b + 1) * bin_s)
        if not inside.any():
            out.append((b * bin_s, 0.0, 0.0))
            continue
        new_top = max(top, int(seq[inside].max()))
        sent = (new_top - top) * size[inside].mean()
        top = new_top
        out.append((b * bin_s, size[inside].sum() * 8 / 1000 / bin_s, sent * 8 / 1000 / bin_s))
    return out


def mouth_openness(crops: list[np.ndarray]) -> np.ndarray:
    """How open the mouth looks per frame: the darkness of the mouth box.

    An open mouth shows a dark interior in any engine; the face rig's lip distance is the
    finer measure (``lipsync``), this one is cheap enough for every frame of every session.
    """
    if not crops:
        return np.zeros(0)
    return np.array([255.0 - float(np.percentile(c, 10)) for c in crops])


def _clips_envelope(script: Script, speech: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The reference for pushed speech: each clip's envelope from the moment it was posted."""
    _, env = A.signal_envelope(0.0, speech, MIC_RATE)
    ts, ys = [], []
    for start, _, _ in script.clips:
        ts.append(start + np.arange(len(env)) * A.HOP_S)
        ys.append(env)
    if not ts:
        return np.zeros(0), np.zeros(0)
    return np.concatenate(ts), np.concatenate(ys)


def _rig_openings(faces: list[np.ndarray]) -> np.ndarray:
    """Inner-lip gap per received frame, from the face rig (see ``lipsync``)."""
    from avatar_stream.bench.lipsync import mouth_openings

    return mouth_openings(np.repeat(f[:, :, None], 3, axis=2) for f in faces)


def _speech_windows(script: Script, width: float = 2.5, hop: float = 0.5
                    ) -> list[tuple[float, float]]:
    """Sliding windows over the clips that played to the end (barge-ins excluded)."""
    out = []
    for start, length, cut in script.clips:
        if cut:
            continue
        a = start - 0.2
        while a + width <= start + length + 0.3:
            out.append((a, a + width))
            a += hop
    return out


def _interrupt_delays(times: list[float], frames: list[np.ndarray], interrupts: list[float]
                      ) -> list[float]:
    """Per barge-in: when the received speech went silent for good (until the next clip)."""
    out = []
    t = np.asarray(times)
    levels = np.array([float(np.sqrt(np.mean(f.astype(np.float64) ** 2))) for f in frames])
    for ti in interrupts:
        idx = np.nonzero((t >= ti) & (t < ti + PAUSE_S - 0.1))[0]
        if len(idx) == 0:
            continue
        loud = idx[levels[idx] > QUIET_RMS]
        first_quiet = idx[0] if len(loud) == 0 else loud[-1] + 1
        if first_quiet < len(t):
            out.append(float(t[first_quiet] - ti))
    return out


# the bench's own servers: room for every level of --find-capacity, and no per-address
# creation limit (every session comes from this one address, dozens of them a minute)
MAX_SESSIONS = 64
SERVER_OPTIONS = ("--max-sessions", str(MAX_SESSIONS), "--sessions-per-ip", "0")


@contextlib.asynccontextmanager
async def server_or_url(
    url: str | None, engine: str, host_addresses: list[str], own_process: bool = False,
    workers: str = "auto",
) -> AsyncIterator[str]:
    """The given server, or the real server started on loopback: in this process, or in a
    process of its own (so that measuring many sessions does not share one interpreter
    lock between the server and its clients, as it never would in deployment)."""
    if url:
        yield url
        return
    if own_process:
        async with _server_process(engine, host_addresses, workers) as local_url:
            yield local_url
        return
    from avatar_stream.transports.http.app import running_server

    config = ServerConfig(host="127.0.0.1", port=0, engine=engine,
                          ice_host_addresses=host_addresses, max_sessions=MAX_SESSIONS,
                          sessions_per_ip_per_minute=0)
    async with running_server(config) as (local_url, _):
        yield local_url


@contextlib.asynccontextmanager
async def _server_process(engine: str, host_addresses: list[str], workers: str = "auto"
                          ) -> AsyncIterator[str]:
    with socket.socket() as s:  # a free port (the server binds it right after)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "avatar_stream", "serve", "--port", str(port),
        "--engine", engine, *SERVER_OPTIONS,
        "--ice-host-addresses", ",".join(host_addresses), "--workers", workers,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(1800):  # its worker processes load the engine first
                if proc.returncode is not None:
                    raise RuntimeError("the server process exited at start-up")
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"{url}/healthz") as r:
                        if r.status == 200:
                            break
                await asyncio.sleep(0.1)
            else:
                raise RuntimeError("the server process did not come up in 180 s")
        yield url
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()


async def run_sessions(url: str, speech: np.ndarray, n: int, args: argparse.Namespace,
                       measured: int = 1,
                       clients: tuple[ProcessPoolExecutor, int] | None = None,
                       server_apart: bool = True, server_pid: int | None = None,
                       ) -> tuple[list[SessionResult], CpuShare | None]:
    """``n`` sessions at once; their results, and how busy the machine was meanwhile.

    The first ``measured`` sessions are measured fully (video decoded: mouth latency, A/V
    offset, lip sync); the others are load sessions, which decode nothing while they run
    (video frames counted off their RTP marker bits, audio kept as Opus packets and
    decoded afterwards for the echo latency), so that the clients cost the machine little
    and the figures are the server's. With ``clients`` (a pool and its size), the sessions
    are spread over its processes, as many users' clients never share one interpreter;
    otherwise they all run here. ``server_apart``: the server runs in processes of its own
    (``server_pid``, or whichever listens on the URL's port), whose CPU time is reported
    beside the clients'."""
    server = client = None
    pid = None
    if server_apart:
        pid = server_pid or listening_pid(urlsplit(url).port or 80)
        if pid is not None:
            server, client = split_meters(pid, lambda: clients[0]._processes if clients else [])
    for meter in (server, client):
        if meter:
            meter.start()
    profile = getattr(args, "profile", None)
    if profile is not None and n > 1 and getattr(args, "find_capacity", False):
        profile = profile.with_name(f"{profile.stem}-{n}{profile.suffix}")
    with CpuMeter() as cpu, profiled(pid, profile):
        if clients is None:
            results = await _sessions(url, speech, range(n), n, args, measured)
        else:
            pool, size = clients
            k = min(n, size)
            loop = asyncio.get_running_loop()
            parts = await asyncio.gather(*(
                loop.run_in_executor(pool, _sessions_in_process, url, speech,
                                     range(i, n, k), n, args, measured)
                for i in range(k)
            ))
            results = [r for part in parts for r in part]
    if cpu.share is not None:
        cpu.share.sessions = n
        if server is not None and client is not None:
            cpu.share.server_cores, cpu.share.client_cores = server.stop(), client.stop()
    return results, cpu.share


async def _sessions(url: str, speech: np.ndarray, which: range, n: int,
                    args: argparse.Namespace, measured: int) -> list[SessionResult]:
    show = progress_printer()
    return list(await asyncio.gather(*(
        run_session(url, speech, args.duration, mode=args.mode,
                    interrupt_every=args.interrupt_every, load=i >= measured,
                    hosts=parse_addresses(args.ice_host_addresses),
                    audio_buffer=args.audio_buffer,
                    # a soak's hours of face crops would not fit in memory
                    record_face=i == 0 and not getattr(args, "soak", 0),
                    idle_every=4 if getattr(args, "soak", 0) else 0,
                    progress=show if i == 0 else None,
                    label=f"[{n} session{'s' if n > 1 else ''}] ")
        for i in which
    )))


def _sessions_in_process(url: str, speech: np.ndarray, which: range, n: int,
                         args: argparse.Namespace, measured: int) -> list[SessionResult]:
    """A client process's share of the sessions."""
    return asyncio.run(_sessions(url, speech, which, n, args, measured))


@contextlib.contextmanager
def client_processes(enabled: bool) -> Iterator[tuple[ProcessPoolExecutor, int] | None]:
    """A process per core for many sessions' clients. Many sessions in one process share
    its interpreter lock, and the figures would be the bench's: 4 sessions' p95 echo
    latency measured 412 ms from one client process, 286 ms from two. The server gets
    processes of its own for the same reason (``server_or_url``)."""
    if not enabled:
        yield None
        return
    n = cores()
    with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn")) as pool:
        # start them (and their imports) now, not inside the first measurement
        list(pool.map(_client_process_ready, range(n)))
        yield pool, n


def _client_process_ready(_: int) -> int:
    return os.getpid()


def wait_healthy(url: str, timeout: float) -> None:
    """Until ``url``/healthz answers 200 (blocking: for a process of its own); TimeoutError
    with the last failure after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2) as r:
                if r.status == 200:
                    return
                last = f"HTTP {r.status}"
        except OSError as exc:  # refused while it starts; URLError is an OSError
            last = repr(exc)
        time.sleep(0.25)
    raise TimeoutError(f"{url}/healthz not 200 after {timeout:g} s ({last})")


def progress_printer(stream: Any = sys.stderr) -> Callable[[str], None]:
    last = [0.0]

    def show(message: str) -> None:
        now = time.perf_counter()
        if now - last[0] >= 1.0:
            last[0] = now
            print(f"  {message}", file=stream, flush=True)

    return show
