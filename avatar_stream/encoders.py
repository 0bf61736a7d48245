"""Outgoing video encoding tuned for a synthetic talking head, and the one place that
installs it on aiortc's senders.

aiortc's VP8 encoder is set up for camera video: temporal noise reduction on, and a bitrate
that follows the receiver's estimate up to 1.5 Mbps. Avatar frames are rendered, not
filmed: the denoiser only blurs them, and on a 512x512 head the last 700 kbps buy nothing
visible. Measured on this project's frames (2-core x86, one thread): noise reduction off is
25-30% less encode time for +1.5 dB PSNR, 800 kbps costs half the encode time of 1.5 Mbps
at the same 47 dB, and the fastest speed setting a further quarter for 0.1 dB. Encoding
is a large part of a session's server CPU, so this sets how many sessions a machine holds.
"""

from __future__ import annotations

import av
from aiortc import RTCPeerConnection
from aiortc.codecs.base import Encoder
from aiortc.codecs.vpx import MIN_BITRATE, Vp8Encoder
from aiortc.mediastreams import VIDEO_TIME_BASE, convert_timebase
from aiortc.rtcrtpsender import RTCRtpSender
from av.frame import Frame

MAX_BITRATE = 800_000  # aiortc's own cap is 1.5 Mbps; its floor (MIN_BITRATE) is kept


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


def use_avatar_encoders(pc: RTCPeerConnection) -> None:
    """Give each negotiated VP8 video sender an AvatarVp8Encoder (after the answer is set,
    before media flows); other codecs keep aiortc's encoders."""
    for transceiver in pc.getTransceivers():
        codecs = getattr(transceiver, "_codecs", [])
        if transceiver.kind == "video" and codecs and codecs[0].mimeType.lower() == "video/vp8":
            replace_encoder(transceiver.sender, AvatarVp8Encoder())


def replace_encoder(sender: RTCRtpSender, encoder: Encoder) -> None:
    """aiortc makes a sender's encoder on the first frame and offers no setting for it."""
    sender._RTCRtpSender__encoder = encoder  # type: ignore[attr-defined]
