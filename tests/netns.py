"""Test support: a fresh network namespace with only ``lo`` (TESTING.md: browsers, servers and
TURN servers under test share one, so every packet stays on loopback), stopping what runs in
it, and log tails for failure messages. The namespace and the stopping are the benchmark's
(``avatar_stream.bench.netns``), which makes them for ``bench --client chromium``."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

from avatar_stream.bench import netns


@contextlib.contextmanager
def namespace(prefix: str) -> Iterator[str]:
    """A namespace with only ``lo`` up; deleted (with anything still in it) at the end."""
    with netns.namespace(f"{prefix}_{os.getpid()}") as name:
        yield name


def tail(path: Path, n: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM (a server closes its sessions), then SIGKILL after 10 s."""
    netns.stop(proc, timeout=10)
