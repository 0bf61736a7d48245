"""The synchronizer's bookkeeping, with a test-double engine stream whose frames say what
speech they were made from (the real engines are exercised in test_session / test_warp)."""

import asyncio
import time

import numpy as np
import pytest

from avatar_stream.core.speechqueue import SpeechQueue
from avatar_stream.core.synchronizer import (
    OUT_HALF,
    RESERVE_DECAY,
    RoundTrip,
    Synchronizer,
)
from avatar_stream.core.worker import EngineWorker
from avatar_stream.engines.base import FRAME_SIZE, SAMPLES_PER_FRAME, EngineStream
from avatar_stream.transports.webrtc.tracks import VIDEO_PTS_PER_FRAME, PacedTrack, TrackSink


class LoudnessStream(EngineStream):
    """Test double: frame brightness = 255 * peak of its speech (0 when idle)."""

    def __init__(self, frames_per_step: int = 1, reset_s: float = 0.0) -> None:
        self.frames_per_step = frames_per_step
        self.resets = 0
        self.reset_s = reset_s  # a stream whose reset takes this long (on the worker)
        self.stall_s = 0.0  # the next speech step takes this long

    def step(self, speech):
        if speech is not None and self.stall_s:
            time.sleep(self.stall_s)
            self.stall_s = 0.0
        frames = np.zeros((self.frames_per_step, FRAME_SIZE, FRAME_SIZE, 3), np.uint8)
        if speech is not None:
            for i, chunk in enumerate(speech.reshape(self.frames_per_step, SAMPLES_PER_FRAME)):
                frames[i] = int(255 * min(1.0, float(np.abs(chunk).max())))
        return frames

    def reset(self):
        time.sleep(self.reset_s)
        self.resets += 1


async def collect(track: PacedTrack, n: int) -> list:
    return [await asyncio.wait_for(track.recv(), 2) for _ in range(n)]


def brightness(frame) -> int:
    return int(frame.to_ndarray(format="gray")[100, 100])


@pytest.fixture
def worker():
    w = EngineWorker(1)
    yield w
    w.shutdown()


def make(worker, frames_per_step=1, reset_s=0.0, late_wait_s=0.06):
    events: list[dict] = []
    speech = SpeechQueue()
    sink = TrackSink(video_queue=8, audio_queue=16)
    sync = Synchronizer(LoudnessStream(frames_per_step, reset_s), worker, speech, sink,
                        events.append, late_wait_s=late_wait_s)
    return sync, speech, sink.video, sink.audio, events


@pytest.mark.parametrize("frames_per_step", [1, 4])
async def test_each_frame_leaves_with_its_own_audio(worker, frames_per_step) -> None:
    sync, speech, video, audio, events = make(worker, frames_per_step)
    # 12 frames of speech, frame i at amplitude (i+1)/16: a staircase
    levels = [(i + 1) / 16 for i in range(12)]
    pcm = np.concatenate([np.full(SAMPLES_PER_FRAME, v, np.float32) for v in levels])
    speech.push(pcm, "u1")
    speech.end("u1")
    sync.start()
    frames, audios = await asyncio.gather(collect(video, 16), collect(audio, 32))
    await sync.stop()
    assert [f.pts for f in frames] == [k * VIDEO_PTS_PER_FRAME for k in range(16)]
    assert [a.pts for a in audios] == [n * OUT_HALF for n in range(32)]
    seen = [brightness(f) for f in frames]
    # each video frame's brightness encodes its speech; its audio frames carry that level
    for k, frame_level in enumerate(seen[:12]):
        assert abs(frame_level - 255 * levels[k]) <= 3
        mid = audios[2 * k + 1].to_ndarray()[0, 400:500] / 32767
        assert abs(np.median(mid) - levels[k]) < 0.02, k  # 2nd half: past the resampler ramp
    assert seen[12:] == [0, 0, 0, 0]
    kinds = [(e["type"], e.get("utterance_id")) for e in events]
    assert kinds == [("speech.started", "u1"), ("speech.finished", "u1")]
    assert events[1]["interrupted"] is False
    assert events[1]["position_s"] == pytest.approx(12 * 0.04)


async def test_interrupt_drops_queue_fades_and_reports(worker) -> None:
    sync, speech, video, audio, events = make(worker)
    speech.push(np.full(SAMPLES_PER_FRAME * 50, 0.5, np.float32), "u1")
    sync.start()
    _, got = await asyncio.gather(collect(video, 5), collect(audio, 9))
    cut = sync.interrupt()
    assert cut == ["u1"]
    _, rest = await asyncio.gather(collect(video, 10), collect(audio, 20))
    await sync.stop()
    levels = [float(np.abs(a.to_ndarray()).max()) / 32767 for a in rest]
    # the half-frame still to go when the barge-in came fades out in 5 ms; silence after
    # it (allow the frame already handed to the track)
    assert max(levels[2:]) < 0.01, levels
    for a in rest[:2]:  # speech already handed over, or a fade over its first 5 ms
        tail = float(np.abs(a.to_ndarray()[0, 240:]).max()) / 32767
        assert tail < 0.01 or tail > 0.45, levels
    assert any(lv > 0.4 for lv in (float(np.abs(a.to_ndarray()).max()) / 32767 for a in got))
    finished = [e for e in events if e["type"] == "speech.finished"]
    assert finished and finished[0]["interrupted"] is True
    assert 0 < finished[0]["position_s"] < 2.0
    assert sync.stream.resets == 1
    assert speech.available == 0


