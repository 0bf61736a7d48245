"""Offline rendering: the clip has a frame per 40 ms of speech, the speech itself as its sound,
both starting together and in sync (measured on the decoded file), made faster than real
time; and the engine-only speed figure on one core."""

from __future__ import annotations

import io
import wave
from pathlib import Path

import av
import numpy as np
import pytest

from avatar_stream.avatars import facerig
from avatar_stream.avatars.photo import default_avatar_image
from avatar_stream.bench.lipsync import MAX_ABS_LAG_S, MIN_R, measure_lipsync
from avatar_stream.engines.warp.engine import WarpEngine
from avatar_stream.tools.render import (
    ProgressBar,
    SpeechError,
    load_speech,
    measure_render_speed,
    render_clip,
)


@pytest.fixture(scope="module")
def engine_and_avatar(tmp_path_factory: pytest.TempPathFactory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(facerig.CACHE_DIR_ENV, str(tmp_path_factory.mktemp("rig-cache")))
        engine = WarpEngine()
        return engine, engine.prepare(default_avatar_image(), "grace")


def _decode(path: Path) -> dict:
    """Everything the checks need from a clip, read back with FFmpeg."""
    frames, times, audio = [], [], []
    with av.open(str(path)) as c:
        v, a = c.streams.video[0], c.streams.audio[0]
        out = {"video_codec": v.codec_context.name, "audio_codec": a.codec_context.name,
               "video_start": float(v.start_time * v.time_base),
               "audio_start": float(a.start_time * a.time_base), "rate": a.rate}
        for packet in c.demux():
            for frame in packet.decode():
                if isinstance(frame, av.VideoFrame):
                    frames.append(frame.to_ndarray(format="rgb24"))
                    times.append(float(frame.time))
                else:
                    audio.append(frame.to_ndarray().mean(axis=0))
    out.update(frames=frames, times=np.array(times), audio=np.concatenate(audio))
    return out


@pytest.mark.parametrize("suffix", ["webm", "mp4"])
def test_rendered_clip_is_complete_and_in_sync(
    engine_and_avatar, speech_wav: Path, tmp_path: Path, suffix: str
) -> None:
    engine, avatar = engine_and_avatar
    speech, rate = load_speech(speech_wav)
    duration = len(speech) / rate
    out = tmp_path / f"clip.{suffix}"
    progress = io.StringIO()
    result = render_clip(engine, avatar, speech, rate, out, progress=ProgressBar("t", progress))
    print(f"{suffix}: {result.frames} frames for {duration:.2f} s of speech in "
          f"{result.elapsed_s:.2f} s ({result.realtime_factor:.1f}x real time)")
    assert progress.getvalue().rstrip().endswith("real time")  # the bar's final line
    clip = _decode(out)
    assert (clip["video_codec"], clip["audio_codec"]) == (
        ("vp8", "opus") if suffix == "webm" else ("h264", "aac"))
    # a frame for every 40 ms of speech, and the speech itself as the sound
    assert abs(len(clip["frames"]) - duration * 25) <= 1
    assert abs(len(clip["audio"]) / clip["rate"] - duration) <= 0.04
    # both start at zero, frames 40 ms apart
    assert clip["video_start"] == 0.0 and abs(clip["audio_start"]) <= 0.001
    assert np.allclose(np.diff(clip["times"]), 0.04, atol=1e-3)
    # and in sync, measured on what a player would show and play
    sync = measure_lipsync(clip["frames"], clip["times"], clip["audio"], clip["rate"])
    print(f"{suffix}: {sync}")
    assert sync.r >= MIN_R and abs(sync.lag_s) <= MAX_ABS_LAG_S
    # faster than real time: on wall time when the machine is ours, and always in CPU time
    # (drawing and encoding together take well under the clip's duration)
    print(f"{suffix}: CPU {result.cpu_s:.2f} s for {duration:.2f} s of clip")
    assert result.cpu_s < duration


def test_render_command(speech_wav: Path, tmp_path: Path, capsys) -> None:
    from avatar_stream.tools.cli import main as cli

    out = tmp_path / "hello.webm"
    with pytest.raises(SystemExit) as code:
        cli(["render", "--audio", str(speech_wav), "-o", str(out)])
    assert code.value.code == 0
    assert "wrote" in capsys.readouterr().out and out.stat().st_size > 10_000
    for bad in (["--audio", str(speech_wav), "-o", str(tmp_path / "x.avi")],
                ["--audio", str(tmp_path / "missing.wav"), "-o", str(out)],
                ["--avatar", str(speech_wav), "--audio", str(speech_wav), "-o", str(out)]):
        with pytest.raises(SystemExit) as code:
            cli(["render", "-q", *bad])
        assert code.value.code == 2
    err = capsys.readouterr().err
    assert "not an image" in err and ".webm or .mp4" in err


def test_load_speech_any_format_and_errors(tmp_path: Path) -> None:
    stereo = np.stack([np.sin(np.arange(22050) / 10), np.zeros(22050)], axis=1)
    path = tmp_path / "stereo.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(22050)
        w.writeframes((stereo * 16000).astype(np.int16).tobytes())
    x, rate = load_speech(path)
    assert rate == 22050 and len(x) == 22050 and x.dtype == np.float32
    assert 0.2 < np.abs(x).max() < 0.3  # downmixed: half of the left channel
    for junk in (b"", b"RIFF nonsense"):
        with pytest.raises(SpeechError):
            load_speech(junk)


def test_engine_only_speed_on_one_core(engine_and_avatar) -> None:
    """The issue's figure: <= 4 ms per 512x512 frame on one core. Reported, and held to a
    loose bound here because CI machines are shared."""
    engine, avatar = engine_and_avatar
    result = measure_render_speed(avatar, seconds=8.0, threads=1, engine=engine)
    print("engine-only speed, one core:", result)
    assert result["threads"] == 1 and result["frames"] == 200
    assert result["cpu_ms_per_frame"] < 15.0
