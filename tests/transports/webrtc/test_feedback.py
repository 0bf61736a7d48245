"""The video sender's RTCP handling beyond aiortc's, on a real aiortc sender: reported
loss lowers the rate (and the speech's), a burst NACK and a viewer back from silence get
a keyframe."""

from __future__ import annotations

from aiortc import RTCPeerConnection, VideoStreamTrack
from aiortc.rtp import (
    RTCP_RTPFB_NACK,
    RtcpReceiverInfo,
    RtcpRrPacket,
    RtcpRtpfbPacket,
)

from avatar_stream.transports.webrtc import feedback
from avatar_stream.transports.webrtc.encoders import (
    MIN_BITRATE,
    OPUS_BITRATE,
    OPUS_NARROW_BITRATE,
    AvatarH264Encoder,
    OpusPacketEncoder,
)
from avatar_stream.transports.webrtc.feedback import VideoFeedback


def report(ssrc: int, lost: float) -> RtcpRrPacket:
    info = RtcpReceiverInfo(ssrc=ssrc, fraction_lost=int(lost * 256), packets_lost=0,
                            highest_sequence=0, jitter=0, lsr=0, dlsr=0)
    return RtcpRrPacket(ssrc=1234, reports=[info])


def forced(sender) -> bool:
    return sender._RTCRtpSender__force_keyframe


async def test_loss_lowers_the_rate_and_the_speech_follows() -> None:
    pc = RTCPeerConnection()
    try:
        sender = pc.addTrack(VideoStreamTrack())
        encoder, opus = AvatarH264Encoder(), OpusPacketEncoder()
        fb = VideoFeedback(sender, encoder, opus)
        assert encoder.target_bitrate == 500_000 and opus.bitrate == OPUS_BITRATE
        await sender._handle_rtcp_packet(report(sender._ssrc, 0.05))  # 5 %: hold
        assert encoder.target_bitrate == 500_000
        await sender._handle_rtcp_packet(report(sender._ssrc, 0.40))  # congested
        assert abs(encoder.target_bitrate - 400_000) < 1000  # half the loss (102/256) off
        for _ in range(12):
            await sender._handle_rtcp_packet(report(sender._ssrc, 0.40))
        assert encoder.target_bitrate == MIN_BITRATE and opus.bitrate == OPUS_NARROW_BITRATE
        await sender._handle_rtcp_packet(report(sender._ssrc ^ 1, 0.9))  # another stream's
        assert encoder.target_bitrate == MIN_BITRATE
        for _ in range(40):  # no loss: it climbs back, 5 % a report, to what REMB allows
            await sender._handle_rtcp_packet(report(sender._ssrc, 0.0))
        assert encoder.target_bitrate == 500_000 and opus.bitrate == OPUS_BITRATE
        assert fb.keyframes == 0
    finally:
        await pc.close()


async def test_a_burst_nack_or_a_viewer_back_from_silence_gets_a_keyframe(monkeypatch) -> None:
    clock = [50.0]
    monkeypatch.setattr(feedback.time, "monotonic", lambda: clock[0])
    pc = RTCPeerConnection()
    try:
        sender = pc.addTrack(VideoStreamTrack())
        fb = VideoFeedback(sender, AvatarH264Encoder())

        def nack(n: int) -> RtcpRtpfbPacket:
            return RtcpRtpfbPacket(fmt=RTCP_RTPFB_NACK, ssrc=1234, media_ssrc=sender._ssrc,
                                   lost=list(range(100, 100 + n)))

        await sender._handle_rtcp_packet(nack(3))  # a few: retransmitted, as aiortc does
        assert not forced(sender) and fb.keyframes == 0
        await sender._handle_rtcp_packet(nack(feedback.MAX_REPAIR + 1))
        assert forced(sender) and fb.nacks_answered_with_keyframe == 1
        sender._RTCRtpSender__force_keyframe = False
        clock[0] += 1.0
        await sender._handle_rtcp_packet(report(sender._ssrc, 0.0))
        assert not forced(sender)
        clock[0] += feedback.SILENT_S + 0.5  # an outage: nothing heard
        await sender._handle_rtcp_packet(report(sender._ssrc, 0.0))
        assert forced(sender) and fb.keyframes == 2
    finally:
        await pc.close()
