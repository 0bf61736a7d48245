"""Estimators: loudness envelopes on a wall-clock grid and the lag between two of them.

Audio is compared by its loudness envelope, not its waveform: the speech comes back
resampled and through Opus, so samples do not match, but the envelope does.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

HOP_S = 0.01  # envelope grid
SMOOTH_S = 0.03  # envelopes are smoothed over this before comparing: the raw RMS
# ripples with the voice's pitch, and that ripple does not survive Opus and resampling


def frame_envelope(
    times: Sequence[float], frames: Sequence[np.ndarray], rate: int, hop_s: float = HOP_S
) -> tuple[np.ndarray, np.ndarray]:
    """RMS per ``hop_s`` of frames that each started at ``times[i]``; returns (t, rms)."""
    hop = int(rate * hop_s)
    ts: list[float] = []
    rms: list[float] = []
    for t, frame in zip(times, frames, strict=True):
        for j in range(len(frame) // hop):
            block = frame[j * hop : (j + 1) * hop].astype(np.float64)
            ts.append(t + j * hop_s)
            rms.append(float(np.sqrt(np.mean(block * block))))
    return np.asarray(ts), np.asarray(rms)


def signal_envelope(
    t0: float, samples: np.ndarray, rate: int, hop_s: float = HOP_S
) -> tuple[np.ndarray, np.ndarray]:
    """Envelope of a continuous signal whose first sample is at ``t0``."""
    hop = int(rate * hop_s)
    n = len(samples) // hop
    blocks = samples[: n * hop].astype(np.float64).reshape(n, hop)
    return t0 + np.arange(n) * hop_s, np.sqrt(np.mean(blocks * blocks, axis=1))


def on_grid(t: np.ndarray, y: np.ndarray, start: float, stop: float, hop_s: float = HOP_S
            ) -> np.ndarray:
    grid = np.arange(start, stop, hop_s)
    if len(t) == 0:
        return np.zeros(len(grid))
    order = np.argsort(t)
    return np.interp(grid, t[order], y[order], left=0.0, right=0.0)


def best_lag(
    reference: np.ndarray, delayed: np.ndarray, max_lag_s: float, hop_s: float = HOP_S,
    min_lag_s: float = 0.0,
) -> tuple[float, float]:
    """Lag (s) at which ``delayed`` best matches ``reference`` and the Pearson r there.

    Both are on the same grid; the whole overlap is compared at each lag.
    """
    lags = _lag_range(min_lag_s, max_lag_s, hop_s)
    return refine_peak(lags, np.array([_pearson(reference, delayed, lag) for lag in lags]), hop_s)


def window_lag(
    reference: np.ndarray, delayed: np.ndarray, i0: int, i1: int, max_lag_s: float,
    hop_s: float = HOP_S, min_lag_s: float = 0.0,
) -> tuple[float, float]:
    """Like ``best_lag`` for the window ``reference[i0:i1]`` only (one sample of a distribution)."""
    ref = reference[i0:i1]
    lags = _lag_range(min_lag_s, max_lag_s, hop_s)
    scores = np.full(len(lags), np.nan)
    for j, lag in enumerate(lags):
        a, b = i0 + lag, i1 + lag
        if a >= 0 and b <= len(delayed):
            scores[j] = pearson(ref, delayed[a:b])
    return refine_peak(lags, scores, hop_s)


def _lag_range(min_lag_s: float, max_lag_s: float, hop_s: float) -> np.ndarray:
    return np.arange(int(round(min_lag_s / hop_s)), int(round(max_lag_s / hop_s)) + 1)


def refine_peak(lags: np.ndarray, scores: np.ndarray, hop_s: float) -> tuple[float, float]:
    """The best-scoring lag, refined by a parabola through its neighbours (finer than the grid)."""
    if not np.isfinite(scores).any():
        return float("nan"), float("nan")
    i = int(np.nanargmax(scores))
    shift = 0.0
    if 0 < i < len(scores) - 1 and np.isfinite(scores[i - 1 : i + 2]).all():
        a, b, c = scores[i - 1], scores[i], scores[i + 1]
        denom = a - 2 * b + c
        if denom < 0:
            shift = 0.5 * (a - c) / denom
    return float((lags[i] + shift) * hop_s), float(scores[i])


def _pearson(ref: np.ndarray, sig: np.ndarray, lag: int) -> float:
    """r between ref[i] and sig[i + lag] over their overlap."""
    if lag >= 0:
        a, b = ref[: len(ref) - lag] if lag else ref, sig[lag:]
    else:
        a, b = ref[-lag:], sig[: len(sig) + lag]
    n = min(len(a), len(b))
    return pearson(a[:n], b[:n])


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r of two equal-length series; nan when too short or flat."""
    if len(a) < 10 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def echo_lag(
    sent_t0: float, sent: np.ndarray, sent_rate: int,
    recv_t: Sequence[float], recv: Sequence[np.ndarray], recv_rate: int,
    max_lag_s: float = 1.0,
) -> tuple[float, float]:
    """How much later the sent speech came back, and how well it matches (r)."""
    st, se = signal_envelope(sent_t0, sent, sent_rate)
    rt, re = frame_envelope(recv_t, recv, recv_rate)
    if len(st) == 0 or len(rt) == 0:
        return float("nan"), float("nan")
    start, stop = st[0], max(st[-1], rt[-1])
    return best_lag(
        smooth(on_grid(st, se, start, stop)), smooth(on_grid(rt, re, start, stop)), max_lag_s
    )


def smooth(envelope: np.ndarray, seconds: float = SMOOTH_S, hop_s: float = HOP_S) -> np.ndarray:
    width = max(1, int(round(seconds / hop_s)))
    return np.convolve(envelope, np.ones(width) / width, mode="same")


def mouth_motion(crops: Sequence[np.ndarray]) -> np.ndarray:
    """Per frame: mean absolute change of the mouth region from the previous frame."""
    out = np.zeros(len(crops))
    for i in range(1, len(crops)):
        out[i] = np.mean(np.abs(crops[i].astype(np.int16) - crops[i - 1].astype(np.int16)))
    return out
