"""The FlashHead engine: upstream's SoulX-FlashHead pipeline, streamed per session on one GPU.

One ``FlashHeadPipeline`` is loaded per GPU and shared by every session. Upstream keeps a
single stream's state on the pipeline object (the person, its reference latent, the motion
latents that carry one chunk into the next, the noise generator), so each step restores
the session's state onto the pipeline (with its own state of the global RNG, which Lite's
LTX VAE samples from), generates, and takes the state back: interleaved sessions give
exactly the frames each would give alone. How upstream is called (its prints, device syncs,
imports, compiled graphs) is in ``flashhead_upstream``. The worker runs all steps on one
thread (``worker_threads = 1``); a lock keeps ``prepare`` and ``warm_up`` (which run on
other threads at start-up) from interleaving with them.

Per session, the Temporal Audio Context Cache works the way upstream streams: an 8 s
window of 16 kHz speech that starts as silence; each step appends one slice, embeds the
whole window with wav2vec2, takes the last 33 feature frames each with its +-2 neighbours
(``[1, 33, 5, layers, dim]``), generates 33 frames and keeps the new ones (see
``flashhead_config.Schedule`` for the two schedules).

Idle costs no GPU: every avatar gets a loop of frames generated on silence when it is
prepared, played forwards and backwards. Speech after idle continues from the frames that
were shown (they are encoded as the motion latents), and idle after speech cross-fades from
the last speech frame into the loop frame nearest to it.
"""

from __future__ import annotations

import itertools
import logging
import statistics
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from avatar_stream.engines.base import (
    FPS,
    FRAME_SIZE,
    SAMPLE_RATE,
    SAMPLES_PER_FRAME,
    Avatar,
    AvatarError,
    Engine,
    EngineError,
    EngineStream,
    EngineUnavailable,
)
from avatar_stream.engines.flashhead.config import (
    COLOR_CORRECTION,
    CONTEXT_NEIGHBOURS,
    DEFAULT_SEED,
    FRAME_NUM,
    SAMPLE_SHIFT,
    SAMPLING_STEPS,
    WINDOW_SAMPLES,
    FlashHeadOptions,
    Schedule,
    missing_checkpoint_files,
    missing_wav2vec_files,
)
from avatar_stream.engines.flashhead.upstream import (
    DeviceRng,
    compiled_graphs,
    import_upstream,
    upstream_call,
)
from avatar_stream.scale.capacity import cores

log = logging.getLogger(__name__)

#: what upstream's prepare_params keeps per person (file stem -> image, tensor, latent)
PERSON_TABLES = ("cond_image_dict", "cond_image_tensor_dict", "ref_img_latent_dict")
_PERSON_NUMBERS = itertools.count()
IDLE_CHUNKS = 3  # idle loop length: 3 throughput chunks (Lite 72 frames, 2.9 s)
FADE_FRAMES = 8  # speech -> idle cross-fade, 0.32 s
JITTER_S = 0.1  # live speech: margin for network and step-time jitter
WARMUP_STEPS = 2  # torch.compile compiles on the first calls
MEASURE_STEPS = 3


def load_pipeline(options: FlashHeadOptions) -> Any:
    """Upstream's FlashHeadPipeline (or the test-only stand-in for ``--checkpoint-dir standin``).

    upstream's ``inference.py`` reads a config file relative to the working directory at
    import, so the pipeline class is used directly, with upstream's inference settings.
    """
    if options.standin:
        from avatar_stream.engines.flashhead.standin import StandinFlashHeadPipeline

        device = options.device
        if device.startswith("cuda") and not torch.cuda.is_available():
            device = "cpu"
        return StandinFlashHeadPipeline(options.checkpoint_dir or "", options.model,
                                        options.wav2vec_dir, device=device)
    missing = missing_checkpoint_files(options.model, options.checkpoint_dir)
    missing += missing_wav2vec_files(options.wav2vec_dir)
    if missing:
        raise FileNotFoundError("FlashHead weights not found: " + "; ".join(missing))
    upstream = import_upstream(options.upstream_dir)
    if torch.device(options.device).type == "cpu":
        # steps on the CPU (tests, tiny models): one thread per core this process may use
        # (never the host's count: oversubscribed, each step ran many times slower), less
        # one for the event loop that paces every session's media
        torch.set_num_threads(max(1, cores() - 1))
    for switch in ("COMPILE_MODEL", "COMPILE_VAE"):  # module switches read by __init__
        if hasattr(upstream, switch):
            setattr(upstream, switch, options.compile)
    with upstream_call():
        return upstream.FlashHeadPipeline(
            checkpoint_dir=options.checkpoint_dir,
            model_type=options.model,
            wav2vec_dir=options.wav2vec_dir,
            device=options.device,
        )


