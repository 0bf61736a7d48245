"""The seam between a session and its transport: where paced media goes, and what carries
the session.

The synchronizer owns timing; a sink only delivers. It turns each engine picture into the
transport's own frame type on an engine worker thread (the copies hold the GIL: better
there than on the event loop), then gets every video frame and every 20 ms of audio at its
deadline, already numbered on one clock, so it never paces or stamps anything itself.
"""

from __future__ import annotations

from typing import Protocol, TypeVar

import numpy as np

FrameT = TypeVar("FrameT")


class MediaSink(Protocol[FrameT]):
    """A transport's outgoing media (WebRTC tracks, a framework's output queue)."""

    def video_frame(self, rgb: np.ndarray) -> FrameT:
        """An engine picture (FRAME_SIZE x FRAME_SIZE x 3, uint8 RGB) as the sink's frame.
        Called on an engine worker thread."""
        ...

    def repeat(self, frame: FrameT | None) -> FrameT:
        """A frame to show again because none came in time (``None``: none sent yet)."""
        ...

    def send_video(self, frame: FrameT, index: int) -> None:
        """Video frame ``index`` of the session, due at ``index / FPS`` on its clock."""
        ...

    def send_audio(self, samples: np.ndarray, start: int) -> None:
        """20 ms of OUT_RATE mono int16 audio, starting at sample ``start`` of the session."""
        ...

    @property
    def dropped(self) -> tuple[int, int]:
        """Video and audio frames dropped so far because the consumer fell behind."""
        ...


class Transport(Protocol):
    """What carries a session to its viewer: the session asks its state and ends it."""

    @property
    def state(self) -> str:
        """``new``, ``connecting``, ``connected``, ``closed`` or ``failed``."""
        ...

    @property
    def av_skew_s(self) -> float:
        """How much longer the last video frame waited for its consumer than its audio
        (positive: video leaves late)."""
        ...

    async def close(self) -> None:
        """Stop sending and release everything the transport holds."""
        ...
