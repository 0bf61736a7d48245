"""Decoding pushed speech: every WAV flavour and raw PCM that front-ends send, and a clear
400/415 for everything else."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from wavs import tone, wav_bytes

from avatar_stream.audio.decode import decode_body, decode_wav, media_type
from avatar_stream.errors import SpeechError


@pytest.mark.parametrize("kind", ["u8", "s16", "s24", "s32", "f32", "f64"])
@pytest.mark.parametrize("extensible", [False, True])
def test_wav_sample_formats_decode_to_the_same_signal(kind, extensible) -> None:
    x = tone(24000, 0.1)
    pcm = decode_wav(wav_bytes(x, 24000, kind=kind, extensible=extensible))
    assert pcm.rate == 24000 and pcm.channels == 1 and pcm.samples.dtype == np.float32
    tol = 0.01 if kind == "u8" else 1e-4
    assert np.max(np.abs(pcm.samples - x)) < tol


def test_stereo_is_downmixed_and_extra_chunks_skipped() -> None:
    x = tone(48000, 0.05)
    stereo = np.stack([x, 0.5 * x], axis=1)
    pcm = decode_wav(wav_bytes(stereo, 48000, extra_chunk=b"LIST\x03\x00\x00\x00abc\x00"))
    assert pcm.channels == 2 and np.allclose(pcm.samples, 0.75 * x, atol=1e-4)


@pytest.mark.parametrize("size", [0, 0xFFFFFFFF, 0x7FFFF000])
def test_streaming_placeholder_sizes_use_the_bytes_present(size) -> None:
    x = tone(16000, 0.1)
    pcm = decode_wav(wav_bytes(x, 16000, data_size=size))
    assert len(pcm.samples) == len(x)


def test_espeak_stdout_header_is_accepted(tmp_path) -> None:
    import subprocess

    out = subprocess.run(["espeak-ng", "--stdout", "hello"], capture_output=True, check=True)
    pcm = decode_wav(out.stdout)
    assert pcm.rate == 22050 and pcm.seconds > 0.2 and pcm.notes


def test_a_shorter_data_size_ignores_trailing_bytes_and_partial_frames_are_dropped() -> None:
    x = tone(16000, 0.1)
    raw = wav_bytes(x, 16000, data_size=1000)
    assert len(decode_wav(raw).samples) == 500
    pcm = decode_wav(wav_bytes(x, 16000, data_size=0) + b"\x01")  # odd trailing byte
    assert len(pcm.samples) == len(x) and pcm.notes


GOOD = wav_bytes(tone(16000, 0.1), 16000)


@pytest.mark.parametrize(
    "body, words",
    [
        (b"", "empty body"),
        (b"ID3\x04\x00\x00\x00\x00\x00\x00" + bytes(100), "MP3"),
        (bytes([0xFF, 0xFB, 0x90, 0x64]) + bytes(100), "MP3"),
        (b"OggS" + bytes(100), "Ogg"),
        (b"hello world, not audio", "not a WAV"),
        (GOOD[:30], "truncated"),
        (GOOD[:12], "truncated"),
        (GOOD[:44] + GOOD[44:1000], "truncated WAV: the data chunk says"),
        (wav_bytes(tone(16000, 0.1), 16000, fmt_overrides={"channels": 0, "align": 0}),
         "0 channels"),
        (wav_bytes(tone(16000, 0.1), 16000, fmt_overrides={"rate": 0}), "sample rate 0"),
        (wav_bytes(tone(16000, 0.1), 16000, fmt_overrides={"rate": 4000}), "sample rate 4000"),
        (wav_bytes(tone(16000, 0.1), 16000, fmt_overrides={"rate": 10**9}), "outside"),
        (wav_bytes(tone(16000, 0.1), 16000, fmt_overrides={"tag": 0x55}), "format tag 0x55"),
        (wav_bytes(tone(16000, 0.1), 16000, fmt_overrides={"bits": 12}), "12-bit"),
        (wav_bytes(tone(16000, 0.1), 16000, fmt_overrides={"align": 7}), "block align"),
        (wav_bytes(np.zeros(0), 16000), "no audio samples"),
        (b"RIFF\x00\x00\x00\x00WAVEdata\x04\x00\x00\x00abcd", "before any fmt"),
        (b"RIFF\x00\x00\x00\x00WAVEfmt \x08\x00\x00\x00" + bytes(8), "fmt chunk is 8 bytes"),
        (b"RIFF\x00\x00\x00\x00WAVEfmt \xff\x00\x00\x00" + bytes(20), "past the end"),
    ],
)
def test_bad_wavs_are_refused_with_a_reason(body, words) -> None:
    with pytest.raises(SpeechError) as err:
        decode_wav(body)
    assert err.value.status == 400 and words in err.value.message


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_floats_are_refused(bad) -> None:
    x = tone(16000, 0.1)
    x[100] = bad
    for kind in ("f32", "f64"):
        with pytest.raises(SpeechError, match="NaN or infinity"):
            decode_wav(wav_bytes(x, 16000, kind=kind))
    with pytest.raises(SpeechError, match="NaN or infinity"):
        decode_body("audio/pcm;rate=16000;format=f32", x.astype("<f4").tobytes())


def test_raw_pcm_content_types() -> None:
    x = tone(24000, 0.1)
    s16 = (x * 32767).astype(np.int16)
    be = decode_body("audio/L16; rate=24000; channels=1", s16.astype(">i2").tobytes())
    le = decode_body("audio/pcm;rate=24000", s16.astype("<i2").tobytes())
    assert np.allclose(be.samples, x, atol=1e-3) and np.allclose(le.samples, x, atol=1e-3)
    stereo = np.stack([s16, s16], 1).astype(">i2").tobytes()
    assert np.allclose(decode_body('audio/L16;rate="24000";channels=2', stereo).samples, x,
                       atol=1e-3)
    assert media_type("Audio/L16 ; Rate=8000") == ("audio/l16", {"rate": "8000"})


@pytest.mark.parametrize(
    "ctype, body, status, words",
    [
        ("audio/L16", b"\x00\x01", 400, "rate="),
        ("audio/L16;rate=abc", b"\x00\x01", 400, "not a whole number"),
        ("audio/L16;rate=0", b"\x00\x01", 400, "sample rate 0"),
        ("audio/L16;rate=16000;channels=0", b"\x00\x01", 400, "0 channels"),
        ("audio/L16;rate=16000;channels=2", b"\x00\x01", 400, "whole number of 4-byte"),
        ("audio/L16;rate=16000", b"\x00", 400, "whole number of 2-byte"),
        ("audio/L16;rate=16000", b"", 400, "empty body"),
        ("audio/pcm;rate=16000;format=mulaw", b"\x00\x00", 400, "format"),
        ("audio/mpeg", b"ID3", 415, "unsupported content type"),
        ("", b"RIFF", 415, "unsupported content type"),
    ],
)
def test_bad_raw_pcm_is_refused(ctype, body, status, words) -> None:
    with pytest.raises(SpeechError) as err:
        decode_body(ctype, body)
    assert err.value.status == status and words in err.value.message, err.value.message


def test_header_struct_sanity() -> None:
    raw = wav_bytes(tone(8000, 0.01), 8000)
    assert raw[:4] == b"RIFF" and struct.unpack_from("<I", raw, 4)[0] == len(raw) - 8
