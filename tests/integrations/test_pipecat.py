"""The Pipecat adapters against a real avatar-stream server on loopback (warp engine), in real
Pipecat pipelines run by Pipecat's own test runner, with a real TTS service class speaking
espeak-ng speech: the relay's frames reach the pipeline lip-synced at 25 fps with the speech
back in order, a barge-in cuts the speech at the server at once, and nothing is left behind
when the pipeline ends."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
from loopback_server import loopback_server  # noqa: F401  (the fixture `server`)
from pipecat.frames.frames import (
    BotSpeakingFrame,
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    CancelFrame,
    ErrorFrame,
    InterruptionFrame,
    OutputAudioRawFrame,
    OutputImageRawFrame,
    TTSAudioRawFrame,
    TTSSpeakFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.processors.frame_processor import FrameDirection
from pipecat.tests.utils import SleepFrame, run_test
from pipecat_probe import Recorder
from speech_backend import RecordingEspeak
from speechtools import (
    AUDIO_AFTER_EVENT_S,
    envelope_match,
    events,
    received_between,
    until,
    utterance_window,
)
from webrtc_visitor import Visitor

from avatar_stream.bench.lipsync import measure_lipsync
from avatar_stream.client.avatarclient import AvatarClient
from avatar_stream.integrations import pipecat as pipecat_adapter
from avatar_stream.integrations.pipecat import (
    AvatarStreamSessionDriver,
    AvatarStreamTTSService,
    AvatarStreamVideoService,
)

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(150)]

FIRST = "Good morning. The weather today is bright and sunny, with a light breeze."
SECOND = "Would you like to hear more about it?"
LONG = ("Let me tell you a long story about a lighthouse keeper who lived alone on a rocky "
        "island, far out at sea, and kept the lamp burning every night for forty years.")


def espeak_tts() -> tuple[AvatarStreamTTSService, RecordingEspeak]:
    """A real Pipecat TTS service speaking espeak-ng speech, and what it said."""
    voice = RecordingEspeak()
    return AvatarStreamTTSService(voice), voice


def relay(url: str) -> AvatarStreamVideoService:
    return AvatarStreamVideoService(url=url, ice_host_addresses=["127.0.0.1"])


def spy_on_audio(state, session_id: str, sent: list[tuple[float, float]],
                 then: Callable[[], None] | None = None) -> None:
    """Note every 20 ms of audio the server sends for the session in ``sent``, as
    (perf_counter, rms), when the session's pacer hands it over; ``then()`` after each."""
    sink = state.sessions[session_id].sync.sink
    send = sink.send_audio

    def spy(samples: np.ndarray, start: int) -> None:
        x = samples.astype(np.float32) / 32768.0
        sent.append((time.perf_counter(), float(np.sqrt(np.mean(x * x)))))
        send(samples, start)
        if then is not None:
            then()

    sink.send_audio = spy


def steady(times: list[float]) -> np.ndarray:
    """Arrival times on the straight line through them: frame i at a + b * i."""
    index = np.arange(len(times))
    slope, start = np.polyfit(index, np.asarray(times), 1)
    return start + slope * index


# threads that pools grow on demand and keep: the server's engine pool, asyncio's executor
POOLS = ("engine", "asyncio_")


def leftovers(threads_before: set[str]) -> set[str]:
    """Threads started since, other than pool threads (the relay's own converter thread and
    aiortc's per-track codec threads must all be gone)."""
    now = {t.name for t in threading.enumerate()}
    return {name for name in now - threads_before if not name.startswith(POOLS)}


