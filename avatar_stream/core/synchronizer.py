"""The synchronizer: the one place that owns a session's audio/video timing.

Two tasks share one media clock:

- the producer asks the engine (on the worker) for the next step's frames, feeding it the
  speech those frames are made from, and pairs each frame with its 40 ms of audio. It
  makes idle frames only just before they are due, so speech that arrives is never queued
  behind idle frames it could have replaced;
- the pacer wakes every 20 ms on the clock and hands the media sink what is due: on even
  ticks a video frame and the first 20 ms of its audio, on odd ticks the second 20 ms. A
  frame and its audio therefore leave together, numbered on one clock.

Speech is never skipped: when a frame is late the clock slips instead, and the next
utterance starts with that much more speech held back (a playout delay that adapts to how
late frames come on this machine, and shrinks again while none are). Barge-in drops
everything queued, fades out the audio half-frame still to go over 5 ms, and resets the
engine stream; the next tick goes out silent on time, never waiting for the reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from avatar_stream import events
from avatar_stream.audio.resample import Resampler, float_to_s16
from avatar_stream.core.clock import MediaClock
from avatar_stream.core.sink import MediaSink
from avatar_stream.core.speechqueue import Segment, SpeechQueue, split_segments
from avatar_stream.core.worker import EngineWorker
from avatar_stream.engines.base import EngineStream
from avatar_stream.events import Event
from avatar_stream.media import FPS, OUT_RATE, SAMPLE_RATE, SAMPLES_PER_FRAME

OUT_SAMPLES_PER_FRAME = OUT_RATE // FPS  # 1920: two 20 ms audio frames per video frame
OUT_HALF = OUT_SAMPLES_PER_FRAME // 2
FADE_OUT = OUT_RATE * 5 // 1000  # barge-in fade: 5 ms
# live speech held back at an utterance's start, so that its later frames are made before
# their deadlines despite arrival and scheduling jitter; grows by what a late speech
# frame waited, shrinks by a quarter at each utterance that starts (a playout delay,
# adapted: from the most to 10 ms in eight utterances without a late frame)
RESERVE_MAX_S = 0.1
# how far the pacer may run behind its clock while no frame comes (two frames: what the
# video track's queue holds); beyond that the clock slips
MAX_BEHIND_S = 2 / FPS
RESERVE_DECAY = 0.75



@dataclass
class OutputFrame:
    """A frame ready to go, with the audio it was made from (48 kHz s16)."""

    video: Any  # the sink's frame (MediaSink.video_frame)
    audio: np.ndarray  # (1920,) int16
    segments: list[Segment] = field(default_factory=list)

    @property
    def speaking(self) -> bool:
        return any(s.count for s in self.segments)


@dataclass
class SyncStats:
    frames_generated: int = 0
    frames_sent: int = 0
    frames_dropped: int = 0  # made, then dropped by a barge-in
    underruns: int = 0  # a frame was not ready at its deadline
    fillers: int = 0  # the previous picture sent again because nothing came
    step_time_s: float = 0.0  # smoothed engine step time
    interrupts: int = 0
    speech_gaps: int = 0  # a step had to start before all its speech came: silence put first
    # frames the outgoing queues dropped because the encoder fell that far behind
    video_encoder_drops: int = 0
    audio_encoder_drops: int = 0


class Synchronizer:
    def __init__(
        self,
        stream: EngineStream,
        worker: EngineWorker,
        speech: SpeechQueue,
        sink: MediaSink[Any],
        emit: Callable[[Event], None],
        *,
        lead_frames: int = 2,
        late_wait_s: float = 0.06,
        on_step: Callable[[float], None] | None = None,
    ) -> None:
        self.stream = stream
        self.worker = worker
        self.speech = speech
        self.sink = sink
        self.emit = emit
        self.on_step = on_step
        self.frames_per_step = stream.frames_per_step
        self.idle_frames = stream.idle_frames_per_step or stream.frames_per_step
        self.lead_frames = lead_frames
        self.late_wait_s = late_wait_s
        self.clock = MediaClock(FPS)
        self.stats = SyncStats()
        self._out: deque[OutputFrame] = deque()
        self._released = 0  # video frames released so far = index of the next one
        self._pending_half: np.ndarray | None = None  # second 20 ms of the current frame
        self._last_video: Any = None
        self._upsampler = Resampler(OUT_RATE)
        self._audio_fifo = np.zeros(0, dtype=np.float32)
        self._epoch = 0
        self._reset_pending = False
        self._cut = False  # a barge-in came, no frame made since: no speech to wait for
        # one event wakes the producer: the speech queue sets it on every push, end and
        # clear (so new speech, and a barge-in, wake it), the pacer when a frame leaves
        self._wake_producer = speech.changed
        self._produced = asyncio.Event()
        self._started: dict[str, int] = {}  # utterance -> 16 kHz samples played so far
        # how long steps take to come back, speech and idle apart (a chunked engine's idle
        # is cheap)
        self._speech_rt = RoundTrip(stream.step_time_hint_s)
        self._idle_rt = RoundTrip()
        self._in_utterance = False  # speech steps are under way: no new playout delay
        self.reserve_s = 0.0
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        if self._tasks:
            return
        self.clock.start()
        self._tasks = [
            asyncio.create_task(self._produce(), name="producer"),
            asyncio.create_task(self._pace(), name="pacer"),
        ]

    @property
    def running(self) -> bool:
        return bool(self._tasks)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        self._out.clear()
        self._audio_fifo = np.zeros(0, dtype=np.float32)

    @property
    def speaking(self) -> bool:
        return bool(self._started)

    # -- barge-in --------------------------------------------------------------------

    def interrupt(self) -> list[str]:
        """Drop queued speech and frames, fade out, go idle; returns the utterances cut."""
        self.stats.interrupts += 1
        self._epoch += 1
        self._reset_pending = True
        self._cut = True
        self._in_utterance = False
        cut = list(self._started)
        for item in self._out:
            cut += [s.utterance_id for s in item.segments if s.count]
        cut += self.speech.clear()
        self.stats.frames_dropped += len(self._out)
        self._out.clear()
        if self._pending_half is not None:  # a short fade, so the cut does not click
            fade = np.zeros(len(self._pending_half), np.float32)
            fade[:FADE_OUT] = np.linspace(1.0, 0.0, FADE_OUT, dtype=np.float32)
            self._pending_half = (self._pending_half * fade).astype(np.int16)
        self._upsampler = Resampler(OUT_RATE)
        self._audio_fifo = np.zeros(0, dtype=np.float32)
        cut = list(dict.fromkeys(cut))
        for uid in cut:
            played = self._started.pop(uid, 0)
            self.emit(events.speech_finished(uid, played / SAMPLE_RATE, interrupted=True))
        return cut  # speech.clear() above has woken the producer

    # -- producer --------------------------------------------------------------------

    def _margin(self, speech: bool) -> float:
        """How long before its first frame's deadline a step must start."""
        return 0.005 + (self._speech_rt if speech else self._idle_rt).lead

    @property
    def max_queued(self) -> int:
        """Frames that may wait made-but-unsent: a speech step, what plays out while the
        next one runs (so a chunked engine starts it in time), and a little lead for
        speech that arrives ahead of playout."""
        return self.frames_per_step + math.ceil(self._margin(True) * FPS) + self.lead_frames

    async def _wait_producer(self, until: float | None) -> None:
        """Until something changes or the clock reaches ``until``: a timer that sets the
        same event (the producer looks at everything again either way), so a wait costs
        no task, 50 times a second per session."""
        wake = self._wake_producer
        wake.clear()
        timer = None
        if until is not None:
            delay = max(0.0, until - self.clock.now())
            timer = asyncio.get_running_loop().call_later(delay, wake.set)
        try:
            await wake.wait()
        finally:
            if timer is not None:
                timer.cancel()

    async def _produce(self) -> None:
        need = self.frames_per_step * SAMPLES_PER_FRAME
        while True:
            if len(self._out) + self.frames_per_step > self.max_queued:
                await self._wait_producer(None)
                continue
            first = self.clock.deadline(self._released + len(self._out))
            speech_by, idle_by = first - self._margin(True), first - self._margin(False)
            available, more = self.speech.available, self.speech.waiting_for_more
            # the first step of live speech waits for the engine's playout delay on top
            delay = self.stream.playout_delay_s + self.reserve_s
            hold = 0 if self._in_utterance else int(delay * SAMPLE_RATE)
            # a shortfall of up to one idle step's audio is padded; more waits, idling
            short = need - available <= self.idle_frames * SAMPLES_PER_FRAME
            paddable = available > 0 and hold == 0 and short
            now = self.clock.now()
            if available >= need + hold or (available and not more):
                samples, segments = self.speech.take(need)  # a full step, or the last of one
            elif paddable and now >= speech_by:
                self.stats.speech_gaps += 1  # silence first keeps what follows contiguous
                samples, segments = self.speech.take(need, pad_front=True)
            elif now >= idle_by:
                await self._step(None, self.speech.take(0)[1])
                continue
            else:
                await self._wait_producer(speech_by if paddable else idle_by)
                continue
            await self._step(samples, segments)

    async def _step(self, speech: np.ndarray | None, segments: list[Segment]) -> None:
        epoch = self._epoch
        if self._reset_pending:
            self._reset_pending = False
            await self.worker.run(self.stream.reset)
        # an idle step that needs no device must not queue behind other sessions' steps
        on_device = speech is not None or self.stream.idle_uses_device
        asked = self.clock.now()
        frames, elapsed = await self.worker.run(self._render, speech, on_device=on_device)
        round_trip = self.clock.now() - asked
        st = self.stats
        st.step_time_s = elapsed if not st.step_time_s else 0.9 * st.step_time_s + 0.1 * elapsed
        if speech is not None:
            self._speech_rt.add(round_trip)
            if not self._in_utterance:
                self.reserve_s *= RESERVE_DECAY
            self._in_utterance = True
        else:
            self._idle_rt.add(round_trip)
            self._in_utterance = self._in_utterance and self.speech.waiting_for_more
        st.frames_generated += len(frames)
        if self.on_step:
            self.on_step(elapsed)
        if epoch != self._epoch:  # a barge-in came while the step ran
            st.frames_dropped += len(frames)
            return
        n = len(frames)
        pcm = speech if speech is not None else np.zeros(n * SAMPLES_PER_FRAME, np.float32)
        audio = self._to_out_rate(pcm, n)
        per_frame = split_segments(segments, n, SAMPLES_PER_FRAME)
        for i, video in enumerate(frames):
            chunk = audio[i * OUT_SAMPLES_PER_FRAME : (i + 1) * OUT_SAMPLES_PER_FRAME]
            self._out.append(OutputFrame(video, float_to_s16(chunk), per_frame[i]))
        self._produced.set()

    def _render(self, speech: np.ndarray | None) -> list[Any]:
        """Worker thread: one engine step, converted to the sink's frames (the copies hold
        the GIL: better here than on the event loop)."""
        return [self.sink.video_frame(f) for f in self.stream.step(speech)]

    def _to_out_rate(self, pcm16k: np.ndarray, frames: int) -> np.ndarray:
        """16 kHz -> 48 kHz, streaming, exactly 1920 samples per frame out."""
        self._audio_fifo = np.concatenate([self._audio_fifo, self._upsampler(pcm16k, SAMPLE_RATE)])
        want = frames * OUT_SAMPLES_PER_FRAME
        if len(self._audio_fifo) < want:  # only at the start: the resampler's own delay
            pad = np.zeros(want - len(self._audio_fifo), np.float32)
            self._audio_fifo = np.concatenate([pad, self._audio_fifo])
        out, self._audio_fifo = self._audio_fifo[:want], self._audio_fifo[want:]
        return out

    # -- pacer -----------------------------------------------------------------------

    async def _pace(self) -> None:
        tick = 0  # 20 ms audio ticks; video frame k goes out on tick 2k
        while True:
            await self.clock.wait(tick / 2)
            if tick % 2 == 0:
                await self._release_frame()
            else:
                half = self._pending_half
                self._pending_half = None
                self._send_audio(half if half is not None else np.zeros(OUT_HALF, np.int16), tick)
            tick += 1

    async def _release_frame(self) -> None:
        item = self._out.popleft() if self._out else None
        if item is None and not self._cut:  # (after a barge-in there is no speech to
            self.stats.underruns += 1       # keep contiguous: go silent on time)
            item = await self._wait_for_frame()
        if item is not None:
            self._cut = False
        self._wake_producer.set()
        if item is None:  # nothing came in time: show the last picture again, silent
            self.stats.fillers += 1
            item = OutputFrame(self.sink.repeat(self._last_video),
                               np.zeros(OUT_SAMPLES_PER_FRAME, np.int16))
        k = self._released
        self._released += 1
        self.sink.send_video(item.video, k)
        self.stats.video_encoder_drops = self.sink.dropped[0]
        self._last_video = item.video
        self.stats.frames_sent += 1
        self._send_audio(item.audio[:OUT_HALF], 2 * k)
        self._pending_half = item.audio[OUT_HALF:]
        self._playout_events(item.segments)

    async def _wait_for_frame(self) -> OutputFrame | None:
        """A frame is late: wait a little for it, and move the clock by what we waited."""
        t = self.clock.now()
        self._produced.clear()
        # not asyncio.wait_for: on Python 3.11 it swallows a cancel that lands as the event
        # is set, and the pacer then outlives stop() (seen as sessions that never finish
        # closing under churn)
        produced = asyncio.ensure_future(self._produced.wait())
        try:
            await asyncio.wait({produced}, timeout=self.late_wait_s)
        finally:
            produced.cancel()
        if not self._out:
            # a filler goes out late by the wait: the pacer may fall behind its clock by
            # what the video queue holds, no more, else after a long stall (an engine
            # slower than real time) the frames that finally come leave in a burst that
            # the outgoing queues drop
            behind = self.clock.now() - self.clock.deadline(self._released + 1)
            self.clock.slip(behind - MAX_BEHIND_S)
            return None
        waited = self.clock.now() - t
        self.clock.slip(waited)
        item = self._out.popleft()
        if item.speaking:
            self.reserve_s = min(RESERVE_MAX_S, self.reserve_s + waited)
        return item

    def _send_audio(self, samples: np.ndarray, tick: int) -> None:
        self.sink.send_audio(samples, tick * OUT_HALF)
        self.stats.audio_encoder_drops = self.sink.dropped[1]

    def _playout_events(self, segments: list[Segment]) -> None:
        for s in segments:
            if s.count and s.utterance_id not in self._started:
                self._started[s.utterance_id] = 0
                self.emit(events.speech_started(s.utterance_id))
            if s.utterance_id in self._started:
                self._started[s.utterance_id] += s.count
            if s.end:
                played = self._started.pop(s.utterance_id, 0)
                self.emit(events.speech_finished(s.utterance_id, played / SAMPLE_RATE,
                                                 interrupted=False))


class RoundTrip:
    """How long a step takes from asking to having its frames, queueing on the worker and
    on the event loop included: a smoothed mean and mean deviation (RFC 6298's estimator;
    the first sample counts as mean with a quarter of it as deviation). A step must start
    ``lead`` before its frames are due: under load the tail, not the mean, makes a frame
    late."""

    def __init__(self, initial_s: float = 0.0) -> None:
        self.mean = initial_s
        self.dev = initial_s / 4

    def add(self, sample: float) -> None:
        if not self.mean:
            self.mean, self.dev = sample, sample / 4
            return
        self.dev = 0.75 * self.dev + 0.25 * abs(sample - self.mean)
        self.mean = 0.875 * self.mean + 0.125 * sample

    @property
    def lead(self) -> float:
        return self.mean + 4 * self.dev
