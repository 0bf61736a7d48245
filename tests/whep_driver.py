"""Play the avatar with a third-party WHEP player in headless Debian Chromium (or, with
``--docs``, read the API's docs page); print one JSON line of what the page saw.

Test support for tests/web/test_whep_player.py, not a test module. It runs *inside* the
test's network namespace with the server and coturn. It serves a page from another origin
(its own port) that imports the npm package ``whip-whep``'s ``WHEPClient`` (installed under
tests/npm by ``make install-test``) and plays the server's WHEP endpoint with it, once per
``--policy`` (``all``: any candidate; ``relay``: only through the TURN server the endpoint's
``Link`` headers name). The page records every request the client makes (method, status,
the candidates in its body, the headers it could read across origins), the frames its
<video> presented, and the candidate pair Chromium chose.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import shutil
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

from browser_driver import CHROMIUM, chromium_args, wait_healthy
from playwright.sync_api import sync_playwright

WHEP_JS = Path(__file__).parent / "npm" / "node_modules" / "whip-whep" / "whep.js"

PAGE = """<!doctype html>
<meta charset="utf-8">
<title>WHEP player</title>
<video id="v" autoplay muted playsinline></video>
<script type="module">
import { WHEPClient } from "./whep.js";

const q = new URLSearchParams(location.search);
const out = window.whep = {requests: [], frames: 0, state: "new", errors: []};
// Watch the player's requests without changing them.
const realFetch = window.fetch.bind(window);
window.fetch = async (url, init = {}) => {
  const body = typeof init.body === "string" ? init.body : "";
  const headers = init.headers || {};
  const found = body.matchAll(/^a=candidate:\\S+ \\d+ \\S+ \\d+ (\\S+) \\d+ typ (\\S+)/gm);
  const entry = {method: init.method || "GET", url: String(url),
                 t: performance.now() / 1000,
                 candidates: [...found].map(m => `${m[2]} ${m[1]}`),  // "type address"
                 end: /^a=end-of-candidates/m.test(body),
                 ifMatch: headers["If-Match"] || null};
  out.requests.push(entry);
  const response = await realFetch(url, init);
  entry.status = response.status;
  entry.headers = Object.fromEntries(["location", "etag", "link", "x-session-token"]
    .map(h => [h, response.headers.get(h)]));
  return response;
};
window.addEventListener("unhandledrejection", e => out.errors.push(String(e.reason)));

const pc = new RTCPeerConnection({iceTransportPolicy: q.get("policy") || "all"});
pc.addTransceiver("video", {direction: "recvonly"});
pc.addTransceiver("audio", {direction: "recvonly"});
pc.addEventListener("connectionstatechange", () => { out.state = pc.connectionState; });
const video = document.getElementById("v");
pc.addEventListener("track", e => {
  if (e.track.kind !== "video") return;
  video.srcObject = new MediaStream([e.track]);
  const count = () => { out.frames++; video.requestVideoFrameCallback(count); };
  video.requestVideoFrameCallback(count);
});
const client = new WHEPClient();
client.view(pc, q.get("endpoint"), q.get("token")).catch(e => out.errors.push(String(e)));

