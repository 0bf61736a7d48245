"""An async Python client for avatar-stream, over a real aiortc peer connection.

It does what a browser does: offers audio (send/receive) and video (receive) plus the
``control`` data channel, plays speech into its outgoing audio track in real time, and
records what comes back (when each video frame and audio frame arrived, and with what
timestamp) so the benchmark and the tests can measure it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import json
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import av
import numpy as np
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rtp import RtpPacket

from .config import IceServer
from .ice import filter_candidates, restrict_host_addresses, rtc_configuration

MIC_RATE = 48_000
MIC_FRAME = 960  # 20 ms


class SpeechTrack(MediaStreamTrack):
    """An outgoing microphone: silence, or the clip given to ``play()``, paced in real time.

    Every sample it sent is kept with the time it left (``sent``, ``sent_t0``), so what
    comes back can be lined up with it.
    """

    kind = "audio"

    def __init__(self, record: bool = True) -> None:
        super().__init__()
        self._clip = np.zeros(0, np.int16)
        self._pos = 0
        self._n = 0
        self._t0: float | None = None
        self.record = record
        self.sent_chunks: list[np.ndarray] = []
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

    @property
    def playing(self) -> bool:
        return self._pos < len(self._clip)

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._t0 is None:
            self._t0 = time.perf_counter()
        delay = self._t0 + self._n * MIC_FRAME / MIC_RATE - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        chunk = self._clip[self._pos : self._pos + MIC_FRAME]
        self._pos += len(chunk)
        if len(chunk) < MIC_FRAME:
            chunk = np.concatenate([chunk, np.zeros(MIC_FRAME - len(chunk), np.int16)])
        if self.record:
            self.sent_chunks.append(chunk)
        frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = MIC_RATE
        frame.pts = self._n * MIC_FRAME
        frame.time_base = fractions.Fraction(1, MIC_RATE)
        self._n += 1
        return frame


class ArrivalRecordingBuffer(JitterBuffer):
    """aiortc's own jitter buffer, noting when each frame's last packet came off the network.

    A receiver's buffering delays audio and video by different amounts (aiortc holds audio
    back 4 packets, video one frame); a lip-syncing receiver undoes that with RTCP. The
    network arrival times say what the sender put on the wire, independent of this
    client's buffers.
    """

    def __init__(self, capacity: int, prefetch: int = 0, is_video: bool = False) -> None:
        super().__init__(capacity, prefetch=prefetch, is_video=is_video)
        self._arrived: dict[int, float] = {}
        self.frames_out: deque[float] = deque(maxlen=256)

    def add(self, packet: RtpPacket) -> tuple[bool, JitterFrame | None]:
        self._arrived[packet.timestamp] = time.perf_counter()
        pli, frame = super().add(packet)
        if frame is not None:
            self.frames_out.append(self._arrived.pop(frame.timestamp, time.perf_counter()))
            if len(self._arrived) > 512:  # timestamps of frames that never completed
                self._arrived.clear()
        return pli, frame


def _record_arrivals(pc: RTCPeerConnection) -> dict[str, ArrivalRecordingBuffer]:
    """Swap each receiver's jitter buffer for a recording one with the same settings."""
    buffers = {}
    for transceiver in pc.getTransceivers():
        receiver = transceiver.receiver
        old = receiver._RTCRtpReceiver__jitter_buffer  # no public hook in aiortc
        new = ArrivalRecordingBuffer(old.capacity, old._prefetch, old._is_video)
        receiver._RTCRtpReceiver__jitter_buffer = new
        buffers[transceiver.kind] = new
    return buffers


@dataclass
class Received:
    """What came back: one row per frame, with its arrival time (perf_counter)."""

    video_t: list[float] = field(default_factory=list)
    video_net_t: list[float] = field(default_factory=list)  # last packet off the network
    video_pts: list[int] = field(default_factory=list)
    mouth: list[np.ndarray] = field(default_factory=list)  # luma crops of the mouth box
    audio_t: list[float] = field(default_factory=list)
    audio_net_t: list[float] = field(default_factory=list)
    audio_pts: list[int] = field(default_factory=list)
    audio: list[np.ndarray] = field(default_factory=list)  # float32 mono 48 kHz per frame
    events: list[tuple[float, dict[str, Any]]] = field(default_factory=list)

    def fps(self, since: float | None = None) -> float:
        ts = [t for t in self.video_t if since is None or t >= since]
        return (len(ts) - 1) / (ts[-1] - ts[0]) if len(ts) > 1 and ts[-1] > ts[0] else 0.0

    def audio_samples(self) -> np.ndarray:
        return np.concatenate(self.audio) if self.audio else np.zeros(0, np.float32)


