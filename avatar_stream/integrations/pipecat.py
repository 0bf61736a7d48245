"""Pipecat processors for an avatar-stream avatar (``pip install 'avatar-stream[pipecat]'``).

Place either right after the TTS service, where Pipecat's own avatar services go:

- ``AvatarStreamVideoService`` (the relay, the shape of Pipecat's Simli and HeyGen services):
  holds a session of its own (an ``AvatarClient``) and sends the avatar's video downstream as
  ``OutputImageRawFrame`` and its voice, re-timed to the lips, as ``OutputAudioRawFrame``, so
  the bot's own transport (Daily, SmallWebRTC, LiveKit) carries the avatar.
- ``AvatarStreamSessionDriver`` (browser-direct): drives a session that the user's browser
  holds (a ``SessionControl``); the browser gets the avatar from avatar-stream itself, one hop
  shorter, and the bot's transport carries no audio of the bot.

Both turn each TTS context into one utterance (``TTSStartedFrame``: a new utterance, its
context id as utterance id; ``TTSAudioRawFrame``: its speech, swallowed; ``TTSStoppedFrame``:
its end), barge in on ``InterruptionFrame`` (then pass it on), push ``BotStartedSpeakingFrame``
/ ``BotSpeakingFrame`` / ``BotStoppedSpeakingFrame`` when the avatar really speaks (our
``speech.started`` / ``speech.finished``), and set the avatar's turn state from the user's
speaking frames (listening while the user speaks, thinking until the reply plays).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import av
from pipecat.frames.frames import (
    BotSpeakingFrame,
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    CancelFrame,
    EndFrame,
    ErrorFrame,
    Frame,
    InterruptionFrame,
    OutputAudioRawFrame,
    OutputImageRawFrame,
    StartFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessorSetup
from pipecat.services.ai_service import AIService
from pipecat.services.settings import ServiceSettings, TTSSettings
from pipecat.services.tts_service import TTSService

from avatar_stream.audio.resample import frame_to_mono
from avatar_stream.audio.tts import TTS, EspeakTTS, TTSError
from avatar_stream.client.avatarclient import AvatarClient
from avatar_stream.client.sessioncontrol import SessionControl, to_pcm16
from avatar_stream.config import IceServer
from avatar_stream.integrations.segments import Link, Segment, SegmentSender
from avatar_stream.integrations.turns import TurnStates

log = logging.getLogger(__name__)

__all__ = ["AvatarStreamSessionDriver", "AvatarStreamTTSService", "AvatarStreamVideoService"]

BOT_SPEAKING_PERIOD_S = 0.2  # how often Pipecat's output transport says the bot still speaks
# on a graceful EndFrame, how long the avatar may take to finish what it was given
DRAIN_TIMEOUT_S = 60.0
# the relay, on a graceful end: a speech.finished leaves the server with its frame, but on
# the data channel, while the frame's media still crosses the encoder, the network and the
# jitter buffer; nothing in the media marks the last frame of an utterance. So the relay
# waits until this much more of the avatar's audio has arrived after the last
# speech.finished (what is in flight behind an event: well under it on loopback), counted
# in media rather than time (a loaded process receives late, it does not lose it), then
# for the lanes to have pushed it all; MEDIA_TAIL_TIMEOUT_S at most (the media stopped)
MEDIA_TAIL_S, MEDIA_TAIL_TIMEOUT_S = 0.3, 2.0
# received frames waiting to go downstream, per kind: 1 s (25 x 40 ms, 50 x 20 ms); the
# oldest go first
VIDEO_QUEUE, AUDIO_QUEUE = 25, 50


class _AvatarSpeechProcessor(AIService):
    """What both shapes share: TTS contexts to utterances, barge-in, the bot's speaking
    frames from the avatar's events, turn states. Subclasses connect the link."""

    def __init__(self, *, turn_states: bool = True, drain_timeout_s: float = DRAIN_TIMEOUT_S,
                 **kwargs: Any) -> None:
        super().__init__(settings=ServiceSettings(model=None), **kwargs)
        self._use_turn_states = turn_states
        self._drain_timeout_s = drain_timeout_s
        self._link: Link | None = None
        self._sender: SegmentSender | None = None
        self._turns: TurnStates | None = None
        self._contexts: dict[str | None, Segment] = {}  # TTS context -> its open segment
        self._cut_contexts: deque[str | None] = deque(maxlen=64)  # their late audio is dropped
        self._playing: set[str] = set()  # segments the avatar is speaking
        self._ticker: asyncio.Task[None] | None = None
        self._running = False  # StartFrame went downstream; frames may follow it

    async def _connect(self) -> Link:
        raise NotImplementedError

    # -- lifecycle --------------------------------------------------------------------

    async def setup(self, setup: FrameProcessorSetup) -> None:  # type: ignore[override]
        """Connect to the avatar session (Pipecat sets processors up concurrently)."""
        await super().setup(setup)
        link = await self._connect()
        self._link = link
        self._sender = SegmentSender(link, on_started=self._on_started,
                                     on_finished=self._on_finished, on_gone=self._on_gone)
        await self._sender.start()
        if self._use_turn_states:
            self._turns = TurnStates(link)
            self._turns.start()

    async def stop(self, frame: EndFrame) -> None:
        """Graceful end: the avatar finishes what it was given, then the link closes."""
        await super().stop(frame)
        for segment in list(self._contexts.values()):
            if self._sender is not None:
                await self._sender.end(segment)
        self._contexts.clear()
        if self._sender is not None and not await self._sender.drain(self._drain_timeout_s):
            log.warning("%s: the avatar had not finished speaking %.0f s after the EndFrame",
                        self, self._drain_timeout_s)
        await self._after_drain()
        await self._close()

    async def cancel(self, frame: CancelFrame) -> None:
        await super().cancel(frame)
        await self._close()

    async def cleanup(self) -> None:
        await super().cleanup()
        await self._close()

    async def _after_drain(self) -> None:
        """What the shape still waits for once the last segment finished."""

    async def _close(self) -> None:
        """Close everything this processor opened (idempotent)."""
        self._running = False
        if self._sender is not None:
            sender, self._sender = self._sender, None
            await sender.close()
        if self._turns is not None:
            turns, self._turns = self._turns, None
            await turns.close()
        await self._stop_ticker()
        if self._link is not None:
            link, self._link = self._link, None
            await self._close_link(link)

    async def _close_link(self, link: Link) -> None:
        await link.close()

    # -- frames -------------------------------------------------------------------------

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, TTSAudioRawFrame):
            await self._tts_audio(frame)  # the avatar speaks it: not passed on
        elif isinstance(frame, TTSStartedFrame):
            await self._tts_started(frame)
            await self.push_frame(frame, direction)
        elif isinstance(frame, TTSStoppedFrame):
            await self._tts_stopped(frame)
            if self._passes_tts_stopped:
                await self.push_frame(frame, direction)
        elif isinstance(frame, InterruptionFrame):
            self._interrupt()
            await self.push_frame(frame, direction)
        else:
            if isinstance(frame, UserStartedSpeakingFrame) and self._turns is not None:
                self._turns.user_started()
            elif isinstance(frame, UserStoppedSpeakingFrame) and self._turns is not None:
                self._turns.user_stopped()
            await self.push_frame(frame, direction)
            if isinstance(frame, StartFrame):
                self._running = True

    _passes_tts_stopped = True

    async def _tts_started(self, frame: TTSStartedFrame) -> None:
        if self._sender is None:
            return
        with contextlib.suppress(ValueError):
            self._cut_contexts.remove(frame.context_id)
        previous = self._contexts.pop(frame.context_id, None)
        if previous is not None:
            await self._sender.end(previous)
        self._contexts[frame.context_id] = self._sender.open(frame.context_id)

    async def _tts_audio(self, frame: TTSAudioRawFrame) -> None:
        if self._sender is None or frame.context_id in self._cut_contexts:
            return
        segment = self._contexts.get(frame.context_id)
        if segment is None:  # audio without a TTSStartedFrame: it starts a context too
            segment = self._contexts[frame.context_id] = self._sender.open(frame.context_id)
        await self._sender.audio(segment, frame.audio, frame.sample_rate, frame.num_channels)

    async def _tts_stopped(self, frame: TTSStoppedFrame) -> None:
        segment = self._contexts.pop(frame.context_id, None)
        if segment is None and frame.context_id is None and self._contexts:
            segment = self._contexts.pop(next(iter(self._contexts)))  # the oldest open one
        if segment is not None and self._sender is not None:
            await self._sender.end(segment)

    def _interrupt(self) -> None:
        if self._sender is None:
            return
        self._cut_contexts.extend(self._contexts)
        self._contexts.clear()
        self._sender.interrupt()

    # -- the avatar's events -------------------------------------------------------------

    async def _on_started(self, segment: Segment) -> None:
        first = not self._playing
        self._playing.add(segment.id)
        if self._turns is not None:
            self._turns.reply_started()
        if first and self._running:
            await self.broadcast_frame(BotStartedSpeakingFrame)
            self._ticker = self.create_task(self._tick(), "avatar-bot-speaking")

    async def _on_finished(self, segment: Segment, position_s: float, interrupted: bool) -> None:
        if segment.id not in self._playing:
            return
        self._playing.discard(segment.id)
        if not self._playing:
            await self._stop_ticker()
            if self._running:
                await self.broadcast_frame(BotStoppedSpeakingFrame)

    async def _on_gone(self, reason: str) -> None:
        """The avatar session ended under the pipeline: the bot goes on, unseen; tell the
        application (a non-fatal error: what to do about it is its call)."""
        if self._running:
            await self.push_error(f"avatar-stream: {reason}; the avatar no longer speaks")

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(BOT_SPEAKING_PERIOD_S)
            await self.broadcast_frame(BotSpeakingFrame)

    async def _stop_ticker(self) -> None:
        if self._ticker is not None:
            ticker, self._ticker = self._ticker, None
            await self.cancel_task(ticker)


