"""Glass to glass in a real browser: ``avatar-stream bench --client chromium``.

Headless Chromium (Debian's, driven by Playwright) opens the avatar's own page with its fake
microphone playing the test speech in a loop (each loop one utterance, then silence).
While the session runs, the page measures, on the page's one clock:

- what the microphone sent: the outgoing track through WebAudio (an AudioWorklet taking
  each 10.7 ms block's loudness, stamped with the audio clock);
- what the browser played: the avatar's incoming audio track through the same worklet;
- what the browser showed: each video frame as it is presented
  (``requestVideoFrameCallback``: its expected display time), drawn into a canvas and
  the darkness of its mouth box read off it.

The audio clock is tied to the page's clock (``performance.now()``) with
``AudioContext.getOutputTimestamp()``: a block is heard when its context time reaches the
output, and was rendered ``baseLatency + outputLatency`` before that (the time a
microphone block is taken at; what the capture itself buffers before that, a few
milliseconds, is not seen). From those series: speech onset to mouth motion on the
displayed frames, the echo latency as played, and the A/V offset as played.

The server and the browser share a fresh network namespace that has only ``lo`` (or, with
an impaired link, the browser sits in the clients' namespace). ``main`` here is the
driver that runs inside the namespace, and prints its raw samples as one JSON document.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
import wave
from pathlib import Path
from typing import Any

import numpy as np

from avatar_stream.bench import analysis as A
from avatar_stream.bench import netns
from avatar_stream.bench.machine import TreeMeter, process_tree
from avatar_stream.bench.runner import wait_healthy

CHROMIUM = "/usr/bin/chromium"
PORT = 8080
TAIL_SILENCE_S = 1.5  # after each loop of the speech: a pause, so each loop has an onset


def chromium_args(wav: str | None) -> list[str]:
    """Headless Chromium on a namespace's loopback, its fake microphone playing ``wav``."""
    args = [
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        "--autoplay-policy=no-user-gesture-required",
        # Without this Chromium gathers no ICE candidates on a namespace that only has lo.
        "--allow-loopback-in-peer-connection",
    ]
    if wav:
        args.append(f"--use-file-for-fake-audio-capture={wav}")
    return args


# Before the page's own script: keep every peer connection it makes, to find its tracks.
INIT_JS = """
(() => {
  const Orig = window.RTCPeerConnection;
  window.__pcs = [];
  window.RTCPeerConnection = class extends Orig {
    constructor(...a) { super(...a); window.__pcs.push(this); }
  };
})();
"""

WORKLET_JS = """
class BenchEnvelope extends AudioWorkletProcessor {
  constructor() { super(); this.acc = [0, 0]; this.n = 0; this.t0 = 0; this.out = []; }
  process(inputs) {
    for (let k = 0; k < 2; k++) {
      const ch = inputs[k] && inputs[k][0];
      if (ch) for (let i = 0; i < ch.length; i++) this.acc[k] += ch[i] * ch[i];
    }
    if (this.n === 0) this.t0 = currentTime;
    this.n += 128;
    if (this.n >= 512) {
      this.out.push(this.t0, Math.sqrt(this.acc[0] / this.n), Math.sqrt(this.acc[1] / this.n));
      this.acc = [0, 0]; this.n = 0;
      if (this.out.length >= 300) { this.port.postMessage(this.out); this.out = []; }
    }
    return true;
  }
}
registerProcessor("bench-envelope", BenchEnvelope);
"""

