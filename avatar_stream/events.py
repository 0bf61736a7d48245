"""The session's events, typed and named in one place.

Every transport sends these as JSON (the data channel, the WebSocket) and every client reads
them back; the names are the protocol, so they live here and nowhere else. ``Message`` is any
JSON control message or reply on a connection (acks, pongs, a connection's own errors), whose
shape belongs to the speech protocol (``transports/protocol.py``).
"""

from __future__ import annotations

from typing import Any, Literal, TypedDict

READY = "ready"
SPEECH_STARTED = "speech.started"
SPEECH_FINISHED = "speech.finished"
SESSION_ENDED = "session.ended"
STATE_CHANGED = "state.changed"
ERROR = "error"

Message = dict[str, Any]  # a control message or reply as JSON, any shape


class Ready(TypedDict):
    type: Literal["ready"]
    session_id: str
    avatar: dict[str, Any]


class SpeechStarted(TypedDict):
    """The first frame carrying the utterance's audio left the pacer."""

    type: Literal["speech.started"]
    utterance_id: str


class SpeechFinished(TypedDict):
    """The utterance's last frame left, or it was cut: ``position_s`` is what was played."""

    type: Literal["speech.finished"]
    utterance_id: str
    position_s: float
    interrupted: bool


class StateChanged(TypedDict):
    """What the face shows changed (``core/turnstate.py``): idle, listening, thinking,
    speaking."""

    type: Literal["state.changed"]
    state: str
    previous: str


class SessionEnded(TypedDict):
    type: Literal["session.ended"]
    reason: str


class _ErrorBase(TypedDict):
    type: Literal["error"]
    message: str


class ErrorEvent(_ErrorBase, total=False):
    code: str  # an error kind (``errors.STATUS``) where a client can act on it
    # a WebSocket / data channel chunk refused as ``queue_full``: its utterance, its byte
    # offset since the utterance's ``start``, and the seconds until it would fit
    utterance_id: str
    offset: int
    retry_after: float


Event = Ready | SpeechStarted | SpeechFinished | StateChanged | SessionEnded | ErrorEvent


def ready(session_id: str, avatar: dict[str, Any]) -> Ready:
    return {"type": "ready", "session_id": session_id, "avatar": avatar}


def speech_started(utterance_id: str) -> SpeechStarted:
    return {"type": "speech.started", "utterance_id": utterance_id}


def speech_finished(utterance_id: str, position_s: float, interrupted: bool) -> SpeechFinished:
    return {"type": "speech.finished", "utterance_id": utterance_id,
            "position_s": round(position_s, 3), "interrupted": interrupted}


def state_changed(state: str, previous: str) -> StateChanged:
    return {"type": "state.changed", "state": state, "previous": previous}


def session_ended(reason: str) -> SessionEnded:
    return {"type": "session.ended", "reason": reason}


def error(message: str, code: str | None = None) -> ErrorEvent:
    event: ErrorEvent = {"type": "error", "message": message}
    if code is not None:
        event["code"] = code
    return event


def queue_full(message: str, utterance_id: str, offset: int, retry_after: float) -> ErrorEvent:
    """A binary chunk refused: the speech queue is full. The connection drops the rest of
    the utterance's chunks until its next ``start``; resend from ``offset`` after
    ``retry_after`` seconds."""
    return {"type": "error", "message": message, "code": "queue_full",
            "utterance_id": utterance_id, "offset": offset,
            "retry_after": round(retry_after, 3)}
