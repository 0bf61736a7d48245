"""The lines a user types, for the examples' event loops: read on a daemon thread, so one
blocked in ``readline()`` never holds the program's exit (Ctrl-C) until Enter, as a thread
of the loop's default executor would."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading


def typed_lines() -> asyncio.Queue[str | None]:
    """A queue that gets each line of stdin as it is typed, then None at its end (put None
    in it yourself to stop reading it). Call from the running loop."""
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[str | None] = asyncio.Queue()

    def read() -> None:
        while True:
            line = sys.stdin.readline() or None
            with contextlib.suppress(RuntimeError):  # the loop has closed: we are exiting
                loop.call_soon_threadsafe(lines.put_nowait, line)
            if line is None:
                return

    threading.Thread(target=read, name="typed-lines", daemon=True).start()
    return lines
