"""ICE settings: which addresses the server offers and accepts as host candidates.

aioice gathers a host candidate on every interface and has no option to restrict that, so
the restriction replaces its address lookup (process-wide: it is a server setting). Remote
candidates outside the allowed set are removed from the offer before aiortc sees them.
"""

from __future__ import annotations

import ipaddress

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
    if addresses is None:
        return sdp
    allowed = {str(ipaddress.ip_address(a)) for a in addresses}
    lines = []
    for line in sdp.splitlines():
        if line.startswith("a=candidate:"):
            parts = line.split()
            if len(parts) < 5 or _normalise(parts[4]) not in allowed:
                continue
        lines.append(line)
    return "\r\n".join(lines) + "\r\n"


def _normalise(address: str) -> str:
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        return address  # an mDNS name (".local"): never in an address list


def rtc_configuration(servers: list[IceServer]) -> RTCConfiguration:
    """aiortc's configuration; an empty list really means no servers (None adds a public STUN)."""
    return RTCConfiguration(
        iceServers=[
            RTCIceServer(urls=list(s.urls), username=s.username, credential=s.credential)
            for s in servers
        ]
    )
