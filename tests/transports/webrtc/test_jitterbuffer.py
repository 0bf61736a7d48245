"""The receive buffers swapped into aiortc's receivers: the server's decoding audio buffer
(real Opus packets in, the speech out, lost packets mended with silence of their length),
the client's buffer that passes over lost packets as a browser does, and the load
generator's packet tap."""

from __future__ import annotations

import fractions

import av
import numpy as np
from aiortc.rtp import RtpPacket

from avatar_stream.transports.webrtc import jitterbuffer
from avatar_stream.transports.webrtc.encoders import OpusPacketEncoder
from avatar_stream.transports.webrtc.jitterbuffer import (
    ArrivalRecordingBuffer,
    DecodingAudioBuffer,
    PacketTap,
)


def opus_packets(pcm: np.ndarray, seq0: int = 65530, ts0: int = 2**32 - 960 * 3
                 ) -> list[RtpPacket]:
    """RTP packets of 20 ms of Opus each, numbered across both counters' wrap."""
    encoder = OpusPacketEncoder()
    out = []
    for k in range(len(pcm) // 960):
        frame = av.AudioFrame.from_ndarray(pcm[None, k * 960 : (k + 1) * 960], layout="mono")
        frame.sample_rate, frame.pts = 48_000, k * 960
        frame.time_base = fractions.Fraction(1, 48_000)
        packet = RtpPacket(payload_type=111, sequence_number=(seq0 + k) % 65536,
                           timestamp=(ts0 + k * 960) % 2**32)
        packet.payload = bytes(encoder.encode(frame))
        out.append(packet)
    return out


def tone(seconds: float) -> np.ndarray:
    t = np.arange(int(48_000 * seconds)) / 48_000
    return (8000 * np.sin(2 * np.pi * 300 * t)).astype(np.int16)


def test_decoding_buffer_hands_on_the_speech_and_nothing_to_aiortc() -> None:
    heard: list[tuple[np.ndarray, int]] = []
    buffer = DecodingAudioBuffer(lambda pcm, rate: heard.append((pcm, rate)))
    pcm = tone(1.0)
    for packet in opus_packets(pcm):
        assert buffer.add(packet) == (False, None)  # aiortc's decoder gets nothing
    out = np.concatenate([h[0] for h in heard])
    assert {h[1] for h in heard} == {48_000} and len(out) == len(pcm)
    ref = pcm.astype(np.float64) / 32768
    best = max(np.corrcoef(out[d : 40_000 + d], ref[:40_000])[0, 1] for d in range(0, 400))
    assert best > 0.95, best
    assert buffer.lost == 0


def test_decoding_buffer_drops_late_packets_and_fills_gaps_with_silence() -> None:
    heard: list[np.ndarray] = []
    buffer = DecodingAudioBuffer(lambda pcm, rate: heard.append(pcm))
    packets = opus_packets(tone(0.4))  # 20 packets
    order = [0, 1, 2, 1, 5, 4, 6, 7]  # a duplicate, two lost (3, 4 late: dropped)
    for i in order:
        buffer.add(packets[i])
    lengths = [len(h) for h in heard]
    # 0, 1, 2 decoded; the duplicate 1 dropped; 40 ms of silence for 3 and 4; 5; 4 is
    # late (after 5): dropped; 6, 7
    assert lengths == [960, 960, 960, 1920, 960, 960, 960], lengths
    assert not heard[3].any() and buffer.lost == 2
    # a gap longer than the mend limit (a pause, an outage) is not filled
    buffer.add(packets[19])
    assert len(heard) == 8 and len(heard[-1]) == 960 and buffer.lost == 13


def test_packet_tap_sees_every_packet_and_keeps_none() -> None:
    seen: list[tuple[float, int]] = []
    tap = PacketTap(lambda t, packet: seen.append((t, packet.sequence_number)))
    packets = opus_packets(tone(0.1))
    for packet in packets:
        assert tap.add(packet) == (False, None)
    assert [s for _, s in seen] == [p.sequence_number for p in packets]
    assert all(b >= a for (a, _), (b, _) in zip(seen, seen[1:], strict=False))


def video_packets(frames: int, per_frame: int = 3, seq0: int = 65530) -> list[RtpPacket]:
    """Packets of ``frames`` frames, the last of each with the marker bit."""
    out = []
    for f in range(frames):
        for k in range(per_frame):
            p = RtpPacket(payload_type=96, sequence_number=(seq0 + f * per_frame + k) % 65536,
                          timestamp=f * 3600, marker=int(k == per_frame - 1))
            p._data = bytes([f, k])  # what aiortc's depayloader leaves on the packet
            out.append(p)
    return out


def test_client_audio_buffer_plays_on_past_a_lost_packet() -> None:
    buffer = ArrivalRecordingBuffer(16, prefetch=2)
    packets = opus_packets(tone(0.2))  # 10 packets
    for p in packets:
        p._data = p.payload
    out = []
    for i in (0, 1, 2, 4, 5, 6, 7):  # 3 lost
        out.append(buffer.add(packets[i])[1])
    released = [f.timestamp for f in out if f is not None]
    # two held back; packet 3's turn came once three later ones waited: passed over
    assert released == [packets[i].timestamp for i in (0, 1, 2, 4, 5)]
    assert buffer.skipped == 1 and len(buffer.frames_out) == 5
    assert buffer.add(packets[3]) == (False, None)  # too late now


def test_client_video_buffer_waits_for_a_retransmission_then_asks_for_a_keyframe(
        monkeypatch) -> None:
    clock = [100.0]
    monkeypatch.setattr(jitterbuffer.time, "perf_counter", lambda: clock[0])
    buffer = ArrivalRecordingBuffer(128, is_video=True)
    packets = video_packets(6)  # frames 0..5, 3 packets each, numbered across the wrap
    frames = [buffer.add(p)[1] for p in packets[:3]]  # frame 0, whole at its marker
    assert frames[:2] == [None, None] and frames[2] is not None
    assert frames[2].data == b"\x00\x00\x00\x01\x00\x02" and frames[2].timestamp == 0
    # frame 1 loses its middle packet; its retransmission comes in time: nothing given up
    for p in (packets[3], packets[5], packets[6], packets[7], packets[8]):
        assert buffer.add(p) == (False, None)
    clock[0] += 0.1
    pli, frame = buffer.add(packets[4])
    assert not pli and frame is not None and frame.timestamp == 3600
    # frame 2 was whole meanwhile: it comes with the next packet (one frame a packet)
    pli, frame = buffer.add(packets[9])
    assert not pli and frame is not None and frame.timestamp == 2 * 3600
    # frame 3 loses packet 10 for good: after VIDEO_WAIT_S it is given up, with a PLI
    assert buffer.add(packets[11]) == (False, None)
    assert buffer.add(packets[12]) == (False, None)
    clock[0] += ArrivalRecordingBuffer.VIDEO_WAIT_S + 0.01
    pli, frame = buffer.add(packets[13])
    assert pli and frame is None  # frame 4 is not whole yet
    pli, frame = buffer.add(packets[14])
    assert not pli and frame is not None and frame.timestamp == 4 * 3600
    assert buffer.skipped == 1
    assert buffer.add(packets[10]) == (False, None)  # the retransmission, too late: dropped
