"""The engine interface: what the session needs from anything that animates a photo.

An engine has a per-avatar ``prepare`` step (face rig, reference latents: cached, may be
slow) and per-session ``EngineStream`` objects holding the model state between steps. A
stream turns speech into frames in steps of ``frames_per_step`` frames: frame ``k`` of a
stream is made from the 16 kHz samples ``[640k, 640k + 640)`` of what it was fed. A CPU
engine steps one frame at a time; FlashHead steps a chunk of 24 (or 8) frames. The session
code treats both the same: it hands a step exactly ``frames_per_step * 640`` samples (or
``None`` when nobody speaks) and gets exactly ``frames_per_step`` frames back.

Steps run on the worker's threads, never on the event loop.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from avatar_stream.media import FPS, FRAME_SIZE, SAMPLE_RATE, SAMPLES_PER_FRAME, Box

__all__ = ["FPS", "FRAME_SIZE", "SAMPLE_RATE", "SAMPLES_PER_FRAME", "Avatar", "AvatarError",
           "Box", "Engine", "EngineError", "EngineStream", "EngineUnavailable"]


class AvatarError(ValueError):
    """A reference photo that cannot be animated; the message says why, for the user."""


class EngineUnavailable(RuntimeError):
    """The engine cannot load on this machine (its code, weights or device are missing);
    the message says what, and where to get it."""


class EngineError(RuntimeError):
    """The engine failed on a valid request (a GPU out of memory, say) and left everything
    it held as it was: the request may be tried again, nothing else is affected."""


@dataclass
class Avatar:
    """A prepared reference photo: the 512x512 RGB image plus what the engine derived from it."""

    id: str
    image: np.ndarray  # (512, 512, 3) uint8 RGB
    face_box: Box
    mouth_box: Box
    data: Any = None  # engine-specific (warp: the rig and displacement fields)
    meta: dict[str, Any] = field(default_factory=dict)

    def info(self) -> dict[str, Any]:
        h, w = self.image.shape[:2]
        return {
            "id": self.id,
            "width": w,
            "height": h,
            "face_box": list(self.face_box),
            "mouth_box": list(self.mouth_box),
            **self.meta,
        }


class EngineStream(ABC):
    """One session's model state (warp: animation controls; FlashHead: the audio context)."""

    frames_per_step: int = 1
    #: frames a ``step(None)`` (idle) returns; None: ``frames_per_step``. A chunked engine
    #: whose idle is cheap returns idle a frame at a time, so speech that arrives never
    #: waits behind a whole chunk of idle frames.
    idle_frames_per_step: int | None = None
    #: False when ``step(None)`` needs no device (a cached idle loop): the caller may run it
    #: on any thread instead of queueing it behind other sessions' device steps.
    idle_uses_device: bool = True
    #: chunked engines with live (real-time) speech: seconds of speech to hold queued, on
    #: top of one step's worth, before the first step of an utterance that is still
    #: arriving; later steps then find their speech complete although other sessions'
    #: steps run first on the shared device. 0: start as soon as one step's speech is in.
    playout_delay_s: float = 0.0
    #: a speech step's expected run time (measured at warm-up; 0: unknown). A chunked
    #: engine's next step must start at least this long, plus a margin, before the frames
    #: already queued run out; a prior for the first step, before any was timed.
    step_time_hint_s: float = 0.0

    @abstractmethod
    def step(self, speech: np.ndarray | None) -> np.ndarray:
        """Make the next ``frames_per_step`` frames.

        ``speech`` is float32 mono 16 kHz of exactly ``frames_per_step * 640`` samples, or
        ``None`` when no speech is queued (the engine then animates idle). Returns uint8 RGB
        frames shaped ``(frames_per_step, 512, 512, 3)`` (idle: ``idle_frames_per_step``).
        """

    @abstractmethod
    def reset(self) -> None:
        """Barge-in: forget speech context and go back to idle without a visible jump."""

    def set_state(self, state: str, energy: float | None = None) -> None:  # noqa: B027
        """The turn state to show when not speaking (``idle``, ``listening``, ``thinking``;
        see ``core/turnstate.py``), and while listening the user's voice energy (0..1, about
        50 times a second; None: the user's audio is not here). Speech in ``step`` wins over
        it, frame by frame. Called on the event loop: store it for the next step, nothing
        more. Engines that cannot show states (``Engine.shows_states`` empty) ignore it."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free per-session resources (GPU state, buffers)."""


class Engine(ABC):
    """A loaded model (or the CPU animator) shared by all sessions."""

    name: ClassVar[str]
    #: threads that may run steps at once (a GPU engine wants exactly one)
    worker_threads: int = 2
    #: frames per second the device makes, all sessions together, measured by ``warm_up``
    #: (None: not measured; a CPU engine scales with threads and sets no limit)
    step_fps: float | None = None
    #: the turn states (``listening``, ``thinking``) its streams show on the face; the
    #: others it is told are still reported in events and stats, not shown
    shows_states: frozenset[str] = frozenset()

    @property
    def realtime_sessions(self) -> int | None:
        """Sessions that fit in real time (every one speaking at 25 fps), or None: no limit."""
        if self.step_fps is None:
            return None
        return int(self.step_fps // FPS)

    @abstractmethod
    def prepare(self, image: np.ndarray, avatar_id: str) -> Avatar:
        """Prepare a reference photo (any size RGB uint8); raises AvatarError if unusable."""

    @abstractmethod
    def open_stream(self, avatar: Avatar, seed: int | None = None) -> EngineStream:
        """Start a session's stream on a prepared avatar."""

    def warm_up(self) -> None:  # noqa: B027 - optional hook
        """Run whatever must happen before the first session (compilation, caches)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the model."""
