"""ICE signalling: which remote candidates reach ICE (offered or trickled), and trickle
fragments as RFC 8840 writes them."""

from __future__ import annotations

import pytest

from avatar_stream.transports.webrtc.ice import (
    candidate_allowed,
    parse_trickle_fragment,
    remote_offer,
)

OFFER = (
    "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:0\r\n"
    "a=candidate:1 1 udp 2122260223 127.0.0.1 50000 typ host\r\n"
    "a=candidate:2 1 udp 2122260223 0c8e1a2b-7c41-4f0e-9d65-8f3b2c7a1e01.local 50001 typ host\r\n"
    "a=end-of-candidates\r\n"
)


def test_offer_candidates_outside_the_addresses_are_dropped() -> None:
    sdp, kept = remote_offer(OFFER, ["127.0.0.1"])
    assert kept == 1 and "127.0.0.1 50000" in sdp and ".local" not in sdp
    assert "a=end-of-candidates" in sdp  # one is usable: ICE may end with it
    assert remote_offer(OFFER, None) == (OFFER, 2)
    assert candidate_allowed("candidate:1 1 udp 1 ::1 9 typ host", ["::1"])
    assert not candidate_allowed("candidate:1 1 udp 1 x.local 9 typ host", ["127.0.0.1"])


def test_an_offer_left_without_candidates_does_not_end_them() -> None:
    """Ended with none usable, ICE would fail at once: it waits for trickled or
    peer-reflexive candidates instead."""
    sdp, kept = remote_offer(OFFER, ["10.0.0.1"])
    assert kept == 0 and "a=candidate" not in sdp and "a=end-of-candidates" not in sdp


def test_trickle_fragments_parse_as_rfc_8840_says() -> None:
    frag = parse_trickle_fragment(
        "a=ice-ufrag:EsAw\r\na=ice-pwd:P2uYro0UCOQ4zxjKXaWCBui1\r\n"
        "m=audio 9 RTP/AVP 0\r\na=mid:0\r\n"
        "a=candidate:1 1 udp 2130706431 198.51.100.1 39132 typ host\r\n"
        "a=end-of-candidates\r\n"
        "m=video 9 RTP/AVP 0\r\n"
        "a=candidate:2 1 UDP 1694498815 192.0.2.3 45664 typ srflx raddr 10.0.0.1 rport 8998\r\n"
        "a=mid:1\r\n")
    assert (frag.ufrag, frag.pwd, frag.end) == ("EsAw", "P2uYro0UCOQ4zxjKXaWCBui1", True)
    assert [(m, i) for m, i, _ in frag.candidates] == [("0", 0), ("1", 1)]
    assert frag.candidates[1][2].startswith("candidate:2 1 UDP")
    for bad in ("v=0\r\nnonsense", "a=candidate:1 1 udp 1 1.2.3.4 99999 typ host",
                "a=candidate:1 1 sctp 1 1.2.3.4 9 typ host", "a=candidate:1 1 udp 1"):
        with pytest.raises(ValueError):
            parse_trickle_fragment(bad)
