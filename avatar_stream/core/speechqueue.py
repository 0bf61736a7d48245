"""A session's queue of 16 kHz speech waiting to be animated, tagged by utterance.

Speech may arrive faster than real time (TTS) or in real time (a microphone), from several
sources at once. The queue is bounded in seconds: a push that would overflow it is refused
whole, so nothing already queued is ever lost.

Utterances play in the order they began and are never interleaved: audio pushed for an
utterance goes after that utterance's earlier audio, ahead of utterances that began later,
and a later utterance waits while an earlier one is still open (more of it is expected).
So two front-ends pushing at once, or a chunk arriving late, cannot splice one sentence
into another.

The synchronizer takes exactly one engine step's worth at a time and learns from the take
which utterances the samples belong to and which of them ended, so it can say
`speech.started` / `speech.finished` when that audio actually plays out.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from dataclasses import dataclass

import numpy as np

from avatar_stream.engines.base import SAMPLE_RATE


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
    rank: int  # the utterance's place in line: chunks are kept sorted by it
    samples: np.ndarray | None  # None: the utterance's end marker


class SpeechQueue:
    """Bounded queue of speech in utterance order; used from the event loop thread only."""

    def __init__(self, max_seconds: float = 60.0) -> None:
        self.max_samples = int(max_seconds * SAMPLE_RATE)
        self._chunks: deque[_Chunk] = deque()
        self._head = 0  # samples already taken from the first chunk
        self._total = 0  # samples queued
        self._per_utterance: dict[str, int] = {}  # samples queued per utterance
        self._open: set[str] = set()  # utterances with more audio expected
        self._rank: dict[str, int] = {}  # utterances queued or open -> place in line
        self._ranks = itertools.count()
        self.changed = asyncio.Event()  # set on every push / end; the consumer clears it

    @property
    def available(self) -> int:
        """Samples that can play now, in order, without waiting for an open utterance.

        Audio of an utterance that began after a still-open one waits behind it.
        """
        limit = self._blocking_rank()
        if limit is None:
            return self._total
        n = -self._head
        for chunk in self._chunks:
            if chunk.rank > limit:
                break
            if chunk.samples is not None:
                n += len(chunk.samples)
        return max(n, 0)

    @property
    def total(self) -> int:
        """Samples queued, whether they can play now or wait behind an open utterance."""
        return self._total

    @property
    def seconds(self) -> float:
        """Seconds of speech queued (all of it)."""
        return self._total / SAMPLE_RATE

    @property
    def room(self) -> int:
        """Samples that may still be pushed before the bound."""
        return max(0, self.max_samples - self._total)

    @property
    def waiting_for_more(self) -> bool:
        """True while an utterance that has not ended is being spoken or queued."""
        return bool(self._open)

    @property
    def pending(self) -> bool:
        """Anything to take: samples or end markers."""
        return bool(self._chunks)

    def queued(self, utterance_id: str) -> int:
        """Samples of this utterance still waiting to be taken."""
        return self._per_utterance.get(utterance_id, 0)

    def is_open(self, utterance_id: str) -> bool:
        return utterance_id in self._open

    def push(self, samples: np.ndarray, utterance_id: str) -> None:
        """Queue float32 16 kHz mono samples; raises SpeechQueueFull if over the bound.

        An empty push opens the utterance (it holds its place in line) without audio.
        """
        n = len(samples)
        if n and self._total + n > self.max_samples:
            raise SpeechQueueFull(
                f"speech queue full: {self.seconds:.1f} s queued, at most "
                f"{self.max_samples / SAMPLE_RATE:.0f} s"
            )
        rank = self._rank_of(utterance_id)
        self._open.add(utterance_id)
        if n == 0:
            self.changed.set()
            return
        self._insert(_Chunk(utterance_id, rank, np.asarray(samples, dtype=np.float32)))
        self._total += n
        self._per_utterance[utterance_id] = self._per_utterance.get(utterance_id, 0) + n
        self.changed.set()

    def end(self, utterance_id: str) -> None:
        """No more audio will come for this utterance."""
        self._open.discard(utterance_id)
        self._insert(_Chunk(utterance_id, self._rank_of(utterance_id), None))
        self.changed.set()

    def take(self, n: int, pad_front: bool = False) -> tuple[np.ndarray, list[Segment]]:
        """Take up to ``n`` playable samples and the end markers right after them, padded
        with silence to ``n``.

        With ``pad_front`` the silence goes before the samples of the utterance that is
        still open (after those of utterances that ended): more of it is coming, so what
        follows stays contiguous with it (a short pause before a word, not a hole inside
        it). Without it, or when the take holds no open utterance, the silence goes last.
        """
        limit = self._blocking_rank()
        pieces: list[tuple[str, np.ndarray | None]] = []
        got = 0
        while self._chunks:
            chunk = self._chunks[0]
            if chunk.samples is None:
                pieces.append((chunk.utterance_id, None))
                self._chunks.popleft()
                self._forget_if_done(chunk.utterance_id)
                continue
            if got >= n or (limit is not None and chunk.rank > limit):
                break
            data = chunk.samples[self._head :]
            count = min(len(data), n - got)
            pieces.append((chunk.utterance_id, data[:count]))
            got += count
            self._total -= count
            self._per_utterance[chunk.utterance_id] -= count
            if count == len(data):
                self._chunks.popleft()
                self._head = 0
                self._forget_if_done(chunk.utterance_id)
            else:
                self._head += count
        return self._lay_out(pieces, n, got, pad_front)

    def _lay_out(
        self, pieces: list[tuple[str, np.ndarray | None]], n: int, got: int, pad_front: bool
    ) -> tuple[np.ndarray, list[Segment]]:
        pad_at = len(pieces)  # index of the piece the silence goes before
        if pad_front and got < n:
            for i, (uid, data) in enumerate(pieces):
                if data is not None and uid in self._open:
                    pad_at = i
                    break
        out = np.zeros(n, dtype=np.float32)
        segments: list[Segment] = []
        pos = 0
        for i, (uid, data) in enumerate(pieces):
            if i == pad_at:
                pos += n - got
            if data is None:
                segments.append(Segment(uid, pos, 0, True))
                continue
            out[pos : pos + len(data)] = data
            segments.append(Segment(uid, pos, len(data)))
            pos += len(data)
        return out, _merge(segments)

    def clear(self) -> list[str]:
        """Drop everything (barge-in); returns the utterances that had audio or were open."""
        dropped = list(dict.fromkeys(c.utterance_id for c in self._chunks))
        dropped += [u for u in self._open if u not in dropped]
        self._chunks.clear()
        self._head = 0
        self._total = 0
        self._per_utterance.clear()
        self._open.clear()
        self._rank.clear()
        self.changed.set()
        return dropped

    # -- ordering --------------------------------------------------------------------

    def _rank_of(self, utterance_id: str) -> int:
        rank = self._rank.get(utterance_id)
        if rank is None:
            rank = self._rank[utterance_id] = next(self._ranks)
        return rank

    def _blocking_rank(self) -> int | None:
        """Rank of the earliest open utterance: nothing after it may play yet."""
        if not self._open:
            return None
        return min(self._rank[u] for u in self._open)

    def _insert(self, chunk: _Chunk) -> None:
        """Keep chunks sorted by rank (stable): after the utterance's own earlier chunks."""
        chunks = self._chunks
        i = len(chunks)
        while i > 0 and chunks[i - 1].rank > chunk.rank:
            i -= 1
        if i == 0 and chunks and self._head:
            i = 1  # never in front of a chunk that is partly taken
        if i == len(chunks):
            chunks.append(chunk)
        else:
            chunks.insert(i, chunk)

    def _forget_if_done(self, utterance_id: str) -> None:
        if utterance_id in self._open:
            return
        if any(c.utterance_id == utterance_id for c in self._chunks):
            return
        self._rank.pop(utterance_id, None)
        self._per_utterance.pop(utterance_id, None)


def _merge(segments: list[Segment]) -> list[Segment]:
    """Join consecutive pieces of one utterance (chunk boundaries are not interesting)."""
    merged: list[Segment] = []
    for s in segments:
        last = merged[-1] if merged else None
        if (
            last
            and last.utterance_id == s.utterance_id
            and not last.end
            and last.offset + last.count == s.offset
        ):
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
