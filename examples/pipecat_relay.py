#!/usr/bin/env python3
"""A Pipecat bot that carries an avatar-stream avatar over its own WebRTC transport.

1. Start the server:       avatar-stream serve
2. Start the bot (needs ``pip install 'avatar-stream[pipecat]'``):

    python examples/pipecat_relay.py --server http://127.0.0.1:8080

3. Open the printed page (http://127.0.0.1:7860/), press Connect: the bot greets you
   through the avatar; type a line and press Say.

Each visitor gets a pipeline ``TTS -> AvatarStreamVideoService -> transport.output()``: the
avatar service holds an avatar-stream session of its own and sends the avatar's video and
voice down the pipeline, and Pipecat's SmallWebRTC transport carries them to the browser, as
Daily or a LiveKit room would in a real bot. The visitor's pipeline and the avatar's
session end when the visitor leaves.

The TTS is espeak-ng on this machine, or any OpenAI-compatible /v1/audio/speech endpoint
(``--tts-url``). A real bot adds ``transport.input()``, STT, an LLM and context aggregators in
front of the TTS: see docs/integrations.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from typing import Any

from aiohttp import web
from loguru import logger
from pipecat.frames.frames import TTSSpeakFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineWorker
from pipecat.transports.base_transport import TransportParams
from pipecat.transports.smallwebrtc.connection import SmallWebRTCConnection
from pipecat.transports.smallwebrtc.transport import SmallWebRTCTransport
from pipecat.workers.runner import WorkerRunner

# run from a checkout without installing: the package is next door
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tts_options import add_tts_options, tts_backend  # noqa: E402  (next to this file)

from avatar_stream.integrations.pipecat import (  # noqa: E402
    AvatarStreamTTSService,
    AvatarStreamVideoService,
)
from avatar_stream.transports.webrtc.ice import restrict_host_addresses  # noqa: E402

PAGE = """<!doctype html>
<meta charset="utf-8"><title>Pipecat bot with an avatar</title>
<video id="avatar" width="512" height="512" autoplay playsinline></video>
<p><button id="connect">Connect</button>
<input id="line" size="50" placeholder="a line for the bot to say" disabled>
<button id="say" disabled>Say</button></p>
<script>
const video = document.getElementById("avatar"), line = document.getElementById("line");
const sayButton = document.getElementById("say");
document.getElementById("connect").onclick = async (event) => {
  event.target.disabled = true;
  const pc = new RTCPeerConnection();
  pc.addTransceiver("audio", {direction: "recvonly"});
  pc.addTransceiver("video", {direction: "recvonly"});
  const channel = pc.createDataChannel("chat");
  const stream = new MediaStream();
  pc.ontrack = (e) => { stream.addTrack(e.track); video.srcObject = stream; };
  await pc.setLocalDescription(await pc.createOffer());
  await new Promise((done) => {  // the offer goes with its candidates (no trickle)
    if (pc.iceGatheringState === "complete") return done();
    pc.onicegatheringstatechange = () => pc.iceGatheringState === "complete" && done();
  });
  const answer = await fetch("/api/offer", {method: "POST",
    headers: {"Content-Type": "application/json"},
    body: JSON.stringify({sdp: pc.localDescription.sdp, type: "offer"})});
  await pc.setRemoteDescription(await answer.json());
  channel.onopen = () => { line.disabled = sayButton.disabled = false; };
  sayButton.onclick = () => {
    if (line.value.trim()) channel.send(JSON.stringify({type: "say", text: line.value}));
    line.value = "";
  };
};
</script>
"""


class Bot:
    """One pipeline per visitor, each with an avatar session of its own."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.running: set[asyncio.Task[None]] = set()

    async def page(self, request: web.Request) -> web.Response:
        return web.Response(text=PAGE, content_type="text/html")

    async def offer(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("sdp"), str):
            return web.json_response(
                {"error": 'a JSON offer is needed: {"sdp": "...", "type": "offer"}'}, status=400)
        connection = SmallWebRTCConnection()
        try:
            await connection.initialize(sdp=body["sdp"], type="offer")
        except ValueError as exc:  # aiortc's word on an SDP it cannot use
            await connection.disconnect()
            return web.json_response({"error": f"unusable SDP offer: {exc}"}, status=400)
        task = asyncio.create_task(self.serve(connection))
        self.running.add(task)
        task.add_done_callback(self.running.discard)
        return web.json_response(connection.get_answer())

    async def serve(self, connection: SmallWebRTCConnection) -> None:
        args = self.args
        transport = SmallWebRTCTransport(connection, TransportParams(
            audio_out_enabled=True, video_out_enabled=True, video_out_is_live=True,
            video_out_width=512, video_out_height=512, video_out_framerate=25))
        avatar = AvatarStreamVideoService(url=args.server, avatar=args.avatar,
                                          api_key=args.api_key,
                                          ice_host_addresses=args.ice_host_addresses)
        worker = PipelineWorker(
            Pipeline([AvatarStreamTTSService(tts_backend(args)), avatar, transport.output()]),
            cancel_on_idle_timeout=False)

        connected = asyncio.Event()

        @transport.event_handler("on_client_connected")
        async def greet(transport: Any, client: Any) -> None:
            connected.set()
            print("visitor connected", flush=True)
            await worker.queue_frame(TTSSpeakFrame(args.greeting))

        @transport.event_handler("on_app_message")
        async def say(transport: Any, message: Any, sender: str) -> None:
            if isinstance(message, dict) and message.get("type") == "say" and \
                    isinstance(message.get("text"), str) and message["text"].strip():
                await worker.queue_frame(TTSSpeakFrame(message["text"].strip()[:1000]))

        @transport.event_handler("on_client_disconnected")
        async def leave(transport: Any, client: Any) -> None:
            print("visitor left", flush=True)
            await worker.cancel()

        async def give_up_unless_connected() -> None:
            """A visitor whose connection never comes up would hold its pipeline and its
            avatar session for good: only a disconnect ends them otherwise."""
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(connected.wait(), args.connect_timeout)
                return
            print("visitor never connected", flush=True)
            await worker.cancel()

        runner = WorkerRunner(handle_sigint=False)
        await runner.add_workers(worker)
        watch = asyncio.create_task(give_up_unless_connected())
        try:
            await runner.run()
        finally:
            watch.cancel()
            if not connected.is_set():  # the transport closes only a connection that came up
                await connection.disconnect()



