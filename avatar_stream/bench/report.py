"""The benchmark's output: a table on stdout, every raw sample as JSON, and a plot."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from avatar_stream.bench.machine import CpuShare
from avatar_stream.bench.runner import SessionResult

# row name -> (unit, how to get the samples of one session)
ROWS: dict[str, tuple[str, Any]] = {
    "connect": ("ms", lambda r: [r.connect_s * 1000]),
    "echo latency": ("ms", lambda r: [e[1] * 1000 for e in r.echo]),
    "mouth latency": ("ms", lambda r: [m[1] * 1000 for m in r.mouth]),
    "A/V offset": ("ms", lambda r: [o * 1000 for o in r.av_offset]),
    "received fps": ("fps", lambda r: [r.fps]),
    "frame jitter": ("ms", lambda r: [j * 1000 for j in r.jitter]),
    "interrupt->silence": ("ms", lambda r: [d * 1000 for d in r.interrupt_to_silence]),
    "  at network arrival": ("ms", lambda r: [d * 1000 for d in r.interrupt_to_silence_net]),
}


def summarise(results: Iterable[SessionResult]) -> dict[str, dict[str, float]]:
    """p50 / p95 / max (and n) per figure over all sessions' samples."""
    results = list(results)
    out: dict[str, dict[str, float]] = {}
    for name, (_, get) in ROWS.items():
        samples = np.array([x for r in results for x in get(r) if np.isfinite(x)])
        if len(samples) == 0:
            out[name] = {"n": 0}
            continue
        out[name] = {
            "n": int(len(samples)),
            "p50": float(np.percentile(samples, 50)),
            "p95": float(np.percentile(samples, 95)),
            "max": float(samples.max()),
            "min": float(samples.min()),
        }
    out["freezes"] = {"n": len(results), "max": float(sum(r.freezes for r in results))}
    out["pts monotonic"] = {"n": len(results),
                            "max": float(all(r.pts_monotonic for r in results))}
    lips = [(r.lipsync_r, r.lipsync_lag_s) for r in results if r.lipsync_r is not None]
    if lips:
        out["lip sync r"] = {"n": len(lips), "p50": float(np.median([x[0] for x in lips]))}
        out["lip sync lag"] = {"n": len(lips),
                               "p50": float(np.median([x[1] for x in lips]) * 1000)}
    return out


def table(summary: dict[str, dict[str, float]],
          baseline: dict[str, dict[str, float]] | None = None, title: str = "") -> str:
    head = f"{'':22}{'p50':>9}{'p95':>9}{'max':>9}{'n':>6}"
    if baseline:
        head += f"{'base p50':>10}{'base p95':>10}{'p50 x':>7}"
    lines = [title, head] if title else [head]
    for name, stats in summary.items():
        unit = ROWS.get(name, ("",))[0] if name in ROWS else ""
        if name == "lip sync lag":
            unit = "ms"
        cells = "".join(_cell(stats.get(k)) for k in ("p50", "p95", "max"))
        line = f"{name + (' (' + unit + ')' if unit else ''):22}{cells}{stats.get('n', 0):>6}"
        if baseline and name in baseline and baseline[name].get("n"):
            b = baseline[name]
            ratio = stats.get("p50", math.nan) / b["p50"] if b.get("p50") else math.nan
            line += f"{_cell(b.get('p50'), 10)}{_cell(b.get('p95'), 10)}{_cell(ratio, 7, 2)}"
        lines.append(line)
    return "\n".join(lines)


def _cell(value: float | None, width: int = 9, digits: int = 1) -> str:
    if value is None or not np.isfinite(value):
        return f"{'-':>{width}}"
    return f"{value:>{width}.{digits}f}"


def write_json(path: Path, report: dict[str, Any]) -> None:
    def default(o: Any) -> Any:
        if isinstance(o, (SessionResult, CpuShare)):
            return asdict(o)
        if isinstance(o, np.generic):
            return o.item()
        raise TypeError(type(o))

    path.write_text(json.dumps(report, default=default, indent=1))


def plot(path: Path, results: list[SessionResult], baseline: list[SessionResult] | None
         ) -> None:
    """Latency distributions and the first session's timeline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(11, 11))
    ax = axes[0]
    for name, data, colour in (
        ("echo latency", [e[1] * 1000 for r in results for e in r.echo], "tab:blue"),
        ("mouth latency", [m[1] * 1000 for r in results for m in r.mouth], "tab:orange"),
        ("baseline echo", [e[1] * 1000 for r in baseline or [] for e in r.echo], "tab:gray"),
    ):
        if data:
            ax.hist(data, bins=30, alpha=0.6, label=f"{name} (p50 {np.median(data):.0f} ms)",
                    color=colour)
    ax.set_xlabel("ms")
    ax.set_title("latency distributions")
    ax.legend()

    first = results[0].timeline if results else {}
    hop = first.get("grid_hop_s", 0.01)
    ax = axes[1]
    if first.get("sent_envelope"):
        t = np.arange(len(first["sent_envelope"])) * hop
        for key, label in (("sent_envelope", "speech sent"),
                           ("received_envelope", "avatar audio received"),
                           ("mouth", "mouth openness")):
            if first.get(key):
                y = np.asarray(first[key], dtype=float)
                y = (y - y.min()) / max(float(np.ptp(y)), 1e-12)  # each scaled to 0..1
                ax.plot(t[: len(y)], y, label=label, lw=0.8)
        for ti in first.get("interrupts", []):
            ax.axvline(ti, color="red", ls="--", lw=0.8)
    ax.set_title("session 1 timeline (red: barge-in)")
    ax.set_xlabel("s")
    ax.legend(loc="upper right")

    ax = axes[2]
    vt = np.asarray(first.get("video_t", []))
    if len(vt) > 1:
        ax.plot(vt[1:], np.diff(vt) * 1000, lw=0.6)
        ax.axhline(40, color="gray", ls=":")
    ax.set_title("session 1 video frame intervals")
    ax.set_xlabel("s")
    ax.set_ylabel("ms")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