window.selectedPair = async () => {
  const stats = [...(await pc.getStats()).values()];
  const byId = Object.fromEntries(stats.map(s => [s.id, s]));
  const transport = stats.find(s => s.type === "transport" && s.selectedCandidatePairId);
  const pair = transport && byId[transport.selectedCandidatePairId];
  if (!pair) return null;
  const local = byId[pair.localCandidateId], remote = byId[pair.remoteCandidateId];
  return {local: local.candidateType, remote: remote.candidateType,
          localAddress: `${local.address}:${local.port}`,
          remoteAddress: `${remote.address}:${remote.port}`};
};
window.picture = () => {
  const c = document.createElement("canvas");
  c.width = video.videoWidth; c.height = video.videoHeight;
  const g = c.getContext("2d");
  g.drawImage(video, 0, 0);
  const px = g.getImageData(0, 0, c.width, c.height).data;
  let sum = 0, sq = 0, n = 0;
  for (let i = 0; i < px.length; i += 4) {
    const y = 0.299 * px[i] + 0.587 * px[i + 1] + 0.114 * px[i + 2];
    sum += y; sq += y * y; n++;
  }
  const mean = sum / n;
  return {width: c.width, height: c.height, mean, std: Math.sqrt(sq / n - mean * mean)};
};
window.stop = () => client.stop();
</script>
"""


def serve_page(port: int) -> tuple[http.server.ThreadingHTTPServer, Path]:
    """The player's page and the package's whep.js, from a folder of their own."""
    root = Path(tempfile.mkdtemp(prefix="avw-whep-page-"))
    (root / "index.html").write_text(PAGE)
    shutil.copy(WHEP_JS, root / "whep.js")
    handler = functools.partial(_Quiet, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=httpd.serve_forever, name="page", daemon=True).start()
    return httpd, root


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def play(page, args, policy: str) -> dict:
    t0 = time.monotonic()
    page.goto(f"http://127.0.0.1:{args.page_port}/?policy={policy}"
              f"&endpoint={args.base}/v1/whep&token={args.token}")
    page.wait_for_function("() => window.whep && window.whep.frames >= 25",
                           timeout=args.connect_timeout * 1000)
    out: dict = {"frames_after_s": round(time.monotonic() - t0, 2)}
    a = page.evaluate("() => [performance.now() / 1000, window.whep.frames]")
    page.wait_for_timeout(args.window * 1000)
    b = page.evaluate("() => [performance.now() / 1000, window.whep.frames]")
    out["fps"] = round((b[1] - a[1]) / (b[0] - a[0]), 2)
    out["pair"] = page.evaluate("() => window.selectedPair()")
    out["picture"] = page.evaluate("() => window.picture()")
    page.evaluate("() => window.stop()")
    page.wait_for_function(
        "() => window.whep.requests.some(r => r.method === 'DELETE' && r.status)",
        timeout=10_000)
    out.update(page.evaluate("() => window.whep"))
    return out


def read_docs(page, args) -> dict:
    """The API's docs page as a reader sees it: every operation listed, one opened."""
    page.goto(f"{args.base}/docs")
    page.wait_for_selector(".opblock", timeout=20_000)
    page.wait_for_timeout(500)
    ops = page.eval_on_selector_all(
        ".opblock", "els => els.map(e => [e.querySelector('.opblock-summary-method')"
        ".textContent, e.querySelector('.opblock-summary-path').textContent.trim()])")
    page.click("#operations-whep-whepOffer .opblock-summary")
    page.wait_for_selector("#operations-whep-whepOffer .opblock-body", timeout=10_000)
    page.screenshot(path=args.screenshot, full_page=False)
    title = page.text_content(".info .title") or ""
    body = page.text_content("#operations-whep-whepOffer .opblock-body") or ""
    return {"operations": ops, "title": title, "whep_body_has_link": "ice-server" in body}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True, help="the server, e.g. http://127.0.0.1:8090")
    ap.add_argument("--token", default="", help="the API key, the player's bearer token")
    ap.add_argument("--page-port", type=int, default=8091)
    ap.add_argument("--policy", action="append", choices=["all", "relay"])
    ap.add_argument("--docs", action="store_true", help="read the API's docs page instead")
    ap.add_argument("--screenshot", default="/tmp/avw-docs.png")
    ap.add_argument("--health-timeout", type=float, default=90)
    ap.add_argument("--connect-timeout", type=float, default=30)
    ap.add_argument("--window", type=float, default=3.0)
    args = ap.parse_args()

    out: dict = {"console": [], "page_errors": []}
    httpd = root = None
    try:
        wait_healthy(args.base, args.health_timeout)
        if not args.docs:
            httpd, root = serve_page(args.page_port)
        with sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
            browser = p.chromium.launch_persistent_context(
                profile, executable_path=CHROMIUM, headless=True, args=chromium_args(None))
            try:
                page = browser.pages[0] if browser.pages else browser.new_page()
                page.on("console", lambda m: out["console"].append(f"{m.type}: {m.text}"))
                page.on("pageerror", lambda e: out["page_errors"].append(str(e)))
                if args.docs:
                    out["docs"] = read_docs(page, args)
                for policy in [] if args.docs else args.policy or ["all"]:
                    try:
                        out[policy] = play(page, args, policy)
                    except Exception:
                        out[policy] = {"error": traceback.format_exc(limit=3)}
                        try:
                            out[policy].update(page.evaluate("() => window.whep"))
                        except Exception:  # noqa: BLE001 - the page is what failed
                            pass
            finally:
                browser.close()
    except Exception:
        out["error"] = traceback.format_exc(limit=3)
    finally:
        if httpd is not None:
            httpd.shutdown()
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
