"""Receive buffers for aiortc's RTP receivers, and the one place that swaps them in.

aiortc gives a receiver's jitter buffer no public setting, so ``replace`` sets its private
attribute; everything that changes how we receive goes through it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from aiortc import RTCPeerConnection
from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.rtcrtpreceiver import RTCRtpReceiver
from aiortc.rtp import RtpPacket


def current(receiver: RTCRtpReceiver) -> JitterBuffer:
    return receiver._RTCRtpReceiver__jitter_buffer  # type: ignore[attr-defined,no-any-return]


def replace(receiver: RTCRtpReceiver, buffer: JitterBuffer) -> None:
    """Swap a receiver's jitter buffer (after setRemoteDescription, before media flows)."""
    receiver._RTCRtpReceiver__jitter_buffer = buffer  # type: ignore[attr-defined]


class ImmediateAudioBuffer(JitterBuffer):
    """A receive buffer that hands each audio packet on as soon as it arrives.

    aiortc's audio jitter buffer holds 4 packets back before releasing one (80-100 ms of
    20 ms Opus frames), which is most of the echo-latency floor. Each Opus packet is a
    whole frame, so there is nothing to reassemble: release it now and drop packets that
    arrive after a newer one (late or duplicated); the speech queue absorbs the jitter.
    """

    def __init__(self) -> None:
        super().__init__(capacity=16)
        self._last_seq: int | None = None

    def add(self, packet: RtpPacket) -> tuple[bool, JitterFrame | None]:
        seq = packet.sequence_number
        if self._last_seq is not None and not 0 < (seq - self._last_seq) % 65536 < 32768:
            return False, None
        self._last_seq = seq
        return False, JitterFrame(data=packet._data, timestamp=packet.timestamp)  # type: ignore[attr-defined]


def receive_audio_immediately(pc: RTCPeerConnection) -> None:
    """Give the peer connection's audio receivers an ImmediateAudioBuffer."""
    for transceiver in pc.getTransceivers():
        if transceiver.kind == "audio":
            replace(transceiver.receiver, ImmediateAudioBuffer())


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
