"""Network namespaces for the benchmark, and a link between two of them to impair.

A browser measured on loopback runs with its server in a namespace of its own that has only
``lo`` (nothing it sends can leave). An impaired network is two namespaces, the server's
and the clients', joined by a veth pair, whose traffic is then spoilt the way real links
spoil it. This kernel has no ``netem``, so each impairment uses what it has:

- loss: an nftables rule on each side's input, ``numgen random mod 100 < N drop`` (on the
  way in: a packet dropped on its sender's way out fails its ``sendto`` with EPERM, which
  no real link does);
- an outage: a drop-all nftables rule on both sides' input, added and removed;
- a rate cap: a ``tc`` token bucket (``tbf``) on each veth end's egress;
- delay and jitter: an NFQUEUE delay line on each side (``delayline.py``), which holds
  each outgoing UDP packet's verdict.

Everything carries the caller's prefix and this process's id, and everything is removed on
the way out, whatever happened (the processes left in a namespace are killed by pid, then
the namespace is deleted, which takes its veth end and its nftables tables with it).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_PREFIX = "avsb"
CLONE_NEWNET = 0x40000000
TABLE = "impair"  # nftables table in each namespace (the namespace carries the prefix)


class NetnsError(RuntimeError):
    """Namespaces cannot be made here (not root, no ``ip``), or a command failed."""


def unavailable() -> str | None:
    """Why namespaces cannot be used here, or None."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
    if r.returncode != 0:
        return f"`ip netns` unavailable: {r.stderr.strip()}"
    return None


