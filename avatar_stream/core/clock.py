"""One media clock per session: frame k is due at ``t0 + k / fps`` on the loop's monotonic clock."""

from __future__ import annotations

import asyncio


class MediaClock:
    def __init__(self, fps: float, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.fps = fps
        self._loop = loop or asyncio.get_running_loop()
        self.t0: float | None = None
        self.slipped_s = 0.0  # total delay taken when a frame was late

    def start(self) -> None:
        self.t0 = self._loop.time()

    @property
    def started(self) -> bool:
        return self.t0 is not None

    def now(self) -> float:
        return self._loop.time()

    def deadline(self, k: float) -> float:
        """When tick ``k`` is due (before ``start()``: as if started now)."""
        t0 = self.t0 if self.t0 is not None else self._loop.time()
        return t0 + k / self.fps

    async def wait(self, k: float) -> float:
        """Sleep until tick ``k`` is due; returns how late we woke (seconds, >= 0)."""
        delay = self.deadline(k) - self._loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        return max(0.0, self._loop.time() - self.deadline(k))

    def slip(self, seconds: float) -> None:
        """Move the whole timeline later: a frame could not be ready in time, and its audio
        must not be skipped, so every later deadline moves with it."""
        if self.t0 is not None and seconds > 0:
            self.t0 += seconds
            self.slipped_s += seconds
