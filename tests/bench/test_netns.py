"""The benchmark's impaired link, checked with real UDP traffic between its two
namespaces: the loss it drops, the outage, the rate cap, the delay line; and that nothing
of it outlives the test, whatever happens inside."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from avatar_stream.bench import netns

PREFIX = "avb"

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(netns.unavailable() is not None, reason=str(netns.unavailable())),
]

ECHO = """
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("{ip}", 9999))
print("ready", flush=True)
while True:
    data, addr = s.recvfrom(2048)
    s.sendto(data, addr)
"""

PROBE = """
import json, socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(0.002)
n, size, gap = {n}, {size}, {gap}
sent, rtts, t0 = {{}}, [], time.perf_counter()
for i in range(n):
    sent[i] = time.perf_counter()
    s.sendto(i.to_bytes(4, "big") + bytes(size - 4), ("{ip}", 9999))
    end = t0 + (i + 1) * gap
    while True:
        try:
            data = s.recv(2048)
            rtts.append(time.perf_counter() - sent[int.from_bytes(data[:4], "big")])
        except (socket.timeout, TimeoutError):
            pass
        if time.perf_counter() >= end:
            break
deadline = time.perf_counter() + 1.0
while time.perf_counter() < deadline:
    try:
        data = s.recv(2048)
        rtts.append(time.perf_counter() - sent[int.from_bytes(data[:4], "big")])
    except (socket.timeout, TimeoutError):
        pass
rtts.sort()
print(json.dumps({{"received": len(rtts), "p50": rtts[len(rtts) // 2] if rtts else None,
                  "seconds": time.perf_counter() - t0}}))
"""


def probe(link: netns.Link, n: int = 400, size: int = 200, gap: float = 0.002) -> dict:
    """Send ``n`` UDP packets from the client side to an echo on the server side."""
    echo = subprocess.Popen(["ip", "netns", "exec", link.server_ns, sys.executable, "-c",
                             ECHO.format(ip=link.server_ip)], stdout=subprocess.PIPE, text=True)
    try:
        assert echo.stdout is not None and echo.stdout.readline().strip() == "ready"
        out = netns.sh(sys.executable, "-c",
                       PROBE.format(n=n, size=size, gap=gap, ip=link.server_ip),
                       ns=link.client_ns)
        return json.loads(out)
    finally:
        echo.kill()
        echo.wait()
        echo.stdout.close()  # type: ignore[union-attr]


def test_link_loss_outage_and_cleanup() -> None:
    with netns.link(PREFIX) as link:
        assert len(netns.leftovers(PREFIX)) == 2  # two namespaces (each holds its veth end)
        clean = probe(link)
        assert clean["received"] == 400, clean
        link.set_loss(20)  # both ways: a round trip survives 0.8 * 0.8 = 64 % of the time
        lossy = probe(link, n=1000)
        assert 540 <= lossy["received"] <= 740, lossy
        assert link.dropped() >= 200
        link.set_loss(0)
        link.set_outage(True)
        assert probe(link, n=100)["received"] == 0
        link.set_outage(False)
        assert probe(link, n=100)["received"] == 100
    assert netns.leftovers(PREFIX) == []


def test_link_rate_cap_and_delay_line() -> None:
    with netns.link(PREFIX) as link:
        base = probe(link, n=200)
        link.set_delay(40, 10)  # each way: a round trip 80 ms +- 20
        delayed = probe(link, n=200)
        assert delayed["received"] == 200, delayed
        assert 0.07 <= delayed["p50"] - base["p50"] <= 0.12, (base, delayed)
        link.close()  # the delay lines go; their queue rule would now drop everything
        link.set_rate("300kbit")
    assert netns.leftovers(PREFIX) == []
    with netns.link(PREFIX) as link:
        link.set_rate("300kbit", latency_ms=100)
        # 1200 kbit/s offered for 2 s through a 300 kbit/s cap: about a quarter gets through
        capped = probe(link, n=500, size=600, gap=0.004)
        assert 80 <= capped["received"] <= 200, capped
    assert netns.leftovers(PREFIX) == []


def test_everything_is_removed_when_the_body_fails() -> None:
    with pytest.raises(RuntimeError, match="boom"), netns.link(PREFIX) as link:
        link.set_delay(10)
        link.set_loss(5)
        raise RuntimeError("boom")
    assert netns.leftovers(PREFIX) == []
    assert "avatar_stream.bench.delayline" not in subprocess.run(
        ["ps", "-eo", "args"], capture_output=True, text=True).stdout
