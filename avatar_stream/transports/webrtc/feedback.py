"""What the server's video sender does with its viewer's RTCP beyond what aiortc does.

aiortc's sender retransmits what a NACK asks for (from the last 128 packets), sends a
keyframe on PLI or FIR and sets its encoder's rate from REMB. Measured on an impaired link
(``avatar-stream bench --loss/--outage/--rate``) that leaves three holes, filled here:

- receiver reports' loss is ignored: a link capped below the rate (REMB sees the queue
  grow, not the audio sharing it) stays congested; the reported loss now lowers the
  encoder's rate too (``CappedBitrate.on_loss``);
- after an outage the viewer NACKs a burst of packets, most of them too old to resend and
  none worth resending (the picture they belong to is seconds old): a NACK of more than
  ``MAX_REPAIR`` packets gets a keyframe instead;
- a viewer that was silent (no RTCP) for over ``SILENT_S`` and is heard again has missed
  pictures it can no longer decode after: it gets a keyframe at once, without waiting
  for its own PLI.

And the speech shares the link with the picture: while the video rate is under
``NARROW_LINK`` the Opus rate drops to ``OPUS_NARROW_BITRATE`` (speech stays clear at 32
kbps, and the 30 kbps go to the picture or to an emptier queue).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from aiortc import RTCPeerConnection
from aiortc.rtcrtpsender import RTCRtpSender
from aiortc.rtp import (
    RTCP_RTPFB_NACK,
    AnyRtcpPacket,
    RtcpRrPacket,
    RtcpRtpfbPacket,
    RtcpSrPacket,
)

from avatar_stream.transports.webrtc.encoders import (
    NARROW_LINK,
    OPUS_BITRATE,
    OPUS_NARROW_BITRATE,
    CappedBitrate,
    EncodesOwnAudio,
    OpusPacketEncoder,
    current_encoder,
)

MAX_REPAIR = 24  # packets a NACK may ask for before a keyframe is the better answer
SILENT_S = 1.5  # aiortc and browsers report at least every 1.5 s


class VideoFeedback:
    """Installed on one video sender: sees each RTCP packet routed to it first."""

    def __init__(self, sender: RTCRtpSender, encoder: CappedBitrate,
                 audio: OpusPacketEncoder | None = None) -> None:
        self.sender = sender
        self.encoder = encoder
        self.audio = audio
        self._inner: Callable[[AnyRtcpPacket], Awaitable[None]] = sender._handle_rtcp_packet
        # the DTLS transport looks the handler up on the sender for each packet
        sender._handle_rtcp_packet = self.handle  # type: ignore[method-assign]
        self._heard: float | None = None
        self.keyframes = 0  # asked for here (not counting the viewer's own PLIs)
        self.nacks_answered_with_keyframe = 0

    async def handle(self, packet: AnyRtcpPacket) -> None:
        now = time.monotonic()
        if self._heard is not None and now - self._heard > SILENT_S:
            self._keyframe()  # the viewer is back after an outage
        self._heard = now
        if isinstance(packet, (RtcpRrPacket, RtcpSrPacket)):
            for report in packet.reports:
                if report.ssrc == self.sender._ssrc:
                    self.encoder.on_loss(report.fraction_lost / 256)
        elif isinstance(packet, RtcpRtpfbPacket) and packet.fmt == RTCP_RTPFB_NACK \
                and len(packet.lost) > MAX_REPAIR:
            self.nacks_answered_with_keyframe += 1
            self._keyframe()
            return
        await self._inner(packet)  # (a REMB sets the encoder's rate in there)
        if self.audio is not None:
            narrow = self.encoder.target_bitrate < NARROW_LINK
            self.audio.bitrate = OPUS_NARROW_BITRATE if narrow else OPUS_BITRATE

    def _keyframe(self) -> None:
        self.keyframes += 1
        self.sender._send_keyframe()


def watch_video_feedback(pc: RTCPeerConnection) -> list[VideoFeedback]:
    """After ``use_avatar_encoders``: a VideoFeedback on each sender with an avatar encoder."""
    out: list[VideoFeedback] = []
    audio = next((t.sender.track.opus for t in pc.getTransceivers()
                  if isinstance(t.sender.track, EncodesOwnAudio)), None)
    for transceiver in pc.getTransceivers():
        encoder = current_encoder(transceiver.sender)
        if isinstance(encoder, CappedBitrate):
            out.append(VideoFeedback(transceiver.sender, encoder, audio))
    return out
