"""The benchmark's estimators against ground truth, and a smoke run of the real command."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import time

import numpy as np
import pytest
from echo_peer import echo_peer

from avatar_stream.bench import analysis as A
from avatar_stream.bench.machine import CpuMeter
from avatar_stream.bench.runner import client_processes, run_session, run_sessions, server_or_url
from avatar_stream.client.avatarclient import AUDIO_PREFETCH
from avatar_stream.client.sessioncontrol import RequestError
from avatar_stream.config import ServerConfig
from avatar_stream.transports.http.app import running_server


def chunked(samples: np.ndarray, t0: float, rate: int = 48000, n: int = 960, jitter: float = 0.0,
            seed: int = 0):
    rng = np.random.default_rng(seed)
    frames = [samples[i : i + n] for i in range(0, len(samples) - n + 1, n)]
    times = [t0 + i * n / rate + rng.uniform(0, jitter) for i in range(len(frames))]
    return times, frames


def test_echo_lag_of_a_known_delay(speech48k) -> None:
    speech = speech48k.astype(np.float32) / 32768
    for delay in (0.0, 0.12, 0.35):
        times, frames = chunked(speech * 0.7, 10.0 + delay, jitter=0.01)
        lag, r = A.echo_lag(10.0, speech, 48000, times, frames, 48000)
        assert abs(lag - delay - 0.005) <= 0.02 and r > 0.9, (delay, lag, r)


def test_window_lag_finds_the_offset_of_each_window(speech48k) -> None:
    env_t, env = A.signal_envelope(0.0, speech48k.astype(np.float32), 48000)
    ref = A.smooth(env)
    delayed = np.concatenate([np.zeros(8), ref])  # 80 ms later
    i0, i1 = 50, 300
    lag, r = A.window_lag(ref, delayed, i0, i1, max_lag_s=0.5)
    assert abs(lag - 0.08) < 0.005 and r > 0.99


@pytest.mark.parametrize("audio_delay", [0.12])
async def test_bench_measures_a_peer_with_known_delays(speech48k, audio_delay) -> None:
    """Two peers differing only by a known echo delay (and a known A/V offset): the
    benchmark's figures must differ by that delay, within 20 ms."""
    clip = speech48k[: 48000 * 3]
    results = {}
    for delay in (0.0, audio_delay):
        async with echo_peer(audio_delay_s=delay, video_delay_s=0.0) as url:
            results[delay] = await run_session(url, clip, duration=13, interrupt_every=0)
    base, delayed = results[0.0], results[audio_delay]
    echo = {d: np.median([e[1] for e in r.echo]) for d, r in results.items()}
    mouth = {d: np.median([m[1] for m in r.mouth]) for d, r in results.items()}
    offset = {d: np.median(r.av_offset) for d, r in results.items()}
    print(f"echo {echo}, mouth {mouth}, A/V offset {offset}")
    assert len(base.echo) >= 5 and len(delayed.echo) >= 5
    assert abs((echo[audio_delay] - echo[0.0]) - audio_delay) <= 0.02
    # the video was not delayed: mouth latency unchanged, A/V offset grows by the delay
    assert abs(mouth[audio_delay] - mouth[0.0]) <= 0.02
    assert abs((offset[audio_delay] - offset[0.0]) - audio_delay) <= 0.02
    # with no injected offset the peer's audio and mouth leave together
    assert abs(offset[0.0]) <= 0.03


async def test_bench_measures_the_interrupt_delay_of_a_known_peer(speech48k) -> None:
    """Two peers that echo 300 ms late and, on a barge-in, drop what they hold at once or
    120 ms later: the measured interrupt -> silence delays must differ by 120 ms +- 20."""
    clip = speech48k[: 48000 * 3]
    cut = {}
    for delay in (0.0, 0.12):
        async with echo_peer(audio_delay_s=0.3, video_delay_s=0.0, cut_delay_s=delay) as url:
            result = await run_session(url, clip, duration=13, interrupt_every=1)
        assert len(result.interrupt_to_silence_net) >= 3, result.interrupt_to_silence_net
        cut[delay] = (np.median(result.interrupt_to_silence_net),
                      np.median(result.interrupt_to_silence))
    print(f"interrupt -> silence (network, heard): {cut}")
    for i in range(2):
        assert abs((cut[0.12][i] - cut[0.0][i]) - 0.12) <= 0.02
    # and the prompt peer falls silent well before the 300 ms of speech it held would end
    assert cut[0.0][0] < 0.1


