"""Decoding pushed speech: WAV (integer PCM or float, any rate and channel count), raw
``audio/L16`` and ``audio/pcm`` bodies, to float32 mono at the rate it was sent.

Bad input is refused with a :class:`~avatar_stream.errors.SpeechError` that says what is
wrong, before anything of it is queued."""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field

import numpy as np

from avatar_stream.errors import SpeechError

MIN_RATE = 8_000
MAX_RATE = 192_000
MAX_CHANNELS = 8
# sizes a streaming writer puts in a header it cannot seek back to fix: 0, or something
# far beyond any body we accept (espeak-ng --stdout and sox to a pipe write 0x7FFFF000)
_PLACEHOLDER_SIZE = 0x7F000000
_WAVE_FORMAT_PCM = 1
_WAVE_FORMAT_FLOAT = 3
_WAVE_FORMAT_EXTENSIBLE = 0xFFFE
_GUID_TAIL = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
WAV_TYPES = {"audio/wav", "audio/x-wav", "audio/wave", "audio/vnd.wave"}


@dataclass
class Pcm:
    """Decoded speech: float32 mono in [-1, 1] at ``rate``."""

    samples: np.ndarray
    rate: int
    channels: int  # as sent, before the downmix
    notes: list[str] = field(default_factory=list)  # what was tolerated, for the reply

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.rate


# -- decoding ------------------------------------------------------------------------------


def check_format(rate: int, channels: int) -> None:
    """Refuse sample rates and channel counts nothing sensible sends."""
    if channels < 1:
        raise SpeechError("bad_audio",
                          f"audio has {channels} channels; 1 to {MAX_CHANNELS} are accepted")
    if channels > MAX_CHANNELS:
        raise SpeechError("bad_audio", f"audio has {channels} channels; at most {MAX_CHANNELS}")
    if not MIN_RATE <= rate <= MAX_RATE:
        raise SpeechError(
            "bad_audio", f"sample rate {rate} Hz is outside {MIN_RATE}..{MAX_RATE} Hz"
        )


def interleaved_to_mono(data: np.ndarray, channels: int) -> np.ndarray:
    """Interleaved float samples to mono (mean of the channels)."""
    if channels == 1:
        return np.ascontiguousarray(data, dtype=np.float32)
    return data.reshape(-1, channels).mean(axis=1, dtype=np.float32)


def _finite(samples: np.ndarray) -> np.ndarray:
    """Float speech with NaN or infinity is refused (it is a bug upstream, not speech);
    values beyond full scale are clipped."""
    if not np.all(np.isfinite(samples)):
        bad = int(np.count_nonzero(~np.isfinite(samples)))
        raise SpeechError("bad_audio", f"float samples contain NaN or infinity ({bad} samples)")
    return np.clip(samples, -1.0, 1.0).astype(np.float32, copy=False)


def decode_pcm(data: bytes, rate: int, channels: int, sample: str) -> Pcm:
    """Raw interleaved PCM: ``sample`` is a numpy dtype string (``<i2``, ``>i2``, ``<f4``)."""
    check_format(rate, channels)
    if not data:
        raise SpeechError("bad_audio", "empty body: no audio")
    dtype = np.dtype(sample)
    frame = dtype.itemsize * channels
    if len(data) % frame:
        raise SpeechError(
            "bad_audio", f"{len(data)} bytes is not a whole number of {frame}-byte sample frames"
        )
    raw = np.frombuffer(data, dtype)
    if dtype.kind == "f":
        mono = interleaved_to_mono(_finite(raw.astype(np.float32)), channels)
    else:
        mono = interleaved_to_mono(raw.astype(np.float32) / float(2 ** (8 * dtype.itemsize - 1)),
                                   channels)
    return Pcm(mono, rate, channels)


def _not_wav(data: bytes) -> str:
    head = data[:4]
    if head[:3] == b"ID3" or (len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0):
        return "not a WAV file: it looks like MP3 (send WAV or raw PCM: audio/L16)"
    for magic, name in ((b"OggS", "Ogg"), (b"fLaC", "FLAC"), (b"RIFX", "big-endian RIFX")):
        if head == magic:
            return f"not a WAV file: it looks like {name} (send WAV or raw PCM: audio/L16)"
    return "not a WAV file (no RIFF/WAVE header)"


