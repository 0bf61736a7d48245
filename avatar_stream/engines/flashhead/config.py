"""FlashHead settings, schedules and checks that need no torch.

Kept apart from ``flashhead.py`` so that the command line, ``doctor`` and the registry can
describe, validate and report on a FlashHead set-up on a machine without torch or a GPU.

Upstream facts used here (Soul-AILab/SoulX-FlashHead, see DESIGN.md): a chunk is 33 frames;
the first ``motion_frames_num`` of them repeat the previous chunk's end (Lite 9, Pro 5:
``(2 - 1) * VAE temporal stride + 1``); the audio context is the last 8 s of speech.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from avatar_stream.engines.base import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME

FRAME_NUM = 33  # frames one generate() call makes
CONTEXT_NEIGHBOURS = 2  # each frame's audio feature comes with +-2 neighbouring frames
WINDOW_SECONDS = 8  # upstream's cached_audio_duration
WINDOW_SAMPLES = WINDOW_SECONDS * SAMPLE_RATE  # 128,000
WINDOW_FRAMES = WINDOW_SECONDS * FPS  # 200 feature frames
MOTION_FRAMES = {"lite": 9, "pro": 5}  # (motion_frames_latent_num - 1) * vae_stride[0] + 1
VAE_TEMPORAL_STRIDE = {"lite": 8, "pro": 4}
SAMPLING_STEPS = 4  # the distilled models (upstream's get_pipeline sets 4 for lite and pro)
SAMPLE_SHIFT = 5.0
COLOR_CORRECTION = 1.0
DEFAULT_SEED = 9999
MODELS = ("lite", "pro")
SCHEDULES = ("throughput", "low-latency")
LOW_LATENCY_FRAMES = (8, 16)
#: ``--checkpoint-dir standin``: the test-only stand-in pipeline (flashhead_standin.py)
STANDIN = "standin"

#: what a checkpoint folder must hold for each model (upstream's layout on the model hub)
CHECKPOINT_LAYOUT = {
    "lite": ("Model_Lite", "VAE_LTX"),
    "pro": ("Model_Pro", "VAE_Wan/Wan2.1_VAE.pth"),
}
WAV2VEC_FILES = ("config.json", "preprocessor_config.json")
WAV2VEC_WEIGHTS = ("pytorch_model.bin", "model.safetensors")


def new_frames(model: str) -> int:
    """Frames a throughput step adds: 33 minus the motion frames (Lite 24, Pro 28)."""
    return FRAME_NUM - MOTION_FRAMES[model]


@dataclass(frozen=True)
class Schedule:
    """How a session's speech is cut into generate() calls.

    ``throughput`` is upstream's stride: each call adds ``33 - motion`` new frames, the
    chunk ending at the newest audio. ``low-latency`` adds only ``frames`` new frames per
    call: the chunk still starts right after the frames already shown (its motion frames
    are the last ones shown), so its last ``33 - motion - frames`` frames lie beyond the
    newest audio; they are fed silence and thrown away. That keeps the model's motion
    context continuous and the kept frames on their own audio, at the price of a whole
    33-frame generate() per ``frames`` frames.
    """

    model: str
    name: str = "throughput"
    low_latency_frames: int = 8

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"unknown FlashHead model {self.model!r}; choose from lite, pro")
        if self.name not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.name!r}; choose from {', '.join(SCHEDULES)}")
        if self.name == "low-latency" and self.low_latency_frames not in LOW_LATENCY_FRAMES:
            raise ValueError("low-latency keeps 8 or 16 new frames per step")

    @property
    def motion_frames(self) -> int:
        return MOTION_FRAMES[self.model]

    @property
    def frames_per_step(self) -> int:
        """New frames (and 40 ms slices of speech) per step."""
        if self.name == "throughput":
            return new_frames(self.model)
        return self.low_latency_frames

    @property
    def samples_per_step(self) -> int:
        return self.frames_per_step * SAMPLES_PER_FRAME

    @property
    def lookahead_frames(self) -> int:
        """Frames of silence fed after the newest audio so the chunk starts where the shown
        frames end (0 for throughput)."""
        return new_frames(self.model) - self.frames_per_step

    @property
    def keep(self) -> slice:
        """Which of the 33 generated frames a step returns."""
        m = self.motion_frames
        return slice(m, m + self.frames_per_step)

    @property
    def next_motion(self) -> slice:
        """The generated frames the next chunk continues from: the last ``motion`` kept-or-
        shown frames. For throughput these are the chunk's last frames, which upstream's
        generate() already encodes."""
        return slice(self.frames_per_step, self.frames_per_step + self.motion_frames)

    def describe(self) -> str:
        if self.name == "throughput":
            return f"throughput ({self.frames_per_step} new frames per 33-frame chunk)"
        return f"low-latency ({self.frames_per_step} new frames per 33-frame chunk)"


@dataclass
class FlashHeadOptions:
    """Everything ``--engine flashhead`` is configured with."""

    model: str = "lite"
    checkpoint_dir: str | None = None
    wav2vec_dir: str | None = None
    schedule: str = "throughput"
    low_latency_frames: int = 8
    device: str = "cuda"
    compile: bool = True
    seed: int = DEFAULT_SEED
    #: directory holding upstream's source (its ``flash_head`` package); None: importable as is
    upstream_dir: str | None = None

    @property
    def standin(self) -> bool:
        return self.checkpoint_dir == STANDIN

    def schedule_obj(self) -> Schedule:
        return Schedule(self.model, self.schedule, self.low_latency_frames)

    def engine_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``create_engine("flashhead", ...)``."""
        return {
            "model": self.model,
            "checkpoint_dir": self.checkpoint_dir,
            "wav2vec_dir": self.wav2vec_dir,
            "schedule": self.schedule,
            "low_latency_frames": self.low_latency_frames,
            "device": self.device,
            "compile": self.compile,
            "seed": self.seed,
            "upstream_dir": self.upstream_dir,
        }


