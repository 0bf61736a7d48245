"""The engine interface: what the session needs from anything that animates a photo.

An engine has a per-avatar ``prepare`` step (face rig, reference latents: cached, may be
slow) and per-session ``EngineStream`` objects holding the model state between steps. A
stream turns speech into frames in steps of ``frames_per_step`` frames: frame ``k`` of a
stream is made from the 16 kHz samples ``[640k, 640k + 640)`` of what it was fed. A CPU
engine steps one frame at a time; FlashHead steps a chunk of 24 (or 8) frames. The session
code treats both the same: it hands a step exactly ``frames_per_step * 640`` samples (or
``None`` when nobody speaks) and gets exactly ``frames_per_step`` frames back.

Steps run on the worker's threads, never on the event loop.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

FPS = 25
SAMPLE_RATE = 16_000
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640
FRAME_SIZE = 512

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels


class AvatarError(ValueError):
    """A reference photo that cannot be animated; the message says why, for the user."""


@dataclass
class Avatar:
    """A prepared reference photo: the 512x512 RGB image plus what the engine derived from it."""

    id: str
    image: np.ndarray  # (512, 512, 3) uint8 RGB
    face_box: Box
    mouth_box: Box
    data: Any = None  # engine-specific (warp: the rig and displacement fields)
    meta: dict[str, Any] = field(default_factory=dict)

    def info(self) -> dict[str, Any]:
        h, w = self.image.shape[:2]
        return {
            "id": self.id,
            "width": w,
            "height": h,
            "face_box": list(self.face_box),
            "mouth_box": list(self.mouth_box),
            **self.meta,
        }


class EngineStream(ABC):
    """One session's model state (warp: animation controls; FlashHead: the audio context)."""

    frames_per_step: int = 1

    @abstractmethod
    def step(self, speech: np.ndarray | None) -> np.ndarray:
        """Make the next ``frames_per_step`` frames.

        ``speech`` is float32 mono 16 kHz of exactly ``frames_per_step * 640`` samples, or
        ``None`` when no speech is queued (the engine then animates idle). Returns uint8 RGB
        frames shaped ``(frames_per_step, 512, 512, 3)``.
        """

    @abstractmethod
    def reset(self) -> None:
        """Barge-in: forget speech context and go back to idle without a visible jump."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free per-session resources (GPU state, buffers)."""


class Engine(ABC):
    """A loaded model (or the CPU animator) shared by all sessions."""

    name: ClassVar[str]
    #: threads that may run steps at once (a GPU engine wants exactly one)
    worker_threads: int = 2

    @abstractmethod
    def prepare(self, image: np.ndarray, avatar_id: str) -> Avatar:
        """Prepare a reference photo (any size RGB uint8); raises AvatarError if unusable."""

    @abstractmethod
    def open_stream(self, avatar: Avatar, seed: int | None = None) -> EngineStream:
        """Start a session's stream on a prepared avatar."""

    def warm_up(self) -> None:  # noqa: B027 - optional hook
        """Run whatever must happen before the first session (compilation, caches)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the model."""
