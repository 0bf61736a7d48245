"""ICE settings: which addresses the server offers and accepts as host candidates.

aioice gathers a host candidate on every interface and has no option to restrict that, so
the restriction replaces its address lookup (process-wide: it is a server setting). Remote
candidates outside the allowed set are removed from the offer before aiortc sees them.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

import aioice.ice
from aiortc import RTCConfiguration, RTCIceServer

from avatar_stream.config import IceServer

_original_get_host_addresses = aioice.ice.get_host_addresses


def parse_addresses(text: str | None) -> list[str] | None:
    """``"127.0.0.1, ::1"`` -> a list; empty or None -> None (every interface)."""
    addresses = [a.strip() for a in (text or "").split(",") if a.strip()]
    return addresses or None


def restrict_host_addresses(addresses: list[str] | None) -> None:
    """Gather host candidates only on ``addresses`` (None restores every interface)."""
    if addresses is None:
        aioice.ice.get_host_addresses = _original_get_host_addresses
        return
    allowed = [str(ipaddress.ip_address(a)) for a in addresses]

    def get_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return [
            a
            for a in allowed
            if (use_ipv4 and ipaddress.ip_address(a).version == 4)
            or (use_ipv6 and ipaddress.ip_address(a).version == 6)
        ]

    aioice.ice.get_host_addresses = get_host_addresses


def filter_candidates(sdp: str, addresses: list[str] | None) -> str:
    """Drop ``a=candidate`` lines whose address is not in ``addresses``."""
    return _filter(sdp, addresses)[0]


def remote_offer(sdp: str, addresses: list[str] | None) -> tuple[str, int]:
    """A client's offer as ICE should see it, and how many candidates it keeps.

    Candidates outside ``addresses`` are dropped. When none is left, the offer's
    ``a=end-of-candidates`` is dropped too: ICE then waits for candidates trickled later
    or learnt from the client's own connectivity checks (peer-reflexive), which is how a
    client whose candidates are all mDNS names (Chrome's ``.local`` host candidates) or
    outside the list still connects. Told that the candidates had ended, ICE would fail
    at once with nothing to check.
    """
    kept, count = _filter(sdp, addresses)
    if count == 0:
        kept = "".join(line + "\r\n" for line in kept.splitlines()
                       if line.strip() != "a=end-of-candidates")
    return kept, count


def _filter(sdp: str, addresses: list[str] | None) -> tuple[str, int]:
    allowed = _allowed(addresses)
    lines, count = [], 0
    for line in sdp.splitlines():
        if line.startswith("a=candidate:"):
            if allowed is not None and not _on(line, allowed):
                continue
            count += 1
        lines.append(line)
    return "\r\n".join(lines) + "\r\n", count


def candidate_allowed(candidate: str, addresses: list[str] | None) -> bool:
    """Is a candidate (``candidate:...``, as in SDP or trickled) on one of ``addresses``
    (None: every address)?"""
    allowed = _allowed(addresses)
    return allowed is None or _on(candidate, allowed)


def _allowed(addresses: list[str] | None) -> set[str] | None:
    return None if addresses is None else {str(ipaddress.ip_address(a)) for a in addresses}


def _on(candidate: str, allowed: set[str]) -> bool:
    parts = candidate.split()
    return len(parts) >= 5 and _normalise(parts[4]) in allowed


def _normalise(address: str) -> str:
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        return address  # an mDNS name (".local"): never in an address list


@dataclass
class TrickleFragment:
    """An ``application/trickle-ice-sdpfrag`` body (RFC 8840): the ICE credentials it is
    for, its candidates by media section, and whether it ends them."""

    ufrag: str | None = None
    pwd: str | None = None
    # (the media section's mid, or None; its index in the fragment; "candidate:...")
    candidates: list[tuple[str | None, int, str]] = field(default_factory=list)
    end: bool = False


def parse_trickle_fragment(text: str) -> TrickleFragment:
    """Raises ValueError, with the line at fault, for anything that is not one."""
    frag = TrickleFragment()
    mid: str | None = None
    index = -1
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        key, eq, value = line.partition("=")
        if not eq or len(key) != 1 or not key.isalpha():
            raise ValueError(f"line {n} is not an SDP line: {raw[:80]!r}")
        if key == "m":
            mid, index = None, index + 1
        elif key == "a":
            name, _, arg = value.partition(":")
            if name == "ice-ufrag":
                frag.ufrag = arg.strip()
            elif name == "ice-pwd":
                frag.pwd = arg.strip()
            elif name == "mid":
                mid = arg.strip()
                frag.candidates = [(mid if i == index and m is None else m, i, c)
                                   for m, i, c in frag.candidates]
            elif name == "candidate":
                _check_candidate(arg, n)
                frag.candidates.append((mid, max(index, 0), value))
            elif name == "end-of-candidates":
                frag.end = True
    return frag


def _check_candidate(value: str, n: int) -> None:
    """``foundation component transport priority address port typ type ...``"""
    bits = value.split()
    ok = (len(bits) >= 8 and bits[6] == "typ" and bits[1].isdigit() and bits[3].isdigit()
          and bits[5].isdigit() and 1 <= int(bits[1]) <= 256 and int(bits[5]) <= 65535
          and bits[2].lower() in ("udp", "tcp"))
    if not ok:
        raise ValueError(f"line {n} is not an ICE candidate: {value[:80]!r}")


def rtc_configuration(servers: list[IceServer]) -> RTCConfiguration:
    """aiortc's configuration; an empty list really means no servers (None adds a public STUN)."""
    return RTCConfiguration(
        iceServers=[
            RTCIceServer(urls=list(s.urls), username=s.username, credential=s.credential)
            for s in servers
        ]
    )
