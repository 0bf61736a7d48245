"""The avatar over an impaired network: the real server in one namespace, a real aiortc
client in another, the veth link between them spoilt (``bench --loss/--outage/--rate``).
Bounds are generous: this checks behaviour (the session lives, the picture comes back,
the rate follows the cap), the benchmark reports the figures."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from avatar_stream.bench import impaired, netns
from avatar_stream.bench.cli import add_parser

PREFIX = "avb"

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(netns.unavailable() is not None, reason=str(netns.unavailable())),
]


def bench_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["bench", "--netns-prefix", PREFIX, "--interrupt-every", "0",
                              *argv])


async def run(speech48k: np.ndarray, *argv: str) -> dict:
    try:
        return await impaired.impaired_bench(bench_args(*argv), speech48k[: 48000 * 4])
    finally:
        assert netns.leftovers(PREFIX) == []


async def test_at_5_percent_loss_the_session_lives(speech48k) -> None:
    out = await run(speech48k, "--duration", "18", "--loss", "5")
    (session,) = out["sessions"]
    print("\n".join(impaired.lines(out)))
    assert out["dropped_packets"] > 20  # the link did lose packets
    assert session.fps > 20  # video keeps coming...
    assert max(session.frame_intervals) < 1.5  # ...without a long freeze
    assert len(session.echo) >= 3 and session.speech_r is not None and session.speech_r > 0.6


async def test_video_resumes_within_a_second_of_link_up(speech48k) -> None:
    out = await run(speech48k, "--duration", "16", "--outage", "3", "--outage-at", "5")
    net = out["network"]
    print("\n".join(impaired.lines(out)))
    assert 2.9 < net["outage_s"] < 3.5
    (resumed,), (keyframe,) = net["link_up_to_video_s"], net["link_up_to_keyframe_s"]
    assert resumed is not None and resumed < 1.0, net
    assert keyframe is not None and keyframe < 1.5, net
    (session,) = out["sessions"]
    vt = np.asarray(session.timeline["video_t"])
    assert np.sum(vt > vt[-1] - 2) >= 40  # and then at the full rate, to the end


async def test_under_a_300_kbit_cap_the_encoder_goes_below_it(speech48k) -> None:
    out = await run(speech48k, "--duration", "20", "--rate", "300kbit")
    print("\n".join(impaired.lines(out)))
    (rate,) = out["network"]["video_bitrate"]
    assert rate["sent_kbps_second_half"] is not None and rate["sent_kbps_second_half"] < 300
    (session,) = out["sessions"]
    assert session.fps > 15 and len(session.echo) >= 3