def test_bench_command_smoke(tmp_path) -> None:
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    proc = subprocess.run(
        [sys.executable, "-m", "avatar_stream", "bench", "--duration", "14",
         "--interrupt-every", "2", "--json", str(out_json), "--plot", str(out_png)],
        capture_output=True, text=True, timeout=150,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "echo latency" in proc.stdout and "p95" in proc.stdout
    assert "/14 s" in proc.stderr  # progress while running
    data = json.loads(out_json.read_text())
    summary = data["summary"]
    assert 50 < summary["echo latency"]["p50"] < 600
    assert summary["received fps"]["p50"] > 20
    assert summary["interrupt->silence"]["n"] >= 1
    assert summary["interrupt->silence"]["max"] < 400
    assert 0 < data["cpu"]["busy"] <= 1 and 0 <= data["cpu"]["steal"] < 1
    assert "stolen by the host" in proc.stdout
    session = data["sessions"][0]
    assert session["pts_monotonic"] and len(session["echo"]) >= 3
    assert out_png.stat().st_size > 10_000 and out_png.read_bytes()[:4] == b"\x89PNG"


def test_cpu_meter_sees_this_process_working() -> None:
    with CpuMeter() as meter:
        end = time.process_time() + 0.4
        while time.process_time() < end:  # one core busy for 0.4 s of CPU time
            pass
    share = meter.share
    assert share is not None
    cores = os.cpu_count() or 1
    assert 0.25 / cores <= share.busy <= 1.0 and 0 <= share.steal < 1, share


async def test_sessions_spread_over_client_processes(speech48k) -> None:
    """find-capacity's clients: load sessions in other processes, which decode nothing while
    they run, measure what fully measured sessions do; the server's CPU (here, this
    process) and the clients' (the other processes) are told apart."""
    args = argparse.Namespace(duration=8.0, mode="live", interrupt_every=0,
                              audio_buffer=AUDIO_PREFETCH, ice_host_addresses="127.0.0.1")
    clip = speech48k[: 48000 * 3]
    async with server_or_url(None, "still", ["127.0.0.1"]) as url:
        with client_processes(True) as clients:
            assert clients is not None and clients[1] >= 1
            results, cpu = await run_sessions(url, clip, 3, args, measured=1, clients=clients)
    assert len(results) == 3 and cpu is not None and cpu.sessions == 3
    cores = os.cpu_count() or 1
    assert cpu.server_cores is not None and 0.01 < cpu.server_cores < cores, cpu
    assert cpu.client_cores is not None and 0.005 < cpu.client_cores < cores, cpu
    full, *load = results
    # only the first decoded its video (the still engine's mouth never moves: no latency)
    assert full.timeline["mouth"] and not any(r.timeline["mouth"] for r in load)
    for r in results:
        assert r.fps > 20 and len(r.echo) >= 2, (r.fps, r.echo)
        assert all(0.05 < lag < 0.6 for _, lag, _ in r.echo), r.echo
        assert r.pts_monotonic and r.interrupt_to_silence == []
    # a load session's echo (its packets decoded afterwards, played as a receiver holding
    # the same packets back) agrees with the decoding session's within a few packets
    full_echo = np.median([e[1] for e in full.echo])
    for r in load:
        assert abs(np.median([e[1] for e in r.echo]) - full_echo) < 0.06, (r.echo, full.echo)


async def test_a_session_refused_in_a_client_process_reaches_the_bench_as_it_was(
        speech48k) -> None:
    """A server's refusal inside a client process comes back whole (status and why), so
    --find-capacity stops at the server's limit instead of losing its process pool."""
    err = pickle.loads(pickle.dumps(RequestError(503, "server full (1 sessions)")))
    assert (err.status, err.message) == (503, "server full (1 sessions)")
    args = argparse.Namespace(duration=3.0, mode="live", interrupt_every=0,
                              audio_buffer=AUDIO_PREFETCH, ice_host_addresses="127.0.0.1")
    config = ServerConfig(host="127.0.0.1", port=0, engine="still", max_sessions=1,
                          ice_host_addresses=["127.0.0.1"])
    async with running_server(config) as (url, _):
        with client_processes(True) as clients:
            with pytest.raises(RequestError) as refused:
                await run_sessions(url, speech48k[: 48000 * 2], 2, args, measured=1,
                                   clients=clients)
    assert refused.value.status == 503 and "full" in refused.value.message
