"""A test peer with known delays, to check the benchmark's estimators against ground truth.

It speaks the server's HTTP interface (POST/DELETE /v1/sessions, the control channel's
`ready`) over real aiortc, and echoes the client's audio back after ``audio_delay_s``. Its
video is a grey picture whose mouth box darkens with the loudness of the audio it received
``video_delay_s`` ago. So the true echo latency differs between two peers by exactly the
difference of their audio delays, and the true A/V offset by the difference of the delays.
On an ``interrupt`` message it drops the speech it still holds ``cut_delay_s`` later, so
the true interrupt -> silence delay differs between two peers by their cut delays.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import json
import time
from collections import deque
from collections.abc import AsyncIterator

import av
import numpy as np
from aiohttp import web
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from avatar_stream.transports.webrtc.ice import filter_candidates, rtc_configuration

MOUTH_BOX = (200, 300, 312, 360)


class _Paced(MediaStreamTrack):
    def __init__(self, kind: str, period: float) -> None:
        super().__init__()
        self.kind = kind
        self.period = period
        self._n = 0
        self._t0: float | None = None

    async def _tick(self) -> int:
        if self._t0 is None:
            self._t0 = time.perf_counter()
        delay = self._t0 + self._n * self.period - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        self._n += 1
        return self._n - 1


class EchoAudio(_Paced):
    def __init__(self, peer: EchoPeer) -> None:
        super().__init__("audio", 0.02)
        self.peer = peer

    async def recv(self) -> av.AudioFrame:
        n = await self._tick()
        now = time.perf_counter()
        q = self.peer.heard
        if self.peer.cut_at is not None and now >= self.peer.cut_at:  # barge-in: drop it all
            q.clear()
            self.peer.cut_at = None
        while q and q[0][0] + self.peer.audio_delay_s <= now - 0.02:  # too old: skip
            q.popleft()
        pcm = np.zeros(960, np.int16)
        if q and q[0][0] + self.peer.audio_delay_s <= now:
            pcm = q.popleft()[1]
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = 48000
        frame.pts = n * 960
        frame.time_base = fractions.Fraction(1, 48000)
        return frame


class MouthVideo(_Paced):
    def __init__(self, peer: EchoPeer) -> None:
        super().__init__("video", 0.04)
        self.peer = peer

    async def recv(self) -> av.VideoFrame:
        n = await self._tick()
        cutoff = time.perf_counter() - self.peer.video_delay_s
        level = 0.0
        for t, rms in reversed(self.peer.levels):
            if t <= cutoff:
                level = rms
                break
        yuv = np.full((768, 512), 128, np.uint8)
        x0, y0, x1, y1 = MOUTH_BOX
        yuv[y0:y1, x0:x1] = int(200 - min(180.0, level * 1500))
        frame = av.VideoFrame.from_ndarray(yuv, format="yuv420p")
        frame.pts = n * 3600
        frame.time_base = fractions.Fraction(1, 90000)
        return frame


class EchoPeer:
    def __init__(self, audio_delay_s: float, video_delay_s: float, cut_delay_s: float) -> None:
        self.audio_delay_s = audio_delay_s
        self.video_delay_s = video_delay_s
        self.cut_delay_s = cut_delay_s
        self.cut_at: float | None = None
        self.heard: deque[tuple[float, np.ndarray]] = deque(maxlen=500)
        self.levels: deque[tuple[float, float]] = deque(maxlen=500)
        self.pcs: dict[str, RTCPeerConnection] = {}
        self.tasks: set[asyncio.Task[None]] = set()

    async def offer(self, request: web.Request) -> web.Response:
        body = await request.json()
        pc = RTCPeerConnection(rtc_configuration([]))
        sid = f"echo{len(self.pcs)}"
        self.pcs[sid] = pc

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind == "audio":
                task = asyncio.ensure_future(self._listen(track))
                self.tasks.add(task)

        @pc.on("datachannel")
        def on_channel(channel) -> None:  # type: ignore[no-untyped-def]
            channel.send(json.dumps({"type": "ready"}))

            @channel.on("message")
            def on_message(message) -> None:  # type: ignore[no-untyped-def]
                if isinstance(message, str) and json.loads(message).get("type") == "interrupt":
                    self.cut_at = time.perf_counter() + self.cut_delay_s

        sdp = filter_candidates(body["sdp"], ["127.0.0.1"])
        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        pc.addTrack(EchoAudio(self))
        pc.addTrack(MouthVideo(self))
        await pc.setLocalDescription(await pc.createAnswer())
        info = {"width": 512, "height": 512, "mouth_box": list(MOUTH_BOX)}
        return web.json_response({"session_id": sid, "type": "answer",
                                  "sdp": pc.localDescription.sdp, "avatar": info}, status=201)

    async def delete(self, request: web.Request) -> web.Response:
        pc = self.pcs.pop(request.match_info["id"], None)
        if pc:
            await pc.close()
        return web.Response(status=204)

    async def _listen(self, track: MediaStreamTrack) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                pcm = frame.to_ndarray().reshape(-1)
                if len(frame.layout.channels) > 1:
                    pcm = pcm.reshape(-1, len(frame.layout.channels))[:, 0]
                now = time.perf_counter()
                self.heard.append((now, pcm.astype(np.int16)))
                self.levels.append((now, float(np.sqrt(np.mean((pcm / 32768.0) ** 2)))))


@contextlib.asynccontextmanager
async def echo_peer(audio_delay_s: float, video_delay_s: float, cut_delay_s: float = 0.0
                    ) -> AsyncIterator[str]:
    peer = EchoPeer(audio_delay_s, video_delay_s, cut_delay_s)
    app = web.Application()
    app.router.add_post("/v1/sessions", peer.offer)
    app.router.add_delete("/v1/sessions/{id}", peer.delete)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        for pc in peer.pcs.values():
            await pc.close()
        for task in peer.tasks:
            task.cancel()
        await runner.cleanup()
