"""One avatar session: a peer connection, its speech queue, engine stream and synchronizer.

A session ends the same way whatever ends it (DELETE, the peer failing or closing, a
connect timeout, the idle timeout or maximum duration, server shutdown): ``close()`` tells
its listeners why (``session.ended``), stops the tasks, the tracks, the peer connection
and the engine stream, closes its WebSockets, and drops its queues.

Speech comes in three ways and meets in one queue: the peer's audio track (cut into
utterances by an energy gate), and pushed speech (HTTP, WebSocket, the data channel) with
utterance ids the front-end chose, through :class:`SpeechInput`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import av
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rtcdatachannel import RTCDataChannel

from avatar_stream.audio.gate import LiveSpeechGate
from avatar_stream.audio.resample import Resampler, frame_to_mono
from avatar_stream.config import ServerConfig
from avatar_stream.core.speechinput import SpeechInput
from avatar_stream.core.speechqueue import SpeechQueue, SpeechQueueFull
from avatar_stream.core.synchronizer import Synchronizer
from avatar_stream.core.worker import EngineWorker
from avatar_stream.engines.base import Avatar, Engine, EngineStream
from avatar_stream.media import Event
from avatar_stream.scale.metrics import Metrics
from avatar_stream.transports.protocol import SpeechProtocol
from avatar_stream.transports.webrtc.encoders import prefer_h264, use_avatar_encoders
from avatar_stream.transports.webrtc.ice import filter_candidates, rtc_configuration
from avatar_stream.transports.webrtc.jitterbuffer import receive_audio_immediately
from avatar_stream.transports.webrtc.tracks import PacedTrack

log = logging.getLogger(__name__)

AUDIO_QUEUE_FRAMES = 25  # 20 ms each


class OfferError(ValueError):
    """The client's offer cannot start a session (HTTP 400)."""