async def test_after_interrupt_silence_goes_out_on_time(worker) -> None:
    # the engine takes 250 ms to reset, and a late frame may be waited for 300 ms: the
    # ticks after the barge-in must not wait for it, only repeat the last picture with
    # silence until it is done
    sync, speech, video, audio, events = make(worker, reset_s=0.25, late_wait_s=0.3)
    speech.push(np.full(SAMPLES_PER_FRAME * 50, 0.5, np.float32), "u1")
    sync.start()
    await asyncio.gather(collect(video, 5), collect(audio, 10))
    await audio.recv()  # just after a tick
    t = time.perf_counter()
    sync.interrupt()
    while float(np.abs((await audio.recv()).to_ndarray()).max()) > 0:
        pass
    silent_after = time.perf_counter() - t
    _, rest = await asyncio.gather(collect(video, 8), collect(audio, 16))
    await sync.stop()
    # the next ticks are <= 40 ms away (a frame already handed over, the faded half)
    assert silent_after < 0.15, silent_after
    assert sync.stats.fillers >= 3  # the reset outlasted several frames
    assert not any(a.to_ndarray().any() for a in rest)


async def test_idle_when_nothing_is_queued(worker) -> None:
    sync, speech, video, audio, events = make(worker)
    sync.start()
    frames, audios = await asyncio.gather(collect(video, 10), collect(audio, 20))
    await sync.stop()
    assert all(brightness(f) == 0 for f in frames)
    assert all(not a.to_ndarray().any() for a in audios)
    assert events == []
    assert sync.stats.frames_sent >= 10


def test_round_trip_lead_follows_the_tail() -> None:
    steady, jittery = RoundTrip(), RoundTrip()
    for i in range(50):
        steady.add(0.010)
        jittery.add(0.010 if i % 5 else 0.050)  # every fifth step waits behind others
    assert steady.lead == pytest.approx(0.010, abs=0.001)
    assert jittery.lead > 0.040 > 3 * steady.lead


async def test_a_late_speech_frame_holds_back_the_next_utterance(worker) -> None:
    # the engine stalls 120 ms on the first step of the first utterance: that frame is
    # late, the clock slips, and the next utterance starts with that much more speech held
    sync, speech, video, audio, events = make(worker, late_wait_s=0.3)
    sync.start()
    await asyncio.gather(collect(video, 3), collect(audio, 6))
    sync.stream.stall_s = 0.12
    speech.push(np.full(SAMPLES_PER_FRAME * 10, 0.5, np.float32), "u1")
    speech.end("u1")
    await asyncio.gather(collect(video, 20), collect(audio, 40))
    assert sync.clock.slipped_s >= 0.07, sync.clock.slipped_s
    reserve = sync.reserve_s
    assert reserve >= 0.07, reserve
    speech.push(np.full(SAMPLES_PER_FRAME * 10, 0.5, np.float32), "u2")
    speech.end("u2")
    await asyncio.gather(collect(video, 20), collect(audio, 40))
    await sync.stop()
    # it shrinks at each onset
    assert sync.reserve_s == pytest.approx(RESERVE_DECAY * reserve, abs=0.01)


class ArraySink:
    """A media sink of plain arrays, as a framework transport would have: no WebRTC."""

    def __init__(self) -> None:
        self.video: list[tuple[int, np.ndarray]] = []
        self.audio: list[tuple[int, np.ndarray]] = []

    def video_frame(self, rgb: np.ndarray) -> np.ndarray:
        return rgb.copy()

    def repeat(self, frame: np.ndarray | None) -> np.ndarray:
        return frame if frame is not None else np.zeros((FRAME_SIZE, FRAME_SIZE, 3), np.uint8)

    def send_video(self, frame: np.ndarray, index: int) -> None:
        self.video.append((index, frame))

    def send_audio(self, samples: np.ndarray, start: int) -> None:
        self.audio.append((start, samples))

    @property
    def dropped(self) -> tuple[int, int]:
        return 0, 0


async def test_any_media_sink_gets_frames_and_audio_on_one_clock(worker) -> None:
    speech, events, sink = SpeechQueue(), [], ArraySink()
    sync = Synchronizer(LoudnessStream(), worker, speech, sink, events.append)
    speech.push(np.full(SAMPLES_PER_FRAME * 5, 0.5, np.float32), "u1")
    speech.end("u1")
    sync.start()
    while len(sink.video) < 10:
        await asyncio.sleep(0.04)
    await sync.stop()
    assert [i for i, _ in sink.video] == list(range(len(sink.video)))
    assert [s for s, _ in sink.audio] == [n * OUT_HALF for n in range(len(sink.audio))]
    assert all(len(a) == OUT_HALF and a.dtype == np.int16 for _, a in sink.audio)
    loud = [i for i, f in sink.video if f[100, 100, 0] > 100]
    assert loud == [0, 1, 2, 3, 4], loud  # the five speech frames first, then idle
    assert [e["type"] for e in events] == ["speech.started", "speech.finished"]
