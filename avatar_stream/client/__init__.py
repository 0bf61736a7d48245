"""Python clients: :class:`AvatarClient` holds a WebRTC session of its own;
:class:`SessionControl` drives a session someone else (a browser) holds."""

from avatar_stream.client.avatarclient import AvatarClient, Received
from avatar_stream.client.sessioncontrol import RequestError, SessionControl

__all__ = ["AvatarClient", "Received", "RequestError", "SessionControl"]