class AvatarStreamVideoService(_AvatarSpeechProcessor):
    """The avatar inside the pipeline: its video and voice go downstream as output frames.

    ``url``: the avatar-stream server; ``avatar``: an avatar id on it; ``api_key`` if the
    server has one. ``ice_servers`` (STUN/TURN) and ``ice_host_addresses`` (offer ICE
    candidates only on these addresses, e.g. ``["127.0.0.1"]`` beside a local server;
    default: every interface) as for ``AvatarClient``.
    The voice comes back at 48 kHz mono; the output transport resamples it. Configure the
    transport with ``video_out_enabled=True``, ``video_out_is_live=True``, 512x512 at 25 fps.

    ``TTSStoppedFrame`` is consumed: the transport's audio is the avatar's, which goes on
    after the TTS stopped, and the transport would pad it with silence there. The end of the
    bot's speech is the ``BotStoppedSpeakingFrame`` this service pushes.
    """

    _passes_tts_stopped = False

    def __init__(
        self,
        *,
        url: str,
        avatar: str | None = None,
        api_key: str | None = None,
        ice_servers: list[IceServer] | None = None,
        ice_host_addresses: list[str] | None = None,
        video_codecs: list[str] | None = None,
        turn_states: bool = True,
        drain_timeout_s: float = DRAIN_TIMEOUT_S,
        **kwargs: Any,
    ) -> None:
        super().__init__(turn_states=turn_states, drain_timeout_s=drain_timeout_s, **kwargs)
        self._url = url
        self._avatar = avatar
        self._api_key = api_key
        self._ice_servers = ice_servers
        self._ice_host_addresses = ice_host_addresses
        self._video_codecs = video_codecs
        # video and voice go down on lanes of their own: the voice never waits behind a
        # picture's conversion (a late voice frame is a gap in the transport's audio)
        self._lanes: dict[str, _Lane] = {"video": _Lane(VIDEO_QUEUE, self._image),
                                         "audio": _Lane(AUDIO_QUEUE, self._voice)}
        self._executor: ThreadPoolExecutor | None = None  # RGB conversion, off the loop
        self._audio_s = 0.0  # seconds of the avatar's audio received
        self._tail: tuple[float, asyncio.Event] | None = None  # wanted by then, arrived

    @property
    def client(self) -> AvatarClient | None:
        """The session this service holds (None before setup and after the end)."""
        return self._link if isinstance(self._link, AvatarClient) else None

    async def _connect(self) -> Link:
        client = AvatarClient(
            self._url, avatar=self._avatar, api_key=self._api_key,
            ice_servers=self._ice_servers, ice_host_addresses=self._ice_host_addresses,
            video_codecs=self._video_codecs, record=False, record_mouth=False,
            on_frame=self._on_media,
        )
        try:
            await client.connect()
        except BaseException:
            await client.close()
            raise
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="avatar-rgb")
        for kind, lane in self._lanes.items():
            lane.task = self.create_task(lane.run(self._push_out), f"avatar-{kind}")
        return client

    def _on_media(self, frame: av.VideoFrame | av.AudioFrame, arrived: float) -> None:
        if isinstance(frame, av.AudioFrame) and frame.sample_rate:
            self._audio_s += frame.samples / frame.sample_rate
            if self._tail is not None and self._audio_s >= self._tail[0]:
                self._tail[1].set()
        if self._running:
            self._lanes["video" if isinstance(frame, av.VideoFrame) else "audio"].put(frame)

    async def _image(self, frame: av.VideoFrame) -> Frame:
        loop = asyncio.get_running_loop()
        rgb = await loop.run_in_executor(self._executor, _rgb_bytes, frame)
        return OutputImageRawFrame(image=rgb, size=(frame.width, frame.height), format="RGB")

    async def _voice(self, frame: av.AudioFrame) -> Frame:
        pcm, _ = to_pcm16(frame_to_mono(frame))
        return OutputAudioRawFrame(audio=pcm, sample_rate=frame.sample_rate, num_channels=1)

    async def _push_out(self, frame: Frame) -> None:
        if self._running:
            await self.push_frame(frame)

    async def _after_drain(self) -> None:
        """The last frames' media, received and pushed down (see MEDIA_TAIL_S)."""
        arrived = asyncio.Event()
        self._tail = (self._audio_s + MEDIA_TAIL_S, arrived)

        async def tail() -> None:
            await arrived.wait()
            for lane in self._lanes.values():
                await lane.idle.wait()

        try:
            await asyncio.wait_for(tail(), MEDIA_TAIL_TIMEOUT_S)
        except asyncio.TimeoutError:
            log.warning("%s: the avatar's last media had not all arrived %.1f s after it "
                        "finished speaking", self, MEDIA_TAIL_TIMEOUT_S)
        finally:
            self._tail = None

    async def _close_link(self, link: Link) -> None:
        for lane in self._lanes.values():
            if lane.task is not None:
                task, lane.task = lane.task, None
                await self.cancel_task(task)
            lane.frames.clear()
        await link.close()  # the session ends with it
        if self._executor is not None:  # a conversion may be running: wait off the loop
            executor, self._executor = self._executor, None
            await asyncio.to_thread(executor.shutdown, True, cancel_futures=True)


