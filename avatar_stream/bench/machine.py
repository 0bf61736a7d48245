"""How busy the machine was while the benchmark ran, so its figures can be judged.

On a shared virtual machine the hypervisor may run other guests on "our" cores: that time
shows as *steal* in ``/proc/stat``. Latency and capacity measured while a quarter of the CPU
is stolen are not the machine's figures, so every run reports it beside them. And the
benchmark's own clients run on the same cores as the server: the server's share, read off
its ``/metrics`` (every process of it), says what the server alone costs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

PROC_STAT = Path("/proc/stat")


@dataclass
class CpuShare:
    busy: float  # fraction of all cores' time spent running (ours and everyone's)
    steal: float  # fraction taken by the hypervisor for other guests
    server_cores: float | None = None  # the server's processes alone, in cores

    def describe(self) -> str:
        server = "" if self.server_cores is None else \
            f"; the server used {self.server_cores:.2f} cores"
        return (f"CPU {100 * self.busy:.0f}% busy, {100 * self.steal:.0f}% stolen by the "
                f"host{server}")


async def server_cpu_seconds(url: str) -> float | None:
    """CPU seconds the server's processes have used (``process_cpu_seconds_total``, summed
    over its worker processes); None when it does not say."""
    try:
        async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as r:
            text = await r.text()
    except aiohttp.ClientError:
        return None
    values = [s.value for f in text_string_to_metric_families(text) for s in f.samples
              if s.name == "process_cpu_seconds_total"]
    return sum(values) if values else None


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
