"""A soak: ``avatar-stream bench --soak 600 --sessions 6``.

Sessions held for the whole run, each speaking clip after clip with barge-ins and idle
stretches between (a listening avatar), while this process samples the server's
processes every few seconds: resident memory, open file descriptors, threads (from
``/proc``, over every process of the server) and the tasks alive on their event loops
(``avatar_event_loop_tasks`` on ``/metrics``). A leak shows as growth from the first minute
to the last; a server that degrades, as freezes or an echo latency that climbs minute by
minute. The sessions are load sessions (``--measured`` does not apply): they decode nothing
while they run, so hours of them fit in the client's memory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from avatar_stream.bench.machine import listening_pid, process_stats, process_tree
from avatar_stream.bench.runner import SessionResult, run_sessions

SAMPLE_EVERY_S = 5.0
WINDOW_S = 60.0  # "first minute" and "last minute"
SETTLE_S = 10.0  # the first minute starts once the sessions are up and their pools full


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--soak", type=float, default=0.0, metavar="SECONDS",
                   help="hold --sessions sessions this long (speech, barge-ins, idle) and "
                        "watch the server for growth (memory, fds, threads, tasks), freezes "
                        "and echo latency over time; --plot draws the timeline")


async def event_loop_tasks(http: aiohttp.ClientSession, url: str) -> int | None:
    try:
        async with http.get(f"{url}/metrics") as r:
            text = await r.text()
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return None
    values = [s.value for f in text_string_to_metric_families(text) for s in f.samples
              if s.name == "avatar_event_loop_tasks"]
    return int(sum(values)) if values else None


async def sample(url: str, pid: int, t0: float, into: list[dict[str, float]]) -> None:
    """Every SAMPLE_EVERY_S: the server's processes, summed, until cancelled."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        while True:
            stats = process_stats(process_tree(pid))
            row: dict[str, float] = {"t": time.perf_counter() - t0, **asdict(stats)}
            tasks = await event_loop_tasks(http, url)
            if tasks is not None:
                row["tasks"] = tasks
            into.append(row)
            await asyncio.sleep(SAMPLE_EVERY_S)


async def soak(args: argparse.Namespace, url: str, speech: np.ndarray,
               clients: Any) -> dict[str, Any]:
    pid = listening_pid(urlsplit(url).port or 80)
    if pid is None:
        raise SystemExit(f"bench --soak: no process of this machine listens at {url}")
    run_args = argparse.Namespace(**vars(args))
    run_args.duration = args.soak
    samples: list[dict[str, float]] = []
    t0 = time.perf_counter()
    watcher = asyncio.create_task(sample(url, pid, t0, samples))
    try:
        results, cpu = await run_sessions(url, speech, args.sessions, run_args, measured=0,
                                          clients=clients, server_pid=pid)
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    return {"samples": samples, "sessions": results, "cpu": cpu,
            "soak": soak_figures(samples, results, t0)}


def soak_figures(samples: list[dict[str, float]], results: list[SessionResult],
                 t0: float) -> dict[str, Any]:
    """First minute against last; freezes; echo latency minute by minute."""
    ends = [r.timeline["end"] - t0 for r in results if r.timeline.get("end")]
    if ends:  # the sessions' closing is not the steady state
        samples = [s for s in samples if s["t"] <= min(ends)] or samples
    out: dict[str, Any] = {"duration_s": samples[-1]["t"] if samples else 0.0}
    if samples:
        end = samples[-1]["t"]
        settle = min(SETTLE_S, end / 4)
        first = [s for s in samples if settle <= s["t"] <= settle + min(WINDOW_S, end / 2)]
        last = [s for s in samples if s["t"] >= max(end - WINDOW_S, end / 2)]
        for key in ("rss_bytes", "fds", "threads", "tasks", "processes"):
            a = [s[key] for s in first if key in s]
            b = [s[key] for s in last if key in s]
            if a and b:
                out[key] = {"first": float(np.mean(a)), "last": float(np.mean(b)),
                            "max": float(max(s[key] for s in samples if key in s))}
    out["freezes"] = sum(r.freezes for r in results)
    out["longest_gap_s"] = max((max(r.frame_intervals, default=0.0) for r in results),
                               default=0.0)
    minutes: dict[int, list[float]] = {}
    for r in results:
        for start, lag, _ in r.echo:
            minutes.setdefault(int((start - t0) // WINDOW_S), []).append(lag)
    out["echo_p95_ms_by_minute"] = [
        (m, float(np.percentile(v, 95) * 1000), len(v)) for m, v in sorted(minutes.items())]
    out["fps"] = [r.fps for r in results]
    return out


def lines(fig: dict[str, Any]) -> list[str]:
    out = [f"soak: {fig['duration_s']:.0f} s, server processes sampled every "
           f"{SAMPLE_EVERY_S:g} s (first minute -> last minute, max)"]
    units = {"rss_bytes": ("RSS", 1 / 2**20, "MB"), "fds": ("open fds", 1, ""),
             "threads": ("threads", 1, ""), "tasks": ("event-loop tasks", 1, ""),
             "processes": ("processes", 1, "")}
    for key, (name, scale, unit) in units.items():
        if key in fig:
            v = fig[key]
            out.append(f"  {name:17} {v['first'] * scale:8.1f} -> {v['last'] * scale:8.1f}"
                       f" (max {v['max'] * scale:.1f}) {unit}")
    out.append(f"  freezes (> 200 ms): {fig['freezes']}, longest gap "
               f"{fig['longest_gap_s'] * 1000:.0f} ms; fps min {min(fig['fps'], default=0):.1f}")
    echo = fig["echo_p95_ms_by_minute"]
    if echo:
        out.append("  echo p95 by minute: " + ", ".join(f"{p:.0f}" for _, p, _ in echo) + " ms")
    return out


def plot(path: Path, out: dict[str, Any]) -> None:
    """The soak's timeline: the server's resources, echo latency, frame gaps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = out["samples"]
    fig, axes = plt.subplots(4, 1, figsize=(11, 12), sharex=True)
    t = np.array([s["t"] for s in samples])
    axes[0].plot(t, [s["rss_bytes"] / 2**20 for s in samples])
    axes[0].set_ylabel("server RSS (MB)")
    for key in ("fds", "threads", "tasks"):
        axes[1].plot(t, [s.get(key, np.nan) for s in samples], label=key)
    axes[1].legend(loc="upper left")
    axes[1].set_ylabel("count")
    t0 = min((r.timeline.get("t0", 0.0) for r in out["sessions"]), default=0.0)
    for i, r in enumerate(out["sessions"]):
        e = np.array([(s, lag) for s, lag, _ in r.echo]) if r.echo else np.zeros((0, 2))
        if len(e):
            axes[2].plot(e[:, 0] - t0, e[:, 1] * 1000, ".", ms=3, label=f"session {i + 1}")
        vt = np.asarray(r.timeline.get("video_t", []))
        if r.timeline.get("end"):  # not the closing
            vt = vt[vt <= r.timeline["end"] - r.timeline["t0"]]
        if len(vt) > 1:
            axes[3].plot(vt[1:], np.diff(vt) * 1000, lw=0.5)
    axes[2].set_ylabel("echo latency (ms)")
    axes[3].axhline(200, color="red", ls=":", lw=0.8)
    axes[3].set_ylabel("frame interval (ms)")
    axes[3].set_xlabel("s")
    axes[0].set_title("soak: the server's resources, echo latency and frame gaps over time")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    print(f"plot: {path}", file=sys.stderr)
