"""The one list of engines: their names, which of them run on the CPU (their sessions
scale with worker processes), and loading one by name; each engine is imported only when
chosen (torch and upstream only for ``flashhead``)."""

from __future__ import annotations

from typing import Any

from avatar_stream.engines.base import Engine

ENGINES = ("warp", "still", "flashhead")
CPU_ENGINES = ("warp", "still")


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
