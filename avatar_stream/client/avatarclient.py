"""An async Python client for avatar-stream, over a real aiortc peer connection.

It does what a browser does: offers audio (send/receive) and video (receive) plus the
``control`` data channel, plays speech into its outgoing audio track in real time, and
records what comes back (when each video frame and audio frame arrived, and with what
timestamp) so the benchmark and the tests can measure it.

It also does what a voice-assistant front-end does: pushes speech ahead of playout (HTTP
or the data channel, any rate, utterance by utterance), ends utterances, barges in, and
iterates the session's events. ``SessionControl`` (from ``control.py``, re-exported here)
does the same for a session another peer holds, without media.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import av
import numpy as np
from aiortc import RTCPeerConnection, RTCRtpReceiver, RTCSessionDescription
from aiortc.codecs.opus import OpusDecoder
from aiortc.jitterbuffer import JitterFrame
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rtp import RtpPacket

from avatar_stream.audio.resample import frame_to_mono
from avatar_stream.client.sessioncontrol import (
    Audio,
    EventHub,
    RequestError,
    SessionCalls,
    SessionControl,
    SpeechSender,
    stream_pcm16,
)
from avatar_stream.config import IceServer
from avatar_stream.core.turnstate import check_state
from avatar_stream.media import OUT_RATE
from avatar_stream.transports.webrtc.encoders import OpusPacketEncoder, use_avatar_encoders
from avatar_stream.transports.webrtc.ice import (
    filter_candidates,
    restrict_host_addresses,
    rtc_configuration,
)
from avatar_stream.transports.webrtc.jitterbuffer import ArrivalRecordingBuffer, record_arrivals

# Audio packets held back before one plays (reorder room): 2 (40 ms) is what a browser
# holds on a clean link (Chromium's getStats read 46 ms of audio jitter buffer against this
# server on loopback); aiortc's own receiver holds a fixed 4 (80 ms).
AUDIO_PREFETCH = 2
MIC_RATE = OUT_RATE
MIC_FRAME = 960  # 20 ms
MIC_TIME_BASE = fractions.Fraction(1, MIC_RATE)
# speech pushed on the data channel: stop sending above HIGH bytes buffered, go on below LOW
DC_HIGH_WATER = 256 * 1024
DC_LOW_WATER = 64 * 1024

__all__ = ["AvatarClient", "RequestError", "SessionControl", "SpeechTrack", "Received"]


class SpeechTrack(MediaStreamTrack):
    """An outgoing microphone: silence, or the clip given to ``play()``, paced in real time.

    Every sample it sent is kept with the time it left (``sent``, ``sent_t0``), so what
    comes back can be lined up with it.
    """

    kind = "audio"
    #: Opus packets of the clips played with ``reuse_packets``, per clip (a load generator
    #: encodes each clip once per process, not once per session)
    _packets: dict[int, tuple[np.ndarray, list[bytes]]] = {}  # noqa: RUF012

    def __init__(self, record: bool = True, reuse_packets: bool = False) -> None:
        super().__init__()
        self.reuse_packets = reuse_packets
        self._clip = np.zeros(0, np.int16)
        self._pos = 0
        self._n = 0
        self._t0: float | None = None
        self.record = record
        self.sent_chunks: list[np.ndarray] = []
        self.opus: OpusPacketEncoder | None = None  # set once Opus is negotiated
        self.play_started: list[tuple[float, int]] = []  # (time, sample index) of play()

    @property
    def sent_t0(self) -> float | None:
        """Wall-clock (perf_counter) time of the first sample sent."""
        return self._t0

    @property
    def sent(self) -> np.ndarray:
        return np.concatenate(self.sent_chunks) if self.sent_chunks else np.zeros(0, np.int16)

    def play(self, pcm: np.ndarray) -> None:
        """Start sending ``pcm`` (int16 or float, 48 kHz mono) with the next frame."""
        if pcm.dtype != np.int16:
            pcm = (np.clip(pcm, -1, 1) * 32767).astype(np.int16)
        self._clip, self._pos = pcm, 0
        self.play_started.append((time.perf_counter(), self._n * MIC_FRAME))

    async def recv(self) -> av.AudioFrame | av.Packet:
        if self.readyState != "live":
            raise MediaStreamError
        if self._t0 is None:
            self._t0 = time.perf_counter()
        delay = self._t0 + self._n * MIC_FRAME / MIC_RATE - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        at = self._pos if self._pos < len(self._clip) else -1  # -1: silence
        chunk = self._clip[self._pos : self._pos + MIC_FRAME]
        self._pos += len(chunk)
        if len(chunk) < MIC_FRAME:
            chunk = np.concatenate([chunk, np.zeros(MIC_FRAME - len(chunk), np.int16)])
        if self.record:
            self.sent_chunks.append(chunk)
        pts = self._n * MIC_FRAME
        self._n += 1
        if self.opus is not None and self.reuse_packets:
            return self._reused_packet(at, pts)
        frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = MIC_RATE
        frame.pts = pts
        frame.time_base = MIC_TIME_BASE
        return self.opus.encode(frame) if self.opus is not None else frame

    def _reused_packet(self, at: int, pts: int) -> av.Packet:
        """The packet for this frame encoded once per clip (silence: once at all)."""
        clip = self._clip if at >= 0 else _SILENCE
        cached = self._packets.get(id(clip))
        if cached is None or cached[0] is not clip:
            encoder = OpusPacketEncoder()
            packets = []
            for i in range(0, max(len(clip), 1), MIC_FRAME):
                chunk = np.zeros(MIC_FRAME, np.int16)
                part = clip[i : i + MIC_FRAME]
                chunk[: len(part)] = part
                f = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
                f.sample_rate, f.pts, f.time_base = MIC_RATE, i, MIC_TIME_BASE
                packets.append(bytes(encoder.encode(f)))
            if len(self._packets) > 16:
                self._packets.clear()
            cached = self._packets[id(clip)] = (clip, packets)
        packet = av.Packet(cached[1][max(at, 0) // MIC_FRAME])
        packet.pts = pts
        packet.time_base = MIC_TIME_BASE
        return packet


_SILENCE = np.zeros(MIC_FRAME, np.int16)


@dataclass
class Received:
    """What came back: one row per frame, with its arrival time (perf_counter)."""

    video_t: list[float] = field(default_factory=list)
    video_net_t: list[float] = field(default_factory=list)  # last packet off the network
    video_pts: list[int] = field(default_factory=list)
    video_key: list[bool] = field(default_factory=list)  # decoded frames: a keyframe?
    # every video packet: (arrival, sequence number, payload bytes), for the bitrate
    video_packets: list[tuple[float, int, int]] = field(default_factory=list)
    mouth: list[np.ndarray] = field(default_factory=list)  # luma crops of the mouth box
    faces: list[np.ndarray] = field(default_factory=list)  # luma crops of the face box
    audio_t: list[float] = field(default_factory=list)
    audio_net_t: list[float] = field(default_factory=list)
    audio_pts: list[int] = field(default_factory=list)
    audio: list[np.ndarray] = field(default_factory=list)  # float32 mono 48 kHz per frame
    # undecoded audio (``decode_audio=False``): (arrival, sequence number, RTP timestamp, Opus)
    audio_packets: list[tuple[float, int, int, bytes]] = field(default_factory=list)
    events: list[tuple[float, dict[str, Any]]] = field(default_factory=list)

    def fps(self, since: float | None = None, until: float | None = None) -> float:
        ts = [t for t in self.video_t
              if (since is None or t >= since) and (until is None or t <= until)]
        return (len(ts) - 1) / (ts[-1] - ts[0]) if len(ts) > 1 and ts[-1] > ts[0] else 0.0

    def audio_samples(self) -> np.ndarray:
        return np.concatenate(self.audio) if self.audio else np.zeros(0, np.float32)

    def decode_packets(self, prefetch: int = AUDIO_PREFETCH) -> None:
        """Decode the kept Opus packets into ``audio`` as a receiver holding ``prefetch``
        packets back would have played them: packet i plays once packets i .. i+prefetch
        are in (when the next ones never come, at its own arrival)."""
        if not self.audio_packets:
            return
        first = self.audio_packets[0][1]
        packets = sorted(self.audio_packets, key=lambda p: _unwrap_seq(p[1], first))
        arrivals = [p[0] for p in packets]
        decoder = OpusDecoder()
        played = 0.0
        for i, (arrived, _, timestamp, payload) in enumerate(packets):
            ready = max(arrivals[i : i + prefetch + 1])
            played = max(played, ready)
            for frame in decoder.decode(JitterFrame(payload, timestamp)):
                assert isinstance(frame, av.AudioFrame)
                self.audio_t.append(played)
                self.audio_net_t.append(arrived)
                self.audio_pts.append(timestamp)
                self.audio.append(frame_to_mono(frame))
        self.audio_packets = []


def _unwrap_seq(seq: int, first: int) -> int:
    """A 16-bit RTP sequence number as a distance from ``first`` (wraps forward)."""
    return (seq - first) % 65536


class AvatarClient(SessionCalls):
    """One session, as a client: ``async with AvatarClient(url) as c: ...``.

    ``token`` is the session token from the server (for this session's calls);
    ``api_key`` is needed to create a session on a server that has one.
    ``audio_prefetch``: audio packets (20 ms each) held back to reorder before playing.
    ``on_frame(frame, arrived)`` gets every decoded video and audio frame as it comes (a
    relay into another pipeline); with ``record=False`` nothing is kept in ``received``,
    so a long session holds no memory per frame.
    ``microphone``: ``"speak"`` (the server's default: the avatar says what ``mic`` plays)
    or ``"listen"`` (``mic`` is the user's voice: the avatar listens while it speaks).
    """

    def __init__(
        self,
        base_url: str,
        *,
        avatar: str | None = None,
        ice_servers: list[IceServer] | None = None,
        ice_host_addresses: list[str] | None = ("127.0.0.1",),  # type: ignore[assignment]
        record_mouth: bool = True,
        record_face: bool = False,
        decode_video: bool = True,
        decode_audio: bool = True,
        api_key: str | None = None,
        audio_prefetch: int = AUDIO_PREFETCH,
        video_codecs: list[str] | None = None,
        record: bool = True,
        on_frame: Callable[[av.VideoFrame | av.AudioFrame, float], None] | None = None,
        microphone: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.microphone = microphone
        self.audio_prefetch = audio_prefetch
        self.api_key = api_key
        self.token: str | None = None
        self.hub = EventHub()
        self.avatar = avatar
        self.ice_host_addresses = list(ice_host_addresses) if ice_host_addresses else None
        self.pc = RTCPeerConnection(rtc_configuration(ice_servers or []))
        # a client that decodes nothing is a load generator: its microphone reuses packets
        self.mic = SpeechTrack(reuse_packets=not (decode_video or decode_audio))
        self.received = Received()
        self.session_id: str | None = None
        self.avatar_info: dict[str, Any] = {}
        self.record_mouth = record_mouth
        self.record_face = record_face
        # False: only note when each frame's last packet (its marker bit) arrived
        self.decode_video = decode_video
        # False: keep the Opus packets undecoded (``received.decode_packets()`` after)
        self.decode_audio = decode_audio
        self.video_codecs = video_codecs  # e.g. ["video/VP8"]: offer only these (default: all)
        self.record = record
        self.on_frame = on_frame
        self._last_rtp: int | None = None
        self.connect_started: float | None = None
        self.first_frame_at: float | None = None
        self._channel = self.pc.createDataChannel("control")
        self._channel.bufferedAmountLowThreshold = DC_LOW_WATER
        self._buffer_low = asyncio.Event()
        self._sender = SpeechSender(self._dc_send_text, self._dc_send_bytes, self._dc_drain)
        self._events: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=1000)
        self._event_listeners: list[Callable[[dict[str, Any]], None]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._http: aiohttp.ClientSession | None = None
        self._channel_open = asyncio.Event()
        self._arrivals: dict[str, ArrivalRecordingBuffer] = {}

    async def __aenter__(self) -> AvatarClient:
        try:
            await self.connect()
        except BaseException:  # refused or failed: nothing of it stays open
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self, timeout: float = 30.0) -> None:
        self.connect_started = time.perf_counter()
        if self.ice_host_addresses:
            # our own candidates too (process-wide: aioice offers no per-connection setting)
            restrict_host_addresses(self.ice_host_addresses)
        # no call of ours should wait forever on a server that stopped answering
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        self.pc.addTrack(self.mic)
        video = self.pc.addTransceiver("video", direction="recvonly")
        if self.video_codecs:
            wanted = [m.lower() for m in self.video_codecs]
            capabilities = RTCRtpReceiver.getCapabilities("video")
            caps = capabilities.codecs if capabilities else []
            chosen = [c for m in wanted for c in caps if c.mimeType.lower() == m]
            if not chosen:
                known = sorted({c.mimeType for c in caps})
                raise ValueError(f"no video codec among {self.video_codecs}; known: {known}")
            video.setCodecPreferences(
                chosen + [c for c in caps if c.mimeType.lower() == "video/rtx"]
            )

        @self.pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            self._tasks.append(asyncio.create_task(self._record(track)))

        @self._channel.on("open")
        def on_open() -> None:
            self._channel_open.set()

        @self._channel.on("bufferedamountlow")
        def on_buffer_low() -> None:
            self._buffer_low.set()

        @self._channel.on("message")
        def on_message(message: str | bytes) -> None:
            if isinstance(message, str):
                event = json.loads(message)
                if self.record:
                    self.received.events.append((time.perf_counter(), event))
                self._sender.on_message(event)
                self.hub.publish(event)
                with contextlib.suppress(asyncio.QueueFull):
                    self._events.put_nowait(event)

        offer = await self.pc.createOffer()
        await self.pc.setLocalDescription(offer)
        body: dict[str, Any] = {"type": "offer", "sdp": self.pc.localDescription.sdp}
        if self.avatar:
            body["avatar"] = self.avatar
        if self.microphone:
            body["microphone"] = self.microphone
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        async with self._http.post(f"{self.base_url}/v1/sessions", json=body,
                                   headers=headers) as resp:
            data = await resp.json()
            if resp.status != 201:
                raise RequestError(resp.status, f"session refused: {data.get('error')}")
        self.session_id = data["session_id"]
        self.token = data.get("token")
        self.avatar_info = data.get("avatar", {})
        answer = filter_candidates(data["sdp"], self.ice_host_addresses)
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        use_avatar_encoders(self.pc)  # the microphone encodes its own Opus, as the server does
        taps: dict[str, Callable[[float, RtpPacket], None]] = {}
        if not self.decode_video:
            taps["video"] = self._video_packet
        if not self.decode_audio:
            taps["audio"] = self._audio_packet
        self._arrivals = record_arrivals(self.pc, self.audio_prefetch, taps,
                                         {"video": self._video_packet})
        await asyncio.wait_for(self.wait_event("ready"), timeout)

    def _audio_packet(self, t: float, packet: RtpPacket) -> None:
        self.received.audio_packets.append(
            (t, packet.sequence_number, packet.timestamp, packet.payload))

    def _video_packet(self, t: float, packet: RtpPacket) -> None:
        self.received.video_packets.append((t, packet.sequence_number, len(packet.payload)))
        if packet.marker and not self.decode_video:  # a frame's last packet
            self._frame_arrived(t, packet.timestamp)

    def _frame_arrived(self, t: float, rtp_timestamp: int) -> None:
        """A video frame that will not be decoded: its arrival and (unwrapped) timestamp."""
        rec = self.received
        if self.first_frame_at is None:
            self.first_frame_at = t
        pts = rtp_timestamp
        if rec.video_pts:
            step = (rtp_timestamp - self._last_rtp) % (1 << 32) if self._last_rtp is not None \
                else 0
            pts = rec.video_pts[-1] + (step if step < (1 << 31) else step - (1 << 32))
        self._last_rtp = rtp_timestamp
        rec.video_t.append(t)
        rec.video_net_t.append(t)
        rec.video_pts.append(pts)

    async def _record(self, track: MediaStreamTrack) -> None:
        rec = self.received
        box = self.avatar_info.get("mouth_box")
        face = self.avatar_info.get("face_box")
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            now = time.perf_counter()
            arrivals = self._arrivals.get(track.kind)
            net_t = arrivals.frames_out.popleft() if arrivals and arrivals.frames_out else now
            if self.on_frame is not None and isinstance(frame, av.VideoFrame | av.AudioFrame):
                self.on_frame(frame, now)
            if not self.record:
                if self.first_frame_at is None and isinstance(frame, av.VideoFrame):
                    self.first_frame_at = now
                continue
            if isinstance(frame, av.VideoFrame):
                if self.first_frame_at is None:
                    self.first_frame_at = now
                rec.video_t.append(now)
                rec.video_net_t.append(net_t)
                rec.video_pts.append(int(frame.pts or 0))
                rec.video_key.append(bool(frame.key_frame))
                if (self.record_mouth and box) or (self.record_face and face):
                    luma = frame.to_ndarray(format="gray")
                if self.record_mouth and box:
                    x0, y0, x1, y1 = box
                    rec.mouth.append(luma[y0:y1, x0:x1].copy())
                if self.record_face and face:
                    x0, y0, x1, y1 = face
                    rec.faces.append(luma[y0:y1, x0:x1].copy())
            elif isinstance(frame, av.AudioFrame):
                rec.audio_t.append(now)
                rec.audio_net_t.append(net_t)
                rec.audio_pts.append(int(frame.pts or 0))
                rec.audio.append(frame_to_mono(frame))

    async def wait_event(
        self, kind: str, predicate: Callable[[dict[str, Any]], bool] | None = None
    ) -> dict[str, Any]:
        """Next event of this type (events already received are checked first)."""
        for _, event in self.received.events:
            if event.get("type") == kind and (predicate is None or predicate(event)) and \
                    not event.get("_seen"):
                event["_seen"] = True
                return event
        while True:
            event = await self._events.get()
            if event.get("type") == kind and (predicate is None or predicate(event)) and \
                    not event.get("_seen"):
                event["_seen"] = True
                return event

    def send(self, message: dict[str, Any]) -> None:
        self._channel.send(json.dumps(message))

    def interrupt(self) -> float:
        """Barge in over the data channel; returns when it was sent."""
        self._sender.cut()
        self.send({"type": "interrupt"})
        return time.perf_counter()

    async def set_state(self, state: str, via: str = "datachannel") -> None:
        """The turn state: ``listening`` (the user speaks), ``thinking`` (the reply is on
        its way) or ``idle``. Speech shows over it; ``thinking`` ends when speech starts.
        Over the data channel (default, ordered with the speech sent there) or HTTP; a
        ``state.changed`` event follows when what the face shows changes. ValueError for
        another state (checked here, so the server never has to refuse it)."""
        check_state(state)
        if via == "datachannel":
            self.send({"type": "state", "state": state})
        elif via == "http":
            await self.set_state_http(state)
        else:
            raise ValueError("via must be 'datachannel' or 'http'")

    # -- pushed speech -------------------------------------------------------------------

    async def push_speech(
        self, audio: Audio, rate: int, utterance_id: str | None = None, end: bool = True, *,
        channels: int | None = None, via: str = "http",
    ) -> str:
        """Queue speech ahead of playout; returns the utterance id.

        ``audio``: numpy (float in [-1, 1] or int16; (n,) or (n, channels)) or bytes
        (PCM16 little-endian, or a whole WAV file), at any ``rate``. ``via="http"`` posts
        it; ``via="datachannel"`` streams it on the peer connection's ``control`` channel,
        pausing while more than 256 KB is buffered there. With ``end=False`` more pieces
        of the utterance may follow under the same id. Raises RequestError when refused
        (over HTTP, 429: the queue is full and nothing of this push was queued; on the
        data channel a full queue is waited out and the refused audio resent).
        """
        if via == "http":
            reply = await self.push_speech_http(audio, rate, utterance_id, end, channels)
            return str(reply["utterance_id"])
        if via != "datachannel":
            raise ValueError("via must be 'http' or 'datachannel'")
        pcm16, rate, ch = stream_pcm16(audio, rate, channels)
        return await self._sender.send(pcm16, rate, ch, utterance_id, end)

    async def end_utterance(self, utterance_id: str, via: str = "http") -> None:
        """No more audio for this utterance (it plays to its end, then speech.finished)."""
        if via == "datachannel":  # after the audio already sent there
            await self._sender.end(utterance_id)
        else:
            await self.end_utterance_http(utterance_id)

    def events(self) -> AsyncIterator[dict[str, Any]]:
        """Session events from now on (data channel), until close()."""
        return self.hub.events()

    async def _dc_send_text(self, text: str) -> None:
        self._channel.send(text)

    async def _dc_send_bytes(self, data: bytes) -> None:
        self._channel.send(data)

    async def _dc_drain(self) -> None:
        """Wait while the data channel holds more than DC_HIGH_WATER bytes unsent: SCTP
        sends at the congestion window's pace, and aiortc buffers without bound."""
        channel = self._channel
        while channel.bufferedAmount > DC_HIGH_WATER and channel.readyState == "open":
            self._buffer_low.clear()
            await asyncio.wait_for(self._buffer_low.wait(), 30)

    async def close(self) -> None:
        self.hub.finish()
        if self._http is not None and self.session_id is not None:
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                async with self._http.delete(f"{self.base_url}/v1/sessions/{self.session_id}",
                                             headers=self._auth()):
                    pass
        for task in self._tasks:
            task.cancel()
        await self.pc.close()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._http is not None:
            await self._http.close()