async def test_relay_frames_are_lip_synced_at_25_fps_with_the_speech_in_order(server) -> None:
    url, state = server
    threads_before = {t.name for t in threading.enumerate()}
    tasks_before = asyncio.all_tasks()
    (tts, voice), tap, avatar, out = espeak_tts(), Recorder(), relay(url), Recorder()
    down, _ = await run_test(
        Pipeline([tts, tap, avatar, out]),
        frames_to_send=[TTSSpeakFrame(FIRST), TTSSpeakFrame(SECOND)],
        start_timeout=30,
    )
    # the TTS spoke two contexts; none of its audio went past the relay, the avatar's did
    contexts = [f.context_id for _, f in tap.of(TTSStartedFrame)]
    assert len(contexts) == 2 and [f.context_id for _, f in tap.of(TTSStoppedFrame)] == contexts
    assert not [f for f in down if isinstance(f, (TTSAudioRawFrame, TTSStoppedFrame))]
    assert [f.context_id for f in down if isinstance(f, TTSStartedFrame)] == contexts

    images = out.of(OutputImageRawFrame)
    audio = out.of(OutputAudioRawFrame)
    started = out.of(BotStartedSpeakingFrame)
    stopped = out.of(BotStoppedSpeakingFrame)
    assert started and stopped and out.of(BotSpeakingFrame)
    assert tap.of(BotStartedSpeakingFrame, FrameDirection.UPSTREAM)  # the TTS hears it too
    t0, t1 = started[0][0], stopped[-1][0]
    assert all(f.size == (512, 512) and f.format == "RGB" for _, f in images)
    speaking = [t for t, _ in images if t0 <= t <= t1]
    fps = (len(speaking) - 1) / (speaking[-1] - speaking[0])
    print(f"relay: {len(images)} frames, {fps:.1f} fps while speaking ({t1 - t0:.1f} s)")
    assert 23.5 <= fps <= 26.5

    # the speech came back, both replies, in order, each where it should be
    pcm = np.concatenate([np.frombuffer(f.audio, np.int16) for _, f in audio])
    rate = audio[0][1].sample_rate
    got = pcm.astype(np.float32) / 32768.0
    offsets = []
    for text in (FIRST, SECOND):
        samples, sr = voice.said(text)
        offset, r = envelope_match(samples, sr, got, rate)
        print(f"relay: reply {text[:12]!r} back at {offset:.2f} s, envelope r={r:.3f}")
        assert r >= 0.85
        offsets.append((offset, len(samples) / sr))
    assert offsets[0][0] + offsets[0][1] - 0.1 <= offsets[1][0]
    # the last reply's media all went down before the EndFrame ended the pipeline
    assert len(got) / rate >= offsets[1][0] + offsets[1][1]

    # and the lips move with it, as a transport that plays both at a steady rate shows them
    # (arrival times smoothed: the machine's load jitters them, a player's buffer does not)
    audio_t = steady([t for t, _ in audio])
    first_audio_t = audio_t[0] - len(audio[0][1].audio) / 2 / rate
    frames = [np.frombuffer(f.image, np.uint8).reshape(512, 512, 3) for t, f in images
              if t0 <= t <= t1]
    sync = measure_lipsync(frames, steady(speaking), got, rate, speech_t0=first_audio_t)
    print(f"relay: {sync}")
    assert sync.r >= 0.7 and abs(sync.lag_s) <= 0.08, sync

    # nothing left: the session is gone from the server, the relay's threads and tasks too
    assert avatar.client is None
    assert await until(lambda: not state.sessions, 10), list(state.sessions)
    assert await until(lambda: not leftovers(threads_before), 10), leftovers(threads_before)
    current = {asyncio.current_task()}
    assert await until(lambda: not asyncio.all_tasks() - tasks_before - current, 10), \
        asyncio.all_tasks() - tasks_before - current


