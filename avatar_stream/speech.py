"""Pushed speech: decoding what front-ends send, and the speech protocol they send it with.

Three ways in, one path: an HTTP body (``audio/wav``, ``audio/L16``, ``audio/pcm``), binary
PCM16 chunks on a WebSocket, or the same chunks on the ``control`` data channel. Each is
decoded to float32 mono at its own rate, then :class:`SpeechInput` resamples it per
utterance (a soxr stream per utterance, flushed at its end) into the session's speech
queue, tagged with the utterance id the front-end chose.

Bad input is refused with a :class:`SpeechError` that carries the HTTP status and a
message for the sender; nothing is queued from a refused request, so what was accepted
earlier plays on untouched.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import re
import struct
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .ingest import Resampler
from .media import SAMPLE_RATE, Event
from .speechqueue import SpeechQueue, SpeechQueueFull

MIN_RATE = 8_000
MAX_RATE = 192_000
MAX_CHANNELS = 8
MAX_UTTERANCE_ID = 128
# sizes a streaming writer puts in a header it cannot seek back to fix: 0, or something
# far beyond any body we accept (espeak-ng --stdout and sox to a pipe write 0x7FFFF000)
_PLACEHOLDER_SIZE = 0x7F000000
_WAVE_FORMAT_PCM = 1
_WAVE_FORMAT_FLOAT = 3
_WAVE_FORMAT_EXTENSIBLE = 0xFFFE
_GUID_TAIL = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
WAV_TYPES = {"audio/wav", "audio/x-wav", "audio/wave", "audio/vnd.wave"}


class SpeechError(Exception):
    """Speech that cannot be queued: ``status`` is the HTTP status, the message says why."""

    def __init__(self, status: int, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after

    @property
    def code(self) -> str:
        """A short machine-readable kind, for error events on the WebSocket/data channel."""
        return {
            400: "bad_audio", 404: "not_found", 409: "utterance_closed", 413: "too_large",
            415: "unsupported_media_type", 429: "queue_full",
        }.get(self.status, "error")


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
        raise SpeechError(400, f"audio has {channels} channels; 1 to {MAX_CHANNELS} are accepted")
    if channels > MAX_CHANNELS:
        raise SpeechError(400, f"audio has {channels} channels; at most {MAX_CHANNELS}")
    if not MIN_RATE <= rate <= MAX_RATE:
        raise SpeechError(
            400, f"sample rate {rate} Hz is outside {MIN_RATE}..{MAX_RATE} Hz"
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
        raise SpeechError(400, f"float samples contain NaN or infinity ({bad} samples)")
    return np.clip(samples, -1.0, 1.0).astype(np.float32, copy=False)


def decode_pcm(data: bytes, rate: int, channels: int, sample: str) -> Pcm:
    """Raw interleaved PCM: ``sample`` is a numpy dtype string (``<i2``, ``>i2``, ``<f4``)."""
    check_format(rate, channels)
    if not data:
        raise SpeechError(400, "empty body: no audio")
    dtype = np.dtype(sample)
    frame = dtype.itemsize * channels
    if len(data) % frame:
        raise SpeechError(
            400, f"{len(data)} bytes is not a whole number of {frame}-byte sample frames"
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
            raise SpeechError(400, "empty body: no audio" if not data else _not_wav(data))
        return None
    if magic not in (b"RIFF", b"RF64") or data[8:12] != b"WAVE":
        raise SpeechError(400, _not_wav(data))
    fmt: WavFormat | None = None
    pos = 12
    while True:
        if pos + 8 > len(data):
            if complete:
                raise SpeechError(400, "truncated WAV: no data chunk")
            return None
        cid, size = data[pos : pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        body = pos + 8
        if cid == b"data":
            if fmt is None:
                raise SpeechError(400, "malformed WAV: the data chunk comes before any fmt chunk")
            return fmt, body, None if size == 0 or size >= _PLACEHOLDER_SIZE else size
        if body + size > len(data):
            if not complete and size < 1 << 20:
                return None
            raise SpeechError(
                400, f"truncated or malformed WAV: chunk {cid!r} says {size} bytes, "
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
            400, f"truncated WAV: the data chunk says {size} bytes but only {present} are "
            "present"
        )
    return wav_frames(data[body : body + size], fmt, notes)


def _parse_fmt(chunk: bytes) -> WavFormat:
    """Returns (format tag, channels, rate, block align, bits per sample)."""
    if len(chunk) < 16:
        raise SpeechError(400, f"malformed WAV: fmt chunk is {len(chunk)} bytes (at least 16)")
    tag, channels, rate, _byte_rate, align, bits = struct.unpack_from("<HHIIHH", chunk)
    if tag == _WAVE_FORMAT_EXTENSIBLE:
        if len(chunk) < 40 or chunk[26:40] != _GUID_TAIL:
            raise SpeechError(400, "malformed WAV: WAVE_FORMAT_EXTENSIBLE without a known "
                                   "sub-format")
        tag = struct.unpack_from("<H", chunk, 24)[0]
    if tag not in (_WAVE_FORMAT_PCM, _WAVE_FORMAT_FLOAT):
        raise SpeechError(400, f"unsupported WAV encoding (format tag {tag:#x}): send integer "
                               "PCM or IEEE float")
    check_format(rate, channels)
    ok_bits = (8, 16, 24, 32) if tag == _WAVE_FORMAT_PCM else (32, 64)
    if bits not in ok_bits:
        kind = "PCM" if tag == _WAVE_FORMAT_PCM else "float"
        raise SpeechError(400, f"unsupported WAV sample size: {bits}-bit {kind}")
    if align != channels * bits // 8:
        raise SpeechError(400, f"malformed WAV: block align {align} does not match "
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
        raise SpeechError(400, "WAV has no audio samples")
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
            raise SpeechError(400, f"the content type needs {name}=..., e.g. "
                                   "audio/L16;rate=24000;channels=1")
        return default
    try:
        return int(value)
    except ValueError:
        raise SpeechError(400, f"{name}={value!r} is not a whole number") from None


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
                raise SpeechError(400, f"audio/pcm format={fmt!r}: use s16 or f32")
            sample = "<i2" if fmt.startswith("s16") else "<f4"
        return decode_pcm(body, rate, channels, sample)
    raise SpeechError(
        415, f"unsupported content type {mime or '(none)'!r}: send audio/wav, "
        "audio/L16;rate=R;channels=C or audio/pcm;rate=R;channels=C"
    )


def check_utterance_id(value: object) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_UTTERANCE_ID or \
            not value.isprintable():
        raise SpeechError(400, f"utterance_id must be a printable string of 1 to "
                               f"{MAX_UTTERANCE_ID} characters")
    return value


# -- utterances into the queue -------------------------------------------------------------


@dataclass
class _Utterance:
    resampler: Resampler
    last_audio: float
    queued_samples: int = 0
    timer: asyncio.TimerHandle | None = None


class SpeechInput:
    """A session's pushed speech: utterance ids, one resampler per utterance, and ends.

    An utterance stays open (the avatar waits for more of it rather than going idle in
    the middle of a sentence) until its ``end`` comes, or until no audio has come for
    ``idle_end_s`` and its queued audio has all played: a front-end that forgets ``end``
    does not keep the avatar waiting. Audio that arrives later under the same id plays
    as a continuation. After an explicit end, or after a barge-in cut it, the id takes no
    more audio (409).
    """

    def __init__(
        self,
        queue: SpeechQueue,
        on_queued: Callable[[], None],
        idle_end_s: float = 1.0,
        quality: str = "HQ",
    ) -> None:
        self.queue = queue
        self.on_queued = on_queued
        self.idle_end_s = idle_end_s
        self.quality = quality
        self._open: dict[str, _Utterance] = {}
        self._closed: OrderedDict[str, str] = OrderedDict()  # id -> "ended" | "interrupted"
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()  # keeps a session's decoded pushes in arrival order

    def new_id(self) -> str:
        return f"utt-{next(self._ids)}"

    # -- pushing -----------------------------------------------------------------------

    def open(self, utterance_id: str) -> None:
        """Hold the utterance's place in line before its audio comes (WebSocket ``start``)."""
        self._check_usable(utterance_id)
        if utterance_id not in self._open:
            self._open[utterance_id] = _Utterance(Resampler(SAMPLE_RATE, self.quality),
                                                  time.monotonic())
            self.queue.push(np.zeros(0, np.float32), utterance_id)
            self._watch(utterance_id)

    def push(self, pcm: Pcm, utterance_id: str, end: bool = False) -> float:
        """Queue decoded speech now (small chunks: WebSocket, data channel); returns the
        seconds queued. Raises SpeechError (409 closed utterance, 429 queue full)."""
        self._check_room(pcm, utterance_id)
        self.open(utterance_id)
        out = self._resample(self._open[utterance_id], pcm, end)
        return self._commit(utterance_id, out, end)

    async def push_async(self, pcm: Pcm, utterance_id: str, end: bool = False) -> float:
        """As ``push``, resampling on a thread (large HTTP bodies): the event loop keeps
        pacing every session's media meanwhile. Pushes to one session keep their order."""
        async with self._lock:
            self._check_room(pcm, utterance_id)
            self.open(utterance_id)
            utt = self._open[utterance_id]
            loop = asyncio.get_running_loop()
            out = await loop.run_in_executor(None, self._resample, utt, pcm, end)
            if self._open.get(utterance_id) is not utt:  # barge-in while we resampled
                raise SpeechError(409, f"utterance {utterance_id!r} was interrupted")
            return self._commit(utterance_id, out, end)

    def end(self, utterance_id: str) -> bool:
        """No more audio for this utterance; False if it was not open."""
        utt = self._open.get(utterance_id)
        if utt is None:
            return False
        tail = utt.resampler.flush()
        if len(tail):
            with _suppress_full():
                self.queue.push(tail, utterance_id)
        self._finish(utterance_id, "ended")
        self.queue.end(utterance_id)
        self.on_queued()
        return True

    def interrupt(self) -> None:
        """Barge-in: every open utterance is cut; audio still arriving for it is refused."""
        for uid in list(self._open):
            self._finish(uid, "interrupted")

    def close(self) -> None:
        for utt in self._open.values():
            if utt.timer:
                utt.timer.cancel()
        self._open.clear()

    # -- internals ---------------------------------------------------------------------

    def _check_usable(self, utterance_id: str) -> None:
        state = self._closed.get(utterance_id)
        if state is not None:
            raise SpeechError(409, f"utterance {utterance_id!r} was {state}; "
                                   "use a new utterance_id")

    def _check_room(self, pcm: Pcm, utterance_id: str) -> None:
        self._check_usable(utterance_id)
        # what the push becomes at 16 kHz, plus what a resampler may release from before
        need = math.ceil(len(pcm.samples) * SAMPLE_RATE / pcm.rate) + SAMPLE_RATE // 20
        room = self.queue.room
        if need > room:
            queued = self.queue.seconds
            over = (need - room) / SAMPLE_RATE
            raise SpeechError(
                429,
                f"speech queue full: {queued:.1f} s queued, at most "
                f"{self.queue.max_samples / SAMPLE_RATE:.0f} s; this push "
                f"({pcm.seconds:.1f} s) fits in about {over:.1f} s",
                retry_after=over,
            )

    def _resample(self, utt: _Utterance, pcm: Pcm, end: bool) -> np.ndarray:
        out = utt.resampler(pcm.samples, pcm.rate)
        if end:
            tail = utt.resampler.flush()
            if len(tail):
                out = np.concatenate([out, tail])
        return out

    def _commit(self, utterance_id: str, samples: np.ndarray, end: bool) -> float:
        utt = self._open[utterance_id]
        try:
            self.queue.push(samples, utterance_id)
        except SpeechQueueFull as exc:  # only if live microphone speech filled it meanwhile
            raise SpeechError(429, str(exc), retry_after=1.0) from None
        utt.last_audio = time.monotonic()
        utt.queued_samples += len(samples)
        if end:
            self._finish(utterance_id, "ended")
            self.queue.end(utterance_id)
        self.on_queued()
        return len(samples) / SAMPLE_RATE

    def _finish(self, utterance_id: str, state: str) -> None:
        utt = self._open.pop(utterance_id, None)
        if utt and utt.timer:
            utt.timer.cancel()
        self._closed[utterance_id] = state
        while len(self._closed) > 4096:
            self._closed.popitem(last=False)

    def _watch(self, utterance_id: str, delay: float | None = None) -> None:
        utt = self._open[utterance_id]
        loop = asyncio.get_running_loop()
        utt.timer = loop.call_later(
            self.idle_end_s if delay is None else delay, self._check_idle, utterance_id
        )

    def _check_idle(self, utterance_id: str) -> None:
        utt = self._open.get(utterance_id)
        if utt is None:
            return
        quiet = time.monotonic() - utt.last_audio
        if quiet >= self.idle_end_s and self.queue.queued(utterance_id) == 0:
            # left open with nothing to play: finish it, but let later audio continue it
            tail = utt.resampler.flush()
            if len(tail):
                with _suppress_full():
                    self.queue.push(tail, utterance_id)
            self._open.pop(utterance_id, None)
            self.queue.end(utterance_id)
            self.on_queued()
            return
        self._watch(utterance_id, max(0.05, min(self.idle_end_s - quiet, 0.25)))