def missing_checkpoint_files(model: str, checkpoint_dir: str | None) -> list[str]:
    """What upstream will look for in the checkpoint folder and not find."""
    if checkpoint_dir == STANDIN:
        return []
    if not checkpoint_dir:
        return ["--checkpoint-dir is not set"]
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return [f"{root} (not a folder)"]
    return [str(root / rel) for rel in CHECKPOINT_LAYOUT[model] if not (root / rel).exists()]


def missing_wav2vec_files(wav2vec_dir: str | None, checkpoint_dir: str | None = None) -> list[str]:
    """What a local wav2vec2-base-960h folder lacks (upstream loads it with local_files_only)."""
    if checkpoint_dir == STANDIN:
        return []
    if not wav2vec_dir:
        return ["--wav2vec-dir is not set"]
    root = Path(wav2vec_dir)
    if not root.is_dir():
        return [f"{root} (not a folder)"]
    missing = [str(root / f) for f in WAV2VEC_FILES if not (root / f).exists()]
    if not any((root / f).exists() for f in WAV2VEC_WEIGHTS):
        missing.append(str(root / " or ".join(WAV2VEC_WEIGHTS)))
    return missing


def add_cli_options(parser: argparse.ArgumentParser) -> None:
    """The ``--engine flashhead`` options (serve and doctor share them)."""
    g = parser.add_argument_group("flashhead engine")
    g.add_argument("--model", choices=MODELS, default=os.environ.get("FLASHHEAD_MODEL", "lite"),
                   help="FlashHead model: lite (real time, 24 frames a step) or pro")
    g.add_argument("--checkpoint-dir", default=os.environ.get("FLASHHEAD_CHECKPOINT_DIR"),
                   metavar="DIR",
                   help="SoulX-FlashHead-1_3B folder (Model_Lite, VAE_LTX, Model_Pro, VAE_Wan); "
                        f"'{STANDIN}' selects the test-only stand-in pipeline")
    g.add_argument("--wav2vec-dir", default=os.environ.get("FLASHHEAD_WAV2VEC_DIR"),
                   metavar="DIR", help="local wav2vec2-base-960h folder")
    g.add_argument("--schedule", choices=SCHEDULES, default="throughput",
                   help="throughput: upstream's stride (Lite 24 / Pro 28 new frames a step); "
                        "low-latency: 8 or 16 new frames a step, more GPU per frame")
    g.add_argument("--low-latency-frames", type=int, choices=LOW_LATENCY_FRAMES, default=8,
                   help="new frames per step with --schedule low-latency")
    g.add_argument("--device", default="cuda", help="torch device (default cuda)")
    g.add_argument("--no-compile", dest="compile", action="store_false",
                   help="skip torch.compile (faster start, slower steps)")
    g.add_argument("--flashhead-src", dest="upstream_dir",
                   default=os.environ.get("FLASHHEAD_SRC"), metavar="DIR",
                   help="checkout of SoulX-FlashHead, if its flash_head package is not importable")


def options_from_args(args: argparse.Namespace) -> FlashHeadOptions:
    return FlashHeadOptions(
        model=args.model,
        checkpoint_dir=args.checkpoint_dir,
        wav2vec_dir=args.wav2vec_dir,
        schedule=args.schedule,
        low_latency_frames=args.low_latency_frames,
        device=args.device,
        compile=args.compile,
        upstream_dir=args.upstream_dir,
    )


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """``create_engine`` keyword arguments for the engine named in ``args.engine``."""
    if getattr(args, "engine", None) != "flashhead":
        return {}
    return options_from_args(args).engine_kwargs()
