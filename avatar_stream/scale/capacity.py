"""Admission: how many sessions this server takes, and the figures behind it.

A CPU engine scales with worker threads, so only ``--max-sessions`` limits it. A GPU engine
runs every session's steps on one device; it measures at warm-up how many frames a second
that device makes, and only as many sessions as get 25 of them each (all speaking at once)
are admitted. ``/readyz`` turns 503 when no slot is free (a load balancer then sends new
sessions elsewhere) and ``/metrics`` exports the same figures.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from avatar_stream.engines.base import Engine

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # "<quota> <period>" or "max <period>"


def cores() -> int:
    """The cores this process may use: its CPU set, lowered to a container's CPU quota
    (cgroup v2 ``cpu.max``). ``os.cpu_count()`` is the host's: a 2-core quota on a 64-core
    host that starts 63 compute threads runs them 30 at a time per core, far slower
    than 2."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    n = n or 1
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return n


def admission_limit(max_sessions: int, engine: Engine) -> int:
    """Sessions admitted at once: ``--max-sessions``, capped by what the device serves. An
    engine slower than real time still takes one session (it plays speech in bursts, the
    picture held between them: nothing is skipped), never none."""
    realtime = engine.realtime_sessions
    return max_sessions if realtime is None else min(max_sessions, max(1, realtime))


def capacity_info(engine: Engine | None, limit: int, active: int) -> dict[str, Any]:
    """The ``/readyz`` body's capacity part (``engine`` None: a front, whose workers tell)."""
    info: dict[str, Any] = {"sessions": active, "max_sessions": limit,
                            "free": max(0, limit - active)}
    if engine is not None and engine.step_fps is not None:
        info["step_fps"] = round(engine.step_fps, 1)
        info["realtime_sessions"] = engine.realtime_sessions
    return info


class CapacityCollector(Collector):
    """``avatar_sessions_max``, ``avatar_engine_step_fps``, ``avatar_engine_realtime_sessions``."""

    def __init__(self, engine: Callable[[], Engine | None], limit: Callable[[], int]) -> None:
        self._engine = engine
        self._limit = limit

    def collect(self) -> Iterator[Metric]:
        engine = self._engine()
        yield GaugeMetricFamily("avatar_sessions_max", "Sessions admitted at once (the lower "
                                "of --max-sessions and what the engine serves in real time).",
                                self._limit())
        if engine is not None and engine.step_fps is not None:
            yield GaugeMetricFamily("avatar_engine_step_fps", "Frames per second the engine's "
                                    "device makes, measured at warm-up.", engine.step_fps)
            yield GaugeMetricFamily("avatar_engine_realtime_sessions", "Sessions the device "
                                    "serves at 25 fps each.", engine.realtime_sessions or 0)
