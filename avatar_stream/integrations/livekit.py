"""LiveKit Agents: an avatar-stream avatar speaks the agent's replies
(``pip install 'avatar-stream[livekit]'``).

``AvatarStreamAudioOutput`` is an ``AudioOutput`` for the ``AgentSession``: it sends each
reply segment into an avatar session that the user's browser holds (a ``SessionControl``):
``capture_frame`` -> the segment's speech (its first frame opens it), ``flush`` -> its end,
``clear_buffer`` -> barge-in; ``on_playback_started`` / ``on_playback_finished(position,
interrupted)`` come from the avatar's ``speech.started`` / ``speech.finished``, exactly once per
segment, so the agent knows what the user really heard. ``AvatarSession`` installs it the way
LiveKit's avatar plugins do (``await avatar.start(session)``, before ``session.start``) and sets
the avatar's turn state from the session's user and agent states.

The avatar's media goes from avatar-stream to the browser directly, not through a LiveKit
room; ``docs/integrations.md`` says what a room-native avatar (a participant in the room)
would take.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from livekit import rtc
from livekit.agents import (
    DEFAULT_API_CONNECT_OPTIONS,
    AgentSession,
    APIConnectOptions,
    APIStatusError,
    tts,
    utils,
)
from livekit.agents.voice.events import AgentStateChangedEvent, UserStateChangedEvent
from livekit.agents.voice.io import AudioOutput, AudioOutputCapabilities

from avatar_stream.audio.resample import Resampler
from avatar_stream.audio.tts import TTS, EspeakTTS, TTSError
from avatar_stream.client.sessioncontrol import SessionControl, to_pcm16
from avatar_stream.integrations.segments import Link, Segment, SegmentSender
from avatar_stream.integrations.turns import TurnStates

__all__ = ["AvatarSession", "AvatarStreamAudioOutput", "AvatarStreamTTS"]


class AvatarStreamAudioOutput(AudioOutput):
    """The agent's speech out through an avatar session (``await start()`` before use,
    ``await aclose()`` after). Any sample rate and channel count: the server resamples."""

    def __init__(self, link: Link, *, label: str = "avatar-stream") -> None:
        super().__init__(label=label, capabilities=AudioOutputCapabilities(pause=False),
                         next_in_chain=None, sample_rate=None)
        # a session that ends under the agent is logged (by the sender); the agent goes
        # on, each segment reported finished (interrupted) at once
        self._sender = SegmentSender(link, on_started=self._started, on_finished=self._finished)
        self._segment: Segment | None = None  # the segment being captured
        self._cut = False  # it was cleared mid-capture: its frames go nowhere until flush
        self._ending: asyncio.Task[None] | None = None  # the last flush's end, being queued

    async def start(self) -> None:
        await self._sender.start()

    async def aclose(self) -> None:
        """Segments not yet finished are cut at the server (the avatar stops saying them)
        and reported finished (interrupted) now."""
        await self._sender.close()

    async def capture_frame(self, frame: rtc.AudioFrame) -> None:
        await super().capture_frame(frame)  # the base class counts a new segment here
        if self._cut:
            return
        if self._ending is not None:  # the previous segment's end goes first
            await self._ending
            self._ending = None
        if self._segment is None:
            self._segment = self._sender.open()
        await self._sender.audio(self._segment, bytes(frame.data), frame.sample_rate,
                                 frame.num_channels)

    def flush(self) -> None:
        super().flush()
        self._cut = False
        if self._segment is not None:
            segment, self._segment = self._segment, None
            self._ending = asyncio.ensure_future(self._sender.end(segment))

    def clear_buffer(self) -> None:
        if self._segment is not None:  # the framework still captures it: drop the rest
            self._cut = True
            self._segment = None
        self._sender.interrupt()

    def _started(self, segment: Segment) -> None:
        self.on_playback_started(created_at=segment.started_at or time.time())

    def _finished(self, segment: Segment, position_s: float, interrupted: bool) -> None:
        self.on_playback_finished(playback_position=position_s, interrupted=interrupted)


class AvatarSession:
    """An avatar for an ``AgentSession``, in a session the user's browser holds::

        avatar = AvatarSession(url, session_id, token)
        await avatar.start(agent_session)       # before agent_session.start(...)

    ``turn_states``: listening while the user speaks, thinking while the agent does.
    Closes with the agent session (or ``await avatar.aclose()``); the browser's session
    stays open.
    """

    def __init__(self, url: str, session_id: str, token: str | None = None, *,
                 api_key: str | None = None, turn_states: bool = True) -> None:
        self.control = SessionControl(url, session_id, token, api_key=api_key)
        self.output: AvatarStreamAudioOutput | None = None
        self.turns: TurnStates | None = None
        self._use_turn_states = turn_states
        self._agent_session: AgentSession | None = None
        self._closing: asyncio.Task[None] | None = None

    async def start(self, agent_session: AgentSession) -> None:
        await self.control.connect()
        self.output = AvatarStreamAudioOutput(self.control)
        await self.output.start()
        agent_session.output.audio = self.output
        self._agent_session = agent_session
        if self._use_turn_states:
            self.turns = TurnStates(self.control)
            self.turns.start()
            agent_session.on("user_state_changed", self._user_state)
            agent_session.on("agent_state_changed", self._agent_state)
        agent_session.on("close", self._on_close)

    async def aclose(self) -> None:
        session, self._agent_session = self._agent_session, None
        if session is not None:
            with contextlib.suppress(KeyError, ValueError):
                session.off("close", self._on_close)
                if self.turns is not None:
                    session.off("user_state_changed", self._user_state)
                    session.off("agent_state_changed", self._agent_state)
        if self.turns is not None:
            await self.turns.close()
        if self.output is not None:
            await self.output.aclose()
        await self.control.close()

    def _on_close(self, _event: object) -> None:
        if self._closing is None:
            self._closing = asyncio.ensure_future(self.aclose())

    def _user_state(self, event: UserStateChangedEvent) -> None:
        assert self.turns is not None
        if event.new_state == "speaking":
            self.turns.user_started()
        elif event.old_state == "speaking":
            self.turns.user_stopped(thinking=None)  # the agent's state says if it thinks

    def _agent_state(self, event: AgentStateChangedEvent) -> None:
        assert self.turns is not None
        self.turns.thinking(event.new_state == "thinking")


class AvatarStreamTTS(tts.TTS):
    """A LiveKit TTS over avatar-stream's own TTS backends (``audio/tts.py``: espeak-ng,
    offline, by default; or ``OpenAITTS``, any OpenAI-compatible ``/v1/audio/speech``
    endpoint): a voice for trying an avatar without a TTS provider. Mono PCM at
    ``sample_rate``, resampled from whatever the backend makes."""

    def __init__(self, backend: TTS | None = None, *, voice: str | None = None,
                 sample_rate: int = 24_000) -> None:
        super().__init__(capabilities=tts.TTSCapabilities(streaming=False),
                         sample_rate=sample_rate, num_channels=1)
        self.backend = backend or EspeakTTS()
        self.voice = voice

    def synthesize(self, text: str, *,
                   conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS
                   ) -> tts.ChunkedStream:
        return _BackendStream(tts=self, input_text=text, conn_options=conn_options)

    async def aclose(self) -> None:
        await self.backend.close()


class _BackendStream(tts.ChunkedStream):
    async def _run(self, output_emitter: tts.AudioEmitter) -> None:
        speaker = self._tts
        assert isinstance(speaker, AvatarStreamTTS)
        output_emitter.initialize(request_id=utils.shortuuid(), sample_rate=speaker.sample_rate,
                                  num_channels=1, mime_type="audio/pcm")
        resample = Resampler(speaker.sample_rate, "HQ")
        try:
            async for pcm in speaker.backend.stream(self.input_text, speaker.voice):
                output_emitter.push(to_pcm16(resample(pcm.samples, pcm.rate))[0])
        except TTSError as exc:
            raise APIStatusError(f"{speaker.backend.name} TTS: {exc.message}",
                                 status_code=exc.status) from None
        tail = resample.flush()
        if len(tail):
            output_emitter.push(to_pcm16(tail)[0])
        output_emitter.flush()
