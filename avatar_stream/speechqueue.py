"""A session's queue of 16 kHz speech waiting to be animated, tagged by utterance.

Speech may arrive faster than real time (TTS) or in real time (a microphone). The queue is
bounded in seconds: a push that would overflow it is refused whole, so nothing already
queued is ever lost. The synchronizer takes exactly one engine step's worth at a time and
learns from the take which utterances the samples belong to and which of them ended, so
it can say `speech.started` / `speech.finished` when that audio actually plays out.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass

import numpy as np

from .engines.base import SAMPLE_RATE


class SpeechQueueFull(Exception):
    """The push would exceed the queue's bound; nothing of it was queued."""


@dataclass(frozen=True)
class Segment:
    """``count`` samples of utterance ``utterance_id`` starting at ``offset`` in a take.

    ``end`` marks the utterance's last samples (``count`` may be 0 when the end arrived
    after all its audio had already been taken).
    """

    utterance_id: str
    offset: int
    count: int
    end: bool = False


@dataclass
class _Chunk:
    utterance_id: str
    samples: np.ndarray | None  # None: the utterance's end marker


class SpeechQueue:
    """Bounded FIFO of speech; used from the event loop thread only."""

    def __init__(self, max_seconds: float = 60.0) -> None:
        self.max_samples = int(max_seconds * SAMPLE_RATE)
        self._chunks: deque[_Chunk] = deque()
        self._head = 0  # samples already taken from the first chunk
        self._available = 0
        self._open: set[str] = set()  # utterances with more audio expected
        self.changed = asyncio.Event()  # set on every push / end; the consumer clears it

    @property
    def available(self) -> int:
        """Samples queued."""
        return self._available

    @property
    def seconds(self) -> float:
        return self._available / SAMPLE_RATE

    @property
    def waiting_for_more(self) -> bool:
        """True while an utterance that has not ended is being spoken or queued."""
        return bool(self._open)

    @property
    def pending(self) -> bool:
        """Anything to take: samples or end markers."""
        return bool(self._chunks)

    def push(self, samples: np.ndarray, utterance_id: str) -> None:
        """Queue float32 16 kHz mono samples; raises SpeechQueueFull if over the bound."""
        n = len(samples)
        if n == 0:
            self._open.add(utterance_id)
            return
        if self._available + n > self.max_samples:
            raise SpeechQueueFull(
                f"speech queue full: {self.seconds:.1f} s queued, at most "
                f"{self.max_samples / SAMPLE_RATE:.0f} s"
            )
        self._chunks.append(_Chunk(utterance_id, np.asarray(samples, dtype=np.float32)))
        self._available += n
        self._open.add(utterance_id)
        self.changed.set()

    def end(self, utterance_id: str) -> None:
        """No more audio will come for this utterance."""
        self._open.discard(utterance_id)
        self._chunks.append(_Chunk(utterance_id, None))
        self.changed.set()

    def take(self, n: int, pad_front: bool = False) -> tuple[np.ndarray, list[Segment]]:
        """Take up to ``n`` samples and the end markers right after them, zero-padded to ``n``.

        With ``pad_front`` the silence goes before the samples: use it when more of the
        utterance is still coming, so what follows stays contiguous with them (a short
        pause before a word, not a hole inside it).
        """
        out = np.zeros(n, dtype=np.float32)
        segments: list[Segment] = []
        pos = max(0, n - self._available) if pad_front else 0
        while self._chunks:
            chunk = self._chunks[0]
            if chunk.samples is None:
                segments.append(Segment(chunk.utterance_id, pos, 0, True))
                self._chunks.popleft()
                continue
            if pos >= n:
                break
            data = chunk.samples[self._head :]
            count = min(len(data), n - pos)
            out[pos : pos + count] = data[:count]
            segments.append(Segment(chunk.utterance_id, pos, count))
            pos += count
            self._available -= count
            if count == len(data):
                self._chunks.popleft()
                self._head = 0
            else:
                self._head += count
        return out, _merge(segments)

    def clear(self) -> list[str]:
        """Drop everything (barge-in); returns the utterances that had audio or were open."""
        dropped = list(dict.fromkeys(c.utterance_id for c in self._chunks))
        dropped += [u for u in self._open if u not in dropped]
        self._chunks.clear()
        self._head = 0
        self._available = 0
        self._open.clear()
        self.changed.set()
        return dropped


def _merge(segments: list[Segment]) -> list[Segment]:
    """Join consecutive pieces of one utterance (chunk boundaries are not interesting)."""
    merged: list[Segment] = []
    for s in segments:
        last = merged[-1] if merged else None
        if last and last.utterance_id == s.utterance_id and not last.end:
            merged[-1] = Segment(s.utterance_id, last.offset, last.count + s.count, s.end)
        else:
            merged.append(s)
    return merged


def split_segments(segments: list[Segment], frames: int, per_frame: int) -> list[list[Segment]]:
    """Cut a take's segments at frame boundaries: element i describes frame i's samples."""
    out: list[list[Segment]] = [[] for _ in range(frames)]
    for s in segments:
        if s.count == 0:
            # the marker belongs to the frame holding the sample just before it
            i = min(max(s.offset - 1, 0) // per_frame, frames - 1)
            out[i].append(Segment(s.utterance_id, s.offset - i * per_frame, 0, True))
            continue
        start, stop = s.offset, s.offset + s.count
        first, last = start // per_frame, (stop - 1) // per_frame
        for i in range(first, last + 1):
            lo, hi = max(start, i * per_frame), min(stop, (i + 1) * per_frame)
            out[i].append(Segment(s.utterance_id, lo - i * per_frame, hi - lo, s.end and i == last))
    return out
