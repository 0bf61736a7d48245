"""The avatar's video encoders (real libvpx and x264, real aiortc packetization, decoded
back) and its Opus packets."""

import fractions

import av
import numpy as np
import pytest
from aiortc.codecs.base import Decoder
from aiortc.codecs.h264 import H264Decoder, h264_depayload
from aiortc.codecs.vpx import Vp8Decoder, vp8_depayload
from aiortc.jitterbuffer import JitterFrame
from speechtools import until

from avatar_stream.client.avatarclient import AvatarClient
from avatar_stream.config import ServerConfig
from avatar_stream.transports.http.app import running_server
from avatar_stream.transports.webrtc.encoders import (
    MAX_BITRATE,
    AvatarH264Encoder,
    AvatarVp8Encoder,
    CappedBitrate,
    OpusPacketEncoder,
)
from avatar_stream.transports.webrtc.tracks import rgb_to_i420


def moving_face(i: int) -> np.ndarray:
    """A smooth picture with a moving dark ellipse: something to encode, not noise."""
    y, x = np.mgrid[0:512, 0:512].astype(np.float32)
    img = np.stack([128 + 60 * np.sin(x / 40), 128 + 60 * np.cos(y / 50),
                    np.full_like(x, 120)], axis=2)
    cy, cx = 300 + 10 * np.sin(i / 5), 256
    mouth = ((x - cx) / 60) ** 2 + ((y - cy) / (10 + 10 * abs(np.sin(i / 3)))) ** 2 < 1
    img[mouth] = 30
    return img.astype(np.uint8)


CODECS = {  # encoder, decoder, depayloader
    "vp8": (AvatarVp8Encoder, Vp8Decoder, vp8_depayload),
    "h264": (AvatarH264Encoder, H264Decoder, h264_depayload),
}


def encode_decode(encoder: CappedBitrate, n: int) -> tuple[list[float], int]:
    name = "h264" if isinstance(encoder, AvatarH264Encoder) else "vp8"
    _, decoder_class, depayload = CODECS[name]
    decoder: Decoder = decoder_class()
    psnr, nbytes = [], 0
    for i in range(n):
        yuv = rgb_to_i420(moving_face(i))
        frame = av.VideoFrame.from_ndarray(yuv, format="yuv420p")
        frame.pts, frame.time_base = i * 3600, fractions.Fraction(1, 90_000)
        payloads, timestamp = encoder.encode(frame)  # type: ignore[attr-defined]
        assert timestamp == i * 3600
        data = b"".join(depayload(p) for p in payloads)
        nbytes += len(data)
        (out,) = decoder.decode(JitterFrame(data=data, timestamp=timestamp))
        mse = np.mean((out.to_ndarray()[:512].astype(np.float64) - yuv[:512]) ** 2)
        psnr.append(10 * np.log10(255**2 / max(mse, 1e-9)))
    return psnr, nbytes


@pytest.mark.parametrize("codec", CODECS)
def test_frames_decode_back_at_high_quality(codec: str) -> None:
    psnr, _ = encode_decode(CODECS[codec][0](), 50)
    assert np.mean(psnr[10:]) > 38, psnr


@pytest.mark.parametrize("codec", CODECS)
def test_bitrate_follows_the_receiver_but_never_above_the_cap(codec: str) -> None:
    encoder = CODECS[codec][0]()
    assert encoder.target_bitrate == 500_000  # where aiortc's VP8 starts, for both
    encoder.target_bitrate = 1_500_000  # a receiver's estimate on a fast link
    assert encoder.target_bitrate == MAX_BITRATE
    _, nbytes = encode_decode(encoder, 100)  # 4 s
    assert encoder.codec.bit_rate == MAX_BITRATE
    assert nbytes * 8 / 4 < 1.3 * MAX_BITRATE
    encoder.target_bitrate = 300_000  # congestion: the estimate drops, so does the rate
    encode_decode(encoder, 2)
    assert encoder.codec.bit_rate == 300_000


def test_an_asked_for_h264_keyframe_is_an_idr_picture() -> None:
    """A receiver that lost packets asks for a keyframe (PLI) and decodes again only from
    an IDR picture (NAL unit type 5)."""

    def nal_types(force: bool, i: int) -> set[int]:
        frame = av.VideoFrame.from_ndarray(rgb_to_i420(moving_face(i)), format="yuv420p")
        frame.pts, frame.time_base = i * 3600, fractions.Fraction(1, 90_000)
        payloads, _ = encoder.encode(frame, force_keyframe=force)
        data = b"".join(h264_depayload(p) for p in payloads)
        return {unit[0] & 0x1F for unit in data.split(b"\x00\x00\x00\x01") if unit}

    encoder = AvatarH264Encoder()
    assert 5 in nal_types(False, 0)  # the first picture
    assert all(5 not in nal_types(False, i) for i in range(1, 10))
    assert 5 in nal_types(True, 10)


