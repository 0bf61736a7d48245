"""Offline rendering (batch mode): a photo and a speech file in, a video file with that speech
out, faster than real time.

The same engine and the same frame/audio pairing as a live session: frame k is made from the
16 kHz samples [640k, 640k + 640) and is shown while exactly those samples play, so the clip
is in sync by construction (video pts k/25 s, audio pts from 0). WebM gets VP8 + Opus (what
browsers play everywhere), MP4 gets H.264 + AAC.

``measure_render_speed`` is the engine-only speed benchmark (``avatar-stream bench
--engine-only``): frames drawn per second on a given number of OpenCV threads, no encoding.
"""

from __future__ import annotations

import io
import math
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from queue import Full, Queue
from typing import Any, BinaryIO

import av
import cv2
import numpy as np
import soxr

from avatar_stream.engines import ENGINES, FPS, SAMPLE_RATE, SAMPLES_PER_FRAME, Avatar, Engine
from avatar_stream.engines.flashhead.config import add_cli_options as add_flashhead_options
from avatar_stream.errors import SpeechError
from avatar_stream.media import OUT_RATE

AUDIO_RATE = OUT_RATE
#: container -> (video codec, audio codec, options)
FORMATS: dict[str, tuple[str, str, dict[str, str]]] = {
    "webm": ("libvpx", "libopus", {"deadline": "good", "cpu-used": "5", "crf": "10",
                                   "b": "2M", "auto-alt-ref": "0"}),
    "mp4": ("libx264", "aac", {"preset": "veryfast", "crf": "20", "tune": "film"}),
}
MAX_SPEECH_S = 600.0  # a clip longer than this is a mistake, not a request

ProgressFn = Callable[[int, int], None]


def load_speech(source: str | Path | bytes | BinaryIO) -> tuple[np.ndarray, int]:
    """Any audio file PyAV (FFmpeg) decodes, as float32 mono samples and their rate."""
    src: Any = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    try:
        with av.open(src, "r") as container:
            if not container.streams.audio:
                raise SpeechError("unsupported_media_type", "no audio stream in the speech file")
            stream = container.streams.audio[0]
            rate = int(stream.codec_context.sample_rate or stream.rate or 0)
            # planar float, then the mean of the channels: FFmpeg's own downmix adds them at
            # -3 dB each, which pushes loud speech recorded as two equal channels past 1.0
            planar = av.AudioResampler(format="fltp")
            chunks = []
            total = 0
            for frame in container.decode(stream):
                for out in planar.resample(frame):
                    chunk = out.to_ndarray().mean(axis=0)
                    chunks.append(chunk)
                    total += chunk.size
                    if total > MAX_SPEECH_S * rate:
                        raise SpeechError("too_large", f"speech longer than {MAX_SPEECH_S:.0f} s")
            for out in planar.resample(None):
                chunks.append(out.to_ndarray().mean(axis=0))
    except av.FFmpegError as exc:
        raise SpeechError("unsupported_media_type",
                          f"not a readable audio file ({exc.strerror or exc})") from exc
    if not chunks or rate <= 0:
        raise SpeechError("bad_audio", "the speech file holds no audio")
    samples = np.concatenate(chunks).astype(np.float32)
    if samples.size == 0:
        raise SpeechError("bad_audio", "the speech file holds no audio")
    return samples, rate


@dataclass(frozen=True)
class RenderResult:
    frames: int
    duration_s: float  # of the speech (the clip's audio)
    elapsed_s: float  # wall time taken
    cpu_s: float  # CPU time this process spent (all threads): what a busy machine cannot inflate

    @property
    def realtime_factor(self) -> float:
        """Seconds of video made per second of wall time."""
        return self.duration_s / max(self.elapsed_s, 1e-9)


def frame_count(samples_16k: int) -> int:
    """Frames for a speech of this many 16 kHz samples: every sample gets its frame."""
    return max(1, math.ceil(samples_16k / SAMPLES_PER_FRAME))


