"""The WebRTC transport: one aiortc peer connection carrying one core session.

The peer answers the viewer's offer, sends the session's media on two paced tracks (its
:class:`TrackSink`), drains the viewer's microphone into the session's speech input, speaks
the speech protocol on the ``control`` data channel (where the session's events go too),
and ends the session when the connection fails or closes.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable

import numpy as np
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rtcdatachannel import RTCDataChannel

from avatar_stream import events
from avatar_stream.audio.resample import Resampler
from avatar_stream.core.session import Session
from avatar_stream.events import Event, Message
from avatar_stream.transports.protocol import SpeechProtocol
from avatar_stream.transports.webrtc.encoders import prefer_h264, use_avatar_encoders
from avatar_stream.transports.webrtc.feedback import VideoFeedback, watch_video_feedback
from avatar_stream.transports.webrtc.ice import filter_candidates, rtc_configuration
from avatar_stream.transports.webrtc.jitterbuffer import decode_audio_on_arrival
from avatar_stream.transports.webrtc.tracks import TrackSink

log = logging.getLogger(__name__)


class OfferError(ValueError):
    """The client's offer cannot start a session (HTTP 400)."""


class WebRTCPeer:
    def __init__(self, session: Session) -> None:
        self.session = session
        config = session.config
        self.pc = RTCPeerConnection(rtc_configuration(config.ice_servers))
        encode = session.metrics.encode if session.metrics else None
        self.sink = TrackSink(
            on_video_sent=encode.labels("video").observe if encode else None,
            on_audio_sent=encode.labels("audio").observe if encode else None,
        )
        self.video, self.audio = self.sink.video, self.sink.audio
        self.channel: RTCDataChannel | None = None
        self._resample = Resampler()
        self.feedback: list[VideoFeedback] = []
        self._ready_sent = False
        session.transport = self
        session.listeners.append(self._to_channel)

    @property
    def state(self) -> str:
        return self.pc.connectionState

    @property
    def av_skew_s(self) -> float:
        return self.video.last_wait_s - self.audio.last_wait_s

    # -- set-up ----------------------------------------------------------------------

    async def accept(self, offer_sdp: str) -> str:
        """Answer the client's offer; on failure the session is closed and OfferError raised."""
        try:
            return await self._accept(offer_sdp)
        except Exception:
            await self.session.close("offer rejected")
            raise

    async def _accept(self, offer_sdp: str) -> str:
        sdp = filter_candidates(offer_sdp, self.session.config.ice_host_addresses)
        self._wire_events()  # "track" fires inside setRemoteDescription
        try:
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        except Exception as exc:  # aiortc raises several kinds on a malformed SDP
            raise OfferError(f"invalid SDP offer: {exc}") from exc
        decode_audio_on_arrival(self.pc, self._heard)
        prefer_h264(self.pc)
        kinds = [t.kind for t in self.pc.getTransceivers()]
        if "video" not in kinds:
            raise OfferError("the offer has no video m-line to receive the avatar on")
        await self.session.open(self.sink)
        self.pc.addTrack(self.video)
        if "audio" in kinds:
            self.pc.addTrack(self.audio)
        answer = await self.pc.createAnswer()
        await self.pc.setLocalDescription(answer)
        use_avatar_encoders(self.pc)
        self.feedback = watch_video_feedback(self.pc)
        return self.pc.localDescription.sdp

    def _wire_events(self) -> None:
        pc, session = self.pc, self.session

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind != "audio":  # (audio is decoded as it arrives: ``_heard``)
                session.spawn(_drain(track))  # nothing to do with client video, but drain it

        @pc.on("datachannel")
        def on_datachannel(channel: RTCDataChannel) -> None:
            if channel.label != "control":
                return
            self.channel = channel
            protocol = SpeechProtocol(
                session.input, session.interrupt, self._reply_on(channel),
                max_binary_bytes=session.config.max_ws_message_bytes, on_activity=session.touch,
                set_state=session.set_state,
            )
            channel.on("message", protocol.handle)
            self._maybe_ready()

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            state = pc.connectionState
            log.info("session %s: %s", session.id, state)
            if state == "connected":
                session.start()
                self._maybe_ready()
            elif state in ("failed", "closed"):
                await session.close(f"peer connection {state}")

    # -- speech in -------------------------------------------------------------------

    def _heard(self, samples: np.ndarray, rate: int) -> None:
        """The client's audio as it arrives, into the session's speech input as
        microphone speech."""
        self.session.input.listen(self._resample(samples, rate))

    # -- events out ------------------------------------------------------------------

    def _to_channel(self, event: Event) -> None:
        if self.channel is not None and self.channel.readyState == "open":
            self.channel.send(json.dumps(event))

    def _reply_on(self, channel: RTCDataChannel) -> Callable[[Message], None]:
        """Replies meant for one data channel only (acks, protocol errors, pong)."""
        metrics = self.session.metrics

        def reply(event: Message) -> None:
            if event["type"] == events.ERROR and metrics:
                metrics.errors.labels("control").inc()
            if channel.readyState == "open":
                channel.send(json.dumps(event))

        return reply

    def _maybe_ready(self) -> None:
        if self._ready_sent or not self.session.running:
            return
        if self.channel is None or self.channel.readyState != "open":
            return
        self._ready_sent = True
        session = self.session
        session.emit(events.ready(session.id, session.avatar.info()))

    # -- teardown --------------------------------------------------------------------

    async def close(self) -> None:
        self.sink.stop()
        with contextlib.suppress(Exception):
            await self.pc.close()


async def _drain(track: MediaStreamTrack) -> None:
    with contextlib.suppress(MediaStreamError):
        while True:
            await track.recv()
