"""Measured lip sync: does the mouth in a video open when the speech is loud, and how late?

The measure is model-free and engine-free, so it grades the warp engine, FlashHead and the
video a browser received the same way: the face rig (MediaPipe's 468 landmarks) reads the
inner-lip gap off every frame, and that series is cross-correlated with the loudness
envelope of the speech over the same time span. The peak Pearson r says how well the mouth
follows the voice; the lag at the peak says by how much the picture is early or late.

Loudness is measured in decibels above a floor 40 dB under the clip's peak: mouths open in
proportion to perceived loudness, not to RMS amplitude (which one loud vowel dominates).
Each frame is compared with the loudness of the 40 ms of speech it shows (frame k of a
stream is made from the samples that play while it is on screen).

``lag_s > 0`` means the mouth moves after the sound (the video is late).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from avatar_stream.bench.analysis import pearson, refine_peak, signal_envelope
from avatar_stream.engines.base import FPS

HOP_S = 0.005  # loudness envelope grid, and the lag search step
FLOOR_DB = 40.0  # loudness range below the clip's peak that counts
MAX_LAG_S = 0.3  # search window: a late or early picture beyond this is "not in sync" anyway
#: bounds the warp engine is held to (issue 4): r at least this, |lag| at most this
MIN_R = 0.7
MAX_ABS_LAG_S = 0.04


@dataclass(frozen=True)
class LipSync:
    """The result: how well and how late the mouth follows the speech."""

    r: float  # Pearson r at the best lag (nan if it could not be measured)
    lag_s: float  # best lag, s; > 0 the mouth moves after the sound
    frames: int  # frames compared
    faces: int  # frames in which the rig found a face

    @property
    def ok(self) -> bool:
        """Within the bounds the warp engine must meet (``MIN_R``, ``MAX_ABS_LAG_S``)."""
        return self.r >= MIN_R and abs(self.lag_s) <= MAX_ABS_LAG_S

    def __str__(self) -> str:
        return (
            f"lip sync r={self.r:.2f} lag={self.lag_s * 1e3:+.0f} ms "
            f"({self.faces}/{self.frames} frames with a face)"
        )


def mouth_openings(frames: Iterable[np.ndarray]) -> np.ndarray:
    """Inner-lip gap / face height per RGB uint8 frame (nan where no face is found).

    Uses the process-wide rigger on this thread with tracking, as MediaPipe does on video:
    about one landmark pass (~1.5 ms) a frame. Tracking restarts for every call.
    """
    from avatar_stream.avatars.facerig import get_rigger  # loads the face models: only when used

    rigger = get_rigger()
    rigger.reset_tracking()
    out = []
    for frame in frames:
        value = rigger.mouth_opening(np.ascontiguousarray(frame))
        out.append(math.nan if value is None else value)
    rigger.reset_tracking()
    return np.asarray(out, dtype=np.float64)


def loudness_envelope(
    speech: np.ndarray, rate: int, hop_s: float = HOP_S, floor_db: float = FLOOR_DB
) -> np.ndarray:
    """Loudness per ``hop_s`` block: dB above (clip peak - ``floor_db``), never below 0."""
    x = np.asarray(speech, dtype=np.float64).reshape(-1)
    if np.issubdtype(np.asarray(speech).dtype, np.integer):
        x = x / 32768.0
    _, rms = signal_envelope(0.0, x, rate, hop_s)
    if len(rms) == 0:
        return np.zeros(0)
    db = 20.0 * np.log10(rms + 1e-9)
    return np.clip(db - (db.max() - floor_db), 0.0, None)


def _frame_loudness(
    envelope: np.ndarray, hop_s: float, starts: np.ndarray, duration: float
) -> np.ndarray:
    """Mean of ``envelope`` over [start, start + duration) per frame (0 outside the speech)."""
    cum = np.concatenate([[0.0], np.cumsum(envelope)])
    grid_end = len(envelope) * hop_s

    def integral(t: np.ndarray) -> np.ndarray:
        # the envelope's integral up to time t, linear inside a block
        pos = np.clip(t, 0.0, grid_end) / hop_s
        i = np.minimum(np.floor(pos).astype(int), len(envelope) - 1)
        i = np.maximum(i, 0)
        return (cum[i] + (pos - i) * envelope[i]) * hop_s

    return (integral(starts + duration) - integral(starts)) / duration


def measure_lipsync(
    frames_or_openings: Sequence[np.ndarray] | np.ndarray,
    frame_times: Sequence[float] | np.ndarray | None,
    speech: np.ndarray,
    rate: int,
    *,
    speech_t0: float = 0.0,
    max_lag_s: float = MAX_LAG_S,
) -> LipSync:
    """Peak cross-correlation between mouth opening and speech loudness, and its lag.

    ``frames_or_openings``: RGB uint8 frames (each (H, W, 3)), or mouth openings already
    measured (a 1-D array, e.g. from ``mouth_openings``; nan = no face). ``frame_times``:
    when each frame starts being shown, s, on the speech's clock (``speech_t0`` is when its
    first sample plays); None means a plain 25 fps stream starting with the speech.
    ``speech``: mono samples (float, or int16 PCM) at ``rate`` Hz.
    """
    data = frames_or_openings
    if isinstance(data, np.ndarray) and data.ndim == 1:
        openings = data.astype(np.float64)
    else:
        openings = mouth_openings(data)
    n = len(openings)
    times = (
        np.arange(n) / FPS if frame_times is None else np.asarray(frame_times, dtype=np.float64)
    )
    if len(times) != n:
        raise ValueError(f"{n} frames but {len(times)} frame times")
    faces = int(np.isfinite(openings).sum())
    duration = float(np.median(np.diff(times))) if n > 1 else 1.0 / FPS
    env = loudness_envelope(speech, rate)
    valid = np.isfinite(openings)
    if faces < 10 or len(env) == 0:
        return LipSync(math.nan, math.nan, n, faces)
    mouth = openings[valid]
    starts = times[valid] - speech_t0
    steps = np.arange(-int(round(max_lag_s / HOP_S)), int(round(max_lag_s / HOP_S)) + 1)
    # the mouth shown at t matches the sound at t - lag
    scores = np.array(
        [pearson(mouth, _frame_loudness(env, HOP_S, starts - k * HOP_S, duration)) for k in steps]
    )
    lag, r = refine_peak(steps, scores, HOP_S)
    return LipSync(r, lag, n, faces)