def render_clip(
    engine: Engine,
    avatar: Avatar,
    speech: np.ndarray,
    rate: int,
    out: str | Path | BinaryIO,
    fmt: str | None = None,
    *,
    progress: ProgressFn | None = None,
    seed: int | None = 0,
) -> RenderResult:
    """Animate ``avatar`` speaking ``speech`` (float mono at ``rate``) into ``out``.

    ``fmt`` is "webm" or "mp4"; by default the file's suffix says. Drawing and encoding run
    on two threads (a frame is drawn while the previous one is encoded), so a two-core
    machine renders several times faster than real time.
    """
    fmt = (fmt or Path(str(out)).suffix.lstrip(".")).lower()
    if fmt not in FORMATS:
        raise ValueError(f"unknown output format {fmt!r}; use .webm or .mp4")
    speech = np.asarray(speech, dtype=np.float32).reshape(-1)
    if speech.size == 0:
        raise SpeechError("bad_audio", "the speech is empty")
    started, cpu_started = time.perf_counter(), time.process_time()
    x16 = soxr.resample(speech, rate, SAMPLE_RATE).astype(np.float32) if rate != SAMPLE_RATE \
        else speech
    n = frame_count(len(x16))
    x16 = np.pad(x16, (0, n * SAMPLES_PER_FRAME - len(x16)))
    # the clip's audio: the speech itself at 48 kHz, not the engine's 16 kHz copy
    audio = soxr.resample(speech, rate, AUDIO_RATE).astype(np.float32) if rate != AUDIO_RATE \
        else speech
    vcodec, acodec, options = FORMATS[fmt]

    frames: Queue[np.ndarray | None] = Queue(maxsize=8)
    failure: list[BaseException] = []
    stop = threading.Event()  # the encoder failed: the drawer must not wait on a full queue

    def draw() -> None:
        stream = engine.open_stream(avatar, seed=seed)
        per = stream.frames_per_step  # a chunked engine (FlashHead) steps 24 frames at once
        try:
            for first in range(0, n, per):
                chunk = x16[first * SAMPLES_PER_FRAME : (first + per) * SAMPLES_PER_FRAME]
                chunk = np.pad(chunk, (0, per * SAMPLES_PER_FRAME - len(chunk)))
                for frame in stream.step(chunk)[: n - first]:
                    while not stop.is_set():
                        try:
                            frames.put(frame, timeout=0.1)
                            break
                        except Full:
                            continue
                    if stop.is_set():
                        return
        except BaseException as exc:  # handed to the encoding thread, raised there
            failure.append(exc)
        finally:
            stream.close()
            if not stop.is_set():
                frames.put(None)

    drawer = threading.Thread(target=draw, name="render-draw", daemon=True)
    done = 0
    try:
        with av.open(out, "w", format=fmt) as container:
            video = container.add_stream(vcodec, rate=FPS, options=options)
            video.width, video.height = avatar.image.shape[1], avatar.image.shape[0]
            video.pix_fmt = "yuv420p"
            video.time_base = Fraction(1, FPS)
            sound = container.add_stream(acodec, rate=AUDIO_RATE, layout="mono")
            drawer.start()
            while (rgb := frames.get()) is not None:
                yuv = np.asarray(cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420), dtype=np.uint8)
                vf = av.VideoFrame.from_ndarray(yuv, format="yuv420p")
                vf.pts = done
                container.mux(video.encode(vf))
                done += 1
                # the audio shown with this frame follows it into the file (the last frame
                # takes whatever resampling rounding left over)
                a0 = _audio_span(done - 1, len(audio))
                a1 = len(audio) if done == n else _audio_span(done, len(audio))
                if a1 > a0:
                    container.mux(sound.encode(_audio_frame(audio[a0:a1], a0)))
                if progress:
                    progress(done, n)
            drawer.join()
            if failure:
                raise failure[0]
            container.mux(video.encode(None))
            container.mux(sound.encode(None))
    finally:
        stop.set()
    return RenderResult(frames=done, duration_s=len(speech) / rate,
                        elapsed_s=time.perf_counter() - started,
                        cpu_s=time.process_time() - cpu_started)


def _audio_span(k: int, total: int) -> int:
    """First 48 kHz sample of frame k's audio (clamped to the speech)."""
    return min(k * (AUDIO_RATE // FPS), total)


def _audio_frame(samples: np.ndarray, first: int) -> av.AudioFrame:
    frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="fltp", layout="mono")
    frame.sample_rate = AUDIO_RATE
    frame.pts = first
    frame.time_base = Fraction(1, AUDIO_RATE)
    return frame


class ProgressBar:
    """A one-line text progress bar on stderr, redrawn in place on a terminal; elsewhere
    (a log file, CI) only the final line is written."""

    def __init__(self, label: str, stream: Any = None, width: int = 30) -> None:
        self.label, self.width = label, width
        self.stream = stream or sys.stderr
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())
        self.started = time.perf_counter()
        self._last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if done < total and (not self.live or now - self._last < 0.1):
            return
        self._last = now
        fill = int(self.width * done / max(total, 1))
        speed = done / FPS / max(now - self.started, 1e-9)
        self.stream.write(
            f"\r{self.label} [{'#' * fill}{'.' * (self.width - fill)}] "
            f"{done}/{total} frames, {speed:.1f}x real time"
        )
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()


# --- engine-only speed ---------------------------------------------------------------------


