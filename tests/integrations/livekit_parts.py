"""A small STT and LLM for an ``AgentSession`` in the tests, and a microphone for it
(LiveKit's own fakes live in its repository's tests, not in its wheel; the TTS is the
package's ``AvatarStreamTTS`` speaking espeak-ng).

- ``UserMic``: the session's audio input, real time: silence, or speech given to ``say()``.
- ``EnergySTT``: a streaming STT that hears speech by its energy (start, interim
  transcripts while it lasts, final transcript and end after a pause) and "recognises" the
  next of the lines it was given: the test knows what its user says.
- ``ScriptedLLM``: answers each user line with the reply it was given for it, streamed.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
from livekit import rtc
from livekit.agents import APIConnectOptions, LanguageCode, stt
from livekit.agents.llm import LLM, ChatChunk, ChatContext, ChoiceDelta, LLMStream, Tool
from livekit.agents.types import DEFAULT_API_CONNECT_OPTIONS, NOT_GIVEN, NotGivenOr
from livekit.agents.voice.io import AudioInput

MIC_RATE = 16_000
MIC_FRAME = MIC_RATE // 50  # 20 ms


class UserMic(AudioInput):
    """The user's microphone: 20 ms frames in real time, silence unless ``say()``."""

    def __init__(self) -> None:
        super().__init__(label="user-mic")
        self._clip = np.zeros(0, np.int16)
        self._pos = 0
        self._n = 0
        self._t0: float | None = None

    def say(self, samples: np.ndarray) -> None:
        """Speak int16 samples at 16 kHz from the next frame on."""
        self._clip, self._pos = samples, 0

    async def __anext__(self) -> rtc.AudioFrame:
        if self._t0 is None:
            self._t0 = time.perf_counter()
        delay = self._t0 + self._n * MIC_FRAME / MIC_RATE - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        self._n += 1
        chunk = self._clip[self._pos : self._pos + MIC_FRAME]
        self._pos += len(chunk)
        data = np.zeros(MIC_FRAME, np.int16)
        data[: len(chunk)] = chunk
        return rtc.AudioFrame(data.tobytes(), MIC_RATE, 1, MIC_FRAME)


class EnergySTT(stt.STT):
    """Hears speech by energy; each stretch of speech is the next of ``lines``."""

    def __init__(self, lines: list[str], *, threshold: float = 0.01, start_s: float = 0.06,
                 pause_s: float = 0.4, interim_every_s: float = 0.2) -> None:
        super().__init__(capabilities=stt.STTCapabilities(streaming=True, interim_results=True))
        self.lines = list(lines)
        self.threshold, self.start_s, self.pause_s = threshold, start_s, pause_s
        self.interim_every_s = interim_every_s
        self.heard: list[tuple[float, str]] = []  # (time, event type): what it reported

    async def _recognize_impl(self, buffer: Any, *, language: NotGivenOr[str] = NOT_GIVEN,
                              conn_options: APIConnectOptions) -> stt.SpeechEvent:
        raise NotImplementedError("streaming only")

    def stream(self, *, language: NotGivenOr[str] = NOT_GIVEN,
               conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS
               ) -> EnergyStream:
        return EnergyStream(self, conn_options)


class EnergyStream(stt.RecognizeStream):
    def __init__(self, energy_stt: EnergySTT, conn_options: APIConnectOptions) -> None:
        super().__init__(stt=energy_stt, conn_options=conn_options)
        self._energy = energy_stt

    def _send(self, kind: stt.SpeechEventType, text: str | None = None) -> None:
        self._energy.heard.append((time.perf_counter(), kind.value))
        alternatives = [stt.SpeechData(language=LanguageCode("en"), text=text)] \
            if text is not None else []
        self._event_ch.send_nowait(stt.SpeechEvent(type=kind, alternatives=alternatives))

    async def _run(self) -> None:
        s = self._energy
        voiced = silent = since_interim = 0.0
        speaking = False
        async for data in self._input_ch:
            if not isinstance(data, rtc.AudioFrame):
                continue
            x = np.frombuffer(data.data, np.int16).astype(np.float32) / 32768.0
            loud = float(np.sqrt(np.mean(x * x))) > s.threshold
            dt = data.samples_per_channel / data.sample_rate
            voiced, silent = (voiced + dt, 0.0) if loud else (0.0, silent + dt)
            if not speaking and voiced >= s.start_s:
                speaking, since_interim = True, 0.0
                self._send(stt.SpeechEventType.START_OF_SPEECH)
            elif speaking and silent >= s.pause_s:
                speaking = False
                line = s.lines.pop(0) if s.lines else ""
                self._send(stt.SpeechEventType.FINAL_TRANSCRIPT, line)
                self._send(stt.SpeechEventType.END_OF_SPEECH)
            elif speaking:
                since_interim += dt
                if since_interim >= s.interim_every_s:
                    since_interim = 0.0
                    line = s.lines[0] if s.lines else ""
                    self._send(stt.SpeechEventType.INTERIM_TRANSCRIPT, line.split(" ")[0])


class ScriptedLLM(LLM):
    """Answers the user's last line from ``replies`` (line -> reply), streamed in words."""

    def __init__(self, replies: dict[str, str]) -> None:
        super().__init__()
        self.replies = replies

    def chat(self, *, chat_ctx: ChatContext, tools: list[Tool] | None = None,
             conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS,
             **kwargs: Any) -> LLMStream:
        return ScriptedStream(self, chat_ctx=chat_ctx, tools=tools or [],
                              conn_options=conn_options)


class ScriptedStream(LLMStream):
    async def _run(self) -> None:
        assert isinstance(self._llm, ScriptedLLM)
        user = [m for m in self.chat_ctx.items if m.type == "message" and m.role == "user"]
        reply = self._llm.replies.get(user[-1].text_content or "", "") if user else ""
        for word in reply.split(" "):
            self._event_ch.send_nowait(ChatChunk(
                id="scripted", delta=ChoiceDelta(role="assistant", content=word + " ")))
            await asyncio.sleep(0)
