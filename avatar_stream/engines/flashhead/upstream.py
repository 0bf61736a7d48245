"""How the FlashHead engine calls into upstream's code: import, output, device syncs, RNG, graphs.

Upstream SoulX-FlashHead is research code written for one stream on one GPU. Run under a
server with many sessions, four of its habits need handling at the boundary, without
changing its source:

- its import chain pulls in xfuser, mediapipe, diffusers and transformers at module level, so
  a failure deep below it must name the module that failed, not "not installed";
- ``generate()`` prints timings to stdout and calls ``torch.cuda.synchronize()`` about ten
  times a step, unconditionally (on a CPU device, a CPU build of torch raises there). While
  the engine calls upstream, that thread's prints go to the log and its syncs are skipped
  (the frames' copy to the host waits for the device anyway); other threads are untouched;
- the LTX VAE samples its posterior from torch's global RNG, which sessions share: the
  engine gives each session its own state of that generator (``DeviceRng``);
- ``torch.compile`` compiles a new graph when an input's shape or strides change; a graph
  compiled while sessions run stalls every session on the GPU thread. ``compiled_graphs``
  counts them, so warm-up can prove it covered every path and a late compile is reported.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from avatar_stream.engines.base import EngineUnavailable

log = logging.getLogger("avatar_stream.engines.flashhead.upstream")

UPSTREAM_PACKAGE = "flash_head"
PIPELINE_MODULE = "flash_head.src.pipeline.flash_head_pipeline"


class UpstreamImportError(EngineUnavailable):
    """Upstream's code is missing, or something it imports is: the message says which."""


def import_upstream(upstream_dir: str | None = None) -> ModuleType:
    """Upstream's pipeline module, from ``upstream_dir`` (a checkout) or as installed."""
    if upstream_dir:
        if not (Path(upstream_dir) / UPSTREAM_PACKAGE).is_dir():
            raise UpstreamImportError(
                f"--flashhead-src {upstream_dir} holds no {UPSTREAM_PACKAGE}/ package: point "
                "it at a checkout of SoulX-FlashHead")
        if upstream_dir not in sys.path:
            sys.path.insert(0, upstream_dir)
    try:
        return importlib.import_module(PIPELINE_MODULE)
    except ImportError as exc:
        if getattr(exc, "name", None) in (UPSTREAM_PACKAGE, UPSTREAM_PACKAGE + ".src"):
            raise UpstreamImportError(
                "SoulX-FlashHead is not installed: use the Docker image's flashhead target, "
                "or check it out and pass --flashhead-src DIR (README, FlashHead)") from exc
        failure: Exception = exc
    except Exception as exc:  # e.g. a dependency that fails at import (triton without CUDA)
        failure = exc
    raise UpstreamImportError(
        "SoulX-FlashHead's code was found but importing it failed: "
        f"{failure.__class__.__name__}: {failure} (a module upstream imports; install its "
        "requirements, see README, FlashHead)") from failure


# -- calls into upstream -----------------------------------------------------------------

_inside = threading.local()  # set on the thread that is inside upstream_call()
_install_lock = threading.Lock()


def _in_upstream() -> bool:
    return getattr(_inside, "depth", 0) > 0


class _RoutedStdout:
    """sys.stdout while the engine runs: upstream's prints go to the log, others' pass (and
    every other attribute is the original stream's: encoding, fileno, isatty, ...)."""

    def __init__(self, original: Any) -> None:
        self.original = original
        self._line = threading.local()

    def write(self, text: str) -> int:
        if not _in_upstream():
            return int(self.original.write(text))
        buf = getattr(self._line, "buf", "") + text
        *lines, self._line.buf = buf.split("\n")
        for line in lines:
            if line.strip():
                log.debug("upstream: %s", line.strip())
        return len(text)

    def flush(self) -> None:
        self.original.flush()

    def __getattr__(self, name: str) -> Any:  # encoding, isatty, fileno, ...
        return getattr(self.original, name)


def _install() -> None:
    """Route stdout and ``torch.cuda.synchronize`` through the checks above; both behave as
    before on every thread that is not inside upstream. Checked on every call: whoever
    replaced ``sys.stdout`` since (a test runner's capture, say) is wrapped in turn."""
    if sys.stdout is not None and not isinstance(sys.stdout, _RoutedStdout):
        sys.stdout = _RoutedStdout(sys.stdout)  # type: ignore[assignment]
    if getattr(torch.cuda.synchronize, "_avatar_stream", False):
        return
    with _install_lock:
        real_sync = torch.cuda.synchronize
        if getattr(real_sync, "_avatar_stream", False):
            return

        def synchronize(device: Any = None) -> None:
            if not _in_upstream():
                real_sync(device)

        synchronize._avatar_stream = True  # type: ignore[attr-defined]
        torch.cuda.synchronize = synchronize


@contextlib.contextmanager
def upstream_call() -> Iterator[None]:
    """Around every call into upstream: its prints to the log, its device syncs skipped."""
    _install()
    _inside.depth = getattr(_inside, "depth", 0) + 1
    try:
        yield
    finally:
        _inside.depth -= 1


# -- the global RNG upstream's LTX VAE samples from --------------------------------------


def default_generator(device: Any) -> torch.Generator:
    """The generator ``torch.randn(..)`` without ``generator=`` uses on ``device``."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.default_generators[index]
    return torch.default_generator


class DeviceRng:
    """One session's own state of the device's global generator."""

    def __init__(self, device: Any, seed: int) -> None:
        self._generator = default_generator(device)
        self.state = torch.Generator(device=torch.device(device)).manual_seed(seed).get_state()

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """The global generator runs on this session's state, and is restored after."""
        outer = self._generator.get_state()
        self._generator.set_state(self.state)
        try:
            yield
        finally:
            self.state = self._generator.get_state()
            self._generator.set_state(outer)


# -- compiled graphs -----------------------------------------------------------------------


def compiled_graphs() -> int:
    """Graphs torch.compile has compiled in this process so far (dynamo's own counter)."""
    try:
        from torch._dynamo.utils import counters
    except Exception:  # a torch without dynamo compiles nothing
        return 0
    return int(counters["stats"]["unique_graphs"])
