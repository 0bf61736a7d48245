"""The FlashHead engine on upstream SoulX-FlashHead's real code (tiny random weights, CPU).

What the stand-in cannot show is shown here, through upstream's own pipeline, models and
VAE: bf16 weights, the LTX VAE's sampled posterior, torch.compile's graphs, wav2vec's
normalised 8 s window, colour correction, and upstream's prints and device syncs. Each
defect found in review has its test (issue: FlashHead on upstream's real code).

torch.compile runs with dynamo's ``eager`` backend here: every graph is traced, guarded and
counted exactly as with inductor, without inductor's minutes of C++ compilation on 2 cores.
"""

from __future__ import annotations

import functools
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import av
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from flashhead_tiny import tiny_checkpoints, upstream_src  # noqa: E402
from wavs import wav_bytes  # noqa: E402

from avatar_stream.avatars.photo import default_avatar_image  # noqa: E402
from avatar_stream.engines.base import EngineError, EngineUnavailable  # noqa: E402
from avatar_stream.engines.flashhead import engine as fh  # noqa: E402
from avatar_stream.engines.flashhead.config import WINDOW_SAMPLES  # noqa: E402
from avatar_stream.engines.flashhead.upstream import (  # noqa: E402
    UpstreamImportError,
    compiled_graphs,
    import_upstream,
)

pytestmark = pytest.mark.timeout(600)
STEP = 15_360  # Lite throughput: 24 frames of speech a step


@pytest.fixture(scope="module")
def upstream() -> tuple[str, str, str]:
    src = upstream_src()
    return (src, *tiny_checkpoints(src))


@pytest.fixture(scope="module")
def cheap_cpu_engine_settings():
    """One idle chunk and one timed step (a tiny step takes seconds on these cores); and
    torch.compile on dynamo's eager backend (see the module docstring)."""
    mp = pytest.MonkeyPatch()
    mp.setattr(fh, "IDLE_CHUNKS", 1)
    mp.setattr(fh, "MEASURE_STEPS", 1)
    mp.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    yield
    mp.undo()


def make_engine(upstream, schedule: str = "throughput", **kwargs) -> fh.FlashHeadEngine:
    src, checkpoints, wav2vec = upstream
    return fh.FlashHeadEngine(checkpoint_dir=checkpoints, wav2vec_dir=wav2vec, device="cpu",
                              upstream_dir=src, schedule=schedule, **kwargs)


@pytest.fixture(scope="module")
def lite(upstream, cheap_cpu_engine_settings) -> fh.FlashHeadEngine:
    engine = make_engine(upstream)
    engine.avatar = engine.prepare(default_avatar_image(), "default")  # type: ignore[attr-defined]
    engine.other = engine.prepare(  # type: ignore[attr-defined]
        np.ascontiguousarray(default_avatar_image()[:, ::-1]), "mirrored")
    engine.warm_up()
    yield engine
    engine.close()


def voice(seed: int, n: int = STEP) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.1 * rng.standard_normal(n)).astype(np.float32)


def test_the_engine_runs_upstreams_own_pipeline(lite: fh.FlashHeadEngine) -> None:
    pipe = lite.pipeline
    assert type(pipe).__module__ == "flash_head.src.pipeline.flash_head_pipeline"
    assert type(pipe.vae).__name__ == "LtxVAE" and pipe.param_dtype == torch.bfloat16
    assert next(pipe.model.parameters()).dtype == torch.bfloat16
    assert tuple(pipe.config.vae_stride) == (8, 32, 32)
    people = {lite.avatar.data.person, lite.other.data.person}  # type: ignore[attr-defined]
    assert set(pipe.cond_image_dict) == people  # both kept
    frames = lite.open_stream(lite.avatar).step(voice(0))  # type: ignore[attr-defined]
    assert frames.shape == (24, 512, 512, 3) and frames.dtype == np.uint8
    assert lite.step_s and lite.realtime_sessions == 0  # a tiny model on 2 cores


def run_plan(stream: fh.FlashHeadStream, seed: int) -> list[np.ndarray]:
    """Speech, idle frames shown, speech again (encoding the frames shown)."""
    return [stream.step(voice(seed)), *[stream.step(None) for _ in range(3)],
            stream.step(voice(seed + 1))]


