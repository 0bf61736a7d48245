#!/usr/bin/env python3
"""A LiveKit Agents session whose voice is an avatar-stream avatar, in a session a browser
is watching.

1. Start the server:           avatar-stream serve
2. Open http://127.0.0.1:8080/, press Connect, open "Drive this session from a script"
   and copy the session id and token.
3. Run the agent with them (needs ``pip install 'avatar-stream[livekit]'``):

    python examples/livekit_avatar.py --server http://127.0.0.1:8080 \\
        --session=SESSION_ID --token=TOKEN

   then type lines: the agent says each (``AgentSession.say``) through its audio output,
   which is the avatar (``AvatarSession``): the avatar in the browser speaks it, and the
   agent is told when it started and how far it got. Ctrl-C while it speaks interrupts
   (``AgentSession.interrupt``); Ctrl-C again quits. Text given on the command line is
   said and the agent exits.

The TTS is espeak-ng on this machine, or any OpenAI-compatible /v1/audio/speech endpoint
(``--tts-url``). A real agent adds STT, LLM and VAD to the ``AgentSession`` and its user's
audio as input (a LiveKit room, or any ``AudioInput``): see docs/integrations.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys

from livekit.agents import Agent, AgentSession
from livekit.agents.voice.io import PlaybackFinishedEvent

# run from a checkout without installing: the package is next door
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tts_options import add_tts_options, tts_backend  # noqa: E402  (next to this file)
from typed_lines import typed_lines  # noqa: E402

from avatar_stream.integrations.livekit import AvatarSession, AvatarStreamTTS  # noqa: E402


async def main(args: argparse.Namespace) -> int:
    if not args.session:
        raise SystemExit("give --session and --token (the page shows both)")
    session = AgentSession(
        tts=AvatarStreamTTS(tts_backend(args)), vad=None,
        # no user audio here, so no turns to detect; and an avatar cannot pause, only stop
        turn_handling={"turn_detection": None,
                       "interruption": {"resume_false_interruption": False}},
    )
    avatar = AvatarSession(args.server, args.session, args.token, api_key=args.api_key)
    await avatar.start(session)  # before session.start: the avatar is its audio output
    assert avatar.output is not None

    def finished(event: PlaybackFinishedEvent) -> None:
        state = "cut" if event.interrupted else "played"
        print(f"  [agent] {state} at {event.playback_position:.2f} s", flush=True)

    avatar.output.on("playback_finished", finished)
    await session.start(Agent(instructions="Say what you are given."), record=False)

    loop = asyncio.get_running_loop()
    speaking: list[object] = []
    # the lines to say, then None: the end of stdin, or Ctrl-C while nothing is said
    lines: asyncio.Queue[str | None] = typed_lines() if not args.text else asyncio.Queue()

    def on_sigint() -> None:
        if speaking:
            print("  interrupt", flush=True)
            session.interrupt()
        else:
            lines.put_nowait(None)

    with contextlib.suppress(NotImplementedError):
        loop.add_signal_handler(signal.SIGINT, on_sigint)
    if args.text:
        for text in args.text:
            lines.put_nowait(text)
        lines.put_nowait(None)
    else:
        print(f"driving session {args.session}; type a line (Ctrl-C while it speaks "
              "interrupts)", flush=True)
    try:
        while (line := await lines.get()) is not None:
            if not line.strip():
                continue
            handle = session.say(line.strip())
            speaking.append(handle)
            await handle  # until the avatar has said it (or was interrupted)
            speaking.clear()
    finally:
        await session.aclose()  # the avatar's link closes with it; the browser's session stays
    return 0


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("text", nargs="*", help="lines to say (default: read them from stdin)")
    p.add_argument("--server", default="http://127.0.0.1:8080")
    p.add_argument("--session", help="the session id (shown on the page)")
    p.add_argument("--token", help="the session token (shown on the page)")
    p.add_argument("--api-key", default=os.environ.get("AVATAR_STREAM_API_KEY"))
    add_tts_options(p)
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse())))
