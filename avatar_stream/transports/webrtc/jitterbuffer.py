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
    """The client's receive buffer: frames in order, noting when each frame's last packet
    came off the network, passing over lost packets as a browser does.

    A receiver's buffering delays audio and video by different amounts (audio is held back
    ``prefetch`` packets, video until its frame is whole); a lip-syncing receiver undoes
    that with RTCP. The network arrival times say what the sender put on the wire,
    independent of this client's buffers.

    aiortc's own buffer waits for a missing packet until its ring overflows: 16 packets
    (320 ms) of audio, 512 packets (seconds) of video. A browser conceals a lost audio
    packet when its turn to play comes (here: once ``prefetch`` later packets wait) and,
    for video, waits for the retransmission a while (``VIDEO_WAIT_S``), then gives the
    broken frame up and asks for a keyframe (PLI): after an outage that is what brings the
    picture back. A video frame is whole when its packets run without a gap from the one
    after the previous frame's last packet to a packet with the marker bit.
    """

    VIDEO_WAIT_S = 0.3  # a NACK's round trip on a slow link, and then some
    PLI_EVERY_S = 0.5  # while frames stay broken, at most this often
    MAX_HELD = 1024  # packets: a sender gone mad cannot grow this without bound

    def __init__(self, capacity: int, prefetch: int = 0, is_video: bool = False,
                 on_packet: Callable[[float, RtpPacket], None] | None = None) -> None:
        super().__init__(capacity, prefetch=prefetch, is_video=is_video)
        self._held: dict[int, tuple[float, RtpPacket]] = {}  # unwrapped seq -> packet
        self._next: int | None = None  # unwrapped seq of the next packet to hand on
        self._top = -1  # highest unwrapped seq seen
        self.frames_out: deque[float] = deque(maxlen=256)
        self._on_packet = on_packet  # told of every packet too
        self._stuck_since: float | None = None
        self._last_pli = 0.0
        self.skipped = 0  # packets given up as lost

    def _unwrap(self, seq: int) -> int:
        if self._top < 0:
            return seq
        return self._top + ((seq - self._top + 32768) % 65536 - 32768)

    def add(self, packet: RtpPacket) -> tuple[bool, JitterFrame | None]:
        now = time.perf_counter()
        if self._on_packet is not None:
            self._on_packet(now, packet)
        seq = self._unwrap(packet.sequence_number)
        if self._next is None:
            self._next = seq
        if seq < self._next or seq in self._held:
            return False, None  # late (given up already) or duplicated
        self._held[seq] = (now, packet)
        self._top = max(self._top, seq)
        if len(self._held) > self.MAX_HELD:
            self._next = min(self._held)
        if self._is_video:
            return self._video(now)
        return False, self._audio()

    def _audio(self) -> JitterFrame | None:
        if len(self._held) <= self._prefetch:
            return None
        assert self._next is not None
        seq = min(self._held)  # its turn has come: what is missing before it is lost
        self.skipped += seq - self._next
        arrived, packet = self._held.pop(seq)
        self._next = seq + 1
        return self._release(arrived, [packet])

    def _video(self, now: float) -> tuple[bool, JitterFrame | None]:
        frame = self._whole_frame()
        if frame is not None:
            self._stuck_since = None
            return False, frame
        self._stuck_since = self._stuck_since or now
        if now - self._stuck_since < self.VIDEO_WAIT_S:
            return False, None
        # give the broken frame up: resume after the next marker that a packet follows
        assert self._next is not None
        for seq in sorted(s for s in self._held if self._held[s][1].marker):
            if seq + 1 in self._held:
                self.skipped += seq + 1 - self._next - sum(1 for s in self._held if s <= seq)
                for s in [s for s in self._held if s <= seq]:
                    del self._held[s]
                self._next = seq + 1
                break
        pli = now - self._last_pli >= self.PLI_EVERY_S
        if pli:
            self._last_pli = now
        frame = self._whole_frame()
        if frame is not None:
            self._stuck_since = None
        return pli, frame

    def _whole_frame(self) -> JitterFrame | None:
        """The next frame, if all its packets are in."""
        assert self._next is not None
        seq, packets = self._next, []
        while seq in self._held:
            packets.append(self._held[seq])
            if self._held[seq][1].marker:
                for s in range(self._next, seq + 1):
                    del self._held[s]
                self._next = seq + 1
                return self._release(packets[-1][0], [p for _, p in packets])
            seq += 1
        return None

    def _release(self, arrived: float, packets: list[RtpPacket]) -> JitterFrame:
        self.frames_out.append(arrived)
        data = b"".join(p._data for p in packets)  # type: ignore[attr-defined]
        return JitterFrame(data=data, timestamp=packets[0].timestamp)


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
    watch: dict[str, Callable[[float, RtpPacket], None]] | None = None,
) -> dict[str, ArrivalRecordingBuffer]:
    """Swap each receiver's jitter buffer for a recording one with the same settings (or
    ``audio_prefetch`` audio packets held back instead of aiortc's 4), that tells
    ``watch[kind]`` of each packet; a kind named in ``taps`` gets a PacketTap instead (and
    is not in the answer)."""
    buffers = {}
    for transceiver in pc.getTransceivers():
        kind = transceiver.kind
        if taps and kind in taps:
            replace(transceiver.receiver, PacketTap(taps[kind]))
            continue
        old = current(transceiver.receiver)
        prefetch = audio_prefetch if kind == "audio" and audio_prefetch is not None \
            else old._prefetch
        new = ArrivalRecordingBuffer(old.capacity, prefetch, old._is_video,
                                     (watch or {}).get(kind))
        replace(transceiver.receiver, new)
        buffers[kind] = new
    return buffers