def sh(*cmd: str, ns: str | None = None, stdin: str | None = None) -> str:
    """Run a command (inside namespace ``ns``); its output, or NetnsError with its stderr."""
    full = ["ip", "netns", "exec", ns, *cmd] if ns else list(cmd)
    r = subprocess.run(full, input=stdin, capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise NetnsError(f"{' '.join(full)}: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout


def names(prefix: str, *suffixes: str) -> list[str]:
    """Names unique to this process (an interface name holds at most 15 characters)."""
    out = [f"{prefix}{os.getpid()}{s}" for s in suffixes]
    if any(len(n) > 15 for n in out):
        raise NetnsError(f"prefix {prefix!r} too long for interface names")
    return out


@contextlib.contextmanager
def namespace(name: str) -> Iterator[str]:
    """A fresh namespace with ``lo`` up; on the way out every process still in it is
    killed and it is deleted."""
    sh("ip", "netns", "add", name)
    try:
        sh("ip", "link", "set", "lo", "up", ns=name)
        yield name
    finally:
        delete_namespace(name)


def delete_namespace(name: str) -> None:
    r = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
    for pid in r.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    subprocess.run(["ip", "netns", "delete", name], capture_output=True)


def enter(name: str) -> None:
    """Move the calling thread (in a fresh process: the process) into namespace ``name``:
    sockets opened afterwards live there. For a process pool's initializer."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


@dataclass
class Link:
    """Two namespaces joined by a veth pair: ``server_ns`` (``server_ip``) and
    ``client_ns`` (``client_ip``), each end named after its namespace."""

    server_ns: str
    client_ns: str
    server_if: str
    client_if: str
    server_ip: str = "10.77.0.1"
    client_ip: str = "10.77.0.2"
    _delay_lines: list[subprocess.Popen[str]] = field(default_factory=list)
    _dropped_before: int = 0  # by outage rules since removed

    @property
    def sides(self) -> tuple[tuple[str, str], tuple[str, str]]:
        """(namespace, its veth end) for both sides."""
        return (self.server_ns, self.server_if), (self.client_ns, self.client_if)

    # -- impairments -----------------------------------------------------------------

    def _nft(self, ns: str, script: str) -> None:
        sh("nft", "-f", "-", ns=ns, stdin=script)

    def _ensure_table(self, ns: str) -> None:
        self._nft(ns, f"""
table inet {TABLE} {{
  chain loss {{ type filter hook input priority 0; policy accept; }}
  chain outage {{ type filter hook input priority -10; policy accept; }}
}}
""")

    def set_loss(self, percent: float) -> None:
        """Drop ``percent`` % of the UDP packets each side receives (both ways). Whole
        percent only: nftables' random numbers are drawn mod 100."""
        n = int(round(percent))
        for ns, _ in self.sides:
            self._ensure_table(ns)
            self._nft(ns, f"flush chain inet {TABLE} loss\n" + (
                f"add rule inet {TABLE} loss meta l4proto udp numgen random mod 100 < {n} "
                "counter drop\n" if n > 0 else ""))

    def set_outage(self, down: bool) -> None:
        """Drop everything either side receives (``down``), or nothing."""
        if not down:
            self._dropped_before += self.dropped(chain="outage")
        for ns, _ in self.sides:
            self._ensure_table(ns)
            self._nft(ns, f"flush chain inet {TABLE} outage\n" + (
                f"add rule inet {TABLE} outage counter drop\n" if down else ""))

    def dropped(self, chain: str | None = None) -> int:
        """Packets the loss and outage rules dropped so far (both sides)."""
        total = 0 if chain else self._dropped_before
        for ns, _ in self.sides:
            with contextlib.suppress(NetnsError):
                what = ["chain", "inet", TABLE, chain] if chain else ["table", "inet", TABLE]
                out = sh("nft", "list", *what, ns=ns)
                total += sum(int(w.split()[0]) for w in out.split("counter packets")[1:])
        return total

    def set_rate(self, rate: str, latency_ms: int = 200) -> None:
        """Cap each direction at ``rate`` (tc syntax: "300kbit"): a token bucket whose
        queue holds ``latency_ms`` of traffic, beyond which packets are dropped, as a
        router's buffer does. (tbf's own ``latency`` adds the burst to the queue: at 300
        kbit/s a 16 KB burst alone is 430 ms more, so the limit is set in bytes.)"""
        bps = rate_bps(rate)
        burst = max(3000, bps // 8 // 100)  # 10 ms of the rate, two packets at least
        limit = burst + bps // 8 * latency_ms // 1000
        for ns, dev in self.sides:
            sh("tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate,
               "burst", str(burst), "limit", str(limit), ns=ns)

    def set_delay(self, delay_ms: float, jitter_ms: float = 0.0, queue: int = 7) -> None:
        """Delay each side's outgoing UDP by ``delay_ms`` +- ``jitter_ms`` (one way): an
        NFQUEUE delay line in each namespace (``delayline.py``)."""
        if jitter_ms > delay_ms:
            raise ValueError("the jitter may not exceed the delay")
        for ns, _ in self.sides:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", ns, sys.executable, "-m", "avatar_stream.bench.delayline",
                 "--queue", str(queue), "--delay", str(delay_ms), "--jitter", str(jitter_ms)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            self._delay_lines.append(proc)
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                err = proc.stderr.read() if proc.stderr else ""
                raise NetnsError(f"the delay line in {ns} did not start: {err.strip()}")
            # only then: a queue nobody serves drops what is sent to it
            sh("iptables", "-A", "OUTPUT", "-p", "udp", "-j", "NFQUEUE", "--queue-num",
               str(queue), ns=ns)

    def close(self) -> None:
        for proc in self._delay_lines:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
            for stream in (proc.stdout, proc.stderr):
                if stream:
                    stream.close()
        self._delay_lines.clear()


def stop(proc: subprocess.Popen[Any], timeout: float = 15) -> None:
    """SIGTERM (a server closes its sessions), then SIGKILL after ``timeout`` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def serve_in(ns: str, host: str, port: int, engine: str, log: Path,
             *options: str) -> Iterator[subprocess.Popen[bytes]]:
    """``avatar-stream serve`` inside namespace ``ns`` (its output to ``log``), stopped on
    the way out."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "avatar_stream", "serve",
             "--host", host, "--port", str(port), "--engine", engine, *options],
            stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        stop(proc)


def rate_bps(rate: str) -> int:
    """tc's rate syntax ("300kbit", "2mbit", "64000bit", "1.5Mbit") in bits per second."""
    text = rate.strip().lower()
    for unit, scale in (("gbit", 10**9), ("mbit", 10**6), ("kbit", 10**3), ("bit", 1)):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * scale)
    raise ValueError(f"rate {rate!r}: expected a number with kbit, mbit or bit")


@contextlib.contextmanager
def link(prefix: str = DEFAULT_PREFIX) -> Iterator[Link]:
    """A server namespace and a client namespace joined by a veth pair; all of it gone
    on the way out."""
    server_ns, client_ns = names(prefix, "s", "c")
    server_if, client_if = names(prefix, "S", "C")
    with namespace(server_ns), namespace(client_ns):
        lk = Link(server_ns, client_ns, server_if, client_if)
        try:
            sh("ip", "link", "add", server_if, "type", "veth", "peer", "name", client_if)
            for (ns, dev), ip in zip(lk.sides, (lk.server_ip, lk.client_ip), strict=True):
                sh("ip", "link", "set", dev, "netns", ns)
                sh("ip", "addr", "add", f"{ip}/24", "dev", dev, ns=ns)
                sh("ip", "link", "set", dev, "up", ns=ns)
            yield lk
        finally:
            lk.close()
            # a veth end not yet moved into a namespace would outlive them
            subprocess.run(["ip", "link", "delete", server_if], capture_output=True)


def leftovers(prefix: str) -> list[str]:
    """Namespaces and interfaces of this process's prefix still present (for tests)."""
    tag = f"{prefix}{os.getpid()}"
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in ns.splitlines() if line.startswith(tag)] + \
        [w.split("@")[0] for line in links.splitlines() for w in line.split()[1:2]
         if w.startswith(tag)]
