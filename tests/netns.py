"""Test support: a fresh network namespace with only ``lo`` (TESTING.md: browsers, servers and
TURN servers under test share one, so every packet stays on loopback), stopping what runs in
it, and log tails for failure messages."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path


def _run(*cmd: str) -> None:
    subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True)


@contextlib.contextmanager
def namespace(prefix: str) -> Iterator[str]:
    """A namespace with only ``lo`` up; deleted (with anything still in it) at the end."""
    name = f"{prefix}_{os.getpid()}"
    _run("ip", "netns", "add", name)
    try:
        _run("ip", "netns", "exec", name, "ip", "link", "set", "lo", "up")
        yield name
    finally:
        # Everything in the namespace was started by the test: end it by pid.
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
        for pid in pids.stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        subprocess.run(["ip", "netns", "delete", name], capture_output=True)


def tail(path: Path, n: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM (a server closes its sessions), then SIGKILL after 10 s."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