async def test_relay_barge_in_cuts_the_speech_at_the_server_and_the_next_reply_plays(
        server) -> None:
    url, state = server
    avatar = relay(url)
    sent: list[tuple[float, float]] = []  # the server's audio: (time, rms) per 20 ms
    cut_at: list[float] = []
    tasks: list[asyncio.Task[None]] = []

    class BargeIn(Recorder):
        """Spies on the server's audio once the relay has its session, and barges in (an
        InterruptionFrame both ways, as Pipecat's user turn processor does) mid-word, one
        second into the reply."""

        def watch(self) -> None:
            loud = [t for t, rms in sent if rms > 0.02]
            if not cut_at and loud and loud[-1] - loud[0] >= 1.0 and \
                    all(rms > 0.02 for _, rms in sent[-3:]):
                cut_at.append(time.perf_counter())
                tasks.append(asyncio.create_task(self.broadcast_frame(InterruptionFrame)))

        async def process_frame(self, frame, direction):
            if isinstance(frame, TTSStartedFrame) and not self.of(TTSStartedFrame):
                spy_on_audio(state, avatar.client.session_id, sent, self.watch)
            await super().process_frame(frame, direction)

    (tts, _), tap, out = espeak_tts(), BargeIn(), Recorder()
    await run_test(
        Pipeline([tts, tap, avatar, out]),
        frames_to_send=[TTSSpeakFrame(LONG), SleepFrame(4.0), TTSSpeakFrame(SECOND)],
        start_timeout=30,
    )
    await asyncio.gather(*tasks)
    assert cut_at, "the reply never played for a second"
    t_cut = cut_at[0]
    next_reply = tap.of(TTSStartedFrame)[1][0]
    after = [(t, rms) for t, rms in sent if t_cut < t < next_reply]
    # the first quiet 20 ms after the barge-in, and nothing loud after it until the next reply
    quiet = next(t for t, rms in after if rms < 0.001)
    assert not [t for t, rms in after if t > quiet and rms > 0.001]
    cut_s = quiet - t_cut
    print(f"relay: barge-in (mid-word) -> silence at the server in {1000 * cut_s:.0f} ms")
    assert cut_s <= 0.1
    # the pipeline heard the avatar stop, and the next reply played
    assert any(t_cut <= t <= t_cut + 0.5 for t, _ in out.of(BotStoppedSpeakingFrame))
    assert [t for t, rms in sent if t > next_reply and rms > 0.02]
    assert await until(lambda: not state.sessions, 10)


async def test_relay_ends_without_blocking_the_event_loop(server, monkeypatch) -> None:
    """A picture conversion still running on the relay's converter thread when the
    pipeline ends (a loaded machine): the relay waits for that thread off the event loop,
    which goes on running meanwhile (every other session of the bot's process with it)."""
    url, state = server
    release, done = threading.Event(), threading.Event()
    beats = [time.perf_counter()]
    real_rgb = pipecat_adapter._rgb_bytes

    def stuck_rgb(frame):  # in flight at the end: it finishes when the test says so
        release.wait(10)
        return real_rgb(frame)

    monkeypatch.setattr(pipecat_adapter, "_rgb_bytes", stuck_rgb)
    avatar = relay(url)

    async def heartbeat() -> None:
        had_client = False
        while True:
            beats.append(time.perf_counter())
            had_client = had_client or avatar.client is not None
            if had_client and avatar.client is None:
                release.set()  # the relay is closing: the conversion may end now
            await asyncio.sleep(0.02)

    def watchdog() -> None:  # a loop stalled for a second: let the conversion end
        while not done.wait(0.05):
            if time.perf_counter() - beats[-1] > 1.0:
                release.set()

    beating = asyncio.create_task(heartbeat())
    guard = threading.Thread(target=watchdog, name="test-watchdog")
    guard.start()
    try:
        (tts, _), out = espeak_tts(), Recorder()
        await run_test(Pipeline([tts, avatar, out]), frames_to_send=[TTSSpeakFrame(SECOND)],
                       start_timeout=30)
    finally:
        done.set()
        release.set()
        guard.join()
        beating.cancel()
    stall = max(b - a for a, b in zip(beats, beats[1:], strict=False))
    print(f"relay end: the event loop's longest stall {1000 * stall:.0f} ms")
    assert stall < 0.5
    assert out.of(BotStoppedSpeakingFrame)
    assert await until(lambda: not state.sessions, 10)