# -- tensor helpers ----------------------------------------------------------------------


def audio_context(features: torch.Tensor, frames: int = FRAME_NUM,
                  neighbours: int = CONTEXT_NEIGHBOURS) -> torch.Tensor:
    """The last ``frames`` feature frames, each with its +-``neighbours`` (indices clamped to
    the window): ``[n, layers, dim]`` -> ``[1, frames, 2 * neighbours + 1, layers, dim]``."""
    n = features.shape[0]
    centre = torch.arange(n - frames, n, device=features.device)
    offsets = torch.arange(-neighbours, neighbours + 1, device=features.device)
    index = (centre[:, None] + offsets[None, :]).clamp(0, n - 1)
    return features[index][None].contiguous()


def model_input(window: np.ndarray, schedule: Schedule) -> np.ndarray:
    """The audio a step embeds: upstream's 8 s window, ending at the newest speech. With
    lookahead (low-latency), its last ``lookahead`` frames are silence and the window
    starts that much later: wav2vec's normalisation and attention always see 8 s, as with
    upstream, never more."""
    pad = schedule.lookahead_frames * SAMPLES_PER_FRAME
    if not pad:
        return window
    return np.concatenate([window[pad:], np.zeros(pad, np.float32)])


def to_uint8_frames(video: torch.Tensor, keep: slice) -> np.ndarray:
    """Generated frames ``[3, T, H, W]`` in [-1, 1] -> uint8 RGB ``(k, H, W, 3)``, converted on
    the device so only bytes cross to the host."""
    x = video[:, keep].permute(1, 2, 3, 0)
    x = ((x.float() + 1.0) * 127.5).clamp_(0, 255).round_().to(torch.uint8)
    return x.cpu().numpy()


def from_uint8_frames(frames: np.ndarray, device: Any, dtype: torch.dtype) -> torch.Tensor:
    """uint8 RGB ``(k, H, W, 3)`` -> a VAE input ``[1, 3, k, H, W]`` in [-1, 1], contiguous
    (torch.compile guards on strides: a permuted view would compile a graph of its own)."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).to(device)
    x = x.permute(3, 0, 1, 2)[None].to(dtype)
    return (x / 127.5 - 1.0).contiguous()


# -- idle --------------------------------------------------------------------------------


class IdleLoop:
    """An avatar's idle frames, played forwards then backwards so the loop has no seam."""

    THUMB = 24

    def __init__(self, frames: np.ndarray) -> None:
        self.frames = frames
        n = len(frames)
        self.order = np.concatenate([np.arange(n), np.arange(n - 2, 0, -1)]).astype(int)
        self._thumbs = np.stack([self._thumb(f) for f in frames])

    def _thumb(self, frame: np.ndarray) -> np.ndarray:
        small = cv2.resize(frame, (self.THUMB, self.THUMB), interpolation=cv2.INTER_AREA)
        return small.astype(np.float32).reshape(-1)

    def nearest(self, frame: np.ndarray) -> int:
        """Position in ``order`` of the loop frame that looks most like ``frame``."""
        d = np.square(self._thumbs - self._thumb(frame)).sum(axis=1)
        return int(np.argmin(d))  # the forward pass holds every frame, at its own index


