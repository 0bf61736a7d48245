"""How busy the machine was while the benchmark ran, so its figures can be judged.

On a shared virtual machine the hypervisor may run other guests on "our" cores: that time
shows as *steal* in ``/proc/stat``. Latency and capacity measured while a quarter of the CPU
is stolen are not the machine's figures, so every run reports it beside them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PROC_STAT = Path("/proc/stat")


@dataclass
class CpuShare:
    busy: float  # fraction of all cores' time spent running (ours and everyone's)
    steal: float  # fraction taken by the hypervisor for other guests

    def describe(self) -> str:
        return f"CPU {100 * self.busy:.0f}% busy, {100 * self.steal:.0f}% stolen by the host"


def _read() -> list[int] | None:
    try:
        fields = PROC_STAT.read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None  # not Linux: nothing to report
    if fields[0] != "cpu":
        return None
    return [int(x) for x in fields[1:9]]  # user nice system idle iowait irq softirq steal


class CpuMeter:
    """``with CpuMeter() as m: ...`` then ``m.share`` (None where /proc/stat is missing)."""

    def __init__(self) -> None:
        self._start: list[int] | None = None
        self.share: CpuShare | None = None

    def __enter__(self) -> CpuMeter:
        self._start = _read()
        return self

    def __exit__(self, *exc: object) -> None:
        end = _read()
        if self._start is None or end is None:
            return
        d = [b - a for a, b in zip(self._start, end, strict=True)]
        total = sum(d)
        if total <= 0:
            return
        idle = d[3] + d[4]
        self.share = CpuShare(busy=(total - idle - d[7]) / total, steal=d[7] / total)
