"""WHEP on the real server, from real aiortc peers: the endpoint's answer and headers, trickled
candidates (filtered like the offer's), the precondition and restart refusals, and offers
whose every candidate the server drops (mDNS names) still connecting."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import time

import aiohttp
import pytest
import pytest_asyncio
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from wavs import tone, wav_bytes

from avatar_stream.config import IceServer, ServerConfig
from avatar_stream.transports.http.app import running_server
from avatar_stream.transports.http.whep import EVENTS_REL, SESSION_REL, ice_server_links
from avatar_stream.transports.webrtc.ice import (
    filter_candidates,
    rtc_configuration,
)
from avatar_stream.transports.webrtc.turn import check_credentials

pytestmark = pytest.mark.timeout(120)
ON_SERVER = pytest.mark.asyncio(loop_scope="module")

SECRET = "whep-turn-secret"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TURN = f"turn:127.0.0.1:{_closed_port()}?transport=tcp"
KEY = "whep-test-key"
ORIGIN = "https://player.example"
SDP = {"Content-Type": "application/sdp"}
FRAG = {"Content-Type": "application/trickle-ice-sdpfrag"}


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def server():
    # TURN credentials are minted for each session; no TURN server listens here (the
    # browser test relays through coturn): the server's own allocation on a closed port
    # fails at once and ICE goes on with its host candidate.
    config = ServerConfig(host="127.0.0.1", port=0, ice_host_addresses=["127.0.0.1"],
                          max_sessions=4, turn_urls=[TURN], turn_secret=SECRET,
                          sessions_per_ip_per_minute=0, api_key=KEY, cors_origins=[ORIGIN])
    async with running_server(config) as (url, state):
        async with aiohttp.ClientSession(headers=bearer(KEY)) as http:  # a player's token
            yield url, state, http


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


class Viewer:
    """A WHEP viewer on aiortc: receives the avatar's video and audio, counts frames."""

    def __init__(self) -> None:
        self.pc = RTCPeerConnection(rtc_configuration([]))
        self.pc.addTransceiver("video", direction="recvonly")
        self.pc.addTransceiver("audio", direction="recvonly")
        self.frames = 0
        self.tasks: list[asyncio.Task[None]] = []
        self.pc.on("track", lambda track: self.tasks.append(
            asyncio.ensure_future(self._count(track))))

    async def _count(self, track: MediaStreamTrack) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                await track.recv()
                if track.kind == "video":
                    self.frames += 1

    async def offer(self) -> str:
        """The gathered offer (aiortc gathers before it returns the description)."""
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return self.pc.localDescription.sdp

    async def answer(self, sdp: str) -> None:
        await self.pc.setRemoteDescription(RTCSessionDescription(
            sdp=filter_candidates(sdp, ["127.0.0.1"]), type="answer"))

    async def until_frames(self, n: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.frames < n and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert self.frames >= n, f"{self.frames} video frames in {timeout} s"

    async def close(self) -> None:
        await self.pc.close()
        for task in self.tasks:
            task.cancel()


def candidates_of(sdp: str) -> list[str]:
    return [line[2:] for line in sdp.splitlines() if line.startswith("a=candidate:")]


def without_candidates(sdp: str) -> str:
    return "".join(line + "\r\n" for line in sdp.splitlines()
                   if not line.startswith(("a=candidate:", "a=end-of-candidates")))


def ufrag_pwd(sdp: str) -> tuple[str, str]:
    ufrag = re.search(r"^a=ice-ufrag:(\S+)", sdp, re.M)
    pwd = re.search(r"^a=ice-pwd:(\S+)", sdp, re.M)
    assert ufrag and pwd
    return ufrag.group(1), pwd.group(1)


def fragment(offer: str, candidates: list[str], end: bool, ufrag: str | None = None) -> str:
    """What a WHEP client PATCHes (RFC 8840): credentials, then the first media section."""
    u, p = ufrag_pwd(offer)
    mid = re.search(r"^a=mid:(\S+)", offer, re.M)
    assert mid
    lines = [f"a=ice-ufrag:{ufrag or u}", f"a=ice-pwd:{p}", "m=video 9 UDP/TLS/RTP/SAVPF 0",
             f"a=mid:{mid.group(1)}", *(f"a={c}" for c in candidates)]
    if end:
        lines.append("a=end-of-candidates")
    return "\r\n".join(lines) + "\r\n"


def server_remote_candidates(state, session_id: str) -> list:
    peer = state.sessions[session_id].transport
    transports = {id(t): t for t in peer._ice_transports().values()}
    return [c for t in transports.values() for c in t.getRemoteCandidates()]


@ON_SERVER
async def test_endpoint_answers_with_whep_headers(server) -> None:
    url, state, http = server
    viewer = Viewer()
    try:
        async with http.post(f"{url}/v1/whep", data=await viewer.offer(), headers=SDP) as r:
            assert r.status == 201 and r.content_type == "application/sdp", await r.text()
            answer = await r.text()
            location, etag = r.headers["Location"], r.headers["ETag"]
            links = r.headers.getall("Link")
            token = r.headers["X-Session-Token"]
        sid = location.split("/")[3]
        assert location == f"/v1/sessions/{sid}/whep" and sid in state.sessions and token
        assert etag == f'"{ufrag_pwd(answer)[0]}"'  # strong, names the answer's ICE session
        turn = [link for link in links if 'rel="ice-server"' in link]
        assert len(turn) == 1 and turn[0].startswith(f"<{TURN}>"), links
        username = re.search(r'username="([^"]+)"', turn[0])
        credential = re.search(r'credential="([^"]+)"', turn[0])
        assert username and credential and 'credential-type="password"' in turn[0]
        assert check_credentials(SECRET, username.group(1), credential.group(1))
        assert f'</v1/sessions/{sid}/ws>; rel="{EVENTS_REL}"' in links
        assert f'</v1/sessions/{sid}>; rel="{SESSION_REL}"' in links
        await viewer.answer(answer)
        await viewer.until_frames(25)

        # the draft's method table: 405 with Allow, never a JSON listing
        for method in ("GET", "HEAD", "PUT"):
            async with http.request(method, f"{url}/v1/whep") as r:
                assert r.status == 405 and set(r.headers["Allow"].split(",")) == {
                    "OPTIONS", "POST"}, method
        for method in ("GET", "HEAD", "POST", "PUT"):
            async with http.request(method, f"{url}{location}") as r:
                assert r.status == 405 and "PATCH" in r.headers["Allow"], method
        async with http.options(f"{url}/v1/whep") as r:
            assert r.status == 204 and r.headers["Accept-Post"] == "application/sdp"
        async with http.options(f"{url}{location}") as r:
            assert r.status == 204
            assert r.headers["Accept-Patch"] == "application/trickle-ice-sdpfrag"
        async with http.delete(f"{url}{location}") as r:
            assert r.status == 204
        assert sid not in state.sessions
        async with http.delete(f"{url}{location}") as r:
            assert r.status == 204  # idempotent: a player may DELETE after its pc closed
        async with http.delete(f"{url}/v1/sessions/{sid}") as r:
            assert r.status == 410  # the JSON API says why it ended
        async with http.patch(f"{url}{location}", data=fragment(viewer.pc.localDescription.sdp,
                                                                [], True), headers=FRAG) as r:
            assert r.status == 410
    finally:
        await viewer.close()


@ON_SERVER
async def test_candidates_trickled_after_the_post(server) -> None:
    """The POST carries no candidate; they come by PATCH, filtered like an offer's."""
    url, state, http = server
    viewer = Viewer()
    try:
        offer = await viewer.offer()
        mine = candidates_of(offer)
        assert mine
        async with http.post(f"{url}/v1/whep", data=without_candidates(offer),
                             headers=SDP) as r:
            assert r.status == 201, await r.text()
            location, etag, answer = r.headers["Location"], r.headers["ETag"], await r.text()
        sid = location.split("/")[3]
        assert server_remote_candidates(state, sid) == []
        outside = "candidate:9 1 udp 2122260223 10.99.0.1 9 typ host"  # never contacted
        async with http.patch(f"{url}{location}", data=fragment(offer, [outside, *mine], True),
                              headers={**FRAG, "If-Match": etag}) as r:
            assert r.status == 204 and r.headers["ETag"] == etag, await r.text()
        trickled = {(c.ip, c.port) for c in server_remote_candidates(state, sid)}
        local = {(c.split()[4], int(c.split()[5])) for c in mine}
        assert local <= trickled and ("10.99.0.1", 9) not in trickled, trickled
        await viewer.answer(answer)
        await viewer.until_frames(25)
    finally:
        await viewer.close()
    async with http.delete(f"{url}{location}") as r:
        assert r.status == 204


@ON_SERVER
async def test_patch_preconditions_and_ice_restart(server) -> None:
    url, state, http = server
    viewer = Viewer()
    try:
        offer = await viewer.offer()
        async with http.post(f"{url}/v1/whep", data=offer, headers=SDP) as r:
            assert r.status == 201
            location, etag = r.headers["Location"], r.headers["ETag"]
        resource = f"{url}{location}"
        plain = fragment(offer, [], False)
        cases = [
            # (body, headers, status, words)
            (plain, {**FRAG, "If-Match": '"stale"'}, 412, "not this session's"),
            ("a=end-of-candidates\r\n", FRAG, 428, "If-Match"),
            (fragment(offer, [], False, ufrag="restart1"), {**FRAG, "If-Match": "*"}, 422,
             "cannot restart ICE"),
            (fragment(offer, [], False, ufrag="restart1"), {**FRAG, "If-Match": etag}, 422,
             "ICE restart"),
            (plain, {"Content-Type": "application/sdp", "If-Match": etag}, 415,
             "trickle-ice-sdpfrag"),
            ("hello\r\n", {**FRAG, "If-Match": etag}, 400, "not an SDP line"),
            ("a=candidate:1 1 udp x 127.0.0.1 9 typ host\r\n", {**FRAG, "If-Match": etag}, 400,
             "not an ICE candidate"),
            (b"\xff\xfe", {**FRAG, "If-Match": etag}, 400, "not valid text"),
        ]
        for body, headers, status, words in cases:
            async with http.patch(resource, data=body, headers=headers) as r:
                reply = await r.json()
                assert r.status == status and words in reply["error"], (body, reply)
        for headers in ({**FRAG, "If-Match": etag}, FRAG):  # no If-Match, but its ufrag
            async with http.patch(resource, data=plain, headers=headers) as r:
                assert r.status == 204
        async with http.patch(f"{url}/v1/sessions/nobody/whep", data=plain, headers=FRAG) as r:
            assert r.status == 404
        assert location.split("/")[3] in state.sessions  # none of it ended the session
    finally:
        await viewer.close()
    async with http.delete(resource) as r:
        assert r.status == 204


@ON_SERVER
@pytest.mark.parametrize("api", ["whep", "json"])
async def test_offer_whose_candidates_are_all_dropped_still_connects(server, api) -> None:
    """Chrome's host candidates are mDNS names, never in --ice-host-addresses: an offer that
    ends its candidates with only those gets an answer, and the session connects through
    the client's own checks (peer-reflexive), not a silent failure."""
    url, state, http = server
    viewer = Viewer()
    try:
        offer = await viewer.offer()
        n = 0

        def mdns(match: re.Match[str]) -> str:
            nonlocal n
            n += 1
            return f"{match.group(1)}{n:08x}-4c1f-4e0a-9d65-8f3b2c7a1e0{n % 10}.local "

        masked = re.sub(r"^(a=candidate:\S+ \d+ \S+ \d+ )\S+ ", mdns, offer, flags=re.M)
        assert n and "a=end-of-candidates" in masked
        assert not any("127.0.0.1" in c for c in candidates_of(masked))
        if api == "whep":
            async with http.post(f"{url}/v1/whep", data=masked, headers=SDP) as r:
                assert r.status == 201, await r.text()
                answer, sid = await r.text(), r.headers["Location"].split("/")[3]
        else:
            async with http.post(f"{url}/v1/sessions", json={"sdp": masked}) as r:
                assert r.status == 201, await r.text()
                body = await r.json()
                answer, sid = body["sdp"], body["session_id"]
        await viewer.answer(answer)
        await viewer.until_frames(25)
        kinds = {c.type for c in server_remote_candidates(state, sid)}
        assert kinds == {"prflx"}, kinds
    finally:
        await viewer.close()
    async with http.delete(f"{url}/v1/sessions/{sid}") as r:
        assert r.status == 204


def test_ice_server_links_quote_their_credentials() -> None:
    links = ice_server_links([IceServer(("stun:stun.example.org",)),
                              IceServer(("turn:a:3478", "turns:a:5349"), 'u"1', "c\\2")])
    assert links == [
        '<stun:stun.example.org>; rel="ice-server"',
        '<turn:a:3478>; rel="ice-server"; username="u\\"1"; credential="c\\\\2"; '
        'credential-type="password"',
        '<turns:a:5349>; rel="ice-server"; username="u\\"1"; credential="c\\\\2"; '
        'credential-type="password"',
    ]


@ON_SERVER
async def test_credentials_cors_and_the_event_websocket_link(server) -> None:
    """A page on another origin may do all of it; the session's token (not the key) opens
    the PATCH, the events link and the session's other calls."""
    url, state, http = server
    viewer = Viewer()
    async with aiohttp.ClientSession() as bare:
        async with bare.post(f"{url}/v1/whep", data=await viewer.offer(), headers=SDP) as r:
            assert r.status == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
        # the preflight of a cross-origin PATCH, answered before any credentials
        async with bare.options(f"{url}/v1/sessions/any/whep", headers={
                "Origin": ORIGIN, "Access-Control-Request-Method": "PATCH",
                "Access-Control-Request-Headers": "authorization, content-type, if-match"}) as r:
            assert r.status == 204 and r.headers["Access-Control-Allow-Origin"] == ORIGIN
            assert "PATCH" in r.headers["Access-Control-Allow-Methods"]
            assert "If-Match" in r.headers["Access-Control-Allow-Headers"]
        try:
            async with http.post(f"{url}/v1/whep", data=viewer.pc.localDescription.sdp,
                                 headers={**SDP, "Origin": ORIGIN}) as r:
                assert r.status == 201
                exposed = {h.strip() for h in r.headers["Access-Control-Expose-Headers"].split(",")}
                assert {"Location", "ETag", "Link", "X-Session-Token"} <= exposed, exposed
                location, token, answer = (r.headers["Location"], r.headers["X-Session-Token"],
                                           await r.text())
                events = next(link for link in r.headers.getall("Link") if EVENTS_REL in link)
            sid = location.split("/")[3]
            frag = fragment(viewer.pc.localDescription.sdp, [], False)
            async with bare.patch(f"{url}{location}", data=frag, headers=FRAG) as r:
                assert r.status == 401
            async with bare.patch(f"{url}{location}", data=frag,
                                  headers={**FRAG, **bearer(token)}) as r:
                assert r.status == 204
            await viewer.answer(answer)
            await viewer.until_frames(10)
            # the events link, resolved against the resource, with the token in its query
            ws_path = re.match(r"<([^>]+)>", events)
            assert ws_path
            async with bare.ws_connect(f"{url}{ws_path.group(1)}?token={token}") as ws:
                async with bare.post(f"{url}/v1/sessions/{sid}/audio",
                                     data=wav_bytes(tone(16000, 0.6), 16000),
                                     headers={"Content-Type": "audio/wav", **bearer(token)}) as r:
                    assert r.status == 202, await r.text()
                seen = []
                while "speech.finished" not in seen:
                    message = await asyncio.wait_for(ws.receive_json(), 10)
                    seen.append(message["type"])
                assert seen.index("speech.started") < seen.index("speech.finished"), seen
            async with bare.delete(f"{url}{location}", headers=bearer(token)) as r:
                assert r.status == 204
        finally:
            await viewer.close()
