"""The benchmark over an impaired network: the server in one namespace, the clients in
another, the veth link between them spoilt as ``--loss``, ``--outage``, ``--rate`` and
``--delay``/``--jitter`` say (``netns.py`` tells how each is made here).

The clients run in processes that enter the clients' namespace before they open a socket;
this process stays outside, starts the server in its namespace, and takes the link down
and up again for an outage at a set time, on the same clock as the clients' records.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from avatar_stream.bench import netns, report
from avatar_stream.bench.runner import SERVER_OPTIONS, SessionResult, run_sessions, wait_healthy
from avatar_stream.scale.capacity import cores

SERVER_PORT = 8080
FREEZE_S = 0.2


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "impaired network (the server and the clients in two network namespaces joined by "
        "a veth pair; needs root)")
    g.add_argument("--loss", type=float, default=0.0, metavar="PERCENT",
                   help="drop this share of the UDP packets, both ways")
    g.add_argument("--outage", type=float, default=0.0, metavar="SECONDS",
                   help="drop everything for this long, --outage-at seconds into the run")
    g.add_argument("--outage-at", type=float, default=6.0, metavar="SECONDS",
                   help="when the outage starts (default 6 s: in the first clip's speech)")
    g.add_argument("--rate", metavar="RATE", help="cap each direction, e.g. 300kbit")
    g.add_argument("--delay", type=float, default=0.0, metavar="MS", help="one-way delay")
    g.add_argument("--jitter", type=float, default=0.0, metavar="MS",
                   help="+- this much on each packet's delay (packets stay in order)")
    g.add_argument("--netns-prefix", default=netns.DEFAULT_PREFIX,
                   help="prefix of the namespaces and interfaces made (with this process id)")


def wanted(args: argparse.Namespace) -> bool:
    return bool(args.loss or args.outage or args.rate or args.delay or args.jitter)


def describe(args: argparse.Namespace) -> str:
    parts = []
    if args.loss:
        parts.append(f"{args.loss:g} % loss each way")
    if args.outage:
        parts.append(f"a {args.outage:g} s outage at {args.outage_at:g} s")
    if args.rate:
        parts.append(f"{args.rate} each way")
    if args.delay or args.jitter:
        parts.append(f"{args.delay:g} +- {args.jitter:g} ms delay each way")
    return ", ".join(parts)


@contextlib.contextmanager
def clients_in(ns: str, n: int) -> Iterator[tuple[ProcessPoolExecutor, int]]:
    """Client processes that live in namespace ``ns``."""
    with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"),
                             initializer=netns.enter, initargs=(ns,)) as pool:
        list(pool.map(_ready, range(n)))
        yield pool, n


def _ready(_: int) -> None:
    return None


async def impaired_bench(args: argparse.Namespace, speech: np.ndarray) -> dict[str, Any]:
    out: dict[str, Any] = {"impairment": describe(args)}
    with netns.link(args.netns_prefix) as link, tempfile.TemporaryDirectory() as tmp:
        if args.loss:
            link.set_loss(args.loss)
        if args.rate:
            link.set_rate(args.rate)
        if args.delay or args.jitter:
            link.set_delay(args.delay, args.jitter)
        url = f"http://{link.server_ip}:{SERVER_PORT}"
        # each side in its namespace has one interface: ICE gathers on it, and on nothing
        # else that could leave the machine
        client_args = argparse.Namespace(**vars(args))
        client_args.ice_host_addresses = ""
        log = Path(tmp) / "server.log"
        with netns.serve_in(link.server_ns, link.server_ip, SERVER_PORT, args.engine, log,
                            *SERVER_OPTIONS) as server, \
                clients_in(link.client_ns, min(args.sessions, cores())) as clients:
            loop = asyncio.get_running_loop()
            try:
                await loop.run_in_executor(clients[0], wait_healthy, url, 180.0)
            except Exception as exc:
                tail = log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the server in {link.server_ns} did not come up: {exc}\n"
                                   f"{tail}") from None
            print(f"bench: {args.sessions} session(s) x {args.duration:.0f} s over "
                  f"{out['impairment']}", file=sys.stderr)
            outage: dict[str, float] = {}
            flap = asyncio.create_task(_outage(link, args, outage)) if args.outage else None
            try:
                results, out["cpu"] = await run_sessions(
                    url, speech, args.sessions, client_args, measured=args.measured,
                    clients=clients, server_pid=server.pid)
            finally:
                if flap is not None:
                    flap.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await flap
                    link.set_outage(False)
            out["dropped_packets"] = link.dropped()
    out["sessions"] = results
    out["summary"] = report.summarise(results)
    out["network"] = network_figures(results, outage, args)
    return out


async def _outage(link: netns.Link, args: argparse.Namespace, when: dict[str, float]) -> None:
    loop = asyncio.get_running_loop()
    await asyncio.sleep(args.outage_at)
    await loop.run_in_executor(None, link.set_outage, True)
    when["down"] = time.perf_counter()
    await asyncio.sleep(args.outage)
    await loop.run_in_executor(None, link.set_outage, False)
    when["up"] = time.perf_counter()


def network_figures(results: list[SessionResult], outage: dict[str, float],
                    args: argparse.Namespace) -> dict[str, Any]:
    """What the impairments did: freezes, the speech that came back, recovery after the
    outage, and the video bitrate the sender settled at."""
    out: dict[str, Any] = {}
    gaps = [max(r.frame_intervals, default=0.0) for r in results]
    out["freezes"] = sum(r.freezes for r in results)
    out["longest_gap_s"] = max(gaps, default=0.0)
    out["speech_r"] = [r.speech_r for r in results]
    if "up" in outage:
        resumed, keyframe = [], []
        for r in results:
            t0 = r.timeline.get("t0", 0.0)
            vt = np.asarray(r.timeline.get("video_t", []))
            keys = np.asarray(r.timeline.get("video_key", []), dtype=bool)
            up = outage["up"] - t0
            after = vt[vt >= up]
            resumed.append(float(after[0] - up) if len(after) else None)
            if len(keys) == len(vt):
                k = vt[(vt >= up) & keys]
                keyframe.append(float(k[0] - up) if len(k) else None)
        out["outage_s"] = outage["up"] - outage["down"]
        out["link_up_to_video_s"] = resumed
        out["link_up_to_keyframe_s"] = keyframe
    rates = []
    for r in results:
        kbps = r.video_kbps
        tail = [k for k in kbps[len(kbps) // 2:] if k[2] > 0]  # settled: the second half
        rates.append({
            "sent_kbps_second_half": float(np.mean([k[2] for k in tail])) if tail else None,
            "received_kbps_second_half": float(np.mean([k[1] for k in tail])) if tail else None,
        })
    out["video_bitrate"] = rates
    out["rate_cap"] = args.rate
    return out


def lines(out: dict[str, Any]) -> list[str]:
    net = out["network"]
    res = [f"network: {out['impairment']} ({out.get('dropped_packets', 0)} packets dropped "
           f"by the loss and outage rules)",
           f"  freezes (gaps > {FREEZE_S * 1000:.0f} ms): {net['freezes']}, longest gap "
           f"{net['longest_gap_s'] * 1000:.0f} ms"]
    rs = [r for r in net["speech_r"] if r is not None]
    if rs:
        res.append(f"  speech back: envelope r {min(rs):.2f} (worst session)")
    if "outage_s" in net:
        def ms(xs: list[float | None]) -> str:
            return ", ".join("never" if x is None else f"{x * 1000:.0f} ms" for x in xs)
        res.append(f"  after the {net['outage_s']:.1f} s outage: video again "
                   f"{ms(net['link_up_to_video_s'])} after link-up, the next keyframe "
                   f"{ms(net['link_up_to_keyframe_s'])}")
    for i, rate in enumerate(net["video_bitrate"]):
        if rate["sent_kbps_second_half"] is not None:
            cap = f" (cap {net['rate_cap']})" if net["rate_cap"] else ""
            sent, got = rate["sent_kbps_second_half"], rate["received_kbps_second_half"]
            res.append(f"  session {i + 1} video, second half: sent {sent:.0f} kbps, "
                       f"received {got:.0f} kbps{cap}")
    return res
