"""``avatar-stream bench``: latency, A/V sync, smoothness and capacity, as figures."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import av
import numpy as np
import soxr

from avatar_stream.bench import report
from avatar_stream.bench.machine import CpuMeter, CpuShare, server_cpu_seconds
from avatar_stream.bench.runner import SessionResult, progress_printer, run_session, server_or_url
from avatar_stream.client.avatarclient import AUDIO_PREFETCH, MIC_RATE
from avatar_stream.scale.capacity import cores
from avatar_stream.transports.webrtc.ice import parse_addresses

BENCH_TEXT = "Speech goes in, and a talking face comes out, with every word in sync."


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="measure latency, A/V sync, frame rate and capacity",
        description="Runs real WebRTC sessions against a server (or one started here on "
                    "loopback) and reports p50/p95/max of each figure.",
    )
    p.add_argument("--url", help="server to measure (default: start one in this process)")
    p.add_argument("--audio", type=Path, help="speech file (default: built-in espeak-ng speech)")
    p.add_argument("--mode", choices=["live", "push"], default="live",
                   help="live: speak over the client's audio track in real time; push: post "
                        "each clip ahead of playout, as a TTS front-end does")
    p.add_argument("--engine-only", action="store_true",
                   help="only time the engine's frames on one core (no WebRTC)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds per session")
    p.add_argument("--sessions", type=int, default=1, help="sessions at once")
    p.add_argument("--engine", default="warp", help="engine of the in-process server")
    p.add_argument("--baseline", action="store_true",
                   help="also measure the same path with no engine (the floor) and compare")
    p.add_argument("--find-capacity", action="store_true",
                   help="add sessions until p95 echo latency > 500 ms or a session < 24 fps")
    p.add_argument("--interrupt-every", type=int, default=3, metavar="N",
                   help="barge in on every Nth clip (0: never)")
    p.add_argument("--audio-buffer", type=int, default=AUDIO_PREFETCH, metavar="PACKETS",
                   help="20 ms audio packets each client holds back before playing: 2 is "
                        "what a browser holds on a clean link, aiortc's own receiver 4")
    p.add_argument("--ice-host-addresses", default="127.0.0.1",
                   help="ICE host addresses for the in-process server and the clients")
    p.add_argument("--json", type=Path, help="write every raw sample here")
    p.add_argument("--plot", type=Path, help="write latency distributions and a timeline (PNG)")


def load_speech(path: Path | None) -> np.ndarray:
    """48 kHz mono int16 speech from any audio file PyAV reads, or made with espeak-ng."""
    if path is None:
        if not shutil.which("espeak-ng"):
            raise SystemExit("bench: espeak-ng is not installed; pass --audio FILE")
        with tempfile.TemporaryDirectory() as tmp:
            wav = Path(tmp) / "speech.wav"
            subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(wav),
                            BENCH_TEXT], check=True)
            return load_speech(wav)
    try:
        with av.open(str(path)) as container:
            resampler = av.AudioResampler(format="s16", layout="mono", rate=MIC_RATE)
            chunks = [
                out.to_ndarray().reshape(-1)
                for frame in container.decode(audio=0)
                for out in resampler.resample(frame)
            ]
            chunks += [out.to_ndarray().reshape(-1) for out in resampler.resample(None)]
    except (av.error.FFmpegError, IndexError, OSError) as exc:
        raise SystemExit(f"bench: cannot read speech from {path}: {exc}") from None
    if not chunks:
        raise SystemExit(f"bench: {path} holds no audio")
    return np.concatenate(chunks).astype(np.int16)


async def run_sessions(url: str, speech: np.ndarray, n: int, args: argparse.Namespace,
                       record_mouth: bool = True,
                       clients: tuple[ProcessPoolExecutor, int] | None = None,
                       server_apart: bool = True,
                       ) -> tuple[list[SessionResult], CpuShare | None]:
    """``n`` sessions at once; their results, and how busy the machine was meanwhile.
    With ``clients`` (a pool and its size), the sessions are spread over its processes, as
    many users' clients never share one interpreter; otherwise they all run here.
    ``server_apart``: the server runs in processes of its own, whose CPU time it reports."""
    server_s = await server_cpu_seconds(url) if server_apart else None
    t = time.perf_counter()
    with CpuMeter() as cpu:
        if clients is None:
            results = await _sessions(url, speech, range(n), n, args, record_mouth)
        else:
            pool, size = clients
            k = min(n, size)
            loop = asyncio.get_running_loop()
            parts = await asyncio.gather(*(
                loop.run_in_executor(pool, _sessions_in_process, url, speech,
                                     range(i, n, k), n, args, record_mouth)
                for i in range(k)
            ))
            results = [r for part in parts for r in part]
    server_end = await server_cpu_seconds(url) if server_s is not None else None
    if (cpu.share is not None and server_s is not None and server_end is not None
            and server_end >= server_s):  # not when a worker process was started again
        cpu.share.server_cores = (server_end - server_s) / (time.perf_counter() - t)
    return results, cpu.share


async def _sessions(url: str, speech: np.ndarray, which: range, n: int,
                    args: argparse.Namespace, record_mouth: bool) -> list[SessionResult]:
    show = progress_printer()
    return list(await asyncio.gather(*(
        run_session(url, speech, args.duration, mode=args.mode,
                    interrupt_every=args.interrupt_every, record_mouth=record_mouth,
                    audio_buffer=args.audio_buffer,
                    record_face=record_mouth and i == 0, progress=show if i == 0 else None,
                    label=f"[{n} session{'s' if n > 1 else ''}] ")
        for i in which
    )))


def _sessions_in_process(url: str, speech: np.ndarray, which: range, n: int,
                         args: argparse.Namespace, record_mouth: bool) -> list[SessionResult]:
    """A client process's share of the sessions."""
    return asyncio.run(_sessions(url, speech, which, n, args, record_mouth))


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    speech = load_speech(args.audio)
    hosts = parse_addresses(args.ice_host_addresses) or []
    out: dict[str, Any] = {"speech_s": len(speech) / MIC_RATE, "duration_s": args.duration}
    if args.find_capacity:
        out["capacity"] = await find_capacity(args, speech, hosts)
        return out
    # one session shares this process with its server; several get processes of their own
    many = args.sessions > 1
    where = "own processes" if many else "in-process"
    print(f"bench: {args.sessions} session(s) x {args.duration:.0f} s "
          f"({'server ' + args.url if args.url else f'{args.engine} engine, {where}'})",
          file=sys.stderr)
    with client_processes(many) as clients:
        async with server_or_url(args.url, args.engine, hosts, own_process=many) as url:
            results, out["cpu"] = await run_sessions(url, speech, args.sessions, args,
                                                     clients=clients,
                                                     server_apart=many or bool(args.url))
        out["sessions"] = results
        out["summary"] = report.summarise(results)
        if args.baseline:
            print("bench: baseline (same path, no engine)", file=sys.stderr)
            async with server_or_url(None, "still", hosts, own_process=many) as url:
                base, out["baseline_cpu"] = await run_sessions(
                    url, speech, args.sessions, args, record_mouth=False, clients=clients,
                    server_apart=many)
            out["baseline_sessions"] = base
            out["baseline"] = report.summarise(base)
    return out