class _IdleCursor:
    """One session's place in its avatar's idle loop, and the cross-fade into it."""

    def __init__(self, loop: IdleLoop) -> None:
        self.loop = loop
        self.pos = 0
        self._fade_from: np.ndarray | None = None
        self._fade_i = 0

    def enter_from(self, frame: np.ndarray) -> None:
        """Idle resumes after ``frame`` (speech): start at the nearest loop frame, fading in."""
        self.pos = self.loop.nearest(frame)
        self._fade_from = frame.astype(np.float32)
        self._fade_i = 0

    def next(self, n: int) -> np.ndarray:
        out = []
        for _ in range(n):
            frame = self.loop.frames[self.loop.order[self.pos % len(self.loop.order)]]
            self.pos += 1
            if self._fade_from is not None:
                self._fade_i += 1
                a = self._fade_i / (FADE_FRAMES + 1)
                frame = (self._fade_from * (1 - a) + frame * a + 0.5).astype(np.uint8)
                if self._fade_i >= FADE_FRAMES:
                    self._fade_from = None
            out.append(frame)
        return np.stack(out)


# -- per-session pipeline state ---------------------------------------------------------


@dataclass
class PipelineState:
    """What upstream keeps on the pipeline for one stream, swapped in and out per step, and
    the session's own state of the global RNG that upstream's LTX VAE samples from."""

    person: str
    generator: torch.Generator
    rng: DeviceRng
    motion: torch.Tensor | None = None  # latent_motion_frames; None: fresh from the reference


@dataclass
class _Person:
    """A prepared avatar, as the engine knows it: upstream's person name and the idle loop."""

    person: str
    idle: IdleLoop


class FlashHeadStream(EngineStream):
    """One session: its audio window, its pipeline state, its place in the idle loop."""

    idle_frames_per_step = 1
    idle_uses_device = False

    def __init__(self, engine: FlashHeadEngine, person: _Person, seed: int) -> None:
        self._engine = engine
        self.schedule = engine.schedule
        self.frames_per_step = self.schedule.frames_per_step
        self.playout_delay_s = engine.playout_delay_s()
        self.step_time_hint_s = engine.step_s or 0.0
        self.state = engine.new_state(person.person, seed)
        self._window = np.zeros(WINDOW_SAMPLES, np.float32)
        self._pending_silence = 0  # idle samples not yet shifted into the window
        self._idle = _IdleCursor(person.idle)
        self._recent: deque[np.ndarray] = deque(maxlen=self.schedule.motion_frames)
        self._idle_shown = False  # idle frames went out since the last speech step
        self.speech_steps = 0
        self.idle_frames = 0

    @property
    def window(self) -> np.ndarray:
        """The 8 s audio context as the next speech step will see it (a copy)."""
        self._flush_silence()
        return self._window.copy()

    def _append(self, samples: np.ndarray) -> None:
        n = len(samples)
        if n >= WINDOW_SAMPLES:
            self._window[:] = samples[-WINDOW_SAMPLES:]
        elif n:
            self._window[:-n] = self._window[n:]
            self._window[-n:] = samples

    def _flush_silence(self) -> None:
        if self._pending_silence:
            n = min(self._pending_silence, WINDOW_SAMPLES)
            self._append(np.zeros(n, np.float32))
            self._pending_silence = 0

    def step(self, speech: np.ndarray | None) -> np.ndarray:
        if speech is None:
            frames = self._idle.next(self.idle_frames_per_step)
            self._pending_silence += len(frames) * SAMPLES_PER_FRAME
            self._idle_shown = True
            self.idle_frames += len(frames)
            self._recent.extend(frames)
            return frames
        x = np.asarray(speech, dtype=np.float32).reshape(-1)
        if x.size != self.schedule.samples_per_step:
            raise ValueError(f"expected {self.schedule.samples_per_step} samples, got {x.size}")
        self._flush_silence()
        self._append(x)
        # after idle, the model continues from the frames that were shown, not from where
        # its last speech chunk ended
        shown = self._shown_frames() if self._idle_shown else None
        frames = self._engine.speech_step(self.state, self._window, shown)
        self._idle_shown = False
        self.speech_steps += 1
        self._recent.extend(frames)
        self._idle.enter_from(frames[-1])
        return frames

    def _shown_frames(self) -> np.ndarray | None:
        """The last ``motion_frames`` frames returned (the first repeated if fewer)."""
        if not self._recent:
            return None
        recent = list(self._recent)
        pad = [recent[0]] * (self.schedule.motion_frames - len(recent))
        return np.stack(pad + recent)

    def reset(self) -> None:
        """Barge-in: the audio context goes back to silence; the picture fades into idle from
        the last frame made, and the next speech continues from what was shown."""
        self._window[:] = 0
        self._pending_silence = 0
        self._idle_shown = True

    def close(self) -> None:
        self.state.motion = None
        self._recent.clear()


