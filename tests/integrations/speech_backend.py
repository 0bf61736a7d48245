"""The espeak-ng backend of ``audio/tts.py``, keeping what it said: the reference speech
the framework tests compare what the avatar spoke with."""

from __future__ import annotations

from collections.abc import AsyncIterator

import numpy as np

from avatar_stream.audio.decode import Pcm
from avatar_stream.audio.tts import EspeakTTS


class RecordingEspeak(EspeakTTS):
    """espeak-ng, and ``spoken``: (text, float samples, rate) per synthesis, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.spoken: list[tuple[str, np.ndarray, int]] = []

    async def stream(self, text: str, voice: str | None = None) -> AsyncIterator[Pcm]:
        async for pcm in super().stream(text, voice):
            self.spoken.append((text, pcm.samples, pcm.rate))
            yield pcm

    def said(self, text: str) -> tuple[np.ndarray, int]:
        """The speech made for ``text`` (all of it, if it was said in pieces)."""
        rows = [(s, r) for t, s, r in self.spoken if t.strip() == text.strip()]
        return np.concatenate([s for s, _ in rows]), rows[0][1]
