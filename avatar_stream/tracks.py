"""Outgoing media tracks fed by the session's synchronizer.

aiortc calls ``recv()`` as fast as it returns, so these tracks never make up timestamps or
pace themselves: the synchronizer puts each frame in at its deadline, already stamped, and
``recv()`` just waits for it. The queue is tiny and drops the oldest frame if the encoder
falls behind, so a slow consumer cannot turn into latency.
"""

from __future__ import annotations

import asyncio
from collections import deque

import av
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack


class PacedTrack(MediaStreamTrack):
    def __init__(self, kind: str, maxlen: int = 2) -> None:
        super().__init__()
        self.kind = kind
        self._frames: deque[av.frame.Frame] = deque(maxlen=maxlen)
        self._ready = asyncio.Event()
        self.dropped = 0
        self.sent = 0

    def put(self, frame: av.frame.Frame) -> None:
        if len(self._frames) == self._frames.maxlen:
            self.dropped += 1
        self._frames.append(frame)
        self._ready.set()

    def clear(self) -> None:
        self._frames.clear()

    async def recv(self) -> av.frame.Frame:
        while not self._frames:
            if self.readyState != "live":
                raise MediaStreamError
            self._ready.clear()
            await self._ready.wait()
        if self.readyState != "live":
            raise MediaStreamError
        self.sent += 1
        return self._frames.popleft()

    def stop(self) -> None:
        super().stop()
        self._frames.clear()
        self._ready.set()  # wake a pending recv() so it raises
