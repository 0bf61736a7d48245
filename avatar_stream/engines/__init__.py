"""Engines behind one interface (``base.py``), listed in one registry (``registry.py``);
each engine in its own module or package, imported only when chosen."""

from avatar_stream.engines.base import (
    Avatar,
    AvatarError,
    Engine,
    EngineError,
    EngineStream,
    EngineUnavailable,
)
from avatar_stream.engines.registry import ENGINES, create_engine
from avatar_stream.media import FPS, FRAME_SIZE, SAMPLE_RATE, SAMPLES_PER_FRAME

__all__ = [
    "ENGINES",
    "FPS",
    "FRAME_SIZE",
    "SAMPLE_RATE",
    "SAMPLES_PER_FRAME",
    "Avatar",
    "AvatarError",
    "Engine",
    "EngineError",
    "EngineStream",
    "EngineUnavailable",
    "create_engine",
]
