"""Outgoing video encoding tuned for a synthetic talking head, and the one place that
installs it on aiortc's senders.

aiortc's VP8 encoder is set up for camera video: temporal noise reduction on, and a bitrate
that follows the receiver's estimate up to 1.5 Mbps. Avatar frames are rendered, not
filmed: the denoiser only blurs them, and on a 512x512 head the last 700 kbps buy nothing
visible. Measured on this project's frames (2-core x86, one thread): noise reduction off is
25-30% less encode time for +1.5 dB PSNR, 800 kbps costs half the encode time of 1.5 Mbps
at the same 47 dB, and the fastest speed setting a further quarter for 0.1 dB. Encoding
is a large part of a session's server CPU, so this sets how many sessions a machine holds.

Audio goes to aiortc already encoded (``OpusPacketEncoder``): handed a frame, aiortc's sender
computes the RTP audio level in a pure-Python loop over every sample (0.17 ms per 20 ms of
mono), converts to stereo and encodes on its thread pool, about 0.5 ms and a thread hop a
packet. Encoded here, inline, a packet costs 0.16 ms.
"""

from __future__ import annotations

import fractions
from typing import Protocol, runtime_checkable

import av
from aiortc import RTCPeerConnection
from aiortc.codecs.base import Encoder
from aiortc.codecs.vpx import MIN_BITRATE, Vp8Encoder
from aiortc.mediastreams import VIDEO_TIME_BASE, convert_timebase
from aiortc.rtcrtpsender import RTCRtpSender
from av.frame import Frame

MAX_BITRATE = 800_000  # aiortc's own cap is 1.5 Mbps; its floor (MIN_BITRATE) is kept
OPUS_RATE = 48_000
OPUS_TIME_BASE = fractions.Fraction(1, OPUS_RATE)
OPUS_BITRATE = 64_000  # mono speech; aiortc sends 96 kbps of stereo


class AvatarVp8Encoder(Vp8Encoder):
    """aiortc's VP8 packetization and rate control, without the denoiser, capped at
    ``MAX_BITRATE`` (the receiver's estimate still lowers it)."""

    def __init__(self) -> None:
        super().__init__()
        self._bitrate = min(super().target_bitrate, MAX_BITRATE)

    @property
    def target_bitrate(self) -> int:
        return self._bitrate

    @target_bitrate.setter
    def target_bitrate(self, bitrate: int) -> None:
        self._bitrate = max(MIN_BITRATE, min(bitrate, MAX_BITRATE))

    def encode(self, frame: Frame, force_keyframe: bool = False) -> tuple[list[bytes], int]:
        assert isinstance(frame, av.VideoFrame)
        pts, time_base = frame.pts, frame.time_base
        assert pts is not None and time_base is not None  # the pacer stamps every frame
        if frame.format.name != "yuv420p":
            frame = frame.reformat(format="yuv420p")
        codec = self.codec
        # reopened (a keyframe) on a new size, or when the rate moves by over 10%
        if codec is not None and (
            (frame.width, frame.height) != (codec.width, codec.height)
            or abs(self._bitrate - (codec.bit_rate or 0)) > 0.1 * (codec.bit_rate or 0)
        ):
            codec = None
        if force_keyframe:
            frame.pict_type = av.video.frame.PictureType.I
        if codec is None:
            codec = self.codec = self._open(frame.width, frame.height)
        data = b"".join(bytes(p) for p in codec.encode(frame))
        payloads = self._packetize(data, self.picture_id)
        timestamp = convert_timebase(pts, time_base, VIDEO_TIME_BASE)
        self.picture_id = (self.picture_id + 1) % (1 << 15)
        return payloads, timestamp

    def _open(self, width: int, height: int) -> av.VideoCodecContext:
        codec = av.CodecContext.create("libvpx", "w")
        codec.width, codec.height = width, height
        codec.bit_rate = self._bitrate
        codec.pix_fmt = "yuv420p"
        codec.gop_size = 3000  # keyframes only when asked (PLI) or reopened
        codec.qmin, codec.qmax = 2, 56
        rate = str(self._bitrate)
        codec.options = {
            "bufsize": rate,  # a 1 s rate-control buffer
            "minrate": rate, "maxrate": rate,  # CBR
            "cpu-used": "-16",  # libvpx's fastest realtime speed: -0.1 dB, 25% less time
            "deadline": "realtime",
            "lag-in-frames": "0",
            "noise-sensitivity": "0",  # rendered frames have no sensor noise to remove
            "overshoot-pct": "15",
            "undershoot-pct": "100",
            "partitions": "0",
            "static-thresh": "1",
        }
        codec.thread_count = 1  # parallelism comes from sessions, not from inside a frame
        return codec


class OpusPacketEncoder:
    """20 ms of 48 kHz s16 mono in, one Opus packet out, stamped for aiortc to send as is.

    CELT only ("lowdelay"): 2.5 ms of look-ahead instead of SILK's 6.5 ms, and at this
    bitrate speech loses nothing to it. Complexity 5 halves libopus's time against its
    default of 10. A mono packet is valid in the stereo stream WebRTC negotiates: decoders
    play it on both channels."""

    def __init__(self) -> None:
        codec = av.CodecContext.create("libopus", "w")
        codec.sample_rate = OPUS_RATE
        codec.format = "s16"
        codec.layout = "mono"
        codec.bit_rate = OPUS_BITRATE
        codec.time_base = OPUS_TIME_BASE
        codec.options = {"application": "lowdelay", "compression_level": "5"}
        self.codec = codec

    def encode(self, frame: av.AudioFrame) -> av.Packet:
        assert frame.pts is not None and frame.time_base is not None
        (packet,) = self.codec.encode(frame)  # libopus returns each 20 ms frame at once
        packet.pts = convert_timebase(frame.pts, frame.time_base, OPUS_TIME_BASE)
        packet.time_base = OPUS_TIME_BASE
        return packet


@runtime_checkable
class EncodesOwnAudio(Protocol):
    """An audio track that hands aiortc Opus packets once given an encoder."""

    opus: OpusPacketEncoder | None


def use_avatar_encoders(pc: RTCPeerConnection) -> None:
    """After the answer is set, before media flows: each negotiated VP8 video sender gets
    an AvatarVp8Encoder, and each audio track that can encode its own audio gets an Opus
    encoder when Opus was negotiated. Other codecs keep aiortc's encoders."""
    for transceiver in pc.getTransceivers():
        codecs = getattr(transceiver, "_codecs", [])
        mime = codecs[0].mimeType.lower() if codecs else ""
        if mime == "video/vp8":
            replace_encoder(transceiver.sender, AvatarVp8Encoder())
        elif mime == "audio/opus" and isinstance(transceiver.sender.track, EncodesOwnAudio):
            transceiver.sender.track.opus = OpusPacketEncoder()


def replace_encoder(sender: RTCRtpSender, encoder: Encoder) -> None:
    """aiortc makes a sender's encoder on the first frame and offers no setting for it."""
    sender._RTCRtpSender__encoder = encoder  # type: ignore[attr-defined]