def test_interleaved_sessions_get_the_frames_each_gets_alone(lite: fh.FlashHeadEngine) -> None:
    """Upstream's LTX VAE samples its posterior from the global RNG: each session has its
    own state of it, so interleaving changes nothing."""
    graphs = compiled_graphs()
    avatars = {"a": lite.avatar, "b": lite.other}  # type: ignore[attr-defined]
    alone = {k: run_plan(lite.open_stream(avatars[k], seed=i), 10 * i)
             for i, k in enumerate("ab")}
    streams = {k: lite.open_stream(avatars[k], seed=i) for i, k in enumerate("ab")}
    plans = {k: iter([voice(10 * i), None, None, None, voice(10 * i + 1)])
             for i, k in enumerate("ab")}
    together: dict[str, list[np.ndarray]] = {"a": [], "b": []}
    for step in range(5):
        for k in ("ab" if step % 2 else "ba"):
            together[k].append(streams[k].step(next(plans[k])))
    for k in "ab":
        for i, (x, y) in enumerate(zip(alone[k], together[k], strict=True)):
            assert np.array_equal(x, y), f"session {k}, step {i} differs when interleaved"
    assert not np.array_equal(alone["a"][0], alone["b"][0])
    assert compiled_graphs() == graphs and lite.late_graphs == 0


def test_no_graph_is_compiled_after_warm_up(lite: fh.FlashHeadEngine) -> None:
    """Speech after idle (the shown frames are encoded), a barge-in, and an avatar added
    while a session runs: warm-up compiled every graph they need."""
    assert lite.warm_graphs and lite.warm_graphs == compiled_graphs()
    stream = lite.open_stream(lite.avatar)  # type: ignore[attr-defined]
    stream.step(voice(1))
    for _ in range(30):
        stream.step(None)
    stream.step(voice(2))  # speech after idle
    stream.reset()  # barge-in
    stream.step(None)
    stream.step(voice(3))
    third = lite.prepare((default_avatar_image() * 0.8).astype(np.uint8), "darker")
    stream.step(voice(4))  # the session goes on beside the new avatar
    lite.open_stream(third).step(voice(5))
    assert compiled_graphs() == lite.warm_graphs, "a step compiled a graph after warm-up"
    assert lite.late_graphs == 0


def test_a_late_compile_is_counted(lite: fh.FlashHeadEngine, caplog) -> None:
    """What the check above relies on: a new input layout does compile, and is reported."""
    before = compiled_graphs()
    frames = default_avatar_image()[None].repeat(9, axis=0)
    permuted = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].to(torch.bfloat16) / 127.5 - 1
    with fh.upstream_call():
        lite.pipeline.vae.encode(permuted)  # not contiguous: other strides, another graph
    assert compiled_graphs() > before
    with caplog.at_level(logging.WARNING):
        lite.check_compiles()
    assert lite.late_graphs == compiled_graphs() - lite.warm_graphs
    assert "compiled" in caplog.text
    lite.warm_graphs, lite.late_graphs = compiled_graphs(), 0  # for the tests after this one


def test_low_latency_feeds_wav2vec_upstreams_window_and_compiles_once(
        upstream, cheap_cpu_engine_settings, lite: fh.FlashHeadEngine) -> None:
    engine = make_engine(upstream, "low-latency", pipeline=lite.pipeline)
    seen: list[int] = []
    extractor = lite.pipeline.wav2vec_feature_extractor

    def spy(speech, **kwargs):  # what upstream's wav2vec feature extractor is handed
        seen.append(len(speech))
        return extractor(speech, **kwargs)

    lite.pipeline.wav2vec_feature_extractor = spy
    try:
        avatar = engine.prepare(default_avatar_image(), "low")
        engine.warm_up()
        graphs = compiled_graphs()
        stream = engine.open_stream(avatar)
        stream.step(voice(1, 5120))
        for _ in range(10):
            stream.step(None)
        stream.step(voice(2, 5120))
    finally:
        lite.pipeline.wav2vec_feature_extractor = extractor
    assert seen and set(seen) == {WINDOW_SAMPLES}, set(seen)
    assert compiled_graphs() == graphs and engine.late_graphs == 0


def test_a_failed_prepare_leaves_every_other_avatar_working(lite: fh.FlashHeadEngine) -> None:
    pipe = lite.pipeline
    people = dict(pipe.cond_image_dict)
    encode = pipe.vae.encode

    def out_of_memory(video):
        raise RuntimeError("CUDA out of memory (injected by the test)")

    pipe.vae.encode = out_of_memory
    try:
        with pytest.raises(EngineError, match="out of memory.*nothing else changed"):
            lite.prepare(np.ascontiguousarray(default_avatar_image()[:, ::-1]), "doomed")
    finally:
        pipe.vae.encode = encode
    assert pipe.cond_image_dict.keys() == people.keys()
    assert pipe.ref_img_latent_dict.keys() == people.keys()
    for avatar in (lite.avatar, lite.other):  # type: ignore[attr-defined]
        assert lite.open_stream(avatar).step(voice(7)).shape == (24, 512, 512, 3)


