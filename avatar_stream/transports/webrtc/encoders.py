"""Outgoing media encoding tuned for a synthetic talking head, and the one place that
installs it on aiortc's senders.

aiortc's video encoders are set up for camera video: VP8 with temporal noise reduction on,
H.264 at x264's default preset (medium: slow for real time), and a bitrate that follows the
receiver's estimate up to 1.5 Mbps. Avatar frames are rendered, not filmed: the denoiser
only blurs them, and on a 512x512 head the last 700 kbps buy nothing visible. Measured on
this project's frames (2-core x86, one thread): VP8 with noise reduction off is 25-30% less
encode time for +1.5 dB PSNR, 800 kbps costs half the encode time of 1.5 Mbps at the same
47 dB, and the fastest speed setting a further quarter for 0.1 dB. x264 at its fastest
preset encodes the same warp frames in 1.3 ms where VP8 at its fastest takes 2.2 ms, at the
same PSNR (37.0 against 37.1 dB at 800 kbps), so the answer puts H.264 first when the offer
has it (every browser's does) and VP8 stays for peers without it. Encoding is a large part
of a session's server CPU, so this sets how many sessions a machine holds.

Audio goes to aiortc already encoded (``OpusPacketEncoder``): handed a frame, aiortc's sender
computes the RTP audio level in a pure-Python loop over every sample (0.17 ms per 20 ms of
mono), converts to stereo and encodes on its thread pool, about 0.5 ms and a thread hop a
packet. Encoded here, inline, a packet costs 0.16 ms. What is lost: the audio-level RTP
header extension, which only SFUs and ``getSynchronizationSources()`` read.
"""

from __future__ import annotations

import fractions
from collections.abc import Iterator
from typing import Protocol, cast, runtime_checkable

import av
from aiortc import RTCPeerConnection, RTCRtpCodecParameters
from aiortc.codecs.base import Encoder
from aiortc.codecs.h264 import H264Encoder
from aiortc.codecs.vpx import DEFAULT_BITRATE, Vp8Encoder
from aiortc.mediastreams import VIDEO_TIME_BASE, convert_timebase
from aiortc.rtcrtpsender import RTCRtpSender
from av.frame import Frame

from avatar_stream.media import FPS, OUT_RATE

MAX_BITRATE = 800_000  # aiortc's own cap is 1.5 Mbps
# aiortc's floor is 250 kbps: above what a 300 kbit/s link carries with the speech beside
# it (measured: the link stayed congested, its queue full, the picture frozen for seconds);
# at 100 kbps a 512 px head still moves, blurred
MIN_BITRATE = 100_000
OPUS_RATE = OUT_RATE
OPUS_TIME_BASE = fractions.Fraction(1, OPUS_RATE)
OPUS_BITRATE = 64_000  # mono speech; aiortc sends 96 kbps of stereo
OPUS_NARROW_BITRATE = 32_000  # while the video rate is under NARROW_LINK: the link is narrow
NARROW_LINK = 300_000


