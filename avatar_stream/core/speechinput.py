"""Speech into a session, every way it comes: pushed utterances (HTTP, WebSocket, data
channel) with the ids the front-end chose, and the microphone, cut into utterances by the
live gate. One path into the session's :class:`SpeechQueue` for all of them: a resampler
per utterance (flushed at its end), the queue's bound, and the utterance's state."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from avatar_stream.audio.decode import Pcm
from avatar_stream.audio.gate import LiveSpeechGate, loudness
from avatar_stream.audio.resample import Resampler
from avatar_stream.core.speechqueue import SpeechQueue, SpeechQueueFull
from avatar_stream.errors import SpeechError
from avatar_stream.media import SAMPLE_RATE

MAX_UTTERANCE_ID = 128
#: what the microphone (the session's incoming audio track) is: ``speak``, speech for the
#: avatar to say (the default: it speaks what it hears); ``listen``, the user's voice
#: (the avatar listens while the user speaks, and says nothing of it)
MICROPHONE_MODES = ("speak", "listen")


def check_microphone(value: object) -> str:
    if not isinstance(value, str) or value not in MICROPHONE_MODES:
        raise ValueError(f"microphone must be one of {', '.join(MICROPHONE_MODES)}; "
                         f"got {value!r}")
    return value


def check_utterance_id(value: object) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_UTTERANCE_ID or \
            not value.isprintable():
        raise SpeechError("bad_audio", f"utterance_id must be a printable string of 1 to "
                               f"{MAX_UTTERANCE_ID} characters")
    return value


# -- utterances into the queue -------------------------------------------------------------


@dataclass
class _Utterance:
    resampler: Resampler
    last_audio: float
    queued_samples: int = 0
    timer: asyncio.TimerHandle | None = None


class SpeechInput:
    """A session's speech in: pushed utterances (ids, one resampler per utterance, ends)
    and the microphone (``listen``: the live gate makes its utterances; or, in the
    ``listen`` microphone mode, tells ``on_voice`` when the user speaks and how loud).

    An utterance stays open (the avatar waits for more of it rather than going idle in
    the middle of a sentence) until its ``end`` comes, or until no audio has come for
    ``idle_end_s`` and its queued audio has all played: a front-end that forgets ``end``
    does not keep the avatar waiting. Audio that arrives later under the same id plays
    as a continuation. After an explicit end, or after a barge-in cut it, the id takes no
    more audio (409).
    """

    def __init__(
        self,
        queue: SpeechQueue,
        on_queued: Callable[[], None],
        idle_end_s: float = 1.0,
        quality: str = "HQ",
        on_voice: Callable[[bool, float], None] | None = None,
    ) -> None:
        self.queue = queue
        self.on_voice = on_voice
        self.microphone = "speak"  # one of MICROPHONE_MODES
        self.on_queued = on_queued
        self.idle_end_s = idle_end_s
        self.quality = quality
        self._open: dict[str, _Utterance] = {}
        self._closed: OrderedDict[str, str] = OrderedDict()  # id -> "ended" | "interrupted"
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()  # keeps a session's decoded pushes in arrival order
        self.gate = LiveSpeechGate()

    def new_id(self) -> str:
        return f"utt-{next(self._ids)}"

    # -- pushing -----------------------------------------------------------------------

    def open(self, utterance_id: str) -> None:
        """Hold the utterance's place in line before its audio comes (WebSocket ``start``)."""
        self._check_usable(utterance_id)
        if utterance_id not in self._open:
            self._open[utterance_id] = _Utterance(Resampler(SAMPLE_RATE, self.quality),
                                                  time.monotonic())
            self.queue.push(np.zeros(0, np.float32), utterance_id)
            self._watch(utterance_id)

    def push(self, pcm: Pcm, utterance_id: str, end: bool = False) -> float:
        """Queue decoded speech now (small chunks: WebSocket, data channel); returns the
        seconds queued. Raises SpeechError (409 closed utterance, 429 queue full)."""
        self._check_room(pcm, utterance_id)
        self.open(utterance_id)
        out = self._resample(self._open[utterance_id], pcm, end)
        return self._commit(utterance_id, out, end)

    async def push_async(self, pcm: Pcm, utterance_id: str, end: bool = False) -> float:
        """As ``push``, resampling on a thread (large HTTP bodies): the event loop keeps
        pacing every session's media meanwhile. Pushes to one session keep their order."""
        async with self._lock:
            self._check_room(pcm, utterance_id)
            self.open(utterance_id)
            utt = self._open[utterance_id]
            loop = asyncio.get_running_loop()
            out = await loop.run_in_executor(None, self._resample, utt, pcm, end)
            if self._open.get(utterance_id) is not utt:  # barge-in while we resampled
                raise SpeechError("utterance_closed", f"utterance {utterance_id!r} was interrupted")
            return self._commit(utterance_id, out, end)

    def touch(self, utterance_id: str) -> None:
        """The sender of an open utterance is still at it (its audio waits for room): the
        idle end counts from now."""
        utt = self._open.get(utterance_id)
        if utt is not None:
            utt.last_audio = time.monotonic()

    def end(self, utterance_id: str) -> bool:
        """No more audio for this utterance; False if it was not open."""
        utt = self._open.get(utterance_id)
        if utt is None:
            return False
        tail = utt.resampler.flush()
        if len(tail):
            with _suppress_full():
                self.queue.push(tail, utterance_id)
        self._finish(utterance_id, "ended")
        self.queue.end(utterance_id)
        self.on_queued()
        return True

    def listen(self, pcm: np.ndarray) -> None:
        """Microphone audio, 16 kHz mono as it comes: the live gate cuts it into utterances.
        A piece that does not fit the bounded queue is dropped (the microphone outran it);
        the next may fit. In ``listen`` mode the gate only says whether the user speaks."""
        if self.microphone == "listen":
            self.gate.feed(pcm, 0.0)  # nothing is queued: only its open utterance matters
            if self.gate.current is not None:
                self.on_queued()  # a user speaking is not an idle session
            if self.on_voice is not None:
                self.on_voice(self.gate.current is not None, loudness(pcm, self.gate))
            return
        for utterance, samples in self.gate.feed(pcm, self.queue.seconds):
            self.on_queued()
            if samples is None:
                self.queue.end(utterance)
                continue
            with contextlib.suppress(SpeechQueueFull):
                self.queue.push(samples, utterance)

    def interrupt(self) -> None:
        """Barge-in: every open utterance is cut; audio still arriving for it is refused,
        and the microphone's current utterance is dropped until the speaker pauses (in
        ``listen`` mode the user goes on being heard: a barge-in is usually theirs)."""
        if self.microphone == "speak":
            self.gate.cancel()
        for uid in list(self._open):
            self._finish(uid, "interrupted")

    def close(self) -> None:
        for utt in self._open.values():
            if utt.timer:
                utt.timer.cancel()
        self._open.clear()

    # -- internals ---------------------------------------------------------------------

    def _check_usable(self, utterance_id: str) -> None:
        state = self._closed.get(utterance_id)
        if state is not None:
            raise SpeechError("utterance_closed", f"utterance {utterance_id!r} was {state}; "
                                   "use a new utterance_id")

    def _check_room(self, pcm: Pcm, utterance_id: str) -> None:
        self._check_usable(utterance_id)
        # what the push becomes at 16 kHz, plus what a resampler may release from before
        need = math.ceil(len(pcm.samples) * SAMPLE_RATE / pcm.rate) + SAMPLE_RATE // 20
        room = self.queue.room
        if need > room:
            queued = self.queue.seconds
            over = (need - room) / SAMPLE_RATE
            raise SpeechError(
                "queue_full",
                f"speech queue full: {queued:.1f} s queued, at most "
                f"{self.queue.max_samples / SAMPLE_RATE:.0f} s; this push "
                f"({pcm.seconds:.1f} s) fits in about {over:.1f} s",
                retry_after=over,
            )

    def _resample(self, utt: _Utterance, pcm: Pcm, end: bool) -> np.ndarray:
        out = utt.resampler(pcm.samples, pcm.rate)
        if end:
            tail = utt.resampler.flush()
            if len(tail):
                out = np.concatenate([out, tail])
        return out

    def _commit(self, utterance_id: str, samples: np.ndarray, end: bool) -> float:
        utt = self._open[utterance_id]
        try:
            self.queue.push(samples, utterance_id)
        except SpeechQueueFull as exc:  # only if live microphone speech filled it meanwhile
            raise SpeechError("queue_full", str(exc), retry_after=1.0) from None
        utt.last_audio = time.monotonic()
        utt.queued_samples += len(samples)
        if end:
            self._finish(utterance_id, "ended")
            self.queue.end(utterance_id)
        self.on_queued()
        return len(samples) / SAMPLE_RATE

    def _finish(self, utterance_id: str, state: str) -> None:
        utt = self._open.pop(utterance_id, None)
        if utt and utt.timer:
            utt.timer.cancel()
        self._closed[utterance_id] = state
        while len(self._closed) > 4096:
            self._closed.popitem(last=False)

    def _watch(self, utterance_id: str, delay: float | None = None) -> None:
        utt = self._open[utterance_id]
        loop = asyncio.get_running_loop()
        utt.timer = loop.call_later(
            self.idle_end_s if delay is None else delay, self._check_idle, utterance_id
        )

    def _check_idle(self, utterance_id: str) -> None:
        utt = self._open.get(utterance_id)
        if utt is None:
            return
        quiet = time.monotonic() - utt.last_audio
        if quiet >= self.idle_end_s and self.queue.queued(utterance_id) == 0:
            # left open with nothing to play: finish it, but let later audio continue it
            tail = utt.resampler.flush()
            if len(tail):
                with _suppress_full():
                    self.queue.push(tail, utterance_id)
            self._open.pop(utterance_id, None)
            self.queue.end(utterance_id)
            self.on_queued()
            return
        self._watch(utterance_id, max(0.05, min(self.idle_end_s - quiet, 0.25)))


class _suppress_full:
    """A flushed resampler tail (a few ms) is dropped rather than refused loudly."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> bool:
        return kind is SpeechQueueFull