async def find_capacity(args: argparse.Namespace, speech: np.ndarray, hosts: list[str]
                        ) -> dict[str, Any]:
    levels: list[dict[str, Any]] = []
    capacity = 0
    async with server_or_url(args.url, args.engine, hosts, own_process=True) as url:
        workers = await session_processes(url)
        with client_processes(True) as clients:
            assert clients is not None
            print(f"  the server runs sessions in {workers} "
                  f"process{'es' if workers > 1 else ''}, the clients in {clients[1]}",
                  file=sys.stderr, flush=True)
            for n in (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16):
                results, cpu = await run_sessions(url, speech, n, args, record_mouth=False,
                                                  clients=clients)
                summary = report.summarise(results)
                echo_p95 = summary["echo latency"].get("p95", float("inf"))
                min_fps = min(r.fps for r in results)
                ok = echo_p95 <= 500 and min_fps >= 24
                levels.append({"sessions": n, "echo_p95_ms": echo_p95, "min_fps": min_fps,
                               "ok": ok, "cpu": cpu})
                print(f"  {n:2d} sessions: p95 echo {echo_p95:6.0f} ms, min fps {min_fps:5.1f} "
                      f"-> {'ok' if ok else 'over'}"
                      f"{'  (' + cpu.describe() + ')' if cpu else ''}",
                      file=sys.stderr, flush=True)
                if not ok:
                    break
                capacity = n
    return {"capacity": capacity, "levels": levels, "server_processes": workers,
            "client_processes": clients[1]}


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


