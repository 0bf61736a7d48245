"""SegmentSender against a real server on loopback: every segment is reported finished
exactly once, whatever becomes of it (played, empty, cut before the server heard of it, the
session gone), and only the adapter's own utterances count."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
from loopback_server import loopback_server  # noqa: F401  (the fixture `server`)
from speechtools import at_rate, envelope_match, received_between, until

from avatar_stream.client.avatarclient import AvatarClient
from avatar_stream.client.sessioncontrol import SessionControl, to_pcm16
from avatar_stream.config import ServerConfig
from avatar_stream.integrations.segments import Segment, SegmentSender
from avatar_stream.transports.http.app import running_server

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(90)]


class Reports:
    """What the sender reported, in order: ("started" | "finished", id, position, cut)."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, float, bool]] = []

    def started(self, segment: Segment) -> None:
        self.rows.append(("started", segment.id, 0.0, False))

    def finished(self, segment: Segment, position_s: float, interrupted: bool) -> None:
        self.rows.append(("finished", segment.id, position_s, interrupted))

    def of(self, kind: str) -> list[tuple[str, float, bool]]:
        return [(uid, pos, cut) for k, uid, pos, cut in self.rows if k == kind]


@contextlib.asynccontextmanager
async def driving(url: str, **options: Any) -> AsyncIterator[
        tuple[AvatarClient, SegmentSender, Reports]]:
    """A session a browser (an aiortc client) holds, and a SegmentSender driving it over
    the session's WebSocket, its reports noted. The sender closes before the browser."""
    async with AvatarClient(url, record_mouth=False) as browser:
        control = SessionControl(url, browser.session_id, browser.token)
        await control.connect()
        reports = Reports()
        sender = SegmentSender(control, on_started=reports.started,
                               on_finished=reports.finished, **options)
        await sender.start()
        try:
            yield browser, sender, reports
        finally:
            await sender.close()
            await control.close()


def pcm(speech48k: np.ndarray, seconds: float, rate: int = 24_000) -> bytes:
    return to_pcm16(at_rate(speech48k, rate)[: int(seconds * rate)])[0]


async def test_every_segment_finishes_exactly_once(server, speech48k) -> None:
    url, state = server
    async with driving(url, finish_timeout_s=0.5) as (browser, sender, reports):

        # played in full, in 100 ms pieces as a TTS streams them: started, then finished
        played = sender.open("ctx-1")
        for i in range(10):
            await sender.audio(played, pcm(speech48k, 1.0)[i * 4800 : (i + 1) * 4800], 24_000)
        await sender.end(played)
        # the same TTS context again: a fresh utterance id, the session would refuse the old
        again = sender.open("ctx-1")
        assert again.id != "ctx-1"
        await sender.audio(again, pcm(speech48k, 0.5), 24_000)
        await sender.end(again)
        # ended with no audio: finished at once, nothing sent
        empty = sender.open()
        await sender.end(empty)
        assert reports.of("finished")[-1] == (empty.id, 0.0, False)
        assert await sender.drain(15)

        # another driver's utterance on the same session is none of ours
        await browser.push_speech(at_rate(speech48k, 24_000)[:12_000], 24_000, "someone-else")
        # cut before the server heard of it: the sender never sends it, the timeout ends it
        queued = sender.open()
        await sender.audio(queued, pcm(speech48k, 1.0), 24_000)
        assert sender.interrupt() == [queued]
        assert sender.interrupt() == []  # nothing unfinished: no second barge-in is sent
        assert await sender.drain(5)
        assert reports.of("finished")[-1] == (queued.id, 0.0, True)

        # the session goes away mid-segment: it finishes, interrupted
        gone = sender.open()
        await sender.audio(gone, pcm(speech48k, 3.0), 24_000)
        assert await until(lambda: any(r[1] == gone.id for r in reports.rows), 10)
        await browser.delete()
        assert await sender.drain(5)

    finished = reports.of("finished")
    ids = [uid for uid, _, _ in finished]
    assert sorted(ids) == sorted({played.id, again.id, empty.id, queued.id, gone.id})
    assert len(ids) == len(set(ids))  # exactly once each
    assert [uid for uid, _, _ in reports.of("started")] == [played.id, again.id, gone.id]
    positions = {uid: (pos, cut) for uid, pos, cut in finished}
    assert positions[played.id][0] == pytest.approx(1.0, abs=0.03)
    assert positions[again.id][0] == pytest.approx(0.5, abs=0.03)
    assert positions[gone.id][1] and 0 < positions[gone.id][0] < 3.0
    assert "someone-else" not in ids
    # started comes before finished for each
    order = [(k, uid) for k, uid, _, _ in reports.rows]
    for uid in (played.id, again.id, gone.id):
        assert order.index(("started", uid)) < order.index(("finished", uid))


