"""``avatar-stream doctor``: does this machine run the chosen engine, and how many sessions fit?

Meant for the box with the GPU: one command that reports Python, torch, CUDA, the GPU and
its memory, the weight folders (and what they lack), then loads the engine, prepares the
default avatar and times warm steps per schedule. Everything it cannot check it says so,
plainly, and why; it never fails half-way without a report. Exit status: 0 when the engine
ran, 1 when something it needs is missing or failed.
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from avatar_stream.engines.base import FPS
from avatar_stream.engines.flashhead.config import (
    LOW_LATENCY_FRAMES,
    FlashHeadOptions,
    Schedule,
    add_cli_options,
    missing_checkpoint_files,
    missing_wav2vec_files,
    options_from_args,
)


@dataclass
class Report:
    """Lines of ``label: value``; ``problems`` are what stops the engine from running."""

    lines: list[tuple[str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)

    def add(self, label: str, value: str) -> None:
        self.lines.append((label, value))

    def render(self) -> str:
        width = max((len(label) for label, _ in self.lines), default=0)
        out = [f"{label:<{width}}  {value}" for label, value in self.lines]
        if self.steps:
            out.append("")
            out.append(f"{'schedule':<46} {'step':>9} {'frames/s':>9} {'sessions':>9}")
            for s in self.steps:
                out.append(f"{s['schedule']:<46} {s['step_s'] * 1000:>6.0f} ms "
                           f"{s['fps']:>9.1f} {s['sessions']:>9d}")
        if self.unchecked:
            out.append("")
            out.append("Not checked:")
            out += [f"  - {u}" for u in self.unchecked]
        if self.problems:
            out.append("")
            out.append("Problems:")
            out += [f"  - {p}" for p in self.problems]
        return "\n".join(out)


def _module_version(name: str) -> str | None:
    if importlib.util.find_spec(name) is None:
        return None
    try:
        module = __import__(name)
    except Exception as exc:  # a broken install says so instead of crashing the report
        return f"installed but fails to import ({exc.__class__.__name__}: {exc})"
    return str(getattr(module, "__version__", "installed"))


def check_environment(report: Report, options: FlashHeadOptions) -> Any:
    """Python, torch, CUDA and the GPU; returns the torch module or None."""
    report.add("python", f"{platform.python_version()} ({sys.executable})")
    version = _module_version("torch")
    if version is None:
        report.add("torch", "not installed")
        report.problems.append("torch is not installed (pip install 'avatar-stream[flashhead]' "
                               "or use the Docker image's flashhead target)")
        report.unchecked.append("CUDA and the GPU: torch is needed to see them")
        return None
    import torch

    report.add("torch", version)
    if not torch.cuda.is_available():
        report.add("cuda", f"not available (torch built with CUDA {torch.version.cuda})")
        if not options.standin and options.device != "cpu":
            report.problems.append("no CUDA GPU visible to torch: FlashHead needs one")
        report.unchecked.append("GPU model and memory: no CUDA device")
        return torch
    report.add("cuda", f"{torch.version.cuda} (driver sees {torch.cuda.device_count()} GPU)")
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        free, total = torch.cuda.mem_get_info(i)
        report.add(f"gpu {i}", f"{props.name}, {total / 2**30:.1f} GiB "
                   f"({free / 2**30:.1f} GiB free), compute {props.major}.{props.minor}")
    return torch


def check_weights(report: Report, options: FlashHeadOptions) -> bool:
    if options.standin:
        report.add("weights", "stand-in pipeline (test-only: no model, no weights; the step "
                   "times below are the stand-in's, not FlashHead's)")
        return True
    ok = True
    for label, missing, where in (
        ("checkpoints", missing_checkpoint_files(options.model, options.checkpoint_dir),
         options.checkpoint_dir),
        ("wav2vec", missing_wav2vec_files(options.wav2vec_dir), options.wav2vec_dir),
    ):
        if missing:
            ok = False
            report.add(label, f"{where or '(not set)'}: missing {', '.join(missing)}")
            report.problems.append(f"{label}: missing {', '.join(missing)}")
        else:
            report.add(label, f"{where} (complete for {options.model})")
    if importlib.util.find_spec("torch") is None:
        report.unchecked.append("upstream's code: importing it needs torch")
        return False
    from avatar_stream.engines.flashhead.upstream import UpstreamImportError, import_upstream

    try:  # really imported: a module missing far below upstream is named here
        module = import_upstream(options.upstream_dir)
    except UpstreamImportError as exc:
        report.add("upstream", "fails to import")
        report.problems.append(str(exc))
        return False
    report.add("upstream", str(Path(module.__file__ or "?").parents[3]))
    return ok


def schedules_for(model: str) -> list[Schedule]:
    return [Schedule(model, "throughput")] + [
        Schedule(model, "low-latency", k) for k in LOW_LATENCY_FRAMES
    ]


def run_steps(report: Report, options: FlashHeadOptions, steps: int) -> bool:
    """Load the engine, prepare the default avatar, time warm steps of every schedule."""
    from avatar_stream.avatars.photo import default_avatar_image
    from avatar_stream.engines.flashhead.engine import FlashHeadEngine

    t = time.perf_counter()
    try:
        engine = FlashHeadEngine(**options.engine_kwargs())
        report.add("load", f"{time.perf_counter() - t:.1f} s on {engine.device}")
        t = time.perf_counter()
        engine.prepare(default_avatar_image(), "default")
        report.add("prepare", f"{time.perf_counter() - t:.1f} s (reference latent + idle loop)")
        t = time.perf_counter()
        engine.warm_up()
        report.add("warm-up", f"{time.perf_counter() - t:.1f} s, every path a session takes, "
                   f"{engine.warm_graphs} graphs compiled")
        after_idle = engine.measure_after_idle()
        engine.measure(steps=steps, warmup=0)
        engine.check_compiles()
        report.add("after idle", f"{after_idle * 1000:.0f} ms for the first speech step after "
                   f"a second of idle ({engine.schedule.describe()})")
        report.add("late compiles", f"{engine.late_graphs} graphs compiled by steps after "
                   "warm-up" + (" (each one stalls every session)" if engine.late_graphs else ""))
        if engine.late_graphs:
            report.problems.append(f"{engine.late_graphs} graphs compiled after warm-up")
        for schedule in schedules_for(options.model):
            step_s = engine.measure(schedule, steps=steps, warmup=1)
            fps = schedule.frames_per_step / step_s
            report.steps.append({"schedule": schedule.describe(), "step_s": step_s,
                                 "fps": fps, "sessions": int(fps // FPS)})
        engine.close()
    except Exception as exc:
        report.problems.append(f"the engine failed: {exc.__class__.__name__}: {exc}")
        return False
    return True


def doctor(options: FlashHeadOptions, steps: int = 3) -> Report:
    report = Report()
    report.add("engine", f"flashhead, model {options.model}, device {options.device} asked")
    torch = check_environment(report, options)
    weights_ok = check_weights(report, options)
    on_cpu = options.device == "cpu"  # tiny or test models: the times are the CPU's
    gpu_ok = torch is not None and (options.standin or on_cpu or torch.cuda.is_available())
    if gpu_ok and weights_ok:
        run_steps(report, options, steps)
    else:
        needs = ["torch"] if torch is None else [] if gpu_ok else ["a CUDA GPU"]
        needs += [] if weights_ok else ["the weights and upstream's code"]
        report.unchecked.append("warm steps (step time, frames/s, sessions that fit): they "
                                "need " + " and ".join(needs))
    return report


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("doctor", help="check this machine for an engine and time its steps")
    p.add_argument("--engine", default="flashhead", choices=("flashhead",),
                   help="engine to check (default flashhead)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per schedule (default 3)")
    add_cli_options(p)


def main(args: argparse.Namespace) -> int:
    report = doctor(options_from_args(args), args.steps)
    print(report.render(), flush=True)
    return 1 if report.problems else 0
