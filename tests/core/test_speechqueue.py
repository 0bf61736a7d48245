import numpy as np
import pytest

from avatar_stream.core.speechqueue import Segment, SpeechQueue, SpeechQueueFull, split_segments


def ramp(n: int, start: int = 0) -> np.ndarray:
    return np.arange(start, start + n, dtype=np.float32)


def test_take_is_fifo_and_zero_padded() -> None:
    q = SpeechQueue(max_seconds=1)
    q.push(ramp(500), "a")
    q.push(ramp(300, 500), "a")
    out, segs = q.take(640)
    assert np.array_equal(out, ramp(640))
    assert segs == [Segment("a", 0, 640)]
    out, segs = q.take(640)
    assert np.array_equal(out[:160], ramp(160, 640)) and not out[160:].any()
    assert segs == [Segment("a", 0, 160)]
    assert q.available == 0


def test_end_marker_follows_last_samples() -> None:
    q = SpeechQueue()
    q.push(ramp(700), "a")
    q.end("a")
    q.push(ramp(100), "b")
    _, segs = q.take(640)
    assert segs == [Segment("a", 0, 640)]
    _, segs = q.take(640)
    assert segs == [Segment("a", 0, 60, end=True), Segment("b", 60, 100)]
    assert q.waiting_for_more  # "b" has not ended


def test_end_after_audio_taken_comes_with_an_empty_take() -> None:
    q = SpeechQueue()
    q.push(ramp(640), "a")
    q.take(640)
    q.end("a")
    assert q.pending and q.available == 0
    _, segs = q.take(0)
    assert segs == [Segment("a", 0, 0, end=True)]
    assert not q.pending


def test_overflow_is_refused_whole() -> None:
    q = SpeechQueue(max_seconds=0.1)  # 1600 samples
    q.push(ramp(1000), "a")
    with pytest.raises(SpeechQueueFull):
        q.push(ramp(1000), "a")
    assert q.available == 1000
    out, _ = q.take(1000)
    assert np.array_equal(out, ramp(1000))


def test_clear_reports_queued_and_open_utterances() -> None:
    q = SpeechQueue()
    q.push(ramp(10), "a")
    q.push(ramp(10), "b")
    q.push(np.zeros(0, np.float32), "c")  # opened, no audio yet
    assert sorted(q.clear()) == ["a", "b", "c"]
    assert q.available == 0 and not q.waiting_for_more


def test_split_segments_at_frame_boundaries() -> None:
    segs = [Segment("a", 0, 1000, end=True), Segment("b", 1000, 280)]
    per = split_segments(segs, 2, 640)
    assert per[0] == [Segment("a", 0, 640)]
    assert per[1] == [Segment("a", 0, 360, end=True), Segment("b", 360, 280)]
    # an end marker right at a boundary belongs to the frame before it
    per = split_segments([Segment("a", 0, 640), Segment("a", 640, 0, True)], 2, 640)
    assert per[0][-1].end and per[1] == []


def test_front_padding_keeps_what_follows_contiguous() -> None:
    q = SpeechQueue()
    q.push(ramp(300), "a")
    out, segs = q.take(640, pad_front=True)
    assert not out[:340].any() and np.array_equal(out[340:], ramp(300))
    assert segs == [Segment("a", 340, 300)]


def test_utterances_play_in_order_and_are_never_interleaved() -> None:
    q = SpeechQueue()
    q.push(ramp(100), "a")
    q.push(ramp(50, 1000), "b")  # b began while a is open: it waits behind a
    q.push(ramp(100, 100), "a")  # a's next chunk goes before b's
    assert q.available == 200 and q.total == 250
    out, segs = q.take(300)
    assert segs == [Segment("a", 0, 200)]  # b may not play while a is open
    assert np.array_equal(out[:200], ramp(200)) and not out[200:].any()
    q.end("a")
    assert q.available == 50
    out, segs = q.take(100)
    assert segs == [Segment("a", 0, 0, end=True), Segment("b", 0, 50)]
    assert np.array_equal(out[:50], ramp(50, 1000))


def test_front_padding_goes_between_an_ended_utterance_and_an_open_one() -> None:
    q = SpeechQueue()
    q.push(ramp(100), "a")
    q.end("a")
    q.push(ramp(100, 500), "b")  # b is open: more of it is coming
    out, segs = q.take(640, pad_front=True)
    # a's tail first, then the pause, then b right before the rest of b
    assert np.array_equal(out[:100], ramp(100))
    assert not out[100:540].any()
    assert np.array_equal(out[540:], ramp(100, 500))
    assert segs == [Segment("a", 0, 100, end=True), Segment("b", 540, 100)]


def test_per_utterance_counts_and_room() -> None:
    q = SpeechQueue(max_seconds=0.1)
    q.push(ramp(1000), "a")
    q.push(ramp(200), "b")
    assert q.queued("a") == 1000 and q.queued("b") == 200 and q.room == 400
    q.take(900)
    assert q.queued("a") == 100
    assert q.is_open("a") and q.is_open("b")
