"""avatar-stream: a real-time talking-head avatar server.

The public API, imported on first use (``import avatar_stream`` itself loads nothing heavy):

- clients: :class:`AvatarClient` (a WebRTC session of its own), :class:`SessionControl`
  (a session someone else holds), :class:`RequestError`;
- the server: :class:`ServerConfig`, :class:`IceServer`, :func:`running_server` (in-process,
  for tests and embedding), :func:`run` (what ``avatar-stream serve`` runs);
- the core, for a transport of your own: :class:`Session`, :class:`MediaSink`,
  :class:`Transport`, :class:`SpeechError`, :data:`Event` (the session's typed events);
- engines: :class:`Engine`, :class:`EngineStream`, :class:`Avatar`, :func:`create_engine`,
  :data:`ENGINES`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from avatar_stream.client import AvatarClient, RequestError, SessionControl
    from avatar_stream.config import IceServer, ServerConfig
    from avatar_stream.core.session import Session
    from avatar_stream.core.sink import MediaSink, Transport
    from avatar_stream.engines import ENGINES, Avatar, Engine, EngineStream, create_engine
    from avatar_stream.errors import SpeechError
    from avatar_stream.events import Event
    from avatar_stream.media import FPS, OUT_RATE, SAMPLE_RATE
    from avatar_stream.transports.http.app import run, running_server

_WHERE = {
    "AvatarClient": "avatar_stream.client",
    "RequestError": "avatar_stream.client",
    "SessionControl": "avatar_stream.client",
    "IceServer": "avatar_stream.config",
    "ServerConfig": "avatar_stream.config",
    "Session": "avatar_stream.core.session",
    "MediaSink": "avatar_stream.core.sink",
    "Transport": "avatar_stream.core.sink",
    "ENGINES": "avatar_stream.engines",
    "Avatar": "avatar_stream.engines",
    "Engine": "avatar_stream.engines",
    "EngineStream": "avatar_stream.engines",
    "create_engine": "avatar_stream.engines",
    "SpeechError": "avatar_stream.errors",
    "Event": "avatar_stream.events",
    "FPS": "avatar_stream.media",
    "OUT_RATE": "avatar_stream.media",
    "SAMPLE_RATE": "avatar_stream.media",
    "run": "avatar_stream.transports.http.app",
    "running_server": "avatar_stream.transports.http.app",
}

__all__ = [
    "Avatar",
    "AvatarClient",
    "ENGINES",
    "Engine",
    "EngineStream",
    "Event",
    "FPS",
    "IceServer",
    "MediaSink",
    "OUT_RATE",
    "RequestError",
    "SAMPLE_RATE",
    "ServerConfig",
    "Session",
    "SessionControl",
    "SpeechError",
    "Transport",
    "create_engine",
    "run",
    "running_server",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'avatar_stream' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value
