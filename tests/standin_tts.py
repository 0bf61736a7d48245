"""A stand-in OpenAI-compatible TTS server for the tests (none exists on this machine): it
answers ``POST /v1/audio/speech`` the way such servers do (JSON request, streamed ``wav``
with a streaming writer's placeholder sizes, or raw 24 kHz ``pcm``), speaking with
espeak-ng so the speech that comes back can be recognised. Shared by the TTS, example and
framework tests."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from collections.abc import AsyncIterator

import numpy as np
from aiohttp import web

from avatar_stream.audio.decode import decode_wav


def espeak_wav(text: str) -> bytes:
    return subprocess.run(["espeak-ng", "-v", "en-us", "--stdout", text], capture_output=True,
                          check=True).stdout


class StandInTTS:
    """A stand-in OpenAI-compatible /v1/audio/speech server (see the module docstring)."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict, dict]] = []
        self.mode = "ok"  # ok | error | mp3 | slow
        self.url = ""  # its endpoint, once served (serving_stand_in)

    async def speech(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append((body, dict(request.headers)))
        if self.mode == "error":
            return web.json_response({"error": "model not loaded"}, status=500)
        if self.mode == "slow":
            await asyncio.sleep(5)
        if self.mode == "mp3":
            return web.Response(body=b"ID3" + bytes(100), content_type="audio/mpeg")
        wav = espeak_wav(body["input"])
        pcm = decode_wav(wav)
        resp = web.StreamResponse()
        if body.get("response_format") == "pcm":  # 24 kHz mono s16le, as OpenAI's "pcm"
            import soxr

            at24 = soxr.resample(pcm.samples, pcm.rate, 24000)
            data = (np.clip(at24, -1, 1) * 32767).astype("<i2").tobytes()
            resp.content_type = "audio/pcm"
        else:
            data = wav  # espeak's own streaming header: sizes 0x7FFFF000
            resp.content_type = "audio/wav"
        await resp.prepare(request)
        for i in range(0, len(data), 4099):  # odd-sized pieces, as a streaming server sends
            await resp.write(data[i : i + 4099])
            await asyncio.sleep(0.002)
        await resp.write_eof()
        return resp


@contextlib.asynccontextmanager
async def serving_stand_in() -> AsyncIterator[StandInTTS]:
    """The stand-in served on 127.0.0.1 (its endpoint in ``url``), stopped on the way out."""
    tts = StandInTTS()
    app = web.Application()
    app.router.add_post("/v1/audio/speech", tts.speech)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        tts.url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1/audio/speech"
        yield tts
    finally:
        await runner.cleanup()