async def test_a_barge_in_goes_ahead_of_speech_queued_after_it(server, speech48k) -> None:
    """clear_buffer, then at once the next reply: the server sees the interrupt first, so
    the next reply is not cut by it."""
    url, state = server
    async with driving(url) as (browser, sender, reports):
        first = sender.open()
        await sender.audio(first, pcm(speech48k, 3.0), 24_000)
        assert await until(lambda: browser.received.events and any(
            e.get("type") == "speech.started" for _, e in browser.received.events), 10)
        sender.interrupt()
        second = sender.open()
        await sender.audio(second, pcm(speech48k, 0.6), 24_000)
        await sender.end(second)
        assert await sender.drain(15)
    results = {uid: (pos, cut) for uid, pos, cut in reports.of("finished")}
    assert results[first.id][1] and results[first.id][0] < 3.0
    assert results[second.id] == (pytest.approx(0.6, abs=0.03), False)


async def test_close_finishes_what_is_pending(server, speech48k) -> None:
    url, state = server
    async with driving(url) as (browser, sender, reports):
        segment = sender.open()
        await sender.audio(segment, pcm(speech48k, 2.0), 24_000)
        assert await until(lambda: segment.started_at is not None, 10)  # it plays, then
    # the adapter was torn down while it played
    (uid, position, cut), = reports.of("finished")
    assert uid == segment.id and cut and position <= 2.0


async def test_segments_after_the_session_is_gone_finish_at_once(server, speech48k) -> None:
    """The session deleted under the sender: a segment opened afterwards finishes at once
    (interrupted, nothing played) instead of waiting for close(); after close() too, and
    audio for it never waits on the full queue."""
    url, state = server
    gone: list[str] = []
    async with driving(url, max_queued=2, on_gone=gone.append) as (browser, sender, reports):
        await browser.delete()
        assert await until(lambda: sender.gone is not None, 10)
        assert len(gone) == 1 and "ended" in gone[0]
        late = sender.open()
        await asyncio.wait_for(sender.audio(late, pcm(speech48k, 0.5), 24_000), 2)
        await sender.end(late)
        assert await sender.drain(2)
        assert reports.of("finished") == [(late.id, 0.0, True)]
    closed = sender.open()
    for _ in range(5):  # more than max_queued: none of it may wait for room
        await asyncio.wait_for(sender.audio(closed, pcm(speech48k, 0.1), 24_000), 2)
    assert await sender.drain(2)
    assert reports.of("finished")[-1] == (closed.id, 0.0, True)
    assert len(gone) == 1  # told once


async def test_a_segment_the_server_refuses_finishes(server, speech48k) -> None:
    """A segment whose start the server refuses (its id was used and ended on the session
    already, by someone else) is reported finished at once, interrupted, nothing played;
    the next segment plays."""
    url, state = server
    async with driving(url) as (browser, sender, reports):
        await browser.push_speech(at_rate(speech48k, 24_000)[:2400], 24_000, "taken")
        await asyncio.wait_for(browser.wait_event(
            "speech.finished", lambda e: e["utterance_id"] == "taken"), 10)
        refused = sender.open("taken")
        await sender.audio(refused, pcm(speech48k, 0.3), 24_000)
        await sender.end(refused)
        after = sender.open()
        await sender.audio(after, pcm(speech48k, 0.3), 24_000)
        await sender.end(after)
        assert await sender.drain(10)
    results = {uid: (pos, cut) for uid, pos, cut in reports.of("finished")}
    assert results == {refused.id: (0.0, True), after.id: (pytest.approx(0.3, abs=0.03), False)}


async def test_two_senders_on_one_session_never_share_an_id(server, speech48k) -> None:
    """A second driver on the session (or an agent job restarted on it) generates ids that
    the first did not use: its segments play instead of being refused."""
    url, state = server
    async with driving(url) as (browser, first, first_reports):
        one = first.open()
        await first.audio(one, pcm(speech48k, 0.3), 24_000)
        await first.end(one)
        assert await first.drain(10)
        control = SessionControl(url, browser.session_id, browser.token)
        await control.connect()
        second_reports = Reports()
        second = SegmentSender(control, on_started=second_reports.started,
                               on_finished=second_reports.finished)
        await second.start()
        try:
            two = second.open()
            await second.audio(two, pcm(speech48k, 0.4), 24_000)
            await second.end(two)
            assert await second.drain(10)
        finally:
            await second.close()
            await control.close()
    assert one.id != two.id
    assert second_reports.of("finished") == [(two.id, pytest.approx(0.4, abs=0.03), False)]