def test_upstream_prints_go_to_the_log_and_its_syncs_are_skipped(
        lite: fh.FlashHeadEngine, capfd, caplog) -> None:
    """Upstream prints 7 lines a step and calls torch.cuda.synchronize() ~10 times; on this
    CPU build of torch a sync that got through would raise."""
    with caplog.at_level(logging.DEBUG, logger="avatar_stream.engines.flashhead.upstream"):
        lite.open_stream(lite.avatar).step(voice(8))  # type: ignore[attr-defined]
        print("the test's own line")  # other code's prints still reach stdout
    out = capfd.readouterr().out
    assert "[generate]" not in out and "the test's own line" in out
    assert sum("[generate]" in r.message for r in caplog.records) == 7
    if not torch.cuda.is_available():  # outside the engine, a sync behaves as before
        failed: list[BaseException] = []

        def sync() -> None:
            try:
                torch.cuda.synchronize()
            except BaseException as exc:  # noqa: BLE001 - the test wants to see it
                failed.append(exc)

        t = threading.Thread(target=sync)
        t.start()
        t.join()
        assert failed, "torch.cuda.synchronize() was silenced outside the engine"


def test_a_module_missing_below_upstream_is_named(upstream, monkeypatch) -> None:
    src = upstream[0]
    for name in [m for m in sys.modules if m == "flash_head" or m.startswith("flash_head.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "einops", None)  # as if einops were not installed
    with pytest.raises(UpstreamImportError, match="found but importing it failed.*einops"):
        import_upstream(src)
    with pytest.raises(UpstreamImportError, match="holds no flash_head"):
        import_upstream(str(upstream[1]))  # a folder that is not a checkout


def test_render_with_flashhead(upstream, speech48k, tmp_path: Path) -> None:
    """``avatar-stream render --engine flashhead``: the batch mode, one frame per 40 ms."""
    src, checkpoints, wav2vec = upstream
    speech, out = tmp_path / "speech.wav", tmp_path / "clip.mp4"
    speech.write_bytes(wav_bytes(speech48k[: int(1.2 * 48_000)] / 32768.0, 48_000))
    cmd = [sys.executable, "-m", "avatar_stream", "render", "--engine", "flashhead",
           "--checkpoint-dir", checkpoints, "--wav2vec-dir", wav2vec, "--device", "cpu",
           "--no-compile", "--flashhead-src", src, "--audio", str(speech), "-o", str(out), "-q"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}  # the test shims too
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=500, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "[generate]" not in done.stdout  # upstream's prints went to the log
    with av.open(str(out)) as c:
        frames = sum(1 for p in c.demux(c.streams.video[0]) for _ in p.decode())
    assert frames == 30 and "wrote" in done.stdout


def test_doctor_on_upstream_reports_the_step_after_idle_and_late_compiles(
        upstream, cheap_cpu_engine_settings) -> None:
    from avatar_stream.engines.flashhead.config import FlashHeadOptions
    from avatar_stream.tools.doctor import doctor

    src, checkpoints, wav2vec = upstream
    report = doctor(FlashHeadOptions(checkpoint_dir=checkpoints, wav2vec_dir=wav2vec,
                                     device="cpu", upstream_dir=src), steps=1)
    text = report.render()
    assert not report.problems, text
    lines = dict(report.lines)
    assert lines["upstream"] == str(Path(src).resolve())
    assert "first speech step after a second of idle" in lines["after idle"]
    assert lines["late compiles"].startswith("0 graphs"), text
    assert len(report.steps) == 3 and all(s["step_s"] > 0 for s in report.steps)


def test_pro_loads_through_upstream(upstream) -> None:
    """Pro as far as these cores afford: upstream's Wan VAE (its width is hard-coded) and the
    Pro DiT load from upstream's layout, and the engine's schedule agrees with the loaded
    VAE's stride. A Pro step at 512x512 would take minutes here (README, FlashHead)."""
    src = upstream[0]
    checkpoints, wav2vec = tiny_checkpoints(src, "pro")
    engine = fh.FlashHeadEngine(model="pro", checkpoint_dir=checkpoints, wav2vec_dir=wav2vec,
                                device="cpu", compile=False, upstream_dir=src)
    try:
        pipe = engine.pipeline
        assert type(pipe.vae).__name__ == "WanVAE" and tuple(pipe.config.vae_stride) == (4, 8, 8)
        assert engine.schedule.motion_frames == 5 and engine.schedule.frames_per_step == 28
        with pytest.raises(EngineUnavailable, match="temporal stride of 4"):
            fh.FlashHeadEngine(model="lite", pipeline=pipe)  # Pro's weights, said to be Lite
    finally:
        engine.close()