class CappedBitrate:
    """Both codecs start at aiortc's VP8 rate (500 kbps) and follow the receiver's estimate
    (aiortc's rate control: REMB, which only sees queueing delay) and the loss the receiver
    reports (``on_loss``), the lower of the two, between aiortc's VP8 floor and
    ``MAX_BITRATE``."""

    _remb: int = DEFAULT_BITRATE
    _loss_rate: float = MAX_BITRATE  # what the reported loss allows

    @property
    def target_bitrate(self) -> int:
        return max(MIN_BITRATE, min(self._remb, int(self._loss_rate), MAX_BITRATE))

    @target_bitrate.setter
    def target_bitrate(self, bitrate: int) -> None:
        self._remb = max(MIN_BITRATE, min(bitrate, MAX_BITRATE))

    def on_loss(self, fraction: float) -> None:
        """A receiver report's fraction of packets lost since the last one. The loss-based
        half of Google's congestion control (draft-ietf-rmcat-gcc, section 6): above 10 %
        the rate falls by half the loss, under 2 % it climbs 5 %, in between it holds. A
        link capped below the rate loses packets once its queue is full, and REMB alone,
        which sees the queue grow but not the audio that shares it, stays above the cap."""
        current = self.target_bitrate
        if fraction > 0.10:
            self._loss_rate = max(MIN_BITRATE, current * (1 - 0.5 * fraction))
        elif fraction < 0.02:
            self._loss_rate = min(MAX_BITRATE, max(self._loss_rate, current) * 1.05)

    codec: av.VideoCodecContext | None

    def _open(self, width: int, height: int) -> av.VideoCodecContext:
        raise NotImplementedError

    def _codec_for(self, frame: av.VideoFrame) -> tuple[av.VideoCodecContext, av.VideoFrame]:
        """The codec for this frame, and the frame in yuv420p. The codec is reopened (a
        keyframe) on a new size, or when the rate has moved by over 10%."""
        if frame.format.name != "yuv420p":
            frame = frame.reformat(format="yuv420p")
        codec = self.codec
        rate = (codec.bit_rate or 0) if codec is not None else 0
        if (
            codec is None
            or (frame.width, frame.height) != (codec.width, codec.height)
            or abs(self.target_bitrate - rate) > 0.1 * rate
        ):
            codec = self.codec = self._open(frame.width, frame.height)
        return codec, frame

    def _new_codec(
        self, name: str, width: int, height: int, options: dict[str, str]
    ) -> av.VideoCodecContext:
        """A CBR encoder at the current rate (a 250 ms buffer), keyframes only when asked (PLI)
        or reopened, on one thread: parallelism comes from sessions, not from inside a
        frame."""
        codec = cast(av.VideoCodecContext, av.CodecContext.create(name, "w"))
        codec.width, codec.height = width, height
        codec.bit_rate = self.target_bitrate
        codec.pix_fmt = "yuv420p"
        codec.gop_size = 3000
        rate = str(self.target_bitrate)
        # a quarter second of buffer bounds a keyframe to about six frames' worth: with a
        # second's, one keyframe at 200 kbps overflowed a narrow link's 200 ms queue and
        # was lost with it (and the next PLI asked for another)
        buffer = str(self.target_bitrate // 4)
        codec.options = {"bufsize": buffer, "minrate": rate, "maxrate": rate, **options}
        codec.thread_count = 1
        return codec


class AvatarVp8Encoder(CappedBitrate, Vp8Encoder):
    """aiortc's VP8 packetization and rate control, without the denoiser, at libvpx's
    fastest real-time speed."""

    def encode(self, frame: Frame, force_keyframe: bool = False) -> tuple[list[bytes], int]:
        assert isinstance(frame, av.VideoFrame)
        pts, time_base = frame.pts, frame.time_base
        assert pts is not None and time_base is not None  # the pacer stamps every frame
        codec, frame = self._codec_for(frame)
        if force_keyframe:
            frame.pict_type = av.video.frame.PictureType.I
        data = b"".join(bytes(p) for p in codec.encode(frame))
        payloads = self._packetize(data, self.picture_id)
        timestamp = convert_timebase(pts, time_base, VIDEO_TIME_BASE)
        self.picture_id = (self.picture_id + 1) % (1 << 15)
        return payloads, timestamp

    def _open(self, width: int, height: int) -> av.VideoCodecContext:
        codec = self._new_codec("libvpx", width, height, {
            "cpu-used": "-16",  # libvpx's fastest realtime speed: -0.1 dB, 25% less time
            "deadline": "realtime",
            "lag-in-frames": "0",
            "noise-sensitivity": "0",  # rendered frames have no sensor noise to remove
            "overshoot-pct": "15",
            "undershoot-pct": "100",
            "partitions": "0",
            "static-thresh": "1",
        })
        codec.qmin, codec.qmax = 2, 56
        return codec


class AvatarH264Encoder(CappedBitrate, H264Encoder):
    """aiortc's H.264 packetization (NAL units split into STAP-A / FU-A) and rate control,
    with x264's fastest preset, tuned for zero latency (no B-frames, no look-ahead)."""

    def _encode_frame(self, frame: av.VideoFrame, force_keyframe: bool) -> Iterator[bytes]:
        codec, frame = self._codec_for(frame)
        frame.pict_type = (
            av.video.frame.PictureType.I if force_keyframe else av.video.frame.PictureType.NONE
        )
        data = b"".join(bytes(p) for p in codec.encode(frame))
        if data:
            yield from self._split_bitstream(data)

    def _open(self, width: int, height: int) -> av.VideoCodecContext:
        codec = self._new_codec("libx264", width, height, {
            "preset": "ultrafast",
            "tune": "zerolatency",
            "level": "31",
            # a keyframe asked for (PLI) must be an IDR picture, as receivers start decoding
            # only at one (x264 makes one anyway while GOPs are closed, its default)
            "forced-idr": "1",
        })
        codec.framerate = fractions.Fraction(FPS, 1)
        codec.time_base = fractions.Fraction(1, FPS)
        codec.profile = "Baseline"  # what every WebRTC H.264 decoder takes
        return codec


class OpusPacketEncoder:
    """20 ms of 48 kHz s16 mono in, one Opus packet out, stamped for aiortc to send as is.

    CELT only ("lowdelay"): 2.5 ms of look-ahead instead of SILK's 6.5 ms, and at this
    bitrate speech loses nothing to it. Complexity 5 halves libopus's time against its
    default of 10. A mono packet is valid in the stereo stream WebRTC negotiates: decoders
    play it on both channels.

    Silence (an idle avatar sends it most of the time) is encoded until libopus's packets
    for it stop changing (a few frames: it is then in the same state as the decoder that
    played them); from then on that packet is sent again as it is, and libopus's 85 us a
    frame, on the event loop, are saved until sound comes back."""

    SETTLE = 3  # identical silent packets in a row before the packet is reused

    def __init__(self, bitrate: int = OPUS_BITRATE) -> None:
        self.bitrate = bitrate  # a new value takes effect at the next packet
        self.codec = self._open(bitrate)
        self._silent: bytes | None = None  # the last silent packet libopus made
        self._silent_run = 0  # how many in a row were that packet
        self.reused = 0

    @staticmethod
    def _open(bitrate: int) -> av.AudioCodecContext:
        codec = cast(av.AudioCodecContext, av.CodecContext.create("libopus", "w"))
        codec.sample_rate = OPUS_RATE
        codec.format = "s16"
        codec.layout = "mono"
        codec.bit_rate = bitrate
        codec.time_base = OPUS_TIME_BASE
        # constrained VBR: unconstrained, libopus spends 1.7 times the rate on loud speech
        codec.options = {"application": "lowdelay", "compression_level": "5", "vbr": "constrained"}
        return codec

    def encode(self, frame: av.AudioFrame) -> av.Packet:
        assert frame.pts is not None and frame.time_base is not None
        if self.bitrate != self.codec.bit_rate:  # (each packet stands alone: no glitch)
            self.codec = self._open(self.bitrate)
            self._silent, self._silent_run = None, 0
        silent = not frame.to_ndarray().any()
        if silent and self._silent is not None and self._silent_run >= self.SETTLE:
            packet = av.Packet(self._silent)
            self.reused += 1
        else:
            (packet,) = self.codec.encode(frame)  # libopus returns each 20 ms frame at once
            data = bytes(packet) if silent else None
            self._silent_run = self._silent_run + 1 if data and data == self._silent else 0
            self._silent = data
        packet.pts = convert_timebase(frame.pts, frame.time_base, OPUS_TIME_BASE)
        packet.time_base = OPUS_TIME_BASE
        return packet


@runtime_checkable
class EncodesOwnAudio(Protocol):
    """An audio track that hands aiortc Opus packets once given an encoder."""

    opus: OpusPacketEncoder | None


def prefer_h264(pc: RTCPeerConnection) -> None:
    """After the offer is set, before the answer is made: put the offer's H.264 codecs
    (and their retransmission codecs) first, so the answer sends H.264 when it can.
    aiortc answers in the offerer's order, and browsers offer VP8 first."""
    for transceiver in pc.getTransceivers():
        codecs = getattr(transceiver, "_codecs", [])
        h264 = {c.payloadType for c in codecs if c.mimeType.lower() == "video/h264"}

        def rank(c: RTCRtpCodecParameters, h264: set[int] = h264) -> int:
            base = c.parameters.get("apt") if c.mimeType.lower() == "video/rtx" else c.payloadType
            return 0 if base in h264 else 1

        transceiver._codecs = sorted(codecs, key=rank)  # stable: the offer's order otherwise


def use_avatar_encoders(pc: RTCPeerConnection) -> None:
    """After the answer is set, before media flows: each video sender gets the avatar's
    encoder for the negotiated codec (H.264 or VP8), and each audio track that can encode
    its own audio gets an Opus encoder when Opus was negotiated. Other codecs keep aiortc's
    encoders."""
    for transceiver in pc.getTransceivers():
        codecs = getattr(transceiver, "_codecs", [])
        mime = codecs[0].mimeType.lower() if codecs else ""
        if transceiver.sender.track is None:  # receives only: nothing to encode
            continue
        if mime == "video/h264":
            replace_encoder(transceiver.sender, AvatarH264Encoder())
        elif mime == "video/vp8":
            replace_encoder(transceiver.sender, AvatarVp8Encoder())
        elif mime == "audio/opus" and isinstance(transceiver.sender.track, EncodesOwnAudio):
            transceiver.sender.track.opus = OpusPacketEncoder()


def replace_encoder(sender: RTCRtpSender, encoder: Encoder) -> None:
    """aiortc makes a sender's encoder on the first frame and offers no setting for it."""
    sender._RTCRtpSender__encoder = encoder  # type: ignore[attr-defined]


def current_encoder(sender: RTCRtpSender) -> Encoder | None:
    return sender._RTCRtpSender__encoder  # type: ignore[attr-defined,no-any-return]
