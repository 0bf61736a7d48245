"""A pass-through Pipecat processor that notes when each frame went by (the integration
tests' probe in their pipelines)."""

from __future__ import annotations

import time

from pipecat.frames.frames import Frame
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor


class Recorder(FrameProcessor):
    """Passes every frame on and notes (perf_counter, frame, direction) as it goes by."""

    def __init__(self) -> None:
        super().__init__(enable_direct_mode=True)
        self.frames: list[tuple[float, Frame, FrameDirection]] = []

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        self.frames.append((time.perf_counter(), frame, direction))
        await self.push_frame(frame, direction)

    def of(self, kind: type | tuple[type, ...],
           direction: FrameDirection = FrameDirection.DOWNSTREAM) -> list[tuple[float, Frame]]:
        return [(t, f) for t, f, d in self.frames if isinstance(f, kind) and d == direction]
