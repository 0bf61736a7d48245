"""Drive the web client in headless Debian Chromium; print one JSON line of measurements.

Test support for tests/test_browser.py, not a test module. It runs *inside* the test's network
namespace (``ip netns exec NS python tests/browser_driver.py ...``) because the page, the
browser and the server must share that namespace's loopback; Playwright talks to Chromium over
a pipe, so nothing else needs to cross the namespace boundary. The last stdout line is the
JSON result; the caller does the asserting.

Scenario (``--scenario full``): wait for /healthz, open ``/?autoconnect=1&mic=1`` with the fake
microphone playing ``--wav`` in a loop, wait for "connected" and the ``ready`` event, then
measure windows: mic speech, mic off (silence), a local file spoken through the file input,
then Interrupt, text typed into the say box, and Disconnect; last, an offer the server
refuses (unknown avatar).
``--scenario avatars`` (``--photos``): the gallery. The photos are dropped on the page
(drag-and-drop) and then chosen with the file picker; each time the ranking the page shows
is read back. The best one is used (uploaded and picked), a session shows it (frames grabbed
from the <video>), a reload keeps the choice, and the avatar is deleted again.
``--scenario static`` only loads the page and screenshots it.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

from playwright.sync_api import sync_playwright

# shared with the benchmark's browser client (``bench --client chromium``)
from avatar_stream.bench.chromium import CHROMIUM, chromium_args
from avatar_stream.bench.runner import wait_healthy

# Read the counters the page keeps on window.avatarClient, with the page's own clock.
SNAPSHOT_JS = """() => {
  const c = window.avatarClient;
  return {t: performance.now() / 1000, frames: c.framesReceived, energy: c.audioEnergy,
          nlevels: c.audioLevels.length};
}"""


def measure(page, seconds: float) -> dict:
    """Frame rate and remote-audio level over a window of ``seconds``."""
    a = page.evaluate(SNAPSHOT_JS)
    page.wait_for_timeout(seconds * 1000)
    b = page.evaluate(SNAPSHOT_JS)
    dt = b["t"] - a["t"]
    levels = page.evaluate(
        "([i, j]) => window.avatarClient.audioLevels.slice(i, j)", [a["nlevels"], b["nlevels"]]
    )
    return {
        "seconds": round(dt, 3),
        "frames": b["frames"] - a["frames"],
        "fps": round((b["frames"] - a["frames"]) / dt, 2),
        "energy": round(b["energy"] - a["energy"], 5),
        "mean_rms": round((b["energy"] - a["energy"]) / dt, 5),
        "max_rms": round(max(levels, default=0.0), 5),
        "levels": [round(x, 4) for x in levels],
        "stats": page.evaluate("() => window.avatarClient.lastStats"),
    }


def client_state(page) -> dict:
    return page.evaluate(
        """() => {
      const c = window.avatarClient;
      return {state: c.state, sessionId: c.sessionId, events: c.events, errors: c.errors,
              framesReceived: c.framesReceived, lastStats: c.lastStats,
              audioEnergy: c.audioEnergy,
              log: [...document.querySelectorAll('#log li')].map(li => li.textContent)};
    }"""
    )


def run_full(page, args, out: dict) -> None:
    page.goto(f"{args.base}/?autoconnect=1&mic=1")
    page.wait_for_function(
        """() => { const c = window.avatarClient;
                   return c && c.state === 'connected'
                          && c.events.some(e => e.type === 'ready'); }""",
        timeout=args.connect_timeout * 1000,
    )
    out["connected_after_s"] = round(time.monotonic() - out["_t0"], 2)

    page.wait_for_timeout(args.warmup * 1000)  # pipeline latency + first loop of the wav
    out["mic"] = measure(page, args.window)
    page.screenshot(path=args.screenshot)

    # Mic off: the sender switches to a silent generated track.
    page.click("#mic")
    page.wait_for_timeout(2000)
    out["mic_off"] = measure(page, 3)

    # A local file through <input type=file>: decoded by WebAudio, sent on the same sender.
    n_events = len(page.evaluate("() => window.avatarClient.events"))
    page.set_input_files("#file", args.wav)
    page.wait_for_timeout(1000)
    out["file"] = measure(page, 3)

    # Interrupt while the file is still being spoken, then watch the level fall.
    page.click("#interrupt")
    page.wait_for_timeout(1500)
    out["after_interrupt"] = measure(page, 2)
    out["events_after_file"] = page.evaluate(
        "(n) => window.avatarClient.events.slice(n).filter(e => e.type !== 'stats')", n_events
    )
    # Say: text typed into the page, spoken through the server's TTS (espeak-ng).
    n_events = len(page.evaluate("() => window.avatarClient.events"))
    page.fill("#say-text", "This sentence was typed into the page.")
    page.click("#say-button")
    page.wait_for_function(
        "(n) => window.avatarClient.events.slice(n).some(e => e.type === 'speech.started')",
        arg=n_events, timeout=10_000,
    )
    out["say"] = measure(page, 1.5)
    page.wait_for_function(  # the turn state beside the connection's
        "() => document.getElementById('turn').textContent === 'speaking'", timeout=5_000)
    out["turn_while_saying"] = page.evaluate(
        "() => { const t = document.getElementById('turn'); return [t.hidden, t.textContent]; }")
    page.wait_for_function(
        "(n) => window.avatarClient.events.slice(n).some(e => e.type === 'speech.finished')",
        arg=n_events, timeout=10_000,
    )
    out["events_after_say"] = page.evaluate(
        "(n) => window.avatarClient.events.slice(n).filter(e => e.type !== 'stats')", n_events
    )
    out["session_info"] = page.evaluate(
        """() => ({token: window.avatarClient.token,
                   shown: !document.getElementById('session-info').hidden,
                   command: document.getElementById('session-cmd').textContent,
                   sayText: document.getElementById('say-text').value})"""
    )

    out["before_disconnect"] = client_state(page)
    page.click("#disconnect")
    page.wait_for_function("() => window.avatarClient.state === 'closed'", timeout=10_000)
    out["final"] = client_state(page)

    # A refused offer (unknown avatar): the page shows the server's JSON error.
    page.goto(f"{args.base}/?autoconnect=1&avatar=no-such-avatar")
    page.wait_for_function("() => window.avatarClient.state === 'failed'", timeout=10_000)
    out["bad_avatar"] = client_state(page)


# Drop files on the drop zone as a user's drag-and-drop does: a DataTransfer holding Files.
DROP_JS = """(files) => {
  const dt = new DataTransfer();
  for (const f of files) {
    const bytes = Uint8Array.from(atob(f.data), (c) => c.charCodeAt(0));
    dt.items.add(new File([bytes], f.name, {type: f.type}));
  }
  const zone = document.getElementById('dropzone');
  for (const type of ['dragenter', 'dragover', 'drop']) {
    zone.dispatchEvent(new DragEvent(type, {dataTransfer: dt, bubbles: true, cancelable: true}));
  }
}"""

# The ranking as the page shows it, row by row in page order.
RANKING_JS = """() => [...document.querySelectorAll('#ranking .rank-row')].map((li) => ({
  name: li.querySelector('.rank-name').textContent,
  score: Number(li.querySelector('.score').textContent),
  reasons: [...li.querySelectorAll('.reasons li')].map((r) => r.textContent),
  reason: li.dataset.reason || null,
  use: !!li.querySelector('button.use'),
  recommended: !!li.querySelector('.badge'),
}))"""

GALLERY_JS = """() => [...document.querySelectorAll('#gallery .avatar-card')].map((li) => ({
  id: li.dataset.id,
  pressed: li.querySelector('.pick').getAttribute('aria-pressed') === 'true',
  preview: li.querySelector('img').naturalWidth,
}))"""

# One decoded frame of the avatar's video, as PNG (base64).
GRAB_JS = """() => {
  const v = document.getElementById('video');
  const c = document.createElement('canvas');
  c.width = v.videoWidth; c.height = v.videoHeight;
  c.getContext('2d').drawImage(v, 0, 0);
  return c.toDataURL('image/png').split(',')[1];
}"""


def _ranked(page, n: int) -> list:
    page.wait_for_function(
        "(n) => document.querySelectorAll('#ranking .rank-row').length === n", arg=n,
        timeout=60_000)
    return page.evaluate(RANKING_JS)


def run_avatars(page, args, out: dict) -> None:
    photos, bad = [Path(p) for p in args.photos.split(",")], Path(args.bad)
    page.goto(f"{args.base}/" + (f"#key={args.key}" if args.key else ""))
    page.wait_for_function("() => document.querySelectorAll('#gallery .avatar-card').length",
                           timeout=10_000)
    out["gallery_before"] = page.evaluate(GALLERY_JS)

    # drag-and-drop: every file, the bad one included
    files = [{"name": p.name, "type": "image/jpeg",
              "data": base64.b64encode(p.read_bytes()).decode()} for p in [*photos, bad]]
    page.evaluate(DROP_JS, files)
    out["dropped"] = _ranked(page, len(files))
    out["status_after_drop"] = page.text_content("#avatar-status")

    # the file picker: the photos only
    page.evaluate("() => { document.getElementById('ranking').textContent = ''; }")
    page.set_input_files("#photos", [str(p) for p in photos])
    out["picked"] = _ranked(page, len(photos))
    page.screenshot(path=args.screenshot, full_page=True)

    # use the best: uploaded, then picked (in the page's address too)
    page.click("#ranking .rank-row:first-child button.use")
    page.wait_for_function("() => window.avatarClient.avatar !== 'default'", timeout=60_000)
    out["chosen"] = page.evaluate("() => window.avatarClient.avatar")
    out["url_after_use"] = page.url
    page.wait_for_function(
        "(id) => [...document.querySelectorAll('#gallery .avatar-card')].some("
        "(li) => li.dataset.id === id && li.querySelector('img').naturalWidth > 0)",
        arg=out["chosen"], timeout=10_000)
    out["gallery_after_use"] = page.evaluate(GALLERY_JS)

    # a session with it: its frames show that face
    page.click("#connect")
    page.wait_for_function(
        """() => { const c = window.avatarClient;
                   return c.state === 'connected' && c.events.some(e => e.type === 'ready')
                          && c.framesReceived > 25; }""",
        timeout=args.connect_timeout * 1000)
    out["ready"] = page.evaluate(
        "() => window.avatarClient.events.find(e => e.type === 'ready')")
    out["frames"] = []
    for _ in range(3):
        out["frames"].append(page.evaluate(GRAB_JS))
        page.wait_for_timeout(400)
    page.click("#disconnect")
    page.wait_for_function("() => window.avatarClient.state === 'closed'", timeout=10_000)

    # the choice survives a reload (it is in the address)
    page.reload()
    page.wait_for_function("() => document.querySelectorAll('#gallery .avatar-card').length",
                           timeout=10_000)
    out["after_reload"] = {"avatar": page.evaluate("() => window.avatarClient.avatar"),
                           "gallery": page.evaluate(GALLERY_JS)}

    # picked while a session runs: the session restarts with that face
    page.click("#connect")
    page.wait_for_function(
        "() => window.avatarClient.events.some(e => e.type === 'ready')",
        timeout=args.connect_timeout * 1000)
    page.click("#gallery .avatar-card[data-id='default'] button.pick")
    page.wait_for_function(
        """() => { const c = window.avatarClient;
                   return c.state === 'connected' && c.framesReceived > 50 && c.events.some(
                     e => e.type === 'ready' && e.avatar.id === 'default'); }""",
        timeout=args.connect_timeout * 1000)
    out["switched"] = {"avatar": page.evaluate("() => window.avatarClient.avatar"),
                       "url": page.url, "frame": page.evaluate(GRAB_JS)}
    page.click("#disconnect")
    page.wait_for_function("() => window.avatarClient.state === 'closed'", timeout=10_000)

    # delete it once picked again: two clicks; the pick falls back to the default
    page.click(f"#gallery .avatar-card[data-id='{out['chosen']}'] button.pick")
    card = f"#gallery .avatar-card[data-id='{out['chosen']}'] button.delete"
    page.click(card)
    page.click(card)
    page.wait_for_function(
        "(id) => !document.querySelector(`#gallery .avatar-card[data-id='${id}']`)",
        arg=out["chosen"], timeout=10_000)
    out["after_delete"] = {"avatar": page.evaluate("() => window.avatarClient.avatar"),
                           "url": page.url, "gallery": page.evaluate(GALLERY_JS)}
    out["final"] = client_state(page)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True, help="server URL, e.g. http://127.0.0.1:8080")
    ap.add_argument("--wav", help="fake microphone input (48 kHz mono 16-bit wav)")
    ap.add_argument("--screenshot", default="/tmp/browser_check.png")
    ap.add_argument("--scenario", choices=["full", "static", "avatars"], default="full")
    ap.add_argument("--photos", help="avatars: comma-separated photo files to rank")
    ap.add_argument("--bad", help="avatars: a file that is no photo, dropped with them")
    ap.add_argument("--key", help="avatars: the server's API key, given to the page as #key=")
    ap.add_argument("--health-timeout", type=float, default=90)
    ap.add_argument("--connect-timeout", type=float, default=30)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--window", type=float, default=5.0)
    ap.add_argument("--viewport", default="1100x760")
    args = ap.parse_args()

    out: dict = {"_t0": time.monotonic(), "console": [], "page_errors": []}
    try:
        if args.scenario != "static":
            wait_healthy(args.base, args.health_timeout)
        w, h = (int(x) for x in args.viewport.split("x"))
        with sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
            browser = p.chromium.launch_persistent_context(
                profile,
                executable_path=CHROMIUM,
                headless=True,
                args=chromium_args(args.wav),
                viewport={"width": w, "height": h},
            )
            try:
                page = browser.pages[0] if browser.pages else browser.new_page()
                page.on("console", lambda m: out["console"].append(f"{m.type}: {m.text}"))
                page.on("pageerror", lambda e: out["page_errors"].append(str(e)))
                try:
                    if args.scenario == "static":
                        page.goto(args.base + "/")
                        page.wait_for_timeout(500)
                        page.screenshot(path=args.screenshot)
                        out["final"] = client_state(page)
                    elif args.scenario == "avatars":
                        run_avatars(page, args, out)
                    else:
                        run_full(page, args, out)
                except Exception:
                    # Keep what the page knew: it is what explains a failure.
                    out["error"] = traceback.format_exc(limit=3)
                    try:
                        out["final"] = client_state(page)
                        page.screenshot(path=args.screenshot)
                    except Exception:  # noqa: BLE001
                        pass
            finally:
                browser.close()
    except Exception:
        out["error"] = traceback.format_exc(limit=3)
    out.pop("_t0")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
