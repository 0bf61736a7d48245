"""Prometheus metrics (``GET /metrics``).

Per-session counters live in each session's ``SyncStats``; at scrape time they are summed
with the totals of sessions already gone, so nothing on the media path touches a lock.
Timings (engine step, encode) are histograms observed as they happen.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator
from dataclasses import fields
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from avatar_stream.core.synchronizer import SyncStats

if TYPE_CHECKING:
    from avatar_stream.core.session import Session

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_STEP_BUCKETS = (0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.5, 1.0, 2.0)
_ENCODE_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128)

# SyncStats fields exported as counters: field -> (metric name, help)
_COUNTERS = {
    "frames_generated": ("avatar_frames_generated", "Frames made by the engine."),
    "frames_sent": ("avatar_frames_sent", "Video frames handed to the encoder."),
    "frames_dropped": ("avatar_frames_dropped", "Frames made but dropped by a barge-in."),
    "underruns": ("avatar_pacer_underruns", "Frames not ready at their deadline."),
    "fillers": ("avatar_pacer_fillers", "Previous picture repeated because none came."),
    "speech_gaps": ("avatar_speech_gaps", "Steps that started before all their speech came."),
    "interrupts": ("avatar_interrupts", "Barge-ins."),
    "video_encoder_drops": ("avatar_encoder_dropped_video_frames",
                            "Video frames dropped because the encoder fell behind."),
    "audio_encoder_drops": ("avatar_encoder_dropped_audio_frames",
                            "Audio frames dropped because the encoder fell behind (0.5 s)."),
}


class Metrics:
    def __init__(self, sessions: Callable[[], Iterable[Session]]) -> None:
        self.registry = CollectorRegistry()
        self.engine_step = Histogram(
            "avatar_engine_step_seconds", "Engine step time (one step: 1 frame for warp).",
            buckets=_STEP_BUCKETS, registry=self.registry,
        )
        self.encode = Histogram(
            "avatar_encode_seconds", "Encode-and-send time per outgoing frame.", ["kind"],
            buckets=_ENCODE_BUCKETS, registry=self.registry,
        )
        self.refused = Counter(
            "avatar_sessions_refused", "Session requests refused because the server was full.",
            registry=self.registry,
        )
        self.errors = Counter(
            "avatar_errors", "Errors by kind (bad_request, offer, session, ...).", ["kind"],
            registry=self.registry,
        )
        self.retired = SyncStats()  # totals of sessions that have ended
        self.registry.register(_SessionCollector(sessions, self.retired))
        ProcessCollector(registry=self.registry)  # process_cpu_seconds_total, memory, fds

    def retire(self, stats: SyncStats) -> None:
        """Fold an ended session's counters into the totals."""
        for name in _COUNTERS:
            setattr(self.retired, name, getattr(self.retired, name) + getattr(stats, name))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _SessionCollector(Collector):
    def __init__(self, sessions: Callable[[], Iterable[Session]], retired: SyncStats) -> None:
        self._sessions = sessions
        self._retired = retired

    def collect(self) -> Iterator[Metric]:
        sessions = list(self._sessions())
        yield GaugeMetricFamily("avatar_sessions_active", "Sessions open now.", len(sessions))
        totals = {f.name: getattr(self._retired, f.name) for f in fields(SyncStats)}
        for s in sessions:
            if s.sync:
                for name in _COUNTERS:
                    totals[name] += getattr(s.sync.stats, name)
        for name, (metric, doc) in _COUNTERS.items():
            yield CounterMetricFamily(metric, doc, value=totals[name])
        queue = GaugeMetricFamily(
            "avatar_speech_queue_seconds", "Speech queued per session.", labels=["session"]
        )
        skew = GaugeMetricFamily(
            "avatar_av_skew_seconds",
            "Per session: how much longer the last video frame waited for the encoder than "
            "its audio (positive = video leaves late).",
            labels=["session"],
        )
        reserve = GaugeMetricFamily(
            "avatar_playout_reserve_seconds",
            "Per session: speech held back at an utterance's start, grown by late frames.",
            labels=["session"],
        )
        for s in sessions:
            queue.add_metric([s.id], s.speech.seconds)
            if s.transport is not None:
                skew.add_metric([s.id], s.transport.av_skew_s)
            if s.sync:
                reserve.add_metric([s.id], s.sync.reserve_s)
        yield queue
        yield skew
        yield reserve
        try:  # (the soak benchmark watches this for a leak)
            tasks = len(asyncio.all_tasks())
        except RuntimeError:  # collected off the event loop: nothing to count
            return
        yield GaugeMetricFamily("avatar_event_loop_tasks",
                                "Tasks alive on this process's event loop.", tasks)
