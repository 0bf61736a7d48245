"""A short soak of the real server: sessions held with speech, barge-ins and idle while its
processes are watched; nothing grows, nothing freezes, the figures and the plot come out."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.timeout(180)
def test_a_short_soak_finds_no_growth(tmp_path) -> None:
    out_json, out_png = tmp_path / "soak.json", tmp_path / "soak.png"
    proc = subprocess.run(
        [sys.executable, "-m", "avatar_stream", "bench", "--soak", "50", "--sessions", "2",
         "--json", str(out_json), "--plot", str(out_png)],
        capture_output=True, text=True, timeout=170,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(proc.stdout)
    assert "soak:" in proc.stdout and "echo p95 by minute" in proc.stdout
    fig = json.loads(out_json.read_text())["soak"]
    assert fig["duration_s"] > 35
    assert fig["fds"]["last"] <= fig["fds"]["first"] + 10, fig["fds"]
    assert fig["threads"]["last"] <= fig["threads"]["first"] + 8, fig["threads"]
    assert fig["tasks"]["last"] <= fig["tasks"]["first"] + 20, fig["tasks"]
    assert fig["rss_bytes"]["last"] <= 1.3 * fig["rss_bytes"]["first"], fig["rss_bytes"]
    assert fig["processes"]["last"] == fig["processes"]["first"]
    assert fig["freezes"] <= 2 and min(fig["fps"]) > 20, fig
    assert fig["echo_p95_ms_by_minute"] and all(
        50 < p95 < 1000 for _, p95, _ in fig["echo_p95_ms_by_minute"])
    assert out_png.read_bytes()[:4] == b"\x89PNG" and out_png.stat().st_size > 20_000
