"""The live speech gate: a microphone's continuous 16 kHz stream cut into utterances by
its energy, with a hangover so the pauses inside a sentence do not end it."""

from __future__ import annotations

import itertools

import numpy as np

from avatar_stream.engines.base import SAMPLE_RATE


def rms_dbfs(samples: np.ndarray) -> float:
    if len(samples) == 0:
        return -120.0
    rms = float(np.sqrt(np.mean(np.square(samples, dtype=np.float64))))
    return 20.0 * np.log10(max(rms, 1e-6))


class LiveSpeechGate:
    """Turns a continuous 16 kHz stream into utterances (energy gate with hangover).

    ``feed`` returns what to queue: ``(utterance_id, samples, ended)`` pieces. Silence
    outside an utterance is dropped; silence inside one is kept (pauses between words)
    unless the backlog is already above ``max_backlog_s``, so a slow start never turns
    into latency that lasts. After ``cancel()`` (barge-in) the rest of the current
    utterance is dropped until the speaker pauses.
    """

    def __init__(
        self,
        prefix: str = "mic",
        threshold_dbfs: float = -45.0,
        hangover_s: float = 0.4,
        max_backlog_s: float = 0.08,
    ) -> None:
        self.prefix = prefix
        self.threshold_dbfs = threshold_dbfs
        self.hangover_samples = int(hangover_s * SAMPLE_RATE)
        self.max_backlog_s = max_backlog_s
        self._ids = itertools.count(1)
        self.current: str | None = None
        self._quiet = 0  # samples of silence since the last loud block
        self._cancelled = False

    def feed(
        self, samples: np.ndarray, backlog_s: float
    ) -> list[tuple[str, np.ndarray | None]]:
        """Returns ``(utterance_id, samples)`` to push, or ``(utterance_id, None)`` to end it."""
        loud = rms_dbfs(samples) > self.threshold_dbfs
        out: list[tuple[str, np.ndarray | None]] = []
        if loud:
            self._quiet = 0
            if self.current is None and not self._cancelled:
                self.current = f"{self.prefix}-{next(self._ids)}"
        else:
            self._quiet += len(samples)
            if self._quiet >= self.hangover_samples:
                self._cancelled = False
                if self.current is not None:
                    out.append((self.current, None))
                    self.current = None
                return out
        if self.current is None:
            return out
        if loud or backlog_s < self.max_backlog_s:
            out.append((self.current, samples))
        return out

    def cancel(self) -> None:
        """Barge-in: the utterance being spoken is dropped until its speaker pauses."""
        if self.current is not None:
            self._cancelled = True
            self.current = None


def loudness(samples: np.ndarray, gate: LiveSpeechGate, range_db: float = 30.0) -> float:
    """How loud a voice is, 0..1: 0 at the gate's threshold, 1 ``range_db`` above it."""
    level = (rms_dbfs(samples) - gate.threshold_dbfs) / range_db
    return min(1.0, max(0.0, level))
