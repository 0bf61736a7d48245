"""The lip-sync measurement: right sign and size of lag on known inputs, and the warp engine
within the issue's bounds on espeak-ng speech, while the same frames on shifted audio fail."""

from __future__ import annotations

import math

import numpy as np
import pytest
import soxr

from avatar_stream.avatars import facerig
from avatar_stream.avatars.photo import default_avatar_image
from avatar_stream.bench.lipsync import (
    MAX_ABS_LAG_S,
    MIN_R,
    loudness_envelope,
    measure_lipsync,
    mouth_openings,
)
from avatar_stream.engines import SAMPLE_RATE, SAMPLES_PER_FRAME, Avatar
from avatar_stream.engines.warp.engine import WarpEngine

RATE = 48_000


@pytest.fixture(scope="module")
def warp(tmp_path_factory: pytest.TempPathFactory) -> tuple[WarpEngine, Avatar]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(facerig.CACHE_DIR_ENV, str(tmp_path_factory.mktemp("rig-cache")))
        engine = WarpEngine()
        return engine, engine.prepare(default_avatar_image(), "grace")


def speak(warp: tuple[WarpEngine, Avatar], speech48k: np.ndarray, state: str = "idle",
          seed: int = 11) -> np.ndarray:
    """Mouth openings the face rig reads off the warp engine's frames for the test speech,
    spoken after 3 s in ``state`` (which the engine is still told while it speaks)."""
    engine, avatar = warp
    x = soxr.resample(speech48k.astype(np.float32) / 32768.0, RATE, SAMPLE_RATE)
    n = -(-len(x) // SAMPLES_PER_FRAME)
    x = np.pad(x, (0, n * SAMPLES_PER_FRAME - len(x))).astype(np.float32)
    stream = engine.open_stream(avatar, seed=seed)
    if state != "idle":
        stream.set_state(state)
        for _ in range(75):
            stream.step(None)
    frames = [stream.step(chunk)[0] for chunk in x.reshape(n, SAMPLES_PER_FRAME)]
    return mouth_openings(frames)


@pytest.fixture(scope="module")
def openings(warp: tuple[WarpEngine, Avatar], speech48k: np.ndarray) -> np.ndarray:
    return speak(warp, speech48k)


def test_warp_engine_is_in_sync(openings: np.ndarray, speech48k: np.ndarray) -> None:
    result = measure_lipsync(openings, None, speech48k, RATE)
    print(result)
    assert result.faces == result.frames  # the rig finds the face in every frame
    assert result.r >= MIN_R
    assert abs(result.lag_s) <= MAX_ABS_LAG_S
    assert result.ok


@pytest.mark.parametrize("state", ["thinking", "listening"])
def test_speech_after_a_turn_state_is_as_in_sync(warp, openings, speech48k, state) -> None:
    """The reply after thinking (or while the engine is still told to listen): the state
    eases out under the speech, and the mouth follows it as well as from idle."""
    idle = measure_lipsync(openings, None, speech48k, RATE)
    posed = measure_lipsync(speak(warp, speech48k, state), None, speech48k, RATE)
    print(f"from idle: {idle}; after {state}: {posed}")
    assert posed.ok
    # the face rig reads the same mouth a little differently on a head still turning back
    # (-0.01 to +0.01 over seeds here): not lower beyond that
    assert posed.r >= idle.r - 0.03
    assert abs(posed.lag_s - idle.lag_s) <= 0.02


@pytest.mark.parametrize("shift_s", [0.2, -0.2])
def test_shifted_audio_is_caught(openings: np.ndarray, speech48k: np.ndarray, shift_s: float):
    """The same frames against speech that plays ``shift_s`` later: the lag says so."""
    pad = np.zeros(int(abs(shift_s) * RATE), np.int16)
    shifted = np.concatenate([pad, speech48k]) if shift_s > 0 else speech48k[len(pad) :]
    result = measure_lipsync(openings, None, shifted, RATE)
    print(f"speech {shift_s * 1e3:+.0f} ms: {result}")
    assert not result.ok
    assert abs(result.lag_s + shift_s) < 0.04  # the mouth is early by the shift


def test_unrelated_audio_does_not_correlate(openings: np.ndarray, speech48k: np.ndarray):
    """Shifted by more than the lag search window (or reversed), nothing matches."""
    late = np.concatenate([np.zeros(RATE, np.int16), speech48k])
    for audio in (late, speech48k[::-1].copy()):
        result = measure_lipsync(openings, None, audio, RATE)
        print(result)
        assert result.r < 0.5 and not result.ok


def _synthetic_speech(seconds: float, rate: int, seed: int = 0) -> np.ndarray:
    """Noise bursts of random length and level: a loudness envelope with structure."""
    rng = np.random.default_rng(seed)
    out = []
    while sum(map(len, out)) < seconds * rate:
        n = int(rng.uniform(0.05, 0.4) * rate)
        level = rng.choice([0.0, 0.02, 0.1, 0.3])
        out.append((rng.standard_normal(n) * level).astype(np.float32))
    return np.concatenate(out)[: int(seconds * rate)]


def test_known_lag_on_irregular_frame_times() -> None:
    """Openings built from the loudness itself, shown 80 ms late at jittery times (as a
    received video is): the measure finds +80 ms and a near-perfect r."""
    speech = _synthetic_speech(8.0, 16_000)
    env = loudness_envelope(speech, 16_000)  # 5 ms grid
    rng = np.random.default_rng(1)
    times = np.cumsum(rng.uniform(0.03, 0.05, 190))
    openings = np.interp(times - 0.08 + 0.02, np.arange(len(env)) * 0.005, env)
    openings[::17] = np.nan  # frames without a face are skipped, not fatal
    result = measure_lipsync(openings, times, speech, 16_000)
    print(result)
    assert result.r > 0.9
    assert abs(result.lag_s - 0.08) < 0.012
    assert result.faces < result.frames


def test_degenerate_inputs() -> None:
    speech = _synthetic_speech(2.0, 16_000)
    flat = measure_lipsync(np.zeros(50), None, speech, 16_000)
    assert math.isnan(flat.r) and not flat.ok
    no_face = measure_lipsync(np.full(50, np.nan), None, speech, 16_000)
    assert no_face.faces == 0 and math.isnan(no_face.lag_s)
    with pytest.raises(ValueError):
        measure_lipsync(np.zeros(50), np.arange(49) / 25, speech, 16_000)


def test_frames_are_measured_directly() -> None:
    """Frames (not openings) in: the rig runs on them and finds the face in each."""
    still = [default_avatar_image()] * 30
    result = measure_lipsync(still, None, _synthetic_speech(1.2, 16_000), 16_000)
    assert result.frames == result.faces == 30
    assert not result.ok  # a still mouth does not follow speech
