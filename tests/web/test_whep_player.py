"""A third-party WHEP player (the npm package ``whip-whep``, by the draft's author) plays the
avatar in headless Debian Chromium, from a page on another origin, with its candidates
trickled after the POST, and once more through a real TURN server (coturn).

Chromium, the page, the server and coturn share a fresh network namespace that has only
``lo`` (TESTING.md); ``whep_driver.py`` runs the browser inside it and reports JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from netns import namespace, stop, tail

from avatar_stream.config import ServerConfig
from avatar_stream.transports.http.openapi import spec

ROOT = Path(__file__).resolve().parents[2]
DRIVER = ROOT / "tests" / "whep_driver.py"
WHEP_JS = ROOT / "tests" / "npm" / "node_modules" / "whip-whep" / "whep.js"
PORT, PAGE_PORT, TURN_PORT = 8090, 8091, 3478  # the namespace is fresh: all free
KEY = "whep-player-key"
SECRET = "whep-player-turn-secret"


def _cannot_run() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "turnserver"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (make install-test installs it)"
    if not WHEP_JS.exists():
        return "tests/npm is not installed (make install-test runs npm ci there)"
    return None


pytestmark = [pytest.mark.timeout(240),
              pytest.mark.skipif(_cannot_run() is not None, reason=str(_cannot_run()))]


@pytest.fixture(scope="module")
def netns() -> Iterator[str]:
    with namespace("avw_whep") as name:
        yield name


def _start(netns: str, cmd: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as f:
        return subprocess.Popen(["ip", "netns", "exec", netns, *cmd], cwd=ROOT, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture(scope="module")
def stack(netns: str, tmp_path_factory: pytest.TempPathFactory):
    """coturn (a shared secret, loopback peers allowed) and the server that mints
    credentials for it, answering CORS for the player's page origin."""
    logs = tmp_path_factory.mktemp("whep")
    turn_log, server_log = logs / "turn.log", logs / "server.log"
    turn = _start(netns, [
        "turnserver", "-n", "--listening-ip=127.0.0.1", f"--listening-port={TURN_PORT}",
        "--relay-ip=127.0.0.1", "--min-port=49152", "--max-port=49407",
        "--use-auth-secret", f"--static-auth-secret={SECRET}", "--realm=avatar-stream.test",
        "--allow-loopback-peers", "--no-tls", "--no-dtls", "--no-cli", "--log-file=stdout",
        "--simple-log"], turn_log)
    avatar_stream = Path(sys.executable).parent / "avatar-stream"
    server = _start(netns, [
        str(avatar_stream), "serve", "--host", "127.0.0.1", "--port", str(PORT),
        "--ice-host-addresses", "127.0.0.1", "--api-key", KEY,
        "--cors-origin", f"http://127.0.0.1:{PAGE_PORT}",
        "--turn-url", f"turn:127.0.0.1:{TURN_PORT}?transport=udp", "--turn-secret", SECRET,
        ], server_log)  # --workers auto: calls reach each session's worker through the front
    try:
        yield netns, server, server_log, turn, turn_log
    finally:
        stop(server)
        stop(turn)


def _drive(stack, *args: str) -> tuple[dict, Callable[[], str]]:
    """Run the driver in the namespace: (its JSON result, the logs for a failure message)."""
    netns, server, server_log, turn, turn_log = stack
    cmd = ["ip", "netns", "exec", netns, sys.executable, str(DRIVER),
           "--base", f"http://127.0.0.1:{PORT}", *args]  # fmt: skip
    driver = subprocess.run(cmd, capture_output=True, text=True, timeout=200, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT / "tests")})
    lines = driver.stdout.strip().splitlines()

    def context() -> str:
        return (f"\nserver log:\n{tail(server_log)}\nturn log:\n{tail(turn_log, 20)}"
                f"\ndriver stderr:\n{driver.stderr[-3000:]}")

    assert driver.returncode == 0 and lines, context()
    res = json.loads(lines[-1])
    assert "error" not in res, res["error"] + context()
    return res, context


def test_whep_player_plays_the_avatar_with_trickle_and_through_turn(stack, tmp_path) -> None:
    netns, server, server_log, turn, turn_log = stack
    res, context = _drive(stack, "--token", KEY, "--page-port", str(PAGE_PORT),
                          "--policy", "all", "--policy", "relay")
    (tmp_path / "whep_result.json").write_text(json.dumps(res, indent=1))
    assert server.poll() is None and turn.poll() is None, context()
    for policy in ("all", "relay"):
        run = res[policy]
        detail = json.dumps({k: v for k, v in run.items() if k != "requests"})
        requests = run.get("requests", [])
        print(f"\nWHEP player, {policy} candidates: {run.get('frames_after_s')} s to 25 "
              f"frames, {run.get('fps')} fps, pair {run.get('pair')}, requests "
              + ", ".join(f"{r['method']} {r.get('status')} {r['candidates']}"
                          f"{' end' if r['end'] else ''}" for r in requests))
        assert "error" not in run and not run["errors"], detail + context()
        post, *patches, delete = requests
        # the offer went before any candidate was gathered; they followed by PATCH
        assert post["method"] == "POST" and post["status"] == 201, post
        assert post["candidates"] == [], post
        assert patches and all(p["method"] == "PATCH" and p["status"] == 204
                               for p in patches), patches
        assert any(p["candidates"] for p in patches) and any(p["end"] for p in patches)
        # what a page on another origin must be able to read
        headers = post["headers"]
        assert headers["location"].endswith("/whep") and headers["etag"], headers
        assert headers["x-session-token"], headers
        assert f'<turn:127.0.0.1:{TURN_PORT}?transport=udp>; rel="ice-server"; username=' \
            in headers["link"], headers
        # the avatar played: frames at (near) its rate, showing a picture (not a flat one)
        assert run["fps"] >= 15, detail
        picture = run["picture"]
        assert (picture["width"], picture["height"]) == (512, 512), picture
        assert picture["std"] > 20, picture
        assert delete["method"] == "DELETE" and delete["status"] == 204, delete
    # relay only: every candidate the player trickled was a relay one, and media went
    # through coturn
    relay = res["relay"]
    trickled = [c for p in relay["requests"][1:-1] for c in p["candidates"]]
    assert trickled and all(c.startswith("relay ") for c in trickled), trickled
    assert relay["pair"] and relay["pair"]["local"] == "relay", relay["pair"]
    assert server.poll() is None, "server died" + context()


def test_the_api_docs_page_shows_every_operation(stack, tmp_path) -> None:
    """Swagger UI, served by the server itself (no CDN: the namespace has no other host),
    lists every operation of /openapi.json and opens one."""
    shot = tmp_path / "docs.png"
    res, context = _drive(stack, "--docs", "--screenshot", str(shot))
    docs = res["docs"]
    described = {(m.upper(), p) for p, item in spec(ServerConfig(api_key=KEY))["paths"].items()
                 for m in item if m != "parameters"}
    shown = {(m.upper(), p.replace("\u200b", "")) for m, p in docs["operations"]}
    print(f"\ndocs page: {len(shown)} operations shown; screenshot {shot}")
    assert shown == described, (shown ^ described, context())
    assert docs["title"].startswith("avatar-stream") and docs["whep_body_has_link"], docs
    assert shot.stat().st_size > 10_000