class AvatarClient:
    """One session, as a client: ``async with AvatarClient(url) as c: ...``."""

    def __init__(
        self,
        base_url: str,
        *,
        avatar: str | None = None,
        ice_servers: list[IceServer] | None = None,
        ice_host_addresses: list[str] | None = ("127.0.0.1",),  # type: ignore[assignment]
        record_mouth: bool = True,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.avatar = avatar
        self.ice_host_addresses = list(ice_host_addresses) if ice_host_addresses else None
        self.pc = RTCPeerConnection(rtc_configuration(ice_servers or []))
        self.mic = SpeechTrack()
        self.received = Received()
        self.session_id: str | None = None
        self.avatar_info: dict[str, Any] = {}
        self.record_mouth = record_mouth
        self.connect_started: float | None = None
        self.first_frame_at: float | None = None
        self._channel = self.pc.createDataChannel("control")
        self._events: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=1000)
        self._event_listeners: list[Callable[[dict[str, Any]], None]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._http: aiohttp.ClientSession | None = None
        self._channel_open = asyncio.Event()
        self._arrivals: dict[str, ArrivalRecordingBuffer] = {}

    async def __aenter__(self) -> AvatarClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self, timeout: float = 30.0) -> None:
        self.connect_started = time.perf_counter()
        if self.ice_host_addresses:
            # our own candidates too (process-wide: aioice offers no per-connection setting)
            restrict_host_addresses(self.ice_host_addresses)
        self._http = aiohttp.ClientSession()
        self.pc.addTrack(self.mic)
        self.pc.addTransceiver("video", direction="recvonly")

        @self.pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            self._tasks.append(asyncio.create_task(self._record(track)))

        @self._channel.on("open")
        def on_open() -> None:
            self._channel_open.set()

        @self._channel.on("message")
        def on_message(message: str | bytes) -> None:
            if isinstance(message, str):
                event = json.loads(message)
                self.received.events.append((time.perf_counter(), event))
                with contextlib.suppress(asyncio.QueueFull):
                    self._events.put_nowait(event)

        offer = await self.pc.createOffer()
        await self.pc.setLocalDescription(offer)
        body: dict[str, Any] = {"type": "offer", "sdp": self.pc.localDescription.sdp}
        if self.avatar:
            body["avatar"] = self.avatar
        async with self._http.post(f"{self.base_url}/v1/sessions", json=body) as resp:
            data = await resp.json()
            if resp.status != 201:
                raise RuntimeError(f"session refused ({resp.status}): {data.get('error')}")
        self.session_id = data["session_id"]
        self.avatar_info = data.get("avatar", {})
        answer = filter_candidates(data["sdp"], self.ice_host_addresses)
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        self._arrivals = _record_arrivals(self.pc)
        await asyncio.wait_for(self.wait_event("ready"), timeout)

    async def _record(self, track: MediaStreamTrack) -> None:
        rec = self.received
        box = self.avatar_info.get("mouth_box")
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            now = time.perf_counter()
            arrivals = self._arrivals.get(track.kind)
            net_t = arrivals.frames_out.popleft() if arrivals and arrivals.frames_out else now
            if track.kind == "video":
                if self.first_frame_at is None:
                    self.first_frame_at = now
                rec.video_t.append(now)
                rec.video_net_t.append(net_t)
                rec.video_pts.append(int(frame.pts))
                if self.record_mouth and box:
                    luma = frame.to_ndarray(format="gray")
                    x0, y0, x1, y1 = box
                    rec.mouth.append(luma[y0:y1, x0:x1].copy())
            else:
                pcm = frame.to_ndarray()
                channels = len(frame.layout.channels)
                pcm = pcm.reshape(-1, channels).mean(axis=1) if not frame.format.is_planar \
                    else pcm.reshape(channels, -1).mean(axis=0)
                rec.audio_t.append(now)
                rec.audio_net_t.append(net_t)
                rec.audio_pts.append(int(frame.pts))
                rec.audio.append((pcm / 32768.0).astype(np.float32))

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
        self.send({"type": "interrupt"})
        return time.perf_counter()

    async def close(self) -> None:
        if self._http is not None and self.session_id is not None:
            with contextlib.suppress(aiohttp.ClientError):
                async with self._http.delete(f"{self.base_url}/v1/sessions/{self.session_id}"):
                    pass
        for task in self._tasks:
            task.cancel()
        await self.pc.close()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._http is not None:
            await self._http.close()
