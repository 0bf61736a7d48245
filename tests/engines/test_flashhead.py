"""The FlashHead engine's streaming, driven through the test-only stand-in pipeline.

The stand-in has upstream's interface and shapes and writes what it was fed into its frames
(see ``flashhead_standin``), so these tests read back, step by step, the audio window, the
feature indices, the frames kept and dropped, and the per-session state.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from avatar_stream.avatars.photo import default_avatar_image  # noqa: E402
from avatar_stream.engines.base import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME  # noqa: E402
from avatar_stream.engines.flashhead.config import (  # noqa: E402
    WINDOW_FRAMES,
    WINDOW_SAMPLES,
    Schedule,
    missing_checkpoint_files,
    missing_wav2vec_files,
)
from avatar_stream.engines.flashhead.engine import (  # noqa: E402
    FADE_FRAMES,
    FlashHeadEngine,
    audio_context,
    from_uint8_frames,
)
from avatar_stream.engines.flashhead.standin import band_level, read_tag  # noqa: E402
from avatar_stream.engines.registry import create_engine  # noqa: E402

SCHEDULES = [
    ("lite", "throughput", 8),
    ("lite", "low-latency", 8),
    ("lite", "low-latency", 16),
    ("pro", "throughput", 8),
    ("pro", "low-latency", 8),
]
_engines: dict[tuple[str, str, int], FlashHeadEngine] = {}


@pytest.fixture(scope="module")
def portrait() -> np.ndarray:
    return default_avatar_image()


def engine_for(model: str, schedule: str, frames: int, portrait: np.ndarray) -> FlashHeadEngine:
    key = (model, schedule, frames)
    if key not in _engines:
        engine = create_engine("flashhead", model=model, checkpoint_dir="standin",
                               schedule=schedule, low_latency_frames=frames, device="cpu")
        assert isinstance(engine, FlashHeadEngine)
        engine.avatar = engine.prepare(portrait, "default")  # type: ignore[attr-defined]
        _engines[key] = engine
    return _engines[key]


@pytest.fixture(scope="module")
def lite(portrait: np.ndarray) -> FlashHeadEngine:
    return engine_for("lite", "throughput", 8, portrait)


def teardown_module() -> None:
    for engine in _engines.values():
        engine.close()
    _engines.clear()


def test_schedules_follow_upstream_strides() -> None:
    lite, pro = Schedule("lite"), Schedule("pro")
    assert (lite.motion_frames, lite.frames_per_step, lite.samples_per_step) == (9, 24, 15_360)
    assert (pro.motion_frames, pro.frames_per_step, pro.samples_per_step) == (5, 28, 17_920)
    assert lite.keep == slice(9, 33) and lite.lookahead_frames == 0
    low = Schedule("lite", "low-latency", 8)
    assert low.frames_per_step == 8 and low.lookahead_frames == 16 and low.keep == slice(9, 17)
    assert low.next_motion == slice(8, 17)  # the last 9 frames shown after this step
    with pytest.raises(ValueError):
        Schedule("lite", "low-latency", 12)


def test_audio_context_takes_the_last_33_frames_with_clamped_neighbours() -> None:
    features = torch.arange(200, dtype=torch.float32)[:, None, None].expand(200, 12, 768)
    ctx = audio_context(features)
    assert tuple(ctx.shape) == (1, 33, 5, 12, 768)
    expected = np.clip(np.arange(167, 200)[:, None] + np.arange(-2, 3)[None], 0, 199)
    assert np.array_equal(ctx[0, :, :, 0, 0].numpy(), expected)


def test_window_starts_silent_and_takes_one_slice_per_step(lite: FlashHeadEngine) -> None:
    stream = lite.open_stream(lite.avatar)  # type: ignore[attr-defined]
    n = stream.schedule.samples_per_step
    assert stream.window.shape == (WINDOW_SAMPLES,) and not stream.window.any()
    for value in (0.1, 0.2, 0.3):
        stream.step(np.full(n, value, np.float32))
    w = stream.window
    assert np.allclose(w[-n:], 0.3) and np.allclose(w[-2 * n : -n], 0.2)
    assert np.allclose(w[-3 * n : -2 * n], 0.1) and not w[: -3 * n].any()
    stream.step(None)  # an idle frame is 40 ms of silence in the context
    w2 = stream.window
    assert not w2[-SAMPLES_PER_FRAME:].any() and np.array_equal(w2[:-640], w[640:])
    with pytest.raises(ValueError):
        stream.step(np.zeros(n - 1, np.float32))


def test_features_taken_and_motion_frames_dropped(lite: FlashHeadEngine) -> None:
    stream = lite.open_stream(lite.avatar)  # type: ignore[attr-defined]
    frames = stream.step(np.zeros(15_360, np.float32))
    emb = lite.pipeline.last_audio_embedding
    assert tuple(emb.shape) == (1, 33, 5, 12, 768)
    expected = np.clip(np.arange(167, 200)[:, None] + np.arange(-2, 3)[None], 0, WINDOW_FRAMES - 1)
    assert np.array_equal(emb[0, :, :, 0, 0].numpy(), expected)
    assert frames.shape == (24, 512, 512, 3) and frames.dtype == np.uint8
    assert [read_tag(f)["chunk_index"] for f in frames] == list(range(9, 33))


@pytest.mark.parametrize("model, schedule, k", SCHEDULES)
def test_frame_k_is_made_from_speech_frame_k(model, schedule, k, portrait) -> None:
    """25 frames per second of speech, and each frame carries its own 40 ms of audio."""
    engine = engine_for(model, schedule, k, portrait)
    stream = engine.open_stream(engine.avatar)  # type: ignore[attr-defined]
    per = stream.schedule.samples_per_step
    steps = -(-4 * SAMPLE_RATE // per)
    speech = np.zeros(steps * per, np.float32)
    loud = [13, 50, 77]  # frames of speech with a burst in them
    for f in loud:
        speech[f * SAMPLES_PER_FRAME : (f + 1) * SAMPLES_PER_FRAME] = 0.3
    calls = engine.pipeline.generate_calls
    out = []
    for i in range(steps):
        frames = stream.step(speech[i * per : (i + 1) * per])
        m = stream.schedule.motion_frames
        assert [read_tag(f)["chunk_index"] for f in frames] == list(range(m, m + len(frames)))
        out.append(frames)
    video = np.concatenate(out)
    assert len(video) == len(speech) // SAMPLES_PER_FRAME == steps * stream.frames_per_step
    assert engine.pipeline.generate_calls - calls == steps
    levels = np.array([band_level(f, engine.avatar.image) for f in video])  # type: ignore[attr-defined]
    assert sorted(np.argsort(levels)[-3:].tolist()) == loud
    assert levels[loud].min() > 0.9 and np.delete(levels, loud).max() < 0.05
    # each kept frame's centre feature is the newest audio in the window, in order (with
    # low-latency, the silent lookahead comes after it, inside upstream's 8 s: the window
    # wav2vec sees is never longer)
    idx = [read_tag(f)["window_index"] for f in video[-stream.frames_per_step :]]
    end = WINDOW_FRAMES - stream.schedule.lookahead_frames
    assert idx == list(range(end - stream.frames_per_step, end))


def test_low_latency_continues_from_the_frames_kept(portrait) -> None:
    engine = engine_for("lite", "low-latency", 8, portrait)
    pipe = engine.pipeline
    stream = engine.open_stream(engine.avatar)  # type: ignore[attr-defined]
    stream.step(np.full(5120, 0.05, np.float32))
    video = pipe.last_video
    # the motion state is the encoding of generated frames 8..16: frame 16 is the newest
    # kept, so the next chunk starts right after the last frame shown
    expected = pipe.vae.encode(video[None, :, 8:17])
    assert torch.equal(stream.state.motion, expected)
    stream.step(np.full(5120, 0.05, np.float32))
    assert torch.equal(pipe.last_motion_in, expected)


def test_idle_is_a_cached_loop_with_no_generate(lite: FlashHeadEngine) -> None:
    stream = lite.open_stream(lite.avatar)  # type: ignore[attr-defined]
    calls = lite.pipeline.generate_calls
    idle = np.concatenate([stream.step(None) for _ in range(200)])
    assert idle.shape == (200, 512, 512, 3) and stream.idle_frames_per_step == 1
    assert lite.pipeline.generate_calls == calls and not stream.idle_uses_device
    loop = stream._idle.loop  # forwards then backwards: no jump at the turn
    n = len(loop.frames)
    assert np.array_equal(idle[n - 1], loop.frames[-1]) and np.array_equal(idle[n], loop.frames[-2])


def test_speech_after_idle_continues_from_the_frames_shown(lite: FlashHeadEngine) -> None:
    pipe = lite.pipeline
    stream = lite.open_stream(lite.avatar)  # type: ignore[attr-defined]
    shown = np.concatenate([stream.step(None) for _ in range(30)])
    stream.step(np.full(15_360, 0.05, np.float32))
    expected = pipe.vae.encode(from_uint8_frames(shown[-9:], pipe.device, pipe.param_dtype))
    assert torch.allclose(pipe.last_motion_in, expected)


def test_idle_after_speech_fades_in_from_the_last_frame(lite: FlashHeadEngine) -> None:
    stream = lite.open_stream(lite.avatar)  # type: ignore[attr-defined]
    last = stream.step(np.full(15_360, 0.3, np.float32))[-1].astype(np.float32)
    idle = np.concatenate([stream.step(None) for _ in range(FADE_FRAMES + 2)]).astype(np.float32)
    loop = stream._idle.loop
    target = loop.frames[loop.nearest(last.astype(np.uint8))].astype(np.float32)
    gap = np.abs(target - last).mean()
    first = np.abs(idle[0] - last).mean() / gap
    assert 0 < first < 0.2  # 1/9 of the way
    assert np.abs(idle[FADE_FRAMES - 1] - last).mean() / gap > 0.8
    stream.reset()
    assert not stream.window.any()


def test_interleaved_sessions_equal_each_alone(lite: FlashHeadEngine, portrait) -> None:
    other = lite.prepare(np.ascontiguousarray(portrait[:, ::-1]), "mirrored")
    rng = np.random.default_rng(5)
    speech = {k: (0.1 * rng.standard_normal(15_360 * 4)).astype(np.float32) for k in "ab"}
    avatars = {"a": lite.avatar, "b": other}  # type: ignore[attr-defined]
    seeds = {"a": 1, "b": 2}
    plan = [None, 0, 1, None, 2, 3]  # idle, speech, speech, idle, speech, speech

    def run(key: str, stream) -> list[np.ndarray]:
        out = []
        for p in plan:
            chunk = None if p is None else speech[key][p * 15_360 : (p + 1) * 15_360]
            out.append(stream.step(chunk))
        return out

    alone = {k: run(k, lite.open_stream(avatars[k], seeds[k])) for k in "ab"}
    streams = {k: lite.open_stream(avatars[k], seeds[k]) for k in "ab"}
    together: dict[str, list[np.ndarray]] = {"a": [], "b": []}
    for i, p in enumerate(plan):
        for k in ("ab" if i % 2 else "ba"):
            chunk = None if p is None else speech[k][p * 15_360 : (p + 1) * 15_360]
            together[k].append(streams[k].step(chunk))
    for k in "ab":
        for x, y in zip(alone[k], together[k], strict=True):
            assert np.array_equal(x, y)
    assert not np.array_equal(alone["a"][2], alone["b"][2])  # and they do differ


def test_warm_up_measures_capacity(lite: FlashHeadEngine) -> None:
    lite.warm_up()
    assert lite.step_s and lite.step_s > 0
    assert lite.step_fps == pytest.approx(24 / lite.step_s)
    assert lite.realtime_sessions == int(lite.step_fps // FPS)
    stream = lite.open_stream(lite.avatar)  # type: ignore[attr-defined]
    sessions = max(1, lite.realtime_sessions)
    assert stream.playout_delay_s == pytest.approx((sessions - 1) * lite.step_s + 0.1)
    assert stream.step_time_hint_s == lite.step_s


def test_missing_weights_are_named(tmp_path) -> None:
    (tmp_path / "Model_Lite").mkdir()
    assert missing_checkpoint_files("lite", str(tmp_path)) == [str(tmp_path / "VAE_LTX")]
    assert missing_checkpoint_files("lite", "standin") == []
    assert "not set" in missing_wav2vec_files(None)[0]
    (tmp_path / "config.json").write_text("{}")
    missing = missing_wav2vec_files(str(tmp_path))
    assert any("preprocessor_config.json" in m for m in missing)
    assert any("model.safetensors" in m for m in missing)
    with pytest.raises(FileNotFoundError, match="VAE_LTX"):
        create_engine("flashhead", checkpoint_dir=str(tmp_path), wav2vec_dir=str(tmp_path))


def test_doctor_says_what_it_could_not_check(tmp_path) -> None:
    from avatar_stream.engines.flashhead.config import FlashHeadOptions
    from avatar_stream.tools.doctor import doctor

    report = doctor(FlashHeadOptions(checkpoint_dir=str(tmp_path), wav2vec_dir=None))
    text = report.render()
    assert "torch" in text and "Not checked" in text and "Problems" in text
    assert any("Model_Lite" in p for p in report.problems)  # names what is missing
    assert any("wav2vec" in p for p in report.problems)
    if not torch.cuda.is_available():
        assert any("GPU" in u for u in report.unchecked) and not report.steps


def test_doctor_times_every_schedule_with_the_stand_in() -> None:
    from avatar_stream.engines.flashhead.config import FlashHeadOptions
    from avatar_stream.tools.doctor import doctor

    report = doctor(FlashHeadOptions(checkpoint_dir="standin", device="cpu"), steps=1)
    assert not report.problems, report.render()
    assert [s["schedule"].split()[0] for s in report.steps] == \
        ["throughput", "low-latency", "low-latency"]
    for s in report.steps:
        assert s["step_s"] > 0 and s["sessions"] == int(s["fps"] // FPS)
    assert "stand-in" in report.render()
