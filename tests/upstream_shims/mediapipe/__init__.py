"""TEST-ONLY shim of mediapipe (see ../README.md): importable, unusable.

Upstream FlashHead imports it for an optional face crop that the engine never asks for.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    raise RuntimeError(f"mediapipe test shim: mediapipe.{name} is not available in the tests")