class Session:
    def __init__(
        self,
        engine: Engine,
        avatar: Avatar,
        worker: EngineWorker,
        config: ServerConfig,
        on_closed: Callable[[Session], None] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.id = secrets.token_hex(12)  # hex: safe in URLs and as a command-line argument
        self.avatar = avatar
        self.engine = engine
        self.worker = worker
        self.config = config
        self._on_closed = on_closed
        self.metrics = metrics
        self.pc = RTCPeerConnection(rtc_configuration(config.ice_servers))
        encode = metrics.encode if metrics else None
        self.video = PacedTrack(
            "video", maxlen=2, on_consumed=encode.labels("video").observe if encode else None
        )
        # speech must not be cut when sending stalls (seen: 100+ ms with busy cores), so the
        # audio queue holds half a second; a skipped video frame is a lesser harm
        self.audio = PacedTrack(
            "audio", maxlen=AUDIO_QUEUE_FRAMES,
            on_consumed=encode.labels("audio").observe if encode else None,
        )
        self.speech = SpeechQueue(config.speech_queue_s)
        self.input = SpeechInput(self.speech, self._speech_queued, config.utterance_idle_end_s)
        self.gate = LiveSpeechGate()
        self.stream: EngineStream | None = None
        self.sync: Synchronizer | None = None
        self.channel: RTCDataChannel | None = None
        # event fan-out (WebSockets) and what to close with the session
        self.listeners: list[Callable[[Event], None]] = []
        self.close_hooks: list[Callable[[], Awaitable[None]]] = []
        self.closed = asyncio.Event()
        self.end_reason: str | None = None
        loop = asyncio.get_running_loop()
        self.created_at = loop.time()
        self.last_activity = self.created_at
        self._closing = False
        self._ready_sent = False
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- set-up ----------------------------------------------------------------------

    async def accept(self, offer_sdp: str) -> str:
        """Answer the client's offer; on failure the session is closed and OfferError raised."""
        try:
            return await self._accept(offer_sdp)
        except Exception:
            await self.close("offer rejected")
            raise

    async def _accept(self, offer_sdp: str) -> str:
        sdp = filter_candidates(offer_sdp, self.config.ice_host_addresses)
        self._wire_events()  # "track" fires inside setRemoteDescription
        try:
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        except Exception as exc:  # aiortc raises several kinds on a malformed SDP
            raise OfferError(f"invalid SDP offer: {exc}") from exc
        receive_audio_immediately(self.pc)
        prefer_h264(self.pc)
        kinds = [t.kind for t in self.pc.getTransceivers()]
        if "video" not in kinds:
            raise OfferError("the offer has no video m-line to receive the avatar on")
        stream, _ = await self.worker.run(self.engine.open_stream, self.avatar)
        self.stream = stream
        self.sync = Synchronizer(
            stream, self.worker, self.speech, self.video, self.audio, self.emit,
            on_step=self.metrics.engine_step.observe if self.metrics else None,
        )
        self.pc.addTrack(self.video)
        if "audio" in kinds:
            self.pc.addTrack(self.audio)
        answer = await self.pc.createAnswer()
        await self.pc.setLocalDescription(answer)
        use_avatar_encoders(self.pc)
        self._spawn(self._connect_timeout())
        self._spawn(self._watchdog())
        return self.pc.localDescription.sdp

    def _wire_events(self) -> None:
        pc = self.pc

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind == "audio":
                self._spawn(self._ingest(track))
            else:
                self._spawn(_drain(track))  # nothing to do with client video, but drain it

        @pc.on("datachannel")
        def on_datachannel(channel: RTCDataChannel) -> None:
            if channel.label != "control":
                return
            self.channel = channel
            protocol = SpeechProtocol(
                self.input, self.interrupt, self._reply_on(channel),
                max_binary_bytes=self.config.max_ws_message_bytes, on_activity=self.touch,
            )
            channel.on("message", protocol.handle)
            self._maybe_ready()

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            state = pc.connectionState
            log.info("session %s: %s", self.id, state)
            if state == "connected" and self.sync:
                self.sync.start()
                self._maybe_ready()
            elif state in ("failed", "closed"):
                await self.close(f"peer connection {state}")

    async def _connect_timeout(self) -> None:
        await asyncio.sleep(self.config.connect_timeout_s)
        if self.pc.connectionState != "connected":
            await self.close("connect timeout")

    def touch(self) -> None:
        """Someone used the session (speech, a call, a control message): not idle."""
        self.last_activity = asyncio.get_running_loop().time()

    async def _watchdog(self) -> None:
        """End the session when idle too long or past its maximum duration, so a
        front-end that forgets DELETE (or a browser tab left open) frees its slot."""
        idle_s = self.config.session_idle_timeout_s
        max_s = self.config.session_max_duration_s
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            if self.speech.total or (self.sync is not None and self.sync.speaking):
                self.last_activity = now  # speaking is not idle
            if max_s > 0 and now - self.created_at >= max_s:
                await self.close(f"maximum session duration ({max_s:g} s) reached")
                return
            if idle_s > 0 and now - self.last_activity >= idle_s:
                await self.close(f"idle for {idle_s:g} s")
                return
            waits = [1.0]
            if idle_s > 0:
                waits.append(self.last_activity + idle_s - now)
            if max_s > 0:
                waits.append(self.created_at + max_s - now)
            await asyncio.sleep(max(0.05, min(waits)))

    # -- speech in -------------------------------------------------------------------

    async def _ingest(self, track: MediaStreamTrack) -> None:
        """Drain the client's audio (aiortc's queue is unbounded) into the speech queue."""
        resample = Resampler()
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            if not isinstance(frame, av.AudioFrame):
                continue
            pcm = resample(frame_to_mono(frame), frame.sample_rate)
            for utterance, samples in self.gate.feed(pcm, self.speech.seconds):
                self.touch()
                if samples is None:
                    self.speech.end(utterance)
                    continue
                try:
                    self.speech.push(samples, utterance)
                except SpeechQueueFull:  # the microphone outran the bounded queue:
                    continue  # this piece is dropped, the next may fit

    def _speech_queued(self) -> None:
        """Pushed speech (or an utterance's end) was queued: the session is in use (the
        queue itself wakes the synchronizer's producer)."""
        self.touch()

    # -- control ---------------------------------------------------------------------

    def _reply_on(self, channel: RTCDataChannel) -> Callable[[Event], None]:
        """Replies meant for one data channel only (acks, protocol errors, pong)."""

        def reply(event: Event) -> None:
            if event["type"] == "error" and self.metrics:
                self.metrics.errors.labels("control").inc()
            if channel.readyState == "open":
                channel.send(json.dumps(event))

        return reply

    def interrupt(self) -> list[str]:
        """Barge-in: stop speaking now and go back to idle."""
        self.touch()
        self.gate.cancel()
        self.input.interrupt()
        return self.sync.interrupt() if self.sync else self.speech.clear()

    # -- events out ------------------------------------------------------------------

    def emit(self, event: Event) -> None:
        if event["type"] == "error" and self.metrics:
            self.metrics.errors.labels("control").inc()
        if self.channel is not None and self.channel.readyState == "open":
            self.channel.send(json.dumps(event))
        for listener in list(self.listeners):
            try:
                listener(event)
            except Exception:  # one broken listener must not starve the others
                log.exception("session %s: event listener failed", self.id)

    def _maybe_ready(self) -> None:
        if self._ready_sent or self.sync is None or not self.sync.running:
            return
        if self.channel is None or self.channel.readyState != "open":
            return
        self._ready_sent = True
        self.emit({"type": "ready", "session_id": self.id, "avatar": self.avatar.info()})

    # -- teardown --------------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def closing(self) -> bool:
        """close() has begun: the session takes no more speech or calls."""
        return self._closing

    async def close(self, reason: str = "closed") -> None:
        if self._closing:
            await self.closed.wait()
            return
        self._closing = True
        self.end_reason = reason
        log.info("session %s ends: %s", self.id, reason)
        with contextlib.suppress(Exception):
            self.emit({"type": "session.ended", "reason": reason})
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()
        if self.sync:
            await self.sync.stop()
            st = self.sync.stats
            log.info("session %s: %d frames sent, %d late (clock slipped %.2f s), %d repeated;"
                     " the encoders fell behind and dropped %d video, %d audio frames",
                     self.id, st.frames_sent, st.underruns, self.sync.clock.slipped_s,
                     st.fillers, st.video_encoder_drops, st.audio_encoder_drops)
            if self.metrics:
                self.metrics.retire(self.sync.stats)
        self.video.stop()
        self.audio.stop()
        with contextlib.suppress(Exception):
            await self.pc.close()
        for task in list(self._tasks):
            if task is not current:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self.stream is not None:
            await self.worker.run(self.stream.close)
        self.input.close()
        self.speech.clear()
        self.listeners.clear()
        for hook in list(self.close_hooks):
            with contextlib.suppress(Exception):
                await hook()
        self.close_hooks.clear()
        self.closed.set()
        if self._on_closed:
            self._on_closed(self)

    def stats(self) -> dict[str, Any]:
        sync = self.sync.stats if self.sync else None
        return {
            "session_id": self.id,
            "state": self.pc.connectionState,
            "speech_queued_s": round(self.speech.seconds, 3),
            "age_s": round(asyncio.get_running_loop().time() - self.created_at, 1),
            **({k: round(v, 5) for k, v in vars(sync).items()} if sync else {}),
        }


async def _drain(track: MediaStreamTrack) -> None:
    with contextlib.suppress(MediaStreamError):
        while True:
            await track.recv()
