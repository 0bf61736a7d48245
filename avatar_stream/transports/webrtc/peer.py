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
import re
from collections.abc import Callable

import av
from aiortc import RTCIceTransport, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rtcdatachannel import RTCDataChannel
from aiortc.sdp import candidate_from_sdp

from avatar_stream import events
from avatar_stream.audio.resample import Resampler, frame_to_mono
from avatar_stream.core.session import Session
from avatar_stream.events import Event, Message
from avatar_stream.transports.protocol import SpeechProtocol
from avatar_stream.transports.webrtc.encoders import prefer_h264, use_avatar_encoders
from avatar_stream.transports.webrtc.ice import (
    TrickleFragment,
    candidate_allowed,
    remote_offer,
    rtc_configuration,
)
from avatar_stream.transports.webrtc.jitterbuffer import receive_audio_immediately
from avatar_stream.transports.webrtc.tracks import TrackSink

log = logging.getLogger(__name__)


class OfferError(ValueError):
    """The client's offer cannot start a session (HTTP 400)."""


class IceRestartRefused(ValueError):
    """Trickled candidates for new ICE credentials: an ICE restart, which aiortc cannot do."""


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
        self._ready_sent = False
        self.remote_ice: tuple[str | None, str | None] = (None, None)  # the offer's ufrag, pwd
        self.usable_candidates = 0  # remote candidates handed to ICE (offered or trickled)
        self._end_held = False  # the client's end-of-candidates, held until one is usable
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
        sdp, self.usable_candidates = remote_offer(offer_sdp,
                                                   self.session.config.ice_host_addresses)
        self._end_held = self.usable_candidates == 0 and "a=end-of-candidates" in offer_sdp
        self.remote_ice = (_sdp_value(offer_sdp, "ice-ufrag"), _sdp_value(offer_sdp, "ice-pwd"))
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
        await self.session.open(self.sink)
        self.pc.addTrack(self.video)
        if "audio" in kinds:
            self.pc.addTrack(self.audio)
        answer = await self.pc.createAnswer()
        await self.pc.setLocalDescription(answer)
        use_avatar_encoders(self.pc)
        return self.pc.localDescription.sdp

    @property
    def local_ice_ufrag(self) -> str | None:
        """This side's ICE username fragment: it names the ICE session (the WHEP ETag)."""
        local = self.pc.localDescription
        return _sdp_value(local.sdp, "ice-ufrag") if local else None

    async def add_candidates(self, frag: TrickleFragment) -> int:
        """Remote candidates trickled after the offer (and its end-of-candidates); returns how
        many reached ICE. Candidates outside ``--ice-host-addresses`` are dropped as in the
        offer, and end-of-candidates only reaches ICE once a usable candidate has (until
        then ICE keeps learning the client's peer-reflexive candidates from its checks)."""
        ufrag, pwd = self.remote_ice
        if (frag.ufrag and frag.ufrag != ufrag) or (frag.pwd and frag.pwd != pwd):
            raise IceRestartRefused(
                "these candidates are for new ICE credentials (an ICE restart); this server "
                "cannot restart ICE (aiortc does not support it): create a new session")
        transports = self._ice_transports()
        added = 0
        for mid, index, value in frag.candidates:
            if not candidate_allowed(value, self.session.config.ice_host_addresses):
                continue
            candidate = candidate_from_sdp(value.split(":", 1)[1])
            candidate.sdpMid, candidate.sdpMLineIndex = mid, index
            transport = transports.get(mid) or transports.get(index) or transports.get(None)
            if transport is not None:
                await transport.addRemoteCandidate(candidate)
                added += 1
        self.usable_candidates += added
        if frag.end:
            self._end_held = True
        if self._end_held and self.usable_candidates:
            self._end_held = False
            for transport in set(transports.values()):
                await transport.addRemoteCandidate(None)
        return added

    def _ice_transports(self) -> dict[str | int | None, RTCIceTransport]:
        """Each media section's ICE transport by mid and by m-line index (None: the first;
        bundled sections share one)."""
        out: dict[str | int | None, RTCIceTransport] = {}
        for i, transceiver in enumerate(self.pc.getTransceivers()):
            transport = transceiver.receiver.transport.transport
            out.setdefault(None, transport)
            out.setdefault(i, transport)
            if transceiver.mid is not None:
                out[transceiver.mid] = transport
        sctp = self.pc.sctp
        if sctp is not None and sctp.mid is not None:
            out[sctp.mid] = sctp.transport.transport
        return out

    def _wire_events(self) -> None:
        pc, session = self.pc, self.session

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind == "audio":
                session.spawn(self._listen(track))
            else:
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

    async def _listen(self, track: MediaStreamTrack) -> None:
        """Drain the client's audio (aiortc's queue is unbounded) into the session's
        speech input, as microphone speech."""
        resample = Resampler()
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            if isinstance(frame, av.AudioFrame):
                self.session.input.listen(resample(frame_to_mono(frame), frame.sample_rate))

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


def _sdp_value(sdp: str, attribute: str) -> str | None:
    """The first ``a=<attribute>:<value>`` of an SDP."""
    match = re.search(rf"^a={re.escape(attribute)}:(\S+)", sdp, re.MULTILINE)
    return match.group(1) if match else None


async def _drain(track: MediaStreamTrack) -> None:
    with contextlib.suppress(MediaStreamError):
        while True:
            await track.recv()