async def test_driver_speaks_through_the_browsers_session_and_sets_turn_states(server) -> None:
    """The browser-direct shape: an aiortc client stands in for the browser that holds and
    watches the session; the pipeline drives it with the session id and token only."""
    url, state = server
    async with AvatarClient(url, record_mouth=False) as browser:
        shown: list[tuple[float, str]] = []
        state.sessions[browser.session_id].listeners.append(
            lambda e: shown.append((time.perf_counter(), e["state"]))
            if e["type"] == "state.changed" else None)
        driver = AvatarStreamSessionDriver(url=url, session_id=browser.session_id,
                                           token=browser.token)
        (tts, voice), tap, out = espeak_tts(), Recorder(), Recorder()
        down, _ = await run_test(
            Pipeline([tts, tap, driver, out]),
            frames_to_send=[UserStartedSpeakingFrame(), SleepFrame(0.4),
                            UserStoppedSpeakingFrame(), SleepFrame(0.4),
                            TTSSpeakFrame(FIRST), TTSSpeakFrame(SECOND)],
            start_timeout=30,
        )
        rec = browser.received
        assert await until(lambda: len(events(rec, "speech.finished")) >= 2, 10)
        await asyncio.sleep(AUDIO_AFTER_EVENT_S)  # the last frame's audio, after its event
        assert browser.session_id in state.sessions  # the browser's session outlives the bot

    contexts = [f.context_id for _, f in tap.of(TTSStartedFrame)]
    assert len(contexts) == 2
    # the TTS audio stopped at the driver; the TTS frames around it went on
    assert not [f for f in down if isinstance(f, TTSAudioRawFrame)]
    assert [f.context_id for f in down if isinstance(f, TTSStoppedFrame)] == contexts
    # the utterances are the TTS contexts, spoken in order, in full
    finished = [e for _, e in events(rec, "speech.finished")]
    assert [e["utterance_id"] for e in finished] == contexts
    assert not any(e["interrupted"] for e in finished)
    for context, text, e in zip(contexts, (FIRST, SECOND), finished, strict=True):
        samples, sr = voice.said(text)
        assert e["position_s"] == pytest.approx(len(samples) / sr, abs=0.05)
        t0, t1, _ = utterance_window(rec, context)
        offset, r = envelope_match(samples, sr, received_between(rec, t0, t1 + 0.5))
        assert r >= 0.85, (context, r)
    # the pipeline heard the bot speak when the browser did (the events, ~at once)
    (t_start, _), = events(rec, "speech.started", contexts[0])
    bot_started = out.of(BotStartedSpeakingFrame)[0][0]
    assert abs(bot_started - t_start) < 0.1
    assert out.of(BotStoppedSpeakingFrame)[-1][0] >= events(rec, "speech.finished")[-1][0]
    # the face: listening while the user spoke, thinking until the reply, then speaking
    states = [s for _, s in shown]
    print(f"driver: states shown {states}")
    assert states[:3] == ["listening", "thinking", "speaking"] and states[-1] == "idle"
    assert "thinking" not in states[3:]  # the answer came: not thinking again after it


async def test_driver_goes_on_when_the_session_ends_under_it(server) -> None:
    """The browser's session deleted while the bot speaks: the pipeline hears of it (a
    non-fatal ErrorFrame upstream), the next reply finishes at once, and the EndFrame
    ends the pipeline without waiting for an avatar that is gone."""
    url, state = server
    async with AvatarClient(url, record_mouth=False) as browser:
        driver = AvatarStreamSessionDriver(url=url, session_id=browser.session_id,
                                           token=browser.token)
        (tts, _), out = espeak_tts(), Recorder()

        async def delete_once_speaking() -> None:
            await asyncio.wait_for(browser.wait_event("speech.started"), 30)
            await browser.delete()

        deleting = asyncio.create_task(delete_once_speaking())
        try:
            _, up = await asyncio.wait_for(run_test(
                Pipeline([tts, driver, out]),
                frames_to_send=[TTSSpeakFrame(LONG), SleepFrame(3.0), TTSSpeakFrame(SECOND)],
                start_timeout=30,
            ), 40)  # the driver's drain timeout is 60 s: a stalled EndFrame would show
        finally:
            await deleting
    errors = [f for f in up if isinstance(f, ErrorFrame)]
    assert len(errors) == 1 and "ended" in errors[0].error and not errors[0].fatal
    assert out.of(BotStartedSpeakingFrame) and out.of(BotStoppedSpeakingFrame)


