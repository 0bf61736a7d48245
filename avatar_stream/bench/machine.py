"""How busy the machine was while the benchmark ran, and who made it busy.

On a shared virtual machine the hypervisor may run other guests on "our" cores: that time
shows as *steal* in ``/proc/stat``. Latency and capacity measured while a quarter of the CPU
is stolen are not the machine's figures, so every run reports it beside them. And the
benchmark's own clients run on the same cores as the server: the CPU time of the server's
processes (the one listening on its port and every descendant: its worker processes) and of
the clients' (this process and its other descendants), read off ``/proc``, say what each
side costs, per session.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
PROC_STAT = PROC / "stat"
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass
class CpuShare:
    busy: float  # fraction of all cores' time spent running (ours and everyone's)
    steal: float  # fraction taken by the hypervisor for other guests
    server_cores: float | None = None  # the server's processes alone, in cores
    client_cores: float | None = None  # the benchmark's clients (this process tree)
    sessions: int = 0

    def per_session(self, cores: float | None) -> float | None:
        return cores / self.sessions if cores is not None and self.sessions else None

    def describe(self) -> str:
        out = f"CPU {100 * self.busy:.0f}% busy, {100 * self.steal:.0f}% stolen by the host"
        for who, cores in (("the server", self.server_cores), ("the clients", self.client_cores)):
            if cores is not None:
                each = self.per_session(cores)
                out += f"; {who} used {cores:.2f} cores" + \
                    (f" ({each:.3f} a session)" if each is not None else "")
        return out


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name (which may hold spaces)."""
    try:
        return (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_tree(pid: int) -> list[int]:
    """``pid`` and every process descended from it that is alive now."""
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds these processes have used (all their threads)."""
    total = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields:
            total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


@dataclass
class ProcessStats:
    """What a process tree holds now: the soak watches these for growth."""

    processes: int
    rss_bytes: int
    fds: int
    threads: int


def process_stats(pids: list[int]) -> ProcessStats:
    rss = fds = threads = alive = 0
    page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
    for pid in pids:
        fields = _stat_fields(pid)
        if not fields:
            continue
        try:
            fds += len(os.listdir(PROC / str(pid) / "fd"))
        except OSError:
            continue
        alive += 1
        threads += int(fields[17])
        rss += int(fields[21]) * page
    return ProcessStats(alive, rss, fds, threads)


def listening_pid(port: int) -> int | None:
    """The process that listens on this TCP port in this network namespace (the topmost
    one, where a listening socket is shared with children); None if none is found."""
    inodes = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = (PROC / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if int(f[1].rsplit(":", 1)[1], 16) == port and f[3] == "0A":  # LISTEN
                inodes.add(f"socket:[{f[9]}]")
    if not inodes:
        return None
    owners = set()
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            for fd in (entry / "fd").iterdir():
                if os.readlink(fd) in inodes:
                    owners.add(int(entry.name))
                    break
        except OSError:
            continue
    parents = {}
    for pid in owners:
        fields = _stat_fields(pid)
        if fields:
            parents[pid] = int(fields[1])
    top = [pid for pid in owners if parents.get(pid) not in owners]
    return min(top) if top else None


class TreeMeter:
    """CPU cores a set of processes used between ``start()`` and ``stop()``. ``members``
    names them, asked at both ends: a process started in between counts from its start,
    one that ended in between is not counted."""

    def __init__(self, members: Callable[[], Iterable[int]]) -> None:
        self.members = members
        self._start: dict[int, float] = {}
        self._t = 0.0

    def _used(self) -> dict[int, float]:
        return {p: cpu_seconds([p]) for p in self.members()}

    def start(self) -> None:
        self._start, self._t = self._used(), time.perf_counter()

    def stop(self) -> float:
        end = self._used()
        used = sum(s - self._start.get(p, 0.0) for p, s in end.items())
        return max(0.0, used) / max(time.perf_counter() - self._t, 1e-9)


def split_meters(server_pid: int, client_pids: Callable[[], Iterable[int]] | None = None
                 ) -> tuple[TreeMeter, TreeMeter]:
    """Meters of the server's processes and the clients': the server is ``server_pid``'s
    tree; the clients are this process's tree without it, or, where the server is this
    process, ``client_pids`` (its client processes) and their trees."""
    me = os.getpid()

    def clients() -> set[int]:
        if server_pid == me:
            return {q for p in (client_pids() if client_pids else []) for q in process_tree(p)}
        return set(process_tree(me)) - set(process_tree(server_pid))

    def server() -> set[int]:
        return set(process_tree(server_pid)) - (clients() if server_pid == me else set())

    return TreeMeter(server), TreeMeter(clients)


@contextlib.contextmanager
def profiled(pid: int | None, path: Path | None) -> Iterator[None]:
    """py-spy (the ``dev`` extra) samples the server's processes while the body runs and
    writes a flame graph to ``path``: where a session's server CPU goes. Sampled without
    pausing the server (``--nonblocking``), at 100 Hz."""
    if pid is None or path is None:
        yield
        return
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        raise SystemExit("bench --profile: py-spy is not installed (pip install py-spy)")
    proc = subprocess.Popen(
        [py_spy, "record", "--pid", str(pid), "--subprocesses", "--nonblocking", "--rate",
         "100", "--format", "flamegraph", "-o", str(path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)  # py-spy writes its output as it stops
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        if not path.exists():
            print(f"bench --profile: py-spy wrote nothing: {err.decode()[-500:]}",
                  file=sys.stderr)


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
