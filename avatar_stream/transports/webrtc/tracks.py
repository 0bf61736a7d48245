"""Outgoing media tracks fed by the session's synchronizer.

aiortc calls ``recv()`` as fast as it returns, so these tracks never make up timestamps or
pace themselves: the synchronizer puts each frame in at its deadline, already stamped, and
``recv()`` just waits for it. The queue is bounded and drops the oldest frame if the encoder
falls behind: tiny for video, so a slow consumer cannot turn into latency; longer for
audio, so a stall of the encoder delays speech instead of cutting it. Given an ``opus``
encoder (once Opus is negotiated), the audio track hands aiortc encoded packets.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

import av
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from avatar_stream.transports.webrtc.encoders import OpusPacketEncoder


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
