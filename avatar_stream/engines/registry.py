"""Engines behind one interface (``base.py``); each engine in its own module, imported lazily."""

from __future__ import annotations

from typing import Any

from avatar_stream.engines.base import (
    FPS,
    FRAME_SIZE,
    SAMPLE_RATE,
    SAMPLES_PER_FRAME,
    Avatar,
    AvatarError,
    Engine,
    EngineStream,
)

ENGINES = ("warp", "still", "flashhead")


def create_engine(name: str, **options: Any) -> Engine:
    """Load an engine by name (``--engine``)."""
    if name == "warp":
        from avatar_stream.engines.warp.engine import WarpEngine

        return WarpEngine(**options)
    if name == "still":
        from avatar_stream.engines.still import StillEngine

        return StillEngine(**options)
    if name == "flashhead":  # torch and upstream: the `flashhead` extra / Docker target
        from avatar_stream.engines.flashhead.engine import FlashHeadEngine

        return FlashHeadEngine(**options)
    raise ValueError(f"unknown engine {name!r}; choose from {', '.join(ENGINES)}")


__all__ = [
    "ENGINES",
    "FPS",
    "FRAME_SIZE",
    "SAMPLE_RATE",
    "SAMPLES_PER_FRAME",
    "Avatar",
    "AvatarError",
    "Engine",
    "EngineStream",
    "create_engine",
]
