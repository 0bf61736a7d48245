"""The browser client against the real server, in headless Debian Chromium.

Chromium, the page and the server share a fresh network namespace that has only ``lo``, so
every packet stays on loopback (TESTING.md). Chromium's fake microphone loops a short
espeak-ng sentence; the server animates the avatar from it and sends the speech back on its
audio track. ``browser_driver.py`` runs inside the namespace with Playwright and reports
measurements as JSON; this module starts and stops everything and asserts.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from matplotlib import cbook
from netns import namespace, stop
from netns import tail as _tail

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
def netns() -> Iterator[str]:
    with namespace("avs_browser") as name:
        yield name


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
    """The real server inside the namespace; yields (base URL, log path, process)."""
    with serving(netns, tmp_path) as running:
        yield running


@contextlib.contextmanager
def serving(netns: str, tmp_path: Path, *options: str
            ) -> Iterator[tuple[str, Path, subprocess.Popen]]:
    log = tmp_path / "server.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, *_server_cmd(), "serve",
             "--host", "127.0.0.1", "--port", str(PORT), "--ice-host-addresses", "127.0.0.1",
             *options],
            cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        yield f"http://127.0.0.1:{PORT}", log, proc
    finally:
        stop(proc)


def drive(netns: str, proc: subprocess.Popen, log: Path, tmp_path: Path, *args: str
          ) -> dict:
    """Run browser_driver.py in the namespace, watching the server; its JSON result."""
    cmd = ["ip", "netns", "exec", netns, sys.executable, str(DRIVER), *args]
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
    assert proc.poll() is None, f"server exited with {proc.returncode}:\n{_tail(log)}"
    lines = out.strip().splitlines()
    assert driver.returncode == 0 and lines, f"driver failed:\n{err[-4000:]}\n{_tail(log)}"
    res = json.loads(lines[-1])
    res["driver_s"] = round(time.monotonic() - t0, 1)
    return res


def page_context(res: dict, proc: subprocess.Popen, log: Path) -> str:
    """What explains a failure: the server's log, the page's log, console and errors."""
    final = res.get("final") or {}
    return (
        f"\nserver alive: {proc.poll() is None}\nserver log:\n{_tail(log)}"
        f"\npage log:\n"
        + "\n".join(final.get("log", [])[-40:])
        + f"\nconsole: {res.get('console', [])[-20:]}\npage errors: {res.get('page_errors')}"
    )


def test_browser_client_end_to_end(netns, server, speech_wav, tmp_path):
    base, log, proc = server
    res = drive(netns, proc, log, tmp_path,
                "--base", base, "--wav", str(speech_wav), "--screenshot", SCREENSHOT)
    elapsed = res["driver_s"]
    (tmp_path / "browser_result.json").write_text(json.dumps(res, indent=1))

    def context() -> str:
        return page_context(res, proc, log)

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


# -- the avatar gallery ---------------------------------------------------------------------


def _gallery_files(folder: Path) -> tuple[list[Path], Path, Path]:
    """Three photos of one person (Grace Hopper, matplotlib's public-domain sample) of
    differing quality, a file that is no photo, and another person (scikit-image's
    public-domain astronaut) as the server's default avatar, so that a session showing the
    uploaded face cannot pass for one showing the default."""
    from skimage import data

    portrait = cv2.imread(str(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)))
    crop = portrait[20:520, 40:480]  # head and shoulders, the face ~190 px wide
    half = cv2.resize(portrait, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA)
    photos = {
        "sharp.jpg": crop,
        "blurred.jpg": cv2.GaussianBlur(crop, (0, 0), 4),
        "small-face.jpg": cv2.copyMakeBorder(half, 120, 120, 120, 120, cv2.BORDER_REPLICATE),
    }
    for name, image in photos.items():
        cv2.imwrite(str(folder / name), image, [cv2.IMWRITE_JPEG_QUALITY, 92])
    bad = folder / "notes.txt"
    bad.write_text("shopping list: milk, eggs, a better photo\n")
    default = folder / "astronaut.png"
    cv2.imwrite(str(default), cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR))
    return [folder / name for name in photos], bad, default


def _picture(png_base64: str) -> np.ndarray:
    """A frame the page grabbed (base64 PNG) as RGB."""
    png = np.frombuffer(base64.b64decode(png_base64), np.uint8)
    return cv2.cvtColor(cv2.imdecode(png, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def _similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two RGB pictures' luma at 128x128 (codec noise and the idle
    animation's blinks and drift leave it high; another face does not)."""
    def luma(x: np.ndarray) -> np.ndarray:
        g = cv2.cvtColor(x, cv2.COLOR_RGB2GRAY)
        return cv2.resize(g, (128, 128), interpolation=cv2.INTER_AREA).astype(np.float64)
    return float(np.corrcoef(luma(a).ravel(), luma(b).ravel())[0, 1])


def test_avatar_gallery(tmp_path):
    """The page's avatars, on a server with an API key: photos dropped and picked are ranked
    as `avatars rank` ranks them (the sharp frontal one first, each with its reasons, the
    file that is no photo with its own), the best one is used, a session shows that face,
    the choice is in the address, and it is deleted again."""
    from avatar_stream.avatars.photo import reference_image
    from avatar_stream.avatars.ranking import rank_photos

    photos, bad, default = _gallery_files(tmp_path)
    shot = str(tmp_path / "gallery.png")
    key = "gallery-key"  # every call the page makes must carry it (previews too)
    with namespace("avp_gallery") as ns, serving(
            ns, tmp_path, "--avatar", str(default), "--api-key", key) as (base, log, proc):
        res = drive(ns, proc, log, tmp_path, "--scenario", "avatars", "--base", base,
                    "--photos", ",".join(map(str, photos)), "--bad", str(bad),
                    "--key", key, "--screenshot", shot)
        context = page_context(res, proc, log)
    assert "error" not in res, res["error"] + context
    dropped, picked = res["dropped"], res["picked"]
    print(f"\ngallery (driver {res['driver_s']} s): dropped ->",
          [(r["name"], r["score"], r["reasons"]) for r in dropped])

    # the ranking on the page: `avatars rank`'s order and scores, best first, with reasons
    cli = rank_photos(photos)
    assert [r["name"] for r in picked] == [s.name for s in cli] == \
        ["sharp.jpg", "small-face.jpg", "blurred.jpg"], (picked, cli)
    assert all(abs(r["score"] - s.score) <= 1 for r, s in zip(picked, cli, strict=True))
    assert [r["name"] for r in dropped] == [*[s.name for s in cli], "notes.txt"], dropped
    sharp, small, blurred, notes = dropped
    assert sharp["recommended"] and sharp["reasons"] == ["no problems found"] and sharp["use"]
    assert any("small face" in r for r in small["reasons"]), small
    assert any("blurred" in r for r in blurred["reasons"]), blurred
    assert notes == {"name": "notes.txt", "score": 0, "reasons": ["not an image"],
                     "reason": "not_image", "use": False, "recommended": False}, notes
    assert res["status_after_drop"] == "recommended: sharp.jpg"

    # used: uploaded, picked, kept in the address
    assert [g["id"] for g in res["gallery_before"]] == ["default"]
    assert res["chosen"] == "sharp" and "avatar=sharp" in res["url_after_use"]
    assert {"id": "sharp", "pressed": True, "preview": 512} in res["gallery_after_use"]
    assert res["ready"]["avatar"]["id"] == "sharp"

    # the session shows that face: the frames match the photo's 512x512 crop, not the default
    expected = reference_image(photos[0].read_bytes())
    other = reference_image(default.read_bytes())
    frames = [_picture(f) for f in res["frames"]]
    same = [_similarity(f, expected) for f in frames]
    different = [_similarity(f, other) for f in frames]
    print(f"  frames vs the photo's crop r={[round(r, 3) for r in same]}, "
          f"vs the default avatar r={[round(r, 3) for r in different]}")
    assert all(f.shape == (512, 512, 3) for f in frames)
    assert min(same) >= 0.9 and max(different) < min(same) - 0.3, (same, different)

    # a reload keeps the choice; the default picked while connected restarts the session
    # with that face; deleting the picked avatar falls back to the default
    assert res["after_reload"]["avatar"] == "sharp"
    assert {"id": "sharp", "pressed": True, "preview": 512} in res["after_reload"]["gallery"]
    switched = res["switched"]
    assert switched["avatar"] == "default" and "avatar=" not in switched["url"]
    frame = _picture(switched["frame"])
    assert _similarity(frame, other) >= 0.9 > _similarity(frame, expected) + 0.3
    gone = res["after_delete"]
    assert gone["avatar"] == "default" and "avatar=" not in gone["url"]
    assert [g["id"] for g in gone["gallery"]] == ["default"]
    assert not res["page_errors"] and not res["final"]["errors"], context
