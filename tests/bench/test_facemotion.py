"""Face motion measured by the face rig: right sign on known poses, then what the turn states
do to the face an aiortc client receives from the real server (warp engine): the user speaks
(the microphone as the user's voice: listening, nods with the voice), the front-end sets
``thinking``, then pushes the reply, which must lip-sync as well as speech from idle."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import pytest_asyncio
from speechtools import at_rate, until

from avatar_stream.audio.gate import LiveSpeechGate, loudness
from avatar_stream.avatars.photo import default_avatar_image
from avatar_stream.bench.facemotion import FaceMotion, face_motion
from avatar_stream.bench.lipsync import MIN_R, LipSync, measure_lipsync
from avatar_stream.client.avatarclient import MIC_RATE, AvatarClient, Received
from avatar_stream.config import ServerConfig
from avatar_stream.engines.warp.engine import WarpEngine
from avatar_stream.engines.warp.paint import render
from avatar_stream.engines.warp.rig import Controls
from avatar_stream.transports.http.app import running_server


def test_known_poses_are_read_back(tmp_path, monkeypatch) -> None:
    """Frames drawn with set head poses and brows: the measure moves the right way."""
    monkeypatch.setenv("AVATAR_STREAM_CACHE_DIR", str(tmp_path))
    rig = WarpEngine().prepare(default_avatar_image(), "grace").data
    poses = [Controls(), Controls(yaw=5.0), Controls(pitch=-3.0), Controls(roll=3.0),
             Controls(brow=1.0)]
    fm = face_motion([render(rig, c) for c in poses])
    assert np.isfinite(fm.brow).all()
    (yaw0, pitch0, roll0), brow0 = fm.pose[0], fm.brow[0]
    assert abs(fm.pose[1][0] - yaw0) > 1.5  # a turn reads as one
    assert fm.pose[2][1] - pitch0 > 1.5  # negative control pitch: the head goes up
    assert abs(fm.pose[3][2] - roll0) > 1.0
    assert fm.brow[4] > brow0  # brows up: further from the eyes
    stats = fm.stats(slice(0, 2))
    assert stats.frames == 2 and stats.displacement > 0 and stats.motion > 0


# -- over a real session ----------------------------------------------------------------------

EASE_S = 0.8  # a state's pose has settled this long after it changed


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def server():
    config = ServerConfig(host="127.0.0.1", port=0, ice_host_addresses=["127.0.0.1"],
                          max_sessions=2)
    async with running_server(config) as (url, state):
        yield url


def frames_between(rec: Received, t0: float, t1: float) -> np.ndarray:
    """Indices of the frames received in [t0, t1) (perf_counter)."""
    t = np.asarray(rec.video_t)
    return np.nonzero((t >= t0) & (t < t1))[0]


def received_lipsync(rec: Received, openings: np.ndarray, t0: float, t1: float) -> LipSync:
    """``lipsync.measure_lipsync`` on what arrived in [t0, t1): the rig's lip gap on the
    received frames against the received audio, both at network arrival (as the bench)."""
    at = np.asarray(rec.audio_net_t)
    a = np.nonzero((at >= t0) & (at < t1))[0]
    v = frames_between(rec, t0, t1)
    audio = np.concatenate([rec.audio[i] for i in a])
    times = np.asarray(rec.video_net_t)[v] - at[a[0]]
    return measure_lipsync(openings[v], times, audio, MIC_RATE)


def detrend(x: np.ndarray, n: int = 37) -> np.ndarray:
    """Minus its 1.5 s moving average: the slow drift of an idle head is not a nod."""
    return x - np.convolve(x, np.ones(n) / n, mode="same")


def nods_with_voice(rec: Received, fm: FaceMotion, window: tuple[float, float],
                    voice: np.ndarray, voice_t0: float) -> float:
    """Pearson r of the head going down (pitch) against the loudness of the user's voice
    (as the server's gate reads it, smoothed over 0.2 s), at the best lag up to 0.8 s."""
    frames = frames_between(rec, *window)
    frames = frames[np.isfinite(fm.pose[frames, 1])]
    down = detrend(-fm.pose[frames, 1])
    gate = LiveSpeechGate()
    energy = np.convolve([loudness(voice[i : i + 960], gate)
                          for i in range(0, len(voice) - 960, 960)], np.ones(10) / 10, "same")
    t = np.asarray(rec.video_t)[frames] - voice_t0
    best = -1.0
    for lag in np.arange(0.0, 0.8, 0.04):
        heard = detrend(np.interp(t - lag, np.arange(len(energy)) * 0.02, energy))
        best = max(best, float(np.corrcoef(down[20:-20], heard[20:-20])[0, 1]))
    return best


def gray_rgb(crops: list[np.ndarray]) -> list[np.ndarray]:
    return [np.repeat(c[:, :, None], 3, axis=2) for c in crops]


async def state_at(client: AvatarClient, state: str, timeout: float = 10) -> float:
    """When the session reported showing ``state`` (waits for it)."""
    await asyncio.wait_for(
        client.wait_event("state.changed", lambda e: e["state"] == state), timeout)
    return time.perf_counter()


async def finished(client: AvatarClient) -> float:
    await client.wait_event("speech.finished")
    return time.perf_counter()


async def received_after(client: AvatarClient, t: float, seconds: float = 0.5) -> None:
    """Until the audio received reaches ``seconds`` past ``t``: the last frames of what
    ended at ``t`` have arrived."""
    assert await until(lambda: client.received.audio_net_t[-1] > t + seconds, 5)


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.timeout(180)
async def test_turn_states_change_the_received_face(server, speech48k) -> None:
    url = server
    voice = at_rate(speech48k, MIC_RATE)  # the user's question, ~8 s
    reply = speech48k  # the avatar's answer, ~8 s
    async with AvatarClient(url, record_mouth=False, record_face=True,
                            microphone="listen") as client:
        rec = client.received
        await until(lambda: len(rec.video_t) >= 4 * 25, 15)
        idle = (rec.video_t[25], time.perf_counter())
        # the user speaks: the microphone makes the avatar listen, nodding with the voice
        client.mic.play(voice)
        t_listen = await state_at(client, "listening")
        t_user_done = await state_at(client, "idle")
        listening = (t_listen + EASE_S, t_user_done)
        await client.set_state("thinking")  # the front-end's LLM works on the answer
        t_think = await state_at(client, "thinking")
        await asyncio.sleep(EASE_S + 3.0)
        thinking = (t_think + EASE_S, time.perf_counter())
        # the answer: speaking wins, thinking ends with it
        await client.push_speech(reply, MIC_RATE)
        await received_after(client, await asyncio.wait_for(finished(client), 30))
        after_thinking = (thinking[1], time.perf_counter())
        await state_at(client, "idle")
        # the same answer from idle, as every reply was spoken before turn states
        await asyncio.sleep(1.0)
        t_idle_reply = time.perf_counter()
        await client.push_speech(reply, MIC_RATE)
        await received_after(client, await asyncio.wait_for(finished(client), 30))
        from_idle = (t_idle_reply, time.perf_counter())
        faces = gray_rgb(rec.faces)
    events = [e for _, e in rec.events if e["type"] == "state.changed"]
    assert [e["state"] for e in events] == ["listening", "idle", "thinking", "speaking", "idle",
                                            "speaking", "idle"], events
    assert not any(e["type"] == "speech.started" and e["utterance_id"].startswith("mic")
                   for _, e in rec.events)  # the user's voice was not spoken

    fm = face_motion(faces)
    idle_i = frames_between(rec, *idle)
    stats = {name: fm.stats(frames_between(rec, *window), fm, idle_i)
             for name, window in (("idle", idle), ("listening", listening),
                                  ("thinking", thinking))}
    for name, s in stats.items():
        print(f"{name:9s} {s}")
    assert all(s.frames >= 40 for s in stats.values()), stats  # the rig saw the face
    base, listen, think = stats["idle"], stats["listening"], stats["thinking"]

    # thinking: the head turns aside and up with a tilt, far from the idle face
    assert abs(think.pose[0] - base.pose[0]) > 2.0
    assert think.pose[1] - base.pose[1] > 1.5  # up
    assert abs(think.pose[2] - base.pose[2]) > 0.7
    assert think.displacement > 2.5 * base.displacement

    # listening: leaning in (the head a little down), further from the idle face than idle
    # itself strays, and nodding with the user's voice: the head goes down as it gets loud
    assert base.pose[1] - listen.pose[1] > 0.5
    assert listen.displacement > base.displacement
    r_nod = nods_with_voice(rec, fm, listening, voice, client.mic.play_started[-1][0])
    print(f"head pitch against the user's voice: r = {r_nod:.2f}")
    assert r_nod > 0.15

    # speaking: the reply after thinking lip-syncs as well as the same reply from idle
    openings = fm.mouth
    r_think = received_lipsync(rec, openings, *after_thinking)
    r_idle = received_lipsync(rec, openings, *from_idle)
    print(f"reply after thinking: {r_think}; the same from idle: {r_idle}")
    # received over a loaded machine r moves by a few hundredths from run to run (0.68 to
    # 0.85 here, before turn states too): the engine-level test in test_lipsync.py holds
    # the tight bound; here, clearly in sync and not clearly worse than from idle
    assert r_think.r >= MIN_R - 0.1
    assert r_think.r >= r_idle.r - 0.08
