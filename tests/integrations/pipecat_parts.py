"""Pipecat parts the integration tests build pipelines from: a TTS service that speaks with
espeak-ng (real speech, offline; the shape of Pipecat's Piper service) and a pass-through
recorder that notes when each frame went by."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator

import numpy as np
from pipecat.frames.frames import Frame
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.services.settings import TTSSettings
from pipecat.services.tts_service import TTSService

from avatar_stream.audio.decode import decode_wav
from avatar_stream.client.sessioncontrol import to_pcm16

TTS_CHUNK_S = 0.1  # what a streaming TTS delivers at a time


class EspeakTTSService(TTSService):
    """Text to speech with espeak-ng on this machine: a stand-in for a TTS provider (the
    real service class, a real voice; only the provider is local). Keeps what it said per
    context id (``spoken``: float samples and their rate)."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(push_start_frame=True, push_stop_frames=True,
                         settings=TTSSettings(model=None, voice="en-us", language=None),
                         **kwargs)  # type: ignore[arg-type]
        self.spoken: dict[str, tuple[np.ndarray, int]] = {}

    async def run_tts(self, text: str, context_id: str) -> AsyncGenerator[Frame | None, None]:
        proc = await asyncio.create_subprocess_exec(
            "espeak-ng", "-v", "en-us", "-s", "150", "--stdout",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        out, _ = await proc.communicate(text.encode())
        pcm = decode_wav(out)
        self.spoken[context_id] = (pcm.samples, pcm.rate)
        data, _ = to_pcm16(pcm.samples)
        step = int(pcm.rate * TTS_CHUNK_S) * 2

        async def chunks() -> AsyncIterator[bytes]:
            for i in range(0, len(data), step):
                yield data[i : i + step]

        async for frame in self._stream_audio_frames_from_iterator(
                chunks(), in_sample_rate=pcm.rate, context_id=context_id):
            yield frame


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
