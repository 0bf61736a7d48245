"""The browser benchmark (``bench --client chromium``): its estimators against series with
known delays, and a real run of headless Chromium against the real server."""

from __future__ import annotations

import argparse
import shutil

import numpy as np
import pytest

from avatar_stream.bench import analysis as A
from avatar_stream.bench import chromium, netns


def synthetic_page(speech: np.ndarray, echo_s: float, mouth_s: float) -> dict:
    """What the page would record if the avatar echoed the speech ``echo_s`` late (as heard)
    and showed its mouth open ``mouth_s`` late, with a 30 ms audio render lead and an audio
    clock 1000 s behind the page's."""
    rate, block = 48000, 512
    lead, clock_offset = 0.03, 1000.0
    loop = np.concatenate([speech.astype(np.float64) / 32768, np.zeros(int(1.5 * rate))])
    mic = np.tile(loop, 4)
    n = len(mic) // block
    ctx_t = 5.0 + np.arange(n) * block / rate  # audio clock of each block
    heard_t = ctx_t + clock_offset  # page time each block is heard
    mic_t = heard_t - lead
    mic_rms = np.sqrt(np.mean(mic[: n * block].reshape(n, block) ** 2, axis=1))
    # the echo: the microphone's block rendered at mic_t is heard at mic_t + echo_s
    remote_rms = np.interp(heard_t - echo_s, mic_t, mic_rms, left=0, right=0)
    audio = np.stack([ctx_t, mic_rms, remote_rms], axis=1).ravel().tolist()
    shown = np.arange(mic_t[0] + 0.5, mic_t[-1] - 0.5, 0.04)
    env_t, env = A.signal_envelope(mic_t[0], mic, rate)
    mouth = 40 + 150 * np.interp(shown - mouth_s, env_t, A.smooth(env) / env.max())
    frames = [[t * 1000, t * 1000, 0, 0, m] for t, m in zip(shown, mouth, strict=True)]
    clock = [[c, (c + clock_offset) * 1000, 0.01, 0.02] for c in ctx_t[::25]]
    return {"audio": audio, "frames": frames, "clock": clock, "inbound": {}}


def test_browser_figures_recover_known_delays(speech48k) -> None:
    fig = chromium.browser_figures(synthetic_page(speech48k[: 48000 * 3], 0.25, 0.12))
    print(fig)
    assert fig["speech_onsets"] >= 4
    assert abs(np.median(fig["echo_ms"]) - 250) <= 15
    assert abs(np.median(fig["mouth_latency_ms"]) - 120) <= 15
    assert abs(np.median(fig["av_offset_ms"]) - 130) <= 20  # audio 130 ms after the mouth
    assert 100 <= np.median(fig["mouth_onset_ms"]) <= 200
    assert abs(fig["fps"] - 25) < 0.1 and fig["freezes"] == 0
    assert abs(fig["render_lead_ms"] - 30) < 1


@pytest.mark.timeout(200)
@pytest.mark.skipif(netns.unavailable() is not None or not shutil.which("chromium"),
                    reason=f"{netns.unavailable() or 'no chromium'}")
def test_chromium_plays_the_session_and_is_measured(speech48k) -> None:
    args = argparse.Namespace(engine="warp", duration=16.0, netns_prefix="avb")
    out = chromium.chromium_bench(args, speech48k[: 48000 * 3], 48000)
    fig = out["browser"]
    print("\n".join(chromium.lines(fig)))
    assert netns.leftovers("avb") == []
    assert fig["fps"] > 20 and fig["speech_onsets"] >= 2
    # the avatar's speech came back and its mouth moved after each onset, in bounds a
    # shared 2-core machine keeps (the benchmark reports the figures)
    assert fig["echo_ms"] and 50 < np.median(fig["echo_ms"]) < 1000
    assert fig["mouth_onset_ms"] and 0 < np.median(fig["mouth_onset_ms"]) < 1000
    assert fig["av_offset_ms"] and abs(np.median(fig["av_offset_ms"])) < 300
    assert set(fig["jitter_buffer_ms"]) == {"audio", "video"}
    assert fig["cpu"]["server_cores"] > 0.02 and fig["cpu"]["browser_cores"] > 0.02