@pytest.mark.parametrize(
    ("offered", "expected"),
    [(None, AvatarH264Encoder), (["video/VP8"], AvatarVp8Encoder)],
)
async def test_a_session_sends_with_the_avatar_encoders(
    offered: list[str] | None, expected: type
) -> None:
    """An offer with H.264 (aiortc's and every browser's put VP8 first) is answered with
    H.264; an offer of VP8 alone gets VP8. Audio leaves as the session's own Opus packets."""
    config = ServerConfig(host="127.0.0.1", port=0, ice_host_addresses=["127.0.0.1"])
    async with running_server(config) as (url, state), AvatarClient(
        url, video_codecs=offered
    ) as client:
        assert await until(lambda: len(client.received.video_t) >= 25, 10)  # decoded
        assert await until(lambda: len(client.received.audio_t) >= 50, 10)
        session = state.sessions[client.session_id]
        (video,) = [t for t in session.transport.pc.getTransceivers() if t.kind == "video"]
        encoder = video.sender._RTCRtpSender__encoder
        assert isinstance(encoder, expected)
        # retransmissions go out as the RTX that the offer paired with the chosen codec
        codecs = video._codecs
        (rtx,) = [c for c in codecs if c.mimeType.lower() == "video/rtx"
                  and c.parameters["apt"] == codecs[0].payloadType]
        assert video.sender._RTCRtpSender__rtx_payload_type == rtx.payloadType
        assert encoder.codec is not None and encoder.codec.bit_rate <= MAX_BITRATE
        assert isinstance(session.transport.audio.opus, OpusPacketEncoder)
        assert isinstance(client.mic.opus, OpusPacketEncoder)  # the client's microphone too


def test_opus_packets_decode_back_to_the_speech() -> None:
    """20 ms of mono in, one packet out, stamped on the frame's clock; a stereo decoder
    (what a WebRTC peer runs) plays it back on both channels."""
    encoder = OpusPacketEncoder()
    decoder = av.CodecContext.create("libopus", "r")
    decoder.sample_rate, decoder.layout, decoder.format = 48_000, "stereo", "s16"
    t = np.arange(48_000) / 48_000
    tone = (8000 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.int16)
    out = []
    for k in range(50):
        frame = av.AudioFrame.from_ndarray(tone[None, k * 960 : (k + 1) * 960], layout="mono")
        frame.sample_rate = 48_000
        frame.pts, frame.time_base = 1000 + k * 960, fractions.Fraction(1, 48_000)
        packet = encoder.encode(frame)
        assert packet.pts == 1000 + k * 960 and packet.time_base == frame.time_base
        for decoded in decoder.decode(packet):
            out.append(decoded.to_ndarray().reshape(-1, 2))
    pcm = np.concatenate(out).astype(np.float64)
    assert np.array_equal(pcm[:, 0], pcm[:, 1])  # mono on both channels
    # the codec's own delay is a few milliseconds; past it the waveform matches
    best = max(np.corrcoef(pcm[d : 40_000 + d, 0], tone[:40_000])[0, 1] for d in range(0, 400))
    assert best > 0.95, best


def test_opus_silence_is_encoded_until_it_settles_then_reused() -> None:
    """An idle avatar's silence costs one libopus call per frame only until its packets
    stop changing; speech after it is encoded (and decodes) as before."""
    encoder = OpusPacketEncoder()
    decoder = av.CodecContext.create("libopus", "r")

    def frame(k: int, pcm: np.ndarray) -> av.AudioFrame:
        f = av.AudioFrame.from_ndarray(pcm[None, :], layout="mono")
        f.sample_rate, f.pts, f.time_base = 48_000, k * 960, fractions.Fraction(1, 48_000)
        return f

    t = np.arange(960) / 48_000
    tone = (8000 * np.sin(2 * np.pi * 300 * t)).astype(np.int16)
    packets = [encoder.encode(frame(k, tone)) for k in range(5)]
    packets += [encoder.encode(frame(k, np.zeros(960, np.int16))) for k in range(5, 55)]
    # the first silent frames went through libopus (its tail of the tone decays)
    assert 25 <= encoder.reused <= 47, encoder.reused
    silent = {bytes(p) for p in packets[55 - encoder.reused - 1:55]}
    assert len(silent) == 1  # then one packet, sent again
    assert [p.pts for p in packets] == [k * 960 for k in range(55)]  # each on its own time
    reused = encoder.reused
    packets += [encoder.encode(frame(k, tone)) for k in range(55, 60)]
    assert encoder.reused == reused  # sound again: encoded
    out = [decoder.decode(p) for p in packets]
    assert all(len(o) == 1 and o[0].samples == 960 for o in out)
    loud = np.abs(np.concatenate([o[0].to_ndarray().ravel() for o in out[56:]])).max()
    assert loud > 3000
    assert not np.concatenate([o[0].to_ndarray().ravel() for o in out[45:55]]).any()