# Starts the measurement once the session is up; everything lands on window.__bench.
START_JS = """
async (worklet) => {
  const c = window.avatarClient;
  const ready = c.events.find(e => e.type === "ready");
  const box = ready.avatar.mouth_box;
  const pc = window.__pcs[window.__pcs.length - 1];
  const mic = pc.getSenders().map(s => s.track).find(t => t && t.kind === "audio");
  const video = document.getElementById("video");
  const remote = video.srcObject.getAudioTracks()[0];
  const b = window.__bench = {audio: [], frames: [], clock: [], box};
  const ctx = new AudioContext({sampleRate: 48000});
  await ctx.resume();
  const url = URL.createObjectURL(new Blob([worklet], {type: "application/javascript"}));
  await ctx.audioWorklet.addModule(url);
  const node = new AudioWorkletNode(ctx, "bench-envelope", {numberOfInputs: 2});
  node.port.onmessage = (m) => { for (const x of m.data) b.audio.push(x); };
  ctx.createMediaStreamSource(new MediaStream([mic])).connect(node, 0, 0);
  ctx.createMediaStreamSource(new MediaStream([remote])).connect(node, 0, 1);
  const mute = ctx.createGain(); mute.gain.value = 0;
  node.connect(mute).connect(ctx.destination);
  const stamp = () => {
    const ts = ctx.getOutputTimestamp();
    b.clock.push([ts.contextTime, ts.performanceTime, ctx.baseLatency || 0,
                  ctx.outputLatency || 0]);
  };
  stamp(); b.clockTimer = setInterval(stamp, 250);
  const [x0, y0, x1, y1] = box, w = x1 - x0, h = y1 - y0;
  const canvas = document.createElement("canvas");
  canvas.width = w; canvas.height = h;
  const g = canvas.getContext("2d", {willReadFrequently: true});
  const hist = new Uint32Array(256);
  const onFrame = (now, md) => {
    g.drawImage(video, x0, y0, w, h, 0, 0, w, h);
    const d = g.getImageData(0, 0, w, h).data;
    hist.fill(0);
    for (let i = 0; i < d.length; i += 4)
      hist[(0.299 * d[i] + 0.587 * d[i + 1] + 0.114 * d[i + 2]) | 0]++;
    let seen = 0, p10 = 0;
    const want = 0.1 * (d.length / 4);
    for (; p10 < 256; p10++) { seen += hist[p10]; if (seen >= want) break; }
    b.frames.push([md.expectedDisplayTime, md.presentationTime, md.receiveTime || 0,
                   md.rtpTimestamp || 0, 255 - p10]);
    if (!b.stopped) video.requestVideoFrameCallback(onFrame);
  };
  video.requestVideoFrameCallback(onFrame);
  b.ctx = ctx; b.node = node;
  return {box, sampleRate: ctx.sampleRate, baseLatency: ctx.baseLatency,
          outputLatency: ctx.outputLatency};
}
"""

STOP_JS = """
async () => {
  const b = window.__bench;
  b.stopped = true;
  clearInterval(b.clockTimer);
  b.node.port.postMessage("flush");
  const report = await window.__pcs[window.__pcs.length - 1].getStats();
  const inbound = {};
  report.forEach(s => { if (s.type === "inbound-rtp") inbound[s.kind] = s; });
  await b.ctx.close();
  return {audio: b.audio, frames: b.frames, clock: b.clock, box: b.box, inbound,
          now: performance.now()};
}
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--client", choices=["aiortc", "chromium"], default="aiortc",
                   help="aiortc: Python clients (default); chromium: one session in headless "
                        "Chromium, measured as its page plays it (glass to glass)")


def write_speech_wav(path: Path, speech: np.ndarray, rate: int) -> None:
    """The speech and a pause after it, as the fake microphone's file (it loops)."""
    pcm = np.concatenate([speech.astype(np.int16),
                          np.zeros(int(TAIL_SILENCE_S * rate), np.int16)])
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())


def chromium_bench(args: argparse.Namespace, speech: np.ndarray, rate: int) -> dict[str, Any]:
    """One session in headless Chromium against the real server, both in a fresh
    namespace; the raw samples and the figures."""
    if not Path(CHROMIUM).exists():
        raise SystemExit(f"bench: {CHROMIUM} is missing (Debian package chromium)")
    why = netns.unavailable()
    if why:
        raise SystemExit(f"bench --client chromium: {why}")
    (ns_name,) = netns.names(args.netns_prefix, "b")
    with netns.namespace(ns_name) as ns, tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "speech.wav"
        write_speech_wav(wav, speech, rate)
        base = f"http://127.0.0.1:{PORT}"
        log = Path(tmp) / "server.log"
        with netns.serve_in(ns, "127.0.0.1", PORT, args.engine, log,
                            "--ice-host-addresses", "127.0.0.1") as server:
            raw_path = Path(tmp) / "raw.json"
            print(f"bench: one session in headless Chromium x {args.duration:.0f} s",
                  file=sys.stderr, flush=True)
            driver = subprocess.Popen(
                ["ip", "netns", "exec", ns, sys.executable, "-m", "avatar_stream.bench.chromium",
                 "--base", base, "--wav", str(wav), "--duration", str(args.duration),
                 "--out", str(raw_path)], stderr=subprocess.PIPE, text=True)
            server_cpu = TreeMeter(lambda: process_tree(server.pid))
            browser_cpu = TreeMeter(lambda: process_tree(driver.pid))
            measuring, cpu = False, None
            assert driver.stderr is not None
            for line in driver.stderr:  # the driver says when the session is up
                print(f"  {line.rstrip()}", file=sys.stderr, flush=True)
                if line.startswith("measuring") and not measuring:
                    measuring = True
                    server_cpu.start()
                    browser_cpu.start()
                if line.startswith("stopped") and measuring:
                    cpu = {"server_cores": server_cpu.stop(), "browser_cores": browser_cpu.stop()}
            driver.wait(timeout=60)
            driver.stderr.close()
            if not raw_path.exists():
                tail = log.read_text(errors="replace")[-1500:]
                raise RuntimeError(f"the browser measured nothing (exit {driver.returncode});"
                                   f" server log:\n{tail}")
            raw = json.loads(raw_path.read_text())
    if "error" in raw:
        raise RuntimeError(f"the browser driver failed:\n{raw['error']}")
    out: dict[str, Any] = {"browser": browser_figures(raw), "browser_raw": raw}
    if cpu is not None:
        out["browser"]["cpu"] = cpu
    return out


