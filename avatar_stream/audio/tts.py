"""Text to speech for ``POST /v1/sessions/{id}/say``.

Two backends behind one interface, both yielding decoded speech as it becomes available
so the avatar can start talking before a long text is fully synthesised:

- ``espeak``: espeak-ng, offline, as a subprocess (the text goes in on stdin, never on
  the command line), with a time limit; the default, so ``say`` works with no network.
- ``openai``: any OpenAI-compatible ``/v1/audio/speech`` endpoint (many TTS servers speak
  it, F5-TTS ones included), asked for ``wav`` or ``pcm``; the reply is decoded as it
  streams in.

Failures are :class:`TTSError` with the HTTP status the ``say`` call should answer:
502 when the backend misbehaves, 504 when it is too slow, 503 when there is none.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator

import aiohttp

from avatar_stream.audio.decode import (
    Pcm,
    decode_pcm,
    decode_wav,
    media_type,
    wav_format,
    wav_frames,
)
from avatar_stream.config import ServerConfig
from avatar_stream.errors import SpeechError

OPENAI_PCM_RATE = 24_000  # what OpenAI's "pcm" format is: 24 kHz mono s16le
MAX_RESPONSE_BYTES = 64 * 1024 * 1024
_VOICE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")


class TTSError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class TTS(ABC):
    name: str

    @abstractmethod
    def stream(self, text: str, voice: str | None = None) -> AsyncIterator[Pcm]:
        """Speech for ``text`` in pieces, as they are made."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Free connections."""


def check_voice(voice: str) -> str:
    if not _VOICE.match(voice):
        raise TTSError(400, "voice must be 1-64 letters, digits or _.+- (no leading symbol)")
    return voice


class EspeakTTS(TTS):
    name = "espeak"

    def __init__(self, voice: str | None = None, timeout_s: float = 30.0,
                 binary: str | None = None) -> None:
        self.voice = voice or "en-us"
        self.timeout_s = timeout_s
        self.binary = binary or shutil.which("espeak-ng")

    async def stream(self, text: str, voice: str | None = None) -> AsyncIterator[Pcm]:
        if self.binary is None:
            raise TTSError(503, "espeak-ng is not installed on the server (Debian: espeak-ng)")
        voice = check_voice(voice or self.voice)
        proc = await asyncio.create_subprocess_exec(
            self.binary, "-v", voice, "-b", "1", "--stdout",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(text.encode()), self.timeout_s)
        except asyncio.TimeoutError:
            raise TTSError(504, f"espeak-ng took longer than {self.timeout_s:g} s") from None
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        message = err.decode(errors="replace").strip()
        if proc.returncode != 0 or not out:
            if "voice does not exist" in message or "phoneme table" in message:
                raise TTSError(400, f"espeak-ng has no voice {voice!r}")
            raise TTSError(502, f"espeak-ng failed ({proc.returncode}): {message[:200]}")
        loop = asyncio.get_running_loop()
        try:
            yield await loop.run_in_executor(None, decode_wav, out)
        except SpeechError as exc:
            raise TTSError(502, f"espeak-ng output: {exc.message}") from None


