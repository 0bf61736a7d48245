"""The browser client against the real server, in headless Debian Chromium.

Chromium, the page and the server share a fresh network namespace that has only ``lo``, so
every packet stays on loopback (TESTING.md). Chromium's fake microphone loops a short
espeak-ng sentence; the server animates the avatar from it and sends the speech back on its
audio track. ``browser_driver.py`` runs inside the namespace with Playwright and reports
measurements as JSON; this module starts and stops everything and asserts.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DRIVER = ROOT / "tests" / "browser_driver.py"
SCREENSHOT = "/tmp/browser_check.png"
PORT = 8080  # the namespace is fresh, so any port is free in it
SPEECH = "Hello there. I am a talking head, streaming live video from a single photo."


def _netns_available() -> str | None:
    """Why this test cannot run here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    try:
        r = subprocess.run(["ip", "netns", "list"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`ip netns` unavailable: {e}"
    if r.returncode != 0:
        return f"`ip netns` unavailable: {r.stderr.decode(errors='replace').strip()}"
    return None


pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(_netns_available() is not None, reason=str(_netns_available())),
]


def _run(*cmd: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)


@pytest.fixture
def netns():
    """A namespace with only ``lo`` up; deleted (with anything still in it) at the end."""
    name = f"avs_browser_{os.getpid()}"
    _run("ip", "netns", "add", name)
    try:
        _run("ip", "netns", "exec", name, "ip", "link", "set", "lo", "up")
        yield name
    finally:
        # Everything in the namespace was started by this test: end it by pid.
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
        for pid in pids.stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        subprocess.run(["ip", "netns", "delete", name], capture_output=True)


@pytest.fixture
def speech_wav(tmp_path: Path) -> Path:
    """About 5.5 s of English, 48 kHz mono 16-bit, made offline."""
    for tool in ("espeak-ng", "sox"):
        assert shutil.which(tool), f"{tool} is required (Debian package {tool})"
    raw, wav = tmp_path / "raw.wav", tmp_path / "speech.wav"
    _run("espeak-ng", "-v", "en-us", "-s", "150", "-w", str(raw), SPEECH)
    _run("sox", str(raw), "-r", "48000", "-c", "1", "-b", "16", str(wav))
    return wav


def _server_cmd() -> list[str]:
    script = Path(sys.executable).parent / "avatar-stream"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from avatar_stream.tools.cli import main; main()"]


@pytest.fixture
def server(netns: str, tmp_path: Path):
    """The real server inside the namespace; yields (base URL, log path)."""
    log = tmp_path / "server.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, *_server_cmd(), "serve",
             "--host", "127.0.0.1", "--port", str(PORT), "--ice-host-addresses", "127.0.0.1"],
            cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        yield f"http://127.0.0.1:{PORT}", log, proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _tail(path: Path, n: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def test_browser_client_end_to_end(netns, server, speech_wav, tmp_path):
    base, log, proc = server
    cmd = ["ip", "netns", "exec", netns, sys.executable, str(DRIVER),
           "--base", base, "--wav", str(speech_wav), "--screenshot", SCREENSHOT]  # fmt: skip
    t0 = time.monotonic()
    out_path, err_path = tmp_path / "driver.out", tmp_path / "driver.err"
    with open(out_path, "wb") as out_f, open(err_path, "wb") as err_f:
        driver = subprocess.Popen(cmd, stdout=out_f, stderr=err_f)
        # Watch the server while the driver runs: if it dies, stop now rather than time out.
        try:
            while driver.poll() is None and proc.poll() is None and time.monotonic() - t0 < 180:
                time.sleep(0.2)
        finally:
            if driver.poll() is None:
                driver.kill()
            driver.wait(timeout=30)
    out, err = out_path.read_text(), err_path.read_text(errors="replace")
    elapsed = time.monotonic() - t0
    assert proc.poll() is None, f"server exited with {proc.returncode}:\n{_tail(log)}"
    lines = out.strip().splitlines()
    assert driver.returncode == 0 and lines, f"driver failed:\n{err[-4000:]}\n{_tail(log)}"
    res = json.loads(lines[-1])
    (tmp_path / "browser_result.json").write_text(json.dumps(res, indent=1))

    def context() -> str:
        final = res.get("final") or {}
        return (
            f"\nserver alive: {proc.poll() is None}\nserver log:\n{_tail(log)}"
            f"\npage log:\n"
            + "\n".join(final.get("log", [])[-40:])
            + f"\nconsole: {res.get('console', [])[-20:]}\npage errors: {res.get('page_errors')}"
        )

    assert "error" not in res, res["error"] + context()

    mic, off, file_, after = res["mic"], res["mic_off"], res["file"], res["after_interrupt"]
    stats = res["before_disconnect"]["lastStats"] or {}
    print(
        f"\nbrowser: connected+ready after {res['connected_after_s']} s (driver {elapsed:.1f} s)"
        f"\n  video: {mic['fps']} fps over {mic['seconds']} s ({mic['frames']} frames); "
        f"stats {json.dumps({k: v for k, v in stats.items() if v is not None})}"
        f"\n  avatar audio mean RMS: mic speech {mic['mean_rms']} (max {mic['max_rms']}), "
        f"mic off {off['mean_rms']}, file {file_['mean_rms']} (max {file_['max_rms']}), "
        f"after interrupt {after['mean_rms']}"
        f"\n  events after the file: {res['events_after_file']}"
    )

    # Video: the page presented >= 20 fps of the avatar (25 fps nominal) over 5 s, in
    # H.264, which the server prefers when the browser offers it (Chromium does).
    assert mic["fps"] >= 20, f"video {mic['fps']} fps" + context()
    assert stats.get("videoCodec") == "video/H264", stats

    # Audio: the avatar speaks the fake microphone's speech back, clearly above silence.
    assert mic["mean_rms"] > 0.01, f"avatar audio too quiet: {mic}" + context()
    assert mic["max_rms"] > 0.03, f"avatar audio too quiet: {mic}" + context()

    # Mic off: the page sends silence and the avatar falls silent.
    assert off["mean_rms"] < mic["mean_rms"] / 10, f"mic off, avatar still loud: {off}" + context()

    # A local file spoken through the file input comes back as the avatar's speech ...
    assert file_["mean_rms"] > 0.01, f"file speech not heard back: {file_}" + context()
    # ... and Interrupt (mid-file) cuts it: speech.finished interrupted=true, then silence.
    after_file = res["events_after_file"]
    assert any(e["type"] == "speech.started" for e in after_file), after_file
    assert any(
        e["type"] == "speech.finished" and e.get("interrupted") is True for e in after_file
    ), f"no interrupted speech.finished: {after_file}" + context()
    assert after["mean_rms"] < file_["mean_rms"] / 10, f"still speaking: {after}" + context()

    # Text typed into the say box is spoken (server-side TTS) and plays to its end; the
    # page shows the session token a script can drive the session with.
    said, info = res["events_after_say"], res["session_info"]
    print(f"  say: avatar audio mean RMS {res['say']['mean_rms']}; events {said}")
    assert res["say"]["mean_rms"] > 0.01, f"say not heard: {res['say']}" + context()
    assert any(e["type"] == "speech.finished" and e.get("interrupted") is False for e in said)
    assert res["turn_while_saying"] == [False, "speaking"]  # the page shows the turn state
    assert "speaking" in [e["state"] for e in said if e["type"] == "state.changed"]
    assert info["shown"] and info["token"] and info["token"] in info["command"], info
    assert info["sayText"] == "", info  # the box is cleared once the server accepted it

    # No error events from the server, no client-side failures, no script errors.
    events = res["before_disconnect"]["events"]
    errors = [e for e in events if e.get("type") == "error"]
    assert not errors, f"error events: {errors}" + context()
    assert not res["before_disconnect"]["errors"], context()
    assert not res["page_errors"], context()

    # Disconnect reached the server and closed the page's peer connection.
    assert res["final"]["state"] == "closed"
    assert any("DELETE session: HTTP 2" in line for line in res["final"]["log"]), context()
    assert proc.poll() is None, "server died" + context()

    # A refused offer shows the server's {"error": ...} and leaves the page reconnectable.
    bad = res["bad_avatar"]
    assert bad["state"] == "failed", bad
    assert any("HTTP 404" in e and "no-such-avatar" in e for e in bad["errors"]), bad
