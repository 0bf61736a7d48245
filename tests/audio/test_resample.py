import fractions

import av
import numpy as np

from avatar_stream.audio.gate import LiveSpeechGate
from avatar_stream.audio.resample import Resampler, frame_to_mono, pcm_to_float


def sine(freq: float, rate: int, seconds: float, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_packed_stereo_s16_is_downmixed() -> None:
    left = np.full(960, 16384, np.int16)
    right = np.zeros(960, np.int16)
    interleaved = np.stack([left, right], axis=1).reshape(1, -1)
    frame = av.AudioFrame.from_ndarray(interleaved, format="s16", layout="stereo")
    frame.sample_rate = 48000
    mono = frame_to_mono(frame)
    assert mono.shape == (960,)
    assert np.allclose(mono, 0.25)


def test_planar_float_is_downmixed() -> None:
    planes = np.stack([np.full(480, 0.5, np.float32), np.full(480, -0.1, np.float32)])
    frame = av.AudioFrame.from_ndarray(planes, format="fltp", layout="stereo")
    frame.sample_rate = 24000
    frame.time_base = fractions.Fraction(1, 24000)
    assert np.allclose(frame_to_mono(frame), 0.2)


def test_bad_floats_are_zeroed_and_clipped() -> None:
    x = pcm_to_float(np.array([np.nan, np.inf, -np.inf, 3.0, -0.5], np.float32))
    assert np.array_equal(x, np.array([0, 0, 0, 1, -0.5], np.float32))


def test_streaming_resample_keeps_length_pitch_and_level() -> None:
    src = sine(440, 48000, 1.0)
    resample = Resampler(16000)
    out = np.concatenate([resample(src[i : i + 960], 48000) for i in range(0, len(src), 960)])
    assert 16000 - 120 <= len(out) <= 16000  # soxr holds back only its short filter delay
    spectrum = np.abs(np.fft.rfft(out[2000:14000]))
    peak_hz = np.argmax(spectrum) * 16000 / 12000
    assert abs(peak_hz - 440) < 3
    assert abs(np.sqrt(np.mean(out[2000:14000] ** 2)) - 0.5 / np.sqrt(2)) < 0.01
    # streamed in chunks == resampled whole (no clicks at chunk boundaries)
    whole = Resampler(16000)(src, 48000)
    n = min(len(whole), len(out))
    assert np.max(np.abs(whole[: n - 100] - out[: n - 100])) < 1e-3


def test_gate_makes_utterances_and_drops_silence_outside_them() -> None:
    gate = LiveSpeechGate(hangover_s=0.1)
    quiet = np.zeros(320, np.float32)
    loud = sine(200, 16000, 0.02, 0.3)
    assert gate.feed(quiet, 0.0) == []
    pieces = gate.feed(loud, 0.0)
    assert [(u, len(s)) for u, s in pieces] == [("mic-1", 320)]
    # short pause inside the utterance is kept while the backlog is small
    assert [u for u, _ in gate.feed(quiet, 0.0)] == ["mic-1"]
    # ...and dropped when there is a backlog to catch up on
    assert gate.feed(quiet, 1.0) == []
    out = []
    for _ in range(5):
        out += gate.feed(quiet, 0.5)
    assert ("mic-1", None) in [(u, s) for u, s in out]  # ended after the hangover
    assert gate.feed(loud, 0.0)[0][0] == "mic-2"


def test_gate_cancel_drops_the_rest_of_the_utterance() -> None:
    gate = LiveSpeechGate(hangover_s=0.1)
    loud = sine(200, 16000, 0.02, 0.3)
    gate.feed(loud, 0.0)
    gate.cancel()
    assert gate.feed(loud, 0.0) == []
    for _ in range(6):
        assert gate.feed(np.zeros(320, np.float32), 0.0) == []
    assert gate.feed(loud, 0.0)[0][0] == "mic-2"


def test_flush_returns_what_the_filter_held_back() -> None:
    src = sine(300, 24000, 0.5)
    for quality in ("LQ", "HQ"):
        resample = Resampler(16000, quality)
        out = np.concatenate([resample(src[:4000], 24000), resample(src[4000:], 24000),
                              resample.flush()])
        assert abs(len(out) - len(src) * 2 // 3) <= 1, (quality, len(out))
        # a rate change mid-stream flushes the old rate's tail first
        first = resample(src, 24000)
        mixed = np.concatenate([first, resample(src, 48000), resample.flush()])
        assert abs(len(mixed) - (len(src) * 2 // 3 + len(src) // 3)) <= 2, len(mixed)
