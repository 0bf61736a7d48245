"""The receive buffers swapped into aiortc's receivers: the server's decoding audio buffer
(real Opus packets in, the speech out, lost packets mended with silence of their length)
and the load generator's packet tap."""

from __future__ import annotations

import fractions

import av
import numpy as np
from aiortc.rtp import RtpPacket

from avatar_stream.transports.webrtc.encoders import OpusPacketEncoder
from avatar_stream.transports.webrtc.jitterbuffer import DecodingAudioBuffer, PacketTap


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
