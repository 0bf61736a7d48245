#!/usr/bin/env python3
"""A Pipecat bot whose voice is an avatar-stream avatar, in a session a browser is watching.

1. Start the server:           avatar-stream serve
2. Open http://127.0.0.1:8080/, press Connect, open "Drive this session from a script"
   and copy the session id and token.
3. Run the bot with them (needs ``pip install 'avatar-stream[pipecat]'``):

    python examples/pipecat_avatar.py --server http://127.0.0.1:8080 \\
        --session=SESSION_ID --token=TOKEN

   then type lines: each goes through a Pipecat pipeline, ``TTS -> AvatarStreamSessionDriver``,
   and the avatar in the browser speaks it, lips in sync, while the pipeline hears when the
   bot starts and stops speaking. Ctrl-C while it speaks barges in (an InterruptionFrame);
   Ctrl-C again quits. Text given on the command line is spoken and the bot exits once the
   avatar has said it all.

The TTS is espeak-ng on this machine, or any OpenAI-compatible /v1/audio/speech endpoint
(``--tts-url``). A real bot puts its transport's input, STT, LLM and context aggregators in
front of the TTS: see docs/integrations.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys

from loguru import logger
from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    EndFrame,
    Frame,
    InterruptionFrame,
    TTSSpeakFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.workers.runner import WorkerRunner

# run from a checkout without installing: the package is next door
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tts_options import add_tts_options, tts_backend  # noqa: E402  (next to this file)
from typed_lines import typed_lines  # noqa: E402

from avatar_stream.integrations.pipecat import (  # noqa: E402
    AvatarStreamSessionDriver,
    AvatarStreamTTSService,
)


class SpeakingLog(FrameProcessor):
    """Prints when the avatar starts and stops speaking, as the pipeline learns it."""

    def __init__(self) -> None:
        super().__init__()
        self.speaking = False

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, BotStartedSpeakingFrame):
            self.speaking = True
            print("  [bot] speaking", flush=True)
        elif isinstance(frame, BotStoppedSpeakingFrame):
            self.speaking = False
            print("  [bot] stopped speaking", flush=True)
        await self.push_frame(frame, direction)



async def main(args: argparse.Namespace) -> int:
    logger.remove()  # Pipecat logs every frame processor's life at DEBUG: keep warnings only
    logger.add(sys.stderr, level="DEBUG" if args.verbose else "WARNING")
    if not args.session:
        raise SystemExit("give --session and --token (the page shows both)")
    driver = AvatarStreamSessionDriver(url=args.server, session_id=args.session,
                                       token=args.token, api_key=args.api_key)
    log = SpeakingLog()
    worker = PipelineWorker(Pipeline([AvatarStreamTTSService(tts_backend(args)), driver, log]),
                            cancel_on_idle_timeout=False)
    runner = WorkerRunner(handle_sigint=False)
    loop = asyncio.get_running_loop()

    lines: asyncio.Queue[str | None] = typed_lines() if not args.text else asyncio.Queue()

    def on_sigint() -> None:
        if log.speaking:
            print("  barge-in", flush=True)
            loop.create_task(worker.queue_frame(InterruptionFrame()))
        else:
            lines.put_nowait(None)  # the lines end: stop reading them
            loop.create_task(worker.cancel())

    with contextlib.suppress(NotImplementedError):
        loop.add_signal_handler(signal.SIGINT, on_sigint)

    async def feed() -> None:
        if args.text:
            for line in args.text:
                await worker.queue_frame(TTSSpeakFrame(line))
        else:
            print(f"driving session {args.session}; type a line (Ctrl-C while it speaks "
                  "barges in)", flush=True)
            while line := await lines.get():
                if line.strip():
                    await worker.queue_frame(TTSSpeakFrame(line.strip()))
        await worker.queue_frame(EndFrame())  # ends once the avatar has said it all

    await runner.add_workers(worker)
    await asyncio.gather(runner.run(), feed())
    return 0


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("text", nargs="*", help="lines to speak (default: read them from stdin)")
    p.add_argument("--server", default="http://127.0.0.1:8080")
    p.add_argument("--session", help="the session id (shown on the page)")
    p.add_argument("--token", help="the session token (shown on the page)")
    p.add_argument("--api-key", default=os.environ.get("AVATAR_STREAM_API_KEY"))
    add_tts_options(p)
    p.add_argument("--verbose", action="store_true", help="Pipecat's own debug log")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse())))