# -- analysis --------------------------------------------------------------------------------


def browser_figures(raw: dict[str, Any]) -> dict[str, Any]:
    """Figures from the page's raw series, all on the page's clock (seconds)."""
    clock = np.asarray(raw["clock"], dtype=np.float64)
    if len(clock) == 0 or len(raw["audio"]) < 30 or len(raw["frames"]) < 10:
        return {"error": "too few samples"}
    valid = clock[clock[:, 1] > 0]  # performanceTime 0: the output had not started
    offset = float(np.median(valid[:, 1] / 1000 - valid[:, 0]))  # performance - context, s
    render_lead = float(np.median(valid[:, 2] + valid[:, 3]))
    audio = np.asarray(raw["audio"], dtype=np.float64).reshape(-1, 3)
    heard_t = audio[:, 0] + offset  # when each block reached the output
    mic_t = heard_t - render_lead  # when it was rendered: the microphone's block taken
    frames = np.asarray(raw["frames"], dtype=np.float64)
    shown_t = frames[:, 0] / 1000  # expected display time
    mouth = frames[:, 4]
    start, stop = max(mic_t[0], shown_t[0]), min(heard_t[-1], shown_t[-1])
    sent = A.smooth(A.on_grid(mic_t, audio[:, 1], start, stop))
    heard = A.smooth(A.on_grid(heard_t, audio[:, 2], start, stop))
    shown = A.smooth(A.on_grid(shown_t, mouth, start, stop))
    onsets = speech_onsets(sent)
    echo, mouth_lag, av = [], [], []
    for i0, i1 in onset_windows(onsets, len(sent)):
        lag, r = A.window_lag(sent, heard, i0, i1, max_lag_s=1.0)
        mlag, mr = A.window_lag(sent, shown, i0, i1, max_lag_s=1.0)
        if np.isfinite(lag) and r >= 0.5:
            echo.append(lag)
        if np.isfinite(mlag) and mr >= 0.3:
            mouth_lag.append(mlag)
        if np.isfinite(lag) and np.isfinite(mlag) and r >= 0.5 and mr >= 0.5:
            av.append(lag - mlag)
    motion = mouth_onsets(onsets, shown_t - start, mouth)
    intervals = np.diff(shown_t)
    return {
        "speech_onsets": len(onsets),
        "mouth_onset_ms": [m * 1000 for m in motion],
        "mouth_latency_ms": [m * 1000 for m in mouth_lag],
        "echo_ms": [e * 1000 for e in echo],
        "av_offset_ms": [a * 1000 for a in av],
        "fps": float((len(shown_t) - 1) / (shown_t[-1] - shown_t[0])),
        "freezes": int(np.sum(intervals > 0.2)),
        "frame_interval_p95_ms": float(np.percentile(intervals, 95) * 1000),
        "render_lead_ms": render_lead * 1000,
        "jitter_buffer_ms": {
            kind: 1000 * s["jitterBufferDelay"] / max(s.get("jitterBufferEmittedCount", 1), 1)
            for kind, s in raw.get("inbound", {}).items() if "jitterBufferDelay" in s},
    }


def speech_onsets(envelope: np.ndarray, hop_s: float = A.HOP_S, quiet_s: float = 0.3
                  ) -> list[int]:
    """Grid indices where speech starts after at least ``quiet_s`` of quiet."""
    if len(envelope) == 0 or envelope.max() <= 0:
        return []
    loud = envelope > 0.2 * np.percentile(envelope, 99)
    need = int(quiet_s / hop_s)
    out, quiet = [], need
    for i, on in enumerate(loud):
        if on and quiet >= need:
            out.append(i)
        quiet = 0 if on else quiet + 1
    return out