def speech_like(seconds: float, seed: int = 0) -> np.ndarray:
    """Synthetic 16 kHz speech stand-in (voiced syllables with formants, hisses, pauses):
    exercises every part of the engine like real speech does, without espeak-ng."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SAMPLE_RATE)
    out = np.zeros(n, np.float32)
    i = 0
    while i < n:
        length = int(rng.uniform(0.08, 0.3) * SAMPLE_RATE)
        kind = rng.choice(["vowel", "vowel", "vowel", "hiss", "pause"])
        t = np.arange(length) / SAMPLE_RATE
        if kind == "vowel":
            f0, f1, f2 = rng.uniform(100, 220), rng.uniform(300, 750), rng.uniform(900, 2500)
            wave = sum(np.sin(2 * np.pi * h * f0 * t) / h *
                       (1 + 3 * np.exp(-((h * f0 - f1) / 150) ** 2) +
                        2 * np.exp(-((h * f0 - f2) / 200) ** 2)) for h in range(1, 30))
            seg = 0.1 * wave * np.hanning(length)
        elif kind == "hiss":
            seg = 0.03 * rng.standard_normal(length) * np.hanning(length)
        else:
            seg = np.zeros(length)
        seg = seg[: n - i]
        out[i : i + len(seg)] = seg
        i += len(seg)
    return out


def measure_render_speed(
    avatar: Avatar,
    seconds: float = 10.0,
    threads: int = 1,
    engine: Engine | None = None,
    speech: np.ndarray | None = None,
) -> dict[str, float]:
    """Draw ``seconds`` of speech-driven frames with OpenCV limited to ``threads`` threads.

    Returns ms per frame (mean, median, p95, max; wall clock) and the thread's CPU ms per
    frame (less disturbed by other processes on a shared machine), frames per second and
    how many real-time streams that is. The engine defaults to warp. OpenCV's thread count
    is process-wide: it is set for the run and restored after, so run this on its own.
    """
    if engine is None:
        from avatar_stream.engines.warp.engine import WarpEngine

        engine = WarpEngine()
    x = speech_like(seconds) if speech is None else np.asarray(speech, np.float32)
    n = len(x) // SAMPLES_PER_FRAME
    previous = cv2.getNumThreads()
    cv2.setNumThreads(threads)
    try:
        stream = engine.open_stream(avatar, seed=0)
        for k in range(min(10, n)):  # warm caches
            stream.step(x[k * SAMPLES_PER_FRAME : (k + 1) * SAMPLES_PER_FRAME])
        stream = engine.open_stream(avatar, seed=0)
        wall, cpu = [], []
        for k in range(n):
            chunk = x[k * SAMPLES_PER_FRAME : (k + 1) * SAMPLES_PER_FRAME]
            t, c = time.perf_counter(), time.thread_time()
            stream.step(chunk)
            cpu.append(time.thread_time() - c)
            wall.append(time.perf_counter() - t)
        stream.close()
    finally:
        cv2.setNumThreads(previous)
    ms = np.array(wall) * 1e3
    mean = float(ms.mean())
    return {
        "engine": engine.name,  # type: ignore[dict-item]
        "threads": threads,
        "frames": n,
        "ms_per_frame": round(mean, 3),
        "ms_p50": round(float(np.percentile(ms, 50)), 3),
        "ms_p95": round(float(np.percentile(ms, 95)), 3),
        "ms_max": round(float(ms.max()), 3),
        "cpu_ms_per_frame": round(float(np.mean(cpu)) * 1e3, 3),
        "fps": round(1e3 / mean, 1),
        "realtime_streams": round(1e3 / mean / FPS, 1),
    }


# --- command line ----------------------------------------------------------------------------


def add_parser(sub: Any) -> None:
    """``avatar-stream render --avatar IMG --audio SPEECH -o out.webm``."""
    p = sub.add_parser("render", help="render a talking-head video file from a photo and speech "
                       "(offline, faster than real time)")
    p.add_argument("--avatar", metavar="IMAGE",
                   help="reference photo with one clear face (default: the bundled portrait)")
    p.add_argument("--audio", metavar="SPEECH", required=True,
                   help="speech file (wav, mp3, ogg, ... anything FFmpeg reads)")
    p.add_argument("-o", "--output", metavar="OUT", required=True,
                   help="video file to write: .webm (VP8 + Opus) or .mp4 (H.264 + AAC)")
    p.add_argument("--engine", default="warp", choices=ENGINES,
                   help="animation engine (default warp, CPU)")
    p.add_argument("--seed", type=int, default=0, help="seed of the idle motion (blinks, drift)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_flashhead_options(p)


def main(args: Any) -> int:
    from avatar_stream.avatars.photo import reference_image
    from avatar_stream.engines import AvatarError
    from avatar_stream.engines.base import EngineError, EngineUnavailable
    from avatar_stream.engines.flashhead.config import engine_options
    from avatar_stream.engines.registry import create_engine

    fmt = Path(args.output).suffix.lstrip(".").lower()
    if fmt not in FORMATS:
        print(f"avatar-stream: {args.output}: use a .webm or .mp4 file name", file=sys.stderr)
        return 2
    try:
        speech, rate = load_speech(args.audio)
        engine = create_engine(args.engine, **engine_options(args))
        avatar = engine.prepare(reference_image(args.avatar), "render")
        bar = None if args.quiet else ProgressBar(f"rendering {Path(args.output).name}")
        result = render_clip(engine, avatar, speech, rate, args.output, fmt, progress=bar,
                             seed=args.seed)
    except (AvatarError, SpeechError, EngineError, EngineUnavailable) as exc:
        print(f"avatar-stream: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"avatar-stream: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}: {result.frames} frames, {result.duration_s:.2f} s of speech, "
          f"rendered in {result.elapsed_s:.1f} s ({result.realtime_factor:.1f}x real time)")
    return 0
