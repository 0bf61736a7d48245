"""Builds WAV files byte by byte for the tests (the stdlib ``wave`` writes only integer PCM)."""

from __future__ import annotations

import struct

import numpy as np

GUID_TAIL = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"


def wav_bytes(
    samples: np.ndarray,
    rate: int,
    *,
    kind: str = "s16",
    extensible: bool = False,
    data_size: int | None = None,
    fmt_overrides: dict[str, int] | None = None,
    extra_chunk: bytes = b"",
) -> bytes:
    """``samples``: float in [-1, 1], shape (n,) or (n, channels); ``kind``: u8, s16, s24,
    s32, f32, f64. ``data_size`` overrides the data chunk's size field."""
    x = np.asarray(samples, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    channels = x.shape[1]
    flat = x.reshape(-1)
    if kind == "u8":
        raw, bits, tag = (np.clip(flat * 128 + 128, 0, 255)).astype(np.uint8).tobytes(), 8, 1
    elif kind == "s16":
        raw, bits, tag = (np.clip(flat, -1, 1 - 2**-15) * 32768).astype("<i2").tobytes(), 16, 1
    elif kind == "s24":
        v = (np.clip(flat, -1, 1 - 2**-23) * 2**23).astype("<i4")
        raw = np.stack([v & 0xFF, (v >> 8) & 0xFF, (v >> 16) & 0xFF], 1).astype(np.uint8).tobytes()
        bits, tag = 24, 1
    elif kind == "s32":
        raw, bits, tag = (np.clip(flat, -1, 1 - 2**-31) * 2**31).astype("<i4").tobytes(), 32, 1
    elif kind == "f32":
        raw, bits, tag = flat.astype("<f4").tobytes(), 32, 3
    elif kind == "f64":
        raw, bits, tag = flat.astype("<f8").tobytes(), 64, 3
    else:
        raise ValueError(kind)
    f = {"tag": tag, "channels": channels, "rate": rate, "align": channels * bits // 8,
         "bits": bits}
    f.update(fmt_overrides or {})
    byte_rate = f["rate"] * f["align"]
    if extensible:
        fmt = struct.pack("<HHIIHHHHI", 0xFFFE, f["channels"], f["rate"], byte_rate, f["align"],
                          f["bits"], 22, f["bits"], 0)
        fmt += struct.pack("<H", f["tag"]) + GUID_TAIL
    else:
        fmt = struct.pack("<HHIIHH", f["tag"], f["channels"], f["rate"], byte_rate, f["align"],
                          f["bits"])
    size = len(raw) if data_size is None else data_size
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + extra_chunk
    body += b"data" + struct.pack("<I", size) + raw
    return b"RIFF" + struct.pack("<I", len(body)) + body


def tone(rate: int, seconds: float, freq: float = 220.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return amp * np.sin(2 * np.pi * freq * t)
