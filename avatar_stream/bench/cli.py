"""``avatar-stream bench``: latency, A/V sync, smoothness and capacity, as figures."""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import av
import numpy as np
import soxr

from avatar_stream.bench import chromium, impaired, report, soak
from avatar_stream.bench.runner import client_processes, run_sessions, server_or_url
from avatar_stream.client.avatarclient import AUDIO_PREFETCH, MIC_RATE
from avatar_stream.client.sessioncontrol import RequestError
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
    p.add_argument("--workers", default="auto", metavar="N|auto",
                   help="worker processes of a server started here for several sessions "
                        "(serve's --workers)")
    p.add_argument("--baseline", action="store_true",
                   help="also measure the same path with no engine (the floor) and compare")
    p.add_argument("--find-capacity", action="store_true",
                   help="add sessions (from --sessions) until a session gets under --min-fps "
                        "or the p95 echo latency passes --max-echo-p95")
    p.add_argument("--min-fps", type=float, default=24.5, help="find-capacity's frame rate bound")
    p.add_argument("--max-echo-p95", type=float, default=300.0, metavar="MS",
                   help="find-capacity's echo latency bound (p95 over all sessions)")
    p.add_argument("--measured", type=int, default=1, metavar="N",
                   help="sessions measured fully (video decoded: mouth latency, A/V offset); "
                        "the others are load sessions that decode nothing while they run")
    p.add_argument("--interrupt-every", type=int, default=3, metavar="N",
                   help="barge in on every Nth clip (0: never)")
    p.add_argument("--audio-buffer", type=int, default=AUDIO_PREFETCH, metavar="PACKETS",
                   help="20 ms audio packets each client holds back before playing: 2 is "
                        "what a browser holds on a clean link, aiortc's own receiver 4")
    p.add_argument("--ice-host-addresses", default="127.0.0.1",
                   help="ICE host addresses for the in-process server and the clients")
    chromium.add_arguments(p)
    soak.add_arguments(p)
    impaired.add_arguments(p)
    p.add_argument("--json", type=Path, help="write every raw sample here")
    p.add_argument("--plot", type=Path, help="write latency distributions and a timeline (PNG)")
    p.add_argument("--profile", type=Path, metavar="SVG",
                   help="sample the server's processes with py-spy while the sessions run and "
                        "write a flame graph (with --find-capacity: one a level)")


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


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    speech = load_speech(args.audio)
    hosts = parse_addresses(args.ice_host_addresses) or []
    out: dict[str, Any] = {"speech_s": len(speech) / MIC_RATE, "duration_s": args.duration}
    if args.find_capacity:
        out["capacity"] = await find_capacity(args, speech, hosts)
        return out
    if args.soak:
        print(f"bench: soak, {args.sessions} session(s) x {args.soak:.0f} s", file=sys.stderr)
        with client_processes(True) as clients:
            async with server_or_url(args.url, args.engine, hosts, own_process=True,
                                     workers=args.workers) as url:
                out.update(await soak.soak(args, url, speech, clients))
        return out
    if impaired.wanted(args):
        if args.url:
            raise SystemExit("bench: an impaired network needs the server started here "
                             "(no --url)")
        out.update(await impaired.impaired_bench(args, speech))
        return out
    # one session shares this process with its server; several get processes of their own
    many = args.sessions > 1
    where = "own processes" if many else "in-process"
    print(f"bench: {args.sessions} session(s) x {args.duration:.0f} s "
          f"({'server ' + args.url if args.url else f'{args.engine} engine, {where}'})",
          file=sys.stderr)
    with client_processes(many) as clients:
        async with server_or_url(args.url, args.engine, hosts, own_process=many,
                                     workers=args.workers) as url:
            results, out["cpu"] = await run_sessions(url, speech, args.sessions, args,
                                                     measured=args.measured, clients=clients,
                                                     server_apart=many or bool(args.url))
        out["sessions"] = results
        out["summary"] = report.summarise(results)
        if args.baseline:
            print("bench: baseline (same path, no engine)", file=sys.stderr)
            async with server_or_url(None, "still", hosts, own_process=many) as url:
                base, out["baseline_cpu"] = await run_sessions(
                    url, speech, args.sessions, args, measured=0, clients=clients,
                    server_apart=many)
            out["baseline_sessions"] = base
            out["baseline"] = report.summarise(base)
    return out


CAPACITY_LEVELS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 14, 16, 20, 24, 32)