def onset_windows(onsets: list[int], n: int, hop_s: float = A.HOP_S, width_s: float = 2.5,
                  step_s: float = 0.5) -> list[tuple[int, int]]:
    """Sliding windows from each onset over its utterance (as the aiortc client's)."""
    out = []
    width, step = int(width_s / hop_s), int(step_s / hop_s)
    ends = [*onsets[1:], n]
    for on, nxt in zip(onsets, ends, strict=True):
        a = max(0, on - int(0.2 / hop_s))
        while a + width <= min(nxt, n):
            out.append((a, a + width))
            a += step
    return out


def mouth_onsets(onsets: list[int], shown: np.ndarray, mouth: np.ndarray,
                 hop_s: float = A.HOP_S) -> list[float]:
    """Per speech onset: how long until a displayed frame shows the mouth opening (its
    darkness rises by a third of its speaking range above what it was just before)."""
    out: list[float] = []
    span = float(np.percentile(mouth, 95) - np.percentile(mouth, 5))
    if span <= 0:
        return out
    for on in onsets:
        t = on * hop_s
        before = mouth[(shown >= t - 0.3) & (shown < t)]
        if len(before) == 0:
            continue
        level = float(np.median(before)) + span / 3
        after = np.nonzero((shown >= t) & (shown < t + 1.0) & (mouth > level))[0]
        if len(after):
            out.append(float(shown[after[0]] - t))
    return out


def lines(fig: dict[str, Any]) -> list[str]:
    if "error" in fig:
        return [f"chromium: {fig['error']}"]

    def p(xs: list[float]) -> str:
        if not xs:
            return "-"
        p50, p95 = np.percentile(xs, 50), np.percentile(xs, 95)
        return f"p50 {p50:.0f} ms, p95 {p95:.0f} ms (n {len(xs)})"

    out = [
        f"headless Chromium, as its page played the session ({fig['speech_onsets']} "
        "utterances):",
        f"  speech onset -> mouth motion on the displayed frames: {p(fig['mouth_onset_ms'])}",
        f"  mouth latency (envelope vs mouth, displayed): {p(fig['mouth_latency_ms'])}",
        f"  echo latency (speech sent -> heard):          {p(fig['echo_ms'])}",
        f"  A/V offset as played (+: audio late):         {p(fig['av_offset_ms'])}",
        f"  video: {fig['fps']:.1f} fps presented, {fig['freezes']} freezes (> 200 ms), "
        f"frame interval p95 {fig['frame_interval_p95_ms']:.0f} ms",
        "  Chromium's jitter buffers: " + ", ".join(
            f"{k} {v:.0f} ms" for k, v in fig["jitter_buffer_ms"].items()),
        f"  (the audio clock leads the output by {fig['render_lead_ms']:.0f} ms)",
    ]
    if "cpu" in fig:
        out.append(f"  CPU: the server {fig['cpu']['server_cores']:.2f} cores, the browser "
                   f"{fig['cpu']['browser_cores']:.2f}")
    return out


# -- the driver, inside the namespace --------------------------------------------------------


def drive(base: str, wav: str, duration: float, out: Path) -> None:
    from playwright.sync_api import sync_playwright

    result: dict[str, Any] = {}
    try:
        wait_healthy(base, 180)
        with sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
            browser = p.chromium.launch_persistent_context(
                profile, executable_path=CHROMIUM, headless=True, args=chromium_args(wav))
            try:
                page = browser.pages[0] if browser.pages else browser.new_page()
                page.add_init_script(INIT_JS)
                page.goto(f"{base}/?autoconnect=1&mic=1")
                page.wait_for_function(
                    """() => { const c = window.avatarClient;
                               return c && c.state === 'connected'
                                 && c.events.some(e => e.type === 'ready')
                                 && document.getElementById('video').srcObject; }""",
                    timeout=60_000)
                page.evaluate(START_JS, WORKLET_JS)
                print("measuring", file=sys.stderr, flush=True)
                t_end = time.monotonic() + duration
                while time.monotonic() < t_end:
                    page.wait_for_timeout(min(5000, (t_end - time.monotonic()) * 1000))
                    print(f"{duration - (t_end - time.monotonic()):.0f}/{duration:.0f} s",
                          file=sys.stderr, flush=True)
                result = page.evaluate(STOP_JS)
                print("stopped", file=sys.stderr, flush=True)
                page.evaluate("() => window.avatarClient.disconnect()")
            finally:
                browser.close()
    except Exception:
        result = {"error": traceback.format_exc(limit=4)}
    out.write_text(json.dumps(result))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="the browser benchmark's driver (in a namespace)")
    ap.add_argument("--base", required=True)
    ap.add_argument("--wav", required=True)
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    drive(args.base, args.wav, args.duration, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
