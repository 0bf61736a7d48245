"""The avatar's VP8 encoder: real libvpx, real aiortc packetization, decoded back."""

import fractions

import av
import numpy as np
from aiortc.codecs.vpx import Vp8Decoder, vp8_depayload
from aiortc.jitterbuffer import JitterFrame
from speechtools import until

from avatar_stream.client import AvatarClient
from avatar_stream.config import ServerConfig
from avatar_stream.encoders import MAX_BITRATE, AvatarVp8Encoder
from avatar_stream.server import running_server
from avatar_stream.synchronizer import rgb_to_i420


def moving_face(i: int) -> np.ndarray:
    """A smooth picture with a moving dark ellipse: something to encode, not noise."""
    y, x = np.mgrid[0:512, 0:512].astype(np.float32)
    img = np.stack([128 + 60 * np.sin(x / 40), 128 + 60 * np.cos(y / 50),
                    np.full_like(x, 120)], axis=2)
    cy, cx = 300 + 10 * np.sin(i / 5), 256
    mouth = ((x - cx) / 60) ** 2 + ((y - cy) / (10 + 10 * abs(np.sin(i / 3)))) ** 2 < 1
    img[mouth] = 30
    return img.astype(np.uint8)


def encode_decode(encoder: AvatarVp8Encoder, n: int) -> tuple[list[float], int]:
    decoder = Vp8Decoder()
    psnr, nbytes = [], 0
    for i in range(n):
        yuv = rgb_to_i420(moving_face(i))
        frame = av.VideoFrame.from_ndarray(yuv, format="yuv420p")
        frame.pts, frame.time_base = i * 3600, fractions.Fraction(1, 90_000)
        payloads, timestamp = encoder.encode(frame)
        assert timestamp == i * 3600
        data = b"".join(vp8_depayload(p) for p in payloads)
        nbytes += len(data)
        (out,) = decoder.decode(JitterFrame(data=data, timestamp=timestamp))
        mse = np.mean((out.to_ndarray()[:512].astype(np.float64) - yuv[:512]) ** 2)
        psnr.append(10 * np.log10(255**2 / max(mse, 1e-9)))
    return psnr, nbytes


def test_frames_decode_back_at_high_quality() -> None:
    psnr, _ = encode_decode(AvatarVp8Encoder(), 50)
    assert np.mean(psnr[10:]) > 38, psnr


def test_bitrate_follows_the_receiver_but_never_above_the_cap() -> None:
    encoder = AvatarVp8Encoder()
    encoder.target_bitrate = 1_500_000  # a receiver's estimate on a fast link
    assert encoder.target_bitrate == MAX_BITRATE
    _, nbytes = encode_decode(encoder, 100)  # 4 s
    assert encoder.codec.bit_rate == MAX_BITRATE
    assert nbytes * 8 / 4 < 1.3 * MAX_BITRATE
    encoder.target_bitrate = 300_000  # congestion: the estimate drops, so does the rate
    encode_decode(encoder, 2)
    assert encoder.codec.bit_rate == 300_000


async def test_a_session_sends_with_the_avatar_encoder() -> None:
    config = ServerConfig(host="127.0.0.1", port=0, ice_host_addresses=["127.0.0.1"])
    async with running_server(config) as (url, state), AvatarClient(url) as client:
        assert await until(lambda: len(client.received.video_t) >= 25, 10)
        session = state.sessions[client.session_id]
        (video,) = [t for t in session.pc.getTransceivers() if t.kind == "video"]
        encoder = video.sender._RTCRtpSender__encoder
        assert isinstance(encoder, AvatarVp8Encoder)
        assert encoder.codec is not None and encoder.codec.bit_rate <= MAX_BITRATE