async def test_cancelling_the_driver_stops_the_avatar_and_leaves_it_idle(server) -> None:
    """A CancelFrame while the avatar speaks a long reply and the user has started to talk:
    the browser's avatar stops speaking at once (not the rest of the reply) and does not
    stay listening (the server's turn state has no timeout)."""
    url, state = server
    async with AvatarClient(url, record_mouth=False) as browser:
        session = state.sessions[browser.session_id]
        driver = AvatarStreamSessionDriver(url=url, session_id=browser.session_id,
                                           token=browser.token)
        (tts, _), tap = espeak_tts(), Recorder()
        await asyncio.wait_for(run_test(
            Pipeline([tts, tap, driver]),
            frames_to_send=[TTSSpeakFrame(LONG), SleepFrame(2.5), UserStartedSpeakingFrame(),
                            SleepFrame(0.3), CancelFrame()],
            send_end_frame=False, start_timeout=30,
        ), 30)
        t_cancelled = time.perf_counter()
        rec = browser.received
        assert await until(lambda: events(rec, "speech.finished"), 5)
        assert await until(lambda: session.turn.shown == "idle", 5)
    (t_started, started), = events(rec, "speech.started")
    (t_finished, finished), = events(rec, "speech.finished")
    assert finished["utterance_id"] == started["utterance_id"] == \
        tap.of(TTSStartedFrame)[0][1].context_id
    assert finished["interrupted"] and finished["position_s"] < 5.0
    assert t_finished - t_cancelled < 1.0
    assert session.turn.requested == "idle"


@pytest.fixture
def aiortc_chunk_size_restored():
    """Importing Pipecat's SmallWebRTC module lowers aiortc's SCTP chunk size for the whole
    process (its own fix for large datagrams): put it back for the tests that follow."""
    from aiortc import rtcsctptransport

    size = rtcsctptransport.USERDATA_MAX_LENGTH
    yield
    rtcsctptransport.USERDATA_MAX_LENGTH = size


async def test_relay_through_pipecats_smallwebrtc_transport_reaches_a_webrtc_viewer(
        server, aiortc_chunk_size_restored) -> None:
    """The relay's whole point: the bot's own transport carries the avatar. Here that is
    Pipecat's SmallWebRTC transport, and a WebRTC peer (aiortc) is the user at the other end:
    it receives the avatar's video and voice from the bot, not from avatar-stream."""
    from pipecat.transports.base_transport import TransportParams
    from pipecat.transports.smallwebrtc.connection import SmallWebRTCConnection
    from pipecat.transports.smallwebrtc.transport import SmallWebRTCTransport

    url, state = server
    viewer = Visitor()
    connection = SmallWebRTCConnection()
    await connection.initialize(sdp=await viewer.offer(), type="offer")
    await viewer.answered(connection.get_answer()["sdp"])
    transport = SmallWebRTCTransport(connection, TransportParams(
        audio_out_enabled=True, video_out_enabled=True, video_out_is_live=True,
        video_out_width=512, video_out_height=512, video_out_framerate=25))
    (tts, voice), avatar, out = espeak_tts(), relay(url), Recorder()
    try:
        await run_test(
            Pipeline([tts, avatar, transport.output(), out]),
            frames_to_send=[SleepFrame(1.0), TTSSpeakFrame(FIRST)],
            start_timeout=30,
        )
    finally:
        await viewer.close()
    t0 = out.of(BotStartedSpeakingFrame)[0][0]
    t1 = out.of(BotStoppedSpeakingFrame)[-1][0]
    fps = viewer.fps(t0, t1)
    got = viewer.heard()
    samples, rate = voice.said(FIRST)
    offset, r = envelope_match(samples, rate, got)
    print(f"smallwebrtc viewer: {len(viewer.video_t)} frames, {fps:.1f} fps while the avatar "
          f"spoke, its voice back with envelope r={r:.3f}")
    assert fps >= 22
    # 0.87-0.98 on a quiet machine; Pipecat's output transport paces the voice itself and,
    # on two loaded cores, sometimes stutters (0.73-0.76 seen): still the same speech
    assert r >= 0.6
    assert await until(lambda: not state.sessions, 10)
