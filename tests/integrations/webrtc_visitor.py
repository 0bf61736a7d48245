"""A WebRTC peer (aiortc) at the far end of a bot's own transport: what the user's browser
would be. It receives the bot's tracks and has a data channel for the bot's messages."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import numpy as np
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from avatar_stream.audio.resample import frame_to_mono
from avatar_stream.transports.webrtc.ice import filter_candidates, rtc_configuration


class Visitor:
    """``offer()``, hand it to the bot, ``answered(sdp)``; ``video_t``: when each frame
    came; ``audio``: the voice, float mono 48 kHz per frame."""

    def __init__(self, channel: str = "chat") -> None:
        self.pc = RTCPeerConnection(rtc_configuration([]))
        self.pc.addTransceiver("audio", direction="recvonly")
        self.pc.addTransceiver("video", direction="recvonly")
        self.channel = self.pc.createDataChannel(channel)
        self.video_t: list[float] = []
        self.audio: list[np.ndarray] = []
        self._readers: list[asyncio.Task[None]] = []
        self.pc.on("track", lambda track: self._readers.append(
            asyncio.create_task(self._read(track))))

    async def offer(self) -> str:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return str(self.pc.localDescription.sdp)

    async def answered(self, sdp: str) -> None:
        await self.pc.setRemoteDescription(RTCSessionDescription(
            sdp=filter_candidates(sdp, ["127.0.0.1"]), type="answer"))

    async def connect(self, offer_url: str) -> None:
        """Offer to a bot's ``/api/offer`` (JSON in and out, as Pipecat's examples do)."""
        sdp = await self.offer()
        async with aiohttp.ClientSession() as http, \
                http.post(offer_url, json={"sdp": sdp, "type": "offer"}) as resp:
            answer = await resp.json()
        await self.answered(answer["sdp"])

    async def _read(self, track: MediaStreamTrack) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            if track.kind == "video":
                self.video_t.append(time.perf_counter())
            else:
                self.audio.append(frame_to_mono(frame))

    def fps(self, since: float, until: float) -> float:
        ts = [t for t in self.video_t if since <= t <= until]
        return (len(ts) - 1) / (ts[-1] - ts[0])

    def heard(self) -> np.ndarray:
        return np.concatenate(self.audio) if self.audio else np.zeros(0, np.float32)

    async def close(self) -> None:
        await self.pc.close()
        for task in self._readers:
            task.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)