class OpenAITTS(TTS):
    """An OpenAI-compatible ``/v1/audio/speech`` endpoint."""

    name = "openai"

    def __init__(self, url: str, model: str, voice: str | None = None,
                 api_key: str | None = None, response_format: str = "wav",
                 timeout_s: float = 30.0) -> None:
        if response_format not in ("wav", "pcm"):
            raise ValueError("response_format must be wav or pcm")
        self.url = url
        self.model = model
        self.voice = voice or "alloy"
        self.api_key = api_key
        self.response_format = response_format
        self.timeout_s = timeout_s
        self._http: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def stream(self, text: str, voice: str | None = None) -> AsyncIterator[Pcm]:
        voice = check_voice(voice or self.voice)
        if self._http is None:
            self._http = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout_s, sock_connect=5)
            )
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        body = {"model": self.model, "input": text, "voice": voice,
                "response_format": self.response_format}
        try:
            async with self._http.post(self.url, json=body, headers=headers) as resp:
                if resp.status != 200:
                    detail = (await resp.content.read(300)).decode(errors="replace")
                    raise TTSError(502, f"TTS endpoint answered {resp.status}: {detail}")
                ctype, params = media_type(resp.headers.get("Content-Type", ""))
                if ctype in ("audio/mpeg", "audio/mp3", "audio/ogg", "audio/opus",
                             "audio/aac", "audio/flac"):
                    raise TTSError(502, f"TTS endpoint sent {ctype}; it must honour "
                                        "response_format wav or pcm")
                wav = ctype in ("audio/wav", "audio/x-wav", "audio/wave") or (
                    self.response_format == "wav" and ctype not in ("audio/pcm", "audio/l16")
                )
                decoder = _WavStream() if wav else _PcmStream(params)
                total = 0
                async for chunk in resp.content.iter_any():
                    total += len(chunk)
                    if total > MAX_RESPONSE_BYTES:
                        raise TTSError(502, "TTS endpoint sent more than 64 MB")
                    pcm = decoder.feed(chunk)
                    if pcm is not None:
                        yield pcm
                decoder.finish()
        except asyncio.TimeoutError:
            raise TTSError(504, f"TTS endpoint took longer than {self.timeout_s:g} s") from None
        except aiohttp.ClientError as exc:
            raise TTSError(502, f"TTS endpoint unreachable: {exc}") from None
        except SpeechError as exc:
            raise TTSError(502, f"TTS endpoint audio: {exc.message}") from None


class _PcmStream:
    """16-bit little-endian PCM as it arrives (OpenAI's ``pcm``: 24 kHz mono)."""

    def __init__(self, params: dict[str, str]) -> None:
        self.rate = int(params.get("rate", OPENAI_PCM_RATE))
        self.channels = int(params.get("channels", 1))
        self._rest = b""
        self.got = 0

    def feed(self, chunk: bytes) -> Pcm | None:
        data = self._rest + chunk
        frame = 2 * self.channels
        whole = len(data) - len(data) % frame
        self._rest = data[whole:]
        if not whole:
            return None
        self.got += whole
        return decode_pcm(data[:whole], self.rate, self.channels, "<i2")

    def finish(self) -> None:
        if not self.got:
            raise SpeechError("bad_audio", "no audio")


class _WavStream:
    """A WAV file as it arrives: the header once it is complete, then its samples."""

    def __init__(self) -> None:
        self._buf = b""
        self._fmt: tuple[int, int, int, int, int] | None = None
        self._left: int | None = None  # data bytes still expected (None: to the end)
        self.got = 0

    def feed(self, chunk: bytes) -> Pcm | None:
        self._buf += chunk
        if self._fmt is None:
            found = wav_format(self._buf)
            if found is None:
                if len(self._buf) > 1 << 20:
                    raise SpeechError("bad_audio", "no WAV data chunk in the first MB")
                return None
            self._fmt, offset, self._left = found
            self._buf = self._buf[offset:]
        align = self._fmt[3]
        usable = len(self._buf) - len(self._buf) % align
        if self._left is not None:
            usable = min(usable, self._left - self._left % align)
        if usable <= 0:
            return None
        data, self._buf = self._buf[:usable], self._buf[usable:]
        if self._left is not None:
            self._left -= usable
            if self._left < align:
                self._buf = b""  # anything after the data chunk is not audio
        self.got += usable
        return wav_frames(data, self._fmt)

    def finish(self) -> None:
        if self._fmt is None:
            decode_wav(self._buf)  # raises the reason it is not a WAV
        if not self.got:
            raise SpeechError("bad_audio", "WAV has no audio samples")


def create_tts(config: ServerConfig) -> TTS | None:
    if config.tts == "off":
        return None
    if config.tts == "espeak":
        return EspeakTTS(config.tts_voice, config.tts_timeout_s)
    if config.tts == "openai":
        if not config.tts_url:
            raise ValueError("--tts openai needs --tts-url (an /v1/audio/speech endpoint)")
        return OpenAITTS(config.tts_url, config.tts_model, config.tts_voice,
                         config.tts_api_key, config.tts_format, config.tts_timeout_s)
    raise ValueError(f"unknown TTS backend {config.tts!r} (espeak, openai, off)")
