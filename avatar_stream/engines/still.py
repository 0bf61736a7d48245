"""The still engine: the photo itself, every frame, no animation.

The benchmark's floor (``avatar-stream bench --baseline``): the same session, media path
and timing as every other engine, with the cost and latency of animating taken out.
"""

from __future__ import annotations

import numpy as np

from avatar_stream.avatars.store import photo_avatar
from avatar_stream.engines.base import Avatar, Engine, EngineStream


class StillStream(EngineStream):
    frames_per_step = 1

    def __init__(self, image: np.ndarray) -> None:
        self._frame = image[None]

    def step(self, speech: np.ndarray | None) -> np.ndarray:
        return self._frame

    def reset(self) -> None:
        pass


class StillEngine(Engine):
    name = "still"
    worker_threads = 1
    shows_states: frozenset[str] = frozenset()  # the photo, unanimated: the floor

    def prepare(self, image: np.ndarray, avatar_id: str) -> Avatar:
        return photo_avatar(image, avatar_id, self.name)

    def open_stream(self, avatar: Avatar, seed: int | None = None) -> StillStream:
        return StillStream(avatar.image)