class AvatarStreamSessionDriver(_AvatarSpeechProcessor):
    """Drives an avatar session that the user's browser holds (it created it and watches
    it); needs only the session id and its token (or the API key). The TTS audio goes to
    the avatar and no further: the user hears the avatar's voice, in sync with its lips."""

    def __init__(
        self,
        *,
        url: str,
        session_id: str,
        token: str | None = None,
        api_key: str | None = None,
        turn_states: bool = True,
        drain_timeout_s: float = DRAIN_TIMEOUT_S,
        **kwargs: Any,
    ) -> None:
        super().__init__(turn_states=turn_states, drain_timeout_s=drain_timeout_s, **kwargs)
        self._url = url
        self._session_id = session_id
        self._token = token
        self._api_key = api_key

    async def _connect(self) -> Link:
        control = SessionControl(self._url, self._session_id, self._token,
                                 api_key=self._api_key)
        await control.connect()
        return control


class AvatarStreamTTSService(TTSService):
    """A Pipecat TTS service over avatar-stream's own TTS backends (``audio/tts.py``:
    espeak-ng, offline, by default; or ``OpenAITTS``, any OpenAI-compatible
    ``/v1/audio/speech`` endpoint): a voice for trying an avatar without a TTS provider.
    ``voice``: the backend's voice name."""

    def __init__(self, backend: TTS | None = None, *, voice: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(push_start_frame=True, push_stop_frames=True,
                         settings=TTSSettings(model=None, voice=voice, language=None),
                         **kwargs)
        self.backend = backend or EspeakTTS()

    async def run_tts(self, text: str, context_id: str) -> AsyncGenerator[Frame | None, None]:
        voice = self._settings.voice if isinstance(self._settings.voice, str) else None
        try:
            async for pcm in self.backend.stream(text, voice):
                audio, _ = to_pcm16(pcm.samples)
                if pcm.rate != self.sample_rate:
                    audio = await self._resampler.resample(audio, pcm.rate, self.sample_rate)
                yield TTSAudioRawFrame(audio, self.sample_rate, 1, context_id=context_id)
        except TTSError as exc:
            yield ErrorFrame(error=f"{self.backend.name} TTS: {exc.message}")

    async def cleanup(self) -> None:
        await super().cleanup()
        await self.backend.close()


class _Lane:
    """Received frames of one kind on their way down the pipeline: bounded (a full lane
    drops its oldest), converted and pushed in order by one task."""

    def __init__(self, size: int, convert: Callable[[Any], Awaitable[Frame]]) -> None:
        self.frames: deque[Any] = deque(maxlen=size)
        self.ready = asyncio.Event()
        self.idle = asyncio.Event()  # everything put has been pushed
        self.idle.set()
        self.convert = convert
        self.task: asyncio.Task[None] | None = None

    def put(self, frame: object) -> None:
        self.frames.append(frame)
        self.idle.clear()
        self.ready.set()

    async def run(self, push: Callable[[Frame], Awaitable[None]]) -> None:
        while True:
            await self.ready.wait()
            self.ready.clear()
            while self.frames:
                await push(await self.convert(self.frames.popleft()))
            self.idle.set()


def _rgb_bytes(frame: av.VideoFrame) -> bytes:
    return frame.to_ndarray(format="rgb24").tobytes()  # type: ignore[no-any-return]