class _suppress_full:
    """A flushed resampler tail (a few ms) is dropped rather than refused loudly."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> bool:
        return kind is SpeechQueueFull


# -- the speech protocol on a WebSocket or the data channel --------------------------------



class SpeechProtocol:
    """One connection's speech messages (a WebSocket, or the ``control`` data channel).

    JSON text messages: ``start {sample_rate, channels, utterance_id}``, ``end``,
    ``interrupt``, ``ping``. Binary messages: little-endian PCM16, interleaved, for the
    utterance the last ``start`` opened. Replies that concern only this connection (acks,
    errors, pong) go to ``reply``; session events go to every listener elsewhere.
    A garbage message gets an error event and changes nothing.
    """

    def __init__(
        self,
        speech: SpeechInput,
        interrupt: Callable[[], object],
        reply: Callable[[Event], None],
        *,
        max_binary_bytes: int = 1 << 20,
        on_activity: Callable[[], None] | None = None,
    ) -> None:
        self.speech = speech
        self._interrupt = interrupt
        self.reply = reply
        self.max_binary_bytes = max_binary_bytes
        self.on_activity = on_activity
        self.utterance: str | None = None
        self.rate = 0
        self.channels = 1
        self._cut = False  # the current utterance was interrupted: drop its audio quietly

    def error(self, code: str, message: str) -> None:
        self.reply({"type": "error", "code": code, "message": message})

    def handle(self, message: str | bytes) -> None:
        if self.on_activity:
            self.on_activity()
        if isinstance(message, bytes | bytearray | memoryview):
            self._binary(bytes(message))
        else:
            self._text(message)

    def _text(self, text: str) -> None:
        try:
            msg = json.loads(text)
        except ValueError:
            self.error("bad_message", "text messages are JSON objects with a 'type'")
            return
        if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
            self.error("bad_message", "text messages are JSON objects with a 'type'")
            return
        kind = msg["type"]
        if kind == "start":
            self._start(msg)
        elif kind == "end":
            self._end(msg)
        elif kind == "interrupt":
            self._cut = self.utterance is not None
            self._interrupt()
        elif kind == "ping":
            self.reply({"type": "pong"})
        else:
            self.error("bad_message", f"unknown message type {kind!r} (start, end, interrupt, "
                                      "ping)")

    def _start(self, msg: dict[str, Any]) -> None:
        rate, channels = msg.get("sample_rate"), msg.get("channels", 1)
        if not isinstance(rate, int) or isinstance(rate, bool) or \
                not isinstance(channels, int) or isinstance(channels, bool):
            self.error("bad_message", "start needs integer sample_rate (and channels)")
            return
        try:
            check_format(rate, channels)
            uid = msg.get("utterance_id")
            uid = self.speech.new_id() if uid is None else check_utterance_id(uid)
            if self.utterance is not None and self.utterance != uid:
                self.speech.end(self.utterance)  # a new start ends the previous utterance
            self.speech.open(uid)
        except SpeechError as exc:
            self.error(exc.code, exc.message)
            return
        self.utterance, self.rate, self.channels, self._cut = uid, rate, channels, False
        self.reply({"type": "ack", "of": "start", "utterance_id": uid})

    def _end(self, msg: dict[str, Any]) -> None:
        uid = msg.get("utterance_id", self.utterance)
        if uid is None:
            self.error("no_start", "end without an utterance: send start first")
            return
        if uid == self.utterance:
            self.utterance, self._cut = None, False
        if not isinstance(uid, str):
            self.error("bad_message", "utterance_id must be a string")
            return
        ended = self.speech.end(uid)
        self.reply({"type": "ack", "of": "end", "utterance_id": uid, "was_open": ended})

    def _binary(self, data: bytes) -> None:
        if self.utterance is None:
            self.error("no_start", "binary audio before start: send "
                                   '{"type": "start", "sample_rate": ...} first')
            return
        if self._cut:
            return  # audio of an utterance the listener barged in on: dropped on purpose
        if len(data) > self.max_binary_bytes:
            self.error("too_large", f"binary message of {len(data)} bytes; at most "
                                    f"{self.max_binary_bytes}")
            return
        try:
            pcm = decode_pcm(data, self.rate, self.channels, "<i2")
            self.speech.push(pcm, self.utterance)
        except SpeechError as exc:
            if exc.status == 409:  # the utterance was cut by an interrupt from elsewhere
                self._cut = True
                return
            self.error(exc.code, exc.message)
