"""Helpers for the pushed-speech tests: what came back for an utterance, and how well its
loudness envelope matches what was pushed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import soxr

from avatar_stream.bench.analysis import signal_envelope, smooth
from avatar_stream.client.avatarclient import Received
from avatar_stream.media import OUT_RATE


async def until(predicate: Callable[[], bool], timeout: float, step: float = 0.02) -> bool:
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if predicate():
            return True
        await asyncio.sleep(step)
    return predicate()


def at_rate(speech48k: np.ndarray, rate: int) -> np.ndarray:
    """The test speech (int16 48 kHz) as float at ``rate``."""
    x = speech48k.astype(np.float32) / 32768.0
    return x if rate == 48_000 else soxr.resample(x, 48_000, rate).astype(np.float32)


def envelope(samples: np.ndarray, rate: int) -> np.ndarray:
    return smooth(signal_envelope(0.0, np.asarray(samples, np.float32), rate)[1])


def envelope_match(reference: np.ndarray, ref_rate: int, got: np.ndarray, got_rate: int = OUT_RATE
                   ) -> tuple[float, float]:
    """Where in ``got`` the reference's envelope fits best: (offset s, Pearson r)."""
    ref, sig = envelope(reference, ref_rate), envelope(got, got_rate)
    if len(sig) < len(ref):
        sig = np.concatenate([sig, np.zeros(len(ref) - len(sig))])
    best = (float("nan"), -1.0)
    for lag in range(len(sig) - len(ref) + 1):
        window = sig[lag : lag + len(ref)]
        if window.std() == 0:
            continue
        r = float(np.corrcoef(ref, window)[0, 1])
        if r > best[1]:
            best = (lag * 0.01, r)
    return best


def events(rec: Received | list[tuple[float, dict[str, Any]]], kind: str | None = None,
           utterance_id: str | None = None) -> list[tuple[float, dict[str, Any]]]:
    rows = rec.events if isinstance(rec, Received) else rec
    return [(t, e) for t, e in rows
            if (kind is None or e.get("type") == kind)
            and (utterance_id is None or e.get("utterance_id") == utterance_id)]


def utterance_window(rec: Received, utterance_id: str) -> tuple[float, float, dict[str, Any]]:
    """(started time, finished time, finished event) of an utterance, as the client saw them."""
    (t0, _), = events(rec, "speech.started", utterance_id)
    (t1, fin), = events(rec, "speech.finished", utterance_id)
    return t0, t1, fin


def received_between(rec: Received, t0: float, t1: float) -> np.ndarray:
    """The avatar's audio that arrived in [t0, t1], in timestamp order."""
    rows = sorted((pts, a) for t, pts, a in zip(rec.audio_t, rec.audio_pts, rec.audio, strict=True)
                  if t0 <= t <= t1)
    return np.concatenate([a for _, a in rows]) if rows else np.zeros(0, np.float32)


async def ws_reply(ws: Any, timeout: float = 5.0) -> dict[str, Any]:
    """The next message on a speech WebSocket that answers this connection (ack, error,
    pong), skipping the session events that may arrive in between."""
    while True:
        message = await ws.receive_json(timeout=timeout)
        if not message["type"].startswith(("speech.", "session.", "state.")):
            return dict(message)


AUDIO_AFTER_EVENT_S = 0.6  # the audio of an event's frame arrives ~0.2 s after the event


async def wait_finished(rec: Received, utterance_id: str, timeout: float,
                        settle: float = AUDIO_AFTER_EVENT_S) -> dict[str, Any]:
    """The utterance's speech.finished, and (``settle``) time for its audio to arrive."""
    ok = await until(lambda: bool(events(rec, "speech.finished", utterance_id)), timeout)
    assert ok, f"no speech.finished for {utterance_id} in {timeout} s: {rec.events[-5:]}"
    await asyncio.sleep(settle)
    return events(rec, "speech.finished", utterance_id)[0][1]