async def main(args: argparse.Namespace) -> int:
    logger.remove()  # Pipecat logs every frame processor's life at DEBUG: keep warnings only
    logger.add(sys.stderr, level="DEBUG" if args.verbose else "WARNING")
    if args.ice_host_addresses:
        restrict_host_addresses(args.ice_host_addresses)  # the visitors' side too
    bot = Bot(args)
    app = web.Application()
    app.router.add_get("/", bot.page)
    app.router.add_post("/api/offer", bot.offer)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, args.host, args.port).start()
    print(f"open http://{args.host}:{runner.addresses[0][1]}/", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    for task in list(bot.running):
        task.cancel()
    await asyncio.gather(*bot.running, return_exceptions=True)
    await runner.cleanup()
    return 0


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--server", default="http://127.0.0.1:8080", help="avatar-stream's URL")
    p.add_argument("--avatar", help="an avatar id on that server (default: its default)")
    p.add_argument("--api-key", default=os.environ.get("AVATAR_STREAM_API_KEY"))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860, help="the bot's page (0: any free port)")
    p.add_argument("--ice-host-addresses", type=lambda s: s.split(","),
                   help="offer ICE candidates only on these addresses (e.g. 127.0.0.1)")
    p.add_argument("--greeting", default="Hello! I am a Pipecat bot, and this is my face.")
    p.add_argument("--connect-timeout", type=float, default=30.0,
                   help="seconds a visitor's WebRTC connection may take to come up")
    add_tts_options(p)
    p.add_argument("--verbose", action="store_true", help="Pipecat's own debug log")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse())))
