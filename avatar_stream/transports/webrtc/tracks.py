"""Outgoing media tracks fed by the session's synchronizer, through :class:`TrackSink`.

aiortc calls ``recv()`` as fast as it returns, so these tracks never make up timestamps or
pace themselves: the synchronizer puts each frame in at its deadline, already stamped, and
``recv()`` just waits for it. The queue is bounded and drops the oldest frame if the encoder
falls behind: tiny for video, so a slow consumer cannot turn into latency; longer for
audio, so a stall of the encoder delays speech instead of cutting it. Given an ``opus``
encoder (once Opus is negotiated), the audio track hands aiortc encoded packets.
"""

from __future__ import annotations

import asyncio
import fractions
import time
from collections import deque
from collections.abc import Callable

import av
import cv2
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from avatar_stream.media import FPS, FRAME_SIZE, OUT_RATE
from avatar_stream.transports.webrtc.encoders import OpusPacketEncoder

VIDEO_TIME_BASE = fractions.Fraction(1, 90_000)
VIDEO_PTS_PER_FRAME = 90_000 // FPS  # 3600
AUDIO_TIME_BASE = fractions.Fraction(1, OUT_RATE)
# speech must not be cut when sending stalls (seen: 100+ ms with busy cores), so the audio
# queue holds half a second; a skipped video frame is a lesser harm
AUDIO_QUEUE_FRAMES = 25  # 20 ms each
VIDEO_QUEUE_FRAMES = 2


class PacedTrack(MediaStreamTrack):
    def __init__(
        self,
        kind: str,
        maxlen: int = 2,
        on_consumed: Callable[[float], None] | None = None,
    ) -> None:
        super().__init__()
        self.kind = kind
        self._frames: deque[tuple[av.frame.Frame, float]] = deque(maxlen=maxlen)
        self._ready = asyncio.Event()
        self.dropped = 0
        self.sent = 0
        #: seconds the last frame waited between put() and aiortc taking it
        self.last_wait_s = 0.0
        # aiortc encodes and sends a frame between two recv() calls: that time is the
        # encode cost, reported through on_consumed
        self._on_consumed = on_consumed
        self._returned_at: float | None = None
        self.opus: OpusPacketEncoder | None = None

    def put(self, frame: av.frame.Frame) -> None:
        if len(self._frames) == self._frames.maxlen:
            self.dropped += 1
        self._frames.append((frame, time.perf_counter()))
        self._ready.set()

    def clear(self) -> None:
        self._frames.clear()

    async def recv(self) -> av.frame.Frame | av.Packet:
        if self._returned_at is not None and self._on_consumed is not None:
            self._on_consumed(time.perf_counter() - self._returned_at)
        while not self._frames:
            if self.readyState != "live":
                raise MediaStreamError
            self._ready.clear()
            await self._ready.wait()
        if self.readyState != "live":
            raise MediaStreamError
        frame, put_at = self._frames.popleft()
        self._returned_at = time.perf_counter()
        self.last_wait_s = self._returned_at - put_at
        self.sent += 1
        if self.opus is not None and isinstance(frame, av.AudioFrame):
            return self.opus.encode(frame)  # timed with aiortc's send, through on_consumed
        return frame

    def stop(self) -> None:
        super().stop()
        self._frames.clear()
        self._ready.set()  # wake a pending recv() so it raises


class TrackSink:
    """The session's media sink for WebRTC: a paced video and audio track, each frame
    stamped with the session clock's index (90 kHz video, 48 kHz audio timestamps)."""

    def __init__(
        self,
        on_video_sent: Callable[[float], None] | None = None,
        on_audio_sent: Callable[[float], None] | None = None,
        video_queue: int = VIDEO_QUEUE_FRAMES,
        audio_queue: int = AUDIO_QUEUE_FRAMES,
    ) -> None:
        self.video = PacedTrack("video", maxlen=video_queue, on_consumed=on_video_sent)
        self.audio = PacedTrack("audio", maxlen=audio_queue, on_consumed=on_audio_sent)

    def video_frame(self, rgb: np.ndarray) -> av.VideoFrame:
        return av.VideoFrame.from_ndarray(rgb_to_i420(rgb), format="yuv420p")

    def repeat(self, frame: av.VideoFrame | None) -> av.VideoFrame:
        # a new frame object: the one sent may still be in the encoder's hands
        yuv = frame.to_ndarray() if frame is not None else _black_i420()
        return av.VideoFrame.from_ndarray(yuv, format="yuv420p")

    def send_video(self, frame: av.VideoFrame, index: int) -> None:
        frame.pts = index * VIDEO_PTS_PER_FRAME
        frame.time_base = VIDEO_TIME_BASE
        self.video.put(frame)

    def send_audio(self, samples: np.ndarray, start: int) -> None:
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = OUT_RATE
        frame.pts = start
        frame.time_base = AUDIO_TIME_BASE
        self.audio.put(frame)

    @property
    def dropped(self) -> tuple[int, int]:
        return self.video.dropped, self.audio.dropped

    def stop(self) -> None:
        self.video.stop()
        self.audio.stop()


def rgb_to_i420(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420)


def _black_i420() -> np.ndarray:
    yuv = np.full((FRAME_SIZE * 3 // 2, FRAME_SIZE), 128, np.uint8)
    yuv[:FRAME_SIZE] = 16
    return yuv