async def session_processes(url: str) -> int:
    """How many processes the server runs sessions in (its worker processes, or itself)."""
    async with aiohttp.ClientSession() as http, http.get(f"{url}/readyz") as r:
        return int((await r.json()).get("workers", 1))


def engine_only(args: argparse.Namespace) -> int:
    """Frame time of the engine alone, single-threaded, on speech-like input."""
    from avatar_stream.avatars.photo import reference_image
    from avatar_stream.engines.registry import create_engine
    from avatar_stream.tools.render import measure_render_speed

    engine = create_engine(args.engine)
    avatar = engine.prepare(reference_image(None), "default")
    speech = load_speech(args.audio).astype(np.float32) / 32768.0
    speech16k = soxr.resample(speech, MIC_RATE, 16_000).astype(np.float32)
    seconds = max(args.duration, 1.0)
    reps = int(np.ceil(seconds * 16_000 / len(speech16k)))
    result = measure_render_speed(avatar, seconds, threads=1, engine=engine,
                                  speech=np.tile(speech16k, reps)[: int(seconds * 16_000)])
    print(f"{engine.name} engine, one core, {result['frames']} frames of speech:")
    print(f"  {result['ms_p50']:.2f} ms per frame p50, {result['ms_p95']:.2f} p95, "
          f"{result['ms_max']:.2f} max; {result['cpu_ms_per_frame']:.2f} ms CPU per frame")
    print(f"  {result['fps']:.0f} fps = {result['realtime_streams']:.1f} real-time streams "
          "per core")
    if args.json:
        report.write_json(args.json, {"engine_only": result})
    return 0


def main(args: argparse.Namespace) -> int:
    if args.engine_only:
        return engine_only(args)
    if not 1 <= args.audio_buffer <= 8:
        raise SystemExit("bench: --audio-buffer must be 1 to 8 packets")
    t = time.perf_counter()
    for name in ("avatar_stream", "aiohttp.access"):  # the report is the output
        logging.getLogger(name).setLevel(logging.WARNING)
    out = asyncio.run(bench(args))
    if "capacity" in out:
        cap = out["capacity"]
        print(f"\ncapacity: {cap['capacity']} concurrent sessions at >= 24 fps with p95 echo "
              f"latency <= 500 ms")
    else:
        print()
        print(report.table(out["summary"], out.get("baseline"),
                           title=f"{len(out['sessions'])} session(s), {args.duration:.0f} s each"))
        print(f"(heard: after the client's audio buffer of {args.audio_buffer} packets, "
              f"{20 * args.audio_buffer} ms)")
        for key, what in (("cpu", "this machine"), ("baseline_cpu", "during the baseline")):
            if out.get(key):
                print(f"{what}: {out[key].describe()}")
        if "baseline" in out:
            b, s = out["baseline"]["echo latency"], out["summary"]["echo latency"]
            if b.get("n") and s.get("n"):
                print(f"\necho latency over the floor: p50 +{s['p50'] - b['p50']:.0f} ms, "
                      f"p95 +{s['p95'] - b['p95']:.0f} ms")
    if args.json:
        report.write_json(args.json, out)
        print(f"raw samples: {args.json}")
    if args.plot and "sessions" in out:
        report.plot(args.plot, out["sessions"], out.get("baseline_sessions"))
        print(f"plot: {args.plot}")
    print(f"({time.perf_counter() - t:.0f} s)", file=sys.stderr)
    return 0
