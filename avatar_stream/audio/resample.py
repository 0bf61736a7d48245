"""Speech ingest: any audio (WebRTC frames, PCM at any rate) to 16 kHz float32 mono.

Resampling is soxr's streaming resampler, one per source, so chunk boundaries leave no
clicks. Live speech (a microphone track) is cut into utterances with an energy gate and a
hangover, so silence between utterances is not queued (the avatar idles instead) and the
queue's backlog can shrink in pauses.
"""

from __future__ import annotations

import av
import numpy as np
import soxr

from avatar_stream.engines.base import SAMPLE_RATE


def frame_to_mono(frame: av.AudioFrame) -> np.ndarray:
    """Decode a PyAV audio frame (packed or planar, int or float) to float32 mono."""
    data = frame.to_ndarray()
    channels = len(frame.layout.channels)
    if channels == 2 and data.dtype == np.int16 and not frame.format.is_planar:
        # what aiortc's Opus decoder gives, 50 times a second per session: the general
        # path below costs three times as much
        pairs = data.reshape(-1, 2)
        return (pairs[:, 0].astype(np.float32) + pairs[:, 1]) * np.float32(0.5 / 32768.0)
    if frame.format.is_planar:
        data = data.reshape(channels, -1)
    else:
        data = data.reshape(-1, channels).T
    samples = pcm_to_float(data)
    return samples.mean(axis=0, dtype=np.float32) if channels > 1 else samples[0]


def pcm_to_float(data: np.ndarray) -> np.ndarray:
    """Integer PCM to float32 in [-1, 1]; float input is passed through, NaN/inf zeroed."""
    if data.dtype == np.int16:
        return data.astype(np.float32) / 32768.0
    if data.dtype == np.int32:
        return (data.astype(np.float64) / 2147483648.0).astype(np.float32)
    if data.dtype == np.uint8:
        return (data.astype(np.float32) - 128.0) / 128.0
    out = np.asarray(data, dtype=np.float32)
    if not np.all(np.isfinite(out)):
        out = np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)
    return np.clip(out, -1.0, 1.0)


def float_to_s16(samples: np.ndarray) -> np.ndarray:
    return (np.clip(samples, -1.0, 1.0) * 32767.0).astype(np.int16)


class Resampler:
    """Streaming mono resampler to a fixed output rate; re-creates itself if the input rate changes.

    soxr's "LQ" holds back 6 ms (48 -> 16 kHz); "HQ" holds back 21 ms, on the way in and
    again on the way out. For speech in a live call the latency matters more than the
    last bit of stop-band rejection.
    """

    def __init__(self, out_rate: int = SAMPLE_RATE, quality: str = "LQ") -> None:
        self.out_rate = out_rate
        self.quality = quality
        self._in_rate: int | None = None
        self._stream: soxr.ResampleStream | None = None

    def __call__(self, samples: np.ndarray, in_rate: int) -> np.ndarray:
        samples = np.ascontiguousarray(samples, dtype=np.float32)
        if in_rate == self.out_rate:
            tail = self.flush()
            return np.concatenate([tail, samples]) if len(tail) else samples
        if in_rate != self._in_rate or self._stream is None:
            tail = self.flush()
            self._in_rate = in_rate
            self._stream = soxr.ResampleStream(in_rate, self.out_rate, 1, np.float32, self.quality)
            if len(tail):
                return np.concatenate([tail, self._stream.resample_chunk(samples)])
        return self._stream.resample_chunk(samples)

    def flush(self) -> np.ndarray:
        """The samples still held back (the end of a source); the next call starts afresh.

        Pushed speech ends at a known point: without this its last few milliseconds
        would stay inside the filter.
        """
        if self._stream is None:
            return np.zeros(0, np.float32)
        tail = self._stream.resample_chunk(np.zeros(0, np.float32), last=True)
        self._stream = None
        self._in_rate = None
        return np.asarray(tail, dtype=np.float32)
