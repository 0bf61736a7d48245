#!/usr/bin/env python3
"""A voice-assistant front-end in miniature: text in, speech from a TTS endpoint, pushed
into an avatar session that a browser is watching.

1. Start the server:           avatar-stream serve
2. Open http://127.0.0.1:8080/, press Connect, open "Drive this session from a script"
   and copy the session id and token.
3. Run this script with them:

    python examples/voice_assistant.py --server http://127.0.0.1:8080 \\
        --session=SESSION_ID --token=TOKEN \\
        --tts-url http://127.0.0.1:8000/v1/audio/speech --tts-model f5-tts --tts-voice default

   then type lines: each is synthesised by the OpenAI-compatible endpoint, streamed into
   the session as it arrives (faster than real time, one utterance per line) and spoken by
   the avatar in the browser. Ctrl-C while it speaks barges in; Ctrl-C again quits.
   Without --tts-url the script speaks with espeak-ng on this machine instead. Text given
   on the command line is spoken and the script exits.

With an API key (``--api-key``, or AVATAR_STREAM_API_KEY) instead of a token, ``--latest``
picks the most recent session on the server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import numpy as np

# run from a checkout without installing: the package is next door
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from typed_lines import typed_lines  # noqa: E402  (next to this file)

from avatar_stream.audio.decode import decode_wav  # noqa: E402
from avatar_stream.client.sessioncontrol import RequestError, SessionControl  # noqa: E402

PCM_RATE = 24_000  # what OpenAI-style endpoints send for response_format "pcm"


async def speech_from_endpoint(
    http: aiohttp.ClientSession, args: argparse.Namespace, text: str
) -> AsyncIterator[tuple[np.ndarray, int]]:
    """(samples, rate) pieces of 24 kHz PCM16 from an OpenAI-compatible /v1/audio/speech
    endpoint, as they stream in."""
    headers = {"Authorization": f"Bearer {args.tts_api_key}"} if args.tts_api_key else {}
    body = {"model": args.tts_model, "voice": args.tts_voice, "input": text,
            "response_format": "pcm"}
    async with http.post(args.tts_url, json=body, headers=headers) as resp:
        if resp.status != 200:
            raise RuntimeError(f"TTS endpoint: HTTP {resp.status}: "
                               f"{(await resp.text())[:200]}")
        rest = b""
        async for chunk in resp.content.iter_any():
            data = rest + chunk
            whole = len(data) - len(data) % 2
            rest = data[whole:]
            if whole:
                yield np.frombuffer(data[:whole], "<i2"), PCM_RATE


async def speech_from_espeak(
    args: argparse.Namespace, text: str
) -> AsyncIterator[tuple[np.ndarray, int]]:
    """espeak-ng on this machine: the offline stand-in for a TTS endpoint (one piece)."""
    proc = await asyncio.create_subprocess_exec(
        "espeak-ng", "-v", args.espeak_voice, "--stdout", stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate(text.encode())
    pcm = decode_wav(out)
    yield pcm.samples, pcm.rate


async def speak(control: SessionControl, http: aiohttp.ClientSession,
                args: argparse.Namespace, text: str, n: int) -> dict[str, Any] | None:
    """One utterance: synthesise, push piece by piece as it arrives, wait until it played."""
    uid = f"line-{n}"
    t0 = time.perf_counter()
    await control.set_state("thinking", via=args.via)  # the face shows it; speech ends it
    first = None
    pushed = 0.0
    pieces = speech_from_endpoint(http, args, text) if args.tts_url \
        else speech_from_espeak(args, text)
    async for piece, rate in pieces:
        await control.push_speech(piece, rate, utterance_id=uid, end=False, via=args.via)
        pushed += len(piece) / rate
        if first is None:
            first = time.perf_counter() - t0
    await control.end_utterance(uid)
    print(f"  [{uid}] {pushed:.1f} s of speech pushed; first piece after "
          f"{1000 * (first or 0):.0f} ms, all in {time.perf_counter() - t0:.1f} s", flush=True)
    finished = await control.wait_event(
        "speech.finished", lambda e: e.get("utterance_id") == uid)
    state = "cut" if finished["interrupted"] else "played"
    print(f"  [{uid}] {state} at {finished['position_s']:.2f} s", flush=True)
    return finished


async def latest_session(base: str, api_key: str) -> str:
    async with aiohttp.ClientSession() as http, http.get(
            f"{base}/v1/sessions", headers={"Authorization": f"Bearer {api_key}"}) as r:
        sessions = await r.json()
        if r.status != 200 or not sessions:
            raise SystemExit(f"no session to drive ({r.status}): {sessions}")
        return str(min(sessions, key=lambda s: s.get("age_s", 0))["session_id"])


async def main(args: argparse.Namespace) -> int:
    if not args.tts_url and not shutil.which("espeak-ng"):
        raise SystemExit("give --tts-url, or install espeak-ng for the offline voice")
    session = args.session or (await latest_session(args.server, args.api_key)
                               if args.latest and args.api_key else None)
    if not session:
        raise SystemExit("give --session (and --token), or --latest with --api-key")
    control = SessionControl(args.server, session, args.token, api_key=args.api_key)
    try:
        await control.connect()
    except RequestError as exc:
        raise SystemExit(f"cannot drive session {session}: {exc}") from None
    loop = asyncio.get_running_loop()
    speaking: asyncio.Task[Any] | None = None
    lines: asyncio.Queue[str | None] = asyncio.Queue()
    for line in args.text:
        lines.put_nowait(line)
    if args.text:
        lines.put_nowait(None)
    else:
        lines = typed_lines()

    def on_interrupt() -> None:
        if speaking is not None and not speaking.done():
            print("  barge-in", flush=True)
            loop.create_task(control.interrupt())
        else:
            lines.put_nowait(None)  # the lines end: stop reading them, and the example

    with contextlib.suppress(NotImplementedError):
        loop.add_signal_handler(signal.SIGINT, on_interrupt)
    hint = "" if args.text else "; type a line (Ctrl-C while it speaks barges in)"
    print(f"driving session {session} (speech over {args.via}){hint}", flush=True)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        try:
            n = 0
            while (text := await lines.get()) is not None:
                if not text.strip():
                    continue
                n += 1
                speaking = loop.create_task(speak(control, http, args, text.strip(), n))
                await speaking
        finally:
            await control.close()
    return 0


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("text", nargs="*", help="lines to speak (default: read them from stdin)")
    p.add_argument("--server", default="http://127.0.0.1:8080")
    p.add_argument("--session", help="the session id (shown on the page)")
    p.add_argument("--token", help="the session token (shown on the page)")
    p.add_argument("--api-key", default=os.environ.get("AVATAR_STREAM_API_KEY"))
    p.add_argument("--latest", action="store_true", help="drive the newest session (API key)")
    p.add_argument("--via", choices=["ws", "http"], default="ws",
                   help="push speech over the session's WebSocket (default) or HTTP")
    p.add_argument("--tts-url", help="an OpenAI-compatible /v1/audio/speech endpoint")
    p.add_argument("--tts-model", default="tts-1")
    p.add_argument("--tts-voice", default="alloy")
    p.add_argument("--tts-api-key", default=os.environ.get("TTS_API_KEY"))
    p.add_argument("--espeak-voice", default="en-us", help="voice when no --tts-url is given")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse())))