async def find_capacity(args: argparse.Namespace, speech: np.ndarray, hosts: list[str]
                        ) -> dict[str, Any]:
    """Add sessions until one gets under ``--min-fps`` or the p95 echo latency over all of
    them passes ``--max-echo-p95``: one session measured fully, the rest load sessions
    that decode nothing (so the clients' cost stays small beside the server's), the
    server's and the clients' CPU reported apart."""
    levels: list[dict[str, Any]] = []
    capacity = 0
    start = args.sessions if args.sessions > 1 else 1
    async with server_or_url(args.url, args.engine, hosts, own_process=True,
                                     workers=args.workers) as url:
        workers = await session_processes(url)
        with client_processes(True) as clients:
            assert clients is not None
            print(f"  the server runs sessions in {workers} "
                  f"process{'es' if workers > 1 else ''}, the clients in {clients[1]}",
                  file=sys.stderr, flush=True)
            for n in (n for n in CAPACITY_LEVELS if n >= start):
                try:
                    results, cpu = await run_sessions(url, speech, n, args,
                                                      measured=args.measured, clients=clients)
                except RequestError as exc:  # the server's own limit (its --max-sessions)
                    levels.append({"sessions": n, "refused": str(exc), "ok": False})
                    print(f"  {n:2d} sessions: the server refused one ({exc}) -> over",
                          file=sys.stderr, flush=True)
                    break
                summary = report.summarise(results)
                echo_p95 = summary["echo latency"].get("p95", float("inf"))
                min_fps = min(r.fps for r in results)
                ok = echo_p95 <= args.max_echo_p95 and min_fps >= args.min_fps
                levels.append({"sessions": n, "echo_p95_ms": echo_p95, "min_fps": min_fps,
                               "freezes": sum(r.freezes for r in results), "ok": ok,
                               "cpu": cpu, "summary": summary})
                print(f"  {n:2d} sessions: p95 echo {echo_p95:6.0f} ms, min fps {min_fps:5.1f}, "
                      f"{levels[-1]['freezes']} freezes -> {'ok' if ok else 'over'}"
                      f"{'  (' + cpu.describe() + ')' if cpu else ''}",
                      file=sys.stderr, flush=True)
                if not ok:
                    break
                capacity = n
    return {"capacity": capacity, "levels": levels, "server_processes": workers,
            "client_processes": clients[1], "min_fps": args.min_fps,
            "max_echo_p95_ms": args.max_echo_p95}


def capacity_lines(cap: dict[str, Any]) -> list[str]:
    """The capacity verdict, and what the server alone would hold at its measured cost."""
    lines = [f"capacity: {cap['capacity']} concurrent sessions at >= {cap['min_fps']:g} fps "
             f"with p95 echo latency <= {cap['max_echo_p95_ms']:g} ms"]
    costs = [(lv["sessions"], lv["cpu"].per_session(lv["cpu"].server_cores),
              lv["cpu"].client_cores, lv["cpu"].busy)
             for lv in cap["levels"] if lv.get("cpu") is not None and lv["cpu"].server_cores]
    if costs:
        n, each, client, busy = costs[-1]
        lines.append(
            f"at {n} sessions the server used {each:.3f} cores a session "
            f"(the clients {client:.2f} cores in all; the machine {100 * busy:.0f}% busy): "
            f"{cores()} cores hold about {cores() / each:.0f} sessions of server work alone")
    return lines


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


def chromium_main(args: argparse.Namespace, t: float) -> int:
    if impaired.wanted(args) or args.url or args.sessions != 1 or args.find_capacity:
        raise SystemExit("bench --client chromium: one session against a server started "
                         "here, on loopback (no --url, --sessions, --find-capacity or "
                         "impairments)")
    out = chromium.chromium_bench(args, load_speech(args.audio), MIC_RATE)
    print("\n".join(chromium.lines(out["browser"])))
    if args.json:
        report.write_json(args.json, out)
        print(f"raw samples: {args.json}")
    print(f"({time.perf_counter() - t:.0f} s)", file=sys.stderr)
    return 0


def main(args: argparse.Namespace) -> int:
    if args.engine_only:
        return engine_only(args)
    if not 1 <= args.audio_buffer <= 8:
        raise SystemExit("bench: --audio-buffer must be 1 to 8 packets")
    t = time.perf_counter()
    for name in ("avatar_stream", "aiohttp.access"):  # the report is the output
        logging.getLogger(name).setLevel(logging.WARNING)
    if args.client == "chromium":
        return chromium_main(args, t)
    out = asyncio.run(bench(args))
    if "capacity" in out:
        cap = out["capacity"]
        print()
        print("\n".join(capacity_lines(cap)))
    elif "soak" in out:
        print("\n".join(soak.lines(out["soak"])))
        if out.get("cpu"):
            print(f"this machine: {out['cpu'].describe()}")
    else:
        print()
        print(report.table(out["summary"], out.get("baseline"),
                           title=f"{len(out['sessions'])} session(s), {args.duration:.0f} s each"))
        print(f"(heard: after the client's audio buffer of {args.audio_buffer} packets, "
              f"{20 * args.audio_buffer} ms)")
        if "network" in out:
            print("\n".join(impaired.lines(out)))
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
    if args.plot and "soak" in out:
        soak.plot(args.plot, out)
    elif args.plot and "sessions" in out:
        report.plot(args.plot, out["sessions"], out.get("baseline_sessions"))
        print(f"plot: {args.plot}")
    print(f"({time.perf_counter() - t:.0f} s)", file=sys.stderr)
    return 0
