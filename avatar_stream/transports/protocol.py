"""The speech protocol: what a front-end sends on a WebSocket or the ``control`` data
channel (JSON control messages and binary PCM16), and the replies it gets. Shared by every
transport that carries messages, so they all speak the same language."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from avatar_stream import events
from avatar_stream.audio.decode import check_format, decode_pcm
from avatar_stream.core.speechinput import SpeechInput, check_utterance_id
from avatar_stream.core.turnstate import check_state
from avatar_stream.errors import SpeechError
from avatar_stream.events import Message

# -- the speech protocol on a WebSocket or the data channel --------------------------------



class SpeechProtocol:
    """One connection's speech messages (a WebSocket, or the ``control`` data channel).

    JSON text messages: ``start {sample_rate, channels, utterance_id}``, ``end``,
    ``interrupt``, ``state {state}`` (idle, listening, thinking: the turn state, see
    ``core/turnstate.py``), ``ping``. Binary messages: little-endian PCM16, interleaved, for the
    utterance the last ``start`` opened. Replies that concern only this connection (acks,
    errors, pong) go to ``reply``; session events go to every listener elsewhere.
    A garbage message gets an error event and changes nothing.
    """

    def __init__(
        self,
        speech: SpeechInput,
        interrupt: Callable[[], object],
        reply: Callable[[Message], None],
        *,
        set_state: Callable[[str], None],
        max_binary_bytes: int = 1 << 20,
        on_activity: Callable[[], None] | None = None,
    ) -> None:
        self.speech = speech
        self._interrupt = interrupt
        self._set_state = set_state
        self.reply = reply
        self.max_binary_bytes = max_binary_bytes
        self.on_activity = on_activity
        self.utterance: str | None = None
        self.rate = 0
        self.channels = 1
        self._cut = False  # the current utterance was interrupted: drop its audio quietly
        self._received = 0  # bytes of the current utterance since its start
        # a chunk of it was refused (queue full): the rest is dropped until the sender
        # starts it again and resends from there, so its speech stays whole and in order
        self._refused = False

    def error(self, code: str, message: str) -> None:
        self.reply(dict(events.error(message, code)))

    def handle(self, message: str | bytes) -> None:
        if self.on_activity:
            self.on_activity()
        if isinstance(message, bytes | bytearray | memoryview):
            self._binary(bytes(message))
        else:
            self._text(message)

    def _text(self, text: str) -> None:
        try:
            msg = json.loads(text)
        except ValueError:
            self.error("bad_message", "text messages are JSON objects with a 'type'")
            return
        if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
            self.error("bad_message", "text messages are JSON objects with a 'type'")
            return
        kind = msg["type"]
        if kind == "start":
            self._start(msg)
        elif kind == "end":
            self._end(msg)
        elif kind == "interrupt":
            self._cut = self.utterance is not None
            self._interrupt()
        elif kind == "state":
            self._state(msg)
        elif kind == "ping":
            self.reply({"type": "pong"})
        else:
            self.error("bad_message", f"unknown message type {kind!r} (start, end, interrupt, "
                                      "state, ping)")

    def _state(self, msg: dict[str, Any]) -> None:
        try:
            self._set_state(check_state(msg.get("state")))
        except ValueError as exc:
            self.error("bad_state", str(exc))

    def _start(self, msg: dict[str, Any]) -> None:
        rate, channels = msg.get("sample_rate"), msg.get("channels", 1)
        if not isinstance(rate, int) or isinstance(rate, bool) or \
                not isinstance(channels, int) or isinstance(channels, bool):
            self.error("bad_message", "start needs integer sample_rate (and channels)")
            return
        try:
            check_format(rate, channels)
            uid = msg.get("utterance_id")
            uid = self.speech.new_id() if uid is None else check_utterance_id(uid)
            if self.utterance is not None and self.utterance != uid:
                self.speech.end(self.utterance)  # a new start ends the previous utterance
            self.speech.open(uid)
        except SpeechError as exc:
            self.error(exc.kind, exc.message)
            return
        self.utterance, self.rate, self.channels, self._cut = uid, rate, channels, False
        self._received, self._refused = 0, False
        self.reply({"type": "ack", "of": "start", "utterance_id": uid})

    def _end(self, msg: dict[str, Any]) -> None:
        uid = msg.get("utterance_id", self.utterance)
        if uid is None:
            self.error("no_start", "end without an utterance: send start first")
            return
        if uid == self.utterance:
            self.utterance, self._cut, self._refused = None, False, False
        if not isinstance(uid, str):
            self.error("bad_message", "utterance_id must be a string")
            return
        ended = self.speech.end(uid)
        self.reply({"type": "ack", "of": "end", "utterance_id": uid, "was_open": ended})

    def _binary(self, data: bytes) -> None:
        if self.utterance is None:
            self.error("no_start", "binary audio before start: send "
                                   '{"type": "start", "sample_rate": ...} first')
            return
        if self._cut:
            return  # audio of an utterance the listener barged in on: dropped on purpose
        if self._refused:
            self.speech.touch(self.utterance)  # waiting for room is not forgetting the end
            return  # sent before the sender heard of the refusal: it resends it
        if len(data) > self.max_binary_bytes:
            self.error("too_large", f"binary message of {len(data)} bytes; at most "
                                    f"{self.max_binary_bytes}")
            return
        offset = self._received
        self._received += len(data)
        try:
            pcm = decode_pcm(data, self.rate, self.channels, "<i2")
            self.speech.push(pcm, self.utterance)
        except SpeechError as exc:
            if exc.kind == "utterance_closed":  # cut by an interrupt from elsewhere
                self._cut = True
                return
            if exc.kind == "queue_full":
                self._refused = True
                self.speech.touch(self.utterance)
                self.reply(dict(events.queue_full(exc.message, self.utterance, offset,
                                                  exc.retry_after or 1.0)))
                return
            self.error(exc.kind, exc.message)