class FlashHeadEngine(Engine):
    """SoulX-FlashHead, loaded once, steps for every session on one thread."""

    name = "flashhead"
    worker_threads = 1
    # upstream's model takes only speech and a reference image: no input for a pose or an
    # expression, so listening and thinking are reported (events, stats), never shown
    shows_states: frozenset[str] = frozenset()

    def __init__(
        self,
        model: str = "lite",
        checkpoint_dir: str | None = None,
        wav2vec_dir: str | None = None,
        schedule: str = "throughput",
        low_latency_frames: int = 8,
        device: str = "cuda",
        compile: bool = True,
        seed: int = DEFAULT_SEED,
        upstream_dir: str | None = None,
        pipeline: Any = None,
    ) -> None:
        self.options = FlashHeadOptions(model, checkpoint_dir, wav2vec_dir, schedule,
                                        low_latency_frames, device, compile, seed, upstream_dir)
        self.schedule: Schedule = self.options.schedule_obj()
        self.pipeline = pipeline if pipeline is not None else load_pipeline(self.options)
        self.device = self.pipeline.device
        self._check_vae_stride()
        self.step_s: float | None = None
        self.warm_graphs: int | None = None  # graphs compiled when warm-up ended
        self.late_graphs = 0  # graphs compiled by steps since
        self._lock = threading.RLock()
        self._people: dict[str, _Person] = {}
        self._images = tempfile.TemporaryDirectory(prefix="avatar-stream-flashhead-")

    def _check_vae_stride(self) -> None:
        """The schedule's motion frames come from the model's VAE: (2 - 1) * temporal
        stride + 1 (upstream's formula, two motion latents). A checkpoint whose VAE says
        otherwise would make every chunk start in the wrong place: refuse it."""
        stride = getattr(getattr(self.pipeline, "config", None), "vae_stride", None)
        if stride and stride[0] + 1 != self.schedule.motion_frames:
            raise EngineUnavailable(
                f"the {self.options.model} checkpoint's VAE has a temporal stride of "
                f"{stride[0]}, but {self.options.model} streams with "
                f"{self.schedule.motion_frames} motion frames: is it the right --model?")

    # -- avatars ---------------------------------------------------------------------

    def prepare(self, image: np.ndarray, avatar_id: str) -> Avatar:
        """Write the 512x512 crop where upstream reads reference images, encode its latent
        (``prepare_params``) and make its idle loop."""
        from avatar_stream.avatars.facerig import get_rigger

        image = np.ascontiguousarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise AvatarError(f"expected an RGB uint8 image, got {image.shape} {image.dtype}")
        if image.shape[:2] != (FRAME_SIZE, FRAME_SIZE):
            from avatar_stream.avatars.photo import reference_image

            image = reference_image(image)
        face = get_rigger().rig(image)
        with self._lock:
            # upstream names people by file stem; unique in the process, as engines may
            # share one pipeline
            person = f"avatar{next(_PERSON_NUMBERS)}"
            path = Path(self._images.name) / f"{person}.png"
            cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
            self._add_person(path)
        # chunk by chunk, so sessions' steps interleave while an avatar is added at run time
        try:
            idle = self._make_idle_loop(person)
        except Exception as exc:
            with self._lock:
                self._remove_person(person)
            raise EngineError(f"the engine could not prepare this avatar's idle loop "
                              f"({exc.__class__.__name__}: {exc}); nothing else changed") from exc
        with self._lock:
            self._people[person] = _Person(person, idle)
        return Avatar(
            id=avatar_id,
            image=image,
            face_box=face.face_box,
            mouth_box=face.mouth_box,
            data=self._people[person],
            meta={"engine": self.name, "model": self.options.model,
                  "schedule": self.schedule.name, "frames_per_step": self.schedule.frames_per_step},
        )

    def _add_person(self, path: Path) -> None:
        """``prepare_params`` replaces the pipeline's per-person tables and resets its
        current person before it encodes: keep earlier people, and if it fails (a GPU out
        of memory), put the pipeline back as it was, so every other avatar and session
        goes on."""
        pipe = self.pipeline
        saved = dict(vars(pipe))
        try:
            # the reference latent is sampled from the global RNG: the same photo gives
            # the same latent whenever it is prepared
            with upstream_call(), DeviceRng(self.device, self.options.seed).active():
                pipe.prepare_params(
                    cond_image_path_or_dir=str(path),
                    target_size=(FRAME_SIZE, FRAME_SIZE),
                    frame_num=FRAME_NUM,
                    motion_frames_num=self.schedule.motion_frames,
                    sampling_steps=SAMPLING_STEPS,
                    seed=self.options.seed,
                    shift=SAMPLE_SHIFT,
                    color_correction_strength=COLOR_CORRECTION,
                    use_face_crop=False,
                )
        except Exception as exc:
            vars(pipe).clear()
            vars(pipe).update(saved)
            raise EngineError(f"the engine could not prepare this avatar "
                              f"({exc.__class__.__name__}: {exc}); nothing else changed") from exc
        for t in PERSON_TABLES:
            setattr(pipe, t, {**(saved.get(t) or {}), **getattr(pipe, t)})

    def _remove_person(self, person: str) -> None:
        for t in PERSON_TABLES:
            getattr(self.pipeline, t).pop(person, None)

    def _make_idle_loop(self, person: str) -> IdleLoop:
        state = self.new_state(person, self.options.seed)
        throughput = Schedule(self.options.model, "throughput")
        silence = np.zeros(WINDOW_SAMPLES, np.float32)
        chunks = [self._generate(state, silence, throughput, None) for _ in range(IDLE_CHUNKS)]
        return IdleLoop(np.concatenate(chunks))

    def open_stream(self, avatar: Avatar, seed: int | None = None) -> FlashHeadStream:
        if not isinstance(avatar.data, _Person):
            raise ValueError(f"avatar {avatar.id!r} was not prepared by the flashhead engine")
        return FlashHeadStream(self, avatar.data, self.options.seed if seed is None else seed)

    # -- steps -----------------------------------------------------------------------

    def new_state(self, person: str, seed: int) -> PipelineState:
        return PipelineState(person, torch.Generator(device=self.device).manual_seed(seed),
                             DeviceRng(self.device, seed + 1))

    def speech_step(self, state: PipelineState, window: np.ndarray,
                    shown: np.ndarray | None) -> np.ndarray:
        """One step of this engine's schedule for one session (worker thread)."""
        frames = self._generate(state, window, self.schedule, shown)
        self.check_compiles()
        return frames

    @torch.no_grad()
    def _generate(self, state: PipelineState, window: np.ndarray, schedule: Schedule,
                  shown: np.ndarray | None) -> np.ndarray:
        with self._lock, upstream_call(), state.rng.active():
            pipe = self.pipeline
            pipe.reset_person_name(state.person)  # person, colour reference, reference latent
            if state.motion is not None:
                pipe.latent_motion_frames = state.motion
            pipe.generator = state.generator
            if shown is not None:
                pipe.latent_motion_frames = self._encode(
                    from_uint8_frames(shown, pipe.device, pipe.param_dtype))
            features = pipe.preprocess_audio(model_input(window, schedule),
                                             sr=SAMPLE_RATE, fps=FPS)
            video = pipe.generate(audio_context(features).to(pipe.device))
            if schedule.lookahead_frames:  # continue from the last frames kept, not the padding
                pipe.latent_motion_frames = self._encode(
                    video[None, :, schedule.next_motion].to(pipe.param_dtype))
            state.motion = pipe.latent_motion_frames
            return to_uint8_frames(video, schedule.keep)

    def _encode(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames ``[1, 3, k, H, W]`` -> motion latents, always handed over contiguous: one
        layout for both paths that encode here, so one compiled graph serves them."""
        return self.pipeline.vae.encode(frames.contiguous())

    # -- capacity --------------------------------------------------------------------

    def measure(self, schedule: Schedule | None = None, steps: int = MEASURE_STEPS,
                warmup: int = WARMUP_STEPS) -> float:
        """Seconds per speech step of ``schedule`` (median of ``steps``, after ``warmup``)."""
        schedule = schedule or self.schedule
        if not self._people:
            raise RuntimeError("prepare an avatar before measuring")
        person = next(iter(self._people))
        state = self.new_state(person, self.options.seed)
        window = np.zeros(WINDOW_SAMPLES, np.float32)
        voice = _test_voice(schedule.samples_per_step * (warmup + steps))
        times = []
        for i in range(warmup + steps):
            chunk = voice[i * schedule.samples_per_step : (i + 1) * schedule.samples_per_step]
            window = np.concatenate([window[len(chunk):], chunk])
            t = time.perf_counter()
            self._generate(state, window, schedule, None)
            times.append(time.perf_counter() - t)
        return statistics.median(times[warmup:])

    def measure_after_idle(self, idle_frames: int = FPS) -> float:
        """Seconds for the first speech step after idle frames were shown: it also encodes
        the shown frames as the motion latents."""
        stream = FlashHeadStream(self, next(iter(self._people.values())), self.options.seed)
        for _ in range(idle_frames):
            stream.step(None)
        t = time.perf_counter()
        stream.step(_test_voice(self.schedule.samples_per_step))
        return time.perf_counter() - t

    def _run_every_path(self) -> None:
        """Each path a session's steps take, once, so torch.compile compiles them all now:
        speech on a fresh stream (with low-latency, the lookahead's own encode), and
        speech after idle frames were shown (they are encoded as the motion latents; a
        barge-in takes the same path)."""
        n = self.schedule.samples_per_step
        stream = FlashHeadStream(self, next(iter(self._people.values())), self.options.seed)
        stream.step(_test_voice(n))
        for _ in range(self.schedule.motion_frames):
            stream.step(None)
        stream.step(_test_voice(n))
        stream.close()

    def warm_up(self) -> None:
        """Compile every path (upstream torch.compiles on the first calls) and measure the
        step time: admission lets in only as many sessions as the measured frame rate
        serves. From here on, a step that compiles a graph is logged and counted."""
        if not self._people:
            log.warning("flashhead: no avatar prepared; warm-up skipped, capacity unmeasured")
            return
        self._run_every_path()
        self.step_s = self.measure(warmup=0)
        self.step_fps = self.schedule.frames_per_step / self.step_s
        self.warm_graphs = compiled_graphs()
        log.info("flashhead %s %s: %.3f s a step, %.1f frames/s, %d real-time sessions; "
                 "%d graphs compiled", self.options.model, self.schedule.describe(),
                 self.step_s, self.step_fps, self.realtime_sessions or 0, self.warm_graphs)
        if not self.realtime_sessions:
            log.warning("flashhead: slower than real time (%.1f frames/s): one session is "
                        "admitted, and its speech plays in bursts, the picture held between "
                        "them", self.step_fps)

    def check_compiles(self) -> None:
        """After warm-up, a compile on the step path stalls every session: say so."""
        if self.warm_graphs is None:
            return
        graphs = compiled_graphs()
        if graphs > self.warm_graphs + self.late_graphs:
            new = graphs - self.warm_graphs - self.late_graphs
            self.late_graphs += new
            log.warning("flashhead: a step compiled %d new graph(s) after warm-up (a path "
                        "warm-up did not cover; every session waited for it)", new)

    def playout_delay_s(self) -> float:
        """Live speech: worst case, a session's step waits for every other session's step."""
        sessions = max(1, self.realtime_sessions or 1)
        return (sessions - 1) * (self.step_s or 0.0) + JITTER_S

    def close(self) -> None:
        with self._lock:
            self._people.clear()
            self.pipeline = None
            self._images.cleanup()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _test_voice(n: int) -> np.ndarray:
    """A vowel-like buzz: speech-shaped input for warm-up and measurement."""
    t = np.arange(n) / SAMPLE_RATE
    phase = 2 * np.pi * np.cumsum(120 + 15 * np.sin(2 * np.pi * 0.8 * t)) / SAMPLE_RATE
    voice = sum(np.sin(h * phase) / h for h in range(1, 10))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3.0 * t) ** 2  # syllables
    return (0.2 * voice * envelope / np.abs(voice).max()).astype(np.float32)