WavFormat = tuple[int, int, int, int, int]  # tag, channels, rate, block align, bits


def wav_format(data: bytes, complete: bool = False) -> tuple[WavFormat, int, int | None] | None:
    """Parse a WAV header: (format, offset of the samples, data size or None for "to the
    end"). With ``complete=False`` (a stream) returns None while more bytes are needed;
    raises SpeechError for what is not, or cannot be, a WAV file."""
    magic = data[:4]
    if len(data) < 12:
        if complete or (magic and not (b"RIFF".startswith(magic) or b"RF64".startswith(magic))):
            raise SpeechError("bad_audio", "empty body: no audio" if not data else _not_wav(data))
        return None
    if magic not in (b"RIFF", b"RF64") or data[8:12] != b"WAVE":
        raise SpeechError("bad_audio", _not_wav(data))
    fmt: WavFormat | None = None
    pos = 12
    while True:
        if pos + 8 > len(data):
            if complete:
                raise SpeechError("bad_audio", "truncated WAV: no data chunk")
            return None
        cid, size = data[pos : pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        body = pos + 8
        if cid == b"data":
            if fmt is None:
                raise SpeechError("bad_audio",
                                  "malformed WAV: the data chunk comes before any fmt chunk")
            return fmt, body, None if size == 0 or size >= _PLACEHOLDER_SIZE else size
        if body + size > len(data):
            if not complete and size < 1 << 20:
                return None
            raise SpeechError(
                "bad_audio", f"truncated or malformed WAV: chunk {cid!r} says {size} bytes, "
                f"past the end of the body"
            )
        if cid == b"fmt ":
            fmt = _parse_fmt(data[body : body + size])
        pos = body + size + (size & 1)


def decode_wav(data: bytes) -> Pcm:
    """A RIFF WAVE file: PCM 8/16/24/32-bit, IEEE float 32/64, or WAVE_FORMAT_EXTENSIBLE.

    A data size of 0 or of some huge placeholder (what a writer streaming to a pipe puts
    there: espeak-ng and sox write 0x7FFFF000) means "the rest of the body". A data size
    that is plainly wrong (more bytes than the body holds, and no placeholder) is a
    truncated file and is refused. Header chunks that run past the end are refused.
    """
    found = wav_format(data, complete=True)
    assert found is not None
    fmt, body, size = found
    present = len(data) - body
    notes: list[str] = []
    if size is None:
        claimed = struct.unpack_from("<I", data, body - 4)[0]
        if claimed:
            notes.append(f"WAV data size field {claimed:#x} is a streaming placeholder: "
                         f"used the {present} bytes present")
        size = present
    elif size > present:
        raise SpeechError(
            "bad_audio", f"truncated WAV: the data chunk says {size} bytes but only {present} are "
            "present"
        )
    return wav_frames(data[body : body + size], fmt, notes)


def _parse_fmt(chunk: bytes) -> WavFormat:
    """Returns (format tag, channels, rate, block align, bits per sample)."""
    if len(chunk) < 16:
        raise SpeechError("bad_audio",
                          f"malformed WAV: fmt chunk is {len(chunk)} bytes (at least 16)")
    tag, channels, rate, _byte_rate, align, bits = struct.unpack_from("<HHIIHH", chunk)
    if tag == _WAVE_FORMAT_EXTENSIBLE:
        if len(chunk) < 40 or chunk[26:40] != _GUID_TAIL:
            raise SpeechError("bad_audio", "malformed WAV: WAVE_FORMAT_EXTENSIBLE without a known "
                                   "sub-format")
        tag = struct.unpack_from("<H", chunk, 24)[0]
    if tag not in (_WAVE_FORMAT_PCM, _WAVE_FORMAT_FLOAT):
        raise SpeechError("bad_audio", f"unsupported WAV encoding (format tag {tag:#x}): "
                                       "send integer PCM or IEEE float")
    check_format(rate, channels)
    ok_bits = (8, 16, 24, 32) if tag == _WAVE_FORMAT_PCM else (32, 64)
    if bits not in ok_bits:
        kind = "PCM" if tag == _WAVE_FORMAT_PCM else "float"
        raise SpeechError("bad_audio", f"unsupported WAV sample size: {bits}-bit {kind}")
    if align != channels * bits // 8:
        raise SpeechError("bad_audio", f"malformed WAV: block align {align} does not match "
                               f"{channels} channels of {bits} bits")
    return tag, channels, rate, align, bits


def wav_frames(raw: bytes, fmt: WavFormat, notes: list[str] | None = None) -> Pcm:
    """Decode WAV sample bytes of format ``fmt`` (a partial last frame is dropped)."""
    notes = [] if notes is None else notes
    tag, channels, rate, align, bits = fmt
    whole = len(raw) - len(raw) % align
    if whole != len(raw):
        notes.append(f"dropped a partial sample frame ({len(raw) - whole} bytes) at the end")
        raw = raw[:whole]
    if not raw:
        raise SpeechError("bad_audio", "WAV has no audio samples")
    if tag == _WAVE_FORMAT_FLOAT:
        samples = np.frombuffer(raw, "<f4" if bits == 32 else "<f8").astype(np.float32)
        samples = _finite(samples)
    elif bits == 8:
        samples = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif bits == 16:
        samples = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    elif bits == 24:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        value = (b[:, 0] << 8) | (b[:, 1] << 16) | (b[:, 2] << 24)  # sign from the top byte
        samples = value.astype(np.float32) / 2147483648.0
    else:
        samples = np.frombuffer(raw, "<i4").astype(np.float32) / 2147483648.0
    return Pcm(interleaved_to_mono(samples, channels), rate, channels, notes)


_PARAM = re.compile(r";\s*([A-Za-z0-9_-]+)\s*=\s*\"?([^;\"]*)\"?")


def media_type(header: str) -> tuple[str, dict[str, str]]:
    """``audio/L16; rate=24000; channels=1`` -> ("audio/l16", {"rate": "24000", ...})."""
    mime, _, rest = header.partition(";")
    params = {k.lower(): v.strip() for k, v in _PARAM.findall(";" + rest)}
    return mime.strip().lower(), params


def _int_param(params: dict[str, str], name: str, default: int | None) -> int:
    value = params.get(name)
    if value is None:
        if default is None:
            raise SpeechError("bad_audio", f"the content type needs {name}=..., e.g. "
                                   "audio/L16;rate=24000;channels=1")
        return default
    try:
        return int(value)
    except ValueError:
        raise SpeechError("bad_audio", f"{name}={value!r} is not a whole number") from None


def decode_body(content_type: str, body: bytes) -> Pcm:
    """Decode an HTTP body by its content type (raises SpeechError: 400 or 415).

    ``audio/L16`` is RFC 3551's: big-endian 16-bit. ``audio/pcm`` is the little-endian
    16-bit PCM most TTS engines emit (``format=f32`` for little-endian float32).
    """
    mime, params = media_type(content_type)
    if mime in WAV_TYPES:
        return decode_wav(body)
    if mime in ("audio/l16", "audio/pcm"):
        rate = _int_param(params, "rate", None)
        channels = _int_param(params, "channels", 1)
        if mime == "audio/l16":
            sample = ">i2"
        else:
            fmt = params.get("format", "s16").lower()
            if fmt not in ("s16", "s16le", "f32", "f32le"):
                raise SpeechError("bad_audio", f"audio/pcm format={fmt!r}: use s16 or f32")
            sample = "<i2" if fmt.startswith("s16") else "<f4"
        return decode_pcm(body, rate, channels, sample)
    raise SpeechError(
        "unsupported_media_type", f"unsupported content type {mime or '(none)'!r}: send audio/wav, "
        "audio/L16;rate=R;channels=C or audio/pcm;rate=R;channels=C"
    )
