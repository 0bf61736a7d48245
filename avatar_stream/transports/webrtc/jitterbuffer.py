"""Receive buffers for aiortc's RTP receivers, and the one place that swaps them in.

aiortc gives a receiver's jitter buffer no public setting, so ``replace`` sets its private
attribute; everything that changes how we receive goes through it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import cast

import av
import numpy as np
from aiortc import RTCPeerConnection
from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.rtcrtpreceiver import RTCRtpReceiver
from aiortc.rtp import RtpPacket

from avatar_stream.audio.resample import frame_to_mono

OPUS_RATE = 48_000
OPUS_FRAME = 960  # 20 ms: what every WebRTC sender puts in a packet


def current(receiver: RTCRtpReceiver) -> JitterBuffer:
    return receiver._RTCRtpReceiver__jitter_buffer  # type: ignore[attr-defined,no-any-return]


def replace(receiver: RTCRtpReceiver, buffer: JitterBuffer) -> None:
    """Swap a receiver's jitter buffer (after setRemoteDescription, before media flows)."""
    receiver._RTCRtpReceiver__jitter_buffer = buffer  # type: ignore[attr-defined]


class DecodingAudioBuffer(JitterBuffer):
    """A receive buffer that decodes each Opus packet as it arrives and hands the samples
    (float32 mono, 48 kHz) to ``on_audio``, on the event loop: nothing reaches aiortc's
    decoder.

    aiortc's audio jitter buffer holds 4 packets back before releasing one (80-100 ms of
    20 ms Opus frames), which is most of the echo-latency floor, and every packet it
    releases crosses two threads (queued to its decoder thread, decoded, handed back to
    the loop): measured on a server session, those hand-offs were the largest single
    share of its event-loop time, where decoding here costs 25 us a packet. Each Opus
    packet is a whole frame, so there is nothing to reassemble: a packet that arrives after
    a newer one (late or duplicated) is dropped, and a gap of a few lost packets is filled
    with silence of its length, so that the speech after it keeps its timing.
    """

    MAX_GAP_FILL = 10  # packets (200 ms): a longer gap is a pause, not a loss to mend

    def __init__(self, on_audio: Callable[[np.ndarray, int], None]) -> None:
        super().__init__(capacity=16)
        self._on_audio = on_audio
        self._decoder = cast(av.AudioCodecContext, av.CodecContext.create("libopus", "r"))
        self._decoder.layout = "mono"
        self._last: tuple[int, int] | None = None  # (sequence number, RTP timestamp)
        self.lost = 0  # packets missing in the gaps seen

    def add(self, packet: RtpPacket) -> tuple[bool, JitterFrame | None]:
        seq, ts = packet.sequence_number, packet.timestamp
        if self._last is not None:
            step = (seq - self._last[0]) % 65536
            if not 0 < step < 32768:
                return False, None  # late or duplicated
            if step > 1:
                self.lost += step - 1
                elapsed = (ts - self._last[1]) % (1 << 32)  # samples since the last packet
                gap = elapsed - elapsed // step  # all but the last packet's share
                if 0 < gap <= self.MAX_GAP_FILL * OPUS_FRAME:
                    self._on_audio(np.zeros(gap, np.float32), OPUS_RATE)
        self._last = (seq, ts)
        try:
            frames = self._decoder.decode(av.Packet(packet.payload))
        except av.error.FFmpegError:
            return False, None
        for frame in frames:
            self._on_audio(frame_to_mono(frame), frame.sample_rate)
        return False, None


def decode_audio_on_arrival(pc: RTCPeerConnection,
                            on_audio: Callable[[np.ndarray, int], None]) -> None:
    """Give the peer connection's audio receivers a DecodingAudioBuffer feeding
    ``on_audio`` (after setRemoteDescription, before media flows)."""
    for transceiver in pc.getTransceivers():
        if transceiver.kind == "audio":
            replace(transceiver.receiver, DecodingAudioBuffer(on_audio))


class ArrivalRecordingBuffer(JitterBuffer):
    """aiortc's own jitter buffer, noting when each frame's last packet came off the network.

    A receiver's buffering delays audio and video by different amounts (audio is held back
    ``prefetch`` packets, video one frame); a lip-syncing receiver undoes that with RTCP. The
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
            arrived = self._arrived.pop(frame.timestamp, time.perf_counter())
            if len(self._arrived) > 512:  # timestamps of frames that never completed
                self._arrived.clear()
            self.frames_out.append(arrived)
        return pli, frame


class PacketTap(JitterBuffer):
    """Hands each packet to ``on_packet`` (arrival time, packet) and nothing to aiortc: no
    reassembly, no decoding. A load generator's receiver, that costs next to nothing."""

    def __init__(self, on_packet: Callable[[float, RtpPacket], None]) -> None:
        super().__init__(capacity=16)
        self._on_packet = on_packet

    def add(self, packet: RtpPacket) -> tuple[bool, JitterFrame | None]:
        self._on_packet(time.perf_counter(), packet)
        return False, None


def record_arrivals(
    pc: RTCPeerConnection, audio_prefetch: int | None = None,
    taps: dict[str, Callable[[float, RtpPacket], None]] | None = None,
) -> dict[str, ArrivalRecordingBuffer]:
    """Swap each receiver's jitter buffer for a recording one with the same settings (or
    ``audio_prefetch`` audio packets held back instead of aiortc's 4); a kind named in
    ``taps`` gets a PacketTap instead (and is not in the answer)."""
    buffers = {}
    for transceiver in pc.getTransceivers():
        kind = transceiver.kind
        if taps and kind in taps:
            replace(transceiver.receiver, PacketTap(taps[kind]))
            continue
        old = current(transceiver.receiver)
        prefetch = audio_prefetch if kind == "audio" and audio_prefetch is not None \
            else old._prefetch
        new = ArrivalRecordingBuffer(old.capacity, prefetch, old._is_video)
        replace(transceiver.receiver, new)
        buffers[kind] = new
    return buffers