SMALL_QUEUE = ServerConfig(host="127.0.0.1", port=0, ice_host_addresses=["127.0.0.1"],
                           max_sessions=2, speech_queue_s=1.5)


@pytest.mark.parametrize("via", ["ws", "datachannel"])
async def test_a_reply_longer_than_the_speech_queue_is_spoken_whole(via, speech48k) -> None:
    """A server whose speech queue holds 1.5 s, a 5 s reply pushed as fast as a TTS makes
    it: the queue refuses chunks (queue_full), the sender waits for room and resends them,
    and the avatar says all of it, in order, nothing missing."""
    reply = at_rate(speech48k, 24_000)[: 5 * 24_000]
    reports = Reports()
    async with running_server(SMALL_QUEUE) as (url, state), \
            AvatarClient(url, record_mouth=False) as browser:
        control = SessionControl(url, browser.session_id, browser.token)
        link = control if via == "ws" else browser
        if via == "ws":
            await control.connect()
        sender = SegmentSender(link, on_started=reports.started, on_finished=reports.finished)
        await sender.start()
        try:
            segment = sender.open()
            for i in range(0, len(reply), 2400):  # 100 ms pieces, as fast as they come
                await sender.audio(segment, to_pcm16(reply[i : i + 2400])[0], 24_000)
            await sender.end(segment)
            assert await sender.drain(30)
            rec = browser.received
            t_end = next(t for t, e in reversed(rec.events) if e["type"] == "speech.finished")
            assert await until(lambda: rec.audio_t[-1] > t_end + 0.5, 5)  # its last audio
        finally:
            await sender.close()
            await control.close()
    replies = control.received if via == "ws" else browser.received.events
    refused = [e for _, e in replies if e.get("code") == "queue_full"]
    assert refused and all("offset" in e and e["retry_after"] > 0 for e in refused)
    (uid, position, cut), = reports.of("finished")
    assert uid == segment.id and not cut
    assert position == pytest.approx(5.0, abs=0.03)
    (t0, started), = [(t, e) for t, e in browser.received.events
                      if e.get("type") == "speech.started"]
    heard = received_between(browser.received, t0 - 0.2, t_end + 0.5)
    offset, r = envelope_match(reply, 24_000, heard)
    print(f"queue of 1.5 s, 5 s reply via {via}: {len(refused)} refusals, all of it said "
          f"(position {position:.3f} s), envelope r={r:.3f}")
    assert r >= 0.9


async def test_a_barge_in_ends_the_wait_for_room(speech48k) -> None:
    """Cut while the sender is waiting out a full queue: the cut reply's remaining audio
    is dropped, and the next reply plays soon after, whole."""
    reply = pcm(speech48k, 5.0)
    async with running_server(SMALL_QUEUE) as (url, state), \
            driving(url) as (browser, sender, reports):
        long = sender.open()

        async def push_long() -> None:
            for i in range(0, len(reply), 4800):
                await sender.audio(long, reply[i : i + 4800], 24_000)
            await sender.end(long)

        pushing = asyncio.create_task(push_long())
        assert await until(lambda: long.started_at is not None, 10)
        session = state.sessions[browser.session_id]
        replies = sender.link.received
        assert await until(lambda: any(e.get("code") == "queue_full" for _, e in replies), 10)
        assert session.speech.seconds > 1.0  # the queue is full: the sender waits for room
        sender.interrupt()
        await asyncio.wait_for(pushing, 5)  # its remaining audio is dropped, not waited on
        t_cut = asyncio.get_running_loop().time()
        after = sender.open()
        await sender.audio(after, pcm(speech48k, 0.6), 24_000)
        await sender.end(after)
        assert await sender.drain(10)
        took = asyncio.get_running_loop().time() - t_cut
    results = {uid: (pos, cut) for uid, pos, cut in reports.of("finished")}
    assert results[long.id][1] and results[long.id][0] < 3.0
    assert results[after.id] == (pytest.approx(0.6, abs=0.03), False)
    assert took < 3.0  # the reply's 0.6 s, and no wait for room behind the cut one
